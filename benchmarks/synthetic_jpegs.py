"""A small ImageFolder tree of photo-like JPEGs, drawn as `anchors/jpeg_pipeline.py` draws its own.

Same sizes (300-500 x 350-500 by default), same smooth upsampled noise, same quality 90,
so our pipeline and the anchor decode comparable files.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def jpeg_bytes(rs: np.random.RandomState, height_range: tuple[int, int], width_range: tuple[int, int]) -> bytes:
  """One JPEG: noise at 1/8 resolution upsampled bilinearly (smooth, like a photo), quality 90."""
  height, width = int(rs.uniform(*height_range)), int(rs.uniform(*width_range))
  base = rs.randint(0, 255, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
  image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def write_image_folder(root: str, num_images: int, num_classes: int = 8, split: str = 'train',
                       height_range: tuple[int, int] = (300, 500), width_range: tuple[int, int] = (350, 500),
                       seed: int = 0) -> float:
  """Writes `root/<split>/class_<k>/<i>.jpg`, images dealt round-robin over the classes.

  Returns the mean file size in KiB (the anchor prints the same figure).
  """
  rs = np.random.RandomState(seed)
  sizes = []
  for i in range(num_images):
    directory = os.path.join(root, split, f'class_{i % num_classes:03d}')
    os.makedirs(directory, exist_ok=True)
    data = jpeg_bytes(rs, height_range, width_range)
    with open(os.path.join(directory, f'{i:05d}.jpg'), 'wb') as file:
      file.write(data)
    sizes.append(len(data))
  return float(np.mean(sizes)) / 1024
