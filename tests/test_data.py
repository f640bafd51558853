"""data.py: patch extraction and motion, the motion mix, crops and synthetic layered motion."""
import numpy as np
import pytest
from PIL import Image

import data
import train
from conftest import moving_pattern


def extraction_args(**overrides):
    args = train.parse_args(['--patch', '40', '--strides', '1', '--crops', '1', '--static-keep', '0'])
    vars(args).update(overrides)
    return args


def test_extraction_keeps_moving_triplets():
    frames = moving_pattern(frames=6, size=64, speed=3)
    patches, motions = data.extract_patches(iter(frames), extraction_args(motion_scale=1, patch=64), np.random.default_rng(0))
    assert patches.shape == (4, 3, 64, 64, 3)  # centres 1..4 of 6 frames
    assert motions == pytest.approx([6.0] * 4, abs=0.01)


def test_extraction_keeps_patches_in_proportion_to_motion():
    frames = moving_pattern(frames=42, size=64, speed=3)
    patches, _ = data.extract_patches(iter(frames), extraction_args(motion_scale=24, patch=64), np.random.default_rng(0))
    assert 4 <= len(patches) <= 16  # 40 candidates moving 6 px, each kept with probability 6 / 24


def test_extraction_rejects_static_patches():
    still = [moving_pattern(frames=1)[0]] * 6
    patches, _ = data.extract_patches(iter(still), extraction_args(), np.random.default_rng(0))
    assert len(patches) == 0


def test_extraction_spreads_the_reservoir_over_the_whole_clip():
    frames = [pattern // 2 + t for t, pattern in enumerate(moving_pattern(frames=60, speed=3))]  # min value = t
    patches, _ = data.extract_patches(iter(frames), extraction_args(motion_scale=1, max_per_video=10),
                                       np.random.default_rng(0))
    centres = sorted(int(p[1].astype(int).min()) for p in patches)  # the offset t of each centre frame
    assert len(patches) == 10 and centres[-1] > 30


def test_extraction_rejects_triplets_across_a_shot_cut():
    first = moving_pattern(frames=4, seed=0, speed=4)
    second = [frame // 4 for frame in moving_pattern(frames=4, seed=1, speed=4)]  # another shot: dark
    patches, _ = data.extract_patches(iter(first + second), extraction_args(motion_scale=1), np.random.default_rng(0))
    # centres 1, 2 (first shot) and 5, 6 (second shot); centres 3 and 4 straddle the cut
    assert len(patches) == 4
    for triplet in patches:
        means = triplet.reshape(3, -1).mean(1)
        assert np.ptp(means) < 40  # all three frames from the same shot


@pytest.mark.parametrize('shift', [(0, 0), (3, -5), (-8, 2), (12, 12)])
def test_patch_motion_measures_translation(shift):
    texture = np.random.default_rng(1).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    first, last = texture[30:126, 30:126], texture[30 + shift[0]:126 + shift[0], 30 + shift[1]:126 + shift[1]]
    assert data.patch_motion(first, last) == pytest.approx(np.hypot(*shift), abs=0.3)


@pytest.mark.parametrize('shift', [0.5, 1.5, 2.5])
def test_patch_motion_resolves_subpixel_shifts(shift):
    """A smooth texture moved by a fraction of a pixel (2x-downscaled textures offset by an odd count)."""
    fine = np.asarray(Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))
                      .resize((320, 320), Image.BICUBIC)).astype(np.float32)
    step = int(2 * shift)
    first, last = (fine[:192, o:o + 192].reshape(96, 2, 96, 2, 3).mean((1, 3)) for o in (0, step))
    motion = data.patch_motion(first.round().astype(np.uint8), last.round().astype(np.uint8))
    assert motion == pytest.approx(shift, abs=0.25)


def test_sampling_follows_the_motion_mix_and_caps_each_source():
    args = train.parse_args(['--clip-share', '0.3', '--max-repeat', '4'])
    args.motion_mix = (0.2, 0.3, 0.2, 0.2, 0.1)
    rng = np.random.default_rng(0)
    motions = [np.r_[np.zeros(3000), rng.uniform(1, 15, 3000)]] + [rng.uniform(1, 15, 500) for _ in range(5)] + [np.full(100, 30.0)]
    weights = data.sampling_weights(motions, args)
    source = np.repeat(np.arange(len(motions)), [len(m) for m in motions])
    per_source = np.bincount(source, weights)
    drawn = np.bincount(data.motion_bucket(np.concatenate(motions)), weights, minlength=5)
    assert weights.sum() == pytest.approx(1) and per_source.max() <= 0.3 * 1.001
    assert drawn[0] == pytest.approx(0.2, abs=0.03) and drawn[1] == pytest.approx(0.3, abs=0.05)
    assert 0.04 < drawn[4] < 0.06  # 1.2 % of the patches: drawn about 4x as often, not 10x


def test_still_samples_are_the_identity_and_shifts_only_a_share():
    triplet = np.stack([np.random.default_rng(k).integers(0, 256, (48, 48, 3), dtype=np.uint8) for k in range(3)])
    still = data.Triplets([triplet[None]], crop=32, seed=0, still=1.0)
    for k in range(5):
        one, middle, two = still[k]
        assert np.array_equal(one, middle) and np.array_equal(two, middle)
    texture = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    shifted = data.Triplets([np.stack([texture] * 3)[None]], crop=32, seed=0, shift=6, shift_share=0.3)
    moved = [not np.array_equal(*(t.numpy() for t in shifted[k][::2])) for k in range(200)]
    assert 0.2 < np.mean(moved) < 0.4


def test_synthetic_layers_include_still_and_subpixel_motion():
    rng = np.random.default_rng(0)
    motions = [np.abs(data.layer_motion(24, rng)).max() for _ in range(2000)]
    counts = np.bincount(motions, minlength=25)
    assert 0.12 < counts[0] / 2000 < 0.25 and counts[1] > 0.1 * 2000 and max(motions) == 24


def displaced(a, b, dy, dx):
    """Whether a[y + dy, x + dx] == b[y, x] wherever both exist (C x H x W arrays)."""
    rows = lambda d, n: slice(max(d, 0), n + min(d, 0))
    height, width = a.shape[1:]
    return np.array_equal(a[:, rows(dy, height), rows(dx, width)], b[:, rows(-dy, height), rows(-dx, width)])


def test_opposite_shift_crops_keep_the_middle_exact():
    texture = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    dataset = data.Triplets([np.stack([texture] * 3)[None]], crop=32, seed=0, shift=6)
    shifts = []
    for k in range(20):
        one, middle, two = (t.numpy() for t in dataset[k])
        found = [(dy, dx) for dy in range(-6, 7) for dx in range(-6, 7) if displaced(one, middle, dy, dx)]
        assert len(found) == 1 and displaced(two, middle, -found[0][0], -found[0][1])
        shifts.append(found[0])
    assert len(set(shifts)) > 5 and max(max(map(abs, s)) for s in shifts) == 6




def test_middle_flows_point_to_where_the_middle_content_is():
    texture = np.asarray(Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
                         .resize((128, 128), Image.BICUBIC))
    dy, dx = 2, -3
    crop = lambda y, x: texture[16 + y:80 + y, 16 + x:80 + x]
    flows = data.middle_flows(np.stack([crop(-dy, -dx), crop(0, 0), crop(dy, dx)]))  # middle(p) = one(p + d)
    assert flows.shape == (4, 64, 64) and flows.dtype == np.float32
    assert np.median(flows[:, 8:-8, 8:-8], axis=(1, 2)) == pytest.approx([dy, dx, -dy, -dx], abs=0.05)
    still = data.Triplets([np.stack([crop(0, 0)] * 3)[None]], crop=32, seed=0, still=1.0, flows=True)
    *frames, flows = still[0]
    assert len(frames) == 3 and flows.shape == (4, 32, 32) and flows.abs().max() < 0.05
    assert len(data.Triplets([np.stack([crop(0, 0)] * 3)[None]], crop=32, seed=0)[0]) == 3


def test_cache_key_follows_the_content_not_the_path_or_time(tmp_path):
    source = tmp_path / 'a.mp4'
    source.write_bytes(b'video bytes')
    key = data.fingerprint(str(source))
    copy = tmp_path / 'elsewhere' / 'a.mp4'
    copy.parent.mkdir()
    copy.write_bytes(b'video bytes')
    assert data.fingerprint(str(copy)) == key
    copy.write_bytes(b'other bytes')
    assert data.fingerprint(str(copy)) != key
