"""What a set of weights does beside its Middlebury mean: the share of pixels whose kernels are the heads'
bias (every unit of a head's last activation off, so the kernels do not depend on the input), the
kernels' mass (what kernel normalization divides by; under 0.01 it divides by 1), identical frames
given back, frames moved by a known whole number of pixels, identical frames of noise, and a black and
a white frame.

    python diagnose.py [--weights FILE] [--data ../shared/data/middlebury] [--device auto|cpu|cuda]
"""
import contextlib
import json
import sys

import numpy as np
import torch

import cli
from benchmark import evaluate, find_sequences, mean
from cli import ArgumentParser
from images import read_image
from metrics import psnr as exact_psnr, quantise
from model import DEVICES, KERNEL_SIZE, interpolate, load_network, resolve_device
from network_setup import HEADS
from sepconv import MASS_FLOOR


def psnr(truth, estimate):
    """metrics.psnr, 100 dB for equal images (a number JSON can hold)."""
    return min(exact_psnr(truth, estimate), 100.0)


@contextlib.contextmanager
def forward_hooks(hooks):
    """{module: hook} registered as forward hooks for the duration of the block."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def constant_shares(network):
    """A list that receives, for every head at every call of the network, the share of pixels where every
    unit of the head's last activation before the upsampling is off (its input <= 0; see HeadMonitor)."""
    shares = []
    record = lambda module, inputs, output: shares.append(float((inputs[0] <= 0).all(1).float().mean()))
    with forward_hooks({getattr(network, name)[5]: record for name in HEADS}):
        yield shares


def constant_share(network, one, two):
    """The share of output pixels, mean over the four heads, with every unit off, on the pair one, two."""
    with constant_shares(network) as shares:
        interpolate(one, two, network)
    return float(np.mean(shares))


SHIFTS = (1, 2)  # px each frame of a shifted pair is moved from the middle, in opposite directions


def shifted_pair(frame, shift):
    """(one, middle, two): crops of an H x W x 3 frame, one `shift` px left of the middle crop and two `shift`
    px right of it: a uniform horizontal motion of 2 * shift px, every pixel of the middle known."""
    width = frame.shape[1]
    crop = lambda start: np.ascontiguousarray(frame[:, start:start + width - 2 * shift])
    return crop(0), crop(shift), crop(2 * shift)


BORDER = KERNEL_SIZE // 2  # interpolate's 'paper' padding: the frame's pixel (0, 0) is the kernels' (25, 25)


@contextlib.contextmanager
def head_kernels(network, names):
    """A dict that receives, at every call of the network, the kernels of the heads `names` (1 x 51 x H x W
    for the padded frame) by head name."""
    kernels = {}
    record = lambda name: lambda module, inputs, output: kernels.__setitem__(name, output.detach())
    with forward_hooks({getattr(network, name)[-1]: record(name) for name in names}):
        yield kernels


def on_frame(kernel, height, width):
    """A head's 51 x height x width kernels for the frame's own pixels."""
    return kernel[0, :, BORDER:BORDER + height, BORDER:BORDER + width]


def kernel_mass(network, one, two):
    """Per pixel of the middle frame of one, two: the kernels' mass over both frames, sum(v1) * sum(h1) +
    sum(v2) * sum(h2), what kernel normalization divides by (a flat H x W tensor)."""
    with head_kernels(network, HEADS) as kernels:
        interpolate(one, two, network)
    sums = {name: on_frame(kernel, *one.shape[:2]).float().sum(0) for name, kernel in kernels.items()}
    mass = sums['netVertical1'] * sums['netHorizontal1'] + sums['netVertical2'] * sums['netHorizontal2']
    return mass.flatten()


def follow(network, one, middle, two, shift):
    """The network's middle frame of a shifted_pair, and how far its horizontal kernels follow the motion:
    each frame's kernel centroid (the taps times their offsets over the taps, each summed over pixels
    weighted by the middle's horizontal gradient, where following matters), over the offset where the
    middle's content sits in that frame (+shift in one, -shift in two). 0: the kernels stay on the pixel,
    as the blend's do; 1: they follow."""
    with head_kernels(network, ('netHorizontal1', 'netHorizontal2')) as kernels:
        estimate = interpolate(one, two, network)
    texture = torch.from_numpy(np.abs(np.gradient(middle.astype(np.float32).mean(2), axis=1)))
    offsets = torch.arange(KERNEL_SIZE, dtype=torch.float32).view(-1, 1, 1) - KERNEL_SIZE // 2
    def centroid(kernel):
        kernel = on_frame(kernel, *one.shape[:2]).float() * texture
        return float((kernel * offsets).sum() / kernel.sum())
    return estimate, (centroid(kernels['netHorizontal1']) - centroid(kernels['netHorizontal2'])) / (2 * shift)


def diagnose(network, data):
    """A dict of figures: Middlebury mean, its blend, the worst sequence's gain over its blend, every
    sequence's PSNR and gain, the constant-kernel share and the kernels' mass (median, share under the floor)
    on Middlebury, identical frames (the lowest PSNR over the sequences' first frames), frames moved by
    SHIFTS (gain over their blend, share followed), identical noise, and the grey of a black and a white frame."""
    with constant_shares(network) as shares:  # recorded while the benchmark runs the network
        results = evaluate(network, data)
    gains = {name: row['psnr'] - row['blend_psnr'] for name, row in results.items()}
    figures = {'middlebury_psnr': mean(results, 'psnr'), 'middlebury_ssim': mean(results, 'ssim'),
               'blend_psnr': mean(results, 'blend_psnr'), 'worst_gain': min(gains.values()),
               'worst_sequence': min(gains, key=gains.get),
               'sequences': {name: {'psnr': row['psnr'], 'gain': gains[name]} for name, row in results.items()}}
    identical, masses, shifted = {}, [], {shift: {'gain': [], 'followed': []} for shift in SHIFTS}
    for name, first, second, _ in find_sequences(data):
        one = read_image(first)
        masses.append(kernel_mass(network, one, read_image(second)))
        identical[name] = psnr(one, interpolate(one, one, network))
        for shift in SHIFTS:
            left, middle, right = shifted_pair(one, shift)
            estimate, followed = follow(network, left, middle, right, shift)
            blend = quantise((left.astype(np.float32) + right) / 2, 'truncate')
            shifted[shift]['gain'].append(psnr(middle, estimate) - psnr(middle, blend))
            shifted[shift]['followed'].append(followed)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    black, white = np.zeros((128, 128, 3), np.uint8), np.full((128, 128, 3), 255, np.uint8)
    masses = torch.cat(masses)
    figures |= {'constant_pixels': float(np.mean(shares)), 'kernel_mass_median': float(masses.median()),
                'kernel_mass_under_floor': float((masses.abs() < MASS_FLOOR).float().mean()),
                'identical_min': min(identical.values()),
                'identical_worst': min(identical, key=identical.get), 'identical': identical,
                'shifted': {f'{2 * shift}px': {key: float(np.mean(values)) for key, values in rows.items()}
                            for shift, rows in shifted.items()},
                'identical_noise': psnr(noise, interpolate(noise, noise, network)),
                'black_white_grey': float(interpolate(black, white, network).mean() / 255)}
    return figures


def summary_line(figures):
    shifted = ', '.join(f"{motion} {row['gain']:+.2f} dB over the blend, followed {row['followed']:.1%}"
                        for motion, row in figures['shifted'].items())
    return (f"Middlebury {figures['middlebury_psnr']:.2f} dB (blend {figures['blend_psnr']:.2f}; worst "
            f"{figures['worst_sequence']} {figures['worst_gain']:+.2f}) | constant kernels "
            f"{figures['constant_pixels']:.1%}, mass {figures['kernel_mass_median']:.3f} (median; under "
            f"{MASS_FLOOR}: {figures['kernel_mass_under_floor']:.2%}) | identical frames >= "
            f"{figures['identical_min']:.1f} dB ({figures['identical_worst']}), noise "
            f"{figures['identical_noise']:.1f} dB | shifted {shifted} | black+white {figures['black_white_grey']:.3f}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--weights', help='weights file (default: the bundled l1 weights)')
    parser.add_argument('--data', default='../shared/data/middlebury', help='Middlebury folder')
    parser.add_argument('--device', default='auto', choices=DEVICES)
    parser.add_argument('--json', action='store_true', help='print every figure as JSON')
    args = parser.parse_args(argv)

    def run(args):
        torch.set_grad_enabled(False)
        network = load_network(weights=args.weights, device=resolve_device(args.device))
        figures = diagnose(network, args.data)
        cli.output(json.dumps(figures, indent=1) if args.json else summary_line(figures))
    return cli.run(run, args)


if __name__ == '__main__':
    sys.exit(main())
