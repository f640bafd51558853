"""What a player uses to show a video is carried from input to output: frame timing, sample aspect ratio, colour
tags, every stream the output container holds, transparency as images treat it; and the numbers the user gives
are checked, and kept exact when they are rates."""
import copy
import decimal
import os
import re
import subprocess
from fractions import Fraction

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import media
import run
from cli import InputError
from media import interpolate_video
from model import interpolate
from conftest import moving_square
from test_media import Average, MovingSquare, centres_of, square_frames
from video import FrameSource, snap_rate

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*arguments, frames=None, rate=20):
    """Run ffmpeg on `arguments`; `frames` (RGB, at `rate` fps) come in on a pipe as the first input."""
    piped = ['-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', f'{frames[0].shape[1]}x{frames[0].shape[0]}',
             '-framerate', str(rate), '-i', 'pipe:'] if frames is not None else []
    subprocess.run([FFMPEG, '-v', 'error', '-y', *piped, *[str(argument) for argument in arguments]],
                   input=None if frames is None else np.stack(frames).tobytes(), check=True)


def clip(path, *options, count=10, audio=False, rate=20):
    """`count` frames of a colour gradient with a moving square at `rate` fps, H.264 with `options`, and a tone as long as them."""
    tone = ['-f', 'lavfi', '-i', f'sine=duration={count / rate}', '-c:a', 'aac'] if audio else []
    ffmpeg(*tone, '-c:v', 'libx264', *options, path, frames=moving_square(count), rate=rate)
    return str(path)


def tags(path):
    """{stream index: (type, codec)} and the video's colour description, as ffmpeg reads `path`."""
    log = subprocess.run([FFMPEG, '-hide_banner', '-i', str(path)], capture_output=True, text=True).stderr
    streams = {int(index): (kind.lower(), codec) for index, kind, codec in
               re.findall(r'Stream #0:(\d+)\S*: (\w+): (\w+)', log)}
    return streams, re.search(r'Video: .*?, \w+\(([^)]*)\)', log)[1]


def call(argv, capsys):
    code = run.main([str(argument) for argument in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def blended(monkeypatch):
    monkeypatch.setattr(media, 'load_network', lambda *args, **kwargs: Average())


# ---------------------------------------------------------------------------------------------
# Frame timing

def test_a_variable_rate_places_every_frame_where_it_is_shown(tmp_path):
    """5 fps, then 20 fps: eight frames of a square moving 2 px per 1/20 s, each shown at its own time. Every
    output frame shows the square where it is at that frame's time."""
    vfr = tmp_path / 'vfr.mkv'
    ffmpeg('-vf', r"select='not(mod(n\,4))*lt(n\,16)+gte(n\,16)'", '-fps_mode', 'vfr', '-c:v', 'libx264', '-crf', '0',
           vfr, frames=square_frames(20, speed=2))
    source = FrameSource(str(vfr))
    assert (source.count, source.fps) == (8, 8)
    network = MovingSquare()
    summary = interpolate_video(vfr, tmp_path / 'out.mkv', network=network, progress=False)
    assert '16 frames at 16 fps from 8 at 8 fps' in str(summary)
    centres = centres_of(list(FrameSource(str(tmp_path / 'out.mkv'))))
    exact = [10 + 2 * min(20 * Fraction(index, 16), 19) for index in range(16)]
    assert np.abs(centres[:, 1] - np.array(exact, float)).max() < 0.6  # within 1/16 of a 0.2 s interval: 0.5 px


@pytest.mark.parametrize('name, options, rate', [('1000.mp4', [], 1000), ('raw.h264', [], 10),
                                                 ('ntsc.mkv', [], Fraction(30000, 1001)),
                                                 ('late.ts', ['-output_ts_offset', 1.4], 10)])
def test_the_rate_comes_from_the_timestamps_not_from_printed_text(tmp_path, name, options, rate):
    source = FrameSource(clip(tmp_path / name, *options, count=11, rate=rate))
    assert (source.fps, source.count, source.times) == (rate, 11, None)


def test_rates_read_from_files_snap_to_what_was_meant():
    assert snap_rate(Fraction(29970, 1000), Fraction(1, 100)) == Fraction(30000, 1001)
    assert snap_rate(Fraction(24999, 1000), Fraction(1, 100)) == 25
    assert snap_rate(Fraction(123456, 10000), Fraction(1, 10 ** 6)) == Fraction(7716, 625)


def test_a_video_that_starts_after_its_audio_still_does(tmp_path, blended, capsys):
    late = tmp_path / 'late.mkv'
    ffmpeg('-itsoffset', 0.2, '-f', 'lavfi', '-i', 'testsrc2=size=64x48:rate=10:duration=0.5', '-f', 'lavfi', '-i',
           'sine=duration=0.7', '-c:v', 'libx264', '-c:a', 'aac', late)
    assert FrameSource(str(late)).start == Fraction(1, 5)
    code, err = call(['--video', late, '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 0, err
    assert FrameSource(str(tmp_path / 'out.mp4')).start == pytest.approx(0.2, abs=0.001)


# ---------------------------------------------------------------------------------------------
# Truncated files

@pytest.mark.parametrize('name, options', [('cut.mkv', []), ('cut.webm', ['-c:v', 'libvpx-vp9'])])
def test_a_truncated_file_is_refused_saying_how_much_is_left(tmp_path, capsys, name, options):
    whole = clip(tmp_path / f'whole{os.path.splitext(name)[1]}', '-g', 1, *options, count=10)
    data = open(whole, 'rb').read()
    (tmp_path / name).write_bytes(data[:len(data) * 7 // 10])
    code, err = call(['--video', tmp_path / name, '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 2 and re.fullmatch(rf'error: \S*{name} is truncated: \d of 10 frames \(\S+ of 0.50 s\)\n', err), err
    assert sorted(os.listdir(tmp_path)) == sorted([name, os.path.basename(whole)])


# ---------------------------------------------------------------------------------------------
# The picture: sample aspect ratio, colour, transparency

@pytest.mark.parametrize('size', [(48, 48), (33, 17)])
def test_the_sample_aspect_ratio_is_carried(tmp_path, blended, capsys, size):
    frames = [frame[:size[1], :size[0]] for frame in square_frames(4, size=48)]
    ffmpeg('-vf', 'setsar=2/1', '-c:v', 'libx264', '-pix_fmt', 'yuv444p', tmp_path / 'wide.mp4', frames=frames)
    code, err = call(['--video', tmp_path / 'wide.mp4', '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 0, err
    assert FrameSource(str(tmp_path / 'out.mp4')).sar == 2
    code, err = call(['--video', tmp_path / 'wide.mp4', '--out', tmp_path / 'frames/'], capsys)
    assert code == 0 and 'notice: PNG frames do not carry its sample aspect ratio 2:1\n' in err


def test_colour_tags_are_carried_with_the_colours(tmp_path, blended, capsys):
    pq = clip(tmp_path / 'pq.mp4', '-pix_fmt', 'yuv420p10le', '-vf',
              'setparams=color_primaries=bt2020:color_trc=smpte2084:colorspace=bt2020nc:range=tv', count=4)
    assert tags(pq)[1] == 'tv, bt2020nc/bt2020/smpte2084, progressive'
    code, err = call(['--video', pq, '--out', tmp_path / 'out.mkv'], capsys)
    assert code == 0, err
    assert tags(tmp_path / 'out.mkv')[1] == 'tv, bt2020nc/bt2020/smpte2084, progressive'
    one, two = (np.stack(list(FrameSource(path))).astype(int) for path in (pq, str(tmp_path / 'out.mkv')))
    assert np.abs(one - two[::2]).mean() < 4  # coding loss; a wrong matrix makes it about 8


def test_an_untagged_video_stays_untagged_and_unchanged(tmp_path, blended, capsys):
    plain = clip(tmp_path / 'plain.mp4', '-vf', 'format=yuv420p,setparams=colorspace=unknown:range=unknown', count=4)
    assert tags(plain)[1] == 'progressive'
    code, err = call(['--video', plain, '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 0, err
    assert tags(tmp_path / 'out.mp4')[1] == 'progressive'
    one, two = (np.stack(list(FrameSource(path))).astype(int) for path in (plain, str(tmp_path / 'out.mp4')))
    assert np.abs(one - two[::2]).mean() < 4


def test_a_colour_matrix_without_a_conversion_is_refused(tmp_path, capsys):
    odd = clip(tmp_path / 'ictcp.mp4', '-vf', 'format=yuv420p,setparams=colorspace=ictcp', count=3)
    code, err = call(['--video', odd, '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 2 and 'its colour matrix ictcp has no conversion to RGB here' in err and err.count('\n') == 1


def test_transparency_is_composited_on_white_as_for_images(tmp_path, blended, capsys):
    frames = square_frames(3, size=48)
    ffmpeg('-vf', "format=rgba,geq=r='r(X,Y)':g='g(X,Y)':b='b(X,Y)':a='if(lt(X,24),0,255)'", '-c:v', 'qtrle',
           tmp_path / 'alpha.mov', frames=[np.full_like(frame, (200, 0, 0)) for frame in frames])
    code, err = call(['--video', tmp_path / 'alpha.mov', '--out', tmp_path / 'out/'], capsys)
    assert code == 0 and 'notice: the transparency of' in err, err
    output = np.stack(list(FrameSource(str(tmp_path / 'out'))))
    assert (output[:, :, :24] == 255).all() and (output[:, :, 24:] == (200, 0, 0)).all()


# ---------------------------------------------------------------------------------------------
# Streams

@pytest.fixture
def many_streams(tmp_path):
    """An mkv with two audio tracks (one tagged in German), subtitles and a font attachment."""
    base = clip(tmp_path / 'base.mkv', count=10, audio=True)
    (tmp_path / 'subtitles.srt').write_text('1\n00:00:00,000 --> 00:00:00,400\nhello\n')
    (tmp_path / 'font.ttf').write_bytes(b'\0font')
    ffmpeg('-i', base, '-f', 'lavfi', '-i', 'sine=frequency=880:duration=0.5', '-i', tmp_path / 'subtitles.srt',
           '-attach', tmp_path / 'font.ttf', '-metadata:s:t', 'mimetype=application/x-truetype-font',
           '-map', '0', '-map', '1', '-map', '2', '-c:v', 'copy', '-c:a', 'aac', '-c:s', 'srt',
           '-metadata:s:a:1', 'language=ger', tmp_path / 'many.mkv')
    return tmp_path / 'many.mkv'


def test_every_stream_the_container_holds_is_carried(tmp_path, many_streams, blended, capsys):
    code, err = call(['--video', many_streams, '--out', tmp_path / 'out.mkv'], capsys)
    assert code == 0 and 'notice' not in err, err
    assert tags(tmp_path / 'out.mkv')[0] == tags(many_streams)[0]
    log = subprocess.run([FFMPEG, '-hide_banner', '-i', tmp_path / 'out.mkv'], capture_output=True, text=True).stderr
    assert 'Stream #0:2(ger): Audio' in log
    code, err = call(['--video', many_streams, '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 0 and err.count('notice') == 1, err
    assert f'notice: {tmp_path / "out.mp4"} cannot hold attachment #4 (ttf): dropped\n' in err
    assert tags(tmp_path / 'out.mp4')[0] == {0: ('video', 'h264'), 1: ('audio', 'aac'), 2: ('audio', 'aac'),
                                             3: ('subtitle', 'mov_text')}


def test_what_slow_motion_cannot_carry_is_said_in_one_line(tmp_path, many_streams, blended, capsys):
    code, err = call(['--video', many_streams, '--out', tmp_path / 'out.mkv', '--slowmo'], capsys)
    assert code == 0 and err.count('notice') == 1, err
    assert 'notice: attachment and audio and subtitle dropped: --slowmo stretches the video\n' in err
    assert tags(tmp_path / 'out.mkv')[0] == {0: ('video', 'h264')}


def test_video_and_audio_come_from_the_file_that_was_opened(tmp_path, monkeypatch, capsys):
    path = clip(tmp_path / 'in.mp4', count=6, audio=True)  # 0.3 s
    clip(tmp_path / 'other.mp4', count=30, audio=True)  # 1.5 s

    def replaced(*args, **kwargs):
        os.replace(tmp_path / 'other.mp4', path)
        return Average()

    monkeypatch.setattr(media, 'load_network', replaced)
    code, err = call(['--video', path, '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 0, err
    assert 'wrote' in err and '12 frames at 40 fps from 6 at 20 fps' in err
    log = subprocess.run([FFMPEG, '-i', tmp_path / 'out.mp4', '-map', '0:a', '-f', 'null', '-'], capture_output=True,
                         text=True).stderr
    assert float(re.findall(r'time=00:00:([\d.]+)', log)[-1]) < 0.4


# ---------------------------------------------------------------------------------------------
# Numbers

@pytest.mark.parametrize('fps, exact', [('59.95', Fraction(1199, 20)), ('12345/1009', Fraction(12345, 1009))])
def test_the_users_rate_is_kept_exact(tmp_path, blended, capsys, fps, exact):
    code, err = call(['--video', clip(tmp_path / 'in.mp4', count=4), '--out', tmp_path / 'out.mkv', '--fps', fps],
                     capsys)
    assert code == 0, err
    assert FrameSource(str(tmp_path / 'out.mkv')).fps == exact


@pytest.mark.parametrize('fps', [59.95, np.float32(59.95), decimal.Decimal('59.95'), Fraction(1199, 20)])
def test_a_rate_through_the_api_is_the_decimal_it_prints_as(tmp_path, fps):
    summary = interpolate_video(clip(tmp_path / 'in.mp4', count=3), tmp_path / 'out/', network=Average(), fps=fps,
                                progress=False)
    assert summary.rate == Fraction(1199, 20)


@pytest.mark.parametrize('options, message', [
    ({'fps': 10 ** 400}, '--fps must be between 1 and 1000, got 1e+400'),
    ({'fps': decimal.Decimal('1e400')}, '--fps must be between 1 and 1000, got 1e+400'),
    ({'fps': decimal.Decimal('NaN')}, '--fps must be between 1 and 1000, got NaN'),
    ({'fps': float('inf')}, '--fps must be between 1 and 1000, got inf'),
    ({'fps': 1 + 0j}, "--fps must be a number, got (1+0j)"),
    ({'factor': 10 ** 400}, '--factor 1e+400 makes 2e+401 fps from 20 fps, outside 1 to 1000 fps'),
    ({'batch_size': 10 ** 400}, '--batch-size must be a whole number of at most 1024, got 1e+400'),
    ({'max_time_error': Fraction(1, 10 ** 400)}, '--max-time-error must be between 1/1024 and 1/2'),
    ({'slowmo': 'yes'}, "slowmo must be True or False, got 'yes'"),
    ({'network': 'l1'}, "network must be a Network (from load_network or torch.hub.load), got 'l1'"),
    ({'network': torch.nn.Linear(3, 3)}, 'network must be a Network (from load_network or torch.hub.load), got Linear'),
])
def test_every_number_is_checked_whatever_its_spelling(tmp_path, options, message):
    with pytest.raises(InputError, match=re.escape(message)) as error:
        interpolate_video(clip(tmp_path / 'in.mp4', count=3), tmp_path / 'out.mp4', progress=False, **options)
    assert '\n' not in str(error.value) and sorted(os.listdir(tmp_path)) == ['in.mp4']


def test_a_huge_rate_on_the_command_line_is_one_line(tmp_path, capsys):
    code, err = call(['--video', tmp_path / 'none.mp4', '--out', tmp_path / 'out.mp4', '--fps', '1e400'], capsys)
    assert (code, err) == (2, 'error: --fps must be between 1 and 1000, got 1e+400\n')


# ---------------------------------------------------------------------------------------------
# The Python API

FRAME = square_frames(1, size=48)[0]
OTHER = square_frames(2, size=48)[1]


@pytest.mark.parametrize('precision', [torch.float16, torch.bfloat16])
def test_a_half_precision_network_computes_in_its_precision(random_network, precision):
    network = copy.deepcopy(random_network).to(precision)
    output = interpolate(FRAME, OTHER, network)
    assert output.dtype == np.uint8 and np.abs(output.astype(int) - interpolate(FRAME, OTHER, random_network)).max() <= 2
    tensor = interpolate(torch.rand(3, 8, 8), torch.rand(3, 8, 8), network)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 8, 8)


def test_a_wrapped_network_is_a_network(random_network):
    wrapped = torch.nn.DataParallel(random_network)
    assert np.array_equal(interpolate(FRAME, OTHER, wrapped), interpolate(FRAME, OTHER, random_network))


TENSORS_WITHOUT_DENSE_VALUES = {'meta': lambda: torch.rand(3, 8, 8, device='meta'),
                                'sparse_coo': lambda: torch.rand(3, 8, 8).to_sparse(),
                                'sparse_csr': lambda: torch.rand(3, 8, 8).to_sparse_csr()}


@pytest.mark.parametrize('kind', TENSORS_WITHOUT_DENSE_VALUES)
@pytest.mark.filterwarnings('ignore:Sparse CSR tensor support is in beta')
def test_tensors_without_dense_values_are_refused(random_network, kind):
    with pytest.raises(InputError, match=f'one is a {kind} tensor'):
        interpolate(TENSORS_WITHOUT_DENSE_VALUES[kind](), torch.rand(3, 8, 8), random_network)


def test_networks_that_cannot_compute_are_refused():
    with pytest.raises(InputError, match='network has no weights to compute with'):
        interpolate(FRAME, OTHER, Average().to('meta'))
    with pytest.raises(InputError, match='got Linear'):
        interpolate(FRAME, OTHER, torch.nn.Linear(3, 3))


def test_the_api_checks_memory_as_the_command_does(random_network):
    if (media.available_memory(torch.device('cpu')) or 0) > media.network_memory(60000, 60000):
        pytest.skip('this machine has the memory for 60000x60000 frames')
    huge = np.broadcast_to(FRAME[:1, :1], (60000, 60000, 3))  # no memory of its own
    with pytest.raises(InputError, match='60000x60000 frames need about'):
        interpolate(huge, huge, random_network)


def test_a_cover_picture_is_carried_not_interpolated(tmp_path, blended, capsys):
    base = clip(tmp_path / 'base.mp4', count=4, audio=True)
    ffmpeg('-f', 'lavfi', '-i', 'color=red:size=16x16', '-frames:v', 1, tmp_path / 'cover.png')
    ffmpeg('-i', base, '-i', tmp_path / 'cover.png', '-map', 0, '-map', 1, '-c', 'copy', '-c:v:1', 'png',
           '-disposition:v:1', 'attached_pic', tmp_path / 'cover.mp4')
    code, err = call(['--video', tmp_path / 'cover.mp4', '--out', tmp_path / 'out.mp4'], capsys)
    assert code == 0 and '8 frames at 40 fps from 4 at 20 fps' in err, err
    assert tags(tmp_path / 'out.mp4')[0] == {0: ('video', 'h264'), 1: ('audio', 'aac'), 2: ('video', 'png')}


@pytest.mark.parametrize('name', ['a:b.mp4', '-x.mp4', 'http:x.mp4'])
def test_a_name_that_looks_like_an_option_or_a_protocol_is_that_file(tmp_path, blended, capsys, monkeypatch, name):
    os.rename(clip(tmp_path / 'in.mp4', count=3, audio=True), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    code, err = call([f'--video={name}', f'--out=out:{name}'], capsys)
    assert code == 0 and FrameSource(f'out:{name}').count == 6, err
