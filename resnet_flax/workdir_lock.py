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
import numpy as np
from jax.experimental import multihost_utils

from resnet_flax import checkpoints

LOCK_NAME = '.lock'


class WorkdirInUseError(checkpoints.CheckpointError):
  """Another process holds the workdir's lock; the message names it."""


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """Holds `workdir`'s lock (creating the directory) until the block ends; raises
  WorkdirInUseError at once if another process holds it. Where no lock can be taken (a
  file system without locks, a workdir that cannot be made, which `check_workdir` then
  names), the block runs unguarded, as it did before there was a lock."""
  directory = checkpoints.local_path(workdir, 'workdir')
  path = os.path.join(directory, LOCK_NAME)
  made_directory = not os.path.isdir(directory)
  file = _open(path)
  with file if file is not None else contextlib.nullcontext():
    locked = file is not None and _locked(file, workdir)
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
        _remove_if_only_the_lock(directory, made_directory)


@contextlib.contextmanager
def held_by_chief(workdir: str) -> Iterator[None]:
  """`held` for a run of one or many processes: the chief (process 0) takes the lock, and
  if another run holds it, every process raises WorkdirInUseError, not the chief alone:
  the others would wait for it at their first collective until that timed out."""
  with contextlib.ExitStack() as stack:
    refusal: Optional[WorkdirInUseError] = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(held(workdir))
      except WorkdirInUseError as error:
        refusal = error
    if jax.process_count() > 1:
      refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
      if refused and refusal is None:
        refusal = WorkdirInUseError(f'{workdir} is in use by another training run (process 0 found its lock '
                                    'taken and names it); wait for it to end or stop it, or pass another --workdir.')
    if refusal is not None:
      raise refusal
    yield


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


def _remove_if_only_the_lock(directory: str, made_directory: bool) -> None:
  """Removes the lock file from a workdir that holds nothing else, and the workdir if this
  run made it: a run that failed before writing anything (on its data, say) leaves nothing.
  Done while the lock is still held, so no other run can be using the file."""
  with contextlib.suppress(OSError):
    if os.listdir(directory) == [LOCK_NAME]:
      os.remove(os.path.join(directory, LOCK_NAME))
      if made_directory:
        os.rmdir(directory)
