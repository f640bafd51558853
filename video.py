"""Frames in and out of videos (streamed through the ffmpeg of imageio-ffmpeg) and of frame folders.

imageio-ffmpeg finds ffmpeg and reads a file's header; decoding and encoding are our own pipes because its
read_frames and write_frames ignore ffmpeg's exit status (a truncated file would pass as a short one)."""
import logging
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

from cli import InputError
from files import check_writable, commit, extension, ffmpeg_path, temporary_beside
from images import IMAGE_EXTENSIONS, frame_paths, image_size, read_image, save_image

OUTPUT_EXTENSIONS = ('.mp4', '.mkv', '.mov')  # written as H.264 (libx264)
VIDEO_EXTENSIONS = OUTPUT_EXTENSIONS + ('.avi', '.webm')  # what train.py picks from folders as videos
FOLDER_FPS = Fraction(25)  # frame folders carry no frame rate; they count as 25 fps
FPS_RANGE = (1, 1000)  # an --fps outside it is a typo more likely than a wish


def _ffmpeg_reason(text):
    """The telling line of an ffmpeg failure log, without its '[component @ address]' prefixes."""
    if ' Video: ' not in text and 'Input #' in text:  # a header read whole, without a picture
        return f"it has no video stream ({'audio only' if ' Audio: ' in text else 'no frames'})"
    lines = [re.sub(r'^(\[[^]]*\] *)+', '', line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith('===')]
    for marker in ('Error opening input: ', 'Decoding error: '):
        found = [line.split(marker, 1)[1] for line in lines if marker in line]
        if found:
            return found[0]
    return lines[0] if lines else 'ffmpeg failed'


def exact_fps(fps):
    """ffmpeg prints rates with two decimals; restore NTSC rates (29.97 -> 30000/1001)."""
    ntsc = round(fps * 1.001)
    if fps != round(fps) and abs(fps - ntsc / 1.001) < 0.01:
        return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def check_fps(fps):
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise InputError(f'--fps must be between {FPS_RANGE[0]} and {FPS_RANGE[1]}, got {float(fps):g}')


def _probe(path):
    """imageio-ffmpeg's reading of the header; its warning about rotated videos' frame size is not for users."""
    reader = imageio_ffmpeg.read_frames(ffmpeg_path(path))
    logger = logging.getLogger('imageio_ffmpeg')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return next(reader)
    except (OSError, RuntimeError, IndexError, AttributeError, ValueError) as error:  # ffmpeg failed, or its log did not parse
        raise InputError(f'cannot read video {path}: {_ffmpeg_reason(str(error))}') from None
    finally:
        logger.setLevel(level)
        reader.close()


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
        meta = _probe(path)
        self.width, self.height = meta['size']
        self.fps = exact_fps(meta['fps']) if meta['fps'] > 0 else None
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
        """Frames at the constant rate self.fps (a variable-rate video's average: frames are repeated or
        dropped where its rate varies, so duration and audio stay in sync); any decoding error (-xerror: a
        truncated or corrupt file) fails the read instead of being concealed."""
        rate = ['-vf', f'fps={self.fps}'] if self.fps else []
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-loglevel', 'error', '-xerror', '-i', ffmpeg_path(self.path),
                   '-an', '-sn', '-dn', *rate, '-f', 'rawvideo', '-pix_fmt', 'rgb24', 'pipe:']
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


class VideoWriter:
    """Encodes uint8 RGB frames with ffmpeg (H.264, BT.709) into a temporary file beside `path`; close()
    moves it onto `path`, abort() deletes it. Even sizes are encoded as yuv420p, which every player
    reads; odd sizes, which 4:2:0 cannot hold, as yuv444p, so the size is always kept exactly.
    `audio_from` names a file whose first audio stream is muxed in (stream-copied if AAC or MP3)."""

    def __init__(self, path, width, height, fps, audio_from=None, audio_codec=None):
        self.path, self.temporary = path, temporary_beside(path)
        pixel_format = 'yuv420p' if width % 2 == 0 and height % 2 == 0 else 'yuv444p'
        command = [imageio_ffmpeg.get_ffmpeg_exe(), '-y', '-loglevel', 'error', '-f', 'rawvideo',
                   '-pix_fmt', 'rgb24', '-s', f'{width}x{height}', '-framerate', str(Fraction(fps)), '-i', 'pipe:']
        if audio_from:
            command += ['-i', ffmpeg_path(audio_from), '-map', '0:v', '-map', '1:a:0',
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
