"""Host-side prefetching: a background thread keeps a few items of an iterator ready.

The thread is a daemon and only ever blocks in short, interruptible waits, so a consumer
that stops early (break, exception, garbage collection, `close()`) never leaves it behind:
it notices within `_POLL_SECONDS`, closes the source iterator and exits.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar('T')

_POLL_SECONDS = 0.05


class _End:
  """Put on the queue when the source is exhausted."""


class _Failure:
  """Put on the queue when the source raised; the consumer re-raises `error`."""

  def __init__(self, error: BaseException):
    self.error = error


def _produce(source: Iterator, buffer: queue.Queue, stop: threading.Event) -> None:
  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        pass
    return False

  try:
    for item in source:
      if not put(item):
        break
    else:
      put(_End())
  except BaseException as error:  # Everything, so that the consumer sees it instead of a hang.
    put(_Failure(error))
  finally:
    # Closed here, in the thread that ran it: a generator cannot be closed while running elsewhere.
    close = getattr(source, 'close', None)
    if close is not None:
      close()


class Prefetcher(Iterator[T]):
  """Iterates over `source` in a background thread, `buffer_size` items ahead."""

  def __init__(self, source: Iterable[T], buffer_size: int = 2):
    # Set before anything can raise: __del__ closes even a Prefetcher whose __init__ failed.
    self._stop = threading.Event()
    self._done = False
    if buffer_size < 1:
      raise ValueError(f'buffer_size must be >= 1, got {buffer_size}.')
    self._buffer: queue.Queue = queue.Queue(maxsize=buffer_size)
    # The thread holds the queue and the event, never `self`, so dropping the Prefetcher
    # lets `__del__` stop it.
    self.thread = threading.Thread(target=_produce, args=(iter(source), self._buffer, self._stop),
                                   name='prefetch', daemon=True)
    self.thread.start()

  def __next__(self) -> T:
    if self._done:
      raise StopIteration
    item = self._buffer.get()
    if isinstance(item, _End):
      self.close()
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the background thread (it exits within a poll interval) and drops buffered items."""
    self._done = True
    self._stop.set()

  def __enter__(self) -> Prefetcher[T]:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self) -> None:
    self.close()


def prefetch(source: Iterable[T], buffer_size: int = 2) -> Prefetcher[T]:
  """`source`'s items, produced by a daemon thread up to `buffer_size` ahead of the consumer.

  Exceptions raised by the source are re-raised by the consumer's `next()`; closing the
  result (or dropping it, or breaking out of a `with` block) stops the thread.
  """
  return Prefetcher(source, buffer_size)
