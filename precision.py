"""Which precision a device computes fastest, for training and speed runs: bf16 on CUDA and on CPUs
that compute it natively (AMX or AVX512-BF16), fp32 elsewhere. On an AVX2-only CPU a bf16
convolution is emulated and runs 50-100x slower than fp32, so 'auto' must never pick it there."""
import functools
import time

import torch

from cli import say

CHOICES = ('auto', 'fp32', 'bf16')


@functools.cache
def cpu_has_native_bf16():
    """True when this CPU's bf16 convolutions are not slower than fp32 ones. The CPUID flags torch
    reports rule out most CPUs at once; where they say yes, a 3x3 convolution is timed in both
    precisions (about 10 ms), since oneDNN may still be held below AMX (ONEDNN_MAX_CPU_ISA)."""
    if not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return False
    return bf16_convolution_speedup() > 0.8


def bf16_convolution_speedup():
    """fp32 time / bf16 time of one 64-channel 3x3 convolution of a 32x32 map, best of three."""
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.rand(1, 64, 32, 32)
    times = {}
    with torch.no_grad():
        for bf16 in (False, True):
            with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
                conv(x)
                samples = []
                for _ in range(3):
                    start = time.perf_counter()
                    conv(x)
                    samples.append(time.perf_counter() - start)
            times[bf16] = min(samples)
    return times[False] / times[True]


def native(device):
    """The precision 'auto' stands for on `device` (a torch.device or its type)."""
    kind = torch.device(device).type
    return 'bf16' if kind == 'cuda' or (kind == 'cpu' and cpu_has_native_bf16()) else 'fp32'


def resolve(precision, device):
    """'auto' -> native(device); an explicit bf16 on a CPU without it runs after a one-line notice."""
    if precision == 'auto':
        return native(device)
    if precision == 'bf16' and torch.device(device).type == 'cpu' and not cpu_has_native_bf16():
        say('notice: this CPU has no native bf16 (no AMX or AVX512-BF16): bf16 runs emulated, '
            'about 50-100x slower than fp32')
    return precision
