"""files.py: written whole or not at all, short temporary names, strict JSON, outputs that are inputs."""
import json
import os

import pytest

from cli import InputError
from files import check_not_an_input, temporary_beside, write_file, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / 'report.json'
    target.write_text('old')

    def fails_halfway(temporary):
        open(temporary, 'w').write('half')
        raise OSError(28, 'No space left on device')
    with pytest.raises(InputError, match='cannot write .*report.json: No space left on device'):
        write_file(str(target), fails_halfway)
    assert target.read_text() == 'old' and os.listdir(tmp_path) == ['report.json']


def test_temporary_names_are_short_and_keep_the_extension(tmp_path):
    long_name = 'x' * 240 + '.png'
    temporary = temporary_beside(str(tmp_path / long_name))
    assert os.path.basename(temporary).startswith('.sepconv-') and temporary.endswith('.png')
    assert len(os.path.basename(temporary)) <= 9 + 8 + 16
    folder = temporary_beside(str(tmp_path / 'frames'), folder=True)
    assert os.path.isdir(folder) and os.path.dirname(folder) == str(tmp_path)


def test_json_is_strict(tmp_path):
    path = tmp_path / 'r.json'
    write_json(str(path), {'psnr': float('inf'), 'rows': {'a': float('nan'), 'b': 1.5}})
    assert json.loads(path.read_text()) == {'psnr': None, 'rows': {'a': None, 'b': 1.5}}


def test_an_output_that_is_an_input_by_any_name_is_refused(tmp_path):
    source = tmp_path / 'in.png'
    source.write_bytes(b'frame')
    os.symlink(source, tmp_path / 'link.png')
    os.link(source, tmp_path / 'hard.png')
    for output in (source, tmp_path / 'link.png', tmp_path / 'hard.png', tmp_path / '.' / 'in.png'):
        with pytest.raises(InputError, match='would overwrite an input'):
            check_not_an_input(str(output), [None, str(source)])
    check_not_an_input(str(tmp_path / 'out.png'), [str(source)])
