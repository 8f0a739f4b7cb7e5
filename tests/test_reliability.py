"""Faults provoked for real: signals, kill -9, damaged checkpoints, divergence, bad workdirs."""

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_flax import checkpoints, eval_lib, train_lib
from test_train import REPO, SMALL_MODEL_FLAG, _read_params, run_script, tiny_config

COMMON = ['--config=configs/digits.py', '--config.batch_size=16', '--config.log_every_steps=1',
          '--config.warmup_steps=0', '--config.eval_batch_size=360', SMALL_MODEL_FLAG]


def _train_cmd(workdir, *extra):
  return [sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={workdir}', *COMMON, *extra]


def _start(workdir, *extra):
  return subprocess.Popen(_train_cmd(workdir, *extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _wait_for_step(proc, step):
  """Reads progress lines until the run reports `step` (or more); returns what it read."""
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if '] ' in line and '/' in line.split('] ')[1].split()[0]:
      if int(line.split('] ')[1].split('/')[0]) >= step:
        return seen
  raise AssertionError('run ended before step %d:\n%s' % (step, ''.join(seen)))


def _run_to_end(workdir, *extra):
  done = subprocess.run(_train_cmd(workdir, *extra), cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  return done.stdout


def _final_state(workdir, steps):
  config = tiny_config(steps)
  config.lr_schedule = 'cosine'
  return _read_params(workdir, config, steps)


def test_sigterm_saves_current_step_and_next_start_resumes(tmp_path):
  extra = ['--config.num_train_steps=60', '--config.checkpoint_every_steps=0']
  with _start(tmp_path, *extra) as proc:  # closes its output pipe
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
  assert 'Preempted: saved step' in out
  saved = checkpoints.latest_step_in(str(tmp_path / 'checkpoints'))
  assert saved is not None and 3 <= saved < 60
  resumed = _run_to_end(tmp_path, *extra)
  assert f'Resumed from {tmp_path}/checkpoints/{saved} (step {saved})' in resumed
  assert 'Final test accuracy' in resumed


@pytest.mark.parametrize('kill_at', [9, pytest.param(4, marks=pytest.mark.slow),
                                     pytest.param(16, marks=pytest.mark.slow)])
def test_kill_9_then_rerun_is_bitwise_identical_to_uninterrupted(tmp_path, kill_at):
  extra = ['--config.num_train_steps=20', '--config.checkpoint_every_steps=3']
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  _run_to_end(straight, *extra)
  with _start(interrupted, *extra) as proc:  # closes its output pipe
    _wait_for_step(proc, kill_at)
    proc.kill()  # SIGKILL: no handler runs; an async save may be cut off half-way
    assert proc.wait(timeout=60) == -signal.SIGKILL, 'the run ended before the kill'
  _run_to_end(interrupted, *extra)
  a, b = _final_state(straight, 20), _final_state(interrupted, 20)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  # The steps replayed after the kill are logged once, as in the uninterrupted run.
  logged = [json.loads(line)['step'] for line in (interrupted / 'metrics.jsonl').read_text().splitlines()]
  assert logged == [json.loads(line)['step'] for line in (straight / 'metrics.jsonl').read_text().splitlines()]


def _truncate_files(directory):
  for root, _, files in os.walk(directory):
    for name in files:
      if not name.startswith('_') and name != 'commit_success.txt':
        with open(os.path.join(root, name), 'r+b') as file:
          file.truncate(3)


def test_damaged_newest_checkpoint_falls_back_and_finishes_identically(tmp_path):
  straight, damaged = tmp_path / 'straight', tmp_path / 'damaged'
  train_lib.train_and_evaluate(tiny_config(6), str(straight))
  train_lib.train_and_evaluate(tiny_config(4), str(damaged))
  _truncate_files(damaged / 'checkpoints' / '4')
  # tiny_config(6) as flags: the command a user would rerun.
  done = run_script('train.py', f'--workdir={damaged}', '--config=configs/digits.py', '--config.batch_size=16',
                    '--config.eval_batch_size=128', '--config.num_train_steps=6', '--config.warmup_steps=0',
                    '--config.lr_schedule=constant', '--config.log_every_steps=2', '--config.checkpoint_every_steps=2',
                    '--config.async_checkpointing=False', SMALL_MODEL_FLAG)
  out = done.stdout + done.stderr
  assert done.returncode == 0, out
  assert 'skipping checkpoint step 4' in out and 'resuming from step 2' in out
  # One warning, not the tracebacks of orbax's reads still in flight when the first one failed.
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out
  assert json.loads(done.stdout.strip().splitlines()[-1])['step'] == 6
  assert (damaged / 'checkpoints' / '4.damaged').is_dir()
  # Evaluating the damaged one: a one-line error, and nothing after it either.
  done = run_script('eval.py', '--config=configs/digits.py', SMALL_MODEL_FLAG,
                    f'--checkpoint={damaged}/checkpoints/4.damaged')
  assert done.returncode == 2, done.stdout + done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: checkpoint') and 'damaged' in lines[0], done.stderr
  jax.tree_util.tree_map(np.testing.assert_array_equal, _read_params(straight, tiny_config(), 6),
                         _read_params(damaged, tiny_config(), 6))


def test_the_same_step_damaged_twice_is_set_aside_twice(tmp_path, capsys):
  # The rerun saves step 4 again; damaged again, it had met the first 4.damaged: "OSError:
  # [Errno 39] Directory not empty" on every later start.
  directory = tmp_path / 'checkpoints'
  train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))
  for set_aside in ['4.damaged', '4.damaged.2']:
    _truncate_files(directory / '4')
    capsys.readouterr()
    assert train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))['step'] == 4
    assert (f'Set aside damaged checkpoint(s) [4] as {directory}/{set_aside}; resuming from step 2.'
            in capsys.readouterr().out)
  assert sorted(os.listdir(directory)) == ['2', '4', '4.damaged', '4.damaged.2']
  assert checkpoints.committed_steps(str(directory)) == [2, 4]
  # Evaluating one set aside: the error names it, as for 4.damaged.
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(f'checkpoint {directory}/4.damaged.2 cannot be read (') + r'.*\); it is damaged'):
    eval_lib.evaluate(tiny_config(4), None, str(directory / '4.damaged.2'))


def _catches(pid, signum):
  """Whether process `pid` has a handler of its own for `signum` (Linux: /proc/<pid>/status)."""
  with open(f'/proc/{pid}/status', encoding='utf-8') as status:
    caught = next(int(line.split()[1], 16) for line in status if line.startswith('SigCgt:'))
  return bool(caught >> (signum - 1) & 1)


# train.py as on a hung mount, where a file's stat answers and its read blocks: image folders
# refuse named pipes before opening them, so that check is switched off, and the FIFOs block.
_TRAIN_WITH_HUNG_READS = ("import runpy, sys; from resnet_flax.data import image_decode; "
                          "image_decode.special_file_kind = lambda path: None; "
                          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_a_second_sigterm_ends_a_run_stuck_on_a_hung_read(tmp_path):
  # Every image is a FIFO nobody writes to: the decoding threads block as on a hung mount,
  # and the loop never reaches a step's end, where the first signal is read. The second had
  # raised in the main thread, but exiting then waited on the stuck threads for ever.
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      (tmp_path / 'data' / split / name).mkdir(parents=True)
      os.mkfifo(tmp_path / 'data' / split / name / 'hung.jpg')
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-c', _TRAIN_WITH_HUNG_READS, os.path.join(REPO, 'train.py'), f'--workdir={workdir}',
       SMALL_MODEL_FLAG,
       '--config.data.name=imagefolder', f'--config.data.dir={tmp_path / "data"}', '--config.data.image_size=16',
       '--config.data.preprocessing=vgg', '--config.data.num_workers=1', '--config.batch_size=2',
       '--config.num_train_steps=2', '--config.warmup_steps=0'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  try:
    deadline = time.monotonic() + 120
    # Once training's own handler is in (before it, SIGTERM's default would just kill it).
    while not _catches(proc.pid, signal.SIGTERM) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    time.sleep(2)  # into the wait for the first batch
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    time.sleep(3)  # the first is only a request to save at the step's end
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM
  assert stderr.strip().splitlines()[-1] == ('error: SIGTERM a second time: stopped without saving; rerun the same '
                                              'command to resume from the newest checkpoint.')


def test_half_written_save_is_ignored(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  leftover = tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-1234567'
  leftover.mkdir()
  (leftover / 'garbage').write_bytes(b'\x00' * 10)
  assert train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))['step'] == 4


def test_an_unfinished_save_is_refused_by_eval(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  unfinished = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp-1234567'
  shutil.copytree(tmp_path / 'checkpoints' / '2', unfinished)  # whole, as it is just before orbax's rename
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(
      f'{unfinished} is a save that never finished (orbax renames it to 2 when whole); pass a committed step')):
    eval_lib.load_checkpoint(tiny_config(2), None, str(unfinished / 'default'))  # had been evaluated


def test_a_damaged_config_record_is_named_with_its_fix(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  (tmp_path / 'config.json').write_text('{"model": "resnet')
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path / "config.json"} is damaged (')) as excinfo:
    train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))
  assert str(excinfo.value).endswith('delete it: it only records the config of the last start, and the next '
                                     'start writes it again.')


def test_checkpoints_of_another_model_fail_clearly_and_stay_untouched(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  other = tiny_config(4)
  other.model = 'resnet_v2_digits'
  with pytest.raises(checkpoints.StateMismatchError) as error:
    train_lib.train_and_evaluate(other, str(tmp_path))
  assert str(error.value).startswith(f'checkpoint {tmp_path}/checkpoints/2 was saved by a run of another config: ')
  assert 'model: resnet_v1_digits -> resnet_v2_digits' in str(error.value)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def test_resuming_with_another_class_count_is_one_error_naming_the_shapes_without_reading_arrays(tmp_path, capfd):
  # orbax's restore of a misshapen array had failed in asynchronous reads that printed up to
  # 11,000 lines of tracebacks, ending in advice to pass strict=False to orbax.
  config = tiny_config(2)
  config.checkpoint_every_steps = 1
  train_lib.train_and_evaluate(config, str(tmp_path))
  capfd.readouterr()
  other = tiny_config(4)
  other.num_classes = 12
  with pytest.raises(checkpoints.StateMismatchError) as error:
    train_lib.train_and_evaluate(other, str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'strict' not in message
  assert message.startswith(f'checkpoint {tmp_path}/checkpoints/2 was saved by a run of another config: '
                            'params/logits/biases: saved (10,), this run (12,); params/logits/weights: saved ')
  assert message.endswith('Changed since: checkpoint_every_steps: 1 -> 2; num_classes: None -> 12; '
                          'num_train_steps: 2 -> 4.')
  captured = capfd.readouterr()
  assert 'Traceback' not in captured.out + captured.err and 'skipping checkpoint' not in captured.out + captured.err
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


@pytest.mark.parametrize('inside', ['checkpoints/2', 'checkpoints/2/default', 'checkpoints'])
def test_a_workdir_that_is_a_checkpoint_is_refused_and_the_checkpoint_left_alone(tmp_path, inside):
  # Trained there, a new run had written its own checkpoints into the saved one; the real
  # run's next start then set that step aside as damaged.
  run = tmp_path / 'run'
  train_lib.train_and_evaluate(tiny_config(2), str(run))
  saved = sorted(os.listdir(run / 'checkpoints' / '2'))
  what = "a workdir's checkpoints/ folder" if inside == 'checkpoints' else 'a checkpoint'
  expected = (f'--workdir {run / inside} is {what}, not a workdir: pass --workdir={run} (train.py resumes it, '
              f'eval.py takes its newest checkpoint), or name the checkpoint itself: eval.py '
              f'--checkpoint={run}/checkpoints/2, train.py --config.init_checkpoint={run}/checkpoints/2.')
  with pytest.raises(checkpoints.CheckpointError) as error:
    train_lib.train_and_evaluate(tiny_config(4), str(run / inside))
  assert str(error.value) == expected
  with pytest.raises(checkpoints.CheckpointError) as error:
    eval_lib.evaluate(tiny_config(4), str(run / inside))
  assert str(error.value) == expected
  assert sorted(os.listdir(run / 'checkpoints' / '2')) == saved and sorted(os.listdir(run / 'checkpoints')) == ['2']


def test_a_converted_checkpoint_as_workdir_names_no_workdir_above_it(tmp_path):
  # What `slim convert` writes, a bare item: the directory above it is no run to resume.
  variables = tmp_path / 'converted' / 'variables'
  checkpoints.save_tree(str(variables), {'params': {'w': np.zeros(2, np.float32)}})
  with pytest.raises(checkpoints.CheckpointError) as error:
    train_lib.train_and_evaluate(tiny_config(2), str(variables))
  assert str(error.value) == (f'--workdir {variables} is a checkpoint, not a workdir: name the checkpoint itself: '
                              f'eval.py --checkpoint={variables}, train.py --config.init_checkpoint={variables}.')


def test_resuming_with_another_optimizer_names_where_the_state_differs(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  other = tiny_config(4)
  other.optimizer = 'adamw'
  with pytest.raises(checkpoints.CheckpointError) as error:
    train_lib.train_and_evaluate(other, str(tmp_path))
  assert 'opt_state/0/count: in this run, not saved' in str(error.value)
  assert str(error.value).endswith("Resume with the config it was trained with (model and its options, num_classes, "
                                   "the data set's channels, optimizer, bn, model_ema_decay), or start a fresh "
                                   "--workdir. Changed "
                                   "since: num_train_steps: 2 -> 4; optimizer: sgd -> adamw.")


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(6)
  config.learning_rate = 1e30
  config.log_every_steps = config.checkpoint_every_steps = 1
  with pytest.raises(train_lib.NonFiniteLossError, match=r'at step (\d+)') as error:
    train_lib.train_and_evaluate(config, str(tmp_path))
  bad_step = error.value.step
  assert f'at step {bad_step};' in str(error.value)
  saved = checkpoints.latest_step_in(str(tmp_path / 'checkpoints'))
  assert saved == bad_step - 1 if bad_step > 1 else saved is None
  state = _read_params(tmp_path, config, saved)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state.params))


def test_an_evaluation_between_logs_after_a_non_finite_step_stops_the_run_instead(tmp_path, capsys):
  # The evaluations of NaN weights had run, warned that the BatchNorm statistics did not fit the
  # weights yet, and stayed in metrics.jsonl; the error came at the next log, steps later.
  config = tiny_config(8)
  config.learning_rate = 1e30
  config.warmup_steps = 0
  config.eval_every_steps = 2
  config.log_every_steps = config.checkpoint_every_steps = 8
  with pytest.raises(train_lib.NonFiniteLossError, match=r'at step (\d+)') as error:
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert error.value.step <= 2
  assert 'eval at step' not in capsys.readouterr().out
  records = (tmp_path / 'metrics.jsonl').read_text() if (tmp_path / 'metrics.jsonl').exists() else ''
  assert 'eval/' not in records


def test_non_finite_steps_can_be_skipped(tmp_path, capsys, caplog):
  config = tiny_config(4)
  config.learning_rate = 1e30
  config.skip_nonfinite_steps = True
  config.log_every_steps = 1
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert 'warning: skipped non-finite step(s)' in capsys.readouterr().err
  state = _read_params(tmp_path, config, 4)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state.params))
  # Intervals whose every step was skipped log no loss at all, rather than a NaN or null one.
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/loss' not in record and 'train/learning_rate' in record for record in records)
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize('before, first, last, bad, expected', [
    (0, 1, 4, [], 0), (0, 1, 4, [2, 3], 0), (0, 1, 4, [3, 4], 2), (0, 1, 4, [1, 2, 3, 4], 4),
    (5, 6, 8, [6, 7, 8], 8), (5, 6, 8, [6, 8], 1),
])
def test_skipped_in_a_row_counts_across_logging_intervals(before, first, last, bad, expected):
  assert train_lib.skipped_in_a_row(before, first, last, bad) == expected


def test_a_run_of_skipped_steps_stops_training(tmp_path):
  # Skipping is for a rare spike; at lr 1e30 every step diverges and the run had gone on to exit 0.
  config = tiny_config(8)
  config.update(learning_rate=1e30, skip_nonfinite_steps=True, max_skipped_in_a_row=3, log_every_steps=1)
  for checkpoint_every_steps, rerun in [(0, 'with no checkpoint saved yet, it starts afresh.'),
                                        (2, 'it resumes from the newest checkpoint.')]:
    config.checkpoint_every_steps = checkpoint_every_steps
    with pytest.raises(train_lib.NonFiniteLossError, match=r'^3 steps in a row were non-finite and skipped \(up to '
                                                          r'step \d\); the run has diverged') as error:
      train_lib.train_and_evaluate(config, str(tmp_path / str(checkpoint_every_steps)))
    assert str(error.value).endswith(f'then rerun: {rerun}')  # it had said "resumes" with no checkpoint to resume


def test_a_workdir_past_num_train_steps_is_an_error_not_a_silent_no_op(tmp_path):
  train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))
  assert train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))['step'] == 4  # finished: evaluated again
  with pytest.raises(ValueError, match=r'checkpoints is at step 4, past config.num_train_steps=2; raise '
                                       'num_train_steps to train on, or pass a fresh --workdir'):
    train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))


@pytest.mark.parametrize('file_at', ['', 'checkpoints', 'tensorboard'])
def test_a_file_where_a_directory_belongs_fails_before_training(tmp_path, file_at):
  # checkpoints/ as a file had been found at the first save, after the whole run.
  workdir = tmp_path / 'run'
  if file_at:
    workdir.mkdir()
  (workdir / file_at).write_text('a file where a directory belongs')
  with pytest.raises(checkpoints.CheckpointError) as error:
    train_lib.train_and_evaluate(tiny_config(2), str(workdir))
  assert str(error.value) == f'{workdir / file_at} is a file, not a directory; move it or pass another --workdir.'


def test_unwritable_workdir_fails_before_training(tmp_path):
  parent = tmp_path / 'not_a_dir'
  parent.write_text('a file where the parent of the workdir should be')
  with pytest.raises(checkpoints.CheckpointError, match='not writable'):
    train_lib.train_and_evaluate(tiny_config(2), str(parent / 'run'))


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: real(path)._replace(free=1024))
  with pytest.raises(checkpoints.CheckpointError, match=r'has 1\.0 KiB free but the checkpoints need about'):
    train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_room_check_counts_checkpoints_already_there_and_orbax_metadata(tmp_path):
  state = {'w': np.zeros((1000,), np.float32), 'b': np.zeros((3,), np.float32)}
  one = checkpoints.checkpoint_bytes(state)
  assert one >= 4012 + 2 * 1024  # arrays, and orbax's metadata (about 1.2 KiB an array)
  directory = tmp_path / 'checkpoints'
  assert checkpoints.bytes_for_saves(state, 3, str(directory)) == 4 * one  # keeps 3, writes the 4th first
  for step in (2, 4):
    (directory / str(step)).mkdir(parents=True)
  (directory / '6.orbax-checkpoint-tmp').mkdir()  # not committed: takes no room of the kept ones
  assert checkpoints.bytes_for_saves(state, 3, str(directory)) == 2 * one
  assert checkpoints.bytes_for_saves(state, 1, str(directory)) == one


@pytest.mark.parametrize('async_save', [False, True])
def test_disk_filling_during_a_save_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, caplog,
                                                                                    async_save):
  # A real failed write: from step 4's save on, no file may grow past 4 KiB (EFBIG, the
  # errno a full disk would give as ENOSPC), as if the disk had filled after step 2.
  config = tiny_config(8)
  config.async_checkpointing = async_save
  config.log_every_steps = 1
  save = checkpoints.Checkpointer.save
  original_limit = resource.getrlimit(resource.RLIMIT_FSIZE)

  def save_onto_a_full_disk(self, step, state):
    if step == 4:
      self.wait()  # step 2 is on disk
      resource.setrlimit(resource.RLIMIT_FSIZE, (4096, original_limit[1]))
    return save(self, step, state)

  monkeypatch.setattr(checkpoints.Checkpointer, 'save', save_onto_a_full_disk)
  try:
    with pytest.raises(checkpoints.CheckpointError) as error:
      train_lib.train_and_evaluate(config, str(tmp_path))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, original_limit)
  message = str(error.value)
  assert message.startswith(f'saving checkpoint step 4 in {tmp_path}/checkpoints failed (File too large); the '
                            'newest complete checkpoint, step 2, is intact. Free disk space'), message
  assert '\n' not in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']  # the partial step 4 is gone
  assert _read_params(tmp_path, config, 2).step == 2
  # orbax's threads logged the failure, with tracebacks, once each; the message above says it.
  assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
  # The rerun, with room again, resumes from step 2 and finishes.
  monkeypatch.undo()
  assert train_lib.train_and_evaluate(config, str(tmp_path))['step'] == 8


@pytest.mark.parametrize('args,expected', [
    (['--config.batch_size=abc'], 'batch_size'),
    (['--config.bn.decya=0.9'], 'decya'),
    (['--config=configs/cifar10.py', '--config.data.dir=/nonexistent/cifar'], '/nonexistent/cifar'),
    (['--config.data.name=imagenet'], 'imagenet'),
    (['--config.model=resnet_v3_50'], 'resnet_v3_50'),
    # Trained to its first save, which failed with 1,045 lines of orbax and tensorstore tracebacks.
    (['--workdir=/tmp/resnet_flax_test_café/caf\udce9'], 'error: workdir /tmp/resnet_flax_test_café/caf\\xe9 is not '
                                                         "a UTF-8 name, which orbax's checkpoint files need"),
    # ml_collections' "Found ... before a value for --config was specified", pointed at configs/default.py.
    (['--config.num_train_steps=1', '--config=configs/digits.py'], 'error: --config.num_train_steps=1 comes before '
                                                                   '--config=FILE; put --config=FILE first'),
    (['--config.num_train_steps=1', '--config', 'configs/digits.py'], 'error: --config.num_train_steps=1 comes '
                                                                      'before --config=FILE; put --config=FILE first'),
    # absl had kept the last silently; with an override between them, a flag "defined twice".
    (['--config=configs/digits.py', '--config.num_train_steps=1', '--config=configs/cifar10.py'],
     'error: --config is given 2 times (configs/digits.py, configs/cifar10.py); give one config file'),
    # int('None') had been the message: None is a config file's value only.
    (['--config.num_classes=None'], '--config.num_classes=None: None cannot be given on the command line; leave the '
                                    "flag out for the config file's value"),
    # A text field had taken it as a file named None: '/work/main/None does not exist'.
    (['--config.init_checkpoint=None'], '--config.init_checkpoint=None: None cannot be given on the command line'),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, expected):
  done = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={tmp_path}', *args], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:') and expected in lines[0], done.stderr
  assert 'Traceback' not in done.stdout + done.stderr


# The check had read `--config.x=None` in argv only: a text field given None otherwise was a file
# named None, and a typed one got int()'s message.
@pytest.mark.parametrize('given', [('--config.init_checkpoint', 'None'), ('--flagfile=FLAGFILE',)],
                         ids=['text_field_space_form', 'typed_field_in_a_flagfile'])
def test_none_given_other_than_as_field_equals_none_is_refused_too(tmp_path, given):
  flagfile = tmp_path / 'flags.txt'
  flagfile.write_text('--config.num_classes=None\n')
  done = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={tmp_path}/run',
                         *(word.replace('FLAGFILE', str(flagfile)) for word in given)], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  field = 'init_checkpoint' if len(given) == 2 else 'num_classes'
  assert done.returncode == 2
  assert done.stderr.splitlines() == [f'error: --config.{field}=None: None cannot be given on the command line; leave '
                                      "the flag out for the config file's value, or set the field to None in a config "
                                      'file (configs/default.py shows which may be).']
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('where', ['workdir', 'init_checkpoint'])
def test_bucket_urls_are_refused_not_made_into_local_directories(tmp_path, monkeypatch, where):
  monkeypatch.chdir(tmp_path)
  config = tiny_config(2)
  workdir = 'gs://bucket/run' if where == 'workdir' else str(tmp_path / 'run')
  if where == 'init_checkpoint':
    config.init_checkpoint = 'gs://bucket/pretrained'
  with pytest.raises(checkpoints.CheckpointError, match=f'{where.split("_")[-1]} gs://bucket/.* is a URL; only file '
                                                        'system paths are supported'):
    train_lib.train_and_evaluate(config, workdir)
  assert not (tmp_path / 'gs:').exists()


# orbax's reads still in flight after the failure raise with nobody awaiting them; the CLI's
# hook (orbax_noise) drops those echoes, pytest's own hook turns each into a warning.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_one_truncated_data_file_is_skipped_like_a_damaged_checkpoint(tmp_path):
  # orbax re-raises this read error as a bare Exception (not a ValueError), which had crashed the run.
  train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))
  data_files = list((tmp_path / 'checkpoints' / '4' / 'default').glob('ocdbt.process_*/d/*'))
  largest = max(data_files, key=lambda path: path.stat().st_size)
  with open(largest, 'r+b') as file:
    file.truncate(100)
  with pytest.raises(checkpoints.CheckpointError, match=r'checkpoint .*/4 cannot be read \(OUT_OF_RANGE: Error '
                                                        r'reading .*\); it is damaged'):
    checkpoints.restore_tree(str(tmp_path / 'checkpoints' / '4'))
  # eval.py takes only what it is asked for, and names the checkpoint before.
  with pytest.raises(checkpoints.CheckpointError) as error:
    eval_lib.evaluate(tiny_config(4), str(tmp_path))
  assert str(error.value).endswith(f'Older checkpoints in {tmp_path}/checkpoints: steps [2]; if this one is damaged, '
                                   f'pass --checkpoint={tmp_path}/checkpoints/2.')
  # The reads orbax abandoned, closed by the garbage collector, had printed up to 1,370 lines of
  # tracebacks after that one (in some runs: it depends on when they are collected;
  # test_orbax_noise pins the filter itself).
  evaluated = run_script('eval.py', '--config=configs/digits.py', f'--workdir={tmp_path}', SMALL_MODEL_FLAG)
  assert evaluated.returncode == 2 and evaluated.stderr.startswith('error: checkpoint ')
  assert evaluated.stderr.count('\n') == 1, evaluated.stderr[:3000]
  assert train_lib.train_and_evaluate(tiny_config(6), str(tmp_path))['step'] == 6
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4', '4.damaged', '6']  # 4 saved again
