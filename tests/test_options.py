"""The network options of the revisited SepConv (kernel and input normalization, PReLU heads): what each
guarantees, that off is the original network to the bit, and that they travel with the weights."""
import os

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import save_file

import network_setup
import train
from cli import InputError
from images import read_image
from model import OPTIONS, Network, interpolate, load_network, normalized_inputs
from sepconv import sepconv_pair
from test_diagnose import blend_network
from test_train import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_pair(height=6, width=7, size=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    frame = lambda: torch.rand(2, 3, height + size - 1, width + size - 1, generator=generator, dtype=dtype)
    kernel = lambda: torch.rand(2, size, height, width, generator=generator, dtype=dtype)
    return frame(), kernel(), kernel(), frame(), kernel(), kernel()


def scaled_heads(network, factor):
    """The same network with every kernel multiplied by factor (the heads end in a convolution)."""
    with torch.no_grad():
        for name in network_setup.HEADS:
            last = getattr(network, name)[-1]
            last.weight.mul_(factor)
            last.bias.mul_(factor)
    return network


def test_kernel_normalization_ignores_the_kernels_scale():
    one, v1, h1, two, v2, h2 = random_pair()
    reference = sepconv_pair(one, v1, h1, two, v2, h2, normalize=True)
    for factor in (0.3, 7.0):
        scaled = sepconv_pair(one, factor * v1, factor * h1, two, factor * v2, factor * h2, normalize=True)
        torch.testing.assert_close(scaled, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sepconv_pair(one, 3 * v1, h1, two, v2, h2), sepconv_pair(one, v1, h1, two, v2, h2))


def test_kernel_normalization_of_the_network_ignores_the_kernels_scale():
    torch.manual_seed(0)
    network = Network(kernel_normalization=True).eval()
    one, two = torch.rand(2, 1, 3, 64, 64).unbind()
    with torch.no_grad():
        before = network(one, two)
        after = scaled_heads(network, 2.5)(one, two)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_kernel_normalization_returns_a_constant_image_whatever_the_kernels():
    one, v1, h1, two, v2, h2 = random_pair(seed=3)
    constant = torch.full_like(one, 0.37)
    output = sepconv_pair(constant, v1 - 0.2, h1, constant, v2, h2 * 3, normalize=True)
    torch.testing.assert_close(output, torch.full_like(output, 0.37), rtol=0, atol=1e-12)
    torch.manual_seed(1)
    network = Network(kernel_normalization=True).eval()
    grey = torch.full((1, 3, 64, 96), 0.61)
    with torch.no_grad():
        torch.testing.assert_close(network(grey, grey), torch.full_like(grey, 0.61), rtol=0, atol=1e-6)


def test_kernel_normalization_leaves_a_vanishing_mass_alone():
    one, v1, h1, two, v2, h2 = random_pair(seed=4)
    tiny = [k * 1e-3 for k in (v1, h1, v2, h2)]
    torch.testing.assert_close(sepconv_pair(one, tiny[0], tiny[1], two, tiny[2], tiny[3], normalize=True),
                               sepconv_pair(one, tiny[0], tiny[1], two, tiny[2], tiny[3]))


def test_gradcheck_through_the_normalization():
    tensors = [t.requires_grad_() for t in random_pair(height=3, width=4, size=3, seed=5)]
    assert torch.autograd.gradcheck(lambda *t: sepconv_pair(*t, normalize=True), tensors, eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


def test_kernel_normalization_under_autocast_is_computed_in_float32():
    one, v1, h1, two, v2, h2 = random_pair(dtype=torch.float32, seed=6)
    with torch.autocast('cpu', torch.bfloat16):
        output = sepconv_pair(one, v1.bfloat16(), h1.bfloat16(), two, v2.bfloat16(), h2.bfloat16(), normalize=True)
    reference = sepconv_pair(*(t.double() for t in (one, v1.bfloat16(), h1.bfloat16(), two, v2.bfloat16(),
                                                    h2.bfloat16())), normalize=True)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=1e-6)


def test_input_normalization_gives_the_same_kernels_for_an_affine_change_of_both_frames():
    torch.manual_seed(2)
    network = Network(input_normalization=True).eval()
    one, two = torch.rand(2, 1, 3, 64, 64).unbind()
    with torch.no_grad():
        kernels = network.kernels(one, two)
        changed = network.kernels(0.4 * one + 0.3, 0.4 * two + 0.3)
        faithful = Network().eval()
        faithful.load_state_dict(network.state_dict())
        unnormalized = faithful.kernels(0.4 * one + 0.3, 0.4 * two + 0.3)
    for kernel, other, plain in zip(kernels, changed, unnormalized):
        torch.testing.assert_close(other, kernel, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain, kernel, rtol=1e-4, atol=1e-5)


def test_input_normalization_filters_the_frames_themselves():
    """The kernels see normalized frames, the op filters the originals: two equal frames of a network whose
    kernels are centre taps come back as they are."""
    network = blend_network(input_normalization=True)
    frame = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network(frame, frame), frame, rtol=0, atol=1e-6)


def test_prelu_heads_with_slope_zero_are_the_relu_to_the_bit():
    torch.manual_seed(3)
    faithful = Network().eval()
    prelu = Network(head_prelu=True).eval()
    missing, unexpected = prelu.load_state_dict(faithful.state_dict(), strict=False)
    assert sorted(missing) == sorted(f'{name}.5.weight' for name in network_setup.HEADS) and not unexpected
    one, two = torch.rand(2, 1, 3, 64, 64).unbind()
    with torch.no_grad():
        assert torch.equal(prelu(one, two), faithful(one, two))
        prelu.netVertical1[5].weight.fill_(0.5)
        assert not torch.equal(prelu(one, two), faithful(one, two))


@pytest.mark.parametrize('slope', [0.0, -0.5, 0.5])
def test_the_head_monitor_counts_prelu_units_by_their_input(slope):
    """Units whose input is negative are off, whatever the slope makes of it (-0.5: positive outputs)."""
    network = Network(head_prelu=True).eval()
    with torch.no_grad():
        for name in network_setup.HEADS:
            getattr(network, name)[4].bias.fill_(-100.0)
            getattr(network, name)[5].weight.fill_(slope)
    monitor = network_setup.HeadMonitor(network)
    with torch.no_grad():
        network(*torch.rand(2, 1, 3, 64, 64).unbind())
    read = monitor.read()
    assert read['constant_pixels'] == 1 and all(read[f'alive_{name[3:].lower()}'] == 0 for name in network_setup.HEADS)


def test_options_are_off_by_default_and_original_names_stay():
    network = Network()
    assert network.options == () and not network.kernel_normalization and not network.input_normalization
    assert set(network.state_dict()) == set(Network(True, True).state_dict())
    assert Network(True, True, True).options == OPTIONS


def test_the_bundled_weights_give_the_output_they_gave_before_the_options():
    """An array made with the bundled weights before the options existed (a 64 x 96 crop of images/)."""
    expected = np.load(os.path.join(ROOT, 'tests', 'data', 'bundled-l1-crop.npy'))
    one, two = (read_image(os.path.join(ROOT, 'images', f'{n}.png'))[100:164, 200:296] for n in ('one', 'two'))
    network = load_network()
    assert network.options == ()
    output = interpolate(one.astype(np.float32) / 255, two.astype(np.float32) / 255, network)
    np.testing.assert_allclose(output, expected, rtol=0, atol=2e-5)


def write_weights(path, options, network=None):
    network = network or Network(**dict.fromkeys((o for o in options if o in OPTIONS), True))
    save_file({k: v.half().contiguous() for k, v in network.state_dict().items()}, str(path),
              metadata={'options': ','.join(options)})


def test_load_network_restores_the_options_from_the_metadata(tmp_path):
    write_weights(tmp_path / 'w.safetensors', ['kernel_normalization', 'head_prelu'])
    network = load_network(weights=str(tmp_path / 'w.safetensors'))
    assert network.options == ('kernel_normalization', 'head_prelu') and network.kernel_normalization


def test_an_unknown_option_is_refused(tmp_path):
    write_weights(tmp_path / 'w.safetensors', ['kernel_normalization', 'flow_guidance'], Network(True))
    with pytest.raises(InputError, match="needs network option 'flow_guidance'"):
        load_network(weights=str(tmp_path / 'w.safetensors'))


@pytest.mark.slow(10)
def test_options_round_trip_through_export_load_and_resume(frames_dir, tmp_path, capsys):
    flags = ['--kernel-normalization', '--input-normalization', '--head-prelu']
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'run', 2, *flags)) == 0
    target = tmp_path / 'w.safetensors'
    assert train.main(['--export', str(tmp_path / 'run' / 'ckpt.pt'), str(target)]) == 0
    with safetensors.safe_open(str(target), 'pt') as file:
        assert file.metadata()['options'] == ','.join(OPTIONS)
    assert load_network(weights=str(target)).options == OPTIONS
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'run', 3, *flags, '--resume', 'auto')) == 0
    capsys.readouterr()
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'run', 4, *flags[:2], '--resume', 'auto')) == 2
    assert 'other than these' in capsys.readouterr().err
    assert train.main(run_args(frames_dir, tmp_path, tmp_path / 'other', 1, '--init', str(target))) == 2
    assert 'pass the same options' in capsys.readouterr().err


def test_a_faithful_init_starts_prelu_heads_at_its_output(random_weights):
    faithful = load_network(weights=random_weights)
    network = network_setup.with_options(faithful, ('head_prelu',), random_weights).eval()
    one, two = torch.rand(2, 1, 3, 64, 64).unbind()
    with torch.no_grad():
        assert torch.equal(network(one, two), faithful(one, two))


def test_input_normalization_added_to_trained_weights_starts_near_their_output(random_weights):
    faithful = load_network(weights=random_weights)
    network = network_setup.with_options(faithful, ('input_normalization',), random_weights).eval()
    frame = torch.rand(2, 3, 64, 64)
    one, two = (0.25 * (x - x.mean()) / x.std(unbiased=False) + 0.5 for x in frame[:, None])
    with torch.no_grad():
        inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
        torch.testing.assert_close(network.netConv1[0](torch.cat(normalized_inputs(one, two), 1))[inside],
                                   faithful.netConv1[0](torch.cat([one, two], 1))[inside], rtol=1e-4, atol=1e-4)
        unfolded = Network(input_normalization=True).eval()
        unfolded.load_state_dict(faithful.state_dict())
        error = lambda net: (net(one, two) - faithful(one, two)).abs().mean()
        assert error(network) < 0.1 * error(unfolded)
