"""CIFAR-10 from the extracted `cifar-10-batches-py` directory (the python pickle version).

Files are read with `safe_pickle`, never with `pickle.load`, and what comes out is checked:
a dict with b'data' (N x 3072 uint8, each row 1024 red, then green, then blue values in
row-major order) and b'labels' (N ints in 0..9).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import numpy as np

from resnet_flax.data import augment, safe_pickle
from resnet_flax.data.array_loader import ArrayLoader
from resnet_flax.data.data_dir import data_directory, special_file_kind
from resnet_flax.data.errors import DataError
from resnet_flax.data.pipeline import Source

NATIVE_SIZE = 32
NUM_CLASSES = 10
FILES = {'train': tuple(f'data_batch_{i}' for i in range(1, 6)), 'test': ('test_batch',)}
SPLITS = {'train': 'train', 'test': 'test', 'validation': 'test'}
# Per-channel mean and standard deviation of the 50,000 training images, in [0, 1] units.
# (The often-copied std (0.2023, 0.1994, 0.2010) is not the data's; these are.)
MEAN = np.array([0.49139968, 0.48215841, 0.44653091], np.float32)
STD = np.array([0.24703223, 0.24348513, 0.26158784], np.float32)
# The standard CIFAR augmentation: 4-pixel zero padding, random 32x32 crop, random mirror.
_CROP_PADDING = 4
BATCHES_DIR = 'cifar-10-batches-py'
_EXPECTED = f'the extracted {BATCHES_DIR} directory (data_batch_1..5, test_batch) of cifar-10-python.tar.gz'


def _field(batch: dict, key: str) -> Any:
  # Python 2 pickles load with bytes keys; a file re-pickled by Python 3 may have str keys.
  return batch[key.encode()] if key.encode() in batch else batch.get(key)


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, 32, 32, 3) uint8 and labels (N,) int32 from one CIFAR-10 batch file."""
  kind = special_file_kind(path)
  if kind is not None:
    raise DataError(f'{path} is {kind}, not a CIFAR-10 batch file; config.data.dir must be {_EXPECTED}.')
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist; config.data.dir must be {_EXPECTED}.')
  batch = safe_pickle.load(path)
  if not isinstance(batch, dict):
    raise DataError(f'{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; download it again.')
  data, labels = _field(batch, 'data'), _field(batch, 'labels')
  if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
          and data.shape[1] == 3 * NATIVE_SIZE * NATIVE_SIZE):
    found = f'{data.dtype}{data.shape}' if isinstance(data, np.ndarray) else type(data).__name__
    raise DataError(f"{path}: b'data' is {found}, expected uint8 (N, 3072); the file is not CIFAR-10, "
                    f"download it again.")
  if not (isinstance(labels, (list, np.ndarray)) and len(labels) == data.shape[0]
          and all(isinstance(label, (int, np.integer)) and not isinstance(label, bool)
                  and 0 <= label < NUM_CLASSES for label in labels)):
    raise DataError(f"{path}: b'labels' is not {data.shape[0]} integers in 0..{NUM_CLASSES - 1}; "
                    f'the file is not CIFAR-10, download it again.')
  images = data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), np.asarray(labels, np.int32)


def _archive_fix(archive: str, stem: str) -> str:
  # cifar-10-python.tar.gz unpacks to cifar-10-batches-py/ next to it, whatever the archive is called.
  parent = os.path.dirname(archive) or '.'
  command = f'unzip {archive} -d {parent}' if archive.lower().endswith('.zip') else f'tar xf {archive} -C {parent}'
  return f'extract it first ({command}) and set config.data.dir to {os.path.join(parent, BATCHES_DIR)}.'


def _check_not_parent(directory: str) -> None:
  """Refuses the directory that holds cifar-10-batches-py/ rather than being it, naming the one to pass."""
  inner = os.path.join(directory, BATCHES_DIR)
  has_batches = any(os.path.isfile(os.path.join(directory, name)) for names in FILES.values() for name in names)
  # Not used silently: a dir that merely contains the data may be a mistake the user should see.
  if not has_batches and os.path.isdir(inner):
    raise DataError(f'config.data.dir={directory!r} holds {BATCHES_DIR}/ but no CIFAR-10 batch files; '
                    f'set config.data.dir to {inner}.')


def check_directory(directory: Optional[str]) -> str:
  """`directory` (`~` expanded) if it can be CIFAR-10's batches directory, else a one-line DataError
  naming what to pass (unset, a file, the tarball, the directory above it)."""
  directory = data_directory(directory, _EXPECTED, _archive_fix)
  _check_not_parent(directory)
  return directory


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and labels of `split` ('train', 'test' or 'validation' = 'test'); `~` in `directory` is expanded."""
  if split not in SPLITS:
    raise DataError(f'cifar10 has no split {split!r}; use one of {sorted(SPLITS)}.')
  directory = check_directory(directory)
  parts = [read_batch(os.path.join(directory, name)) for name in FILES[SPLITS[split]]]
  return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 (B, 32, 32, 3) -> float32 with zero mean and unit variance per channel (over the train set)."""
  return (images.astype(np.float32) / 255 - MEAN) / STD


def _train_transform(images: np.ndarray, rng: np.random.Generator, *, augment_train: bool) -> np.ndarray:
  if augment_train:
    images = augment.random_flip_left_right(augment.random_crop_with_padding(images, _CROP_PADDING, rng), rng)
  return normalize(images)


def build_source(directory: str, split: str, *, augment_train: bool = False) -> Source:
  """The CIFAR-10 `split` as 32x32x3 float32 images normalized per channel."""
  images, labels = read_split(directory, split)
  loader = ArrayLoader(images=images,
                       train_transform=functools.partial(_train_transform, augment_train=augment_train),
                       eval_transform=normalize)
  return Source(labels=labels, num_classes=NUM_CLASSES, image_shape=(NATIVE_SIZE, NATIVE_SIZE, 3),
                loader=loader, name=f'cifar10/{split}')
