import os
import re
import resource
import signal
import subprocess
import sys
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import media
import run
from conftest import moving_square
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


# ---------------------------------------------------------------------------------------------
# Video mode, end to end on the CPU

def test_video_keeps_duration_and_audio(tmp_path, random_weights, capsys):
    clip = make_clip(tmp_path / 'in.mp4', count=5, fps=10)
    out = tmp_path / 'out' / 'double.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights], capsys)
    assert code == 0, err
    count, seconds, fps, audio = video_facts(str(out))
    assert (count, fps, audio) == (9, 20, 'aac')
    assert seconds == pytest.approx(9 / 20, abs=0.01)
    assert abs(seconds - 5 / 10) < 1 / 10  # the input's duration, up to one input frame
    assert '9/9' in err and 'frame/s' in err  # the progress bar, with its rate
    source_frames, output = list(FrameSource(clip)), list(FrameSource(str(out)))
    for index, frame in enumerate(source_frames):  # every input frame is kept, in place
        assert np.abs(output[2 * index].astype(int) - frame).mean() < 4


def test_slowmo_keeps_the_rate_and_drops_audio(tmp_path, random_weights, capsys):
    clip = make_clip(tmp_path / 'in.mp4', count=4, fps=10)
    out = tmp_path / 'slow.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights, '--factor', 4, '--slowmo'], capsys)
    assert code == 0, err
    count, seconds, fps, audio = video_facts(str(out))
    assert (count, fps, audio) == (13, 10, None)
    assert seconds == pytest.approx(1.3, abs=0.01)
    assert 'notice: audio dropped: --slowmo stretches the video' in err


def test_explicit_fps(tmp_path, random_weights, capsys):
    clip = make_clip(tmp_path / 'in.mp4', count=3, fps=10)
    out = tmp_path / 'out.mp4'
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights, '--fps', 29.97], capsys)
    assert code == 0, err
    count, _, fps, audio = video_facts(str(out))
    assert (count, fps, audio) == (5, Fraction(30000, 1001), None)
    assert 'notice: audio dropped: 29.97 fps changes the duration' in err


def test_frame_folders_in_and_out_match_pair_mode(tmp_path, random_weights, random_network, capsys):
    images = moving_square(3, 24, 32)
    code, err = call(['--video', save_frames(tmp_path / 'in', images), '--out', tmp_path / 'out/',
                      '--weights', random_weights], capsys)
    assert code == 0, err
    names = sorted(os.listdir(tmp_path / 'out'))
    assert names == [f'{index:06d}.png' for index in range(5)]
    written = [np.asarray(Image.open(tmp_path / 'out' / name)) for name in names]
    assert np.array_equal(written[0], images[0]) and np.array_equal(written[4], images[2])
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
        assert (source.width, source.height, source.fps, len(list(source))) == (width, height, 50, 5)


def test_help_shows_both_modes(capsys):
    with pytest.raises(SystemExit) as exit:
        run.main(['--help'])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for expected in ('pair mode', 'video mode', '--one A --two B', '--video IN', '--factor', '--slowmo',
                     '--no-scene-detect', '--fps'):
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
    'output is the input': (video('clip.mp4', 'in/clip.mp4'), 'output in/clip.mp4 would overwrite the input'),
    'output is a pair input': (pair('a.png', 'b.png', 'in/b.png'), 'output in/b.png would overwrite an input'),
    'output under a file': (video('clip.mp4', 'in/a-file/out.mp4'), 'cannot create output folder'),
    'image as video output': (video('clip.mp4', 'out/out.png'), "unsupported output video type 'out/out.png'"),
    'unknown model': (pair('a.png', 'b.png') + ['--model', 'l2'], "argument --model: invalid choice: 'l2'"),
    'unknown padding': (video('clip.mp4', 'out/out.mp4', '--padding', 'zero'), "invalid choice: 'zero'"),
    'factor 3': (video('clip.mp4', 'out/out.mp4', '--factor', '3'), '--factor must be a power of two'),
    'fps nan': (video('clip.mp4', 'out/out.mp4', '--fps', 'nan'), '--fps must be between 1 and 1000, got nan'),
    'fps inf': (video('clip.mp4', 'out/out.mp4', '--fps', 'inf'), '--fps must be between 1 and 1000, got inf'),
    'fps too high': (video('clip.mp4', 'out/out.mp4', '--fps', '1e9'), '--fps must be between 1 and 1000, got 1e+09'),
    'fps too low': (video('clip.mp4', 'out/out.mp4', '--fps', '0.0001'), '--fps must be between 1 and 1000, got 0.0001'),
    'animated gif': (pair('animated.gif', 'b.png'), 'in/animated.gif is an animation, not a still image'),
    'factor not a number': (video('clip.mp4', 'out/out.mp4', '--factor', 'x'), "argument --factor: invalid int value: 'x'"),
    'no output given': (['--one', 'in/a.png', '--two', 'in/b.png'], 'the following arguments are required: --out'),
    'fps and slowmo': (video('clip.mp4', 'out/out.mp4', '--fps', '30', '--slowmo'), 'exclude each other'),
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
    assert (code, err.strip()) == (2, f'error: output folder is not writable: {bad / "locked"}')


def test_an_existing_empty_output_folder_is_filled(bad, random_weights, capsys, monkeypatch):
    monkeypatch.chdir(bad)
    (bad / 'empty-out').mkdir()
    code, err = call(video('clip.mp4', 'empty-out') + ['--weights', random_weights], capsys)
    assert code == 0, err
    assert sorted(os.listdir(bad / 'empty-out')) == [f'{index:06d}.png' for index in range(9)]


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


@pytest.mark.parametrize('output, number', [('mid.png', signal.SIGTERM), ('frames/', signal.SIGHUP),
                                            ('out.mp4', signal.SIGTERM), ('out.mp4', signal.SIGINT)])
def test_a_signal_removes_the_partial_output(tmp_path, random_weights, output, number):
    inputs = save_frames(tmp_path / 'in', moving_square(3))
    mode = ['--one', f'{inputs}/f0.png', '--two', f'{inputs}/f1.png'] if output.endswith('.png') else ['--video', inputs]
    process = subprocess.Popen([sys.executable, '-c', PAUSED, *mode, '--out', str(tmp_path / output),
                                '--weights', random_weights], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# ---------------------------------------------------------------------------------------------
# Videos and images that are not what they seem

def test_variable_frame_rate_keeps_duration_and_audio_in_sync(tmp_path, random_weights, capsys):
    clip = str(tmp_path / 'vfr.mp4')  # 25 fps with frames 5 to 39 dropped: 15 frames in 2 s, 7.5 fps on average
    subprocess.run([FFMPEG, '-v', 'error', '-f', 'lavfi', '-i', 'testsrc=size=64x48:rate=25:duration=2', '-f', 'lavfi',
                    '-i', 'sine=duration=2', '-vf', r"select='lt(n\,5)+gte(n\,40)'", '-fps_mode', 'vfr',
                    '-c:v', 'libx264', '-c:a', 'aac', '-shortest', clip], check=True)
    assert video_facts(clip)[0] == 15
    out = str(tmp_path / 'out.mp4')
    code, err = call(['--video', clip, '--out', out, '--weights', random_weights], capsys)
    assert code == 0, err
    count, seconds, fps, audio = video_facts(out)
    assert (count, fps, audio) == (29, 15, 'aac')
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
