"""A `--workdir` checked before a run writes to it: writable with room for the checkpoints, and
a workdir at all, not a checkpoint or a BN sweep's folder passed in its place."""

from __future__ import annotations

import os
import re
import shutil
import socket
from typing import Optional

from resnet_flax import checkpoints
from resnet_flax.checkpoints import CheckpointError


def _size(num_bytes: int) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if num_bytes >= scale:
      value = num_bytes / scale
      return f'{value:.1f} {unit}' if value < 10 else f'{value:.0f} {unit}'
  return f'{num_bytes} bytes'


def check_workdir(workdir: str, needed_bytes: int, subdirectories: tuple[str, ...] = ()) -> None:
  """Fails now, not hours in, if `workdir` (or a `subdirectories` entry in it) cannot be written
  or lacks room for the checkpoints."""
  checkpoints.local_path(workdir, 'workdir')
  for path in (workdir, *(os.path.join(workdir, name) for name in subdirectories)):
    if os.path.exists(path) and not os.path.isdir(path):
      raise CheckpointError(f'{path} is a file, not a directory; move it or pass another --workdir.')
  try:
    os.makedirs(workdir, exist_ok=True)
    # Every process of a multi-host run probes the same shared directory.
    probe = os.path.join(workdir, f'.write_probe_{socket.gethostname()}_{os.getpid()}')
    with open(probe, 'wb') as file:
      file.write(b'0' * 4096)
      file.flush()
      os.fsync(file.fileno())
    os.remove(probe)
  except OSError as error:
    raise CheckpointError(f'workdir {workdir} is not writable ({error.strerror or error}); '
                          'pass a --workdir you can write to.') from error
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise CheckpointError(f'workdir {workdir} has {_size(free)} free but the checkpoints need about '
                          f'{_size(needed_bytes)} more; free disk space or lower config.keep_checkpoints.')


def check_not_a_checkpoint(workdir: str) -> None:
  """Refuses a workdir that is a checkpoint, or a workdir's `checkpoints/` folder: a run
  started there would write a run of its own inside the saved one (whose next start then
  sets that checkpoint aside as damaged), and an evaluation would find nothing."""
  path = checkpoints.step_of(workdir)
  newest = checkpoints.latest_step_in(path)
  if checkpoints.is_checkpoint(path):
    what, checkpoint = 'a checkpoint', path
  elif newest is not None and checkpoints.is_checkpoint(os.path.join(path, str(newest))):
    what, checkpoint = "a workdir's checkpoints/ folder", os.path.join(path, str(newest))
  else:
    return
  # Only a step of a workdir's checkpoints/ has a workdir above it (not a converted `variables`).
  run = checkpoints.run_workdir_of(checkpoint)
  workdir_hint = (f'pass --workdir={run} (train.py resumes it, eval.py takes its newest checkpoint), or '
                  if run is not None else '')
  raise CheckpointError(f'--workdir {os.path.abspath(workdir)} is {what}, not a workdir: {workdir_hint}name the '
                        f'checkpoint itself: eval.py --checkpoint={checkpoint}, train.py '
                        f'--config.init_checkpoint={checkpoint}.')


# A BN sweep's folder holds its runs in this subfolder, one folder each, beside its tables.
SWEEP_RUNS = 'runs'
# The numbers in a run's name (decay0.99_zd1), which order its runs by value.
_NUMBER = re.compile(r'(\d+(?:\.\d+)?)')


def is_run(directory: str) -> bool:
  """Whether `directory` holds a training run: the config.json and metrics.jsonl it writes at its start."""
  return all(os.path.isfile(os.path.join(directory, name)) for name in ('config.json', 'metrics.jsonl'))


def check_not_inside_a_run(workdir: str, run_subdirectories: tuple[str, ...], for_a_run: bool = True) -> None:
  """Refuses a workdir inside another run's own folders (`<run>/tensorboard/...`, a run being a
  directory with the config.json and metrics.jsonl a training run writes at its start): its files
  would mix with that run's, and TensorBoard pointed at the run would show both as one.
  `for_a_run`: the workdir is one run's (train.py's, not a sweep's), so the run's own folder may be the one meant."""
  resolved = os.path.realpath(workdir)  # a link into a run's folder is inside it too
  child, parent = resolved, os.path.dirname(resolved)
  while parent != child:
    if os.path.basename(child) in run_subdirectories and is_run(parent):
      # The run's folder itself was most likely meant for the run.
      resume = f'--workdir={parent} to go on with that run, or ' if for_a_run and child == resolved else ''
      raise CheckpointError(f'--workdir {os.path.abspath(workdir)} lies inside the {os.path.basename(child)}/ '
                            f'folder of the run in {parent}; pass {resume}a workdir outside that run.')
    child, parent = parent, os.path.dirname(parent)


def sweep_runs(directory: str) -> list[str]:
  """The names of the runs in `directory` if it is a BN sweep's folder (a `runs/` folder holding
  training runs), numbers in them in numeric order (decay0.05, 0.1, 0.9, 0.99); [] for any other folder."""
  runs = os.path.join(directory, SWEEP_RUNS)
  try:
    names = sorted(os.listdir(runs), key=lambda name: [float(part) if index % 2 else part  # odd: the numbers
                                                       for index, part in enumerate(_NUMBER.split(name))])
  except OSError:  # no runs/ folder, or not a directory
    return []
  return [name for name in names if is_run(os.path.join(runs, name))]


def sweep_of(workdir: str) -> Optional[str]:
  """The BN sweep's folder that `workdir` is, or whose `runs/` it is (by its path or through
  links); None for any other."""
  for path in dict.fromkeys((os.path.abspath(workdir), os.path.realpath(workdir))):
    sweep = os.path.dirname(path) if os.path.basename(path) == SWEEP_RUNS else path
    if sweep_runs(sweep):
      return sweep
  return None


def check_not_a_sweep(workdir: str, evaluating: bool = False) -> None:
  """Refuses a BN sweep's folder, or its `runs/`, as one run's workdir: a run there would mix its
  files with the sweep's tables and runs (and the sweep would then refuse its own folder).
  `evaluating`: eval.py's, which is pointed at one of the runs."""
  sweep = sweep_of(workdir)
  if sweep is None:
    return
  what = f'--workdir {os.path.abspath(workdir)} is a BN sweep\'s folder, not one run\'s'
  if not evaluating:  # not one of its runs: trained on by hand, it would no longer be the sweep's
    raise CheckpointError(f'{what}; pass a workdir of its own (the sweep\'s command again goes on with its runs).')
  names = sweep_runs(sweep)
  shown = ', '.join(names[:2]) + (', ...' if len(names) > 2 else '')
  raise CheckpointError(f'{what}: pass one of its runs, --workdir={os.path.join(sweep, SWEEP_RUNS, names[0])} '
                        f'(runs: {shown}).')
