"""Named training runs: configs/NAME.toml holds one or more steps, each a table of train.py options.

`train.py --config NAME` runs the first step, `--config NAME:STEP` the one of that name; its options come first
on the command line, so that any option given there wins. Keys are the options without their dashes
(max-steps = 1000); lists give several values (data = ["a.mp4", "b.mp4"]); paths are relative to where
train.py runs."""
import argparse
import os
import tomllib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def available():
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith('.toml'))


def read_steps(name):
    """The steps of configs/NAME.toml (or of a .toml path), in order; an error message where it cannot be read."""
    path = name if name.endswith('.toml') else os.path.join(CONFIG_DIR, f'{name}.toml')
    try:
        with open(path, 'rb') as file:
            steps = tomllib.load(file).get('step', [])
    except FileNotFoundError:
        raise ValueError(f"no config {name} (configs/ has {', '.join(available())})") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f'cannot read config {path}: {error}') from None
    if not steps or not all(isinstance(step, dict) and isinstance(step.get('name'), str) for step in steps):
        raise ValueError(f'config {path} has no [[step]] tables with a name')
    return path, steps


def tokens(value):
    if isinstance(value, list):
        return [str(item) for item in value]
    if isinstance(value, (bool, dict)):
        raise ValueError(f'{value!r} is not an option value')
    return [str(value)]


def config_arguments(parser, argv):
    """The command-line arguments of the step that `--config NAME[:STEP]` in argv names ([] without one)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config')
    chosen = pre.parse_known_args(argv)[0].config
    if chosen is None:
        return []
    name, _, step_name = chosen.partition(':')
    try:
        path, steps = read_steps(name)
        step = next((step for step in steps if step['name'] == step_name), None) if step_name else steps[0]
        if step is None:
            raise ValueError(f"config {name} has no step {step_name} (steps: {', '.join(s['name'] for s in steps)})")
        arguments = []
        for key, value in step.items():
            if key != 'name':
                arguments += [f'--{key}', *tokens(value)]
    except ValueError as error:
        parser.error(str(error))
    unknown = parser.parse_known_args(arguments)[1]
    if unknown:
        parser.error(f"config {path} step {step['name']}: unknown option {unknown[0]}")
    return arguments
