"""train.py's command line: defaults shown, bad values refused in one line (exit 2), no empty --out left."""
import pytest

import train


def call(argv, capsys):
    code = train.main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        train.main(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for default in ('global batch size (default: 16)', 'training crop size (default: 128)',
                    'training steps in all (default: 100000)', 'trained at 5e-4) (default: 0.0005)'):
        assert default in text


@pytest.mark.parametrize('argv, message', [
    (['--workers', '-1'], 'error: --workers must be 0 or more, got -1'),
    (['--max-minutes', '5', '--decay-minutes', '6'], 'error: --decay-minutes must be 0, or up to --max-minutes (5.0)'),
    (['--decay-minutes', '1'], 'error: --decay-minutes must be 0, or up to --max-minutes (0'),
    (['--head-prelu', '--constant-leak', '0.1'], "error: --constant-leak and --head-prelu both replace"),
    (['--out', '/proc/sepconv/run'], 'error: cannot create --out /proc/sepconv/run: '),
])
def test_bad_values(tmp_path, capsys, argv, message):
    code, err = call(['--data', tmp_path, '--out', tmp_path / 'run', *argv], capsys)
    assert code == 2 and err.startswith(message) and err.count('\n') == 1, err
    assert not (tmp_path / 'run').exists()


def test_a_bad_resume_or_no_data_leaves_no_out_folder(tmp_path, capsys):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    code, err = call(['--resume', bad, '--data', tmp_path, '--out', tmp_path / 'run'], capsys)
    assert (code, err.split(':')[:2]) == (2, ['error', f' {bad} is not a train.py checkpoint'])
    (tmp_path / 'empty').mkdir()
    code, err = call(['--data', tmp_path / 'empty', '--out', tmp_path / 'run'], capsys)
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ['bad.pt', 'empty']
