"""The benchmark sets: each layout read from a fixture tree in its published form, broken trees refused in one
line, and one run per set printing the mean of its protocol."""
import json
import os
import shutil
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import datasets
import metrics
from model import estimate

TEXTURE = np.asarray(Image.fromarray(np.random.default_rng(7).integers(0, 256, (12, 46, 3), dtype=np.uint8))
                     .resize((184, 48), Image.BICUBIC))  # smooth: the blend of a small motion is close


def frames(start, speed=2, size=(48, 64)):
    """First, middle and last frame of a texture sliding `speed` px a frame, from offset `start`."""
    return [np.ascontiguousarray(TEXTURE[:size[0], start + t * speed:start + t * speed + size[1]]) for t in range(3)]


def save(path, frame):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(frame).save(path)


def blend_mean(triplets, rounding='round', ssim=metrics.ssim_volume, prepare=lambda frame: frame):
    """Mean PSNR and SSIM of the blend of each (first, middle, last), quantised as the set's protocol says."""
    scores = []
    for triplet in triplets:
        one, truth, two = (prepare(frame) for frame in triplet)
        estimate_ = metrics.quantise((one.astype(np.float32) + two) / 2, rounding)
        scores.append((metrics.psnr(truth, estimate_), ssim(truth, estimate_)))
    return np.mean(scores, axis=0)


def run(capsys, *argv):
    code = benchmark.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), [line for line in err.splitlines() if line.startswith('error')]


def refused(capsys, *argv):
    code, out, errors = run(capsys, *argv)
    assert code == 2 and out == [] and len(errors) == 1, errors
    return errors[0].removeprefix('error: ')


VIMEO = {'00001/0001': frames(0, 1), '00001/0002': frames(10, 3), '00002/0007': frames(30, 5)}


@pytest.fixture
def vimeo(tmp_path):
    root = tmp_path / 'vimeo_triplet'
    for name, triplet in {**VIMEO, '00003/0001': frames(50)}.items():  # the last is not listed
        for index, frame in enumerate(triplet, 1):
            save(root / 'sequences' / name / f'im{index}.png', frame)
    (root / 'tri_testlist.txt').write_text(''.join(f'{name}\n' for name in VIMEO) + '\n')
    return root


def test_vimeo90k_reads_exactly_the_listed_triplets(vimeo):
    triplets = datasets.vimeo90k(str(vimeo))
    assert [t.name for t in triplets] == list(VIMEO)
    assert triplets[1][1:] == tuple(str(vimeo / 'sequences/00001/0002' / f'im{i}.png') for i in (1, 2, 3))


def test_vimeo90k_end_to_end(vimeo, tmp_path, capsys):
    code, out, errors = run(capsys, '--dataset', 'vimeo90k', '--data', vimeo, '--model', 'blend',
                            '--json', tmp_path / 'vimeo.json')
    psnr, ssim = blend_mean(VIMEO.values())
    assert (code, errors) == (0, [])
    assert out[-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.4f}' == 'mean PSNR 18.36 SSIM 0.4523'
    assert out[0].startswith('vimeo90k: 3 triplets; PSNR of the estimate rounded to uint8; SSIM with an 11x11')
    assert out[1] == 'published SepConv l1: PSNR 33.79 SSIM 0.9702 (DSepConv, AAAI 2020, table 2)'
    results = json.loads((tmp_path / 'vimeo.json').read_text())
    assert results['dataset'] == 'vimeo90k' and list(results['sequences']) == list(VIMEO)
    assert results['mean']['psnr'] == pytest.approx(psnr, abs=1e-9)


def test_the_network_is_scored_on_its_rounded_estimate(vimeo, random_weights, random_network, tmp_path, capsys):
    code, _, _ = run(capsys, '--dataset', 'vimeo90k', '--data', vimeo, '--weights', random_weights, '--limit', 1,
                     '--json', tmp_path / 'one.json')
    one, truth, two = (torch.from_numpy(f.astype(np.float32) / 255).permute(2, 0, 1)[None] for f in VIMEO['00001/0001'])
    levels = estimate(random_network, one, two)[0].permute(1, 2, 0).numpy() * 255
    rounded = np.round(levels).astype(np.uint8)
    row = json.loads((tmp_path / 'one.json').read_text())['sequences']['00001/0001']
    assert code == 0 and row == {'psnr': pytest.approx(metrics.psnr(VIMEO['00001/0001'][1], rounded), abs=1e-9),
                                 'ssim': pytest.approx(metrics.ssim_volume(VIMEO['00001/0001'][1], rounded), abs=1e-9)}
    assert row['psnr'] != pytest.approx(metrics.psnr(VIMEO['00001/0001'][1], levels.astype(np.uint8)), abs=1e-6)


def test_broken_vimeo_trees_are_refused_before_any_work(vimeo, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, 'score_triplets', None)  # must not be reached
    argv = ('--dataset', 'vimeo90k', '--data', vimeo)
    save(vimeo / 'sequences/00001/0002/im2.png', frames(10, size=(40, 64))[1])
    assert refused(capsys, *argv) == (f'triplet 00001/0002 mixes frame sizes: {vimeo}/sequences/00001/0002/im1.png '
                                      f'is 64x48, {vimeo}/sequences/00001/0002/im2.png is 64x40, '
                                      f'{vimeo}/sequences/00001/0002/im3.png is 64x48')
    (vimeo / 'sequences/00002/0007/im3.png').unlink()
    assert refused(capsys, *argv) == (f'no {vimeo}/sequences/00002/0007/im3.png '
                                      f'({vimeo}/tri_testlist.txt line 3)')
    os.symlink(vimeo / 'gone.png', vimeo / 'sequences/00002/0007/im3.png')
    assert refused(capsys, *argv) == f'{vimeo}/sequences/00002/0007/im3.png is a dangling link (to {vimeo}/gone.png)'
    (vimeo / 'tri_testlist.txt').write_text('\n\n')
    assert refused(capsys, *argv) == f'{vimeo}/tri_testlist.txt lists no triplets'
    (vimeo / 'tri_testlist.txt').unlink()
    assert refused(capsys, *argv) == f'no tri_testlist.txt in {vimeo}'


def test_every_set_but_middlebury_needs_data_and_says_where_it_is_published(capsys):
    assert refused(capsys, '--dataset', 'vimeo90k') == ('--data is needed for vimeo90k: the folder of the set '
                                                        'published at http://toflow.csail.mit.edu (vimeo_triplet.zip)')
    assert 'media.xiph.org' in refused(capsys, '--dataset', 'xiph-4k')
    assert refused(capsys, '--dataset', 'davis', '--data', '/nowhere/davis') == 'no such folder: /nowhere/davis/gt'
    assert refused(capsys, '--dataset', 'ucf101', '--limit', 0) == '--limit must be at least 1, got 0'
    with pytest.raises(SystemExit) as exit:
        benchmark.main(['--dataset', 'vimeo'])
    assert exit.value.code == 2 and "invalid choice: 'vimeo'" in capsys.readouterr().err


UCF = {'1': frames(0, 4), '21': frames(20, 1), '3': frames(40, 2)}


def test_ucf101(tmp_path, capsys):
    for name, triplet in UCF.items():
        for file, frame in zip(('frame_00.png', 'frame_01_gt.png', 'frame_02.png'), triplet):
            save(tmp_path / 'ucf' / name / file, frame)
    (tmp_path / 'ucf' / 'notes').mkdir()  # a folder with none of the files is not a triplet
    assert [t.name for t in datasets.ucf101(str(tmp_path / 'ucf'))] == ['1', '3', '21']
    code, out, _ = run(capsys, '--dataset', 'ucf101', '--data', tmp_path / 'ucf', '--model', 'blend')
    psnr, ssim = blend_mean(UCF.values())
    assert code == 0 and out[-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.4f}' == 'mean PSNR 20.41 SSIM 0.6274'
    (tmp_path / 'ucf' / '3' / 'frame_02.png').unlink()
    assert refused(capsys, '--dataset', 'ucf101', '--data', tmp_path / 'ucf') == \
        f"incomplete triplet 3: no frame_02.png in {tmp_path / 'ucf' / '3'}"


SNU = {'GOPR0384_11_00/000001.png': frames(0, 8), 'YouTube_test/0001/00008.png': frames(4, 16)}


@pytest.mark.parametrize('level', ['easy', 'extreme'])
def test_snu_film_lists_as_published(tmp_path, capsys, level):
    """The published lists name data/SNU-FILM/test/...: ROOT is the SNU-FILM folder, or the one holding data/."""
    root = tmp_path / 'data' / 'SNU-FILM'
    lines = []
    for name, triplet in SNU.items():
        paths = [f'test/{os.path.dirname(name)}/{stem}.png' for stem in ('a', 'truth', 'c')]
        for path, frame in zip(paths, triplet):
            save(root / path, frame)
        lines.append(' '.join(f'data/SNU-FILM/{path}' for path in paths))
    (root / f'test-{level}.txt').write_text('\n'.join(lines) + '\n')
    shutil.copy(root / f'test-{level}.txt', tmp_path)
    psnr, ssim = blend_mean(SNU.values())
    for data in (root, tmp_path):
        code, out, _ = run(capsys, '--dataset', f'snu-film-{level}', '--data', data, '--model', 'blend')
        assert code == 0 and out[-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.4f}' == 'mean PSNR 10.98 SSIM 0.0637'
    assert [t.truth for t in datasets.snu_film(level)(str(root))] == [
        str(root / 'test/GOPR0384_11_00/truth.png'), str(root / 'test/YouTube_test/0001/truth.png')]
    (root / f'test-{level}.txt').write_text(lines[0] + '\n' + lines[1].rsplit(' ', 1)[0] + '\n')
    assert refused(capsys, '--dataset', f'snu-film-{level}', '--data', root) == \
        f'{root}/test-{level}.txt line 2 has 2 paths; expected 3 (first, truth, last)'
    (root / 'test/GOPR0384_11_00/a.png').unlink()
    assert refused(capsys, '--dataset', f'snu-film-{level}', '--data', root).startswith(
        f'no {root}/test/GOPR0384_11_00/a.png ({root}/test-{level}.txt line 1)')


DAVIS = {'bike-trial': frames(0, 6), 'car-race': frames(60, 2)}


def test_davis(tmp_path, capsys):
    for name, (one, truth, two) in DAVIS.items():
        save(tmp_path / 'input' / name / 'frame10.png', one)
        save(tmp_path / 'input' / name / 'frame11.png', two)
        save(tmp_path / 'gt' / name / 'frame10i11.png', truth)
    code, out, _ = run(capsys, '--dataset', 'davis', '--data', tmp_path, '--model', 'blend')
    psnr, ssim = blend_mean(DAVIS.values())
    assert code == 0 and out[-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.4f}' == 'mean PSNR 15.19 SSIM 0.3562'
    (tmp_path / 'input' / 'car-race' / 'frame11.png').unlink()
    assert refused(capsys, '--dataset', 'davis', '--data', tmp_path) == \
        f"no {tmp_path}/input/car-race/frame11.png (the input frames of {tmp_path}/gt/car-race/frame10i11.png)"


def xiph_frame(number):
    """Frame `number` of a fixture clip at twice the fixture's scoring size, constant over 2 x 2 blocks, so that
    the area resize to that size gives back the base frame exactly."""
    base = np.ascontiguousarray(np.roll(TEXTURE[:, :64], 3 * number, axis=1))
    return base.repeat(2, axis=0).repeat(2, axis=1), base


@pytest.fixture
def xiph(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, 'XIPH_SIZE', (64, 48))  # the clips' 2048 x 1080, scaled down for the fixture
    for clip in datasets.XIPH_CLIPS:
        for number in range(1, 100):
            save(tmp_path / 'xiph' / f'{clip}-{number:03d}.png', xiph_frame(number)[0])
    return tmp_path / 'xiph'


@pytest.mark.slow(10)
def test_xiph_2k_and_4k(xiph, capsys):
    triplets = [[xiph_frame(n) for n in (number - 1, number, number + 1)] for number in datasets.XIPH_FRAMES]
    scaled, centres = ([[frame[k] for frame in t] for t in triplets] for k in (1, 0))
    expected = {'xiph-2k': blend_mean(scaled, 'truncate', metrics.ssim),
                'xiph-4k': blend_mean([[full[24:72, 32:96] for full in t] for t in centres], 'truncate', metrics.ssim)}
    for name, (psnr, ssim) in expected.items():
        limit = () if name == 'xiph-2k' else ('--limit', 49)  # every clip is the same: one gives the mean
        code, out, _ = run(capsys, '--dataset', name, '--data', xiph, '--model', 'blend', *limit)
        assert code == 0 and out[-1] == f'mean PSNR {psnr:.2f} SSIM {ssim:.3f}'
        assert out[0].startswith(f"{name}: {392 if name == 'xiph-2k' else 49} triplets; PSNR of the estimate "
                                 'truncated to uint8')
    names = [t.name for t in datasets.xiph(str(xiph))]
    assert len(names) == 392 and names[:2] == ['BoxingPractice-002', 'BoxingPractice-004'] and names[-1] == 'Tango-098'
    assert expected['xiph-2k'][0] == pytest.approx(13.665, abs=0.001)


def ffmpeg(*args):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-loglevel', 'error', *map(str, args)], check=True)


def test_xiph_clips_read_from_their_y4m_as_the_published_frames(xiph, tmp_path, capsys):
    """A clip given as its 10-bit .y4m scores as the PNGs that the published command extracts from it."""
    video = datasets.xiph_video(str(xiph), 'BoxingPractice')
    ffmpeg('-i', xiph / 'BoxingPractice-%03d.png', '-pix_fmt', 'yuv420p10le', '-strict', '-1', video)
    for png in xiph.glob('BoxingPractice-*.png'):
        png.unlink()
    assert datasets.xiph(str(xiph))[0] == ('BoxingPractice-002', (video, 1), (video, 2), (video, 3))
    scores = []
    for folder in (xiph, tmp_path / 'extracted'):
        if folder != xiph:
            shutil.copytree(xiph, folder, ignore=shutil.ignore_patterns('*.y4m'))
            ffmpeg('-i', video, '-pix_fmt', 'rgb24', '-vframes', 100, folder / 'BoxingPractice-%03d.png')
        code, _, _ = run(capsys, '--dataset', 'xiph-2k', '--data', folder, '--model', 'blend', '--limit', 4,
                         '--json', tmp_path / 'scores.json')
        scores.append(json.loads((tmp_path / 'scores.json').read_text())['sequences'])
    assert scores[0] == scores[1] and len(scores[0]) == 4
    for png in xiph.glob('Tango-*.png'):
        png.unlink()
    assert refused(capsys, '--dataset', 'xiph-4k', '--data', xiph) == \
        f'no Xiph clip Tango in {xiph}: neither Tango-001.png ... nor Netflix_Tango_4096x2160_60fps_10bit_420.y4m'


def test_xiph_4k_needs_frames_as_large_as_its_crop(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, 'XIPH_SIZE', (64, 48))
    for clip in datasets.XIPH_CLIPS:
        for number in range(1, 100):
            save(tmp_path / f'{clip}-{number:03d}.png', TEXTURE[:40, :64])
    assert refused(capsys, '--dataset', 'xiph-4k', '--data', tmp_path) == \
        'triplet BoxingPractice-002 has 64x40 frames; xiph-4k needs at least 64x48'
