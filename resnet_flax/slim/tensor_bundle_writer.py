"""Writes TensorFlow V2 checkpoints (TensorBundle) with numpy only, no TensorFlow.

The output is what `tf.raw_ops.SaveV2` writes for the same tensors fed in sorted order, byte for
byte: one data shard with the tensors' little-endian bytes back to back in name order, and an
index SSTable (header entry + one BundleEntryProto per tensor). See `tensor_bundle` for the
format and the reader.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np

from resnet_flax import atomic_files
from resnet_flax.slim import checkpoint_state, names, sstable, tensor_bundle, tf_types

GLOBAL_STEP = names.GLOBAL_STEP
_DTYPE_ENUMS = {name: enum for enum, name in tf_types.NUMPY_DTYPES.items()}


def write_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, Any],
                     global_step: int | None = None, *,
                     block_size: int = sstable.DEFAULT_BLOCK_SIZE) -> str:
  """Writes `tensors` ({name: array}) as a single-shard checkpoint and returns its prefix.

  With `global_step`, the prefix becomes `prefix-<global_step>` (as `Saver.save` names it) and
  an int64 scalar variable `global_step` is stored unless `tensors` has one (slim's train and
  eval scripts restore that variable). The directory's `checkpoint` state file is pointed at
  the new checkpoint.

  Atomic: every file is written under a temporary name in the same directory, fsynced, then
  renamed, so a crash never leaves a half-written checkpoint under the final names (an older
  checkpoint with the same prefix is removed first, never mixed with the new one).
  `block_size` is the index's SSTable block size (TF's default; smaller only for tests).
  """
  prefix = os.fspath(prefix)
  tensors = dict(tensors)
  if global_step is not None:
    given = np.asarray(global_step)  # a count: an int, or a run's state.step
    if given.shape or not np.issubdtype(given.dtype, np.integer) or given < 0:
      # int() had cut 5.5 to model.ckpt-5, and -1 named model.ckpt--1.
      raise ValueError(f'global_step={global_step!r} must be a whole number >= 0 (a step count, as '
                       'tf.train.Saver.save takes).')
    step = int(given)
    prefix = f'{prefix}-{step}'
    if GLOBAL_STEP in tensors and not np.array_equal(tensors[GLOBAL_STEP], step):
      raise ValueError(f'tensors[{GLOBAL_STEP!r}] = {tensors[GLOBAL_STEP]} but global_step={step}')
    tensors.setdefault(GLOBAL_STEP, np.int64(step))
  arrays = {name: _as_array(name, value) for name, value in tensors.items()}
  directory = os.path.dirname(os.path.abspath(prefix))
  os.makedirs(directory, exist_ok=True)
  data_final = tensor_bundle.data_path(prefix, 0, 1)
  index_final = prefix + '.index'
  state_final = os.path.join(directory, checkpoint_state.STATE_FILENAME)
  temps = []
  try:
    entries = []
    temps.append(_write_temp(data_final, _data_chunks(arrays, entries)))
    index = sstable.build_table(_index_entries(entries), block_size=block_size)
    temps.append(_write_temp(index_final, [index]))
    temps.append(_write_temp(state_final, [checkpoint_state.state_text(os.path.basename(prefix))]))
    # The index is what makes a checkpoint exist: drop the old one before its data is
    # replaced, and publish the new one only after its data is in place.
    if os.path.lexists(index_final):
      os.unlink(index_final)
    for temp, final in zip(temps, (data_final, index_final, state_final)):
      os.replace(temp, final)
      atomic_files.fsync_directory(directory)
    temps.clear()
  finally:
    for temp in temps:
      if os.path.exists(temp):
        os.unlink(temp)
  return prefix


def _as_array(name: Any, value: Any) -> np.ndarray:
  if not isinstance(name, str) or not name or name.startswith('\0'):
    raise ValueError(f'variable name {name!r}: names must be non-empty strings not starting with '
                     'NUL (the index reserves those keys)')
  array = np.asarray(value)
  if array.dtype.name not in _DTYPE_ENUMS:
    supported = ', '.join(sorted(_DTYPE_ENUMS))
    raise ValueError(f'variable {name!r}: dtype {array.dtype} cannot be written; supported: '
                     f'{supported}')
  little_endian = array.dtype.newbyteorder('<')  # the bundle stores little-endian bytes
  if array.dtype != little_endian:
    array = array.astype(little_endian)
  return array  # any memory layout: tobytes() emits C order


def _data_chunks(arrays: Mapping[str, np.ndarray], entries: list) -> Iterator[bytes]:
  """Yields the data shard's bytes; appends (key, BundleEntryProto bytes) to `entries`."""
  offset = 0
  for name in sorted(arrays, key=lambda n: n.encode('utf-8')):  # index order: bytewise
    array = arrays[name]
    data = array.tobytes()
    entries.append((name.encode('utf-8'), _entry_proto(array, offset, data)))
    yield data
    offset += len(data)


def _entry_proto(array: np.ndarray, offset: int, data: bytes) -> bytes:
  # Field by field as TF serializes BundleEntryProto (proto3: zero scalars omitted, the shape
  # sub-message always present, a zero dimension as an empty Dim).
  dims = b''.join(sstable.bytes_field(2, sstable.varint_field(1, d) if d else b'')
                  for d in array.shape)
  out = sstable.varint_field(1, _DTYPE_ENUMS[array.dtype.name]) + sstable.bytes_field(2, dims)
  if offset:
    out += sstable.varint_field(4, offset)
  if data:
    out += sstable.varint_field(5, len(data))
  return out + sstable.fixed32_field(6, sstable.mask_crc(sstable.crc32c(data)))


def _index_entries(entries: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
  version = sstable.varint_field(1, tensor_bundle.BUNDLE_VERSION)  # VersionDef.producer
  header = sstable.varint_field(1, 1) + sstable.bytes_field(3, version)  # 1 shard, little-endian
  yield tensor_bundle.HEADER_KEY, header
  yield from entries


def _write_temp(final: str, chunks) -> str:
  """Writes `chunks` to a new hidden file beside `final` (so the rename stays on one file
  system and globs of the prefix never match it), fsynced; returns its path."""
  temp = atomic_files.temporary_beside(final)
  try:
    with open(temp, 'xb') as f:
      for chunk in chunks:
        f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    if os.path.exists(temp):
      os.unlink(temp)
    raise
  return temp
