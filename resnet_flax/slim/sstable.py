"""Low-level pieces of TensorFlow's checkpoint index: crc32c, protobuf wire format, SSTable.

The index of a TensorBundle (`*.index`) is a LevelDB-format table ("SSTable") as written by
`tensorflow/core/lib/io/table_builder.cc`:

    [data block 0][trailer] ... [data block n][trailer] [metaindex block][trailer]
    [index block][trailer] [footer: 2 block handles padded to 40 bytes, fixed64 magic]

A block is a run of prefix-compressed entries (varint shared, varint unshared, varint value
length, key suffix, value) followed by the uint32 offsets of its restart points and their
count. A trailer is one compression byte and the masked crc32c of the block plus that byte.
The index block maps a separator key (>= every key of a data block) to that block's handle.
"""

from __future__ import annotations

import functools
import struct
from typing import Iterable, Iterator, Mapping

import numpy as np

try:
  import google_crc32c as _google_crc32c
  if getattr(_google_crc32c, 'implementation', 'c') != 'c':  # its pure-Python fallback is slow
    _google_crc32c = None
except ImportError:
  _google_crc32c = None

TABLE_MAGIC = 0xdb4775248b80fb57
FOOTER_SIZE = 48  # two block handles (at most 2 * 10 bytes each) padded to 40, then the magic
TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
DEFAULT_BLOCK_SIZE = 262144  # TF's table::Options::block_size (LevelDB's is 4096)
DEFAULT_RESTART_INTERVAL = 16

# --- crc32c (Castagnoli) --------------------------------------------------------------------

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xa282ead8
_NUMPY_MIN_BYTES = 1024  # below this the pure-Python loop beats numpy's per-call overhead
_CHUNK = 16  # bytes per chunk in the numpy path: 8 uint16 lookup tables of 256 KiB


def _byte_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (_POLY if c & 1 else 0)
    table.append(c)
  return tuple(table)


_TABLE = _byte_table()
_TABLE_NP = np.array(_TABLE, np.uint32)
_U8, _U16, _LOW_BYTE, _LOW_PAIR = np.uint32(8), np.uint32(16), np.uint32(0xff), np.uint32(0xffff)
# Every single-byte value at each of the 4 byte positions of a uint32 register.
_REGISTER_BASIS = (np.arange(256, dtype=np.uint32)[None, :]
                   << (8 * np.arange(4, dtype=np.uint32))[:, None]).ravel()

CRC32C_IMPLEMENTATION = 'google_crc32c' if _google_crc32c else 'numpy'


def crc32c(data: bytes, crc: int = 0) -> int:
  """CRC-32C of `data`, continuing a running `crc` (that of the bytes before `data`)."""
  if _google_crc32c is not None:
    data = data if isinstance(data, bytes) else bytes(data)  # its C API takes only bytes
    return _google_crc32c.extend(crc, data) if crc else _google_crc32c.value(data)
  if len(data) < _NUMPY_MIN_BYTES:
    return _crc32c_python(data, crc)
  return _crc32c_numpy(data, crc)


def mask_crc(crc: int) -> int:
  """LevelDB's crc masking (rotate right 15, add a constant): stored CRCs are masked so that
  a CRC computed over data that embeds CRCs stays well distributed."""
  return ((((crc >> 15) | (crc << 17)) & 0xffffffff) + _MASK_DELTA) & 0xffffffff


def unmask_crc(masked: int) -> int:
  """Inverse of `mask_crc`."""
  rot = (masked - _MASK_DELTA) & 0xffffffff
  return ((rot >> 17) | (rot << 15)) & 0xffffffff


def _crc32c_python(data: bytes, crc: int) -> int:
  crc ^= 0xffffffff
  table = _TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xff] ^ (crc >> 8)
  return crc ^ 0xffffffff


def _feed_zero_byte(register: np.ndarray) -> np.ndarray:
  return _TABLE_NP[register & _LOW_BYTE] ^ (register >> _U8)


@functools.cache  # a constant, built on first use: 2 MiB needed only without google_crc32c
def _pair_tables() -> np.ndarray:
  """Row q, column v: the register after a _CHUNK-byte chunk (from register 0) whose only
  non-zero bytes are the little-endian uint16 v at byte 2q. CRC is linear over GF(2), so a
  chunk's register is the xor of these rows over its uint16s (slicing-by-16, vectorized)."""
  pair = np.arange(1 << 16, dtype=np.uint32)
  first = _TABLE_NP[pair & _LOW_BYTE]
  rows = [_TABLE_NP[(first ^ (pair >> _U8)) & _LOW_BYTE] ^ (first >> _U8)]
  for _ in range(_CHUNK // 2 - 1):
    rows.append(_feed_zero_byte(_feed_zero_byte(rows[-1])))
  return np.stack(rows[::-1])


def _apply(operator: np.ndarray, register: np.ndarray) -> np.ndarray:
  """Applies a linear map on registers given as 4 byte tables (one per register byte)."""
  b = register.astype('<u4', copy=False).view(np.uint8).reshape(-1, 4)
  return operator[0][b[:, 0]] ^ operator[1][b[:, 1]] ^ operator[2][b[:, 2]] ^ operator[3][b[:, 3]]


@functools.cache  # constants too (4 KiB per level, levels <= log2 of the largest input)
def _zeros_operator(level: int) -> np.ndarray:
  """Byte tables of 'feed _CHUNK * 2**level zero bytes' on a register."""
  if level == 0:
    pairs = _pair_tables()
    x = _REGISTER_BASIS
    return (pairs[0][x & _LOW_PAIR] ^ pairs[1][x >> _U16]).reshape(4, 256)
  half = _zeros_operator(level - 1)
  return _apply(half, _apply(half, _REGISTER_BASIS)).reshape(4, 256)


def _crc32c_numpy(data: bytes, crc: int, block: int = 1 << 15) -> int:
  # Two identities make the chunks independent: a non-zero initial register equals xor-ing it
  # into the first 4 data bytes with register 0, and leading zero bytes leave register 0 alone,
  # so we can left-pad to whole chunks, crc every chunk from 0, then combine pairwise
  # (crc(A + B) = zeros_len(B)(crc(A)) ^ crc(B)) in a tree.
  n = len(data)
  num = -(-n // _CHUNK)
  pad = num * _CHUNK - n
  buf = np.zeros(num * _CHUNK, np.uint8)
  buf[pad:] = np.frombuffer(data, np.uint8)
  buf[pad:pad + 4] ^= np.frombuffer((crc ^ 0xffffffff).to_bytes(4, 'little'), np.uint8)
  pairs = _pair_tables()
  words = buf.view('<u2').reshape(num, _CHUNK // 2)
  registers = np.empty(num, np.uint32)
  for start in range(0, num, block):
    columns = words[start:start + block].T.copy()  # contiguous rows gather much faster
    acc = pairs[0][columns[0]]
    for q in range(1, _CHUNK // 2):
      acc ^= pairs[q][columns[q]]
    registers[start:start + block] = acc
  level = 0
  while len(registers) > 1:
    if len(registers) % 2:  # a leading all-zero chunk has register 0
      registers = np.concatenate([np.zeros(1, np.uint32), registers])
    registers = _apply(_zeros_operator(level), registers[0::2].copy()) ^ registers[1::2]
    level += 1
  return int(registers[0]) ^ 0xffffffff


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
