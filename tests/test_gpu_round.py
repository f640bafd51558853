"""gpu_round.py: the whole round dry-run on the CPU, weights in parts and back, and the OpenCV decoding
that train.py falls back to on the GPU machines (which have no imageio-ffmpeg)."""
import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from safetensors.torch import load_file

import gpu_round
import precision
from model import Network, load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow(60)
def test_dry_run_runs_every_step_at_toy_sizes(tmp_path, middlebury):
    """Two arms side by side, diagnosed on two 64 x 64 crops of Middlebury sequences."""
    from PIL import Image
    for sequence in ('Dimetrodon', 'MiniCooper'):
        (tmp_path / 'mb' / sequence).mkdir(parents=True)
        for name in ('frame10', 'frame11', 'frame10i11'):
            Image.open(os.path.join(middlebury, sequence, f'{name}.png')).crop((96, 96, 160, 160)).save(
                tmp_path / 'mb' / sequence / f'{name}.png')
    out = tmp_path / 'out'
    done = subprocess.run([sys.executable, 'gpu_round.py', '--dry-run', '--work', str(tmp_path / 'work'), str(out),
                           '--middlebury', str(tmp_path / 'mb'), '--arm', 'faithful',
                           '--arm', 'revisited=--kernel-normalization --head-prelu', '--train-args', '--lr 1e-4'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / 'summary.json').read_text())
    steps = summary['steps']
    assert list(steps) == ['environment', 'cuda_tests', 'network', 'speed', 'patches', 'training', 'report', 'export']
    assert {name: step.get('error') for name, step in steps.items() if not step['ok']} == {}, done.stdout
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1].endswith('every step ok')

    assert steps['environment']['cuda_available'] is False and steps['environment']['torch']
    tests = steps['cuda_tests']
    assert tests['failed'] == tests['errors'] == 0 and tests['skipped'] >= 37  # the GPU tests
    network = steps['network']
    assert network['size'] == '64x64' and network['fp32_psnr_vs_cpu'] == 100.0  # the same CPU computation
    native = precision.native('cpu')  # bf16 is checked and timed only where this CPU computes it natively
    assert ('bf16_psnr_vs_cpu' in network) == (native == 'bf16')
    assert 35 < network.get('bf16_psnr_vs_cpu', 50) <= 100  # 100: identical, as on CPUs with AVX512-BF16
    speed = json.loads((out / 'speed.json').read_text())
    assert {(row['size'], row['what'], row['variant']) for row in speed['rows']} >= {
        ('64x64', 'interpolation', native), ('64x64', 'sepconv', 'PyTorch path')}
    assert all(row['ms'] > 0 for row in speed['rows'])
    for arm in ('faithful', 'revisited'):
        training = steps['training'][arm]
        assert training['steps'] == 3 and training['batch'] == 2 and training['triplets_per_s'] > 0
        report = steps['report'][arm]
        assert report['worst_sequence'] in ('Dimetrodon', 'MiniCooper') and 0 <= report['constant_pixels'] <= 1
        assert 10 < report['middlebury_psnr'] < 60 and report['identical_min'] > 20
    best = steps['report']['note'].removeprefix('best: ')
    assert steps['export']['arm'] == best

    parts = steps['export']['parts']
    assert len(parts) == 3 and all(os.path.getsize(out / part) <= 15 * 2 ** 20 for part in parts)  # 41 MiB of fp16
    assert sorted(os.listdir(out)) == sorted(['summary.json', 'round.log', 'speed.json', 'arms.tar.gz', *parts])
    joined = str(tmp_path / 'joined.safetensors')
    assert gpu_round.main(['--join', *[str(out / p) for p in reversed(parts)], joined]) == 0
    assert hashlib.sha256(open(joined, 'rb').read()).hexdigest() == steps['export']['sha256']
    options = ('kernel_normalization', 'head_prelu') if best == 'revisited' else ()
    assert load_network(weights=joined).options == options
    assert set(load_file(joined)) == set(Network(**dict.fromkeys(options, True)).state_dict())
    with tarfile.open(out / 'arms.tar.gz') as archive:
        assert {'faithful/log.csv', 'revisited/report.json', 'revisited/middlebury.jsonl'} <= set(archive.getnames())


def test_split_and_join_round_trip(tmp_path, capsys):
    data = np.random.default_rng(0).integers(0, 256, 2500, dtype=np.uint8).tobytes()
    (tmp_path / 'blob').write_bytes(data)
    parts = gpu_round.split(str(tmp_path / 'blob'), str(tmp_path), size=1000)
    assert parts == ['blob.1of3', 'blob.2of3', 'blob.3of3']
    assert [len((tmp_path / p).read_bytes()) for p in parts] == [1000, 1000, 500]
    assert b''.join((tmp_path / p).read_bytes() for p in parts) == data
    # not a safetensors file, and a missing part: one line each, no output left behind
    for given, message in ((parts, 'the joined parts are not a valid safetensors file'),
                           (parts[:2], 'need parts 1 to 3 of one file, got 2 part(s)')):
        assert gpu_round.main(['--join', *[str(tmp_path / p) for p in given], str(tmp_path / 'joined')]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'error: {message}') and err.count('\n') == 1
        assert not os.path.exists(tmp_path / 'joined') and not os.path.exists(tmp_path / 'joined.part')


@pytest.mark.parametrize('argv, message', [
    (['--minutes', '0', 'x'], 'error: --minutes and --batch must be positive'),
    (['--join', 'a.1of2'], 'error: --join needs the parts and then the output file'),
    (['--join', 'nothing', 'out.safetensors'], 'error: not a weights part (NAME.<k>of<n>): nothing'),
])
def test_bad_arguments(capsys, argv, message):
    assert gpu_round.main(['--dry-run', *argv] if '--minutes' in argv else argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_read_frames_falls_back_to_opencv(tmp_path):
    """Where imageio-ffmpeg cannot be imported, data.read_frames decodes with OpenCV, to the same frames."""
    pytest.importorskip('cv2')
    path, saved = os.path.join(ROOT, 'videos', 'bunny.mp4'), str(tmp_path / 'frames.npy')
    code = ("import sys; sys.modules['imageio_ffmpeg'] = None\n"  # makes `import imageio_ffmpeg` fail
            f"import numpy, data; numpy.save({saved!r}, numpy.stack(list(data.read_frames({path!r}))))")
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=120)
    frames = np.load(saved)
    assert frames.shape == (8, 180, 320, 3) and frames.dtype == np.uint8
    assert frames[0].mean((0, 1)) == pytest.approx([114.87, 126.74, 85.58], abs=1.0)  # RGB, not OpenCV's BGR
    if importlib.util.find_spec('imageio_ffmpeg'):
        import media
        assert np.abs(frames.astype(int) - np.stack(list(media.FrameSource(path)))).mean() < 1.0


def test_a_step_that_runs_too_long_is_stopped(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), work=str(tmp_path), minutes=1, dry_run=True)
    started = time.time()
    with pytest.raises(gpu_round.StepError, match='timed out after 1 s'):
        gpu_round.Round(args).python('-c', 'import time; time.sleep(60)', timeout=1)
    assert time.time() - started < 20


def test_carry_packs_middlebury_losslessly_and_what_fits(tmp_path, monkeypatch, capsys):
    from PIL import Image
    source, carry = tmp_path / 'data', tmp_path / 'carry'
    frames = np.random.default_rng(0).integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
    for sequence in ('Dimetrodon', 'Venus'):
        (source / 'middlebury' / sequence).mkdir(parents=True)
        for frame, name in zip(frames, ('frame10', 'frame11', 'frame10i11')):
            Image.fromarray(frame).save(source / 'middlebury' / sequence / f'{name}.png')
    (source / 'train-videos').mkdir()
    for name in gpu_round.CARRY_ORDER[1:]:
        (source / name).write_bytes(b'v' * (3000 if name.endswith('sam2-dog.mp4') else 100_000))
    monkeypatch.setattr(gpu_round, 'CARRY', str(carry))
    monkeypatch.setattr(gpu_round, 'travelling_bytes', lambda: gpu_round.TRAVEL_LIMIT - gpu_round.TRAVEL_MARGIN - 250_000)
    gpu_round.prepare_carry(str(source))
    assert sorted(os.listdir(carry / 'train-videos')) == ['bikes.mp4', 'bottle-detection.mp4', 'sam2-dog.mp4']
    assert 'left out' in capsys.readouterr().out
    unpacked = gpu_round.unpack_middlebury(str(tmp_path / 'work'))
    assert [os.path.basename(s) for s in gpu_round.middlebury_sequences(unpacked)] == ['Dimetrodon', 'Venus']
    for frame, name in zip(frames, ('frame10', 'frame11', 'frame10i11')):
        assert np.array_equal(np.asarray(Image.open(os.path.join(unpacked, 'Venus', f'{name}.png'))), frame)
