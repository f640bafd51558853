import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import network_setup
import data
import precision
import sepconv
import train
from conftest import moving_pattern
from model import Network, load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(17)
def test_training_starts_at_the_blend_and_reduces_the_loss():
    torch.manual_seed(0)
    network = Network()
    network_setup.init_weights(network)
    frames = moving_pattern(frames=3, size=32, speed=2)
    batch = [torch.from_numpy(f[..., ::-1].copy()).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255 for f in frames]
    optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
    steps = [train.training_step(network, None, optimizer, batch, 1e-3 * min(1, (step + 1) / 20), precision='fp32')
             for step in range(40)]
    losses, blend = [loss.item() for loss, *_ in steps], steps[0][1].item()
    assert losses[0] == pytest.approx(blend, rel=1e-3)  # starts at the blend
    assert max(losses[-3:]) < 0.5 * blend


def layered_batch(textures, count, seed, crop=32):
    rng = np.random.default_rng(seed)
    moving = lambda reach, rng: rng.integers(-reach, reach + 1, 2)  # no still layers: every kernel has work
    triplets = [data.synthetic_triplet([textures[i] for i in rng.integers(len(textures), size=3)], crop, rng, moving)
                for _ in range(count)]
    return [torch.from_numpy(np.stack([t[i] for t in triplets])[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255
            for i in range(3)]


@pytest.mark.slow(66)
def test_training_on_layered_motion_learns_input_dependent_kernels():
    """Two or more layers moving differently: only kernels that vary across pixels beat the blend."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    smooth = lambda x: np.asarray(Image.fromarray(x).resize((48, 48), Image.BILINEAR))
    textures = [smooth(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(16)]
    network = Network()
    network_setup.init_weights(network)
    monitor = network_setup.HeadMonitor(network)
    optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
    for step in range(80):
        train.training_step(network, None, optimizer, layered_batch(textures, 8, step), 1e-3 * min(1, (step + 1) / 10))
    one, middle, two = layered_batch(textures, 16, seed=10_000)  # held out
    with torch.no_grad():
        error = (network(one, two) - middle).abs().mean().item()
    blend = (0.5 * (one + two) - middle).abs().mean().item()
    diagnostics = monitor.read()
    assert min(value for key, value in diagnostics.items() if key.startswith('alive')) > 0.2, diagnostics
    assert diagnostics['kernel_spread'] > 1e-3, diagnostics
    assert diagnostics['constant_pixels'] < 0.05, diagnostics
    assert error < 0.9 * blend, (error, blend)


def run_args(frames_dir, tmp_path, out, steps, *extra):
    return ['--data', str(frames_dir), '--out', str(out), '--cache', str(tmp_path / 'cache'), '--patch', '40',
            '--crop', '32', '--strides', '1', '--crops', '2', '--motion-scale', '1', '--batch', '2',
            '--workers', '0', '--warmup', '1', '--max-steps', str(steps),
            '--ckpt-every', '2', '--eval-every', '100', *extra]


@pytest.mark.slow(12)
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
    checkpoint = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)
    for key, value in network.state_dict().items():
        assert torch.equal(value, checkpoint['model'][key].half().float()), key
    assert checkpoint['config']['precision'] == precision.native('cpu')  # the default, auto, resolved


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert train.main(['--data', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'run')]) == 2
    assert capsys.readouterr().err.strip().startswith('error: not a video or folder')


BAD_ARGUMENTS = {
    'zero batch': (['--batch', '0'], '--batch must be at least 1, got 0'),
    'negative checkpoint interval': (['--ckpt-every', '-5'], '--ckpt-every must be at least 1, got -5'),
    'crop not a multiple of 32': (['--crop', '100'], '--crop must be a multiple of 32'),
    'crop larger than the patch': (['--crop', '64'], 'at most --patch 40, got 64'),
    'nan learning rate': (['--lr', 'nan'], '--lr must be in (0, 1], got nan'),
    'learning rate above 1': (['--lr', '1e38'], '--lr must be in (0, 1], got 1e+38'),
    'missing init': (['--init', 'none.safetensors'], 'no such file: none.safetensors'),
    'missing resume': (['--resume', 'none.pt'], 'no such file: none.pt'),
    'missing export': (['--export', 'none.pt', 'w.safetensors'], 'no such file: none.pt'),
    'export of a non-checkpoint': (['--export', 'text.pt', 'w.safetensors'], 'text.pt is not a train.py checkpoint'),
    'vgg weights of a non-state-dict': (['--loss', 'lf', '--vgg-weights', 'text.pt'], 'text.pt does not hold torchvision VGG-19'),
    'init with the wrong shapes': (['--init', 'small.safetensors'], 'small.safetensors does not hold SepConv weights'),
    'negative seed': (['--seed', '-1'], '--seed must be 0 or more, got -1'),
    'negative kernel moment': (['--kernel-moment', '-1'], '--kernel-moment must be 0 or more, got -1.0'),
    'leak above 1': (['--constant-leak', '2'], '--constant-leak must be in [0, 1], got 2.0'),
    'negative leak motion': (['--leak-min-motion', '-1'], '--leak-min-motion must be 0 or more, got -1.0'),
    'leak motion, no flow': (['--leak-min-motion', '0.5'], '--leak-min-motion needs the optical flow of --kernel-until'),
    'negative stride': (['--strides', '1', '-1'], '--strides must be at least 1, got -1'),
    'zero motion scale': (['--motion-scale', '0'], '--motion-scale must be a positive number, got 0.0'),
    'cache that is a file': (['--cache', 'text.pt'], '--cache text.pt is not a folder'),
    'beta of 1.5': (['--betas', '1.5', '0.999'], '--betas must be in [0, 1), got 1.5 0.999'),
    'negative shift': (['--shift', '-5'], '--shift must be 0 or more, got -5'),
    'share above 1': (['--still', '2'], '--still must be between 0 and 1, got 2.0'),
    'shares adding up to more than 1': (['--synthetic', '0.8', '--still', '0.5'], 'add up to more than 1'),
    'empty motion mix': (['--motion-mix', '0', '0', '0', '0', '0'], '--motion-mix must be shares of 0 or more'),
    'missing Middlebury folder': (['--middlebury', 'nowhere'], 'no such Middlebury folder: nowhere'),
    'export onto its checkpoint': (['--export', 'ckpt.pt', 'ckpt.pt'], 'output ckpt.pt would overwrite an input: ckpt.pt'),
    'export onto a folder': (['--export', 'ckpt.pt', 'folder.safetensors'], 'output path is a directory'),
    'export into a read-only place': (['--export', 'ckpt.pt', '/proc/sepconv/w.safetensors'], 'cannot create output folder'),
}


@pytest.mark.parametrize('case', BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_errors(case, frames_dir, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'text.pt').write_text('not a checkpoint')
    save_file({'netConv1.0.weight': torch.zeros(1)}, str(tmp_path / 'small.safetensors'))
    (tmp_path / 'ckpt.pt').write_bytes(b'a checkpoint, as far as the export checks go')
    (tmp_path / 'folder.safetensors').mkdir()
    before = sorted(os.listdir(tmp_path))
    argv, message = BAD_ARGUMENTS[case]
    assert train.main(['--data', str(frames_dir), '--cache', 'cache', '--patch', '40', '--crop', '32', *argv]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / 'ckpt.pt').stat().st_size == 44  # nothing written


@pytest.mark.slow(16)
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


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_whole(tmp_path, monkeypatch):
    network = Network()
    optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
    args = train.parse_args(['--out', str(tmp_path)])
    path = str(tmp_path / 'ckpt.pt')
    checkpoints.save_checkpoint(path, network, optimizer, 7, args)

    def full_disk(state, file):
        file.write(b'half a checkpoint')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(train.InputError, match='No space left on device'):
        checkpoints.save_checkpoint(path, network, optimizer, 8, args)
    monkeypatch.undo()
    assert checkpoints.read_checkpoint(path)['step'] == 7 and os.listdir(tmp_path) == ['ckpt.pt']


def tent(offsets):
    """N x 51 x H x W weights of linear interpolation at these N x 1 x H x W offsets."""
    return (1 - (torch.arange(51).view(1, -1, 1, 1) - 25 - offsets).abs()).clamp_min(0)


def test_kernel_targets_are_the_kernels_that_fetch_the_middle():
    image = torch.rand(1, 3, 48, 48)
    dy, dx = 2.0, -3.0
    window = lambda y, x: image[..., 8 + int(y):40 + int(y), 8 + int(x):40 + int(x)]
    one, middle, two = window(-dy, -dx), window(0, 0), window(dy, dx)  # middle(p) = one(p + d) = two(p - d)
    flows = torch.tensor([dy, dx, -dy, -dx]).view(1, 4, 1, 1).expand(1, 4, 32, 32)
    kernels = tent(flows[:, 0:1]), 0.5 * tent(flows[:, 1:2]), tent(flows[:, 2:3]), 0.5 * tent(flows[:, 3:4])
    pad = lambda x: torch.nn.functional.pad(x, [25] * 4, mode='replicate')
    fetched = sepconv.sepconv_pair(pad(one), kernels[0], kernels[1], pad(two), kernels[2], kernels[3])
    assert torch.allclose(fetched[..., 4:-4, 4:-4], middle[..., 4:-4, 4:-4], atol=1e-6)
    assert train.kernel_target_loss(kernels, flows).item() == pytest.approx(0, abs=1e-6)
    rescaled = kernels[0] * 3, kernels[1] / 3, kernels[2] / 2, kernels[3] * 2  # the same 2D kernels
    assert train.kernel_target_loss(rescaled, flows).item() == pytest.approx(0, abs=1e-6)
    assert train.kernel_target_loss(kernels, flows, 'l2').item() == pytest.approx(0, abs=1e-6)
    identity = [tent(torch.zeros(1, 1, 32, 32)) * 0.5 ** 0.5] * 4  # the blend: each marginal misses all its mass
    assert train.kernel_target_loss(identity, flows).item() == pytest.approx(1.0, abs=1e-4)
    assert train.kernel_target_loss(identity, flows, 'l2').item() == pytest.approx(0.5, abs=1e-4)  # 2 x 0.5^2
    halfway = tent(flows[:, 0:1] + 0.5), 0.5 * tent(flows[:, 1:2]), kernels[2], kernels[3]  # half a pixel off
    assert 0 < train.kernel_target_loss(halfway, flows).item() < 0.2
    assert train.kernel_target_loss(kernels, flows, moment=1.0).item() == pytest.approx(0, abs=1e-6)
    moment = train.kernel_target_loss(halfway, flows, moment=1.0) - train.kernel_target_loss(halfway, flows)
    assert moment.item() == pytest.approx(0.25 / 4, abs=1e-5)  # one marginal of four, 0.5 px off at mass 0.5


def test_the_kernel_target_gradient_moves_the_taps_towards_the_flow():
    flows = torch.tensor([0.0, 2.0, 0.0, -2.0]).view(1, 4, 1, 1).expand(1, 4, 4, 4)
    still = tent(torch.zeros(1, 1, 4, 4))
    kernels = [k.requires_grad_() for k in (still.clone(), 0.5 * still, still.clone(), 0.5 * still)]  # the blend
    train.kernel_target_loss(kernels, flows).backward()
    horizontal1, horizontal2 = kernels[1].grad[0, :, 0, 0], kernels[3].grad[0, :, 0, 0]
    assert horizontal1[25] > 0 and horizontal1[27] < 0 and horizontal2[25] > 0 and horizontal2[23] < 0  # 25 down
    assert horizontal1[[24, 26, 28]].abs().max() == 0  # right already
    vertical1 = kernels[0].grad[0, :, 0, 0]
    assert torch.all(vertical1 == vertical1[0]) and vertical1[0] > 0  # only its sum, which scales h's marginal
    for kernel in kernels:
        kernel.grad = None
    train.kernel_target_loss(kernels, flows, moment=1.0).backward()
    horizontal1 = kernels[1].grad[0, :, 0, 0]
    assert horizontal1[26] < 0 < horizontal1[24] and horizontal1[28] < horizontal1[26]  # the mass goes right


def test_a_training_step_adds_the_kernel_target_loss():
    frames = moving_pattern(frames=3, size=32, speed=2)  # middle(x) = one(x + 2) = two(x - 2)
    one, middle, two = (torch.from_numpy(f[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255 for f in frames)
    flows = torch.tensor([0.0, 2.0, 0.0, -2.0]).view(1, 4, 1, 1).expand(1, 4, 32, 32)
    networks = []
    for kernel_target in (0.0, 1.0):
        torch.manual_seed(0)
        network = Network()
        network_setup.init_weights(network)
        with torch.no_grad():
            frame, kernels = network(one, two, with_kernels=True)
            assert torch.equal(frame, network(one, two)) and len(kernels) == 4
        optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
        loss, _, target = train.training_step(network, None, optimizer, (one, middle, two, flows), 1e-4,
                                              precision='fp32', kernel_target=kernel_target)
        assert loss.item() == pytest.approx((frame - middle).abs().mean().item(), rel=1e-5)
        if kernel_target:
            assert target.item() == pytest.approx(train.kernel_target_loss(kernels, flows).item(), rel=1e-5)
        else:
            assert target is None  # L1 alone
        networks.append(network)
    heads = [n.netHorizontal1[-1].bias for n in networks]
    assert not torch.equal(heads[0], heads[1])  # the kernel targets changed the step


def test_the_kernel_unit_relu_leaks_only_where_every_unit_is_off_and_only_upwards():
    x = torch.tensor([[-1.0, 2.0], [-1.0, -3.0], [-0.5, -2.0]]).view(1, 3, 2, 1).requires_grad_()  # 3 units, 2 pixels
    y = network_setup.KernelUnitReLU(0.01)(x)
    assert torch.equal(y, torch.relu(x.detach()))
    y.backward(torch.tensor([[-1.0, -1.0], [1.0, -2.0], [-4.0, 3.0]]).view(1, 3, 2, 1))
    # pixel 0, all off: the 'turn on' part of each gradient, scaled; pixel 1: unit 0 is on, a plain ReLU
    assert torch.allclose(x.grad.view(3, 2), torch.tensor([[-0.01, -1.0], [0.0, 0.0], [-0.04, 0.0]]), rtol=0, atol=1e-9)


def test_the_kernel_unit_relu_leaks_only_where_the_flow_moves_given_min_motion():
    x = torch.full((1, 3, 2, 2), -1.0, requires_grad=True)  # 3 units, 2 x 2 pixels, all off
    relu = network_setup.KernelUnitReLU(0.5, min_motion=0.3)
    flows = torch.zeros(1, 4, 4, 4)  # full resolution, twice the units'
    flows[0, 3, 0, 1] = 0.4  # one pixel of the top-left unit moves 0.4 px towards frame two
    flows[0, 0, 3, 3] = -0.2  # under min_motion: the bottom-right unit stays still
    relu.flows = flows
    relu(x).backward(torch.full_like(x, -1.0))
    assert torch.equal(x.grad[0, 0], torch.tensor([[-0.5, 0.0], [0.0, 0.0]]))
    relu.min_motion = 0.0  # everywhere
    x.grad = None
    relu(x).backward(torch.full_like(x, -1.0))
    assert torch.equal(x.grad, torch.full_like(x, -0.5))


def test_kernel_units_off_everywhere_learn_to_turn_on():
    """Every unit of the heads' last ReLU negative everywhere: a plain ReLU passes them no gradient, the
    kernel-unit ReLU passes the part that turns them on; the frame and the state dict are the same."""
    frames = moving_pattern(frames=3, size=32, speed=2)
    one, middle, two = (torch.from_numpy(f[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255 for f in frames)
    gradients, outputs = [], []
    for slope in (0.0, 0.01):
        torch.manual_seed(0)
        network = Network()
        network_setup.init_weights(network)
        for name in network_setup.HEADS:
            torch.nn.init.constant_(getattr(network, name)[4].bias, -100.0)
            torch.nn.init.normal_(getattr(network, name)[-1].weight, std=1e-3)  # trained: not zero
        network_setup.leak_where_kernels_are_constant(network, slope)
        monitor = network_setup.HeadMonitor(network)
        output = network(one, two)
        (output - middle).abs().mean().backward()
        assert monitor.read()['constant_pixels'] == 1
        outputs.append(output.detach())
        gradients.append(torch.stack([getattr(network, name)[4].bias.grad for name in network_setup.HEADS]))
    assert torch.equal(outputs[0], outputs[1])
    assert gradients[0].abs().max() == 0
    assert gradients[1].max() <= 0 and gradients[1].min() < 0  # descent raises them: on, never further off
    assert isinstance(network.netVertical1[5], network_setup.KernelUnitReLU)
    assert set(network.state_dict()) == set(Network().state_dict())


@pytest.mark.parametrize('limits', [[], ['--max-minutes', '5'], ['--max-minutes', '5', '--decay-minutes', '1']])
def test_every_step_moves_the_weights(frames_dir, tmp_path, random_weights, limits):
    """With or without a time limit and its decay, the learning rate after the warm-up is not 0."""
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'run', 2, '--init', random_weights, *limits)) == 0
    start = load_network(weights=random_weights).state_dict()
    trained = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)['model']
    assert all(not torch.equal(trained[key], start[key]) for key in ('netConv1.0.weight', 'netVertical1.7.bias'))
