"""Reads TensorFlow V1 checkpoints (TensorSlice format) with numpy only, no TensorFlow.

A V1 checkpoint (e.g. `resnet_v1_50.ckpt` of TF-Slim's 2016 tarballs) is one SSTable file, or
shards `PREFIX-00000-of-0000N`, written by `tensorflow/core/util/tensor_slice_writer.cc`
(protos in `tensorflow/core/protobuf/saved_tensor_slice.proto`). Every value is a
SavedTensorSlices message:

- key `""`: `meta` (field 1), a SavedTensorSliceMeta listing each tensor (SavedSliceMeta:
  name, TensorShapeProto, DataType, the TensorSliceProtos saved) and the VersionDef;
- other keys (OrderedCode of name + slice, unused here: the value repeats both): `data`
  (field 2), a SavedSlice holding name, TensorSliceProto and a TensorProto whose typed
  repeated field (float_val, double_val, int_val, int64_val, bool_val, half_val) has the
  slice's elements in row-major order.

`TensorSliceReader` has `CheckpointReader`'s interface (`variables()`, `read(name)`, `in`,
`prefix`); `tensor_bundle.CheckpointReader(path)` returns one for a V1 path. Partitioned
variables are assembled from their slices when these tile the tensor exactly. Refused with a
one-line ValueError: string / quantized / unknown dtypes, slices that overlap or leave gaps,
damaged files (every block's crc32c is checked when the file is opened).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Sequence

import numpy as np

from resnet_flax.slim import checkpoint_state, sstable, tf_types

_VARINT, _FIXED64, _BYTES, _FIXED32 = (sstable.WIRE_VARINT, sstable.WIRE_FIXED64,
                                       sstable.WIRE_BYTES, sstable.WIRE_FIXED32)
_SLICES_WIRE = {1: _BYTES, 2: _BYTES}  # SavedTensorSlices: meta, data
_META_WIRE = {1: _BYTES, 2: _BYTES}  # SavedTensorSliceMeta: tensor, versions
_SLICE_META_WIRE = {1: _BYTES, 2: _BYTES, 3: _VARINT, 4: _BYTES}  # SavedSliceMeta
_SAVED_SLICE_WIRE = {1: _BYTES, 2: _BYTES, 3: _BYTES}  # SavedSlice: name, slice, data
_TENSOR_SLICE_WIRE = {1: _BYTES}  # TensorSliceProto: extent
_EXTENT_WIRE = {1: _VARINT, 2: _VARINT}  # TensorSliceProto.Extent: start, length
_VERSION_WIRE = {1: _VARINT, 2: _VARINT, 3: _VARINT}  # VersionDef
CHECKPOINT_VERSION = 1  # TF_CHECKPOINT_VERSION: what TF writes and this reader understands

# TensorProto field holding each DataType's values, as TensorSliceWriter's SaveTypeTraits
# fills them: (field number, element wire type, numpy dtype of the decoded values).
_VALUE_FIELDS = {
    'float32': (5, _FIXED32, '<f4'), 'float64': (6, _FIXED64, '<f8'),
    'int32': (7, _VARINT, None), 'int16': (7, _VARINT, None), 'int8': (7, _VARINT, None),
    'uint8': (7, _VARINT, None), 'int64': (10, _VARINT, None), 'bool': (11, _VARINT, None),
    # half and bfloat16 travel as their 16-bit patterns in int32 (older TF wrote them)
    'float16': (13, _VARINT, None), 'bfloat16': (13, _VARINT, None),
}
_TENSOR_CONTENT = 4  # TensorProto.tensor_content: raw bytes, accepted though TF never writes it

Slice = tuple[tuple[int, int], ...]  # per dimension (start, length); length -1 = whole dim


@dataclasses.dataclass
class _Tensor:
  dtype: int
  shape: tuple[int, ...]
  slices: list[Slice]  # as listed in the meta
  data: dict[Slice, bytes] = dataclasses.field(default_factory=dict)  # serialized TensorProto


class TensorSliceReader:
  """Random access to the tensors of one V1 checkpoint (a file, or its shard files).

  Args:
    files: the checkpoint file, or all its `PREFIX-?????-of-?????` shards.
    prefix: how messages name the checkpoint (default: the first file).
    verify: accepted for `CheckpointReader` compatibility; block checksums are always checked.
  """

  def __init__(self, files: Sequence[str], prefix: str | None = None, verify: bool = True):
    self.files = [os.fspath(f) for f in files]
    self.prefix = prefix or self.files[0]
    self.verify = verify
    self._tensors: dict[str, _Tensor] = {}
    for path in self.files:
      _load_file(path, self._tensors)
    for name, tensor in self._tensors.items():
      missing = [s for s in tensor.slices if s not in tensor.data]
      if missing:
        raise ValueError(f'{self.prefix}: V1 checkpoint lists slice {_format_slice(missing[0])} '
                         f'of {name!r} but has no data for it (file truncated or shard missing)')

  def variables(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} sorted by name. dtype is object for tensors `read` refuses."""
    return {name: (_dtype_or_object(t.dtype), t.shape) for name, t in sorted(self._tensors.items())}

  def __contains__(self, name: object) -> bool:
    return name in self._tensors

  def read(self, name: str) -> np.ndarray:
    """A fresh array with the stored values of `name`, assembled from its slices."""
    if name not in self._tensors:
      raise KeyError(f'variable {name!r} not in checkpoint {self.prefix}')
    tensor = self._tensors[name]
    dtype = _readable_dtype(tensor.dtype, name, self.prefix)
    out = np.zeros(tensor.shape, dtype)
    covered = np.zeros(tensor.shape, bool)
    for slc in tensor.slices:
      index = slice_index(slc, tensor.shape)
      target_shape = covered[index].shape
      try:
        values = decode_values(tensor.data[slc], dtype, math.prod(target_shape))
      except ValueError as e:
        raise ValueError(f'{self.prefix}: corrupted data of {name!r} slice '
                         f'{_format_slice(slc)} ({e})') from None
      if covered[index].any():
        raise ValueError(f'{self.prefix}: slices of {name!r} overlap; not supported')
      out[index] = values.reshape(target_shape)
      covered[index] = True
    if not covered.all():
      raise ValueError(f'{self.prefix}: the saved slices of {name!r} cover only '
                       f'{int(covered.sum())} of its {covered.size} elements; partial '
                       'variables are not supported')
    return out


def find_v1_files(path: str) -> list[str] | None:
  """The V1 checkpoint file(s) `path` names, or None if it names no V1 checkpoint.

  `path` is the file itself (anything but a V2 `.index` / `.data-*` file or prefix: it is
  then read as V1, so a truncated file is reported as such), or the prefix of sharded V1 files
  `path-00000-of-0000N`. A directory is resolved through its `checkpoint` state file.
  """
  if os.path.isdir(path):
    path = checkpoint_state.newest_prefix(path)
    if path is None:
      return None
  if os.path.exists(path + '.index') or path.endswith('.index'):
    return None
  if os.path.isfile(path):
    return None if '.data-' in os.path.basename(path) else [path]
  shards = sorted(glob.glob(glob.escape(path) + '-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]'))
  return shards or None


def slice_index(slc: Slice, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """numpy index of a saved slice; an empty slice (TF's rank-0 "full" slice) is everything."""
  if not slc:
    return tuple(slice(None) for _ in shape)
  if len(slc) != len(shape):
    raise ValueError(f'slice {_format_slice(slc)} has rank {len(slc)}, tensor shape {shape}')
  index = []
  for (start, length), dim in zip(slc, shape):
    stop = dim if length == -1 else start + length
    if not 0 <= start <= stop <= dim:
      raise ValueError(f'slice {_format_slice(slc)} lies outside shape {shape}')
    index.append(slice(start, stop))
  return tuple(index)


def decode_values(tensor_proto: bytes, dtype: np.dtype, count: int) -> np.ndarray:
  """The `count` elements of a TensorProto as TensorSliceWriter fills it (packed or not)."""
  field, wire, raw_dtype = _VALUE_FIELDS[_dtype_name(dtype)]
  chunks: list[bytes] = []  # packed runs of fixed-width values
  ints: list[int] = []  # varint values
  content = None
  for f, v in sstable.iter_fields(tensor_proto):
    if f == _TENSOR_CONTENT:
      content = v
    elif f != field:
      continue
    elif isinstance(v, bytes):  # packed repeated field
      if wire == _VARINT:
        ints.extend(_decode_packed_varints(v))
      else:
        chunks.append(v)
    elif wire == _VARINT:
      ints.append(v)
    else:  # one unpacked fixed-width element
      chunks.append(v.to_bytes(np.dtype(raw_dtype).itemsize, 'little'))
  if content is not None:
    values = np.frombuffer(content, dtype.newbyteorder('<'))
  elif wire == _VARINT:
    values = _from_varints(ints, dtype)
  else:
    values = np.frombuffer(b''.join(chunks), raw_dtype)
  if values.size != count:
    raise ValueError(f'{values.size} values for {count} elements')
  return values.astype(dtype.newbyteorder('='))


def _from_varints(ints: list[int], dtype: np.dtype) -> np.ndarray:
  if dtype.kind == 'b':
    return np.array(ints, np.uint64) != 0
  if dtype.kind == 'f' or dtype.name == 'bfloat16':  # 16-bit patterns
    return np.array(ints, np.uint64).astype(np.uint16).view(dtype)
  # int32/int64 are sign-extended to 64 bits on the wire; narrower ints were widened to int32
  return np.array([sstable.to_signed64(i) for i in ints], np.int64).astype(dtype)


def _decode_packed_varints(buf: bytes) -> list[int]:
  values, pos = [], 0
  while pos < len(buf):
    value, pos = sstable.decode_varint(buf, pos)
    values.append(value)
  return values


def _load_file(path: str, tensors: dict[str, _Tensor]) -> None:
  """Adds the tensors listed in and the slices stored in one V1 file to `tensors`."""
  with open(path, 'rb') as f:
    contents = f.read()
  try:
    table = sstable.read_table(contents, path)
  except ValueError as e:
    raise ValueError(f'{e} [read as a V1 (TensorSlice) checkpoint: no {path}.index beside it]'
                     ) from None
  if not table or table[0][0] != b'':
    raise ValueError(f'{path}: no V1 (TensorSlice) checkpoint metadata entry (not a checkpoint, '
                     'or corrupted)')
  try:
    for i, (key, value) in enumerate(table):
      for field, message in sstable.iter_fields(value, _SLICES_WIRE):
        if i == 0 and field == 1:
          _parse_meta(message, tensors)
        elif i > 0 and field == 2:
          _add_saved_slice(message, tensors)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: corrupted V1 (TensorSlice) checkpoint ({e})') from None


def _parse_meta(meta: bytes, tensors: dict[str, _Tensor]) -> None:
  for field, v in sstable.iter_fields(meta, _META_WIRE):
    if field == 1:
      name, tensor = _parse_slice_meta(v)
      if name in tensors:  # a tensor saved across shards: each shard lists its slices
        if (tensors[name].dtype, tensors[name].shape) != (tensor.dtype, tensor.shape):
          raise ValueError(f'shards disagree on the dtype or shape of {name!r}')
        tensors[name].slices.extend(tensor.slices)
      else:
        tensors[name] = tensor
    elif field == 2:
      _check_versions(v)


def _check_versions(versions: bytes) -> None:
  min_consumer, bad = 0, []
  for field, v in sstable.iter_fields(versions, _VERSION_WIRE):
    if field == 2:
      bad.append(v)
    elif field == 3:
      min_consumer = v
  if min_consumer > CHECKPOINT_VERSION or CHECKPOINT_VERSION in bad:
    raise ValueError(f'needs a checkpoint reader of version >= {min_consumer}; this one is '
                     f'version {CHECKPOINT_VERSION}')


def _parse_slice_meta(message: bytes) -> tuple[str, _Tensor]:
  name, shape, dtype, slices = '', (), 0, []
  for field, v in sstable.iter_fields(message, _SLICE_META_WIRE):
    if field == 1:
      name = v.decode('utf-8')
    elif field == 2:
      shape = tf_types.parse_shape(v)
    elif field == 3:
      dtype = v
    elif field == 4:
      slices.append(_parse_slice(v))
  if any(d < 0 for d in shape):
    raise ValueError(f'tensor {name!r} has shape {shape}')
  return name, _Tensor(dtype, shape, slices)


def _add_saved_slice(message: bytes, tensors: dict[str, _Tensor]) -> None:
  name, slc, data = '', (), b''
  for field, v in sstable.iter_fields(message, _SAVED_SLICE_WIRE):
    if field == 1:
      name = v.decode('utf-8')
    elif field == 2:
      slc = _parse_slice(v)
    elif field == 3:
      data = v
  if name not in tensors:
    raise ValueError(f'data for {name!r}, which the metadata does not list')
  tensors[name].data[slc] = data


def _parse_slice(message: bytes) -> Slice:
  extents = []
  for field, v in sstable.iter_fields(message, _TENSOR_SLICE_WIRE):
    if field == 1:
      start, length = 0, -1  # an extent without `length` spans the whole dimension
      for f, ev in sstable.iter_fields(v, _EXTENT_WIRE):
        if f == 1:
          start = sstable.to_signed64(ev)
        elif f == 2:
          length = sstable.to_signed64(ev)
      extents.append((start, length))
  return tuple(extents)


def _format_slice(slc: Slice) -> str:
  """TF's text form of a slice, e.g. `0,2:-`."""
  return ':'.join('-' if length == -1 else f'{start},{length}' for start, length in slc) or '-'


def _dtype_name(dtype: np.dtype) -> str:
  return 'bfloat16' if dtype.name == 'bfloat16' else dtype.newbyteorder('=').name


def _dtype_or_object(dtype: int) -> np.dtype:
  name = tf_types.NUMPY_DTYPES.get(dtype)
  if name not in _VALUE_FIELDS:
    return np.dtype(object)
  return tf_types.numpy_dtype(name).newbyteorder('=')


def _readable_dtype(dtype: int, name: str, prefix: str) -> np.dtype:
  kind = tf_types.NUMPY_DTYPES.get(dtype)
  if kind in _VALUE_FIELDS:
    return tf_types.numpy_dtype(kind).newbyteorder('=')
  kind = kind or tf_types.OTHER_DTYPES.get(dtype, f'unknown DataType {dtype}')
  raise ValueError(f'{prefix}: variable {name!r} has dtype {kind}, which V1 checkpoints of this '
                   'reader do not support (numeric tensors only)')
