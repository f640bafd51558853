"""Frames in and out: images, frame folders and videos (streamed through ffmpeg), scene cuts, memory
checks, and `interpolate_video`, which raises a video's frame rate with SepConv in constant memory."""
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction

try:
    import imageio_ffmpeg
except ImportError:  # videos then need OpenCV (train.py falls back to it); images and folders still work
    imageio_ffmpeg = None
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from model import PADDINGS, InputError, estimate, load_network, resolve_device

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.mov')  # written as H.264 (libx264)
FOLDER_FPS = Fraction(25)  # frame folders carry no frame rate; they count as 25 fps
SCENE_CUT_THRESHOLD = 0.3  # median over a 4 x 4 grid of blocks of the colour-histogram distance, in [0, 1]
SCENE_CUT_GRID = 4
SCENE_CUT_LEVELS = 4  # per RGB channel, so 64 colour bins per block
NETWORK_BYTES_PER_PIXEL = 2200  # peak memory per padded pixel of one pair in the network (measured on CPU)


def notice(message):
    print(f'notice: {message}', file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Images

def _open_image(path):
    if not os.path.exists(path):
        raise InputError(f'no such file: {path}')
    if os.path.isdir(path):
        raise InputError(f'expected an image file, got a directory: {path}')
    if os.path.getsize(path) == 0:
        raise InputError(f'image file is empty: {path}')
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f'cannot read image {path}: {str(error).splitlines()[0] or type(error).__name__}') from None
    except Image.DecompressionBombError as error:
        raise InputError(f'image {path} is too large: {error}') from None


def image_size(path):
    """(width, height) of an image, from its header alone."""
    with _open_image(path) as image:
        return image.size


def read_image(path):
    """H x W x 3 uint8 RGB; grayscale, palette, alpha and 16-bit images are converted."""
    try:
        with _open_image(path) as image:
            image.load()
            if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                array = np.asarray(image, dtype=np.float64)
                image = Image.fromarray((array / (65535.0 if array.max() > 255 else 255.0) * 255.0).round()
                                        .clip(0, 255).astype(np.uint8))
            if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
                image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))
            return np.asarray(image.convert('RGB'))
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f'cannot read image {path}: {str(error).splitlines()[0] or type(error).__name__}') from None


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
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it a new file's usual mode
    return temporary


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_image(path, array):
    temporary = atomic_output(path)
    try:
        Image.fromarray(array).save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def natural_key(name):
    """Sort key putting frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r'(\d+)', name)]


def frame_paths(folder):
    """The images in `folder` (hidden files skipped), in natural name order."""
    names = [name for name in os.listdir(folder)
             if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


# ---------------------------------------------------------------------------------------------
# Scene cuts

def block_histograms(frame):
    """Normalised joint RGB histograms (SCENE_CUT_LEVELS^3 bins) of the SCENE_CUT_GRID^2 blocks of an
    H x W x 3 uint8 frame, subsampled to about 128 pixels on the short side; empty blocks are dropped."""
    step = max(1, min(frame.shape[:2]) // 128)
    small = frame[::step, ::step].astype(np.int64) * SCENE_CUT_LEVELS // 256
    colour = (small[..., 0] * SCENE_CUT_LEVELS + small[..., 1]) * SCENE_CUT_LEVELS + small[..., 2]
    rows = np.arange(small.shape[0]) * SCENE_CUT_GRID // small.shape[0]
    columns = np.arange(small.shape[1]) * SCENE_CUT_GRID // small.shape[1]
    block = rows[:, None] * SCENE_CUT_GRID + columns[None, :]
    bins = SCENE_CUT_LEVELS ** 3
    counts = np.bincount((block * bins + colour).ravel(), minlength=SCENE_CUT_GRID ** 2 * bins).reshape(-1, bins)
    counts = counts[counts.sum(1) > 0]
    return counts / counts.sum(1, keepdims=True)


def scene_distance(one, two):
    """Median over the blocks of half the L1 distance between the two frames' block colour histograms:
    0 for the same colours, 1 for disjoint ones. Motion changes a few blocks; a cut changes most."""
    return float(np.median(0.5 * np.abs(block_histograms(one) - block_histograms(two)).sum(1)))


def scene_cut(one, two, threshold=SCENE_CUT_THRESHOLD):
    """True when two uint8 frames belong to different shots (scene_distance above `threshold`)."""
    return scene_distance(one, two) > threshold


# ---------------------------------------------------------------------------------------------
# Memory

def network_memory(width, height, padding='paper', pairs=1):
    """Bytes the network needs for `pairs` frame pairs of this size (padded as model.estimate pads)."""
    border = 50 if padding == 'paper' else 0
    padded = math.ceil((width + border) / 128) * 128 * math.ceil((height + border) / 128) * 128
    return pairs * padded * NETWORK_BYTES_PER_PIXEL


def available_memory(device):
    """Free memory on a CUDA device, or available RAM within any cgroup limit; None when unknown."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    amounts = []
    try:
        with open('/proc/meminfo') as file:
            amounts += [int(line.split()[1]) * 1024 for line in file if line.startswith('MemAvailable:')]
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                                   ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
                                    '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            with open(limit_path) as limit, open(usage_path) as usage:
                amounts.append(int(limit.read()) - int(usage.read()))
        except (OSError, ValueError):
            pass  # no such cgroup, or no limit ('max')
    return min(amounts) if amounts else None


def check_memory(width, height, device, padding='paper', pairs=1):
    """Refuse early, with a clear message, frames the network cannot hold in memory on `device`."""
    needed, available = network_memory(width, height, padding, pairs), available_memory(device)
    if available is not None and needed > available:
        where = 'GPU memory' if device.type == 'cuda' else 'RAM'
        raise InputError(f'{width}x{height} frames need about {needed / 2 ** 30:.1f} GiB for the network, '
                         f'but only {available / 2 ** 30:.1f} GiB of {where} is available; downscale them first')


def choose_batch_size(width, height, device, padding='paper', requested=None):
    """Pairs per network call: `requested`, else 1 on the CPU and up to 8 that fit in 80% of free GPU memory."""
    check_memory(width, height, device, padding, requested or 1)
    if requested or device.type != 'cuda':
        return requested or 1
    return int(max(1, min(8, 0.8 * available_memory(device) // network_memory(width, height, padding))))


# ---------------------------------------------------------------------------------------------
# Reading frames

def _ffmpeg_reason(text):
    """The telling line of an ffmpeg failure log, without its '[component @ address]' prefixes."""
    if ' Video: ' not in text and ' Audio: ' in text:
        return 'it has no video stream (audio only)'
    lines = [re.sub(r'^(\[[^]]*\] *)+', '', line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith('===')]
    for marker in ('Error opening input: ', 'Decoding error: '):
        found = [line.split(marker, 1)[1] for line in lines if marker in line]
        if found:
            return found[0]
    return lines[0] if lines else 'ffmpeg failed'


def _exact_fps(fps):
    """ffmpeg prints rates with two decimals; restore NTSC rates (29.97 -> 30000/1001)."""
    ntsc = round(fps * 1.001)
    if fps != round(fps) and abs(fps - ntsc / 1.001) < 0.01:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


class FrameSource:
    """The frames of a video file or of a folder of images, decoded one at a time.

    Attributes: width, height, fps (a Fraction; None if unknown), count (frames, estimated from the
    duration for videos; None if unknown), audio (a video's audio codec, else None), folder (bool)."""

    def __init__(self, path):
        self.path, self.audio = path, None
        if not os.path.exists(path):
            raise InputError(f'no such file or folder: {path}')
        self.folder = os.path.isdir(path)
        if self.folder:
            self._paths = frame_paths(path)
            if not self._paths:
                raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            (self.width, self.height), self.fps, self.count = image_size(self._paths[0]), FOLDER_FPS, len(self._paths)
            return
        if os.path.getsize(path) == 0:
            raise InputError(f'video file is empty: {path}')
        if imageio_ffmpeg is None:
            raise InputError('reading videos needs imageio-ffmpeg: pip install imageio-ffmpeg')
        reader = imageio_ffmpeg.read_frames(path)
        try:
            meta = next(reader)
        except Exception as error:  # imageio-ffmpeg raises OSError with ffmpeg's log, or fails to parse it
            raise InputError(f'cannot read video {path}: {_ffmpeg_reason(str(error))}') from None
        finally:
            reader.close()
        self.width, self.height = meta['size']
        self.fps = _exact_fps(meta['fps']) if meta['fps'] > 0 else None
        self.count = round(meta['duration'] * meta['fps']) or None
        self.audio = meta.get('audio_codec')

    def __iter__(self):
        return self._read_folder() if self.folder else self._decode()

    def _read_folder(self):
        for path in self._paths:
            frame = read_image(path)
            if frame.shape[:2] != (self.height, self.width):
                raise InputError(f'frames differ in size: {path} is {frame.shape[1]}x{frame.shape[0]}, '
                                 f'{self._paths[0]} is {self.width}x{self.height}')
            yield frame

    def _decode(self):
        """Every decoded frame once (no rate conversion); any decoding error (-xerror: a truncated or
        corrupt file) fails the read instead of being concealed."""
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-loglevel', 'error', '-xerror', '-i', self.path,
                   '-an', '-sn', '-dn', '-f', 'rawvideo', '-pix_fmt', 'rgb24', 'pipe:']
        size = self.width * self.height * 3
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                       start_new_session=True)
            try:
                while len(buffer := process.stdout.read(size)) == size:
                    yield np.frombuffer(bytearray(buffer), np.uint8).reshape(self.height, self.width, 3)
                if process.wait() or buffer:
                    log.seek(0)
                    reason = _ffmpeg_reason(log.read().decode(errors='replace') or 'incomplete last frame')
                    raise InputError(f'cannot decode video {self.path} (truncated or corrupt?): {reason}')
            finally:
                process.kill()
                process.wait()
                process.stdout.close()


# ---------------------------------------------------------------------------------------------
# Writing frames

class VideoWriter:
    """Encodes uint8 RGB frames with ffmpeg (H.264, BT.709) into a temporary file beside `path`; close()
    moves it onto `path`, abort() deletes it. Even sizes are encoded as yuv420p, which every player
    reads; odd sizes, which 4:2:0 cannot hold, as yuv444p, so the size is always kept exactly.
    `audio_from` names a file whose first audio stream is muxed in (stream-copied if AAC or MP3)."""

    def __init__(self, path, width, height, fps, audio_from=None, audio_codec=None):
        self.path, self.temporary = path, atomic_output(path)
        pixel_format = 'yuv420p' if width % 2 == 0 and height % 2 == 0 else 'yuv444p'
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-y', '-loglevel', 'error', '-f', 'rawvideo',
                   '-pix_fmt', 'rgb24', '-s', f'{width}x{height}', '-framerate', str(Fraction(fps)), '-i', 'pipe:']
        if audio_from:
            command += ['-i', audio_from, '-map', '0:v', '-map', '1:a:0',
                        '-c:a', 'copy' if audio_codec in ('aac', 'mp3') else 'aac']
        command += ['-c:v', 'libx264', '-crf', '17', '-pix_fmt', pixel_format, '-vf',
                    'scale=out_color_matrix=bt709:out_range=tv,'
                    'setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv']
        if path.lower().endswith(('.mp4', '.mov')):
            command += ['-movflags', '+faststart']
        self._log = tempfile.TemporaryFile()
        # A session of its own keeps Ctrl-C from reaching ffmpeg, which would then finish the file itself.
        self._process = subprocess.Popen(command + [self.temporary], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)

    def _failure(self):
        self._process.wait()
        self._log.seek(0)
        reason = _ffmpeg_reason(self._log.read().decode(errors='replace'))
        return InputError(f'ffmpeg could not write {self.path}: {reason}')

    def write(self, frame):
        try:
            self._process.stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, ValueError):
            raise self._failure() from None

    def close(self):
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        if self._process.wait():
            raise self._failure()
        os.replace(self.temporary, self.path)
        self._log.close()

    def abort(self):
        self._process.kill()
        self._process.wait()
        self._log.close()
        if os.path.exists(self.temporary):
            os.remove(self.temporary)


class FrameFolderWriter:
    """Writes frames as numbered PNGs (000000.png, ...) into a temporary folder beside `path`; close()
    renames it to `path` (which must not exist or be empty), abort() deletes it."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        parent, name = os.path.split(self.path)
        self.temporary = tempfile.mkdtemp(prefix=f'.{name}.', dir=parent)
        os.chmod(self.temporary, 0o777 & ~_umask())
        self.count = 0

    def write(self, frame):
        Image.fromarray(frame).save(os.path.join(self.temporary, f'{self.count:06d}.png'))
        self.count += 1

    def close(self):
        if os.path.isdir(self.path):
            os.rmdir(self.path)
        os.replace(self.temporary, self.path)

    def abort(self):
        shutil.rmtree(self.temporary, ignore_errors=True)


def _is_frame_folder(path):
    return path.endswith(('/', os.sep)) or os.path.isdir(path) or not os.path.splitext(path)[1]


def check_video_output(path, source):
    """Validate `path` as an output video or frame folder for `source`, creating its parent folder."""
    if os.path.abspath(path) == os.path.abspath(source) or (os.path.exists(path) and os.path.samefile(path, source)):
        raise InputError(f'output {path} would overwrite the input')
    if not _is_frame_folder(path):
        if not path.lower().endswith(VIDEO_EXTENSIONS):
            raise InputError(f"unsupported output video type '{path}' (use one of {', '.join(VIDEO_EXTENSIONS)}, "
                             'or a folder for PNG frames, e.g. out_frames/)')
        check_writable(path)
        return
    folder = os.path.abspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f'output {path} exists and is not a folder')
    if not os.path.isdir(folder):
        check_writable(folder)
    elif os.listdir(folder):
        raise InputError(f'output folder is not empty: {path}')
    elif not os.access(folder, os.W_OK):
        raise InputError(f'output folder is not writable: {path}')


# ---------------------------------------------------------------------------------------------
# Interpolation

def check_factor(factor):
    if not isinstance(factor, int) or factor < 2 or factor & (factor - 1):
        raise InputError(f'--factor must be a power of two (2, 4, 8, ...), got {factor}: SepConv predicts '
                         'midpoints, so in-between frames come from halving intervals repeatedly')


def _to_uint8(tensor):
    return (tensor * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _in_betweens(sources, network, factor, padding, batch_size, scene_threshold):
    """Yield sources[:-1], each followed by factor - 1 frames towards the next source, predicted level by
    level (midpoints, then quarter points, ...) in batches; at a scene cut the earlier frame is repeated."""
    device = next(network.parameters()).device
    tensors = [torch.tensor(frame, device=device).permute(2, 0, 1).float() / 255.0 for frame in sources]
    timelines = [None if scene_threshold is not None and scene_cut(*sources[i:i + 2], scene_threshold)
                 else {0: tensors[i], factor: tensors[i + 1]} for i in range(len(sources) - 1)]
    step = factor // 2
    while step:
        jobs = [(line, t) for line in timelines if line is not None for t in range(step, factor, 2 * step)]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            middles = estimate(network, torch.stack([line[t - step] for line, t in chunk]),
                               torch.stack([line[t + step] for line, t in chunk]), padding)
            for (line, t), middle in zip(chunk, middles):
                line[t] = middle
        step //= 2
    for frame, line in zip(sources, timelines):
        yield frame
        for t in range(1, factor):
            yield frame if line is None else _to_uint8(line[t])


def interpolate_frames(frames, network, factor=2, padding='paper', batch_size=1,
                       scene_threshold=SCENE_CUT_THRESHOLD):
    """Yield H x W x 3 uint8 frames: every frame of `frames` followed by factor - 1 interpolated ones
    (none after the last). Holds batch_size + 1 source frames at a time; scene_threshold=None turns
    scene-cut detection off."""
    check_factor(factor)
    window = []
    for frame in frames:
        window.append(frame)
        if len(window) == batch_size + 1:
            yield from _in_betweens(window, network, factor, padding, batch_size, scene_threshold)
            window = window[-1:]
    if len(window) > 1:
        yield from _in_betweens(window, network, factor, padding, batch_size, scene_threshold)
    if window:
        yield window[-1]


def _output_rate(clip, factor, fps, slowmo, to_folder):
    """The output frame rate, and whether the input's audio goes along (only if the duration is kept)."""
    if fps is not None and not 0 < fps < math.inf:
        raise InputError(f'--fps must be a positive number, got {fps}')
    if fps is not None and slowmo:
        raise InputError('--fps and --slowmo exclude each other')
    source_fps = clip.fps or FOLDER_FPS
    if clip.fps is None and not to_folder:
        notice(f'the frame rate of {clip.path} is unknown; taking {FOLDER_FPS} fps')
    rate = _exact_fps(fps) if fps is not None else source_fps * (1 if slowmo else factor)
    keep_audio = bool(clip.audio) and not to_folder and rate == source_fps * factor
    if clip.audio and not keep_audio:
        reason = ('a frame folder holds no audio' if to_folder else
                  '--slowmo stretches the video' if slowmo else f'{float(rate):g} fps changes the duration')
        notice(f'audio dropped: {reason}')
    return rate, keep_audio


def _write_all(frames, sink, total, progress):
    written = 0
    with tqdm(total=total, unit='frame', disable=not progress, dynamic_ncols=True) as bar:
        for frame in frames:
            sink.write(frame)
            written += 1
            bar.update()
    return written


def interpolate_video(source, out, network=None, model='l1', weights=None, factor=2, fps=None, slowmo=False,
                      scene_detect=True, padding='paper', device='auto', batch_size=None, progress=True):
    """Write `source` (a video file or a folder of frames) to `out` (.mp4, .mkv or .mov, or a folder for
    numbered PNGs) with factor - 1 SepConv frames between each pair of frames, all source frames kept.

    The output runs at factor x the input rate (same duration, audio carried over), at the input rate
    with slowmo=True (audio dropped), or at `fps`. Frames are streamed: decoded, interpolated (batches of
    batch_size pairs; default 1 on the CPU, what fits on a GPU) and encoded one at a time, into a
    temporary file renamed to `out` only once complete. Returns the number of frames written."""
    check_factor(factor)
    if padding not in PADDINGS:
        raise InputError(f"unknown padding '{padding}' (choose from {', '.join(PADDINGS)})")
    to_folder = _is_frame_folder(out)
    clip = FrameSource(source)
    device = next(network.parameters()).device if network else resolve_device(device)
    batch_size = choose_batch_size(clip.width, clip.height, device, padding, batch_size)
    frames = iter(clip)
    try:
        head = list(itertools.islice(frames, 2))
        if len(head) < 2:
            raise InputError(f'{source} has {"no frames" if not head else "only one frame"}; '
                             'interpolation needs at least two')
        rate, keep_audio = _output_rate(clip, factor, fps, slowmo, to_folder)
        check_video_output(out, source)
        network = network or load_network(model, weights, device)
        if (clip.width % 2 or clip.height % 2) and not to_folder:
            notice(f'{clip.width}x{clip.height} has an odd side, which H.264 4:2:0 cannot hold: encoding 4:4:4 '
                   '(yuv444p) to keep the size; some players (browsers, QuickTime) cannot play that')
        sink = (FrameFolderWriter(out) if to_folder else
                VideoWriter(out, clip.width, clip.height, rate, source if keep_audio else None, clip.audio))
        in_betweens = interpolate_frames(itertools.chain(head, frames), network, factor, padding, batch_size,
                                         SCENE_CUT_THRESHOLD if scene_detect else None)
        try:
            written = _write_all(in_betweens, sink, (clip.count - 1) * factor + 1 if clip.count else None, progress)
            sink.close()
        except BaseException:
            sink.abort()
            raise
    finally:
        frames.close()  # stops the decoder
    return written
