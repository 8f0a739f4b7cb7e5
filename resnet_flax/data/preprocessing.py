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
  """The region of the source image (left, upper, right, lower), in source pixels, that is
  resized to the output size; then mirrored left-right if `flip`."""
  box: tuple[float, float, float, float]
  flip: bool = False


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
  """
  name: str
  image_size: int
  train_crop: Callable[[int, int, np.random.Generator], Crop]
  eval_crop: Callable[[int, int], Crop]
  train_values: Callable[[np.ndarray, np.random.Generator], np.ndarray]
  eval_values: Callable[[np.ndarray], np.ndarray]
  pixel_values: Optional[Callable[[np.ndarray], np.ndarray]] = None
