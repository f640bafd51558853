import itertools
import os
import re
import stat
import subprocess
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import media
import run
from cli import InputError
from conftest import moving_square
from images import frame_paths
from model import Network
from media import (SCENE_CUT_THRESHOLD, FrameRateConverter, bisection_depth, bisection_times, check_memory,
                   interpolate_video, network_memory, scene_cut, scene_distance, target_time)
from video import FrameFolderWriter, FrameSource, VideoWriter

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNNY = os.path.join(ROOT, 'videos', 'bunny.mp4')


class Average(Network):
    """Stands in for the Network: the middle frame is the mean of the two."""

    def __init__(self):
        torch.nn.Module.__init__(self)  # none of the Network's layers
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, one, two, size=None):
        return (one + two) / 2


SQUARE = 12  # side of the white square of square_frames, in pixels


def square_columns(start, length):
    """How much of each of `length` pixel columns a square side from `start` to start + SQUARE covers."""
    cells, start = torch.arange(length, dtype=torch.float64), torch.as_tensor(start, dtype=torch.float64)
    return (torch.minimum(cells + 1, start + SQUARE) - torch.maximum(cells, start)).clamp(0, 1)


def draw_square(y, x, height, width):
    """3 x height x width in [0, 1]: black, with a white square centred at (y, x), edges anti-aliased exactly."""
    square = square_columns(y - SQUARE / 2, height)[:, None] * square_columns(x - SQUARE / 2, width)[None, :]
    return square.expand(3, height, width)


def square_centres(frames):
    """(y, x) centres of brightness of N x 3 x H x W frames, in pixels from the top left corner."""
    weights = frames.double().mean(1)
    total = weights.sum((1, 2))
    rows, columns = (torch.arange(size, dtype=torch.float64) + 0.5 for size in weights.shape[1:])
    return torch.stack([(weights.sum(2) * rows).sum(1) / total, (weights.sum(1) * columns).sum(1) / total], 1)


def centres_of(frames):
    return square_centres(torch.tensor(np.stack(frames)).permute(0, 3, 1, 2)).numpy()


def square_frames(count, speed=4, start=10, size=64):
    """count frames of size x size: a white square on black moving `speed` pixels right per frame."""
    return [(draw_square(size / 2, start + speed * index, size, size) * 255).round().byte().permute(1, 2, 0).numpy()
            for index in range(count)]


class MovingSquare(Network):
    """Stands in for the Network on square_frames: the middle frame is the square at the mean of the two
    squares' centres, so the centre of every output tells exactly which time bisection reached. `pairs`
    counts the pairs it was given."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.pairs = 0

    def forward(self, one, two, size=None):
        self.pairs += len(one)
        height, width = one.shape[-2:]
        centres = (square_centres(one) + square_centres(two)) / 2
        return torch.stack([draw_square(y, x, height, width) for y, x in centres]).to(one.dtype)


def encode(path, frames, fps=10, audio=False, faststart=False):
    """Encode frames (and a sine tone as long as them) with ffmpeg directly, independently of media.py."""
    height, width = frames[0].shape[:2]
    command = [FFMPEG, '-v', 'error', '-y', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', f'{width}x{height}',
               '-framerate', str(fps), '-i', 'pipe:']
    if audio:
        seconds = float(len(frames) / Fraction(fps))
        command += ['-f', 'lavfi', '-i', f'sine=frequency=440:duration={seconds}', '-c:a', 'aac']
    command += ['-c:v', 'libx264', '-crf', '10', '-pix_fmt', 'yuv420p' if width % 2 == height % 2 == 0 else 'yuv444p']
    command += (['-movflags', '+faststart'] if faststart else []) + [str(path)]
    subprocess.run(command, input=np.stack(frames).tobytes(), check=True)
    return str(path)


def matches_in_order(decoded, frames):
    """Each decoded frame is within lossy-coding error of its original and closest to it."""
    errors = np.array([[np.abs(a.astype(int) - b).mean() for b in frames] for a in decoded])
    in_order = list(errors.argmin(1)) == list(range(len(frames)))
    return len(decoded) == len(frames) and errors.diagonal().max() < 4 and in_order


def leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith('.')]


# ---------------------------------------------------------------------------------------------
# Frame folders and scene cuts

def test_frame_folder_order_is_natural_and_skips_other_files(tmp_path):
    for name in ('f10.png', 'f2.png', 'f1.png', '.f0.png', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert [os.path.basename(path) for path in frame_paths(str(tmp_path))] == ['f1.png', 'f2.png', 'f10.png']


def test_scene_distance_extremes():
    black, white = np.zeros((90, 160, 3), np.uint8), np.full((90, 160, 3), 255, np.uint8)
    assert scene_distance(black, black) == 0.0
    assert scene_distance(black, white) == 1.0
    assert scene_distance(np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)) == 1.0


def test_a_change_in_a_few_blocks_is_motion_and_in_most_blocks_a_cut():
    frame = np.zeros((128, 128, 3), np.uint8)
    moved = frame.copy()
    moved[:64, :32] = 255  # 2 of the 16 blocks
    assert scene_distance(frame, moved) == 0.0
    changed = frame.copy()
    changed[:96] = 255  # 12 of the 16 blocks
    assert scene_distance(frame, changed) == 1.0 and scene_cut(frame, changed)


def first_frames(path, count):
    source = FrameSource(path)
    frames = iter(source)
    try:
        return list(itertools.islice(frames, count))
    finally:
        frames.close()


def test_threshold_does_not_fire_on_real_footage_but_fires_on_spliced_clips(shared_data):
    car_turn = list(FrameSource(os.path.join(shared_data, 'videos', 'car-turn.mp4')))
    bunny = list(FrameSource(BUNNY))
    for clip in (car_turn, bunny):
        distances = [scene_distance(one, two) for one, two in zip(clip, clip[1:])]
        assert max(distances) < SCENE_CUT_THRESHOLD / 2
    bottles = first_frames(os.path.join(shared_data, 'train-videos', 'bottle-detection.mp4'), 1)[0]
    assert bottles.shape == car_turn[-1].shape
    assert scene_distance(car_turn[-1], bottles) > 2 * SCENE_CUT_THRESHOLD
    assert scene_cut(bunny[-1], np.asarray(Image.fromarray(car_turn[0]).resize((320, 180))))
    spliced = car_turn[:3] + first_frames(os.path.join(shared_data, 'train-videos', 'bottle-detection.mp4'), 3)
    output = converted(spliced, 2)
    assert len(output) == 12 and np.array_equal(output[5], spliced[2])  # the cut: no blend, a repeat
    assert all(not np.array_equal(output[k], output[k - 1]) for k in (1, 3, 7, 9))


# ---------------------------------------------------------------------------------------------
# Reading

def test_video_source_reports_and_decodes_every_frame(tmp_path):
    frames = moving_square(5)
    source = FrameSource(encode(tmp_path / 'clip.mp4', frames, fps=10, audio=True))
    assert (source.width, source.height, source.fps, source.count, source.audio) == (64, 48, 10, 5, 'aac')
    decoded = list(source)
    assert matches_in_order(decoded, frames)
    assert all(frame.dtype == np.uint8 and frame.shape == (48, 64, 3) and frame.flags.writeable for frame in decoded)


def test_ntsc_rate_is_exact(tmp_path):
    source = FrameSource(encode(tmp_path / 'ntsc.mp4', moving_square(3), fps='30000/1001'))
    assert source.fps == Fraction(30000, 1001) and source.audio is None


def test_folder_source(tmp_path):
    for index, frame in enumerate(moving_square(3)):
        Image.fromarray(frame).save(tmp_path / f'frame{index * 5}.png')
    source = FrameSource(str(tmp_path))
    assert (source.width, source.height, source.fps, source.count, source.folder) == (64, 48, 25, 3, True)
    assert all(np.array_equal(a, b) for a, b in zip(source, moving_square(3)))
    Image.new('RGB', (10, 10)).save(tmp_path / 'frame7.png')
    with pytest.raises(InputError, match=r'frames differ in size: .*frame7.png is 10x10'):
        list(FrameSource(str(tmp_path)))


def test_unreadable_videos_give_one_line_reasons(tmp_path):
    with pytest.raises(InputError, match='no such file or folder'):
        FrameSource(str(tmp_path / 'missing.mp4'))
    (tmp_path / 'empty.mp4').write_bytes(b'')
    with pytest.raises(InputError, match='video file is empty'):
        FrameSource(str(tmp_path / 'empty.mp4'))
    (tmp_path / 'text.mp4').write_text('not a video\n')
    with pytest.raises(InputError, match='cannot read video .*text.mp4: Invalid data found'):
        FrameSource(str(tmp_path / 'text.mp4'))
    subprocess.run([FFMPEG, '-v', 'error', '-f', 'lavfi', '-i', 'sine=duration=0.5', str(tmp_path / 'tone.m4a')],
                   check=True)
    with pytest.raises(InputError, match='no video stream'):
        FrameSource(str(tmp_path / 'tone.m4a'))
    (tmp_path / 'empty-folder').mkdir()
    with pytest.raises(InputError, match='no images'):
        FrameSource(str(tmp_path / 'empty-folder'))


def noisy_clip(path, faststart):
    frames = [np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8) for seed in range(20)]
    return encode(path, frames, faststart=faststart)


def test_truncated_videos_are_refused(tmp_path):
    data = open(noisy_clip(tmp_path / 'index-last.mp4', faststart=False), 'rb').read()
    (tmp_path / 'cut1.mp4').write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match='cannot read video'):
        FrameSource(str(tmp_path / 'cut1.mp4'))
    data = open(noisy_clip(tmp_path / 'index-first.mp4', faststart=True), 'rb').read()
    (tmp_path / 'cut2.mp4').write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match='cannot decode video .*truncated or corrupt'):  # the index is intact,
        FrameSource(str(tmp_path / 'cut2.mp4'))  # the frames are not: refused before any work


# ---------------------------------------------------------------------------------------------
# Writing

def test_video_writer_round_trip_keeps_exact_size(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    for width, height in ((64, 48), (33, 17)):
        frames = moving_square(4, height, width)
        path = str(tmp_path / f'{width}x{height}.mp4')
        writer = VideoWriter(path, width, height, Fraction(25, 2))
        for frame in frames:
            writer.write(frame)
        writer.close()
        assert leftovers(tmp_path) == []
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
        source = FrameSource(path)
        assert (source.width, source.height, source.fps) == (width, height, Fraction(25, 2))
        assert matches_in_order(list(source), frames)


def test_video_writer_muxes_audio_and_abort_leaves_nothing(tmp_path):
    with_audio = encode(tmp_path / 'in.mp4', moving_square(5), audio=True)
    source = FrameSource(with_audio)
    writer = VideoWriter(str(tmp_path / 'out.mp4'), 64, 48, 10, source, [(1, 'copy')])
    for frame in moving_square(5):
        writer.write(frame)
    writer.close()
    assert FrameSource(str(tmp_path / 'out.mp4')).audio == 'aac'
    writer = VideoWriter(str(tmp_path / 'aborted.mp4'), 64, 48, 10)
    writer.write(moving_square(1)[0])
    writer.abort()
    assert sorted(os.listdir(tmp_path)) == ['in.mp4', 'out.mp4']


def test_frame_folder_writer(tmp_path):
    writer = FrameFolderWriter(str(tmp_path / 'frames'))
    for frame in moving_square(3):
        writer.write(frame)
    assert not (tmp_path / 'frames').exists()
    writer.close()
    assert sorted(os.listdir(tmp_path / 'frames')) == ['000000.png', '000001.png', '000002.png']
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'frames' / '000002.png')), moving_square(3)[2])
    writer = FrameFolderWriter(str(tmp_path / 'other'))
    writer.write(moving_square(1)[0])
    writer.abort()
    assert os.listdir(tmp_path) == ['frames']
    writer = FrameFolderWriter(str(tmp_path / 'frames'))  # a second run into the folder the first one filled
    writer.write(moving_square(1)[0])
    with pytest.raises(InputError, match=r'output folder is not empty: .*frames'):
        writer.close()
    writer.abort()
    assert os.listdir(tmp_path) == ['frames'] and len(os.listdir(tmp_path / 'frames')) == 3


# ---------------------------------------------------------------------------------------------
# Interpolation

def grey(value, height=8, width=8):
    return np.full((height, width, 3), value, np.uint8)


def converted(frames, ratio, network=None, **options):
    """The frames FrameRateConverter makes of `frames` at `ratio` x their rate; Average stands in by default."""
    return list(FrameRateConverter(network or Average(), ratio, **options).convert(frames))


def test_bisection_times():
    depths = [bisection_depth(error) for error in (Fraction(1, 2), Fraction(1, 4), 0.1, Fraction(1, 16), 2 ** -10)]
    assert depths == [0, 1, 3, 3, 9]
    assert target_time(Fraction(2, 5), 3) == Fraction(3, 8)  # 24 -> 60 fps: 0.4 of an interval becomes 0.375
    assert target_time(Fraction(1, 3), 3) == Fraction(3, 8) and target_time(Fraction(19, 20), 3) == 1
    assert target_time(Fraction(1, 32), 3) == Fraction(1, 32)  # dyadic times are kept: powers of two stay exact
    assert bisection_times([Fraction(3, 8), Fraction(3, 4), Fraction(0)]) == {Fraction(1, 2), Fraction(1, 4),
                                                                               Fraction(3, 8), Fraction(3, 4)}


@pytest.mark.parametrize('factor', [2, 4, 8, 16])
def test_power_of_two_factors_are_exact(factor):
    frames = converted([grey(0), grey(240), grey(0)], factor, scene_threshold=None)
    expected = [240 * t // factor for t in range(factor)] + [240 - 240 * t // factor for t in range(factor)]
    assert [int(frame[0, 0, 0]) for frame in frames] == expected + [0] * factor  # the last frame held for its interval
    assert all(frame.shape == (8, 8, 3) and frame.dtype == np.uint8 for frame in frames)


@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('ratio, count', [(Fraction(6, 5), 12), (Fraction(4, 5), 8), (3, 30), (Fraction(5, 2), 25)])
def test_any_rate_puts_the_square_within_the_timing_bound(ratio, count, batch_size):
    """25 -> 30 fps, 30 -> 24 fps (fewer frames), --factor 3 and 24 -> 60 fps, on 10 frames of a square moving
    4 px a frame: ceil(10 x ratio) frames, each showing the square within 1/16 of a frame interval (0.25 px) of
    where it is at that frame's time; after the last input frame, that frame is held."""
    network = MovingSquare()
    converter = FrameRateConverter(network, ratio, batch_size=batch_size)
    centres = centres_of(list(converter.convert(square_frames(10))))
    assert len(centres) == count
    exact = [10 + 4 * min(index / Fraction(ratio), 9) for index in range(count)]
    assert np.abs(centres[:, 1] - np.array(exact, float)).max() <= 4 / 16 + 0.02  # 0.02 px: uint8 edges
    assert np.abs(centres[:, 0] - 32).max() < 0.02
    assert 0 < converter.evaluations == network.pairs <= 7 * 9


def audio_seconds(path):
    log = subprocess.run([FFMPEG, '-i', path, '-map', '0:a', '-f', 'null', '-'], capture_output=True, text=True).stderr
    hours, minutes, seconds = re.findall(r'time=(\d+):(\d+):([\d.]+)', log)[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_24_to_60_fps_keeps_duration_and_audio_and_computes_each_midpoint_once(tmp_path, monkeypatch, capsys):
    clip = encode(tmp_path / 'in.mp4', square_frames(12), fps=24, audio=True)  # 0.5 s
    network = MovingSquare()
    monkeypatch.setattr(media, 'load_network', lambda *args, **kwargs: network)
    out = str(tmp_path / 'out.mp4')
    assert run.main(['--video', clip, '--out', out, '--fps', '60']) == 0
    # Each pair needs 4 midpoints: 1/2, 1/4, 3/8 and 3/4 for outputs at 0.4 and 0.8 of it, 1/2, 3/4, 5/8 and 1/4
    # for outputs at 0.6 and 0.2; 11 pairs make 44, where each output's recursion on its own would take 55.
    assert capsys.readouterr().err.splitlines()[-1] == f'wrote {out}: 30 frames at 60 fps from 12 at 24 fps, ' \
                                                       '44 network evaluations'
    assert network.pairs == 44
    count, seconds = imageio_ffmpeg.count_frames_and_secs(out)
    assert abs(count - round(0.5 * 60)) <= 1 and abs(seconds - 0.5) <= 1 / 24
    assert FrameSource(out).audio == 'aac' and abs(audio_seconds(out) - audio_seconds(clip)) <= 1 / 24
    centres = centres_of(list(FrameSource(out)))
    exact = [10 + 4 * min(index * 24 / 60, 11) for index in range(30)]
    assert np.abs(centres[:, 1] - exact).max() <= 4 / 16 + 0.05  # 0.05 px: H.264


def test_at_a_scene_cut_the_earlier_frame_is_repeated():
    frames = converted([grey(40), grey(48), grey(250)], 4)
    assert [int(frame[0, 0, 0]) for frame in frames] == [40, 42, 44, 46, 48, 48, 48, 48, 250, 250, 250, 250]


def test_frames_are_streamed_in_windows():
    consumed = []

    def endless():
        for index in itertools.count():
            consumed.append(index)
            yield grey(index % 256)

    output = FrameRateConverter(Average(), 2, batch_size=3, scene_threshold=None).convert(endless())
    assert len(list(itertools.islice(output, 6))) == 6
    assert len(consumed) == 4  # one window: batch_size + 1 source frames


def test_batches_match_single_pairs(random_network):
    frames = [np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8) for seed in range(4)]
    single = converted(frames, 2, random_network, batch_size=1, scene_threshold=None)
    batched = converted(frames, 2, random_network, batch_size=3, scene_threshold=None)
    assert len(single) == len(batched) == 8
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(single, batched)) <= 1


@pytest.mark.parametrize('options, message', [
    ({'batch_size': -1}, '--batch-size must be a whole number of at least 1, got -1'),
    ({'batch_size': 2.5}, '--batch-size must be a whole number of at least 1, got 2.5'),
    ({'fps': '30'}, "--fps must be a number, got '30'"),
    ({'fps': 0}, '--fps must be between 1 and 1000, got 0'),
    ({'fps': True}, '--fps must be a number, got True'),
    ({'factor': 1}, '--factor must be a whole number of at least 2, got 1'),
    ({'factor': 3.0}, '--factor must be a whole number of at least 2, got 3'),
    ({'fps': 30, 'factor': 2}, '--fps and --factor exclude each other'),
    ({'max_time_error': 0}, '--max-time-error must be between 1/1024 and 1/2'),
    ({'max_time_error': float('nan')}, '--max-time-error must be between 1/1024 and 1/2'),
    ({'padding': 'zero'}, "unknown padding 'zero'"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(InputError, match=re.escape(message)):  # before the missing input is even looked for
        interpolate_video(str(tmp_path / 'missing.mp4'), str(tmp_path / 'out.mp4'), network=Average(), **options)
    with pytest.raises(InputError, match='out must be a path, got int'):
        interpolate_video(str(tmp_path / 'missing.mp4'), 3, network=Average())
    assert os.listdir(tmp_path) == []


def test_memory_estimate_and_refusal():
    assert network_memory(64, 48) == 128 * 128 * media.NETWORK_BYTES_PER_PIXEL
    assert network_memory(1280, 720, pairs=2) == 2 * 1408 * 896 * media.NETWORK_BYTES_PER_PIXEL
    assert network_memory(1280, 720, padding='improved') == 1280 * 768 * media.NETWORK_BYTES_PER_PIXEL
    available = media.available_memory(torch.device('cpu'))
    if not os.path.exists('/proc/meminfo'):
        pytest.skip('no /proc/meminfo to check the figure against')
    meminfo = int(re.search(r'^MemAvailable:\s+(\d+) kB', open('/proc/meminfo').read(), re.MULTILINE)[1]) * 1024
    assert 2 ** 20 < available <= 1.01 * meminfo  # RAM available now, within any cgroup limit: not total, not swap
    check_memory(64, 48, torch.device('cpu'))
    with pytest.raises(InputError, match=r'100000x100000 frames need about .* GiB .* of RAM is available'):
        check_memory(100000, 100000, torch.device('cpu'))


def test_interrupted_runs_leave_no_output(tmp_path, monkeypatch):
    clip = encode(tmp_path / 'in.mp4', moving_square(4))
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return (args[1] + args[2]) / 2

    monkeypatch.setattr(media, 'estimate', interrupted)
    for out in ('out.mp4', 'frames/'):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            interpolate_video(clip, str(tmp_path / out), network=Average(), progress=False)
        assert sorted(os.listdir(tmp_path)) == ['in.mp4']


def test_interpolate_video_api(tmp_path):
    clip = encode(tmp_path / 'in.mp4', moving_square(3, 24, 32), fps=8)
    summary = interpolate_video(clip, tmp_path / 'out.mkv', network=Average(), factor=4, progress=False)
    assert summary == (str(tmp_path / 'out.mkv'), 12, 32, 3, 8, 6)  # 3 midpoints a pair
    assert str(summary) == f'wrote {tmp_path / "out.mkv"}: 12 frames at 32 fps from 3 at 8 fps, 6 network evaluations'
    source = FrameSource(str(tmp_path / 'out.mkv'))
    assert (source.width, source.height, source.fps) == (32, 24, 32)
    assert len(list(source)) == 12
    (tmp_path / 'weights.mov').write_bytes(b'weights')
    with pytest.raises(InputError, match='would overwrite an input'):
        interpolate_video(clip, tmp_path / 'weights.mov', weights=tmp_path / 'weights.mov', progress=False)
    assert (tmp_path / 'weights.mov').read_bytes() == b'weights'
