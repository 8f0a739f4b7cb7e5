"""TF1's `resize_bilinear(align_corners=False)`, the resize slim's preprocessing calls, in numpy.

TF samples output pixel i of a resize from `in` to `out` pixels at source coordinate
i * (in / out): no half-pixel centres, no antialiasing, so shrinking by 2 takes every
second pixel. The arithmetic is TF's, in float32 and in its order, so on the same decoded
pixels the values equal TF's (`tests/test_slim_resize.py`, against TF's own output).
"""

from __future__ import annotations

import numpy as np


def _sample_points(region_size: int, resized_size: int, start: int, count: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower index, upper index, weight of the upper) of outputs start .. start + count - 1,
  as TF's `compute_interpolation_weights` with its legacy scaler."""
  scale = np.float32(region_size) / np.float32(resized_size)
  source = np.arange(start, start + count, dtype=np.float32) * scale
  floor = np.floor(source)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(source).astype(np.int64), region_size - 1)  # TF clamps at the region's edge
  return lower, upper, (source - floor).astype(np.float32)


def resize_window(region: np.ndarray, resized: tuple[int, int], offset: tuple[int, int], size: int) -> np.ndarray:
  """float32 (size, size, channels): the window at `offset` (left, top) of `region` (height, width,
  channels) resized to `resized` (width, height), computing only the window's pixels."""
  height, width = region.shape[:2]
  rows_lower, rows_upper, row_weight = _sample_points(height, resized[1], offset[1], size)
  cols_lower, cols_upper, col_weight = _sample_points(width, resized[0], offset[0], size)
  col_weight = col_weight[None, :, None]

  def across(rows: np.ndarray) -> np.ndarray:  # TF interpolates along a row first, then between rows
    picked = region[rows]  # gathered before the float conversion, which would otherwise cover the whole image
    left, right = picked[:, cols_lower].astype(np.float32), picked[:, cols_upper].astype(np.float32)
    return left + (right - left) * col_weight

  top, bottom = across(rows_lower), across(rows_upper)
  return top + (bottom - top) * row_weight[:, None, None]


def to_pixels(values: np.ndarray) -> np.ndarray:
  """Resized float32 values of uint8 pixels -> the nearest uint8 (what a batch of pixels ships)."""
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)
