"""Keeps a failed orbax read or write to the one message its caller prints.

orbax reads and writes a checkpoint through many concurrent tensorstore operations, some
in threads of their own. When one fails (a truncated file, a full disk), orbax logs the
exception from each thread that sees it and raises it to the caller; the operations still
in flight then complete on a closed event loop ('Event loop is closed', raised in a
tensorstore thread) or fail with nobody awaiting them (asyncio logs each). One truncated
checkpoint printed 68 tracebacks, a disk filling up during a save about 500 lines. The
caller reports the raised exception in one line; these filters drop the echoes, only them.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

_IN_ORBAX = f'{os.sep}orbax{os.sep}'
# How tensorstore ends each error message ('... [tensorstore_spec=\'{"driver":"zarr",...}\']').
_TENSORSTORE_SPEC = '[tensorstore_spec='
# orbax's coroutines a failed save or read leaves unstarted: the writes of
# orbax/checkpoint/_src/serialization/serialization.py, the array-metadata reads of
# orbax/checkpoint/_src/metadata/array_metadata_store.py (a damaged checkpoint read, seen
# with Python 3.12). The warning names the coroutine alone, not its module.
_UNAWAITED = (r"coroutine '(async_serialize_from_host\.<locals>\.\w+|Store\._get_array_metadatas)' "
              'was never awaited')


def _is_late_completion(unraisable: sys.UnraisableHookArgs) -> bool:
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'
          and bool(frames) and frames[0].name == 'call_soon_threadsafe')


def _is_abandoned_orbax_coroutine(unraisable: sys.UnraisableHookArgs) -> bool:
  # A read or write orbax started and never awaited after another failed: the garbage
  # collector closes it (at exit, often), and its except clause raises the read error again.
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and _IN_ORBAX in code.co_filename


def keeps_asyncio_record(record: logging.LogRecord) -> bool:
  """False for asyncio's report of an orbax operation that failed with nobody awaiting it.

  Known by orbax in the message or the traceback, or by the tensorstore spec that
  tensorstore's errors on opening an array carry: a read awaited straight from tensorstore
  (`coro=<_wrap_awaitable()>`, CI under load) names neither orbax nor any frame of it.
  """
  message = record.getMessage()
  if 'exception was never retrieved' not in message.partition('\n')[0]:
    return True
  error = record.exc_info[1] if record.exc_info else None
  frames = traceback.extract_tb(error.__traceback__) if error is not None else []
  from_tensorstore = _TENSORSTORE_SPEC in message or _TENSORSTORE_SPEC in str(error)
  return not ('orbax' in message or from_tensorstore or any(_IN_ORBAX in frame.filename for frame in frames))


def keeps_absl_record(record: logging.LogRecord) -> bool:
  """False for an exception orbax logs from one of its threads.

  orbax raises those to the caller as well (a failed save surfaces in the next
  `save` or `wait_until_finished`); the one it only logs, a step it skips finalizing,
  the Checkpointer catches by checking that the step was committed.
  """
  return not (record.levelno >= logging.ERROR and record.exc_info is not None and _IN_ORBAX in record.pathname)


def quiet_failure_echoes() -> None:
  """Installs the filters (once per process); call before orbax reads or writes.

  Before, not on failure: the first echo can come before the failure reaches the caller
  (CI saw it on a loaded machine), and the rest after it, so the filters stay.
  """
  if not getattr(sys.unraisablehook, 'drops_late_orbax_completions', False):
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
      if not (_is_late_completion(unraisable) or _is_abandoned_orbax_coroutine(unraisable)):
        previous(unraisable)

    hook.drops_late_orbax_completions = True
    sys.unraisablehook = hook
  for name, keeps in (('asyncio', keeps_asyncio_record), ('absl', keeps_absl_record)):
    logger = logging.getLogger(name)
    if keeps not in logger.filters:
      logger.addFilter(keeps)
  # The operations a failed save or read left unstarted, reported whenever the garbage collector finds them.
  warnings.filterwarnings('ignore', message=_UNAWAITED, category=RuntimeWarning)
