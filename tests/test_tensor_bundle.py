"""TensorBundle (TF V2 checkpoint) reader/writer: round trips, TF-written fixtures, damage.

The fixtures under fixtures/tensor_bundle/ come from real TensorFlow (make_fixtures.py there).
Tests marked `live` compare with TensorFlow itself and skip when it is not importable (run them
with the TF venv: /work/tfenv/bin/python -m pytest tests/test_tensor_bundle.py).
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from resnet_flax.slim import sstable
from resnet_flax.slim import tensor_bundle
from resnet_flax.slim import tensor_bundle_writer
from resnet_flax.slim import tf_types

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tensor_bundle')
FIXTURE_PREFIXES = {
    'dtypes': 'model.ckpt', 'saver': 'model.ckpt-3', 'sharded': 'model.ckpt',
    'partitioned': 'model.ckpt', 'tf2_object': 'model.ckpt',
}
REFUSED = {('partitioned', 'part'): 'partitioned', ('tf2_object', '_CHECKPOINTABLE_OBJECT_GRAPH'):
           'dtype string'}
DTYPES = ['float32', 'float64', 'float16', 'bfloat16', 'int8', 'int16', 'int32', 'int64', 'uint8',
          'uint16', 'uint32', 'uint64', 'bool', 'complex64', 'complex128']
SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3, 4)]


def _dtype(name):
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def _random(dtype_name, shape, rng):
  dtype = _dtype(dtype_name)
  if dtype.kind == 'b':
    return rng.integers(0, 2, shape).astype(bool)
  if dtype.kind in 'iu':
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
  if dtype.kind == 'c':
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
  return (rng.standard_normal(shape) * 100).astype(dtype)


def _sample_tensors(seed=0):
  rng = np.random.default_rng(seed)
  tensors = {f'net/{d}/{"x".join(map(str, s)) or "scalar"}': _random(d, s, rng)
             for d in DTYPES for s in SHAPES}
  tensors['net/float32/special'] = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32)
  tensors['global_step'] = np.int64(2**40 + 3)
  return tensors


def _assert_exact(actual, expected):
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


def _copy_fixture(name, tmp_path):
  shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)
  return str(tmp_path / name / FIXTURE_PREFIXES[name])


def _expected(name):
  with np.load(os.path.join(FIXTURES, name, 'expected.npz')) as npz:
    dtypes = json.loads(str(npz['__dtypes__']))
    arrays = {n: npz[n] for n in dtypes}
  for n, d in dtypes.items():
    if d == 'bfloat16':
      arrays[n] = arrays[n].view(ml_dtypes.bfloat16)
  return dtypes, arrays


@pytest.mark.parametrize('dtype_name', DTYPES)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype_name):
  rng = np.random.default_rng(0)
  tensors = {f'v{i}': _random(dtype_name, shape, rng) for i, shape in enumerate(SHAPES)}
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), tensors)
  reader = tensor_bundle.CheckpointReader(prefix)
  assert reader.variables() == {n: (_dtype(dtype_name), v.shape) for n, v in tensors.items()}
  for name, value in tensors.items():
    read = reader.read(name)
    _assert_exact(read, value)
    assert read.flags.writeable and read.flags.c_contiguous


def test_round_trip_layouts_byte_orders_and_many_blocks(tmp_path):
  tensors = _sample_tensors()
  tensors['net/transposed'] = np.arange(12, dtype=np.float32).reshape(3, 4).T
  tensors['net/big_endian'] = np.arange(5, dtype='>i4')
  tensors['net/ünïcode'] = np.float64(1.5)
  tensors['scalar_python'] = 3
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors, block_size=200)
  assert _num_index_blocks(prefix + '.index') > 5
  reader = tensor_bundle.CheckpointReader(prefix)
  assert list(reader.variables()) == sorted(tensors)
  for name, value in tensors.items():
    value = np.asarray(value)
    _assert_exact(reader.read(name), value.astype(value.dtype.newbyteorder('=')))


def _num_index_blocks(index_path):
  with open(index_path, 'rb') as f:
    data = f.read()
  footer = data[-sstable.FOOTER_SIZE:]
  _, pos = sstable._decode_handle(footer, 0)
  handle, _ = sstable._decode_handle(footer, pos)
  block = sstable._read_block(data, handle, index_path, 'index block')
  return len(list(sstable._iter_block(block, index_path)))


def test_writer_global_step_and_state_file(tmp_path):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'out' / 'model.ckpt'),
                                                 {'w': np.ones(3, np.float32)}, global_step=42)
  assert prefix == str(tmp_path / 'out' / 'model.ckpt-42')
  state = (tmp_path / 'out' / 'checkpoint').read_text()
  assert state == ('model_checkpoint_path: "model.ckpt-42"\n'
                   'all_model_checkpoint_paths: "model.ckpt-42"\n')
  reader = tensor_bundle.CheckpointReader(tmp_path / 'out')
  assert reader.prefix == prefix
  assert reader.variables() == {'global_step': (np.dtype(np.int64), ()),
                                'w': (np.dtype(np.float32), (3,))}
  assert reader.read('global_step') == 42
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'checkpoint', 'model.ckpt-42.data-00000-of-00001', 'model.ckpt-42.index']
  with pytest.raises(ValueError, match='global_step'):
    tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {'global_step': np.int64(1)},
                                          global_step=2)


def test_writer_writes_empty_checkpoint(tmp_path):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {})
  assert tensor_bundle.CheckpointReader(prefix).variables() == {}


@pytest.mark.parametrize('name,value,match', [
    ('s', np.array(['abc']), 'dtype <U3 cannot be written'),
    ('o', np.array([object()]), 'dtype object cannot be written'),
    ('t', np.array(['2020-01-01'], 'datetime64[D]'), 'cannot be written'),
    ('', np.ones(2), 'non-empty'),
    ('\0slice', np.ones(2), 'NUL'),
    (3, np.ones(2), 'strings'),
])
def test_writer_refuses_what_it_cannot_write(tmp_path, name, value, match):
  with pytest.raises(ValueError, match=match):
    tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {name: value})
  assert os.listdir(tmp_path) == []


def test_writer_is_atomic(tmp_path, monkeypatch):
  prefix = str(tmp_path / 'model.ckpt')
  tensor_bundle_writer.write_checkpoint(prefix, {'w': np.zeros(3, np.float32)})
  old = sorted(os.listdir(tmp_path))

  def fail(*args, **kwargs):
    raise OSError('disk full')

  # A failure before the renames leaves the old checkpoint intact and no temporary files.
  monkeypatch.setattr(sstable, 'build_table', fail)
  with pytest.raises(OSError, match='disk full'):
    tensor_bundle_writer.write_checkpoint(prefix, {'w': np.ones(3, np.float32)})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == old
  _assert_exact(tensor_bundle.CheckpointReader(prefix).read('w'), np.zeros(3, np.float32))

  # A crash between renames never pairs an index with the other checkpoint's data.
  real_replace = os.replace
  monkeypatch.setattr(os, 'replace', lambda src, dst: fail() if dst.endswith('.index')
                      else real_replace(src, dst))
  with pytest.raises(OSError, match='disk full'):
    tensor_bundle_writer.write_checkpoint(prefix, {'w': np.ones(3, np.float32)})
  monkeypatch.undo()
  assert not os.path.exists(prefix + '.index')
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]

  tensor_bundle_writer.write_checkpoint(prefix, {'w': np.ones(3, np.float32)})
  _assert_exact(tensor_bundle.CheckpointReader(tmp_path).read('w'), np.ones(3, np.float32))
  assert sorted(os.listdir(tmp_path)) == old


@pytest.mark.parametrize('fixture', sorted(FIXTURE_PREFIXES))
def test_reads_tf_written_fixtures(fixture):
  dtypes, arrays = _expected(fixture)
  prefix = os.path.join(FIXTURES, fixture, FIXTURE_PREFIXES[fixture])
  reader = tensor_bundle.CheckpointReader(prefix)
  variables = reader.variables()
  assert list(variables) == sorted(dtypes)
  for name, (dtype, shape) in variables.items():
    assert name in reader and shape == arrays[name].shape
    if (fixture, name) in REFUSED:
      assert dtype == np.dtype(object) or fixture == 'partitioned'
      with pytest.raises(ValueError, match=REFUSED[fixture, name]):
        reader.read(name)
      continue
    assert dtype.name == dtypes[name]
    _assert_exact(reader.read(name), arrays[name])


def test_fixture_coverage():
  reader = tensor_bundle.CheckpointReader(os.path.join(FIXTURES, 'dtypes', 'model.ckpt'))
  assert {d.name for d, _ in reader.variables().values()} >= set(DTYPES)
  assert reader.num_shards == 1 and len(reader.variables()) >= 16  # header + 16: 2 restart points
  sharded = tensor_bundle.CheckpointReader(os.path.join(FIXTURES, 'sharded', 'model.ckpt'))
  assert sharded.num_shards == 2


def test_path_forms(tmp_path):
  saver_dir = os.path.join(FIXTURES, 'saver')
  prefix = os.path.join(saver_dir, 'model.ckpt-3')
  for path in (saver_dir, prefix, prefix + '.index'):
    assert tensor_bundle.CheckpointReader(path).prefix == prefix
  assert 'global_step' in tensor_bundle.CheckpointReader(saver_dir)
  assert 'nope' not in tensor_bundle.CheckpointReader(saver_dir)
  with pytest.raises(KeyError, match='nope'):
    tensor_bundle.CheckpointReader(saver_dir).read('nope')
  with pytest.raises(FileNotFoundError, match=r'model.ckpt-4.index does not exist'):
    tensor_bundle.CheckpointReader(os.path.join(saver_dir, 'model.ckpt-4'))
  with pytest.raises(FileNotFoundError, match='prefix'):
    tensor_bundle.CheckpointReader(prefix + '.data-00000-of-00001')
  with pytest.raises(FileNotFoundError, match="no 'checkpoint' state file"):
    tensor_bundle.CheckpointReader(tmp_path)
  shutil.copy(prefix + '.index', tmp_path / 'v1.ckpt')  # a lone SSTable: a V1 checkpoint
  with pytest.raises(ValueError, match='V1'):
    tensor_bundle.CheckpointReader(tmp_path / 'v1.ckpt')


def test_corrupted_data_byte_fails_checksum_naming_variable(tmp_path):
  prefix = _copy_fixture('dtypes', tmp_path)
  name = 'net/conv1/weights'
  offset = tensor_bundle.CheckpointReader(prefix)._entries[name].offset
  data_file = prefix + '.data-00000-of-00001'
  _flip_byte(data_file, offset + 17)
  reader = tensor_bundle.CheckpointReader(prefix)
  with pytest.raises(ValueError) as info:
    reader.read(name)
  message = str(info.value)
  assert message.startswith(data_file) and f"variable '{name}' fails its checksum" in message
  assert '\n' not in message
  _, arrays = _expected('dtypes')
  _assert_exact(reader.read('net/int64'), arrays['net/int64'])
  garbage = tensor_bundle.CheckpointReader(prefix, verify=False).read(name)
  assert garbage.shape == arrays[name].shape and garbage.tobytes() != arrays[name].tobytes()


def test_truncated_data_file_names_file(tmp_path):
  prefix = _copy_fixture('sharded', tmp_path)
  reader = tensor_bundle.CheckpointReader(prefix)
  last_shard = prefix + '.data-00001-of-00002'
  in_last = {n for n, e in reader._entries.items() if e.shard == 1}
  _, arrays = _expected('sharded')
  with open(last_shard, 'rb') as f:
    original = f.read()
  for size in (0, 1, len(original) - 1):
    with open(last_shard, 'wb') as f:
      f.write(original[:size])
    for name in reader.variables():
      entry = reader._entries[name]
      if name in in_last and entry.offset + entry.size > size:
        with pytest.raises(ValueError, match=f"^{last_shard}: variable '{name}'.*truncated"):
          reader.read(name)
      else:
        _assert_exact(reader.read(name), arrays[name])


def test_missing_data_shard(tmp_path):
  prefix = _copy_fixture('sharded', tmp_path)
  os.remove(prefix + '.data-00001-of-00002')
  with pytest.raises(FileNotFoundError, match=r'data-00001-of-00002: missing data shard 1 of 2'):
    tensor_bundle.CheckpointReader(prefix)


def test_truncated_index_names_file(tmp_path):
  prefix = _copy_fixture('sharded', tmp_path)
  index = prefix + '.index'
  with open(index, 'rb') as f:
    data = f.read()
  for size in range(len(data)):
    with open(index, 'wb') as f:
      f.write(data[:size])
    with pytest.raises(ValueError, match=f'^{index}: '):
      tensor_bundle.CheckpointReader(prefix)


def test_any_corrupted_index_byte_is_caught_or_harmless(tmp_path):
  prefix = _copy_fixture('sharded', tmp_path)
  index = prefix + '.index'
  with open(index, 'rb') as f:
    data = f.read()
  _, arrays = _expected('sharded')
  harmless = 0
  for pos in range(len(data)):
    with open(index, 'wb') as f:
      f.write(data[:pos] + bytes([data[pos] ^ 0x5a]) + data[pos + 1:])
    try:
      reader = tensor_bundle.CheckpointReader(prefix)
    except ValueError as e:
      assert str(e).startswith(index + ': ') and '\n' not in str(e)
      continue
    harmless += 1  # only the footer's padding is unprotected, and unused
    assert len(data) - sstable.FOOTER_SIZE <= pos < len(data) - 8
    for name, value in arrays.items():
      _assert_exact(reader.read(name), value)
  assert harmless < sstable.FOOTER_SIZE


def _flip_byte(path, pos):
  with open(path, 'r+b') as f:
    f.seek(pos)
    byte = f.read(1)[0]
    f.seek(pos)
    f.write(bytes([byte ^ 0xff]))


def _rewrite_index(prefix, transform):
  index = prefix + '.index'
  with open(index, 'rb') as f:
    entries = sstable.read_table(f.read(), index)
  with open(index, 'wb') as f:
    f.write(sstable.build_table(transform(entries)))


def _header(num_shards=1, endianness=0, min_consumer=0):
  def optional(field, value):
    return sstable.varint_field(field, value) if value else b''  # proto3 omits zeros

  version = sstable.varint_field(1, 1) + optional(3, min_consumer)
  return optional(1, num_shards) + optional(2, endianness) + sstable.bytes_field(3, version)


@pytest.mark.parametrize('header,match', [
    (_header(endianness=1), 'big-endian checkpoint'),
    (_header(min_consumer=2), 'written by TensorBundle version 1 that needs a reader of '
                              'version >= 2'),
    (_header(num_shards=0), r'corrupted bundle header \(0 data shards\)'),
    (b'\x0a\x02ab', r'corrupted bundle header \(protobuf field 1 has wire type 2'),
])
def test_refuses_bad_headers(tmp_path, header, match):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {'w': np.ones(2)})
  _rewrite_index(prefix, lambda entries: [(b'', header)] + entries[1:])
  with pytest.raises(ValueError, match=f'^{prefix}.index: {match}'):
    tensor_bundle.CheckpointReader(prefix)


def test_refuses_snappy_compressed_index(tmp_path):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {'w': np.ones(2)})
  with open(prefix + '.index', 'rb') as f:
    entries = sstable.read_table(f.read(), 'x')
  block = sstable.encode_block(entries, 16)
  meta = sstable.encode_block([], 16)
  table = block + sstable.block_trailer(block, sstable.SNAPPY_COMPRESSION)
  meta_handle = sstable.encode_varint(len(table)) + sstable.encode_varint(len(meta))
  table += meta + sstable.block_trailer(meta)
  handle = sstable.encode_varint(0) + sstable.encode_varint(len(block))
  index = sstable.encode_block([(b'x', handle)], 1)
  index_handle = sstable.encode_varint(len(table)) + sstable.encode_varint(len(index))
  table += index + sstable.block_trailer(index)
  table += (meta_handle + index_handle).ljust(40, b'\0') + sstable.TABLE_MAGIC.to_bytes(8, 'little')
  with open(prefix + '.index', 'wb') as f:
    f.write(table)
  with pytest.raises(ValueError, match=f'^{prefix}.index: data block is snappy-compressed'):
    tensor_bundle.CheckpointReader(prefix)


def test_refuses_unknown_dtypes_and_inconsistent_entries(tmp_path):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'),
                                                 {'f8': np.ones(2, np.uint8), 'big': np.ones(2, np.uint8),
                                                  'ok': np.ones(2, np.uint8)})

  def patch(entries):
    out = []
    for key, value in entries:
      if key == b'f8':
        value = sstable.varint_field(1, 24) + value[2:]  # DT_FLOAT8_E5M2, same 1-byte size
      elif key == b'big':
        value = value + sstable.varint_field(5, 3)  # size 3 for 2 uint8 elements
      out.append((key, value))
    return out

  _rewrite_index(prefix, patch)
  reader = tensor_bundle.CheckpointReader(prefix)
  assert reader.variables()['f8'] == (np.dtype(object), (2,))
  with pytest.raises(ValueError, match="'f8' has dtype float8_e5m2, which is not supported"):
    reader.read('f8')
  with pytest.raises(ValueError, match="variable 'big' has 3 bytes but shape .* needs 2"):
    reader.read('big')
  _assert_exact(reader.read('ok'), np.ones(2, np.uint8))


@pytest.fixture(scope='module')
def tf():
  return pytest.importorskip('tensorflow', reason='live TF comparison needs tensorflow')


def _tf_save(tf, prefix, tensors):
  """TF's own SaveV2 of `tensors`, in a graph of its own: tests/slim_shim.py turns eager execution off
  for the whole process, and then a bare call only builds an op nobody runs (no files written)."""
  names = list(tensors)
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    session.run(tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                                  tensors=[tf.constant(tensors[name]) for name in names]))


def _assert_same_as_tf(tf, prefix, reader=None):
  reader = reader or tensor_bundle.CheckpointReader(prefix)
  tf_reader = tf.train.load_checkpoint(prefix)
  tf_dtypes = tf_reader.get_variable_to_dtype_map()
  assert set(reader.variables()) == set(tf_dtypes)
  for name, (dtype, shape) in reader.variables().items():
    assert tuple(tf_reader.get_variable_to_shape_map()[name]) == shape
    if dtype == np.dtype(object):
      continue
    assert dtype.name == tf_dtypes[name].name
    if name in reader._entries and reader._entries[name].num_slices:
      continue
    _assert_exact(reader.read(name), np.asarray(tf_reader.get_tensor(name)))


def test_live_tf_reads_our_checkpoints(tf, tmp_path):
  tensors = _sample_tensors()
  for block_size in (sstable.DEFAULT_BLOCK_SIZE, 300):
    prefix = tensor_bundle_writer.write_checkpoint(tmp_path / str(block_size) / 'model.ckpt',
                                                   tensors, block_size=block_size)
    tf_reader = tf.train.load_checkpoint(str(tmp_path / str(block_size)))
    assert sorted(tf_reader.get_variable_to_shape_map()) == sorted(tensors)
    for name, value in tensors.items():
      _assert_exact(np.asarray(tf_reader.get_tensor(name)), np.asarray(value))
    _assert_same_as_tf(tf, prefix)


def test_live_output_is_byte_identical_to_tf(tf, tmp_path):
  tensors = _sample_tensors()
  _tf_save(tf, str(tmp_path / 'tf' / 'model.ckpt'), {name: tensors[name] for name in sorted(tensors)})
  tensor_bundle_writer.write_checkpoint(str(tmp_path / 'ours' / 'model.ckpt'), tensors)
  for suffix in ('.index', '.data-00000-of-00001'):
    ours = (tmp_path / 'ours' / ('model.ckpt' + suffix)).read_bytes()
    assert ours == (tmp_path / 'tf' / ('model.ckpt' + suffix)).read_bytes(), suffix


def test_live_saver_restores_our_checkpoint(tf, tmp_path):
  rng = np.random.default_rng(1)
  tensors = {'net/conv1/weights': rng.standard_normal((3, 3, 3, 8)).astype(np.float32),
             'net/conv1/BatchNorm/moving_mean': rng.standard_normal(8).astype(np.float32),
             'net/logits/biases': rng.standard_normal(10).astype(np.float32)}
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), tensors, global_step=7)
  v1 = tf.compat.v1
  with tf.Graph().as_default() as graph:
    variables = {n: v1.get_variable(n, shape=v.shape, dtype=tf.float32) for n, v in tensors.items()}
    step = v1.train.get_or_create_global_step()
    with v1.Session(graph=graph) as sess:
      v1.train.Saver().restore(sess, tf.train.latest_checkpoint(str(tmp_path)))
      assert sess.run(step) == 7
      for name, variable in variables.items():
        _assert_exact(sess.run(variable), tensors[name])
  assert prefix.endswith('model.ckpt-7')


def test_live_reads_tf_checkpoints(tf, tmp_path):
  for fixture, prefix in FIXTURE_PREFIXES.items():
    _assert_same_as_tf(tf, os.path.join(FIXTURES, fixture, prefix))
  # TF's index spans several data blocks only past 256 KiB of entries.
  many = {f'scope_{i // 100}/layer_{i}/' + 'w' * 80: np.float32(i) for i in range(3000)}
  _tf_save(tf, str(tmp_path / 'model.ckpt'), many)
  assert _num_index_blocks(str(tmp_path / 'model.ckpt.index')) > 1
  _assert_same_as_tf(tf, str(tmp_path / 'model.ckpt'))


def test_a_wrong_prefix_lists_the_prefixes_there(tmp_path):
  (tmp_path / 'model.ckpt-10.index').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=rf'prefixes there: {tmp_path}/model.ckpt-10\)$'):
    tensor_bundle.resolve_prefix(str(tmp_path / 'model'))
  with pytest.raises(FileNotFoundError, match=rf'prefix instead \(prefixes there: {tmp_path}/model.ckpt-10\)$'):
    tensor_bundle.resolve_prefix(str(tmp_path))


# Guards against header fields reordered, (VersionDef field 3, not
# producer), (zero offset written), (zero dimension written as dim {size: 0}),
# (crc32c omitted for empty tensors). Without TF only TF's own index entries pin the bytes.
def test_writer_header_and_entries_are_byte_identical_to_tfs():
  prefix = os.path.join(FIXTURES, 'dtypes', 'model.ckpt')
  with open(prefix + '.index', 'rb') as f:
    tf_entries = sstable.read_table(f.read(), 'tf')
  assert list(tensor_bundle_writer._index_entries([])) == [tf_entries[0]]
  reader = tensor_bundle.CheckpointReader(prefix)
  for key, tf_value in tf_entries[1:]:
    array = reader.read(key.decode())
    data = array.astype(array.dtype.newbyteorder('<')).tobytes()
    assert tensor_bundle_writer._entry_proto(array, reader._entries[key.decode()].offset, data) == tf_value, key


# Guards against index without the header entry accepted.
def test_index_without_header_entry_is_refused(tmp_path):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {'w': np.ones(2)})
  _rewrite_index(prefix, lambda entries: entries[1:])
  with pytest.raises(ValueError, match=f'^{prefix}.index: no bundle header entry'):
    tensor_bundle.CheckpointReader(prefix)


# Guards against VersionDef.bad_consumers ignored.
def test_header_listing_this_reader_as_bad_consumer_is_refused(tmp_path):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {'w': np.ones(2)})
  version = sstable.varint_field(1, 2) + sstable.varint_field(2, 1)  # producer 2, bad_consumers [1]
  header = sstable.varint_field(1, 1) + sstable.bytes_field(3, version)
  _rewrite_index(prefix, lambda entries: [(b'', header)] + entries[1:])
  with pytest.raises(ValueError, match=f'^{prefix}.index: written by TensorBundle version 2'):
    tensor_bundle.CheckpointReader(prefix)


# Guards against shard == num_shards accepted and (parse errors no longer
# naming the index file and the variable).
@pytest.mark.parametrize('suffix,match', [
    (sstable.varint_field(3, 1), r"corrupted entry for variable 'w' \(shard 1,"),
    (b'\x0a\x02ab', r"corrupted entry for variable 'w' \(protobuf field 1 has wire type 2"),
])
def test_bad_entries_name_file_and_variable(tmp_path, suffix, match):
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), {'w': np.ones(2)})
  _rewrite_index(prefix, lambda entries: [entries[0], (b'w', entries[1][1] + suffix)])
  with pytest.raises(ValueError, match=f'^{prefix}.index: {match}'):
    tensor_bundle.CheckpointReader(prefix)


# Guards against (slices not counted: the existing test's match 'partitioned'
# also matches the fixture's directory name, so any error passed).
def test_partitioned_variable_is_refused_by_its_slice_count():
  reader = tensor_bundle.CheckpointReader(os.path.join(FIXTURES, 'partitioned', 'model.ckpt'))
  with pytest.raises(ValueError, match="variable 'part' is partitioned into 2 slices"):
    reader.read('part')


# Guards against dim size not sign-extended and unknown_rank check inverted.
# TensorShapeProto by hand: dim {size: -1} is field 2 holding field 1 = 10-byte varint of -1.
def test_parse_shape_signs_dims_and_refuses_unknown_rank():
  minus_one = sstable.bytes_field(2, sstable.varint_field(1, -1))
  assert tf_types.parse_shape(minus_one + sstable.bytes_field(2, sstable.varint_field(1, 3))) == (-1, 3)
  assert tf_types.parse_shape(b'\x18\x00') == ()  # unknown_rank: false
  with pytest.raises(ValueError, match='unknown rank'):
    tf_types.parse_shape(b'\x18\x01')
