"""Benchmark sets, each read from the layout its publishers distribute, as triplets (first, truth, last).

A frame is an image path, or (video path, frame number from 1) for the Xiph clips read from their .y4m
files. Every reader checks its whole set before any work: a listed file that is missing, a list that names
nothing and frames of different sizes within a triplet are errors, never a smaller set."""
import collections
import functools
import os

import cv2

from cli import InputError
from files import check_link, listing
from images import frame_paths, image_size, natural_key, read_image
from metrics import SSIM_WINDOW, VOLUME_WINDOW
from video import FrameSource

Triplet = collections.namedtuple('Triplet', 'name first truth last')
XIPH_CLIPS = ('BoxingPractice', 'Crosswalk', 'DrivingPOV', 'FoodMarket', 'FoodMarket2', 'RitualDance',
              'SquareAndTimelapse', 'Tango')
XIPH_FRAMES = range(2, 99, 2)  # each even frame from its neighbours: 49 per clip
XIPH_SIZE = (2048, 1080)  # xiph-2k resizes the frames to it, xiph-4k cuts it from their centre
SNU_FILM_PREFIX = 'data/SNU-FILM/'  # where the published lists expect the set, relative to the working folder


class Benchmark(collections.namedtuple('Benchmark', 'name find layout published ssim rounding prepare')):
    """find(root) -> triplets; ssim: 'volume' or 'skimage'; rounding: 'round' or 'truncate';
    prepare(frame) -> frame as scored (Xiph's resize or crop), or None."""


def _missing(path, where):
    return InputError(f'no {path} ({where})')


def _check_files(paths, where):
    for path in paths:
        check_link(path)
        if not os.path.isfile(path):
            raise _missing(path, where)


def _list_lines(root, name):
    path = os.path.join(root, name)
    if not os.path.isdir(root):
        raise InputError(f'not a folder: {root}' if os.path.exists(root) else f'no such folder: {root}')
    if not os.path.isfile(path):
        raise InputError(f'no {name} in {root}')
    try:
        with open(path, encoding='utf-8', errors='replace') as file:
            lines = [(number, line.split()) for number, line in enumerate(file, 1) if line.strip()]
    except OSError as error:
        raise InputError(f'cannot read {path}: {error.strerror}') from None
    if not lines:
        raise InputError(f'{path} lists no triplets')
    return path, lines


def vimeo90k(root):
    listing, lines = _list_lines(root, 'tri_testlist.txt')
    triplets = []
    for number, words in lines:
        folder = os.path.join(root, 'sequences', words[0])
        files = [os.path.join(folder, f'im{index}.png') for index in (1, 2, 3)]
        _check_files(files, f'{listing} line {number}')
        triplets.append(Triplet(words[0], files[0], files[1], files[2]))
    return triplets


@functools.lru_cache(maxsize=None)  # data.load_data clears it: each load lists the sets once
def training_triplets(root):
    """(first, middle, last) image paths of a Vimeo-90K root (from its tri_trainlist.txt; every file is there, none
    is read yet) or of a folder of triplet folders (three images each, in name order); None for a folder that is
    neither."""
    if os.path.isfile(os.path.join(root, 'tri_trainlist.txt')):
        list_path, lines = _list_lines(root, 'tri_trainlist.txt')
        triplets = []
        for number, words in lines:
            triplets.append(tuple(os.path.join(root, 'sequences', words[0], f'im{index}.png') for index in (1, 2, 3)))
            _check_files(triplets[-1], f'{list_path} line {number}')
        return tuple(triplets)
    folders = [os.path.join(root, name) for name in sorted(listing(root, 'data folder'), key=natural_key)]
    if not folders or not all(os.path.isdir(folder) for folder in folders):
        return None
    triplets = []
    for folder in folders:
        if len(images := frame_paths(folder)) != 3:
            return None
        triplets.append(tuple(images))
    return tuple(triplets)


def _folders(root, layout):
    """Sub-folders of root holding all of `layout`'s files; one holding only some of them is an error."""
    if not os.path.isdir(root):
        raise InputError(f'not a folder: {root}' if os.path.exists(root) else f'no such folder: {root}')
    found = []
    for name in sorted(listing(root, 'folder'), key=natural_key):
        files = [os.path.join(root, name, file) for file in layout]
        present = [os.path.isfile(path) for path in files]
        if all(present):
            found.append((name, files))
        elif any(present):
            raise InputError(f"incomplete triplet {name}: no {', '.join(f for f, p in zip(layout, present) if not p)} "
                             f'in {os.path.join(root, name)}')
    if not found:
        raise InputError(f"no triplets (<folder>/{', '.join(layout)}) in {root}")
    return found


def ucf101(root):
    layout = ('frame_00.png', 'frame_01_gt.png', 'frame_02.png')
    return [Triplet(name, *files) for name, files in _folders(root, layout)]


def davis(root):
    """The QVI layout: input/<seq>/frame10.png, frame11.png and gt/<seq>/frame10i11.png."""
    triplets = []
    for name, (truth,) in _folders(os.path.join(root, 'gt'), ('frame10i11.png',)):
        inputs = [os.path.join(root, 'input', name, frame) for frame in ('frame10.png', 'frame11.png')]
        _check_files(inputs, f'the input frames of {truth}')
        triplets.append(Triplet(name, inputs[0], truth, inputs[1]))
    return triplets


def _snu_film_path(root, path):
    """A path of a published list, relative to root; the lists' own prefix is dropped where root is the set."""
    direct = os.path.join(root, path)
    if path.startswith(SNU_FILM_PREFIX) and not os.path.exists(direct):
        return os.path.join(root, path[len(SNU_FILM_PREFIX):])
    return direct


def snu_film(level):
    def find(root):
        listing, lines = _list_lines(root, f'test-{level}.txt')
        triplets = []
        for number, words in lines:
            if len(words) != 3:
                raise InputError(f'{listing} line {number} has {len(words)} paths; expected 3 (first, truth, last)')
            files = [_snu_film_path(root, word) for word in words]
            _check_files(files, f'{listing} line {number}')
            triplets.append(Triplet(words[1], *files))
        return triplets
    return find


def xiph_video(root, clip):
    return os.path.join(root, f'Netflix_{clip}_4096x2160_60fps_10bit_420.y4m')


def xiph(root):
    """Frames <Clip>-NNN.png (NNN from 001) where they are, else the clip's published .y4m."""
    if not os.path.isdir(root):
        raise InputError(f'not a folder: {root}' if os.path.exists(root) else f'no such folder: {root}')
    triplets = []
    for clip in XIPH_CLIPS:
        if os.path.isfile(os.path.join(root, f'{clip}-001.png')):
            frame = lambda number: os.path.join(root, f'{clip}-{number:03d}.png')
            _check_files([frame(number) for number in range(1, XIPH_FRAMES[-1] + 2)], f'clip {clip}')
        elif os.path.isfile(xiph_video(root, clip)):
            frame = lambda number, video=xiph_video(root, clip): (video, number)
        else:
            raise InputError(f'no Xiph clip {clip} in {root}: neither {clip}-001.png ... nor '
                             f'{os.path.basename(xiph_video(root, clip))}')
        triplets += [Triplet(f'{clip}-{number:03d}', frame(number - 1), frame(number), frame(number + 1))
                     for number in XIPH_FRAMES]
    return triplets


def _resized(frame):
    return cv2.resize(frame, XIPH_SIZE, interpolation=cv2.INTER_AREA)


def _centre(frame):
    (width, height), (full_height, full_width) = XIPH_SIZE, frame.shape[:2]
    top, left = (full_height - height) // 2, (full_width - width) // 2
    return frame[top:top + height, left:left + width]


def y4m_size(path):
    """(width, height) from a .y4m file's header line."""
    with open(path, 'rb') as file:
        header = file.readline(1024).split()
    if not header or header[0] != b'YUV4MPEG2':
        raise InputError(f'{path} is not a .y4m file')
    fields = {word[:1]: word[1:] for word in header[1:]}
    return int(fields[b'W']), int(fields[b'H'])


def frame_size(frame):
    return image_size(frame) if isinstance(frame, str) else y4m_size(frame[0])


def frame_name(frame):
    return frame if isinstance(frame, str) else f'{frame[0]} frame {frame[1]}'


def check_sizes(benchmark, triplets):
    """Frames of one size within each triplet, large enough for the set's SSIM (and Xiph's crop)."""
    least = (VOLUME_WINDOW if benchmark.ssim == 'volume' else SSIM_WINDOW,) * 2
    if benchmark.prepare is _centre:
        least = XIPH_SIZE
    for triplet in triplets:
        frames = triplet[1:]
        sizes = [frame_size(frame) for frame in frames]
        if len(set(sizes)) > 1:
            raise InputError(f'triplet {triplet.name} mixes frame sizes: '
                             + ', '.join(f'{frame_name(f)} is {w}x{h}' for f, (w, h) in zip(frames, sizes)))
        if sizes[0][0] < least[0] or sizes[0][1] < least[1]:
            raise InputError(f'triplet {triplet.name} has {sizes[0][0]}x{sizes[0][1]} frames; '
                             f'{benchmark.name} needs at least {least[0]}x{least[1]}')


class FrameReader:
    """Frames by reference: image files, or a video's frames, decoded once, in increasing order."""

    def __init__(self):
        self.path, self.frames, self.recent, self.next = None, None, {}, 1

    def __call__(self, frame):
        if isinstance(frame, str):
            return read_image(frame)
        path, number = frame
        if path != self.path or number < min(self.recent, default=self.next):
            self.close()
            self.path, self.frames, self.recent, self.next = path, iter(FrameSource(path)), {}, 1
        while self.next <= number:
            decoded = next(self.frames, None)
            if decoded is None:
                raise InputError(f'{path} ends after {self.next - 1} frames; the benchmark reads {number}')
            self.recent = {key: value for key, value in self.recent.items() if key >= self.next - 2}
            self.recent[self.next], self.next = decoded, self.next + 1
        return self.recent[number]

    def close(self):
        if self.frames is not None:
            self.frames.close()
            self.frames = None


PUBLISHED = {  # where each set is published, for a command line without --data
    'vimeo90k': 'http://toflow.csail.mit.edu (vimeo_triplet.zip)',
    'ucf101': "the DVF authors' UCF101 test set (ucf101_interp_ours, github.com/liuziwei7/voxel-flow)",
    'snu-film': 'https://myungsub.github.io/CAIN (SNU-FILM test set)',
    'xiph': 'https://media.xiph.org/video/derf/ (Netflix_<Clip>_4096x2160_60fps_10bit_420.y4m)',
    'davis': "the QVI authors' DAVIS test set",
}
BENCHMARKS = {benchmark.name: benchmark for benchmark in [
    Benchmark('vimeo90k', vimeo90k, 'tri_testlist.txt, sequences/<a>/<b>/im1.png, im2.png (truth), im3.png',
              PUBLISHED['vimeo90k'], 'volume', 'round', None),
    Benchmark('ucf101', ucf101, '<id>/frame_00.png, frame_01_gt.png (truth), frame_02.png',
              PUBLISHED['ucf101'], 'volume', 'round', None),
    *(Benchmark(f'snu-film-{level}', snu_film(level), f'test-{level}.txt: lines of three paths relative to ROOT '
                '(first, truth, last)', PUBLISHED['snu-film'], 'volume', 'round', None)
      for level in ('easy', 'medium', 'hard', 'extreme')),
    Benchmark('xiph-2k', xiph, '<Clip>-001.png ... <Clip>-099.png, or the published .y4m, for the 8 Netflix clips; '
              'resized to 2048x1080 (area)', PUBLISHED['xiph'], 'skimage', 'truncate', _resized),
    Benchmark('xiph-4k', xiph, 'as xiph-2k; the centre 2048x1080 of the 4096x2160 frames',
              PUBLISHED['xiph'], 'skimage', 'truncate', _centre),
    Benchmark('davis', davis, 'input/<seq>/frame10.png, frame11.png, gt/<seq>/frame10i11.png',
              PUBLISHED['davis'], 'volume', 'round', None),
]}
