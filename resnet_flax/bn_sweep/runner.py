"""Trains each unfinished run in WORKDIR/runs/<name>/ and records its BN discrepancy numbers
(or the step at which it diverged).

A run is finished when its result.json exists, written last and atomically. An interrupted
sweep started again skips finished runs; a half-done run resumes from its own checkpoints
(train_and_evaluate's resume), and a trained run without result.json only evaluates.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import ml_collections

from resnet_flax import atomic_files, bn_diagnostics, metrics_writer, train_lib, workdirs
from resnet_flax.bn_sweep import grid, results as results_lib

# Fields that change how a run is logged or saved, not what it computes: a run may resume
# under different values of these.
_BOOKKEEPING = frozenset({'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                          'async_checkpointing'})


def run_directory(workdir: str, name: str) -> str:
  """WORKDIR/runs/<name>: the run's checkpoints, metrics.jsonl, config.json and result.json."""
  return os.path.join(workdir, workdirs.SWEEP_RUNS, name)


def check_same_config(directory: str, config: ml_collections.ConfigDict) -> None:
  """A run that has started before (its config.json, which train_and_evaluate records at a
  fresh start, and at a resumed one's first save) must train the same way now.

  Otherwise the table would silently mix checkpoints of two configs under one name (a
  rerun with, say, another --config.learning_rate into the same workdir). Fields only one
  side has (a field added to the code since, the recorded device count) are not compared.
  """
  stored = metrics_writer.recorded_config(directory)
  if stored is None:
    return
  current = metrics_writer.as_recorded(config.to_dict())
  changed = sorted(key for key in stored.keys() & (current.keys() - _BOOKKEEPING)
                   if stored[key] != current[key] and not key.startswith(metrics_writer.CHANGING_NO_RESULT))
  if changed:
    key = changed[0]
    raise ValueError(f'{directory} was trained with {key}={stored[key]!r}, this sweep has '
                     f'{current[key]!r}; use another --workdir or delete that run directory.')


def eval_curve(directory: str) -> list[dict[str, float]]:
  """{'step', 'top1', 'loss'} of every evaluation in the run's metrics.jsonl, by step.

  A run resumed from an earlier checkpoint logs some steps again: the last record of a step
  wins. A line cut short by a kill is skipped.
  """
  by_step = {int(record['step']): {'step': int(record['step']), 'top1': record['eval/top1'],
                                   'loss': record['eval/loss']}
             for record in metrics_writer.read_records(directory) if 'eval/top1' in record}
  return [by_step[step] for step in sorted(by_step)]


class Preempted(Exception):
  """SIGTERM or Ctrl-C stopped a run after saving its step: the sweep stops too, the run has
  no result.json, and the same command resumes it."""


def run_one(run: grid.Run, workdir: str, recalibration_batches: int) -> dict[str, Any]:
  """Trains (or resumes) one run, measures its BN discrepancy and writes its result.json.

  Raises Preempted if a signal stopped the training: before its last step the run keeps no
  result.json (the same command resumes it); at its last step it is recorded first.
  """
  directory = run_directory(workdir, run.name)
  os.makedirs(directory, exist_ok=True)
  check_same_config(directory, run.config)
  start = time.perf_counter()
  trained: dict[str, Any] = {}
  try:
    trained = train_lib.train_and_evaluate(run.config, directory)
    if trained.get('preempted') and trained['step'] < run.config.num_train_steps:
      raise Preempted(f"{run.name} stopped at step {trained['step']} of {run.config.num_train_steps} (saved); "
                      'rerun the same command to resume the sweep.')
  except train_lib.NonFiniteLossError as error:
    # A setting that diverges is a finding of the sweep, not a reason to stop it. It is
    # recorded like a finished run: started again, the same config diverges the same way.
    result = results_lib.diverged_result(run, error.step, eval_curve(directory), recalibration_batches,
                                         time.perf_counter() - start)
  else:
    report = bn_diagnostics.discrepancy_report(run.config, workdir=directory,
                                               batch_sizes=(run.settings['batch_size'],),
                                               recalibration_batches=recalibration_batches)
    result = results_lib.summarize(run, report, eval_curve(directory), recalibration_batches,
                                   time.perf_counter() - start)
  atomic_files.write_json(os.path.join(directory, 'result.json'), result)
  if trained.get('preempted'):  # at its last step: the run is whole, the sweep stops
    raise Preempted(f'{run.name} finished, then a signal stopped the sweep; rerun the same command to go on.')
  return result


def run_all(runs: list[grid.Run], workdir: str, recalibration_batches: int,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """The result of every run, in grid order; unfinished runs are run first. A run trained
  before with another config is refused before any run trains: found at its turn, it had let
  the runs before it train under the new config, a workdir of two configs."""
  for run in runs:
    check_same_config(run_directory(workdir, run.name), run.config)
  results = []
  for index, run in enumerate(runs, 1):
    directory = run_directory(workdir, run.name)
    result = atomic_files.read_json(os.path.join(directory, 'result.json'))
    if results_lib.is_finished(result, recalibration_batches):
      log(f'[{index}/{len(runs)}] {run.name}: finished before, skipped.')
    else:
      log(f'[{index}/{len(runs)}] {run.name}: running in {directory}')
      result = run_one(run, workdir, recalibration_batches)
      if results_lib.diverged(result):
        log(f"[{index}/{len(runs)}] {run.name}: diverged at step {result['diverged_at_step']} (non-finite loss), "
            f'recorded; delete {directory} to run it again.')
      else:
        # In percent and points, as results.md gives them.
        log(f"[{index}/{len(runs)}] {run.name}: top-1 {100 * result['moving']['top1']:.2f}% with moving statistics, "
            f"gap {100 * result['gap']:+.2f} points, {result['seconds']:.1f} s")
    results.append(result)
  return results
