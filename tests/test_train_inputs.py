"""train.py's inputs and outputs: the checkpoint, the log, the cache and --out are validated before any work,
never overwritten by another run, and a report that cannot be printed never stops training."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoints
import network_setup
import benchmark
import cli
import data
import files
import train
from model import Network
from test_train import ROOT, run_args


def call(argv, capsys):
    code = train.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def one_error(err, message):
    assert err.endswith('\n') and err.splitlines()[-1].startswith('error: ') and message in err.splitlines()[-1], err
    assert err.count('error') == 1 and 'Traceback' not in err, err


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A checkpoint of a fresh network, as train.py writes it before the first step."""
    torch.manual_seed(0)
    network = Network()
    network_setup.init_weights(network)
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    checkpoints.save_checkpoint(path, network, torch.optim.Adamax(network_setup.parameter_groups(network)), 3,
                          train.parse_args(['--out', os.path.dirname(path)]))
    return path


def changed(checkpoint, tmp_path, change):
    state = torch.load(checkpoint, weights_only=False)
    change(state)
    path = tmp_path / 'changed.pt'
    torch.save(state, path)
    return path


def test_an_out_holding_a_run_is_refused_unless_resumed_and_locked_while_used(frames_dir, tmp_path, capsys,
                                                                              checkpoint):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(open(checkpoint, 'rb').read())  # at step 3
    (out / 'log.csv').write_text('step,loss\n1,0.5\n2,0.4\n3,0.3\n')
    before = {name: (out / name).read_bytes() for name in ('ckpt.pt', 'log.csv')}
    code, err = call(run_args(frames_dir, tmp_path, out, 4), capsys)
    assert code == 2
    one_error(err, f'--out {out} holds a run ({out / "ckpt.pt"}): continue it with --resume auto')
    code, err = call(run_args(frames_dir, tmp_path, out, 3, '--resume', 'auto'), capsys)
    assert code == 2
    one_error(err, f'{out / "ckpt.pt"} is already at step 3: raise --max-steps (3) to train on')
    with files.lock(str(out)):  # another run uses it
        code, err = call(run_args(frames_dir, tmp_path, out, 4, '--resume', 'auto'), capsys)
    assert code == 2
    one_error(err, f'{out} is in use by another run')
    assert {name: (out / name).read_bytes() for name in before} == before
    by_any_name = train.parse_args(run_args(frames_dir, tmp_path, out, 4, '--resume', f'{out}/./ckpt.pt'))
    assert train.check_args(by_any_name)['step'] == 3  # the run continued, not an input overwritten


@pytest.mark.slow(8)
def test_training_stops_at_a_non_finite_loss_keeping_the_last_good_checkpoint(frames_dir, tmp_path, capsys,
                                                                              monkeypatch):
    real, calls = train.training_step, []

    def poisoned_at_step_3(model, vgg, optimizer, batch, *options):
        calls.append(1)
        batch = [b.clone().fill_(math.nan) if len(calls) == 3 else b for b in batch]
        return real(model, vgg, optimizer, batch, *options)
    monkeypatch.setattr(train, 'training_step', poisoned_at_step_3)
    out = tmp_path / 'run'
    code, err = call(run_args(frames_dir, tmp_path, out, 4), capsys)
    assert code == 2
    one_error(err, f'step 3: the loss is not finite (nan); training stopped, {out / "ckpt.pt"} keeps step 2')
    state = checkpoints.read_checkpoint(str(out / 'ckpt.pt'))  # finite weights, or read_checkpoint refuses them
    assert state['step'] == 2 and [line.split(',')[0] for line in (out / 'log.csv').read_text().splitlines()] == [
        'step', '1', '2']


def test_a_step_with_a_non_finite_loss_is_not_taken():
    network = Network()
    optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
    before = [p.detach().clone() for p in network.parameters()]
    batch = [torch.rand(1, 3, 32, 32) for _ in range(3)]
    batch[0][0, 0, 0, 0] = math.inf
    with pytest.raises(train.NonFiniteLoss):
        train.training_step(network, None, optimizer, batch, 1e-3, precision='fp32')
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))


def test_non_finite_weights_are_refused_everywhere(tmp_path, frames_dir, capsys, checkpoint):
    state = {key: value.half() for key, value in Network().state_dict().items()}
    state['netConv1.0.bias'][3] = math.nan
    save_file(state, str(tmp_path / 'nan.safetensors'))
    code, err = call(['--init', tmp_path / 'nan.safetensors', '--data', frames_dir, '--out', tmp_path / 'run'], capsys)
    assert code == 2
    one_error(err, 'nan.safetensors holds weights that are not finite (NaN or infinity) in 1 tensors, '
                   'e.g. netConv1.0.bias')
    middlebury = tmp_path / 'mb' / 'Seq'
    middlebury.mkdir(parents=True)
    for name in benchmark.FRAMES:
        Image.new('RGB', (8, 8)).save(middlebury / name)
    assert benchmark.main(['--data', str(tmp_path / 'mb'), '--weights', str(tmp_path / 'nan.safetensors')]) == 2
    one_error(capsys.readouterr().err, 'holds weights that are not finite')
    broken = changed(checkpoint, tmp_path, lambda s: s['model']['netVertical1.7.weight'].fill_(math.inf))
    code, err = call(['--export', broken, tmp_path / 'w.safetensors'], capsys)
    assert code == 2
    one_error(err, 'changed.pt holds weights that are not finite')
    big = changed(checkpoint, tmp_path, lambda s: s['model']['netConv1.0.weight'].fill_(1e5))  # fp16 stops at 65504
    code, err = call(['--export', big, tmp_path / 'w.safetensors'], capsys)
    assert code == 2
    one_error(err, 'changed.pt holds weights that are not finite')
    assert sorted(os.listdir(tmp_path)) == ['changed.pt', 'clip', 'mb', 'nan.safetensors']


def test_a_text_file_is_not_weights(tmp_path, frames_dir, capsys, checkpoint):
    (tmp_path / 'w.pytorch').write_text('https://host/network-l1.pytorch\n')
    for option in ('--init', '--vgg-weights'):
        code, err = call([option, tmp_path / 'w.pytorch', '--loss', 'lf' if option == '--vgg-weights' else 'l1',
                          '--data', frames_dir, '--out', tmp_path / 'run'], capsys)
        assert code == 2
        one_error(err, 'w.pytorch is not a weights file' if option == '--init' else 'does not hold torchvision VGG-19')
    code, err = call(['--init', checkpoint, '--data', frames_dir, '--out', tmp_path / 'run'], capsys)
    assert code == 2
    one_error(err, f'{checkpoint} is a train.py checkpoint, not weights: export them with python train.py --export')


@pytest.mark.parametrize('change, message', [
    (lambda s: s['optimizer']['param_groups'].pop(), 'cannot be resumed: ValueError: loaded state dict has a '
                                                     'different number of parameter groups'),
    (lambda s: s['model'].pop('netConv1.0.bias'), 'does not hold SepConv weights: 1 tensors missing'),
    (lambda s: s['rng'].update(numpy=('MT19937', [1, 2])), 'cannot be resumed'),
    (lambda s: s['rng'].update(torch=torch.zeros(3)), 'cannot be resumed'),
    (lambda s: s.update(step='3'), 'no step and loss'),
])
def test_a_checkpoint_is_validated_whole_before_any_work(tmp_path, frames_dir, capsys, checkpoint, change, message):
    path = changed(checkpoint, tmp_path, change)
    code, err = call(['--resume', path, '--data', frames_dir, '--out', tmp_path / 'run', '--cache', tmp_path / 'c'],
                     capsys)
    assert code == 2
    one_error(err, message)
    assert sorted(os.listdir(tmp_path)) == ['changed.pt', 'clip']


def test_an_older_checkpoint_still_exports_loadable_weights(tmp_path, capsys, checkpoint):
    path = changed(checkpoint, tmp_path, lambda s: s['optimizer']['param_groups'].pop())
    assert train.main(['--export', str(path), str(tmp_path / 'w.safetensors')]) == 0
    path = changed(checkpoint, tmp_path, lambda s: s['model'].pop('netConv1.0.bias'))
    code, err = call(['--export', path, tmp_path / 'x.safetensors'], capsys)
    assert code == 2 and not (tmp_path / 'x.safetensors').exists()
    one_error(err, 'does not hold SepConv weights')


def test_a_checkpoint_whose_optimizer_state_is_not_finite_is_not_resumed(tmp_path, checkpoint):
    def moments(state):
        weight = state['model']['netConv1.0.weight']
        state['optimizer']['state'][0] = {'step': torch.tensor(1.0), 'exp_avg': torch.full_like(weight, math.nan),
                                          'exp_inf': torch.zeros_like(weight)}
    path = changed(checkpoint, tmp_path, moments)
    with pytest.raises(train.InputError, match="cannot be resumed: ValueError: the optimizer's exp_avg is not finite"):
        checkpoints.read_checkpoint(str(path))
    assert checkpoints.read_checkpoint(str(path), resume=False)['step'] == 3  # its weights still export


@pytest.mark.parametrize('content', [b'step,loss\nabc,0.5\n', b'\x00\xff\xfe\x00binary', b'loss\n0.5\n'])
def test_a_log_that_is_not_a_training_log_is_one_line(tmp_path, frames_dir, capsys, content):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'log.csv').write_bytes(content)
    code, err = call(run_args(frames_dir, tmp_path, tmp_path / 'run', 1, '--resume', 'auto'), capsys)
    assert code == 2
    one_error(err, f'{tmp_path / "run" / "log.csv"} is not a training log (')
    assert (tmp_path / 'run' / 'log.csv').read_bytes() == content


def test_an_unwritable_cache_is_refused_before_any_extraction(tmp_path, frames_dir, capsys, monkeypatch):
    monkeypatch.setattr(data, 'extract_patches', None)  # must not be reached
    code, err = call(run_args(frames_dir, tmp_path, tmp_path / 'run', 1)[:-2] + ['--cache', '/proc/sepconv-cache'],
                     capsys)
    assert code == 2
    one_error(err, 'cannot create output folder /proc/sepconv-cache')
    assert not (tmp_path / 'run').exists()


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root writes to read-only folders')
def test_a_read_only_cache_is_refused_before_any_extraction(tmp_path, frames_dir, capsys):
    (tmp_path / 'cache').mkdir(mode=0o500)
    code, err = call(run_args(frames_dir, tmp_path, tmp_path / 'run', 1), capsys)
    assert code == 2
    one_error(err, f'output folder is not writable: {tmp_path / "cache"}')


def test_frame_folders_are_cached_by_content(tmp_path):
    folder = tmp_path / 'frames'
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(folder / f'{index}.bmp')
    key = data.fingerprint(str(folder))
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(folder / '1.bmp')  # the same name and size
    assert data.fingerprint(str(folder)) != key


@pytest.mark.parametrize('sizes, message', [
    ([], 'no Middlebury sequences'),
    ([8], 'incomplete Middlebury sequence Seq'),
    ([8, 8, 9], 'Middlebury sequence Seq mixes frame sizes'),
])
def test_a_bad_middlebury_folder_is_refused_before_training(tmp_path, frames_dir, capsys, monkeypatch, sizes, message):
    (tmp_path / 'mb' / 'Seq').mkdir(parents=True)
    for name, size in zip(benchmark.FRAMES, sizes):
        Image.new('RGB', (size, size)).save(tmp_path / 'mb' / 'Seq' / name)
    monkeypatch.setattr(train, 'load_data', None)  # must not be reached
    code, err = call(run_args(frames_dir, tmp_path, tmp_path / 'run', 1, '--middlebury', tmp_path / 'mb'), capsys)
    assert code == 2
    one_error(err, message)


def test_frames_smaller_than_the_patch_are_named(tmp_path, capsys):
    folder = tmp_path / 'small'
    folder.mkdir()
    for index in range(5):
        frame = np.random.default_rng(index).integers(0, 256, (24, 30, 3), np.uint8)
        Image.fromarray(frame).save(folder / f'{index}.png')
    code, err = call(['--data', folder, '--out', tmp_path / 'run', '--cache', tmp_path / 'cache', '--patch', '40',
                      '--crop', '32'], capsys)
    assert code == 2
    one_error(err, 'no patches found in the training data: the frames (30x24) are smaller than --patch 40')


def test_an_out_inside_the_data_is_refused(tmp_path, frames_dir, capsys):
    code, err = call(run_args(frames_dir, tmp_path, frames_dir / 'run', 1), capsys)
    assert code == 2
    one_error(err, f'--out {frames_dir / "run"} lies in the data folder {frames_dir}')


class Full:
    def write(self, text):
        raise OSError(28, 'No space left on device')

    flush = write


def test_a_report_that_cannot_be_printed_never_stops_training_or_an_export(frames_dir, tmp_path, capsys, monkeypatch):
    os.symlink('run', tmp_path / 'link')  # dangling, as the cache's: trained through, to the folders they name
    os.symlink('cache', tmp_path / 'cache-link')
    monkeypatch.setattr(sys, 'stdout', Full())
    argv = run_args(frames_dir, tmp_path, tmp_path / 'link', 2, '--eval-every', '1', '--cache', tmp_path / 'cache-link')
    assert train.main([str(arg) for arg in argv]) == 0
    assert train.main(['--export', str(tmp_path / 'run' / 'ckpt.pt'), str(tmp_path / 'w.safetensors')]) == 0
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count('notice: standard output lost (No space left on device); going on without it\n') == 2, err
    assert checkpoints.read_checkpoint(str(tmp_path / 'run' / 'ckpt.pt'))['step'] == 2
    assert (tmp_path / 'w.safetensors').stat().st_size > 0 and os.listdir(tmp_path / 'cache')


FULL_DISK = """
import checkpoints, network_setup, resource, signal, sys, torch, train
from model import Network
network = Network()
optimizer = torch.optim.Adamax(network_setup.parameter_groups(network))
args = train.parse_args(['--out', sys.argv[1]])
checkpoints.save_checkpoint(sys.argv[1] + '/ckpt.pt', network, optimizer, 1, args)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk
try:
    checkpoints.save_checkpoint(sys.argv[1] + '/ckpt.pt', network, optimizer, 2, args)
except train.InputError as error:
    print(error)
sys.exit(train.main(['--export', sys.argv[1] + '/ckpt.pt', sys.argv[1] + '/w.safetensors']))
"""


@pytest.mark.slow(5)
def test_a_full_disk_is_one_line_for_checkpoints_and_exports(tmp_path):
    result = subprocess.run([sys.executable, '-c', FULL_DISK, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stdout == f'cannot write {tmp_path}/ckpt.pt: File too large\n'
    assert result.stderr == f'error: cannot write {tmp_path}/w.safetensors: File too large\n'
    assert os.listdir(tmp_path) == ['ckpt.pt'] and checkpoints.read_checkpoint(str(tmp_path / 'ckpt.pt'))['step'] == 1


def test_progress_and_errors_keep_to_their_own_lines(capsys):
    cli.side_channel.write('\rtrain l1:  50%|#####     | 1/2')
    cli.say('error: something')
    assert capsys.readouterr().err == '\rtrain l1:  50%|#####     | 1/2\nerror: something\n'
