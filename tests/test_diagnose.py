"""diagnose.py: the constant-kernel share and the figures beside the Middlebury mean, on a network whose
answer is known (the blend, whatever the input)."""
import os

import numpy as np
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
@pytest.mark.parametrize('slope', [None, -0.5])  # a PReLU's negative slope: off units give positive outputs
def test_constant_share_counts_pixels_with_every_unit_off(bias, share, slope):
    network = Network(head_prelu=slope is not None).eval()
    with torch.no_grad():
        for name in diagnose.HEADS:
            getattr(network, name)[4].bias.fill_(bias)
            if slope is not None:
                getattr(network, name)[5].weight.fill_(slope)
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
    assert figures['kernel_mass_median'] == pytest.approx(1.0, abs=1e-6) and figures['kernel_mass_under_floor'] == 0
    assert set(figures['shifted']) == {f'{2 * shift}px' for shift in diagnose.SHIFTS}
    for row in figures['shifted'].values():
        assert row['gain'] == pytest.approx(0.0, abs=0.2) and row['followed'] == pytest.approx(0.0, abs=1e-5)
    assert 'shifted 2px +0.0' in diagnose.summary_line(figures)


@pytest.mark.parametrize('scales, mass, under', [((1, 1, 1, 1), 1.0, 0.0), ((1, 2, 0.5, 0.5), 1.125, 0.0),
                                                  ((0.05, 0.05, 0.05, 0.05), 0.0025, 1.0)])
def test_kernel_mass_is_what_kernel_normalization_divides_by(scales, mass, under):
    """Centre taps of sqrt(0.5) times each head's scale (HEADS order): a mass of
    0.5 * (v1 * h1 + v2 * h2) on every pixel of the frame."""
    network = blend_network()
    with torch.no_grad():
        for name, scale in zip(diagnose.HEADS, scales):
            getattr(network, name)[-1].bias.mul_(scale)
        one, two = torch.rand(2, 40, 72, 3).numpy()
        found = diagnose.kernel_mass(network, one, two)
    assert found.shape == (40 * 72,)
    torch.testing.assert_close(found, torch.full_like(found, mass))
    assert float((found.abs() < diagnose.MASS_FLOOR).float().mean()) == under


def shifting_network(shift):
    """Constant kernels that sample one `shift` px to the right and two `shift` px to the left of each pixel:
    the exact middle of diagnose.shifted_pair(frame, shift), whatever the frame."""
    network = blend_network()
    with torch.no_grad():
        for name, tap in (('netHorizontal1', 25 + shift), ('netHorizontal2', 25 - shift)):
            last = getattr(network, name)[-1]
            last.bias.zero_()
            last.bias[tap] = 0.5 ** 0.5
    return network


@pytest.mark.parametrize('shift', diagnose.SHIFTS)
def test_shifted_pairs_tell_kernels_that_follow_the_motion_from_the_blend(middlebury, shift):
    frame = np.asarray(Image.open(os.path.join(middlebury, 'Urban2', 'frame10.png')).convert('RGB'))[:64, :100]
    one, middle, two = diagnose.shifted_pair(frame, shift)
    assert one.shape == middle.shape == two.shape == (64, 100 - 2 * shift, 3)
    assert np.array_equal(one[:, shift:], middle[:, :-shift]) and np.array_equal(two[:, :-shift], middle[:, shift:])
    with torch.no_grad():
        estimate, followed = diagnose.follow(shifting_network(shift), one, middle, two, shift)
        assert followed == pytest.approx(1.0, abs=1e-5)
        assert diagnose.follow(blend_network(), one, middle, two, shift)[1] == pytest.approx(0.0, abs=1e-5)
    assert np.abs(estimate[:, shift:-shift].astype(int) - middle[:, shift:-shift]).max() <= 1
