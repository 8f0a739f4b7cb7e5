"""Variables from elsewhere (TF-Slim or orbax checkpoints), fitted to a model for eval or fine-tuning."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from resnet_flax import checkpoints, slim
from resnet_flax.slim import checkpoint_import, names

SLIM_PREFIX = 'slim:'
# The only variables fine-tuning may re-initialize: a new classifier for a new class count.
HEAD = 'logits'


def _read(spec: str, model: Any, image_shape: tuple[int, int, int], allow_new_head: bool) -> dict[str, Any]:
  """{'params', 'batch_stats'} as stored; with `allow_new_head`, a slim checkpoint whose head does not fit
  yields no head (without it, slim's error stands: it names the checkpoint's class count)."""
  if spec.startswith(SLIM_PREFIX):
    path = spec[len(SLIM_PREFIX):]
    if not path.strip():
      raise checkpoints.CheckpointError(f'{spec!r} names no checkpoint; give slim:PATH, PATH a TF-Slim checkpoint '
                                        'prefix (.../model.ckpt) or its directory.')
    try:
      return slim.load_variables(path, model, image_shape=image_shape)
    except slim.SlimCheckpointError:
      if not (model.num_classes and allow_new_head):
        raise
      # Perhaps only the class count differs: load the backbone; a real mismatch raises again.
      return slim.load_variables(path, model.clone(num_classes=None), image_shape=image_shape)
  tree = checkpoints.restore_tree(spec)
  if 'params' not in tree:
    raise checkpoints.CheckpointError(f'checkpoint {spec} holds no params (keys: {sorted(tree)}).')
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {}), 'step': tree.get('step', 0)}


def fit_variables(loaded: dict[str, Any], reference: dict[str, Any], *, allow_new_head: bool,
                  source: str) -> tuple[dict[str, Any], list[str]]:
  """`reference`'s tree with every leaf taken from `loaded`; returns it and the leaves kept fresh.

  Only the `logits` layer may be missing or mis-shaped, and only when `allow_new_head`
  (fine-tuning to another class count); anything else is listed in one error.
  """
  fitted, fresh, problems = {}, [], []
  for collection in ('params', 'batch_stats'):
    have = names.flatten(loaded.get(collection, {}))
    wanted = names.flatten(reference.get(collection, {}))
    problems += _left_out(collection, have, wanted, allow_new_head)
    leaves = {}
    for path, want in wanted.items():
      got = have.get(path)
      if got is not None and tuple(np.shape(got)) == tuple(want.shape):
        leaves[path] = np.asarray(got, dtype=want.dtype)
      elif allow_new_head and path[0] == HEAD:
        leaves[path] = want
        fresh.append('/'.join(path))
      else:
        found = 'missing' if got is None else f'shape {tuple(np.shape(got))}'
        problems.append(f"{collection}/{'/'.join(path)}: {found}, model wants {tuple(want.shape)}")
    fitted[collection] = names.unflatten(leaves)
  if problems:
    raise checkpoints.CheckpointError(f'{source} does not fit the model ({len(problems)} variables): '
                                      + '; '.join(problems[:8]) + (' ...' if len(problems) > 8 else '')
                                      + f'. {_fix(loaded, reference)}')
  return fitted, fresh


def _left_out(collection: str, have: dict, wanted: dict, allow_new_head: bool) -> list[str]:
  """Checkpoint leaves the model has no place for and that dropping would change its outputs:
  a deeper network's extra units, gamma / beta other than 1 / 0. A head is left out for a
  feature extractor or a new head."""
  head_optional = allow_new_head or not any(path[0] == HEAD for path in wanted)
  problems = []
  for path, value in have.items():
    if (path in wanted or path[-1] in checkpoint_import.OPTIONAL_STATISTICS
        or (path[0] == HEAD and head_optional)):
      continue
    identity, field = checkpoint_import.OPTIONAL_BN_PARAMS.get(path[-1], (None, None))
    if field and collection == 'params' and np.all(np.asarray(value) == identity):
      continue
    fix = f' (build it with config.bn.{field}=True)' if field else ''
    problems.append(f"{collection}/{'/'.join(path)}: in the checkpoint, not in the model{fix}")
  return problems


def _fix(loaded: dict[str, Any], reference: dict[str, Any]) -> str:
  """The likeliest fix: the class count when only the logits differ, else the model's options."""
  have = np.shape(names.flatten(loaded.get('params', {})).get((HEAD, 'biases'), ()))
  want = np.shape(names.flatten(reference.get('params', {})).get((HEAD, 'biases'), ()))
  if have and want and have != want:
    return (f'The checkpoint has {have[0]} classes, the model {want[0]}: set config.num_classes={have[0]} (and '
            'config.data.label_offset to match its background class, if any).')
  return 'Check --config.model and its options (config.bn, config.model_options).'



def load_for_model(spec: str, model: Any, reference: dict[str, Any], image_shape: tuple[int, int, int], *,
                   allow_new_head: bool = False) -> tuple[dict[str, Any], int, list[str]]:
  """(variables fitted to `reference`, the checkpoint's step, re-initialized leaves) from `spec`.

  `spec` is `slim:PATH` (a TF-Slim checkpoint prefix) or an orbax checkpoint directory
  (a training checkpoint or one written by `python -m resnet_flax.slim convert`).
  """
  loaded = _read(spec, model, image_shape, allow_new_head)
  step = int(np.asarray(jax.device_get(loaded.pop('step', 0))))
  fitted, fresh = fit_variables(loaded, reference, allow_new_head=allow_new_head, source=spec)
  return fitted, step, fresh
