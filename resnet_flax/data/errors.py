"""The one exception type the input pipelines raise for bad data or bad configuration."""


class DataError(ValueError):
  """A data set or data config that cannot be used; the message names the problem and the fix.

  Messages are one line so that they read well at the bottom of a traceback and in logs.
  """


def one_line(text: object) -> str:
  """`text` with every run of whitespace (newlines included) collapsed to one space."""
  return ' '.join(str(text).split())
