"""Videos and frame folders at a higher frame rate: `interpolate_video` streams frames through SepConv in
constant memory, with no frames invented across scene cuts and the frames checked against free memory."""
import itertools
import math
import sys

import numpy as np
import torch
from tqdm import tqdm

from cli import InputError, check_choice
from model import PADDINGS, estimate, load_network, resolve_device
from video import (FOLDER_FPS, FrameFolderWriter, FrameSource, VideoWriter, check_fps, check_video_output, exact_fps,
                   is_frame_folder)

SCENE_CUT_THRESHOLD = 0.3  # median over a 4 x 4 grid of blocks of the colour-histogram distance, in [0, 1]
SCENE_CUT_GRID = 4
SCENE_CUT_LEVELS = 4  # per RGB channel, so 64 colour bins per block
NETWORK_BYTES_PER_PIXEL = 2200  # peak memory per padded pixel of one pair in the network (measured on CPU)


def notice(message):
    print(f'notice: {message}', file=sys.stderr)


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
    if fps is not None:
        check_fps(fps)
    if fps is not None and slowmo:
        raise InputError('--fps and --slowmo exclude each other')
    source_fps = clip.fps or FOLDER_FPS
    if clip.fps is None and not to_folder:
        notice(f'the frame rate of {clip.path} is unknown; taking {FOLDER_FPS} fps')
    rate = exact_fps(fps) if fps is not None else source_fps * (1 if slowmo else factor)
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
    check_choice('padding', padding, PADDINGS)
    to_folder = is_frame_folder(out)
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
