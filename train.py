"""Train SepConv on frame triplets cut from videos.

    python train.py --loss l1 --data ../shared/data/train-videos --out runs/l1
    python train.py --loss lf --init weights/network-l1.safetensors --vgg-weights vgg19.pth --out runs/lf
    torchrun --nproc_per_node=8 train.py ...            # DistributedDataParallel
    python train.py --export runs/l1/ckpt.pt weights/network-l1.safetensors
"""
import collections
import csv
import glob
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmark import evaluate, mean
import media
from media import IMAGE_EXTENSIONS, scene_cut
from model import ArgumentParser, InputError, Network, load_network

VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.avi', '.mov', '.webm')
CACHE_VERSION = 2  # bump when patch extraction (or the scene-cut test it uses) changes
HEAD_FEATURE_SCALE = 0.02  # see init_weights
VGG_MEAN, VGG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
    p = ArgumentParser(description='Train SepConv (Adamax, L1 or L1 + VGG-19 feature loss).')
    p.add_argument('--data', nargs='+', default=[], help='videos or folders of videos / of frames')
    p.add_argument('--out', default='runs/l1', help='folder for checkpoint, log.csv and loss.png')
    p.add_argument('--loss', choices=('l1', 'lf'), default='l1')
    p.add_argument('--lf-weight', type=float, default=1.0, help='weight of the relu4_4 feature loss')
    p.add_argument('--vgg-weights', help='torchvision-format vgg19 state dict (for --loss lf)')
    p.add_argument('--init', help='start from these weights (.safetensors or original .pytorch)')
    p.add_argument('--resume', help="checkpoint to resume, or 'auto' for OUT/ckpt.pt if it exists")
    p.add_argument('--batch', type=int, default=16, help='global batch size')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--warmup', type=int, default=300, help='steps of linear learning-rate warm-up')
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument('--crop', type=int, default=128, help='training crop size')
    p.add_argument('--patch', type=int, default=150, help='size of the cached patches the crops come from')
    p.add_argument('--strides', type=int, nargs='+', default=(1, 2), help='triplets (t-k, t, t+k) for these k')
    p.add_argument('--min-motion', type=float, default=0.02, help='discard patches whose first and last '
                                                                      'frame differ less (mean abs, 0..1)')
    p.add_argument('--crops', type=int, default=4, help='random crops tried per triplet')
    p.add_argument('--max-per-video', type=int, default=4000, help='patches extracted per video at most')
    p.add_argument('--val-fraction', type=float, default=0.1, help='share of videos held out for validation')
    p.add_argument('--middlebury', help='Middlebury folder to benchmark on at every evaluation')
    p.add_argument('--max-steps', type=int, default=100000)
    p.add_argument('--max-minutes', type=float, default=0, help='stop (and checkpoint) after this long')
    p.add_argument('--ckpt-every', type=int, default=500)
    p.add_argument('--eval-every', type=int, default=1000)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cache', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache'),
                   help='folder for extracted patches')
    p.add_argument('--export', nargs=2, metavar=('CKPT', 'SAFETENSORS'), help='write fp16 weights and exit')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data: frames -> triplets -> cached patches -> augmented crops

def find_sources(paths):
    """Video files and frame folders under `paths`."""
    sources = []
    for path in paths:
        if os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS):
            sources.append(path)
        elif os.path.isdir(path):
            entries = sorted(os.path.join(path, name) for name in os.listdir(path))
            if any(entry.lower().endswith(IMAGE_EXTENSIONS) for entry in entries):
                sources.append(path)
            sources += [entry for entry in entries if os.path.isdir(entry) or entry.lower().endswith(VIDEO_EXTENSIONS)]
        else:
            raise InputError(f'not a video or folder: {path}')
    return sorted(set(sources))


def read_frames(source):
    """Yield uint8 RGB frames one at a time from a video or frame folder (videos via OpenCV where
    imageio-ffmpeg is missing, as on some GPU machines)."""
    if os.path.isdir(source) or media.imageio_ffmpeg is not None:
        yield from media.FrameSource(source)
        return
    import cv2
    capture = cv2.VideoCapture(source)
    while (frame := capture.read()[1]) is not None:
        yield np.ascontiguousarray(frame[:, :, ::-1])
    capture.release()


def extract_patches(frames, args, rng):
    """Patch triplets (n x 3 x P x P x 3, uint8) from a frame stream: every centre frame t and stride
    k gives (t-k, t, t+k) unless a scene cut lies between them; static crops are discarded."""
    span = 2 * max(args.strides) + 1
    window, cut_after = collections.deque(maxlen=span), collections.deque(maxlen=span)
    patches = []
    for frame in frames:
        cut_after.append(bool(window) and scene_cut(window[-1], frame))
        window.append(frame)
        if len(window) < span or min(frame.shape[:2]) < args.patch:
            continue
        centre = span // 2
        for k in args.strides:
            if any(list(cut_after)[centre - k + 1:centre + k + 1]):
                continue
            for _ in range(args.crops):
                y = rng.integers(0, frame.shape[0] - args.patch + 1)
                x = rng.integers(0, frame.shape[1] - args.patch + 1)
                triplet = np.stack([window[centre + o][y:y + args.patch, x:x + args.patch] for o in (-k, 0, k)])
                if np.abs(triplet[0].astype(np.int16) - triplet[2]).mean() >= args.min_motion * 255:
                    patches.append(triplet)
        if len(patches) >= args.max_per_video:
            break
    return np.stack(patches) if patches else np.zeros((0, 3, args.patch, args.patch, 3), np.uint8)


def cached_patches(source, args):
    """Patches of one source, extracted once into args.cache and memory-mapped after that."""
    stat = os.stat(source)
    key = json.dumps([CACHE_VERSION, media.SCENE_CUT_THRESHOLD, os.path.abspath(source), stat.st_size,
                      stat.st_mtime, args.patch, args.strides, args.min_motion, args.crops, args.max_per_video,
                      args.seed])
    path = os.path.join(args.cache, f'{os.path.basename(source.rstrip("/"))}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npy')
    if not os.path.exists(path):
        os.makedirs(args.cache, exist_ok=True)
        rng = np.random.default_rng([args.seed, int(hashlib.sha1(source.encode()).hexdigest()[:8], 16)])
        patches = extract_patches(read_frames(source), args, rng)
        part = f'{path}.{os.getpid()}.part.npy'  # several DDP processes may extract at once
        np.save(part, patches)
        os.replace(part, path)
    return np.load(path, mmap_mode='r')


class Triplets(torch.utils.data.Dataset):
    """Sample k -> (one, middle, two) crops, each 3 x S x S BGR float in [0, 1]. The crop, flips and
    temporal order follow from (seed, k) alone, so training resumes exactly where it stopped."""

    def __init__(self, arrays, crop, seed, augment=True):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.crop, self.seed, self.augment = crop, seed, augment

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, k):
        rng = np.random.default_rng([self.seed, k])
        index = rng.integers(len(self)) if self.augment else k
        source = np.searchsorted(self.offsets, index, side='right') - 1
        triplet = self.arrays[source][index - self.offsets[source]]
        size = triplet.shape[1]
        y, x = (rng.integers(0, size - self.crop + 1, 2) if self.augment else [(size - self.crop) // 2] * 2)
        triplet = triplet[:, y:y + self.crop, x:x + self.crop]
        if self.augment:
            if rng.random() < 0.5:
                triplet = triplet[:, :, ::-1]
            if rng.random() < 0.5:
                triplet = triplet[:, ::-1]
            if rng.random() < 0.5:
                triplet = triplet[::-1]
        frames = torch.from_numpy(np.ascontiguousarray(triplet[..., ::-1])).permute(0, 3, 1, 2).float() / 255.0
        return frames[0], frames[1], frames[2]


class StepBatches:
    """Infinite batch sampler: step s of rank r draws samples s * batch + r * local + [0, local)."""

    def __init__(self, start_step, batch, rank, world):
        self.step, self.batch, self.local, self.rank = start_step, batch, batch // world, rank

    def __iter__(self):
        step = self.step
        while True:
            first = step * self.batch + self.rank * self.local
            yield list(range(first, first + self.local))
            step += 1


def load_data(args, is_main):
    sources = find_sources(args.data)
    if not sources:
        raise InputError('no training videos or frame folders given (--data)')
    held_out = sources[::max(2, round(1 / args.val_fraction))] if len(sources) > 1 and args.val_fraction > 0 else []
    arrays = {}
    for source in tqdm(sources, desc='extracting patches', disable=not is_main):
        arrays[source] = cached_patches(source, args)
    train = Triplets([arrays[s] for s in sources if s not in held_out], args.crop, args.seed)
    val = Triplets([arrays[s][:256] for s in held_out], args.crop, args.seed, augment=False)
    if len(train) == 0:
        raise InputError('no patches with motion found in the training data')
    if is_main:
        print(f'{len(train)} training patches from {len(sources) - len(held_out)} sources; '
              f'{len(val)} validation patches from {[os.path.basename(s) for s in held_out]}')
    return train, val


# ---------------------------------------------------------------------------------------------
# Model, losses, checkpoints

def init_weights(network):
    """He-normal convolutions, so the kernels depend on the input from the start (PyTorch's default
    init shrinks activations ~3x per layer: after 20 layers every pixel gets the same kernels and
    training sits at the blend). The heads' last ReLU layer is scaled down, as every tap sums ~460 of
    its non-negative outputs (an update of lr to each weight would otherwise move each tap by ~600 lr),
    and each final layer starts at zero weights and a centre tap of sqrt(0.5): the blend of the frames."""
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
            torch.nn.init.zeros_(module.bias)
    for head in (network.netVertical1, network.netHorizontal1, network.netVertical2, network.netHorizontal2):
        with torch.no_grad():
            head[4].weight.mul_(HEAD_FEATURE_SCALE)
            head[-1].weight.zero_()
            head[-1].bias[head[-1].bias.numel() // 2] = math.sqrt(0.5)


def vgg19_relu4_4():
    """VGG-19 up to relu4_4 (random weights), layer indices as torchvision's `features`."""
    layers, channels = [], 3
    for width in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512):
        if width == 'M':
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
            channels = width
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def load_vgg(path=None):
    """ImageNet VGG-19 to relu4_4 from a torchvision-format state dict, else from torchvision."""
    vgg = vgg19_relu4_4()
    if path:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            vgg.load_state_dict({k.removeprefix('features.'): v for k, v in state.items()
                                 if k.startswith('features.') and int(k.split('.')[1]) < len(vgg)})
        except Exception:
            raise InputError(f'{path} does not hold torchvision VGG-19 weights (features.N.weight, ...)') from None
        return vgg
    try:
        import torchvision
    except ImportError:
        raise InputError('--loss lf needs VGG-19 ImageNet weights: pass --vgg-weights PATH '
                         '(a torchvision vgg19 state dict) or install torchvision') from None
    vgg.load_state_dict(torchvision.models.vgg19(weights='IMAGENET1K_V1').features[:len(vgg)].state_dict())
    return vgg


def feature_loss(vgg, output, target):
    """Squared relu4_4 feature distance of BGR images (the paper's Lf)."""
    mean = output.new_tensor(VGG_MEAN[::-1]).view(1, 3, 1, 1)
    std = output.new_tensor(VGG_STD[::-1]).view(1, 3, 1, 1)
    features = lambda x: vgg(((x - mean) / std).flip(1))
    return F.mse_loss(features(output), features(target))


def save_checkpoint(path, network, optimizer, step, args):
    state = {'model': network.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
             'config': vars(args), 'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
                                           'python': random.getstate(),
                                           'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    torch.save(state, path + '.part')
    os.replace(path + '.part', path)


def read_checkpoint(path):
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
        if {'model', 'optimizer', 'step', 'config', 'rng'} <= state.keys():
            return state
    except Exception:
        pass
    raise InputError(f'{path} is not a train.py checkpoint')


def load_checkpoint(path, network, optimizer):
    state = read_checkpoint(path)
    network.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    torch.set_rng_state(state['rng']['torch'])
    np.random.set_state(state['rng']['numpy'])
    random.setstate(state['rng']['python'])
    if state['rng']['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['rng']['cuda'])
    return state['step']


def export(checkpoint, target):
    from safetensors.torch import save_file
    state = read_checkpoint(checkpoint)
    weights = {k: v.half().contiguous() for k, v in state['model'].items()}
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    save_file(weights, target + '.part', metadata={'step': str(state['step']), 'loss': state['config']['loss']})
    os.replace(target + '.part', target)
    print(f"wrote {target} (step {state['step']}, {len(weights)} tensors, fp16)")


# ---------------------------------------------------------------------------------------------
# Evaluation and logging

def validate(network, val, device, batch):
    if len(val) == 0:
        return float('nan'), float('nan')
    network.eval()
    errors, squares = [], []
    with torch.no_grad():
        for start in range(0, len(val), batch):
            one, middle, two = (torch.stack(t).to(device) for t in zip(*(val[k] for k in range(start, min(len(val), start + batch)))))
            difference = network(one, two).clamp(0, 1) - middle
            errors.append(difference.abs().mean((1, 2, 3)))
            squares.append(difference.square().mean((1, 2, 3)))
    network.train()
    mse = torch.cat(squares)
    return torch.cat(errors).mean().item(), (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()


def plot_log(log_path, png_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(log_path) as file:
        rows = list(csv.DictReader(file))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [int(r['step']) for r in rows]
    left.plot(steps, [float(r['loss']) for r in rows], lw=0.8)
    left.set(xlabel='step', ylabel='training loss', yscale='log', title='loss')
    for key, label in (('val_psnr', 'validation patches'), ('middlebury_psnr', 'Middlebury')):
        points = [(int(r['step']), float(r[key])) for r in rows if r[key] not in ('', 'nan')]
        if points:
            right.plot(*zip(*points), marker='o', label=label)
            right.legend()
    right.set(xlabel='step', ylabel='PSNR (dB)', title='evaluation')
    figure.tight_layout()
    figure.savefig(png_path + '.part.png', dpi=100)
    plt.close(figure)
    os.replace(png_path + '.part.png', png_path)


# ---------------------------------------------------------------------------------------------

def training_step(model, vgg, optimizer, batch, lr, lf_weight=1.0):
    """One optimizer step on (one, middle, two); bf16 autocast on CUDA. Returns the loss."""
    device = next(model.parameters()).device
    one, middle, two = (t.to(device, non_blocking=True) for t in batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
        output = model(one, two)
        loss = (output - middle).abs().mean()
        if vgg is not None:
            loss = loss + lf_weight * feature_loss(vgg, output.float(), middle)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.step()
    return loss.detach()


def train(args):
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
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    if args.init:
        network = load_network(weights=args.init).to(device)
    else:
        network = Network().to(device)
        init_weights(network)
    vgg = load_vgg(args.vgg_weights).to(device) if args.loss == 'lf' else None
    train_set, val_set = load_data(args, is_main)
    optimizer = torch.optim.Adamax(network.parameters(), lr=args.lr, betas=tuple(args.betas))
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, 'ckpt.pt')
    resume = checkpoint if args.resume == 'auto' and os.path.exists(checkpoint) else None if args.resume == 'auto' else args.resume
    step = load_checkpoint(resume, network, optimizer) if resume else 0
    model = torch.nn.parallel.DistributedDataParallel(network) if distributed else network
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=StepBatches(step, args.batch, rank, world),
                                         num_workers=args.workers, pin_memory=device.type == 'cuda',
                                         persistent_workers=args.workers > 0)
    log_path = os.path.join(args.out, 'log.csv')
    if is_main:
        rows = open(log_path).read().splitlines()[1:] if os.path.exists(log_path) else []
        with open(log_path, 'w') as file:  # rows past the checkpoint are from a run that died; drop them
            file.write('step,loss,samples_per_s,val_l1,val_psnr,middlebury_psnr,middlebury_ssim\n')
            file.writelines(row + '\n' for row in rows if int(row.split(',')[0]) <= step)

    started, tick = time.time(), time.time()
    progress = tqdm(total=args.max_steps, initial=step, desc=f'train {args.loss}', disable=not is_main)
    network.train()
    for one, middle, two in loader:
        if step >= args.max_steps:
            break
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        loss = training_step(model, vgg, optimizer, (one, middle, two), lr, args.lf_weight)
        step += 1

        stop = torch.tensor(float(step >= args.max_steps or 0 < args.max_minutes * 60 < time.time() - started))
        if distributed:
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        stop = bool(stop)
        if not is_main:
            continue
        throughput = args.batch / (time.time() - tick)
        tick = time.time()
        progress.update(1)
        progress.set_postfix(loss=f'{loss.item():.4f}', samples_per_s=f'{throughput:.1f}')
        row = [step, f'{loss.item():.5f}', f'{throughput:.2f}', '', '', '', '']
        if step % args.eval_every == 0 or stop:
            val_l1, val_psnr = validate(network, val_set, device, args.batch)
            row[3:5] = f'{val_l1:.5f}', f'{val_psnr:.3f}'
            if args.middlebury:
                network.eval()
                results = evaluate(network, args.middlebury)
                network.train()
                row[5:7] = f"{mean(results, 'psnr'):.3f}", f"{mean(results, 'ssim'):.4f}"
            progress.write(f'step {step}: val L1 {row[3]} PSNR {row[4]} | Middlebury PSNR {row[5] or "-"} SSIM {row[6] or "-"}')
        with open(log_path, 'a') as file:
            file.write(','.join(map(str, row)) + '\n')
        if step % args.ckpt_every == 0 or stop:
            save_checkpoint(checkpoint, network, optimizer, step, args)
            plot_log(log_path, os.path.join(args.out, 'loss.png'))
        if stop:
            break
    progress.close()
    if distributed:
        torch.distributed.destroy_process_group()


def check_args(args):
    for name in ('batch', 'ckpt_every', 'eval_every', 'max_steps', 'crops', 'max_per_video'):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.crop < 32 or args.crop % 32 or args.crop > args.patch:
        raise InputError(f'--crop must be a multiple of 32 (the network pools 5 times) and at most --patch '
                         f'{args.patch}, got {args.crop}')
    if not 0 < args.lr < math.inf:
        raise InputError(f'--lr must be a positive number, got {args.lr}')
    for path in (args.init, args.vgg_weights, args.export and args.export[0],
                 args.resume if args.resume != 'auto' else None):
        if path and not os.path.isfile(path):
            raise InputError(f'no such file: {path}')


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        if args.export:
            export(*args.export)
        else:
            train(args)
    except InputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
