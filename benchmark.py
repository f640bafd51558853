"""Benchmarks: python benchmark.py [--dataset NAME] [--data DIR] [--model l1|lf|blend] [--weights FILE]
Speed harness: python benchmark.py --speed ... (benchmark_speed.py)

Each set is scored as the papers that report SepConv score it (`--help` lists them; docs/benchmarks.md gives
the sources). Middlebury keeps the protocol of the original sepconv-slomo benchmark.py, so that its figures
compare with that table: frames scaled by 1/255 in float32, the estimate clipped to [0, 1] and truncated (not
rounded) to uint8, PSNR and SSIM from scikit-image with data_range 255; it also reports the interpolation error
of the rounded estimate. The original compares BGR images; every metric here treats the channels alike (the
volume SSIM's window is symmetric), so RGB gives the same numbers.
"""
import os
import sys
import urllib.request
import zipfile

import numpy as np
import torch
from tqdm import tqdm

import cli
import datasets
from cli import ArgumentParser, InputError, path_argument
from datasets import Benchmark, FrameReader, Triplet, check_sizes
from files import check_link, check_not_an_input, check_writable, listing, write_file, write_json
from images import image_size
from metrics import SSIM_WINDOW, SSIMS, interpolation_error, psnr, quantise
from model import MODELS, PADDINGS, PRECISIONS, estimate, keep_freed_memory, load_network, weights_path

MIDDLEBURY_URL = 'https://vision.middlebury.edu/flow/data/comp/zip/'
MIDDLEBURY_ARCHIVES = ('other-data.zip', 'other-gt-interp.zip')
FRAMES = ('frame10.png', 'frame11.png', 'frame10i11.png')
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


MIDDLEBURY = Benchmark('middlebury', None, '<Seq>/frame10.png, frame11.png, frame10i11.png (truth)',
                       MIDDLEBURY_URL, 'skimage', 'truncate', None)
BENCHMARKS = {'middlebury': MIDDLEBURY, **datasets.BENCHMARKS}
PROTOCOLS = {  # what each set's figures are, as the papers that report SepConv computed them
    'round': 'PSNR of the estimate rounded to uint8',
    'truncate': 'PSNR of the estimate truncated to uint8 (as the original benchmarks)',
    'volume': 'SSIM with an 11x11 Gaussian window (sigma 1.5) over the three channels as one volume '
              '(RIFE, IFRNet, EMA-VFI)',
    'skimage': 'SSIM of scikit-image (7x7 window per channel)',
}
PUBLISHED = {  # SepConv l1 as published: (PSNR, SSIM or None, source); see docs/benchmarks.md
    'vimeo90k': (33.79, 0.9702, 'DSepConv, AAAI 2020, table 2'),
    'ucf101': (34.78, 0.9669, 'DSepConv, AAAI 2020, table 2'),
    'snu-film-easy': (39.41, None, 'IFRNet and EMA-VFI tables'),
    'snu-film-medium': (34.97, None, 'IFRNet and EMA-VFI tables'),
    'snu-film-hard': (29.36, None, 'IFRNet and EMA-VFI tables'),
    'snu-film-extreme': (24.31, None, 'IFRNet and EMA-VFI tables'),
    'xiph-2k': (34.77, 0.929, 'EMA-VFI table'),
    'xiph-4k': (32.06, 0.880, 'EMA-VFI table'),
}
MIDDLEBURY_IE = 2.27  # SepConv l1's interpolation error (DSepConv, AAAI 2020, table 2)


def score(benchmark, truth, levels):
    """{psnr, ssim[, ie]} of an estimate given on the 0-255 scale, by the set's protocol; Middlebury adds the
    interpolation error of the rounded estimate."""
    estimate = quantise(levels, benchmark.rounding)
    row = {'psnr': psnr(truth, estimate), 'ssim': SSIMS[benchmark.ssim](truth, estimate)}
    if benchmark is MIDDLEBURY:
        row['ie'] = interpolation_error(truth, quantise(levels, 'round'))
    return row


def middle_levels(network, one, two, padding='paper', precision='fp32'):
    """The network's middle frame of two uint8 RGB images, on the 0-255 scale (float32, not yet quantised)."""
    device = next(network.parameters()).device
    one, two = (torch.from_numpy(image.astype(np.float32) * (1.0 / 255.0)).permute(2, 0, 1)[None].to(device)
                for image in (one, two))
    return estimate(network, one, two, padding, precision)[0].permute(1, 2, 0).cpu().numpy() * 255.0


def score_triplets(network, benchmark, triplets, padding='paper', precision='fp32', progress=False):
    """{triplet name: figures} by the set's protocol; network None scores the blend 0.5 one + 0.5 two.
    Middlebury also scores the blend beside the network (blend_psnr, ...)."""
    results, read = {}, FrameReader()
    try:
        for triplet in tqdm(triplets, desc=benchmark.name, unit='triplet', disable=not progress,
                            file=cli.side_channel):
            one, truth, two = (read(frame) for frame in triplet[1:])
            if benchmark.prepare:
                one, truth, two = (benchmark.prepare(frame) for frame in (one, truth, two))
            blend = (one.astype(np.float32) + two) / 2
            levels = blend if network is None else middle_levels(network, one, two, padding, precision)
            results[triplet.name] = score(benchmark, truth, levels)
            if benchmark is MIDDLEBURY:
                baseline = score(benchmark, truth, blend)
                results[triplet.name] |= {f'blend_{key}': value for key, value in baseline.items()}
    finally:
        read.close()
    return results


def middlebury_triplets(data):
    return [Triplet(name, first, truth, second) for name, first, second, truth in find_sequences(data)]


def evaluate(network, data, padding='paper', precision='fp32'):
    """Middlebury {sequence: {psnr, ssim, ie, blend_psnr, blend_ssim, blend_ie}}; network None scores the blend."""
    return score_triplets(network, MIDDLEBURY, middlebury_triplets(data), padding, precision)


def mean(results, key):
    return float(np.mean([row[key] for row in results.values()]))


def report(results, model, padding):
    lines = [f"{'sequence':<12} {'PSNR':>7} {'SSIM':>6} {'IE':>5}   {'blend PSNR':>10} {'SSIM':>6} {'IE':>5}"]
    rows = list(results.items()) + [('mean', {key: mean(results, key) for key in next(iter(results.values()))})]
    for name, row in rows:
        lines.append(f"{name:<12} {row['psnr']:7.2f} {row['ssim']:6.3f} {row['ie']:5.2f}   "
                     f"{row['blend_psnr']:10.2f} {row['blend_ssim']:6.3f} {row['blend_ie']:5.2f}")
    lines.append('')
    lines.append(f"{'paper':<16} {'PSNR':>7} {'SSIM':>6}")
    for (paper_model, paper_padding), (paper_psnr, paper_ssim) in REFERENCE.items():
        lines.append(f'{paper_model + "/" + paper_padding:<16} {paper_psnr:7.2f} {paper_ssim:6.3f}')
    lines.append(f'SepConv l1 interpolation error (IE): {MIDDLEBURY_IE} (DSepConv, AAAI 2020, table 2)')
    lines.append(f'{"ours " + model + "/" + padding:<16} {mean(results, "psnr"):7.2f} {mean(results, "ssim"):6.3f}')
    return '\n'.join(lines)


def summary(benchmark, results):
    """The protocol, the published SepConv figures and the mean, for every set but Middlebury."""
    digits = 4 if benchmark.ssim == 'volume' else 3
    lines = [f'{benchmark.name}: {len(results)} triplets; {PROTOCOLS[benchmark.rounding]}; {PROTOCOLS[benchmark.ssim]}']
    if benchmark.name in PUBLISHED:
        paper_psnr, paper_ssim, source = PUBLISHED[benchmark.name]
        ssim = f' SSIM {paper_ssim:.{digits}f}' if paper_ssim else ''
        lines.append(f'published SepConv l1: PSNR {paper_psnr:.2f}{ssim} ({source})')
    lines.append(f"mean PSNR {mean(results, 'psnr'):.2f} SSIM {mean(results, 'ssim'):.{digits}f}")
    return '\n'.join(lines)


def inputs(args, triplets, extra=()):
    """Every file the benchmark reads: the frames, the lists or archives they come from, the weights."""
    weights = [] if args.model == 'blend' else [args.weights or weights_path(args.model)]
    frames = {frame if isinstance(frame, str) else frame[0] for triplet in triplets for frame in triplet[1:]}
    return sorted(frames) + list(extra) + weights


def epilog():
    lines = ['Sets (--dataset) and their layout under --data:']
    lines += [f'  {benchmark.name:<17} {benchmark.layout}' for benchmark in BENCHMARKS.values()]
    lines.append('Protocols, per triplet, then the mean:')
    for protocol in (('truncate', 'skimage'), ('round', 'volume')):
        names = [name for name, benchmark in BENCHMARKS.items() if (benchmark.rounding, benchmark.ssim) == protocol]
        lines.append(f"  {', '.join(names)}: {PROTOCOLS[protocol[0]]}; {PROTOCOLS[protocol[1]]}")
    lines += ['  middlebury also: the interpolation error (IE), mean |round(estimate) - truth| in levels',
              'Frames are padded to the sizes the network needs as in run.py (--padding), the output cropped back.',
              'Defaults differ from the original benchmark (l1 with improved padding): paper padding, as published; '
              '--padding improved gives its setting.']
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = ArgumentParser(description='SepConv on the frame-interpolation benchmarks, each scored as the papers '
                            'that report SepConv score it. `benchmark.py --speed --help` shows the speed harness.',
                            epilog=epilog(), formatter_class=cli.HelpFormatter)
    parser.add_argument('--dataset', default='middlebury', choices=tuple(BENCHMARKS), help='benchmark set')
    parser.add_argument('--data', help='the set\'s folder, in its published layout (below); for Middlebury '
                                       f'default {CACHE_DIR}, downloaded on first use')
    parser.add_argument('--model', default='l1', choices=MODELS + ('blend',),
                        help='bundled weights, or blend: 0.5 one + 0.5 two')
    parser.add_argument('--weights', help='weights file instead of the bundled ones (.safetensors, or the '
                                          "original's .pytorch)")
    parser.add_argument('--padding', default='paper', choices=PADDINGS, help='frame padding, see run.py --help')
    parser.add_argument('--device', default='auto', type=cli.device, metavar='{auto,cpu,cuda,cuda:N}',
                        help='where the network runs')
    parser.add_argument('--precision', default='fp32', choices=PRECISIONS, help='network precision')
    parser.add_argument('--limit', type=int, help='score only the first N triplets, for a quick look')
    parser.add_argument('--json', help="also write every triplet's figures and the means to this JSON file")
    return parser.parse_args(argv)


def find_triplets(args):
    """The set's triplets (the first --limit), all checked, and the list or archive files they come from."""
    benchmark = BENCHMARKS[args.dataset]
    if benchmark is MIDDLEBURY:
        try:
            data = args.data or download_middlebury()
        except OSError as error:
            raise InputError(f'cannot get the Middlebury data: {error}') from None
        triplets, extra = middlebury_triplets(data), [os.path.join(data, archive) for archive in MIDDLEBURY_ARCHIVES]
    else:
        if args.data is None:
            raise InputError(f'--data is needed for {benchmark.name}: the folder of the set published at '
                             f'{benchmark.published}')
        data = path_argument('--data', args.data)
        triplets = benchmark.find(data)[:args.limit]
        check_sizes(benchmark, triplets)
        extra = [os.path.join(data, name) for name in listing(data, 'folder') if name.endswith('.txt')]  # the lists
    return benchmark, triplets[:args.limit], extra


def benchmark(args):
    if args.limit is not None and args.limit < 1:
        raise InputError(f'--limit must be at least 1, got {args.limit}')
    if args.json is not None:
        check_writable(path_argument('--json', args.json), [args.weights])
    chosen, triplets, extra = find_triplets(args)  # all checked before any work
    if args.json is not None:
        check_not_an_input(args.json, inputs(args, triplets, extra))
    network = None if args.model == 'blend' else load_network(args.model, args.weights, args.device)
    results = score_triplets(network, chosen, triplets, args.padding, args.precision, progress=True)
    if args.json is not None:  # written first: a report that cannot be printed does not lose the results
        keys = next(iter(results.values()))
        write_json(args.json, {'dataset': chosen.name, 'model': args.model, 'padding': args.padding,
                               'precision': args.precision, 'sequences': results,
                               'mean': {key: mean(results, key) for key in keys}})
    if chosen is MIDDLEBURY:
        setting = args.padding if args.precision == 'fp32' else f'{args.padding} {args.precision}'
        cli.output(report(results, args.model, setting))
        cli.output(f"mean PSNR {mean(results, 'psnr'):.2f} SSIM {mean(results, 'ssim'):.3f} "
                   f"IE {mean(results, 'ie'):.2f}")
    else:
        cli.output(summary(chosen, results))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--speed' in argv:
        import benchmark_speed  # the speed harness, a tool of its own
        return benchmark_speed.main([arg for arg in argv if arg != '--speed'])
    return cli.run(benchmark, parse_args(argv))


if __name__ == '__main__':
    keep_freed_memory()  # the command owns its process: every sequence reuses the pages the last one freed
    sys.exit(main())
