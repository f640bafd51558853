"""benchmark.py --speed: a tiny CPU run, its table, last line and JSON, and its input errors."""
import json
import re
import sys
import time

import numpy as np

import pytest
import torch

import benchmark
import benchmark_speed
import sepconv


def test_speed_on_cpu_at_a_tiny_size(tmp_path, capsys):
    path = tmp_path / 'speed.json'
    assert benchmark.main(['--speed', '--device', 'cpu', '--sizes', '64x48', '--repeats', '1', '--json', str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert re.fullmatch(r'64x48 interpolation \d[\d.]*(e[+-]\d+)? fps', lines[-1])
    assert lines[0].startswith('speed on cpu: ')
    assert re.search(r'64x48: sepconv PyTorch path is \d+\.\dx as fast as the naive reference loop', out)
    results = json.loads(path.read_text())
    assert results['device'] == 'cpu' and results['kernel_size'] == 51 and results['headline'] == lines[-1]
    rows = {(row['what'], row['variant']): row for row in results['rows']}
    assert sorted(rows) == [('interpolation', 'bf16'), ('interpolation', 'fp32'),
                            ('sepconv', 'PyTorch path'), ('sepconv', 'naive reference loop')]
    for (what, variant), row in rows.items():
        assert row['size'] == '64x48' and row['repeats'] == 1
        assert row['ms'] > 0 and row['fps'] == pytest.approx(1000 / row['ms'])
        assert row['peak_fraction'] is None  # no FP32 peak is known for CPUs
        assert row['peak_mib'] is None or row['peak_mib'] >= 0
        printed = next(line for line in lines if line.startswith(f'64x48      {what:<14} {variant:<24}'))
        assert f"{row['ms']:.2f}" in printed.split()
        if what == 'sepconv':  # 2 frames x 3 channels x 51 x 51 taps x 64 x 48 pixels, 2 FLOP each
            assert row['gflops'] == pytest.approx(2 * 2 * 3 * 51 * 51 * 64 * 48 / row['ms'] / 1e6)
        else:
            assert row['gflops'] is None
    assert lines[-1] == f"64x48 interpolation {rows['interpolation', 'fp32']['fps']:.3g} fps"


def test_headline_prefers_720p():
    rows = [{'what': 'interpolation', 'variant': variant, 'size': size, 'fps': fps}
            for size, variant, fps in [('640x480', 'fp32', 2.0), ('1280x720', 'fp32', 1.25), ('1280x720', 'bf16', 3.0),
                                       ('1920x1080', 'fp32', 0.5)]]
    assert benchmark_speed.headline(rows) == '720p interpolation 1.25 fps'
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


def test_measure_gives_the_median_time_and_the_peak_memory():
    cpu = torch.device('cpu')
    durations = iter([0.01, 0.2, 0.05, 0.08])  # the first call is the warm-up, not timed
    seconds, _ = benchmark_speed.measure(lambda: time.sleep(next(durations)), cpu, 3)
    assert 0.08 <= seconds < 0.15
    seconds, memory = benchmark_speed.measure(lambda: np.ones(64 * 2 ** 20, np.uint8), cpu, 1)  # touches 64 MiB
    if sys.platform == 'linux':
        assert 60 * 2 ** 20 <= memory < 96 * 2 ** 20  # the 64 MiB, give or take pages the kernel reclaims
