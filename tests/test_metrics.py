"""metrics.py on cases computed by hand."""
import math

import numpy as np
import pytest

import metrics


def image(level=100, height=48, width=64):
    return np.full((height, width, 3), level, np.uint8)


def test_equal_images():
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert metrics.psnr(texture, texture) == math.inf
    assert metrics.interpolation_error(texture, texture) == 0
    assert metrics.ssim(texture, texture) == pytest.approx(1, abs=1e-12)
    assert metrics.ssim_volume(texture, texture) == pytest.approx(1, abs=1e-12)


def test_one_pixel_off():
    truth, estimate = image(), image()
    estimate[10, 20, 1] += 51  # 64 x 48 x 3 = 9216 values, one of them off by 51 levels
    assert metrics.psnr(truth, estimate) == pytest.approx(10 * math.log10(255 ** 2 * 9216 / 51 ** 2), abs=1e-9)
    assert metrics.psnr(truth, estimate) == pytest.approx(53.6248, abs=1e-4)  # 10 log10(230400)
    assert metrics.interpolation_error(truth, estimate) == pytest.approx(51 / 9216, abs=1e-12)
    assert metrics.interpolation_error(estimate, truth) == metrics.interpolation_error(truth, estimate)


def test_ssim_of_constant_images():
    """Without variance SSIM is its luminance term alone, (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 255)^2."""
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 60 + c1) / (100 ** 2 + 60 ** 2 + c1)
    assert expected == pytest.approx(0.882409, abs=1e-6)
    assert metrics.ssim(image(100), image(60)) == pytest.approx(expected, abs=1e-9)
    assert metrics.ssim_volume(image(100), image(60)) == pytest.approx(expected, abs=1e-9)


def test_volume_ssim_of_one_bright_pixel():
    """A black truth and one white pixel in the middle channel: with window weight w at a position, the
    estimate's mean there is w, its variance w - w^2, the truth's 0, so SSIM = C1 C2 / ((w^2 + C1)(w - w^2 + C2)).
    w is the Gaussian (11 taps, sigma 1.5) along y and x times, along the channels, the one tap through which
    each output channel reads channel 1 once the three are extended by repeating their edges: the centre tap
    for channel 1, its neighbours for channels 0 and 2 (the taps beyond read the edge channels)."""
    truth, estimate = image(0, 32, 32), image(0, 32, 32)
    estimate[16, 16, 1] = 255
    taps = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    taps /= taps.sum()
    channel = [taps[6], taps[5], taps[4]]  # output channel k reads input channel 1 through tap 5 + 1 - k
    weights = np.zeros((32, 32, 3))
    weights[11:22, 11:22] = np.outer(taps, taps)[..., None] * channel
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = np.mean(c1 * c2 / ((weights ** 2 + c1) * (weights - weights ** 2 + c2)))
    assert metrics.ssim_volume(truth, estimate) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.95843, abs=1e-5)  # one pixel of 1024 dents 363 window positions
    assert metrics.ssim(truth, estimate) != pytest.approx(expected, rel=1e-3)  # the other SSIM differs


def test_quantise_rounds_or_truncates_after_clipping():
    levels = np.array([-3.0, 0.49, 126.5, 127.5, 254.6, 300.0], np.float32)
    assert metrics.quantise(levels, 'round').tolist() == [0, 0, 126, 128, 255, 255]  # halves to even, as numpy
    assert metrics.quantise(levels, 'truncate').tolist() == [0, 0, 126, 127, 254, 255]
