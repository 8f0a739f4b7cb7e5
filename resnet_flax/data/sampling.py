"""Which examples go into the batch at a step: epoch-wise shuffling, process sharding, padding.

Everything here is a pure function of (seed, step, process_index, process_count), which is
what makes resuming exact: the batch at step s never depends on the batches before it.

The training stream is the concatenation of one permutation per epoch. The global batch at
step s covers stream positions [s * G, (s + 1) * G) with G = batch_size * process_count, and
process p takes the p-th contiguous slice of it. No example is dropped at an epoch's end: a
batch may straddle two epochs, exactly as `repeat().batch()` would.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# Distinct first words of the seed sequences keep the shuffle and augmentation streams
# independent even when their other words coincide.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def epoch_permutation(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples."""
  return np.random.default_rng([_SHUFFLE_STREAM, seed, epoch]).permutation(num_examples)


def augment_rng(seed: int, step: int, process_index: int) -> np.random.Generator:
  """The random stream for the augmentations of one process's batch at `step`."""
  return np.random.default_rng([_AUGMENT_STREAM, seed, step, process_index])


def shard_positions(step: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """Stream positions of this process's slice of the global batch at `step`."""
  start = (step * process_count + process_index) * batch_size
  return np.arange(start, start + batch_size, dtype=np.int64)


def train_indices(positions: np.ndarray, num_examples: int,
                  permutation: Callable[[int], np.ndarray]) -> np.ndarray:
  """Example indices at training-stream `positions`; `permutation(epoch)` orders one epoch."""
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    indices[in_epoch] = permutation(int(epoch))[offsets[in_epoch]]
  return indices


def num_eval_steps(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches in one evaluation pass; the same on every process, as collectives need."""
  return math.ceil(num_examples / (batch_size * process_count))


def eval_indices(positions: np.ndarray, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """Example indices at evaluation `positions` (in order) and the mask of real ones.

  Positions past the end are padding: they repeat example 0 so that shapes stay static and
  their mask is 0.
  """
  real = positions < num_examples
  return np.where(real, positions, 0), real.astype(np.float32)
