"""precision.py: bf16 where the device computes it natively, fp32 elsewhere, decided both ways."""
import pytest
import torch

import precision


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU reports: cpu(flags=..., speedup=...) with the per-process cache cleared."""
    def configure(flags, speedup):
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: flags)
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
        monkeypatch.setattr(precision, 'bf16_convolution_speedup', lambda: speedup)
        precision.cpu_has_native_bf16.cache_clear()
    yield configure
    precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize('flags, speedup, expected', [
    (False, 2.0, 'fp32'),   # an AVX2-only CPU: no probe can make it native
    (True, 0.02, 'fp32'),   # AMX reported, but oneDNN held below it (ONEDNN_MAX_CPU_ISA=AVX2): emulated
    (True, 1.6, 'bf16'),    # AMX in use
])
def test_auto_is_bf16_only_where_native(cpu, flags, speedup, expected):
    cpu(flags, speedup)
    assert precision.native('cpu') == precision.resolve('auto', torch.device('cpu')) == expected
    assert precision.native('cuda') == 'bf16'


def test_explicit_bf16_without_native_support_runs_after_a_notice(cpu, capsys):
    cpu(False, 0.02)
    assert precision.resolve('bf16', 'cpu') == 'bf16'
    err = capsys.readouterr().err
    assert err.startswith('notice: this CPU has no native bf16') and err.count('\n') == 1
    cpu(True, 1.6)
    assert precision.resolve('bf16', 'cpu') == 'bf16' and capsys.readouterr().err == ''
    assert precision.resolve('fp32', 'cpu') == 'fp32'


def test_the_probe_measures_a_real_ratio():
    speedup = precision.bf16_convolution_speedup()
    assert 0.001 < speedup < 100
