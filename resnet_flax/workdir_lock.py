"""One training run per workdir: an exclusive lock on `WORKDIR/.lock`, held while it trains.

Two runs started on one workdir had both saved into `checkpoints/` (one failing with a
misleading "free disk space" error) and logged every step twice in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import IO, Iterator, Optional

import jax

from resnet_flax import checkpoints, distributed

LOCK_NAME = '.lock'
# Tries at a lock file that another run's end keeps removing (see `_open_and_lock`).
_OPEN_ATTEMPTS = 5


class WorkdirInUseError(checkpoints.CheckpointError):
  """Another process holds the workdir's lock; the message names it."""


@contextlib.contextmanager
def held(workdir: str, subdirectories: tuple[str, ...] = ()) -> Iterator[None]:
  """Holds `workdir`'s lock (creating the directory) until the block ends; raises
  WorkdirInUseError at once if another process holds it. Where no lock can be taken (a
  file system without locks, a workdir that cannot be made, which `check_workdir` then
  names), the block runs unguarded, as it did before there was a lock.

  At the end, what the run made and left empty goes: those of `subdirectories` (the
  ones the run writes into) that were not there before, then the lock file if nothing else
  is there, then the workdir if the run made it. A run that failed before writing
  anything (on its data, its init checkpoint) leaves nothing."""
  directory = checkpoints.local_path(workdir, 'workdir')
  path = os.path.join(directory, LOCK_NAME)
  made_directory = not os.path.isdir(directory)
  file, locked = _open_and_lock(path, workdir)
  made = [name for name in subdirectories if not os.path.lexists(os.path.join(directory, name))] if locked else []
  with file if file is not None else contextlib.nullcontext():
    if locked and file.writable():
      with contextlib.suppress(OSError):  # the owner's name is for the message only (a full disk is check_workdir's)
        file.seek(0)
        file.truncate()
        file.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
        file.flush()
    try:
      yield  # closing the file releases the lock, also when the process dies
    finally:
      if locked:
        _remove_if_nothing_written(directory, made_directory, made)


@contextlib.contextmanager
def held_by_chief(workdir: str, subdirectories: tuple[str, ...] = ()) -> Iterator[None]:
  """`held` for a run of one or many processes: the chief (process 0) takes the lock, and
  if another run holds it (or taking it fails otherwise), every process raises, not the
  chief alone: the others would wait for it at their first collective until that timed out."""
  checkpoints.local_path(workdir, 'workdir')  # a URL: every process refuses it by itself, at once
  with contextlib.ExitStack() as stack:
    with distributed.failing_together(f'to take the lock of {workdir}'):
      if jax.process_index() == 0:
        stack.enter_context(held(workdir, subdirectories))
    yield


def _open_and_lock(path: str, workdir: str) -> tuple[Optional[IO[str]], bool]:
  """The lock file, open, and whether this process now holds its lock (False: no lock can be taken).

  A run that ends with nothing else in its workdir removes the lock file; another run that
  opened it just before would lock a file no longer there while a third locked a new one.
  So a lock counts only on the file the path still names; else the one there now is tried.
  """
  for _ in range(_OPEN_ATTEMPTS):
    file = _open(path)
    if file is None:
      return None, False
    try:
      if not _locked(file, workdir):
        return file, False
      if _is_file_at(file, path):
        return file, True
    except BaseException:
      file.close()
      raise
    file.close()
  return None, False  # removed under us again and again: train unguarded rather than not at all


def _is_file_at(file: IO[str], path: str) -> bool:
  """Whether `path` still names the open `file` (not removed or replaced since it was opened)."""
  try:
    named, opened = os.stat(path), os.fstat(file.fileno())
  except OSError:
    return False
  return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _open(path: str) -> Optional[IO[str]]:
  """The lock file, made if need be; read-only where another user made it (flock needs no write
  access); None where it cannot be opened at all."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, 'a+', encoding='utf-8')
  except PermissionError:
    with contextlib.suppress(OSError):
      return open(path, encoding='utf-8')
  except OSError:
    pass
  return None


def _locked(file: IO[str], workdir: str) -> bool:
  """Takes the lock on `file` without waiting; False where the file system has no locks."""
  try:
    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    file.seek(0)
    owner = file.read().strip() or 'another process'
    raise WorkdirInUseError(f'{workdir} is in use by another training run ({owner}); wait for it to end or stop '
                            'it, or pass another --workdir.') from None
  except OSError:  # e.g. ENOLCK or EOPNOTSUPP on some FUSE mounts
    return False
  return True


def _remove_if_nothing_written(directory: str, made_directory: bool, made: list[str]) -> None:
  """Removes the `made` subdirectories that are empty (an orbax manager makes `checkpoints/`
  before its first save), then the lock file from a workdir that holds nothing else, and the
  workdir if this run made it. Done while the lock is still held; a run that opened the file
  before its removal sees that it is gone once it holds the lock (`_open_and_lock`)."""
  for name in made:
    with contextlib.suppress(OSError):  # not empty, a link, gone: it stays (or is gone)
      os.rmdir(os.path.join(directory, name))
  with contextlib.suppress(OSError):
    if os.listdir(directory) == [LOCK_NAME]:
      os.remove(os.path.join(directory, LOCK_NAME))
      if made_directory:
        os.rmdir(directory)
