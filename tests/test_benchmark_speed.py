"""benchmark.py --speed: a tiny CPU run, its table, last line and JSON, and its input errors."""
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

import pytest
import torch

import benchmark
import benchmark_speed
import precision
import sepconv


@pytest.fixture
def small_matmul(monkeypatch):
    monkeypatch.setattr(benchmark_speed, 'MATMUL_SIZE', {'cpu': 256, 'cuda': 256})


def network_flops(height, width):
    """FLOPs of the network's convolutions on a whole height x width input, layer by layer from the paper."""
    area = height * width
    multiply_adds = 9 * (
        (6 * 32 + 32 * 32 * 2) * area + (32 * 64 + 64 * 64 * 2) * area / 4 + (64 * 128 + 128 * 128 * 2) * area / 16
        + (128 * 256 + 256 * 256 * 2) * area / 64 + (256 * 512 + 512 * 512 * 2) * area / 256  # encoder
        + 512 * 512 * 3 * area / 1024 + 512 * 512 * area / 256  # netDeconv5, netUpsample5
        + (512 * 256 + 256 * 256 * 2) * area / 256 + 256 * 256 * area / 64  # netDeconv4, netUpsample4
        + (256 * 128 + 128 * 128 * 2) * area / 64 + 128 * 128 * area / 16  # netDeconv3, netUpsample3
        + (128 * 64 + 64 * 64 * 2) * area / 16 + 64 * 64 * area / 4  # netDeconv2, netUpsample2
        + 4 * ((64 * 64 * 2 + 64 * 51) * area / 4 + 51 * 51 * area))  # four kernel heads
    return 2 * multiply_adds


def test_flop_counter_counts_convolutions_and_the_op(random_network):
    assert network_flops(896, 1408) == pytest.approx(960.0e9, rel=1e-4)  # 1280x720 with the paper's padding
    one = torch.rand(1, 3, 64, 96)
    with torch.no_grad(), benchmark_speed.FlopCounter(random_network) as counter:
        counter.counted(lambda: random_network.kernels(one, one))()
        assert counter.per_call == network_flops(64, 96)
        counter.counted(lambda: random_network(one, one, size=(32, 64)))()
    assert counter.calls == 2
    sepconv_flops = 2 * 2 * 3 * 51 * 51 * 32 * 64
    assert network_flops(64, 96) < counter.flops - sepconv_flops < 2 * network_flops(64, 96)  # the heads in part


def test_speed_on_cpu_at_a_tiny_size(tmp_path, capsys, monkeypatch, small_matmul):
    kept = []  # the test process keeps glibc's settings
    monkeypatch.setattr(benchmark_speed, 'keep_freed_memory', lambda: kept.append(True) or True)
    path = tmp_path / 'speed.json'
    argv = ['--speed', '--device', 'cpu', '--sizes', '64x48', '--precisions', 'fp32', '--repeats', '1',
            '--json', str(path)]
    assert benchmark.main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert re.fullmatch(r'64x48 interpolation \d[\d.]*(e[+-]\d+)? fps', lines[-1])
    assert kept == [True] and lines[-2] == 'freed memory kept for reuse (model.keep_freed_memory)'
    results = json.loads(path.read_text())
    peak = results['peak_gflops']['fp32']
    assert list(results['peak_gflops']) == ['fp32'] and peak > 0 and results['matmul_size'] == 256
    assert lines[0].startswith('speed on cpu: ') and f'measured matmul peak fp32 {peak:.1f} GFLOP/s (256^3' in lines[0]
    assert re.search(r'64x48: sepconv PyTorch path is \d+\.\dx as fast as the naive reference loop', out)
    assert results['device'] == 'cpu' and results['kernel_size'] == 51 and results['headline'] == lines[-1]
    rows = {(row['what'], row['variant']): row for row in results['rows']}
    assert list(rows) == [('interpolation', 'fp32'), ('network', 'fp32'), ('sepconv', 'PyTorch path'),
                          ('sepconv', 'naive reference loop')]
    flops = {key: row['gflops'] * row['ms'] * 1e6 for key, row in rows.items()}
    for (what, variant), row in rows.items():
        assert row['size'] == '64x48' and row['repeats'] == 1
        assert row['ms'] > 0 and row['fps'] == pytest.approx(1000 / row['ms'])
        assert row['peak_fraction'] == pytest.approx(row['gflops'] / peak)
        assert row['peak_mib'] is None or row['peak_mib'] >= 0
        printed = next(line for line in lines if line.startswith(f'64x48      {what:<14} {variant:<24}')).split()
        assert printed[-5:-1] == [f"{row['ms']:.2f}", f"{row['fps']:.3g}", f"{row['gflops']:.1f}",
                                  f"{100 * row['peak_fraction']:.1f}"]
        if what == 'sepconv':  # 2 frames x 3 channels x 51 x 51 taps x 64 x 48 pixels, 2 FLOP each
            assert flops[what, variant] == pytest.approx(2 * 2 * 3 * 51 * 51 * 64 * 48)
    # The network computes the top-left 25 + 48 rows and 25 + 64 columns of the 128 x 128 padded frame, in
    # whole blocks of the op, so part of its heads; the interpolation adds the op on those pixels.
    height, width = (-(-(25 + size) // block) * block
                     for size, block in ((48, sepconv.BAND_ROWS), (64, sepconv.BAND_COLUMNS)))
    assert network_flops(128, 128) * 0.6 < flops['network', 'fp32'] < network_flops(128, 128)
    sepconv_flops = 2 * 2 * 3 * 51 * 51 * height * width
    assert flops['interpolation', 'fp32'] - flops['network', 'fp32'] == pytest.approx(sepconv_flops)
    assert lines[-1] == f"64x48 interpolation {rows['interpolation', 'fp32']['fps']:.3g} fps"


@pytest.mark.parametrize('native, asked, timed, peaks', [
    (False, 'auto', ['fp32'], ['fp32']),
    (True, 'auto', ['bf16'], ['fp32', 'bf16']),
    (False, 'fp32,bf16,auto', ['fp32', 'bf16'], ['fp32']),  # bf16 asked for where it is emulated: no bf16 peak
    (True, 'bf16, fp32', ['bf16', 'fp32'], ['fp32', 'bf16']),
])
def test_precisions_default_to_the_native_one(monkeypatch, small_matmul, native, asked, timed, peaks):
    monkeypatch.setattr(precision, 'cpu_has_native_bf16', lambda: native)
    cpu = torch.device('cpu')
    assert benchmark_speed.parse_precisions(asked, cpu) == timed
    measured = benchmark_speed.measured_peaks(cpu, timed)
    assert list(measured) == peaks and all(gflops > 0 for gflops in measured.values())


def test_headline_prefers_720p_in_the_first_precision():
    rows = [{'what': 'interpolation', 'variant': variant, 'size': size, 'fps': fps}
            for size, variant, fps in [('640x480', 'fp32', 2.0), ('1280x720', 'fp32', 1.25), ('1280x720', 'bf16', 3.0),
                                       ('1920x1080', 'fp32', 0.5)]]
    assert benchmark_speed.headline(rows) == '720p interpolation 1.25 fps'
    assert benchmark_speed.headline(rows[2:3]) == '720p interpolation 3 fps'
    assert benchmark_speed.headline(rows[:1]) == '640x480 interpolation 2 fps'


def test_naive_loop_matches_the_op():
    torch.manual_seed(0)
    input, vertical, horizontal = torch.rand(2, 3, 9, 10).double(), torch.rand(2, 5, 5, 6).double(), torch.rand(2, 5, 5, 6).double()
    torch.testing.assert_close(benchmark_speed.naive_loop(input, vertical, horizontal),
                               sepconv.sepconv(input, vertical, horizontal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('argv, message', [
    (['--sizes', '640x'], "error: bad size '640x' in --sizes (expected WIDTHxHEIGHT, e.g. 1280x720)"),
    (['--sizes', '0x480'], "error: bad size '0x480' in --sizes (expected WIDTHxHEIGHT, e.g. 1280x720)"),
    (['--repeats', '0'], 'error: --repeats must be at least 1'),
    (['--precisions', 'fp32,fp8'], "error: bad precision 'fp8' in --precisions (choose from auto, fp32, bf16, fp16)"),
])
def test_speed_input_errors(capsys, argv, message):
    assert benchmark.main(['--speed', '--device', 'cpu', *argv]) == 2
    out, err = capsys.readouterr()
    assert out == '' and err.strip() == message


def test_unknown_device_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit:
        benchmark.main(['--speed', '--device', 'tpu'])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ''
    assert err.startswith("error: argument --device: invalid choice: 'tpu'") and err.count('\n') == 1


KEEP_FREED_MEMORY = """
import resource, torch, model
def faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(mib * 2 ** 18) for mib in (40, 30, 20, 10, 40)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
fresh = min(faults_of_a_round() for _ in range(3))
kept = model.keep_freed_memory()
faults_of_a_round()
print(kept, fresh, sum(faults_of_a_round() for _ in range(4)))
"""


def test_keep_freed_memory_reuses_the_pages_of_freed_tensors():
    result = subprocess.run([sys.executable, '-c', KEEP_FREED_MEMORY], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kept, fresh, reused = result.stdout.split()
    assert kept == str(sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc')
    if kept == 'True':  # 140 MiB of tensors: at least 28,000 pages of 4 KiB mapped afresh per round, then reused
        assert int(fresh) > 20_000 and int(reused) < int(fresh)


def test_measure_gives_the_median_time_and_the_peak_memory():
    cpu = torch.device('cpu')
    durations = iter([0.01, 0.2, 0.05, 0.08])  # the first call is the warm-up, not timed
    seconds, _ = benchmark_speed.measure(lambda: time.sleep(next(durations)), cpu, 3)
    assert 0.08 <= seconds < 0.15
    seconds, memory = benchmark_speed.measure(lambda: np.ones(64 * 2 ** 20, np.uint8), cpu, 1)  # touches 64 MiB
    if sys.platform == 'linux':
        assert 60 * 2 ** 20 <= memory < 96 * 2 ** 20  # the 64 MiB, give or take pages the kernel reclaims
