import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import model
from cli import InputError
from model import KERNEL_SIZE, Network, estimate, interpolate, load_network

CENTRE = KERNEL_SIZE // 2


def random_frames(height=23, width=37, seed=0):
    generator = np.random.default_rng(seed)
    return [generator.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2)]


def to_tensor(image):
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def fixed_kernels(network, taps):
    """A copy of `network` whose four kernel subnets output constant kernels: taps maps each of
    netVertical1, netHorizontal1, netVertical2, netHorizontal2 to (tap index, value)."""
    network = copy.deepcopy(network)
    with torch.no_grad():
        for name, (tap, value) in taps.items():
            last = getattr(network, name)[-1]  # the final conv, not followed by a ReLU
            last.weight.zero_()
            last.bias.zero_()
            last.bias[tap] = value
    return network


def test_parameter_count():
    assert sum(p.numel() for p in Network().parameters()) == 21_675_452


def test_original_state_dict_loads_strictly(random_network, tmp_path):
    path = tmp_path / 'network-l1.pytorch'
    original = {key.replace('net', 'module'): value for key, value in random_network.state_dict().items()}
    assert 'moduleConv1.0.weight' in original and 'moduleHorizontal2.7.bias' in original
    torch.save(original, path)
    loaded = load_network(weights=str(path))
    one, two = (to_tensor(frame)[None] for frame in random_frames())
    assert torch.equal(estimate(loaded, one, two), estimate(random_network, one, two))


def test_original_state_dict_with_a_missing_key_is_rejected(random_network, tmp_path):
    path = tmp_path / 'network-l1.pytorch'
    state = {key.replace('net', 'module'): value for key, value in random_network.state_dict().items()}
    del state['moduleVertical1.4.bias']
    torch.save(state, path)
    with pytest.raises(InputError, match='does not hold SepConv weights'):
        load_network(weights=str(path))


def test_fp16_safetensors_round_trip(random_weights, random_network, tmp_path):
    torch.manual_seed(0)
    source = Network().state_dict()
    loaded = random_network.state_dict()
    assert loaded.keys() == source.keys()
    for key, value in source.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.half().float())
    path = str(tmp_path / 'again.safetensors')
    save_file({key: value.half() for key, value in loaded.items()}, path)
    again = load_network(weights=path).state_dict()
    assert all(torch.equal(again[key], value) for key, value in loaded.items())


def test_missing_weights_file_names_the_path(tmp_path):
    path = str(tmp_path / 'nothing-here.safetensors')
    with pytest.raises(InputError, match='weights file not found') as error:
        load_network(weights=path)
    assert path in str(error.value)


def test_missing_bundled_weights_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(model, 'WEIGHTS_DIR', str(tmp_path))
    with pytest.raises(InputError) as error:
        load_network('lf')
    assert str(tmp_path / 'network-lf.safetensors') in str(error.value)


def test_unknown_model_is_an_input_error():
    with pytest.raises(InputError, match="unknown model 'l2'"):
        load_network('l2')


@pytest.mark.parametrize('name, content', [
    ('text.safetensors', b'not weights at all\n'),
    ('text.pytorch', b'not weights at all\n'),
    ('empty.pytorch', b''),
    ('tensor.pytorch', torch.zeros(3)),
    ('checkpoint.pt', {'model': {'netConv1.0.weight': torch.zeros(1)}, 'step': 3}),
    ('other.safetensors', {'weight': torch.zeros(2, 2)}),
    ('wrong-shapes.pytorch', 'wrong shapes'),
    ('module.pytorch', torch.nn.Linear(2, 2)),  # torch's refusal is a page of text with terminal escapes
])
def test_file_that_is_not_weights_is_an_input_error(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == 'wrong shapes':
        torch.save({key: value[..., :1] for key, value in Network().state_dict().items()}, path)
    elif name.endswith('.safetensors'):
        save_file(content, str(path))
    else:
        torch.save(content, path)
    with pytest.raises(InputError) as error:
        load_network(weights=str(path))
    assert str(path) in str(error.value)
    assert '\n' not in str(error.value) and '\x1b' not in str(error.value)


@pytest.fixture(scope='module')
def odd_outputs(random_network):
    """Float reference outputs of the random network for a 37 x 23 pair, per padding."""
    one, two = random_frames()
    return {padding: interpolate(one.astype(np.float32) / 255.0, two.astype(np.float32) / 255.0,
                                 random_network, padding=padding) for padding in model.PADDINGS}


@pytest.mark.parametrize('padding', model.PADDINGS)
def test_float_images_give_float_images_of_the_input_size(random_network, odd_outputs, padding):
    output = odd_outputs[padding]
    assert output.shape == (23, 37, 3) and output.dtype == np.float32
    one, two = (to_tensor(frame) for frame in random_frames())
    expected = original_estimate(random_network, one, two, padding).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-6)


def test_paddings_differ(odd_outputs):
    assert np.abs(odd_outputs['paper'] - odd_outputs['improved']).max() > 1e-4


@pytest.mark.parametrize('padding', model.PADDINGS)
def test_uint8_and_pil_images_round_the_float_result(random_network, odd_outputs, padding):
    one, two = random_frames()
    expected = (odd_outputs[padding] * 255.0).round().astype(np.uint8)
    output = interpolate(one, two, random_network, padding=padding)
    assert output.dtype == np.uint8 and output.shape == (23, 37, 3)
    assert np.array_equal(output, expected)
    image = interpolate(Image.fromarray(one), Image.fromarray(two), random_network, padding=padding)
    assert isinstance(image, Image.Image) and image.size == (37, 23) and image.mode == 'RGB'
    assert np.array_equal(np.asarray(image), output)


@pytest.mark.parametrize('padding', model.PADDINGS)
def test_tensors_single_and_batched(random_network, odd_outputs, padding):
    frames = [random_frames(seed=seed) for seed in (0, 1)]
    one, two = (torch.stack([to_tensor(pair[k]) for pair in frames]) for k in (0, 1))
    batched = interpolate(one, two, random_network, padding=padding)
    assert batched.shape == (2, 3, 23, 37) and batched.dtype == torch.float32
    single = interpolate(one[0], two[0], random_network, padding=padding)
    assert single.shape == (3, 23, 37)
    torch.testing.assert_close(single, batched[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(single.permute(1, 2, 0).numpy(), odd_outputs[padding], rtol=0, atol=1e-5)
    assert (batched[1] - batched[0]).abs().max() > 1e-4


def test_interpolate_rejects_bad_images(random_network):
    one, two = random_frames()
    with pytest.raises(InputError):
        interpolate(one, two[:-1], random_network)
    with pytest.raises(InputError):
        interpolate(one[..., 0], two[..., 0], random_network)
    with pytest.raises(InputError, match="unknown padding 'same'"):
        interpolate(one, two, random_network, padding='same')


def test_network_receives_bgr(random_network):
    red = np.zeros((23, 37, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((23, 37, 3), np.uint8)
    blue[..., 2] = 255
    seen = []
    hook = random_network.netConv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        interpolate(red, blue, random_network)
    finally:
        hook.remove()
    means = seen[0].mean((0, 2, 3)).tolist()
    assert means == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]  # one = red in BGR, two = blue in BGR


@pytest.mark.parametrize('padding', model.PADDINGS)
@pytest.mark.parametrize('vertical, horizontal, tolerance', [(math.sqrt(0.5), math.sqrt(0.5), 1e-6), (1.0, 0.5, 0.0)])
def test_centre_taps_reproduce_the_blend(random_network, padding, vertical, horizontal, tolerance):
    network = fixed_kernels(random_network, {'netVertical1': (CENTRE, vertical), 'netHorizontal1': (CENTRE, horizontal),
                                             'netVertical2': (CENTRE, vertical), 'netHorizontal2': (CENTRE, horizontal)})
    one, two = (to_tensor(frame) for frame in random_frames())
    blend = 0.5 * one + 0.5 * two
    output = interpolate(one, two, network, padding=padding)
    assert output.shape == blend.shape
    torch.testing.assert_close(output, blend, rtol=0, atol=tolerance)


@pytest.mark.parametrize('padding', model.PADDINGS)
def test_edge_taps_sample_the_replicated_border(random_network, padding):
    # frame one: 25 pixels to the right; frame two: 25 pixels up; beyond the image the edge repeats
    network = fixed_kernels(random_network, {'netVertical1': (CENTRE, 1.0), 'netHorizontal1': (KERNEL_SIZE - 1, 0.5),
                                             'netVertical2': (0, 1.0), 'netHorizontal2': (CENTRE, 0.5)})
    one, two = (to_tensor(frame) for frame in random_frames(height=30, width=40))
    columns = torch.arange(40).add(CENTRE).clamp(max=39)
    rows = torch.arange(30).sub(CENTRE).clamp(min=0)
    expected = 0.5 * one[:, :, columns] + 0.5 * two[:, rows, :]
    assert torch.equal(interpolate(one, two, network, padding=padding), expected)


def original_estimate(network, one, two, padding):
    """The original run.py's padding arithmetic (shift-based rounding up to multiples of 128)."""
    height, width = one.shape[1:]
    left = top = 25 if padding == 'paper' else 0
    padded_width, padded_height = left + width + left, top + height + top
    if padded_width != ((padded_width >> 7) << 7):
        padded_width = ((padded_width >> 7) + 1) << 7
    if padded_height != ((padded_height >> 7) << 7):
        padded_height = ((padded_height >> 7) + 1) << 7
    right, bottom = padded_width - width - left, padded_height - height - top
    pad = lambda x: F.pad(x.flip(0)[None], [left, right, top, bottom], mode='replicate')
    with torch.no_grad():
        output = network(pad(one), pad(two))
    return output[0, :, top:top + height, left:left + width].flip(0).clamp(0.0, 1.0)


@pytest.mark.parametrize('padding, height, width', [('paper', 78, 40), ('improved', 23, 37)])
def test_padding_matches_the_original(random_network, padding, height, width):
    one, two = (to_tensor(frame) for frame in random_frames(height, width))
    expected = original_estimate(random_network, one, two, padding)
    assert torch.equal(interpolate(one, two, random_network, padding=padding), expected)


def test_speed_options_stay_close_to_fp32(random_network):
    one, two = torch.rand(1, 3, 40, 56), torch.rand(1, 3, 40, 56)
    reference = estimate(random_network, one, two)
    assert torch.equal(estimate(random_network, one, two, precision='fp32'), reference)
    bf16 = estimate(random_network, one, two, precision='bf16')
    assert bf16.dtype == torch.float32 and 0 < (bf16 - reference).abs().max() < 2e-3
    cudnn_benchmark = torch.backends.cudnn.benchmark
    assert (estimate(random_network, one, two, channels_last=True) - reference).abs().max() < 1e-5
    assert not random_network.netConv1[0].weight.is_contiguous(memory_format=torch.channels_last)  # left as it was
    assert torch.backends.cudnn.benchmark == cudnn_benchmark
    network = copy.deepcopy(random_network).to(memory_format=torch.channels_last)
    assert (estimate(network, one, two, channels_last=True) - reference).abs().max() < 1e-5


def test_unknown_precision_is_an_input_error(random_network):
    with pytest.raises(InputError, match=r"unknown precision 'fp8' \(choose from fp32, bf16, fp16\)"):
        estimate(random_network, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), precision='fp8')
