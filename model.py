"""The SepConv network (Niklaus et al., ICCV 2017), its weights, and the `interpolate` API."""
import math
import os
import pickle

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from cli import InputError, check_choice, reason
from sepconv import sepconv_pair

KERNEL_SIZE = 51
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')
MODELS = ('l1', 'lf')
PADDINGS = ('paper', 'improved')
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _basic(channels_in, channels_out):
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels_in, channels_out, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels_out, channels_out, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(channels_out, channels_out, 3, padding=1), torch.nn.ReLU())


def _upsample(channels):
    return torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU())


def _subnet():
    return torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, KERNEL_SIZE, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
        torch.nn.Conv2d(KERNEL_SIZE, KERNEL_SIZE, 3, padding=1))


class Network(torch.nn.Module):
    """Encoder-decoder predicting four 51-tap kernels per pixel; layer names match the original."""

    def __init__(self):
        super().__init__()
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
        self.netVertical1 = _subnet()
        self.netVertical2 = _subnet()
        self.netHorizontal1 = _subnet()
        self.netHorizontal2 = _subnet()

    def kernels(self, one, two):
        """Vertical1, horizontal1, vertical2, horizontal2 kernels, each N x 51 x H x W."""
        pool = lambda x: F.avg_pool2d(x, kernel_size=2, stride=2)
        conv1 = self.netConv1(torch.cat([one, two], 1))
        conv2 = self.netConv2(pool(conv1))
        conv3 = self.netConv3(pool(conv2))
        conv4 = self.netConv4(pool(conv3))
        conv5 = self.netConv5(pool(conv4))
        deconv5 = self.netUpsample5(self.netDeconv5(pool(conv5)))
        deconv4 = self.netUpsample4(self.netDeconv4(deconv5 + conv5))
        deconv3 = self.netUpsample3(self.netDeconv3(deconv4 + conv4))
        deconv2 = self.netUpsample2(self.netDeconv2(deconv3 + conv3))
        combine = deconv2 + conv2
        return (self.netVertical1(combine), self.netHorizontal1(combine),
                self.netVertical2(combine), self.netHorizontal2(combine))

    def forward(self, one, two):
        """Middle frame of two N x 3 x H x W BGR frames in [0, 1] (H, W multiples of 32)."""
        vertical1, horizontal1, vertical2, horizontal2 = self.kernels(one, two)
        border = [KERNEL_SIZE // 2] * 4
        return sepconv_pair(F.pad(one, border, mode='replicate'), vertical1, horizontal1,
                            F.pad(two, border, mode='replicate'), vertical2, horizontal2)


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
    """Our fp16 safetensors, or an original sepconv-slomo `.pytorch` state dict (keys 'moduleX')."""
    if not os.path.isfile(path):
        raise InputError(f'weights file not found: {path} (train one with train.py, or pass --weights '
                         'PATH to a network-l1.pytorch / network-lf.pytorch from sepconv-slomo)')
    try:
        if path.endswith('.safetensors'):
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # torch's own text is a page long, with terminal escapes
        raise InputError(f'cannot read weights {path}: not a state dict of tensors (a damaged file, or '
                         'pickled objects that are not loaded for safety)') from None
    except (safetensors.SafetensorError, RuntimeError, OSError, EOFError) as error:
        raise InputError(f'cannot read weights {path}: {reason(error)}') from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f'{path} does not hold SepConv weights: expected a state dict of tensors')
    return {key.replace('module', 'net'): value.float() for key, value in state.items()}


def load_network(model='l1', weights=None, device='cpu'):
    """A Network in eval mode with the bundled `model` weights, or those at `weights`."""
    check_choice('model', model, MODELS)
    network = Network()
    path = weights or weights_path(model)
    state, expected = load_state_dict(path), network.state_dict()
    wrong = sorted(expected.keys() ^ state.keys()) + [key for key in expected.keys() & state.keys()
                                                       if state[key].shape != expected[key].shape]
    if wrong:
        raise InputError(f'{path} does not hold SepConv weights: {len(wrong)} tensors missing, unexpected '
                         f'or of the wrong shape (e.g. {wrong[0]})')
    network.load_state_dict(state)
    return network.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Interpolation

DEVICES = ('auto', 'cpu', 'cuda')


def resolve_device(name='auto'):
    check_choice('device', name, DEVICES)
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise InputError('--device cuda was asked for, but no CUDA device is available')
    return torch.device(name)


def estimate(network, one, two, padding='paper', precision='fp32', channels_last=False):
    """Middle frames of N x 3 x H x W RGB tensors in [0, 1], as the original run.py computes them.

    Speed options, meant for CUDA (the defaults compute exactly as before): precision 'bf16' or 'fp16'
    runs the network under autocast (sepconv still accumulates in fp32); channels_last passes the inputs
    as NHWC, which tensor-core convolutions prefer, and pays off once the caller has converted the
    network too: network.to(memory_format=torch.channels_last). estimate changes neither the network
    nor global settings such as torch.backends.cudnn.benchmark.
    """
    check_choice('padding', padding, PADDINGS)
    check_choice('precision', precision, PRECISIONS)
    height, width = one.shape[-2:]
    # 'paper' adds 25 px of replicated border, as published; both paddings then round each side up to
    # a multiple of 128 (the original's arithmetic), which the network's five poolings need with room to spare.
    border = KERNEL_SIZE // 2 if padding == 'paper' else 0
    right = math.ceil((width + 2 * border) / 128) * 128 - width - border
    bottom = math.ceil((height + 2 * border) / 128) * 128 - height - border
    pad = lambda x: F.pad(x.flip(1), [border, right, border, bottom], mode='replicate')
    one, two = pad(one), pad(two)
    if channels_last:
        one, two = (x.contiguous(memory_format=torch.channels_last) for x in (one, two))
    with torch.no_grad(), torch.autocast(one.device.type, PRECISIONS[precision], enabled=precision != 'fp32'):
        output = network(one, two)
    return output[:, :, border:border + height, border:border + width].flip(1).clamp(0.0, 1.0)


def interpolate(one, two, network=None, model='l1', padding='paper', precision='fp32'):
    """Middle frame between `one` and `two`.

    Images are H x W x 3 RGB numpy arrays (uint8, or float in [0, 1]) or PIL images, giving the
    same kind back; tensors are 3 x H x W or N x 3 x H x W RGB in [0, 1] and give a tensor back.
    """
    network = network or load_network(model, device=resolve_device())
    device = next(network.parameters()).device
    if isinstance(one, torch.Tensor):
        batched = one.dim() == 4
        one, two = (t if batched else t[None] for t in (one, two))
        output = estimate(network, one.to(device).float(), two.to(device).float(), padding, precision)
        return output if batched else output[0]
    arrays = [np.asarray(image) for image in (one, two)]
    if arrays[0].shape != arrays[1].shape or arrays[0].ndim != 3 or arrays[0].shape[2] != 3:
        raise InputError('interpolate expects two H x W x 3 images of the same size')
    scale = 255.0 if arrays[0].dtype == np.uint8 else 1.0
    tensors = [torch.from_numpy(a.astype(np.float32) / scale).permute(2, 0, 1)[None].to(device) for a in arrays]
    output = estimate(network, *tensors, padding, precision)[0].permute(1, 2, 0).cpu().numpy()
    if scale == 1.0:
        return output
    # Rounded to the nearest level: the original truncates, which darkens by half a level on average
    # (benchmark.py truncates, to compare with the published table).
    output = (output * 255.0).round().astype(np.uint8)
    return Image.fromarray(output) if isinstance(one, Image.Image) else output
