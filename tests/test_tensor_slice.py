"""V1 (TensorSlice) checkpoint reader: TF-written fixtures, assembly of slices, damage, live TF.

The fixtures under fixtures/tensor_slice/ come from real TensorFlow (make_fixtures.py there).
The `live` test compares with TensorFlow itself and skips when it is not importable (run it
with the TF venv: /work/tfenv/bin/python -m pytest tests/test_tensor_slice.py).
"""

from __future__ import annotations

import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from resnet_flax.slim import sstable
from resnet_flax.slim import tensor_bundle
from resnet_flax.slim import tensor_slice

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tensor_slice')
V2_TINY = os.path.join(os.path.dirname(FIXTURES), 'slim_ckpt', 'v1_tiny_10', 'model.ckpt')
CASES = {'dtypes': 'model.ckpt', 'partitioned': 'model.ckpt', 'saver': 'model.ckpt-3'}
REFUSED = {('dtypes', 'net/string'): 'dtype string', ('partitioned', 'gappy'): 'cover only 6 of'}


def _path(case: str) -> str:
  return os.path.join(FIXTURES, case, CASES.get(case, 'model.ckpt'))


def _assert_same(got: np.ndarray, want: np.ndarray, name: str) -> None:
  assert got.dtype == want.dtype and got.shape == want.shape, name
  np.testing.assert_array_equal(got, want, err_msg=name)
  if got.dtype.kind == 'f':  # -0.0 must survive: compare bits
    assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize('case', sorted(CASES))
def test_fixture_reads_as_expected(case):
  reader = tensor_bundle.CheckpointReader(_path(case))
  assert isinstance(reader, tensor_slice.TensorSliceReader)
  expected = np.load(os.path.join(FIXTURES, case, 'expected.npz'))
  variables = reader.variables()
  assert set(expected.files) | {n for c, n in REFUSED if c == case} == set(variables)
  for name in expected.files:
    assert name in reader
    assert variables[name] == (expected[name].dtype, expected[name].shape), name
    _assert_same(reader.read(name), expected[name], name)


def test_dtypes_fixture_covers_scalar_int64_bool_and_nonfinite():
  reader = tensor_bundle.CheckpointReader(_path('dtypes'))
  step = reader.read('global_step')
  assert step.dtype == np.int64 and step.shape == () and step == 123456789012
  assert reader.read('net/bool').dtype == bool
  assert reader.read('net/empty').shape == (0, 3)
  weights = reader.read('net/conv1/weights')
  assert np.isnan(weights.flat[0]) and np.isinf(weights.flat[1]) and np.signbit(weights.flat[3])
  weights[...] = 0  # fresh, writable
  assert not np.all(reader.read('net/conv1/weights') == 0)


@pytest.mark.parametrize('case,name', sorted(REFUSED))
def test_refused_with_clear_message(case, name):
  reader = tensor_bundle.CheckpointReader(_path(case))
  assert reader.variables()[name][0] == np.dtype(object) or case == 'partitioned'
  with pytest.raises(ValueError, match=REFUSED[case, name]) as info:
    reader.read(name)
  assert _path(case) in str(info.value) and '\n' not in str(info.value)


def test_path_forms_and_missing_name(tmp_path):
  saver_dir = os.path.join(FIXTURES, 'saver')
  for path in (saver_dir, _path('saver')):
    reader = tensor_bundle.CheckpointReader(path)
    assert isinstance(reader, tensor_slice.TensorSliceReader)
    assert os.path.samefile(reader.prefix, _path('saver'))
  assert 'nope' not in reader
  with pytest.raises(KeyError, match='nope'):
    reader.read('nope')
  # V2 paths still get the V2 reader.
  assert type(tensor_bundle.CheckpointReader(V2_TINY)) is tensor_bundle.CheckpointReader


def test_sharded_v1_files(tmp_path):
  # TF names V1 shards PREFIX-00000-of-0000N; a variable's slices may sit in different shards.
  for i, case in enumerate(('dtypes', 'saver')):
    shutil.copy(_path(case), tmp_path / f'model.ckpt-{i:05d}-of-00002')
  reader = tensor_bundle.CheckpointReader(tmp_path / 'model.ckpt')
  assert len(reader.files) == 2
  _assert_same(reader.read('resnet/split'),
               np.load(os.path.join(FIXTURES, 'saver', 'expected.npz'))['resnet/split'], 'split')
  assert reader.read('net/int8').tolist() == [-128, -1, 0, 1, 127]


def test_load_variables_on_v1_tiny_model_matches_v2():
  from resnet_flax import models
  from resnet_flax import slim

  model = models.get_model('resnet_v1_tiny', num_classes=10)
  v1 = slim.load_variables(os.path.join(FIXTURES, 'v1_tiny', 'model.ckpt'), model,
                           image_shape=(32, 32, 3))
  v2 = slim.load_variables(V2_TINY, model, image_shape=(32, 32, 3))
  import jax
  leaves1, tree1 = jax.tree_util.tree_flatten(v1)
  leaves2, tree2 = jax.tree_util.tree_flatten(v2)
  assert tree1 == tree2 and len(leaves1) > 50
  for a, b in zip(leaves1, leaves2):
    _assert_same(np.asarray(a), np.asarray(b), 'leaf')


@pytest.mark.parametrize('cut', [0, 10, 48, -1, -49, -300])
def test_truncated_file_raises_one_line_value_error(tmp_path, cut):
  with open(os.path.join(FIXTURES, 'v1_tiny', 'model.ckpt'), 'rb') as file:
    data = file.read()
  path = tmp_path / 'model.ckpt'
  path.write_bytes(data[:cut])
  with pytest.raises(ValueError) as info:
    tensor_bundle.CheckpointReader(path)
  assert str(path) in str(info.value) and '\n' not in str(info.value)


@pytest.mark.parametrize('where', [100, 5000, 60000, 105000])
def test_corrupted_byte_raises_one_line_value_error(tmp_path, where):
  with open(os.path.join(FIXTURES, 'v1_tiny', 'model.ckpt'), 'rb') as file:
    data = bytearray(file.read())
  data[where] ^= 0x40
  path = tmp_path / 'model.ckpt'
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError) as info:
    reader = tensor_bundle.CheckpointReader(path)
    for name in reader.variables():  # in case damage only shows when decoding
      reader.read(name)
  assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_v2_index_renamed_is_rejected_as_corrupted_v1(tmp_path):
  shutil.copy(V2_TINY + '.index', tmp_path / 'v1.ckpt')
  with pytest.raises(ValueError, match=r'v1.ckpt: corrupted V1 \(TensorSlice\) checkpoint'):
    tensor_bundle.CheckpointReader(tmp_path / 'v1.ckpt')


def test_decode_values_accepts_unpacked_and_tensor_content():
  # TF writes packed fields; protobuf parsers must accept unpacked ones and tensor_content too.
  unpacked = sstable.fixed32_field(5, 0x3f800000) + sstable.fixed32_field(5, 0x40000000)
  np.testing.assert_array_equal(tensor_slice.decode_values(unpacked, np.dtype('float32'), 2),
                                [1.0, 2.0])
  ints = sstable.varint_field(7, -3) + sstable.varint_field(7, 4)
  assert tensor_slice.decode_values(ints, np.dtype('int16'), 2).tolist() == [-3, 4]
  halfs = sstable.bytes_field(13, sstable.encode_varint(0x3c00) + sstable.encode_varint(0xc000))
  assert tensor_slice.decode_values(halfs, np.dtype('float16'), 2).tolist() == [1.0, -2.0]
  content = sstable.bytes_field(4, np.array([7, -8], '<i8').tobytes())
  assert tensor_slice.decode_values(content, np.dtype('int64'), 2).tolist() == [7, -8]
  with pytest.raises(ValueError, match='1 values for 2'):
    tensor_slice.decode_values(sstable.varint_field(7, 1), np.dtype('int32'), 2)


@pytest.fixture
def tf():
  return pytest.importorskip('tensorflow', reason='live TF comparison needs tensorflow')


def test_live_matches_tf_load_checkpoint(tf, tmp_path):
  # A fresh V1 checkpoint from TF's own Saver, read back both ways.
  values = {'a/weights': np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32),
            'a/step': np.int64(-7), 'a/flags': np.array([True, False]),
            'a/ints': np.array([-5, 9], np.int32), 'a/f64': np.array([1e300, -0.0])}
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    for name, value in values.items():
      tf.compat.v1.get_variable(name, initializer=tf.constant(value))
    sess.run(tf.compat.v1.global_variables_initializer())
    saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V1)
    path = saver.save(sess, str(tmp_path / 'model.ckpt'), write_meta_graph=False)
  for path in (path, os.path.join(FIXTURES, 'v1_tiny', 'model.ckpt'), _path('dtypes')):
    theirs = tf.train.load_checkpoint(path)
    ours = tensor_bundle.CheckpointReader(path)
    dtypes = theirs.get_variable_to_dtype_map()
    assert set(ours.variables()) == set(dtypes)
    for name, dtype in dtypes.items():
      if dtype == tf.string:
        continue
      _assert_same(ours.read(name), theirs.get_tensor(name), name)


# Guards against bfloat16 read from a field other than half_val, 13. 0x3f80 is
# bfloat16 1.0, 0xc000 is -2.0.
def test_bfloat16_values_come_from_half_val():
  proto = sstable.bytes_field(13, sstable.encode_varint(0x3f80) + sstable.encode_varint(0xc000))
  values = tensor_slice.decode_values(proto, np.dtype(ml_dtypes.bfloat16), 2)
  assert values.tolist() == [1.0, -2.0]


# Guards against bool_val decoded as `== 1` instead of non-zero.
def test_bool_values_are_true_when_non_zero():
  proto = sstable.bytes_field(11, sstable.encode_varint(0) + sstable.encode_varint(2))
  assert tensor_slice.decode_values(proto, np.dtype(bool), 2).tolist() == [False, True]


# Guards against a slice reaching past its dimension accepted.
def test_slice_past_the_dimension_is_refused():
  assert tensor_slice.slice_index(((1, 2), (0, -1)), (3, 4)) == (slice(1, 3), slice(0, 4))
  with pytest.raises(ValueError, match='lies outside shape'):
    tensor_slice.slice_index(((2, 2),), (3,))


# --- V1 checkpoints built field by field: what TF's writer would emit for one float tensor. ---

_DT_FLOAT = 1  # DataType DT_FLOAT


def _slice_proto(slc):
  # TensorSliceProto: one Extent (start, length) per dimension; proto3 omits a zero start.
  return b''.join(sstable.bytes_field(1, (sstable.varint_field(1, start) if start else b'')
                                      + sstable.varint_field(2, length)) for start, length in slc)


def _write_v1(path, name, shape, slices, versions=b''):
  """A V1 checkpoint file holding float32 `name` of `shape` as `slices` ({slice: values}).

  Its meta lists only the slices this file holds, as each of TF's shards does.
  """
  dims = b''.join(sstable.bytes_field(2, sstable.varint_field(1, d)) for d in shape)
  slice_meta = (sstable.bytes_field(1, name.encode()) + sstable.bytes_field(2, dims)
                + sstable.varint_field(3, _DT_FLOAT)
                + b''.join(sstable.bytes_field(4, _slice_proto(slc)) for slc in slices))
  meta = sstable.bytes_field(1, slice_meta) + (sstable.bytes_field(2, versions) if versions else b'')
  entries = [(b'', sstable.bytes_field(1, meta))]
  for i, (slc, values) in enumerate(slices.items()):
    data = sstable.bytes_field(5, np.asarray(values, '<f4').tobytes())  # packed float_val
    saved = (sstable.bytes_field(1, name.encode()) + sstable.bytes_field(2, _slice_proto(slc))
             + sstable.bytes_field(3, data))
    entries.append((b'slice%d' % i, sstable.bytes_field(2, saved)))  # keys only need to sort
  with open(path, 'wb') as f:
    f.write(sstable.build_table(entries))


# Guards against overlapping slices accepted: the later one would silently overwrite
# the shared elements, so which value is read would depend on the slice order.
def test_overlapping_slices_are_refused(tmp_path):
  path = str(tmp_path / 'model.ckpt')
  # Together they cover all 4 elements (no gap), and both hold element 2.
  _write_v1(path, 'x', (4,), {((0, 3),): [1, 2, 3], ((2, 2),): [30, 4]})
  with pytest.raises(ValueError, match="slices of 'x' overlap"):
    tensor_bundle.CheckpointReader(path).read('x')


# Guards against VersionDef.bad_consumers ignored: a checkpoint whose writer lists this
# reader's version (TF_CHECKPOINT_VERSION 1) as bad must not be read.
def test_checkpoint_naming_this_reader_a_bad_consumer_is_refused(tmp_path):
  producer = sstable.varint_field(1, 1)
  ok = str(tmp_path / 'ok.ckpt')
  _write_v1(ok, 'x', (2,), {((0, 2),): [1, 2]}, versions=producer + sstable.varint_field(2, 7))
  assert tensor_bundle.CheckpointReader(ok).read('x').tolist() == [1.0, 2.0]  # another version: fine
  bad = str(tmp_path / 'bad.ckpt')
  _write_v1(bad, 'x', (2,), {((0, 2),): [1, 2]}, versions=producer + sstable.varint_field(2, 1))
  with pytest.raises(ValueError, match='needs a checkpoint reader of version'):
    tensor_bundle.CheckpointReader(bad)


# Guards against the slices a second shard lists for an already-seen tensor dropped:
# test_sharded_v1_files never splits one tensor across shards.
def test_tensor_split_across_shards_is_read_whole(tmp_path):
  _write_v1(str(tmp_path / 'model.ckpt-00000-of-00002'), 'x', (2, 3), {((0, 1), (0, -1)): [1, 2, 3]})
  _write_v1(str(tmp_path / 'model.ckpt-00001-of-00002'), 'x', (2, 3), {((1, 1), (0, -1)): [4, 5, 6]})
  reader = tensor_bundle.CheckpointReader(str(tmp_path / 'model.ckpt'))
  assert len(reader.files) == 2
  _assert_same(reader.read('x'), np.array([[1, 2, 3], [4, 5, 6]], np.float32), 'x')
