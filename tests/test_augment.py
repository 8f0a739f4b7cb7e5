"""data.augment: random crops with zero padding and mirrors, each drawn per example."""

import numpy as np

from resnet_flax.data import augment


def test_random_crop_with_padding_is_a_shift():
  images = np.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
  out = augment.random_crop_with_padding(images, 2, np.random.default_rng(0))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for image, canvas in zip(out, padded):
    assert any(np.array_equal(image, canvas[dy:dy + 5, dx:dx + 5]) for dy in range(5) for dx in range(5))


def _offsets(images, out, padding):
  """(dy, dx) of each output image in its zero-padded source (images have distinct pixels)."""
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding)) + ((0, 0),) * (images.ndim - 3))
  size = images.shape[1]
  found = []
  for image, canvas in zip(out, padded):
    matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
               if np.array_equal(image, canvas[dy:dy + size, dx:dx + size])]
    assert len(matches) == 1
    found.append(matches[0])
  return found


def test_random_crop_draws_every_offset_per_example_and_per_axis():
  # Mutants: offsets drawn from [0, 2p) (never shifted by +p), left = top (diagonal shifts
  # only), no horizontal shift, one vertical shift for the whole batch.
  images = np.arange(1, 1 + 200 * 4 * 4).reshape(200, 4, 4)  # no zero pixel: each offset is unique
  offsets = _offsets(images, augment.random_crop_with_padding(images, 1, np.random.default_rng(0)), 1)
  assert {dy for dy, _ in offsets} == {0, 1, 2} and {dx for _, dx in offsets} == {0, 1, 2}
  assert len(set(offsets)) == 9  # all 3 x 3 pairs: the axes are drawn independently
  first = _offsets(images[:8], augment.random_crop_with_padding(images[:8], 1, np.random.default_rng(1)), 1)
  assert len({dy for dy, _ in first}) > 1  # not one shift for the whole batch


def test_random_flip_mirrors_about_half_of_the_images_each_on_its_own():
  # Mutants: never flipping, flipping the whole batch together.
  images = np.arange(64 * 3 * 5 * 2).reshape(64, 3, 5, 2)
  out = augment.random_flip_left_right(images, np.random.default_rng(0))
  flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(f != k for f, k in zip(flipped, kept))  # each image is itself or its mirror
  assert 16 <= sum(flipped) <= 48  # Binomial(64, 1/2): outside this range with probability < 1e-4
