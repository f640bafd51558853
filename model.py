"""The SepConv network (Niklaus et al., ICCV 2017), its weights, and the `interpolate` API."""
import ctypes
import math
import os
import pickle
import pickletools
import zipfile

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from cli import InputError, check_choice, path_argument, reason
from images import check_range, image_array
from sepconv import BAND_COLUMNS, BAND_ROWS, sepconv_pair

KERNEL_SIZE = 51
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
MODELS = ('l1', 'lf')
PADDINGS = ('paper', 'improved')
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# The options of the revisited network (Niklaus et al. 2021) ours can take, all off by default: off is the original.
OPTIONS = ('kernel_normalization', 'input_normalization', 'head_prelu')


def _basic(channels_in, channels_out):
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels_in, channels_out, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(channels_out, channels_out, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(channels_out, channels_out, 3, padding=1), torch.nn.ReLU(inplace=True))


def _upsample(channels):
    return torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU(inplace=True))


def _subnet(prelu=False):
    """A kernel head; with prelu its last activation before the upsampling is a PReLU (a slope per channel,
    starting at 0: the ReLU), whose weights the original's state dicts don't have."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(64, KERNEL_SIZE, 3, padding=1),
        torch.nn.PReLU(KERNEL_SIZE, init=0.0) if prelu else torch.nn.ReLU(inplace=True),
        torch.nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
        torch.nn.Conv2d(KERNEL_SIZE, KERNEL_SIZE, 3, padding=1))


class Network(torch.nn.Module):
    """Encoder-decoder predicting four 51-tap kernels per pixel; layer names match the original.
    Options (OPTIONS), each off by default: kernel_normalization divides the frame by the kernels' mass
    (sepconv_pair's normalize); input_normalization shows the network the frames less their joint mean,
    over their joint standard deviation (the kernels still filter the frames themselves); head_prelu
    (see _subnet)."""

    def __init__(self, kernel_normalization=False, input_normalization=False, head_prelu=False):
        super().__init__()
        self.kernel_normalization, self.input_normalization = kernel_normalization, input_normalization
        self.netConv1 = _basic(6, 32)
        self.netConv2 = _basic(32, 64)
        self.netConv3 = _basic(64, 128)
        self.netConv4 = _basic(128, 256)
        self.netConv5 = _basic(256, 512)
        self.netDeconv5 = _basic(512, 512)
        self.netDeconv4 = _basic(512, 256)
        self.netDeconv3 = _basic(256, 128)
        self.netDeconv2 = _basic(128, 64)
        self.netUpsample5 = _upsample(512)
        self.netUpsample4 = _upsample(256)
        self.netUpsample3 = _upsample(128)
        self.netUpsample2 = _upsample(64)
        self.netVertical1 = _subnet(head_prelu)
        self.netVertical2 = _subnet(head_prelu)
        self.netHorizontal1 = _subnet(head_prelu)
        self.netHorizontal2 = _subnet(head_prelu)

    @property
    def options(self):
        """The names of the options that are on, in OPTIONS' order."""
        on = {'kernel_normalization': self.kernel_normalization, 'input_normalization': self.input_normalization,
              'head_prelu': isinstance(self.netVertical1[5], torch.nn.PReLU)}
        return tuple(name for name in OPTIONS if on[name])

    def kernels(self, one, two, size=None):
        """Vertical1, horizontal1, vertical2, horizontal2 kernels, each N x 51 x H x W, or only their top-left
        size = (height, width), the heads then computing just what those pixels depend on (the same values)."""
        pool = lambda x: F.avg_pool2d(x, kernel_size=2, stride=2)
        both = torch.cat(normalized_inputs(one, two) if self.input_normalization else [one, two], 1)
        if both.device.type == 'cpu' and not torch.is_grad_enabled():  # oneDNN infers fastest in channels_last;
            both = both.contiguous(memory_format=torch.channels_last)  # a training step, 2x slower there at 32 px
        conv1 = self.netConv1(both)
        conv2 = self.netConv2(pool(conv1))
        conv3 = self.netConv3(pool(conv2))
        conv4 = self.netConv4(pool(conv3))
        conv5 = self.netConv5(pool(conv4))
        deconv5 = self.netUpsample5(self.netDeconv5(pool(conv5)))
        deconv4 = self.netUpsample4(self.netDeconv4(deconv5 + conv5))
        deconv3 = self.netUpsample3(self.netDeconv3(deconv4 + conv4))
        deconv2 = self.netUpsample2(self.netDeconv2(deconv3 + conv3))
        combine = deconv2 + conv2
        heads = self.netVertical1, self.netHorizontal1, self.netVertical2, self.netHorizontal2
        return tuple(head(combine) if size is None else _head_top_left(head, combine, size) for head in heads)

    def forward(self, one, two, size=None, with_kernels=False):
        """Middle frame of two N x 3 x H x W BGR frames in [0, 1] (H, W multiples of 32), or only its
        top-left size = (height, width) in less time: the same values, to the bit in whole blocks of the op.
        with_kernels: (frame, the four kernels) (for training, where a DistributedDataParallel wrapper
        sees only forward)."""
        height, width = size or one.shape[-2:]
        kernels = self.kernels(one, two, size)
        pad = lambda x: F.pad(x, [KERNEL_SIZE // 2] * 4, mode='replicate')[
            ..., :height + KERNEL_SIZE - 1, :width + KERNEL_SIZE - 1]
        frame = sepconv_pair(pad(one), kernels[0], kernels[1], pad(two), kernels[2], kernels[3],
                             normalize=self.kernel_normalization)
        return (frame, kernels) if with_kernels else frame


def normalized_inputs(one, two):
    """Both frames less their joint mean (per sample, over both frames and all channels), over their joint
    standard deviation: the mean over the frames of (the frame's variance + its mean's distance from the
    joint mean, squared)."""
    means = [x.mean((1, 2, 3), keepdim=True) for x in (one, two)]
    mean = (means[0] + means[1]) / 2
    variance = sum(x.var((1, 2, 3), unbiased=False, keepdim=True) + (mean - m).square()
                   for x, m in zip((one, two), means)) / 2
    deviation = variance.sqrt() + 1e-7
    return (one - mean) / deviation, (two - mean) / deviation


def _head_top_left(head, combine, size):
    """head(combine)[..., :height, :width]. Those pixels read the upsampled map up to row height and column
    width, which reads the half-resolution features up to height // 2 + 1 and width // 2 + 1, which three
    3x3 convolutions compute exactly from combine up to 3 pixels further. The upsampling itself runs on
    the whole map, since align_corners makes its weights depend on the map's size."""
    height, width = size
    features = head[:6](combine[..., :height // 2 + 5, :width // 2 + 5])
    features = F.pad(features, [0, combine.shape[3] - features.shape[3], 0, combine.shape[2] - features.shape[2]])
    return head[7](head[6](features)[..., :height + 1, :width + 1])[..., :height, :width]


# ---------------------------------------------------------------------------------------------
# Weights

def weights_path(model):
    """The bundled weights of `model`; only l1 ships, lf is trained with train.py --loss lf."""
    path = os.path.join(WEIGHTS_DIR, f'network-{model}.safetensors')
    if not os.path.isfile(path):
        raise InputError(f'no bundled {model} weights ({path}): train them with train.py --loss {model}, or pass '
                         f'--weights network-{model}.pytorch from sepconv-slomo')
    return path


def load_state_dict(path):
    """(state dict, options) of our fp16 safetensors (options from their metadata), or of an original
    sepconv-slomo `.pytorch` state dict (keys 'moduleX'; no options)."""
    if os.path.isdir(path):
        raise InputError(f'weights {path} is a folder, not a weights file')
    if os.path.exists(path) and not os.path.isfile(path):
        raise InputError(f'weights {path} is not a regular file')
    if not os.path.isfile(path):
        raise InputError(f'weights file not found: {path} (train one with train.py, or pass --weights '
                         'PATH to a network-l1.pytorch / network-lf.pytorch from sepconv-slomo)')
    try:
        if path.endswith('.safetensors'):
            state = safetensors.torch.load_file(path)
            with safetensors.safe_open(path, 'pt') as file:
                metadata = file.metadata() or {}
        else:
            state, metadata = torch.load(path, map_location='cpu', weights_only=True), {}
    except pickle.UnpicklingError:  # torch's own text is a page long, with terminal escapes
        if is_checkpoint(path):
            raise InputError(f'{path} is a train.py checkpoint, not weights: export them with '
                             f'python train.py --export {path} WEIGHTS.safetensors') from None
        raise InputError(f'cannot read weights {path}: not a state dict of tensors (a damaged file, or '
                         'pickled objects that are not loaded for safety)') from None
    except (safetensors.SafetensorError, RuntimeError, OSError, EOFError) as error:
        raise InputError(f'cannot read weights {path}: {reason(error)}') from None
    except Exception as error:  # any bytes reach the unpickler: a text file gives a KeyError, ...
        raise InputError(f'{path} is not a weights file ({type(error).__name__}: {reason(error)})') from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f'{path} does not hold SepConv weights: expected a state dict of tensors')
    return {key.replace('module', 'net'): value.float() for key, value in state.items()}, read_options(metadata, path)


def options_metadata(options):
    """Safetensors metadata naming the network options the weights were trained with."""
    return {'options': ','.join(options)}


def read_options(metadata, path):
    """The options named in a weights file's metadata; an option this version does not know is refused."""
    options = tuple(name for name in metadata.get('options', '').split(',') if name)
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise InputError(f"{path} needs network option '{unknown[0]}', which this version of sepconv does not "
                         f"know ({', '.join(OPTIONS)})")
    return options


def load_network(model='l1', weights=None, device='cpu'):
    """A Network in eval mode with the bundled `model` weights, or those at `weights` (a path), on `device`
    ('auto', 'cpu', 'cuda' or a torch.device)."""
    check_choice('model', model, MODELS)
    device = resolve_device(device)
    path = weights_path(model) if weights is None else path_argument('weights', weights)
    state, options = load_state_dict(path)
    network = Network(**dict.fromkeys(options, True))
    check_weights(state, path, network)
    network.load_state_dict(state)
    return network.to(device).eval()


def check_weights(state, path, network=None):
    """Refuse a state dict that is not `network`'s (a new Network by default): tensors missing, unexpected or
    of the wrong shape, or values that are not finite (one NaN makes every output frame black)."""
    expected = (network or Network()).state_dict()
    wrong = sorted(expected.keys() ^ state.keys()) + [key for key in expected.keys() & state.keys()
                                                       if tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        raise InputError(f'{path} does not hold SepConv weights: {len(wrong)} tensors missing, unexpected '
                         f'or of the wrong shape (e.g. {wrong[0]})')
    broken = [key for key in sorted(state) if not torch.isfinite(state[key].float()).all()]
    if broken:
        raise InputError(f'{path} holds weights that are not finite (NaN or infinity) in {len(broken)} tensors, '
                         f'e.g. {broken[0]}')


def is_checkpoint(path):
    """Whether `path` is a train.py checkpoint, read from its pickle's opcodes without running them."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(name for name in archive.namelist() if name.endswith('/data.pkl'))
            strings = {argument for _, argument, _ in pickletools.genops(archive.read(name))
                       if isinstance(argument, str)}
    except (zipfile.BadZipFile, StopIteration, OSError, ValueError, pickle.UnpicklingError):
        return False
    return {'model', 'optimizer', 'step', 'rng'} <= strings


# ---------------------------------------------------------------------------------------------
# Interpolation

DEVICES = ('auto', 'cpu', 'cuda')


def resolve_device(name='auto'):
    """The torch.device for 'auto', 'cpu', 'cuda' or a torch.device, checked against what this machine has."""
    if not isinstance(name, torch.device):
        check_choice('device', name, DEVICES)
        if name == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type not in DEVICES:
        raise InputError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError('--device cuda was asked for, but no CUDA device is available')
    return device


def check_options(padding, precision):
    check_choice('padding', padding, PADDINGS)
    check_choice('precision', precision, PRECISIONS)


def estimate(network, one, two, padding='paper', precision='fp32', channels_last=False):
    """Middle frames of N x 3 x H x W RGB tensors in [0, 1], as the original run.py computes them.

    The network computes only the top-left part of the padded frames that holds the output, rounded up to
    whole blocks of the sepconv op: the same values as network(one, two) cropped, in less time. Speed
    options, meant for CUDA (on the CPU the network computes in channels_last anyway): precision 'bf16'
    or 'fp16' runs the network under autocast (sepconv still accumulates in fp32); channels_last passes
    the inputs as NHWC, which tensor-core convolutions prefer, and pays off once the caller has converted
    the network too: network.to(memory_format=torch.channels_last). estimate changes neither the network
    nor global settings such as torch.backends.cudnn.benchmark.
    """
    check_options(padding, precision)
    height, width = one.shape[-2:]
    one, two, border, size = network_input(one, two, padding)
    if channels_last:
        one, two = (x.contiguous(memory_format=torch.channels_last) for x in (one, two))
    with torch.no_grad(), torch.autocast(one.device.type, PRECISIONS[precision], enabled=precision != 'fp32'):
        output = network(one, two, size) if isinstance(network, Network) else network(one, two)  # any module
    return output[:, :, border:border + height, border:border + width].flip(1).clamp(0.0, 1.0)


def network_input(one, two, padding):
    """The network's BGR input frames for N x 3 x H x W RGB frames, their border on the top and left, and
    the top-left size of the network's output that holds the frames, in whole blocks of the sepconv op."""
    height, width = one.shape[-2:]
    # 'paper' adds 25 px of replicated border, as published; both paddings then round each side up to
    # a multiple of 128 (the original's arithmetic), which the network's five poolings need with room to spare.
    border = KERNEL_SIZE // 2 if padding == 'paper' else 0
    right = math.ceil((width + 2 * border) / 128) * 128 - width - border
    bottom = math.ceil((height + 2 * border) / 128) * 128 - height - border
    pad = lambda x: F.pad(x.flip(1), [border, right, border, bottom], mode='replicate')
    size = (math.ceil((border + height) / BAND_ROWS) * BAND_ROWS,
            math.ceil((border + width) / BAND_COLUMNS) * BAND_COLUMNS)
    return pad(one), pad(two), border, size


def keep_freed_memory():
    """For programs that own their process, such as the commands: glibc serves large tensors from its heap
    and keeps freed memory for the next ones (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB), instead of
    mapping fresh zeroed pages for every activation. 1280x720 interpolation on 2 AVX2 cores then takes about
    6 s instead of 8-9; the resident set stays near its peak. Returns False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-4, 0)) and bool(mallopt(-1, 2 ** 31 - 1))  # M_MMAP_MAX, M_TRIM_THRESHOLD


def _frame_kind(frame, name):
    """What interpolate takes: 'tensor' (float), 'PIL image', 'uint8 array' or 'float array'; the rest is refused."""
    if isinstance(frame, torch.Tensor):
        if frame.is_meta or frame.layout != torch.strided or frame.is_nested:
            kind = 'meta' if frame.is_meta else 'nested' if frame.is_nested else str(frame.layout).split('.')[-1]
            raise InputError(f'{name} is a {kind} tensor; interpolate takes dense tensors that hold their values')
        if not frame.is_floating_point():
            raise InputError(f'{name} is a tensor of {frame.dtype}; tensors must be float, in [0, 1]')
        return 'tensor'
    if isinstance(frame, Image.Image):
        return 'PIL image'
    if isinstance(frame, np.ndarray):
        if frame.dtype == np.uint8:
            return 'uint8 array'
        if frame.dtype.kind == 'f':
            return 'float array'
        raise InputError(f'{name} is an array of {frame.dtype}; arrays must be uint8, or float in [0, 1]')
    if isinstance(frame, (str, bytes, os.PathLike)):
        raise InputError(f'{name} is a path; interpolate takes images (read files with images.read_image)')
    raise InputError(f'{name} has type {type(frame).__name__}; interpolate takes numpy arrays, PIL images or tensors')


def _frame_tensor(frame, kind, name, check_size):
    """A frame of `kind` as a float32 N x 3 x H x W tensor, and the shape it was checked to have; its size
    (width, height, pairs) passes check_size before any copy is made."""
    if kind == 'PIL image':
        frame = image_array(frame, name)
    frame = frame.detach() if kind == 'tensor' else np.asarray(frame)  # no autograd; no ndarray subclasses
    shape = tuple(frame.shape)
    if kind == 'tensor':
        layout, fits = '3 x H x W or N x 3 x H x W', len(shape) in (3, 4) and shape[-3] == 3
    else:
        layout, fits = 'H x W x 3', len(shape) == 3 and shape[2] == 3
    if not fits or 0 in shape:
        raise InputError(f'{name} has shape {shape}; expected {layout} (RGB, at least 1 x 1)')
    check_size(*((shape[-1], shape[-2], shape[0] if len(shape) == 4 else 1) if kind == 'tensor'
                 else (shape[1], shape[0], 1)))
    if kind in ('tensor', 'float array'):
        check_range(frame, name)
    if kind == 'tensor':
        return (frame.float() if frame.dim() == 4 else frame.float()[None]), shape
    scale = 1.0 if kind == 'float array' else 255.0
    return torch.from_numpy(frame.astype(np.float32) / scale).permute(2, 0, 1)[None], shape


def _frames(one, two, check_size):
    """Both frames as float32 N x 3 x H x W tensors, and their kind; frames of two kinds or shapes are refused."""
    kind, other = _frame_kind(one, 'one'), _frame_kind(two, 'two')
    if kind != other:
        raise InputError(f'one is a {kind}, two a {other}; pass both frames as the same kind')
    (one, shape_one), (two, shape_two) = _frame_tensor(one, kind, 'one', check_size), \
        _frame_tensor(two, kind, 'two', check_size)
    if shape_one != shape_two:
        raise InputError(f'one and two differ in shape: {shape_one} and {shape_two}')
    return one, two, kind


def checked_network(network):
    """`network` if it is a SepConv Network (or wraps one: DataParallel, torch.compile) with floating-point
    weights that hold values; else an InputError."""
    inner = network
    while isinstance(inner, torch.nn.Module) and not isinstance(inner, Network):
        inner = next((getattr(inner, name) for name in ('module', '_orig_mod')
                      if isinstance(getattr(inner, name, None), torch.nn.Module)), None)
    if not isinstance(inner, Network):
        given = repr(network) if isinstance(network, str) else type(network).__name__
        raise InputError(f'network must be a Network (from load_network or torch.hub.load), got {given}; '
                         'model= names the bundled weights')
    parameter = next(network.parameters(), None)
    if parameter is None or parameter.is_meta or not parameter.is_floating_point():
        raise InputError('network has no weights to compute with (load them with load_network)' if parameter is None
                         or parameter.is_meta else f'network weights are {parameter.dtype}; expected floating point')
    return network


def interpolate(one, two, network=None, model='l1', padding='paper', precision='fp32'):
    """Middle frame between `one` and `two`, checked before any work (InputError, one line).

    Images are H x W x 3 RGB numpy arrays (uint8, or float in [0, 1]) or PIL images (any mode
    images.read_image reads), giving the same kind back (PIL images as RGB); tensors are float,
    3 x H x W or N x 3 x H x W RGB in [0, 1], and give a float32 tensor back. Both frames are of one kind.
    A network in half or bfloat16 precision computes in it; frames too large for the memory are refused.
    """
    from media import check_memory  # media builds on this module
    batched = isinstance(one, torch.Tensor) and one.dim() == 4
    check_options(padding, precision)
    network = None if network is None else checked_network(network)
    device = resolve_device('auto') if network is None else next(network.parameters()).device
    one, two, kind = _frames(one, two, lambda *size: check_memory(*size[:2], device, padding, size[2]))
    network = load_network(model, device=device) if network is None else network
    parameter = next(network.parameters())  # a half or bfloat16 network computes in its own precision
    output = estimate(network, one.to(parameter), two.to(parameter), padding, precision).float()
    if kind == 'tensor':
        return output if batched else output[0]
    image = output[0].permute(1, 2, 0).cpu().numpy()
    if kind == 'float array':
        return image
    # Rounded to the nearest level: the original truncates, which darkens by half a level on average
    # (benchmark.py truncates, to compare with the published table).
    image = (image * 255.0).round().astype(np.uint8)
    return Image.fromarray(image) if kind == 'PIL image' else image
