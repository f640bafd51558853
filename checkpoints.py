"""A training run's files: the checkpoint (saved, validated whole on reading, restored), the fp16 export
with the network options in its metadata, and log.csv."""
import csv
import io
import os
import random

import numpy as np
import torch

import cli
from cli import InputError, reason
from data import MOTION_BUCKETS
from files import write_stream
from model import Network, check_weights, options_metadata
from network_setup import network_options, parameter_groups

LOG_COLUMNS = ('step', 'loss', 'blend_loss', 'ratio', 'kernel_target_loss', 'alive_vertical1', 'alive_horizontal1',
               'alive_vertical2', 'alive_horizontal2', 'constant_pixels', 'kernel_spread', 'samples_per_s', 'val_psnr',
               'val_blend_psnr', 'middlebury_psnr', 'middlebury_blend_psnr', 'middlebury_worst_gain') + tuple(
               f'val_{kind}psnr_{bucket}' for bucket in MOTION_BUCKETS for kind in ('', 'blend_'))


def check_resumed_options(state, args, source):
    if network_options(state['config']) != network_options(vars(args)):
        raise InputError(f"{source} was trained with network options ({', '.join(network_options(state['config'])) or 'none'}) "
                         f"other than these ({', '.join(network_options(vars(args))) or 'none'})")


def save_checkpoint(path, network, optimizer, step, args):
    state = {'model': network.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step,
             'config': vars(args), 'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
                                           'python': random.getstate(),
                                           'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    write_stream(path, lambda file: torch.save(state, file))


def read_checkpoint(path, resume=True):
    """A checkpoint validated whole before any work: its weights (those of the network, finite), step and
    loss, and to `resume` it also its optimizer state and random number generators' states."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as error:  # any bytes reach the unpickler
        raise InputError(f'{path} is not a train.py checkpoint: {reason(error)}') from None
    if not isinstance(state, dict) or not {'model', 'optimizer', 'step', 'config', 'rng'} <= state.keys():
        raise InputError(f'{path} is not a train.py checkpoint')
    if not isinstance(state['model'], dict) or not all(isinstance(v, torch.Tensor) for v in state['model'].values()):
        raise InputError(f'{path} is not a train.py checkpoint: its model is not a state dict of tensors')
    if type(state['step']) is not int or state['step'] < 0 or not isinstance(state['config'], dict) \
            or state['config'].get('loss') not in ('l1', 'lf'):
        raise InputError(f'{path} is not a train.py checkpoint: no step and loss')
    network = Network(**dict.fromkeys(network_options(state['config']), True))
    check_weights(state['model'], path, network)
    if resume:
        try:
            load_checkpoint(state, network, None, into_a_copy=True)
        except Exception as error:  # what a checkpoint of another version or a damaged one raises varies
            raise InputError(f'{path} cannot be resumed: {type(error).__name__}: {reason(error)}') from None
    return state


def load_checkpoint(state, network, optimizer, into_a_copy=False):
    """Restore the network, the optimizer and the random number generators (into_a_copy: into new ones, to
    try a checkpoint without changing anything)."""
    network.load_state_dict(state['model'])
    optimizer = optimizer or torch.optim.Adamax(parameter_groups(network))
    optimizer.load_state_dict(state['optimizer'])
    for parameter in network.parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            if key != 'step' and value.shape != parameter.shape:
                raise ValueError("the optimizer's state does not fit the network")
            if not torch.isfinite(value).all():
                raise ValueError(f"the optimizer's {key} is not finite")
    rng = state['rng']
    if into_a_copy:
        torch.Generator().set_state(rng['torch'])
        np.random.RandomState().set_state(rng['numpy'])
        random.Random().setstate(rng['python'])
        return state['step']
    torch.set_rng_state(rng['torch'])
    np.random.set_state(rng['numpy'])
    random.setstate(rng['python'])
    if rng['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng['cuda'])
    return state['step']


def export(checkpoint, target):
    import safetensors.torch
    state = read_checkpoint(checkpoint, resume=False)
    weights = {k: v.half().contiguous() for k, v in state['model'].items()}
    options = network_options(state['config'])
    check_weights(weights, checkpoint, Network(**dict.fromkeys(options, True)))  # fp16 ends at 65504
    metadata = {'step': str(state['step']), 'loss': state['config']['loss'], **options_metadata(options)}
    write_stream(target, lambda file: file.write(safetensors.torch.save(weights, metadata=metadata)))
    cli.output(f"wrote {target} (step {state['step']}, {len(weights)} tensors, fp16)", result=False)


def read_log(path):
    """The rows of a log.csv (none where there is none), their steps as numbers; one that is not a training
    log is refused."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline='') as file:
            rows = list(csv.DictReader(file))
        for row in rows:
            row['step'] = int(row['step'])
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise InputError(f'{path} is not a training log ({type(error).__name__}: {reason(error)}): move it '
                         'away, or give another --out') from None
    return rows


def write_log(path, rows):
    with open(path, 'w', newline='') as file:
        writer = csv.DictWriter(file, LOG_COLUMNS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


def log_line(row):
    line = io.StringIO()
    csv.DictWriter(line, LOG_COLUMNS).writerow(row)
    return line.getvalue()
