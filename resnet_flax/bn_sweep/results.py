"""A sweep run's result.json: its settings and final BN numbers, or the step it diverged at.

Either kind has every key; a diverged run's final numbers are None (see `diverged`).
"""

from __future__ import annotations

from typing import Any

from resnet_flax.bn_sweep import grid


def diverged(result: dict[str, Any]) -> bool:
  """Whether a non-finite loss stopped the run: it has a curve but no final numbers."""
  return result.get('diverged_at_step') is not None


def _metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
  if metrics is None:
    return None
  return {'top1': float(metrics['top1']), 'loss': float(metrics['loss']), 'num_examples': int(metrics['num_examples'])}


def summarize(run: grid.Run, report: dict[str, Any], curve: list[dict[str, float]], recalibration_batches: int,
              seconds: float) -> dict[str, Any]:
  """A run's result.json: its settings, the discrepancy report at its batch size, the gap, its curve."""
  moving = _metrics(report['moving'])
  batch = _metrics(report['batch'][run.settings['batch_size']])
  return {
      'name': run.name,
      'settings': run.settings,
      'step': int(report['step']),
      'eval_split': run.config.eval_split,
      'moving': moving,
      'batch': batch,
      'recalibrated': _metrics(report['recalibrated']),
      'recalibration_batches': recalibration_batches,
      'gap': batch['top1'] - moving['top1'],  # batch-statistics top-1 minus moving-statistics top-1
      'diverged_at_step': None,
      'curve': curve,
      'seconds': seconds,  # this start's wall time: training left to do, evaluations, diagnostics
  }


def diverged_result(run: grid.Run, step: int, curve: list[dict[str, float]], recalibration_batches: int,
                    seconds: float) -> dict[str, Any]:
  """The result.json of a run a non-finite loss stopped at `step`: its curve before it, no final numbers.

  Non-finite steps come to light at the next log or save step, so an evaluation between
  the two would have scored the broken parameters; it is left out.
  """
  return {'name': run.name, 'settings': run.settings, 'step': None, 'eval_split': run.config.eval_split,
          'moving': None, 'batch': None, 'recalibrated': None, 'recalibration_batches': recalibration_batches,
          'gap': None, 'diverged_at_step': step, 'curve': [point for point in curve if point['step'] < step],
          'seconds': seconds}


def is_finished(result: dict[str, Any] | None, recalibration_batches: int) -> bool:
  """Whether a stored result answers this sweep: a diverged run always does; otherwise another
  recalibration count redoes only the diagnostics."""
  if result is None:
    return False
  return diverged(result) or result.get('recalibration_batches') == recalibration_batches
