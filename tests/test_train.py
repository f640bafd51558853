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
    args = train.parse_args(['--patch', '40', '--strides', '1', '--crops', '1', '--min-motion', '0.01'])
    vars(args).update(overrides)
    return args


def test_extraction_keeps_moving_triplets():
    patches = train.extract_patches(iter(moving_pattern(frames=6)), extraction_args(), np.random.default_rng(0))
    assert patches.shape == (4, 3, 40, 40, 3)  # centres 1..4 of 6 frames


def test_extraction_rejects_static_patches():
    still = [moving_pattern(frames=1)[0]] * 6
    patches = train.extract_patches(iter(still), extraction_args(), np.random.default_rng(0))
    assert len(patches) == 0


def test_extraction_rejects_triplets_across_a_shot_cut():
    first = moving_pattern(frames=4, seed=0)
    second = [frame // 4 for frame in moving_pattern(frames=4, seed=1)]  # another shot: dark
    patches = train.extract_patches(iter(first + second), extraction_args(), np.random.default_rng(0))
    # centres 1, 2 (first shot) and 5, 6 (second shot); centres 3 and 4 straddle the cut
    assert len(patches) == 4
    for triplet in patches:
        means = triplet.reshape(3, -1).mean(1)
        assert np.ptp(means) < 40  # all three frames from the same shot


def test_triplets_are_deterministic_and_bgr():
    patches = np.stack([np.stack(moving_pattern(frames=3, size=40))])
    dataset = train.Triplets([patches], crop=32, seed=5)
    first, again = dataset[7], dataset[7]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (3, 32, 32) and first[0].dtype == torch.float32
    plain = train.Triplets([patches], crop=40, seed=5, augment=False)[0]
    assert torch.allclose(plain[0], torch.from_numpy(patches[0, 0, ..., ::-1].copy()).permute(2, 0, 1) / 255.0)


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    network = Network()
    train.init_weights(network)
    frames = moving_pattern(frames=3, size=32, speed=2)
    batch = [torch.from_numpy(f[..., ::-1].copy()).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255 for f in frames]
    one, middle, two = batch
    optimizer = torch.optim.Adamax(network.parameters())
    losses = [train.training_step(network, None, optimizer, (one, middle, two), 1e-3 * min(1, (step + 1) / 20)).item()
              for step in range(40)]
    assert losses[0] == pytest.approx((0.5 * (one + two) - middle).abs().mean().item(), rel=0.05)  # starts at the blend
    assert max(losses[-3:]) < 0.5 * losses[0]


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
            '--crop', '32', '--strides', '1', '--crops', '2', '--min-motion', '0.01', '--batch', '2',
            '--val-fraction', '0', '--workers', '0', '--warmup', '1', '--max-steps', str(steps),
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
