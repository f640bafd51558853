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
from model import MODELS, PADDINGS, checked_network, estimate, load_network, resolve_device
from video import (FOLDER_FPS, FPS_RANGE, FrameFolderWriter, FrameSource, VideoWriter, carried_streams, check_fps,
                   check_video_output, is_frame_folder, is_number, shown, within)

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


def _to_tensor(frame, parameter):
    """An H x W x 3 uint8 frame as a 3 x H x W tensor in [0, 1], on the device and in the precision of `parameter`."""
    return torch.tensor(frame, device=parameter.device).permute(2, 0, 1).to(parameter.dtype) / 255.0


def _to_uint8(tensor):
    return (tensor.float() * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class FrameRateConverter:
    """A stream of frames at `ratio` times its rate (a Fraction: 5/2 for 24 -> 60 fps) over the same duration.

    Output k shows input time k / ratio (in frame intervals; `times` gives each input frame's time in them where
    the rate varies), reached by recursive bisection at the time target_time picks between the two frames shown
    around it; an output on an input frame copies it, outputs past the last frame hold it, and no
    frame is invented across a scene cut (the earlier frame is repeated). The midpoints of all pairs in a
    window of batch_size + 1 frames are computed level by level in batches, each once. `evaluations`
    counts them, `source_frames` the frames read."""

    def __init__(self, network, ratio, padding='paper', batch_size=1, scene_threshold=SCENE_CUT_THRESHOLD,
                 max_time_error=MAX_TIME_ERROR, times=None):
        self.network, self.ratio, self.padding, self.batch_size = network, Fraction(ratio), padding, batch_size
        self.times = times
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
            yield from [window[-1]] * max(0, math.ceil(self.source_frames * self.ratio) - self._outputs_before_last())

    def _between(self, window):
        """The outputs from window[0] up to (not including) window[-1]."""
        first = self.source_frames - len(window)
        targets = []
        for index in range(self._outputs_before(first), self._outputs_before_last()):
            time = index / self.ratio
            pair = max(pair for pair in range(len(window) - 1) if self._time(first + pair) <= time)
            start, end = self._time(first + pair), self._time(first + pair + 1)
            targets.append((pair, target_time((time - start) / (end - start), self.depth)))
        timelines = self._timelines(window, targets)
        for pair, time in targets:
            if time == 1:
                yield window[pair + 1]
            elif time and pair in timelines:
                yield _to_uint8(timelines[pair][time])
            else:
                yield window[pair]  # on an input frame, or at a scene cut

    def _time(self, index):
        """When input frame `index` is shown, in input frame intervals."""
        return self.times[index] if self.times else index

    def _outputs_before(self, index):
        """How many outputs fall before input frame `index`."""
        return math.ceil(self._time(index) * self.ratio)

    def _outputs_before_last(self):
        """How many outputs fall before the last frame read so far."""
        return self._outputs_before(self.source_frames - 1)

    def _timelines(self, window, targets):
        """{pair: {time: frame tensor}} holding every time bisection needs for `targets`; scene cuts left out."""
        wanted = {}
        for pair, time in targets:
            if 0 < time < 1:
                wanted.setdefault(pair, []).append(time)
        parameter = next(self.network.parameters())
        timelines = {pair: {Fraction(0): _to_tensor(window[pair], parameter),
                            Fraction(1): _to_tensor(window[pair + 1], parameter)}
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

MAX_BATCH_SIZE = 1024  # pairs per network call: far more than any memory holds at useful sizes


def _is_whole(value):
    return is_number(value) and isinstance(value, numbers.Integral)


def check_options(factor=None, fps=None, slowmo=False, batch_size=None, max_time_error=MAX_TIME_ERROR, **flags):
    """Refuse, before any work, values interpolate_video cannot use, whatever their spelling (1e400, inf, 10**400);
    return fps and max_time_error as exact Fractions (a float as the decimal it prints as)."""
    for name, value in dict(slowmo=slowmo, **flags).items():
        if not isinstance(value, bool):
            raise InputError(f'{name} must be True or False, got {value!r}')
    if fps is not None and factor is not None and not slowmo:
        raise InputError('--fps and --factor exclude each other: --fps F gives the same duration at F fps '
                         '(add --slowmo to play --factor x the frames at F fps)')
    if factor is not None and not (_is_whole(factor) and factor >= 2):
        raise InputError(f'--factor must be a whole number of at least 2, got {shown(factor)}')
    if batch_size is not None and not (_is_whole(batch_size) and 1 <= batch_size <= MAX_BATCH_SIZE):
        bound = 'at least 1' if not _is_whole(batch_size) or batch_size < 1 else f'at most {MAX_BATCH_SIZE}'
        raise InputError(f'--batch-size must be a whole number of {bound}, got {shown(batch_size)}')
    error = within(max_time_error, Fraction(1, 2 ** MAX_DEPTH), Fraction(1, 2)) if is_number(max_time_error) else None
    if error is None:
        raise InputError(f'--max-time-error must be between 1/{2 ** MAX_DEPTH} and 1/2 (of an input frame '
                         f'interval), got {shown(max_time_error)}')
    return (None if fps is None else check_fps(fps)), error


def _format_rate(rate):
    return f'{float(rate):.3f}'.rstrip('0').rstrip('.') if rate < 10 ** 15 else shown(rate)


def _dropped(clip, reason):
    """One notice naming the kinds of `clip`'s streams besides its video that do not go along, and why."""
    kinds = sorted({kind for _, kind, _ in clip.streams})
    if kinds:
        notice(f"{' and '.join(kinds)} dropped: {reason}")


def plan_rates(clip, factor, fps, slowmo, to_folder):
    """(source_rate, timeline, rate, keep_streams): frames are sampled from the input at `timeline` frames per
    second of input time and written at `rate`; they differ only with --slowmo, and the input's other streams
    (audio, subtitles, ...) go along only if not. `fps` is kept exact; only rates read from files are snapped."""
    source_rate = clip.fps or FOLDER_FPS
    if clip.fps is None and not to_folder:
        notice(f'the frame rate of {clip.path} is unknown; taking {FOLDER_FPS} fps')
    timeline = fps if fps is not None and not slowmo else source_rate * (factor or 2)
    if not FPS_RANGE[0] <= timeline <= FPS_RANGE[1]:
        raise InputError(f'--factor {shown(factor or 2)} makes {_format_rate(timeline)} fps from '
                         f'{_format_rate(source_rate)} fps, outside {FPS_RANGE[0]} to {FPS_RANGE[1]} fps')
    rate = fps if fps is not None else source_rate if slowmo else timeline
    keep_streams = not to_folder and rate == timeline
    if not keep_streams:
        _dropped(clip, 'a frame folder holds no audio' if to_folder else '--slowmo stretches the video')
    return source_rate, timeline, rate, keep_streams


def picture_notices(clip, to_folder):
    """One line each for what of `clip`'s picture the output cannot carry."""
    if clip.alpha:
        notice(f'the transparency of {clip.path} is composited on white, as for images')
    colour = clip.colour or {}
    lost = ([f'its sample aspect ratio {clip.sar.numerator}:{clip.sar.denominator}'] if clip.sar != 1 else []) + (
        [f"its colour tags ({colour['primaries']}/{colour['transfer']})"]
        if colour.get('primaries', 'unknown') not in ('unknown', 'bt709')
        or colour.get('transfer', 'unknown') not in ('unknown', 'bt709', 'iec61966-2-1', 'smpte170m') else [])
    if to_folder and lost:
        notice(f"PNG frames do not carry {' or '.join(lost)}")


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

    Without slowmo the duration is kept, and the audio, subtitles and other streams the output container holds
    with it: the output runs at `fps` (kept exact), or at `factor` (default 2) x the input rate, which is read
    from the timestamps (a variable rate: its average, each frame placed at its own time). With slowmo,
    `factor` x the frames play at the input rate, or at `fps`. The sample aspect ratio and colour tags are
    carried; transparency is composited on white. Every option is checked before the video is read.
    A time between two input frames is reached by recursive bisection within max_time_error of an input
    frame interval (exactly for power-of-two factors). Frames are streamed: decoded, interpolated (batches
    of batch_size pairs; default 1 on the CPU, what fits on a GPU) and encoded one at a time, into a
    temporary file renamed to `out` only once complete. Returns a Summary (frames, rates, network evaluations)."""
    fps, max_time_error = check_options(factor, fps, slowmo, batch_size, max_time_error, scene_detect=scene_detect,
                                        progress=progress)
    check_choice('padding', padding, PADDINGS)
    check_choice('model', model, MODELS)
    network = None if network is None else checked_network(network)
    device = next(network.parameters()).device if network else resolve_device(device)
    source, out = path_argument('source', source), path_argument('out', out)
    to_folder = is_frame_folder(out)
    with FrameSource(source) as clip:
        if clip.count < 2:
            raise InputError(f'{source} has {"no frames" if not clip.count else "only one frame"}; '
                             'interpolation needs at least two')
        check_video_output(out, source)  # before plan_rates' notices: a refusal is one line
        source_rate, timeline, rate, keep_streams = plan_rates(clip, factor, fps, slowmo, to_folder)
        check_not_an_input(out, [weights and path_argument('weights', weights)])
        batch_size = choose_batch_size(clip.width, clip.height, device, padding, batch_size)
        streams = []
        if keep_streams:
            streams, dropped = carried_streams(clip, out)
            if dropped:
                notice(f"{out} cannot hold {', '.join(dropped)}: dropped")
        picture_notices(clip, to_folder)
        network = network or load_network(model, weights, device)
        if (clip.width % 2 or clip.height % 2) and not to_folder:
            notice(f'{clip.width}x{clip.height} has an odd side, which H.264 4:2:0 cannot hold: encoding 4:4:4 '
                   '(yuv444p) to keep the size; some players (browsers, QuickTime) cannot play that')
        converter = FrameRateConverter(network, timeline / source_rate, padding, batch_size,
                                       SCENE_CUT_THRESHOLD if scene_detect else None, max_time_error, clip.times)
        written = _convert(clip, converter, out, to_folder, rate, streams, progress)
    return Summary(out, written, rate, converter.source_frames, source_rate, converter.evaluations)


def _convert(clip, converter, out, to_folder, rate, streams, progress):
    """Stream `clip` through `converter` into `out`, whole or not at all; the number of frames written."""
    frames = iter(clip)
    try:
        head = list(itertools.islice(frames, 2))
        if len(head) < 2:
            raise InputError(f'{clip.path} has {"no frames" if not head else "only one frame"}; '
                             'interpolation needs at least two')
        sink = (FrameFolderWriter(out) if to_folder else
                VideoWriter(out, clip.width, clip.height, rate, clip, streams))
        try:
            total = math.ceil(clip.count * converter.ratio)
            written = _write_all(converter.convert(itertools.chain(head, frames)), sink, total, progress)
            sink.close()
        except BaseException:
            sink.abort()
            raise
    finally:
        frames.close()  # stops the decoder
    return written
