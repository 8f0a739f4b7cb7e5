"""CRC-32C (Castagnoli), as LevelDB and TensorFlow checksum checkpoint blocks and tensors.

`crc32c(data, crc=0)` uses google_crc32c's C extension when it is installed and otherwise a
vectorized numpy slicing-by-16 (fast enough for ImageNet-size checkpoints); `mask_crc` /
`unmask_crc` are LevelDB's masking of stored checksums.
"""

from __future__ import annotations

import functools

import numpy as np

try:
  import google_crc32c as _google_crc32c
  if getattr(_google_crc32c, 'implementation', 'c') != 'c':  # its pure-Python fallback is slow
    _google_crc32c = None
except ImportError:
  _google_crc32c = None

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
