"""Random images and labels of fixed shapes at almost no cost per batch, for benchmarks.

One batch of images is drawn from the seed once and handed out for every step (read-only,
never copied), so the input pipeline costs nothing next to the model. As photos do, the
images travel as uint8 pixels and become float32 values in [-1, 1] on the device, so a
throughput measured on them includes the host-to-device copy real training pays. Labels
are drawn per example from the seed; images and labels are unrelated, so there is
nothing to learn. Every split holds the same examples: the names are those of the other
sources, so a config's `eval_split` means the same whichever data set it names.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from resnet_flax.data.errors import DataError
from resnet_flax.data.inception_preprocessing import signed_pixel_values
from resnet_flax.data.pipeline import Loaded, Pending, Source

SPLITS = ('train', 'test', 'validation')


@dataclasses.dataclass(frozen=True)
class ConstantLoader:
  """Returns the same (batch_size, H, W, C) images whatever the indices."""
  images: np.ndarray

  def start_train(self, indices: np.ndarray, rng: np.random.Generator) -> Pending:
    return lambda: Loaded(self.images)

  def start_eval(self, indices: np.ndarray) -> Pending:
    return lambda: Loaded(self.images)


def build_source(split: str, *, image_size: int, channels: int = 3, num_classes: int, num_examples: int,
                 batch_size: int, seed: int) -> Source:
  """A synthetic `split` of `num_examples` examples; images are uniform uint8 pixels."""
  if split not in SPLITS:  # A typo in eval_split had evaluated the training examples without a word.
    raise DataError(f'synthetic has no split {split!r}; use one of {sorted(SPLITS)}.')
  if min(image_size, channels, num_classes, num_examples) < 1:
    raise DataError(f'synthetic data needs positive image_size, channels, num_classes and num_examples, got '
                    f'{image_size}, {channels}, {num_classes}, {num_examples}.')
  if num_classes < 2:  # One class trains to loss 0 and top-1 1.0: a benchmark of nothing that looks like success.
    raise DataError(f'synthetic data has num_classes={num_classes}, but training a classifier needs at least 2 '
                    f'classes; set config.data.num_classes to 2 or more.')
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, image_size, image_size, channels), np.uint8)
  images.flags.writeable = False
  labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  return Source(labels=labels, num_classes=num_classes, image_shape=(image_size, image_size, channels),
                loader=ConstantLoader(images), name='synthetic', image_dtype=np.uint8,
                model_input=signed_pixel_values)
