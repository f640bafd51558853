import copy
import math
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import model
import sepconv
from cli import InputError
from images import image_array
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


FRAME, OTHER = random_frames(height=8, width=12)
FLOATS = FRAME / 255.0
TENSOR = torch.from_numpy(FLOATS).permute(2, 0, 1).float()


def with_pixel(frame, value):
    frame = frame.copy()
    frame[1, 2, 0] = value
    return frame


# Frames the API refuses: kinds and ranges, NaN and Inf, mixed kinds, tensor shapes, and more
BAD_FRAMES = {
    'float 0-255': (FRAME.astype(np.float32), OTHER.astype(np.float32),
                    r'one has values from \d+ to \d+; expected 0 to 1$'),
    'negative floats': (FLOATS - 0.5, OTHER / 255.0, 'one has values from -0.5'),
    'int64': (FRAME.astype(np.int64), OTHER.astype(np.int64), 'one is an array of int64'),
    'uint16': (FRAME.astype(np.uint16) * 257, OTHER.astype(np.uint16), 'one is an array of uint16'),
    'bool': (FRAME > 9, OTHER > 9, 'one is an array of bool'),
    'object dtype': (FRAME.astype(object), OTHER.astype(object), 'one is an array of object'),
    'nested lists': (FRAME.tolist(), OTHER.tolist(), 'one has type list; interpolate takes numpy arrays, PIL images'),
    'paths': ('one.png', 'two.png', 'one is a path'),
    'NaN pixel': (with_pixel(FLOATS, np.nan), FLOATS, 'one has NaN'),
    'Inf pixel': (FLOATS, with_pixel(FLOATS, np.inf), 'two has values from 0 to inf'),
    'NaN in a tensor': (TENSOR, TENSOR * np.nan, 'two has NaN'),
    'uint8 and float': (FRAME, FLOATS, 'one is a uint8 array, two a float array'),
    'float and uint8': (FLOATS, FRAME, 'one is a float array, two a uint8 array'),
    'tensor and array': (TENSOR, FLOATS, 'one is a tensor, two a float array'),
    'PIL image and array': (Image.fromarray(FRAME), OTHER, 'one is a PIL image, two a uint8 array'),
    'H x W arrays': (FRAME[..., 0], OTHER[..., 0], r'one has shape \(8, 12\); expected H x W x 3'),
    'four channels': (np.dstack([FRAME, FRAME[..., :1]]), np.dstack([OTHER, OTHER[..., :1]]), r'shape \(8, 12, 4\)'),
    '0 x 0 x 3 arrays': (FRAME[:0, :0], OTHER[:0, :0], r'one has shape \(0, 0, 3\)'),
    'different sizes': (FRAME, OTHER[:-1], r'one and two differ in shape: \(8, 12, 3\) and \(7, 12, 3\)'),
    'H x W x 3 tensors': (torch.from_numpy(FLOATS),) * 2 + (r'one has shape \(8, 12, 3\); expected 3 x H x W',),
    'one-channel tensors': (TENSOR[:1], TENSOR[:1], r'one has shape \(1, 8, 12\)'),
    'four-channel tensors': (torch.cat([TENSOR, TENSOR[:1]]), torch.cat([TENSOR, TENSOR[:1]]), r'shape \(4, 8, 12\)'),
    '2-D tensors': (TENSOR[0], TENSOR[0], r'one has shape \(8, 12\)'),
    '5-D tensors': (TENSOR[None, None], TENSOR[None, None], r'one has shape \(1, 1, 3, 8, 12\)'),
    'empty batch': (TENSOR[None][:0], TENSOR[None][:0], r'one has shape \(0, 3, 8, 12\)'),
    'tensor sizes differ': (TENSOR, TENSOR[:, 1:], r'differ in shape: \(3, 8, 12\) and \(3, 7, 12\)'),
    'batch sizes differ': (TENSOR.expand(2, 3, 8, 12), TENSOR[None], r'\(2, 3, 8, 12\) and \(1, 3, 8, 12\)'),
    'batched and single': (TENSOR, TENSOR[None], r'\(3, 8, 12\) and \(1, 3, 8, 12\)'),
    'uint8 tensors': (torch.from_numpy(FRAME).permute(2, 0, 1),) * 2 + ('one is a tensor of torch.uint8',),
    'tensor over 1': (TENSOR * 255, TENSOR, r'one has values from \d+ to \d+; expected 0 to 1'),
    'complex tensors': (TENSOR.to(torch.complex64),) * 2 + ('one is a tensor of torch.complex64',),
}


@pytest.mark.parametrize('case', BAD_FRAMES)
def test_interpolate_refuses_what_the_readme_does_not_promise(random_network, monkeypatch, case):
    one, two, message = BAD_FRAMES[case]
    monkeypatch.setattr(model, 'estimate', None)  # refused before any work
    with pytest.raises(InputError, match=message) as error:
        interpolate(one, two, random_network)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('network, message', [('l1', "got 'l1'; model= names the bundled weights"),
                                              (42, 'got int'), (torch.nn.ReLU(), 'got ReLU')])
def test_interpolate_refuses_what_is_not_a_network(network, message):
    with pytest.raises(InputError, match=f'network must be a Network .*{message}'):
        interpolate(FRAME, OTHER, network)


@pytest.mark.parametrize('options, message', [({'padding': 'same'}, "unknown padding 'same'"),
                                              ({'precision': ['bf16']}, r"unknown precision '\['bf16'\]'"),
                                              ({'model': 'l2'}, "unknown model 'l2'")])
def test_interpolate_checks_its_options_before_loading_weights(monkeypatch, options, message):
    monkeypatch.setattr(model, 'Network', None)  # must not be reached
    with pytest.raises(InputError, match=message):
        interpolate(FRAME, OTHER, **options)


def test_array_subclasses_views_and_tensors_that_need_grad_are_frames_too(random_network):
    expected = interpolate(FRAME, OTHER, random_network)
    masked = interpolate(np.ma.masked_array(FRAME, FRAME > 200), np.ma.masked_array(OTHER), random_network)
    assert type(masked) is np.ndarray and np.array_equal(masked, expected)
    one, two = (torch.from_numpy(frame[:, ::-1].copy()).permute(2, 0, 1) / 255.0 for frame in (FRAME, OTHER))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning reaches the user
        flipped = interpolate(one.requires_grad_(), two, random_network)
    assert np.array_equal((flipped * 255).round().byte().permute(1, 2, 0).numpy(),
                          interpolate(FRAME[:, ::-1], OTHER[:, ::-1], random_network))


def grey_image(levels, mode):
    """A PIL image of 8-bit grey `levels` in `mode`, at that mode's own depth."""
    if mode == 'I;16':
        return Image.fromarray(levels.astype(np.uint16) * 257)
    if mode == 'F':
        return Image.fromarray(levels.astype(np.float32) / 255)
    return Image.fromarray(levels).convert(mode)


def test_pil_images_of_every_mode_are_read_at_their_depth(random_network):
    levels = [frame[..., 1] for frame in (FRAME, OTHER)]
    for mode in ('L', 'I;16', 'F', 'RGBA', 'P'):
        assert np.array_equal(image_array(grey_image(levels[0], mode), 'one'), np.dstack([levels[0]] * 3)), mode
    output = interpolate(*(grey_image(grey, 'I;16') for grey in levels), random_network)
    assert isinstance(output, Image.Image) and output.mode == 'RGB'
    assert np.array_equal(np.asarray(output), interpolate(*(np.dstack([grey] * 3) for grey in levels), random_network))


def test_load_network_takes_path_likes_and_devices(random_weights, random_network, tmp_path):
    expected = random_network.state_dict()
    loaded = load_network(weights=pathlib.Path(random_weights), device=torch.device('cpu')).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.items())
    for weights, device, message in ((123, 'cpu', 'weights must be a path, got int'),
                                     ('', 'cpu', 'weights path is empty'),
                                     ('a\0b', 'cpu', 'weights path contains a NUL character'),
                                     (tmp_path, 'cpu', 'is a folder, not a weights file'),
                                     (os.fsencode(random_weights), 'gpu', "unknown device 'gpu'"),
                                     (random_weights, torch.device('meta'), "unknown device 'meta'")):
        with pytest.raises(InputError, match=message):
            load_network(weights=weights, device=device)


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
    computed = []  # in bf16, whether or not its frame differs from fp32's on this CPU
    hook = random_network.netConv1[0].register_forward_hook(lambda module, inputs, output: computed.append(output.dtype))
    bf16 = estimate(random_network, one, two, precision='bf16')
    hook.remove()
    assert computed == [torch.bfloat16] and bf16.dtype == torch.float32 and (bf16 - reference).abs().max() < 2e-3
    cudnn_benchmark = torch.backends.cudnn.benchmark
    assert (estimate(random_network, one, two, channels_last=True) - reference).abs().max() < 1e-5
    assert not random_network.netConv1[0].weight.is_contiguous(memory_format=torch.channels_last)  # left as it was
    assert torch.backends.cudnn.benchmark == cudnn_benchmark
    network = copy.deepcopy(random_network).to(memory_format=torch.channels_last)
    assert (estimate(network, one, two, channels_last=True) - reference).abs().max() < 1e-5


def test_top_left_part_is_the_whole_output_cropped(random_network):
    one, two = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        whole_kernels, whole = random_network.kernels(one, two), random_network(one, two)
        for height, width in ((sepconv.BAND_ROWS, 2 * sepconv.BAND_COLUMNS), (37, 50)):
            kernels, part = random_network.kernels(one, two, (height, width)), random_network(one, two, (height, width))
            assert all(torch.equal(p, w[..., :height, :width]) for p, w in zip(kernels, whole_kernels))
            assert part.shape == (1, 3, height, width)
            if height % sepconv.BAND_ROWS == 0 and width % sepconv.BAND_COLUMNS == 0:  # the op's blocks as in the whole
                assert torch.equal(part, whole[..., :height, :width])
            else:
                torch.testing.assert_close(part, whole[..., :height, :width], rtol=1e-5,
                                           atol=1e-5 * whole.abs().max().item())


def test_the_network_infers_in_channels_last_on_the_cpu_and_trains_in_nchw(random_network):
    seen = []
    hook = random_network.netConv1[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        estimate(random_network, torch.rand(1, 3, 40, 56), torch.rand(1, 3, 40, 56))
        random_network(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))  # gradients on: a training step
    finally:
        hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert seen[1].is_contiguous()


def test_unknown_precision_is_an_input_error(random_network):
    with pytest.raises(InputError, match=r"unknown precision 'fp8' \(choose from fp32, bf16, fp16\)"):
        estimate(random_network, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), precision='fp8')
