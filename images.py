"""Image files and folders of frames: read as H x W x 3 uint8 RGB, written whole or not at all."""
import contextlib
import os
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cli import InputError, reason
from files import check_writable, write_file

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)  # what Pillow raises for bad files
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 339, 2
ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')


@contextlib.contextmanager
def _reading(name):
    """Pillow's errors while decoding or converting the image `name` become one InputError line."""
    try:
        yield
    except InputError:
        raise
    except UNREADABLE as error:
        raise InputError(f'cannot read image {name}: {reason(error)}') from None


def _open_image(path):
    if not os.path.exists(path):
        raise InputError(f'no such file: {path}')
    if os.path.isdir(path):
        raise InputError(f'expected an image file, got a directory: {path}')
    if os.path.getsize(path) == 0:
        raise InputError(f'image file is empty: {path}')
    try:
        with _reading(path), warnings.catch_warnings():  # a large image is check_memory's to refuse, in one line
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise InputError(f'image {path} is too large: {error}') from None
    if getattr(image, 'n_frames', 1) > 1:
        pages, kind = image.n_frames, image.format
        image.close()
        if kind == 'TIFF':  # which ffmpeg reads as one frame: no video either
            raise InputError(f'{path} is a multi-page TIFF ({pages} pages); a frame is one image: save each page '
                             'as an image of its own')
        raise InputError(f'{path} is an animation, not a still image: pass it as --video instead')
    return image


def image_size(path):
    """(width, height) of an image as viewers show it (EXIF orientation applied), from its header alone."""
    with _open_image(path) as image, _reading(path):  # EXIF can lie in a PNG's chunks, up to their damaged end
        swapped = image.getexif().get(ExifTags.Base.Orientation) in TRANSPOSING_ORIENTATIONS
        return image.size[::-1] if swapped else image.size


def check_range(values, name, top=1.0):
    """Refuse values (a numpy array or a tensor) outside [0, top]: NaN, infinities and levels of another scale."""
    low, high = float(values.min()), float(values.max())
    if low != low or high != high:
        raise InputError(f'{name} has NaN (not-a-number) values')
    if not 0 <= low <= high <= top:
        raise InputError(f'{name} has values from {low:g} to {high:g}; expected 0 to {top:g}')


def _largest_level(image, name):
    """The top of the scale of a 16-bit integer ('I;16', or 'I' from a PGM or PPM) or float ('F') image."""
    if image.mode == 'F':
        return 1.0
    if image.mode.startswith('I;16') or image.format == 'PPM':  # Pillow reads a PPM of over 8 bits as 16-bit 'I'
        return 65535
    raise InputError(f'cannot read image {name}: 32-bit integer samples are not supported (save it with 8 or 16 bits)')


def _grey_levels(image, name):
    """A 16-bit integer or float grey image as 8-bit levels, scaled by the top of its own scale."""
    top = _largest_level(image, name)
    values = np.asarray(image, dtype=np.float64)
    check_range(values, f'image {name}', top)
    return (values * (255.0 / top)).round().astype(np.uint8)


def image_array(image, name):
    """H x W x 3 uint8 RGB of a PIL image at its real depth: integers scaled by the top of their scale, float
    ('F') images taken as 0 to 1, alpha composited on white; signed samples and other scales are refused."""
    if TIFF_SIGNED in np.ravel(getattr(image, 'tag_v2', {}).get(TIFF_SAMPLE_FORMAT, ())):
        raise InputError(f'cannot read image {name}: signed integer samples have no display range')
    with _reading(name):
        if image.mode == 'F' or image.mode.startswith('I'):
            image = Image.fromarray(_grey_levels(image, name))
        if image.mode in ALPHA_MODES or 'transparency' in image.info:
            image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))
        return np.asarray(image.convert('RGB'))


def read_image(path):
    """H x W x 3 uint8 RGB, upright as viewers show it, every depth and kind converted by image_array."""
    with _open_image(path) as image, _reading(path):
        ImageOps.exif_transpose(image, in_place=True)  # in place, the file's depth and format stay known
        return image_array(image, path)


def check_image_output(path):
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        raise InputError(f"unsupported output image type '{path}' (use one of {', '.join(IMAGE_EXTENSIONS)})")
    check_writable(path)


def save_image(path, array, output):
    """Save to `path`; failing (a full disk, ...) is an InputError about `output`, the path the user gave."""
    try:
        Image.fromarray(array).save(path)
    except OSError as error:
        raise InputError(f'cannot write {output}: {error.strerror or reason(error)}') from None


def write_image(path, array):
    write_file(path, Image.fromarray(array).save)


def natural_key(name):
    """Sort key putting frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r'(\d+)', name)]


def frame_paths(folder):
    """The images in `folder` (hidden files skipped), in natural name order."""
    names = [name for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]
