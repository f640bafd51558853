"""Middlebury benchmark: python benchmark.py [--data DIR] [--model l1|lf|blend] [--padding paper|improved]

PSNR and SSIM are computed as in the original sepconv-slomo benchmark: on uint8 frames with
scikit-image, data_range 255, SSIM over the three channels with default window settings.
"""
import argparse
import glob
import json
import os
import sys
import urllib.request
import zipfile

import numpy as np
import skimage.metrics
from tqdm import tqdm

from media import atomic_output, check_writable, read_image
from model import MODELS, PADDINGS, InputError, interpolate, load_network, resolve_device

MIDDLEBURY_URL = 'https://vision.middlebury.edu/flow/data/comp/zip/'
MIDDLEBURY_ARCHIVES = ('other-data.zip', 'other-gt-interp.zip')
CACHE_DIR = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'sepconv', 'middlebury')
REFERENCE = {  # the paper's Middlebury "other" results (PSNR, SSIM), as reproduced by sepconv-slomo
    ('l1', 'paper'): (35.73, 0.959), ('lf', 'paper'): (35.03, 0.954),
    ('l1', 'improved'): (35.85, 0.959), ('lf', 'improved'): (35.16, 0.954),
}


def download_middlebury(target=CACHE_DIR, url=MIDDLEBURY_URL):
    """Fetch the official "other-data" and "other-gt-interp" archives into target/<Seq>/."""
    os.makedirs(target, exist_ok=True)
    for archive in MIDDLEBURY_ARCHIVES:
        path = os.path.join(target, archive)
        if not os.path.exists(path):
            with urllib.request.urlopen(url + archive) as response, open(path + '.part', 'wb') as file, \
                    tqdm(total=int(response.headers.get('Content-Length') or 0) or None, unit='B',
                         unit_scale=True, desc=archive) as bar:
                while chunk := response.read(1 << 16):
                    file.write(chunk)
                    bar.update(len(chunk))
            os.replace(path + '.part', path)
        if not zipfile.is_zipfile(path):
            os.remove(path)
            raise InputError(f'{url + archive} did not give a zip archive (removed it; run again to retry)')
        with zipfile.ZipFile(path) as zip:
            for member in zip.namelist():
                parts = member.split('/')
                if len(parts) == 3 and parts[2] in ('frame10.png', 'frame11.png', 'frame10i11.png'):
                    os.makedirs(os.path.join(target, parts[1]), exist_ok=True)
                    with open(os.path.join(target, parts[1], parts[2]), 'wb') as file:
                        file.write(zip.read(member))
    return target


def find_sequences(data):
    """(name, frame10, frame11, frame10i11) for every complete sequence in `data`."""
    truths = sorted(glob.glob(os.path.join(data, '*', 'frame10i11.png')))
    return [(os.path.basename(os.path.dirname(truth)), truth.replace('frame10i11', 'frame10'),
             truth.replace('frame10i11', 'frame11'), truth) for truth in truths]


def score(truth, estimate):
    return (skimage.metrics.peak_signal_noise_ratio(truth, estimate, data_range=255),
            skimage.metrics.structural_similarity(truth, estimate, data_range=255, channel_axis=2))


def evaluate(network, data, padding='paper'):
    """{sequence: {psnr, ssim, blend_psnr, blend_ssim}}; network None scores the blend alone."""
    results = {}
    for name, first, second, truth in find_sequences(data):
        one, two, truth = read_image(first), read_image(second), read_image(truth)
        blend = ((one.astype(np.float32) + two.astype(np.float32)) / 2.0).round().astype(np.uint8)
        estimate = blend if network is None else interpolate(one, two, network, padding=padding)
        results[name] = dict(zip(('psnr', 'ssim', 'blend_psnr', 'blend_ssim'), score(truth, estimate) + score(truth, blend)))
    if not results:
        raise InputError(f'no Middlebury sequences (<Seq>/frame10.png, frame11.png, frame10i11.png) in {data}')
    return results


def mean(results, key):
    return float(np.mean([row[key] for row in results.values()]))


def report(results, model, padding):
    lines = [f"{'sequence':<12} {'PSNR':>7} {'SSIM':>6}   {'blend PSNR':>10} {'SSIM':>6}"]
    for name, row in results.items():
        lines.append(f"{name:<12} {row['psnr']:7.2f} {row['ssim']:6.3f}   {row['blend_psnr']:10.2f} {row['blend_ssim']:6.3f}")
    lines.append(f"{'mean':<12} {mean(results, 'psnr'):7.2f} {mean(results, 'ssim'):6.3f}   "
                 f"{mean(results, 'blend_psnr'):10.2f} {mean(results, 'blend_ssim'):6.3f}")
    lines.append('')
    lines.append(f"{'paper':<16} {'PSNR':>7} {'SSIM':>6}")
    for (paper_model, paper_padding), (psnr, ssim) in REFERENCE.items():
        lines.append(f'{paper_model + "/" + paper_padding:<16} {psnr:7.2f} {ssim:6.3f}')
    lines.append(f'{"ours " + model + "/" + padding:<16} {mean(results, "psnr"):7.2f} {mean(results, "ssim"):6.3f}')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description='SepConv benchmarks.')
    parser.add_argument('--data', help='Middlebury folder with <Seq>/frame10.png, frame11.png, frame10i11.png '
                                       f'(default: {CACHE_DIR}, downloaded on first use)')
    parser.add_argument('--model', default='l1', help=f"{', '.join(MODELS)} or blend (default l1)")
    parser.add_argument('--weights', help='weights file instead of the bundled ones')
    parser.add_argument('--padding', default='paper', help=f"{' or '.join(PADDINGS)} (default paper)")
    parser.add_argument('--device', default='auto', help='auto, cpu or cuda')
    parser.add_argument('--json', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    try:
        if args.padding not in PADDINGS:
            raise InputError(f"unknown padding '{args.padding}' (choose from {', '.join(PADDINGS)})")
        if args.json:
            check_writable(args.json)
        data = args.data or (CACHE_DIR if find_sequences(CACHE_DIR) else download_middlebury())
        network = None if args.model == 'blend' else load_network(args.model, args.weights, resolve_device(args.device))
        results = evaluate(network, data, args.padding)
    except InputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except OSError as error:  # download failures
        print(f'error: cannot get the Middlebury data: {error}', file=sys.stderr)
        return 2
    print(report(results, args.model, args.padding))
    if args.json:
        temporary = atomic_output(args.json)
        with open(temporary, 'w') as file:
            json.dump({'model': args.model, 'padding': args.padding, 'sequences': results,
                       'mean': {key: mean(results, key) for key in ('psnr', 'ssim', 'blend_psnr', 'blend_ssim')}},
                      file, indent=2)
        os.replace(temporary, args.json)
    print(f"mean PSNR {mean(results, 'psnr'):.2f} SSIM {mean(results, 'ssim'):.3f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
