"""Image folders with TF-Slim's VGG and inception preprocessing: crop geometry against slim's
formulas, color distortion against an HSV round trip, JPEG decoding at reduced scale, and
ImageFolder trees end to end (shapes, ranges, labels, determinism, bad files)."""

import colorsys
import functools
import itertools
import shutil

import numpy as np
import pytest
from PIL import Image

from resnet_flax import data
from resnet_flax.data import image_decode, image_folder, inception_preprocessing, vgg_preprocessing
from resnet_flax.data.preprocessing import RESIZES, Crop


def test_vgg_eval_crop_is_slims_resize_then_central_crop():
  # 500x375: the smaller side 375 -> 256, so 500 -> rint(500 * 256 / 375) = 341.
  assert vgg_preprocessing.aspect_preserving_size(500, 375, 256) == (341, 256)
  crop = vgg_preprocessing.eval_crop(500, 375, image_size=224)
  left, top = (341 - 224) // 2, (256 - 224) // 2
  sx, sy = 500 / 341, 375 / 256
  assert crop == Crop((0, 0, 500, 375), (341, 256), (left, top))
  # Exactly: an ulp more or less across the box had changed the scale `_draft` decodes at, and with it the pixels.
  assert crop.box(224) == (left * sx, top * sy, (left + 224) * sx, (top + 224) * sy)


def test_vgg_train_crops_stay_inside_and_scale_within_slims_range():
  rng = np.random.default_rng(0)
  sides, flips = [], []
  for _ in range(500):
    crop = vgg_preprocessing.train_crop(500, 375, rng, image_size=224)
    left, top, right, bottom = crop.box(224)
    assert 0 <= left and 0 <= top and right <= 500 + 1e-9 and bottom <= 375 + 1e-9
    sides.append(round(224 * 375 / (bottom - top)))  # The smaller side the image was resized to.
    flips.append(crop.flip)
  assert min(sides) >= 256 and max(sides) <= 512 and max(sides) - min(sides) > 200
  assert 0.4 < np.mean(flips) < 0.6


def test_vgg_resized_sizes_round_in_float32_as_slims():
  # TF's _smallest_size_at_least computes in float32; in float64 1295 * 384 / 1280 rounds to 388.
  assert vgg_preprocessing.aspect_preserving_size(1280, 1295, 384) == (384, 389)
  assert vgg_preprocessing.aspect_preserving_size(1295, 1280, 384) == (389, 384)


def test_vgg_resize_range_scales_with_the_output_size():
  assert vgg_preprocessing.resize_side_range(224) == (256, 512)
  assert vgg_preprocessing.resize_side_range(112) == (128, 256)


def test_inception_boxes_obey_slims_constraints():
  rng = np.random.default_rng(0)
  fractions = []
  for width, height in [(500, 375), (100, 400), (64, 64)]:
    for _ in range(300):
      x, y, w, h = inception_preprocessing.sample_distorted_bounding_box(width, height, rng)
      assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
      fraction = w * h / (width * height)
      assert 0.1 <= fraction <= 1
      if (w, h) != (width, height):
        assert 0.75 - 0.02 <= w / h <= 1.33 + 0.02  # Up to rounding of the width.
      fractions.append(fraction)
  assert min(fractions) < 0.15 and max(fractions) > 0.9


def test_inception_eval_is_tf_central_crop():
  # tf.image.central_crop(0.875): start = int((375 - 328.125) / 2) = 23, size = 375 - 2 * 23.
  crop = inception_preprocessing.eval_crop(500, 375, image_size=299)
  assert crop == Crop((31, 23, 469, 352), (299, 299))
  assert crop.box(299) == (31, 23, 469, 352)  # the whole region, exactly


@pytest.mark.parametrize('factor', [0.0, 0.5, 1.0, 1.5, 3.0])
def test_adjust_saturation_matches_an_hsv_round_trip(factor):
  pixels = np.random.default_rng(0).random((200, 3)).astype(np.float32)
  pixels[:3] = [[0, 0, 0], [0.5, 0.5, 0.5], [1, 0, 0]]
  expected = []
  for r, g, b in pixels:
    hue, saturation, value = colorsys.rgb_to_hsv(r, g, b)
    expected.append(colorsys.hsv_to_rgb(hue, min(max(saturation * factor, 0), 1), value))
  np.testing.assert_allclose(inception_preprocessing.adjust_saturation(pixels, factor), expected, atol=1e-5)


def test_color_distortion_keeps_unit_range_and_is_off_by_default():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  plain = inception_preprocessing.preprocessing(8)
  distorted = inception_preprocessing.preprocessing(8, color_distortion=True)
  np.testing.assert_allclose(plain.train_values(image, np.random.default_rng(1)), image / 255 * 2 - 1, atol=1e-6)
  out = distorted.train_values(image, np.random.default_rng(1))
  assert out.min() >= -1 and out.max() <= 1 and not np.allclose(out, image / 255 * 2 - 1)


def test_jpeg_decoded_at_reduced_scale_matches_full_decode(tmp_path):
  rng = np.random.default_rng(0)
  base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((800, 600), Image.BILINEAR)
  base.save(tmp_path / 'big.jpg', 'JPEG', quality=95)
  base.save(tmp_path / 'big.png', compress_level=1)  # Lossless, and never drafted.
  plan = functools.partial(inception_preprocessing.eval_crop, image_size=64)
  with Image.open(tmp_path / 'big.jpg') as image:
    box = image_decode._draft(image, plan(800, 600).box(64), 64)
    assert image.size == (100, 75)  # Decoded at 1/8 scale: still > 64 pixels across the box.
    np.testing.assert_allclose(box, np.array(plan(800, 600).box(64)) / 8)
  drafted = image_decode.decode_crop(str(tmp_path / 'big.jpg'), plan, 64)
  full = image_decode.decode_crop(str(tmp_path / 'big.png'), plan, 64)
  assert drafted.shape == full.shape == (64, 64, 3) and drafted.dtype == np.uint8
  assert np.abs(drafted.astype(int) - full).mean() < 3


@pytest.mark.parametrize('resize', RESIZES)
def test_flip_mirrors_the_crop(tmp_path, resize):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
  image.save(tmp_path / 'x.png')
  crop = Crop((8, 0, 40, 32), (32, 32))
  straight = image_decode.decode_crop(str(tmp_path / 'x.png'), lambda w, h: crop, 32, resize)
  mirrored = image_decode.decode_crop(str(tmp_path / 'x.png'), lambda w, h: crop._replace(flip=True), 32, resize)
  np.testing.assert_array_equal(mirrored, straight[:, ::-1])
  np.testing.assert_array_equal(straight, np.asarray(image)[:, 8:40])  # A 1:1 box is an exact crop.


@pytest.mark.parametrize('resize', RESIZES)
def test_a_palette_png_with_transparency_bytes_decodes_to_its_colors_without_a_warning(tmp_path, resize, recwarn):
  # PIL warns, in two lines naming no file, when such an image goes straight to RGB.
  colors = np.random.default_rng(0).integers(0, 256, (16, 3), dtype=np.uint8)
  indices = np.random.default_rng(1).integers(0, 16, (32, 32), dtype=np.uint8)
  image = Image.fromarray(indices, 'P')
  image.putpalette(colors.ravel().tolist())
  image.save(tmp_path / 'p.png', transparency=bytes(range(0, 256, 16)))
  with Image.open(tmp_path / 'p.png') as saved:
    assert isinstance(saved.info['transparency'], bytes)
  got = image_decode.decode_crop(str(tmp_path / 'p.png'), lambda w, h: Crop((0, 0, 32, 32), (32, 32)), 32, resize)
  np.testing.assert_array_equal(got, colors[indices])
  assert not [str(warning.message) for warning in recwarn]


# --- image folders: decoding, labels, errors -------------------------------------------

def _photo(rng, width, height):
  base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
  return Image.fromarray(base).resize((width, height), Image.BILINEAR)


def _make_folder(root, split='train'):
  rng = np.random.default_rng(0)
  sizes = [(300, 200), (160, 240), (250, 250)]
  for class_index, name in enumerate(['cat', 'dog', 'zebra']):
    directory = root / split / name
    directory.mkdir(parents=True)
    for i, (width, height) in enumerate(sizes):
      _photo(rng, width, height).save(directory / f'{i}.jpg', 'JPEG', quality=90)
  _photo(rng, 120, 90).convert('L').save(root / split / 'dog' / 'gray.png')
  return root


FOLDER = {'name': 'imagefolder', 'image_size': 64, 'num_workers': 2}


@pytest.mark.parametrize('preprocessing,low,high', [
    ('vgg', -vgg_preprocessing.RGB_MEAN, 255 - vgg_preprocessing.RGB_MEAN),
    ('inception', -1, 1)])
def test_image_folder_shapes_labels_and_ranges(tmp_path, preprocessing, low, high):
  config = dict(FOLDER, dir=str(_make_folder(tmp_path)), preprocessing=preprocessing)
  ds = data.build(config, 'train', batch_size=4, seed=0)
  assert (ds.num_examples, ds.num_classes, ds.image_shape) == (10, 3, (64, 64, 3))
  np.testing.assert_array_equal(ds.source.labels, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # sorted names, sorted files
  train = list(itertools.islice(ds.train_batches(), 3))
  evaluation = list(ds.eval_batches())
  assert len(evaluation) == 3 and sum(b['mask'].sum() for b in evaluation) == 10
  assert ds.image_dtype == np.uint8  # Pixels travel; the values are computed on the device.
  for batch in train + evaluation:
    assert batch['image'].shape == (4, 64, 64, 3) and batch['image'].dtype == np.uint8
    values = ds.model_input(batch['image'])
    assert values.dtype == np.float32 and np.all(values >= low - 1e-4) and np.all(values <= high + 1e-4)
  again = data.build(config, 'train', batch_size=4, seed=0)
  np.testing.assert_equal(train, list(itertools.islice(again.train_batches(), 3)))
  np.testing.assert_equal(evaluation, list(ds.eval_batches()))
  resumed = next(data.build(dict(config, num_workers=1), 'train', batch_size=4, seed=0).train_batches(2))
  np.testing.assert_equal([train[2]], [resumed])  # Independent of thread count and timing.


def test_color_distortion_makes_float_values_on_the_host(tmp_path):
  config = dict(FOLDER, dir=str(_make_folder(tmp_path)), preprocessing='inception', color_distortion=True)
  ds = data.build(config, 'train', batch_size=4, seed=0)
  batch = next(ds.train_batches())
  assert ds.image_dtype == batch['image'].dtype == np.float32  # Random per image: no pixel-only mapping.
  assert ds.model_input(batch['image']) is batch['image']
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1


@pytest.mark.parametrize('preprocessing', ['vgg', 'inception'])
def test_shipped_pixels_map_to_the_preprocessings_values(tmp_path, preprocessing):
  root = _make_folder(tmp_path)
  ds = data.build(dict(FOLDER, dir=str(root), preprocessing=preprocessing), 'train', batch_size=10, seed=0)
  pixels = next(ds.eval_batches())['image']
  chosen = image_folder.get_preprocessing(preprocessing, 64)
  paths = [str(root / 'train' / name / file) for name, file in
           [('cat', '0.jpg'), ('cat', '1.jpg'), ('cat', '2.jpg'), ('dog', '0.jpg')]]
  for slot, path in enumerate(paths):  # The host-side float mapping of each decoded crop, image by image.
    expected = chosen.eval_values(image_decode.decode_crop(path, chosen.eval_crop, 64))
    np.testing.assert_array_equal(ds.model_input(pixels[slot]), expected)


def test_image_folder_without_augment_trains_on_eval_crops(tmp_path):
  config = dict(FOLDER, dir=str(_make_folder(tmp_path)), preprocessing='vgg', augment=False)
  ds = data.build(config, 'train', batch_size=10, seed=0)  # One batch holds every example.
  train, evaluation = next(ds.train_batches()), next(ds.eval_batches())
  for image in train['image']:  # The same images, shuffled.
    assert any(np.array_equal(image, other) for other in evaluation['image'])


def test_image_folder_finds_val_for_validation(tmp_path):
  _make_folder(tmp_path, split='val')
  ds = data.build(dict(FOLDER, dir=str(tmp_path), preprocessing='inception'), 'validation', batch_size=2, seed=0)
  assert ds.num_examples == 10


def test_validation_labels_are_the_training_classes_even_with_a_class_missing(tmp_path):
  _make_folder(tmp_path)
  _make_folder(tmp_path, split='val')
  shutil.rmtree(tmp_path / 'val' / 'dog')  # val: cat, zebra; sorted alone, zebra would be label 1 (train's dog)
  config = dict(FOLDER, dir=str(tmp_path), preprocessing='vgg')
  val = data.build(config, 'validation', batch_size=2, seed=0)
  assert val.num_classes == 3 and sorted(set(val.source.labels.tolist())) == [0, 2]


def test_a_validation_class_training_never_saw_is_refused(tmp_path):
  _make_folder(tmp_path)
  _make_folder(tmp_path, split='val')
  (tmp_path / 'val' / 'zebra').rename(tmp_path / 'val' / 'zebu')
  with pytest.raises(data.DataError, match=r"\['zebu'\] that the training split does not have") as error:
    data.build(dict(FOLDER, dir=str(tmp_path), preprocessing='vgg'), 'validation', batch_size=2, seed=0)
  assert '\n' not in str(error.value)


def test_unreadable_image_is_named(tmp_path):
  root = _make_folder(tmp_path)
  bad = root / 'train' / 'dog' / 'broken.jpg'
  bad.write_bytes(b'this is not a jpeg')
  ds = data.build(dict(FOLDER, dir=str(root), preprocessing='vgg'), 'train', batch_size=11, seed=0)
  with pytest.raises(data.DataError, match='broken.jpg') as excinfo:
    next(ds.eval_batches())
  assert '\n' not in str(excinfo.value)


def test_truncated_jpeg_is_named(tmp_path):
  root = _make_folder(tmp_path)
  good = (root / 'train' / 'cat' / '0.jpg').read_bytes()
  (root / 'train' / 'cat' / 'cut.jpg').write_bytes(good[:len(good) // 2])
  ds = data.build(dict(FOLDER, dir=str(root), preprocessing='inception'), 'train', batch_size=11, seed=0)
  with pytest.raises(data.DataError, match='cut.jpg'):
    next(ds.eval_batches())


def test_unreadable_image_can_be_skipped_with_a_warning(tmp_path):
  root = _make_folder(tmp_path)
  (root / 'train' / 'cat' / 'broken.jpg').write_bytes(b'GIF89a nonsense')
  ds = data.build(dict(FOLDER, dir=str(root), preprocessing='vgg', on_bad_image='skip'), 'train', batch_size=11, seed=0)
  with pytest.warns(UserWarning, match='broken.jpg'):
    batch = next(ds.eval_batches())
  assert batch['mask'].sum() == 10 and batch['mask'][3] == 0  # cat/0..2.jpg, then cat/broken.jpg
  assert np.all(batch['image'][3] == 0)


def test_sixteen_bit_image_is_refused_by_name(tmp_path):
  root = _make_folder(tmp_path)
  Image.fromarray(np.full((40, 40), 4000, np.uint16)).save(root / 'train' / 'zebra' / 'deep.png')
  ds = data.build(dict(FOLDER, dir=str(root), preprocessing='vgg'), 'train', batch_size=11, seed=0)
  with pytest.raises(data.DataError, match=r'deep\.png.*mode'):
    list(ds.eval_batches())


def test_missing_or_empty_directories_are_named(tmp_path):
  config = dict(FOLDER, dir=str(tmp_path), preprocessing='vgg')
  with pytest.raises(data.DataError, match='train') as excinfo:
    data.build(config, 'train', batch_size=2, seed=0)
  assert '\n' not in str(excinfo.value)
  _make_folder(tmp_path)
  (tmp_path / 'train' / 'empty').mkdir()
  with pytest.raises(data.DataError, match=r'empty has no \.jpg'):
    data.build(config, 'train', batch_size=2, seed=0)


def test_label_offset_for_background_class(tmp_path):
  config = dict(FOLDER, dir=str(_make_folder(tmp_path)), preprocessing='inception', label_offset=1)
  ds = data.build(config, 'train', batch_size=2, seed=0)
  assert ds.num_classes == 4 and ds.source.labels.min() == 1
