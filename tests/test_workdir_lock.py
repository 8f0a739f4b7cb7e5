"""One training run per workdir: a second is refused at once, by name; the lock goes with the run."""

import errno
import multiprocessing
import os
import socket

import ml_collections
import pytest

from resnet_flax import checkpoints, data, train_lib, workdir_lock
from test_train import tiny_config


def _hold_until_told(workdir, held, release):
  with workdir_lock.held(workdir):
    held.set()
    release.wait(60)


def test_a_second_run_on_a_workdir_in_use_is_refused_by_name(tmp_path):
  context = multiprocessing.get_context('spawn')  # another process: flock locks are per open file, not per pid
  held, release = context.Event(), context.Event()
  other = context.Process(target=_hold_until_told, args=(str(tmp_path), held, release))
  other.start()
  try:
    assert held.wait(60)
    with pytest.raises(workdir_lock.WorkdirInUseError, match=rf'{tmp_path} is in use by another training run '
                                                             rf'\(pid {other.pid} on [^)]+\); wait for it'):
      train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
    assert not (tmp_path / 'checkpoints').exists()  # refused before anything was written
  finally:
    release.set()
    other.join(60)
  assert train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))['step'] == 2  # free once it ended


def test_the_lock_is_given_back_when_a_run_fails(tmp_path):
  other = tiny_config(2)
  other.model = 'resnet_v2_digits'
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  with pytest.raises(checkpoints.StateMismatchError):
    train_lib.train_and_evaluate(other, str(tmp_path))
  # In the same process, while the failure's traceback still holds the failed run's frames.
  assert train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))['step'] == 4


def test_no_lock_where_the_workdir_cannot_be_made(tmp_path):
  (tmp_path / 'a_file').write_text('')
  with workdir_lock.held(str(tmp_path / 'a_file')):  # check_workdir names this one
    pass
  assert os.listdir(tmp_path) == ['a_file']


@pytest.mark.parametrize('existed', [False, True])
@pytest.mark.parametrize('failing_on', ['data', 'init_checkpoint'])
def test_a_run_that_fails_before_writing_leaves_no_lock_behind(tmp_path, existed, failing_on):
  workdir = tmp_path / 'run'
  if existed:
    workdir.mkdir()
  config = tiny_config(2)
  if failing_on == 'data':
    config.data = ml_collections.ConfigDict({'name': 'cifar10', 'dir': str(tmp_path)})  # passes the path check
    expected = (data.DataError, 'data_batch_1 does not exist')
  else:  # after orbax's manager made checkpoints/
    config.init_checkpoint = str(tmp_path / 'nowhere')
    expected = (checkpoints.CheckpointError, 'nowhere does not exist')
  with pytest.raises(expected[0], match=expected[1]):
    train_lib.train_and_evaluate(config, str(workdir))  # fails with the lock held
  # An empty workdir holding `.lock` (and `checkpoints/`) had been left; one that was there stays, empty.
  assert (os.listdir(workdir) == []) if existed else not workdir.exists()


def test_only_the_empty_directories_the_run_made_are_removed(tmp_path):
  (tmp_path / 'empty_before').mkdir()
  with workdir_lock.held(str(tmp_path), ('checkpoints', 'tensorboard', 'empty_before', 'linked')):
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'tensorboard').mkdir()
    (tmp_path / 'tensorboard' / 'events').write_text('x')
    (tmp_path / 'someone_elses').mkdir()  # made meanwhile, not by the run
    (tmp_path / 'linked').symlink_to(tmp_path / 'someone_elses')
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME, 'empty_before', 'linked', 'someone_elses',
                                          'tensorboard']


def test_a_workdir_with_anything_else_in_it_keeps_the_lock_file(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with workdir_lock.held(str(tmp_path)):
    pass
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME, 'notes.txt']


def test_a_run_that_opened_the_lock_file_just_before_its_removal_locks_the_one_there_now(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  with workdir_lock.held(str(workdir)):  # run A, which fails before writing anything
    stale = open(workdir / workdir_lock.LOCK_NAME, 'a+', encoding='utf-8')  # run B opens the file meanwhile
  assert not workdir.exists()  # A removed its lock file and the workdir it made
  opened = iter([stale])
  open_lock_file = workdir_lock._open
  monkeypatch.setattr(workdir_lock, '_open', lambda path: next(opened, None) or open_lock_file(path))
  with workdir_lock.held(str(workdir)):  # B: its lock on the removed file would not have kept anyone out
    with pytest.raises(workdir_lock.WorkdirInUseError):
      with workdir_lock.held(str(workdir)):  # run C
        pass
  assert stale.closed


def test_a_file_system_without_locks_trains_unguarded(tmp_path, monkeypatch):
  # Some FUSE mounts answer flock with ENOLCK: the run goes on (it cannot be guarded), twice over.
  def no_locks(fileno, operation):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(workdir_lock.fcntl, 'flock', no_locks)
  with workdir_lock.held(str(tmp_path)):
    with workdir_lock.held(str(tmp_path)):  # a second run is not refused: nothing can tell it apart
      (tmp_path / 'checkpoints').mkdir()


# A workdir the user made (empty,
# e.g. by mkdir before the run) was removed by a run that wrote nothing. Pinned today only by a
# training test (test_a_run_that_fails_before_writing_leaves_no_lock_behind[existed=True]).
def test_a_workdir_that_was_there_stays_and_one_the_run_made_goes(tmp_path):
  (tmp_path / 'mine').mkdir()
  with workdir_lock.held(str(tmp_path / 'mine'), ('checkpoints',)):
    (tmp_path / 'mine' / 'checkpoints').mkdir()
  with workdir_lock.held(str(tmp_path / 'made')):
    assert (tmp_path / 'made' / workdir_lock.LOCK_NAME).is_file()
  assert sorted(os.listdir(tmp_path)) == ['mine'] and os.listdir(tmp_path / 'mine') == []


# The lock file
# names the run holding it, once, as the refusal message quotes it; a lock file kept from an
# earlier run (the workdir holds more) is rewritten, not appended to.
def test_the_lock_file_names_the_run_holding_it_once(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  expected = f'pid {os.getpid()} on {socket.gethostname()}\n'
  for _ in range(2):
    with workdir_lock.held(str(tmp_path)):
      assert (tmp_path / workdir_lock.LOCK_NAME).read_text() == expected
  (tmp_path / workdir_lock.LOCK_NAME).write_text('pid 1 on a much longer host name than this one\n')
  with workdir_lock.held(str(tmp_path)):
    assert (tmp_path / workdir_lock.LOCK_NAME).read_text() == expected


# The lock then
# lasted as long as the file object did; in CPython that is usually the end of the block too
# (reference counting), so the existing tests, the training one included, pass. Anything that
# keeps the object (a cycle, a debugger, PyPy's GC) kept the workdir locked for this process.
def test_the_lock_is_released_when_the_block_ends_not_when_the_file_is_collected(tmp_path, monkeypatch):
  opened = []
  real_open = workdir_lock._open
  monkeypatch.setattr(workdir_lock, '_open', lambda path: opened.append(real_open(path)) or opened[-1])
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(RuntimeError):
    with workdir_lock.held(str(tmp_path)):
      raise RuntimeError('the run failed')
  assert opened and all(file.closed for file in opened)
  with workdir_lock.held(str(tmp_path)):  # while `opened` still holds the first file: not WorkdirInUseError
    pass
