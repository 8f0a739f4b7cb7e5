"""Low-level pieces of TensorFlow's checkpoint index: protobuf wire format and SSTable.

The index of a TensorBundle (`*.index`) is a LevelDB-format table ("SSTable") as written by
`tensorflow/core/lib/io/table_builder.cc`:

    [data block 0][trailer] ... [data block n][trailer] [metaindex block][trailer]
    [index block][trailer] [footer: 2 block handles padded to 40 bytes, fixed64 magic]

A block is a run of prefix-compressed entries (varint shared, varint unshared, varint value
length, key suffix, value) followed by the uint32 offsets of its restart points and their
count. A trailer is one compression byte and the masked crc32c (module `crc32c`) of the block
plus that byte.
The index block maps a separator key (>= every key of a data block) to that block's handle.
"""

from __future__ import annotations

import struct
from typing import Iterable, Iterator, Mapping

from resnet_flax.slim.crc32c import crc32c, mask_crc, unmask_crc

TABLE_MAGIC = 0xdb4775248b80fb57
FOOTER_SIZE = 48  # two block handles (at most 2 * 10 bytes each) padded to 40, then the magic
TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
DEFAULT_BLOCK_SIZE = 262144  # TF's table::Options::block_size (LevelDB's is 4096)
DEFAULT_RESTART_INTERVAL = 16

# --- varints and protobuf wire format -------------------------------------------------------

WIRE_VARINT, WIRE_FIXED64, WIRE_BYTES, WIRE_FIXED32 = 0, 1, 2, 5


def encode_varint(value: int) -> bytes:
  """Base-128 varint; negative values as 64-bit two's complement (protobuf int32/int64)."""
  value &= (1 << 64) - 1
  out = bytearray()
  while value > 0x7f:
    out.append((value & 0x7f) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
  """(value, position after it); ValueError if it runs past the end or over 10 bytes."""
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('truncated varint')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7f) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise ValueError('varint longer than 10 bytes')


def to_signed64(value: int) -> int:
  """Reinterprets a decoded varint as a protobuf int64/int32 (two's complement)."""
  return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(buf: bytes, wire_types: Mapping[int, int] | None = None
                ) -> Iterator[tuple[int, int | bytes]]:
  """(field number, value) of a serialized protobuf message; value is an int for varint and
  fixed-width fields, bytes for length-delimited ones. ValueError on malformed input or when a
  field listed in `wire_types` has another wire type."""
  wire_types = wire_types or {}
  pos = 0
  while pos < len(buf):
    tag, pos = decode_varint(buf, pos)
    field, wire = tag >> 3, tag & 7
    if wire == WIRE_VARINT:
      value, pos = decode_varint(buf, pos)
    elif wire in (WIRE_FIXED64, WIRE_FIXED32):
      width = 8 if wire == WIRE_FIXED64 else 4
      if pos + width > len(buf):
        raise ValueError('truncated fixed-width field')
      value, pos = int.from_bytes(buf[pos:pos + width], 'little'), pos + width
    elif wire == WIRE_BYTES:
      length, pos = decode_varint(buf, pos)
      if pos + length > len(buf):
        raise ValueError('truncated length-delimited field')
      value, pos = bytes(buf[pos:pos + length]), pos + length
    else:
      raise ValueError(f'unsupported protobuf wire type {wire} (field {field})')
    if field == 0:
      raise ValueError('protobuf field number 0')
    if wire_types.get(field, wire) != wire:
      raise ValueError(f'protobuf field {field} has wire type {wire}, not {wire_types[field]}')
    yield field, value


def varint_field(field: int, value: int) -> bytes:
  """A varint field; proto3 omits zeros, so callers skip them to match TF's bytes."""
  return encode_varint(field << 3 | WIRE_VARINT) + encode_varint(value)


def bytes_field(field: int, payload: bytes) -> bytes:
  """A length-delimited (string / bytes / sub-message) field."""
  return encode_varint(field << 3 | WIRE_BYTES) + encode_varint(len(payload)) + payload


def fixed32_field(field: int, value: int) -> bytes:
  """A fixed32 field."""
  return encode_varint(field << 3 | WIRE_FIXED32) + struct.pack('<I', value)


# --- SSTable reading ------------------------------------------------------------------------


def read_table(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
  """All (key, value) entries of an SSTable file's contents, in order. Verifies every block's
  checksum; raises ValueError naming `name` (the file) if the table is damaged or compressed."""
  if len(data) < FOOTER_SIZE:
    raise ValueError(f'{name}: only {len(data)} bytes, too short for a checkpoint index '
                     '(file truncated or not an index)')
  footer = data[-FOOTER_SIZE:]
  if int.from_bytes(footer[40:], 'little') != TABLE_MAGIC:
    raise ValueError(f'{name}: no SSTable magic number at the end of the file '
                     '(file truncated or not a checkpoint index)')
  try:
    metaindex_handle, pos = _decode_handle(footer, 0)
    index_handle, _ = _decode_handle(footer, pos)
  except ValueError as e:
    raise ValueError(f'{name}: corrupted footer ({e})') from None
  _read_block(data, metaindex_handle, name, 'metaindex block')  # unused (TF leaves it empty),
  # but checked so that damage anywhere outside the footer's padding is reported
  entries = []
  for _, handle_bytes in _iter_block(_read_block(data, index_handle, name, 'index block'), name):
    try:
      handle, end = _decode_handle(handle_bytes, 0)
    except ValueError as e:
      raise ValueError(f'{name}: corrupted index block ({e})') from None
    if end != len(handle_bytes):
      raise ValueError(f'{name}: corrupted index block (bad block handle)')
    entries.extend(_iter_block(_read_block(data, handle, name, 'data block'), name))
  return entries


def _decode_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
  offset, pos = decode_varint(buf, pos)
  size, pos = decode_varint(buf, pos)
  return (offset, size), pos


def _read_block(data: bytes, handle: tuple[int, int], name: str, what: str) -> bytes:
  offset, size = handle
  end = offset + size + TRAILER_SIZE
  if end > len(data) - FOOTER_SIZE:
    raise ValueError(f'{name}: {what} at bytes {offset}..{end} lies past the end of the table '
                     '(file truncated or corrupted)')
  contents, trailer = data[offset:offset + size], data[offset + size:end]
  stored = unmask_crc(int.from_bytes(trailer[1:], 'little'))
  if crc32c(trailer[:1], crc32c(contents)) != stored:
    raise ValueError(f'{name}: {what} at byte {offset} fails its checksum (file damaged); '
                     're-download or re-export the checkpoint')
  if trailer[0] == SNAPPY_COMPRESSION:
    raise ValueError(f'{name}: {what} is snappy-compressed; compressed checkpoint indexes are '
                     'not supported (TensorFlow never writes them for checkpoints)')
  if trailer[0] != NO_COMPRESSION:
    raise ValueError(f'{name}: {what} has unknown compression type {trailer[0]}')
  return contents


def _iter_block(block: bytes, name: str) -> Iterator[tuple[bytes, bytes]]:
  def corrupt(why: str) -> ValueError:
    return ValueError(f'{name}: corrupted block ({why})')

  if len(block) < 4:
    raise corrupt('shorter than its restart count')
  num_restarts = int.from_bytes(block[-4:], 'little')
  limit = len(block) - 4 * (num_restarts + 1)
  if num_restarts < 1 or limit < 0:
    raise corrupt(f'{num_restarts} restart points do not fit')
  pos, key = 0, b''
  while pos < limit:
    try:
      shared, pos = decode_varint(block, pos)
      unshared, pos = decode_varint(block, pos)
      value_length, pos = decode_varint(block, pos)
    except ValueError as e:
      raise corrupt(str(e)) from None
    if shared > len(key) or pos + unshared + value_length > limit:
      raise corrupt(f'entry at byte {pos} overruns its key or block')
    key = key[:shared] + block[pos:pos + unshared]
    pos += unshared
    yield key, block[pos:pos + value_length]
    pos += value_length


# --- SSTable writing ------------------------------------------------------------------------


def build_table(entries: Iterable[tuple[bytes, bytes]], block_size: int = DEFAULT_BLOCK_SIZE,
                restart_interval: int = DEFAULT_RESTART_INTERVAL) -> bytes:
  """An SSTable holding `entries` (keys strictly increasing, bytewise), uncompressed.

  Follows LevelDB's TableBuilder step for step (block cut when the size estimate reaches
  `block_size`, shortest separator / successor index keys, restart interval 1 in the index),
  so the bytes match what TensorFlow writes for the same entries.
  """
  out = bytearray()
  index: list[tuple[bytes, bytes]] = []
  block: list[tuple[bytes, bytes]] = []
  estimate = 0
  pending_handle, last_key = None, None
  for key, value in entries:
    if last_key is not None and key <= last_key:
      raise ValueError(f'SSTable keys must be strictly increasing: {key!r} after {last_key!r}')
    if pending_handle is not None:
      index.append((_shortest_separator(last_key, key), pending_handle))
      pending_handle = None
    if len(block) % restart_interval == 0:
      estimate += 4
    shared = _common_prefix(block[-1][0], key) if len(block) % restart_interval else 0
    estimate += (len(encode_varint(shared)) + len(encode_varint(len(key) - shared))
                 + len(encode_varint(len(value))) + len(key) - shared + len(value))
    block.append((key, value))
    last_key = key
    if estimate + 4 >= block_size:
      pending_handle = _write_block(out, encode_block(block, restart_interval))
      block, estimate = [], 0
  if block:
    pending_handle = _write_block(out, encode_block(block, restart_interval))
  metaindex_handle = _write_block(out, encode_block([], restart_interval))
  if pending_handle is not None:
    index.append((_short_successor(last_key), pending_handle))
  index_handle = _write_block(out, encode_block(index, 1))
  footer = (metaindex_handle + index_handle).ljust(FOOTER_SIZE - 8, b'\0')
  return bytes(out + footer + struct.pack('<Q', TABLE_MAGIC))


def encode_block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
  """A block's contents (entries, restart offsets, restart count), without its trailer."""
  out = bytearray()
  restarts = []
  previous = b''
  for i, (key, value) in enumerate(entries):
    if i % restart_interval == 0:
      restarts.append(len(out))
      shared = 0
    else:
      shared = _common_prefix(previous, key)
    out += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
    out += key[shared:] + value
    previous = key
  restarts = restarts or [0]  # LevelDB's empty block still has one restart point
  return bytes(out + struct.pack(f'<{len(restarts) + 1}I', *restarts, len(restarts)))


def block_trailer(contents: bytes, compression: int = NO_COMPRESSION) -> bytes:
  """The 5-byte trailer: compression type, masked crc32c of contents + that byte."""
  kind = bytes([compression])
  return kind + struct.pack('<I', mask_crc(crc32c(kind, crc32c(contents))))


def _write_block(out: bytearray, contents: bytes) -> bytes:
  handle = encode_varint(len(out)) + encode_varint(len(contents))
  out += contents + block_trailer(contents)
  return handle


def _common_prefix(a: bytes, b: bytes) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
  """LevelDB's BytewiseComparator::FindShortestSeparator: a short key in [start, limit)."""
  i = _common_prefix(start, limit)
  if i < min(len(start), len(limit)):
    byte = start[i]
    if byte < 0xff and byte + 1 < limit[i]:
      return start[:i] + bytes([byte + 1])
  return start


def _short_successor(key: bytes) -> bytes:
  """LevelDB's BytewiseComparator::FindShortSuccessor: a short key >= `key`."""
  for i, byte in enumerate(key):
    if byte != 0xff:
      return key[:i] + bytes([byte + 1])
  return key
