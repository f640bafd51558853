"""Outputs of run.py and benchmark.py where the OS says the path leads, decided before any work, never over an
input or a file that is not a regular one; the Middlebury folder read whole; reports that cannot be printed."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoints
import network_setup
import benchmark
import benchmark_speed
import media
import train
from model import Network
from test_benchmark import FAKE, assert_one_error_line, fake_data, fake_scores
from test_run import FFMPEG, blend, call, make_clip, save_frames
from conftest import moving_square
from video import FrameSource


@pytest.fixture
def frames(tmp_path):
    return save_frames(tmp_path / 'in', moving_square(3))


@pytest.fixture
def blended(monkeypatch):
    monkeypatch.setattr(media, 'estimate', blend)


def test_json_through_a_link_and_never_over_a_fifo_or_a_descriptor(tmp_path, capsys, monkeypatch):
    data = str(fake_data(tmp_path / 'data'))
    (tmp_path / 'real.json').write_text('old')
    os.symlink('real.json', tmp_path / 'link.json')
    assert benchmark.main(['--data', data, '--model', 'blend', '--json', str(tmp_path / 'link.json')]) == 0
    assert os.path.islink(tmp_path / 'link.json')
    assert json.loads((tmp_path / 'real.json').read_text())['model'] == 'blend'
    capsys.readouterr()
    os.mkfifo(tmp_path / 'fifo')
    monkeypatch.setattr(benchmark, 'evaluate', None)  # must not be reached
    for target, message in ((tmp_path / 'fifo', 'is a FIFO, not a regular file; it is never replaced'),
                            ('/dev/stdout', 'is a descriptor of this process, not a file')):
        assert benchmark.main(['--data', data, '--model', 'blend', '--json', str(target)]) == 2
        assert_one_error_line(capsys, message)
    assert stat.S_ISFIFO(os.stat(tmp_path / 'fifo').st_mode)


def test_pair_and_video_outputs_are_written_through_links(tmp_path, frames, random_weights, capsys, blended):
    os.symlink('real.png', tmp_path / 'link.png')
    os.symlink('real.mp4', tmp_path / 'link.mp4')
    code, err = call(['--one', f'{frames}/f0.png', '--two', f'{frames}/f1.png', '--out', tmp_path / 'link.png',
                      '--weights', random_weights], capsys)
    assert code == 0, err
    code, err = call(['--video', frames, '--out', tmp_path / 'link.mp4', '--weights', random_weights], capsys)
    assert code == 0, err
    assert os.path.islink(tmp_path / 'link.png') and Image.open(tmp_path / 'real.png').size == (64, 48)
    assert os.path.islink(tmp_path / 'link.mp4') and FrameSource(str(tmp_path / 'real.mp4')).width == 64


def test_frames_go_into_the_folder_a_link_names_keeping_its_mode(tmp_path, frames, random_weights, capsys, blended):
    (tmp_path / 'real').mkdir(mode=0o700)
    os.chmod(tmp_path / 'real', 0o700)
    os.symlink('real', tmp_path / 'link')
    os.symlink('made', tmp_path / 'dangling')
    for out in ('link', 'dangling'):
        code, err = call(['--video', frames, '--out', tmp_path / out, '--weights', random_weights], capsys)
        assert code == 0, err
    assert len(os.listdir(tmp_path / 'real')) == len(os.listdir(tmp_path / 'made')) == 6
    assert stat.S_IMODE(os.stat(tmp_path / 'real').st_mode) == 0o700
    assert sorted(os.listdir(tmp_path)) == ['dangling', 'in', 'link', 'made', 'real']


def test_a_hidden_video_name_is_a_video(tmp_path, frames, random_weights, capsys, blended, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = call(['--video', frames, '--out', '.mp4', '--weights', random_weights], capsys)
    assert code == 0, err
    assert os.path.isfile(tmp_path / '.mp4') and FrameSource(str(tmp_path / '.mp4')).count == 6


def test_a_refused_output_is_one_line_before_any_notice(tmp_path, random_weights, capsys):
    clip = make_clip(tmp_path / 'in.mp4', count=3, audio=True)
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    code, err = call(['--video', clip, '--out', f'{tmp_path}/full/', '--weights', random_weights], capsys)
    assert (code, err) == (2, f'error: output folder is not empty: {tmp_path}/full/\n')


def test_a_checkpoint_or_a_multi_page_tiff_says_what_to_do(tmp_path, frames, capsys):
    network = Network()
    args = train.parse_args(['--out', str(tmp_path)])
    checkpoints.save_checkpoint(str(tmp_path / 'ckpt.pt'), network, torch.optim.Adamax(network.parameters()), 1, args)
    code, err = call(['--one', f'{frames}/f0.png', '--two', f'{frames}/f1.png', '--out', tmp_path / 'o.png',
                      '--weights', tmp_path / 'ckpt.pt'], capsys)
    assert (code, err) == (2, f'error: {tmp_path}/ckpt.pt is a train.py checkpoint, not weights: export them with '
                              f'python train.py --export {tmp_path}/ckpt.pt WEIGHTS.safetensors\n')
    pages = [Image.fromarray(frame) for frame in moving_square(2)]
    pages[0].save(tmp_path / 'pages.tif', save_all=True, append_images=pages[1:])
    code, err = call(['--one', tmp_path / 'pages.tif', '--two', f'{frames}/f1.png', '--out', tmp_path / 'o.png'],
                     capsys)
    assert (code, err) == (2, f'error: {tmp_path}/pages.tif is a multi-page TIFF (2 pages); a frame is one image: '
                              'save each page as an image of its own\n')


def test_a_numbered_gpu_is_a_device(tmp_path, frames, random_weights, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    code, err = call(['--one', f'{frames}/f0.png', '--two', f'{frames}/f1.png', '--out', tmp_path / 'o.png',
                      '--weights', random_weights, '--device', 'cuda:0'], capsys)
    assert (code, err) == (2, 'error: --device cuda was asked for, but no CUDA device is available\n')
    code, err = call(['--one', f'{frames}/f0.png', '--two', f'{frames}/f1.png', '--out', tmp_path / 'o.png',
                      '--device', 'cuda:x'], capsys)
    assert code == 2 and "invalid choice: 'cuda:x' (choose from auto, cpu, cuda, cuda:N)" in err


def test_speed_json_never_over_the_weights(tmp_path, random_weights, capsys, monkeypatch):
    weights = tmp_path / 'w.safetensors'
    weights.write_bytes(open(random_weights, 'rb').read())
    monkeypatch.setattr(benchmark_speed, 'speed', None)  # must not be reached
    assert benchmark.main(['--speed', '--device', 'cpu', '--weights', str(weights), '--json', str(weights)]) == 2
    assert_one_error_line(capsys, f'output {weights} would overwrite an input: {weights}')
    assert weights.read_bytes() == open(random_weights, 'rb').read()


class Full:
    def write(self, text):
        raise OSError(28, 'No space left on device')

    flush = write


@pytest.mark.parametrize('stdout, message', [(Full(), 'No space left on device'), (None, 'standard output is closed')])
def test_speed_writes_its_json_first_and_a_lost_report_is_one_line(tmp_path, capsys, monkeypatch, stdout, message):
    monkeypatch.setattr(benchmark_speed, 'MATMUL_SIZE', {'cpu': 64, 'cuda': 64})
    monkeypatch.setattr(sys, 'stdout', stdout)
    assert benchmark.main(['--speed', '--device', 'cpu', '--sizes', '32x32', '--precisions', 'fp32', '--repeats', '1',
                           '--json', str(tmp_path / 'r.json')]) == 2
    monkeypatch.undo()
    assert_one_error_line(capsys, f'cannot write to standard output: {message}')
    assert json.loads((tmp_path / 'r.json').read_text())['device'] == 'cpu'


@pytest.mark.parametrize('damage, message', [
    (lambda data: (os.rename(data / 'Alpha', data / 'moved'), os.symlink('gone', data / 'Alpha')),
     'Alpha is a dangling link (to gone)'),
    (lambda data: (os.remove(data / 'Alpha' / 'frame11.png'), os.symlink('gone.png', data / 'Alpha' / 'frame11.png')),
     'frame11.png is a dangling link (to gone.png)'),
])
def test_a_middlebury_folder_with_dangling_links_is_an_error(tmp_path, capsys, damage, message):
    data = fake_data(tmp_path / 'data')
    assert benchmark.main(['--data', str(data), '--model', 'blend']) == 0
    capsys.readouterr()
    damage(data)
    assert benchmark.main(['--data', str(data), '--model', 'blend']) == 2
    assert_one_error_line(capsys, message)


def test_an_unreadable_sequence_folder_is_an_error(tmp_path, capsys, monkeypatch):
    data = fake_data(tmp_path / 'data')
    listdir = os.listdir

    def unreadable(path):  # as chmod 000 makes it for any user but root
        if os.path.basename(path) == list(FAKE)[0]:
            raise PermissionError(13, 'Permission denied')
        return listdir(path)
    monkeypatch.setattr(os, 'listdir', unreadable)
    assert benchmark.main(['--data', str(data), '--model', 'blend']) == 2
    assert_one_error_line(capsys, f'cannot read Middlebury sequence folder {data / list(FAKE)[0]}: Permission denied')
    monkeypatch.undo()
    assert benchmark.main(['--data', str(data), '--model', 'blend']) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f'mean PSNR {fake_scores()[0]:.2f}')


def test_a_video_without_frames_says_so(tmp_path, capsys):
    subprocess.run([FFMPEG, '-v', 'error', '-f', 'lavfi', '-i', 'color=s=64x48:r=10', '-frames:v', '0',
                    '-c:v', 'libx264', str(tmp_path / 'zero.mp4')], check=True)
    code, err = call(['--video', tmp_path / 'zero.mp4', '--out', tmp_path / 'o.mp4'], capsys)
    assert (code, err) == (2, f'error: cannot read video {tmp_path}/zero.mp4: it has no video stream (no frames)\n')


@pytest.mark.parametrize('name', ['a:b.json', '-r.json', os.fsdecode(b'\xff\xfe.json'), 'http:', ' s .json'])
def test_any_name_a_file_can_have_is_that_file(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    data = str(fake_data(tmp_path / 'data'))
    assert benchmark.main(['--data', data, '--model', 'blend', f'--json={name}']) == 0
    assert json.loads((tmp_path / name).read_text())['model'] == 'blend'


def test_a_url_like_video_name_is_a_file(tmp_path, random_weights, capsys, blended, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'http:').mkdir()
    make_clip(tmp_path / 'http:' / 'clip.mp4', count=3, audio=True)
    code, err = call(['--video', 'http:/clip.mp4', '--out', 'http:/out.mp4', '--weights', random_weights], capsys)
    assert code == 0, err
    assert FrameSource('http:/out.mp4').audio == 'aac' and FrameSource('http:/out.mp4').count == 6


@pytest.mark.parametrize('make, message', [
    (lambda p: (os.symlink('loop1', p / 'loop2'), os.symlink('loop2', p / 'loop1')),
     'Too many levels of symbolic links'),
    (lambda p: (p / 'loop1').mkdir(), 'output path is a directory'),
    (lambda p: (p / 'file').write_text(''), 'cannot create output folder'),
])
def test_an_output_that_cannot_be_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, make, message):
    data = str(fake_data(tmp_path / 'data'))
    make(tmp_path)
    monkeypatch.setattr(benchmark, 'evaluate', None)  # must not be reached
    target = tmp_path / ('file/r.json' if message.startswith('cannot create') else 'loop1')
    assert benchmark.main(['--data', data, '--model', 'blend', '--json', str(target)]) == 2
    assert_one_error_line(capsys, message)


def test_weights_that_are_not_a_regular_file(tmp_path, frames, capsys):
    os.mkfifo(tmp_path / 'w.fifo')
    code, err = call(['--one', f'{frames}/f0.png', '--two', f'{frames}/f1.png', '--out', tmp_path / 'o.png',
                      '--weights', tmp_path / 'w.fifo'], capsys)
    assert (code, err) == (2, f'error: weights {tmp_path}/w.fifo is not a regular file\n')


def test_an_export_goes_through_a_link_but_never_onto_its_checkpoint(tmp_path, capsys):
    network = Network()
    optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
    checkpoints.save_checkpoint(str(tmp_path / 'ckpt.pt'), network, optimizer, 1, train.parse_args(['--out', str(tmp_path)]))
    os.symlink('real.safetensors', tmp_path / 'w.safetensors')
    os.symlink('ckpt.pt', tmp_path / 'c.safetensors')
    assert train.main(['--export', str(tmp_path / 'ckpt.pt'), str(tmp_path / 'w.safetensors')]) == 0
    assert os.path.islink(tmp_path / 'w.safetensors') and (tmp_path / 'real.safetensors').stat().st_size > 40e6
    capsys.readouterr()
    assert train.main(['--export', str(tmp_path / 'ckpt.pt'), str(tmp_path / 'c.safetensors')]) == 2
    assert 'would overwrite an input' in capsys.readouterr().err
    assert checkpoints.read_checkpoint(str(tmp_path / 'ckpt.pt'))['step'] == 1
