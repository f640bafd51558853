"""Frames in and out: reading and atomically writing images, and scene-cut detection."""
import os
import tempfile

import numpy as np
from PIL import Image, UnidentifiedImageError

from model import InputError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
SCENE_CUT_THRESHOLD = 0.5  # histogram distance in [0, 1] between consecutive frames


def read_image(path):
    """H x W x 3 uint8 RGB; grayscale, palette, alpha and 16-bit images are converted."""
    if not os.path.exists(path):
        raise InputError(f'no such file: {path}')
    if os.path.isdir(path):
        raise InputError(f'expected an image file, got a directory: {path}')
    if os.path.getsize(path) == 0:
        raise InputError(f'image file is empty: {path}')
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                array = np.asarray(image, dtype=np.float64)
                image = Image.fromarray((array / (65535.0 if array.max() > 255 else 255.0) * 255.0).round()
                                        .clip(0, 255).astype(np.uint8))
            if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
                image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))
            return np.asarray(image.convert('RGB'))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f'cannot read image {path}: {str(error).splitlines()[0] or type(error).__name__}') from None
    except Image.DecompressionBombError as error:
        raise InputError(f'image {path} is too large: {error}') from None


def check_writable(path):
    """Create the folder that will hold `path` and make sure a file can be written there."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise InputError(f'cannot create output folder {folder}: {error.strerror}') from None
    if os.path.isdir(path):
        raise InputError(f'output path is a directory: {path}')
    if not os.access(folder, os.W_OK):
        raise InputError(f'output folder is not writable: {folder}')


def check_image_output(path):
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        raise InputError(f"unsupported output image type '{path}' (use one of {', '.join(IMAGE_EXTENSIONS)})")
    check_writable(path)


def atomic_output(path):
    """A temporary path beside `path` (same extension) to write to and then os.replace onto it."""
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f'.{name}.', suffix=os.path.splitext(name)[1], dir=folder)
    os.close(handle)
    return temporary


def write_image(path, array):
    temporary = atomic_output(path)
    try:
        Image.fromarray(array).save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def color_histogram(frame, bins=32):
    """Normalised per-channel histogram of an H x W x 3 uint8 frame (subsampled for speed)."""
    step = max(1, min(frame.shape[:2]) // 128)
    pixels = frame[::step, ::step].reshape(-1, 3)
    return np.stack([np.bincount(pixels[:, c] // (256 // bins), minlength=bins) for c in range(3)]) / len(pixels)


def scene_cut(one, two, threshold=SCENE_CUT_THRESHOLD):
    """True when two uint8 frames belong to different shots: half the L1 distance between their
    colour histograms, averaged over channels, exceeds `threshold` (0 = same colours, 1 = disjoint)."""
    distance = 0.5 * np.abs(color_histogram(one) - color_histogram(two)).sum(1).mean()
    return distance > threshold
