"""One GPU round in one command: environment, CUDA correctness, speed, then training until the deadline.

    python gpu_round.py [OUT]              # on a CUDA machine (`make gpu-round`); OUT defaults to $OUT
    python gpu_round.py --dry-run OUT      # every step on the CPU at toy sizes
    python gpu_round.py --carry            # fill gpu-carry/ with Middlebury and training clips for a
                                           # remote GPU machine that receives a copy of the working tree
    python gpu_round.py --join PART... OUT.safetensors

Every step runs even when an earlier one failed; each step's result goes into OUT/summary.json as soon
as it is known. OUT receives at most 8 files: summary.json, round.log, speed.json, log.csv, loss.png and
the trained fp16 weights in parts of at most 15 MiB (put back together with --join). With several --arm,
the arms train side by side on the one GPU from the same batches; each is diagnosed (diagnose.py) on
Middlebury, their logs come back in arms.tar.gz, and the weights are those of the best arm.
"""
import argparse
import csv
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np

from cli import InputError
from files import write_file, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
CARRY = os.path.join(ROOT, 'gpu-carry')
BUNDLED = os.path.join(ROOT, 'weights', 'network-l1.safetensors')
PART_BYTES = 15 * 2 ** 20
TRAVEL_LIMIT = 64 * 2 ** 20
TRAVEL_MARGIN = 3 * 2 ** 20 // 2  # room for files others add to the working tree before the call
# What to carry (paths in ../shared/data, and in gpu-carry/), most useful first: Middlebury (as lossless WebP,
# a quarter smaller than its PNGs; the round decodes it), the validation clip, then the training clips.
CARRY_ORDER = ['middlebury', 'train-videos/sam2-dog.mp4'] + [f'train-videos/{name}.mp4' for name in (
    'bikes', 'bottle-detection', 'bigbuckbunny', 'sam2-coffee', 'sam2-blocks', 'sam2-default_juggle', 'sam2-bedroom',
    'sam2-cups', 'car-detection', 'one-by-one-person-detection')]
VALIDATION = 'sam2-dog.mp4'
# The default arms: the faithful network and the revisited options (Niklaus et al. 2021) alone and together,
# from the bundled weights with the small-motion recipe (docs/training.md).
ARMS = ['faithful', 'kernel-norm=--kernel-normalization', 'input-norm=--input-normalization', 'prelu=--head-prelu',
        'revisited=--kernel-normalization --input-normalization --head-prelu']
TRAIN_ARGS = '--lr 1e-4 --warmup 10 --kernel-until 1000000 --kernel-target 0.1 --motion-mix 0.25 0.35 0.2 0.12 0.08'
COMPRESSED = 'middlebury-webp'  # gpu-carry/'s Middlebury
SPEED_SIZES = ['640x480', '1280x720', '1920x1080', '3840x2160']
# Seconds for the CUDA tests, the speed runs, the export after training and train.py's start-up; dry run second.
LIMITS = {False: dict(tests=80, speed=75, export=40, startup=25, report=60),
          True: dict(tests=120, speed=60, export=10, startup=5, report=60)}
TESTS = ['tests/test_sepconv_cuda.py', 'tests/test_gpu_round.py::test_read_frames_falls_back_to_opencv',
         '-k', 'not nvcc and not emulat']  # the compile and emulator tests run in CI already


class StepError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Weights in parts

def split(path, folder, size=PART_BYTES):
    """path -> folder/<name>.1ofN ... NofN, each at most `size` bytes."""
    data = open(path, 'rb').read()
    count = max(1, -(-len(data) // size))
    names = [f'{os.path.basename(path)}.{k + 1}of{count}' for k in range(count)]
    for k, name in enumerate(names):
        with open(os.path.join(folder, name), 'wb') as file:
            file.write(data[k * size:(k + 1) * size])
    return names


def join(parts, target):
    """Concatenate the parts written by split (in any order) and check the result is a safetensors file."""
    from safetensors import safe_open
    numbered = {}
    for part in parts:
        match = re.search(r'\.(\d+)of(\d+)$', part)
        if not match or not os.path.isfile(part):
            raise StepError(f'not a weights part (NAME.<k>of<n>): {part}')
        numbered[int(match[1])] = (int(match[2]), part)
    count = numbered[min(numbered)][0]
    if sorted(numbered) != list(range(1, count + 1)) or any(n != count for n, _ in numbered.values()):
        raise StepError(f'need parts 1 to {count} of one file, got {len(parts)} part(s)')
    tensors = []

    def save(temporary):
        with open(temporary, 'wb') as file:
            for k in range(1, count + 1):
                file.write(open(numbered[k][1], 'rb').read())
        try:
            with safe_open(temporary, 'pt') as weights:
                tensors.append(len(weights.keys()))
        except Exception as error:  # safetensors raises its own error types for every kind of bad file
            raise StepError(f'the joined parts are not a valid safetensors file ({error})') from None
    write_file(target, save)
    return tensors[0]


# ---------------------------------------------------------------------------------------------
# Carry folder

def travelling_bytes():
    """Size of the working tree a remote GPU machine receives: tracked plus untracked, not ignored files."""
    names = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split('\0')
    return sum(os.path.getsize(os.path.join(ROOT, n)) for n in set(names) if n and os.path.isfile(os.path.join(ROOT, n)))


def prepare_carry(source):
    """Copy what fits of CARRY_ORDER from `source` into gpu-carry/ and print the remote call's arguments."""
    from PIL import Image
    room = TRAVEL_LIMIT - TRAVEL_MARGIN - travelling_bytes()
    shutil.rmtree(CARRY, ignore_errors=True)
    carried, left = [], []
    for item in CARRY_ORDER:
        path = os.path.join(source, item)
        files = sorted(glob.glob(os.path.join(path, '*', '*.png'))) if os.path.isdir(path) else [path]
        if not files or not all(map(os.path.isfile, files)):
            raise StepError(f'missing: {path}')
        staged = os.path.join(CARRY, 'staging')
        copies = []
        for file in files:
            if os.path.isdir(path):  # <Seq>/<name>.png -> middlebury-webp/<Seq>/<name>.webp
                name = os.path.splitext(os.path.relpath(file, path))[0] + '.webp'
                copies.append((os.path.join(staged, name), os.path.join(CARRY, COMPRESSED, name)))
                os.makedirs(os.path.dirname(copies[-1][0]), exist_ok=True)
                Image.open(file).save(copies[-1][0], 'WEBP', lossless=True, quality=100, method=4)
            else:
                copies.append((file, os.path.join(CARRY, item)))
        size = sum(os.path.getsize(copy) for copy, _ in copies)
        if size > room:
            left.append(item)
        else:
            for copy, target in copies:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(copy, target)
            room -= size
            carried.append(item)
        shutil.rmtree(staged, ignore_errors=True)
    print(f"gpu-carry/: {', '.join(carried)}")
    if left:
        print(f"left out, over the 64 MiB a copy of the working tree may take: {', '.join(left)}")
    print(f'{room / 2 ** 20:.1f} MiB to spare (after a {TRAVEL_MARGIN / 2 ** 20:.1f} MiB margin; prepare again if the '
          'working tree grew). Remote call:')
    print(json.dumps({'command': 'python3 gpu_round.py', 'carry': ['gpu-carry'], 'timeout_s': 600}))


def unpack_middlebury(work):
    """gpu-carry/'s WebP Middlebury as the PNG folder the benchmark reads (lossless: the same pixels)."""
    from PIL import Image
    target = os.path.join(work, 'middlebury')
    for file in sorted(glob.glob(os.path.join(CARRY, COMPRESSED, '*', '*.webp'))):
        png = os.path.join(target, os.path.splitext(os.path.relpath(file, os.path.join(CARRY, COMPRESSED)))[0] + '.png')
        os.makedirs(os.path.dirname(png), exist_ok=True)
        Image.open(file).save(png)
    return target


# ---------------------------------------------------------------------------------------------
# The round

class Round:
    """Runs the steps in order; each has its own time limit, and one that fails stops none of the others."""

    def __init__(self, args):
        self.args, self.out, self.work, self.started = args, args.out, args.work, time.time()
        self.deadline, self.ends = self.started + args.minutes * 60, None
        self.device, self.limits, self.best = 'cpu' if args.dry_run else 'cuda', LIMITS[args.dry_run], None
        self.summary = {'dry_run': args.dry_run, 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                        'minutes': args.minutes, 'steps': {}}
        self.log = open(os.path.join(self.out, 'round.log'), 'w')
        # toy sizes gain nothing from threads, and on a busy machine (CI) competing threads slow torch badly
        self.threads = {'OMP_NUM_THREADS': '1'} if args.dry_run else {}
        if args.dry_run:
            import torch
            torch.set_num_threads(1)

    def run(self):
        """The round, in order, with each step's limit in seconds."""
        limits, left = self.limits, lambda reserve: self.deadline - time.time() - reserve
        self.step(environment, 30)
        self.step(cuda_tests, limits['tests'])
        self.step(network, 120)
        self.step(speed, limits['speed'])
        self.step(patches, left(60))  # extraction and one step, so that the training's time is all training
        self.step(training, left(limits['export'] + (limits['report'] if len(self.args.arm) > 1 else 0)))
        if len(self.args.arm) > 1:
            self.step(report, left(limits['export']))
        self.step(export, 120)
        self.summary['seconds'] = round(time.time() - self.started, 1)
        self.save()
        failed = [name for name, result in self.summary['steps'].items() if not result['ok']]
        print(f"round done in {self.summary['seconds']:.0f} s; " + (f"failed: {', '.join(failed)}" if failed else
                                                                   'every step ok'))
        return 1 if failed else 0

    def save(self):
        write_json(os.path.join(self.out, 'summary.json'), self.summary)

    def step(self, function, seconds):
        """function(self, result) fills the dict result within `seconds` (the processes it starts are
        stopped then); whatever it raises marks the step failed, nothing more."""
        name, started, result = function.__name__, time.time(), {}
        self.ends = started + max(1, seconds)
        self.log.write(f'\n===== {name} =====\n')
        self.log.flush()
        try:
            function(self, result)
            result = {'ok': True, **result}
        except Exception as error:  # any failure is recorded, and the next step runs
            result = {'ok': False, 'error': (str(error).strip().splitlines() or [type(error).__name__])[-1], **result}
            self.log.write(f'{name} failed: {type(error).__name__}: {error}\n')
        result['seconds'] = round(time.time() - started, 1)
        self.summary['steps'][name] = result
        self.save()
        print(f"{name:<12} {'ok' if result['ok'] else 'FAILED':<6} {result['seconds']:>6.1f} s  "
              f"{result.get('error') or result.get('note', '')}", flush=True)

    def parallel(self, argvs, logs):
        """Run python argv for each argv at once, each writing to its log, until the step's limit; returns the
        exit codes (None: stopped at the limit)."""
        env = dict(os.environ, PYTHONUNBUFFERED='1', TQDM_MININTERVAL='30', **self.threads)
        processes = []
        for argv, log in zip(argvs, logs):
            self.log.write('$ ' + ' '.join([sys.executable, *argv]) + f' > {log}\n')
            processes.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=open(log, 'w'),
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True))
        self.log.flush()
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=max(1, self.ends - time.time())))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                codes.append(None)
        return codes

    def python(self, *argv, timeout=None):
        """Run python argv in the repository, output to round.log, within `timeout` (default: until the
        step's limit); returns the output, raises on failure."""
        timeout = self.ends - time.time() if timeout is None else timeout
        command = [sys.executable, *argv]
        self.log.write('$ ' + ' '.join(command) + '\n')
        self.log.flush()
        start = self.log.tell()
        env = dict(os.environ, PYTHONUNBUFFERED='1', TQDM_MININTERVAL='30', **self.threads)
        process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # train.py's data-loader workers too
            process.wait()
            code = None
        with open(self.log.name) as file:
            file.seek(start)
            output = file.read()
        if code != 0:
            lines = [line.strip() for line in output.splitlines() if line.strip()] or ['']
            last = next((line for line in reversed(lines) if re.match(r'error:|\w+(Error|Exception)\b', line)), lines[-1])
            error = StepError(f'timed out after {timeout:.0f} s' if code is None else f'exit code {code}: {last}')
            error.output = output
            raise error
        return output


# ---------------------------------------------------------------------------------------------
# The steps: each fills `result` for summary.json

def environment(job, result):
    import torch
    result.update(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                  cpus=os.cpu_count(), cuda_available=torch.cuda.is_available())
    for module in ('cupy', 'cv2', 'imageio_ffmpeg'):
        try:
            result[module] = __import__(module).__version__
        except Exception:  # a missing or broken package is a fact to record, not a failure
            result[module] = None
    if torch.cuda.is_available():
        result['gpu'] = torch.cuda.get_device_name()
        result['gpu_memory_gib'] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    if shutil.which('nvidia-smi'):
        result['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                          capture_output=True, text=True, timeout=20).stdout.strip()
    result['note'] = result.get('gpu') or 'no GPU'


def cuda_tests(job, result):
    try:
        output, failure = job.python('-m', 'pytest', '-v', '--tb=short', '-p', 'no:cacheprovider', *TESTS), None
    except StepError as error:  # counted all the same, from the tests that finished
        output, failure = error.output, error
    outcomes = re.findall(r'^(tests/\S+) (PASSED|FAILED|SKIPPED|ERROR)', output, re.MULTILINE)
    for key, word in (('passed', 'PASSED'), ('failed', 'FAILED'), ('skipped', 'SKIPPED'), ('errors', 'ERROR')):
        result[key] = sum(outcome == word for _, outcome in outcomes)
    result['failures'] = [test for test, outcome in outcomes if outcome in ('FAILED', 'ERROR')][:20]
    result['note'] = f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if failure:
        raise failure


def network(job, result):
    """The bundled network on the device against the CPU, on one Middlebury pair."""
    from PIL import Image
    from metrics import psnr
    from model import interpolate, load_network
    from precision import native as native_precision
    sequences = middlebury_sequences(job.args.middlebury)
    files = [os.path.join(sequences[0], f'{name}.png') for name in ('frame10', 'frame11', 'frame10i11')] \
        if sequences else [os.path.join(ROOT, 'images', name) for name in ('one.png', 'two.png')] + [None]
    crop = slice(0, 64 if job.args.dry_run else None)
    one, two, truth = (np.asarray(Image.open(f).convert('RGB'))[crop, crop] if f else None for f in files)
    reference = interpolate(one, two, load_network(device='cpu'))
    on_device = load_network(device=job.device)
    result.update(pair=os.path.basename(os.path.dirname(files[0])), size=f'{one.shape[1]}x{one.shape[0]}')
    if truth is not None:
        result['psnr_cpu'] = round(psnr(truth, reference), 4)
    precisions = sorted({'fp32', native_precision(job.device)})  # no emulated bf16 on a dry run
    for precision in precisions:
        estimate = interpolate(one, two, on_device, precision=precision)
        result[f'{precision}_psnr_vs_cpu'] = round(min(psnr(reference, estimate), 100.0), 2)  # JSON has no inf
        if truth is not None:
            result[f'{precision}_psnr_change'] = round(psnr(truth, estimate) - result['psnr_cpu'], 4)
    result['note'] = ', '.join(f'{k} {v}' for k, v in result.items() if 'psnr' in k)
    # TF32 or bf16 convolutions stay above 50 dB against the CPU's fp32; 40 dB is a visible difference
    if min(result[f'{precision}_psnr_vs_cpu'] for precision in precisions) < 40:
        raise StepError(f'the network on {job.device} differs from the CPU: {result["note"]}')


def speed(job, result):
    rows, header, failed = [], {}, []
    for size in ['64x64'] if job.args.dry_run else SPEED_SIZES:  # a process per size: a crash costs that size
        path = os.path.join(job.work, f'speed-{size}.json')
        try:
            job.python('benchmark.py', '--speed', '--device', job.device, '--sizes', size, '--json', path,
                         *(['--repeats', '1'] if job.args.dry_run else ['--precisions', 'fp32,bf16']))
        except StepError as error:
            failed.append(f'{size} ({error})')
            continue
        header = json.load(open(path))
        rows += header.pop('rows')
        result[size] = {f"{r['what']} {r['variant']}": f"{r['ms']:.3f} ms, {r['peak_mib'] or 0:.0f} MiB"
                        for r in rows if r['size'] == size}
    write_json(os.path.join(job.out, 'speed.json'), {**header, 'rows': rows})
    result['interpolation_fps'] = {f"{r['size']} {r['variant']}": round(r['fps'], 2)
                                   for r in rows if r['what'] == 'interpolation'}
    result['note'] = header.get('device_name', '')
    if failed:
        raise StepError('failed: ' + '; '.join(failed))


def train_argv(job, arm, flags=()):
    dry = job.args.dry_run
    from video import VIDEO_EXTENSIONS
    videos = sorted(v for v in glob.glob(os.path.join(job.args.data, '*')) if v.lower().endswith(VIDEO_EXTENSIONS))
    held_out = [v for v in videos if os.path.basename(v) == VALIDATION and len(videos) > 1]
    argv = ['train.py', '--data', *[v for v in videos if v not in held_out], *(['--val-data', *held_out] if held_out else []),
            '--out', os.path.join(job.work, arm),
            '--cache', os.path.join(job.work, 'cache'), '--crop', '32' if dry else '128',
            '--batch', str(job.args.batch), '--workers', '0' if dry else str(max(2, 10 // len(job.args.arm))),
            '--ckpt-every', '250', '--eval-every', '250', '--resume', 'auto', *job.args.train_args.split(), *flags]
    if job.args.init != 'none':
        argv += ['--init', job.args.init, '--synthetic-steps', '0']  # the heads are trained already
    if not dry:
        argv += ['--extract-workers', str(os.cpu_count())]
    if middlebury_sequences(job.args.middlebury):
        argv += ['--middlebury', job.args.middlebury]
    return argv


def patches(job, result):
    """Patch extraction (and one training step)."""
    for arm, _ in job.args.arm:
        shutil.rmtree(os.path.join(job.work, arm), ignore_errors=True)
    output = job.python(*train_argv(job, 'patches', job.args.arm[0][1]), '--max-steps', '1')
    shutil.rmtree(os.path.join(job.work, 'patches'), ignore_errors=True)
    found = re.search(r'(\d+) training patches from (\d+) sources', output)
    if found:
        result.update(training_patches=int(found[1]), sources=int(found[2]), note=found[0])


def training(job, result):
    """Every arm at once, until the step's limit less the start-up."""
    minutes = max(0.1, (job.ends - time.time() - job.limits['startup']) / 60)
    steps = '3' if job.args.dry_run else '10000000'
    argvs = [[*train_argv(job, arm, flags), '--max-steps', steps, '--max-minutes', f'{minutes:.2f}',
              *(['--decay-minutes', f'{minutes * job.args.decay_share:.2f}'] if job.args.decay_share else [])]
             for arm, flags in job.args.arm]
    codes = [None] * len(argvs)
    try:
        codes = job.parallel(argvs, [os.path.join(job.work, f'{arm}.log') for arm, _ in job.args.arm])
    finally:
        for arm, _ in job.args.arm:
            result[arm] = {}
            read_training_log(job, result[arm], arm)
        if len(job.args.arm) == 1:
            arm = job.args.arm[0][0]
            result.update(result.pop(arm))
            for name in ('log.csv', 'loss.png'):
                if os.path.exists(os.path.join(job.work, arm, name)):
                    shutil.copyfile(os.path.join(job.work, arm, name), os.path.join(job.out, name))
        else:
            pack_arms(job)
    failed = [f'{arm}: exit {code}' for (arm, _), code in zip(job.args.arm, codes) if code]
    if failed:
        raise StepError('; '.join(failed))


def pack_arms(job):
    """Each arm's log, Middlebury scores, curve, report and output in OUT/arms.tar.gz."""
    with tarfile.open(os.path.join(job.out, 'arms.tar.gz'), 'w:gz') as archive:
        for arm, _ in job.args.arm:
            for name in ('log.csv', 'middlebury.jsonl', 'loss.png', 'report.json'):
                if os.path.exists(os.path.join(job.work, arm, name)):
                    archive.add(os.path.join(job.work, arm, name), f'{arm}/{name}')
            if os.path.exists(os.path.join(job.work, f'{arm}.log')):
                archive.add(os.path.join(job.work, f'{arm}.log'), f'{arm}/train.log')


def report(job, result):
    """Each arm's last checkpoint diagnosed on Middlebury (diagnose.py) on the device; the best arm is the one
    with the highest mean among those with no sequence more than 0.1 dB under its blend, else the highest mean."""
    for arm, _ in job.args.arm:
        checkpoint = os.path.join(job.work, arm, 'ckpt.pt')
        if not os.path.exists(checkpoint):
            continue
        weights = os.path.join(job.work, arm, 'weights.safetensors')
        job.python('train.py', '--export', checkpoint, weights, timeout=60)
        output = job.python('diagnose.py', '--weights', weights, '--data', job.args.middlebury, '--device', job.device,
                            '--json')
        figures = json.loads(output[output.index('{'):output.rindex('}') + 1])
        write_json(os.path.join(job.work, arm, 'report.json'), figures)
        result[arm] = {key: value for key, value in figures.items() if not isinstance(value, dict)}
    pack_arms(job)
    ranked = sorted(result, key=lambda arm: (result[arm]['worst_gain'] >= -0.1, result[arm]['middlebury_psnr']))
    job.best = ranked[-1] if ranked else None
    result['note'] = f'best: {job.best}' if job.best else 'no arm finished'


def read_training_log(job, result, arm):
    folder = os.path.join(job.work, arm)
    log = os.path.join(folder, 'log.csv')
    rows = list(csv.DictReader(open(log))) if os.path.exists(log) else []
    if not rows:
        return
    value = lambda row, key: float(row[key]) if row.get(key) not in (None, '', 'nan') else None
    rates = sorted(value(row, 'samples_per_s') for row in rows[1:] if value(row, 'samples_per_s'))
    result.update(steps=int(rows[-1]['step']), batch=job.args.batch, triplets=int(rows[-1]['step']) * job.args.batch,
                  triplets_per_s=rates[len(rates) // 2] if rates else None,
                  first_loss=value(rows[0], 'loss'), last_loss=value(rows[-1], 'loss'))
    ratios = [value(row, 'ratio') for row in rows[-100:] if value(row, 'ratio') is not None]
    if ratios:  # the loss over the blend's loss on the same batch, where train.py logs it
        result['ratio_to_blend_last_100'] = round(float(np.mean(ratios)), 4)
    evaluated = [row for row in rows if value(row, 'val_psnr') is not None]
    if evaluated:
        result.update({key: value(evaluated[-1], key) for key in
                       ('val_psnr', 'middlebury_psnr', 'middlebury_blend_psnr', 'middlebury_worst_gain')
                       if key in evaluated[-1]})
    result['note'] = f"{result['steps']} steps, {result['triplets_per_s']} triplets/s"


def export(job, result):
    target = os.path.join(job.work, 'weights-fp16.safetensors')
    if os.path.exists(target):
        os.remove(target)
    result['arm'] = job.best or job.args.arm[0][0]
    job.python('train.py', '--export', os.path.join(job.work, result['arm'], 'ckpt.pt'), target)
    for old in glob.glob(os.path.join(job.out, 'weights-fp16.safetensors.*of*')):
        os.remove(old)
    result['parts'] = split(target, job.out)
    result['sha256'] = hashlib.sha256(open(target, 'rb').read()).hexdigest()
    result['note'] = f"join: python gpu_round.py --join {' '.join(result['parts'])} weights.safetensors"


def middlebury_sequences(folder):
    """Folders in `folder` with frame10.png, frame11.png and the ground truth frame10i11.png."""
    folders = sorted(os.path.dirname(path) for path in glob.glob(os.path.join(folder, '*', 'frame10i11.png')))
    return [f for f in folders if all(os.path.isfile(os.path.join(f, n)) for n in ('frame10.png', 'frame11.png'))]


def arm_argument(text):
    name, _, flags = text.partition('=')
    if not re.fullmatch(r'[A-Za-z0-9_-]+', name) or name in ('patches', 'cache', 'middlebury'):
        raise argparse.ArgumentTypeError(f"an arm's name is letters, digits, '-' and '_', not {name!r}")
    return name, tuple(flags.split())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out', nargs='?', default=os.environ.get('OUT'), help='output folder (default: $OUT)')
    parser.add_argument('--dry-run', action='store_true', help='every step on the CPU at toy sizes')
    parser.add_argument('--minutes', type=float, default=8.5, help='the whole round, training included (default 8.5)')
    parser.add_argument('--data', help='training videos (default gpu-carry/train-videos; videos/ with --dry-run)')
    parser.add_argument('--middlebury', default=os.path.join(CARRY, 'middlebury'), help='Middlebury sequences')
    parser.add_argument('--init', default=BUNDLED, help="weights to start training from, or 'none' (from scratch)")
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--arm', action='append', type=arm_argument, metavar='NAME[=FLAGS]',
                        help="a training run with these train.py flags (e.g. 'kn=--kernel-normalization'); several "
                             f"train side by side (default: {', '.join(ARMS)})")
    parser.add_argument('--train-args', default=TRAIN_ARGS, help='train.py arguments for every arm (default: %(default)s)')
    parser.add_argument('--decay-share', type=float, default=0.3, help="share of the training's minutes over "
                        'which the learning rate falls to 0 at the end')
    parser.add_argument('--work', help='scratch folder (default runs/gpu-round, or runs/gpu-round-dry)')
    parser.add_argument('--carry', nargs='?', const=os.path.join(os.path.dirname(ROOT), 'shared', 'data'),
                        metavar='DATA', help='fill gpu-carry/ from DATA (default ../shared/data) and print the call')
    parser.add_argument('--join', nargs='+', metavar='PART', help='PART... OUT.safetensors: put the weights back together')
    args = parser.parse_args(argv)
    try:
        if args.join:
            if len(args.join) < 2:
                raise StepError('--join needs the parts and then the output file')
            tensors = join(args.join[:-1], args.join[-1])
            digest = hashlib.sha256(open(args.join[-1], 'rb').read()).hexdigest()
            print(f'wrote {args.join[-1]}: {tensors} tensors, sha256 {digest}')
            return 0
        if args.carry:
            prepare_carry(args.carry)
            return 0
        if not args.out:
            raise StepError('no output folder: pass one or set OUT')
        if args.minutes <= 0 or args.batch < 1:
            raise StepError('--minutes and --batch must be positive')
        if not 0 <= args.decay_share < 1:
            raise StepError('--decay-share must be in [0, 1)')
        args.arm = args.arm or [arm_argument(arm) for arm in ARMS]
        if len({name for name, _ in args.arm}) < len(args.arm):
            raise StepError('two arms have one name')
        if not args.dry_run:
            import torch
            if not torch.cuda.is_available():
                raise StepError('no CUDA device here; use --dry-run to try the round on the CPU')
        args.data = os.path.abspath(args.data or (os.path.join(ROOT, 'videos') if args.dry_run else
                                                  os.path.join(CARRY, 'train-videos')))
        args.work = os.path.abspath(args.work or os.path.join(ROOT, 'runs', 'gpu-round-dry' if args.dry_run else 'gpu-round'))
        args.out, args.middlebury = os.path.abspath(args.out), os.path.abspath(args.middlebury)
        args.init = args.init if args.init == 'none' else os.path.abspath(args.init)
        if args.dry_run:
            args.batch = 2
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.work, exist_ok=True)
        if os.path.isdir(os.path.join(CARRY, COMPRESSED)) and not middlebury_sequences(args.middlebury):
            args.middlebury = unpack_middlebury(args.work)
    except (StepError, InputError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return Round(args).run()


if __name__ == '__main__':
    sys.exit(main())
