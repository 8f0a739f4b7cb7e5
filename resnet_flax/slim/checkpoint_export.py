"""Exports a model's variables under TF-Slim names, and as a checkpoint TensorFlow reads.

    slim.save_slim_checkpoint('export/model.ckpt', variables, model)   # no TensorFlow needed
    # in TF: tf.train.Saver().restore(sess, 'export/model.ckpt') into slim's resnet graph

Everything the model keeps is exported: params and the trained moving statistics, and for a
`zero_debias_moving_mean` model TF's `moving_mean/biased` / `local_step` variables, so that
slim can evaluate the checkpoint or resume training from it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

from resnet_flax.slim import names
from resnet_flax.slim import tensor_bundle_writer
from resnet_flax.slim.checkpoint_import import (BATCH_STATS, DEFAULT_IMAGE_SHAPE, PARAMS, SlimCheckpointError,
                                                expected_variables, input_channels)


def variables_to_slim(variables: Mapping[str, Any], model: Any, *,
                      image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE) -> dict[str, np.ndarray]:
  """{slim variable name: numpy array} for `variables` ({'params', 'batch_stats'}) of `model`.

  Arrays are fetched to the host and cast to the model's variable dtypes (float32; TF's
  zero-debias `local_step` is a float32 scalar as well). `image_shape` is only used to trace the
  model's variable list; its channels are those the variables' first convolution reads (a
  1-channel model under the 3-channel default traces with 1).

  Raises:
    SlimCheckpointError: `variables` is not exactly the model's (a missing collection, such as
      `batch_stats` left out, missing, extra or mis-shaped leaves), listing every offender.
  """
  expected = expected_variables(model, image_shape)
  given = {collection: names.flatten(variables.get(collection, {})) for collection in (PARAMS, BATCH_STATS)}
  channels = input_channels(given[PARAMS])
  if channels is not None and channels != image_shape[-1]:
    expected = expected_variables(model, (*image_shape[:-1], channels))
  problems = []
  for collection in (PARAMS, BATCH_STATS):
    ours, theirs = expected[collection], given[collection]
    if ours and not theirs:
      problems.append(f'  no {collection!r} in the variables (pass all of them: {{"params": ..., '
                      f'"batch_stats": ...}} as model.init or the train state holds them)')
      continue
    problems += [f'  missing {collection}/{"/".join(path)}  (model shape {tuple(spec.shape)})'
                 for path, spec in ours.items() if path not in theirs]
    problems += [f'  not in the model: {collection}/{"/".join(path)}' for path in theirs if path not in ours]
    for path, value in theirs.items():
      if path in ours and np.shape(value) != tuple(ours[path].shape):
        problems.append(f'  {collection}/{"/".join(path)}: shape {np.shape(value)}, model {tuple(ours[path].shape)}')
  if problems:
    header = f'variables do not fit model {model.slim_scope!r}:'
    raise SlimCheckpointError('\n'.join([header, *problems]),
                              f'{header} {len(problems)} problem(s), the first: {problems[0].strip()}')
  out = {}
  for collection in (PARAMS, BATCH_STATS):
    for path, value in given[collection].items():
      dtype = expected[collection][path].dtype
      out[names.slim_name(model.slim_scope, path)] = np.asarray(jax.device_get(value), dtype=dtype)
  return out


def save_slim_checkpoint(prefix: str | os.PathLike, variables: Mapping[str, Any], model: Any,
                         global_step: int | None = None, *, image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE,
                         averages: Mapping[str, Any] | None = None) -> str:
  """Writes `variables` of `model` as a TF checkpoint `prefix.{index,data-00000-of-00001}`.

  With `global_step`, the prefix becomes `prefix-<global_step>` and an int64 `global_step`
  variable is stored, as `tf.train.Saver.save(..., global_step=...)` does. With `averages`
  (their moving averages, a run's `state.ema`), each variable's average is stored beside it as
  `<name>/ExponentialMovingAverage`, which slim's `eval_image_classifier --moving_average_decay`
  restores. The directory's `checkpoint` state file points at the new checkpoint. In a
  multi-process run, call it from one process only. Returns the prefix written (what
  `tf.train.Saver.restore` and `load_variables` take).
  """
  tensors = variables_to_slim(variables, model, image_shape=image_shape)
  if averages is not None:
    tensors.update({name + names.AVERAGE_SUFFIX: value
                    for name, value in variables_to_slim(averages, model, image_shape=image_shape).items()})
  return tensor_bundle_writer.write_checkpoint(prefix, tensors, global_step)
