"""The training loop: `train_and_evaluate(config, workdir)`, what `train.py` runs."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from resnet_flax import (checkpoints, config_checks, data, device_input, distributed, eval_lib, model_builder, optim,
                         pretrained, sharding, steps, workdir_lock, workdirs)
from resnet_flax.metrics_writer import MetricsWriter, config_changes, recorded_config
from resnet_flax.progress import ProgressBar
from resnet_flax.train_state import TrainState, abstract_train_state, create_train_state


# What a training run writes into, beside metrics.jsonl and config.json.
RUN_SUBDIRECTORIES = ('checkpoints', 'tensorboard')


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN or Inf at `step`; the message names it and the last good checkpoint."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class StoppedBySignal(KeyboardInterrupt):
  """A second SIGTERM or SIGINT: training stopped at once, without saving."""

  def __init__(self, signum: int):
    super().__init__(f'{signal.Signals(signum).name} a second time: stopped without saving; rerun the same command '
                     'to resume from the newest checkpoint.')
    self.signum = signum


def _preemption_check(second_signal_after_s: float = 2.0) -> tuple[Callable[[int], bool], Callable[[], None]]:
  """(step -> whether to save and stop after it, because SIGTERM or SIGINT arrived; a
  function that puts the process's own handlers back, for after training).

  One process: our own handlers set a flag. Several: each host could see the signal
  at a different step, and one saving alone would hang the others; JAX's preemption
  sync manager (started by jax.distributed.initialize, which handles SIGTERM itself)
  agrees on one step at which every process stops, so they all save that step.
  With one process, a second signal, `second_signal_after_s` or more after the first (a
  signal delivered twice at once is one request), raises StoppedBySignal: the first is only
  read at a step's end, which a run stuck waiting for its input (a hung mount) never reaches.
  """
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point, lambda: None
  flag = threading.Event()
  first_signal_at: list[float] = []
  previous = {}

  def restore() -> None:
    # After training, a signal is the caller's again (a sweep's Ctrl-C during evaluation
    # had only set this flag, which nobody read any more).
    for signum, handler in previous.items():
      signal.signal(signum, handler)

  def on_signal(signum: int, _: Any) -> None:
    if not flag.is_set():
      first_signal_at.append(time.monotonic())
      flag.set()
      return
    if time.monotonic() - first_signal_at[0] < second_signal_after_s:
      return
    restore()
    raise StoppedBySignal(signum)

  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGTERM, signal.SIGINT):
      previous[signum] = signal.signal(signum, on_signal)

  return (lambda step: flag.is_set()), restore


def _summarize(history: list[dict[str, jax.Array]], last_step: int, skip_nonfinite: bool,
               last_saved: Optional[int]) -> tuple[dict[str, float], list[int]]:
  """Means over the finite steps of a logging interval, and the non-finite steps in it.

  The one host sync of the interval. Without `skip_nonfinite`, a non-finite step stops
  training here, before anything after it is checkpointed.
  """
  per_step = jax.device_get(history)
  first_step = last_step - len(per_step) + 1
  bad_steps = [first_step + i for i, metrics in enumerate(per_step) if metrics['nonfinite']]
  if bad_steps and not skip_nonfinite:
    kept = f'the last good checkpoint (step {last_saved}) is kept' if last_saved is not None else 'no checkpoint yet'
    if bad_steps[0] == 1:  # computed from the initial weights: no learning rate has acted yet
      raise NonFiniteLossError('non-finite loss or gradients at step 1, from the initial weights, so not from the '
                               'learning rate; check the images (config.data) and that the model suits their '
                               'size: a stride that leaves 1x1 feature maps gives BatchNorm only the batch size in '
                               'values per channel (a larger config.batch_size or config.data.image_size, or a '
                               'smaller model).', 1)
    raise NonFiniteLossError(f'non-finite loss or gradients at step {bad_steps[0]}; {kept}. Lower '
                             'config.learning_rate or raise config.warmup_steps, or set '
                             'config.skip_nonfinite_steps=True to skip such steps.', bad_steps[0])
  finite = [metrics for metrics in per_step if not metrics['nonfinite']]
  # Every step skipped: nothing to average, so the interval logs no loss or accuracy.
  means = {key: float(np.mean([m[key] for m in finite])) for key in finite[0] if key != 'nonfinite'} if finite else {}
  return means, bad_steps


def skipped_in_a_row(before: int, first_step: int, last_step: int, bad_steps: list[int]) -> int:
  """Non-finite steps in a row up to `last_step`: `before` (those ending at `first_step - 1`) continued
  through the interval `first_step..last_step`, whose non-finite steps are `bad_steps`."""
  bad = set(bad_steps)
  finite = [step for step in range(first_step, last_step + 1) if step not in bad]
  return last_step - finite[-1] if finite else before + last_step - first_step + 1


def _initialize_from(spec: str, state: TrainState, model: nn.Module, image_shape: tuple[int, int, int], mesh: Mesh,
                     progress: ProgressBar) -> TrainState:
  """Fine-tuning: pretrained params and statistics, a fresh head when the class count differs; the
  averages (with config.model_ema_decay) start there too (slim's start at the initializers' values).

  A checkpoint's own averages are not read (as slim's --checkpoint_path): to start from them,
  convert it with `python -m resnet_flax.slim convert --moving_averages`."""
  reference = {'params': state.params, 'batch_stats': state.batch_stats}
  with distributed.failing_together('to read config.init_checkpoint'):  # each process reads it whole, by itself
    loaded, _, fresh = pretrained.load_for_model(spec, model, reference, image_shape, allow_new_head=True)
  variables = sharding.replicate(loaded, mesh)
  progress.message(f'Initialized from {spec}' + (f' (new head: {", ".join(fresh)})' if fresh else '') + '.')
  # The averages in buffers of their own, laid out as the state's (split with ZeRO-1).
  ema = None if state.ema is None else sharding.copy_to(
      variables, jax.tree_util.tree_map(lambda average: average.sharding, state.ema))
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'], ema=ema)


def _resume_or_initialize(config: ml_collections.ConfigDict, workdir: str, run_record: dict[str, Any],
                          checkpointer: checkpoints.Checkpointer, state: TrainState, model: nn.Module,
                          image_shape: tuple[int, int, int], mesh: Mesh, progress: ProgressBar
                          ) -> tuple[TrainState, Optional[int]]:
  """The state to train on and the step of the checkpoint it was resumed from (None: none was):
  the newest intact checkpoint of `workdir`, else `config.init_checkpoint`'s weights, else `state`."""
  if checkpoints.committed_steps(checkpointer.directory):
    _check_same_data_set(config, workdir, checkpointer.directory)
  try:
    state, last_saved = checkpointer.restore_newest_intact(state, progress.message)
  except checkpoints.StateMismatchError as error:
    changes = config_changes(workdir, run_record)
    raise checkpoints.StateMismatchError(f'{error} Changed since: {"; ".join(changes)}.' if changes else str(error)
                                         ) from None
  if last_saved is not None:
    progress.message(f'Resumed from {checkpointer.directory}/{last_saved} (step {int(state.step)}).')
  elif config.init_checkpoint:
    state = _initialize_from(config.init_checkpoint, state, model, image_shape, mesh, progress)
  if int(state.step) > config.num_train_steps:
    raise ValueError(f'{checkpointer.directory} is at step {int(state.step)}, past config.num_train_steps='
                     f'{config.num_train_steps}; raise num_train_steps to train on, or pass a fresh --workdir '
                     '(eval.py evaluates the checkpoint).')
  return state, last_saved


def _check_same_data_set(config: ml_collections.ConfigDict, workdir: str, checkpoint_dir: str) -> None:
  """Refuses to resume the run in `workdir` on another data set than the one its config.json names.

  Its state may fit (digits and synthetic data both have 10 classes), so it would train on:
  what a second experiment in the shared default workdir did, silently.
  """
  recorded = (recorded_config(workdir) or {}).get('data.name')
  if recorded is not None and recorded != config.data.name:
    raise ValueError(f'{workdir} holds a run on {recorded} (its config.json), but config.data.name is '
                     f'{config.data.name!r}; pass another --workdir, or start from its weights with '
                     f'--config.init_checkpoint={checkpoint_dir}/<step> in a new one.')


def _log_interval(step: int, history: list[dict[str, jax.Array]], interval_start: float, nonfinite_before: int,
                  config: ml_collections.ConfigDict, last_saved: Optional[int], learning_rate: float,
                  writer: MetricsWriter, progress: ProgressBar) -> int:
  """Writes and shows the means of the logging interval that began at `interval_start`
  (perf_counter seconds) and ends at `step` (its metrics in `history`); returns the
  non-finite steps in a row up to `step`, after raising NonFiniteLossError where training
  cannot go on."""
  train_metrics, skipped = _summarize(history, step, config.skip_nonfinite_steps, last_saved)
  # Timed after the summary's host sync: before it, the steps may only have been dispatched.
  elapsed_s = time.perf_counter() - interval_start
  if skipped:
    progress.message(f'warning: skipped non-finite step(s) {skipped}.')
  nonfinite_in_a_row = skipped_in_a_row(nonfinite_before, step - len(history) + 1, step, skipped)
  if nonfinite_in_a_row >= config.max_skipped_in_a_row:
    # Skipping is for a rare spike; this many in a row is divergence, and each step was wasted.
    rerun = ('it resumes from the newest checkpoint' if last_saved is not None else
             'with no checkpoint saved yet, it starts afresh')
    raise NonFiniteLossError(f'{nonfinite_in_a_row} steps in a row were non-finite and skipped (up to step {step}); '
                             'the run has diverged. Lower config.learning_rate or raise config.warmup_steps, then '
                             f'rerun: {rerun}.', step - nonfinite_in_a_row + 1)
  images_per_second = len(history) * config.batch_size / elapsed_s
  with distributed.failing_together('to write the metrics'):  # the chief's alone
    writer.write(step, {**{f'train/{k}': v for k, v in train_metrics.items()}, 'train/learning_rate': learning_rate,
                        'train/images_per_second': images_per_second})
  progress.update(step, {key: train_metrics.get(key, float('nan')) for key in ('loss', 'top1')},
                  images_per_second, elapsed_s / len(history))
  return nonfinite_in_a_row


def _eval_records(metrics: dict[str, Any]) -> dict[str, Any]:
  """metrics.jsonl's names for an evaluation: eval/<name>, and eval_ema/<name> for the averages'."""
  averages = metrics.get('ema', {})
  return {**{f'eval/{k}': v for k, v in metrics.items() if k != 'ema'},
          **{f'eval_ema/{k}': v for k, v in averages.items()}}


def _eval_line(metrics: dict[str, Any]) -> str:
  """An evaluation as the progress line shows it; the averages' after 'averages:'."""
  shown = lambda values: ', '.join(f'{k} {v:.4g}' for k, v in values.items() if k != 'ema')
  return shown(metrics) + (f'; averages: {shown(metrics["ema"])}' if 'ema' in metrics else '')


def _is_due(step: int, every: int, total: int) -> bool:
  return step == total or (every > 0 and step % every == 0)


def initial_state(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation,
                  image_shape: tuple[int, int, int], mesh: Mesh) -> tuple[TrainState, Any]:
  """The initial TrainState on `mesh`, and its shardings (ZeRO-1 with `config.shard_optimizer_state`)."""
  with_averages = config.model_ema_decay > 0
  shardings = sharding.train_state_shardings(abstract_train_state(model, tx, image_shape, with_averages), mesh,
                                             config.shard_optimizer_state)
  state = create_train_state(model, tx, jax.random.PRNGKey(config.seed), image_shape, shardings, with_averages)
  return state, shardings


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: Any
                    ) -> Callable[[TrainState, steps.Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted train step: batch split over `mesh`, the state laid out as `state_shardings`.

  Declaring the layout of the state on both sides is what makes ZeRO-1 work: XLA
  reduces the gradients, updates each device's slice of the optimizer state, and
  gathers the new parameters. The state is donated: its buffers become the new state's, so
  each call takes the state the last one returned (an earlier one is refused). `.lower` is the
  jitted step's.
  """
  jitted = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, weight_decay=config.weight_decay,
                        bn_weight_decay=config.bn_weight_decay, label_smoothing=config.label_smoothing,
                        skip_nonfinite=config.skip_nonfinite_steps, model_ema_decay=config.model_ema_decay),
      in_shardings=(state_shardings, sharding.batch_sharded(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)

  def train_step(state: TrainState, batch: steps.Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    # XLA:CPU on several devices died of a segmentation fault on such a state; on one, it named a buffer.
    if isinstance(state.step, jax.Array) and not isinstance(state.step, jax.core.Tracer) and state.step.is_deleted():
      raise ValueError('this TrainState was donated to an earlier train step, which reused its buffers for the '
                       'state it returned; pass that returned state.')
    return jitted(state, batch)

  train_step.lower = jitted.lower
  return train_step


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for a config that cannot train, before anything is built:
  values out of range, a data set that cannot be built as configured, a batch that does not
  split over the devices, single-example BN statistics."""
  config_checks.check_config(config)
  data.check_config(config.data)
  sharding.check_batch_size(config.batch_size)
  model_builder.check_statistics_groups(config, jax.device_count())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.num_train_steps` steps, resuming from `workdir`, and returns the final eval."""
  # A data directory is checked on each process, and one host may lack the mount.
  with distributed.failing_together('its config checks'):
    check_training_config(config)
    workdirs.check_not_a_checkpoint(workdir)
    workdirs.check_not_inside_a_run(workdir, RUN_SUBDIRECTORIES)
    workdirs.check_not_a_sweep(workdir)
  config_checks.check_same_on_every_process(config)
  is_chief = jax.process_index() == 0
  progress = ProgressBar(config.num_train_steps, enabled=is_chief)
  with workdir_lock.held_by_chief(workdir, RUN_SUBDIRECTORIES):  # a multi-host run's processes share the workdir
    with progress.showing_warnings(data.SkippedImageWarning):
      return _train_and_evaluate(config, workdir, is_chief, progress)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, is_chief: bool,
                        progress: ProgressBar) -> dict[str, Any]:
  """train_and_evaluate once its config is checked and the workdir is this run's."""
  train_ds = device_input.agreed_dataset(config, 'train', config.batch_size)
  eval_ds = eval_lib.build_eval_dataset(config)
  model = model_builder.build_model(config, model_builder.head_size(config, train_ds.num_classes))
  tx = optim.build_optimizer(config)
  schedule = optim.learning_rate_schedule(config)
  mesh = sharding.data_mesh()
  state, state_shardings = initial_state(config, model, tx, train_ds.image_shape, mesh)

  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  with distributed.failing_together('its workdir check'):  # each host probes the shared directory itself
    workdirs.check_workdir(workdir, checkpoints.bytes_for_saves(state, config.keep_checkpoints, checkpoint_dir),
                           subdirectories=RUN_SUBDIRECTORIES)
  checkpointer = checkpoints.Checkpointer(checkpoint_dir, config.keep_checkpoints, config.async_checkpointing)
  if config.batch_size > train_ds.num_examples:
    progress.message(f'warning: config.batch_size={config.batch_size} is more than the {train_ds.num_examples} '
                     'training examples, so every batch holds some of them more than once (and BatchNorm\'s '
                     'statistics count each copy); lower config.batch_size unless that is meant.')
  # The device count with the config: per-device BN statistics and ghost batches depend on it.
  run_record = {**config.to_dict(), 'device_count': jax.device_count()}
  state, last_saved = _resume_or_initialize(config, workdir, run_record, checkpointer, state, model,
                                            train_ds.image_shape, mesh, progress)
  start_step = int(state.step)

  train_step = make_train_step(config, model, tx, mesh, state_shardings)
  eval_step = eval_lib.make_eval_step(model, mesh)

  def evaluate(state: TrainState) -> dict[str, Any]:
    """The eval metrics of the variables, and under 'ema' of their averages (config.model_ema_decay)."""
    metrics = eval_lib.evaluate_dataset(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                                        eval_ds, mesh)
    if state.ema is None:
      return metrics
    # Split over the devices with ZeRO-1: the eval step takes whole copies.
    return {**metrics, 'ema': eval_lib.evaluate_dataset(eval_step, sharding.gather(state.ema, mesh), eval_ds, mesh)}

  with distributed.failing_together('to open the metrics files'):  # the chief's alone
    # A run of zero steps replaces the step-0 evaluation an earlier one recorded; a training run
    # started afresh keeps it, the baseline of its curve.
    baseline_again = last_saved is None and config.num_train_steps == 0
    writer = MetricsWriter(workdir, enabled=is_chief,
                           resumed_step=-1 if baseline_again else 0 if last_saved is None else last_saved)
    steps = [step for step in writer.dropped_steps if step > 0]  # step 0's, replaced now, goes without a word
    if last_saved is None and steps:
      progress.message(f'note: dropped {len(steps)} step(s) ({steps[0]} to {steps[-1]}) an earlier start without a '
                       'checkpoint had logged to metrics.jsonl: this run starts at step 0.')
    # A resumed run records its config with its first save: config.json describes the newest
    # checkpoint, also when a changed start fails before saving anything.
    changes = writer.record_config(run_record) if last_saved is None else config_changes(workdir, run_record)
  config_recorded = last_saved is None

  def warn_if_unusable(metrics: dict[str, Any]) -> None:
    for of, evaluated in (('', metrics), ('the averages: ', metrics.get('ema'))):
      unusable = evaluated and eval_lib.nonfinite_note(evaluated, config)
      if unusable:
        progress.message(f'warning: {of}{unusable}')

  def record_evaluation(step: int, metrics: dict[str, Any]) -> None:
    with distributed.failing_together('to write the metrics'):
      writer.write(step, _eval_records(metrics))
    progress.message(f'eval at step {step}: {_eval_line(metrics)}')
    warn_if_unusable(metrics)

  if last_saved is not None and changes:
    # Allowed (a longer run, another eval cadence), but some (batch size, BN options, the
    # device count with per-device statistics) make the result differ from an uninterrupted run.
    order = (' (batches are cut from the data order at step x batch size: with another batch size, some examples '
             'come again and others later than an uninterrupted run would see them)'
             if any(change.startswith('batch_size:') for change in changes) else '')
    progress.message(f'warning: resuming with a changed config: {"; ".join(changes)}{order}.')
  stop_after, restore_signal_handlers = _preemption_check()
  stopping = False
  eval_metrics: dict[str, Any] = {}
  history: list[dict[str, jax.Array]] = []
  nonfinite_in_a_row = 0  # steps, skipped
  batches: Iterator = device_input.dataset_batches(train_ds, train_ds.train_batches(start_step), mesh)
  one_at_a_time = distributed.steps_one_at_a_time()
  interval_start = time.perf_counter()
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      state, metrics = train_step(state, next(batches))
      if one_at_a_time:
        jax.block_until_ready(metrics)
      history.append(metrics)
      stopping = stop_after(step)
      save_now = stopping or _is_due(step, config.checkpoint_every_steps, config.num_train_steps)
      eval_due = _is_due(step, config.eval_every_steps, config.num_train_steps)
      if save_now or _is_due(step, config.log_every_steps, config.num_train_steps):
        nonfinite_in_a_row = _log_interval(step, history, interval_start, nonfinite_in_a_row, config, last_saved,
                                           float(schedule(step - 1)), writer, progress)
        history, interval_start = [], time.perf_counter()
        checkpointer.check()  # a failed save (full disk) stops the run now, not at the next save
      elif eval_due and not config.skip_nonfinite_steps:
        # Weights a non-finite step reached are no model to evaluate (their NaN loss would be blamed on the
        # BatchNorm statistics and recorded): stop here, as the next log would.
        _summarize(history, step, False, last_saved)
      if save_now:  # before the evaluation: one that fails (a bad validation image) loses no training
        checkpointer.save(step, state)
        last_saved = step
        if not config_recorded:
          with distributed.failing_together('to write config.json'):
            writer.record_config(run_record)
          config_recorded = True
        interval_start = time.perf_counter()  # The save's device-to-host copy is not training throughput.
      if eval_due:
        eval_metrics = evaluate(state)
        record_evaluation(step, eval_metrics)
        interval_start = time.perf_counter()  # Evaluation time is not training throughput.
      if stopping:
        progress.message(f'Preempted: saved step {step} to {checkpointer.directory}; rerun the same command to resume.')
        break
    if not eval_metrics and int(state.step) == config.num_train_steps:
      # Nothing left to train (a finished run started again): report its evaluation anyway. A run of
      # zero steps (the initial or config.init_checkpoint's weights, a baseline) records it as step 0.
      eval_metrics = evaluate(state)
      if start_step == 0:
        record_evaluation(0, eval_metrics)
      else:  # recorded when the run trained to it; its warning is the one thing to say again
        warn_if_unusable(eval_metrics)
  finally:
    with contextlib.suppress(OSError):  # a terminal gone (EIO) must not keep the last save from being waited for
      progress.end_line()  # an error's line, or Ctrl-C's, starts a line of its own
    restore_signal_handlers()
    batches.close()
    checkpointer.close()
    writer.close()
  # `preempted` only when a signal stopped it (at the last step too): a sweep stops after it.
  return {'step': int(state.step), **eval_metrics, **({'preempted': True} if stopping else {})}
