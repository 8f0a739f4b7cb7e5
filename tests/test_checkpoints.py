"""checkpoints.py's run-safety paths without training: damaged steps set aside past any name
taken, committed steps, a failed save's leftovers, URLs, failed or uncommitted async saves
reported once, a newest step of another tree, mismatch and read-failure messages, a read out
of memory never taken for damage."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import checkpoints, distributed, error_lines
from test_reliability import _truncate_files


# A *file* named 4.damaged is not free; the
# rename of the step directory onto it fails with NotADirectoryError, every start after.
def test_a_damaged_step_is_set_aside_past_any_entry_of_its_name(tmp_path):
  (tmp_path / '4' / 'default').mkdir(parents=True)
  (tmp_path / '4.damaged').write_text('a note someone left')
  (tmp_path / '4.damaged.2').symlink_to(tmp_path / 'nowhere')  # dangling: still taken
  assert checkpoints._set_aside(str(tmp_path), 4) == str(tmp_path / '4.damaged.3')
  assert sorted(os.listdir(tmp_path)) == ['4.damaged', '4.damaged.2', '4.damaged.3']
  assert (tmp_path / '4.damaged').read_text() == 'a note someone left'
  assert (tmp_path / '4.damaged.3' / 'default').is_dir()


# A file named with digits is no step;
# counted, it lowers the room asked for and is offered to orbax as a checkpoint.
def test_only_directories_with_digit_names_are_committed_steps(tmp_path):
  for step in (2, 10):
    (tmp_path / str(step)).mkdir()
  (tmp_path / '7').write_text('not a checkpoint')
  (tmp_path / '12.orbax-checkpoint-tmp-99').mkdir()
  (tmp_path / '3.damaged').mkdir()
  assert checkpoints.committed_steps(str(tmp_path)) == [2, 10]  # numerically, not as text
  assert checkpoints.latest_step_in(str(tmp_path)) == 10
  assert checkpoints.committed_steps(str(tmp_path / 'missing')) == []


# 
# a failed save of step 4 deleted the committed step 40 (and 40's own unfinished save).
def test_removing_a_failed_save_leaves_every_other_step_alone(tmp_path):
  for name in ('4.orbax-checkpoint-tmp-1', '4.orbax-checkpoint-tmp-2', '40', '40.orbax-checkpoint-tmp-3', '2'):
    (tmp_path / name).mkdir()
  (tmp_path / '4.orbax-checkpoint-tmp-1' / 'data').write_bytes(b'\0' * 10)
  checkpoints._remove_partial_writes(str(tmp_path), '4')
  assert sorted(os.listdir(tmp_path)) == ['2', '40', '40.orbax-checkpoint-tmp-3']


# Any scheme is a URL.
@pytest.mark.parametrize('url', ['s3://bucket/run', 'hdfs://namenode/run', 'file:///tmp/run'])
def test_every_url_scheme_is_refused(url):
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(f'workdir {url} is a URL')):
    checkpoints.local_path(url, 'workdir')


class _FakeManager:
  """orbax's CheckpointManager as Checkpointer uses it, with a save that fails or is not committed."""

  def __init__(self, wait_raises=None, in_progress=False):
    self.wait_raises, self.in_progress, self.waits = wait_raises, in_progress, 0

  def save(self, step, args, force):
    pass

  def is_saving_in_progress(self):
    return self.in_progress

  def wait_until_finished(self):
    self.waits += 1
    if self.wait_raises is not None:
      raise self.wait_raises

  def close(self):
    pass


def _checkpointer(tmp_path, manager):
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'))
  checkpointer._manager.close()
  checkpointer._manager = manager
  return checkpointer


# An async save that
# failed (a full disk) went unreported until the next save, a whole checkpoint interval later.
def test_check_reports_a_finished_failed_async_save_and_returns_while_one_is_writing(tmp_path):
  manager = _FakeManager(wait_raises=OSError(28, 'No space left on device'), in_progress=True)
  checkpointer = _checkpointer(tmp_path, manager)
  checkpointer.save(4, {'w': np.zeros(2)})
  checkpointer.check()  # still writing: returns at once, without waiting
  assert manager.waits == 0
  manager.in_progress = False
  with pytest.raises(checkpoints.CheckpointError, match=r'saving checkpoint step 4 in .* failed \(No space left on '
                                                        r'device\); no checkpoint was completed\.'):
    checkpointer.check()
  checkpointer.check()  # reported once
  assert manager.waits == 1


# Orbax only logs a step whose
# finalization it skipped; the run must stop, not go on believing the step is saved.
def test_a_save_orbax_did_not_commit_is_an_error(tmp_path):
  checkpointer = _checkpointer(tmp_path, _FakeManager())
  checkpointer.save(6, {'w': np.zeros(2)})
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True, exist_ok=True)
  with pytest.raises(checkpoints.CheckpointError, match=r'step 6 .* failed \(orbax did not commit it\); the newest '
                                                        r'complete checkpoint, step 4, is intact'):
    checkpointer.wait()
  checkpointer.save(8, {'w': np.zeros(2)})
  (tmp_path / 'checkpoints' / '8').mkdir()  # as orbax commits it
  checkpointer.wait()  # committed: no error


# Orbax's close raises a
# failed save again (see Checkpointer.close); reported once already, close() must not
# replace the one-line CheckpointError with orbax's raw error from the run's `finally`.
def test_close_after_a_reported_failed_save_does_not_raise_it_again(tmp_path):
  error = OSError(28, 'No space left on device')
  manager = _FakeManager(wait_raises=error)
  manager.close = lambda: (_ for _ in ()).throw(error)  # as orbax's close does
  checkpointer = _checkpointer(tmp_path, manager)
  checkpointer.save(4, {'w': np.zeros(2)})
  with pytest.raises(checkpoints.CheckpointError, match='No space left on device'):
    checkpointer.wait()
  checkpointer.close()  # no second error


def _saved(directory, trees):
  checkpointer = checkpoints.Checkpointer(str(directory), max_to_keep=5, async_save=False)
  for step, tree in trees.items():
    checkpointer.save(step, tree)
  checkpointer.wait()
  return checkpointer


def test_a_step_not_after_the_newest_is_refused_and_evicts_nothing(tmp_path):
  # Step 3 again had failed with "Free disk space, lower config.keep_checkpoints"; step 1 after
  # steps 2 and 3, keeping 2, had deleted step 2.
  checkpointer = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
  for step in (2, 3):
    checkpointer.save(step, {'w': np.full(2, step)})
  for step, where in ((3, 'is saved already'), (1, 'is older than the newest there, step 3')):
    with pytest.raises(checkpoints.CheckpointError, match=f'^checkpoint step {step} in {tmp_path} {where}: steps go '
                                                          'forward; save later steps, or a run that counts its steps '
                                                          'from 0 again into another directory.$'):
      checkpointer.save(step, {'w': np.zeros(2)})
  assert checkpoints.committed_steps(str(tmp_path)) == [2, 3]  # nothing evicted
  checkpointer.save(4, {'w': np.full(2, 4)})  # the next step is saved as before
  checkpointer.close()
  assert checkpoints.committed_steps(str(tmp_path)) == [3, 4]


# Only a newest step of another tree
# (a partial write, or files copied in) must not stop a run whose older step fits: it is skipped.
def test_a_newest_step_of_another_tree_is_skipped_when_an_older_one_fits(tmp_path):
  target = {'w': np.zeros((3,), np.float32)}
  checkpointer = _saved(tmp_path, {2: {'w': np.ones((3,), np.float32)}, 4: {'w': np.ones((5,), np.float32)}})
  reports = []
  state, step = checkpointer.restore_newest_intact(target, reports.append)
  checkpointer.close()
  assert step == 2 and np.array_equal(state['w'], np.ones(3))
  assert reports[0].startswith('warning: skipping checkpoint step 4: checkpoint ')
  assert 'w: saved (5,), this run (3,)' in reports[0]
  assert sorted(os.listdir(tmp_path)) == ['2', '4.damaged']


# The message shows two differences
# and counts the rest; here 5 differ, so '3 more'.
def test_a_mismatch_message_names_two_differences_and_counts_the_rest(tmp_path):
  checkpointer = _saved(tmp_path, {2: {name: np.zeros(1, np.float32) for name in 'abcd'}})
  target = {'a': np.zeros(2, np.float32), 'b': np.zeros(2, np.float32), 'c': np.zeros(1, np.float32),
            'e': np.zeros(1, np.float32), 'f': np.zeros(1, np.float32)}
  with pytest.raises(checkpoints.StateMismatchError) as error:
    checkpointer.restore_newest_intact(target, print)
  checkpointer.close()
  # a, b differ in shape; e, f are new; d is gone; c agrees: 5 differences.
  assert (f'checkpoint {tmp_path}/2 was saved by a run of another config: a: saved (1,), this run (2,); '
          'b: saved (1,), this run (2,) and 3 more. Resume with') in str(error.value)


def test_restoring_one_checkpoint_into_other_arrays_names_them_not_damage(tmp_path):
  # restore_from had let orbax's read fail and called it "a crash or a disk error damaged its files".
  checkpoints.save_tree(str(tmp_path / 'saved'), {'w': np.zeros((1, 10), np.float32)})
  with pytest.raises(checkpoints.StateMismatchError, match=re.escape(
      f'checkpoint {tmp_path}/saved was saved by a run of another config: w: saved (1, 10), this run (1, 5). '
      'Resume with the config it was trained with')):
    checkpoints.restore_from(str(tmp_path / 'saved'), {'w': np.zeros((1, 5), np.float32)})


def test_a_directory_that_is_no_checkpoint_is_named_so_not_damaged(tmp_path):
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'readme.txt').write_text('not a checkpoint')
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(
      f'{tmp_path}/notes is a directory but no orbax checkpoint (it has no _CHECKPOINT_METADATA or _METADATA)')):
    checkpoints.restore_from(str(tmp_path / 'notes'), {'w': np.zeros(1, np.float32)})


def test_saving_a_tree_where_something_exists_names_the_path_not_the_disk(tmp_path):
  # orbax's refusal had been reported as a failed write: "free disk space or pass another --workdir".
  (tmp_path / 'taken').mkdir()
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(f'{tmp_path}/taken already exists; pass another '
                                                                  'path or remove it.')):
    checkpoints.save_tree(str(tmp_path / 'taken'), {'w': np.zeros(1, np.float32)})


# Every step damaged, the error
# quotes the newest one's failure, as it says.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_when_every_checkpoint_is_damaged_the_error_names_the_newest(tmp_path):
  tree = {'w': np.arange(4096, dtype=np.float32)}
  checkpointer = _saved(tmp_path, {2: tree, 4: tree})
  for step in (2, 4):
    _truncate_files(tmp_path / str(step))
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpointer.restore_newest_intact(tree, lambda line: None)
  checkpointer.close()
  assert str(error.value).startswith(f'no usable checkpoint in {tmp_path}, 2 tried; the newest: checkpoint '
                                     f'{tmp_path}/4 cannot be read (')
  assert sorted(os.listdir(tmp_path)) == ['2', '4']  # none set aside: nothing restored


# Orbax wraps tensorstore's
# error in a bare Exception naming only an array index.
def test_a_read_failure_is_named_by_its_innermost_cause():
  try:
    try:
      try:
        raise ValueError('OUT_OF_RANGE: Error reading "params/w"\nmore detail')
      except ValueError as inner:
        raise RuntimeError('while reading') from inner
    except RuntimeError as middle:
      raise Exception('Encountered error while reading array index 3') from middle
  except Exception as outer:  # pylint: disable=broad-except
    assert checkpoints._read_failure(outer) == 'OUT_OF_RANGE: Error reading "params/w"'


def out_of_device_memory() -> Exception:
  """A real XLA allocation failure: 2 EiB, past any address space, so no machine has it."""
  try:
    jnp.ones((2**61,), jnp.uint8).block_until_ready()
  except jax.errors.JaxRuntimeError as error:
    return error
  raise AssertionError('2 EiB allocated')


def _reader_running_out_of_memory(error_of, wrapped: bool):
  """A stand-in for `_read_by_this_process` whose reads raise `error_of()`, or, `wrapped`, a bare
  Exception from it as orbax re-raises a failed array read."""

  class ReadOutOfMemory:
    def __enter__(self):
      return self

    def __exit__(self, *exception):
      return False

    def restore(self, *args):
      error = error_of()
      if wrapped:
        raise Exception('Encountered error while reading array index 0') from error
      raise error

  return ReadOutOfMemory


@pytest.mark.parametrize('wrapped', [False, True])
def test_a_read_out_of_memory_is_raised_not_skipped_as_damage(tmp_path, monkeypatch, wrapped):
  # It had been "cannot be read ...: a crash or a disk error damaged its files": the newest
  # step skipped, and set aside once an older one (smaller, or read with more memory free) fit.
  tree = {'w': np.arange(4, dtype=np.float32)}
  checkpointer = _saved(tmp_path, {2: tree, 4: tree})
  monkeypatch.setattr(checkpoints, '_read_by_this_process', _reader_running_out_of_memory(out_of_device_memory,
                                                                                          wrapped))
  reports = []
  with pytest.raises(Exception) as raised:
    checkpointer.restore_newest_intact(tree, reports.append)
  assert isinstance(error_lines.out_of_memory(raised.value), jax.errors.JaxRuntimeError)
  assert not isinstance(raised.value, checkpoints.CheckpointError)
  assert reports == [] and sorted(os.listdir(tmp_path)) == ['2', '4']
  monkeypatch.undo()
  assert checkpointer.restore_newest_intact(tree, reports.append)[1] == 4
  checkpointer.close()


def _as_process_0_of_2(monkeypatch, process_1_rows):
  """This process as process 0 of two, whose partner sends `process_1_rows` in turn (None: no failure)."""
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(checkpoints, '_check_every_process_sees', lambda *args: None)  # both list steps 2 and 4
  rows = iter(process_1_rows)
  monkeypatch.setattr(distributed.multihost_utils, 'process_allgather',
                      lambda own: np.stack([own, distributed._encoded(*next(rows) or (None,))]))


def test_every_process_skips_a_step_damaged_on_one_but_stops_when_one_ran_out_of_memory(tmp_path, monkeypatch):
  tree = {'w': np.arange(4, dtype=np.float32)}
  checkpointer = _saved(tmp_path, {2: tree, 4: tree})
  # Step 4 damaged on process 1 alone: both go on to step 2; process 0 sets step 4 aside.
  _as_process_0_of_2(monkeypatch, [('checkpoint 4 cannot be read (OUT_OF_RANGE)', distributed._EXPECTED_FAILURE),
                                   None, None])
  reports = []
  assert checkpointer.restore_newest_intact(tree, reports.append)[1] == 2
  assert reports[0] == ('warning: skipping checkpoint step 4: process 1 of 2 failed to restore it: checkpoint 4 '
                        'cannot be read (OUT_OF_RANGE)')
  assert sorted(os.listdir(tmp_path)) == ['2', '4.damaged']
  # Out of memory on process 1: process 0 stops too, rather than going on to an older step
  # that process 1, stopped, will never read with it.
  monkeypatch.undo()
  checkpointer.close()
  os.rename(tmp_path / '4.damaged', tmp_path / '4')
  checkpointer = _saved(tmp_path, {})
  _as_process_0_of_2(monkeypatch, [('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.',
                                    distributed._FAILURE)])
  with pytest.raises(distributed.FailedOnAnotherProcess,
                     match=r'^process 1 of 2 failed to restore it: RESOURCE_EXHAUSTED: Out of memory while trying'):
    checkpointer.restore_newest_intact(tree, reports.append)
  assert len(reports) == 2 and sorted(os.listdir(tmp_path)) == ['2', '4']
  monkeypatch.undo()
  checkpointer.close()


def test_a_relative_path_under_a_directory_whose_name_is_not_utf8_is_refused(tmp_path, monkeypatch):
  # The name as given is UTF-8; the directory it is relative to is not, and orbax takes the whole path.
  parent = tmp_path / 'caf\udce9'
  parent.mkdir()
  monkeypatch.chdir(parent)
  with pytest.raises(checkpoints.CheckpointError, match=r'^workdir .*/caf\\xe9/run is not a UTF-8 name'):
    checkpoints.local_path('run', 'workdir')
  assert checkpoints.local_path(str(tmp_path / 'café'), 'workdir') == str(tmp_path / 'café')


def _as_process_0_of_2_sending(monkeypatch):
  """This process as process 0 of two whose partner never fails; the row markers this process
  sends, in order (0: no failure), are appended to the list returned."""
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(checkpoints, '_check_every_process_sees', lambda *args: None)
  sent = []

  def allgather(own):
    sent.append(int(own[0]))
    return np.stack([own, distributed._encoded(None)])

  monkeypatch.setattr(distributed.multihost_utils, 'process_allgather', allgather)
  return sent


# The others learn from this process's row whether they may go on: damage it meets is one to go
# on from (all skip the step), running out of memory is not (all stop, none reads an older step).
def test_the_row_a_process_sends_marks_damage_only_as_one_to_go_on_from(tmp_path, monkeypatch):
  tree = {'w': np.arange(4, dtype=np.float32)}
  damaged, too_big = (_saved(tmp_path / name, {2: tree, 4: tree}) for name in ('damaged', 'too_big'))
  sent = _as_process_0_of_2_sending(monkeypatch)
  read = damaged.restore

  def step_4_damaged(step, target):
    if step == 4:
      raise checkpoints.CheckpointError('checkpoint 4 cannot be read (OUT_OF_RANGE)')
    return read(step, target)

  monkeypatch.setattr(damaged, 'restore', step_4_damaged)
  assert damaged.restore_newest_intact(tree, lambda line: None)[1] == 2
  # Step 4 (damage: go on), step 2 (read), setting step 4 aside.
  assert sent == [distributed._EXPECTED_FAILURE, 0, 0]
  sent.clear()

  def out_of_memory(step, target):
    raise MemoryError('Unable to allocate 4.00 GiB')

  monkeypatch.setattr(too_big, 'restore', out_of_memory)
  with pytest.raises(MemoryError):
    too_big.restore_newest_intact(tree, lambda line: None)
  assert sent == [distributed._FAILURE]  # not one to go on from: process 1 must stop too, not try step 2
  assert sorted(os.listdir(tmp_path / 'too_big')) == ['2', '4']
  monkeypatch.undo()
  damaged.close()
  too_big.close()


def test_restore_tree_raises_running_out_of_memory_as_it_is_not_as_damage(tmp_path, monkeypatch):
  # pretrained's init_checkpoint read goes through restore_tree: "cannot be read ...; it is
  # damaged" would send the user after whole files.
  checkpoints.save_tree(str(tmp_path / 'tree'), {'w': np.arange(4, dtype=np.float32)})
  monkeypatch.setattr(checkpoints, '_read_by_this_process',
                      _reader_running_out_of_memory(lambda: MemoryError('Unable to allocate 4.00 GiB'), True))
  with pytest.raises(Exception) as raised:
    checkpoints.restore_tree(str(tmp_path / 'tree'))
  assert not isinstance(raised.value, checkpoints.CheckpointError)
  assert isinstance(error_lines.out_of_memory(raised.value), MemoryError)
