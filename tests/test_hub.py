import os
import pathlib

import numpy as np
import pytest
import torch

from cli import InputError
from model import Network, interpolate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hub_loads_the_network_with_given_weights(random_weights, random_network):
    network = torch.hub.load(ROOT, 'sepconv', source='local', weights=random_weights)
    assert isinstance(network, Network) and not network.training
    expected = random_network.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in network.state_dict().items())
    frames = [np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8) for seed in range(2)]
    assert np.array_equal(interpolate(*frames, network), interpolate(*frames, random_network))


def test_hub_variant_is_positional_or_variant(random_weights):
    for args, kwargs in ((('lf',), {}), ((), {'variant': 'lf'})):
        network = torch.hub.load(ROOT, 'sepconv', *args, source='local', weights=random_weights, **kwargs)
        assert isinstance(network, Network)
    with pytest.raises(InputError, match="unknown model 'l3'"):
        torch.hub.load(ROOT, 'sepconv', 'l3', source='local', weights=random_weights)


def test_hub_reports_missing_bundled_weights(tmp_path, monkeypatch):
    import model
    monkeypatch.setattr(model, 'WEIGHTS_DIR', str(tmp_path))
    with pytest.raises(InputError, match='no bundled l1 weights'):
        torch.hub.load(ROOT, 'sepconv', 'l1', source='local')


def test_hub_takes_path_likes_and_devices_and_refuses_the_rest(random_weights):
    network = torch.hub.load(ROOT, 'sepconv', source='local', weights=pathlib.Path(random_weights),
                             device=torch.device('cpu'))
    assert isinstance(network, Network) and next(network.parameters()).device.type == 'cpu'
    for kwargs, message in (({'device': 'gpu'}, "unknown device 'gpu'"), ({'weights': 42}, 'weights must be a path'),
                            ({'weights': ROOT}, 'is a folder, not a weights file')):
        with pytest.raises(InputError, match=message):
            torch.hub.load(ROOT, 'sepconv', source='local', **{'weights': random_weights, **kwargs})
