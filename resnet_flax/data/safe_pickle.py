"""Unpickling that can build numpy arrays and plain containers, and nothing else.

`pickle.load` on a downloaded file runs whatever callables the file names (`os.system`,
`subprocess.Popen`, ...). The CIFAR-10 python files only need dicts, lists, ints, byte
strings and uint8 arrays, so every global the file asks for is refused except the numpy
names an array is rebuilt from (protocols 2 to 5) and the ways Python 3 writes bytes at
protocols 0-2 (latin-1 text, `bytes()` for empty ones).
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Optional

import numpy as np

from resnet_flax.data.errors import DataError, one_line

# How a pickled ndarray is rebuilt (`ndarray.__reduce__` at protocols 2-4). Files written by
# numpy 1.x (the published CIFAR files) name `numpy.core`; numpy 2.x renamed it `numpy._core`.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]


def _latin1_bytes(text: str, encoding: str = 'latin1') -> bytes:
  """How Python 3 pickles bytes at protocols 0-2, `_codecs.encode(str, 'latin1')`, and nothing else."""
  if not isinstance(text, str) or encoding != 'latin1':
    raise pickle.UnpicklingError(f'_codecs.encode({type(text).__name__}, {encoding!r}) is not a byte string')
  return text.encode('latin1')


def _empty_bytes(*args: Any) -> bytes:
  """How Python 3 pickles b'' at protocols 0-2 (an empty array's data), `bytes()`, and nothing else."""
  if args:
    raise pickle.UnpicklingError(f'bytes{args!r} is not an empty byte string')
  return b''


def _from_buffer(buffer: Any, dtype: np.dtype, shape: tuple[int, ...], order: str,
                 axis_order: Optional[tuple[int, ...]] = None) -> np.ndarray:
  """How numpy rebuilds an array pickled at protocol 5 (`numpy._core.numeric._frombuffer`; a
  non-contiguous one with its `axis_order`): a copy of plain bytes, never of objects."""
  if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError('an array at protocol 5 must be plain bytes of a numeric dtype')
  array = np.frombuffer(buffer, dtype)
  if order == 'K' and axis_order is not None:
    return array.reshape(shape, order='C').transpose(axis_order).copy()
  return array.reshape(shape, order=order).copy()


_ALLOWED_GLOBALS = {
    ('_codecs', 'encode'): _latin1_bytes,  # a CIFAR batch pickled again by Python 3 at protocol 2
    ('__builtin__', 'bytes'): _empty_bytes,
    ('numpy.core.numeric', '_frombuffer'): _from_buffer,
    ('numpy._core.numeric', '_frombuffer'): _from_buffer,
    ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
  """An Unpickler whose only reachable callables are the entries of `_ALLOWED_GLOBALS`."""

  def __init__(self, file, path: str):
    # encoding='bytes': the CIFAR files come from Python 2, whose str is today's bytes.
    super().__init__(file, encoding='bytes')
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise DataError(f'refusing to unpickle {module}.{name} from {self._path}: it is not how numpy arrays, '
                      'dicts, lists, ints or byte strings are pickled, and loading it could run code; delete the '
                      'file and download it again (a file made by hand: save its arrays and lists of plain ints).'
                      ) from None


def load(path: str | os.PathLike) -> Any:
  """The object pickled in `path`, built without calling anything but numpy's array constructors."""
  with open(path, 'rb') as file:
    try:
      return _ArrayUnpickler(file, os.fspath(path)).load()
    except DataError:
      raise
    except Exception as error:  # Whatever a damaged stream provokes: EOFError, UnpicklingError, ...
      raise DataError(f'cannot unpickle {os.fspath(path)}: {type(error).__name__}: {one_line(error)}; '
                      f'the file is damaged, download it again.') from error
