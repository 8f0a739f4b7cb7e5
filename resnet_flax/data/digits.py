"""scikit-learn's handwritten digits (1,797 real 8x8 images), embedded so that nothing is downloaded.

The split is the one the reference script uses: `RandomState(0).permutation(1797)`, the
first 1,437 for 'train', the last 360 for 'test' ('validation' is the same as 'test').
Pixels are 0..16 (counts of set bits in 4x4 blocks of a 32x32 bitmap) and become x / 16.
"""

from __future__ import annotations

import functools
import importlib.resources
import io

import numpy as np

from resnet_flax.data import augment
from resnet_flax.data.array_loader import ArrayLoader
from resnet_flax.data.errors import DataError
from resnet_flax.data.pipeline import Source

NUM_EXAMPLES = 1797
NUM_TRAIN = 1437
NATIVE_SIZE = 8
MAX_VALUE = 16
NUM_CLASSES = 10
SPLITS = {'train': 'train', 'test': 'test', 'validation': 'test'}
RESIZE_MODES = ('pad', 'upsample')
# One pixel is an eighth of the digit: enough jitter, and no flips (they change the digit).
_SHIFT_PIXELS = 1


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 images (uint8 (1797, 8, 8), 0..16) and labels (uint8 (1797,)) from the package."""
  blob = importlib.resources.files('resnet_flax.data').joinpath('digits.npz').read_bytes()
  with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
    images, labels = archive['images'], archive['labels']
  if (images.shape != (NUM_EXAMPLES, NATIVE_SIZE, NATIVE_SIZE) or images.dtype != np.uint8
      or images.max() > MAX_VALUE or labels.shape != (NUM_EXAMPLES,)):
    raise DataError(f'resnet_flax/data/digits.npz holds images {images.dtype}{images.shape} and labels '
                    f'{labels.shape}, not the 1797 8x8 digits; regenerate it with tools/make_digits_npz.py.')
  return images, labels


def split_indices(split: str) -> np.ndarray:
  """Indices into `load_arrays()` of the examples in `split`, in the reference script's order."""
  if split not in SPLITS:
    raise DataError(f'digits has no split {split!r}; use one of {sorted(SPLITS)}.')
  order = np.random.RandomState(0).permutation(NUM_EXAMPLES)
  return order[:NUM_TRAIN] if SPLITS[split] == 'train' else order[NUM_TRAIN:]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of bilinear upsampling with half-pixel centers (as PIL and jax.image)."""
  source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
  lower = np.floor(source).astype(int)
  upper = np.minimum(lower + 1, in_size - 1)
  weight = (source - lower).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  np.add.at(matrix, (np.arange(out_size), lower), 1 - weight)
  np.add.at(matrix, (np.arange(out_size), upper), weight)
  return matrix


def resize(images: np.ndarray, image_size: int, mode: str) -> np.ndarray:
  """(B, 8, 8) float images at `image_size`: centered on a zero canvas ('pad') or 'upsample'd."""
  if image_size == NATIVE_SIZE:
    return images
  if mode == 'upsample':
    matrix = bilinear_matrix(NATIVE_SIZE, image_size)
    return matrix @ images @ matrix.T
  canvas = np.zeros((images.shape[0], image_size, image_size), images.dtype)
  offset = (image_size - NATIVE_SIZE) // 2
  canvas[:, offset:offset + NATIVE_SIZE, offset:offset + NATIVE_SIZE] = images
  return canvas


def _to_model_input(images: np.ndarray, image_size: int, mode: str) -> np.ndarray:
  scaled = images.astype(np.float32) / MAX_VALUE
  return np.ascontiguousarray(resize(scaled, image_size, mode)[..., None])


def _train_transform(images: np.ndarray, rng: np.random.Generator, *, image_size: int, mode: str,
                     shift: bool) -> np.ndarray:
  if shift:
    images = augment.random_crop_with_padding(images, _SHIFT_PIXELS, rng)
  return _to_model_input(images, image_size, mode)


def build_source(split: str, *, image_size: int = NATIVE_SIZE, resize_mode: str = 'pad',
                 augment_train: bool = False) -> Source:
  """The digits `split` at `image_size` x `image_size` x 1, values in [0, 1]."""
  if image_size < NATIVE_SIZE:
    raise DataError(f'digits are {NATIVE_SIZE}x{NATIVE_SIZE}; image_size {image_size} would crop them, '
                    f'use image_size >= {NATIVE_SIZE}.')
  if resize_mode not in RESIZE_MODES:
    raise DataError(f'digits_resize {resize_mode!r} is unknown; use one of {RESIZE_MODES}.')
  images, labels = load_arrays()
  indices = split_indices(split)
  loader = ArrayLoader(
      images=images[indices],
      train_transform=functools.partial(_train_transform, image_size=image_size, mode=resize_mode,
                                        shift=augment_train),
      eval_transform=functools.partial(_to_model_input, image_size=image_size, mode=resize_mode))
  return Source(labels=labels[indices].astype(np.int32), num_classes=NUM_CLASSES,
                image_shape=(image_size, image_size, 1), loader=loader, name=f'digits/{split}')
