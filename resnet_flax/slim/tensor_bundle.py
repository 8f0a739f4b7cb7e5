"""Reads TensorFlow V2 checkpoints (TensorBundle) with numpy only, no TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` (an SSTable, see `sstable`) plus data shards
`PREFIX.data-00000-of-0000N` holding the raw little-endian bytes of every tensor. The index maps
the empty key to a BundleHeaderProto and each variable name to a BundleEntryProto (dtype,
shape, shard, offset, size, masked crc32c); `tensorflow/core/protobuf/tensor_bundle.proto`.

    reader = CheckpointReader('ckpt_dir/model.ckpt')   # or 'ckpt_dir' with a `checkpoint` file
    reader.variables()   # {name: (dtype, shape)}
    reader.read('resnet_v1_50/conv1/weights')

Refused with a one-line ValueError: string and other non-numeric tensors, partitioned
(sliced) variables, big-endian bundles, compressed index blocks. A V1 (TensorSlice) checkpoint
path gets a `tensor_slice.TensorSliceReader` instead (same interface).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from resnet_flax.slim import checkpoint_state, sstable, tensor_slice, tf_types

HEADER_KEY = b''
BUNDLE_VERSION = 1  # kTensorBundleVersion: the version we write and can read
_BIG_ENDIAN = 1


def data_path(prefix: str, shard: int, num_shards: int) -> str:
  """Path of data shard `shard` (TF's `DataFilename`)."""
  return f'{prefix}.data-{shard:05d}-of-{num_shards:05d}'


@dataclasses.dataclass(frozen=True)
class _Entry:
  dtype: int
  shape: tuple[int, ...]
  shard: int
  offset: int
  size: int
  crc32c: int  # unmasked
  num_slices: int


class CheckpointReader:
  """Random access to the tensors of one TensorBundle checkpoint.

  Args:
    path: the checkpoint prefix (`dir/model.ckpt`, as for `tf.train.load_checkpoint`), its
      `.index` file, or a directory whose `checkpoint` state file names the checkpoint.
    verify: check each tensor's crc32c on `read` (index blocks are always checked: cheap).

  Attributes: `prefix` (the resolved checkpoint prefix), `num_shards`, `verify`.

  A path naming a V1 checkpoint (one SSTable file such as TF-Slim's `resnet_v1_50.ckpt`, or its
  `-?????-of-?????` shards) returns a `tensor_slice.TensorSliceReader` with the same interface.
  """

  def __new__(cls, path: str | os.PathLike, verify: bool = True):
    v1_files = tensor_slice.find_v1_files(os.fspath(path))
    if cls is CheckpointReader and v1_files:
      return tensor_slice.TensorSliceReader(v1_files, verify=verify)
    return super().__new__(cls)

  def __init__(self, path: str | os.PathLike, verify: bool = True):
    self.prefix = resolve_prefix(os.fspath(path))
    self.verify = verify
    index_path = self.prefix + '.index'
    with open(index_path, 'rb') as f:
      table = sstable.read_table(f.read(), index_path)
    if not table or table[0][0] != HEADER_KEY:
      raise ValueError(f'{index_path}: no bundle header entry (not a TensorFlow V2 checkpoint '
                       'index, or corrupted)')
    self.num_shards = _parse_header(table[0][1], index_path)
    entries = {}
    for key, value in table[1:]:
      if key.startswith(b'\0'):  # per-slice entries of partitioned variables (OrderedCode keys)
        continue
      try:
        name = key.decode('utf-8')
      except UnicodeDecodeError:
        raise ValueError(f'{index_path}: corrupted index (variable name is not UTF-8)') from None
      entries[name] = _parse_entry(value, name, self.num_shards, index_path)
    self._entries = entries
    for shard in range(self.num_shards):
      if not os.path.exists(data_path(self.prefix, shard, self.num_shards)):
        raise FileNotFoundError(f'{data_path(self.prefix, shard, self.num_shards)}: missing data '
                                f'shard {shard} of {self.num_shards} of checkpoint {self.prefix}')

  def variables(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} sorted by name. dtype is object for tensors `read` refuses."""
    return {name: (_dtype_or_object(e.dtype), e.shape) for name, e in sorted(self._entries.items())}

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def read(self, name: str) -> np.ndarray:
    """A fresh array with the stored values of variable `name`."""
    if name not in self._entries:
      raise KeyError(f'variable {name!r} not in checkpoint {self.prefix}')
    entry = self._entries[name]
    path = data_path(self.prefix, entry.shard, self.num_shards)
    if entry.num_slices:
      raise ValueError(f'{self.prefix}: variable {name!r} is partitioned into {entry.num_slices} '
                       'slices; partitioned variables are not supported (save it unpartitioned)')
    dtype = _readable_dtype(entry.dtype, name, self.prefix)
    expected = math.prod(entry.shape) * dtype.itemsize
    if entry.size != expected:
      raise ValueError(f'{self.prefix}.index: variable {name!r} has {entry.size} bytes but shape '
                       f'{entry.shape} of {dtype.name} needs {expected} (corrupted index)')
    with open(path, 'rb') as f:
      f.seek(entry.offset)
      data = f.read(entry.size)
    if len(data) != entry.size:
      raise ValueError(f'{path}: variable {name!r} lies at bytes {entry.offset}..'
                       f'{entry.offset + entry.size} but the file has {os.path.getsize(path)} '
                       'bytes (file truncated); re-download or re-export the checkpoint')
    if self.verify and sstable.crc32c(data) != entry.crc32c:
      raise ValueError(f'{path}: variable {name!r} fails its checksum (file damaged or '
                       'truncated); re-download or re-export the checkpoint')
    array = np.frombuffer(data, dtype).reshape(entry.shape)
    return array.astype(array.dtype.newbyteorder('='))  # copies: writable, native byte order


def resolve_prefix(path: str) -> str:
  """The checkpoint prefix for `path`: a prefix, a `.index` file, or a checkpoint directory."""
  if os.path.isdir(path):
    prefix = checkpoint_state.newest_prefix(path)
    if prefix is None:
      raise FileNotFoundError(f'{path}: directory has no {checkpoint_state.STATE_FILENAME!r} state file; pass '
                              f'the checkpoint prefix instead ({_prefixes_in(path)})')
    if not os.path.isfile(prefix + '.index'):
      raise FileNotFoundError(f'{os.path.join(path, checkpoint_state.STATE_FILENAME)} names checkpoint {prefix}, '
                              f'but {prefix}.index does not exist')
    return prefix
  if not os.path.isfile(path + '.index'):
    if path.endswith('.index') and os.path.isfile(path):
      return path[:-len('.index')]
    if _looks_like_v1(path):
      raise ValueError(f'{path}: a V1 (TensorSlice) checkpoint, which has no prefix; open it '
                       'with CheckpointReader (tensor_slice.TensorSliceReader)')
    if re.search(r'\.data-\d{5}-of-\d{5}$', path):
      raise FileNotFoundError(f'{path}: pass the checkpoint prefix (without .data-...), and '
                              'keep the .index file beside it')
    raise FileNotFoundError(f'{path}: no checkpoint here ({path}.index does not exist; '
                            f'{_prefixes_in(os.path.dirname(path) or ".")})')
  return path


def _prefixes_in(directory: str) -> str:
  """'prefixes there: a, b' (the checkpoints whose .index is in `directory`), or what is there instead."""
  try:
    prefixes = sorted(name[:-len('.index')] for name in os.listdir(directory) if name.endswith('.index'))
  except OSError:
    return f'{directory} cannot be listed'
  if not prefixes:
    return f'no *.index file in {directory}'
  return 'prefixes there: ' + ', '.join(os.path.join(directory, name) for name in prefixes[:5]) + (
      ' ...' if len(prefixes) > 5 else '')


def _looks_like_v1(path: str) -> bool:
  # V1 checkpoints are a single SSTable file named like a V2 prefix.
  if not os.path.isfile(path) or os.path.getsize(path) < sstable.FOOTER_SIZE:
    return False
  with open(path, 'rb') as f:
    f.seek(-8, os.SEEK_END)
    return int.from_bytes(f.read(8), 'little') == sstable.TABLE_MAGIC


_VARINT, _BYTES, _FIXED32 = sstable.WIRE_VARINT, sstable.WIRE_BYTES, sstable.WIRE_FIXED32
_HEADER_WIRE = {1: _VARINT, 2: _VARINT, 3: _BYTES}  # BundleHeaderProto
_VERSION_WIRE = {1: _VARINT, 2: _VARINT, 3: _VARINT}  # VersionDef
_ENTRY_WIRE = {1: _VARINT, 2: _BYTES, 3: _VARINT, 4: _VARINT, 5: _VARINT, 6: _FIXED32,
               7: _BYTES}  # BundleEntryProto
_ENTRY_FIELDS = {1: 'dtype', 3: 'shard', 4: 'offset', 5: 'size'}


def _parse_header(value: bytes, index_path: str) -> int:
  num_shards = endianness = producer = min_consumer = 0
  bad_consumers = []
  try:
    for field, v in sstable.iter_fields(value, _HEADER_WIRE):
      if field == 1:
        num_shards = sstable.to_signed64(v)
      elif field == 2:
        endianness = v
      elif field == 3:
        for version_field, vv in sstable.iter_fields(v, _VERSION_WIRE):
          if version_field == 1:
            producer = vv
          elif version_field == 2:
            bad_consumers.append(vv)
          elif version_field == 3:
            min_consumer = vv
  except ValueError as e:
    raise ValueError(f'{index_path}: corrupted bundle header ({e})') from None
  if endianness == _BIG_ENDIAN:
    raise ValueError(f'{index_path}: big-endian checkpoint; only little-endian bundles are '
                     'supported (re-save it on a little-endian machine)')
  if min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in bad_consumers:
    raise ValueError(f'{index_path}: written by TensorBundle version {producer} that needs a '
                     f'reader of version >= {min_consumer}; this reader is version '
                     f'{BUNDLE_VERSION}')
  if not 1 <= num_shards < 1 << 20:
    raise ValueError(f'{index_path}: corrupted bundle header ({num_shards} data shards)')
  return num_shards


def _parse_entry(value: bytes, name: str, num_shards: int, index_path: str) -> _Entry:
  fields = dict(dtype=0, shape=(), shard=0, offset=0, size=0, crc32c=0, num_slices=0)
  try:
    for field, v in sstable.iter_fields(value, _ENTRY_WIRE):
      if field in _ENTRY_FIELDS:
        fields[_ENTRY_FIELDS[field]] = sstable.to_signed64(v)
      elif field == 2:
        fields['shape'] = tf_types.parse_shape(v)
      elif field == 6:
        fields['crc32c'] = sstable.unmask_crc(v)
      elif field == 7:
        fields['num_slices'] += 1
  except ValueError as e:
    raise ValueError(f'{index_path}: corrupted entry for variable {name!r} ({e})') from None
  entry = _Entry(**fields)
  if (not 0 <= entry.shard < num_shards or entry.offset < 0 or entry.size < 0
      or any(d < 0 for d in entry.shape)):
    raise ValueError(f'{index_path}: corrupted entry for variable {name!r} (shard '
                     f'{entry.shard}, offset {entry.offset}, size {entry.size}, shape '
                     f'{entry.shape})')
  return entry


def _dtype_or_object(dtype: int) -> np.dtype:
  name = tf_types.NUMPY_DTYPES.get(dtype)
  return tf_types.numpy_dtype(name).newbyteorder('=') if name else np.dtype(object)


def _readable_dtype(dtype: int, name: str, prefix: str) -> np.dtype:
  if dtype in tf_types.NUMPY_DTYPES:
    return tf_types.numpy_dtype(tf_types.NUMPY_DTYPES[dtype])
  kind = tf_types.OTHER_DTYPES.get(dtype, f'unknown DataType {dtype}')
  raise ValueError(f'{prefix}: variable {name!r} has dtype {kind}, which is not supported '
                   '(numeric tensors only)')
