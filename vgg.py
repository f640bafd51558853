"""The paper's feature loss Lf: squared distance of VGG-19 relu4_4 features (for fine-tuning an l1 model)."""
import torch
import torch.nn.functional as F

from cli import InputError

VGG_MEAN, VGG_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
        except Exception:  # any bytes reach the unpickler: a text file gives a KeyError, ...
            raise InputError(f'{path} does not hold torchvision VGG-19 weights (features.N.weight, ...)') from None
        if not all(torch.isfinite(value).all() for value in vgg.state_dict().values()):
            raise InputError(f'{path} holds VGG-19 weights that are not finite (NaN or infinity)')
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
