"""Decoding one image file into the crop a `Preprocessing` asks for, with PIL.

With the 'antialiased' resize only the crop box is resampled (PIL's `resize(box=...)`), and
a JPEG much larger than the output is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`, done
inside the IDCT) when that still leaves at least the output's resolution across the box.
PIL releases the GIL while it decodes and resamples, so threads decode in parallel. The
'slim' resize decodes at full scale, as TF does, and resizes as TF1 (`slim_resize.py`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image

from resnet_flax.data import slim_resize
from resnet_flax.data.data_dir import special_file_kind
from resnet_flax.data.errors import DataError, one_line
from resnet_flax.data.preprocessing import Crop, Preprocessing

# Modes with a faithful conversion to RGB (as `decode_jpeg/png(channels=3)` gives); 16-bit,
# 32-bit integer and float modes have no agreed mapping to 0..255 and are refused.
_RGB_CONVERTIBLE_MODES = frozenset({'RGB', 'RGBA', 'RGBX', 'L', 'LA', 'P', 'PA', 'CMYK', 'YCbCr', '1'})
# What a damaged or non-image file makes PIL raise.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# The end of every UnreadableImage message; dropped from the problem a skipped file reports, where it is already set.
_OR_SKIP = ', or set config.data.on_bad_image="skip"'


class UnreadableImage(DataError):
  """An image file that cannot be decoded; the message names the file."""


def _draft(image: Image.Image, box: tuple[float, float, float, float], size: int) -> tuple[float, ...]:
  """Asks a JPEG decoder for the smallest scale that keeps `size` pixels across `box`; returns
  the box in the coordinates of the image as it will decode."""
  width, height = image.size
  wanted = (math.ceil(width * size / (box[2] - box[0])), math.ceil(height * size / (box[3] - box[1])))
  drafted = image.draft('RGB', wanted)
  if drafted is None:  # Not a baseline single-tile JPEG, or already configured: full scale.
    return box
  scale_x, scale_y = drafted[1][2] / width, drafted[1][3] / height
  return (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)


def _unreadable(path: str, error: Exception) -> UnreadableImage:
  return UnreadableImage(f'cannot decode image {os.fspath(path)}: {type(error).__name__}: {one_line(error)}; '
                         f'replace or delete the file{_OR_SKIP}.')


def _antialiased_crop(image: Image.Image, crop: Crop, size: int) -> np.ndarray:
  box = _draft(image, crop.box(size), size) if image.format == 'JPEG' else crop.box(size)
  rgb = _rgb(image)
  # After a draft, `box` refers to the reduced image, which is what `rgb` holds.
  resized = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
  if crop.flip:  # In PIL: copying numpy's reversed view of 3-byte pixels costs 10x more.
    resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(resized)


def _rgb(image: Image.Image) -> Image.Image:
  """`image` in RGB. A palette image whose transparency is per-entry bytes goes through RGBA:
  the same pixels, without the two-line PIL warning that names no file."""
  if image.mode == 'RGB':
    return image
  if image.mode == 'P' and isinstance(image.info.get('transparency'), bytes):
    image = image.convert('RGBA')
  return image.convert('RGB')


def _slim_crop(image: Image.Image, crop: Crop, size: int) -> np.ndarray:
  # TF's order: the whole image decoded, the region cut out and resized, the window kept.
  rgb = np.asarray(_rgb(image))
  left, upper, right, lower = crop.region
  pixels = slim_resize.to_pixels(slim_resize.resize_window(rgb[upper:lower, left:right], crop.resized, crop.offset,
                                                           size))
  return pixels[:, ::-1] if crop.flip else pixels


_CROPS = {'antialiased': _antialiased_crop, 'slim': _slim_crop}  # preprocessing.RESIZES


def decode_crop(path: str, plan: Callable[[int, int], Crop], size: int, resize: str = 'antialiased') -> np.ndarray:
  """uint8 (size, size, 3): the crop `plan(width, height)` chooses, resized bilinearly as `resize`
  says (see `Preprocessing`), maybe mirrored.

  Raises UnreadableImage naming `path` if the file is not a readable image in an RGB-convertible mode.
  """
  kind = special_file_kind(path)
  if kind is not None:  # A named pipe would block the decoding thread for ever, and a stopping run with it.
    raise UnreadableImage(f'image {os.fspath(path)} is {kind}, not an image file; replace it with the image or '
                          f'remove it{_OR_SKIP}.')
  try:
    image = Image.open(path)  # Reads the header only.
  except _DECODE_ERRORS as error:
    raise _unreadable(path, error) from error
  with image:
    if image.mode not in _RGB_CONVERTIBLE_MODES:
      raise UnreadableImage(f'image {os.fspath(path)} has mode {image.mode!r}, which has no standard RGB '
                            f'conversion; convert it to 8-bit RGB{_OR_SKIP}.')
    # Planned outside the `try` below, so that a bug in a plan is never blamed on the file.
    crop = plan(*image.size)
    try:
      return _CROPS[resize](image, crop, size)
    except _DECODE_ERRORS as error:
      raise _unreadable(path, error) from error


def decode_values(path: str, preprocessing: Preprocessing, ship_pixels: bool,
                  rng: Optional[np.random.Generator]) -> np.ndarray:
  """One example as a batch holds it: the uint8 crop (`ship_pixels`) or its float32 values.

  `rng` draws the training crop and values; None takes the deterministic eval ones.
  """
  size = preprocessing.image_size
  if rng is None:
    crop = decode_crop(path, preprocessing.eval_crop, size, preprocessing.resize)
    return crop if ship_pixels else preprocessing.eval_values(crop)
  crop = decode_crop(path, lambda width, height: preprocessing.train_crop(width, height, rng), size,
                     preprocessing.resize)
  return crop if ship_pixels else preprocessing.train_values(crop, rng)


def values_dtype(ship_pixels: bool) -> np.dtype:
  """dtype of a batch of `decode_values` results."""
  return np.dtype(np.uint8 if ship_pixels else np.float32)


def decode_into_slot(images: np.ndarray, slot: int, path: str, preprocessing: Preprocessing, ship_pixels: bool,
                     rng: Optional[np.random.Generator], skip_unreadable: bool) -> Optional[str]:
  """Fills `images[slot]` with `decode_values`; returns the problem if the file is unreadable
  and skipped, in which case the slot is zeroed (batch buffers may be reused)."""
  try:
    images[slot] = decode_values(path, preprocessing, ship_pixels, rng)
  except UnreadableImage as error:
    if not skip_unreadable:
      raise
    images[slot] = 0
    return str(error).replace(_OR_SKIP, '')
  return None
