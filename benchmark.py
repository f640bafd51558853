"""Middlebury benchmark: python benchmark.py [--data DIR] [--model l1|lf|blend] [--padding paper|improved]
Speed harness:       python benchmark.py --speed ... (benchmark_speed.py)

The protocol of the original sepconv-slomo benchmark.py, so that the figures compare with its table:
frames scaled by 1/255 in float32, the estimate clipped to [0, 1] and truncated (not rounded) to uint8,
PSNR and SSIM from scikit-image with data_range 255 (SSIM over the three channels, default window).
The original compares BGR images; both metrics treat the channels alike, so RGB gives the same numbers.
"""
import os
import sys
import urllib.request
import zipfile

import numpy as np
import skimage.metrics
import torch
from tqdm import tqdm

import cli
from cli import ArgumentParser, InputError, path_argument
from files import check_link, check_not_an_input, check_writable, listing, write_file, write_json
from images import image_size, read_image
from model import MODELS, PADDINGS, PRECISIONS, estimate, keep_freed_memory, load_network, weights_path

MIDDLEBURY_URL = 'https://vision.middlebury.edu/flow/data/comp/zip/'
MIDDLEBURY_ARCHIVES = ('other-data.zip', 'other-gt-interp.zip')
FRAMES = ('frame10.png', 'frame11.png', 'frame10i11.png')
SSIM_WINDOW = 7  # scikit-image's default, which the original uses: frames need at least 7 x 7 pixels
CACHE_DIR = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'sepconv', 'middlebury')
REFERENCE = {  # the paper's Middlebury "other" results (PSNR, SSIM), as reproduced by sepconv-slomo
    ('l1', 'paper'): (35.73, 0.959), ('lf', 'paper'): (35.03, 0.954),
    ('l1', 'improved'): (35.85, 0.959), ('lf', 'improved'): (35.16, 0.954),
}


def _download(response, path, bar):
    with open(path, 'wb') as file:
        while chunk := response.read(1 << 16):
            file.write(chunk)
            bar.update(len(chunk))


def download_middlebury(target=CACHE_DIR, url=MIDDLEBURY_URL):
    """Fetch the official "other-data" and "other-gt-interp" archives into target/<Seq>/."""
    os.makedirs(target, exist_ok=True)
    for archive in MIDDLEBURY_ARCHIVES:
        path = os.path.join(target, archive)
        if not os.path.exists(path):
            with urllib.request.urlopen(url + archive) as response, \
                    tqdm(total=int(response.headers.get('Content-Length') or 0) or None, unit='B',
                         unit_scale=True, desc=archive) as bar:
                write_file(path, lambda temporary: _download(response, temporary, bar))
        if not zipfile.is_zipfile(path):
            os.remove(path)
            raise InputError(f'{url + archive} did not give a zip archive (removed it; run again to retry)')
        with zipfile.ZipFile(path) as zip:
            for member in zip.namelist():
                parts = member.split('/')
                if len(parts) == 3 and parts[2] in FRAMES:
                    os.makedirs(os.path.join(target, parts[1]), exist_ok=True)
                    with open(os.path.join(target, parts[1], parts[2]), 'wb') as file:
                        file.write(zip.read(member))
    return target


def find_sequences(data):
    """(name, frame10, frame11, frame10i11) for every sequence folder in `data`. A sequence with a file missing,
    unreadable or a dangling link, or frames of different sizes, is an error: a mean over fewer sequences would
    not compare with the table."""
    if not os.path.isdir(data):
        raise InputError(f'not a folder: {data}' if os.path.exists(data) else f'no such folder: {data}')
    sequences = []
    for name in listing(data, 'Middlebury folder'):
        folder = os.path.join(data, name)
        check_link(folder)
        if not os.path.isdir(folder):
            continue
        listing(folder, 'Middlebury sequence folder')
        files = [os.path.join(folder, frame) for frame in FRAMES]
        for path in files:
            check_link(path)
        missing = [frame for frame, path in zip(FRAMES, files) if not os.path.isfile(path)]
        if missing == list(FRAMES):
            continue
        if missing:
            raise InputError(f"incomplete Middlebury sequence {name}: no {', '.join(missing)} in {folder}")
        sizes = [image_size(path) for path in files]
        if len(set(sizes)) > 1:
            raise InputError(f"Middlebury sequence {name} mixes frame sizes: "
                             f"{', '.join(f'{frame} is {w}x{h}' for frame, (w, h) in zip(FRAMES, sizes))}")
        if min(sizes[0]) < SSIM_WINDOW:
            raise InputError(f'Middlebury sequence {name} has {sizes[0][0]}x{sizes[0][1]} frames; SSIM needs at least '
                             f'{SSIM_WINDOW}x{SSIM_WINDOW}')
        sequences.append((name, *files))
    if not sequences:
        raise InputError(f"no Middlebury sequences (<Seq>/{', '.join(FRAMES)}) in {data}")
    return sequences


def score(truth, estimate):
    with np.errstate(divide='ignore'):  # equal images: an infinite PSNR, not a warning
        psnr = skimage.metrics.peak_signal_noise_ratio(truth, estimate, data_range=255)
    return psnr, skimage.metrics.structural_similarity(truth, estimate, data_range=255, channel_axis=2)


def truncated_middle(network, one, two, padding='paper', precision='fp32'):
    """The middle frame of two uint8 RGB images as the original benchmark makes it: truncated to uint8."""
    device = next(network.parameters()).device
    one, two = (torch.from_numpy(image.astype(np.float32) * (1.0 / 255.0)).permute(2, 0, 1)[None].to(device)
                for image in (one, two))
    output = estimate(network, one, two, padding, precision)[0].permute(1, 2, 0).cpu().numpy()
    return (output * 255.0).astype(np.uint8)


RESULT_KEYS = ('psnr', 'ssim', 'blend_psnr', 'blend_ssim')


def evaluate(network, data, padding='paper', precision='fp32'):
    """{sequence: {psnr, ssim, blend_psnr, blend_ssim}}; network None scores the blend alone (truncated too)."""
    results = {}
    for name, first, second, truth in find_sequences(data):
        one, two, truth = read_image(first), read_image(second), read_image(truth)
        blend = ((one.astype(np.uint16) + two) // 2).astype(np.uint8)
        estimate = blend if network is None else truncated_middle(network, one, two, padding, precision)
        results[name] = dict(zip(RESULT_KEYS, score(truth, estimate) + score(truth, blend)))
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


def inputs(args, data, sequences):
    """Every file the benchmark reads: the frames, the archives they come from, the weights."""
    weights = [] if args.model == 'blend' else [args.weights or weights_path(args.model)]
    archives = [os.path.join(data, archive) for archive in MIDDLEBURY_ARCHIVES]
    return [path for _, *frames in sequences for path in frames] + archives + weights


def parse_args(argv=None):
    parser = ArgumentParser(description='SepConv on the Middlebury benchmark, scored as the original scores it. '
                            '`benchmark.py --speed --help` shows the speed harness.',
                            epilog='Defaults differ from the original benchmark (l1 with improved padding): '
                            'paper padding, as published; --padding improved gives its setting.',
                            formatter_class=cli.HelpFormatter)
    parser.add_argument('--data', help='Middlebury folder with <Seq>/frame10.png, frame11.png, frame10i11.png '
                                       f'(default: {CACHE_DIR}, downloaded on first use)')
    parser.add_argument('--model', default='l1', choices=MODELS + ('blend',),
                        help='bundled weights, or blend: 0.5 one + 0.5 two')
    parser.add_argument('--weights', help='weights file instead of the bundled ones')
    parser.add_argument('--padding', default='paper', choices=PADDINGS, help='frame padding, see run.py --help')
    parser.add_argument('--device', default='auto', type=cli.device, metavar='{auto,cpu,cuda,cuda:N}',
                        help='where the network runs')
    parser.add_argument('--precision', default='fp32', choices=PRECISIONS, help='network precision')
    parser.add_argument('--json', help='also write the results to this JSON file')
    return parser.parse_args(argv)


def benchmark(args):
    if args.json is not None:
        check_writable(path_argument('--json', args.json), [args.weights])
    try:
        data = args.data or download_middlebury()
    except OSError as error:
        raise InputError(f'cannot get the Middlebury data: {error}') from None
    sequences = find_sequences(data)  # all checked before any work (evaluate finds them again, from the headers)
    if args.json is not None:
        check_not_an_input(args.json, inputs(args, data, sequences))
    network = None if args.model == 'blend' else load_network(args.model, args.weights, args.device)
    results = evaluate(network, data, args.padding, args.precision)
    if args.json is not None:  # written first: a report that cannot be printed does not lose the results
        write_json(args.json, {'model': args.model, 'padding': args.padding, 'precision': args.precision,
                               'sequences': results, 'mean': {key: mean(results, key) for key in RESULT_KEYS}})
    setting = args.padding if args.precision == 'fp32' else f'{args.padding} {args.precision}'
    cli.output(report(results, args.model, setting))
    cli.output(f"mean PSNR {mean(results, 'psnr'):.2f} SSIM {mean(results, 'ssim'):.3f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--speed' in argv:
        import benchmark_speed  # the speed harness, a tool of its own
        return benchmark_speed.main([arg for arg in argv if arg != '--speed'])
    return cli.run(benchmark, parse_args(argv))


if __name__ == '__main__':
    keep_freed_memory()  # the command owns its process: every sequence reuses the pages the last one freed
    sys.exit(main())
