"""Random images and labels of fixed shapes at almost no cost per batch, for benchmarks.

One batch of images is drawn from the seed once and handed out for every step (read-only,
never copied), so the input pipeline costs nothing next to the model. Labels are drawn per
example from the seed; images and labels are unrelated, so there is nothing to learn.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from resnet_flax.data.errors import DataError
from resnet_flax.data.pipeline import Loaded, Pending, Source


@dataclasses.dataclass(frozen=True)
class ConstantLoader:
  """Returns the same (batch_size, H, W, C) images whatever the indices."""
  images: np.ndarray

  def start_train(self, indices: np.ndarray, rng: np.random.Generator) -> Pending:
    return lambda: Loaded(self.images)

  def start_eval(self, indices: np.ndarray) -> Pending:
    return lambda: Loaded(self.images)


def build_source(*, image_size: int, channels: int = 3, num_classes: int, num_examples: int,
                 batch_size: int, seed: int) -> Source:
  """A synthetic split of `num_examples` examples; images are standard normal float32."""
  if min(image_size, channels, num_classes, num_examples) < 1:
    raise DataError(f'synthetic data needs positive image_size, channels, num_classes and num_examples, got '
                    f'{image_size}, {channels}, {num_classes}, {num_examples}.')
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, image_size, image_size, channels), np.float32)
  images.flags.writeable = False
  labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  return Source(labels=labels, num_classes=num_classes, image_shape=(image_size, image_size, channels),
                loader=ConstantLoader(images), name='synthetic')
