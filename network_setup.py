"""The network as training starts it: initialisation from scratch, network options added to trained
weights, the Adamax groups, and the kernel heads' diagnostics and optional leaky gradient."""
import math

import torch

from cli import InputError
from model import OPTIONS, Network

HEAD_BIAS, HEAD_LR_SCALE = 1.0, 0.1  # see init_weights and parameter_groups
TYPICAL_MEAN, TYPICAL_DEVIATION = 0.5, 0.25  # of frames in [0, 1]; the training clips: 0.51 and 0.23 (see with_options)
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


class _KernelUnitReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slope, where):
        ctx.save_for_backward(x, where)
        ctx.slope = slope
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        x, where = ctx.saved_tensors
        constant = (x <= 0).all(1, keepdim=True) & where  # every unit off: the pixel's kernel is the head's bias
        return torch.where(x > 0, grad, grad.clamp(max=0) * constant * ctx.slope), None, None


class KernelUnitReLU(torch.nn.Module):
    """The kernel heads' last ReLU, with a gradient where it has none. Those 51 units per head are what makes
    a pixel's kernels depend on the input, and L1 training leaves them all negative where little moves: in
    the small-motion run's step-1000 weights, on 98.8 % of Middlebury's RubberWhale, where every pixel got the
    heads' biases as kernels (the blend) and nothing could learn, neither the frame's loss nor the
    kernel targets. Where every unit of a head is off, this passes each unit slope times the part of its
    gradient that says "turn on"; elsewhere it is a ReLU. With min_motion > 0, only where the batch's
    optical flow (self.flows, set by training_step) moves more than min_motion px towards either frame:
    where nothing moves the bias is the right kernel. The forward pass is a ReLU: the network computes
    the same function and its state dict is the same."""

    def __init__(self, slope, min_motion=0.0):
        super().__init__()
        self.slope, self.min_motion, self.flows = slope, min_motion, None

    def forward(self, x):
        where = torch.ones_like(x[:, :1], dtype=torch.bool)
        if self.training and self.min_motion > 0 and self.flows is not None:  # gated by the pixels it covers
            moving = (self.flows.abs().amax(1, keepdim=True) > self.min_motion).float()
            where = torch.nn.functional.adaptive_max_pool2d(moving, x.shape[-2:]) > 0
        return _KernelUnitReLU.apply(x, self.slope, where)


def leak_where_kernels_are_constant(network, slope, min_motion=0.0):
    if slope > 0:
        for name in HEADS:
            getattr(network, name)[5] = KernelUnitReLU(slope, min_motion)


class HeadMonitor:
    """Forward hooks that record, per kernel head, the share of its last activation's units that are alive
    (input > 0), the share of pixels where they are all off (with the ReLU, the kernels there are the head's
    bias whatever the input; with a PReLU of slope s, they vary by s times it), and the kernels' standard
    deviation across pixels: a head that stops adapting to the input shows as alive -> 0, constant pixels
    -> 1 or spread -> 0 long before the loss says anything. The activation's input, not its output: a
    PReLU's negative slope makes the output of an off unit positive."""

    def __init__(self, network):
        self.alive, self.constant, self.spread = {}, {}, {}
        for name in HEADS:
            head = getattr(network, name)
            head[5].register_forward_hook(self.recorder(self.alive, name, lambda x: (x > 0).float().mean(), True))
            head[5].register_forward_hook(self.recorder(self.constant, name,
                                                        lambda x: (x <= 0).all(1).float().mean(), True))
            head[-1].register_forward_hook(self.recorder(self.spread, name, lambda out: out.float().std((2, 3)).mean()))

    @staticmethod
    def recorder(store, name, statistic, of_input=False):
        def hook(module, inputs, output):
            store[name] = statistic((inputs[0] if of_input else output).detach())
        return hook

    def read(self):
        return {f'alive_{name[3:].lower()}': float(self.alive[name]) for name in HEADS} | {
                'constant_pixels': sum(float(self.constant[name]) for name in HEADS) / len(HEADS),
                'kernel_spread': sum(float(self.spread[name]) for name in HEADS) / len(HEADS)}


def network_options(config):
    """The network options a run's arguments (or a checkpoint's config) turn on."""
    return tuple(name for name in OPTIONS if config.get(name))


def with_options(network, options, source):
    """A Network with `options` and the weights of `network` (read from `source`), starting near its output: a
    PReLU added starts at slope 0, the ReLU; input normalization added gets a first layer that computes on
    normalized frames what the old one computed on frames of typical mean and deviation (fold_statistics)."""
    if set(network.options) - set(options):
        raise InputError(f"{source} was trained with {', '.join(network.options)}: pass the same options "
                         f"(--{' --'.join(name.replace('_', '-') for name in network.options)})")
    built = Network(**dict.fromkeys(options, True))
    built.load_state_dict(network.state_dict(), strict=False)  # only the new slopes are missing
    if 'input_normalization' in options and 'input_normalization' not in network.options:
        fold_statistics(built.netConv1[0])
    return built


def fold_statistics(conv, mean=TYPICAL_MEAN, deviation=TYPICAL_DEVIATION):
    """conv(x) = conv'((x - mean) / deviation) away from the zero-padded border: weights times deviation,
    bias plus mean times the weights' sum. Without it, weights trained on frames in [0, 1] see inputs of
    mean 0 and deviation 1, and the warm start begins at 20 times the blend's loss."""
    with torch.no_grad():
        conv.bias += mean * conv.weight.sum((1, 2, 3))
        conv.weight *= deviation
