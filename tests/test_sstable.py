"""Protobuf wire-format helpers used by the SSTable / TensorBundle code."""

import pytest

from resnet_flax.slim import sstable


def test_protobuf_varints():
  for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
    assert sstable.decode_varint(sstable.encode_varint(value), 0) == (value, len(
        sstable.encode_varint(value)))
  assert sstable.to_signed64(sstable.decode_varint(sstable.encode_varint(-5), 0)[0]) == -5
  with pytest.raises(ValueError, match='truncated'):
    sstable.decode_varint(b'\x80\x80', 0)
  with pytest.raises(ValueError, match='wire type'):
    list(sstable.iter_fields(sstable.varint_field(2, 1), {2: sstable.WIRE_BYTES}))
