"""Train SepConv on frame triplets cut from videos.

    python train.py --loss l1 --data ../shared/data/train-videos --out runs/l1
    python train.py --loss lf --init weights/network-l1.safetensors --vgg-weights vgg19.pth --out runs/lf
    torchrun --nproc_per_node=8 train.py ...            # DistributedDataParallel
    python train.py --export runs/l1/ckpt.pt weights/network-l1.safetensors
    python train.py --config paper                      # a named run from configs/ (train_config.py)
"""
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import cli
from benchmark import evaluate, find_sequences, mean
from checkpoints import (check_resumed_options, export, load_checkpoint, log_line, read_checkpoint, read_log,
                         save_checkpoint, write_log)
from cli import ArgumentParser, InputError
from files import append, check_not_an_input, check_writable, is_within, lock, resolve, write_file
import data
from data import MOTION_BUCKETS, StepBatches, load_data, motion_bucket
from model import KERNEL_SIZE, Network, keep_freed_memory, load_network
from network_setup import (HeadMonitor, KernelUnitReLU, init_weights, leak_where_kernels_are_constant, network_options,
                           parameter_groups, with_options)
from plot import plot_log
from precision import CHOICES as PRECISIONS, native as native_precision, resolve as resolve_precision
from train_config import config_arguments
from vgg import feature_loss, load_vgg



def parse_args(argv=None):
    p = ArgumentParser(description='Train SepConv (Adamax; L1, or the VGG-19 feature loss to fine-tune).',
                       formatter_class=cli.HelpFormatter)
    p.add_argument('--out', default='runs/l1', help='folder for checkpoint, log.csv and loss.png')
    p.add_argument('--loss', choices=('l1', 'lf'), default='l1', help='l1: colour L1; lf: VGG-19 relu4_4 feature '
                   'loss alone, for fine-tuning an l1 model given with --init')
    p.add_argument('--vgg-weights', help='torchvision-format vgg19 state dict (for --loss lf)')
    p.add_argument('--init', help='start from these weights (.safetensors or original .pytorch)')
    p.add_argument('--resume', help="checkpoint to resume, or 'auto' for OUT/ckpt.pt if it exists")
    p.add_argument('--batch', type=int, default=16, help='global batch size')
    p.add_argument('--lr', type=float, default=5e-4, help='Adamax learning rate (the paper: 1e-3; the bundled '
                   'weights were trained at 5e-4)')
    p.add_argument('--warmup', type=int, default=300, help='steps of linear learning-rate warm-up')
    p.add_argument('--decay', type=int, default=0, help='steps before --max-steps over which the learning rate '
                                                          'falls linearly to 0 (less weight noise at the end)')
    p.add_argument('--decay-minutes', type=float, default=0, help='minutes before --max-minutes over which the '
                   'learning rate falls linearly to 0, for runs bounded by time')
    p.add_argument('--precision', choices=PRECISIONS, default='auto', help='autocast of the network; auto: '
                   'bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32')
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999), help='Adamax betas')
    p.add_argument('--kernel-target', type=float, default=0.1, help='weight of the kernel-target loss (see '
                   'kernel_target_loss) beside L1, until --kernel-until')
    p.add_argument('--kernel-loss', choices=('l1', 'l2'), default='l1', help='distance of the kernel targets')
    p.add_argument('--kernel-moment', type=float, default=0.0, help="weight, within the kernel-target loss, of "
                   "the distance of the kernels' first moments from the flow's (see kernel_target_loss)")
    p.add_argument('--kernel-until', type=int, default=0, help='train the kernels towards optical-flow targets '
                   'up to this step, then L1 alone (0: never)')
    p.add_argument('--constant-leak', type=float, default=0.0, help="gradient slope of the kernel heads' last "
                   'ReLU where all its units are off (see KernelUnitReLU; 0: a plain ReLU)')
    p.add_argument('--leak-min-motion', type=float, default=0.0, help='--constant-leak only where the optical '
                   'flow moves more than this many pixels towards either frame (needs --kernel-until; 0: everywhere)')
    p.add_argument('--kernel-normalization', action='store_true', help='divide the frame by the kernels\' mass '
                   '(Niklaus et al. 2021); recorded in the weights')
    p.add_argument('--input-normalization', action='store_true', help='the network sees the frames normalized to '
                   'their joint mean and standard deviation (Niklaus et al. 2021); recorded in the weights')
    p.add_argument('--head-prelu', action='store_true', help="PReLU as the kernel heads' last activation before "
                   'the upsampling, slopes starting at 0 (the ReLU); recorded in the weights')
    p.add_argument('--middlebury', help='Middlebury folder to benchmark on at every evaluation')
    p.add_argument('--max-steps', type=int, default=100000, help='training steps in all')
    p.add_argument('--max-minutes', type=float, default=0, help='stop (and checkpoint) after this long')
    p.add_argument('--ckpt-every', type=int, default=500, help='steps between checkpoints')
    p.add_argument('--eval-every', type=int, default=1000, help='steps between validations')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes (0: load in the main one)')
    p.add_argument('--seed', type=int, default=0, help='random seed')
    p.add_argument('--export', nargs=2, metavar=('CKPT', 'SAFETENSORS'), help='write fp16 weights and exit')
    p.add_argument('--config', metavar='NAME[:STEP]', help='options of a named run, configs/NAME.toml (its first '
                   'step, or STEP); options given here win')
    data.add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    return p.parse_args(config_arguments(p, argv) + argv)


# ---------------------------------------------------------------------------------------------
# Evaluation and logging

def validate(network, val, motions, device, batch):
    """Log columns: mean PSNR over the validation patches of the network and of the blend, in all and
    per motion bucket, so that a regression on small motion shows beside the gains on large motion."""
    if len(val) == 0:
        return {}
    psnr = lambda estimate, truth: -10 * torch.log10((estimate - truth).square().mean((1, 2, 3)).clamp_min(1e-10))
    network.eval()
    ours, blend = [], []
    with torch.no_grad():
        for start in range(0, len(val), batch):
            samples = [val[k] for k in range(start, min(len(val), start + batch))]
            one, middle, two = (torch.stack(t).to(device) for t in zip(*samples))
            ours.append(psnr(network(one, two).clamp(0, 1), middle))
            blend.append(psnr(0.5 * (one + two), middle))
    network.train()
    ours, blend, buckets = torch.cat(ours).cpu().numpy(), torch.cat(blend).cpu().numpy(), motion_bucket(motions)
    row = {'val_psnr': f'{ours.mean():.3f}', 'val_blend_psnr': f'{blend.mean():.3f}'}
    for index, name in enumerate(MOTION_BUCKETS):
        if (chosen := buckets == index).any():
            row |= {f'val_psnr_{name}': f'{ours[chosen].mean():.3f}', f'val_blend_psnr_{name}': f'{blend[chosen].mean():.3f}'}
    return row


def score_middlebury(network, folder, log_folder, step):
    """Log columns of the full Middlebury set (mean and the worst sequence's gain over its blend); the
    per-sequence scores are appended to LOG_FOLDER/middlebury.jsonl."""
    network.eval()
    results = evaluate(network, folder)
    network.train()
    append(os.path.join(log_folder, 'middlebury.jsonl'), json.dumps({'step': step, 'sequences': results}) + '\n')
    worst = min(row['psnr'] - row['blend_psnr'] for row in results.values())
    return {'middlebury_psnr': f"{mean(results, 'psnr'):.3f}", 'middlebury_blend_psnr': f"{mean(results, 'blend_psnr'):.3f}",
            'middlebury_worst_gain': f'{worst:.3f}'}


# ---------------------------------------------------------------------------------------------

def kernel_target_loss(kernels, flows, distance='l1', moment=0.0):
    """How far the kernels are from sampling each frame, with half the weight, where the optical flow
    says the middle pixel's content is (flows: N x 4 x H x W, data.middle_flows): a direct target for
    every tap, where L1 on the frame alone teaches small and sub-pixel motion slowly. The target 2D kernel
    0.5 * tent(fy) (x) tent(fx) (bilinear sampling) has marginals 0.5 * tent; those of v (x) h are
    v * sum(h) and h * sum(v), whatever the split of scale between v and h. Mean L1 over marginals, plus
    `moment` times the distance of each marginal's first moment from the target's (0.5 * offset): near
    the blend, the taps' L1 pulls as hard against moving a kernel's mass as towards it; the moment says
    which way it goes."""
    taps = torch.arange(KERNEL_SIZE, device=flows.device).view(1, -1, 1, 1) - KERNEL_SIZE // 2
    vertical1, horizontal1, vertical2, horizontal2 = (k.float() for k in kernels)
    pairs = ((vertical1, horizontal1, flows[:, 0:1], flows[:, 1:2]),
             (vertical2, horizontal2, flows[:, 2:3], flows[:, 3:4]))
    loss = 0.0
    for vertical, horizontal, dy, dx in pairs:
        for kernel, other, offset in ((vertical, horizontal, dy), (horizontal, vertical, dx)):
            target = 0.5 * (1 - (taps - offset.clamp(-KERNEL_SIZE // 2, KERNEL_SIZE // 2)).abs()).clamp_min(0)
            residual = kernel * other.sum(1, keepdim=True) - target
            loss = loss + (residual.abs() if distance == 'l1' else residual.square()).sum(1).mean()
            if moment:
                loss = loss + moment * (residual * taps).sum(1).abs().mean()
    return loss / 4


class NonFiniteLoss(ArithmeticError):
    """A step whose loss or gradients are NaN or infinite: taking it would ruin the weights."""


def training_step(model, vgg, optimizer, batch, lr, precision='auto', kernel_target=0.0, kernel_loss='l1',
                  kernel_moment=0.0):
    """One optimizer step on (one, middle, two[, flows]) with the network under autocast in `precision`
    ('auto': native_precision is bf16 where it is native, ~1.5x faster than fp32 there), plus
    kernel_target times kernel_target_loss where that is > 0. Returns the loss, the L1 loss of the blend
    0.5 * (one + two) on the same batch (their ratio is the measure of learning) and the kernel-target
    loss (None without)."""
    device = next(model.parameters()).device
    one, middle, two, *flows = (t.to(device, non_blocking=True) for t in batch)
    bf16 = (native_precision(device) if precision == 'auto' else precision) == 'bf16'
    for module in model.modules():
        if isinstance(module, KernelUnitReLU):
            module.flows = flows[0] if flows else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        output, kernels = model(one, two, with_kernels=True)
    output = output.float()
    # Lf alone, for fine-tuning the l1 model, as in the paper (Sec. 3.1)
    loss = (output - middle).abs().mean() if vgg is None else feature_loss(vgg, output, middle)
    targets = kernel_target_loss(kernels, flows[0], kernel_loss, kernel_moment) if flows and kernel_target > 0 else None
    optimizer.zero_grad(set_to_none=True)
    total = loss if targets is None else loss + kernel_target * targets
    total.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    if not (torch.isfinite(total) & torch.stack([g.isfinite().all() for g in gradients]).all()):
        raise NonFiniteLoss(f'the loss is not finite ({total.item():g})' if not torch.isfinite(total) else
                            'the gradients are not finite')  # the same on every process: DDP averaged them
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    optimizer.step()
    return loss.detach(), (0.5 * (one + two) - middle).abs().mean(), None if targets is None else targets.detach()


def train(args, resumed=None, vgg=None):
    """The training loop; `resumed`: the checkpoint to resume, read already; `vgg`: the Lf network."""
    distributed = 'RANK' in os.environ
    if distributed:
        torch.distributed.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if args.batch % world:
        raise InputError(f'--batch {args.batch} is not divisible by the {world} processes')
    args.precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    options = network_options(vars(args))
    if args.init:
        network = with_options(load_network(weights=args.init), options, args.init).to(device)
    else:
        network = Network(**dict.fromkeys(options, True)).to(device)
        init_weights(network)
    leak_where_kernels_are_constant(network, args.constant_leak, args.leak_min_motion)
    vgg = vgg.to(device) if vgg is not None else None
    train_set, val_set, val_motions = load_data(args, is_main, flows=args.kernel_until > 0)
    optimizer = torch.optim.Adamax(parameter_groups(network), lr=args.lr, betas=tuple(args.betas))
    checkpoint = os.path.join(args.out, 'ckpt.pt')
    step = saved = load_checkpoint(resumed, network, optimizer) if resumed else 0
    del resumed
    model = torch.nn.parallel.DistributedDataParallel(network) if distributed else network
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=StepBatches(step, args.batch, rank, world),
                                         num_workers=args.workers, pin_memory=device.type == 'cuda',
                                         persistent_workers=args.workers > 0)
    monitor = HeadMonitor(network)
    log_path = os.path.join(args.out, 'log.csv')
    if is_main:  # rows past the checkpoint are from a run that died; columns of older versions go
        rows = [row for row in read_log(log_path) if row['step'] <= step]
        write_file(log_path, lambda temporary: write_log(temporary, rows))

    started, tick = time.time(), time.time()
    progress = tqdm(total=args.max_steps, initial=step, desc=f'train {args.loss}', disable=not is_main,
                    file=cli.side_channel)
    network.train()
    try:
        for batch in loader:
            if step >= args.max_steps:
                break
            lr = args.lr * max(0.0, min(1.0, (step + 1) / max(1, args.warmup), (args.max_steps - step) / max(1, args.decay),
                               (args.max_minutes * 60 - (time.time() - started)) / (args.decay_minutes * 60) if args.decay_minutes else 1.0))
            kernel_target = args.kernel_target if step < args.kernel_until else 0.0
            try:
                loss, blend_loss, target_loss = training_step(model, vgg, optimizer, batch, lr, args.precision,
                                                              kernel_target, args.kernel_loss, args.kernel_moment)
            except NonFiniteLoss as error:
                kept = f'{checkpoint} keeps step {saved}' if saved else 'no checkpoint was written'
                raise InputError(f'step {step + 1}: {error}; training stopped, {kept} (try a lower --lr)') from None
            step += 1

            stop = torch.tensor(float(step >= args.max_steps or 0 < args.max_minutes * 60 < time.time() - started))
            if distributed:
                torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
            stop = bool(stop)
            if not is_main:
                continue
            throughput = args.batch / (time.time() - tick)
            tick = time.time()
            loss, blend_loss = loss.item(), blend_loss.item()
            row = {'step': step, 'loss': f'{loss:.5f}', 'blend_loss': f'{blend_loss:.5f}',
                   'ratio': f'{loss / max(blend_loss, 1e-8):.4f}', 'samples_per_s': f'{throughput:.2f}'}
            if target_loss is not None:
                row['kernel_target_loss'] = f'{target_loss.item():.5f}'
            row |= {key: f'{value:.4g}' for key, value in monitor.read().items()}
            progress.update(1)
            progress.set_postfix(ratio=row['ratio'], alive=row['alive_vertical1'], samples_per_s=row['samples_per_s'])
            if step % args.eval_every == 0 or stop:
                row |= validate(network, val_set, val_motions, device, args.batch)
                if args.middlebury:
                    row |= score_middlebury(network, args.middlebury, args.out, step)
                progress.clear()
                cli.output(f"step {step}: loss/blend {row['ratio']} | validation PSNR {row.get('val_psnr', '-')} "
                           f"(blend {row.get('val_blend_psnr', '-')}) | Middlebury PSNR "
                           f"{row.get('middlebury_psnr', '-')} (blend {row.get('middlebury_blend_psnr', '-')}, worst "
                           f"sequence {row.get('middlebury_worst_gain', '-')} dB)", result=False)
                progress.refresh()
            append(log_path, log_line(row))
            if step % args.ckpt_every == 0 or stop:
                save_checkpoint(checkpoint, network, optimizer, step, args)
                saved = step
                plot_log(log_path, os.path.join(args.out, 'loss.png'))
            if stop:
                break
    finally:
        progress.close()
    if distributed:
        torch.distributed.destroy_process_group()


def check_args(args):
    """Every argument checked before any work, one line each; returns the checkpoint to resume, read."""
    for name in ('batch', 'ckpt_every', 'eval_every', 'max_steps'):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ('seed', 'workers', 'warmup', 'decay', 'kernel_until'):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.constant_leak <= 1:
        raise InputError(f'--constant-leak must be in [0, 1], got {args.constant_leak}')
    for name in ('kernel_target', 'kernel_moment', 'leak_min_motion'):
        if not 0 <= getattr(args, name) < math.inf:
            raise InputError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.constant_leak and args.head_prelu:
        raise InputError('--constant-leak and --head-prelu both replace the heads\' last ReLU: choose one')
    if args.leak_min_motion > 0 and not args.kernel_until:
        raise InputError('--leak-min-motion needs the optical flow of --kernel-until')
    if not 0 < args.lr <= 1:  # Adamax moves every weight by about lr a step: above 1 it overflows
        raise InputError(f'--lr must be in (0, 1], got {args.lr}')
    if not 0 <= args.max_minutes < math.inf:
        raise InputError(f'--max-minutes must be 0 (no limit) or more, got {args.max_minutes}')
    if not 0 <= args.decay_minutes <= (args.max_minutes if args.decay_minutes else 0):
        raise InputError(f'--decay-minutes must be 0, or up to --max-minutes ({args.max_minutes}), got {args.decay_minutes}')
    if not all(0 <= beta < 1 for beta in args.betas):
        raise InputError(f"--betas must be in [0, 1), got {' '.join(map(str, args.betas))}")
    data.check_arguments(args)
    if args.middlebury and not os.path.isdir(args.middlebury):
        raise InputError(f'no such Middlebury folder: {args.middlebury}')
    if args.middlebury:
        find_sequences(args.middlebury)  # refused now, not at the first evaluation
    for path in (args.init, args.vgg_weights, args.export and args.export[0],
                 args.resume if args.resume != 'auto' else None):
        if path and not os.path.isfile(path):
            raise InputError(f'no such file: {path}')
    if args.export:
        check_export(*args.export)
        return None
    return check_out(args)


def check_out(args):
    """--out: a folder, holding no run unless it is resumed, none of its files an input. Returns the
    checkpoint to resume, read (a bad one fails now, not after the data is extracted)."""
    checkpoint, log = (os.path.join(args.out, name) for name in ('ckpt.pt', 'log.csv'))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f'--out {args.out} is not a folder')
    held = [path for path in (checkpoint, log) if os.path.exists(path)]
    if held and not args.resume:
        raise InputError(f'--out {args.out} holds a run ({held[0]}): continue it with --resume auto, or give '
                         'another --out')
    resume = checkpoint if args.resume == 'auto' else args.resume
    resumed = read_checkpoint(resume) if resume and os.path.exists(resume) else None
    if resumed:
        check_resumed_options(resumed, args, resume)
    if resumed and resumed['step'] >= args.max_steps:
        raise InputError(f"{resume} is already at step {resumed['step']}: raise --max-steps "
                         f'({args.max_steps}) to train on')
    read_log(log)
    for name in ('ckpt.pt', 'log.csv', 'loss.png', 'middlebury.jsonl'):  # --resume OUT/ckpt.pt is replaced
        check_not_an_input(os.path.join(args.out, name), [args.init, args.vgg_weights])
    for source in args.data + args.val_data:
        if os.path.isdir(source) and is_within(args.out, source):
            raise InputError(f'--out {args.out} lies in the data folder {source}: its loss.png would become data')
    return resumed


def check_export(checkpoint, target):
    """The weights go to a new or replaceable file, never onto the checkpoint they come from."""
    check_not_an_input(target, [checkpoint])
    if not target.endswith('.safetensors'):
        raise InputError(f'the export target must be a .safetensors file, got {target}')
    check_writable(target)


def run(args):
    resumed = check_args(args)
    if args.export:
        export(*args.export)
        return
    vgg = load_vgg(args.vgg_weights) if args.loss == 'lf' else None
    try:
        os.makedirs(resolve(args.out)[0], exist_ok=True)  # through a dangling link, its target
    except OSError as error:
        raise InputError(f'cannot create --out {args.out}: {error.strerror}') from None
    if not os.access(args.out, os.W_OK):
        raise InputError(f'--out {args.out} is not writable')
    with lock(args.out) if os.environ.get('RANK', '0') == '0' else contextlib.nullcontext():
        train(args, resumed, vgg)


def main(argv=None):
    args = parse_args(argv)
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        return cli.run(run, args)
    finally:  # a run that stopped before writing anything leaves no empty folders
        folder = os.path.abspath(args.out)
        while folder != existing and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            folder = os.path.dirname(folder)


if __name__ == '__main__':
    keep_freed_memory()  # the command owns its process: each step reuses the pages the last one freed
    sys.exit(main())
