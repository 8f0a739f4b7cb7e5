"""What per-image preprocessing of decoded photos is: a crop plan, then a mapping of pixel values.

Geometry is separated from decoding so that it is a pure function of the image size and a
random generator (testable without images), and so that the decoder can resize only the
crop box, from a JPEG decoded at reduced scale when that suffices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import numpy as np


class Crop(NamedTuple):
  """slim's crop and resize, in TF's order: the integer `region` (left, upper, right, lower) of the
  source image is resized to `resized` (width, height) pixels, of which the output-sized window
  at `offset` (left, top) is kept; then mirrored left-right if `flip`."""
  region: tuple[int, int, int, int]
  resized: tuple[int, int]
  offset: tuple[int, int] = (0, 0)
  flip: bool = False

  def box(self, size: int) -> tuple[float, float, float, float]:
    """The kept `size` x `size` window in source pixels (left, upper, right, lower): what a resize
    of the source that maps pixel areas (PIL's) samples."""
    if self.offset == (0, 0) and self.resized == (size, size):
      return tuple(map(float, self.region))  # the whole region, its edges exact
    left, upper, right, lower = self.region
    (x, y), (width, height) = self.offset, self.resized
    # This order of operations keeps the boxes, and so the reduced-scale decodes `_draft` picks, bit for bit.
    scale_x, scale_y = (right - left) / width, (lower - upper) / height
    return left + x * scale_x, upper + y * scale_y, left + (x + size) * scale_x, upper + (y + size) * scale_y


RESIZES = ('antialiased', 'slim')


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A named preprocessing at one output size.

  train_crop(width, height, rng) and eval_crop(width, height) plan the crop of a width x
  height image; train_values(image, rng) and eval_values(image) map the cropped uint8
  (size, size, 3) image to the float32 values the model sees.

  Every field pickles (module functions and partials of them), so worker processes can
  be handed a Preprocessing. pixel_values, when set, is what both value mappings are: a
  function of the pixels alone, written with array methods so that it runs on numpy or
  jax arrays. Loaders then ship uint8 crops (a quarter of the bytes, and no float
  conversion on the host) and the values are computed on the device
  (`resnet_flax.device_input`).

  resize, one of RESIZES, is how a crop is resized: 'antialiased' (PIL's bilinear filter,
  which averages when it shrinks, on a JPEG decoded at reduced scale where that still
  suffices: the fastest) or 'slim' (TF1's `resize_bilinear` as slim's preprocessing calls it,
  on the full decode: slim's pixel values, but for the JPEG decoder's rounding).
  """
  name: str
  image_size: int
  train_crop: Callable[[int, int, np.random.Generator], Crop]
  eval_crop: Callable[[int, int], Crop]
  train_values: Callable[[np.ndarray, np.random.Generator], np.ndarray]
  eval_values: Callable[[np.ndarray], np.ndarray]
  pixel_values: Optional[Callable[[np.ndarray], np.ndarray]] = None
  resize: str = 'antialiased'
