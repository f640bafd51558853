"""Train SepConv on frame triplets cut from videos.

    python train.py --loss l1 --data ../shared/data/train-videos --out runs/l1
    python train.py --loss lf --init weights/network-l1.safetensors --vgg-weights vgg19.pth --out runs/lf
    torchrun --nproc_per_node=8 train.py ...            # DistributedDataParallel
    python train.py --export runs/l1/ckpt.pt weights/network-l1.safetensors
"""
import collections
import csv
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cli
import media
import video
from benchmark import evaluate, mean
from cli import ArgumentParser, InputError, reason
from images import IMAGE_EXTENSIONS
from media import scene_cut
from model import Network, load_network
from video import VIDEO_EXTENSIONS

CACHE_VERSION = 3  # bump when patch extraction (or the scene-cut test it uses) changes
HEAD_BIAS, HEAD_LR_SCALE = 1.0, 0.1  # see init_weights and parameter_groups
LOG_COLUMNS = ('step', 'loss', 'blend_loss', 'ratio', 'alive_vertical1', 'alive_horizontal1', 'alive_vertical2',
               'alive_horizontal2', 'kernel_spread', 'samples_per_s', 'val_psnr', 'val_blend_psnr', 'middlebury_psnr',
               'middlebury_blend_psnr')
VGG_MEAN, VGG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
    p = ArgumentParser(description='Train SepConv (Adamax; L1, or the VGG-19 feature loss to fine-tune).',
                       formatter_class=cli.HelpFormatter)
    p.add_argument('--data', nargs='+', default=[], help='videos or folders of videos / of frames')
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
    p.add_argument('--precision', choices=('bf16', 'fp32'), default='bf16', help='autocast of the network')
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999), help='Adamax betas')
    p.add_argument('--crop', type=int, default=128, help='training crop size')
    p.add_argument('--patch', type=int, default=150, help='size of the cached patches the crops come from')
    p.add_argument('--strides', type=int, nargs='+', default=(1, 2), help='triplets (t-k, t, t+k) for these k')
    p.add_argument('--motion-scale', type=float, default=25.0, help='keep a patch moving m px with '
                                                                     'probability m / this (at most 1)')
    p.add_argument('--static-keep', type=float, default=0.05, help='keep probability of patches moving < 1 px')
    p.add_argument('--static-share', type=float, default=0.12, help='share of near-static patches at most')
    p.add_argument('--clip-share', type=float, default=0.2, help='share of the patches one source may hold')
    p.add_argument('--crops', type=int, default=8, help='random crops tried per triplet')
    p.add_argument('--shift', type=int, default=4, help='opposite shifts of frames one and two up to this (px)')
    p.add_argument('--synthetic', type=float, default=0.25, help='share of each batch that is synthetic '
                                                                  'layered motion')
    p.add_argument('--synthetic-steps', type=int, default=400, help='first steps on synthetic layered motion '
                                                                     'alone (they teach the heads motion before '
                                                                     'real footage, see init_weights)')
    p.add_argument('--max-per-video', type=int, default=2000, help='patches kept per video at most')
    p.add_argument('--val-data', nargs='+', default=[], help='videos or folders held out for validation')
    p.add_argument('--middlebury', help='Middlebury folder to benchmark on at every evaluation')
    p.add_argument('--max-steps', type=int, default=100000, help='training steps in all')
    p.add_argument('--max-minutes', type=float, default=0, help='stop (and checkpoint) after this long')
    p.add_argument('--ckpt-every', type=int, default=500, help='steps between checkpoints')
    p.add_argument('--eval-every', type=int, default=1000, help='steps between validations')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes (0: load in the main one)')
    p.add_argument('--extract-workers', type=int, default=1, help='processes extracting patches from the videos')
    p.add_argument('--seed', type=int, default=0, help='random seed')
    p.add_argument('--cache', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache'),
                   help='folder for extracted patches (a few hundred MB per video)')
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
    if os.path.isdir(source) or video.imageio_ffmpeg is not None:
        yield from video.FrameSource(source)
        return
    import cv2
    capture = cv2.VideoCapture(source)
    while (frame := capture.read()[1]) is not None:
        yield np.ascontiguousarray(frame[:, :, ::-1])
    capture.release()


def patch_motion(first, last):
    """Mean displacement in pixels between two uint8 patches: phase correlation on the four
    overlapping quadrants of the 2x-downscaled grey patches (quadrants that do not change count as
    still). Detects up to about a quarter of the patch size."""
    grey = [p.astype(np.float32).mean(2) for p in (first, last)]
    h, w = (s // 2 * 2 for s in grey[0].shape)
    a, b = (g[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3)) for g in grey)
    n = min(a.shape) // 2
    corners = [(y, x) for y in (0, a.shape[0] - n) for x in (0, a.shape[1] - n)]
    blocks = np.stack([np.stack([a[y:y + n, x:x + n], b[y:y + n, x:x + n]]) for y, x in corners])
    changed = np.abs(blocks[:, 0] - blocks[:, 1]).mean((1, 2)) > 1.0
    blocks = (blocks - blocks.mean((2, 3), keepdims=True)) * np.outer(np.hanning(n), np.hanning(n))
    spectra = np.fft.fft2(blocks)
    cross = spectra[:, 0] * spectra[:, 1].conj()
    surface = np.fft.ifft2(cross / (np.abs(cross) + 1e-3)).real.reshape(len(corners), -1)
    dy, dx = np.unravel_index(surface.argmax(1), (n, n))
    dy, dx = (d - n * (d > n // 2) for d in (dy, dx))  # wrap-around: the upper half are negative shifts
    return float((2 * np.hypot(dy, dx) * changed).mean())


def keep_probability(motion, args):
    """Patches are kept in proportion to their motion, so that large motion, rare in video, is not
    drowned by near-static footage; a few static patches stay so the network still learns to copy."""
    return min(1.0, motion / args.motion_scale) if motion >= 1.0 else args.static_keep


def extract_patches(frames, args, rng):
    """Patch triplets (n x 3 x P x P x 3 uint8) and their motion (px) from a frame stream. Every centre
    frame t and stride k gives `crops` candidates (t-k, t, t+k), none across a scene cut, each kept with
    keep_probability; a reservoir of --max-per-video spreads the kept ones over the whole clip."""
    span = 2 * max(args.strides) + 1
    window, cut_after = collections.deque(maxlen=span), collections.deque(maxlen=span)
    patches, motions, seen = [], [], 0
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
                motion = patch_motion(triplet[0], triplet[2])
                if rng.random() >= keep_probability(motion, args):
                    continue
                if len(patches) < args.max_per_video:
                    patches.append(triplet), motions.append(motion)
                elif (slot := rng.integers(seen + 1)) < args.max_per_video:
                    patches[slot], motions[slot] = triplet, motion
                seen += 1
    if not patches:
        return np.zeros((0, 3, args.patch, args.patch, 3), np.uint8), np.zeros(0, np.float32)
    return np.stack(patches), np.array(motions, np.float32)


def cached_patches(source, args):
    """Patches and motions of one source, extracted once into args.cache, memory-mapped after that."""
    stat = os.stat(source)
    key = json.dumps([CACHE_VERSION, media.SCENE_CUT_THRESHOLD, os.path.abspath(source), stat.st_size,
                      stat.st_mtime, args.patch, args.strides, args.motion_scale, args.static_keep, args.crops,
                      args.max_per_video, args.seed])
    name = f'{os.path.basename(source.rstrip("/"))}-{hashlib.sha1(key.encode()).hexdigest()[:12]}'
    path, motion_path = (os.path.join(args.cache, f'{name}{suffix}.npy') for suffix in ('', '-motion'))
    if not os.path.exists(path):
        os.makedirs(args.cache, exist_ok=True)
        rng = np.random.default_rng([args.seed, int(hashlib.sha1(source.encode()).hexdigest()[:8], 16)])
        patches, motions = extract_patches(read_frames(source), args, rng)
        for target, array in ((motion_path, motions), (path, patches)):  # patches last: they mark completion
            part = f'{target}.{os.getpid()}.part.npy'  # several processes may extract at once
            np.save(part, array)
            os.replace(part, target)
    return np.load(path, mmap_mode='r'), np.load(motion_path)


def balance(motions, args, seed):
    """Indices into each source's patches such that near-static patches (< 1 px) are at most
    --static-share of each source and no source holds more than --clip-share of all."""
    kept = []
    for index, motion in enumerate(motions):
        rng = np.random.default_rng([seed, index])
        moving, still = np.flatnonzero(motion >= 1.0), rng.permutation(np.flatnonzero(motion < 1.0))
        still = still[:int(len(moving) * args.static_share / (1 - args.static_share))]
        kept.append(rng.permutation(np.concatenate([moving, still])))
    share, cap = max(args.clip_share, 1 / len(kept)), max(map(len, kept))
    while cap > share * sum(min(len(k), cap) for k in kept):
        cap -= 1
    return [np.sort(k[:cap]) for k in kept]


def _upscaled(patch):
    """A uint8 H x W x 3 image at twice the size (bilinear), as a texture for synthetic layers."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((2 * patch.shape[1], 2 * patch.shape[0]),
                                                                           Image.BILINEAR))


def synthetic_triplet(textures, crop, rng):
    """(one, middle, two) of layered motion, crop x crop x 3 uint8 each: a background with its own
    translation and 1-3 elliptic foreground layers moving differently in front of it, up to 24 px
    between one and two. Rendered at 2x and averaged down, so the middle frame sits at exact
    half-pixel positions and occlusion edges are anti-aliased; one global kernel cannot solve it."""
    size = 2 * crop
    ys, xs = np.mgrid[:size, :size]
    frames = np.zeros((3, size, size, 3), np.uint8)
    for layer, texture in enumerate(textures):
        texture = _upscaled(texture)
        reach = min(24, (min(texture.shape[:2]) - size) // 2)  # half the motion, in 2x pixels
        dy, dx = rng.integers(-reach, reach + 1, 2)
        oy, ox = (rng.integers(reach, texture.shape[i] - size - reach + 1) for i in (0, 1))
        if layer:
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            ry, rx = rng.uniform(0.1, 0.35, 2) * size
        for t in (-1, 0, 1):
            sy, sx = ys - t * dy, xs - t * dx
            pixels = texture[oy + sy, ox + sx]
            if layer:
                inside = ((sy - cy) / ry) ** 2 + ((sx - cx) / rx) ** 2 <= 1
                frames[t + 1][inside] = pixels[inside]
            else:
                frames[t + 1] = pixels
    return frames.reshape(3, crop, 2, crop, 2, 3).mean((2, 4)).round().astype(np.uint8)


class Triplets(torch.utils.data.Dataset):
    """Sample k -> (one, middle, two) crops, each 3 x S x S BGR float in [0, 1]. With augmentation: a
    random crop where one and two are cut up to `shift` px apart in opposite directions (extra
    global motion, the middle stays exact), flips, rot90 and temporal order, or, for a `synthetic`
    share of samples and for all samples k < synthetic_until, synthetic_triplet. Everything follows
    from (seed, k), so resuming is exact."""

    def __init__(self, arrays, crop, seed, augment=True, shift=0, synthetic=0.0, synthetic_until=0):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.crop, self.seed, self.augment, self.shift = crop, seed, augment, shift
        self.synthetic, self.synthetic_until = synthetic, synthetic_until

    def __len__(self):
        return int(self.offsets[-1])

    def patch(self, index):
        source = np.searchsorted(self.offsets, index, side='right') - 1
        return self.arrays[source][index - self.offsets[source]]

    def __getitem__(self, k):
        rng = np.random.default_rng([self.seed, k])
        if not self.augment:
            triplet = self.patch(k)
            y = x = (triplet.shape[1] - self.crop) // 2
            triplet = triplet[:, y:y + self.crop, x:x + self.crop]
        elif k < self.synthetic_until or rng.random() < self.synthetic:
            textures = [self.patch(i)[1] for i in rng.integers(len(self), size=rng.integers(2, 5))]
            triplet = synthetic_triplet(textures, self.crop, rng)
        else:
            triplet = self.patch(rng.integers(len(self)))
            room = triplet.shape[1] - self.crop
            sy, sx = rng.integers(-min(self.shift, room // 2), min(self.shift, room // 2) + 1, 2)
            y, x = rng.integers(abs(sy), room - abs(sy) + 1), rng.integers(abs(sx), room - abs(sx) + 1)
            triplet = np.stack([frame[y + t * sy:y + t * sy + self.crop, x + t * sx:x + t * sx + self.crop]
                                for t, frame in zip((-1, 0, 1), triplet)])
        if self.augment:
            triplet = np.rot90(triplet, rng.integers(4), axes=(1, 2))
            if rng.random() < 0.5:
                triplet = triplet[:, :, ::-1]
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
    sources, held_out = find_sources(args.data), find_sources(args.val_data)
    if not sources:
        raise InputError('no training videos or frame folders given (--data)')
    if args.extract_workers > 1:  # fill the cache in parallel; the loop below then only maps it
        with multiprocessing.Pool(args.extract_workers) as pool:
            pool.starmap(cached_patches, [(source, args) for source in sources + held_out])
    progress = tqdm(sources + held_out, desc='extracting patches', disable=not is_main)
    loaded = {source: cached_patches(source, args) for source in progress}
    chosen = balance([loaded[s][1] for s in sources], args, args.seed)
    train = Triplets([loaded[s][0][c] if len(c) < len(loaded[s][0]) else loaded[s][0] for s, c in zip(sources, chosen)],
                     args.crop, args.seed, shift=args.shift, synthetic=args.synthetic,
                     synthetic_until=args.synthetic_steps * args.batch)
    val = Triplets([loaded[s][0][:256] for s in held_out], args.crop, args.seed, augment=False)
    if len(train) == 0:
        raise InputError('no patches with motion found in the training data')
    if is_main:
        motions = np.concatenate([loaded[s][1][c] for s, c in zip(sources, chosen)])
        print(f'{len(train)} training patches from {len(sources)} sources (mean motion {motions.mean():.1f} px, '
              f'{(motions < 1).mean():.0%} near-static); {len(val)} validation patches from {len(held_out)} sources')
    return train, val


# ---------------------------------------------------------------------------------------------
# Model, losses, checkpoints

HEADS = ('netVertical1', 'netHorizontal1', 'netVertical2', 'netHorizontal2')


def init_weights(network):
    """Start at the blend of the two frames with every unit alive and every kernel input-dependent.
    He-normal convolutions (PyTorch's default shrinks activations ~3x per layer: after 20 layers every
    pixel gets the same kernels). Each head's final layer starts at zero weights and a centre
    tap of sqrt(0.5) (sqrt(0.5)^2 per frame = the blend); its last ReLU layer starts with a positive
    bias (HEAD_BIAS), as its inputs are all non-negative: Adamax moves all 576 weights of a unit in the
    same direction, and a unit pushed below zero everywhere never recovers (see HEAD_LR_SCALE)."""
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
            torch.nn.init.zeros_(module.bias)
    for name in HEADS:
        head = getattr(network, name)
        with torch.no_grad():
            head[4].bias.fill_(HEAD_BIAS)
            head[-1].weight.zero_()
            head[-1].bias[head[-1].bias.numel() // 2] = math.sqrt(0.5)


def parameter_groups(network):
    """Adamax groups: the last two layers of each kernel head learn at HEAD_LR_SCALE times the rate
    of the rest. Adamax moves every weight by about lr per step, and these layers sum ~500
    non-negative inputs, so one step moves a kernel tap or a ReLU input by ~250 lr: at lr 1e-3 the
    kernels blow up in the first steps and the ReLUs before them die, never to recover."""
    fine = {id(p) for name in HEADS for layer in (4, 7) for p in getattr(network, name)[layer].parameters()}
    return [{'params': [p for p in network.parameters() if id(p) not in fine], 'lr_scale': 1.0},
            {'params': [p for p in network.parameters() if id(p) in fine], 'lr_scale': HEAD_LR_SCALE}]


class HeadMonitor:
    """Forward hooks that record, per kernel head, the share of its last ReLU's outputs that are alive
    (> 0) and the kernels' standard deviation across pixels: a head that stops adapting to the input
    shows as alive -> 0 or spread -> 0 long before the loss says anything."""

    def __init__(self, network):
        self.alive, self.spread = {}, {}
        for name in HEADS:
            head = getattr(network, name)
            head[5].register_forward_hook(self.recorder(self.alive, name, lambda out: (out > 0).float().mean()))
            head[-1].register_forward_hook(self.recorder(self.spread, name, lambda out: out.float().std((2, 3)).mean()))

    @staticmethod
    def recorder(store, name, statistic):
        def hook(module, inputs, output):
            store[name] = statistic(output.detach())
        return hook

    def read(self):
        return {f'alive_{name[3:].lower()}': float(self.alive[name]) for name in HEADS} | {
                'kernel_spread': sum(float(self.spread[name]) for name in HEADS) / len(HEADS)}


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
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, AttributeError, ValueError, IndexError):
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
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ImportError, AttributeError) as error:
        raise InputError(f'{path} is not a train.py checkpoint: {reason(error)}') from None
    if not isinstance(state, dict) or not {'model', 'optimizer', 'step', 'config', 'rng'} <= state.keys():
        raise InputError(f'{path} is not a train.py checkpoint')
    return state


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
    """Mean PSNR over the validation patches of the network and of the blend."""
    if len(val) == 0:
        return float('nan'), float('nan')
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
    return torch.cat(ours).mean().item(), torch.cat(blend).mean().item()


def smoothed(values, weight=0.98):
    """Exponential moving average, bias-corrected, so per-step noise does not hide the trend."""
    average, out = 0.0, []
    for count, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def plot_log(log_path, png_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(log_path) as file:
        rows = list(csv.DictReader(file))
    column = lambda key: [(int(r['step']), float(r[key])) for r in rows if r.get(key) not in (None, '', 'nan')]

    def curve(key):
        steps, values = list(zip(*column(key))) or [(), ()]
        return steps, smoothed(values)

    figure, (losses, heads, scores) = plt.subplots(1, 3, figsize=(15, 4))
    ratio = losses.twinx()
    for key, axis, style in (('loss', losses, 'C0'), ('blend_loss', losses, 'C7'), ('ratio', ratio, 'C3')):
        axis.plot(*curve(key), style, lw=1, label=key.replace('_', ' '))
    losses.set(xlabel='step', ylabel='L1 loss (smoothed)', title='training loss vs the blend on the same batches')
    ratio.set_ylabel('loss / blend loss', color='C3')
    losses.legend(loc='upper left')
    for name in HEADS:
        heads.plot(*curve(f'alive_{name[3:].lower()}'), lw=1, label=f'alive {name[3:]}')
    spread = heads.twinx()
    spread.plot(*curve('kernel_spread'), 'k', lw=1)
    spread.set(ylabel='kernel std across pixels', yscale='log')
    heads.set(xlabel='step', ylabel='alive share of the last ReLU', ylim=(0, 1), title='kernel heads')
    heads.legend(loc='lower left', fontsize=7)
    for key, label in (('val_psnr', 'validation patches'), ('val_blend_psnr', 'validation, blend'),
                       ('middlebury_psnr', 'Middlebury'), ('middlebury_blend_psnr', 'Middlebury, blend')):
        if points := column(key):
            scores.plot(*zip(*points), marker='o', label=label)
            scores.legend()
    scores.set(xlabel='step', ylabel='PSNR (dB)', title='evaluation')
    figure.tight_layout()
    figure.savefig(png_path + '.part.png', dpi=100)
    plt.close(figure)
    os.replace(png_path + '.part.png', png_path)


# ---------------------------------------------------------------------------------------------

def training_step(model, vgg, optimizer, batch, lr, precision='bf16'):
    """One optimizer step on (one, middle, two) with the network under autocast in `precision` (bf16
    is ~1.5x faster on CPUs with AMX/AVX512-BF16 and on GPUs). Returns the loss and the L1 loss of
    the blend 0.5 * (one + two) on the same batch: their ratio is the measure of learning."""
    device = next(model.parameters()).device
    one, middle, two = (t.to(device, non_blocking=True) for t in batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
        output = model(one, two).float()
    # Lf alone, for fine-tuning the l1 model, as in the paper (Sec. 3.1)
    loss = (output - middle).abs().mean() if vgg is None else feature_loss(vgg, output, middle)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    optimizer.step()
    return loss.detach(), (0.5 * (one + two) - middle).abs().mean()


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
    optimizer = torch.optim.Adamax(parameter_groups(network), lr=args.lr, betas=tuple(args.betas))
    checkpoint = os.path.join(args.out, 'ckpt.pt')
    resume = (checkpoint if os.path.exists(checkpoint) else None) if args.resume == 'auto' else args.resume
    step = load_checkpoint(resume, network, optimizer) if resume else 0
    model = torch.nn.parallel.DistributedDataParallel(network) if distributed else network
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=StepBatches(step, args.batch, rank, world),
                                         num_workers=args.workers, pin_memory=device.type == 'cuda',
                                         persistent_workers=args.workers > 0)
    monitor = HeadMonitor(network)
    log_path = os.path.join(args.out, 'log.csv')
    if is_main:
        rows = list(csv.DictReader(open(log_path))) if os.path.exists(log_path) else []
        with open(log_path, 'w', newline='') as file:  # rows past the checkpoint are from a run that died
            writer = csv.DictWriter(file, LOG_COLUMNS, extrasaction='ignore')  # columns of older versions go
            writer.writeheader()
            writer.writerows(row for row in rows if int(row['step']) <= step)

    started, tick = time.time(), time.time()
    progress = tqdm(total=args.max_steps, initial=step, desc=f'train {args.loss}', disable=not is_main)
    network.train()
    for one, middle, two in loader:
        if step >= args.max_steps:
            break
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup), (args.max_steps - step) / max(1, args.decay))
        loss, blend_loss = training_step(model, vgg, optimizer, (one, middle, two), lr, args.precision)
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
        row |= {key: f'{value:.4g}' for key, value in monitor.read().items()}
        progress.update(1)
        progress.set_postfix(ratio=row['ratio'], alive=row['alive_vertical1'], samples_per_s=row['samples_per_s'])
        if step % args.eval_every == 0 or stop:
            val_psnr, val_blend_psnr = validate(network, val_set, device, args.batch)
            row |= {'val_psnr': f'{val_psnr:.3f}', 'val_blend_psnr': f'{val_blend_psnr:.3f}'}
            if args.middlebury:
                network.eval()
                results = evaluate(network, args.middlebury)
                network.train()
                row |= {'middlebury_psnr': f"{mean(results, 'psnr'):.3f}",
                        'middlebury_blend_psnr': f"{mean(results, 'blend_psnr'):.3f}"}
            progress.write(f"step {step}: loss/blend {row['ratio']} | validation PSNR {row['val_psnr']} (blend "
                           f"{row['val_blend_psnr']}) | Middlebury PSNR {row.get('middlebury_psnr', '-')} "
                           f"(blend {row.get('middlebury_blend_psnr', '-')})")
        with open(log_path, 'a', newline='') as file:
            csv.DictWriter(file, LOG_COLUMNS).writerow(row)
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
    if args.workers < 0:
        raise InputError(f'--workers must be 0 or more, got {args.workers}')
    for path in (args.init, args.vgg_weights, args.export and args.export[0],
                 args.resume if args.resume != 'auto' else None):
        if path and not os.path.isfile(path):
            raise InputError(f'no such file: {path}')
    if args.resume and args.resume != 'auto':
        read_checkpoint(args.resume)  # a bad file fails now, not after the data is extracted


def run(args):
    check_args(args)
    if args.export:
        export(*args.export)
        return
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise InputError(f'cannot create --out {args.out}: {error.strerror}') from None
    if not os.access(args.out, os.W_OK):
        raise InputError(f'--out {args.out} is not writable')
    train(args)


def main(argv=None):
    args = parse_args(argv)
    created = not os.path.exists(args.out)
    try:
        return cli.run(run, args)
    finally:
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # a run that stopped before writing anything leaves no empty folder


if __name__ == '__main__':
    sys.exit(main())
