"""`config.data.dir` checked before a source reads it: set, a directory (`~` expanded), not an
archive passed in its place; each mistake one line naming what to pass instead. Also what a
path inside it is when it is not the regular file a reader expects."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from typing import Callable, Optional, Union

from resnet_flax.data.errors import DataError

ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar.bz2', '.tbz2', '.tar.xz', '.txz', '.tar', '.zip')


def archive_stem(path: str) -> Optional[str]:
  """`path` without its archive suffix (`x/imagenet.tar.gz` -> `x/imagenet`) if it is a tar or zip file, else None."""
  suffix = next((suffix for suffix in ARCHIVE_SUFFIXES if path.lower().endswith(suffix)), None)
  if suffix is not None:
    return path[:-len(suffix)]
  return os.path.splitext(path)[0] if zipfile.is_zipfile(path) or _holds_a_tar_member(path) else None


def _holds_a_tar_member(path: str) -> bool:
  """Whether `path` is a tar archive (compressed or not) with a first member: a renamed
  archive is still one. Not `tarfile.is_tarfile`, which says yes to 512 zero bytes."""
  try:
    with tarfile.open(path) as archive:
      return archive.next() is not None
  except (OSError, tarfile.TarError, EOFError):
    return False


def data_directory(path: Union[str, os.PathLike, None], expected: str,
                   archive_fix: Callable[[str, str], str]) -> str:
  """`path` (config.data.dir) with `~` expanded, once it is known to be a directory.

  Otherwise a one-line DataError: `expected` says what the directory must be, and
  `archive_fix(archive, stem)` what to do with an archive passed in its place.
  """
  if path is None or not str(path).strip():
    raise DataError(f'config.data.dir is not set; set it to {expected}.')
  # A quoted '--config.data.dir=~/data' reaches us unexpanded by the shell.
  directory = os.path.expanduser(os.fspath(path))
  if os.path.isdir(directory):
    return directory
  if os.path.isfile(directory):
    stem = archive_stem(directory)
    if stem is not None:
      raise DataError(f'config.data.dir={directory!r} is an archive file, not a directory; '
                      f'{archive_fix(directory, stem)}')
    raise DataError(f'config.data.dir={directory!r} is a file, not a directory; set it to {expected}.')
  if os.path.exists(directory):
    raise DataError(f'config.data.dir={directory!r} is not a directory; set it to {expected}.')
  raise DataError(f'config.data.dir={directory!r} does not exist; set it to {expected}.')


def special_file_kind(path: str) -> Optional[str]:
  """What `path` is if it exists but is not a regular file ('a directory', 'a named pipe (FIFO)', ...), else None.

  Opening a named pipe for reading waits for a writer, so a data file that is one would
  hang the read for ever; a reader asks this first.
  """
  try:
    mode = os.stat(path).st_mode  # follows symlinks: a link to an image is the image
  except OSError:
    return None  # missing or unreadable: the reader's open names that
  for is_kind, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a named pipe (FIFO)'),
                        (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
                        (stat.S_ISBLK, 'a block device')):
    if is_kind(mode):
      return kind
  return 'not a regular file'
