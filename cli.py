"""What run.py, benchmark.py and train.py share as commands: one-line errors, exit codes and signals."""
import argparse
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
    previous = {number: signal.getsignal(number) for number in SIGNALS}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:  # nohup and background shells ignore some signals on purpose
            signal.signal(number, _interrupt)
    try:
        command(*args)
        return 0
    except InputError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as error:
        number = getattr(error, 'number', signal.SIGINT)
        print(f'error: stopped by {signal.Signals(number).name}; partial output removed', file=sys.stderr)
        return 128 + number
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def check_choice(what, value, choices):
    """The one check behind every `unknown padding 'x' (choose from ...)` message of the Python API."""
    if value not in choices:
        raise InputError(f"unknown {what} '{value}' (choose from {', '.join(choices)})")
