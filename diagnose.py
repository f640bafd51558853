"""What a set of weights does beside its Middlebury mean: the share of pixels whose kernels are the heads'
bias (every unit of a head's last activation off, so the kernels do not depend on the input), identical
frames given back, identical frames of noise, and a black and a white frame.

    python diagnose.py [--weights FILE] [--data ../shared/data/middlebury] [--device auto|cpu|cuda]
"""
import json
import sys

import numpy as np
import torch

import cli
from benchmark import evaluate, find_sequences, mean
from cli import ArgumentParser
from images import read_image
from model import DEVICES, interpolate, load_network, resolve_device

HEADS = ('netVertical1', 'netHorizontal1', 'netVertical2', 'netHorizontal2')


def psnr(truth, estimate):
    mse = np.mean((truth.astype(np.float64) - estimate) ** 2)
    return 100.0 if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def constant_share(network, one, two):
    """Share of output pixels (mean over the four heads) where every unit of a head's last activation
    before the upsampling is <= 0, on the pair one, two."""
    shares, hooks = [], []
    record = lambda module, inputs, output: shares.append(float((output <= 0).all(1).float().mean()))
    for name in HEADS:
        hooks.append(getattr(network, name)[5].register_forward_hook(record))
    try:
        interpolate(one, two, network)
    finally:
        for hook in hooks:
            hook.remove()
    return float(np.mean(shares))


def diagnose(network, data):
    """A dict of figures: Middlebury mean, its blend, the worst sequence's gain over its blend, every
    sequence's PSNR and gain, the constant-kernel share on Middlebury, identical frames (the lowest PSNR
    over the sequences' first frames), identical noise, and the grey of a black and a white frame."""
    results = evaluate(network, data)
    gains = {name: row['psnr'] - row['blend_psnr'] for name, row in results.items()}
    figures = {'middlebury_psnr': mean(results, 'psnr'), 'middlebury_ssim': mean(results, 'ssim'),
               'blend_psnr': mean(results, 'blend_psnr'), 'worst_gain': min(gains.values()),
               'worst_sequence': min(gains, key=gains.get),
               'sequences': {name: {'psnr': row['psnr'], 'gain': gains[name]} for name, row in results.items()}}
    constant, identical = [], {}
    for name, first, second, _ in find_sequences(data):
        one, two = read_image(first), read_image(second)
        constant.append(constant_share(network, one, two))
        identical[name] = psnr(one, interpolate(one, one, network))
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    black, white = np.zeros((128, 128, 3), np.uint8), np.full((128, 128, 3), 255, np.uint8)
    figures |= {'constant_pixels': float(np.mean(constant)), 'identical_min': min(identical.values()),
                'identical_worst': min(identical, key=identical.get), 'identical': identical,
                'identical_noise': psnr(noise, interpolate(noise, noise, network)),
                'black_white_grey': float(interpolate(black, white, network).mean() / 255)}
    return figures


def summary_line(figures):
    return (f"Middlebury {figures['middlebury_psnr']:.2f} dB (blend {figures['blend_psnr']:.2f}; worst "
            f"{figures['worst_sequence']} {figures['worst_gain']:+.2f}) | constant kernels "
            f"{figures['constant_pixels']:.1%} | identical frames >= {figures['identical_min']:.1f} dB "
            f"({figures['identical_worst']}), noise {figures['identical_noise']:.1f} dB | black+white "
            f"{figures['black_white_grey']:.3f}")


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
