"""Frame-interpolation metrics on H x W x 3 uint8 images (truth first), each written once.

psnr and interpolation_error compare the levels as they are; ssim is scikit-image's (7 x 7 uniform window per
channel), ssim_volume the one of RIFE, IFRNet and EMA-VFI's benchmarks (often called "MATLAB-style"): an
11 x 11 x 11 Gaussian window (sigma 1.5) over the image as one volume, the three channels as its third axis,
each axis extended by repeating its edge."""
import math

import numpy as np
import scipy.ndimage
import skimage.metrics

LEVELS = 255
SSIM_WINDOW = 7  # scikit-image's default: frames need at least 7 x 7 pixels
VOLUME_WINDOW, VOLUME_SIGMA = 11, 1.5


def quantise(levels, mode):
    """A float image on the 0-255 scale as uint8: clipped, then rounded to the nearest level or truncated."""
    levels = np.clip(levels, 0, LEVELS)
    return (np.round(levels) if mode == 'round' else levels).astype(np.uint8)


def psnr(truth, estimate):
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf for equal images."""
    error = np.mean((truth.astype(np.float64) - estimate) ** 2)
    return math.inf if error == 0 else float(10 * np.log10(LEVELS ** 2 / error))


def interpolation_error(truth, estimate):
    """Mean absolute difference in levels, over all pixels and channels."""
    return float(np.mean(np.abs(truth.astype(np.float64) - estimate)))


def ssim(truth, estimate):
    """scikit-image's SSIM over the three channels, data range 255."""
    return float(skimage.metrics.structural_similarity(truth, estimate, data_range=LEVELS, channel_axis=2))


def _gaussian_taps():
    taps = np.exp(-(np.arange(VOLUME_WINDOW) - VOLUME_WINDOW // 2) ** 2 / (2 * VOLUME_SIGMA ** 2))
    return taps / taps.sum()


def _volume_mean(volume):
    taps = _gaussian_taps()
    for axis in range(3):
        volume = scipy.ndimage.correlate1d(volume, taps, axis=axis, mode='nearest')
    return volume


def ssim_volume(truth, estimate):
    """SSIM with one Gaussian window over height, width and channel, edges repeated (see the module's text)."""
    one, two = truth.astype(np.float64) / LEVELS, estimate.astype(np.float64) / LEVELS
    mu1, mu2 = _volume_mean(one), _volume_mean(two)
    var1, var2 = _volume_mean(one * one) - mu1 ** 2, _volume_mean(two * two) - mu2 ** 2
    covariance = _volume_mean(one * two) - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ratio = (2 * mu1 * mu2 + c1) * (2 * covariance + c2) / ((mu1 ** 2 + mu2 ** 2 + c1) * (var1 + var2 + c2))
    return float(ratio.mean())


SSIMS = {'skimage': ssim, 'volume': ssim_volume}
