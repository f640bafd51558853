"""Training on triplet sets (a Vimeo-90K root, a folder of triplet folders) and named runs (--config)."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

import data
import datasets
import train

TEXTURE = np.asarray(Image.fromarray(np.random.default_rng(3).integers(0, 256, (14, 30, 3), dtype=np.uint8))
                     .resize((240, 112), Image.BICUBIC))


def triplet(speed, start=0):
    """Three 64 x 48 frames of a smooth texture sliding `speed` px a frame."""
    return [TEXTURE[20:68, start + t * speed:start + t * speed + 64] for t in range(3)]


def save(path, frame):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(frame)).save(path)


def vimeo_tree(root, speeds):
    """A Vimeo-90K training root: sequences/0000k/0001/im1..3.png, listed in tri_trainlist.txt."""
    names = [f'{k + 1:05d}/0001' for k in range(len(speeds))]
    for k, (name, speed) in enumerate(zip(names, speeds)):
        for index, frame in enumerate(triplet(speed, 8 * k), 1):
            save(root / 'sequences' / name / f'im{index}.png', frame)
    (root / 'tri_trainlist.txt').write_text('\n'.join(names) + '\n')
    (root / 'tri_testlist.txt').write_text('\n')
    return root


def triplet_folders(root, speeds):
    for k, speed in enumerate(speeds):
        for index, frame in enumerate(triplet(speed, 10 * k)):
            save(root / f'clip{k}' / f'f{index}.png', frame)
    return root


def test_triplet_sets_are_found_and_listed(tmp_path):
    vimeo = vimeo_tree(tmp_path / 'vimeo', [0, 3, 6])
    folders = triplet_folders(tmp_path / 'folders', [2, 4])
    (tmp_path / 'clips' / 'long').mkdir(parents=True)
    for index in range(5):  # a frame folder of five frames: a clip, not a triplet
        save(tmp_path / 'clips' / 'long' / f'{index}.png', triplet(1)[0])
    assert data.find_sources([str(vimeo), str(folders), str(tmp_path / 'clips')]) == sorted(
        [str(vimeo), str(folders), str(tmp_path / 'clips' / 'long')])
    assert datasets.training_triplets(str(vimeo))[1] == tuple(
        str(vimeo / 'sequences' / '00002' / '0001' / f'im{i}.png') for i in (1, 2, 3))
    assert datasets.training_triplets(str(folders)) == tuple(
        tuple(str(folders / f'clip{k}' / f'f{i}.png') for i in range(3)) for k in range(2))
    assert datasets.training_triplets(str(tmp_path / 'clips')) is None


def probe_args(tmp_path, **overrides):
    args = train.parse_args(['--patch', '40', '--crop', '32', '--crops', '4', '--static-keep', '1',
                             '--cache', str(tmp_path / 'cache')])
    vars(args).update(overrides)
    return args


def test_a_triplet_set_is_probed_not_read_whole(tmp_path, monkeypatch):
    root = vimeo_tree(tmp_path / 'vimeo', [0, 3] * 10)
    reads = []
    monkeypatch.setattr(data, 'read_image', lambda path: reads.append(path) or np.asarray(Image.open(path)))
    monkeypatch.setattr(data, 'PROBE_TRIPLETS', 4)
    patches, motions = data.cached_patches(str(root), probe_args(tmp_path))
    assert len(reads) == 4 * 3 and len(patches) == len(motions) == 4 * data.PROBE_CROPS  # static-keep 1: all kept
    assert sorted(set(np.round(motions))) == [0.0, 6.0]  # still triplets, and 2 x 3 px from first to last
    assert patches[0].shape == (3, 40, 40, 3)
    reads.clear()
    again, _ = data.cached_patches(str(root), probe_args(tmp_path))  # cached: nothing is probed again
    assert reads == [] and np.array_equal(again.candidates, patches.candidates)


def test_fresh_draws_keep_the_drawn_motion_bucket(tmp_path):
    root = vimeo_tree(tmp_path / 'vimeo', [0, 3] * 10)
    patches, motions = data.cached_patches(str(root), probe_args(tmp_path))
    rng = np.random.default_rng(0)
    for index in (int(np.argmin(motions)), int(np.argmax(motions))):
        for _ in range(5):
            fresh = patches.fresh(index, rng)
            assert data.motion_bucket(data.patch_motion(fresh[0], fresh[2])) == data.motion_bucket(motions[index])


def run_args(tmp_path, *sources):
    return ['--data', *map(str, sources), '--out', str(tmp_path / 'run'), '--cache', str(tmp_path / 'cache'),
            '--patch', '40', '--crop', '32', '--crops', '2', '--batch', '2', '--workers', '0', '--warmup', '1',
            '--max-steps', '2', '--synthetic-steps', '0', '--ckpt-every', '2', '--eval-every', '100']


@pytest.mark.slow(10)
def test_training_reads_a_vimeo_tree_and_a_triplet_folder(tmp_path):
    vimeo = vimeo_tree(tmp_path / 'vimeo', [0, 2, 4, 6])
    folders = triplet_folders(tmp_path / 'folders', [1, 3, 5])
    assert train.main(run_args(tmp_path, vimeo, folders)) == 0
    with open(tmp_path / 'run' / 'log.csv') as file:
        rows = list(csv.DictReader(file))
    assert [row['step'] for row in rows] == ['1', '2'] and all(float(row['loss']) > 0 for row in rows)
    assert len([name for name in os.listdir(tmp_path / 'cache') if name.endswith('-triplets.npy')]) == 2


def test_a_missing_listed_file_is_one_line(tmp_path, capsys):
    vimeo = vimeo_tree(tmp_path / 'vimeo', [0, 2])
    (vimeo / 'sequences' / '00002' / '0001' / 'im2.png').unlink()
    assert train.main(run_args(tmp_path, vimeo)) == 2
    assert capsys.readouterr().err == \
        f"error: no {vimeo}/sequences/00002/0001/im2.png ({vimeo}/tri_trainlist.txt line 2)\n"
    assert not (tmp_path / 'run').exists()


def test_configs_set_options_and_the_command_line_wins():
    paper = train.parse_args(['--config', 'paper'])
    assert (paper.lr, paper.batch, paper.crop, paper.patch, paper.loss, paper.out) == (
        1e-3, 16, 128, 150, 'l1', 'runs/paper/l1')
    assert train.parse_args(['--config', 'paper:lf']).loss == 'lf'
    mine = train.parse_args(['--lr', '2e-4', '--config', 'paper', '--data', 'mine'])
    assert (mine.lr, mine.data, mine.batch) == (2e-4, ['mine'], 16)
    shipped = train.parse_args(['--config', 'bundled-l1:kernel-targets'])
    assert (shipped.kernel_until, shipped.kernel_target, shipped.max_steps, shipped.crop) == (950, 0.1, 900, 96)
    assert shipped.motion_mix == [0.25, 0.35, 0.2, 0.12, 0.08]
    assert train.parse_args(['--config', 'bundled-l1:export']).export[1] == 'runs/bundled-l1/network-l1.safetensors'


@pytest.mark.parametrize('config, message', [
    ('nothing', 'no config nothing (configs/ has bundled-l1, paper)'),
    ('paper:l2', 'config paper has no step l2 (steps: l1, lf)'),
    ('{bad}', 'unknown option --lrate'),
])
def test_bad_configs_are_one_line(tmp_path, capsys, config, message):
    bad = tmp_path / 'bad.toml'
    bad.write_text('[[step]]\nname = "one"\nlrate = 0.1\n')
    with pytest.raises(SystemExit) as exit:
        train.parse_args(['--config', str(bad) if config == '{bad}' else config])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count('\n') == 1 and message in err, err
