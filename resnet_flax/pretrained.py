"""Variables from elsewhere (TF-Slim or orbax checkpoints), fitted to a model for eval or fine-tuning."""

from __future__ import annotations

import shlex
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from resnet_flax import checkpoints, slim
from resnet_flax.metrics_writer import recorded_config
from resnet_flax.slim import checkpoint_import, checkpoint_state, names

SLIM_PREFIX = 'slim:'
# The only variables fine-tuning may re-initialize: a new classifier for a new class count.
HEAD = checkpoint_import.HEAD


def _read(spec: str, model: Any, image_shape: tuple[int, int, int], allow_new_head: bool,
          moving_averages: bool) -> dict[str, Any]:
  """{'params', 'batch_stats'} as stored (with `moving_averages`, their averages); with `allow_new_head`,
  a slim checkpoint whose head does not fit yields no head (without it, slim's error stands: it names
  the checkpoint's class count)."""
  if spec.startswith(SLIM_PREFIX):
    path = spec[len(SLIM_PREFIX):]
    if not path.strip():
      raise checkpoints.CheckpointError(f'{spec!r} names no checkpoint; give slim:PATH, PATH a TF-Slim checkpoint '
                                        'prefix (.../model.ckpt) or its directory.')
    if checkpoints.is_checkpoint(path):
      raise checkpoints.CheckpointError(f'{path} is an orbax checkpoint (this package\'s own), not a TF one: pass it '
                                        f'without the {SLIM_PREFIX} prefix.')
    converted = checkpoints.converted_path(path)
    if checkpoints.is_checkpoint(converted) and checkpoint_state.tf_checkpoint_in(path) is None:
      raise checkpoints.CheckpointError(f'{path} is what `python -m resnet_flax.slim convert` wrote, an orbax '
                                        f'checkpoint: pass {converted} without the {SLIM_PREFIX} prefix.')
    try:
      variables, step = slim.load_variables_and_step(path, model, image_shape=image_shape,
                                                     moving_averages=moving_averages)
    except slim.SlimCheckpointError:
      if not (model.num_classes and allow_new_head):
        raise
      # Perhaps only the class count differs: load the backbone; a real mismatch raises again.
      variables, step = slim.load_variables_and_step(path, model.clone(num_classes=None), image_shape=image_shape,
                                                     moving_averages=moving_averages)
    return {**variables, 'step': step}
  tree = checkpoints.restore_tree(spec)
  if 'params' not in tree:
    raise checkpoints.CheckpointError(f'checkpoint {spec} holds no params (keys: {sorted(tree)}).')
  if moving_averages:
    if not tree.get('ema'):
      raise checkpoints.CheckpointError(
          f'checkpoint {spec} holds no moving averages (a run with config.model_ema_decay > 0 keeps them; `slim '
          'convert --moving_averages` writes a TF-Slim checkpoint\'s as its variables): evaluate its variables with '
          '--config.model_ema_decay=0.')
    tree = {**tree, **tree['ema']}
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {}), 'step': tree.get('step', 0)}


def fit_variables(loaded: dict[str, Any], reference: dict[str, Any], *, allow_new_head: bool,
                  source: str, epsilon: float) -> tuple[dict[str, Any], list[str]]:
  """`reference`'s tree with every leaf taken from `loaded`; returns it and the leaves kept fresh.

  BatchNorm state the checkpoint's run did not keep (zero-debias, renorm averages) is filled
  as for TF-Slim checkpoints (`checkpoint_import.absent_statistic`, `epsilon` the model's BN
  epsilon). Only the `logits` layer may be missing or mis-shaped, and only when `allow_new_head`
  (fine-tuning to another class count); anything else is listed in one error.
  """
  fitted, fresh, problems, filled = {}, [], [], []
  for collection in ('params', 'batch_stats'):
    have = names.flatten(loaded.get(collection, {}))
    wanted = names.flatten(reference.get(collection, {}))
    problems += _left_out(collection, have, wanted, allow_new_head)
    leaves = {}
    for path, want in wanted.items():
      got = have.get(path)
      absent = None
      if got is None and collection == 'batch_stats':
        layer = {other[-1]: value for other, value in have.items() if other[:-1] == path[:-1]}
        absent = checkpoint_import.absent_statistic(path[-1], layer, tuple(want.shape), epsilon)
      if got is not None and tuple(np.shape(got)) == tuple(want.shape):
        leaves[path] = np.asarray(got, dtype=want.dtype)
      elif absent is not None:
        leaves[path] = absent.astype(want.dtype)
        filled.append('/'.join(path))
      elif allow_new_head and path[0] == HEAD:
        if isinstance(want, jax.ShapeDtypeStruct):  # a shape where the head's initial values belong
          raise ValueError(f"{source}: the new head ({'/'.join(path)}) starts at the reference's values, but the "
                           'reference holds shapes only (jax.eval_shape): pass the variables model.init returned.')
        leaves[path] = want
        fresh.append('/'.join(path))
      else:
        found = 'missing' if got is None else f'shape {tuple(np.shape(got))}'
        problems.append(f"{collection}/{'/'.join(path)}: {found}, model wants {tuple(want.shape)}")
    fitted[collection] = names.unflatten(leaves)
  if problems:
    # The fix first: a long list would hide it.
    raise checkpoints.StateMismatchError(f'{source} does not fit the model ({len(problems)} variables). '
                                         f'{_fix(loaded, reference, source, allow_new_head)} What differs: '
                                         + '; '.join(problems[:6]) + (' ...' if len(problems) > 6 else '.'))
  if filled:
    logging.info('%s: %d BatchNorm statistics its run did not keep (e.g. %s) start as TF would start them: '
                 'zero-debias state at 0, renorm averages at the moving statistics.', source, len(filled), filled[0])
  return fitted, fresh


def _left_out(collection: str, have: dict, wanted: dict, allow_new_head: bool) -> list[str]:
  """Checkpoint leaves the model has no place for and that dropping would change its outputs:
  a deeper network's extra units, gamma / beta other than 1 / 0. A head is left out for a
  feature extractor or a new head."""
  head_optional = allow_new_head or not any(path[0] == HEAD for path in wanted)
  leaf_names = {path[-1] for path in wanted}
  problems = []
  for path, value in have.items():
    if (path in wanted or path[-1] in checkpoint_import.OPTIONAL_STATISTICS
        or (path[0] == HEAD and head_optional)):
      continue
    identity, field = checkpoint_import.OPTIONAL_BN_PARAMS.get(path[-1], (None, None))
    if field and collection == 'params' and np.all(np.asarray(value) == identity):
      continue
    # Only a model without any gamma (beta) was built with scale (center) off.
    fix = f' (build it with config.bn.{field}=True)' if field and path[-1] not in leaf_names else ''
    problems.append(f"{collection}/{'/'.join(path)}: in the checkpoint, not in the model{fix}")
  return problems


def _fix(loaded: dict[str, Any], reference: dict[str, Any], source: str, allow_new_head: bool) -> str:
  """The likeliest fixes: the class count (unless a new head may replace it) and the input
  channels where they differ, what the checkpoint's run recorded in its config.json, else the
  model's options."""
  have, want = (names.flatten(tree.get('params', {})) for tree in (loaded, reference))
  fixes = []
  if {path for path in have if path[0] != HEAD} != {path for path in want if path[0] != HEAD}:
    fixes.append('Its layers are not this model\'s: it was saved from another model or other model options; check '
                 '--config.model and its options (config.model_options, config.bn).')
  have_classes, want_classes = (np.shape(tree[(HEAD, 'biases')]) if (HEAD, 'biases') in tree else None
                                for tree in (have, want))
  if have_classes is None and want_classes is not None and not allow_new_head:
    # np.shape of a missing head had read as "0 classes: set config.num_classes=0", which is refused.
    fixes.append('The checkpoint has no logits layer (features only, as `convert --num_classes 0` writes): evaluate '
                 'a checkpoint with a classifier, or train one from it with --config.init_checkpoint, which adds a '
                 'new head.')
  if have_classes and want_classes and have_classes != want_classes and not allow_new_head:
    fixes.append(f'The checkpoint has {have_classes[0]} classes, the model {want_classes[0]}: set '
                 f'config.num_classes={have_classes[0]} (and config.data.label_offset to match its background '
                 'class, if any).')
  have_channels, want_channels = (checkpoint_import.input_channels(tree) for tree in (have, want))
  if have_channels and want_channels and have_channels != want_channels:
    fixes.append(f'The checkpoint takes {have_channels}-channel images, the data set gives {want_channels}: '
                 'use it with data like those it was trained on (config.data).')
  recorded = _recorded_config(source)
  if recorded:
    fixes.append(f'Its run was trained with {recorded}.')
  return ' '.join(fixes) or 'Check --config.model and its options (config.model_options, config.bn).'


def source_run(spec: str) -> Optional[str]:
  """The workdir of the training run that saved the checkpoint `spec` names (a
  `<workdir>/checkpoints/<step>`), where its config.json is; None for any other, `slim:` included."""
  return None if spec.startswith(SLIM_PREFIX) else checkpoints.run_workdir_of(spec)


def _recorded_config(source: str) -> str:
  """The model-shaping fields that the run which wrote the orbax checkpoint `<workdir>/
  checkpoints/<step>` recorded in `<workdir>/config.json`, as flags; empty if there is none."""
  workdir = source_run(source)
  if workdir is None:
    return ''
  try:
    fields = recorded_config(workdir)
  except (OSError, ValueError):  # a hint only: an unreadable record gives none
    return ''
  if fields is None:
    return ''
  shaping = ('model', 'num_classes', 'model_options.block_sizes', 'data.name', 'bn.center', 'bn.scale',
             'bn.zero_debias_moving_mean', 'bn.renorm')
  # Quoted where a shell needs it (a tuple's parentheses): the hint is meant to be pasted.
  return ' '.join(shlex.quote(f'--config.{name}={_as_flag(fields[name])}')
                  for name in shaping if fields.get(name) is not None)


def _as_flag(value: Any) -> str:
  """A config.json value as a command line writes it: JSON's lists as tuples, no spaces."""
  if isinstance(value, list):
    return '(' + ','.join(_as_flag(item) for item in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def load_for_model(spec: str, model: Any, reference: dict[str, Any], image_shape: tuple[int, int, int], *,
                   allow_new_head: bool = False, moving_averages: bool = False
                   ) -> tuple[dict[str, Any], int, list[str]]:
  """(variables fitted to `reference`, the checkpoint's step, re-initialized leaves) from `spec`.

  `spec` is `slim:PATH` (a TF-Slim checkpoint prefix) or an orbax checkpoint directory
  (a training checkpoint or one written by `python -m resnet_flax.slim convert`). `reference`
  gives the shapes and dtypes (`jax.eval_shape` of `model.init` will do) and, for a new head,
  its initial values (then it must be `model.init`'s own output). `moving_averages`: the exponential
  moving averages of the variables instead, a training checkpoint's (config.model_ema_decay) or a
  TF-Slim checkpoint's (`slim.load_variables`).
  """
  loaded = _read(spec, model, image_shape, allow_new_head, moving_averages)
  step = int(np.asarray(jax.device_get(loaded.pop('step', 0))))
  fitted, fresh = fit_variables(loaded, reference, allow_new_head=allow_new_head, source=spec,
                                epsilon=checkpoint_import.batch_norm_epsilon(model))
  return fitted, step, fresh
