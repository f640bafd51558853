"""Interpolate the middle frame of an image pair: python run.py --one A.png --two B.png --out C.png"""
import argparse
import os
import sys

from media import check_image_output, read_image, write_image
from model import MODELS, PADDINGS, InputError, interpolate, load_network, resolve_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='SepConv video frame interpolation (Niklaus et al., ICCV 2017).')
    parser.add_argument('--one', help='first frame (image)')
    parser.add_argument('--two', help='second frame (image)')
    parser.add_argument('--out', required=True, help='output image')
    parser.add_argument('--model', default='l1', help=f"bundled weights: {' or '.join(MODELS)} (default l1)")
    parser.add_argument('--weights', help='weights file instead of the bundled ones (.safetensors, or an '
                                          'original sepconv-slomo .pytorch state dict)')
    parser.add_argument('--padding', default='paper', help=f"{' or '.join(PADDINGS)} (default paper)")
    parser.add_argument('--device', default='auto', help='auto, cpu or cuda (default auto)')
    return parser.parse_args(argv)


def run_pair(args):
    if not (args.one and args.two):
        raise InputError('pair mode needs both --one and --two')
    if os.path.abspath(args.out) in (os.path.abspath(args.one), os.path.abspath(args.two)):
        raise InputError(f'output {args.out} would overwrite an input')
    check_image_output(args.out)
    one, two = read_image(args.one), read_image(args.two)
    if one.shape != two.shape:
        raise InputError(f'frames differ in size: {args.one} is {one.shape[1]}x{one.shape[0]}, '
                         f'{args.two} is {two.shape[1]}x{two.shape[0]}')
    network = load_network(args.model, args.weights, resolve_device(args.device))
    write_image(args.out, interpolate(one, two, network, padding=args.padding))


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.padding not in PADDINGS:
            raise InputError(f"unknown padding '{args.padding}' (choose from {', '.join(PADDINGS)})")
        run_pair(args)
    except InputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
