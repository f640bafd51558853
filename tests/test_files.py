"""files.py: written whole or not at all where the path leads, short temporary names, stale ones removed, strict
JSON, outputs that are inputs."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cli import InputError
from files import (check_folder, check_not_an_input, check_writable, commit, lock, temporary_beside, write_file,
                   write_json, write_stream)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert len(os.path.basename(temporary)) <= 9 + 8 + 1 + 7 + 1 + 8 + 16  # prefix, tag, pid, random, extension
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


def test_a_symlink_is_written_through_to_its_target(tmp_path):
    (tmp_path / 'real.json').write_text('old')
    os.symlink('real.json', tmp_path / 'link.json')
    os.symlink('made/by-link.json', tmp_path / 'dangling.json')
    write_json(str(tmp_path / 'link.json'), {'a': 1})
    write_json(str(tmp_path / 'dangling.json'), {'b': 2})
    assert os.readlink(tmp_path / 'link.json') == 'real.json'
    assert json.loads((tmp_path / 'real.json').read_text()) == {'a': 1}
    assert os.readlink(tmp_path / 'dangling.json') == 'made/by-link.json'
    assert json.loads((tmp_path / 'made' / 'by-link.json').read_text()) == {'b': 2}
    assert sorted(os.listdir(tmp_path)) == ['dangling.json', 'link.json', 'made', 'real.json']


def test_a_target_that_is_not_a_regular_file_is_never_replaced(tmp_path):
    os.mkfifo(tmp_path / 'fifo')
    os.symlink('fifo', tmp_path / 'link-to-fifo')
    for path, message in ((tmp_path / 'fifo', 'is a FIFO, not a regular file'),
                          (tmp_path / 'link-to-fifo', 'is a FIFO, not a regular file'),
                          ('/dev/null', 'is a character device, not a regular file'),
                          ('/dev/stdout', 'is a descriptor of this process'),
                          (f'/proc/self/fd/{sys.stderr.fileno()}', 'is a descriptor of this process')):
        with pytest.raises(InputError, match=message):
            check_writable(str(path))
        with pytest.raises(InputError, match=message):
            write_json(str(path), {})
    assert stat.S_ISFIFO(os.stat(tmp_path / 'fifo').st_mode) and stat.S_ISCHR(os.stat('/dev/null').st_mode)
    assert sorted(os.listdir(tmp_path)) == ['fifo', 'link-to-fifo']


def test_a_failed_write_keeps_the_reason_a_writer_hides(tmp_path):
    def hides(file):
        try:
            file.write(b'x')
        except OSError:
            raise RuntimeError('enforce fail at inline_container.cc') from None

    class Full:
        def write(self, data):
            raise OSError(28, 'No space left on device')
    with pytest.raises(InputError, match='cannot write .*w.pt: No space left on device'):
        write_stream(str(tmp_path / 'w.pt'), lambda file: (setattr(file, 'file', Full()), hides(file)))
    assert os.listdir(tmp_path) == []


def test_a_folder_is_filled_in_place_keeping_its_mode(tmp_path):
    (tmp_path / 'out').mkdir(mode=0o700)
    os.chmod(tmp_path / 'out', 0o710)
    os.symlink('out', tmp_path / 'link')
    temporary = temporary_beside(str(tmp_path / 'link'), folder=True)
    assert os.path.dirname(temporary) == str(tmp_path / 'out')  # on the folder's own file system (a mount point)
    (open(os.path.join(temporary, '000000.png'), 'w')).write('frame')
    commit(temporary, str(tmp_path / 'link'))
    assert os.listdir(tmp_path / 'out') == ['000000.png'] and stat.S_IMODE(os.stat(tmp_path / 'out').st_mode) == 0o710
    assert os.path.islink(tmp_path / 'link')
    temporary = temporary_beside(str(tmp_path / 'link'), folder=True)
    with pytest.raises(InputError, match='output folder is not empty'):
        commit(temporary, str(tmp_path / 'link'))


def dead_pid():
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def test_the_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / 'r.json'
    script = f'import files, time; files.write_file({str(target)!r}, lambda temporary: time.sleep(60))'
    writer = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT)
    for _ in range(200):
        if os.listdir(tmp_path):
            break
        time.sleep(0.05)
    killed = os.listdir(tmp_path)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert len(killed) == 1 and killed[0].startswith('.sepconv-')
    temporary = temporary_beside(str(target))
    tag = os.path.basename(temporary).split('-')[1]
    os.remove(temporary)
    reused = tmp_path / f'.sepconv-{tag}-1-abcdefgh.json'  # pid 1 runs, but started after this was written
    reused.write_text('')
    os.utime(reused, (0, 0))
    alive = tmp_path / f'.sepconv-{tag}-{os.getpid()}-abcdefgh.json'  # a writer that runs
    alive.write_text('')
    folder = tmp_path / f'.sepconv-{tag}-{dead_pid()}-abcdefgh'
    folder.mkdir()
    other = tmp_path / f'.sepconv-00000000-{dead_pid()}-abcdefgh.json'  # another target's: left to its writer
    other.write_text('')
    write_json(str(target), {'a': 1})
    assert sorted(os.listdir(tmp_path)) == sorted(['r.json', alive.name, other.name])


def test_a_folder_is_held_by_one_run_at_a_time(tmp_path):
    with lock(str(tmp_path)):
        with pytest.raises(InputError, match='is in use by another run'):
            with lock(str(tmp_path)):
                pass
    with lock(str(tmp_path)):
        pass
    assert os.listdir(tmp_path) == []


def test_a_folder_is_created_through_a_dangling_link_and_a_file_is_not_a_folder(tmp_path):
    os.symlink('made', tmp_path / 'link')
    check_folder(str(tmp_path / 'link'))
    assert os.path.isdir(tmp_path / 'made') and os.path.islink(tmp_path / 'link')
    with pytest.raises(InputError, match='output path is a directory: .*r.json/'):
        check_writable(str(tmp_path / 'r.json') + '/')
