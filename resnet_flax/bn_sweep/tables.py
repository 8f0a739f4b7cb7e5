"""The sweep's tables: results.csv (a row per run), curves.csv (a row per run and evaluation), results.md."""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Sequence

from resnet_flax import atomic_files
from resnet_flax.bn_sweep import grid, results as results_lib

RESULT_COLUMNS = ('name',) + grid.SETTINGS + (
    'step', 'diverged_at_step', 'moving_top1', 'moving_loss', 'batch_top1', 'batch_loss', 'recalibrated_top1',
    'recalibrated_loss', 'gap', 'recalibration_batches', 'num_examples', 'batch_num_examples', 'seconds')
CURVE_COLUMNS = ('name',) + grid.SETTINGS + ('step', 'eval_top1', 'eval_loss')


def _blank_if_none(value: Any) -> Any:
  return '' if value is None else value


def result_row(result: dict[str, Any]) -> dict[str, Any]:
  """One run's final numbers; cells are empty where there are none (no recalibration, a diverged run)."""
  moving, batch, recalibrated = (result[key] or {} for key in ('moving', 'batch', 'recalibrated'))
  return {
      'name': result['name'], **result['settings'], 'step': _blank_if_none(result['step']),
      'diverged_at_step': _blank_if_none(result.get('diverged_at_step')),
      'moving_top1': moving.get('top1', ''), 'moving_loss': moving.get('loss', ''),
      'batch_top1': batch.get('top1', ''), 'batch_loss': batch.get('loss', ''),
      'recalibrated_top1': recalibrated.get('top1', ''), 'recalibrated_loss': recalibrated.get('loss', ''),
      'gap': _blank_if_none(result['gap']), 'recalibration_batches': result['recalibration_batches'],
      # Batch statistics leave out the last, partial batch: fewer examples than the others.
      'num_examples': moving.get('num_examples', ''), 'batch_num_examples': batch.get('num_examples', ''),
      'seconds': result['seconds'],
  }


def curve_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per evaluation during training (moving statistics), for accuracy-vs-step curves."""
  return [{'name': result['name'], **result['settings'], 'step': point['step'], 'eval_top1': point['top1'],
           'eval_loss': point['loss']} for point in result['curve']]


def csv_text(columns: Sequence[str], rows: list[dict[str, Any]]) -> str:
  """CSV with a header line; floats at full precision."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return buffer.getvalue()


def _percent(metrics: dict[str, Any] | None) -> str:
  if metrics is None:
    return '—'
  # Such an accuracy means nothing (eval_lib.nonfinite_note); the table must not pass it as a result.
  # result.json stores NaN and infinities as null.
  finite = metrics['loss'] is not None and math.isfinite(metrics['loss'])
  return f"{100 * metrics['top1']:.2f}%{'' if finite else ' (loss not finite)'}"


def markdown_table(results: list[dict[str, Any]]) -> str:
  """The final top-1 of each run three ways, and the gap, under one line saying what they are."""
  first = results[0]
  evaluated = next((f" ({result['moving']['num_examples']} examples)" for result in results if result['moving']), '')
  recalibration = (f"after precise-BN recalibration on {first['recalibration_batches']} training batches"
                   if first['recalibration_batches'] else 'no recalibration (recalibration_batches=0)')
  lines = [
      f"Final {first['eval_split']} top-1{evaluated} with moving statistics "
      f"(eval mode), with batch statistics (train-mode BN over batches of the run's batch size, whole ones only: "
      f"up to a batch fewer examples, results.csv's batch_num_examples), {recalibration}; "
      'gap = batch − moving, in percentage points. A diverged run (non-finite loss) has no final numbers; '
      'an accuracy marked "loss not finite" means nothing.',
      '',
      '| decay | zero-debias | batch size | steps | moving stats | batch stats | recalibrated | gap |',
      '|---:|:---:|---:|---:|---:|---:|---:|---:|',
  ]
  for result in results:
    settings = result['settings']
    if results_lib.diverged(result):
      numbers = f"diverged at step {result['diverged_at_step']} | — | — | —"
    else:
      numbers = (f"{_percent(result['moving'])} | {_percent(result['batch'])} | {_percent(result['recalibrated'])} "
                 f"| {100 * result['gap']:+.2f}")
    lines.append(f"| {settings['decay']} | {'yes' if settings['zero_debias_moving_mean'] else 'no'} "
                 f"| {settings['batch_size']} | {settings['num_train_steps']} | {numbers} |")
  return '\n'.join(lines) + '\n'


def write_tables(results: list[dict[str, Any]], workdir: str) -> list[str]:
  """Writes results.csv, curves.csv and results.md into `workdir`; returns their paths."""
  contents = {
      'results.csv': csv_text(RESULT_COLUMNS, [result_row(result) for result in results]),
      'curves.csv': csv_text(CURVE_COLUMNS, [row for result in results for row in curve_rows(result)]),
      'results.md': markdown_table(results),
  }
  paths = []
  for name, text in contents.items():
    paths.append(os.path.join(workdir, name))
    atomic_files.write_text(paths[-1], text)
  return paths
