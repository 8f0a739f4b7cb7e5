"""A data set split as a stream of fixed-shape batches: `Source` in, `Dataset` out.

A `Source` says what the examples are (labels, shapes, a `Loader` that turns indices into
images, and `model_input`, what maps those images to the model's float32 input); `Dataset`
decides which indices form each batch (see `sampling`) and keeps one batch in flight so
that a loader with worker threads decodes batch s + 1 while batch s is handed out.

Photos (unless a preprocessing's values are random per image, as inception's color
distortion) and synthetic images travel as uint8 pixels and become float32 on the device
(`model_input`, applied by `resnet_flax.device_input`): a quarter of the bytes to copy,
and no float work on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import numbers
import warnings
from collections import deque
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol

import numpy as np

from resnet_flax.data import sampling
from resnet_flax.data.errors import DataError, one_line

Batch = dict[str, np.ndarray]
# Where skipped-file warnings say they come from: a name in <> that linecache never reads, so a
# warning is one line, without a source line of the pipeline that says nothing about the file.
_SKIP_ORIGIN = '<resnet_flax.data>'
# Each skipped file is warned once, as `warnings.warn` does for one call site under the default filter.
_skip_registry: dict[Any, Any] = {}


class SkippedImageWarning(UserWarning):
  """An unreadable image file was skipped (config.data.on_bad_image='skip'): mask 0, and in training
  batches a copy of a readable batch mate in its slot."""


class Loaded(NamedTuple):
  """Images for a list of indices, which of them could be read (None: all of them), and the problems of the others."""
  images: np.ndarray
  readable: Optional[np.ndarray] = None
  problems: tuple[str, ...] = ()

  @classmethod
  def with_problems(cls, images: np.ndarray, problems: list[Optional[str]]) -> Loaded:
    """`images` whose slots with a problem (a skipped file) are unreadable; each problem is warned."""
    found = tuple(filter(None, problems))
    for problem in found:
      warnings.warn_explicit(f'skipped, left out of its batch: {one_line(problem)}', SkippedImageWarning,
                             _SKIP_ORIGIN, 0, module=__name__, registry=_skip_registry)
    return cls(images, np.array([problem is None for problem in problems]), found)


# A pending load: calling it waits for (or computes) the images. A pass left early (a closed
# iterator) drops the one it started uncalled: a loader holding resources for it frees them then.
Pending = Callable[[], Loaded]


def as_model_input(images: Any) -> Any:
  """The identity: for loaders whose images are already the model's float32 input."""
  return images


def _skipped_filled(loaded: Loaded, name: str, step: int) -> Loaded:
  """`loaded` with each skipped slot holding a copy of a readable image of the batch (its mask stays 0).

  Train-mode batch norm takes its statistics over every slot, masked or not: a zero image
  (minus the channel mean after VGG preprocessing) would pull them off, a batch mate's copy
  keeps them those of real images. A batch with no readable image is a DataError naming
  the files: a whole batch of unreadable files means the data, not a few files, is bad.
  """
  if loaded.readable is None or loaded.readable.all():
    return loaded
  if not loaded.readable.any():
    first = one_line(loaded.problems[0]).rstrip('.')
    raise DataError(f'{name}: no readable image in the training batch of step {step}: all {len(loaded.problems)} '
                    f'of its files were skipped (the first: {first}); on_bad_image="skip" is for a few bad files: '
                    'check the images under config.data.dir.')
  readable, skipped = np.flatnonzero(loaded.readable), np.flatnonzero(~loaded.readable)
  images = np.array(loaded.images)  # a copy: loaders may hand out read-only or reused arrays
  images[skipped] = images[readable[np.arange(len(skipped)) % len(readable)]]
  return loaded._replace(images=images)


class Loader(Protocol):
  """Turns example indices into images of the source's `image_shape` and `image_dtype`."""

  def start_train(self, indices: np.ndarray, rng: np.random.Generator) -> Pending:
    """Starts loading with training-time (random) preprocessing drawn from `rng`."""

  def start_eval(self, indices: np.ndarray) -> Pending:
    """Starts loading with deterministic evaluation preprocessing."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a data set: `labels[i]` is the label of example i.

  The loader's images have `image_dtype`; `model_input(images)` (numpy or jax arrays,
  elementwise, no randomness) turns them into what the model sees: float32 images are
  the model's input as they are, uint8 pixels get the preprocessing's value mapping.
  """
  labels: np.ndarray
  num_classes: int
  image_shape: tuple[int, int, int]
  loader: Loader
  name: str
  image_dtype: Any = np.float32
  model_input: Callable[[Any], Any] = as_model_input

  def __post_init__(self):
    labels = self.labels
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f'{self.name}: labels must be a non-empty 1-D integer array, got '
                      f'shape {labels.shape} dtype {labels.dtype}; the data files are damaged or not this data set.')
    if np.dtype(self.image_dtype) not in (np.float32, np.uint8):
      raise DataError(f'{self.name}: image_dtype must be float32 or uint8, got {np.dtype(self.image_dtype)}.')
    if np.dtype(self.image_dtype) == np.uint8 and self.model_input is as_model_input:
      raise DataError(f'{self.name}: uint8 images need a model_input that maps pixels to float32 values.')
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= self.num_classes:
      raise DataError(f'{self.name}: labels span [{low}, {high}] but num_classes is {self.num_classes}; '
                      f'fix the labels or set num_classes > {high}.')


def is_whole_number(value: Any, least: Optional[int] = None) -> bool:
  """Whether `value` is a whole number (a Python or numpy integer, not a bool), and >= `least` if given."""
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and (least is None or value >= least))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Batches of one split for one process: see `train_batches` and `eval_batches`."""
  source: Source
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    for field in ('batch_size', 'process_index', 'process_count'):
      if not is_whole_number(getattr(self, field)):  # 4.0 or '4' had failed deep in numpy
        raise DataError(f'{field} must be a whole number, got {getattr(self, field)!r}.')
    if self.batch_size < 1:
      raise DataError(f'batch_size must be >= 1, got {self.batch_size}.')
    # numpy splits an integer seed into 32-bit words, so a larger one would run into the next
    # word of the seed sequence: seed 5 + 3 * 2**32 shuffled its first epoch as seed 5 its fourth.
    if not (is_whole_number(self.seed, 0) and self.seed < 2**32):
      raise DataError(f'config.seed must be an integer in [0, 2**32), got {self.seed!r}; set config.seed to one '
                      'in that range, e.g. 0.')
    if not 0 <= self.process_index < self.process_count:
      raise DataError(f'process_index {self.process_index} is not in [0, process_count={self.process_count}).')

  @property
  def num_examples(self) -> int:
    """Examples in the whole split (every process's together)."""
    return int(self.source.labels.shape[0])

  @property
  def num_classes(self) -> int:
    """Number of classes the labels index into."""
    return self.source.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of one image."""
    return self.source.image_shape

  @property
  def image_dtype(self) -> np.dtype:
    """dtype of the batches' images: float32 model input, or uint8 pixels for `model_input`."""
    return np.dtype(self.source.image_dtype)

  @property
  def model_input(self) -> Callable[[Any], Any]:
    """images -> the model's float32 input (numpy or jax arrays; jit-compatible)."""
    return self.source.model_input

  @property
  def num_eval_steps(self) -> int:
    """Number of batches `eval_batches` yields (the same on every process)."""
    return sampling.num_eval_steps(self.num_examples, self.batch_size, self.process_count)

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    """Endless training batches from step `start_step` on, each a function of (seed, step) only.

    Each batch is {'image': (B, H, W, C) of `image_dtype`, 'label': int32 (B,), 'mask': float32
    (B,)}; the mask is all ones unless a loader skipped an unreadable example. The model's
    input is `model_input(batch['image'])`.
    """
    if not is_whole_number(start_step, 0):
      raise DataError(f'start_step must be a whole number >= 0, got {start_step!r}.')
    # Caching two epochs serves the batches that straddle an epoch boundary.
    permutation = functools.lru_cache(maxsize=2)(
        functools.partial(sampling.epoch_permutation, self.seed, self.num_examples))

    def start(step: int) -> tuple[np.ndarray, np.ndarray, Pending]:
      positions = sampling.shard_positions(step, self.batch_size, self.process_index, self.process_count)
      indices = sampling.train_indices(positions, self.num_examples, permutation)
      rng = sampling.augment_rng(self.seed, step, self.process_index)
      pending = self.source.loader.start_train(indices, rng)
      return indices, np.ones(self.batch_size, np.float32), lambda: _skipped_filled(pending(), self.source.name, step)

    return self._batches(start, itertools.count(start_step))

  def eval_batches(self) -> Iterator[Batch]:
    """One pass over the split in order; the last batch is padded and `mask` marks real examples."""

    def start(step: int) -> tuple[np.ndarray, np.ndarray, Pending]:
      positions = sampling.shard_positions(step, self.batch_size, self.process_index, self.process_count)
      indices, mask = sampling.eval_indices(positions, self.num_examples)
      return indices, mask, self.source.loader.start_eval(indices)

    return self._batches(start, iter(range(self.num_eval_steps)))

  def _batches(self, start: Callable[[int], tuple[np.ndarray, np.ndarray, Pending]],
               steps: Iterator[int]) -> Iterator[Batch]:
    pending = deque(start(step) for step in itertools.islice(steps, 1))
    while pending:
      # Start the next batch before waiting on this one, so loader workers never idle.
      pending.extend(start(step) for step in itertools.islice(steps, 1))
      indices, mask, wait = pending.popleft()
      yield self._assemble(indices, mask, wait())

  def _assemble(self, indices: np.ndarray, mask: np.ndarray, loaded: Loaded) -> Batch:
    expected = (self.batch_size, *self.image_shape)
    if loaded.images.shape != expected or loaded.images.dtype != self.image_dtype:
      raise DataError(f'{self.source.name}: loader returned images {loaded.images.dtype}{loaded.images.shape}, '
                      f'expected {self.image_dtype}{expected}; this is a bug in the loader.')
    if loaded.readable is not None:
      mask = mask * loaded.readable
    return {'image': loaded.images, 'label': self.source.labels[indices].astype(np.int32), 'mask': mask}
