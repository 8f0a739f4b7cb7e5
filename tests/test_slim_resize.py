"""slim_resize and `config.data.resize='slim'` against TF's own output (`fixtures/slim_resize.npz`,
written by `fixtures/make_slim_resize_fixtures.py` with TensorFlow 2.21)."""

import functools
import os

import numpy as np
import pytest

from resnet_flax.data import image_decode, inception_preprocessing, slim_resize, vgg_preprocessing

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_resize.npz'))
JPEGS = sorted(key.split('/')[1] for key in FIXTURE.files if key.startswith('jpeg/'))
PLANS = {'vgg': (functools.partial(vgg_preprocessing.eval_crop, image_size=40), 40),
         'inception': (functools.partial(inception_preprocessing.eval_crop, image_size=48), 48)}


@pytest.mark.parametrize('case', sorted({key.split('/')[1] for key in FIXTURE.files if key.startswith('resize/')}))
def test_resize_window_is_tfs_resize_bilinear(case):
  # Shrinking, enlarging, by exactly 2, by odd ratios; windows off the origin, and reaching the
  # last row and column, where TF clamps.
  (height, width), (top, left) = FIXTURE[f'resize/{case}/size'], FIXTURE[f'resize/{case}/offset']
  expected = FIXTURE[f'resize/{case}/out']
  ours = slim_resize.resize_window(FIXTURE[f'resize/{case}/region'], (int(width), int(height)), (int(left), int(top)),
                                   expected.shape[0])
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def _decoded(tmp_path, name, preprocessing, resize):
  path = tmp_path / f'{name}.jpg'
  path.write_bytes(FIXTURE[f'jpeg/{name}'].tobytes())
  plan, size = PLANS[preprocessing]
  return image_decode.decode_crop(str(path), plan, size, resize).astype(np.float32)


@pytest.mark.parametrize('preprocessing', PLANS)
@pytest.mark.parametrize('name', JPEGS)
def test_slim_resize_gives_slims_eval_pixels_to_rounding(tmp_path, name, preprocessing):
  # On PIL's decode of the file, TF's pipeline and ours differ only by our rounding to uint8.
  ours = _decoded(tmp_path, name, preprocessing, 'slim')
  np.testing.assert_allclose(ours, FIXTURE[f'{preprocessing}/{name}/pil_decoded'], rtol=0, atol=0.5 + 1e-3)
  # TF's own decode uses libjpeg's fast integer IDCT, PIL the accurate one: that much remains.
  from_tf_decode = np.abs(ours - FIXTURE[f'{preprocessing}/{name}/tf_decoded'])
  assert from_tf_decode.mean() < 1.5 and from_tf_decode.max() < 8


class _Draws:
  """A stand-in for np.random.Generator whose draws are given, in order."""

  def __init__(self, *values):
    self.values = list(values)

  def integers(self, low, high=None):
    value = self.values.pop(0)
    assert low <= value < high, (low, value, high)
    return value

  def random(self):
    return self.values.pop(0)


@pytest.mark.parametrize('name', sorted({key.split('/')[1] for key in FIXTURE.files if key.startswith('vgg_train/')}))
def test_slim_resize_gives_slims_training_pixels_to_rounding(tmp_path, name, monkeypatch):
  # The same draws as the fixture's (resize side, crop at the far corner, mirror; a box, mirror).
  path = tmp_path / f'{name}.jpg'
  path.write_bytes(FIXTURE[f'jpeg/{name}'].tobytes())
  top, left = FIXTURE[f'vgg_train/{name}/offset']
  draws = _Draws(int(FIXTURE[f'vgg_train/{name}/side']), int(left), int(top), 0.0)
  ours = image_decode.decode_crop(str(path), lambda w, h: vgg_preprocessing.train_crop(w, h, draws, image_size=40),
                                  40, 'slim')
  np.testing.assert_allclose(ours, FIXTURE[f'vgg_train/{name}/pil_decoded'], rtol=0, atol=0.5 + 1e-3)
  box = tuple(int(value) for value in FIXTURE[f'inception_train/{name}/box'])
  monkeypatch.setattr(inception_preprocessing, 'sample_distorted_bounding_box', lambda width, height, rng: box)
  ours = image_decode.decode_crop(
      str(path), lambda w, h: inception_preprocessing.train_crop(w, h, _Draws(0.0), image_size=48), 48, 'slim')
  np.testing.assert_allclose(ours, FIXTURE[f'inception_train/{name}/pil_decoded'], rtol=0, atol=0.5 + 1e-3)


def test_the_default_resize_is_further_from_slims_pixels(tmp_path):
  # Why the option exists: PIL's antialiasing, half-pixel resize is another function of the pixels.
  for preprocessing in PLANS:
    for name in JPEGS:
      expected = FIXTURE[f'{preprocessing}/{name}/tf_decoded']
      slim_error = np.abs(_decoded(tmp_path, name, preprocessing, 'slim') - expected).mean()
      default_error = np.abs(_decoded(tmp_path, name, preprocessing, 'antialiased') - expected).mean()
      assert default_error > 2 * slim_error, (preprocessing, name, default_error, slim_error)


def test_flipped_slim_crops_mirror_the_unflipped_one(tmp_path):
  plan, size = PLANS['vgg']
  path = tmp_path / 'x.jpg'
  path.write_bytes(FIXTURE[f'jpeg/{JPEGS[0]}'].tobytes())
  straight = image_decode.decode_crop(str(path), plan, size, 'slim')
  mirrored = image_decode.decode_crop(str(path), lambda w, h: plan(w, h)._replace(flip=True), size, 'slim')
  np.testing.assert_array_equal(mirrored, straight[:, ::-1])


@pytest.mark.parametrize('worker_processes', [False, True])
def test_an_image_folder_with_the_slim_resize_ships_its_crops(tmp_path, worker_processes):
  from test_preprocessing import FOLDER, _make_folder
  from resnet_flax import data
  config = dict(FOLDER, dir=str(_make_folder(tmp_path)), preprocessing='vgg', resize='slim',
                worker_processes=worker_processes)
  ds = data.build(config, 'train', batch_size=4, seed=0)
  first = next(iter(ds.eval_batches()))['image'][0]
  plan = functools.partial(vgg_preprocessing.eval_crop, image_size=FOLDER['image_size'])
  np.testing.assert_array_equal(first, image_decode.decode_crop(ds.source.loader.paths[0], plan, 64, 'slim'))
  assert not np.array_equal(first, image_decode.decode_crop(ds.source.loader.paths[0], plan, 64))
  train = next(ds.train_batches())['image']
  assert train.shape == (4, 64, 64, 3) and train.dtype == np.uint8
