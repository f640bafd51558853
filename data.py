"""Training data: videos, frame folders and triplet sets -> triplets -> cached patches -> a motion mix -> crops.

Triplets (t-k, t, t+k) are cut as patches from every video and frame folder, kept in proportion to their
motion (large motion is rare in video), cached once per source, then drawn so that the batches follow a
target histogram over motion buckets (--motion-mix), from exactly static to 16 px and more. A triplet set
(a Vimeo-90K root, or a folder of triplet folders) is too large to read up front: a probe of its triplets
stands for it in the mix, and each draw reads a fresh triplet of the drawn motion bucket (TripletPatches).
Synthetic layered motion, still triplets and opposite shifts complete what footage lacks."""
import collections
import hashlib
import json
import math
import multiprocessing
import os

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import video
from cli import InputError, output, side_channel
from datasets import training_triplets
from files import check_folder, check_link, listing, write_stream
from images import IMAGE_EXTENSIONS, frame_paths, image_size, read_image
from media import SCENE_CUT_THRESHOLD, scene_cut
from video import VIDEO_EXTENSIONS

CACHE_VERSION = 4  # bump when patch extraction (or the scene-cut test it uses) changes
PROBE_TRIPLETS, PROBE_CROPS = 256, 4  # read up front from a triplet set: their candidates stand for the set
FRESH_READS = 8  # triplets read at most to find a fresh one of the drawn motion bucket
MOTION_EDGES = (1, 4, 8, 16)  # px between the first and last frame of a triplet
MOTION_BUCKETS = ('lt1', '1to4', '4to8', '8to16', 'ge16')


def add_arguments(parser):
    """train.py's options for the data."""
    group = parser.add_argument_group('data')
    group.add_argument('--data', nargs='+', default=[], help='videos, folders of videos or of frames, Vimeo-90K '
                       'roots (tri_trainlist.txt) or folders of triplet folders (three images each)')
    group.add_argument('--crop', type=int, default=128, help='training crop size')
    group.add_argument('--patch', type=int, default=150, help='size of the cached patches the crops come from')
    group.add_argument('--strides', type=int, nargs='+', default=(1, 2), help='triplets (t-k, t, t+k) for these k')
    group.add_argument('--motion-scale', type=float, default=25.0, help='keep a patch moving m px with '
                                                                         'probability m / this (at most 1)')
    group.add_argument('--static-keep', type=float, default=0.2, help='keep probability of patches moving little, '
                                                                        'at least')
    group.add_argument('--motion-mix', type=float, nargs=len(MOTION_BUCKETS), default=(0.2, 0.3, 0.2, 0.18, 0.12),
                       help='target shares of the patches drawn moving < 1, 1-4, 4-8, 8-16 and 16+ px')
    group.add_argument('--max-repeat', type=float, default=4.0, help='a motion bucket is drawn at most this many '
                                                                      'times as often as its share of the patches')
    group.add_argument('--clip-share', type=float, default=0.2, help='share of the draws one source may hold')
    group.add_argument('--crops', type=int, default=8, help='random crops tried per triplet')
    group.add_argument('--shift', type=int, default=4, help='opposite shifts of frames one and two up to this (px)')
    group.add_argument('--shift-share', type=float, default=0.3, help='share of real samples given opposite shifts')
    group.add_argument('--still', type=float, default=0.05, help='share of each batch that is one frame three times '
                                                                  '(nothing moves: the identity)')
    group.add_argument('--synthetic', type=float, default=0.25, help='share of each batch that is synthetic '
                                                                      'layered motion')
    group.add_argument('--synthetic-steps', type=int, default=400, help='first steps on synthetic layered motion '
                                                                         'alone (they teach the heads motion before '
                                                                         'real footage, see network_setup.init_weights)')
    group.add_argument('--max-per-video', type=int, default=2000, help='patches kept per video at most')
    group.add_argument('--val-data', nargs='+', default=[], help='videos or folders held out for validation')
    group.add_argument('--extract-workers', type=int, default=1, help='processes extracting patches from the videos')
    group.add_argument('--cache', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache'),
                       help='folder for extracted patches (a few hundred MB per video)')


def check_arguments(args):
    """The data options, checked before any work; one line each."""
    for name in ('crops', 'max_per_video', 'patch'):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ('shift', 'extract_workers', 'synthetic_steps'):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.crop < 32 or args.crop % 32 or args.crop > args.patch:
        raise InputError(f'--crop must be a multiple of 32 (the network pools 5 times) and at most --patch '
                         f'{args.patch}, got {args.crop}')
    if min(args.strides) < 1:
        raise InputError(f'--strides must be at least 1, got {min(args.strides)}')
    for name in ('motion_scale', 'max_repeat'):
        if not 0 < getattr(args, name) < math.inf:
            raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    for name in ('static_keep', 'clip_share', 'shift_share', 'synthetic', 'still'):
        if not 0 <= getattr(args, name) <= 1:
            raise InputError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.synthetic + args.still > 1:
        raise InputError(f'--synthetic {args.synthetic} and --still {args.still} add up to more than 1')
    if not all(0 <= share < math.inf for share in args.motion_mix) or sum(args.motion_mix) <= 0:
        raise InputError(f"--motion-mix must be shares of 0 or more, not all 0, got {' '.join(map(str, args.motion_mix))}")
    if os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise InputError(f'--cache {args.cache} is not a folder')


def find_sources(paths):
    """Video files, frame folders and triplet sets under `paths`."""
    sources = []
    for path in paths:
        check_link(path)
        if os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS):
            sources.append(path)
        elif triplet_set(path) is not None:
            sources.append(path)
        elif os.path.isdir(path):
            entries = [os.path.join(path, name) for name in listing(path, 'data folder')]
            for entry in entries:
                check_link(entry)
                if os.path.isdir(entry):
                    listing(entry, 'data folder')
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
    capture = cv2.VideoCapture(source)
    while (frame := capture.read()[1]) is not None:
        yield np.ascontiguousarray(frame[:, :, ::-1])
    capture.release()


def _peak_offset(before, peak, after):
    """Sub-pixel offset of a correlation peak from its two neighbours (a parabola through three)."""
    curvature = before - 2 * peak + after
    return 0.5 * (before - after) / curvature if curvature < 0 else 0.0


def patch_motion(first, last):
    """Mean displacement in pixels between two uint8 patches: phase correlation, refined to sub-pixel
    precision, on the four overlapping quadrants of the grey patches (quadrants that do not change
    count as still). Detects up to about a quarter of the patch size."""
    a, b = (p.astype(np.float32).mean(2) for p in (first, last))
    n = min(a.shape) // 2
    corners = [(y, x) for y in (0, a.shape[0] - n) for x in (0, a.shape[1] - n)]
    blocks = np.stack([np.stack([a[y:y + n, x:x + n], b[y:y + n, x:x + n]]) for y, x in corners])
    changed = np.abs(blocks[:, 0] - blocks[:, 1]).mean((1, 2)) > 0.5
    blocks = (blocks - blocks.mean((2, 3), keepdims=True)) * np.outer(np.hanning(n), np.hanning(n))
    spectra = np.fft.fft2(blocks)
    cross = spectra[:, 0] * spectra[:, 1].conj()
    surfaces = np.fft.ifft2(cross / (np.abs(cross) + 1e-3)).real
    motions = []
    for surface, moved in zip(surfaces, changed):
        dy, dx = np.unravel_index(surface.argmax(), surface.shape)
        fy = _peak_offset(surface[dy - 1, dx], surface[dy, dx], surface[(dy + 1) % n, dx])
        fx = _peak_offset(surface[dy, dx - 1], surface[dy, dx], surface[dy, (dx + 1) % n])
        dy, dx = (d - n * (d > n // 2) for d in (dy, dx))  # wrap-around: the upper half are negative shifts
        motions.append(np.hypot(dy + fy, dx + fx) * moved)
    return float(np.mean(motions))


def motion_bucket(motion):
    """Index into MOTION_BUCKETS of a motion (px) or an array of them."""
    return np.digitize(motion, MOTION_EDGES)


def keep_probability(motion, args):
    """Candidates are kept in proportion to their motion, at least with --static-keep: large motion,
    rare in video, is not drowned by near-static footage, and small motion stays plentiful."""
    return min(1.0, max(motion / args.motion_scale, args.static_keep))


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


def fingerprint(source):
    """SHA-1 of a video's bytes, of a frame folder's frames (names and bytes), or of a triplet set's file names
    and sizes (its bytes would take minutes to read): the same key wherever and whenever the source was copied,
    and a new one whenever a frame changes (or, in a triplet set, changes size)."""
    digest, folder = hashlib.sha1(), os.path.isdir(source)
    if (triplets := triplet_set(source)) is not None:
        for path in (path for triplet in triplets for path in triplet):
            digest.update(f'{os.path.relpath(path, source)}:{os.path.getsize(path)};'.encode())
        return digest.hexdigest()
    for path in frame_paths(source) if folder else [source]:
        if folder:
            digest.update(f'{os.path.basename(path)}:{os.path.getsize(path)};'.encode())
        with open(path, 'rb') as file:
            for block in iter(lambda: file.read(1 << 20), b''):
                digest.update(block)
    return digest.hexdigest()


def read_triplet(paths, patch):
    """3 x H x W x 3 uint8 frames of a triplet; None where they differ in size or are smaller than `patch`."""
    frames = [read_image(path) for path in paths]
    if len({frame.shape for frame in frames}) > 1 or min(frames[0].shape[:2]) < patch:
        return None
    return np.stack(frames)


def random_patch(frames, patch, rng):
    y, x = (rng.integers(0, size - patch + 1) for size in frames.shape[1:3])
    return y, x, frames[:, y:y + patch, x:x + patch]


def probe_triplets(triplets, args, rng):
    """Candidates (triplet index, y, x) and their motions from PROBE_TRIPLETS triplets drawn at random, PROBE_CROPS
    places each, kept with keep_probability as a clip's are."""
    candidates, motions = [], []
    for index in sorted(rng.choice(len(triplets), min(PROBE_TRIPLETS, len(triplets)), replace=False)):
        frames = read_triplet(triplets[index], args.patch)
        for _ in range(PROBE_CROPS if frames is not None else 0):
            y, x, patch = random_patch(frames, args.patch, rng)
            motion = patch_motion(patch[0], patch[2])
            if rng.random() < keep_probability(motion, args) and len(candidates) < args.max_per_video:
                candidates.append((index, y, x)), motions.append(motion)
    return np.array(candidates, np.int64).reshape(-1, 3), np.array(motions, np.float32)


class TripletPatches:
    """The patches of a triplet set, read when used. Entry i is candidate i of the probe (the same pixels every
    time, for validation and synthetic textures); fresh(i, rng) is a patch of a triplet drawn from the whole
    set, at a random place, in the motion bucket of candidate i (the last one tried if FRESH_READS triplets
    hold none): drawing candidates by the motion mix then draws the whole set by it. Triplets whose frames
    differ in size, or are smaller than a patch, are passed over."""

    def __init__(self, triplets, candidates, motions, patch, crops):
        self.triplets, self.candidates, self.motions = triplets, candidates, motions
        self.patch, self.crops = patch, crops

    def __len__(self):
        return len(self.candidates)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TripletPatches(self.triplets, self.candidates[index], self.motions[index], self.patch, self.crops)
        triplet, y, x = self.candidates[index]
        return read_triplet(self.triplets[triplet], self.patch)[:, y:y + self.patch, x:x + self.patch]

    def fresh(self, index, rng):
        bucket, found = motion_bucket(self.motions[index]), None
        for _ in range(FRESH_READS):
            frames = read_triplet(self.triplets[rng.integers(len(self.triplets))], self.patch)
            for _ in range(self.crops if frames is not None else 0):
                found = random_patch(frames, self.patch, rng)[2]
                if motion_bucket(patch_motion(found[0], found[2])) == bucket:
                    return found
        return self[index] if found is None else found


def triplet_set(source):
    """The triplets of a triplet set (datasets.training_triplets), None for a video or frame folder."""
    return training_triplets(source) if os.path.isdir(source) else None


def cached_triplets(triplets, path, motion_path, content, args):
    """TripletPatches and the probe's motions of a triplet set, probed once into args.cache."""
    if not os.path.exists(path):
        candidates, motions = probe_triplets(triplets, args, np.random.default_rng([args.seed, int(content[:8], 16)]))
        for target, array in ((motion_path, motions), (path, candidates)):  # candidates last: they mark completion
            write_stream(target, lambda file: np.save(file, array))
    motions = np.load(motion_path)
    return TripletPatches(triplets, np.load(path), motions, args.patch, args.crops), motions


def cache_paths(source, args):
    """The patches' (a triplet set's candidates') and the motions' files of one source in args.cache, and the
    source's fingerprint."""
    content = fingerprint(source)
    key = json.dumps([CACHE_VERSION, SCENE_CUT_THRESHOLD, content, args.patch, args.strides,
                      args.motion_scale, args.static_keep, args.crops, args.max_per_video, args.seed])
    name = f'{os.path.basename(source.rstrip("/"))}-{hashlib.sha1(key.encode()).hexdigest()[:12]}'
    if triplet_set(source) is not None:
        name += f'-{PROBE_TRIPLETS}x{PROBE_CROPS}-triplets'
    return (*(os.path.join(args.cache, f'{name}{suffix}.npy') for suffix in ('', '-motion')), content)


def cached_patches(source, args, paths=None):
    """Patches and motions of one source, extracted once into args.cache, memory-mapped after that; for a
    triplet set, its TripletPatches."""
    path, motion_path, content = paths or cache_paths(source, args)
    if (triplets := triplet_set(source)) is not None:
        return cached_triplets(triplets, path, motion_path, content, args)
    if not os.path.exists(path):
        rng = np.random.default_rng([args.seed, int(content[:8], 16)])
        patches, motions = extract_patches(read_frames(source), args, rng)
        for target, array in ((motion_path, motions), (path, patches)):  # patches last: they mark completion
            write_stream(target, lambda file: np.save(file, array))
    return np.load(path, mmap_mode='r'), np.load(motion_path)


def sampling_weights(motions, args):
    """The probability of drawing each patch (the sources' patches one after the other) such that
    the motion buckets follow --motion-mix, a bucket is drawn at most --max-repeat times as often
    as its share of the patches (rare large motion is not repeated endlessly), and no source holds
    more than --clip-share of the draws."""
    motion = np.concatenate(motions)
    source = np.repeat(np.arange(len(motions)), [len(m) for m in motions])
    bucket = motion_bucket(motion)
    counts = np.bincount(bucket, minlength=len(MOTION_BUCKETS))
    share = np.minimum(args.motion_mix, args.max_repeat * counts / max(1, len(motion)))
    share = share / share.sum()
    weights = share[bucket] / np.maximum(counts[bucket], 1)
    cap = max(args.clip_share, 1 / len(motions))
    for _ in range(100):  # iterative proportional fitting: the mix, then the cap, until both hold
        drawn = np.bincount(bucket, weights, len(MOTION_BUCKETS))
        weights *= (share / np.maximum(drawn, 1e-12))[bucket]
        per_source = np.bincount(source, weights, len(motions)) / weights.sum()
        weights *= np.minimum(1.0, cap / np.maximum(per_source, 1e-12))[source]
        weights /= weights.sum()
        mix_error = np.abs(np.bincount(bucket, weights, len(MOTION_BUCKETS)) - share).max()
        if mix_error < 1e-3 and np.bincount(source, weights, len(motions)).max() < cap * 1.001:
            break
    return weights


def _upscaled(patch):
    """A uint8 H x W x 3 image at twice the size (bilinear), as a texture for synthetic layers."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((2 * patch.shape[1], 2 * patch.shape[0]),
                                                                           Image.BILINEAR))


def layer_motion(reach, rng):
    """Half a layer's motion from one to two, in 2x pixels: none (15 %), at most 2 px (35 %; odd
    values put the middle frame half a pixel between), else anything up to `reach`."""
    kind = rng.random()
    if kind < 0.15:
        return np.zeros(2, int)
    return rng.integers(-min(2, reach), min(2, reach) + 1, 2) if kind < 0.5 else rng.integers(-reach, reach + 1, 2)


def synthetic_triplet(textures, crop, rng, motion=layer_motion):
    """(one, middle, two) of layered motion, crop x crop x 3 uint8 each: a background with its own
    translation and 1-3 elliptic foreground layers moving differently in front of it, from still to
    24 px between one and two (`motion(reach, rng)` gives half of it, in 2x pixels). Rendered at 2x and
    averaged down, so the middle frame sits at exact half-pixel positions and occlusion edges are
    anti-aliased; one global kernel cannot solve it."""
    size = 2 * crop
    ys, xs = np.mgrid[:size, :size]
    frames = np.zeros((3, size, size, 3), np.uint8)
    for layer, texture in enumerate(textures):
        texture = _upscaled(texture)
        reach = min(24, (min(texture.shape[:2]) - size) // 2)  # half the motion, in 2x pixels
        dy, dx = motion(reach, rng)
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


def middle_flows(triplet):
    """4 x S x S float32 (y, x offsets into frame one, then into frame two) for every pixel of the middle
    frame of an S x S RGB uint8 triplet: where its content sits in the other two (DIS optical flow)."""
    one, middle, two = (cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in triplet)
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return np.concatenate([flow.calc(middle, other, None)[..., ::-1].transpose(2, 0, 1) for other in (one, two)])


class Triplets(torch.utils.data.Dataset):
    """Sample k -> (one, middle, two) crops, each 3 x S x S BGR float in [0, 1].

    With augmentation, sample k is: for all k < synthetic_until and a `synthetic` share of the rest,
    synthetic_triplet; for a `still` share, one patch's middle frame three times (nothing moves: the
    answer is the input); otherwise a patch drawn with `weights` (uniform if None; for a triplet set's, a
    fresh patch of its motion bucket, see TripletPatches), cropped where, for a `shift_share` of samples,
    one and two are cut up to `shift` px apart in opposite directions (extra global motion; the middle
    stays exact). Then flips, rot90 and temporal order. Without
    augmentation, sample k is patch k's centre crop. With `flows`, a fourth tensor holds middle_flows,
    the kernels' targets. Everything follows from (seed, k): resuming is exact."""

    def __init__(self, arrays, crop, seed, augment=True, weights=None, shift=0, shift_share=1.0, synthetic=0.0,
                 synthetic_until=0, still=0.0, flows=False):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.cumulative = None if weights is None else np.cumsum(weights) / np.sum(weights)
        self.crop, self.seed, self.augment, self.shift, self.shift_share = crop, seed, augment, shift, shift_share
        self.synthetic, self.synthetic_until, self.still, self.flows = synthetic, synthetic_until, still, flows

    def __len__(self):
        return int(self.offsets[-1])

    def patch(self, index):
        source = np.searchsorted(self.offsets, index, side='right') - 1
        return self.arrays[source][index - self.offsets[source]]

    def draw(self, rng):
        if self.cumulative is None:
            index = rng.integers(len(self))
        else:
            index = min(len(self) - 1, int(np.searchsorted(self.cumulative, rng.random(), side='right')))
        source = np.searchsorted(self.offsets, index, side='right') - 1
        if isinstance(self.arrays[source], TripletPatches):  # a triplet set: a fresh triplet of the same motion
            return self.arrays[source].fresh(index - self.offsets[source], rng)
        return self.patch(index)

    def crop_at(self, triplet, rng, shift):
        room = triplet.shape[1] - self.crop
        sy, sx = rng.integers(-min(shift, room // 2), min(shift, room // 2) + 1, 2)
        y, x = rng.integers(abs(sy), room - abs(sy) + 1), rng.integers(abs(sx), room - abs(sx) + 1)
        return np.stack([frame[y + t * sy:y + t * sy + self.crop, x + t * sx:x + t * sx + self.crop]
                         for t, frame in zip((-1, 0, 1), triplet)])

    def __getitem__(self, k):
        rng = np.random.default_rng([self.seed, k])
        if not self.augment:
            triplet = self.patch(k)
            y = x = (triplet.shape[1] - self.crop) // 2
            triplet = triplet[:, y:y + self.crop, x:x + self.crop]
        elif k < self.synthetic_until or (kind := rng.random()) < self.synthetic:
            textures = [self.patch(i)[1] for i in rng.integers(len(self), size=rng.integers(2, 5))]
            triplet = synthetic_triplet(textures, self.crop, rng)
        elif kind < self.synthetic + self.still:
            triplet = self.crop_at(np.stack([self.draw(rng)[1]] * 3), rng, 0)
        else:
            triplet = self.crop_at(self.draw(rng), rng, self.shift if rng.random() < self.shift_share else 0)
        if self.augment:
            triplet = np.rot90(triplet, rng.integers(4), axes=(1, 2))
            if rng.random() < 0.5:
                triplet = triplet[:, :, ::-1]
            if rng.random() < 0.5:
                triplet = triplet[::-1]
        frames = torch.from_numpy(np.ascontiguousarray(triplet[..., ::-1])).permute(0, 3, 1, 2).float() / 255.0
        if self.flows:
            return frames[0], frames[1], frames[2], torch.from_numpy(middle_flows(triplet))
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


def motion_table(motions, weights=None):
    """'lt1 19 % | 1to4 30 % | ...': the share of each motion bucket, of the patches or of their weights."""
    counts = np.bincount(motion_bucket(motions), weights, minlength=len(MOTION_BUCKETS))
    return ' | '.join(f'{name} {share:.0%}' for name, share in zip(MOTION_BUCKETS, counts / max(1e-12, counts.sum())))


def frame_size(source):
    """(width, height) of a source's frames (a triplet set's first)."""
    if (triplets := triplet_set(source)) is not None:
        return image_size(triplets[0][0])
    clip = video.FrameSource(source)
    return clip.width, clip.height


def load_data(args, is_main, flows=False):
    """(training Triplets, with middle_flows if `flows`; validation Triplets; the validation patches' motions).
    A cache that patches must go to but cannot is refused before any extraction."""
    training_triplets.cache_clear()  # triplet sets as they are now, listed once for all that follows
    sources, held_out = find_sources(args.data), find_sources(args.val_data)
    if not sources:
        raise InputError('no training videos or frame folders given (--data)')
    paths = {source: cache_paths(source, args) for source in sources + held_out}
    if not all(os.path.exists(path) for path, _, _ in paths.values()):
        check_folder(args.cache)
    if args.extract_workers > 1:  # fill the cache in parallel; the loop below then only maps it
        with multiprocessing.Pool(args.extract_workers) as pool:
            pool.starmap(cached_patches, [(source, args, paths[source]) for source in sources + held_out])
    progress = tqdm(sources + held_out, desc='extracting patches', disable=not is_main, file=side_channel)
    loaded = {source: cached_patches(source, args, paths[source]) for source in progress}
    motions = [loaded[s][1] for s in sources]
    if sum(map(len, motions)) == 0:
        smallest = min((frame_size(source) for source in sources), key=min)
        hint = (f': the frames ({smallest[0]}x{smallest[1]}) are smaller than --patch {args.patch}'
                if min(smallest) < args.patch else f': --strides {max(args.strides)} needs '
                f'{2 * max(args.strides) + 1} frames in one scene')
        raise InputError(f'no patches found in the training data{hint}')
    weights = sampling_weights(motions, args)
    train = Triplets([loaded[s][0] for s in sources], args.crop, args.seed, weights=weights,
                     shift=args.shift, shift_share=args.shift_share, synthetic=args.synthetic,
                     synthetic_until=args.synthetic_steps * args.batch, still=args.still, flows=flows)
    val = Triplets([loaded[s][0][:256] for s in held_out], args.crop, args.seed, augment=False)
    val_motions = np.concatenate([loaded[s][1][:256] for s in held_out] or [np.zeros(0, np.float32)])
    if is_main:
        cached = np.concatenate(motions)
        output(f'{len(train)} training patches from {len(sources)} sources ({motion_table(cached)}); '
               f'drawn as {motion_table(cached, weights)}; '
               f'{len(val)} validation patches from {len(held_out)} sources ({motion_table(val_motions)})',
               result=False)
    return train, val, val_motions
