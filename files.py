"""Files written whole or not at all: checks before any work, a temporary file or folder beside the
target, renamed onto it once complete (a kill, a full disk or an error leaves the target as it was)."""
import json
import math
import os
import tempfile

from cli import InputError, reason

TEMPORARY_PREFIX, MAX_EXTENSION = '.sepconv-', 16  # temporary names: '.sepconv-' + 8 random characters + extension


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
    name, longest = os.fsencode(os.path.basename(os.path.abspath(path))), _longest_name(folder)
    if len(name) > longest:
        raise InputError(f'output name is too long: {len(name)} bytes, at most {longest} in {folder}')


def _longest_name(folder):
    try:
        return os.pathconf(folder, 'PC_NAME_MAX')
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the file system does not say
        return 255


def _same_file(one, two):
    return os.path.abspath(one) == os.path.abspath(two) or (
        os.path.exists(one) and os.path.exists(two) and os.path.samefile(one, two))


def check_not_an_input(output, inputs):
    """Refuse an output that is one of `inputs` (None for an input not given), by any path or link."""
    for path in filter(None, inputs):
        if _same_file(output, path):
            raise InputError(f'output {output} would overwrite an input: {path}')


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path, folder=False):
    """A hidden temporary file (same extension, which picks the format) or folder beside `path`, to be renamed
    onto it when complete, with the mode a new file or folder would get (mkstemp and mkdtemp make them private).
    Its name is short, so that any name legal for `path` works."""
    parent, name = os.path.split(os.path.abspath(path))
    if folder:
        temporary = tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, dir=parent)
        os.chmod(temporary, 0o777 & ~_umask())
        return temporary
    extension = os.path.splitext(name)[1][:MAX_EXTENSION]
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=extension, dir=parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())
    return temporary


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


def strict(content):
    """`content` with its non-finite numbers as None, since JSON has no NaN or Infinity (equal images have an
    infinite PSNR)."""
    if isinstance(content, dict):
        return {key: strict(value) for key, value in content.items()}
    return None if isinstance(content, float) and not math.isfinite(content) else content


def write_json(path, content):
    def save(temporary):
        with open(temporary, 'w') as file:
            json.dump(strict(content), file, indent=2, allow_nan=False)
    write_file(path, save)
