"""TensorFlow's DataType enum and TensorShapeProto as numpy sees them, for the checkpoint readers and writer."""

from __future__ import annotations

import numpy as np

from resnet_flax.slim import sstable

# TF DataType enum (tensorflow/core/framework/types.proto) -> numpy dtype name. Tensors of
# these types are stored as their raw little-endian element bytes.
NUMPY_DTYPES = {
    1: 'float32', 2: 'float64', 3: 'int32', 4: 'uint8', 5: 'int16', 6: 'int8', 8: 'complex64',
    9: 'int64', 10: 'bool', 14: 'bfloat16', 17: 'uint16', 18: 'complex128', 19: 'float16',
    22: 'uint32', 23: 'uint64',
}
# Types we recognize but cannot read, for the error message.
OTHER_DTYPES = {
    7: 'string', 11: 'qint8', 12: 'quint8', 13: 'qint32', 15: 'qint16', 16: 'quint16',
    20: 'resource', 21: 'variant', 24: 'float8_e5m2', 25: 'float8_e4m3fn', 29: 'int4',
    30: 'uint4',
}
_SHAPE_WIRE = {2: sstable.WIRE_BYTES, 3: sstable.WIRE_VARINT}  # TensorShapeProto
_DIM_WIRE = {1: sstable.WIRE_VARINT}  # TensorShapeProto.Dim


def numpy_dtype(name: str) -> np.dtype:
  """np.dtype for a name in NUMPY_DTYPES; bfloat16 comes from ml_dtypes (imported lazily)."""
  if name == 'bfloat16':
    import ml_dtypes  # a jax dependency; only needed for bfloat16 tensors
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name).newbyteorder('<')


def parse_shape(value: bytes) -> tuple[int, ...]:
  """The dimensions of a serialized TensorShapeProto; an unknown rank is a ValueError."""
  dims = []
  for field, v in sstable.iter_fields(value, _SHAPE_WIRE):
    if field == 2:
      size = 0
      for dim_field, dv in sstable.iter_fields(v, _DIM_WIRE):
        if dim_field == 1:
          size = sstable.to_signed64(dv)
      dims.append(size)
    elif field == 3 and v:
      raise ValueError('shape of unknown rank')
  return tuple(dims)
