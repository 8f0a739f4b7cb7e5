"""orbax checkpoints of the TrainState: async saves, keep-N, restore latest or a given path."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import traceback
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath  # orbax's own path type (a dependency of orbax)
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, with a one-line message naming it and the fix."""


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of `state`, the restore target.

  Leaves keep their sharding (replicated, or split over the devices with ZeRO-1), so
  orbax reads each checkpoint into this run's layout, whatever layout and device count
  it was saved from. Leaves without a sharding go to this process's first device:
  otherwise orbax would reuse the saving run's device layout and refuse a checkpoint
  saved on another number of devices.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding if isinstance(sharding, jax.sharding.Sharding) else default)

  return jax.tree_util.tree_map(leaf, state)


class Checkpointer:
  """`workdir/checkpoints/<step>`, written asynchronously; orbax commits each step
  atomically (temporary directory, then rename), so an interrupted save never
  shows up as a checkpoint.

  Multi-host: every process calls `save` and `restore` alike (on a directory they all
  see); each writes the shards it holds and process 0 commits the step.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as `step` (returns before the write finishes)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` into the structure, shapes and shardings of `target`."""
    return restore_from(os.path.join(self.directory, str(step)), target)

  def restore_newest_intact(self, target: Any, report: Callable[[str], None]) -> tuple[Any, Optional[int]]:
    """(state, step) from the newest checkpoint that restores, or (target, None) if there is none.

    A damaged newest checkpoint (truncated or corrupted files) is skipped with a message,
    so a crash that damaged it costs the steps since the one before, not the run. If every
    checkpoint fails, one error lists them all (e.g. they belong to another model).
    """
    failures, failed_steps = [], []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, target)
      except CheckpointError as error:
        failures.append(str(error))
        failed_steps.append(step)
        report(f'warning: skipping checkpoint step {step}: {error}')
        continue
      if failed_steps:
        # An older one fits the config, so the newer ones are damaged, not foreign: set them
        # aside (kept for inspection) so this run can save those steps again. One process
        # renames; the others wait for it before they look at the directory again.
        if jax.process_index() == 0:
          for bad in failed_steps:
            os.rename(os.path.join(self.directory, str(bad)), os.path.join(self.directory, f'{bad}.damaged'))
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices('resnet_flax: damaged checkpoints set aside')
        self._manager.reload()
        report(f'Set aside damaged checkpoint(s) {failed_steps} as <step>.damaged; resuming from step {step}.')
      return state, step
    if failures:
      raise CheckpointError(f'no usable checkpoint in {self.directory} ({len(failures)} tried, newest: '
                            f'{failures[0]}); fix --config or start a fresh --workdir.')
    return target, None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def tree_bytes(tree: Any) -> int:
  """Bytes of all arrays in `tree` (the size of a checkpoint of it, roughly)."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def check_workdir(workdir: str, needed_bytes: int) -> None:
  """Fails now, not hours in, if `workdir` cannot be written or lacks room for the checkpoints."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # Every process of a multi-host run probes the same shared directory.
    probe = os.path.join(workdir, f'.write_probe_{socket.gethostname()}_{os.getpid()}')
    with open(probe, 'wb') as file:
      file.write(b'0' * 4096)
      file.flush()
      os.fsync(file.fileno())
    os.remove(probe)
  except OSError as error:
    raise CheckpointError(f'workdir {workdir} is not writable ({error.strerror or error}); '
                          'pass a --workdir you can write to.') from error
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise CheckpointError(f'workdir {workdir} has {free / 2**20:.0f} MiB free but the checkpoints kept need about '
                          f'{needed_bytes / 2**20:.0f} MiB; free disk space or lower config.keep_checkpoints.')


def latest_step_in(directory: str) -> Optional[int]:
  """The newest committed step under `directory`, without creating or locking anything.

  orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames on commit, so only
  all-digit names are finished checkpoints.
  """
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory)
           if name.isdigit() and os.path.isdir(os.path.join(directory, name))]
  return max(steps, default=None)


def _item_directory(path: str) -> str:
  """The orbax item inside `path`: `<step>/default` for manager-written steps, else `path` itself."""
  nested = os.path.join(path, 'default')
  item = nested if os.path.isdir(nested) else path
  if not os.path.isdir(item):
    raise CheckpointError(f'checkpoint {path} does not exist; pass a <workdir>/checkpoints/<step> directory, '
                          'a converted directory, or slim:PATH for a TF-Slim checkpoint.')
  return item


def _is_late_read_completion(unraisable: sys.UnraisableHookArgs) -> bool:
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'
          and bool(frames) and frames[0].name == 'call_soon_threadsafe')


def _keeps_log_record(record: logging.LogRecord) -> bool:
  """False for asyncio's report of an orbax read that failed with nobody awaiting it."""
  message = record.getMessage()
  if 'exception was never retrieved' not in message.partition('\n')[0]:
    return True
  error = record.exc_info[1] if record.exc_info else None
  frames = traceback.extract_tb(error.__traceback__) if error is not None else []
  return not ('orbax' in message or any(f'{os.sep}orbax{os.sep}' in frame.filename for frame in frames))


def _drop_late_read_noise() -> None:
  """Keeps a failed checkpoint read to the one message its caller prints.

  orbax reads a checkpoint through many concurrent tensorstore reads. When one fails, the
  event loop closes with the others in flight: each later completion raises 'Event loop
  is closed' in a tensorstore thread, and asyncio logs each failed read nobody awaited;
  one truncated checkpoint printed 68 tracebacks. Installed before reading, not on
  failure: the first of them can come before the failure reaches the caller (CI saw it
  on a loaded machine), and the rest after it, so the filters stay. They drop only those
  two kinds of message.
  """
  if not getattr(sys.unraisablehook, 'drops_late_read_completions', False):
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
      if not _is_late_read_completion(unraisable):
        previous(unraisable)

    hook.drops_late_read_completions = True
    sys.unraisablehook = hook
  asyncio_logger = logging.getLogger('asyncio')
  if _keeps_log_record not in asyncio_logger.filters:
    asyncio_logger.addFilter(_keeps_log_record)


def restore_tree(path: str) -> dict[str, Any]:
  """A checkpoint as saved (nested dicts of arrays), for checkpoints of another structure.

  Reads both TrainState checkpoints (`<workdir>/checkpoints/<step>`) and the
  variables-only ones `python -m resnet_flax.slim convert` writes.
  """
  path = os.path.abspath(path)
  item = _item_directory(path)
  _drop_late_read_noise()
  try:
    # The handler's metadata, not the checkpointer's: that one also reads step metadata
    # from the item directory, where the manager never writes it, and warns on every eval.
    handler = ocp.StandardCheckpointHandler()
    try:
      saved = handler.metadata(epath.Path(item))
    finally:
      handler.close()
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(item, abstract_like(saved))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
    raise CheckpointError(f'checkpoint {path} cannot be read ({_first_line(error)}); '
                          'is it an orbax checkpoint directory?') from error


def save_tree(path: str, tree: Any) -> None:
  """Writes `tree` as an orbax checkpoint at `path` (atomically: orbax renames on commit)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def restore_from(path: str, target: Any) -> Any:
  """Restores the checkpoint directory `path` (a `<step>` directory or its `default/` item)."""
  path = os.path.abspath(path)
  item = _item_directory(path)
  _drop_late_read_noise()
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(item, abstract_like(target))
  except (ValueError, KeyError, TypeError) as error:
    raise CheckpointError(f'checkpoint {path} is damaged or does not match this model/config '
                          f'({_first_line(error)}); check --config.model and num_classes, or start a fresh '
                          '--workdir.') from error
