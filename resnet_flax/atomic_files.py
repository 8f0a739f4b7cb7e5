"""Files written whole or not at all (a reader, or a run started again, never sees half a file), and
strict JSON for them: NaN and infinities as null."""

from __future__ import annotations

import errno
import json
import math
import os
import uuid
from typing import Any, Callable, IO

# What opening or syncing a directory fails with where that is not possible, as PostgreSQL's
# fsync_fname ignores for directories.
_UNSYNCABLE = (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.ENOTSUP, errno.EISDIR)


def finite_or_null(value: Any) -> Any:
  """`value` (floats, dicts, lists, tuples as lists) with NaN and infinities as None: JSON null,
  which strict readers accept where Python's bare NaN is not JSON."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: finite_or_null(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_null(item) for item in value]
  return value


def write_atomically(path: str, write: Callable[[IO], None], mode: str = 'w') -> None:
  """Calls `write(file)` on a new temporary file next to `path`, then renames it into place and
  makes the rename durable; a failed write (a full disk) leaves neither half a file nor the
  temporary one. `mode` is 'w' or 'wb'."""
  temporary = temporary_beside(path)
  try:
    with open(temporary, mode.replace('w', 'x'),
              **({} if 'b' in mode else {'encoding': 'utf-8', 'newline': ''})) as file:
      write(file)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  fsync_directory(os.path.dirname(os.path.abspath(path)))


def temporary_beside(path: str) -> str:
  """A new name in `path`'s directory for a file to rename onto `path`: hidden, so listings and
  globs of the final names never see it, and unique, so no two writers share one."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f'.{name}.{uuid.uuid4().hex[:12]}.tmp')


def fsync_directory(directory: str) -> None:
  """Makes the renames into `directory` durable: without it, a power loss can undo a rename whose
  file was synced. Best effort: a file system that cannot sync a directory (EINVAL), or one this
  user may write but not read (EACCES), leaves the rename done, so that is no failed write."""
  if not hasattr(os, 'O_DIRECTORY'):  # directories cannot be opened this way on Windows
    return
  try:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  except OSError as error:
    if error.errno in _UNSYNCABLE:
      return
    raise
  try:
    os.fsync(descriptor)
  except OSError as error:
    if error.errno not in _UNSYNCABLE:
      raise
  finally:
    os.close(descriptor)


def write_text(path: str, text: str) -> None:
  """Writes UTF-8 text atomically."""
  write_atomically(path, lambda file: file.write(text))


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON, atomically; NaN and infinities as null, as metrics.jsonl
  has them (a diverged run's eval loss), so strict JSON readers can read every result."""
  write_text(path, json.dumps(finite_or_null(value), indent=2, sort_keys=True, allow_nan=False) + '\n')


def read_json(path: str) -> Any:
  """The parsed file, or None when it does not exist."""
  try:
    with open(path, encoding='utf-8') as file:
      return json.load(file)
  except FileNotFoundError:
    return None
