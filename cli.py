"""What run.py, benchmark.py and train.py share as commands: one-line errors, exit codes and signals."""
import argparse
import errno
import os
import re
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InputError(ValueError):
    """A problem with what the user passed in; commands print it as one line and exit with code 2."""


class Interrupted(BaseException):
    """Raised in place of a terminating signal, so that every `finally` removes partial output."""

    def __init__(self, number):
        super().__init__(number)
        self.number = number


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line on stderr (and exit code 2), not the usage."""

    def error(self, message):
        self.exit(2, f'error: {message} (see --help)\n')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends an option's default, where it has one, to its help."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or '%(default)' in action.help:
            return action.help
        return f'{action.help} (default: %(default)s)'


class SideChannel:
    """sys.stderr for progress bars and messages, which must never fail a job: on a closed, broken or full
    stderr the text is dropped and fd 2 is pointed at /dev/null, so that the exit's own flush succeeds too.
    It knows whether a progress bar holds the current line, so that a message starts on a line of its own."""

    def __init__(self):
        self.line = ''

    def write(self, text):
        self.line = (text.rsplit('\n', 1)[1] if '\n' in text else self.line + text).rsplit('\r', 1)[-1]
        try:
            sys.stderr.write(text)  # sys.stderr is None when Python started with fd 2 closed
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            mute(sys.stderr)
        return len(text)

    def flush(self):
        self.write('')


def mute(stream):
    """Point `stream`'s file descriptor at /dev/null, so that what it still holds, and the exit's flush, go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    finally:
        os.close(devnull)


side_channel = SideChannel()
stdout_lost = False  # set once a line on stdout could not be written


def say(line):
    """One line on stderr, on a line of its own, that never fails the job."""
    side_channel.write(('\n' if side_channel.line.strip() else '') + f'{line}\n')


def output(line, result=True):
    """One line on stdout. One that cannot be written (a full disk, a closed pipe, a closed stdout) never
    stops the job: a `result` (a command's only output) lost is an InputError once the job is done, since
    the caller raises it last; any other line is dropped after one notice."""
    global stdout_lost
    if stdout_lost and not result:
        return
    try:
        if sys.stdout is None:  # Python started with fd 1 closed
            raise OSError(errno.EBADF, 'standard output is closed')
        print(line, flush=True)
    except (OSError, ValueError) as error:  # ValueError: the stream was closed
        why = getattr(error, 'strerror', None) or reason(error)
        mute(sys.stdout)
        stdout_lost = True
        if result:
            raise InputError(f'cannot write to standard output: {why}') from None
        say(f'notice: standard output lost ({why}); going on without it')


def reason(error):
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def _interrupt(number, frame):
    for each in SIGNALS:
        signal.signal(each, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    raise Interrupted(number)


def run(command, *args):
    """command(*args) as an exit status: 0; 2 after one `error:` line for an InputError; 128 + N after one
    line for signal N (SIGINT, SIGTERM, SIGHUP), once the command's own clean-up has run."""
    global stdout_lost
    stdout_lost = False
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:  # nohup and background shells ignore some signals on purpose
            signal.signal(number, _interrupt)
    try:
        command(*args)
        return 0
    except InputError as error:
        say(f'error: {error}')
        return 2
    except (Interrupted, KeyboardInterrupt) as error:
        number = getattr(error, 'number', signal.SIGINT)
        say(f'error: stopped by {signal.Signals(number).name}; partial output removed')
        return 128 + number
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def path_argument(what, value):
    """`value`, a str, bytes or os.PathLike path, as a str; anything else, or an empty path, is an InputError."""
    try:
        path = os.fsdecode(value)
    except TypeError:
        raise InputError(f'{what} must be a path, got {type(value).__name__}') from None
    if not path:
        raise InputError(f'{what} path is empty')
    if '\0' in path:
        raise InputError(f'{what} path contains a NUL character')
    return path


def device(text):
    """--device: auto, cpu, cuda, or cuda:N for the N-th GPU (a torch.device); the machine is asked later."""
    if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', text):
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from auto, cpu, cuda, cuda:N)")
    if ':' not in text:
        return text
    import torch  # commands only: the Python API takes a torch.device itself
    return torch.device(text)


def check_choice(what, value, choices):
    """The one check behind every `unknown padding 'x' (choose from ...)` message of the Python API."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")
