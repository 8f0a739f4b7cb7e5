"""One-to-one mapping between our variable tree and TF-Slim variable names.

The flax tree is the slim name split on '/' without the network's scope, so the
mapping is a rename, except for TF's zero-debias state: `assign_moving_average`
opens a variable scope named after the moving mean *inside* the BatchNorm scope,
so the BatchNorm scope appears twice in those names.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

PARAMS, BATCH_STATS = 'params', 'batch_stats'
# TF's name for the training step a checkpoint was saved at (`tf.train.Saver.save(global_step=)`).
GLOBAL_STEP = 'global_step'
# What `tf.train.ExponentialMovingAverage` names a variable's average: slim's train_image_classifier
# --moving_average_decay keeps one next to every model variable.
AVERAGE_SUFFIX = '/ExponentialMovingAverage'
_PARAM_LEAVES = {'weights', 'biases', 'gamma', 'beta'}
# TF's renorm adds the last three (tf_keras BatchNormalization); `renorm_clipping_step` is ours.
_STAT_LEAVES = {'moving_mean', 'moving_variance', 'moving_stddev', 'renorm_mean', 'renorm_stddev',
                'renorm_clipping_step'}
# Our names for TF's zero-debias variables -> the suffix TF puts after the doubled scope. TF
# debiases only the mean; the variance's names are what TF's naming rule would give it.
_DEBIAS_LEAVES = {'moving_mean_biased': 'moving_mean/biased', 'moving_mean_local_step': 'moving_mean/local_step',
                  'moving_variance_biased': 'moving_variance/biased',
                  'moving_variance_local_step': 'moving_variance/local_step'}


def slim_name(scope: str, path: tuple[str, ...]) -> str:
  """The slim variable name of the variable at `path` (module path + leaf)."""
  *modules, leaf = path
  module_scope = '/'.join((scope, *modules))
  if leaf in _DEBIAS_LEAVES:
    return f'{module_scope}/{module_scope}/{_DEBIAS_LEAVES[leaf]}'
  return f'{module_scope}/{leaf}'


def flax_path(scope: str, name: str) -> tuple[str, tuple[str, ...]] | None:
  """(collection, path) of a slim variable name, or None if it is not one of ours."""
  if not name.startswith(scope + '/'):
    return None
  for leaf, suffix in _DEBIAS_LEAVES.items():
    if name.endswith('/' + suffix):
      doubled = name[:-len(suffix) - 1]
      half = len(doubled) // 2
      module_scope = doubled[:half]
      if doubled[half] == '/' and doubled[half + 1:] == module_scope:
        return BATCH_STATS, tuple(module_scope.split('/')[1:]) + (leaf,)
      return None
  path = tuple(name.split('/')[1:])
  if path[-1] in _PARAM_LEAVES:
    return PARAMS, path
  if path[-1] in _STAT_LEAVES:
    return BATCH_STATS, path
  return None


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{path: leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """Nested dict from {path: leaf}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def to_slim(variables: Mapping[str, Any], scope: str) -> dict[str, np.ndarray]:
  """{slim name: array} for the `params` and `batch_stats` of a model."""
  out = {}
  for collection in (PARAMS, BATCH_STATS):
    for path, value in flatten(variables.get(collection, {})).items():
      out[slim_name(scope, path)] = np.asarray(value)
  return out


def from_slim(tensors: Mapping[str, Any], scope: str) -> dict[str, dict]:
  """{'params': ..., 'batch_stats': ...} from {slim name: array}; other names are ignored."""
  flat: dict[str, dict] = {PARAMS: {}, BATCH_STATS: {}}
  for name, value in tensors.items():
    located = flax_path(scope, name)
    if located is not None:
      collection, path = located
      flat[collection][path] = value
  return {collection: unflatten(leaves) for collection, leaves in flat.items()}
