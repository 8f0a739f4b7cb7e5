"""TF-Slim's `inception_preprocessing` on PIL/numpy.

Train: a crop from `tf.image.sample_distorted_bounding_box` with slim's arguments (whole
image as the object, min_object_covered 0.1, aspect ratio 0.75..1.33, area 0.05..1.0, 100
attempts) resized to S x S, mirrored at random, optionally slim's fast-mode color distortion
(random brightness, then saturation). Eval: central crop of 87.5 % of each side, resized to
S x S. Both map pixels to [-1, 1].

Slim always distorts colors in training; here it is off unless asked for (`color_distortion`),
since for BN studies it is one more source of variance. Pixel values are slim's with
`config.data.resize='slim'`; the default resize (PIL's, which antialiases when it shrinks,
as TF's `resize_bilinear` does not) gives values 0.02 from them on average, up to ~1 (in the
[-1, 1] range).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from resnet_flax.data.preprocessing import Crop, Preprocessing

MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (0.75, 1.33)
AREA_RANGE = (0.05, 1.0)
MAX_ATTEMPTS = 100
CENTRAL_FRACTION = 0.875
MAX_BRIGHTNESS_DELTA = 32 / 255
SATURATION_RANGE = (0.5, 1.5)


def _random_crop_box(width: int, height: int, aspect_ratio: float,
                     rng: np.random.Generator) -> tuple[int, int, int, int] | None:
  """One attempt of TF's `GenerateRandomCrop`: (x, y, w, h) or None if the constraints fail.

  Like TF, it draws the height uniformly (not the area) and rounds half to even (lrintf).
  """
  min_area, max_area = AREA_RANGE[0] * width * height, AREA_RANGE[1] * width * height
  crop_height = round(math.sqrt(min_area / aspect_ratio))
  max_height = round(math.sqrt(max_area / aspect_ratio))
  if round(max_height * aspect_ratio) > width:
    max_height = int((width + 0.5 - 1e-7) / aspect_ratio)
    if round(max_height * aspect_ratio) > width:
      max_height -= 1
  max_height = min(max_height, height)
  crop_height = min(crop_height, max_height)
  if crop_height < max_height:
    crop_height += int(rng.integers(0, max_height - crop_height + 1))
  crop_width = round(crop_height * aspect_ratio)
  # TF nudges the height by one when rounding pushed the area out of range.
  if crop_width * crop_height < min_area:
    crop_height += 1
    crop_width = round(crop_height * aspect_ratio)
  if crop_width * crop_height > max_area:
    crop_height -= 1
    crop_width = round(crop_height * aspect_ratio)
  area = crop_width * crop_height
  if not (min_area <= area <= max_area and 0 < crop_width <= width and 0 < crop_height <= height):
    return None
  # TF draws offsets in [0, size - crop) (never the last one) and 0 when the crop fills a side.
  y = int(rng.integers(0, height - crop_height)) if crop_height < height else 0
  x = int(rng.integers(0, width - crop_width)) if crop_width < width else 0
  return x, y, crop_width, crop_height


def sample_distorted_bounding_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(x, y, w, h) as `tf.image.sample_distorted_bounding_box` with slim's arguments and no boxes."""
  for _ in range(MAX_ATTEMPTS):
    aspect_ratio = rng.uniform(*ASPECT_RATIO_RANGE)
    box = _random_crop_box(width, height, aspect_ratio, rng)
    # The only object is the whole image, so "covers 10 % of an object" is "10 % of the area".
    if box is not None and box[2] * box[3] >= max(1, MIN_OBJECT_COVERED * width * height):
      return box
  return 0, 0, width, height


def train_crop(width: int, height: int, rng: np.random.Generator, *, image_size: int) -> Crop:
  """slim's distorted bounding box crop, then a random mirror."""
  x, y, crop_width, crop_height = sample_distorted_bounding_box(width, height, rng)
  return Crop((x, y, x + crop_width, y + crop_height), (image_size, image_size), flip=bool(rng.random() < 0.5))


def eval_crop(width: int, height: int, *, image_size: int) -> Crop:
  """`tf.image.central_crop(image, 0.875)`: the same integer margin on both sides."""
  left = int((width - width * CENTRAL_FRACTION) / 2)
  top = int((height - height * CENTRAL_FRACTION) / 2)
  return Crop((left, top, width - left, height - top), (image_size, image_size))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """`tf.image.adjust_saturation` on float RGB: HSV saturation times `factor`, clipped to [0, 1].

  With hue and value fixed, each channel's distance below the maximum channel scales with
  the saturation, so no explicit HSV round trip is needed.
  """
  value = image.max(axis=-1, keepdims=True)
  spread = value - image.min(axis=-1, keepdims=True)
  saturation = np.where(value > 0, spread / np.where(value > 0, value, 1), 0)
  new_saturation = np.clip(saturation * factor, 0, 1)
  ratio = np.where(saturation > 0, new_saturation / np.where(saturation > 0, saturation, 1), 0)
  return (value - (value - image) * ratio).astype(np.float32)


def distort_color(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """slim's `distort_color` in fast mode (ordering 0): brightness, saturation, clip to [0, 1]."""
  image = image + np.float32(rng.uniform(-MAX_BRIGHTNESS_DELTA, MAX_BRIGHTNESS_DELTA))
  image = adjust_saturation(image, rng.uniform(*SATURATION_RANGE))
  return np.clip(image, 0, 1)


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [0, 1], as `tf.image.convert_image_dtype`."""
  return image.astype(np.float32) / 255


def to_signed_range(image: np.ndarray) -> np.ndarray:
  """[0, 1] -> [-1, 1], slim's final step."""
  return (image - 0.5) * 2


def _train_values(image: np.ndarray, rng: np.random.Generator, *, color_distortion: bool) -> np.ndarray:
  unit = to_unit_range(image)
  return to_signed_range(distort_color(unit, rng) if color_distortion else unit)


def signed_pixel_values(image: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1] (numpy or jax)."""
  return to_signed_range(to_unit_range(image))


def preprocessing(image_size: int, *, color_distortion: bool = False) -> Preprocessing:
  """Inception preprocessing producing image_size x image_size x 3 float32 images in [-1, 1].

  Color distortion is random per image, so only without it can the values be computed
  from shipped pixels on the device.
  """
  return Preprocessing(
      name='inception', image_size=image_size,
      train_crop=functools.partial(train_crop, image_size=image_size),
      eval_crop=functools.partial(eval_crop, image_size=image_size),
      train_values=functools.partial(_train_values, color_distortion=color_distortion),
      eval_values=signed_pixel_values,
      pixel_values=None if color_distortion else signed_pixel_values)
