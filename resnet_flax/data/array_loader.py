"""A `Loader` over images held in memory, preprocessed a whole batch at a time."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from resnet_flax.data.pipeline import Loaded, Pending


@dataclasses.dataclass(frozen=True)
class ArrayLoader:
  """Gathers `images[indices]` and applies the train or eval transform to the batch.

  Loads are lazy: the work happens when the pending load is waited on, in the caller's thread.
  """
  images: np.ndarray
  train_transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
  eval_transform: Callable[[np.ndarray], np.ndarray]

  def start_train(self, indices: np.ndarray, rng: np.random.Generator) -> Pending:
    return lambda: Loaded(self.train_transform(self.images[indices], rng))

  def start_eval(self, indices: np.ndarray) -> Pending:
    return lambda: Loaded(self.eval_transform(self.images[indices]))
