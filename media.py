"""Videos and frame folders at another frame rate: `interpolate_video` streams frames through SepConv in
constant memory, reaching any time between two frames by recursive bisection, with no frames invented across
scene cuts and the frames checked against free memory."""
import itertools
import math
import numbers
import typing
from fractions import Fraction

import numpy as np
import torch
from tqdm import tqdm

from cli import InputError, check_choice, path_argument, say, side_channel
from files import check_not_an_input
from model import PADDINGS, estimate, load_network, resolve_device
from video import (FOLDER_FPS, FPS_RANGE, FrameFolderWriter, FrameSource, VideoWriter, check_fps, check_video_output,
                   exact_fps, is_frame_folder)

SCENE_CUT_THRESHOLD = 0.3  # median over a 4 x 4 grid of blocks of the colour-histogram distance, in [0, 1]
SCENE_CUT_GRID = 4
SCENE_CUT_LEVELS = 4  # per RGB channel, so 64 colour bins per block
NETWORK_BYTES_PER_PIXEL = 2200  # peak memory per padded pixel of one pair in the network (measured on CPU)


def notice(message):
    say(f'notice: {message}')


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
# Timing: any output rate by recursive bisection

MAX_DEPTH = 10  # bisection levels at most: times j / 1024 of an input frame interval
MAX_TIME_ERROR = Fraction(1, 16)  # default bound on an output frame's timing error, in input frame intervals


def bisection_depth(max_time_error):
    """The fewest halvings after which every time lies within max_time_error of a time j / 2^depth."""
    depth = 0
    while Fraction(1, 2 ** (depth + 1)) > max_time_error:
        depth += 1
    return depth


def target_time(time, depth):
    """Where bisection puts an output due at `time` (a Fraction in [0, 1] of an interval): at `time` itself
    when it is some j / 2^k with k <= MAX_DEPTH (power-of-two factors stay exact), else at the nearest j / 2^depth."""
    denominator = time.denominator
    if denominator & (denominator - 1) == 0 and denominator <= 2 ** MAX_DEPTH:
        return time
    return Fraction(round(time * 2 ** depth), 2 ** depth)


def bisection_times(targets):
    """Every time strictly between 0 and 1 that bisection computes to reach the dyadic `targets`:
    j / 2^k (j odd) is the midpoint of (j - 1) / 2^k and (j + 1) / 2^k, which lie on shallower levels."""
    needed, todo = set(), [time for time in targets if 0 < time < 1]
    while todo:
        time = todo.pop()
        if time not in needed:
            needed.add(time)
            todo += [near for near in _neighbours(time) if 0 < near < 1]
    return needed


def _neighbours(time):
    step = Fraction(1, time.denominator)
    return time - step, time + step


def _to_tensor(frame, device):
    return torch.tensor(frame, device=device).permute(2, 0, 1).float() / 255.0


def _to_uint8(tensor):
    return (tensor * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class FrameRateConverter:
    """A stream of frames at `ratio` times its rate (a Fraction: 5/2 for 24 -> 60 fps) over the same duration.

    Output k shows input time k / ratio (in frame intervals), reached by recursive bisection at the time
    target_time picks; an output on an input frame copies it, outputs past the last frame hold it, and no
    frame is invented across a scene cut (the earlier frame is repeated). The midpoints of all pairs in a
    window of batch_size + 1 frames are computed level by level in batches, each once. `evaluations`
    counts them, `source_frames` the frames read."""

    def __init__(self, network, ratio, padding='paper', batch_size=1, scene_threshold=SCENE_CUT_THRESHOLD,
                 max_time_error=MAX_TIME_ERROR):
        self.network, self.ratio, self.padding, self.batch_size = network, Fraction(ratio), padding, batch_size
        self.scene_threshold, self.depth = scene_threshold, bisection_depth(max_time_error)
        self.evaluations = self.source_frames = 0

    def convert(self, frames):
        """Yield H x W x 3 uint8 frames: ceil(ratio x the number of `frames`) of them."""
        window = []
        for frame in frames:
            window.append(frame)
            self.source_frames += 1
            if len(window) == self.batch_size + 1:
                yield from self._between(window)
                window = window[-1:]
        if len(window) > 1:
            yield from self._between(window)
        if window:  # held for its own interval
            yield from [window[-1]] * (math.ceil(self.source_frames * self.ratio) - self._outputs_before_last())

    def _between(self, window):
        """The outputs from window[0] up to (not including) window[-1]."""
        first = self.source_frames - len(window)
        targets = []
        for index in range(math.ceil(first * self.ratio), self._outputs_before_last()):
            position = index / self.ratio - first
            targets.append((math.floor(position), target_time(position - math.floor(position), self.depth)))
        timelines = self._timelines(window, targets)
        for pair, time in targets:
            if time == 1:
                yield window[pair + 1]
            elif time and pair in timelines:
                yield _to_uint8(timelines[pair][time])
            else:
                yield window[pair]  # on an input frame, or at a scene cut

    def _outputs_before_last(self):
        """How many outputs fall before the last frame read so far."""
        return math.ceil((self.source_frames - 1) * self.ratio)

    def _timelines(self, window, targets):
        """{pair: {time: frame tensor}} holding every time bisection needs for `targets`; scene cuts left out."""
        wanted = {}
        for pair, time in targets:
            if 0 < time < 1:
                wanted.setdefault(pair, []).append(time)
        device = next(self.network.parameters()).device
        timelines = {pair: {Fraction(0): _to_tensor(window[pair], device),
                            Fraction(1): _to_tensor(window[pair + 1], device)}
                     for pair in wanted if not self._cut(window[pair], window[pair + 1])}
        needed = {pair: bisection_times(wanted[pair]) for pair in timelines}
        for depth in range(1, MAX_DEPTH + 1):
            self._evaluate(timelines, [(pair, time) for pair in timelines for time in sorted(needed[pair])
                                       if time.denominator == 2 ** depth])
        return timelines

    def _cut(self, one, two):
        return self.scene_threshold is not None and scene_cut(one, two, self.scene_threshold)

    def _evaluate(self, timelines, jobs):
        """Fill in the midpoints `jobs` ((pair, time), both neighbours of each known), batch_size at a time."""
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            sides = [[timelines[pair][near] for near in _neighbours(time)] for pair, time in chunk]
            ones, twos = (torch.stack(side) for side in zip(*sides))
            middles = estimate(self.network, ones, twos, self.padding)
            for (pair, time), middle in zip(chunk, middles):
                timelines[pair][time] = middle
            self.evaluations += len(chunk)


# ---------------------------------------------------------------------------------------------
# Videos

def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shown(value):
    return f'{float(value):g}' if _is_number(value) else repr(value)


def check_options(factor=None, fps=None, slowmo=False, batch_size=None, max_time_error=MAX_TIME_ERROR):
    """Refuse, before any work, values interpolate_video cannot use."""
    if fps is not None and factor is not None and not slowmo:
        raise InputError('--fps and --factor exclude each other: --fps F gives the same duration at F fps '
                         '(add --slowmo to play --factor x the frames at F fps)')
    if factor is not None and not (_is_whole(factor) and factor >= 2):
        raise InputError(f'--factor must be a whole number of at least 2, got {_shown(factor)}')
    if fps is not None and not _is_number(fps):
        raise InputError(f'--fps must be a number, got {_shown(fps)}')
    if fps is not None:
        check_fps(fps)
    if batch_size is not None and not (_is_whole(batch_size) and batch_size >= 1):
        raise InputError(f'--batch-size must be a whole number of at least 1, got {_shown(batch_size)}')
    if not (_is_number(max_time_error) and Fraction(1, 2 ** MAX_DEPTH) <= max_time_error <= Fraction(1, 2)):
        raise InputError(f'--max-time-error must be between 1/{2 ** MAX_DEPTH} and 1/2 (of an input frame '
                         f'interval), got {_shown(max_time_error)}')


def _format_rate(rate):
    return f'{float(rate):.3f}'.rstrip('0').rstrip('.')


def plan_rates(clip, factor, fps, slowmo, to_folder):
    """(source_rate, timeline, rate, keep_audio): frames are sampled from the input at `timeline` frames per
    second of input time and written at `rate`; they differ only with --slowmo, and the audio goes along only
    if not."""
    source_rate = clip.fps or FOLDER_FPS
    if clip.fps is None and not to_folder:
        notice(f'the frame rate of {clip.path} is unknown; taking {FOLDER_FPS} fps')
    fps = None if fps is None else exact_fps(fps)
    timeline = fps if fps is not None and not slowmo else source_rate * (factor or 2)
    if not FPS_RANGE[0] <= timeline <= FPS_RANGE[1]:
        raise InputError(f'--factor {factor or 2} makes {_format_rate(timeline)} fps from {_format_rate(source_rate)} '
                         f'fps, outside {FPS_RANGE[0]} to {FPS_RANGE[1]} fps')
    rate = fps if fps is not None else source_rate if slowmo else timeline
    keep_audio = bool(clip.audio) and not to_folder and rate == timeline
    if clip.audio and not keep_audio:
        notice(f"audio dropped: {'a frame folder holds no audio' if to_folder else '--slowmo stretches the video'}")
    return source_rate, timeline, rate, keep_audio


class Summary(typing.NamedTuple):
    """What interpolate_video wrote; str() is the line run.py prints."""
    out: str
    frames: int
    rate: Fraction
    source_frames: int
    source_rate: Fraction
    evaluations: int

    def __str__(self):
        return (f'wrote {self.out}: {self.frames:,} frames at {_format_rate(self.rate)} fps from '
                f'{self.source_frames:,} at {_format_rate(self.source_rate)} fps, '
                f'{self.evaluations:,} network evaluations')


def _write_all(frames, sink, total, progress):
    written = 0
    with tqdm(total=total, unit='frame', disable=not progress, dynamic_ncols=True, file=side_channel) as bar:
        for frame in frames:
            sink.write(frame)
            written += 1
            bar.update()
    return written


def interpolate_video(source, out, network=None, model='l1', weights=None, factor=None, fps=None, slowmo=False,
                      scene_detect=True, padding='paper', device='auto', batch_size=None, progress=True,
                      max_time_error=MAX_TIME_ERROR):
    """Write `source` (a video file or a folder of frames) to `out` (.mp4, .mkv or .mov, or a folder for
    numbered PNGs) at another frame rate: an output frame due on a source frame copies it, one due between
    two source frames is made by SepConv.

    Without slowmo the duration is kept, and the audio with it: the output runs at `fps`, or at `factor`
    (default 2) x the input rate. With slowmo, `factor` x the frames play at the input rate, or at `fps`.
    A time between two input frames is reached by recursive bisection within max_time_error of an input
    frame interval (exactly for power-of-two factors). Frames are streamed: decoded, interpolated (batches
    of batch_size pairs; default 1 on the CPU, what fits on a GPU) and encoded one at a time, into a
    temporary file renamed to `out` only once complete. Returns a Summary (frames, rates, network evaluations)."""
    check_options(factor, fps, slowmo, batch_size, max_time_error)
    check_choice('padding', padding, PADDINGS)
    source, out = path_argument('source', source), path_argument('out', out)
    to_folder = is_frame_folder(out)
    clip = FrameSource(source)
    check_video_output(out, source)  # before plan_rates' notices: a refusal is one line
    source_rate, timeline, rate, keep_audio = plan_rates(clip, factor, fps, slowmo, to_folder)
    check_not_an_input(out, [weights and path_argument('weights', weights)])
    device = next(network.parameters()).device if network else resolve_device(device)
    batch_size = choose_batch_size(clip.width, clip.height, device, padding, batch_size)
    frames = iter(clip)
    try:
        head = list(itertools.islice(frames, 2))
        if len(head) < 2:
            raise InputError(f'{source} has {"no frames" if not head else "only one frame"}; '
                             'interpolation needs at least two')
        network = network or load_network(model, weights, device)
        if (clip.width % 2 or clip.height % 2) and not to_folder:
            notice(f'{clip.width}x{clip.height} has an odd side, which H.264 4:2:0 cannot hold: encoding 4:4:4 '
                   '(yuv444p) to keep the size; some players (browsers, QuickTime) cannot play that')
        converter = FrameRateConverter(network, timeline / source_rate, padding, batch_size,
                                       SCENE_CUT_THRESHOLD if scene_detect else None, max_time_error)
        sink = (FrameFolderWriter(out) if to_folder else
                VideoWriter(out, clip.width, clip.height, rate, source if keep_audio else None, clip.audio))
        try:
            total = math.ceil(clip.count * converter.ratio) if clip.count else None
            written = _write_all(converter.convert(itertools.chain(head, frames)), sink, total, progress)
            sink.close()
        except BaseException:
            sink.abort()
            raise
    finally:
        frames.close()  # stops the decoder
    return Summary(out, written, rate, converter.source_frames, source_rate, converter.evaluations)
