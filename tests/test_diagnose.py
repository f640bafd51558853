"""diagnose.py: the constant-kernel share and the figures beside the Middlebury mean, on a network whose
answer is known (the blend, whatever the input)."""
import os

import pytest
import torch
from PIL import Image

import diagnose
from model import Network


def blend_network(**options):
    """Every head's kernel is the centre tap sqrt(0.5), whatever the input: 0.5 * one + 0.5 * two."""
    network = Network(**options).eval()
    with torch.no_grad():
        for name in diagnose.HEADS:
            last = getattr(network, name)[-1]
            last.weight.zero_()
            last.bias.zero_()
            last.bias[25] = 0.5 ** 0.5
    return network


@pytest.mark.parametrize('bias, share', [(-100.0, 1.0), (100.0, 0.0)])
def test_constant_share_counts_pixels_with_every_unit_off(bias, share):
    network = Network().eval()
    with torch.no_grad():
        for name in diagnose.HEADS:
            getattr(network, name)[4].bias.fill_(bias)
    frame = torch.rand(32, 48, 3).numpy()
    assert diagnose.constant_share(network, frame, frame) == share


def test_the_blend_is_diagnosed_as_the_blend(middlebury, tmp_path):
    for sequence in ('Dimetrodon', 'Venus'):
        (tmp_path / sequence).mkdir()
        for name in ('frame10', 'frame11', 'frame10i11'):
            Image.open(os.path.join(middlebury, sequence, f'{name}.png')).crop((0, 0, 96, 64)).save(
                tmp_path / sequence / f'{name}.png')
    figures = diagnose.diagnose(blend_network(), str(tmp_path))
    assert set(figures['sequences']) == {'Dimetrodon', 'Venus'}
    # sqrt(0.5) ** 2 is a hair under 0.5 in float32: truncation then drops a level where one + two is even
    assert figures['middlebury_psnr'] == pytest.approx(figures['blend_psnr'], abs=0.2)
    assert abs(figures['worst_gain']) < 0.2
    assert figures['identical_min'] == figures['identical_noise'] == 100.0
    assert figures['black_white_grey'] == pytest.approx(0.5, abs=0.6 / 255)
    assert figures['constant_pixels'] == 0.0  # default init: units on; the kernels ignore them all the same
