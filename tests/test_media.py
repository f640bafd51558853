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
from cli import InputError
from conftest import moving_square
from images import frame_paths
from media import (SCENE_CUT_THRESHOLD, check_factor, check_memory, interpolate_frames, interpolate_video, network_memory,
                   scene_cut, scene_distance)
from video import FrameFolderWriter, FrameSource, VideoWriter

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNNY = os.path.join(ROOT, 'videos', 'bunny.mp4')


class Average(torch.nn.Module):
    """Stands in for the Network: the middle frame is the mean of the two."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, one, two):
        return (one + two) / 2


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
    output = list(interpolate_frames(spliced, Average(), 2))
    assert len(output) == 11 and np.array_equal(output[5], spliced[2])  # the cut: no blend, a repeat
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
    source = FrameSource(str(tmp_path / 'cut2.mp4'))  # the index is intact, the frames are not
    assert source.count == 20
    with pytest.raises(InputError, match='cannot decode video .*truncated or corrupt'):
        list(source)


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
    writer = VideoWriter(str(tmp_path / 'out.mp4'), 64, 48, 10, audio_from=with_audio, audio_codec='aac')
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
    with pytest.raises(InputError, match=r'cannot write output folder .*frames: Directory not empty'):
        writer.close()
    writer.abort()
    assert os.listdir(tmp_path) == ['frames'] and len(os.listdir(tmp_path / 'frames')) == 3


# ---------------------------------------------------------------------------------------------
# Interpolation

def grey(value, height=8, width=8):
    return np.full((height, width, 3), value, np.uint8)


@pytest.mark.parametrize('factor', [2, 4, 8])
def test_recursive_midpoints_give_evenly_spaced_frames(factor):
    frames = list(interpolate_frames([grey(0), grey(240), grey(0)], Average(), factor, scene_threshold=None))
    assert len(frames) == 2 * factor + 1
    expected = [240 * t // factor for t in range(factor)] + [240 - 240 * t // factor for t in range(factor + 1)]
    assert [int(frame[0, 0, 0]) for frame in frames] == expected
    assert all(frame.shape == (8, 8, 3) and frame.dtype == np.uint8 for frame in frames)


def test_at_a_scene_cut_the_earlier_frame_is_repeated():
    frames = list(interpolate_frames([grey(40), grey(48), grey(250)], Average(), 4))
    assert [int(frame[0, 0, 0]) for frame in frames] == [40, 42, 44, 46, 48, 48, 48, 48, 250]


def test_frames_are_streamed_in_windows():
    consumed = []

    def endless():
        for index in itertools.count():
            consumed.append(index)
            yield grey(index % 256)

    output = interpolate_frames(endless(), Average(), 2, batch_size=3, scene_threshold=None)
    assert len(list(itertools.islice(output, 6))) == 6
    assert len(consumed) == 4  # one window: batch_size + 1 source frames


def test_batches_match_single_pairs(random_network):
    frames = [np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8) for seed in range(4)]
    single = list(interpolate_frames(frames, random_network, 2, batch_size=1, scene_threshold=None))
    batched = list(interpolate_frames(frames, random_network, 2, batch_size=3, scene_threshold=None))
    assert len(single) == len(batched) == 7
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(single, batched)) <= 1


def test_factor_must_be_a_power_of_two():
    for factor in (2, 4, 8, 16):
        check_factor(factor)
    for factor in (0, 1, 3, 6, 2.0):
        with pytest.raises(InputError, match='power of two'):
            check_factor(factor)


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


def test_interpolate_video_api(tmp_path, random_network):
    clip = encode(tmp_path / 'in.mp4', moving_square(3, 24, 32), fps=8)
    assert interpolate_video(clip, str(tmp_path / 'out.mkv'), network=random_network, factor=4, progress=False) == 9
    source = FrameSource(str(tmp_path / 'out.mkv'))
    assert (source.width, source.height, source.fps) == (32, 24, 32)
    assert len(list(source)) == 9
