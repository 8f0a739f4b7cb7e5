"""data.prefetch: order, the producer's errors, the buffer's bound, and no thread or error left behind."""

import gc
import itertools
import sys
import threading
import time

import numpy as np
import pytest

from resnet_flax import data
from test_data import DIGITS, _batches


def test_prefetch_preserves_order_and_ends():
  assert list(data.prefetch(iter(range(10)), buffer_size=3)) == list(range(10))


def test_prefetch_propagates_the_producers_exception():
  def failing():
    yield 1
    yield 2
    raise KeyError('broken source')

  iterator = data.prefetch(failing())
  assert [next(iterator), next(iterator)] == [1, 2]
  with pytest.raises(KeyError, match='broken source'):
    next(iterator)
  iterator.thread.join(timeout=2)
  assert not iterator.thread.is_alive()


def _wait_until_dead(thread, seconds=2.0):
  deadline = time.monotonic() + seconds
  while thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
  return not thread.is_alive()


def test_prefetch_leaves_no_thread_when_the_consumer_stops_early():
  closed = threading.Event()

  def endless():
    try:
      yield from itertools.count()
    finally:
      closed.set()

  with data.prefetch(endless()) as iterator:
    assert next(iterator) == 0
  assert _wait_until_dead(iterator.thread) and closed.is_set()

  dropped = data.prefetch(itertools.count())
  next(dropped)
  thread = dropped.thread
  del dropped
  gc.collect()
  assert _wait_until_dead(thread) and thread.daemon


def test_prefetched_training_batches_equal_direct_ones():
  ds = data.build(DIGITS, 'train', batch_size=32, seed=0)
  with data.prefetch(ds.train_batches(), buffer_size=2) as iterator:
    np.testing.assert_equal(_batches(iterator, 4), _batches(ds.train_batches(), 4))


def test_prefetch_refuses_an_empty_buffer():
  # Mutant: buffer_size 0 accepted (queue.Queue(0) is unbounded: the thread would run away).
  with pytest.raises(ValueError, match='buffer_size'):
    data.prefetch(iter(range(3)), buffer_size=0)


def test_prefetch_buffer_size_bounds_how_far_the_thread_runs_ahead():
  # Mutant: prefetch() ignoring buffer_size. The producer takes buffer_size items into the
  # queue and holds one more in hand: 1 + 3 + 1 = 5 taken after one next().
  taken = []

  def counting():
    for i in range(100):
      taken.append(i)
      yield i

  with data.prefetch(counting(), buffer_size=3) as iterator:
    assert next(iterator) == 0
    deadline = time.monotonic() + 2
    while len(taken) < 5 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.1)
    assert len(taken) == 5


def test_prefetch_is_exhausted_for_good_and_forwards_base_exceptions():
  # Mutants: next() after the end or after a re-raised error blocking for ever (no `_done`
  # check, no close() on failure); a BaseException
  # that is no Exception (SystemExit, KeyboardInterrupt in the producer) leaving the consumer
  # waiting for ever. Both run in a helper thread so that the mutant fails instead of hanging.
  class Stop(BaseException):
    pass

  def failing():
    yield 1
    raise Stop('stopped')

  results = {}

  def consume():
    done = data.prefetch(iter([1]))
    results['items'] = list(done)
    results['again'] = list(done)  # a second pass over an exhausted iterator: empty, at once
    failing_iterator = data.prefetch(failing())
    next(failing_iterator)
    try:
      next(failing_iterator)
    except Stop as error:
      results['error'] = str(error)
    results['after_error'] = list(failing_iterator)

  thread = threading.Thread(target=consume, daemon=True)
  thread.start()
  thread.join(timeout=3)
  assert not thread.is_alive(), f'the consumer blocked; got {results}'
  assert results == {'items': [1], 'again': [], 'error': 'stopped', 'after_error': []}


def test_a_rejected_buffer_size_leaves_no_unraisable_error():
  # Its __init__ had raised before `_stop` existed, so __del__'s close() raised AttributeError,
  # printed as "Exception ignored in ... __del__".
  unraisable = []
  hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
  try:
    with pytest.raises(ValueError, match='buffer_size'):
      data.prefetch(iter(range(3)), buffer_size=0)
    gc.collect()
  finally:
    sys.unraisablehook = hook
  assert not unraisable, [u.exc_value for u in unraisable]
