"""Speed harness: python benchmark.py --speed [--device cuda|cpu] [--sizes 640x480,1280x720] [--json FILE]

Times the whole interpolation (fp32, bf16) and the sepconv op alone in every implementation, with peak
memory, GFLOP/s and the share of the device's FP32 peak; the last line is `720p interpolation <x> fps`.
"""
import ctypes
import platform
import re
import statistics
import sys
import time

import torch

import cli
import sepconv
from cli import ArgumentParser, InputError
from benchmark import write_json
from images import check_writable
from model import DEVICES, KERNEL_SIZE, Network, estimate, load_network, resolve_device

SPEED_SIZES = {'cpu': '640x480,1280x720', 'cuda': '640x480,1280x720,1920x1080,3840x2160'}
FP32_PEAK_TFLOPS = (('H100 PCIe', 51.0), ('H100', 67.0), ('H200', 67.0), ('A100', 19.5))  # first match wins
INTERPOLATIONS = {  # precision and options of estimate() timed on each device type
    'cpu': [('fp32', {}), ('bf16', {'precision': 'bf16'})],
    'cuda': [('fp32', {}), ('bf16', {'precision': 'bf16'}),
             ('bf16 channels_last', {'precision': 'bf16', 'channels_last': True})]}


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
    torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms once per shape, as in a video run
    _, peak_tflops = describe(device)
    rows = []
    for width, height in sizes:
        size = f'{width}x{height}'
        count = repeats or (10 if device.type == 'cuda' else 3 if width * height <= 640 * 480 else 1)
        one, two = torch.rand(2, 1, 3, height, width, device=device)
        for variant, options in INTERPOLATIONS[device.type]:
            layout = torch.channels_last if options.get('channels_last') else torch.contiguous_format
            network.to(memory_format=layout)
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


def parse_args(argv=None):
    parser = ArgumentParser(prog='benchmark.py --speed', formatter_class=cli.HelpFormatter,
                            description='Time SepConv (randomly initialised network unless --weights is given).')
    parser.add_argument('--device', default='auto', choices=DEVICES, help='where to time')
    parser.add_argument('--sizes', help='comma-separated WIDTHxHEIGHT '
                        f"(default {SPEED_SIZES['cpu']} on cpu, {SPEED_SIZES['cuda']} on cuda)")
    parser.add_argument('--repeats', type=int, help='timed runs per measurement (default 10 on cuda; on cpu 3 up '
                        'to 640x480, else 1)')
    parser.add_argument('--weights', help='weights file to time instead of a random network')
    parser.add_argument('--json', help='also write the results to this JSON file')
    return parser.parse_args(argv)


def benchmark_speed(args):
    if args.json:
        check_writable(args.json)
    device = resolve_device(args.device)
    sizes = parse_sizes(args.sizes or SPEED_SIZES[device.type])
    if args.repeats is not None and args.repeats < 1:
        raise InputError('--repeats must be at least 1')
    rows = speed(device, sizes, args.repeats, args.weights)
    print(report_speed(rows, device))
    if args.json:
        name, peak_tflops = describe(device)
        write_json(args.json, {'device': device.type, 'device_name': name, 'fp32_peak_tflops': peak_tflops,
                               'kernel_size': KERNEL_SIZE, 'rows': rows, 'headline': headline(rows)})
    print(headline(rows))


def main(argv=None):
    return cli.run(benchmark_speed, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
