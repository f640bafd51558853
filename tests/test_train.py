import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from model import Network, load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moving_pattern(frames=8, size=48, speed=2, seed=0):
    """Frames of a random texture sliding right by `speed` pixels per frame."""
    texture = np.random.default_rng(seed).integers(0, 256, (size, size + frames * speed, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, t * speed:t * speed + size]) for t in range(frames)]


@pytest.fixture
def frames_dir(tmp_path):
    folder = tmp_path / 'clip'
    folder.mkdir()
    for index, frame in enumerate(moving_pattern()):
        Image.fromarray(frame).save(folder / f'{index:03d}.png')
    return folder


def extraction_args(**overrides):
    args = train.parse_args(['--patch', '40', '--strides', '1', '--crops', '1', '--static-keep', '0'])
    vars(args).update(overrides)
    return args


def test_extraction_keeps_moving_triplets():
    frames = moving_pattern(frames=6, size=64, speed=3)
    patches, motions = train.extract_patches(iter(frames), extraction_args(motion_scale=1, patch=64), np.random.default_rng(0))
    assert patches.shape == (4, 3, 64, 64, 3)  # centres 1..4 of 6 frames
    assert motions.tolist() == [6.0] * 4


def test_extraction_keeps_patches_in_proportion_to_motion():
    frames = moving_pattern(frames=42, size=64, speed=3)
    patches, _ = train.extract_patches(iter(frames), extraction_args(motion_scale=24, patch=64), np.random.default_rng(0))
    assert 4 <= len(patches) <= 16  # 40 candidates moving 6 px, each kept with probability 6 / 24


def test_extraction_rejects_static_patches():
    still = [moving_pattern(frames=1)[0]] * 6
    patches, _ = train.extract_patches(iter(still), extraction_args(), np.random.default_rng(0))
    assert len(patches) == 0


def test_extraction_spreads_the_reservoir_over_the_whole_clip():
    frames = [pattern // 2 + t for t, pattern in enumerate(moving_pattern(frames=60, speed=3))]  # min value = t
    patches, _ = train.extract_patches(iter(frames), extraction_args(motion_scale=1, max_per_video=10),
                                       np.random.default_rng(0))
    centres = sorted(int(p[1].astype(int).min()) for p in patches)  # the offset t of each centre frame
    assert len(patches) == 10 and centres[-1] > 30


def test_extraction_rejects_triplets_across_a_shot_cut():
    first = moving_pattern(frames=4, seed=0, speed=4)
    second = [frame // 4 for frame in moving_pattern(frames=4, seed=1, speed=4)]  # another shot: dark
    patches, _ = train.extract_patches(iter(first + second), extraction_args(motion_scale=1), np.random.default_rng(0))
    # centres 1, 2 (first shot) and 5, 6 (second shot); centres 3 and 4 straddle the cut
    assert len(patches) == 4
    for triplet in patches:
        means = triplet.reshape(3, -1).mean(1)
        assert np.ptp(means) < 40  # all three frames from the same shot


@pytest.mark.parametrize('shift', [(0, 0), (3, -5), (-8, 2), (12, 12)])
def test_patch_motion_measures_translation(shift):
    texture = np.random.default_rng(1).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    first, last = texture[30:126, 30:126], texture[30 + shift[0]:126 + shift[0], 30 + shift[1]:126 + shift[1]]
    assert train.patch_motion(first, last) == pytest.approx(np.hypot(*shift), abs=1.5)


def test_balance_caps_each_source_and_the_static_share():
    args = train.parse_args(['--clip-share', '0.2', '--static-share', '0.1'])
    rng = np.random.default_rng(0)
    motions = [np.r_[np.zeros(2500), rng.uniform(2, 20, 2500)]] + [rng.uniform(2, 20, 300) for _ in range(6)] + [np.zeros(100)]
    chosen = train.balance(motions, args, seed=0)
    sizes = [len(c) for c in chosen]
    assert max(sizes) <= 0.2 * sum(sizes) and sizes[0] > 400 and sizes[1] == 300
    assert sizes[-1] == 0 and 0.07 < (motions[0][chosen[0]] < 1).mean() < 0.13  # 10 % of what was kept


def displaced(a, b, dy, dx):
    """Whether a[y + dy, x + dx] == b[y, x] wherever both exist (C x H x W arrays)."""
    rows = lambda d, n: slice(max(d, 0), n + min(d, 0))
    height, width = a.shape[1:]
    return np.array_equal(a[:, rows(dy, height), rows(dx, width)], b[:, rows(-dy, height), rows(-dx, width)])


def test_opposite_shift_crops_keep_the_middle_exact():
    texture = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    dataset = train.Triplets([np.stack([texture] * 3)[None]], crop=32, seed=0, shift=6)
    shifts = []
    for k in range(20):
        one, middle, two = (t.numpy() for t in dataset[k])
        found = [(dy, dx) for dy in range(-6, 7) for dx in range(-6, 7) if displaced(one, middle, dy, dx)]
        assert len(found) == 1 and displaced(two, middle, -found[0][0], -found[0][1])
        shifts.append(found[0])
    assert len(set(shifts)) > 5 and max(max(map(abs, s)) for s in shifts) == 6


def test_training_starts_at_the_blend_and_reduces_the_loss():
    torch.manual_seed(0)
    network = Network()
    train.init_weights(network)
    frames = moving_pattern(frames=3, size=32, speed=2)
    batch = [torch.from_numpy(f[..., ::-1].copy()).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255 for f in frames]
    optimizer = torch.optim.Adamax(train.parameter_groups(network))
    steps = [train.training_step(network, None, optimizer, batch, 1e-3 * min(1, (step + 1) / 20), precision='fp32')
             for step in range(40)]
    losses, blend = [loss.item() for loss, _ in steps], steps[0][1].item()
    assert losses[0] == pytest.approx(blend, rel=1e-3)  # starts at the blend
    assert max(losses[-3:]) < 0.5 * blend


def layered_batch(textures, count, seed, crop=32):
    rng = np.random.default_rng(seed)
    triplets = [train.synthetic_triplet([textures[i] for i in rng.integers(len(textures), size=3)], crop, rng)
                for _ in range(count)]
    return [torch.from_numpy(np.stack([t[i] for t in triplets])[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255
            for i in range(3)]


def test_training_on_layered_motion_learns_input_dependent_kernels():
    """Two or more layers moving differently: only kernels that vary across pixels beat the blend."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    smooth = lambda x: np.asarray(Image.fromarray(x).resize((48, 48), Image.BILINEAR))
    textures = [smooth(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(16)]
    network = Network()
    train.init_weights(network)
    monitor = train.HeadMonitor(network)
    optimizer = torch.optim.Adamax(train.parameter_groups(network))
    for step in range(80):
        train.training_step(network, None, optimizer, layered_batch(textures, 8, step), 1e-3 * min(1, (step + 1) / 10))
    one, middle, two = layered_batch(textures, 16, seed=10_000)  # held out
    with torch.no_grad():
        error = (network(one, two) - middle).abs().mean().item()
    blend = (0.5 * (one + two) - middle).abs().mean().item()
    diagnostics = monitor.read()
    assert min(value for key, value in diagnostics.items() if key.startswith('alive')) > 0.2, diagnostics
    assert diagnostics['kernel_spread'] > 1e-3, diagnostics
    assert error < 0.9 * blend, (error, blend)


def test_feature_loss_with_random_vgg(tmp_path):
    torch.manual_seed(0)
    vgg = train.vgg19_relu4_4()
    path = tmp_path / 'vgg19.pth'
    torch.save({f'features.{k}': v for k, v in vgg.state_dict().items()}, path)
    loaded = train.load_vgg(str(path))
    assert all(torch.equal(a, b) for a, b in zip(vgg.state_dict().values(), loaded.state_dict().values()))
    assert len(loaded) == 27  # torchvision features[:27] ends at relu4_4
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    target = torch.rand(1, 3, 32, 32)
    assert train.feature_loss(loaded, target, target).item() == 0.0
    loss = train.feature_loss(loaded, image, target)
    loss.backward()
    assert loss.item() > 0 and image.grad.abs().sum() > 0


def run_args(frames_dir, tmp_path, out, steps, *extra):
    return ['--data', str(frames_dir), '--out', str(out), '--cache', str(tmp_path / 'cache'), '--patch', '40',
            '--crop', '32', '--strides', '1', '--crops', '2', '--motion-scale', '1', '--batch', '2',
            '--workers', '0', '--warmup', '1', '--max-steps', str(steps),
            '--ckpt-every', '2', '--eval-every', '100', *extra]


def test_resume_matches_an_uninterrupted_run(frames_dir, tmp_path):
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'straight', 4)) == 0
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'split', 2)) == 0
    with open(tmp_path / 'split' / 'log.csv', 'a') as log:
        log.write('3,0.5,1.0,,,,\n')  # a step logged by a run that died before its checkpoint
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'split', 4, '--resume', 'auto')) == 0
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=False)
    split = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    assert straight['step'] == split['step'] == 4
    for key, value in straight['model'].items():
        assert torch.equal(value, split['model'][key]), key
    assert (tmp_path / 'split' / 'loss.png').stat().st_size > 0
    log = (tmp_path / 'split' / 'log.csv').read_text().splitlines()
    assert log[0].startswith('step,loss') and [row.split(',')[0] for row in log[1:]] == ['1', '2', '3', '4']
    assert log[3].split(',')[1] != '0.5'


def test_export_round_trips(frames_dir, tmp_path):
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'run', 2)) == 0
    target = tmp_path / 'weights' / 'network-l1.safetensors'
    assert train.main(['--export', str(tmp_path / 'run' / 'ckpt.pt'), str(target)]) == 0
    network = load_network(weights=str(target))
    state = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)['model']
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key].half().float()), key


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert train.main(['--data', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err.strip().startswith('error: not a video or folder')


BAD_ARGUMENTS = {
    'zero batch': (['--batch', '0'], '--batch must be at least 1, got 0'),
    'negative checkpoint interval': (['--ckpt-every', '-5'], '--ckpt-every must be at least 1, got -5'),
    'crop not a multiple of 32': (['--crop', '100'], '--crop must be a multiple of 32'),
    'crop larger than the patch': (['--crop', '64'], 'at most --patch 40, got 64'),
    'nan learning rate': (['--lr', 'nan'], '--lr must be a positive number, got nan'),
    'missing init': (['--init', 'none.safetensors'], 'no such file: none.safetensors'),
    'missing resume': (['--resume', 'none.pt'], 'no such file: none.pt'),
    'missing export': (['--export', 'none.pt', 'w.safetensors'], 'no such file: none.pt'),
    'export of a non-checkpoint': (['--export', 'text.pt', 'w.safetensors'], 'text.pt is not a train.py checkpoint'),
    'vgg weights of a non-state-dict': (['--loss', 'lf', '--vgg-weights', 'text.pt'], 'text.pt does not hold torchvision VGG-19'),
    'init with the wrong shapes': (['--init', 'small.safetensors'], 'small.safetensors does not hold SepConv weights'),
}


@pytest.mark.parametrize('case', BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_errors(case, frames_dir, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'text.pt').write_text('not a checkpoint')
    save_file({'netConv1.0.weight': torch.zeros(1)}, str(tmp_path / 'small.safetensors'))
    argv, message = BAD_ARGUMENTS[case]
    assert train.main(['--data', str(frames_dir), '--cache', 'cache', '--patch', '40', '--crop', '32', *argv]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err


def test_two_process_gloo_training(frames_dir, tmp_path):
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    out = tmp_path / 'ddp'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
               os.path.join(ROOT, 'train.py'), *run_args(frames_dir, tmp_path, out, 2)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(out / 'ckpt.pt', weights_only=False)['step'] == 2
    assert len((out / 'log.csv').read_text().splitlines()) == 3
