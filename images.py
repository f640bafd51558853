"""Image files and folders of frames: read as H x W x 3 uint8 RGB, written whole or not at all."""
import os
import re
import tempfile

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cli import InputError, reason

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError)  # what Pillow raises for bad files
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _open_image(path):
    if not os.path.exists(path):
        raise InputError(f'no such file: {path}')
    if os.path.isdir(path):
        raise InputError(f'expected an image file, got a directory: {path}')
    if os.path.getsize(path) == 0:
        raise InputError(f'image file is empty: {path}')
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise InputError(f'image {path} is too large: {error}') from None
    except UNREADABLE as error:
        raise InputError(f'cannot read image {path}: {reason(error)}') from None
    if getattr(image, 'n_frames', 1) > 1:
        image.close()
        raise InputError(f'{path} is an animation, not a still image: pass it as --video instead')
    return image


def image_size(path):
    """(width, height) of an image as viewers show it (EXIF orientation applied), from its header alone."""
    with _open_image(path) as image:
        try:
            swapped = image.getexif().get(ExifTags.Base.Orientation) in TRANSPOSING_ORIENTATIONS
        except UNREADABLE as error:  # reading EXIF can mean reading a PNG's chunks to their damaged end
            raise InputError(f'cannot read image {path}: {reason(error)}') from None
        return image.size[::-1] if swapped else image.size


def read_image(path):
    """H x W x 3 uint8 RGB, upright as viewers show it; grayscale, palette, alpha and 16-bit images are converted."""
    try:
        with _open_image(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                array = np.asarray(image, dtype=np.float64)
                image = Image.fromarray((array / (65535.0 if array.max() > 255 else 255.0) * 255.0).round()
                                        .clip(0, 255).astype(np.uint8))
            if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
                image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))
            return np.asarray(image.convert('RGB'))
    except UNREADABLE as error:
        raise InputError(f'cannot read image {path}: {reason(error)}') from None


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


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path, folder=False):
    """A hidden temporary file (same extension) or folder beside `path`, to be renamed onto it when complete,
    with the mode a new file or folder would get (mkstemp and mkdtemp make them private)."""
    parent, name = os.path.split(os.path.abspath(path))
    if folder:
        temporary = tempfile.mkdtemp(prefix=f'.{name}.', dir=parent)
        os.chmod(temporary, 0o777 & ~_umask())
        return temporary
    handle, temporary = tempfile.mkstemp(prefix=f'.{name}.', suffix=os.path.splitext(name)[1], dir=parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())
    return temporary


def save_image(path, array, output):
    """Save to `path`; failing (a full disk, ...) is an InputError about `output`, the path the user gave."""
    try:
        Image.fromarray(array).save(path)
    except OSError as error:
        raise InputError(f'cannot write {output}: {error.strerror or reason(error)}') from None


def write_file(path, save):
    """Write `path` whole or not at all: save(temporary) fills a temporary file beside it, renamed onto it once
    complete; an OSError (a full disk, ...) becomes an InputError."""
    temporary = temporary_beside(path)
    try:
        save(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise InputError(f'cannot write {path}: {error.strerror or reason(error)}') from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
