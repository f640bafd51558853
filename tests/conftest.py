"""Shared fixtures (the read-only shared data, a randomly initialised network and its weights file) and test frames."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model import Network, load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')


def pytest_configure(config):
    if os.environ.get('PYTEST_XDIST_WORKER'):  # `make test` runs one worker per core: one thread each
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked slow(seconds) first, slowest first: parallel workers then finish together."""
    seconds = lambda item: item.get_closest_marker('slow').args[0] if item.get_closest_marker('slow') else 0
    items.sort(key=lambda item: -seconds(item))


@pytest.fixture(scope='session')
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f'shared data not found at {SHARED_DATA}')
    return SHARED_DATA


@pytest.fixture(scope='session')
def middlebury(shared_data):
    folder = os.path.join(shared_data, 'middlebury')
    if not os.path.isdir(folder):
        pytest.skip(f'Middlebury data not found at {folder}')
    return folder


@pytest.fixture(scope='session')
def random_weights(tmp_path_factory):
    """A randomly initialised Network saved like train.py exports: fp16 safetensors, 'net' keys."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp('weights') / 'network-random.safetensors')
    save_file({key: value.half().contiguous() for key, value in Network().state_dict().items()}, path)
    return path


@pytest.fixture(scope='session')
def random_network(random_weights):
    return load_network(weights=random_weights)


def moving_square(count, height=48, width=64):
    """A colour gradient with a yellow square moving 6 pixels right per frame."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 96)], -1)
    frames = []
    for index in range(count):
        frame = base.astype(np.uint8)
        frame[height // 4:height // 4 + 12, 8 + 6 * index:20 + 6 * index] = (250, 240, 30)
        frames.append(frame)
    return frames


def moving_pattern(frames=8, size=48, speed=2, seed=0):
    """Frames of a random texture sliding right by `speed` pixels per frame."""
    texture = np.random.default_rng(seed).integers(0, 256, (size, size + frames * speed, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, t * speed:t * speed + size]) for t in range(frames)]


@pytest.fixture
def frames_dir(tmp_path):
    folder = tmp_path / 'clip'
    folder.mkdir()
    for index, frame in enumerate(moving_pattern()):
        Image.fromarray(frame).save(folder / f'{index:03d}.png')
    return folder
