"""The train/eval BatchNorm discrepancy of a checkpoint: moving, batch and recalibrated statistics."""

from __future__ import annotations

import functools
import itertools
from typing import Any, Iterable, Mapping, Optional

import jax
import ml_collections

from resnet_flax import device_input, eval_lib, model_builder, precise_bn, sharding, steps
from resnet_flax.layers.batch_norm import BATCH_STATS
from resnet_flax.progress import batch_progress

Variables = dict[str, Any]


def _batch_statistics_step(variables: Variables, batch: steps.Batch, *, model) -> dict[str, jax.Array]:
  """eval_step's sums, but normalizing with the batch's own statistics (train-mode BN)."""
  logits, _ = model.apply(variables, batch['image'], train=True, mutable=[BATCH_STATS])
  return steps.classification_sums(logits, batch)


def evaluate_with_batch_statistics(config: ml_collections.ConfigDict, variables: Variables, batch_size: int,
                                   num_classes: int, show_progress: bool = False) -> dict[str, float]:
  """Eval-split metrics when every BatchNorm uses the statistics of batches of `batch_size`.

  Statistics are over each whole batch (no ghost or per-device groups, not frozen); the
  last, partial batch is left out so every batch has the same size. With `show_progress`,
  process 0 prints how far it has come every 10 s.
  """
  bn_config = config.copy_and_resolve_references()
  with bn_config.unlocked():
    bn_config.batch_size = batch_size
    bn_config.bn.update(ghost_batch_size=None, cross_device='global', frozen=False)
  model = model_builder.build_model(bn_config, num_classes)
  # Not agreed_dataset: load_checkpoint agreed on this split; what fails here (the batch size) fails on every process.
  dataset = device_input.process_dataset(config, config.eval_split, batch_size,
                                         'a config.bn_report_batch_sizes entry')
  mesh = sharding.data_mesh()
  step = sharding.jit_over_batch(functools.partial(_batch_statistics_step, model=model), mesh)
  # The global batches that are full on every process: all processes take the same steps.
  full_steps = dataset.num_examples // (dataset.batch_size * dataset.process_count)
  if full_steps == 0:
    raise ValueError(f'config.bn_report_batch_sizes has {batch_size}, more than the {dataset.num_examples} examples '
                     f'of the {config.eval_split} split; use sizes up to {dataset.num_examples}.')
  full_batches = itertools.islice(dataset.eval_batches(), full_steps)
  progress = batch_progress(show_progress, f'eval with the statistics of batches of {batch_size}', full_steps,
                            batch_size)
  return eval_lib.metrics_over(step, sharding.replicate(variables, mesh),
                               device_input.dataset_batches(dataset, full_batches, mesh), progress)


def discrepancy_report(config: ml_collections.ConfigDict, workdir: Optional[str] = None,
                       checkpoint: Optional[str] = None, batch_sizes: Iterable[int] = (),
                       recalibration_batches: int = 0, show_progress: bool = False) -> dict[str, Any]:
  """Eval accuracy of one checkpoint with moving statistics, batch statistics and recalibrated ones.

  Returns {'step', 'moving': metrics, 'batch': {batch_size: metrics}, 'recalibrated': metrics
  or None}; metrics are {'top1', 'top5', 'loss', 'num_examples'}. With `show_progress`, each
  pass prints how far it has come every 10 s (process 0).
  """
  if recalibration_batches > 0:
    precise_bn.check_recalibration_possible(config)
  loaded = eval_lib.load_checkpoint(config, workdir, checkpoint)
  report = {'step': loaded.step, 'moving': loaded.evaluate(loaded.variables, show_progress=show_progress),
            'recalibrated': None,
            'batch': {int(size): evaluate_with_batch_statistics(config, loaded.variables, int(size),
                                                                loaded.num_classes, show_progress)
                      for size in batch_sizes}}
  if recalibration_batches > 0:
    recalibrated = loaded.recalibrated(config, recalibration_batches, show_progress=show_progress)
    report['recalibrated'] = loaded.evaluate(recalibrated, show_progress=show_progress)
  return report


def format_report(report: Mapping[str, Any]) -> str:
  """The report as a small markdown table, one row per way of getting the statistics."""
  rows = [('moving averages (eval mode)', report['moving'])]
  rows += [(f'batch statistics, batch {size}', metrics) for size, metrics in sorted(report['batch'].items())]
  if report['recalibrated'] is not None:
    rows.append(('recalibrated (precise BN)', report['recalibrated']))
  lines = [f'BatchNorm statistics at step {report["step"]}:', '', '| statistics | top-1 | loss | examples |',
           '|---|---|---|---|']
  lines += [f'| {name} | {100 * m["top1"]:.2f}% | {m["loss"]:.4f} | {m["num_examples"]} |' for name, m in rows]
  return '\n'.join(lines)
