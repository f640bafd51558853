"""Every command in the README and in docs/ runs as written: each `python SCRIPT.py ...` line of their code
blocks, and each `make TARGET` line expanded by `make -n`, goes through that script's own argument parser."""
import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = sorted({os.path.relpath(path, ROOT) for pattern in (
    'README.md', 'CHANGELOG.md', 'docs/**/*.md', 'weights/*.md', 'images/*.md', 'videos/*.md')
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)})
SCRIPTS = ('run.py', 'benchmark.py', 'train.py', 'gpu_round.py')  # the commands; each has main(argv)
COMMAND = re.compile(r'^(\w+=\S*\s+)*(\S*/)?(python3?|torchrun|make)\s')
SHELL_FENCES = ('', 'sh', 'bash', 'shell', 'console')


def code_lines(text):
    """(line number, line) of the shell code in Markdown: indented blocks and ``` fences other than python."""
    fence, previous_blank, in_block = None, True, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith('```'):
            fence = None if fence is not None else line.strip()[3:].strip()
            continue
        if fence is not None:
            if fence in SHELL_FENCES:
                yield number, line
            continue
        if line.startswith('    ') and (previous_blank or in_block):
            in_block = True
            yield number, line[4:]
        elif line.strip():
            in_block = False
        previous_blank = not line.strip()


def commands(text):
    """(line number, argv) of every command in the text's code, continuation lines joined, `VAR=value`
    lines applied to later `$VAR`s, `a && b` split, comments dropped; `...` and what follows it cut."""
    variables, pending, start = {}, '', None
    for number, line in code_lines(text):
        if pending:
            line = pending + ' ' + line.strip()
        else:
            start = number
        if line.rstrip().endswith('\\'):
            pending = line.rstrip()[:-1]
            continue
        pending = ''
        for part in re.split(r'&&|;', line):
            part = part.strip()
            assignment = re.fullmatch(r'(\w+)=(\S+)', part)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            if not COMMAND.match(part + ' '):
                continue
            argv = shlex.split(re.sub(r'\$(\w+)|\$\{(\w+)\}', lambda m: variables.get(m[1] or m[2], m[0]), part),
                               comments=True)
            if '...' in argv:
                argv = argv[:argv.index('...')]
            yield start, argv


def documented_commands():
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document), encoding='utf-8') as file:
            for number, argv in commands(file.read()):
                yield pytest.param(argv, id=f'{document}:{number}')


class Parsed(Exception):
    pass


def parse(argv, monkeypatch, capsys):
    """Hand a `python SCRIPT ...` command to SCRIPT's main with parsing stopped right after the arguments
    parse; returns None, or the reason they do not."""
    words = [word for word in argv if not re.fullmatch(r'\w+=\S*', word)]
    program, *words = words
    if os.path.basename(program) == 'torchrun':
        words = [word for word in words if not word.startswith('--nproc')]
    elif words and words[0] == '-m':
        return None  # python -m venv / pytest: not one of ours
    script, *arguments = words
    if script not in SCRIPTS:
        return f'{script} is not one of the commands {SCRIPTS}'
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_and_stop)
    module = __import__(script[:-3])
    try:
        module.main(arguments)
    except Parsed:
        return None
    except SystemExit as exit:
        return f'exit {exit.code}: {capsys.readouterr().err.strip()}'
    return 'main returned without parsing its arguments'


def make_commands(argv):
    """The python commands `make -n` shows for a make line."""
    if shutil.which('make') is None:
        pytest.skip('make is not installed')
    result = subprocess.run(argv[:1] + ['-n', '--no-print-directory'] + argv[1:], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, f'{shlex.join(argv)}: {result.stderr.strip()}'
    return [line for _, line in commands('\n'.join('    ' + line for line in result.stdout.splitlines()))]


@pytest.mark.parametrize('argv', list(documented_commands()))
def test_documented_command_parses(argv, monkeypatch, capsys):
    lines = make_commands(argv) if os.path.basename(argv[0]) == 'make' else [argv]
    for line in lines:
        assert parse(line, monkeypatch, capsys) is None, shlex.join(line)


def test_the_documents_hold_commands():
    found = {param.id.split(':')[0] for param in documented_commands()}
    assert {'README.md', 'docs/usage.md', 'docs/training.md', 'weights/README.md'} <= found, found


@pytest.mark.parametrize('line, wrong', [
    ('python run.py --one a.png --two b.png --out c.png --no-such-option', 'unrecognized arguments'),
    ('python benchmark.py --speed --sizes 64x64 --precisions', 'expected one argument'),
    ('V=x\npython train.py --data $V/a.mp4 \\\n    --crop 64 --max-steps two', 'invalid int value'),
    ('python gpu_round.py --dry-run out --hours 1', 'unrecognized arguments'),
    ('python nothing.py --help', 'is not one of the commands')])
def test_a_wrong_command_is_caught(line, wrong, monkeypatch, capsys):
    [(_, argv)] = commands('\n' + '\n'.join('    ' + part for part in line.split('\n')))
    assert wrong in parse(argv, monkeypatch, capsys)
