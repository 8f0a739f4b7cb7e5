"""Precise BN (Wu & Johnson 2021): BatchNorm statistics recomputed as true population averages.

Moving averages weigh recent batches and lag the weights; recomputing the population
statistics with the final weights, as true averages over N training batches, removes
both effects before evaluation.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import sys
from typing import Any, Iterable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from resnet_flax import data, device_input, model_builder, sharding
from resnet_flax.layers.batch_norm import BATCH_MOMENTS, BATCH_STATS
from resnet_flax.progress import BatchProgress, batch_progress

Variables = dict[str, Any]


def _moments_step(variables: Variables, images: jax.Array, *, model) -> dict:
  """Every BatchNorm's per-group batch mean and biased variance, in train mode."""
  _, updates = model.apply(variables, images, train=True, mutable=[BATCH_STATS, BATCH_MOMENTS])
  return updates.get(BATCH_MOMENTS, {})


class _PopulationMoments:
  """Running sums, in float64, from which a population's exact mean and variance follow.

  Each group's moments weigh by its number of examples, so batches of unequal size (a short
  last one) still give the population's: its mean is the weighted mean of the group means,
  its variance the weighted mean group variance plus the weighted variance of the group
  means (the law of total variance), so no pass over the data is needed twice.
  """

  def __init__(self):
    self.weight = 0.0
    self.sums: dict[tuple[str, ...], list[np.ndarray]] = {}

  def add(self, moments: Mapping, examples: int) -> None:
    """One batch's per-group moments ({path: {'mean', 'variance'}}, (groups, C) each) of `examples` images."""
    flat = traverse_util.flatten_dict(moments)
    if not flat:
      return
    per_group = examples / next(iter(flat.values())).shape[0]  # every layer: the batch's groups
    for path in {p[:-1] for p in flat}:
      mean = np.asarray(flat[path + ('mean',)], np.float64)
      variance = np.asarray(flat[path + ('variance',)], np.float64)
      terms = [per_group * mean.sum(0), per_group * variance.sum(0), per_group * np.square(mean).sum(0)]
      self.sums[path] = terms if path not in self.sums else [a + b for a, b in zip(self.sums[path], terms)]
    self.weight += examples

  def statistics(self) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{BatchNorm module path: (population mean, population variance)}."""
    out = {}
    # A diverged run's moments are infinite, and inf - inf is NaN: the evaluation's non-finite
    # note says what that means, where numpy's RuntimeWarning named a line of this file.
    with np.errstate(invalid='ignore', over='ignore'):
      for path, (mean_sum, variance_sum, mean_square_sum) in self.sums.items():
        mean = mean_sum / self.weight
        variance = variance_sum / self.weight + np.maximum(mean_square_sum / self.weight - np.square(mean), 0.0)
        out[path] = (mean, variance)
    return out


def population_statistics(model: nn.Module, variables: Variables, image_batches: Iterable[Any],
                          mesh: Optional[Mesh] = None, progress: Optional[BatchProgress] = None
                          ) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
  """{BatchNorm path: (mean, variance)} over all images of `image_batches`, every BN at once.

  As precise BN does, every layer sees its input normalized with batch statistics (train
  mode), so all layers are measured in one pass. Batches may differ in size (each must still
  split over the devices, and into ghost batches where the model has them). `progress` says
  how far it has come.
  """
  mesh = mesh or sharding.data_mesh()
  moments_step = sharding.jit_over_batch(functools.partial(_moments_step, model=model), mesh)
  accumulator = _PopulationMoments()
  batch_sharding = sharding.batch_sharded(mesh)
  for done, images in enumerate(image_batches, 1):
    # Global batches from `device_input` are used as they are; anything else is this
    # process's host share.
    if not (isinstance(images, jax.Array) and images.sharding.is_equivalent_to(batch_sharding, images.ndim)):
      sharding.check_batch_size(len(images) * jax.process_count(), f'recalibration batch {done}\'s size')
      images = sharding.to_global_batch({'image': np.asarray(images)}, mesh)['image']
    accumulator.add(jax.device_get(moments_step(variables, images)), images.shape[0])
    if progress is not None and progress.due():
      progress.show(done)
  if not accumulator.sums:
    raise ValueError('recalibration saw no batch statistics: give it at least one batch, and a model whose '
                     'BatchNorm computes them in train mode (not config.bn.frozen).')
  return accumulator.statistics()


def with_statistics(variables: Variables, statistics: Mapping[tuple[str, ...], tuple[np.ndarray, np.ndarray]]
                    ) -> Variables:
  """`variables` with each BatchNorm's moving mean and variance replaced (other state kept)."""
  stats = traverse_util.flatten_dict(jax.device_get(variables[BATCH_STATS]))
  for path, (mean, variance) in statistics.items():
    stats[path + ('moving_mean',)] = mean.astype(np.float32)
    stats[path + ('moving_variance',)] = variance.astype(np.float32)
  return {**variables, BATCH_STATS: traverse_util.unflatten_dict(stats)}


def check_recalibration_possible(config: ml_collections.ConfigDict) -> None:
  """Refuses, before any pass over the data, a recalibration that frozen BatchNorm layers would
  give no batch statistics to, whose batch does not split over the devices, or whose statistics
  groups (as training's) would hold one example."""
  if config.bn.frozen:
    raise ValueError('config.bn_recalibration_batches recomputes the BatchNorm statistics from batch statistics, '
                     'which config.bn.frozen=True turns off; leave --config.bn.frozen out for eval.py (it changes '
                     'training only: a frozen run evaluates the same without it).')
  sharding.check_batch_size(config.batch_size)  # before the groups: a batch that does not split has none
  # A group of one normalizes each example by itself: its statistics are no batch's.
  setting = model_builder.single_example_groups(config, jax.device_count())
  if setting is not None:
    # Worded for eval.py: training's advice (config.bn.frozen=True) is refused here.
    raise ValueError(f'{setting} leaves one example per BatchNorm statistics group to recalibrate on: each example '
                     'normalized by itself, which no batch is; use at least 2 examples per group.')


def recalibrate(config: ml_collections.ConfigDict, model: nn.Module, variables: Variables, num_batches: int,
                mesh: Optional[Mesh] = None, show_progress: bool = False) -> Variables:
  """Precise BN: population statistics of `num_batches` training batches of `config.batch_size`,
  taken in `model`'s train-mode statistics groups (build it as training does:
  `model_builder.build_model(config, ...)`); with `show_progress`, process 0 prints how far it
  has come every 10 s."""
  if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or num_batches < 1:
    # None or -1 would take every batch of an endless stream: a hang.
    raise ValueError(f'num_batches={num_batches!r}: give a positive number of training batches to recalibrate on '
                     '(config.bn_recalibration_batches).')
  dataset = device_input.agreed_dataset(config, 'train', config.batch_size)
  repeated = repeated_examples_note(num_batches, config.batch_size, dataset.num_examples)
  if repeated and jax.process_index() == 0:
    print(f'warning: {repeated}', file=sys.stderr)
  mesh = mesh or sharding.data_mesh()
  batches = device_input.dataset_batches(dataset, _first(dataset.train_batches(0), num_batches), mesh)
  try:
    progress = batch_progress(show_progress, 'recalibrating BN', num_batches, config.batch_size)
    statistics = population_statistics(model, variables, (batch['image'] for batch in batches), mesh, progress)
  finally:
    batches.close()
  return with_statistics(variables, statistics)


def repeated_examples_note(num_batches: int, batch_size: int, num_examples: int) -> Optional[str]:
  """Why `num_batches` batches of `batch_size` count some of `num_examples` training examples more
  than once in the population statistics, and the fix; None where they count each at most once.

  The batches wrap around the data (a batch larger than it holds some examples twice), so the
  statistics are no longer the training set's.
  """
  total = num_batches * batch_size
  if total <= num_examples:
    return None
  # Named by what they are, not by config field: the BN sweep sets them through config.sweep.*.
  fix = (f'recalibrate on at most {num_examples // batch_size} batch(es) of {batch_size}'
         if batch_size <= num_examples else f'recalibrate on batches of at most {num_examples // num_batches:,}')
  return (f'precise BN reads {num_batches} batches of {batch_size} = {total:,} examples, more than the '
          f'{num_examples:,} training examples, so some count more than once in its statistics; {fix}.')


def _first(batches: Iterator[data.Batch], count: int) -> Iterator[data.Batch]:
  """The first `count` of `batches`, closing them after, in the thread that runs them.

  The prefetch thread runs this generator; closing `batches` from the main thread while it
  does raised 'generator already executing' in place of the error that stopped the loop.
  """
  try:
    yield from itertools.islice(batches, count)
  finally:
    batches.close()
