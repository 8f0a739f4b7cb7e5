"""The one line an error is shown as: on a command line, in another error, to another process."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
  """The error's own one-line `summary` if it has one (a listing's counts and hints), else the
  first line of its message, else its type's name."""
  summary = getattr(error, 'summary', None)
  if summary:
    return summary
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
