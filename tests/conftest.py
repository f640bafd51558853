"""Shared fixtures: the read-only shared data and a randomly initialised network with its weights file."""
import os

import pytest
import torch
from safetensors.torch import save_file

from model import Network, load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')


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
