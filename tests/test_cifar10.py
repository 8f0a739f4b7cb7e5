"""CIFAR-10's python-pickle batches: values, augmentation, files that are not CIFAR-10 (malicious
pickles refused without running code), missing or misplaced files."""

import codecs
import io
import os
import pickle
import struct

import numpy as np
import pytest

from resnet_flax import data
from resnet_flax.data import cifar10, safe_pickle


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
    protocol = {'python3': 4, 'python3_protocol_2': 2, 'python3_protocol_5': 5}[written_by]
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


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


# Protocol 5 (numpy's _frombuffer) and an empty batch (bytes() at protocol 2) had been refused
# as files that "may run code".
@pytest.mark.parametrize('written_by', ['python2', 'python3', 'python3_protocol_2', 'python3_protocol_5'])
def test_cifar10_fixture_loads_with_correct_values(tmp_path, written_by):
  expected = _make_cifar(tmp_path, sizes=(3, 3, 0, 3, 2), written_by=written_by)
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


class _Calls:
  def __init__(self, function, *arguments):
    self.function, self.arguments = function, arguments

  def __reduce__(self):
    return self.function, self.arguments


def test_a_non_contiguous_array_at_protocol_5_loads_as_it_was(tmp_path):
  for rows in (np.arange(2 * 3072, dtype=np.uint8).reshape(3072, 2).T,  # Fortran order
               np.arange(24, dtype=np.uint8).reshape(2, 3, 4).transpose(1, 0, 2)):  # numpy adds its axis order
    (tmp_path / 'data_batch_1').write_bytes(pickle.dumps({b'data': rows, b'labels': [0, 1]}, protocol=5))
    np.testing.assert_array_equal(safe_pickle.load(tmp_path / 'data_batch_1')[b'data'], rows)


@pytest.mark.parametrize('call, refusal', [
    (_Calls(bytes, 10**6), r'bytes\(1000000,\) is not an empty byte string'),
    (_Calls(np._core.numeric._frombuffer, b'\0' * 8, np.dtype(object), (1,), 'C'),
     'an array at protocol 5 must be plain bytes of a numeric dtype')])
def test_the_byte_and_protocol_5_constructors_build_nothing_else(tmp_path, call, refusal):
  (tmp_path / 'data_batch_1').write_bytes(pickle.dumps({b'labels': call}, protocol=2))
  with pytest.raises(data.DataError, match=refusal):
    safe_pickle.load(tmp_path / 'data_batch_1')


def test_cifar10_rejects_wrong_shapes_and_labels(tmp_path):
  _make_cifar(tmp_path)
  _write_cifar_batch(tmp_path / 'test_batch', {b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]})
  with pytest.raises(data.DataError, match=r'uint8 \(N, 3072\)'):
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'test', batch_size=4, seed=0)
  for labels in ([0, 10], [True, False]):  # a bool is an int to Python, not a CIFAR label
    _write_cifar_batch(tmp_path / 'test_batch', {b'data': np.zeros((2, 3072), np.uint8), b'labels': labels})
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


def test_cifar10_normalization_constants_are_the_training_sets():
  # Mutants: MEAN in BGR order; the often-copied wrong STD (0.2023, 0.1994, 0.2010). Reference:
  # the published per-channel statistics of the 50,000 CIFAR-10 training images, RGB order.
  np.testing.assert_allclose(cifar10.MEAN, [0.4914, 0.4822, 0.4465], atol=1e-4)
  np.testing.assert_allclose(cifar10.STD, [0.2470, 0.2435, 0.2616], atol=1e-4)
  # And the mapping is (x / 255 - mean) / std per channel, in RGB order, computed by hand for one pixel.
  pixel = np.array([[[[255, 0, 128]]]], np.uint8)
  expected = [(1 - 0.4914) / 0.2470, (0 - 0.4822) / 0.2435, (128 / 255 - 0.4465) / 0.2616]
  np.testing.assert_allclose(cifar10.normalize(pixel)[0, 0, 0], expected, rtol=1e-3)


def test_cifar10_validation_is_the_test_batch(tmp_path):
  # Mutant: SPLITS['validation'] pointing at the training files.
  expected = _make_cifar(tmp_path)
  images, labels = cifar10.read_split(str(tmp_path), 'validation')
  np.testing.assert_array_equal(images, expected['test_batch'][0])
  np.testing.assert_array_equal(labels, expected['test_batch'][1])


def test_a_negative_cifar_label_is_refused_naming_the_file(tmp_path):
  # Mutant: read_batch's label check without `0 <= label` (Source then refuses it, without naming the file).
  _make_cifar(tmp_path)
  _write_cifar_batch(tmp_path / 'test_batch', {b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, -1]})
  with pytest.raises(data.DataError, match=r"test_batch: b'labels' is not 2 integers in 0..9"):
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'test', batch_size=4, seed=0)


class _Calls:
  """Pickles as a call of `function(*arguments)`."""

  def __init__(self, function, *arguments):
    self.function, self.arguments = function, arguments

  def __reduce__(self):
    return self.function, self.arguments


@pytest.mark.parametrize('function', ['save', 'load'])
def test_numpy_functions_other_than_the_array_constructors_are_refused(tmp_path, function):
  # Mutants: safe_pickle allowing any numpy global, or np.load / np.fromfile besides the array
  # constructors (np.save writes a file of the pickle's choosing; np.load reads one).
  marker = tmp_path / 'written.npy'
  np.save(tmp_path / 'existing.npy', np.zeros(3))
  evil = (_Calls(np.save, str(marker), [1]) if function == 'save'
          else _Calls(np.load, str(tmp_path / 'existing.npy')))
  (tmp_path / 'data_batch_1').write_bytes(pickle.dumps({b'data': evil, b'labels': [0]}, protocol=2))
  with pytest.raises(data.DataError, match=rf'^refusing to unpickle numpy\.{function} from '):
    safe_pickle.load(tmp_path / 'data_batch_1')
  assert not marker.exists()


def test_a_refused_global_is_not_reported_as_a_damaged_file(tmp_path):
  # Mutant: load() without `except DataError: raise`, which re-wraps the refusal as
  # "cannot unpickle ...: the file is damaged" (the existing test's re.search still matches).
  (tmp_path / 'data_batch_1').write_bytes(pickle.dumps(_RunsCode(print, 'x'), protocol=2))
  with pytest.raises(data.DataError, match=r'^refusing to unpickle (__builtin__|builtins)\.print from ') as excinfo:
    safe_pickle.load(tmp_path / 'data_batch_1')
  assert 'damaged' not in str(excinfo.value)


@pytest.mark.parametrize('keep', [0, 0.5], ids=['empty', 'truncated'])
def test_an_empty_or_truncated_batch_file_is_a_data_error(tmp_path, keep):
  # Mutant: load() catching only UnpicklingError: an empty file's EOFError escaped as is.
  _make_cifar(tmp_path)
  whole = (tmp_path / 'test_batch').read_bytes()
  (tmp_path / 'test_batch').write_bytes(whole[:int(len(whole) * keep)])
  with pytest.raises(data.DataError, match=r'cannot unpickle .*test_batch: .*the file is damaged') as excinfo:
    data.build({'name': 'cifar10', 'dir': str(tmp_path)}, 'test', batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value)
