"""Paths as the operating system resolves them, and outputs written whole or not at all.

A symlink, dangling or not, leads to its target: that is what is read or written. Folders are read whole (one
that cannot be listed, or a dangling link, is an error), and ffmpeg is told every path as a file. check_writable
decides before any work whether an output can be written; commit decides again with the same function at the
end, and is the one place that renames a complete temporary (beside the target, on its file system) onto it:
a kill, a full disk or an error leaves the target as it was. A target that is not a regular file (a device, a
FIFO, a descriptor of the process such as /dev/stdout) is never replaced, and no output is ever one of the
inputs. Temporaries carry their writer's process id: those of a dead writer are removed when the target is
written next."""
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile

from cli import InputError, reason

TEMPORARY_PREFIX, MAX_EXTENSION = '.sepconv-', 16  # '.sepconv-' + target tag + pid + random characters + extension
MAX_LINKS = 40  # as Linux follows at most 40 symlinks in one lookup
DESCRIPTOR_FOLDER = re.compile(r'/proc/\d+(/task/\d+)?/fd|/dev/fd')


def resolve(path):
    """The absolute path a write to `path` reaches, every symlink followed (a dangling one to the file it would
    create), and whether it is a descriptor of this process (/dev/stdout, /proc/self/fd/1)."""
    path = os.path.abspath(path)
    for _ in range(MAX_LINKS):
        folder = os.path.realpath(os.path.dirname(path))
        path = os.path.join(folder, os.path.basename(path))
        if DESCRIPTOR_FOLDER.fullmatch(folder):
            return path, True
        if not os.path.islink(path):
            return path, False
        path = os.path.join(folder, os.readlink(path))
    raise InputError(f'cannot write {path}: {os.strerror(errno.ELOOP)}')


def listing(folder, what):
    """The names in `folder`, hidden ones skipped, sorted; a folder that cannot be read is an error, not an
    empty one."""
    try:
        return sorted(name for name in os.listdir(folder) if not name.startswith('.'))
    except OSError as error:
        raise InputError(f'cannot read {what} {folder}: {error.strerror}') from None


def check_link(path):
    """Refuse a dangling symlink, which a test for a file or a folder would take for nothing at all."""
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f'{path} is a dangling link (to {os.readlink(path)})')


def ffmpeg_path(path):
    """`path` as ffmpeg must be told it: a name such as 'http:/clip.mp4' or '-x.mp4' is a file too."""
    return 'file:' + os.path.abspath(path)


KINDS = ((stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'), (stat.S_ISFIFO, 'a FIFO'),
         (stat.S_ISSOCK, 'a socket'), (stat.S_ISDIR, 'a folder'))


def _kind(path):
    """What is at `path`: None (nothing), 'a regular file', 'a folder', 'a FIFO', ..."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there that can be seen: what the folder's checks find says why
        return None
    return next((name for test, name in KINDS if test(mode)), 'a regular file')


def _same_file(one, two):
    return os.path.abspath(one) == os.path.abspath(two) or (
        os.path.exists(one) and os.path.exists(two) and os.path.samefile(one, two))


def check_not_an_input(output, inputs):
    """Refuse an output that is one of `inputs` (None for an input not given), by any path or link."""
    target = resolve(output)[0]
    for path in filter(None, inputs):
        if _same_file(output, path) or _same_file(target, path):
            raise InputError(f'output {output} would overwrite an input: {path}')


def check_folder(folder):
    """Create `folder` (through a dangling link, its target) and make sure a file can be created in it: by
    creating one (root, read-only file systems and access lists all answer truly)."""
    folder = resolve(folder)[0]
    try:
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise InputError(f'cannot create output folder {folder}: {error.strerror}') from None
    try:
        handle, probe = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=folder)
    except OSError as error:
        raise InputError(f'output folder is not writable: {folder} ({error.strerror})') from None
    os.close(handle)
    os.remove(probe)


def check_writable(path, inputs=(), folder=False):
    """Decide whether `path` can be written (a file, or with `folder` a folder of files), before any work:
    refused when it is one of `inputs`, not a regular file (or with `folder`, not an empty folder), its name
    too long, or its folder cannot be created or written. Returns the target the path leads to."""
    target, descriptor = resolve(path)
    if not folder and path.endswith(('/', os.sep)):
        raise InputError(f'output path is a directory: {path}')
    if descriptor:
        raise InputError(f'output {path} is a descriptor of this process, not a file: give a file name')
    check_not_an_input(path, inputs)
    kind = _kind(target)
    if folder and kind == 'a folder':
        remove_stale(target, os.path.basename(target))
        if _foreign_entries(target):
            raise InputError(f'output folder is not empty: {path}')
        check_folder(target)
        return target
    if kind == 'a folder':
        raise InputError(f'output path is a directory: {path}')
    if kind not in (None, 'a regular file'):
        raise InputError(f'output {path} is {kind}, not a {"folder" if folder else "regular file"}; '
                         'it is never replaced')
    if folder and kind:
        raise InputError(f'output {path} exists and is not a folder')
    parent, name = os.path.split(target)
    check_folder(parent)
    longest = _longest_name(parent)
    if len(os.fsencode(name)) > longest:
        raise InputError(f'output name is too long: {len(os.fsencode(name))} bytes, at most {longest} in {parent}')
    return target


def _own_prefix(name):
    return f'{TEMPORARY_PREFIX}{_tag(name)}-{os.getpid()}-'


def _foreign_entries(folder):
    """What `folder` holds besides this process's temporaries for it."""
    own = _own_prefix(os.path.basename(folder))
    return [entry for entry in os.listdir(folder) if not entry.startswith(own)]


def _longest_name(folder):
    try:
        return os.pathconf(folder, 'PC_NAME_MAX')
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the file system does not say
        return 255


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tag(name):
    """8 characters naming a target among the temporaries of its folder."""
    return hashlib.sha1(os.fsencode(name)).hexdigest()[:8]


def _start_time(pid):
    """When process `pid` started (seconds since the epoch), None where /proc does not say."""
    try:
        with open(f'/proc/{pid}/stat') as file:
            ticks = int(file.read().rsplit(')', 1)[1].split()[19])
        with open('/proc/stat') as file:
            boot = int(re.search(r'^btime (\d+)', file.read(), re.MULTILINE)[1])
    except (OSError, ValueError, IndexError, TypeError):
        return None
    return boot + ticks / os.sysconf('SC_CLK_TCK')


def _stale(path, pid):
    """True when the writer of the temporary `path` is provably gone: its process is dead, or the process now
    holding its id started after the temporary was last written."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _start_time(pid)
    try:
        return started is not None and os.lstat(path).st_mtime < started - 1
    except OSError:
        return False


def remove_stale(folder, name):
    """Remove the temporaries that dead writers left in `folder` for the target `name`."""
    pattern = re.compile(re.escape(f'{TEMPORARY_PREFIX}{_tag(name)}-') + r'(\d+)-')
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry)
        path = os.path.join(folder, entry)
        if match and _stale(path, int(match[1])):
            discard(path)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def temporary_beside(path, folder=False):
    """A hidden temporary file (with the extension of `path`, which picks the format) or folder for the target
    `path` leads to, to be put there by `commit`, with the mode a new file or folder would get (mkstemp and
    mkdtemp make them private). It lies beside the target, or inside it for a folder that exists (an empty mount
    point included), on the target's file system. Its name is short, so that any name legal for `path` works."""
    target = resolve(path)[0]
    parent, name = os.path.split(target)
    if folder and os.path.isdir(target):
        parent = target
    remove_stale(parent, name)
    prefix = _own_prefix(name)
    if folder:
        temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
        os.chmod(temporary, 0o777 & ~_umask())
        return temporary
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=extension(path)[:MAX_EXTENSION], dir=parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())
    return temporary


def extension(name):
    """The extension of a file name, a hidden one's too ('.mp4' is a video named '.mp4')."""
    return os.path.splitext('_' + os.path.basename(name))[1]


def _move(source, destination):
    os.replace(source, destination)


def commit(temporary, path):
    """Put the complete `temporary` (from temporary_beside) where `path` leads, after deciding again, as
    check_writable did: a file is renamed onto its target; a folder's files move into the target folder when
    it exists (it keeps its mode, owner and mount), else the folder is renamed to it."""
    folder = os.path.isdir(temporary)
    target = check_writable(path, folder=folder)
    try:
        if folder and os.path.isdir(target):
            for entry in sorted(os.listdir(temporary)):
                _move(os.path.join(temporary, entry), os.path.join(target, entry))
            os.rmdir(temporary)
        else:
            _move(temporary, target)
    except OSError as error:
        raise InputError(f'cannot write {path}: {error.strerror}') from None


def discard(temporary):
    """Remove a temporary file or folder, whatever is left of it."""
    if os.path.isdir(temporary):
        shutil.rmtree(temporary, ignore_errors=True)
    else:
        _remove(temporary)


def write_file(path, save):
    """Write `path` whole or not at all: save(temporary) fills a temporary file beside its target, committed
    once complete; an OSError (a full disk, ...) becomes an InputError."""
    check_writable(path)
    try:
        temporary = temporary_beside(path)
    except OSError as error:
        raise InputError(f'cannot write {path}: {error.strerror}') from None
    try:
        save(temporary)
        commit(temporary, path)
    except OSError as error:
        raise InputError(f'cannot write {path}: {error.strerror or reason(error)}') from None
    finally:
        discard(temporary)


class _Recording:
    """A binary file that keeps the OSError of a failed write, which some writers (torch's zip writer)
    replace with a RuntimeError of their own that does not say why."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def write_stream(path, save):
    """write_file for writers of binary file objects: save(file)."""
    def fill(temporary):
        with open(temporary, 'wb') as file:
            recording = _Recording(file)
            try:
                save(recording)
            except Exception:
                if recording.error is None:
                    raise
                raise recording.error from None
    write_file(path, fill)


def append(path, text):
    """Append `text` to the log `path`; failing (a full disk, ...) is an InputError."""
    try:
        with open(path, 'a', newline='') as file:
            file.write(text)
    except OSError as error:
        raise InputError(f'cannot write {path}: {error.strerror}') from None


@contextlib.contextmanager
def lock(folder):
    """Hold `folder` for one run: a second run that asks for it meanwhile is refused. The lock is the kernel's
    (flock on the folder itself): it leaves no file behind and ends with the process, however it ends."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f'{folder} is in use by another run') from None
        yield
    finally:
        os.close(handle)


def is_within(path, folder):
    """Whether `path` is `folder` or lies inside it, as the OS resolves both."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def strict(content):
    """`content` with its non-finite numbers as None, since JSON has no NaN or Infinity (equal images have an
    infinite PSNR)."""
    if isinstance(content, dict):
        return {key: strict(value) for key, value in content.items()}
    return None if isinstance(content, float) and not math.isfinite(content) else content


def write_json(path, content):
    text = json.dumps(strict(content), indent=2, allow_nan=False)
    write_stream(path, lambda file: file.write(text.encode()))
