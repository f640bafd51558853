"""SepConv frame interpolation from the command line.

Pair mode:  python run.py --one A.png --two B.png --out middle.png
Video mode: python run.py --video in.mp4 --out out.mp4 [--fps F | --factor N] [--slowmo]
"""
import sys
from fractions import Fraction

import cli
from cli import ArgumentParser, InputError
from files import check_not_an_input
from images import check_image_output, image_size, read_image, write_image
from media import MAX_DEPTH, MAX_TIME_ERROR, check_memory, interpolate_video
from model import MODELS, PADDINGS, interpolate, keep_freed_memory, load_network, resolve_device

VIDEO_OPTIONS = ('factor', 'fps', 'slowmo', 'max_time_error', 'no_scene_detect', 'batch_size')

EXAMPLES = """examples:
  python run.py --one images/one.png --two images/two.png --out middle.png
  python run.py --video videos/bunny.mp4 --out bunny-60fps.mp4 --fps 60
  python run.py --video videos/bunny.mp4 --out bunny-25fps.mp4        (--factor 2, the default)
  python run.py --video videos/bunny.mp4 --out bunny-slow.mp4 --factor 4 --slowmo
  python run.py --video frames/ --out frames-x2/      (folders of images in, numbered PNGs out)

In video mode the output keeps the input's duration, audio, subtitles and other streams, sample
aspect ratio and colour tags: --fps F (kept exact) samples it at F frames per second, --factor N
at N x the input rate (read from the timestamps); --slowmo plays those frames at the input rate
(or at --fps) instead, without the other streams. An output frame due on an input frame copies it; SepConv
makes midpoints, so a time between two input frames is reached by halving the interval, and
each output frame lies within --max-time-error (of an input frame interval) of its exact time;
a power-of-two --factor is exact. The last line counts the network evaluations. Frame folders
count as 25 fps.

Defaults that differ from the original sepconv-slomo (lf, improved): --model l1, because only l1
weights ship (and l1 is the model the paper scores); --padding paper, the padding the paper's
figures were computed with.
"""


def parse_args(argv=None):
    parser = ArgumentParser(
        usage='%(prog)s --one A --two B --out C [options]                              (pair mode)\n'
              '       %(prog)s --video IN --out OUT [--fps F | --factor N] [--slowmo] [options]  (video mode)',
        description='SepConv video frame interpolation (Niklaus et al., ICCV 2017): the middle frame of '
                    'an image pair, or a video (or folder of frames) at another frame rate.',
        epilog=EXAMPLES, formatter_class=cli.HelpFormatter)
    pair = parser.add_argument_group('pair mode')
    pair.add_argument('--one', metavar='A', help='first frame (image)')
    pair.add_argument('--two', metavar='B', help='second frame (image)')
    video = parser.add_argument_group('video mode')
    video.add_argument('--video', metavar='IN', help='input video file, or folder of frames (natural name order)')
    video.add_argument('--fps', type=number, metavar='F',
                       help='output frame rate, 1 to 1000 (e.g. 60 or 30000/1001), same duration; '
                            'with --slowmo: factor x the frames played at F fps')
    video.add_argument('--factor', type=int, metavar='N',
                       help='frames out per frame in, any whole number from 2 (default 2); the output rate '
                            'must stay within 1 to 1000 fps')
    video.add_argument('--slowmo', action='store_true', help='play at the input frame rate (or --fps): factor x '
                                                              'slower, audio dropped')
    video.add_argument('--max-time-error', type=number, metavar='E',
                       help='how far at most an output frame lies from its exact time, in input frame intervals, '
                            f'1/{2 ** MAX_DEPTH} to 1/2 (default 1/16: times rounded to eighths of an interval, at most '
                            '7 network evaluations per pair of input frames; a power-of-two --factor is exact)')
    video.add_argument('--no-scene-detect', action='store_true', help='interpolate across scene cuts too '
                                                                      '(default: repeat the frame before a cut)')
    video.add_argument('--batch-size', type=int, metavar='N',
                       help='frame pairs per network call (default: 1 on the CPU, what fits in GPU memory up to 8)')
    common = parser.add_argument_group('both modes')
    common.add_argument('--out', required=True, help='pair mode: output image; video mode: output video '
                                                     '(.mp4, .mkv, .mov) or folder for PNG frames')
    common.add_argument('--model', default='l1', choices=MODELS,
                        help='weights/network-MODEL.safetensors; only l1 ships, lf comes from train.py --loss lf')
    common.add_argument('--weights', help='weights file instead of the bundled ones (.safetensors, or an '
                                          'original sepconv-slomo .pytorch state dict)')
    common.add_argument('--padding', default='paper', choices=PADDINGS,
                        help="paper: 25 px border as published; improved: the original repository's later variant")
    common.add_argument('--device', default='auto', type=cli.device, metavar='{auto,cpu,cuda,cuda:N}',
                        help='where the network runs')
    return parser.parse_args(argv)


def number(text):
    """A number or a ratio such as 30000/1001, kept exact (nan and inf pass, for the range checks' message)."""
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return float(text)


def run_pair(args):
    if not (args.one and args.two):
        raise InputError('give --one and --two (pair mode) or --video (video mode)')
    used = [f"--{name.replace('_', '-')}" for name in VIDEO_OPTIONS if getattr(args, name) not in (None, False)]
    if used:
        raise InputError(f"video-mode options without --video: {', '.join(used)}")
    check_not_an_input(args.out, [args.one, args.two, args.weights])
    check_image_output(args.out)
    size_one, size_two = image_size(args.one), image_size(args.two)
    if size_one != size_two:
        raise InputError(f'frames differ in size: {args.one} is {size_one[0]}x{size_one[1]}, '
                         f'{args.two} is {size_two[0]}x{size_two[1]}')
    device = resolve_device(args.device)
    check_memory(*size_one, device, args.padding)
    one, two = read_image(args.one), read_image(args.two)
    network = load_network(args.model, args.weights, device)
    write_image(args.out, interpolate(one, two, network, padding=args.padding))


def run_video(args):
    if args.one or args.two:
        raise InputError('give either --video or --one/--two, not both')
    summary = interpolate_video(args.video, args.out, model=args.model, weights=args.weights, factor=args.factor,
                                fps=args.fps, slowmo=args.slowmo, scene_detect=not args.no_scene_detect,
                                padding=args.padding, device=args.device, batch_size=args.batch_size,
                                max_time_error=MAX_TIME_ERROR if args.max_time_error is None else args.max_time_error)
    cli.say(summary)


def main(argv=None):
    args = parse_args(argv)
    return cli.run(run_video if args.video else run_pair, args)


if __name__ == '__main__':
    keep_freed_memory()  # the command owns its process: reusing freed pages saves 2-3 s at 1280x720 on the CPU
    sys.exit(main())
