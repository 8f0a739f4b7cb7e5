"""The filters that keep a failed orbax read or write to its caller's one message."""

import logging
import sys
import types
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_flax import checkpoints, orbax_noise


@pytest.fixture
def fresh_filters(monkeypatch):
  """The process's hooks and filters as they were before the test, restored after it."""
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  for name in ('asyncio', 'absl'):
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, 'filters', [])


def _filters_on() -> tuple[bool, bool, bool]:
  return (getattr(sys.unraisablehook, 'drops_late_orbax_completions', False),
          orbax_noise.keeps_asyncio_record in logging.getLogger('asyncio').filters,
          orbax_noise.keeps_absl_record in logging.getLogger('absl').filters)


def _filters_seen_by(monkeypatch, method: str) -> list[tuple[bool, bool, bool]]:
  """A list that gets `_filters_on()` each time StandardCheckpointer.`method` is called."""
  seen, original = [], getattr(ocp.StandardCheckpointer, method)

  def recording(self, *args, **kwargs):
    seen.append(_filters_on())
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointer, method, recording)
  return seen


def test_filters_are_on_while_orbax_reads(tmp_path, monkeypatch, fresh_filters):
  # A failed read's first late completion can come before the failure reaches our except
  # clause (CI, loaded machine), so the filters must already be there while orbax reads.
  checkpoints.save_tree(str(tmp_path / 'tree'), {'w': np.arange(3.0)})
  monkeypatch.setattr(logging.getLogger('asyncio'), 'filters', [])
  monkeypatch.setattr(logging.getLogger('absl'), 'filters', [])
  seen_while_reading = _filters_seen_by(monkeypatch, 'restore')
  np.testing.assert_array_equal(checkpoints.restore_tree(str(tmp_path / 'tree'))['w'], np.arange(3.0))
  checkpoints.restore_from(str(tmp_path / 'tree'), {'w': np.zeros(3)})
  assert seen_while_reading == [(True, True, True), (True, True, True)]


def test_filters_are_on_while_orbax_writes(tmp_path, monkeypatch, fresh_filters):
  seen_while_writing = _filters_seen_by(monkeypatch, 'save')
  checkpoints.save_tree(str(tmp_path / 'tree'), {'w': np.arange(3.0)})
  assert seen_while_writing == [(True, True, True)]
  monkeypatch.setattr(logging.getLogger('absl'), 'filters', [])
  checkpoints.Checkpointer(str(tmp_path / 'checkpoints')).close()
  assert _filters_on() == (True, True, True)


def test_filters_are_installed_once(fresh_filters):
  orbax_noise.quiet_failure_echoes()
  hook = sys.unraisablehook
  orbax_noise.quiet_failure_echoes()
  assert sys.unraisablehook is hook
  assert logging.getLogger('absl').filters == [orbax_noise.keeps_absl_record]


def _raised_in(filename):
  try:
    exec(compile('raise ValueError("truncated")', filename, 'exec'))
  except ValueError:
    return sys.exc_info()


def _asyncio_record(message, raised_in):
  return logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1771, message, None, _raised_in(raised_in))


@pytest.mark.parametrize('message, raised_in, kept', [
    ("Task exception was never retrieved\nfuture: <Task coro=<Store.read() defined at /x/orbax/store.py:1>>",
     '/x/orbax/store.py', False),
    # asyncio names no orbax code here; the traceback does.
    ('_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished exception=ValueError()>',
     '/x/site-packages/orbax/checkpoint/store.py', False),
    # A tensorstore read awaited directly: neither the message's coroutine nor the traceback is orbax's.
    ("Task exception was never retrieved\nfuture: <Task finished coro=<_wrap_awaitable() defined at "
     "/usr/lib/python3.11/asyncio/tasks.py:687> exception=ValueError('DATA_LOSS: Error opening \"zarr\" driver: "
     "... [tensorstore_spec=\\'{\"driver\":\"zarr\"}\\']')>", '/usr/lib/python3.11/asyncio/tasks.py', False),
    ('Task exception was never retrieved\nfuture: <Task coro=<mine() defined at /x/app.py:1>>', '/x/app.py', True),
    ('Unclosed client session', '/x/orbax/store.py', True),
    ('', '/x/app.py', True),  # an empty message is kept, not an IndexError in the filter
])
def test_asyncio_filter_drops_only_orbax_operations_nobody_awaited(message, raised_in, kept):
  assert orbax_noise.keeps_asyncio_record(_asyncio_record(message, raised_in)) is kept


@pytest.mark.parametrize('pathname, level, with_traceback, kept', [
    ('/x/site-packages/orbax/checkpoint/_src/futures/future.py', logging.ERROR, True, False),
    ('/x/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.CRITICAL, True, False),
    # orbax's warnings, and errors it logs without an exception, are kept.
    ('/x/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.WARNING, True, True),
    ('/x/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.ERROR, False, True),
    ('/x/resnet_flax/train_lib.py', logging.ERROR, True, True),  # not orbax's
])
def test_absl_filter_drops_only_exceptions_orbax_logs(pathname, level, with_traceback, kept):
  record = logging.LogRecord('absl', level, pathname, 387, 'run() raised an exception', None,
                             _raised_in(pathname) if with_traceback else None)
  assert orbax_noise.keeps_absl_record(record) is kept


def test_unawaited_orbax_writes_and_reads_are_not_reported_but_other_coroutines_are(fresh_filters):
  with warnings.catch_warnings(record=True) as caught:  # restores the warning filters after
    warnings.simplefilter('default')
    orbax_noise.quiet_failure_echoes()
    warnings.warn("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited", RuntimeWarning)
    # A damaged checkpoint's read, under Python 3.12 (tests/test_reliability.py's, once).
    warnings.warn("coroutine 'Store._get_array_metadatas' was never awaited", RuntimeWarning)
    warnings.warn("coroutine 'my_loader.<locals>.fetch' was never awaited", RuntimeWarning)
    warnings.warn("coroutine 'Store._get_array_metadatas_of_mine' was never awaited", RuntimeWarning)
  assert [str(w.message) for w in caught] == ["coroutine 'my_loader.<locals>.fetch' was never awaited",
                                              "coroutine 'Store._get_array_metadatas_of_mine' was never awaited"]


def _unraisable(error, traceback, source=None):
  """What sys.unraisablehook is given for `error` raised with `traceback` (in `source`)."""
  return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=traceback, err_msg=None,
                               object=source)


def _closed_coroutine_error(filename):
  """What sys.unraisablehook is given for a coroutine defined in `filename` whose except clause raises on close."""
  namespace = {}
  exec(compile('async def read():\n  try:\n    await pause()\n  except BaseException as error:\n'
               '    raise Exception("Encountered error while reading array index") from error\n', filename, 'exec'),
       {'pause': types.coroutine(lambda: (yield))}, namespace)
  coroutine = namespace['read']()
  coroutine.send(None)  # suspended in the sleep, as a read in flight
  try:
    coroutine.throw(GeneratorExit)  # what the garbage collector's close() does
  except Exception as error:  # pylint: disable=broad-except
    return _unraisable(error, error.__traceback__, coroutine)
  raise AssertionError('the coroutine did not raise')


def test_reads_orbax_abandoned_are_not_reported_when_collected_but_other_coroutines_are(fresh_filters):
  # eval.py on a truncated checkpoint printed its one-line error, then 1,370 lines of these at exit.
  reported = []
  sys.unraisablehook = reported.append
  orbax_noise.quiet_failure_echoes()
  sys.unraisablehook(_closed_coroutine_error('/venv/site-packages/orbax/checkpoint/serialization.py'))
  assert reported == []
  mine = _closed_coroutine_error('/home/me/loader.py')
  sys.unraisablehook(mine)
  assert reported == [mine]


def _unraisable_from(function_name, error):
  """What sys.unraisablehook gets for `error` raised in a function named `function_name`."""
  namespace = {}
  exec(compile(f'def {function_name}(error):\n  raise error\n', '/x/asyncio/base_events.py', 'exec'), namespace)
  try:
    namespace[function_name](error)
  except BaseException as raised:  # pylint: disable=broad-except
    # As tensorstore's thread reports it: the traceback starts in the function that raised.
    return _unraisable(raised, raised.__traceback__.tb_next)
  raise AssertionError('did not raise')


# Without the frame check or the message check, any 'Event loop is closed', or any
# RuntimeError of call_soon_threadsafe, had been swallowed: real errors of the user's own loops.
def test_only_late_completions_on_a_closed_loop_are_dropped(fresh_filters):
  reported = []
  sys.unraisablehook = reported.append
  orbax_noise.quiet_failure_echoes()
  echo = _unraisable_from('call_soon_threadsafe', RuntimeError('Event loop is closed'))
  sys.unraisablehook(echo)
  assert reported == []
  elsewhere = _unraisable_from('my_callback', RuntimeError('Event loop is closed'))
  other_error = _unraisable_from('call_soon_threadsafe', RuntimeError('Non-thread-safe operation'))
  other_type = _unraisable_from('call_soon_threadsafe', ValueError('Event loop is closed'))
  for kept in (elsewhere, other_error, other_type):
    sys.unraisablehook(kept)
  assert reported == [elsewhere, other_error, other_type]


# 'exception was never retrieved' is looked for in the first line only: another asyncio error
# about orbax code, whose details merely quote that phrase further down, had been dropped.
def test_asyncio_filter_looks_for_the_unretrieved_exception_in_the_first_line_only():
  message = ('Exception in callback Store.flush()\nhandle: <Handle Store.flush() at /x/orbax/store.py:9>\n'
             'note: exception was never retrieved by the writer')
  record = logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1771, message, None, None)
  assert orbax_noise.keeps_asyncio_record(record) is True
