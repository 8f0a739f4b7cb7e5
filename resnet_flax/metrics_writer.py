"""Run records in the workdir: metrics.jsonl, TensorBoard event files (no TensorFlow needed) and config.json."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from typing import Any, Iterable, Iterator, Mapping, Optional

from resnet_flax import atomic_files, data

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class MetricsWriteError(OSError):
  """A metrics file could not be written (a full disk); the message names it and the fix."""


class MetricsWriter:
  """Appends one JSON object per logged step and the same scalars to TensorBoard.

  Only process 0 writes (`enabled=False` elsewhere), so multi-host runs keep one record.
  Writes are synchronous and flushed: tensorboardX's SummaryWriter writes from a thread
  that dies on a full disk, after which training blocked forever on its full queue.
  """

  def __init__(self, workdir: str, enabled: bool = True, resumed_step: Optional[int] = None):
    """`resumed_step`: the step a run starts from (a resumed run's checkpoint, 0 for a fresh
    start, -1 to keep no record); what an earlier start logged after it (a run killed before
    that step, or before its first save) is dropped from metrics.jsonl and hidden in
    TensorBoard, so each step appears once, this run's; `dropped_steps` lists the steps
    dropped. None: append to what is there."""
    self.enabled = enabled
    self._failed = False
    self.dropped_steps: list[int] = []
    if enabled:
      from tensorboardX.event_file_writer import EventsWriter  # Here: only process 0 needs it.
      from tensorboardX.proto import event_pb2
      self._workdir = workdir
      self._tensorboard_dir = os.path.join(workdir, 'tensorboard')
      jsonl_path = os.path.join(workdir, 'metrics.jsonl')
      with self._reporting_failure(workdir):
        os.makedirs(self._tensorboard_dir, exist_ok=True)
        earlier_events = os.listdir(self._tensorboard_dir)
        if resumed_step is not None and os.path.isfile(jsonl_path):  # not a device: /dev/full reads endless zeros
          self.dropped_steps = _keep_records_up_to(jsonl_path, resumed_step)
        self._jsonl = open(jsonl_path, 'a', encoding='utf-8')
        # tensorboardX names the file by the second and host: a second writer within the same
        # second (a quick restart, tests) would overwrite the first without the suffix.
        self._events = EventsWriter(os.path.join(self._tensorboard_dir, 'events'),
                                    filename_suffix=f'.{os.getpid()}.{time.time_ns()}')
        if resumed_step is not None and earlier_events:
          # TensorBoard's convention (tensorboardX's purge_step): a session start at step T hides
          # the earlier files' events from step T on.
          self._events.write_event(event_pb2.Event(
              step=resumed_step + 1, wall_time=time.time(),
              session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
          self._events.flush()

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records scalars for `step`; keys like 'train/loss' become TensorBoard tags.

    A NaN or infinity (the eval loss of a diverged model) is written as null in metrics.jsonl,
    which strict JSON readers accept, and as itself in TensorBoard.
    """
    if not self.enabled:
      return
    from tensorboardX.proto import event_pb2, summary_pb2
    wall_time = time.time()
    values = {key: float(value) for key, value in metrics.items()}
    with self._reporting_failure(self._tensorboard_dir):
      for key, value in values.items():
        # The proto itself, not tensorboardX's scalar(): that logs a warning for each NaN.
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=key, simple_value=value)])
        self._events.write_event(event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary))
      self._events.flush()
    record = atomic_files.finite_or_null({'step': int(step), **values})
    with self._reporting_failure(self._jsonl.name):
      self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
      self._jsonl.flush()

  def record_config(self, config: Mapping[str, Any]) -> list[str]:
    """Writes `config` (nested dicts) to `workdir/config.json`; returns how it differs from the one there.

    Each difference reads 'field: old -> new' (dotted field names), in sorted order; a
    workdir without a record gives none. Written atomically, so a crash never leaves half a record.
    """
    if not self.enabled:
      return []
    changes = config_changes(self._workdir, config)
    path = os.path.join(self._workdir, 'config.json')
    with self._reporting_failure(path):
      atomic_files.write_text(path, json.dumps(config, indent=1, sort_keys=True, default=str))
    return changes

  def close(self) -> None:
    """Closes metrics.jsonl and the TensorBoard event file."""
    if not self.enabled:
      return
    # After a failed write, closing retries the lost bytes; that failure was reported. Each file
    # is closed whatever the other's close raised (a full disk had left the events file open).
    reported = lambda: contextlib.suppress(OSError) if self._failed else contextlib.nullcontext()
    try:
      with reported():
        self._jsonl.close()
    finally:
      with reported():
        self._events.close()

  @contextlib.contextmanager
  def _reporting_failure(self, path: str) -> Iterator[None]:
    try:
      yield
    except OSError as error:
      self._failed = True
      fix = 'free disk space' if error.errno in _FULL_DISK else f'fix {path}'
      raise MetricsWriteError(f'writing metrics to {path} failed ({error.strerror or error}); {fix} or pass another '
                              '--workdir, then rerun the same command: it resumes from the newest checkpoint.'
                              ) from error


def _keep_records_up_to(path: str, step: int) -> list[int]:
  """Rewrites metrics.jsonl (atomically) without records past `step` or lines a kill cut short,
  and returns the steps of the records dropped; leaves it untouched when there are none (a
  finished run started again writes nothing)."""
  with open(path, encoding='utf-8') as file:
    lines = file.readlines()
  logged = list(map(_record_step, lines))
  kept = [line for line, line_step in zip(lines, logged) if line_step is not None and line_step <= step]
  if len(kept) == len(lines) and all(line.endswith('\n') for line in lines):
    return []
  atomic_files.write_text(path, ''.join(line if line.endswith('\n') else line + '\n' for line in kept))
  return sorted({line_step for line_step in logged if line_step is not None and line_step > step})


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir`'s metrics.jsonl in the order written, without a line a kill cut
  short; none when there is no file (a run that diverged before its first log line)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):  # not a device: /dev/full reads as endless zeros
    return []
  records = []
  with open(path, encoding='utf-8') as file:
    for line in file:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _record_step(line: str) -> Optional[int]:
  """The step of a metrics.jsonl line, or None for a line a kill cut short."""
  try:
    return int(json.loads(line)['step'])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    return None


def recorded_config(workdir: str) -> Optional[dict[str, Any]]:
  """The config recorded in `workdir/config.json`, by dotted field name (config.data's as its
  source reads them, see `as_recorded`); None without one."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as file:
      return _data_as_read(flat_fields(json.load(file)))
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:  # written whole, so damaged since
    raise ValueError(f'{path} is damaged ({error}); delete it: it only records the config of the last start, '
                     'and the next start writes it again.') from None


# How the processes meet (a coordinator's port is new at each launch) and whether activations are
# recomputed: fields that change no result, so a run may resume with others.
CHANGING_NO_RESULT = ('distributed.', 'model_options.remat')


def config_changes(workdir: str, config: Mapping[str, Any]) -> list[str]:
  """How `config` (nested dicts) differs from the one recorded in `workdir/config.json`:
  'field: old -> new' (dotted names) in sorted order, config.distributed and model_options.remat left
  out; none without a record.

  A field the record lacks was added since its run, with a default that keeps the old behaviour
  (off: 0, False, None, '' or empty): it counts as a change only when set to something else.
  """
  saved = recorded_config(workdir)
  if saved is None:
    return []
  current = as_recorded(config)
  # The device count, recorded beside the config, is compared.
  fields = sorted(key for key in set(saved) | set(current) if not key.startswith(CHANGING_NO_RESULT)
                  and (key in saved or current[key] not in (0, False, None, '', [])))
  return field_changes(saved, current, fields)


def field_changes(saved: Mapping[str, Any], current: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
  """'field: old -> new' for each of `fields` (dotted names) whose value differs between two
  configs as `recorded_config` gives them, in the order of `fields`; '(none)' where one lacks it."""
  missing = '(none)'
  return [f'{key}: {saved.get(key, missing)} -> {current.get(key, missing)}'
          for key in fields if saved.get(key, missing) != current.get(key, missing)]


def as_recorded(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` (nested dicts) by dotted field name, as config.json gives it back: tuples as lists,
  other values JSON cannot hold as their str, and config.data's fields as its source reads them
  (`data.effective_fields`), so a default given explicitly or a field that source ignores is no change."""
  return _data_as_read(flat_fields(json.loads(json.dumps(config, default=str))))


def _data_as_read(fields: dict[str, Any]) -> dict[str, Any]:
  if not any(key.startswith('data.') for key in fields):
    return fields
  data_fields = {key.removeprefix('data.'): value for key, value in fields.items() if key.startswith('data.')}
  return {**{key: value for key, value in fields.items() if not key.startswith('data.')},
          **{f'data.{key}': value for key, value in data.effective_fields(data_fields).items()}}


def flat_fields(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """A config as nested dicts -> its fields by dotted name: {'bn': {'decay': 0.9}} -> {'bn.decay': 0.9}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flat_fields(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
