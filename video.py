"""Frames in and out of videos (streamed through the ffmpeg of imageio-ffmpeg) and of frame folders.

imageio-ffmpeg finds ffmpeg; probing, decoding and encoding are our own runs of it. What a video holds is read from
ffmpeg's framecrc output (every frame's timestamp, size and sample aspect ratio, every stream's packets) and from the
input description it prints before any work (duration, colour tags), never from rates printed as text ('1k fps')."""
import decimal
import math
import numbers
import os
import re
import shutil
import signal
import subprocess
import tempfile
from fractions import Fraction

try:
    import imageio_ffmpeg
except ImportError:  # videos then need OpenCV (train.py falls back to it); frame folders still work
    imageio_ffmpeg = None
import numpy as np
from PIL import Image

from cli import InputError
from files import TEMPORARY_PREFIX, check_writable, commit, extension, ffmpeg_path, temporary_beside
from images import IMAGE_EXTENSIONS, frame_paths, image_array, image_size, read_image, save_image

OUTPUT_EXTENSIONS = ('.mp4', '.mkv', '.mov')  # written as H.264 (libx264)
VIDEO_EXTENSIONS = OUTPUT_EXTENSIONS + ('.avi', '.webm')  # what train.py picks from folders as videos
FOLDER_FPS = Fraction(25)  # frame folders carry no frame rate; they count as 25 fps
FPS_RANGE = (1, 1000)  # an --fps outside it is a typo more likely than a wish


ERROR_LEVELS = ('[error]', '[fatal]', '[panic]')  # what `-loglevel level+...` prefixes ffmpeg's failures with


def _ffmpeg_reason(text):
    """The telling line of an ffmpeg failure log, without its '[component @ address]' and level prefixes."""
    if 'matches no streams' in text or (' Video: ' not in text and 'Input #' in text):  # no picture in the header
        return f"it has no video stream ({'audio only' if ' Audio: ' in text else 'no frames'})"
    lines = text.splitlines()
    if any(level in line for line in lines for level in ERROR_LEVELS):
        lines = [line for line in lines if any(level in line for level in ERROR_LEVELS)]
    lines = [re.sub(r'^(\[[^]]*\] *)+', '', line).strip() for line in lines]
    lines = [line for line in lines if line and not line.startswith('===')]
    for marker in ('Error opening input: ', 'Decoding error: '):
        found = [line.split(marker, 1)[1] for line in lines if marker in line]
        if found:
            return found[0]
    return lines[0] if lines else 'ffmpeg failed'


# ---------------------------------------------------------------------------------------------
# Rates

def is_number(value):
    """A real number in any spelling: int, Fraction, float, Decimal, numpy scalar (not a bool or a string)."""
    return not isinstance(value, bool) and isinstance(value, (numbers.Real, decimal.Decimal))


def within(value, low, high):
    """`value` (a number, see is_number) as an exact Fraction if low <= value <= high, else None (NaN, infinities
    and values of any size fall outside). A float counts as the decimal it prints as: 59.95 is 1199/20."""
    try:
        if not low <= value <= high:
            return None
    except decimal.InvalidOperation:  # Decimal('NaN') refuses to be compared
        return None
    if isinstance(value, numbers.Rational):
        return Fraction(value.numerator, value.denominator)
    try:
        return Fraction(str(value))
    except ValueError:
        return Fraction(value)


def shown(value):
    """A number as messages show it, however large (10**400 has no float)."""
    if not is_number(value):
        return repr(value)
    try:
        value = Fraction(value)
    except (ValueError, OverflowError):  # NaN, infinities
        return str(value)
    if abs(value) < 10 ** 15:
        return f'{float(value):g}'
    mantissa, exponent = f'{decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator):.6e}'.split('e')
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def check_fps(fps):
    """A user's frame rate, exact (see within), or an InputError."""
    if not is_number(fps):
        raise InputError(f'--fps must be a number, got {fps!r}')
    exact = within(fps, *FPS_RANGE)
    if exact is None:
        raise InputError(f'--fps must be between {FPS_RANGE[0]} and {FPS_RANGE[1]}, got {shown(fps)}')
    return exact


def simplest_between(low, high):
    """The fraction with the smallest denominator in [low, high] (0 < low <= high), by continued fractions."""
    whole = math.floor(low)
    if whole == low or whole + 1 <= high:
        return Fraction(whole if whole == low else whole + 1)
    return whole + 1 / simplest_between(1 / (high - whole), 1 / (low - whole))


def snap_rate(rate, tolerance):
    """A rate measured from timestamps (within `tolerance`) as the one it was meant to be: a whole number, an NTSC
    rate (30000/1001), else the simplest fraction within the tolerance."""
    for candidate in (Fraction(round(rate)), Fraction(round(rate * Fraction(1001, 1000)) * 1000, 1001)):
        if candidate > 0 and abs(candidate - rate) <= tolerance:
            return candidate
    return simplest_between(max(rate - tolerance, rate / 2), rate + tolerance)


def frame_timing(times, last_duration, resolution, stated_rate):
    """(rate, times) of frames shown at `times` (Fractions of a second from the first) for `last_duration` after the
    last, with timestamps rounded to `resolution` seconds. A constant rate (times None) is the stream's stated
    rate where the timestamps agree with it, else what they measure; a variable rate is the average over the
    duration, with the times in intervals of it, for the frames to be placed where they are shown."""
    count, deltas = len(times), [b - a for a, b in zip(times, times[1:])]
    if not deltas:
        return stated_rate or (1 / last_duration if last_duration else None), None
    span, mean = times[-1], times[-1] / len(deltas)
    if span <= 0:  # timestamps that say nothing
        return stated_rate, None
    if max(deltas) - min(deltas) <= max(2 * resolution, mean / 20):
        measured = (count - 1) / span
        tolerance = measured * 2 * resolution / span
        if stated_rate and abs(stated_rate - measured) <= tolerance:
            return stated_rate, None
        return snap_rate(measured, tolerance), None
    duration = span + (last_duration or mean)
    rate = snap_rate(count / duration, count / duration * 2 * resolution / duration)
    return rate, [time * rate for time in times] if min(deltas) > 0 else None


# ---------------------------------------------------------------------------------------------
# What ffmpeg says about a video

SUPPORTED_MATRICES = ('unknown', 'bt709', 'fcc', 'bt470bg', 'smpte170m', 'smpte240m', 'bt2020nc', 'gbr')
ALPHA_FORMATS = re.compile(r'^(yuva|gbrap|ya\d|rgba|bgra|argb|abgr|ayuv|vuya|pal8)')
FIELD_ORDERS = ('progressive', 'top first', 'bottom first', 'top coded first (swapped)',
                'bottom coded first (swapped)')


def _crc(path):
    """The headers {(name, stream): value} and packets [(stream, pts, duration)] of an ffmpeg framecrc file."""
    headers, packets = {}, []
    with open(path) as file:
        for line in file:
            if line.startswith('#'):
                found = re.match(r'#(\w+) (\d+): (.*)', line)
                if found:
                    headers[found[1], int(found[2])] = found[3].strip()
            elif line.strip():
                fields = line.split(',')
                packets.append((int(fields[0]), int(fields[2]), int(fields[3])))
    return headers, packets


def _input_dump(log):
    """(stated duration in seconds or None, the interpolated stream's index, pixel format and colour) from the
    input description ffmpeg prints before any work starts (so before its threads can interleave lines)."""
    found = re.search(r'Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)', log)
    duration = found and int(found[1]) * 3600 + int(found[2]) * 60 + Fraction(found[3])
    for line in log.splitlines():
        stream = re.search(r'Stream #0:(\d+)\S*: Video: .*?, (\w+)(?:\(([^)]*)\))?, \d+x\d+', line)
        if stream and '(attached pic)' not in line:
            return duration, int(stream[1]), stream[2], _colour(stream[3] or '')
    return duration, None, None, _colour('')


def _colour(properties):
    """{'range', 'matrix', 'primaries', 'transfer'} from ffmpeg's 'tv, bt2020nc/bt2020/smpte2084, progressive'
    ('unknown' where the stream does not say; one name stands for all three when they agree)."""
    colour = dict.fromkeys(('range', 'matrix', 'primaries', 'transfer'), 'unknown')
    for item in (item.strip() for item in properties.split(',')):
        if item in ('tv', 'pc'):
            colour['range'] = item
        elif item and item not in FIELD_ORDERS and not item.startswith(('left', 'center', 'top', 'bottom')):
            names = item.split('/') if '/' in item else [item] * 3
            colour.update(zip(('matrix', 'primaries', 'transfer'), names))
    return colour


def _run_probe(name, fds, path):
    """Decode the video once, as ffmpeg will when its frames are read: their timestamps, size and sample aspect
    ratio (after any rotation), the stream's stated frame rate, and every stream's packets."""
    with tempfile.TemporaryDirectory(prefix=TEMPORARY_PREFIX) as folder:
        frames, first, packets = (os.path.join(folder, part) for part in ('frames', 'first', 'packets'))
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-nostats', '-hide_banner', '-loglevel', 'level+info',
                   '-xerror', '-i', name,
                   '-map', '0:V:0', '-fps_mode', 'passthrough', '-enc_time_base:v', 'demux', '-c:v', 'wrapped_avframe',
                   '-f', 'framecrc', f'file:{frames}',
                   '-map', '0:V:0', '-frames:v', '1', '-c:v', 'wrapped_avframe', '-f', 'framecrc', f'file:{first}',
                   '-map', '0', '-c', 'copy', '-f', 'framecrc', f'file:{packets}']
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, pass_fds=fds,
                                start_new_session=True)
        log = result.stderr.decode(errors='replace')
        if result.returncode:
            opened = 'Error opening input' not in log and 'matches no streams' not in log
            raise InputError(f"{'cannot decode video' if opened else 'cannot read video'} {path}"
                             f"{' (truncated or corrupt?)' if opened else ''}: {_ffmpeg_reason(log)}")
        return log, _crc(frames), _crc(first)[0], _crc(packets)


def _seconds(headers, stream):
    return Fraction(headers.get(('tb', stream), '1/1'))


def probe(name, fds, path):
    """What a player uses to show the video `path` (opened by ffmpeg as `name`, with `fds` passed on): a dict of
    width, height, sar, rate, times, count, start (of the video, in seconds after the file's), colour, alpha and
    streams [(index, type, codec)] besides the video;
    a truncated file (the decoded streams end before its stated duration) is refused."""
    log, (frame_headers, frames), first, (stream_headers, packets) = _run_probe(name, fds, path)
    duration, video, pixel_format, colour = _input_dump(log)
    if video is None:  # the description did not parse: the first video stream is the one decoded
        video = min((stream for (name, stream), kind in stream_headers.items() if name == 'media_type'
                     and kind == 'video'), default=None)
    if not frames:
        raise InputError(f'{path} has no frames; interpolation needs at least two')
    if colour['matrix'] not in SUPPORTED_MATRICES:
        raise InputError(f"cannot read video {path}: its colour matrix {colour['matrix']} has no conversion to RGB "
                         f"here (supported: {', '.join(SUPPORTED_MATRICES[1:])})")
    tick = _seconds(frame_headers, 0)
    start = frames[0][1]
    times = [(pts - start) * tick for _, pts, _ in frames]
    stated = 1 / _seconds(first, 0) if _seconds(first, 0) else None
    rate, positions = frame_timing(times, frames[-1][2] * tick, tick, stated)
    width, height = map(int, frame_headers['dimensions', 0].split('x'))
    sar = Fraction(frame_headers.get(('sar', 0), '1/1').replace('0/1', '1/1'))
    streams = sorted({(stream, stream_headers.get(('media_type', stream)), stream_headers.get(('codec_id', stream)))
                      for _, stream in stream_headers if stream != video})
    facts = dict(width=width, height=height, sar=sar or Fraction(1), rate=rate, times=positions, count=len(frames),
                 start=max(Fraction(0), start * tick),
                 colour=colour, alpha=bool(ALPHA_FORMATS.match(pixel_format or '')), streams=streams)
    _check_complete(path, facts, duration, stream_headers, packets)
    return facts


def _stream_ends(headers, packets):
    """{stream: the second its last packet ends}; a packet without a duration lasts as long as the one before."""
    ends, last = {}, {}
    for stream, pts, length in packets:
        length = length or pts - last.get(stream, pts)
        ends[stream] = max(ends.get(stream, pts + length), pts + length)
        last[stream] = pts
    return {stream: end * _seconds(headers, stream) for stream, end in ends.items()}


def _check_complete(path, facts, duration, headers, packets):
    """Refuse a file whose streams all end before its stated duration (by over half a frame): it was cut short."""
    if not duration or not packets or not facts['rate']:
        return
    end = max(_stream_ends(headers, packets).values())
    if duration - end > max(Fraction(1, 2) / facts['rate'], Fraction(1, 50)):
        raise InputError(f"{path} is truncated: {facts['count']} of {round(duration * facts['rate'])} frames "
                         f'({float(end):.2f} of {float(duration):.2f} s)')


def _opened(path):
    """A file descriptor of `path` and the name ffmpeg opens it by: every ffmpeg run then reads this very file even
    if `path` is replaced meanwhile (Linux reopens /proc/self/fd/N as the same file, at its own offset)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise InputError(f'cannot read video {path}: {error.strerror}') from None
    if not os.path.isdir('/proc/self/fd'):
        os.close(descriptor)
        return None, ffmpeg_path(path)
    import fcntl  # where /proc is, so is fcntl
    kept = fcntl.fcntl(descriptor, fcntl.F_DUPFD_CLOEXEC, 3)  # above 0-2, which a child's standard streams replace
    os.close(descriptor)
    return kept, f'/proc/self/fd/{kept}'


class FrameSource:
    """The frames of a video file or of a folder of images, decoded one at a time.

    Attributes: width, height, fps (a Fraction; None if unknown), count (frames), times (None at a constant rate;
    else each frame's time in average frame intervals), start (seconds from the file's start), sar (sample aspect ratio), colour (None for frame
    folders, which are sRGB; else the video's tags), alpha (bool: frames are composited on white, as images are),
    streams ([(index, type, codec)] besides the video), audio (the first audio codec, else None), folder (bool).
    A video file is opened once: every read, and the streams carried to an output, come from that file."""

    def __init__(self, path):
        self.path, self.audio, self.sar, self.colour, self.alpha, self.start = path, None, Fraction(1), None, False, 0
        self.streams, self.times, self.descriptor = [], None, None
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
        self.descriptor, self.input = _opened(path)
        try:
            facts = probe(self.input, self.fds, path)
        except BaseException:
            self.close()
            raise
        self.width, self.height, self.sar, self.fps, self.times, self.start = (
            facts[key] for key in ('width', 'height', 'sar', 'rate', 'times', 'start'))
        self.count, self.colour, self.alpha, self.streams = facts['count'], facts['colour'], facts['alpha'], facts['streams']
        self.audio = next((codec for _, kind, codec in self.streams if kind == 'audio'), None)

    @property
    def fds(self):
        return () if self.descriptor is None else (self.descriptor,)

    def close(self):
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def __del__(self):
        self.close()

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
        """Every frame once, in order (the times say when each is shown); any decoding error (-xerror: a truncated
        or corrupt file) fails the read instead of being concealed. Transparency is composited on white."""
        channels = 4 if self.alpha else 3
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-loglevel', 'error', '-xerror', '-i', self.input,
                   '-map', '0:V:0', '-fps_mode', 'passthrough', '-f', 'rawvideo',
                   '-pix_fmt', 'rgba' if self.alpha else 'rgb24', 'pipe:']
        size, count = self.width * self.height * channels, 0
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                       pass_fds=self.fds, start_new_session=True)
            try:
                while len(buffer := process.stdout.read(size)) == size:
                    count += 1
                    yield self._frame(np.frombuffer(bytearray(buffer), np.uint8).reshape(self.height, self.width, -1))
                if process.wait() or buffer:
                    log.seek(0)
                    reason = _ffmpeg_reason(log.read().decode(errors='replace') or 'incomplete last frame')
                    raise InputError(f'cannot decode video {self.path} (truncated or corrupt?): {reason}')
                if count != self.count:
                    raise InputError(f'cannot decode video {self.path}: {count} frames where {self.count} were '
                                     'counted (was it changed while being read?)')
            finally:
                process.kill()
                process.wait()
                process.stdout.close()

    def _frame(self, pixels):
        if pixels.shape[2] == 3:
            return pixels
        return image_array(Image.fromarray(pixels, 'RGBA'), self.path)


CONTAINERS = {'.mp4': 'mp4', '.mov': 'mov', '.mkv': 'matroska'}  # output extension: ffmpeg's muxer
CONVERSIONS = {'audio': ('aac',), 'subtitle': ('mov_text', 'srt')}  # for streams a container cannot hold as they are
SRGB = {'range': 'tv', 'matrix': 'bt709', 'primaries': 'bt709', 'transfer': 'bt709'}  # how frame folders are tagged


def _stream_arguments(plan, source_input, first_output):
    """ffmpeg's -map and -c arguments for the streams `plan` [(index, codec)] of input number `source_input`."""
    arguments = []
    for number, (index, codec) in enumerate(plan, first_output):
        arguments += ['-map', f'{source_input}:{index}', f'-c:{number}', codec]
    return arguments


def _holds(source, path, plan):
    """Whether ffmpeg writes `plan`'s streams of `source` into the container of `path` (tried on its first second)."""
    extension = os.path.splitext(path)[1].lower()
    with tempfile.TemporaryDirectory(prefix=TEMPORARY_PREFIX) as folder:
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-loglevel', 'error', '-i', source.input,
                   *_stream_arguments(plan, 0, 0), '-t', '1', '-f', CONTAINERS[extension],
                   f"file:{os.path.join(folder, 'trial' + extension)}"]
        return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, pass_fds=source.fds,
                              start_new_session=True).returncode == 0


def carried_streams(source, path):
    """(plan, dropped): the streams of `source` besides its video that the container of `path` holds, as
    [(index, codec)] ('copy', or a conversion where a copy cannot go in), and descriptions of the others."""
    if not source.streams:
        return [], []
    copies = [(index, 'copy') for index, _, _ in source.streams]
    if _holds(source, path, copies):
        return copies, []
    plan, dropped = [], []
    for index, kind, codec in source.streams:
        choice = next((codec for codec in ('copy',) + CONVERSIONS.get(kind, ()) if _holds(source, path, [(index, codec)])),
                      None)
        if choice:
            plan.append((index, choice))
        else:
            dropped.append(f'{kind} #{index} ({codec})')
    return plan, dropped


def _picture_filters(colour, sar):
    """How RGB frames become the output's pixels, tagged as `colour` (see FrameSource) with sample aspect ratio
    `sar`: in the input's matrix and range (an untagged input as ffmpeg read it, BT.601, and left untagged)."""
    colour = colour or SRGB
    matrix = {'unknown': 'bt601', 'gbr': 'bt709'}.get(colour['matrix'], colour['matrix'])
    tags = {'colorspace': 'bt709' if colour['matrix'] == 'gbr' else colour['matrix'], 'range': colour['range'],
            'color_primaries': colour['primaries'], 'color_trc': colour['transfer']}
    return (f"scale=out_color_matrix={matrix}:out_range={'pc' if colour['range'] == 'pc' else 'tv'},setparams="
            + ':'.join(f'{name}={value}' for name, value in tags.items())
            + f',setsar=r={sar.numerator}/{sar.denominator}:max=65535')


class VideoWriter:
    """Encodes uint8 RGB frames with ffmpeg (H.264) into a temporary file beside `path`; close() moves it onto
    `path`, abort() deletes it. Even sizes are encoded as yuv420p, which every player reads; odd sizes, which
    4:2:0 cannot hold, as yuv444p, so the size is always kept exactly. The frames are tagged with `source`'s
    colour and sample aspect ratio (BT.709 for frame folders, or without a source), and `streams` ([(index,
    codec)], see carried_streams) of `source` go along, with its metadata and chapters."""

    def __init__(self, path, width, height, fps, source=None, streams=()):
        self.path, self.temporary = path, temporary_beside(path)
        pixel_format = 'yuv420p' if width % 2 == 0 and height % 2 == 0 else 'yuv444p'
        delay = ['-itsoffset', f'{float(source.start):.6f}'] if streams and source.start else []  # after the audio
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-nostdin', '-y', '-loglevel', 'error', '-f', 'rawvideo',
                   '-pix_fmt', 'rgb24', '-s', f'{width}x{height}', '-framerate', str(Fraction(fps)), *delay, '-i', 'pipe:']
        if streams:
            command += ['-i', source.input, '-map', '0:v', *_stream_arguments(streams, 1, 1), '-map_metadata', '1']
        command += ['-c:0', 'libx264', '-crf', '17', '-pix_fmt:0', pixel_format, '-filter:0',
                    _picture_filters(source and source.colour, source.sar if source else Fraction(1))]
        if path.lower().endswith(('.mp4', '.mov')):
            command += ['-movflags', '+faststart']
        self._log = tempfile.TemporaryFile()
        # A process group of its own keeps Ctrl-C from reaching ffmpeg, which would then finish the file itself.
        self._process = subprocess.Popen(command + [f'file:{self.temporary}'], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True,
                                         pass_fds=source.fds if source else ())


    def _failure(self):
        code = self._process.wait()
        self._log.seek(0)
        text = self._log.read().decode(errors='replace')
        reason = f'ffmpeg was stopped by {signal.Signals(-code).name}' if code < 0 and not text else _ffmpeg_reason(text)
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
        commit(self.temporary, self.path)
        self._log.close()

    def abort(self):
        self._process.kill()
        self._process.wait()
        self._log.close()
        if os.path.exists(self.temporary):
            os.remove(self.temporary)


class FrameFolderWriter:
    """Writes frames as numbered PNGs (000000.png, ...) into a temporary folder (files.temporary_beside); close()
    commits them to the folder `path` (which must not exist or be empty), abort() deletes them."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.temporary, self.count = temporary_beside(self.path, folder=True), 0

    def write(self, frame):
        save_image(os.path.join(self.temporary, f'{self.count:06d}.png'), frame, self.path)
        self.count += 1

    def close(self):
        commit(self.temporary, self.path)

    def abort(self):
        shutil.rmtree(self.temporary, ignore_errors=True)


def is_frame_folder(path):
    """A folder output: a path ending in a separator, an existing folder, or a name without an extension
    ('.mp4' is a hidden video file, not a folder)."""
    return path.endswith(('/', os.sep)) or os.path.isdir(path) or not extension(path)


def check_video_output(path, source):
    """Validate `path` as an output video or frame folder for `source`, creating its parent folder."""
    folder = is_frame_folder(path)
    if not folder and not path.lower().endswith(OUTPUT_EXTENSIONS):
        raise InputError(f"unsupported output video type '{path}' (use one of {', '.join(OUTPUT_EXTENSIONS)}, "
                         'or a folder for PNG frames, e.g. out_frames/)')
    check_writable(path, [source], folder=folder)
