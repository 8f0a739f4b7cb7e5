"""Input pipelines: splits, determinism and exact resume, sharding, padding, digits, synthetic
data, builder defaults and config errors.

CIFAR-10 files are tested in test_cifar10.py, image folder trees in test_image_folder.py
(their preprocessing in test_preprocessing.py), config.data.dir mistakes in test_data_dir.py,
random streams and a Dataset's contract in test_pipeline.py, augmentation in test_augment.py,
prefetching in test_prefetch.py."""

import itertools
import re

import numpy as np
import pytest

from resnet_flax import data
from resnet_flax.data import digits, sampling
from resnet_flax.data.pipeline import Source
from resnet_flax.data.synthetic import ConstantLoader


def _batches(iterator, count):
  return list(itertools.islice(iterator, count))


# --- digits -----------------------------------------------------------------------------

DIGITS = {'name': 'digits'}


def test_digits_splits_are_the_reference_scripts():
  images, labels = digits.load_arrays()
  order = np.random.RandomState(0).permutation(1797)
  for split, expected in [('train', order[:1437]), ('test', order[1437:]), ('validation', order[1437:])]:
    ds = data.build(DIGITS, split, batch_size=100, seed=0)
    assert (ds.num_examples, ds.num_classes, ds.image_shape) == (len(expected), 10, (8, 8, 1))
    batches = list(ds.eval_batches())
    got_images = np.concatenate([b['image'] for b in batches])[:len(expected)]
    got_labels = np.concatenate([b['label'] for b in batches])[:len(expected)]
    np.testing.assert_array_equal(got_images[..., 0], images[expected] / 16)
    np.testing.assert_array_equal(got_labels, labels[expected])


def test_digits_batches_have_the_promised_types():
  batch = next(data.build(DIGITS, 'train', batch_size=32, seed=0).train_batches())
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (32, 8, 8, 1)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (32,)
  assert batch['mask'].dtype == np.float32 and np.all(batch['mask'] == 1)
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1


def test_same_seed_same_batches_other_seed_other_batches():
  config = dict(DIGITS, augment=True)
  first = _batches(data.build(config, 'train', batch_size=64, seed=3).train_batches(), 5)
  np.testing.assert_equal(first, _batches(data.build(config, 'train', batch_size=64, seed=3).train_batches(), 5))
  other = _batches(data.build(config, 'train', batch_size=64, seed=4).train_batches(), 5)
  assert not np.array_equal(first[0]['label'], other[0]['label'])


@pytest.mark.parametrize('start_step', [1, 7, 22, 23, 45])  # 1437 / 64 = 22.5 steps per epoch
def test_resume_at_step_k_gives_the_kth_batch(start_step):
  ds = data.build(dict(DIGITS, augment=True), 'train', batch_size=64, seed=0)
  uninterrupted = _batches(ds.train_batches(), start_step + 2)[start_step:]
  np.testing.assert_equal(uninterrupted, _batches(ds.train_batches(start_step), 2))


def test_each_epoch_is_a_permutation_and_epochs_differ():
  ds = data.build(DIGITS, 'train', batch_size=479, seed=0)  # 3 batches per epoch exactly
  batches = _batches(ds.train_batches(), 6)
  epoch_labels = [np.concatenate([b['label'] for b in batches[i:i + 3]]) for i in (0, 3)]
  for labels in epoch_labels:
    np.testing.assert_array_equal(np.sort(labels), np.sort(ds.source.labels))
  assert not np.array_equal(epoch_labels[0], epoch_labels[1])


def test_batches_straddle_epochs_without_dropping_examples():
  positions = sampling.shard_positions(step=1, batch_size=6, process_index=0, process_count=1)
  indices = sampling.train_indices(positions, 10, lambda epoch: np.arange(10)[::-1] if epoch else np.arange(10))
  np.testing.assert_array_equal(indices, [6, 7, 8, 9, 9, 8])


def test_process_shards_are_disjoint_slices_of_the_global_batch():
  whole = _batches(data.build(DIGITS, 'train', batch_size=64, seed=1).train_batches(), 3)
  shards = [_batches(data.build(DIGITS, 'train', batch_size=16, seed=1, process_index=p, process_count=4)
                     .train_batches(), 3) for p in range(4)]
  for step, batch in enumerate(whole):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([shard[step][key] for shard in shards]), batch[key])
  for step in range(3):
    positions = [set(sampling.shard_positions(step, 16, p, 4)) for p in range(4)]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(positions, 2))


def test_eval_pads_the_last_batch_and_masks_it():
  ds = data.build(DIGITS, 'test', batch_size=100, seed=0)
  batches = list(ds.eval_batches())
  assert len(batches) == ds.num_eval_steps == 4
  assert all(b['image'].shape == (100, 8, 8, 1) for b in batches)
  assert sum(b['mask'].sum() for b in batches) == ds.num_examples == 360
  np.testing.assert_array_equal(batches[-1]['mask'], [1] * 60 + [0] * 40)
  np.testing.assert_equal(batches, list(ds.eval_batches()))


def test_eval_across_processes_sees_every_example_once():
  shards = [list(data.build(DIGITS, 'test', batch_size=32, seed=0, process_index=p, process_count=3).eval_batches())
            for p in range(3)]
  assert len({len(batches) for batches in shards}) == 1  # Same step count on every process.
  labels = [b['label'][b['mask'] == 1] for batches in shards for b in batches]
  assert sum(len(part) for part in labels) == 360
  all_labels = data.build(DIGITS, 'test', batch_size=1, seed=0).source.labels
  np.testing.assert_array_equal(np.sort(np.concatenate(labels)), np.sort(all_labels))


def test_digits_augmentation_only_shifts():
  plain = next(data.build(DIGITS, 'train', batch_size=64, seed=5).train_batches())
  shifted = next(data.build(dict(DIGITS, augment=True), 'train', batch_size=64, seed=5).train_batches())
  np.testing.assert_array_equal(plain['label'], shifted['label'])
  padded = np.pad(plain['image'][..., 0], ((0, 0), (1, 1), (1, 1)))
  for image, canvas in zip(shifted['image'][..., 0], padded):
    assert any(np.array_equal(image, canvas[dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
  assert not np.array_equal(plain['image'], shifted['image'])


def test_digits_pad_centers_and_upsample_keeps_range():
  native = next(data.build(DIGITS, 'test', batch_size=8, seed=0).eval_batches())['image']
  padded = next(data.build(dict(DIGITS, image_size=16), 'test', batch_size=8, seed=0).eval_batches())['image']
  np.testing.assert_array_equal(padded[:, 4:12, 4:12], native)
  assert padded.sum() == native.sum()
  ds = data.build(dict(DIGITS, image_size=32, digits_resize='upsample'), 'test', batch_size=8, seed=0)
  upsampled = next(ds.eval_batches())['image']
  assert ds.image_shape == (32, 32, 1) and upsampled.shape == (8, 32, 32, 1)
  assert 0 <= upsampled.min() and upsampled.max() <= 1
  np.testing.assert_allclose(upsampled.mean(axis=(1, 2)), native.mean(axis=(1, 2)), atol=0.02)
  np.testing.assert_allclose(digits.bilinear_matrix(8, 32).sum(axis=1), 1, rtol=1e-6)


# --- synthetic, config errors -------------------------------------------------------------

def test_synthetic_is_fixed_shape_and_reuses_its_images():
  config = {'name': 'synthetic', 'image_size': 32, 'num_classes': 7, 'num_examples': 50}
  ds = data.build(config, 'train', batch_size=16, seed=0)
  first, second = _batches(ds.train_batches(), 2)
  assert first['image'].shape == (16, 32, 32, 3) and first['image'] is second['image']
  assert ds.image_dtype == first['image'].dtype == np.uint8  # Pixels travel, as photos' do.
  values = ds.model_input(first['image'])
  assert values.dtype == np.float32 and values.min() == -1 and values.max() == 1
  assert first['label'].max() < 7 and ds.num_classes == 7
  assert sum(b['mask'].sum() for b in ds.eval_batches()) == 50
  np.testing.assert_equal([first], _batches(data.build(config, 'train', batch_size=16, seed=0).train_batches(), 1))


@pytest.mark.parametrize('config,match', [
    ({'name': 'mnist'}, 'unknown'),
    ({'name': 'digits', 'colour': 1}, 'unknown config.data field'),
    ({'name': 'digits', 'preprocessing': 'vgg'}, 'imagefolder only'),
    ({'name': 'digits', 'num_classes': 1000}, 'num_classes'),
    ({'name': 'digits', 'image_size': 4}, 'image_size'),
    ({'name': 'digits', 'normalize': 'imagenet_mean'}, 'unknown config.data field'),  # it follows from name
    ({'name': 'cifar10', 'image_size': 224}, 'image_size'),
    ({'name': 'imagefolder', 'dir': '/nonexistent'}, 'preprocessing'),
    # An explicit 0 is an error, not the default (0 had silently meant 8, 32, 3 or 1000).
    ({'name': 'digits', 'image_size': 0}, 'image_size 0 would crop them'),
    ({'name': 'cifar10', 'image_size': 0}, r'image_size to 32 \(got 0\)'),
    ({'name': 'imagefolder', 'image_size': 0, 'preprocessing': 'vgg'}, 'positive whole config.data.image_size'),
    ({'name': 'synthetic', 'channels': 0}, r'positive .* got 224, 0, 1000, 10000'),
    ({'name': 'synthetic', 'num_classes': 0}, r'positive .* got 224, 3, 0, 10000'),
    # One class trains to loss 0 and top-1 1.0, learning nothing.
    ({'name': 'synthetic', 'num_classes': 1}, r'num_classes=1, but training a classifier needs at least 2 classes'),
])
def test_config_errors_are_one_line_data_errors(config, match):
  with pytest.raises(data.DataError, match=match) as excinfo:
    data.build(config, 'train', batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value)
  assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize('name', ['digits', 'cifar10', 'synthetic'])
def test_a_split_no_source_has_is_refused_by_each(name, tmp_path):
  # Synthetic data had taken any name: eval_split='tset' evaluated the training examples.
  config = {'name': name, 'dir': str(tmp_path)}
  config = {key: value for key, value in config.items() if key in data.effective_fields(config)}
  with pytest.raises(data.DataError, match=f"{name} has no split 'tset'; use one of .*'test'") as excinfo:
    data.build(config, 'tset', batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value)
  assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize('config', [
    {'name': 'mnist'}, {'name': 'digits', 'colour': 1}, {'name': 'digits', 'preprocessing': 'vgg'},
    {'name': 'cifar10', 'dir': '/nonexistent', 'image_size': 8}, {'name': 'imagefolder', 'dir': '/nonexistent'},
    # An existing directory: the options are refused before it is looked at.
    {'name': 'imagefolder', 'dir': '/', 'image_size': 8, 'preprocessing': 'vgg', 'resize': 'tf'},
    {'name': 'imagefolder', 'dir': '/', 'image_size': 8, 'preprocessing': 'resnet'},
    {'name': 'imagefolder', 'dir': '/', 'image_size': 8, 'preprocessing': 'vgg', 'color_distortion': True}])
def test_config_errors_that_need_no_data_are_found_without_reading_any(config):
  # What train_lib checks before it builds anything (a sweep, before its first run).
  with pytest.raises(data.DataError):
    data.check_config(config)


def test_a_buildable_config_passes_the_check_without_its_data_being_read(tmp_path):
  # Empty directories: the check looks at the path, not at what is in it.
  data.check_config({'name': 'cifar10', 'dir': str(tmp_path), 'image_size': 32})
  data.check_config({'name': 'cifar10', 'dir': str(tmp_path)})  # the size left to the data set: 32
  data.check_config({'name': 'imagefolder', 'dir': str(tmp_path), 'image_size': 224, 'preprocessing': 'vgg'})
  with pytest.raises(data.DataError, match='does not exist'):
    data.check_config({'name': 'cifar10', 'dir': str(tmp_path / 'missing')})


def test_unknown_split_and_bad_sharding():
  with pytest.raises(data.DataError, match='split'):
    data.build(DIGITS, 'holdout', batch_size=4, seed=0)
  with pytest.raises(data.DataError, match='process_index'):
    data.build(DIGITS, 'train', batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(data.DataError, match='start_step'):
    data.build(DIGITS, 'train', batch_size=4, seed=0).train_batches(-1)


@pytest.mark.parametrize('seed', [-1, 2**32, None, 1.5])
def test_a_seed_out_of_range_names_config_seed(seed):
  with pytest.raises(data.DataError, match=rf'^config.seed must be an integer in \[0, 2\*\*32\), got {seed}; set '
                                           r'config.seed to one in that range, e\.g\. 0\.$'):
    data.build(DIGITS, 'train', batch_size=4, seed=seed)


@pytest.mark.parametrize('config, batch_size, message', [
    # Read by truth value, 'False' had augmented; the others had failed deep in numpy or Python
    # ("'<' not supported between 'str' and 'int'").
    ({'name': 'digits', 'augment': 'False'}, 4, "config.data.augment='False' (str) must be True or False."),
    ({'name': 'imagefolder', 'color_distortion': 1}, 4, 'config.data.color_distortion=1 (int) must be True or False.'),
    ({'name': 'imagefolder', 'worker_processes': 'no'}, 4, "config.data.worker_processes='no' (str) must be True or "
                                                           'False.'),
    ({'name': 'digits', 'image_size': '16'}, 4, "config.data.image_size='16' (str) must be a whole number."),
    ({'name': 'synthetic', 'image_size': 8.5}, 4, 'config.data.image_size=8.5 (float) must be a whole number.'),
    ({'name': 'synthetic', 'channels': True}, 4, 'config.data.channels=True (bool) must be a whole number.'),
    ({'name': 'imagefolder', 'label_offset': 1.0}, 4, 'config.data.label_offset=1.0 (float) must be a whole '
                                                         'number.'),
    ({'name': 'digits'}, 4.0, 'batch_size must be a whole number, got 4.0.'),
])
def test_fields_of_the_wrong_type_are_refused_by_name_in_a_plain_dict(config, batch_size, message):
  # A ConfigDict keeps each field's type; a dict from a notebook does not.
  with pytest.raises(data.DataError, match=f'^{re.escape(message)}$'):
    data.build(config, 'train', batch_size=batch_size, seed=0)


def test_a_start_step_that_is_no_whole_number_is_refused():
  with pytest.raises(data.DataError, match=r'^start_step must be a whole number >= 0, got 1\.5\.$'):
    next(data.build(DIGITS, 'train', batch_size=4, seed=0).train_batches(1.5))


def test_labels_out_of_range_are_refused():
  loader = ConstantLoader(np.zeros((2, 4, 4, 1), np.float32))
  with pytest.raises(data.DataError, match=r'labels span \[0, 10\]'):
    Source(labels=np.array([0, 10]), num_classes=10, image_shape=(4, 4, 1), loader=loader, name='x')
  with pytest.raises(data.DataError, match='1-D'):
    Source(labels=np.zeros((2, 2), int), num_classes=10, image_shape=(4, 4, 1), loader=loader, name='x')


def test_works_with_a_config_dict():
  ml_collections = pytest.importorskip('ml_collections')
  config = ml_collections.ConfigDict({'name': 'digits', 'image_size': 8, 'digits_resize': 'pad',
                                      'preprocessing': 'none', 'augment': False})
  assert data.build(config, 'test', batch_size=8, seed=0).num_examples == 360


# Two values of each field in data.READ_ONLY_WITH, each a valid setting.
_TWO_VALUES = {'dir': ('/a', '/b'), 'digits_resize': ('pad', 'upsample'), 'label_offset': (0, 1),
               'on_bad_image': ('error', 'skip'), 'num_workers': (1, 2), 'worker_processes': (False, True),
               'color_distortion': (False, True), 'num_examples': (5, 6), 'channels': (1, 3), 'augment': (False, True),
               'resize': ('antialiased', 'slim')}


def test_the_table_of_fields_each_source_reads_is_what_building_it_reads(monkeypatch):
  # config_checks refuses an override of a field the run ignores by this table: a field read
  # by a source the table leaves out would be refused, one it names but nobody reads let through.
  from resnet_flax.data import builder, image_folder
  calls = []

  def image_folder_source(root, split, **kwargs):  # which options its preprocessing refuses is its own
    image_folder.get_preprocessing(kwargs['preprocessing'], kwargs['image_size'],
                                   color_distortion=kwargs['color_distortion'])
    calls.append(((root, split), kwargs))

  for module in (builder.digits, builder.cifar10, builder.synthetic):
    monkeypatch.setattr(module, 'build_source', lambda *args, **kwargs: calls.append((args, kwargs)))
  monkeypatch.setattr(image_folder, 'build_source', image_folder_source)
  assert sorted(_TWO_VALUES) == sorted(field for fields, _ in data.READ_ONLY_WITH for field in fields)
  settings = [{'name': name, 'preprocessing': 'none'} for name in data.NAMES if name != 'imagefolder']
  settings += [{'name': 'imagefolder', 'preprocessing': preprocessing} for preprocessing in ('vgg', 'inception')]
  for fields, readers in data.READ_ONLY_WITH:
    for field in fields:
      for setting in settings:
        calls.clear()
        refused = []
        for value in _TWO_VALUES[field]:
          try:
            builder._source({'image_size': 8, **setting, field: value}, 'train', batch_size=4, seed=0)
          except data.DataError:
            refused.append(value)
        reads = all(setting[key] in values for key, values in readers.items())
        if setting['name'] in readers['name'] and not reads:
          # Read by the source, but not with this setting: it refuses the value that would matter.
          assert len(refused) == 1, f'{field} with {setting}'
        else:
          assert not refused and (calls[0] != calls[1]) == reads, f'{field} with {setting}'


def test_effective_fields_are_what_building_reads(monkeypatch):
  # eval.py compares a run's data fields with its own through effective_fields: a default given
  # explicitly must build what leaving it out builds, and a dropped field must be one it ignores.
  from resnet_flax.data import builder, image_folder
  calls = []
  for module in (builder.digits, builder.cifar10, builder.synthetic, image_folder):
    monkeypatch.setattr(module, 'build_source', lambda *args, **kwargs: calls.append((args, kwargs)))
  for setting in ({'name': 'digits'}, {'name': 'cifar10'}, {'name': 'synthetic'},
                  {'name': 'imagefolder', 'image_size': 8, 'preprocessing': 'inception'}):
    effective = data.effective_fields(setting)
    calls.clear()
    builder._source(setting, 'train', batch_size=4, seed=0)
    builder._source(effective, 'train', batch_size=4, seed=0)
    assert calls[0] == calls[1], setting
    assert data.effective_fields(effective) == effective
  for ignored in ({'label_offset': 1}, {'dir': '/x'}, {'resize': 'slim'}):
    assert data.effective_fields({'name': 'digits', **ignored}) == data.effective_fields({'name': 'digits'})
  synthetic = data.effective_fields({'name': 'synthetic'})
  assert data.effective_fields({'name': 'synthetic', 'num_classes': 1000}) == synthetic
  assert data.effective_fields({'name': 'cifar10'})['image_size'] == 32
  assert 'color_distortion' not in data.effective_fields({'name': 'imagefolder', 'preprocessing': 'vgg'})


def test_digits_upsampling_is_half_pixel_bilinear():
  # Mutant: align-corners sampling instead of half-pixel centers. Reference: jax.image.resize
  # (the docstring's "as PIL and jax.image"); upsampling has no antialiasing to differ by.
  jax = pytest.importorskip('jax')
  image = np.random.default_rng(0).random((8, 8)).astype(np.float32)
  ours = digits.resize(image[None], 20, 'upsample')[0]
  reference = np.asarray(jax.image.resize(image, (20, 20), 'bilinear'))
  np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_digits_pad_at_an_odd_size_puts_the_extra_pixel_after():
  # Mutant: the pad offset rounded up. Convention pinned: (size - 8) // 2 zeros before the digit.
  native = next(data.build(DIGITS, 'test', batch_size=4, seed=0).eval_batches())['image']
  padded = next(data.build(dict(DIGITS, image_size=11), 'test', batch_size=4, seed=0).eval_batches())['image']
  np.testing.assert_array_equal(padded[:, 1:9, 1:9], native)


def test_synthetic_labels_cover_every_class_and_follow_the_seed():
  # Mutants: labels drawn from num_classes - 1 classes; the seed ignored.
  config = {'name': 'synthetic', 'image_size': 4, 'num_classes': 3, 'num_examples': 300}
  ds = data.build(config, 'train', batch_size=4, seed=0)
  assert set(np.unique(ds.source.labels)) == {0, 1, 2}
  other = data.build(config, 'train', batch_size=4, seed=1)
  assert not np.array_equal(ds.source.labels, other.source.labels)
  assert not np.array_equal(next(ds.train_batches())['image'], next(other.train_batches())['image'])


def test_synthetic_channels_and_read_only_images():
  # Mutants: `channels` ignored in the image draw; the shared batch left writable (a consumer
  # that normalizes in place would change every later batch).
  ds = data.build({'name': 'synthetic', 'image_size': 4, 'channels': 1, 'num_examples': 8}, 'train',
                  batch_size=2, seed=0)
  batch = next(ds.train_batches())
  assert ds.image_shape == (4, 4, 1) and batch['image'].shape == (2, 4, 4, 1)
  with pytest.raises(ValueError, match='read-only'):
    batch['image'][0, 0, 0, 0] = 0


def test_synthetic_defaults():
  # Mutants: builder defaults for synthetic (num_examples 10,000, 1000 classes, 224 pixels, 3 channels).
  fields = data.effective_fields({'name': 'synthetic'})
  assert (fields['num_examples'], fields['num_classes'], fields['image_size'], fields['channels']) == (
      10_000, 1000, 224, 3)


def test_build_passes_the_process_share_through():
  # Mutant: builder.build dropping process_index or process_count on the way to Dataset.
  ds = data.build(DIGITS, 'train', batch_size=16, seed=1, process_index=3, process_count=4)
  assert (ds.process_index, ds.process_count, ds.batch_size) == (3, 4, 16)


def test_augmentation_defaults_follow_the_recipes():
  # Mutant: builder's default `augment` off for imagefolder (only cifar10 on). The module
  # docstring's contract: False for digits (the reference script), True for cifar10 and imagefolder.
  assert data.effective_fields({'name': 'digits'})['augment'] is False
  assert data.effective_fields({'name': 'cifar10'})['augment'] is True
  assert data.effective_fields({'name': 'imagefolder', 'image_size': 8, 'preprocessing': 'vgg'})['augment'] is True
