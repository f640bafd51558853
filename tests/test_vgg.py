"""vgg.py: VGG-19 to relu4_4 from a torchvision-format state dict, and the feature loss."""
import torch

import vgg


def test_feature_loss_with_random_vgg(tmp_path):
    torch.manual_seed(0)
    network = vgg.vgg19_relu4_4()
    path = tmp_path / 'vgg19.pth'
    torch.save({f'features.{k}': v for k, v in network.state_dict().items()}, path)
    loaded = vgg.load_vgg(str(path))
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), loaded.state_dict().values()))
    assert len(loaded) == 27  # torchvision features[:27] ends at relu4_4
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    target = torch.rand(1, 3, 32, 32)
    assert vgg.feature_loss(loaded, target, target).item() == 0.0
    loss = vgg.feature_loss(loaded, image, target)
    loss.backward()
    assert loss.item() > 0 and image.grad.abs().sum() > 0
