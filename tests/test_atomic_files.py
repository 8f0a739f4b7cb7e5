"""atomic_files: strict JSON with null for NaN, writes that appear whole or not at all."""

import errno
import json
import os

import pytest

from resnet_flax import atomic_files


def test_result_files_hold_null_for_nan_and_infinity_as_strict_json(tmp_path):
  path = str(tmp_path / 'result.json')
  atomic_files.write_json(path, {'moving': {'loss': float('nan'), 'top1': 0.0}, 'curve': [float('inf'), 1.5],
                                 'pair': (float('-inf'), 2)})

  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')

  with open(path, encoding='utf-8') as file:
    assert json.load(file, parse_constant=refuse) == {'moving': {'loss': None, 'top1': 0.0}, 'curve': [None, 1.5],
                                                      'pair': [None, 2]}


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
  path = tmp_path / 'table.csv'
  atomic_files.write_text(str(path), 'old\n')

  def fail_halfway(file):
    file.write('half')
    raise OSError(28, 'No space left on device')

  with pytest.raises(OSError, match='No space left'):
    atomic_files.write_atomically(str(path), fail_halfway)
  assert path.read_text() == 'old\n' and sorted(p.name for p in tmp_path.iterdir()) == ['table.csv']


# A damaged
# result file read as "none yet" would have its run silently redone or dropped.
def test_read_json_is_none_only_for_a_missing_file(tmp_path):
  assert atomic_files.read_json(str(tmp_path / 'missing.json')) is None
  (tmp_path / 'result.json').write_text('{"top1": 0.5')
  with pytest.raises(json.JSONDecodeError):
    atomic_files.read_json(str(tmp_path / 'result.json'))


# While the write runs, readers see the old
# file whole, and the new text only appears by the final rename.
def test_an_atomic_write_is_invisible_until_it_is_whole(tmp_path):
  path = tmp_path / 'table.csv'
  path.write_text('old\n')
  seen = []

  def write(file):
    file.write('new, half')
    file.flush()
    seen.append((path.read_text(), sorted(p.name for p in tmp_path.iterdir())))
    file.write(' and the rest\n')

  atomic_files.write_atomically(str(path), write)
  (text, names), = seen
  assert text == 'old\n' and path.read_text() == 'new, half and the rest\n'
  # The temporary file is hidden from listings and globs of the final names (*.csv).
  assert len(names) == 2 and names[0].startswith('.table.csv.') and names[0].endswith('.tmp')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['table.csv']


# Two writers of one file (a sweep's table
# rewritten by two processes) each write their own temporary file: the last rename wins, whole.
def test_two_writers_of_one_file_do_not_share_a_temporary_file(tmp_path):
  path = str(tmp_path / 'table.csv')

  def first(file):
    file.write('first, half')
    atomic_files.write_text(path, 'second, whole\n')  # the other writer starts and finishes meanwhile
    file.write(' and the rest\n')

  atomic_files.write_atomically(path, first)
  with open(path) as file:
    assert file.read() == 'first, half and the rest\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['table.csv']


# A rename is durable only once its directory
# is synced: a power loss could otherwise bring back the old file (or none).
def test_the_directory_is_synced_after_the_rename(tmp_path, monkeypatch):
  path = tmp_path / 'result.json'
  synced = []
  monkeypatch.setattr(atomic_files, 'fsync_directory', lambda directory: synced.append((directory, path.exists())))
  atomic_files.write_json(str(path), {'top1': 0.5})
  assert synced == [(str(tmp_path), True)]


@pytest.mark.parametrize('failing', ['open', 'fsync'])
def test_a_directory_that_cannot_be_synced_fails_no_write_whose_rename_is_done(tmp_path, monkeypatch, failing):
  # A file system without directory fsync (EINVAL) had turned a write already in place into an error.
  path = tmp_path / 'result.json'
  real = getattr(atomic_files.os, failing)

  def refusing(target, *args):
    if failing == 'open' and target != str(tmp_path):
      return real(target, *args)
    if failing == 'fsync' and not os.path.isdir(f'/proc/self/fd/{target}'):
      return real(target, *args)
    raise OSError(errno.EINVAL, 'Invalid argument')

  monkeypatch.setattr(atomic_files.os, failing, refusing)
  atomic_files.write_json(str(path), {'top1': 0.5})
  assert json.loads(path.read_text()) == {'top1': 0.5}
  # Another failure (an I/O error) is no such case: it is raised.
  monkeypatch.setattr(atomic_files.os, failing, lambda *args: (_ for _ in ()).throw(OSError(errno.EIO, 'I/O error')))
  with pytest.raises(OSError, match='I/O error'):
    atomic_files.fsync_directory(str(tmp_path))


def test_a_file_named_relative_to_the_working_directory_is_written(tmp_path, monkeypatch):
  # Its directory is '': the directory to sync is the working one, not os.open('').
  monkeypatch.chdir(tmp_path)
  atomic_files.write_text('table.csv', 'new\n')
  assert (tmp_path / 'table.csv').read_text() == 'new\n'


@pytest.mark.skipif(not hasattr(os, 'O_DIRECTORY'), reason='directories cannot be opened to sync on Windows')
def test_the_file_and_then_its_directory_are_synced_and_nothing_is_left_open(tmp_path, monkeypatch):
  synced, opened, closed = [], [], []
  real_fsync, real_open, real_close = os.fsync, os.open, os.close

  def fsync(descriptor):
    synced.append(os.fstat(descriptor).st_ino)
    real_fsync(descriptor)

  def open_(*args, **kwargs):
    opened.append(real_open(*args, **kwargs))
    return opened[-1]

  def close(descriptor):
    closed.append(descriptor)
    real_close(descriptor)

  monkeypatch.setattr(os, 'fsync', fsync)
  monkeypatch.setattr(os, 'open', open_)
  monkeypatch.setattr(os, 'close', close)
  atomic_files.write_text(str(tmp_path / 'table.csv'), 'new\n')
  monkeypatch.undo()
  assert synced == [os.stat(tmp_path / 'table.csv').st_ino, os.stat(tmp_path).st_ino]
  assert opened and sorted(opened) == sorted(closed)
