"""The one line an error is shown as: on a command line, in another error, to another process."""

from __future__ import annotations

from typing import Optional

# How XLA says a device allocation failed: GPU ('Out of memory while trying to allocate 25.00GiB.',
# 'Failed to allocate request for ...'), CPU ('Out of memory allocating 17592186044416 bytes.', also
# inside an 'INTERNAL: Error dispatching computation: ...' when a jitted step's buffers do not fit),
# TPU (a buffer, and a compile's 'Ran out of memory in memory space hbm').
_OUT_OF_DEVICE_MEMORY = ('RESOURCE_EXHAUSTED: Out of memory', 'RESOURCE_EXHAUSTED: Failed to allocate request',
                         'RESOURCE_EXHAUSTED: Error allocating device buffer', 'Ran out of memory in memory space',
                         'Out of memory allocating', 'Out of memory while trying to allocate')


def first_line(error: BaseException) -> str:
  """The error's own one-line `summary` if it has one (a listing's counts and hints), else the
  first line of its message, else its type's name."""
  summary = getattr(error, 'summary', None)
  if summary:
    return summary
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def out_of_memory(error: BaseException) -> Optional[BaseException]:
  """The error, of `error` and those it was raised from (or while handling), that says a host
  (MemoryError) or device (XLA's RESOURCE_EXHAUSTED ...) ran out of memory; None if none does."""
  seen: set[int] = set()
  current: Optional[BaseException] = error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, MemoryError) or any(words in _text(current) for words in _OUT_OF_DEVICE_MEMORY):
      return current
    current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
  return None


def _text(error: BaseException) -> str:
  try:
    return str(error)
  except Exception:  # pylint: disable=broad-except  # a __str__ that raises says nothing of memory
    return ''
