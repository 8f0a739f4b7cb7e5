"""Evaluation: metrics of a model over one pass of a split, and `eval.py`'s job."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import stat
import sys
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_flax import (checkpoints, config_checks, data, device_input, distributed, metrics_writer, model_builder,
                         precise_bn, pretrained, sharding, steps, workdirs)
from resnet_flax.progress import BatchProgress, batch_progress
from resnet_flax.slim import checkpoint_state

# What decides the images a model sees at evaluation, and BatchNorm's epsilon, which the
# checkpoint's arrays leave open (bfloat16 or float32 is rounding): a run evaluated with other
# values scores other numbers (digits trained upsampled to 16 px, evaluated padded to 8: 93.6% -> 13.9%;
# trained with bn.epsilon 1, evaluated with 1e-5: 79.2% -> 9.7%).
EVAL_INPUT_FIELDS = ('data.name', 'data.image_size', 'data.digits_resize', 'data.preprocessing', 'data.resize',
                     'data.label_offset', 'data.channels', 'model_options.output_stride', 'bn.epsilon')
# What decides precise BN's statistics groups, as training's: the batch, and how it is split.
RECALIBRATION_GROUP_FIELDS = ('batch_size', 'bn.cross_device', 'bn.ghost_batch_size', 'device_count')


def make_eval_step(model: nn.Module, mesh: Mesh
                   ) -> Callable[[dict[str, Any], device_input.DeviceBatch], dict[str, jax.Array]]:
  """The jitted eval step; build it once per run so repeated evaluations reuse the compilation."""
  return sharding.jit_over_batch(functools.partial(steps.eval_step, model=model), mesh)


def metrics_over(step_fn: Callable[[dict[str, Any], device_input.DeviceBatch], dict[str, jax.Array]],
                 variables: dict[str, Any], batches: Iterable[device_input.DeviceBatch],
                 progress: Optional[BatchProgress] = None) -> dict[str, float]:
  """Loss, top-1 and top-5 over every real example of device `batches`, from `step_fn`'s per-batch sums;
  `progress` says how far it has come."""
  sums = None
  one_at_a_time = distributed.steps_one_at_a_time()
  for done, batch in enumerate(batches, 1):
    out = step_fn(variables, batch)
    sums = out if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, out)
    if one_at_a_time:
      jax.block_until_ready(sums)
    if progress is not None and progress.due():
      jax.block_until_ready(sums)  # the steps so far done, not only dispatched
      progress.show(done)
  if sums is None:
    raise ValueError('no batch to evaluate: the eval split is smaller than one batch; use a smaller batch size.')
  sums = jax.tree_util.tree_map(lambda x: float(np.asarray(x)), sums)
  count = sums['num_examples']
  if count == 0:  # every example masked out: skipped unreadable files
    raise data.DataError('no example of the eval split could be read: every one was skipped as unreadable '
                         '(config.data.on_bad_image="skip" is for a few bad files); check its images under '
                         'config.data.dir.')
  return {'loss': sums['loss_sum'] / count, 'top1': sums['top1_hits'] / count, 'top5': sums['top5_hits'] / count,
          'num_examples': int(count)}


def evaluate_dataset(eval_step: Callable[[dict[str, Any], device_input.DeviceBatch], dict[str, jax.Array]],
                     variables: dict[str, Any], dataset: data.Dataset, mesh: Mesh,
                     progress: Optional[BatchProgress] = None) -> dict[str, float]:
  """Loss, top-1 and top-5 over every real example of `dataset` (padding masked out)."""
  return metrics_over(eval_step, variables, device_input.dataset_batches(dataset, dataset.eval_batches(), mesh),
                      progress)


def build_eval_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
  """This process's share of `config.eval_split`, built by every process together (`device_input.agreed_dataset`)."""
  setting = 'config.eval_batch_size' if config.eval_batch_size else 'config.eval_batch_size=0, so config.batch_size'
  return device_input.agreed_dataset(config, config.eval_split, config.eval_batch_size or config.batch_size, setting)


def abstract_variables(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """The model's {'params', 'batch_stats'} shapes and dtypes, without computing anything."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))


@dataclasses.dataclass
class LoadedCheckpoint:
  """A checkpoint ready to evaluate: the model, its variables (replicated) and the eval split.
  The model is for eval mode (no train-mode statistics groups); `recalibrated` is precise BN."""
  model: Any
  variables: dict[str, Any]
  step: int
  num_classes: int
  dataset: data.Dataset
  mesh: Any

  def evaluate(self, variables: Optional[dict[str, Any]] = None, *, show_progress: bool = False
               ) -> dict[str, float]:
    """Eval-mode metrics over the eval split, with these variables or the loaded ones; with
    `show_progress`, process 0 prints how far it has come every 10 s."""
    variables = self.variables if variables is None else sharding.replicate(variables, self.mesh)
    progress = batch_progress(show_progress, 'eval', self.dataset.num_eval_steps,
                              self.dataset.batch_size * jax.process_count())
    return evaluate_dataset(make_eval_step(self.model, self.mesh), variables, self.dataset, self.mesh, progress)

  def recalibrated(self, config: ml_collections.ConfigDict, num_batches: int, *, show_progress: bool = False
                   ) -> dict[str, Any]:
    """The loaded variables with precise-BN statistics from `num_batches` training batches, taken
    in the statistics groups `config` trains with on these devices (ghost batches, per device)."""
    precise_bn.check_recalibration_possible(config)  # callers check first too, to refuse before evaluating
    model = model_builder.build_model(config, self.num_classes)  # grouped: the loaded model is not
    return precise_bn.recalibrate(config, model, self.variables, num_batches, self.mesh, show_progress)


def nonfinite_note(metrics: dict[str, Any], config: ml_collections.ConfigDict) -> Optional[str]:
  """Why an evaluation whose loss is NaN or Inf means nothing, and what to do; None if it is finite.

  Training losses use batch statistics; an evaluation uses the moving ones, which after few
  updates (or with a deep model on tiny images) may not fit the weights at all.
  """
  if math.isfinite(metrics.get('loss', 0.0)):
    return None
  if 'before_recalibration' in metrics:  # the statistics were recomputed: the weights overflow
    return (f"the evaluation's loss is {metrics['loss']} even with BatchNorm statistics recomputed from "
            f'{config.bn_recalibration_batches} training batches, so its accuracy means nothing: the weights '
            'hold NaN or Inf, or overflow on these images; check the run\'s training losses.')
  return (f"the evaluation's loss is {metrics['loss']}, so its accuracy means nothing: most likely the moving "
          f'BatchNorm statistics (decay {config.bn.decay}) do not fit the weights yet. Evaluate after more steps, '
          'or with statistics recomputed from training batches: eval.py --config.bn_recalibration_batches=20.')


def input_differences(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The fields deciding what the model sees at evaluation that differ from those the run in
  `workdir` recorded in its config.json, as 'field: run's -> now', and for precise BN its
  statistics groups where they differ from training's; none without a record."""
  try:
    recorded = metrics_writer.recorded_config(workdir)
  except (OSError, ValueError):  # a damaged record is no reason not to evaluate its checkpoints
    return []
  if recorded is None:
    return []
  now = metrics_writer.as_recorded(config.to_dict())
  differences = metrics_writer.field_changes(recorded, now, EVAL_INPUT_FIELDS)
  run_decay = recorded.get('model_ema_decay')
  if isinstance(run_decay, (int, float)) and run_decay > 0 and not config.model_ema_decay > 0:
    # Any decay > 0 reads the same stored averages; 0 reads the variables, which the run did not report alone.
    differences.append(f"model_ema_decay: {run_decay} -> {config.model_ema_decay} (the run's variables, not its "
                       'moving averages)')
  # A run with frozen statistics had no train-mode groups for precise BN to take (a batch of one is such a run's).
  if config.get('bn_recalibration_batches', 0) > 0 and recorded.get('bn.frozen') is not True:
    # Other groups, other statistics: per-device groups on 4 devices and on 1 gave 34.17% and 33.89%.
    now['device_count'] = jax.device_count()
    run = {'device_count': now['device_count'], **recorded}  # a record without it: this count
    groups = [_statistics_group(fields) for fields in (run, now)]
    if None not in groups and groups[0] != groups[1]:  # None: unknown, or refused when recalibrating
      # The device count splits the batch only into per-device groups: named where it did.
      per_device = 'per_device' in (run.get('bn.cross_device'), now.get('bn.cross_device'))
      deciding = [field for field in RECALIBRATION_GROUP_FIELDS if field != 'device_count' or per_device]
      changes = metrics_writer.field_changes(run, now, deciding)
      differences.append(f"precise BN's statistics groups: {groups[0]} -> {groups[1]} examples "
                         f"({', '.join(changes)})")
  return differences


def _statistics_group(fields: dict[str, Any]) -> Optional[int]:
  """Examples per train-mode statistics group of a config as `recorded_config` gives it; None
  for a batch its groups do not divide (refused when recalibrating) or a record without one."""
  bn = ml_collections.ConfigDict({'cross_device': fields.get('bn.cross_device', 'global'),
                                  'ghost_batch_size': fields.get('bn.ghost_batch_size')})
  batch_size = fields.get('batch_size')
  if not isinstance(batch_size, int) or isinstance(batch_size, bool):  # a record edited by hand
    return None
  try:
    return model_builder.examples_per_group(bn, batch_size, fields['device_count'])
  except (ValueError, TypeError):  # groups that do not divide; TypeError: an edited ghost_batch_size
    return None


def load_checkpoint(config: ml_collections.ConfigDict, workdir: Optional[str | os.PathLike],
                    checkpoint: Optional[str | os.PathLike] = None
                    ) -> LoadedCheckpoint:
  """The latest checkpoint in `workdir`, or `checkpoint`, with the model `config` describes.

  `checkpoint` may be a training checkpoint directory, a converted one, or `slim:PATH`
  for a TF-Slim checkpoint (evaluated with the preprocessing `config.data` names). With
  `config.model_ema_decay` > 0, the checkpoint's moving averages of its variables are read.
  """
  if (checkpoint is None) == (workdir is None):
    raise ValueError('pass --workdir=DIR (its latest checkpoint) or --checkpoint=PATH, one of them.')
  # pathlib paths as well as text (they had failed on `.strip`, or deep in a path check).
  workdir, checkpoint = (None if path is None else os.fspath(path) for path in (workdir, checkpoint))
  if checkpoint is not None and not checkpoint.strip():
    raise ValueError('--checkpoint is empty; pass a checkpoint directory or slim:PATH, or leave the flag out.')
  if workdir is not None and not workdir.strip():  # it had looked for checkpoints in the current directory
    raise ValueError('--workdir is empty; pass the directory of a training run.')
  config_checks.check_config(config)
  config_checks.check_same_on_every_process(config)
  dataset = build_eval_dataset(config)
  num_classes = model_builder.head_size(config, dataset.num_classes)
  if num_classes > dataset.num_classes and jax.process_index() == 0:
    # Labels index the data's classes: where the data lacks one of the model's, every later
    # label names another class of the model's (an image folder without train/ takes its
    # labels from the evaluated split's own folders).
    print(f"warning: the model has {num_classes} classes but {dataset.source.name}'s labels index "
          f"{dataset.num_classes}; unless the classes the data lacks are the model's last ones, its labels name other "
          "classes than the model's (an image folder without train/ takes them from the evaluated split's own class "
          'folders: put the train/ split beside it).', file=sys.stderr)
  # Eval mode groups no statistics: a run's ghost batches need not divide this batch on these devices.
  model = model_builder.build_model(config, num_classes, statistics_groups=False)
  mesh = sharding.data_mesh()
  older: list[int] = []
  if checkpoint is None:
    directory = os.path.join(checkpoints.local_path(workdir, 'workdir'), 'checkpoints')
    with distributed.failing_together(f'to find a checkpoint in {directory}'):  # a host may lack the mount
      step = _newest_step(workdir, directory)
    # A run training meanwhile may commit a step between two processes' listings: all read process 0's.
    step = distributed.from_process_zero(step)
    checkpoint = os.path.join(directory, str(step))
    older = [saved for saved in checkpoints.committed_steps(directory) if saved < step]
  # A step of a run named by its path (`--checkpoint=<workdir>/checkpoints/<step>`) has its run's record too.
  run = workdir if workdir is not None else pretrained.source_run(checkpoint)
  differences = [] if run is None else input_differences(config, run)
  try:
    with distributed.failing_together('to read the checkpoint'):  # each process reads it whole, by itself
      variables, step, _ = pretrained.load_for_model(checkpoint, model,
                                                     abstract_variables(model, dataset.image_shape),
                                                     dataset.image_shape,
                                                     moving_averages=config.model_ema_decay > 0)
  except checkpoints.StateMismatchError:
    raise  # the config, not the checkpoint: an older one would not fit either
  except checkpoints.CheckpointError as error:
    if not older:
      raise
    # train.py falls back to the newest checkpoint that reads by itself; eval.py evaluates
    # only what it is asked to, and says what else there is.
    raise checkpoints.CheckpointError(f'{error} Older checkpoints in {directory}: steps {older}; if this one is '
                                      f'damaged, pass --checkpoint={directory}/{older[-1]}.') from None
  if differences and jax.process_index() == 0:  # after the read: a checkpoint refused is the one line to show
    # Warned, not refused: another resolution or preprocessing may be the experiment.
    print(f"warning: evaluating {run if workdir is not None else checkpoint} with other settings than its run's "
          f"({'; '.join(differences)}); give it the run's values to evaluate it as trained.", file=sys.stderr)
  return LoadedCheckpoint(model, sharding.replicate(variables, mesh), step, num_classes, dataset, mesh)


def _newest_step(workdir: str, directory: str) -> int:
  """The newest committed step in `directory`, `workdir`'s checkpoints; if there is none, an
  error naming what to pass instead (a converted or TF checkpoint found there)."""
  workdirs.check_not_a_checkpoint(workdir)
  step = checkpoints.latest_step_in(directory)
  if step is not None:
    return step
  try:
    is_directory = stat.S_ISDIR(os.stat(workdir).st_mode)
  except FileNotFoundError:  # most likely a typo: "train first" would mislead
    raise checkpoints.CheckpointError(f'--workdir {workdir} does not exist; pass the workdir train.py '
                                      'wrote to.') from None
  except OSError:  # one this user may not enter, say: the message below
    is_directory = True
  if not is_directory:
    raise checkpoints.CheckpointError(f'--workdir {workdir} is a file, not a directory; pass the workdir train.py '
                                      'wrote to.')
  workdirs.check_not_a_sweep(workdir, evaluating=True)
  converted = checkpoints.converted_path(workdir)
  tf_checkpoint = checkpoint_state.tf_checkpoint_in(workdir)
  if os.path.isdir(converted):
    hint = f'--checkpoint={converted}'
  elif tf_checkpoint is not None:  # a TF-Slim download passed as the workdir
    hint = f'--checkpoint=slim:{tf_checkpoint} (the TensorFlow checkpoint there) without --workdir'
  else:
    hint = '--checkpoint=PATH'
  raise checkpoints.CheckpointError(f'no checkpoint in {directory}; train first or pass {hint}.')


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str | os.PathLike],
             checkpoint: Optional[str | os.PathLike] = None
             ) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir`, or `checkpoint`, on `config.eval_split`.

  With `config.bn_recalibration_batches` > 0, BatchNorm statistics are first recomputed on
  that many training batches (precise BN); the metrics before are under 'before_recalibration'.
  """
  recalibrating = config.get('bn_recalibration_batches', 0) > 0
  if recalibrating:
    precise_bn.check_recalibration_possible(config)
  loaded = load_checkpoint(config, workdir, checkpoint)
  metrics = loaded.evaluate(show_progress=True)
  result = {'step': loaded.step, **metrics}
  if recalibrating:
    variables = loaded.recalibrated(config, config.bn_recalibration_batches, show_progress=True)
    result = {'step': loaded.step, **loaded.evaluate(variables, show_progress=True), 'before_recalibration': metrics}
  unusable = nonfinite_note(result, config)
  if unusable and jax.process_index() == 0:
    print(f'warning: {unusable}', file=sys.stderr)
  return result
