"""Speed harness: python benchmark.py --speed [--device cuda|cpu] [--sizes 640x480,1280x720] [--precisions fp32,bf16]
[--json FILE]

Times the whole interpolation, the network alone and the sepconv op alone in every implementation, in the
precision the device computes natively (precision.native) unless --precisions names others, with peak memory,
GFLOP/s and the share of this machine's peak, measured in the same run as one large matmul per precision (fp32,
and bf16 where native). The last line is `720p interpolation <x> fps`, in the first precision timed.
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
from cli import ArgumentParser, InputError, path_argument
from files import check_writable, write_json
from precision import native as native_precision, resolve as resolve_precision
from model import (KERNEL_SIZE, PRECISIONS, Network, estimate, keep_freed_memory, load_network,
                   network_input, resolve_device)

SPEED_SIZES = {'cpu': '640x480,1280x720', 'cuda': '640x480,1280x720,1920x1080,3840x2160'}
MATMUL_SIZE = {'cpu': 2048, 'cuda': 8192}  # side of the square matmul that measures the peak
MATMUL_REPEATS = 5


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


# name, device type, needs cupy, the kernels' dtype and layout, function of [(input, vertical, horizontal)] * 2
SEPCONV_IMPLEMENTATIONS = [
    ('naive CUDA kernel', 'cuda', True, torch.float32, torch.contiguous_format,
     lambda frames: sepconv._forward_cuda(frames, naive=True)),
    ('optimized CUDA kernel', 'cuda', True, torch.float32, torch.contiguous_format, sepconv._forward_cuda),
    ('optimized, bf16 kernels', 'cuda', True, torch.bfloat16, torch.contiguous_format, sepconv._forward_cuda),
    ('PyTorch path', 'cuda', False, torch.float32, torch.contiguous_format, summed(sepconv._forward_torch)),
    ('PyTorch path', 'cpu', False, torch.float32, torch.channels_last,  # as the network gives them on the CPU
     summed(sepconv._forward_torch)),
    ('naive reference loop', 'cpu', False, torch.float32, torch.contiguous_format, summed(naive_loop)),
]


def parse_sizes(text):
    sizes = []
    for item in text.split(','):
        match = re.fullmatch(r'\s*([1-9]\d*)x([1-9]\d*)\s*', item)
        if not match:
            raise InputError(f"bad size '{item}' in --sizes (expected WIDTHxHEIGHT, e.g. 1280x720)")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def parse_precisions(text, device):
    """The precisions named in --precisions ('auto' is the device's native one), each once, in order."""
    names = [name.strip() for name in text.split(',')]
    for name in names:
        if name not in ('auto', *PRECISIONS):
            raise InputError(f"bad precision '{name}' in --precisions (choose from auto, {', '.join(PRECISIONS)})")
    return list(dict.fromkeys(resolve_precision(name, device) for name in names))


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


def durations(function, device, repeats):
    """Seconds of each of `repeats` calls (the device synchronized after each)."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(function, device, repeats):
    """Median seconds of `repeats` calls after one warm-up call, and the peak memory growth in bytes
    over the warm-up (later calls may reuse what it freed): allocated CUDA memory, or the process's
    resident set on the CPU (None if unknown)."""
    baseline = _memory_baseline(device)
    durations(function, device, 1)
    growth = None
    if baseline is not None:
        peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else _status_bytes('VmHWM')
        growth = peak - baseline
    return statistics.median(durations(function, device, repeats)), growth


def matmul_peak(device, precision):
    """GFLOP/s of one large square matmul in `precision`: the best of MATMUL_REPEATS after a warm-up."""
    side = MATMUL_SIZE[device.type]
    a, b = (torch.rand(side, side, device=device).to(PRECISIONS[precision]) for _ in range(2))
    seconds = min(durations(lambda: torch.mm(a, b), device, 1 + MATMUL_REPEATS)[1:])
    return 2 * side ** 3 / seconds / 1e9


def measured_peaks(device, timed):
    """{precision: matmul GFLOP/s} for fp32, and for each timed precision the device computes natively."""
    return {name: matmul_peak(device, name) for name in dict.fromkeys(['fp32', *timed])
            if name == 'fp32' or name == native_precision(device)}


class FlopCounter:
    """While active, counts the FLOPs (2 per multiply-add) of a network's convolutions and of its sepconv op,
    per call of the functions wrapped by `counted`."""

    def __init__(self, network):
        self.network = network

    def __enter__(self):
        self.flops, self.calls = 0, 0
        self.handles = [module.register_forward_hook(self._convolution) for module in self.network.modules()
                        if isinstance(module, torch.nn.Conv2d)] + [self.network.register_forward_hook(self._sepconv)]
        return self

    def __exit__(self, *exception):
        for handle in self.handles:
            handle.remove()

    def _convolution(self, module, inputs, output):
        kernel_height, kernel_width = module.kernel_size
        self.flops += 2 * output.numel() * module.in_channels * kernel_height * kernel_width

    def _sepconv(self, module, inputs, output):
        self.flops += 2 * 2 * output.numel() * KERNEL_SIZE ** 2  # two frames

    def counted(self, function):
        def call():
            self.calls += 1
            return function()
        return call

    @property
    def per_call(self):
        return self.flops / self.calls


def describe(device):
    """The device's name, with the number of threads on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as file:
            name = re.search(r'^model name\s*:\s*(.+)$', file.read(), re.MULTILINE)[1]
    except (OSError, TypeError):
        name = platform.processor() or 'CPU'
    return f'{name}, {torch.get_num_threads()} threads'


def speed_row(size, what, variant, precision, repeats, seconds, memory, flops):
    """A timing; `precision` names the matmul peak it compares with (peak_fraction is set once that is known)."""
    return {'size': size, 'what': what, 'variant': variant, 'precision': precision, 'repeats': repeats,
            'ms': seconds * 1e3, 'fps': 1 / seconds, 'gflops': flops / seconds / 1e9,
            'peak_mib': None if memory is None else memory / 2 ** 20}


def interpolation_rows(network, device, size, count, variant, precision):
    """The whole interpolation and the network alone (as estimate runs it) at size = (width, height)."""
    width, height = size
    one, two = torch.rand(2, 1, 3, height, width, device=device)
    channels_last = variant.endswith('channels_last')
    network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    padded_one, padded_two, _, top_left = network_input(one, two, 'paper')
    if channels_last:
        padded_one, padded_two = (x.contiguous(memory_format=torch.channels_last) for x in (padded_one, padded_two))

    def kernels():
        with torch.no_grad(), torch.autocast(device.type, PRECISIONS[precision], enabled=precision != 'fp32'):
            return network.kernels(padded_one, padded_two, top_left)

    rows = []
    for what, function in (('interpolation', lambda: estimate(network, one, two, 'paper', precision, channels_last)),
                           ('network', kernels)):
        with FlopCounter(network) as counter:
            timing = measure(counter.counted(function), device, count)
        rows.append(speed_row(f'{width}x{height}', what, variant, precision, count, *timing, counter.per_call))
    network.to(memory_format=torch.contiguous_format)
    return rows


def sepconv_rows(device, size, count):
    """The op alone (both frames) in every implementation."""
    width, height = size
    flops = 2 * 2 * 3 * KERNEL_SIZE ** 2 * width * height  # two frames, a multiply-add is 2 FLOP
    padded = torch.rand(2, 1, 3, height + KERNEL_SIZE - 1, width + KERNEL_SIZE - 1, device=device)
    kernels = torch.rand(2, 2, 1, KERNEL_SIZE, height, width, device=device)
    rows = []
    for name, kind, needs_cupy, storage, layout, function in SEPCONV_IMPLEMENTATIONS:
        if kind == device.type and (sepconv.cupy is not None or not needs_cupy):
            frames = [(padded[k], *(t.to(storage).contiguous(memory_format=layout) for t in kernels[k]))
                      for k in range(2)]
            timing = measure(lambda: function(frames), device, count)
            rows.append(speed_row(f'{width}x{height}', 'sepconv', name, 'fp32', count, *timing, flops))
    return rows


def speed(device, sizes, timed, repeats=None, weights=None):
    """The matmul peaks, and timings of the whole interpolation, the network and sepconv alone (both frames)
    at each (width, height), in each precision of `timed` (on CUDA also with channels_last)."""
    torch.manual_seed(0)
    network = load_network(weights=weights, device=device) if weights else Network().to(device).eval()
    torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms once per shape, as in a video run
    first = measured_peaks(device, timed)
    rows = []
    for width, height in sizes:
        count = repeats or (10 if device.type == 'cuda' else 3 if width * height <= 640 * 480 else 1)
        for precision in timed:
            for variant in [precision] + ([f'{precision} channels_last'] if device.type == 'cuda' else []):
                rows += interpolation_rows(network, device, (width, height), count, variant, precision)
        rows += sepconv_rows(device, (width, height), count)
    last = measured_peaks(device, timed)
    peaks = {name: max(first[name], last[name]) for name in first}  # other load can only lower a measurement
    for row in rows:
        row['peak_fraction'] = row['gflops'] / peaks.get(row['precision'], peaks['fp32'])
    return peaks, rows


def report_speed(peaks, rows, device):
    lines = [f'speed on {device.type}: {describe(device)}; measured matmul peak '
             + ', '.join(f'{name} {gflops:.1f} GFLOP/s' for name, gflops in peaks.items())
             + f' ({MATMUL_SIZE[device.type]}^3, best of {MATMUL_REPEATS} before and after the timings)',
             'median of the runs after a warm-up; sepconv is both frames, K = 51; network and interpolation count '
             'the FLOPs of what estimate computes; % peak is of the matmul peak in the same precision (else fp32)',
             f"{'size':<10} {'what':<14} {'variant':<24} {'runs':>4} {'ms':>10} {'fps':>9} {'GFLOP/s':>8} "
             f"{'% peak':>6} {'peak MiB':>9}"]
    for row in rows:
        memory = '-' if row['peak_mib'] is None else f"{row['peak_mib']:9.1f}"
        lines.append(f"{row['size']:<10} {row['what']:<14} {row['variant']:<24} {row['repeats']:>4} {row['ms']:>10.2f} "
                     f"{row['fps']:>9.3g} {row['gflops']:>8.1f} {100 * row['peak_fraction']:>6.1f} {memory:>9}")
    for size in dict.fromkeys(row['size'] for row in rows):
        ops = {row['variant']: row['ms'] for row in rows if row['size'] == size and row['what'] == 'sepconv'}
        for fast, slow in (('optimized CUDA kernel', 'naive CUDA kernel'), ('optimized CUDA kernel', 'PyTorch path'),
                           ('PyTorch path', 'naive reference loop')):
            if fast in ops and slow in ops:
                lines.append(f'{size}: sepconv {fast} is {ops[slow] / ops[fast]:.1f}x as fast as the {slow}')
    return '\n'.join(lines)


def headline(rows):
    """`720p interpolation <fps> fps` in the first variant timed (the last size's figure where 1280x720 was
    not measured)."""
    interpolations = [row for row in rows if row['what'] == 'interpolation']
    first = [row for row in interpolations if row['variant'] == interpolations[0]['variant']]
    row = next((row for row in first if row['size'] == '1280x720'), first[-1])
    return f"{'720p' if row['size'] == '1280x720' else row['size']} interpolation {row['fps']:.3g} fps"


def parse_args(argv=None):
    parser = ArgumentParser(prog='benchmark.py --speed', formatter_class=cli.HelpFormatter,
                            description='Time SepConv (randomly initialised network unless --weights is given).')
    parser.add_argument('--device', default='auto', type=cli.device, metavar='{auto,cpu,cuda,cuda:N}',
                        help='where to time')
    parser.add_argument('--sizes', help='comma-separated WIDTHxHEIGHT '
                        f"(default {SPEED_SIZES['cpu']} on cpu, {SPEED_SIZES['cuda']} on cuda)")
    parser.add_argument('--precisions', default='auto', help='comma-separated network precisions to time, of '
                        f"auto, {', '.join(PRECISIONS)}; auto is what the device computes natively "
                        '(bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32)')
    parser.add_argument('--repeats', type=int, help='timed runs per measurement (default 10 on cuda; on cpu 3 up '
                        'to 640x480, else 1)')
    parser.add_argument('--weights', help='weights file to time instead of a random network')
    parser.add_argument('--json', help='also write the results to this JSON file')
    return parser.parse_args(argv)


def benchmark_speed(args):
    if args.json is not None:  # never onto the weights it times
        check_writable(path_argument('--json', args.json), [args.weights])
    device = resolve_device(args.device)
    sizes = parse_sizes(args.sizes or SPEED_SIZES[device.type])
    if args.repeats is not None and args.repeats < 1:
        raise InputError('--repeats must be at least 1')
    timed = parse_precisions(args.precisions, device)
    kept = keep_freed_memory()
    peaks, rows = speed(device, sizes, timed, args.repeats, args.weights)
    if args.json is not None:  # written first: a report that cannot be printed does not lose the results
        write_json(args.json, {'device': device.type, 'device_name': describe(device), 'peak_gflops': peaks,
                               'freed_memory_kept': kept,
                               'matmul_size': MATMUL_SIZE[device.type], 'kernel_size': KERNEL_SIZE, 'rows': rows,
                               'headline': headline(rows)})
    cli.output(report_speed(peaks, rows, device))
    cli.output(f"freed memory {'kept for reuse (model.keep_freed_memory)' if kept else 'returned to the system'}")
    cli.output(headline(rows))


def main(argv=None):
    return cli.run(benchmark_speed, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
