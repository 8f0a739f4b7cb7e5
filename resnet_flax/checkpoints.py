"""orbax checkpoints of the TrainState: async saves, keep-N, restore latest or a given path."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath  # orbax's own path type (a dependency of orbax)

from resnet_flax import distributed, error_lines, orbax_noise
from resnet_flax.slim import checkpoint_state

# What a failed write raises: tensorstore reports a full disk or a quota as ValueError
# ('RESOURCE_EXHAUSTED: ... [os_error_code='28']'), the file system as OSError.
_WRITE_FAILURES = (OSError, ValueError, RuntimeError)
# What a failed read raises: tensorstore's errors as ValueError, which orbax re-raises as a
# bare Exception for a damaged data file; a tree that does not fit as ValueError/KeyError/TypeError.
# Out of memory is no failure of the files: it is raised as it is.
_READ_FAILURES = (Exception,)
# At most this many passes of 50 ms while late writes of a failed save land (2 s).
_REMOVAL_PASSES = 40
# orbax's metadata (_METADATA, _sharding, array_metadatas) takes about 1.2 KiB per array.
_METADATA_BYTES_PER_ARRAY = 2048


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, with a one-line message naming it and the fix."""


class StateMismatchError(CheckpointError):
  """A checkpoint holds other arrays, or arrays of other shapes, than the run's state or
  model: a run of another config (model, class count, BN options, optimizer), not damage."""


def saved_form(state: Any) -> Any:
  """What is written for `state`: a dataclass (TrainState) as a dict of its fields, without those
  left at None, so a run without the optional parts (model averages) writes, and reads, the
  checkpoints it wrote before they existed; anything else as it is."""
  if not dataclasses.is_dataclass(state):
    return state
  return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
          if getattr(state, field.name) is not None}


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of `state`, the restore target.

  Leaves keep their sharding (replicated, or split over the devices with ZeRO-1), so
  orbax reads each checkpoint into this run's layout, whatever layout and device count
  it was saved from. Leaves without a sharding go to this process's first device:
  otherwise orbax would reuse the saving run's device layout and refuse a checkpoint
  saved on another number of devices.
  """
  default = jax.sharding.make_single_device_sharding(jax.local_devices()[0])

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
    # cleanup_tmp_directories: a save cut short by a crash leaves <step>.orbax-checkpoint-tmp.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    orbax_noise.quiet_failure_echoes()
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unfinished: Optional[int] = None  # the step of the save not yet known to be committed
    self._failed = False

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as `step` (returns before the write finishes).

    Raises CheckpointError if the previous save failed, or this one (synchronous saves), or
    where `step` is not after the newest step saved in the directory.
    """
    self.wait()
    newest = latest_step_in(self.directory)  # the directory's, not orbax's list from when it opened
    if newest is not None and step <= newest:
      # orbax's "already exists" had been blamed on the disk, and an older step saved among newer
      # ones was kept in place of a newer one (steps 2, 3 and then 1, keeping 2: steps 1 and 3).
      where = 'is saved already' if step == newest else f'is older than the newest there, step {newest}'
      raise CheckpointError(f'checkpoint step {step} in {self.directory} {where}: steps go forward; save later '
                            'steps, or a run that counts its steps from 0 again into another directory.')
    self._unfinished = step
    with self._reporting_failure_of(step):
      self._manager.save(step, args=ocp.args.StandardSave(saved_form(state)), force=True)

  def check(self) -> None:
    """Raises CheckpointError if a save has failed; returns at once while one is still writing."""
    if self._unfinished is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in progress; raises CheckpointError if it failed or was not committed."""
    if self._unfinished is None:
      return
    step = self._unfinished
    with self._reporting_failure_of(step):
      self._manager.wait_until_finished()
    self._unfinished = None
    # orbax logs, without raising, a step whose finalization it skipped.
    if jax.process_index() == 0 and not os.path.isdir(os.path.join(self.directory, str(step))):
      self._failed = True
      raise CheckpointError(self._failure_message(step, 'orbax did not commit it'))

  def close(self) -> None:
    """Waits for the last save (CheckpointError if it failed) and stops orbax's threads."""
    try:
      self.wait()
    finally:
      # orbax's close raises a failed save again; it has been reported once.
      with contextlib.suppress(*_WRITE_FAILURES) if self._failed else contextlib.nullcontext():
        self._manager.close()

  @contextlib.contextmanager
  def _reporting_failure_of(self, step: int):
    try:
      yield
    except _WRITE_FAILURES as error:
      self._unfinished, self._failed = None, True
      if jax.process_index() == 0:
        _remove_partial_writes(self.directory, str(step))  # orbax would only on the next start
      raise CheckpointError(self._failure_message(step, _write_failure_reason(error))) from error

  def _failure_message(self, step: int, reason: str) -> str:
    newest = latest_step_in(self.directory)
    kept = (f'the newest complete checkpoint, step {newest}, is intact' if newest is not None
            else 'no checkpoint was completed')
    return (f'saving checkpoint step {step} in {self.directory} failed ({reason}); {kept}. Free disk space, '
            'lower config.keep_checkpoints or pass another --workdir, then rerun the same command to resume.')

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` into the structure, shapes and shardings of `target`."""
    return restore_from(os.path.join(self.directory, str(step)), target)

  def restore_newest_intact(self, target: Any, report: Callable[[str], None]) -> tuple[Any, Optional[int]]:
    """(state, step) from the newest checkpoint that restores, or (target, None) if there is none.

    A damaged newest checkpoint (truncated or corrupted files) is skipped with a message,
    so a crash that damaged it costs the steps since the one before, not the run. If every
    checkpoint fails, one error lists them all; if every one holds other arrays than `target`
    (another model, class count, BN options, optimizer), a StateMismatchError says which,
    before any is read.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    # Compared from the metadata first: orbax's restore of a misshapen array fails in
    # asynchronous reads that print a traceback each (thousands of lines).
    mismatched = {step: state_differences(os.path.join(self.directory, str(step)), target) for step in steps}
    _check_every_process_sees(self.directory, steps, mismatched)
    if steps and all(mismatched.values()):
      raise StateMismatchError(_mismatch_message(os.path.join(self.directory, str(steps[0])), mismatched[steps[0]]))
    failures, failed_steps = [], []
    for step in steps:
      try:
        # Each process reads its own share (ZeRO-1's optimizer shards, its devices' copies), so
        # damage can show on one host alone: all skip the step together, or that host would go
        # on to an older step while the others trained from this one.
        # Only damage is skipped: an error of another kind on any host (out of memory) stops all.
        with distributed.failing_together('to restore it', expected=(CheckpointError,)):
          if mismatched[step]:
            raise CheckpointError(_mismatch_message(os.path.join(self.directory, str(step)), mismatched[step]))
          state = self.restore(step, target)
      except (CheckpointError, distributed.FailedOnAnotherProcess) as failure:
        if isinstance(failure, distributed.FailedOnAnotherProcess) and not failure.expected:
          raise
        failures.append(str(failure))
        failed_steps.append(step)
        report(f'warning: skipping checkpoint step {step}: {failure}')
        continue
      if failed_steps:
        # An older one fits the config, so the newer ones are damaged, not foreign: set them
        # aside (kept for inspection) so this run can save those steps again. One process
        # renames; the others wait for it (the block's all-gather) before they look again.
        with distributed.failing_together('to set aside damaged checkpoints'):
          set_aside = ([_set_aside(self.directory, bad) for bad in failed_steps] if jax.process_index() == 0
                       else ['<step>.damaged'])
        self._manager.reload()
        report(f'Set aside damaged checkpoint(s) {failed_steps} as {", ".join(set_aside)}; resuming from step {step}.')
      return state, step
    if failures:
      raise CheckpointError(f'no usable checkpoint in {self.directory}, {len(failures)} tried; the newest: '
                            f'{failures[0]} Start a fresh --workdir, or fix or restore the files.')
    return target, None


def _check_every_process_sees(directory: str, steps: list[int], mismatched: dict[int, list[str]]) -> None:
  """Raises CheckpointError on every process unless all see the same steps in `directory`, and
  the same ones saved by another config: each then tries the same steps, one collective each."""
  differs = distributed.disagreement(f'steps {steps}, of another config {[step for step in steps if mismatched[step]]}')
  if differs is not None:
    first, index, other = differs
    raise CheckpointError(f'the processes see different checkpoints in {directory}: process 0 {first}, process '
                          f'{index} {other}; every host must see the same, complete directory (a shared file system '
                          'that had not caught up?): rerun once it has.')


def _set_aside(directory: str, step: int) -> str:
  """Renames the damaged `directory/<step>` to the first free name of `<step>.damaged`,
  `<step>.damaged.2`, ... and returns that path: a step saved again after it was set aside
  can be damaged again, and an earlier one is kept for inspection too."""
  candidates = (os.path.join(directory, f'{step}.damaged' + (f'.{number}' if number > 1 else ''))
                for number in itertools.count(1))
  # Not left to os.rename: it fails on a directory that holds files and replaces an empty one.
  target = next(path for path in candidates if not os.path.lexists(path))
  os.rename(os.path.join(directory, str(step)), target)
  return target


def checkpoint_bytes(tree: Any) -> int:
  """Disk space of one checkpoint of `tree`, erring high: its arrays and orbax's metadata."""
  leaves = jax.tree_util.tree_leaves(tree)
  return sum(leaf.size * leaf.dtype.itemsize + _METADATA_BYTES_PER_ARRAY for leaf in leaves)


def bytes_for_saves(tree: Any, max_to_keep: int, directory: str) -> int:
  """Disk space the saves of a run still need beyond the checkpoints already in `directory`.

  orbax writes a new checkpoint before it deletes the oldest, so a run holds up to
  `max_to_keep + 1` at once.
  """
  return checkpoint_bytes(tree) * max(1, max_to_keep + 1 - len(committed_steps(directory)))


def _write_failure_reason(error: BaseException) -> str:
  """'No space left on device' for tensorstore's long RESOURCE_EXHAUSTED message, else its first line."""
  code = re.search(r"os_error_code='(\d+)'", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return error_lines.first_line(error)[:300]


def local_path(path: str, what: str) -> str:
  """`path` made absolute; a URL is refused: os.makedirs('gs://b/run') makes a local directory 'gs:'.
  So is a path that is not UTF-8: orbax (tensorstore) takes only UTF-8 paths, and a run there
  trained to its first save, which then failed with hundreds of lines of tracebacks."""
  if '://' in path:
    raise CheckpointError(f'{what} {path} is a URL; only file system paths are supported: mount the bucket (e.g. '
                          'gcsfuse) and pass the mounted path.')
  absolute = os.path.abspath(path)  # a relative path under a directory whose name is not UTF-8 is not either
  try:
    absolute.encode('utf-8')
  except UnicodeEncodeError:
    shown = absolute.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    raise CheckpointError(f'{what} {shown} is not a UTF-8 name, which orbax\'s checkpoint files need; pass a path '
                          'whose names are UTF-8.') from None
  return absolute


def converted_path(directory: str) -> str:
  """Where `python -m resnet_flax.slim convert --workdir=directory` writes its orbax checkpoint."""
  return os.path.join(directory, 'variables')


def is_checkpoint(path: str) -> bool:
  """Whether `path` is an orbax checkpoint: a manager's `<step>` directory or a bare item."""
  return any(os.path.isfile(os.path.join(path, *name)) for name in
             (('_CHECKPOINT_METADATA',), ('default', '_METADATA'), ('_METADATA',)))


def committed_steps(directory: str) -> list[int]:
  """The committed steps under `directory`, oldest first, without creating or locking anything.

  orbax writes into `<step>.orbax-checkpoint-tmp*` and renames on commit, so only
  all-digit names are finished checkpoints.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def latest_step_in(directory: str) -> Optional[int]:
  """The newest committed step under `directory`, or None."""
  return max(committed_steps(directory), default=None)


def step_of(path: str) -> str:
  """`path` made absolute, or the step holding it where it is a manager step's orbax item
  (`<step>/default`): the step is what to name."""
  path = os.path.abspath(path)
  if os.path.basename(path) == 'default' and is_checkpoint(os.path.dirname(path)):
    return os.path.dirname(path)
  return path


def run_workdir_of(path: str) -> Optional[str]:
  """The workdir of the training run that saved `path`, a `<workdir>/checkpoints/<step>`
  directory or its orbax item `<step>/default` (where its config.json is); None for a path laid
  out otherwise."""
  steps = os.path.dirname(step_of(path))
  return os.path.dirname(steps) if os.path.basename(steps) == 'checkpoints' else None


def _item_directory(path: str) -> str:
  """The orbax item inside `path`: `<step>/default` for manager-written steps, else `path` itself."""
  nested = os.path.join(path, 'default')
  item = nested if os.path.isdir(nested) else path
  normalized = os.path.normpath(path)
  unfinished = re.search(r'\.orbax-checkpoint-tmp[^/]*', normalized)
  if unfinished:  # orbax renames a save into place only when it is whole
    committed = normalized[:unfinished.start()]
    raise CheckpointError(f'{normalized[:unfinished.end()]} is a save that never finished (orbax renames it to '
                          f'{os.path.basename(committed)} when whole); pass a committed step, e.g. the newest in '
                          f'{os.path.dirname(committed)}.')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    raise CheckpointError(f'{path} is a training workdir, not a checkpoint; name one of its checkpoints, '
                          f'{path}/checkpoints/<step> (eval.py: or pass --workdir={path} for the newest).')
  converted = converted_path(path)
  if os.path.isdir(converted) and not os.path.exists(os.path.join(item, '_METADATA')):
    raise CheckpointError(f'{path} is what `python -m resnet_flax.slim convert` wrote; pass {converted}.')
  newest = latest_step_in(path)
  if newest is not None:
    raise CheckpointError(f'{path} holds checkpoints, it is not one; name one of them, e.g. the newest: '
                          f'{path}/{newest}.')
  prefix = re.sub(r'\.(index|data-\d{5}-of-\d{5})$', '', path)  # a TF checkpoint's files, named by its prefix
  if os.path.isfile(prefix + '.index'):
    raise CheckpointError(f'{path} is a TensorFlow checkpoint, not an orbax one; pass slim:{prefix}.')
  if os.path.isfile(path):
    raise CheckpointError(f'{path} is a file, not an orbax checkpoint directory; for a TF-Slim checkpoint pass '
                          f'slim:{path}.')
  if not os.path.isdir(item):
    raise CheckpointError(f'checkpoint {path} does not exist; pass a <workdir>/checkpoints/<step> directory, '
                          'a converted directory, or slim:PATH for a TF-Slim checkpoint.')
  if not is_checkpoint(path):  # its read had failed as damage: "a crash or a disk error damaged its files"
    tf_checkpoint = checkpoint_state.tf_checkpoint_in(path)
    if tf_checkpoint is not None:
      raise CheckpointError(f'{path} holds a TensorFlow checkpoint, not an orbax one; pass slim:{tf_checkpoint}.')
    raise CheckpointError(f'{path} is a directory but no orbax checkpoint (it has no _CHECKPOINT_METADATA or '
                          '_METADATA); pass a <workdir>/checkpoints/<step> directory, a converted directory, or '
                          'slim:PATH for a TF-Slim checkpoint.')
  return item


def _saved_metadata(item: str) -> Any:
  """The tree of array metadata (shape, dtype) an orbax item holds, without reading arrays.

  The handler's metadata, not the checkpointer's: that one also reads step metadata from
  the item directory, where the manager never writes it, and warns on every eval.
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(epath.Path(item))
  finally:
    handler.close()


def _path_name(path: tuple) -> str:
  """A tree path as 'params/conv1/weights', the same for a TrainState and its saved dicts."""
  return '/'.join(str(next((getattr(entry, a) for a in ('key', 'name', 'idx') if hasattr(entry, a)), entry))
                  for entry in path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {_path_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, 'shape')}


def state_differences(path: str, target: Any) -> list[str]:
  """How the arrays of the checkpoint at `path` differ from `target`'s, by name ('params/
  logits/weights: saved (1, 1, 64, 10), this run (1, 1, 64, 12)', '...: in this run, not
  saved'); empty when they agree, or when its metadata cannot be read (a restore then says why)."""
  try:
    saved = _shapes(_saved_metadata(_item_directory(path)))
  except _READ_FAILURES:
    return []
  wanted = _shapes(target)
  return ([f'{name}: saved {saved[name]}, this run {shape}' for name, shape in wanted.items()
           if name in saved and saved[name] != shape]
          + [f'{name}: in this run, not saved' for name in sorted(set(wanted) - set(saved))]
          + [f'{name}: saved, not in this run' for name in sorted(set(saved) - set(wanted))])


def _mismatch_message(path: str, mismatches: list[str]) -> str:
  more = f' and {len(mismatches) - 2} more' if len(mismatches) > 2 else ''
  return (f'checkpoint {path} was saved by a run of another config: {"; ".join(mismatches[:2])}{more}. Resume with '
          'the config it was trained with (model and its options, num_classes, the data set\'s channels, optimizer, '
          'bn, model_ema_decay), or start a fresh --workdir.')


def restore_tree(path: str) -> dict[str, Any]:
  """A checkpoint as saved (nested dicts of arrays), for checkpoints of another structure.

  Reads both TrainState checkpoints (`<workdir>/checkpoints/<step>`) and the
  variables-only ones `python -m resnet_flax.slim convert` writes.
  """
  path = local_path(path, 'checkpoint')
  item = _item_directory(path)
  orbax_noise.quiet_failure_echoes()
  try:
    saved = _saved_metadata(item)
    # Each process reads the whole tree onto its own device.
    with _read_by_this_process() as checkpointer:
      return checkpointer.restore(item, abstract_like(saved))
  except _READ_FAILURES as error:
    if error_lines.out_of_memory(error) is not None:  # the files may be whole: never skipped or set aside
      raise
    raise CheckpointError(f'checkpoint {path} cannot be read ({_read_failure(error)}); it is damaged '
                          'or not an orbax checkpoint directory: name another.') from error


def _read_by_this_process() -> ocp.StandardCheckpointer:
  """A checkpointer whose reads are this process's alone: each process reads the shards it
  holds, and orbax's closing barrier (a collective) is left out, so one process failing to
  read cannot strand the others in it; they learn of the failure where the caller agrees."""
  this_process = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                     active_processes={jax.process_index()})
  return ocp.StandardCheckpointer(multiprocessing_options=this_process)


def save_tree(path: str, tree: Any) -> None:
  """Writes `tree` as an orbax checkpoint at `path` (atomically: orbax renames on commit)."""
  path = local_path(path, 'checkpoint')
  if os.path.lexists(path):  # orbax's refusal had been reported as a failed write: "free disk space"
    raise CheckpointError(f'{path} already exists; pass another path or remove it.')
  orbax_noise.quiet_failure_echoes()
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, tree)
  except _WRITE_FAILURES as error:
    _remove_partial_writes(os.path.dirname(path), os.path.basename(path))
    raise CheckpointError(f'writing {path} failed ({_write_failure_reason(error)}); free disk space or pass '
                          'another --workdir.') from error


def _remove_partial_writes(directory: str, name: str) -> None:
  """Deletes what a failed write of `directory/name` left, giving its space back at once.

  Writes still in flight in tensorstore's threads can recreate files for a moment after the
  failure reaches us (CI saw it), so it deletes until two passes in a row find nothing.
  """
  quiet_passes = 0
  for _ in range(_REMOVAL_PASSES):
    leftovers = [entry for entry in os.listdir(directory) if entry.startswith(f'{name}.orbax-checkpoint-tmp')]
    for entry in leftovers:
      shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    quiet_passes = 0 if leftovers else quiet_passes + 1
    if quiet_passes == 2:
      return
    time.sleep(0.05)


def _read_failure(error: BaseException) -> str:
  """Why a read failed, in one line: the innermost cause (orbax wraps tensorstore's 'OUT_OF_RANGE: Error
  reading <variable> ...' in a bare Exception that names only an array index); for a tree mismatch,
  where it differs ('opt_state: Source: (list, 3) Target: (list, 2)')."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error)
  if 'tree structures do not match' not in text:
    return error_lines.first_line(error)[:300]
  detail = text.partition('If this mismatch is intentional')[0]
  detail = re.sub(r"<class '([\w.]+)'>", r'\1', detail)
  return ' '.join(detail.replace('- ', '').replace(':\n', ': ').split())[:400]


def restore_from(path: str, target: Any) -> Any:
  """Restores the checkpoint directory `path` (a `<step>` directory or its `default/` item); a
  StateMismatchError if it holds other arrays than `target`, before any is read."""
  path = local_path(path, 'checkpoint')
  item = _item_directory(path)
  differences = state_differences(path, target)
  if differences:  # orbax's read of them would fail as if the files were damaged
    raise StateMismatchError(_mismatch_message(path, differences))
  orbax_noise.quiet_failure_echoes()
  try:
    with _read_by_this_process() as checkpointer:  # its own shards of `target`
      restored = checkpointer.restore(item, abstract_like(saved_form(target)))
    return dataclasses.replace(target, **restored) if dataclasses.is_dataclass(target) else restored
  except _READ_FAILURES as error:
    if error_lines.out_of_memory(error) is not None:  # the files may be whole: never skipped or set aside
      raise
    why = _read_failure(error)
    if 'tree structures do not match' in why:
      raise CheckpointError(f'checkpoint {path} does not match this model/config ({why}); resume with the config '
                            'it was trained with (model and its options, num_classes, optimizer, bn, model_ema_decay), '
                            'or start a fresh --workdir.') from error
    # The arrays' names and shapes were compared above: a failing read is damage (or files
    # this user may not read, which the reason then says).
    raise CheckpointError(f'checkpoint {path} cannot be read ({why}): a crash or a disk error damaged its files, '
                          'or they are not readable here.') from error
