"""Batch-norm sweeps: a grid of training runs, their train/eval BN discrepancy, tables and plots.

`python -m resnet_flax.bn_sweep --config=configs/bn_sweep.py --workdir=DIR`, or `run_sweep`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from resnet_flax import eval_lib, train_lib, workdirs
from resnet_flax.bn_sweep import grid, plots, runner, tables


def check_run(run: grid.Run) -> None:
  """train_and_evaluate's checks of a run's config, with the run named: a grid point may break them alone."""
  try:
    train_lib.check_training_config(run.config)
  except ValueError as error:
    raise ValueError(f'sweep run {run.name}: {error}') from error


def check_batch_sizes(runs: list[grid.Run], config: ml_collections.ConfigDict) -> None:
  """Refuses grid batch sizes above the eval split's size: each run's batch statistics are
  measured on that split in batches of its own size, after its training."""
  examples = eval_lib.build_eval_dataset(config).num_examples
  too_big = sorted({run.settings['batch_size'] for run in runs if run.settings['batch_size'] > examples})
  if too_big:
    raise ValueError(f'config.sweep.batch_size has {too_big}, more than the {examples} examples of the '
                     f'{config.eval_split} split on which each run\'s batch statistics are measured at its batch '
                     f'size; use sizes up to {examples}.')


def run_sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every unfinished run of `config.sweep`'s grid, then writes tables and plots of them all;
  returns their results ([] when a signal stopped it: the same command resumes)."""
  workdir = os.fspath(workdir)  # a pathlib path too
  if not workdir.strip():
    raise ValueError('--workdir is empty; pass a directory.')
  runs = grid.expand(config)
  for run in runs:  # every run's settings, before the first one trains
    check_run(run)
  check_batch_sizes(runs, config)
  # Each run checks this too, but only once the sweep has made its folder.
  workdirs.check_not_inside_a_run(workdir, train_lib.RUN_SUBDIRECTORIES, for_a_run=False)
  sweep = workdirs.sweep_of(workdir)
  if sweep is not None and sweep not in (os.path.abspath(workdir), os.path.realpath(workdir)):
    raise ValueError(f'--workdir {workdir} is the runs/ folder of the sweep in {sweep}; pass --workdir={sweep} to go '
                     'on with that sweep, or a folder of its own.')
  if workdirs.is_run(workdir):  # its tables and runs/ had been written among that run's files
    raise ValueError(f'--workdir {workdir} holds a training run (its config.json and metrics.jsonl); a sweep writes '
                     'its runs under runs/ beside its tables: pass a workdir of its own.')
  workdirs.check_workdir(workdir, needed_bytes=0)  # each run checks its own room when it starts
  plots.require_matplotlib()
  try:
    results = runner.run_all(runs, workdir, config.sweep.recalibration_batches, log)
  except runner.Preempted as stopped:  # the tables wait for every run
    log(f'Preempted: {stopped}')
    return []
  for path in tables.write_tables(results, workdir) + plots.write_plots(results, workdir):
    log(f'wrote {path}')
  return results
