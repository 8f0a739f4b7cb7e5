"""TF-Slim's `vgg_preprocessing` (used by slim for every ResNet) on PIL/numpy.

Train: resize the smaller side to a random integer in [256, 512] keeping the aspect ratio,
take a random 224 x 224 crop, mirror at random. Eval: smaller side to 256, central 224 crop.
Both subtract slim's per-channel means (no scaling), so values stay in about [-124, 152].

For an output size S other than 224 the resize range is scaled by S / 224 (slim keeps
256..512 fixed, which cannot crop more than 256 pixels).

The geometry (sizes, crop offsets) is slim's; so are the pixel values with
`config.data.resize='slim'`. The default resize, PIL's bilinear filter, antialiases when it
shrinks and samples at half-pixel centres, TF's legacy `resize_bilinear` does neither: about
3 levels from slim's values on average over 55 photos, up to ~170 at sharp edges.
"""

from __future__ import annotations

import functools

import numpy as np

from resnet_flax.data.preprocessing import Crop, Preprocessing

# slim's _R_MEAN, _G_MEAN, _B_MEAN.
RGB_MEAN = np.array([123.68, 116.78, 103.94], np.float32)
RESIZE_SIDE_MIN = 256
RESIZE_SIDE_MAX = 512
DEFAULT_IMAGE_SIZE = 224


def resize_side_range(image_size: int) -> tuple[int, int]:
  """slim's (256, 512) at 224 pixels, scaled for other output sizes."""
  low = round(image_size * RESIZE_SIDE_MIN / DEFAULT_IMAGE_SIZE)
  return low, round(low * RESIZE_SIDE_MAX / RESIZE_SIDE_MIN)


def aspect_preserving_size(width: int, height: int, smallest_side: int) -> tuple[int, int]:
  """slim's `_smallest_size_at_least`: (width, height) scaled so the smaller side is `smallest_side`."""
  # In float32, as TF: float64 rounds the other way for ~0.02% of (size, side) pairs (1280x1295 to 384: 388, not 389).
  scale = np.float32(smallest_side) / np.float32(min(width, height))
  return int(np.rint(np.float32(width) * scale)), int(np.rint(np.float32(height) * scale))


def train_crop(width: int, height: int, rng: np.random.Generator, *, image_size: int) -> Crop:
  """Random aspect-preserving resize of the smaller side, random crop, random mirror."""
  low, high = resize_side_range(image_size)
  resized = aspect_preserving_size(width, height, int(rng.integers(low, high + 1)))
  left = int(rng.integers(0, resized[0] - image_size + 1))
  top = int(rng.integers(0, resized[1] - image_size + 1))
  flip = bool(rng.random() < 0.5)
  return Crop((0, 0, width, height), resized, (left, top), flip)


def eval_crop(width: int, height: int, *, image_size: int) -> Crop:
  """Smaller side to the low end of the resize range, then the central crop."""
  resized = aspect_preserving_size(width, height, resize_side_range(image_size)[0])
  left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
  return Crop((0, 0, width, height), resized, (left, top))


def mean_image_subtraction(image: np.ndarray) -> np.ndarray:
  """slim's `_mean_image_subtraction`: float32 pixels minus the per-channel means (numpy or jax)."""
  return image.astype(np.float32) - RGB_MEAN


def _train_values(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return mean_image_subtraction(image)  # No randomness in the values; a module function so it pickles.


def preprocessing(image_size: int = DEFAULT_IMAGE_SIZE) -> Preprocessing:
  """VGG preprocessing producing image_size x image_size x 3 float32 images."""
  return Preprocessing(
      name='vgg', image_size=image_size,
      train_crop=functools.partial(train_crop, image_size=image_size),
      eval_crop=functools.partial(eval_crop, image_size=image_size),
      train_values=_train_values,
      eval_values=mean_image_subtraction,
      pixel_values=mean_image_subtraction)
