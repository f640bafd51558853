import functools
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import skimage.metrics
import torch
import torch.nn.functional as F
from PIL import Image

import benchmark

SEQUENCES = ['Beanbags', 'Dimetrodon', 'DogDance', 'Grove2', 'Grove3', 'Hydrangea', 'MiniCooper', 'RubberWhale',
             'Urban2', 'Urban3', 'Venus', 'Walking']
# tiny constant sequences for the fake archives: frame10, frame11 and ground-truth grey levels
FAKE = {'Alpha': (0, 100, 60), 'Beta': (10, 30, 40)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    return np.asarray(Image.open(path).convert('RGB'))


def blend_scores(folder):
    """Mean PSNR and SSIM of the average of frame10 and frame11, truncated to uint8 as the network's output is,
    and the interpolation error of the average rounded to the nearest level."""
    psnrs, ssims, errors = [], [], []
    for truth_path in sorted(glob.glob(os.path.join(folder, '*', 'frame10i11.png'))):
        sequence = os.path.dirname(truth_path)
        one, two = (read(os.path.join(sequence, name)).astype(np.float64) for name in ('frame10.png', 'frame11.png'))
        blend = np.floor((one + two) / 2).astype(np.uint8)
        truth = read(truth_path)
        psnrs.append(skimage.metrics.peak_signal_noise_ratio(truth, blend, data_range=255))
        ssims.append(skimage.metrics.structural_similarity(truth, blend, data_range=255, channel_axis=2))
        errors.append(np.abs(np.round((one + two) / 2) - truth).mean())
    return np.mean(psnrs), np.mean(ssims), np.mean(errors)


def original_protocol(network, folder, padding):
    """PSNR and SSIM of one sequence as the original benchmark.py computes them: BGR frames times 1/255 in
    float32, its padding arithmetic, the estimate truncated to uint8 and compared with the BGR truth."""
    bgr = lambda name: np.array(Image.open(os.path.join(folder, name)))[:, :, ::-1]
    one, two = (torch.FloatTensor(np.ascontiguousarray(bgr(name).transpose(2, 0, 1).astype(np.float32) * (1.0 / 255.0)))
                for name in ('frame10.png', 'frame11.png'))
    height, width = one.shape[1:]
    left = 25 if padding == 'paper' else 0
    right, bottom = (-(-(size + 2 * left) // 128) * 128 - size - left for size in (width, height))
    with torch.no_grad():
        output = network(*(F.pad(x[None], [left, right, left, bottom], mode='replicate') for x in (one, two)))
    output = output[0, :, left:left + height, left:left + width]
    estimate = (output.clip(0.0, 1.0).numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8)
    truth = bgr('frame10i11.png')
    return (skimage.metrics.peak_signal_noise_ratio(image_true=truth, image_test=estimate, data_range=255),
            skimage.metrics.structural_similarity(im1=truth, im2=estimate, data_range=255, channel_axis=2))


def output_lines(capsys):
    captured = capsys.readouterr()
    return captured.out.strip().splitlines(), captured.err.strip().splitlines()


def test_blend_on_middlebury(middlebury, tmp_path, capsys):
    path = tmp_path / 'blend.json'
    assert benchmark.main(['--data', middlebury, '--model', 'blend', '--json', str(path)]) == 0
    psnr, ssim, ie = blend_scores(middlebury)
    out, err = output_lines(capsys)
    assert out[-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.3f} IE {ie:.2f}' == 'mean PSNR 28.02 SSIM 0.804 IE 5.74'
    assert not any('error' in line for line in err)
    results = json.loads(path.read_text())
    assert results['model'] == 'blend' and results['padding'] == 'paper'
    assert sorted(results['sequences']) == SEQUENCES
    assert results['mean'] == {'psnr': pytest.approx(psnr, abs=1e-9), 'ssim': pytest.approx(ssim, abs=1e-9),
                               'ie': pytest.approx(ie, abs=1e-9), 'blend_psnr': pytest.approx(psnr, abs=1e-9),
                               'blend_ssim': pytest.approx(ssim, abs=1e-9), 'blend_ie': pytest.approx(ie, abs=1e-9)}
    for row in results['sequences'].values():
        assert row['psnr'] == row['blend_psnr'] and row['ssim'] == row['blend_ssim']
    assert results['sequences']['RubberWhale']['psnr'] == pytest.approx(38.80, abs=0.005)


def test_random_weights_follow_the_original_protocol(middlebury, random_weights, random_network, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(middlebury, 'Venus'), data / 'Venus')
    path = tmp_path / 'out' / 'random.json'
    argv = ['--data', str(data), '--weights', random_weights, '--padding', 'improved', '--device', 'cpu',
            '--json', str(path)]
    assert benchmark.main(argv) == 0
    psnr, ssim = original_protocol(random_network, data / 'Venus', 'improved')
    out, _ = output_lines(capsys)
    assert out[-1].startswith(f'mean PSNR {psnr:.2f} SSIM {ssim:.3f} IE ')
    assert out[-2].split() == ['ours', 'l1/improved', f'{psnr:.2f}', f'{ssim:.3f}']
    results = json.loads(path.read_text())
    venus = results['sequences']['Venus']
    assert list(results['sequences']) == ['Venus'] and results['padding'] == 'improved'
    assert (venus['psnr'], venus['ssim']) == (pytest.approx(psnr, abs=1e-9), pytest.approx(ssim, abs=1e-9))
    blend = (venus['blend_psnr'], venus['blend_ssim'], venus['blend_ie'])
    assert blend == pytest.approx(blend_scores(data), abs=1e-9)


def test_bf16_network(middlebury, random_weights, random_network, tmp_path, capsys, monkeypatch):
    data = tmp_path / 'data'
    (data / 'Venus').mkdir(parents=True)
    for name in ('frame10', 'frame11', 'frame10i11'):  # a crop: bf16 is emulated, and slow, on AVX2-only CPUs
        Image.open(os.path.join(middlebury, 'Venus', f'{name}.png')).crop((100, 100, 228, 196)).save(
            data / 'Venus' / f'{name}.png')
    path = tmp_path / 'bf16.json'
    argv = ['--data', str(data), '--weights', random_weights, '--precision', 'bf16', '--json', str(path)]
    asked, estimate = [], benchmark.estimate
    monkeypatch.setattr(benchmark, 'estimate', lambda *options: asked.append(options[4]) or estimate(*options))
    assert benchmark.main(argv) == 0
    results = json.loads(path.read_text())
    fp32 = original_protocol(random_network, data / 'Venus', 'paper')[0]
    # bf16 ran; its truncated frame may equal fp32's on some CPUs
    assert asked == ['bf16'] and results['precision'] == 'bf16' and abs(results['mean']['psnr'] - fp32) < 0.05
    assert output_lines(capsys)[0][-2].split()[:3] == ['ours', 'l1/paper', 'bf16']
    assert command_line_error(capsys, ['--data', str(data), '--precision', 'fp8']) == "invalid choice: 'fp8'"


@pytest.fixture
def fake_server(tmp_path):
    """A folder with tiny other-data.zip and other-gt-interp.zip in the official layout."""
    server = tmp_path / 'server'
    server.mkdir()
    with zipfile.ZipFile(server / 'other-data.zip', 'w') as data, \
            zipfile.ZipFile(server / 'other-gt-interp.zip', 'w') as truth:
        data.writestr('other-data/README.txt', 'not a frame')
        for name, (first, second, middle) in FAKE.items():
            data.writestr(f'other-data/{name}/', '')
            for frame, level in (('frame07', first), ('frame10', first), ('frame11', second), ('frame14', second)):
                data.writestr(f'other-data/{name}/{frame}.png', png_bytes(tmp_path, level))
            truth.writestr(f'other-gt-interp/{name}/frame10i11.png', png_bytes(tmp_path, middle))
    return server


def png_bytes(tmp_path, level):
    path = tmp_path / f'{level}.png'
    Image.fromarray(np.full((12, 16, 3), level, np.uint8)).save(path)
    return path.read_bytes()


def fake_scores():
    """PSNR and SSIM of the blend for FAKE, from their closed forms for constant images."""
    psnrs, ssims = [], []
    for first, second, middle in FAKE.values():
        blend = (first + second) / 2
        psnrs.append(10 * math.log10(255 ** 2 / (blend - middle) ** 2))
        c1 = (0.01 * 255) ** 2
        ssims.append((2 * blend * middle + c1) / (blend ** 2 + middle ** 2 + c1))
    return np.mean(psnrs), np.mean(ssims)


def test_download_middlebury_from_local_archives(fake_server, tmp_path, capsys):
    target = tmp_path / 'cache'
    url = fake_server.as_uri() + '/'
    assert benchmark.download_middlebury(str(target), url) == str(target)
    sequences = benchmark.find_sequences(str(target))
    assert [name for name, *_ in sequences] == ['Alpha', 'Beta']
    for name, first, second, truth in sequences:
        assert [read(path)[0, 0, 0] for path in (first, second, truth)] == list(FAKE[name])
    assert sorted(os.listdir(target / 'Alpha')) == ['frame10.png', 'frame10i11.png', 'frame11.png']
    assert sorted(os.listdir(target)) == ['Alpha', 'Beta', 'other-data.zip', 'other-gt-interp.zip']

    shutil.rmtree(fake_server)  # the archives are kept: a second call does not download again
    shutil.rmtree(target / 'Beta')
    benchmark.download_middlebury(str(target), url)
    assert len(benchmark.find_sequences(str(target))) == 2

    assert benchmark.main(['--data', str(target), '--model', 'blend']) == 0
    psnr, ssim = fake_scores()
    assert output_lines(capsys)[0][-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.3f} IE 15.00' == \
        'mean PSNR 25.12 SSIM 0.892 IE 15.00'  # IE: |50 - 60| and |20 - 40|


def test_incomplete_or_mixed_sequences_are_refused_before_any_inference(fake_server, tmp_path, monkeypatch, capsys):
    target = tmp_path / 'cache'
    benchmark.download_middlebury(str(target), fake_server.as_uri() + '/')
    monkeypatch.setattr(benchmark, 'estimate', None)  # must not be reached
    Image.new('RGB', (17, 12)).save(target / 'Beta' / 'frame10i11.png')
    assert benchmark.main(['--data', str(target), '--model', 'blend']) == 2
    assert_one_error_line(capsys, 'Middlebury sequence Beta mixes frame sizes', 'frame10i11.png is 17x12')
    (target / 'Beta' / 'frame11.png').unlink()
    assert benchmark.main(['--data', str(target)]) == 2
    assert_one_error_line(capsys, 'incomplete Middlebury sequence Beta: no frame11.png')


def use_server(monkeypatch, cache, server):
    """Point main's default data (cache folder and download URL) at local folders."""
    monkeypatch.setattr(benchmark, 'CACHE_DIR', str(cache))
    monkeypatch.setattr(benchmark, 'download_middlebury', functools.partial(
        benchmark.download_middlebury, str(cache), server.as_uri() + '/'))


def test_main_downloads_when_the_cache_is_empty(fake_server, tmp_path, monkeypatch, capsys):
    use_server(monkeypatch, tmp_path / 'cache', fake_server)
    assert benchmark.main(['--model', 'blend']) == 0
    assert output_lines(capsys)[0][-1] == 'mean PSNR 25.12 SSIM 0.892 IE 15.00'
    assert (tmp_path / 'cache' / 'Beta' / 'frame10i11.png').is_file()


def assert_one_error_line(capsys, *fragments):
    """Nothing on stdout; on stderr one error line, last (after any download progress bars)."""
    out, err = output_lines(capsys)
    errors = [line for line in err if line.startswith('error: ')]
    assert out == [] and errors == err[-1:]
    assert all(fragment in errors[0] for fragment in fragments)


def test_failed_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    use_server(monkeypatch, tmp_path / 'cache', tmp_path / 'nowhere')
    assert benchmark.main(['--model', 'blend']) == 2
    assert_one_error_line(capsys, 'cannot get the Middlebury data', 'other-data.zip')
    assert os.listdir(tmp_path / 'cache') == []


def test_a_download_that_is_not_a_zip_is_removed(tmp_path, monkeypatch, capsys):
    server = tmp_path / 'server'
    server.mkdir()
    (server / 'other-data.zip').write_text('<html>captive portal</html>')
    use_server(monkeypatch, tmp_path / 'cache', server)
    assert benchmark.main(['--model', 'blend']) == 2
    assert_one_error_line(capsys, 'did not give a zip archive')
    assert os.listdir(tmp_path / 'cache') == []


def test_missing_data_folder(tmp_path, capsys):
    missing = str(tmp_path / 'no-such-folder')
    assert benchmark.main(['--data', missing, '--model', 'blend']) == 2
    assert_one_error_line(capsys, missing)


def command_line_error(capsys, argv):
    """The one line argparse prints for a bad command line (exit code 2), without its fixed frame."""
    with pytest.raises(SystemExit) as exit:
        benchmark.main(argv)
    out, err = output_lines(capsys)
    assert exit.value.code == 2 and out == [] and len(err) == 1
    return err[0].removesuffix(' (see --help)').split(': ', 2)[-1].split(' (choose from')[0]


def test_unknown_padding_and_model(tmp_path, capsys):
    assert command_line_error(capsys, ['--data', str(tmp_path), '--padding', 'same']) == "invalid choice: 'same'"
    assert command_line_error(capsys, ['--data', str(tmp_path), '--model', 'l2']) == "invalid choice: 'l2'"


def test_missing_weights(tmp_path, capsys):
    missing = str(tmp_path / 'network.safetensors')
    assert benchmark.main(['--data', str(fake_data(tmp_path / 'data')), '--weights', missing]) == 2
    assert_one_error_line(capsys, missing)


def test_json_path_that_is_a_folder_fails_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, 'score_triplets', None)  # must not be reached
    assert benchmark.main(['--data', str(tmp_path), '--model', 'blend', '--json', str(tmp_path)]) == 2
    assert_one_error_line(capsys, 'output path is a directory')


def fake_data(folder, sequences=FAKE, size=(16, 12)):
    """A Middlebury folder of constant frames: sequences maps a name to the grey levels of its three frames."""
    for name, levels in sequences.items():
        (folder / name).mkdir(parents=True)
        for frame, level in zip(benchmark.FRAMES, levels):
            Image.new('RGB', size, (level,) * 3).save(folder / name / frame)
    return folder


@pytest.mark.parametrize('target', ['ground truth', 'a link to a frame', 'weights'])
def test_json_over_an_input_is_refused_before_any_work(tmp_path, random_weights, capsys, monkeypatch, target):
    data = fake_data(tmp_path / 'data')
    weights = shutil.copy(random_weights, tmp_path / 'weights.safetensors')
    os.symlink(data / 'Beta' / 'frame10.png', tmp_path / 'link.json')
    path = {'ground truth': data / 'Alpha' / 'frame10i11.png', 'a link to a frame': tmp_path / 'link.json',
            'weights': weights}[target]
    files = {file: file.read_bytes() for file in (*data.glob('*/*.png'), weights)}
    monkeypatch.setattr(benchmark, 'score_triplets', None)  # must not be reached
    assert benchmark.main(['--data', str(data), '--weights', str(weights), '--json', str(path)]) == 2
    assert_one_error_line(capsys, f'output {path} would overwrite an input')
    assert {file: file.read_bytes() for file in files} == files and os.path.islink(tmp_path / 'link.json')


def test_frames_too_small_for_ssim_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    assert benchmark.main(['--data', str(fake_data(tmp_path / 'fits', size=(7, 7))), '--model', 'blend']) == 0
    capsys.readouterr()
    monkeypatch.setattr(benchmark, 'score_triplets', None)  # must not be reached
    assert benchmark.main(['--data', str(fake_data(tmp_path / 'small', size=(9, 6))), '--model', 'blend']) == 2
    assert_one_error_line(capsys, 'Middlebury sequence Alpha has 9x6 frames; SSIM needs at least 7x7')


def refuse(constant):
    raise ValueError(f'not strict JSON: {constant}')


def test_equal_frames_give_strict_json_and_no_warning(tmp_path, capsys, recwarn):
    path = tmp_path / 'same.json'
    data = fake_data(tmp_path / 'data', {'Same': (40, 40, 40), **FAKE})
    assert benchmark.main(['--data', str(data), '--model', 'blend', '--json', str(path)]) == 0
    results = json.loads(path.read_text(), parse_constant=refuse)
    assert results['sequences']['Same']['psnr'] is None and results['mean']['psnr'] is None
    assert results['sequences']['Same']['ssim'] == 1.0
    assert results['sequences']['Beta']['psnr'] == pytest.approx(10 * math.log10(255 ** 2 / 20 ** 2))
    out, err = output_lines(capsys)
    assert out[-1] == f'mean PSNR inf SSIM {(1 + 2 * fake_scores()[1]) / 3:.3f} IE 10.00' and not recwarn.list
    assert not any('error' in line for line in err)


def test_long_json_names(tmp_path, capsys, monkeypatch):
    data = str(fake_data(tmp_path / 'data'))
    legal = tmp_path / ('r' * 250 + '.json')  # 255 bytes: the temporary name beside it must be shorter
    assert benchmark.main(['--data', data, '--model', 'blend', '--json', str(legal)]) == 0
    assert json.loads(legal.read_text())['model'] == 'blend'
    assert sorted(os.listdir(tmp_path)) == ['data', legal.name]
    capsys.readouterr()
    monkeypatch.setattr(benchmark, 'score_triplets', None)  # must not be reached
    for name, message in (('r' * 251 + '.json', 'output name is too long: 256 bytes, at most 255'),
                          ('', '--json path is empty')):
        assert benchmark.main(['--data', data, '--model', 'blend', '--json', str(tmp_path / name) if name else '']) == 2
        assert_one_error_line(capsys, message)


class BrokenPipe:
    def write(self, text):
        raise BrokenPipeError(32, 'Broken pipe')

    flush = write


@pytest.mark.parametrize('stdout, message', [(BrokenPipe(), 'Broken pipe'), (None, 'standard output is closed')])
def test_a_report_that_cannot_be_printed_is_one_line(tmp_path, capsys, monkeypatch, stdout, message):
    data = str(fake_data(tmp_path / 'data'))
    monkeypatch.setattr(sys, 'stdout', stdout)
    assert benchmark.main(['--data', data, '--model', 'blend', '--json', str(tmp_path / 'r.json')]) == 2
    monkeypatch.undo()
    assert_one_error_line(capsys, f'cannot write to standard output: {message}')
    assert json.loads((tmp_path / 'r.json').read_text())['mean']['psnr'] == pytest.approx(fake_scores()[0])


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='no /dev/full')
def test_a_full_stdout_is_one_line_and_exit_2(tmp_path):
    data = str(fake_data(tmp_path / 'data'))
    with open('/dev/full', 'w') as full:
        result = subprocess.run([sys.executable, 'benchmark.py', '--data', data, '--model', 'blend', '--json',
                                 str(tmp_path / 'r.json')], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if 'error' in line]  # after the progress bar
    assert errors == ['error: cannot write to standard output: No space left on device']
    assert result.stderr.endswith('device\n')
    assert json.loads((tmp_path / 'r.json').read_text())['model'] == 'blend'
