"""Middlebury benchmark: python benchmark.py [--data DIR] [--model l1|lf|blend] [--padding paper|improved]
Speed benchmark:     python benchmark.py --speed [--device cuda|cpu] [--sizes 640x480,1280x720] [--json FILE]

PSNR and SSIM are computed as in the original sepconv-slomo benchmark: on uint8 frames with
scikit-image, data_range 255, SSIM over the three channels with default window settings.
"""
import ctypes
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
import urllib.request
import zipfile

import numpy as np
import skimage.metrics
import torch
from tqdm import tqdm

import sepconv
from media import atomic_output, check_writable, read_image
from model import (KERNEL_SIZE, MODELS, PADDINGS, PRECISIONS, ArgumentParser, InputError, Network, estimate,
                   interpolate, load_network, resolve_device)

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
    sequences = []
    for folder in sorted(os.path.dirname(truth) for truth in glob.glob(os.path.join(data, '*', 'frame10i11.png'))):
        files = [os.path.join(folder, f'{name}.png') for name in ('frame10', 'frame11', 'frame10i11')]
        if all(map(os.path.isfile, files)):
            sequences.append((os.path.basename(folder), *files))
    return sequences


def score(truth, estimate):
    return (skimage.metrics.peak_signal_noise_ratio(truth, estimate, data_range=255),
            skimage.metrics.structural_similarity(truth, estimate, data_range=255, channel_axis=2))


RESULT_KEYS = ('psnr', 'ssim', 'blend_psnr', 'blend_ssim')


def evaluate(network, data, padding='paper', precision='fp32'):
    """{sequence: {psnr, ssim, blend_psnr, blend_ssim}}; network None scores the blend alone."""
    results = {}
    for name, first, second, truth in find_sequences(data):
        one, two, truth = read_image(first), read_image(second), read_image(truth)
        blend = ((one.astype(np.float32) + two.astype(np.float32)) / 2.0).round().astype(np.uint8)
        estimate = blend if network is None else interpolate(one, two, network, padding=padding, precision=precision)
        results[name] = dict(zip(RESULT_KEYS, score(truth, estimate) + score(truth, blend)))
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


# ---------------------------------------------------------------------------------------------
# Speed

SPEED_SIZES = {'cpu': '640x480,1280x720', 'cuda': '640x480,1280x720,1920x1080,3840x2160'}
FP32_PEAK_TFLOPS = (('H100 PCIe', 51.0), ('H100', 67.0), ('H200', 67.0), ('A100', 19.5))  # first match wins
INTERPOLATIONS = {  # precision and options of estimate() timed on each device type
    'cpu': [('fp32', {}), ('bf16', {'precision': 'bf16'})],
    'cuda': [('fp32', {'cudnn_benchmark': True}), ('bf16', {'precision': 'bf16', 'cudnn_benchmark': True}),
             ('bf16 channels_last', {'precision': 'bf16', 'channels_last': True, 'cudnn_benchmark': True})]}


def naive_loop(input, vertical, horizontal):
    """The original algorithm as a plain double loop over the K x K taps, on whole-frame tensors."""
    size, height, width = vertical.shape[1:]
    output = input.new_zeros(input.shape[0], input.shape[1], height, width)
    for i in range(size):
        for j in range(size):
            output += vertical[:, i:i + 1] * horizontal[:, j:j + 1] * input[:, :, i:i + height, j:j + width]
    return output


def summed(function):
    """function applied to each (input, vertical, horizontal) frame, summed in place as the op does."""
    def apply(frames):
        output = function(*frames[0])
        for frame in frames[1:]:
            output += function(*frame)
        return output
    return apply


SEPCONV_IMPLEMENTATIONS = [  # name, device type, needs cupy, kernel storage dtype, function of [(input, vertical, horizontal)] * 2
    ('naive CUDA kernel', 'cuda', True, torch.float32, lambda frames: sepconv._forward_cuda(frames, naive=True)),
    ('optimized CUDA kernel', 'cuda', True, torch.float32, sepconv._forward_cuda),
    ('optimized, bf16 kernels', 'cuda', True, torch.bfloat16, sepconv._forward_cuda),
    ('PyTorch path', 'cuda', False, torch.float32, summed(sepconv._forward_torch)),
    ('PyTorch path', 'cpu', False, torch.float32, summed(sepconv._forward_torch)),
    ('naive reference loop', 'cpu', False, torch.float32, summed(naive_loop)),
]


def parse_sizes(text):
    sizes = []
    for item in text.split(','):
        match = re.fullmatch(r'\s*([1-9]\d*)x([1-9]\d*)\s*', item)
        if not match:
            raise InputError(f"bad size '{item}' in --sizes (expected WIDTHxHEIGHT, e.g. 1280x720)")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def _status_bytes(field):
    with open('/proc/self/status') as file:
        return int(re.search(rf'^{field}:\s+(\d+) kB', file.read(), re.MULTILINE)[1]) * 1024


def _memory_baseline(device):
    """Reset the peak-memory counter; returns the current level (None where there is no such counter)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # glibc: unmap freed memory, so that reusing it shows as growth
        with open('/proc/self/clear_refs', 'w') as file:
            file.write('5')  # Linux: resets the resident-set high-water mark (VmHWM)
        return _status_bytes('VmRSS')
    except (OSError, AttributeError):
        return None


def measure(function, device, repeats):
    """Median seconds of `repeats` calls after one warm-up call, and the peak memory growth in bytes
    over them: allocated CUDA memory, or the process's resident set on the CPU (None if unknown)."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    function()
    synchronize()
    baseline = _memory_baseline(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    if baseline is None:
        return statistics.median(times), None
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else _status_bytes('VmHWM')
    return statistics.median(times), peak - baseline


def describe(device):
    """The device's name and its FP32 peak in TFLOP/s (None where unknown)."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        return name, next((peak for key, peak in FP32_PEAK_TFLOPS if key in name), None)
    try:
        with open('/proc/cpuinfo') as file:
            name = re.search(r'^model name\s*:\s*(.+)$', file.read(), re.MULTILINE)[1]
    except (OSError, TypeError):
        name = platform.processor() or 'CPU'
    return f'{name}, {torch.get_num_threads()} threads', None


def speed_row(size, what, variant, repeats, seconds, memory, flops=None, peak_tflops=None):
    return {'size': size, 'what': what, 'variant': variant, 'repeats': repeats, 'ms': seconds * 1e3,
            'fps': 1 / seconds, 'gflops': flops and flops / seconds / 1e9,
            'peak_fraction': flops and peak_tflops and flops / seconds / (peak_tflops * 1e12),
            'peak_mib': None if memory is None else memory / 2 ** 20}


def speed(device, sizes, repeats=None, weights=None):
    """Timings of the whole interpolation and of sepconv alone (both frames) at each (width, height)."""
    torch.manual_seed(0)
    network = load_network(weights=weights, device=device) if weights else Network().to(device).eval()
    _, peak_tflops = describe(device)
    rows = []
    for width, height in sizes:
        size = f'{width}x{height}'
        count = repeats or (10 if device.type == 'cuda' else 3 if width * height <= 640 * 480 else 1)
        one, two = torch.rand(2, 1, 3, height, width, device=device)
        for variant, options in INTERPOLATIONS[device.type]:
            timing = measure(lambda: estimate(network, one, two, **options), device, count)
            rows.append(speed_row(size, 'interpolation', variant, count, *timing))
        network.to(memory_format=torch.contiguous_format)
        flops = 2 * 2 * 3 * KERNEL_SIZE ** 2 * width * height  # two frames, a multiply-add is 2 FLOP
        padded = torch.rand(2, 1, 3, height + KERNEL_SIZE - 1, width + KERNEL_SIZE - 1, device=device)
        kernels = torch.rand(2, 2, 1, KERNEL_SIZE, height, width, device=device)
        for name, kind, needs_cupy, storage, function in SEPCONV_IMPLEMENTATIONS:
            if kind == device.type and (sepconv.cupy is not None or not needs_cupy):
                frames = [(padded[k], *kernels[k].to(storage)) for k in range(2)]
                timing = measure(lambda: function(frames), device, count)
                rows.append(speed_row(size, 'sepconv', name, count, *timing, flops, peak_tflops))
    return rows


def report_speed(rows, device):
    name, peak_tflops = describe(device)
    lines = [f'speed on {device.type}: {name}' + (f', FP32 peak {peak_tflops:g} TFLOP/s' if peak_tflops else '')
             + '; median of the runs after a warm-up; sepconv is both frames, K = 51',
             f"{'size':<10} {'what':<14} {'variant':<24} {'runs':>4} {'ms':>10} {'fps':>9} {'GFLOP/s':>8} "
             f"{'% peak':>6} {'peak MiB':>9}"]
    number = lambda value, form: '-' if value is None else format(value, form)
    for row in rows:
        lines.append(f"{row['size']:<10} {row['what']:<14} {row['variant']:<24} {row['repeats']:>4} {row['ms']:>10.2f} "
                     f"{row['fps']:>9.3g} {number(row['gflops'], '8.1f'):>8} "
                     f"{number(row['peak_fraction'] and 100 * row['peak_fraction'], '6.1f'):>6} "
                     f"{number(row['peak_mib'], '9.1f'):>9}")
    for size in dict.fromkeys(row['size'] for row in rows):
        ops = {row['variant']: row['ms'] for row in rows if row['size'] == size and row['what'] == 'sepconv'}
        for fast, slow in (('optimized CUDA kernel', 'naive CUDA kernel'), ('optimized CUDA kernel', 'PyTorch path'),
                           ('PyTorch path', 'naive reference loop')):
            if fast in ops and slow in ops:
                lines.append(f'{size}: sepconv {fast} is {ops[slow] / ops[fast]:.1f}x as fast as the {slow}')
    return '\n'.join(lines)


def headline(rows):
    """`720p interpolation <fps> fps` at fp32 (the last size's figure where 1280x720 was not measured)."""
    fp32 = [row for row in rows if row['what'] == 'interpolation' and row['variant'] == 'fp32']
    row = next((row for row in fp32 if row['size'] == '1280x720'), fp32[-1])
    return f"{'720p' if row['size'] == '1280x720' else row['size']} interpolation {row['fps']:.3g} fps"


def write_json(path, content):
    temporary = atomic_output(path)
    with open(temporary, 'w') as file:
        json.dump(content, file, indent=2)
    os.replace(temporary, path)


def main_speed(args):
    try:
        if args.json:
            check_writable(args.json)
        device = resolve_device(args.device)
        sizes = parse_sizes(args.sizes or SPEED_SIZES[device.type])
        if args.repeats is not None and args.repeats < 1:
            raise InputError('--repeats must be at least 1')
        rows = speed(device, sizes, args.repeats, args.weights)
    except InputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(report_speed(rows, device))
    if args.json:
        name, peak_tflops = describe(device)
        write_json(args.json, {'device': device.type, 'device_name': name, 'fp32_peak_tflops': peak_tflops,
                               'kernel_size': KERNEL_SIZE, 'rows': rows, 'headline': headline(rows)})
    print(headline(rows))
    return 0


def main(argv=None):
    parser = ArgumentParser(description='SepConv benchmarks.')
    parser.add_argument('--data', help='Middlebury folder with <Seq>/frame10.png, frame11.png, frame10i11.png '
                                       f'(default: {CACHE_DIR}, downloaded on first use)')
    parser.add_argument('--model', default='l1', help=f"{', '.join(MODELS)} or blend (default l1)")
    parser.add_argument('--weights', help='weights file instead of the bundled ones')
    parser.add_argument('--padding', default='paper', help=f"{' or '.join(PADDINGS)} (default paper)")
    parser.add_argument('--device', default='auto', help='auto, cpu or cuda')
    parser.add_argument('--precision', default='fp32',
                        help=f"network precision: {', '.join(PRECISIONS)} (default fp32)")
    parser.add_argument('--json', help='also write the results to this JSON file')
    parser.add_argument('--speed', action='store_true', help='time interpolation and the sepconv op instead '
                        '(randomly initialised network unless --weights is given)')
    parser.add_argument('--sizes', help='with --speed: comma-separated WIDTHxHEIGHT '
                        f"(default {SPEED_SIZES['cpu']} on cpu, {SPEED_SIZES['cuda']} on cuda)")
    parser.add_argument('--repeats', type=int, help='with --speed: timed runs per measurement '
                        '(default 10 on cuda; on cpu 3 up to 640x480, else 1)')
    args = parser.parse_args(argv)
    if args.speed:
        return main_speed(args)
    try:
        if args.padding not in PADDINGS:
            raise InputError(f"unknown padding '{args.padding}' (choose from {', '.join(PADDINGS)})")
        if args.precision not in PRECISIONS:
            raise InputError(f"unknown precision '{args.precision}' (choose from {', '.join(PRECISIONS)})")
        if args.json:
            check_writable(args.json)
        data = args.data or (CACHE_DIR if find_sequences(CACHE_DIR) else download_middlebury())
        network = None if args.model == 'blend' else load_network(args.model, args.weights, resolve_device(args.device))
        results = evaluate(network, data, args.padding, args.precision)
    except InputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except OSError as error:  # download failures
        print(f'error: cannot get the Middlebury data: {error}', file=sys.stderr)
        return 2
    print(report(results, args.model, args.padding if args.precision == 'fp32' else f'{args.padding} {args.precision}'))
    if args.json:
        write_json(args.json, {'model': args.model, 'padding': args.padding, 'precision': args.precision,
                               'sequences': results, 'mean': {key: mean(results, key) for key in RESULT_KEYS}})
    print(f"mean PSNR {mean(results, 'psnr'):.2f} SSIM {mean(results, 'ssim'):.3f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
