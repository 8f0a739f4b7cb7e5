"""What a --workdir is checked for."""

import os
import re
import shutil

import numpy as np
import pytest

from resnet_flax import checkpoints, train_lib, workdirs
from resnet_flax.slim import checkpoint_state
from test_train import tiny_config


def test_a_workdir_that_is_a_file_or_a_url_is_refused_by_name(tmp_path):
  (tmp_path / 'run').write_text('')
  with pytest.raises(checkpoints.CheckpointError, match=f'{tmp_path}/run is a file, not a directory'):
    workdirs.check_workdir(str(tmp_path / 'run'), needed_bytes=0)
  with pytest.raises(checkpoints.CheckpointError, match='gs://b/run is a URL'):
    workdirs.check_workdir('gs://b/run', needed_bytes=0)


def test_a_workdir_without_room_names_what_it_has_and_needs(tmp_path):
  free = shutil.disk_usage(tmp_path).free
  with pytest.raises(checkpoints.CheckpointError, match=r'free but the checkpoints need about .* more; free disk'):
    workdirs.check_workdir(str(tmp_path / 'run'), needed_bytes=free * 2)
  assert os.listdir(tmp_path / 'run') == []  # the write probe is gone


# A workdir
# that merely holds a folder named with digits (per-epoch exports, a data split '0') was refused
# as "a workdir's checkpoints/ folder".
def test_a_folder_of_digit_named_directories_that_are_no_checkpoints_is_a_workdir(tmp_path):
  (tmp_path / '0').mkdir()
  (tmp_path / '1' / 'default').mkdir(parents=True)  # no orbax metadata in it
  workdirs.check_not_a_checkpoint(str(tmp_path))  # no error
  checkpoints.save_tree(str(tmp_path / '2'), {'w': np.zeros(2, np.float32)})  # a real one, now the newest
  with pytest.raises(checkpoints.CheckpointError, match=f"--workdir {tmp_path} is a workdir's checkpoints/ folder"):
    workdirs.check_not_a_checkpoint(str(tmp_path))


# Any URL scheme, not only gs://, as check_workdir sees it.
def test_a_workdir_url_of_any_scheme_is_refused_and_nothing_made(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match='s3://b/run is a URL'):
    workdirs.check_workdir('s3://b/run', needed_bytes=0)
  assert os.listdir(tmp_path) == []


# Guards against (the `^\s*` anchor dropped: a commented-out or prefixed
# field then wins). Text-format: `#` starts a comment.
def test_state_file_reads_the_model_checkpoint_path_field_only(tmp_path):
  (tmp_path / 'checkpoint').write_text('# model_checkpoint_path: "old"\n'
                                       'model_checkpoint_path: "model.ckpt-7"\n')
  assert checkpoint_state.newest_in(str(tmp_path / 'checkpoint')) == 'model.ckpt-7'


def test_a_workdir_inside_another_runs_own_folders_is_refused_before_anything_is_written(tmp_path):
  # train.py --workdir=RUN/tensorboard had trained a second run in the first one's event folder.
  run = tmp_path / 'run'
  (run / 'tensorboard').mkdir(parents=True)
  (run / 'config.json').write_text('{}')
  (run / 'metrics.jsonl').write_text('')
  with pytest.raises(checkpoints.CheckpointError, match=rf'^--workdir {run}/tensorboard lies inside the tensorboard/ '
                                                         rf'folder of the run in {run}; pass --workdir={run} to go on '
                                                         'with that run, or a workdir outside that run.$'):
    workdirs.check_not_inside_a_run(str(run / 'tensorboard'), train_lib.RUN_SUBDIRECTORIES)
  os.symlink(run / 'tensorboard', tmp_path / 'events')
  for inside in (run / 'tensorboard' / 'deeper', run / 'checkpoints' / 'new', tmp_path / 'events' / 'x'):
    with pytest.raises(checkpoints.CheckpointError, match=rf'^--workdir {inside} lies inside the '
                                                           rf'(tensorboard|checkpoints)/ folder of the run in {run}; '
                                                           'pass a workdir outside that run.$'):
      workdirs.check_not_inside_a_run(str(inside), train_lib.RUN_SUBDIRECTORIES)
  # A run's other subfolders may hold runs of its own (a fine-tuning beside it); a folder named
  # tensorboard without a run above it is no run's, nor is one beside a config.json alone.
  (tmp_path / 'project').mkdir()
  (tmp_path / 'project' / 'config.json').write_text('{}')
  for fine in (run / 'finetune', tmp_path / 'tensorboard' / 'x', run, tmp_path / 'project' / 'checkpoints' / 'r'):
    workdirs.check_not_inside_a_run(str(fine), train_lib.RUN_SUBDIRECTORIES)
  with pytest.raises(checkpoints.CheckpointError, match='lies inside the tensorboard/ folder'):
    train_lib.train_and_evaluate(tiny_config(), str(run / 'tensorboard' / 'second'))
  assert sorted(os.listdir(run)) == ['config.json', 'metrics.jsonl', 'tensorboard']
  assert os.listdir(run / 'tensorboard') == []


def test_a_bn_sweeps_folder_is_refused_as_one_runs_workdir_before_anything_is_written(tmp_path):
  # train.py had trained among a sweep's tables and runs/, and the sweep then refused its own folder.
  sweep = tmp_path / 'sweep'
  for name in ('decay0.9_debias0', 'decay0.99_debias0', 'decay0.1_debias0', 'decay0.05_debias0'):
    (sweep / 'runs' / name).mkdir(parents=True)
    (sweep / 'runs' / name / 'config.json').write_text('{}')
    (sweep / 'runs' / name / 'metrics.jsonl').write_text('')
  (sweep / 'runs' / 'notes').mkdir()  # not a run: not named
  assert workdirs.sweep_runs(str(sweep)) == ['decay0.05_debias0', 'decay0.1_debias0', 'decay0.9_debias0',
                                             'decay0.99_debias0']
  os.symlink(sweep, tmp_path / 'link')
  os.symlink(sweep / 'runs', tmp_path / 'runs_link')  # a link to its runs/, under another name
  for workdir in (sweep, sweep / 'runs', tmp_path / 'link', tmp_path / 'runs_link'):
    # Not "pass one of its runs": trained on by hand, a run would no longer be the sweep's.
    with pytest.raises(checkpoints.CheckpointError, match=re.escape(
        f"--workdir {workdir} is a BN sweep's folder, not one run's; pass a workdir of its own (the sweep's command "
        'again goes on with its runs).')):
      train_lib.train_and_evaluate(tiny_config(), str(workdir))
  assert sorted(os.listdir(sweep)) == ['runs']
  # eval.py is pointed at one of its runs.
  first = sweep / 'runs' / 'decay0.05_debias0'
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(
      f"is a BN sweep's folder, not one run's: pass one of its runs, --workdir={first} (runs: decay0.05_debias0, "
      'decay0.1_debias0, ...).')):
    workdirs.check_not_a_sweep(str(tmp_path / 'runs_link'), evaluating=True)
  # One of its runs is a run's workdir (the sweep trains each there), and so is any other folder.
  for fine in (first, tmp_path / 'sweep2', tmp_path / 'runs'):
    workdirs.check_not_a_sweep(str(fine))
  assert workdirs.sweep_runs(str(tmp_path / 'missing')) == []
