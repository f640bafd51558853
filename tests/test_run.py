import os
import re
import resource
import signal
import subprocess
import sys
import warnings
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import media
import run
from conftest import moving_square
from images import read_image
from model import interpolate
from video import FrameSource

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_clip(path, count=5, fps=10, audio=True):
    """count frames of 64x48 at fps, with a sine tone as long as the video when audio is set."""
    command = [FFMPEG, '-v', 'error', '-y', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', '64x48',
               '-framerate', str(fps), '-i', 'pipe:']
    if audio:
        command += ['-f', 'lavfi', '-i', f'sine=frequency=440:duration={count / fps}', '-c:a', 'aac']
    command += ['-c:v', 'libx264', '-pix_fmt', 'yuv420p', str(path)]
    subprocess.run(command, input=np.stack(moving_square(count)).tobytes(), check=True)
    return str(path)


def save_frames(folder, images):
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f'f{index}.png'))
    return str(folder)


def video_facts(path):
    """(frames, seconds of video) counted by decoding, fps, and the audio codec (None without audio)."""
    count, seconds = imageio_ffmpeg.count_frames_and_secs(path)
    source = FrameSource(path)
    return count, seconds, source.fps, source.audio


def call(argv, capsys):
    try:
        code = run.main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


def blend(network, one, two, padding):
    """Stands in for model.estimate where the network's output is not what a test looks at."""
    return (one + two) / 2


# ---------------------------------------------------------------------------------------------
# Video mode, end to end on the CPU

def test_video_keeps_duration_and_audio(tmp_path, random_weights, capsys):
    clip = make_clip(tmp_path / 'in.mp4', count=5, fps=10)
    out = tmp_path / 'out' / 'double.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights], capsys)
    assert code == 0, err
    count, seconds, fps, audio = video_facts(str(out))
    assert (count, fps, audio) == (10, 20, 'aac')  # the last input frame held for its interval
    assert seconds == pytest.approx(5 / 10, abs=0.01)  # the input's duration
    assert '10/10' in err and 'frame/s' in err  # the progress bar, with its rate
    assert err.splitlines()[-1] == f'wrote {out}: 10 frames at 20 fps from 5 at 10 fps, 4 network evaluations'
    source_frames, output = list(FrameSource(clip)), list(FrameSource(str(out)))
    for index, frame in enumerate(source_frames):  # every input frame is kept, in place
        assert np.abs(output[2 * index].astype(int) - frame).mean() < 4


def test_slowmo_keeps_the_rate_and_drops_audio(tmp_path, random_weights, capsys, monkeypatch):
    monkeypatch.setattr(media, 'estimate', blend)
    clip = make_clip(tmp_path / 'in.mp4', count=4, fps=10)
    out = tmp_path / 'slow.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights, '--factor', 4, '--slowmo'], capsys)
    assert code == 0, err
    count, seconds, fps, audio = video_facts(str(out))
    assert (count, fps, audio) == (16, 10, None)
    assert seconds == pytest.approx(1.6, abs=0.01)
    assert 'notice: audio dropped: --slowmo stretches the video' in err


@pytest.mark.parametrize('fps, exact', [('29.97', Fraction(2997, 100)), ('30000/1001', Fraction(30000, 1001))])
def test_fps_keeps_the_duration_and_the_rate_exact(tmp_path, random_weights, capsys, monkeypatch, fps, exact):
    monkeypatch.setattr(media, 'estimate', blend)
    clip = make_clip(tmp_path / 'in.mp4', count=3, fps=10)
    out = tmp_path / 'out.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights, '--fps', fps], capsys)
    assert code == 0, err
    count, seconds, rate, audio = video_facts(str(out))
    assert (count, rate, audio) == (9, exact, 'aac')  # ceil(3 x 2.997)
    assert abs(seconds - 0.3) < 1 / 30
    assert err.splitlines()[-1].startswith(f'wrote {out}: 9 frames at 29.97 fps from 3 at 10 fps, ')


def test_fps_with_slowmo_plays_factor_times_the_frames_at_that_rate(tmp_path, random_weights, capsys, monkeypatch):
    monkeypatch.setattr(media, 'estimate', blend)
    clip = make_clip(tmp_path / 'in.mp4', count=3, fps=10)
    out = tmp_path / 'out.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights, '--factor', 4, '--fps', 15,
                      '--slowmo'], capsys)
    assert code == 0, err
    count, seconds, rate, audio = video_facts(str(out))
    assert (count, rate, audio) == (12, 15, None)
    assert seconds == pytest.approx(0.8, abs=0.01)
    assert 'notice: audio dropped: --slowmo stretches the video' in err


def test_frame_folders_in_and_out_match_pair_mode(tmp_path, random_weights, random_network, capsys):
    images = moving_square(3, 24, 32)
    code, err = call(['--video', save_frames(tmp_path / 'in', images), '--out', tmp_path / 'out/',
                      '--weights', random_weights], capsys)
    assert code == 0, err
    names = sorted(os.listdir(tmp_path / 'out'))
    assert names == [f'{index:06d}.png' for index in range(6)]
    written = [np.asarray(Image.open(tmp_path / 'out' / name)) for name in names]
    assert np.array_equal(written[0], images[0]) and np.array_equal(written[4], images[2])
    assert np.array_equal(written[5], images[2])
    assert np.array_equal(written[1], interpolate(images[0], images[1], random_network))
    assert np.array_equal(written[3], interpolate(images[1], images[2], random_network))


def test_odd_and_tiny_frames_keep_their_size(tmp_path, random_weights, capsys):
    for width, height in ((33, 17), (1, 1)):
        folder = save_frames(tmp_path / f'in{width}', moving_square(3, height, width))
        out = tmp_path / f'odd{width}.mp4'
        code, err = call(['--video', folder, '--out', out, '--weights', random_weights], capsys)
        assert code == 0, err
        assert 'yuv444p' in err
        source = FrameSource(str(out))
        assert (source.width, source.height, source.fps, len(list(source))) == (width, height, 50, 6)


def test_help_shows_both_modes(capsys):
    with pytest.raises(SystemExit) as exit:
        run.main(['--help'])
    assert exit.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    for expected in ('pair mode', 'video mode', '--one A --two B', '--video IN', '--factor', '--slowmo',
                     '--no-scene-detect', '--fps', '--max-time-error', 'default 1/16', 'same duration'):
        assert expected in text


# ---------------------------------------------------------------------------------------------
# Pair mode

@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'I;16', '1x1'])
def test_pair_mode_converts_image_kinds(tmp_path, random_weights, capsys, mode):
    paths = []
    for index, image in enumerate(moving_square(2, 20, 30)):
        picture = Image.fromarray(image)
        if mode == 'I;16':
            picture = Image.fromarray((image[..., 0].astype(np.uint16) * 257))
        elif mode == '1x1':
            picture = picture.resize((1, 1))
        else:
            picture = picture.convert(mode)
        paths.append(tmp_path / f'{index}.png')
        picture.save(paths[-1])
    if mode == 'I;16':
        assert Image.open(paths[0]).mode.startswith('I')
    code, err = call(['--one', paths[0], '--two', paths[1], '--out', tmp_path / 'mid.png',
                      '--weights', random_weights], capsys)
    assert code == 0, err
    expected = (1, 1, 3) if mode == '1x1' else (20, 30, 3)
    assert np.asarray(Image.open(tmp_path / 'mid.png')).shape == expected


def save_deep(path, picture, kind):
    """Save the 8-bit RGB `picture` as `kind`, a picture of more than 8 bits; returns the 8-bit RGB picture it shows."""
    levels = np.asarray(Image.fromarray(picture).convert('L'))
    if kind == '16-bit grey, dark':  # the bottom of the 16-bit scale: 134 of 65535 at most
        dark = levels.astype(np.uint16) * 134 // 255
        Image.fromarray(dark).save(path)
        return np.dstack([(dark / 257).round().astype(np.uint8)] * 3)
    if kind == '16-bit RGB':
        tifffile.imwrite(path, picture.astype(np.uint16) * 256 + 128, photometric='rgb')
        return picture  # within 1 level
    if kind == '10-bit grey PGM':
        ten_bits = (levels * (1023 / 255)).round().astype('>u2')
        path.write_bytes(b'P5 %d %d 1023\n' % levels.shape[::-1] + ten_bits.tobytes())
    else:
        Image.fromarray(levels.astype(np.float32) / 255).save(path)
    return np.dstack([levels] * 3)


DEEP = {'16-bit grey, dark': 'png', '16-bit RGB': 'tif', '10-bit grey PGM': 'ppm', 'float grey': 'tif'}


@pytest.mark.parametrize('kind', DEEP)
def test_every_depth_is_read_on_its_own_scale(tmp_path, kind):
    path = tmp_path / f'picture.{DEEP[kind]}'
    shown = save_deep(path, moving_square(1, 20, 30)[0], kind)
    assert np.abs(read_image(path).astype(int) - shown).max() <= 1  # read on its own scale


def test_the_same_picture_in_8_and_16_bits_gives_the_same_middle_frame(tmp_path, random_weights, capsys):
    deep = [tmp_path / f'{index}.png' for index in range(2)]
    shown = [save_deep(path, frame, '16-bit grey, dark') for path, frame in zip(deep, moving_square(2, 20, 30))]
    eight = save_frames(tmp_path / 'eight', shown)
    middles = []
    for one, two in ((deep[0], deep[1]), (f'{eight}/f0.png', f'{eight}/f1.png')):
        out = tmp_path / f'mid{len(middles)}.png'
        code, err = call(['--one', one, '--two', two, '--out', out, '--weights', random_weights], capsys)
        assert code == 0, err
        middles.append(np.asarray(Image.open(out)).astype(int))
    assert np.abs(middles[0] - middles[1]).max() <= 1  # a 16-bit pair gives the middle of its 8-bit copy


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written

@pytest.fixture(scope='module')
def bad(tmp_path_factory):
    """Inputs that must be refused, made once in <tmp>/in (the tests leave it as it is)."""
    tmp_path = tmp_path_factory.mktemp('bad')
    folder = tmp_path / 'in'
    folder.mkdir()
    good = moving_square(2, 20, 30)
    Image.fromarray(good[0]).save(folder / 'a.png')
    Image.fromarray(good[1]).save(folder / 'b.png')
    Image.fromarray(moving_square(1, 21, 30)[0]).save(folder / 'taller.png')
    (folder / 'empty.png').write_bytes(b'')
    (folder / 'text.png').write_text('this is not an image\n')
    data = (folder / 'a.png').read_bytes()
    (folder / 'truncated.png').write_bytes(data[:len(data) // 2])
    Image.new('1', (9000, 9000)).save(folder / 'huge.png')
    make_clip(folder / 'clip.mp4', count=5, audio=False)
    data = (folder / 'clip.mp4').read_bytes()
    (folder / 'corrupt.mp4').write_bytes(data[:len(data) // 2])
    make_clip(folder / 'one.mp4', count=1, audio=False)
    subprocess.run([FFMPEG, '-v', 'error', '-f', 'lavfi', '-i', 'sine=duration=0.5', str(folder / 'tone.m4a')],
                   check=True)
    (folder / 'a-file').write_text('')
    frames = [Image.fromarray(frame) for frame in good]
    frames[0].save(folder / 'animated.gif', save_all=True, append_images=frames[1:])
    (folder / 'huge-frames').mkdir()
    for name in ('0.png', '1.png'):
        os.link(folder / 'huge.png', folder / 'huge-frames' / name)
    grey = np.asarray(Image.fromarray(good[0]).convert('L'))
    Image.fromarray(np.full(grey.shape, 200, np.float32)).save(folder / 'over-one.tif')
    Image.fromarray(np.where(grey > 200, np.nan, grey / 255).astype(np.float32)).save(folder / 'nan.tif')
    tifffile.imwrite(folder / 'signed.tif', grey.astype(np.int16))
    tifffile.imwrite(folder / 'uint32.tif', grey.astype(np.uint32))
    os.symlink('a.png', folder / 'link.png')
    return tmp_path


def pair(one, two, out='out/mid.png'):
    return ['--one', f'in/{one}', '--two', f'in/{two}', '--out', out]


def video(name, out='out/out.mp4', *options):
    return ['--video', f'in/{name}', '--out', out, *options]


BAD_INPUTS = {
    'missing file': (pair('nothing.png', 'b.png'), 'no such file: in/nothing.png'),
    'missing video': (video('nothing.mp4'), 'no such file or folder: in/nothing.mp4'),
    'directory for a file': (pair('a.png', '.'), 'expected an image file, got a directory: in/.'),
    'empty image': (pair('a.png', 'empty.png'), 'image file is empty: in/empty.png'),
    'truncated png': (pair('a.png', 'truncated.png'), 'cannot read image in/truncated.png'),
    'text named png': (pair('text.png', 'b.png'), 'cannot read image in/text.png: cannot identify image file'),
    'sizes differ': (pair('a.png', 'taller.png'), 'frames differ in size: in/a.png is 30x20, in/taller.png is 30x21'),
    'huge image': (pair('huge.png', 'huge.png'), '9000x9000 frames need about'),
    'huge frames': (video('huge-frames'), '9000x9000 frames need about'),
    'corrupt mp4': (video('corrupt.mp4'), 'cannot read video in/corrupt.mp4: Invalid data found'),
    'one frame': (video('one.mp4'), 'in/one.mp4 has only one frame; interpolation needs at least two'),
    'audio only': (video('tone.m4a'), 'cannot read video in/tone.m4a: it has no video stream'),
    'output is the input': (video('clip.mp4', 'in/clip.mp4'), 'output in/clip.mp4 would overwrite an input'),
    'output is a pair input': (pair('a.png', 'b.png', 'in/b.png'), 'output in/b.png would overwrite an input'),
    'output links to an input': (pair('a.png', 'b.png', 'in/link.png'),
                                 'output in/link.png would overwrite an input: in/a.png'),
    'output name too long': (pair('a.png', 'b.png', f"out/{'x' * 252}.png"), 'output name is too long: 256 bytes'),
    'float image over 1': (pair('over-one.tif', 'b.png'),
                           'image in/over-one.tif has values from 200 to 200; expected 0 to 1'),
    'float image with NaN': (pair('a.png', 'nan.tif'), 'image in/nan.tif has NaN'),
    'signed image': (pair('signed.tif', 'b.png'), 'cannot read image in/signed.tif: signed integer samples'),
    '32-bit image': (pair('uint32.tif', 'b.png'), 'cannot read image in/uint32.tif: 32-bit integer samples'),
    'output under a file': (video('clip.mp4', 'in/a-file/out.mp4'), 'cannot create output folder'),
    'image as video output': (video('clip.mp4', 'out/out.png'), "unsupported output video type 'out/out.png'"),
    'unknown model': (pair('a.png', 'b.png') + ['--model', 'l2'], "argument --model: invalid choice: 'l2'"),
    'unknown padding': (video('clip.mp4', 'out/out.mp4', '--padding', 'zero'), "invalid choice: 'zero'"),
    'factor 1': (video('clip.mp4', 'out/out.mp4', '--factor', '1'), '--factor must be a whole number of at least 2, '
                 'got 1'),
    'factor 0': (video('clip.mp4', 'out/out.mp4', '--factor', '0'), 'at least 2, got 0'),
    'factor -2': (video('clip.mp4', 'out/out.mp4', '--factor', '-2'), 'at least 2, got -2'),
    'factor 1024': (video('clip.mp4', 'out/out.mp4', '--factor', '1024'),
                    '--factor 1024 makes 10240 fps from 10 fps, outside 1 to 1000 fps'),
    'factor 1024 slowmo': (video('clip.mp4', 'out/out.mp4', '--factor', '1024', '--slowmo'),
                           '--factor 1024 makes 10240 fps from 10 fps, outside 1 to 1000 fps'),
    'fps 0': (video('clip.mp4', 'out/out.mp4', '--fps', '0'), '--fps must be between 1 and 1000, got 0'),
    'fps 1/0': (video('clip.mp4', 'out/out.mp4', '--fps', '1/0'), "argument --fps: invalid number value: '1/0'"),
    'fps and factor': (video('clip.mp4', 'out/out.mp4', '--fps', '30', '--factor', '2'), '--fps and --factor exclude'),
    'max time error 0': (video('clip.mp4', 'out/out.mp4', '--max-time-error', '0'),
                         '--max-time-error must be between 1/1024 and 1/2 (of an input frame interval), got 0'),
    'max time error 1': (video('clip.mp4', 'out/out.mp4', '--max-time-error', '1'), 'got 1'),
    'batch size 0': (video('clip.mp4', 'out/out.mp4', '--batch-size', '0'),
                     '--batch-size must be a whole number of at least 1, got 0'),
    'fps nan': (video('clip.mp4', 'out/out.mp4', '--fps', 'nan'), '--fps must be between 1 and 1000, got nan'),
    'fps inf': (video('clip.mp4', 'out/out.mp4', '--fps', 'inf'), '--fps must be between 1 and 1000, got inf'),
    'fps too high': (video('clip.mp4', 'out/out.mp4', '--fps', '1e9'), '--fps must be between 1 and 1000, got 1e+09'),
    'fps too low': (video('clip.mp4', 'out/out.mp4', '--fps', '0.0001'), '--fps must be between 1 and 1000, got 0.0001'),
    'animated gif': (pair('animated.gif', 'b.png'), 'in/animated.gif is an animation, not a still image'),
    'factor not a number': (video('clip.mp4', 'out/out.mp4', '--factor', 'x'), "argument --factor: invalid int value: 'x'"),
    'no output given': (['--one', 'in/a.png', '--two', 'in/b.png'], 'the following arguments are required: --out'),
    'video options in pair mode': (pair('a.png', 'b.png') + ['--slowmo'], 'video-mode options without --video'),
    'both modes': (video('clip.mp4') + ['--one', 'in/a.png'], 'give either --video or --one/--two'),
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input(case, bad, random_weights, capsys, monkeypatch):
    argv, message = BAD_INPUTS[case]
    if case.startswith('huge') and (media.available_memory(torch.device('cpu')) or 0) > media.network_memory(9000, 9000):
        pytest.skip('this machine has the memory for a 9000x9000 frame')
    monkeypatch.chdir(bad)
    before = sorted(os.listdir(bad / 'in'))
    code, err = call(argv + ['--weights', random_weights, '--device', 'cpu'], capsys)
    assert code == 2
    assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
    assert sorted(os.listdir(bad / 'in')) == before
    assert not (bad / 'out').exists() or os.listdir(bad / 'out') == []


def test_a_100_megapixel_image_is_one_line_without_pillows_warning(bad, random_weights, capsys, monkeypatch):
    if (media.available_memory(torch.device('cpu')) or 0) > media.network_memory(10000, 10000):
        pytest.skip('this machine has the memory for a 10000x10000 frame')
    monkeypatch.chdir(bad)
    Image.new('1', (10000, 10000)).save(bad / 'bomb.png')  # over Pillow's warning limit, under its error limit
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            code, err = call(pair('../bomb.png', '../bomb.png') + ['--weights', random_weights], capsys)
    finally:
        os.remove(bad / 'bomb.png')
    assert (code, err.count('\n')) == (2, 1) and '10000x10000 frames need about' in err  # refused before any work
    assert [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)] == []


def test_a_long_legal_output_name_works(tmp_path, random_weights, capsys):
    inputs = save_frames(tmp_path / 'in', moving_square(2, 20, 30))
    out = tmp_path / 'out' / ('x' * 251 + '.png')  # 255 bytes: the temporary name beside it must be shorter
    code, err = call(['--one', f'{inputs}/f0.png', '--two', f'{inputs}/f1.png', '--out', out,
                      '--weights', random_weights], capsys)
    assert code == 0, err  # a name of 255 bytes is legal
    assert os.listdir(tmp_path / 'out') == [out.name] and np.asarray(Image.open(out)).shape == (20, 30, 3)


def test_cuda_without_cuda(bad, random_weights, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    monkeypatch.chdir(bad)
    code, err = call(video('clip.mp4') + ['--weights', random_weights, '--device', 'cuda'], capsys)
    assert (code, err) == (2, 'error: --device cuda was asked for, but no CUDA device is available\n')


def test_missing_output_folders_are_created(bad, random_weights, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    code, err = call(pair('a.png', 'b.png', 'new/deeper/mid.png') + ['--weights', random_weights], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(bad / 'new' / 'deeper' / 'mid.png')).shape == (20, 30, 3)


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root writes to read-only folders')
def test_unwritable_output_folder(bad, random_weights, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    (bad / 'locked').mkdir(mode=0o500)
    code, err = call(video('clip.mp4', 'locked/out.mp4') + ['--weights', random_weights], capsys)
    assert (code, err.strip()) == (2, f'error: output folder is not writable: {bad / "locked"} (Permission denied)')


def test_an_existing_empty_output_folder_is_filled(bad, random_weights, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    monkeypatch.setattr(media, 'estimate', blend)
    (bad / 'empty-out').mkdir()
    code, err = call(video('clip.mp4', 'empty-out') + ['--weights', random_weights], capsys)
    assert code == 0, err
    assert sorted(os.listdir(bad / 'empty-out')) == [f'{index:06d}.png' for index in range(10)]


def test_output_folder_must_be_empty(bad, random_weights, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    code, err = call(video('clip.mp4', 'in/') + ['--weights', random_weights], capsys)
    assert (code, err) == (2, 'error: output folder is not empty: in/\n')


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), '--video', str(tmp_path / 'none.mp4'),
                             '--out', str(tmp_path / 'out.mp4')], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f'error: no such file or folder: {tmp_path / "none.mp4"}\n'
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Real processes: signals and a full disk

PAUSED = """
import sys, time, PIL.Image, media, run
def pause(function):
    def paused(*args, **kwargs):
        result = function(*args, **kwargs)
        print('paused', flush=True)
        time.sleep(120)
        return result
    return paused
media.estimate = pause(media.estimate)  # video and folder output: the temporary output exists by then
PIL.Image.Image.save = pause(PIL.Image.Image.save)  # image output: the temporary file is written
sys.exit(run.main(sys.argv[1:]))
"""


def noise_frames(count, height=48, width=64):
    return [np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8) for seed in range(count)]


def hidden(folder):
    return [name for name in os.listdir(folder) if name.startswith('.')]


def default_signal_handlers():
    """As in a terminal, whatever the test runner inherited (nohup ignores SIGHUP, a background shell SIGINT)."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


@pytest.mark.parametrize('output, number', [('mid.png', signal.SIGTERM), ('frames/', signal.SIGHUP),
                                            ('out.mp4', signal.SIGTERM), ('out.mp4', signal.SIGINT)])
def test_a_signal_removes_the_partial_output(tmp_path, random_weights, output, number):
    inputs = save_frames(tmp_path / 'in', moving_square(3))
    mode = ['--one', f'{inputs}/f0.png', '--two', f'{inputs}/f1.png'] if output.endswith('.png') else ['--video', inputs]
    process = subprocess.Popen([sys.executable, '-c', PAUSED, *mode, '--out', str(tmp_path / output),
                                '--weights', random_weights], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=default_signal_handlers)
    try:
        assert process.stdout.readline() == 'paused\n'
        assert len(hidden(tmp_path)) == 1  # the temporary output, about to be left behind
        process.send_signal(number)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + number
    assert err.splitlines()[-1] == f'error: stopped by {number.name}; partial output removed'  # after any progress bar
    assert err.count('error') == 1 and 'Traceback' not in err
    assert os.listdir(tmp_path) == ['in']


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk


@pytest.mark.parametrize('output', ['mid.png', 'frames/', 'out.mp4'])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, random_weights, output):
    inputs = save_frames(tmp_path / 'in', noise_frames(3))
    mode = ['--one', f'{inputs}/f0.png', '--two', f'{inputs}/f1.png'] if output.endswith('.png') else ['--video', inputs]
    result = subprocess.run([sys.executable, 'run.py', *mode, '--out', str(tmp_path / output), '--weights',
                             random_weights], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]  # after any progress bar
    # Python writes get EFBIG; ffmpeg, whose SIGXFSZ subprocess restores to the default, is stopped by it
    assert last.startswith('error: ') and last.endswith(('File too large', 'stopped by SIGXFSZ')), result.stderr
    assert result.stderr.count('error') == 1 and 'Traceback' not in result.stderr
    assert os.listdir(tmp_path) == ['in']


BLENDED = """
import sys, media, run
media.estimate = lambda network, one, two, padding: (one + two) / 2
sys.exit(run.main(sys.argv[1:]))
"""


def unwritable_stderr(kind):
    """Popen arguments for a stderr that is closed (2>&-), a pipe nobody reads (| head -c1) or a full device."""
    if kind == 'closed':
        return {'preexec_fn': lambda: os.close(2)}
    return {'stderr': subprocess.PIPE} if kind == 'broken' else {'stderr': open('/dev/full', 'w')}


@pytest.mark.parametrize('kind', ['closed', 'broken', 'full'])
def test_a_stderr_that_cannot_be_written_never_stops_the_job(tmp_path, random_weights, kind):
    if kind == 'full' and not os.path.exists('/dev/full'):
        pytest.skip('no /dev/full')
    clip = make_clip(tmp_path / 'in.mp4', count=3)
    out = str(tmp_path / 'out.mp4')
    process = subprocess.Popen([sys.executable, '-c', BLENDED, '--video', clip, '--out', out, '--weights',
                                random_weights], cwd=ROOT, stdout=subprocess.PIPE, text=True, **unwritable_stderr(kind))
    try:
        if process.stderr:
            process.stderr.close()  # before the progress bar's first line
        assert process.stdout.read() == ''  # nothing went astray onto stdout
        assert process.wait(timeout=300) == 0
    finally:
        process.kill()
    assert sorted(os.listdir(tmp_path)) == ['in.mp4', 'out.mp4']
    assert video_facts(out)[:2] == (6, pytest.approx(0.3, abs=0.01))

def test_variable_frame_rate_keeps_duration_and_audio_in_sync(tmp_path, random_weights, capsys, monkeypatch):
    clip = str(tmp_path / 'vfr.mp4')  # 25 fps with frames 5 to 39 dropped: 15 frames in 2 s, 7.5 fps on average
    subprocess.run([FFMPEG, '-v', 'error', '-f', 'lavfi', '-i', 'testsrc=size=64x48:rate=25:duration=2', '-f', 'lavfi',
                    '-i', 'sine=duration=2', '-vf', r"select='lt(n\,5)+gte(n\,40)'", '-fps_mode', 'vfr',
                    '-c:v', 'libx264', '-c:a', 'aac', '-shortest', clip], check=True)
    assert video_facts(clip)[0] == 15
    monkeypatch.setattr(media, 'estimate', blend)
    out = str(tmp_path / 'out.mp4')
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights], capsys)
    assert code == 0, err
    count, seconds, fps, audio = video_facts(out)
    assert (count, fps, audio) == (30, 15, 'aac')
    assert seconds == pytest.approx(2.0, abs=0.1)
    log = subprocess.run([FFMPEG, '-i', out, '-map', '0:a', '-f', 'null', '-'], capture_output=True, text=True).stderr
    hours, minutes, audio_seconds = re.findall(r'time=(\d+):(\d+):([\d.]+)', log)[-1]
    assert (int(hours), int(minutes), float(audio_seconds)) == (0, 0, pytest.approx(seconds, abs=0.1))


def test_rotated_video_reads_upright_without_stray_output(tmp_path, caplog):
    clip = make_clip(tmp_path / 'in.mp4', count=3, audio=False)
    rotated = str(tmp_path / 'rotated.mp4')
    subprocess.run([FFMPEG, '-v', 'error', '-display_rotation', '90', '-i', clip, '-c', 'copy', rotated], check=True)
    source = FrameSource(rotated)
    assert (source.width, source.height) == (48, 64)
    assert [frame.shape for frame in source] == [(64, 48, 3)] * 3
    assert caplog.records == []


def test_exif_orientation_is_applied(tmp_path, random_weights, capsys):
    images = moving_square(2, 20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f'{index}.jpg', exif=exif, quality=95)
    Image.fromarray(images[1]).save(tmp_path / 'stored.jpg', quality=95)
    code, err = call(['--one', tmp_path / '0.jpg', '--two', tmp_path / '1.jpg', '--out', tmp_path / 'mid.png',
                      '--weights', random_weights], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / 'mid.png')).shape == (30, 20, 3)  # portrait, as viewers show it
    code, err = call(['--one', tmp_path / '0.jpg', '--two', tmp_path / 'stored.jpg', '--out', tmp_path / 'x.png',
                      '--weights', random_weights], capsys)
    assert (code, err.count('\n')) == (2, 1) and 'frames differ in size' in err and '20x30' in err
