"""Batch-wise random augmentations of small in-memory images (digits, CIFAR-10), in numpy."""

from __future__ import annotations

import numpy as np


def random_crop_with_padding(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
  """Pads (B, H, W, ...) images with zeros on each side, then crops each back to H x W at random.

  The result is each image shifted by up to `padding` pixels in each direction.
  """
  batch, height, width = images.shape[:3]
  pad_width = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
  padded = np.pad(images, pad_width)
  top = rng.integers(0, 2 * padding + 1, size=batch)
  left = rng.integers(0, 2 * padding + 1, size=batch)
  rows = top[:, None] + np.arange(height)
  cols = left[:, None] + np.arange(width)
  return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip_left_right(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors each (B, H, W, ...) image horizontally with probability 1/2."""
  flip = rng.random(images.shape[0]) < 0.5
  return np.where(flip.reshape((-1,) + (1,) * (images.ndim - 1)), images[:, :, ::-1], images)
