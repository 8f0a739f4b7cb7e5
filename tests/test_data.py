"""Input pipelines: splits, determinism and exact resume, sharding, padding, CIFAR-10 files
(and refusing malicious ones), synthetic data, prefetching, config errors, and image folder
trees that cannot train (symlink loops, one class, batches of unreadable files).

Image folders and their preprocessing are tested in test_preprocessing.py, config.data.dir
mistakes in test_data_dir.py."""

import gc
import codecs
import io
import itertools
import os
import pickle
import re
import struct
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from resnet_flax import data
from resnet_flax.data import augment, cifar10, digits, safe_pickle, sampling
from resnet_flax.data.pipeline import SkippedImageWarning, Source
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


def test_random_crop_with_padding_is_a_shift():
  images = np.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
  out = augment.random_crop_with_padding(images, 2, np.random.default_rng(0))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for image, canvas in zip(out, padded):
    assert any(np.array_equal(image, canvas[dy:dy + 5, dx:dx + 5]) for dy in range(5) for dx in range(5))


# --- CIFAR-10 ---------------------------------------------------------------------------

class _Python2Pickler(pickle._Pickler):
  """Writes byte strings as Python 2 wrote str (SHORT_BINSTRING/BINSTRING), like the real files."""
  dispatch = pickle._Pickler.dispatch.copy()

  def _save_python2_str(self, obj):
    size = len(obj)
    self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj if size < 256
               else pickle.BINSTRING + struct.pack('<i', size) + obj)
    self.memoize(obj)

  dispatch[bytes] = _save_python2_str


def _write_cifar_batch(path, batch, written_by='python2'):
  if written_by == 'python2':  # Protocol 2, numpy 1.x module names: what cifar-10-python.tar.gz contains.
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(batch)
    path.write_bytes(buffer.getvalue().replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n'))
  else:  # Re-pickled by Python 3 and numpy 2; at protocol 2 its bytes are _codecs.encode(str, 'latin1').
    path.write_bytes(pickle.dumps(batch, protocol={'python3': 4, 'python3_protocol_2': 2}[written_by]))


def _make_cifar(directory, sizes=(3, 3, 3, 3, 2), test_size=5, written_by='python2'):
  rng = np.random.default_rng(0)
  expected = {}
  for name, size in [*((f'data_batch_{i + 1}', n) for i, n in enumerate(sizes)), ('test_batch', test_size)]:
    images = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
    labels = [int(label) for label in rng.integers(0, 10, size)]
    rows = images.transpose(0, 3, 1, 2).reshape(size, 3072)  # R plane, G plane, B plane.
    _write_cifar_batch(directory / name, {b'batch_label': name.encode(), b'labels': labels, b'data': rows,
                                          b'filenames': [b'x.png'] * size}, written_by)
    expected[name] = (images, labels)
  return expected


@pytest.mark.parametrize('written_by', ['python2', 'python3', 'python3_protocol_2'])
def test_cifar10_fixture_loads_with_correct_values(tmp_path, written_by):
  expected = _make_cifar(tmp_path, written_by=written_by)
  train_images = np.concatenate([expected[f'data_batch_{i}'][0] for i in range(1, 6)])
  train_labels = sum((expected[f'data_batch_{i}'][1] for i in range(1, 6)), [])
  images, labels = cifar10.read_split(str(tmp_path), 'train')
  np.testing.assert_array_equal(images, train_images)
  np.testing.assert_array_equal(labels, train_labels)
  ds = data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'test', batch_size=4, seed=0)
  assert (ds.num_examples, ds.num_classes, ds.image_shape) == (5, 10, (32, 32, 3))
  batches = list(ds.eval_batches())
  test_images, test_labels = expected['test_batch']
  np.testing.assert_allclose(np.concatenate([b['image'] for b in batches])[:5],
                             (test_images / 255 - cifar10.MEAN) / cifar10.STD, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:5], test_labels)


def test_cifar10_augmentation_is_crop_and_flip(tmp_path):
  _make_cifar(tmp_path)
  config = {'name': 'cifar10', 'dir': str(tmp_path)}
  plain = next(data.build(dict(config, augment=False), 'train', batch_size=8, seed=0).train_batches())
  augmented = next(data.build(config, 'train', batch_size=8, seed=0).train_batches())  # augment defaults on
  np.testing.assert_array_equal(plain['label'], augmented['label'])
  assert not np.array_equal(plain['image'], augmented['image'])
  zero = (0 - cifar10.MEAN) / cifar10.STD  # What the zero padding becomes after normalization.
  for image, source in zip(augmented['image'], plain['image']):
    canvas = np.broadcast_to(zero, (40, 40, 3)).copy()
    canvas[4:36, 4:36] = source
    candidates = [canvas[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.allclose(image, c) for c in candidates)


class _RunsCode:
  def __init__(self, function, argument):
    self.function, self.argument = function, argument

  def __reduce__(self):
    return self.function, (self.argument,)


@pytest.mark.parametrize('payload', ['os.system', 'builtins.exec'])
def test_malicious_cifar_pickle_is_refused_without_running_code(tmp_path, payload):
  _make_cifar(tmp_path)
  marker = tmp_path / 'pwned'
  if payload == 'os.system':
    evil = _RunsCode(os.system, f'touch {marker}')
  else:
    evil = _RunsCode(exec, f'open({str(marker)!r}, "w").close()')
  (tmp_path / 'data_batch_3').write_bytes(pickle.dumps({b'data': evil, b'labels': [0]}, protocol=2))
  with pytest.raises(data.DataError, match='refusing to unpickle') as excinfo:
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'train', batch_size=4, seed=0)
  assert 'data_batch_3' in str(excinfo.value) and '\n' not in str(excinfo.value)
  assert not marker.exists()


class _Rot13:
  def __reduce__(self):
    return codecs.encode, ('abc', 'rot13')  # pickled as _codecs.encode, like Python 3's latin-1 bytes


def test_codecs_encode_is_let_through_for_latin1_bytes_only(tmp_path):
  (tmp_path / 'data_batch_1').write_bytes(pickle.dumps({b'labels': _Rot13()}, protocol=2))
  with pytest.raises(data.DataError, match=r"_codecs.encode\(str, 'rot13'\) is not a byte string"):
    safe_pickle.load(tmp_path / 'data_batch_1')


def test_cifar10_rejects_wrong_shapes_and_labels(tmp_path):
  _make_cifar(tmp_path)
  _write_cifar_batch(tmp_path / 'test_batch', {b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]})
  with pytest.raises(data.DataError, match=r'uint8 \(N, 3072\)'):
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'test', batch_size=4, seed=0)
  _write_cifar_batch(tmp_path / 'test_batch', {b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 10]})
  with pytest.raises(data.DataError, match='labels'):
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'test', batch_size=4, seed=0)


def test_cifar10_missing_files_name_what_is_expected(tmp_path):
  with pytest.raises(data.DataError, match='cifar-10-batches-py') as excinfo:
    data.build({'name': 'cifar10', 'dir': str(tmp_path / 'nowhere')}, 'train', batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value)
  _make_cifar(tmp_path)
  (tmp_path / 'data_batch_4').unlink()
  with pytest.raises(data.DataError, match='data_batch_4'):
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'train', batch_size=4, seed=0)


@pytest.mark.parametrize('make', [os.mkdir, os.mkfifo], ids=['directory', 'fifo'])
def test_a_cifar_batch_that_is_not_a_file_is_named_as_what_it_is(tmp_path, make):
  _make_cifar(tmp_path)
  (tmp_path / 'data_batch_2').unlink()
  make(tmp_path / 'data_batch_2')  # A FIFO had blocked the read for ever; a directory read as "does not exist".
  kind = 'a directory' if make is os.mkdir else r'a named pipe \(FIFO\)'
  with pytest.raises(data.DataError, match=f'data_batch_2 is {kind}, not a CIFAR-10 batch file'):
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'train', batch_size=4, seed=0)


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
    ({'name': 'imagefolder', 'image_size': 0, 'preprocessing': 'vgg'}, 'positive config.data.image_size'),
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


@pytest.mark.parametrize('config', [
    {'name': 'mnist'}, {'name': 'digits', 'colour': 1}, {'name': 'digits', 'preprocessing': 'vgg'},
    {'name': 'cifar10', 'dir': '/nonexistent', 'image_size': 8}, {'name': 'imagefolder', 'dir': '/nonexistent'}])
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


def test_a_negative_seed_names_config_seed():
  with pytest.raises(data.DataError, match=r'^config.seed must be a non-negative integer, got -1; set config.seed '
                                           r'to 0 or more\.$'):
    data.build(DIGITS, 'train', batch_size=4, seed=-1)


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


# --- prefetch ---------------------------------------------------------------------------

def test_prefetch_preserves_order_and_ends():
  assert list(data.prefetch(iter(range(10)), buffer_size=3)) == list(range(10))


def test_prefetch_propagates_the_producers_exception():
  def failing():
    yield 1
    yield 2
    raise KeyError('broken source')

  iterator = data.prefetch(failing())
  assert [next(iterator), next(iterator)] == [1, 2]
  with pytest.raises(KeyError, match='broken source'):
    next(iterator)
  iterator.thread.join(timeout=2)
  assert not iterator.thread.is_alive()


def _wait_until_dead(thread, seconds=2.0):
  deadline = time.monotonic() + seconds
  while thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
  return not thread.is_alive()


def test_prefetch_leaves_no_thread_when_the_consumer_stops_early():
  closed = threading.Event()

  def endless():
    try:
      yield from itertools.count()
    finally:
      closed.set()

  with data.prefetch(endless()) as iterator:
    assert next(iterator) == 0
  assert _wait_until_dead(iterator.thread) and closed.is_set()

  dropped = data.prefetch(itertools.count())
  next(dropped)
  thread = dropped.thread
  del dropped
  gc.collect()
  assert _wait_until_dead(thread) and thread.daemon


def test_prefetched_training_batches_equal_direct_ones():
  ds = data.build(DIGITS, 'train', batch_size=32, seed=0)
  with data.prefetch(ds.train_batches(), buffer_size=2) as iterator:
    np.testing.assert_equal(_batches(iterator, 4), _batches(ds.train_batches(), 4))


# --- image folder trees that cannot train -------------------------------------------------

def _image_tree(root, classes=('a', 'b'), per_class=4, split='train'):
  for name in classes:
    directory = root / split / name
    directory.mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(directory / f'{i}.jpg')
  return root


def _folder(root, **extra):
  return {'name': 'imagefolder', 'dir': str(root), 'image_size': 16, 'preprocessing': 'vgg', 'num_workers': 1,
          **extra}


@pytest.mark.parametrize('link,target', [
    ('train/a/loop', '.'),  # itself
    ('train/a/up', '..'),  # the split directory, which holds train/a again
    ('elsewhere/back', '../train/a'),  # a loop through two links: train/a/out -> elsewhere -> train/a
])
def test_a_symlink_loop_is_refused_by_name(tmp_path, link, target):
  root = _image_tree(tmp_path)
  (root / 'elsewhere').mkdir()
  (root / 'train' / 'a' / 'out').symlink_to(root / 'elsewhere')
  (root / link).symlink_to(target)
  expected = f'symlink {os.path.realpath(tmp_path)}/{link} -> {target} loops back into'  # Where the link is.
  with pytest.raises(data.DataError, match=re.escape(expected)) as excinfo:
    data.build(_folder(root), 'train', batch_size=4, seed=0)  # Had scanned 168 paths for 8 images.
  assert '\n' not in str(excinfo.value)


def test_a_class_folder_linked_to_a_missing_target_is_refused(tmp_path):
  root = _image_tree(tmp_path)
  (root / 'train' / 'c').symlink_to(tmp_path / 'unmounted')  # had trained on 2 classes of 3 without a word
  with pytest.raises(data.DataError, match=re.escape(f"{root / 'train' / 'c'} is a symlink to "
                                                     f"{tmp_path / 'unmounted'}, which does not exist")):
    data.build(_folder(root), 'train', batch_size=4, seed=0)


def test_symlinks_to_directories_elsewhere_count_each_path(tmp_path):
  root = _image_tree(tmp_path)
  _image_tree(tmp_path / 'extra', classes=('more',), per_class=2)
  (root / 'train' / 'a' / 'more').symlink_to(root / 'extra' / 'train' / 'more')
  (root / 'train' / 'b' / 'same').symlink_to(root / 'extra' / 'train' / 'more')  # Not a loop: counted again.
  ds = data.build(_folder(root), 'train', batch_size=4, seed=0)
  np.testing.assert_array_equal(ds.source.labels, [0] * 6 + [1] * 6)
  assert ds.source.loader.paths[4:6] == tuple(str(root / 'train' / 'a' / 'more' / f'{i}.jpg') for i in range(2))


@pytest.mark.parametrize('split,label_offset', [('train', 0), ('train', 1), ('validation', 0)])
def test_one_class_folder_is_refused(tmp_path, split, label_offset):
  root = _image_tree(tmp_path / 'data', classes=('n01440764',))  # data.dir one level too deep looks like this
  _image_tree(root, classes=('n01440764',), split='val')
  with pytest.raises(data.DataError, match=r"train has one class folder, 'n01440764', but training a classifier "
                                           r"needs at least 2 classes; set config.data.dir to the directory "
                                           r"holding train/ and val/") as excinfo:
    data.build(_folder(root, label_offset=label_offset), split, batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value) and str(root / 'train') in str(excinfo.value)


def test_a_validation_split_with_one_class_present_keeps_the_training_classes(tmp_path):
  root = _image_tree(tmp_path)
  _image_tree(root, classes=('b',), split='val')
  ds = data.build(_folder(root), 'validation', batch_size=4, seed=0)
  assert ds.num_classes == 2 and set(ds.source.labels.tolist()) == {1}


def test_images_in_every_format_torchvision_lists_are_read_and_other_files_are_not(tmp_path):
  # .bmp and .webp files had been left out without a word.
  directory = tmp_path / 'train' / 'a'
  _image_tree(tmp_path, classes=('b',))
  directory.mkdir(parents=True)
  pixels = np.full((20, 24, 3), 90, np.uint8)
  for extension in ('jpg', 'JPEG', 'png', 'ppm', 'bmp', 'tif', 'tiff', 'webp'):
    Image.fromarray(pixels).save(directory / f'x.{extension}')
  Image.fromarray(pixels[..., 0]).save(directory / 'x.pgm')
  (directory / 'labels.txt').write_text('not an image')
  dataset = data.build(_folder(tmp_path), 'train', batch_size=4, seed=0)
  assert dataset.num_examples == 9 + 4
  batches = list(dataset.eval_batches())  # every file decoded: an unreadable one would raise
  assert sum(int(batch['mask'].sum()) for batch in batches) == 13


def test_a_skipped_file_is_one_warning_line_without_the_skip_advice(tmp_path):
  root = _image_tree(tmp_path)
  (root / 'train' / 'a' / 'broken.jpg').write_bytes(b'not a jpeg')
  ds = data.build(_folder(root, on_bad_image='skip'), 'train', batch_size=9, seed=0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    batch = next(ds.eval_batches())
  assert batch['mask'].sum() == 8
  assert [w.category for w in caught] == [SkippedImageWarning]
  # As the default `showwarning` prints it: the location line used to be followed by a source line of the pipeline.
  printed = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno)
  assert printed.count('\n') == 1 and 'broken.jpg' in printed and 'replace or delete the file' in printed
  assert 'on_bad_image' not in printed  # It is already 'skip'.


def _in_a_thread(function, timeout_s=30):
  """`function()`'s exception or result, or a failed test if it is still running after `timeout_s`."""
  outcome = {}

  def run():
    try:
      outcome['result'] = function()
    except Exception as error:  # pylint: disable=broad-except
      outcome['error'] = error
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(timeout_s)
  assert not thread.is_alive(), f'still running after {timeout_s} s'
  return outcome


@pytest.mark.parametrize('on_bad_image', ['error', 'skip'])
def test_a_named_pipe_among_the_images_is_refused_not_read(tmp_path, on_bad_image):
  root = _image_tree(tmp_path)
  os.mkfifo(root / 'train' / 'a' / 'fifo.jpg')  # Opening it for reading had waited for a writer for ever.
  ds = data.build(_folder(root, on_bad_image=on_bad_image), 'train', batch_size=9, seed=0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    outcome = _in_a_thread(lambda: next(ds.eval_batches()))
  problem = f"image {root / 'train' / 'a' / 'fifo.jpg'} is a named pipe (FIFO), not an image file"
  if on_bad_image == 'error':
    assert isinstance(outcome['error'], data.DataError) and problem in str(outcome['error'])
  else:
    assert outcome['result']['mask'].sum() == 8
    assert [str(w.message) for w in caught if problem in str(w.message)]


def test_a_skipped_training_image_is_a_masked_copy_of_a_batch_mate(tmp_path):
  # Train-mode batch norm averages over every slot, masked or not: a zero image would skew its statistics.
  root = _image_tree(tmp_path)
  for path in (root / 'train').glob('*/*.jpg'):  # no black image: a copy must differ from a zero slot
    Image.fromarray(np.full((20, 24, 3), 100 + int(path.stem), np.uint8)).save(path)
  (root / 'train' / 'a' / 'broken.jpg').write_bytes(b'not a jpeg')
  ds = data.build(_folder(root, on_bad_image='skip'), 'train', batch_size=9, seed=0)
  with pytest.warns(SkippedImageWarning):
    batch = next(ds.train_batches())
  (skipped,) = np.flatnonzero(batch['mask'] == 0)
  assert batch['image'][skipped].any()
  assert any(np.array_equal(batch['image'][skipped], batch['image'][i]) for i in np.flatnonzero(batch['mask']))


def test_a_training_batch_with_no_readable_image_is_refused(tmp_path):
  root = _image_tree(tmp_path, per_class=2)
  for path in (root / 'train').glob('*/*.jpg'):
    path.write_bytes(b'not a jpeg')
  ds = data.build(_folder(root, on_bad_image='skip'), 'train', batch_size=4, seed=0)
  with pytest.warns(SkippedImageWarning), pytest.raises(
      data.DataError, match=r'imagefolder/train: no readable image in the training batch of step 0: all 4 of its '
                            r'files were skipped \(the first: cannot decode image .*train/[ab]/[01]\.jpg') as excinfo:
    next(ds.train_batches())  # Had trained on an all-zero, all-masked batch.
  assert '\n' not in str(excinfo.value)
