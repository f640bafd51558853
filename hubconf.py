"""torch.hub entry point: torch.hub.load('/path/to/sepconv', 'sepconv', 'l1', source='local')."""
from model import load_network

dependencies = ['torch', 'numpy', 'PIL', 'safetensors']


def sepconv(variant='l1', weights=None, device='cpu'):
    """The SepConv Network in eval mode, ready for model.interpolate / model.estimate.

    variant: the bundled weights, 'l1' or 'lf'. Pass it positionally or as variant=: torch.hub.load's
    own second parameter is called `model`, so model='l1' never reaches this function.
    weights: a .safetensors file, or an original sepconv-slomo .pytorch state dict, to load instead.
    device: 'cpu' (default), 'cuda', 'auto' or a torch.device."""
    return load_network(variant, weights, device)
