"""Loads a TF-Slim checkpoint into a model's variables: a rename, checked against the model.

    model = models.get_model('resnet_v2_50', num_classes=1001)
    variables = load_variables('resnet_v2_50/model.ckpt', model)   # {'params', 'batch_stats'}
    logits = model.apply(variables, images, train=False)

The model decides what is read: every variable it declares is looked up under its slim name
(`names.slim_name`), and everything else in the checkpoint (optimizer slots, `global_step`,
zero-debias state the model does not keep, a logits layer a `num_classes=None` model does not
have) is ignored. What does not fit, layers the model lacks too (a deeper network's units), is
reported all at once in a `SlimCheckpointError`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from resnet_flax.models import resnet_utils
from resnet_flax.slim import names
from resnet_flax.slim import tensor_bundle

PARAMS, BATCH_STATS, GLOBAL_STEP = names.PARAMS, names.BATCH_STATS, names.GLOBAL_STEP
DEFAULT_IMAGE_SHAPE = (224, 224, 3)
HEAD = 'logits'  # the classifier: a num_classes=None model has none
# State TF creates next to a restored checkpoint when it is absent, all of a group at zero:
# zero-debias state (ours for the variance too) and our renorm clipping-schedule counter.
_ZERO_START_GROUPS = (('moving_mean_biased', 'moving_mean_local_step'),
                      ('moving_variance_biased', 'moving_variance_local_step'),
                      ('renorm_clipping_step',))
# Renorm averages absent from a checkpoint trained without renorm: start them at the moving
# statistics, as if they had always tracked them (stddev = sqrt(variance + epsilon)).
_RENORM_FROM_MOVING = {'renorm_mean': 'moving_mean', 'renorm_stddev': 'moving_variance',
                       'moving_stddev': 'moving_variance'}


def _global_step(reader: Any) -> int:
  """The `global_step` a TF checkpoint was saved at (`Saver.save(global_step=...)`, slim's
  training loop), 0 for a checkpoint without one, as a training checkpoint's step counts."""
  dtype, shape = reader.variables().get(GLOBAL_STEP, (None, None))
  # Only the variable TF itself creates: a scalar integer (int64). Anything else is not a step.
  if shape not in ((), (1,)) or dtype is None or not np.issubdtype(dtype, np.integer):
    return 0
  return int(reader.read(GLOBAL_STEP).reshape(()))


def batch_norm_epsilon(model: Any) -> float:
  """The epsilon of a ResNet's BatchNorm layers (its arg scope's), 0 for other modules."""
  return float(dict(model.arg_scope.batch_norm).get('epsilon', 0.0)) if hasattr(model, 'arg_scope') else 0.0


def absent_statistic(leaf: str, layer: Mapping[str, np.ndarray], shape: tuple[int, ...], epsilon: float
                     ) -> Optional[np.ndarray]:
  """The value of BatchNorm state `leaf` that a checkpoint lacks, from the rest of its layer's
  state `layer` (leaf name -> value), as `load_variables` fills it for TF-Slim checkpoints:
  zero-debias and schedule state at 0 when its whole group is absent, renorm averages from the
  moving statistics; None when it cannot be filled."""
  group = next((g for g in _ZERO_START_GROUPS if leaf in g), None)
  if group is not None and not any(name in layer for name in group):
    return np.zeros(shape, np.float32)
  source = _RENORM_FROM_MOVING.get(leaf)
  if source is None or source not in layer:
    return None
  value = np.asarray(layer[source], np.float32)
  return value if leaf == 'renorm_mean' else np.sqrt(value + epsilon).astype(np.float32)


def input_channels(params: Mapping[tuple[str, ...], Any]) -> Optional[int]:
  """The channels of the images a ResNet's flat `params` ({path: array}) read: the in-channels of
  the root block's conv1, else (no root block) of the first unit's conv1, which reads them
  directly (v1) or after preact (v2); None if neither is there."""
  first = [path for path in params if path == ('conv1', 'weights') or
           (path[:2] == ('block1', 'unit_1') and path[-2:] == ('conv1', 'weights'))]
  return int(np.shape(params[min(first, key=len)])[2]) if first else None


# BatchNorm state a model without zero-debias or renorm does without (its moving mean and
# variance hold the statistics), so a checkpoint's copy of it may be left out.
OPTIONAL_STATISTICS = frozenset({*(name for group in _ZERO_START_GROUPS for name in group), *_RENORM_FROM_MOVING})
# Params a checkpoint may hold for a BatchNorm the model builds without them: the value that
# makes the missing param a no-op (so that checkpoint can still be loaded exactly), and the
# BatchNorm field that builds it.
OPTIONAL_BN_PARAMS = {'gamma': (1.0, 'scale'), 'beta': (0.0, 'center')}
_MAX_NAMES_IN_WARNING = 3


class SlimCheckpointError(ValueError):
  """The checkpoint does not fit the model; the message lists every offending variable.

  `summary` says it in one line (how many, the first of each kind, the hints), for
  command lines.
  """

  def __init__(self, message: str, summary: str | None = None):
    super().__init__(message)
    self.summary = summary or message.splitlines()[0]


def expected_variables(model: Any, image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE
                       ) -> dict[str, dict[tuple[str, ...], jax.ShapeDtypeStruct]]:
  """{'params' | 'batch_stats': {path: ShapeDtypeStruct}} that `model.init` creates.

  Traced abstractly (nothing is computed or allocated) on a (1, *image_shape) input. Variable
  shapes depend on the input's channels only, so the spatial size is just one that the model
  can downsample.
  """
  if not isinstance(getattr(model, 'slim_scope', None), str):  # a name had failed with "'str' object has no attribute"
    example = f'models.get_model({model!r}, num_classes=...)' if isinstance(model, str) else 'models.get_model(...)'
    raise TypeError(f'expected a model built by models.get_model, got {type(model).__name__} {model!r:.60}: pass '
                    f'{example}.')
  images = jax.ShapeDtypeStruct((1, *resnet_utils.check_image_shape(image_shape)), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  return {collection: names.flatten(shapes.get(collection, {})) for collection in (PARAMS, BATCH_STATS)}


def load_variables(path: str | os.PathLike, model: Any, *,
                   image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE,
                   verify: bool = True, moving_averages: bool = False,
                   allow_unused_layers: bool = False) -> dict[str, dict]:
  """Reads the variables of `model` from the TF checkpoint at `path`.

  Args:
    path: a checkpoint prefix (`dir/model.ckpt`), its `.index` file, or a directory with a
      `checkpoint` state file, as `tensor_bundle.CheckpointReader` accepts.
    model: a model from `models.get_model`; `model.slim_scope` is its slim scope name. Build it as
      the checkpoint was trained: `num_classes` (slim's v2 ImageNet checkpoints have 1001, class
      0 being background; v1 ones 1000), `batch_norm_scale`, `zero_debias_moving_mean`.
    image_shape: the (height, width, channels) the model is traced on to list its variables;
      only the channels matter.
    verify: check every tensor's crc32c while reading.
    moving_averages: read each variable's exponential moving average
      (`<name>/ExponentialMovingAverage`) where the checkpoint has one, as slim's
      `eval_image_classifier.py --moving_average_decay` restores a checkpoint of
      `train_image_classifier.py --moving_average_decay` (which averages every model variable:
      weights, gamma, beta, the moving statistics); every param of the model must have one.
    allow_unused_layers: load a part of the checkpoint's network on purpose (a backbone cut
      after block 3, as detection feature extractors are); by default the checkpoint's layers
      under the model's scope that the model lacks (a deeper network's units) are an error.

  Returns:
    `{'params': ..., 'batch_stats': ...}` as plain nested dicts of numpy arrays in the model's
    variable dtypes (float32, the zero-debias `local_step` included).

  Two gaps are filled rather than refused, both giving the function the checkpoint describes:
    * BatchNorm without `gamma` (slim's `batch_norm` defaults to `scale=False`) in a model that
      has it: gamma is set to ones, with a warning. A model built with
      `batch_norm_scale=False` loads such checkpoints as they are.
    * A `zero_debias_moving_mean` model and a checkpoint without the `moving_mean/biased` and
      `local_step` variables (e.g. saved from an eval graph, where TF never creates them):
      both are set to 0, exactly what TF does when those variables are freshly initialized
      next to a restored `moving_mean`. Evaluation uses `moving_mean` and is unaffected; the
      first train-mode update then restarts the debiased average, so `moving_mean` becomes
      that batch's mean and the checkpoint's moving mean is forgotten.

  Raises:
    SlimCheckpointError: variables of the model are missing from the checkpoint or have
      another shape (all of them listed, with a hint when the class count or the scope
      differs), the checkpoint has layers the model lacks (unless `allow_unused_layers`), or
      a BatchNorm `gamma` / `beta` that is not a no-op for a layer the model builds without it.
    ValueError, FileNotFoundError: from the reader, for a damaged, truncated or absent
      checkpoint; the message names the file.
  """
  return load_variables_and_step(path, model, image_shape=image_shape, verify=verify,
                                 moving_averages=moving_averages, allow_unused_layers=allow_unused_layers)[0]


def load_variables_and_step(path: str | os.PathLike, model: Any, *,
                            image_shape: tuple[int, ...] = DEFAULT_IMAGE_SHAPE, verify: bool = True,
                            moving_averages: bool = False, allow_unused_layers: bool = False
                            ) -> tuple[dict[str, dict], int]:
  """`load_variables` and the step the checkpoint was saved at (its `global_step`, 0 without
  one), from one opening of the checkpoint (a V1 file is read whole when opened)."""
  expected = expected_variables(model, image_shape)
  reader = tensor_bundle.CheckpointReader(path, verify=verify)
  source = _MovingAverages(reader, model.slim_scope, expected[PARAMS]) if moving_averages else reader
  return _read_variables(source, model, expected, allow_unused_layers), _global_step(reader)


class _MovingAverages:
  """A checkpoint reader that shows each variable that has an exponential moving average
  (`<name>/ExponentialMovingAverage`) as that average, and the others as they are."""

  def __init__(self, reader: Any, scope: str, params: Mapping[tuple[str, ...], Any]) -> None:
    self._reader, self.prefix = reader, reader.prefix
    found = reader.variables()
    self._source = {name: name + names.AVERAGE_SUFFIX if name + names.AVERAGE_SUFFIX in found else name
                    for name in found if not name.endswith(names.AVERAGE_SUFFIX)}
    averaged = [name for name, source in self._source.items() if source != name]
    if not averaged:
      raise SlimCheckpointError(
          f'checkpoint {reader.prefix} holds no moving averages (<name>{names.AVERAGE_SUFFIX}, which slim\'s '
          'train_image_classifier --moving_average_decay keeps): load its variables as they are '
          '(moving_averages=False; eval.py: --config.model_ema_decay=0; slim convert: leave out --moving_averages).')
    # slim averages every model variable: a param without one means another run's averages.
    bare = [name for name in (names.slim_name(scope, path) for path in params)
            if self._source.get(name) == name]
    if bare:
      raise SlimCheckpointError(
          f'checkpoint {reader.prefix} has moving averages for {len(averaged)} variable(s) but none for '
          f'{len(bare)} param(s) of the model, e.g. {bare[0]}: its averages are of other variables; load its '
          'variables as they are (eval.py: --config.model_ema_decay=0).')

  def variables(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """{name: (dtype, shape)} of what `read(name)` returns."""
    found = self._reader.variables()
    return {name: found[source] for name, source in self._source.items()}

  def read(self, name: str) -> np.ndarray:
    """The moving average of variable `name` where it has one, else the variable."""
    return self._reader.read(self._source.get(name, name))


def _read_variables(reader: Any, model: Any, expected: Mapping[str, Mapping[tuple[str, ...], Any]],
                    allow_unused_layers: bool = False) -> dict[str, dict]:
  """`load_variables` from an open reader, of the variables `expected_variables` lists."""
  scope = model.slim_scope
  found = reader.variables()
  plan, filled = _plan(expected, found, scope, reader, model, allow_unused_layers)

  out: dict[str, dict] = {PARAMS: {}, BATCH_STATS: {}}
  epsilon = batch_norm_epsilon(model)
  for collection, leaves in expected.items():
    for path, spec in leaves.items():
      name, leaf = plan[collection][path], path[-1]
      if name is None and leaf == 'gamma':
        value = np.ones(spec.shape, spec.dtype)
      elif name is None or (leaf in _RENORM_FROM_MOVING and name.endswith('/' + _RENORM_FROM_MOVING[leaf])):
        # Filled by the one rule the orbax path (pretrained.fit_variables) uses too.
        layer = {} if name is None else {_RENORM_FROM_MOVING[leaf]: reader.read(name)}
        value = absent_statistic(leaf, layer, spec.shape, epsilon)
      else:
        value = reader.read(name)
      out[collection][path] = value.astype(spec.dtype)
  if filled['gamma']:
    logging.warning('%s: %d BatchNorm layer(s) have no gamma in the checkpoint (slim batch_norm with '
                    'scale=False), e.g. %s; using gamma = 1, which computes the same function. Build '
                    'the model with batch_norm_scale=False to match the checkpoint exactly.',
                    reader.prefix, len(filled['gamma']), _some(filled['gamma']))
  if filled['debias']:
    logging.info('%s: no zero-debias or schedule state for %d BatchNorm layer(s), e.g. %s; starting it '
                 'at 0 as TF would.', reader.prefix, len(filled['debias']), _some(filled['debias']))
  if filled['renorm']:
    logging.info('%s: no renorm averages for %d BatchNorm layer(s), e.g. %s; starting them at the '
                 'moving statistics.', reader.prefix, len(filled['renorm']), _some(filled['renorm']))
  return {collection: names.unflatten(leaves) for collection, leaves in out.items()}


def _plan(expected, found, scope: str, reader, model, allow_unused_layers: bool) -> tuple[dict, dict]:
  """({collection: {path: slim name, or None to fill}}, {'gamma' | 'debias': [scopes]});
  raises SlimCheckpointError listing every problem."""
  plan: dict[str, dict] = {PARAMS: {}, BATCH_STATS: {}}
  filled: dict[str, list[str]] = {'gamma': [], 'debias': [], 'renorm': []}
  missing, misshaped, bad_dtype = [], [], []
  for collection, leaves in expected.items():
    for path, spec in leaves.items():
      name = names.slim_name(scope, path)
      module = '/'.join((scope, *path[:-1]))
      in_checkpoint = lambda leaf: names.slim_name(scope, path[:-1] + (leaf,)) in found
      group = next((g for g in _ZERO_START_GROUPS if path[-1] in g), None)
      if name not in found:
        if path[-1] == 'gamma' and in_checkpoint('moving_mean'):
          filled['gamma'].append(module)
          plan[collection][path] = None
        elif group is not None and not any(in_checkpoint(leaf) for leaf in group):
          if path[-1] == group[0]:
            filled['debias'].append(module)
          plan[collection][path] = None
        elif path[-1] in _RENORM_FROM_MOVING and in_checkpoint(_RENORM_FROM_MOVING[path[-1]]):
          if path[-1] == 'renorm_mean':
            filled['renorm'].append(module)
          plan[collection][path] = names.slim_name(scope, path[:-1] + (_RENORM_FROM_MOVING[path[-1]],))
        else:
          missing.append((name, spec.shape))
        continue
      dtype, shape = found[name]
      if tuple(shape) != tuple(spec.shape):
        misshaped.append((name, spec.shape, tuple(shape)))
      elif not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        bad_dtype.append((name, dtype))
      else:
        plan[collection][path] = name
  unexpected = _unexpected_bn_params(expected, found, scope, reader)
  extra_layers = [] if allow_unused_layers else _layers_not_in_model(expected, found, scope)
  if missing or misshaped or bad_dtype or unexpected or extra_layers:
    raise SlimCheckpointError(*_message_and_summary(reader.prefix, model, found, missing, misshaped, bad_dtype,
                                                    unexpected, extra_layers))
  return plan, filled


def _layers_not_in_model(expected, found, scope: str) -> list[str]:
  """The outermost scopes of layers with weights or statistics in the checkpoint under the
  model's scope that the model does not have, a deeper network's units: reading only the
  model's own would drop them and compute another function. A logits layer is left out of a
  model without one (features, or a new head)."""
  modules = {path[:-1] for leaves in expected.values() for path in leaves}
  has_head = any(module[:1] == (HEAD,) for module in modules)
  scopes = {module[:depth] for module in modules for depth in range(len(module) + 1)}
  extra = set()
  for name in found:
    where = names.flax_path(scope, name)  # None for optimizer slots, global_step, other scopes
    module = () if where is None else where[1][:-1]
    if where is None or module in modules or (module[:1] == (HEAD,) and not has_head):
      continue
    # The outermost scope the model lacks: a unit, not each of its layers.
    outermost = next((module[:depth] for depth in range(1, len(module) + 1) if module[:depth] not in scopes), ())
    extra.add('/'.join((scope, *outermost)))
  return sorted(extra)


def _unexpected_bn_params(expected, found, scope: str, reader) -> list[tuple[str, str]]:
  """(name, fix) for gamma / beta in the checkpoint that the model's BatchNorm lacks and that
  would change its output (gamma not all ones, beta not all zeros)."""
  out = []
  bn_modules = [path[:-1] for path in expected[BATCH_STATS] if path[-1] == 'moving_mean']
  for module in bn_modules:
    for leaf, (identity, field) in OPTIONAL_BN_PARAMS.items():
      name = names.slim_name(scope, module + (leaf,))
      if module + (leaf,) in expected[PARAMS] or name not in found:
        continue
      if not np.all(reader.read(name) == identity):
        out.append((name, f'batch_norm_{field}=True (config.bn.{field}=True)'))
  return out


def _message_and_summary(prefix: str, model: Any, found: Mapping[str, tuple], missing, misshaped, bad_dtype,
                         unexpected, extra_layers) -> tuple[str, str]:
  classes = getattr(model, 'num_classes', None)
  # A fine-tuning load that allowed a new head tried the model without its logits last: say so.
  header = (f'checkpoint {prefix} does not fit model {model.slim_scope!r} '
            f'{f"(num_classes={classes})" if classes else "without its logits layer"}:')
  groups = [  # (count and kind, one line per variable)
      (f'{len(missing)} variable(s) missing from the checkpoint',
       [f'{name}  (model shape {_shape(shape)})' for name, shape in missing]),
      (f'{len(misshaped)} variable(s) with another shape',
       [f'{name}  model {_shape(ours)}, checkpoint {_shape(theirs)}' for name, ours, theirs in misshaped]),
      (f'{len(bad_dtype)} variable(s) of a non-numeric dtype', [f'{name}  ({dtype})' for name, dtype in bad_dtype]),
      (f'{len(unexpected)} BatchNorm param(s) in the checkpoint that the model does not have (ignoring them '
       'would change the outputs)', [name for name, _ in unexpected]),
      (f'{len(extra_layers)} scope(s) of layers in the checkpoint that the model does not have (leaving them out '
       'would change the outputs)', extra_layers),
  ]
  groups = [(kind, lines) for kind, lines in groups if lines]
  hints = [f'hint: {hint}' for hint in _hints(model, found, missing, misshaped, unexpected, extra_layers)]
  message = [header]
  for kind, lines in groups:
    message += [f'  {kind}:', *(f'    {line}' for line in lines)]
  summary = header + ' ' + '; '.join(f'{kind}, e.g. {lines[0]}' for kind, lines in groups)
  return '\n'.join(message + hints), '; '.join([summary, *hints])


def _hints(model: Any, found, missing, misshaped, unexpected, extra_layers) -> list[str]:
  scope = model.slim_scope
  hints = []
  in_scope = [name for name in found if name.startswith(scope + '/')]
  if not in_scope:
    scopes = sorted({name.split('/', 1)[0] for name in found if '/' in name})
    hints.append(f'the checkpoint has no variable under {scope + "/"!r}; its variables are under '
                 f'{", ".join(repr(s) for s in scopes[:5]) or "no scope"}: build the model that '
                 "matches the checkpoint (models.get_model('<that scope>', ...); train.py / eval.py: "
                 '--config.model=<that scope>; slim convert: --model <that scope>)')
    return hints
  logits = names.slim_name(scope, ('logits', 'weights'))
  for name, ours, theirs in misshaped:
    if name == logits and len(ours) == len(theirs) and ours[:-1] == theirs[:-1]:
      classes = theirs[-1]
      hint = f'the checkpoint has {classes} classes, the model {ours[-1]}'
      if classes == ours[-1] + 1:
        hint += ": slim's ResNet v2 checkpoints include a background class 0"
      elif classes + 1 == ours[-1]:
        hint += ": slim's ResNet v1 checkpoints have no background class"
      hints.append(f'{hint}; use num_classes={classes} (--config.num_classes={classes} for train.py / eval.py, '
                   f'--num_classes {classes} for convert)')
  # A root block on one side only also changes what the first unit reads: that is not other image channels.
  other_input = (_root_block_hint(scope, getattr(model, 'include_root_block', True), found, missing)
                 or _image_channels_hint(scope, misshaped))
  if other_input:
    hints.append(other_input)
  if any(name == logits for name, _ in missing):
    hints.append('the checkpoint has no logits layer; load it into a num_classes=None model and '
                 "add a new logits layer's variables from model.init")
  for fix in sorted({fix for _, fix in unexpected}):
    hints.append(f'build the model with {fix} to use those params')
  if extra_layers and not other_input:
    hints.append('the checkpoint holds a deeper network (more units per block, or more blocks): build the model it '
                 "was saved from (models.get_model's name and block_sizes; train.py / eval.py: --config.model and "
                 '--config.model_options.block_sizes), or, to load a part of it on purpose (a truncated backbone), '
                 'pass allow_unused_layers=True')
  return hints


def _root_block_hint(scope: str, model_has_root: bool, found, missing) -> Optional[str]:
  """The hint for a checkpoint with a root block (the 7x7 conv1 and its pool) where the model has
  none, or the other way round; None otherwise."""
  root = f'{scope}/conv1/weights'
  if model_has_root and any(name == root for name, _ in missing):
    has, build = 'no root block (conv1 and its pool)', False
  elif not model_has_root and root in found:
    has, build = 'a root block (conv1 and its pool)', True
  else:
    return None
  return (f'the checkpoint has {has}, the model {"one" if model_has_root else "none"}: build the model with '
          f'include_root_block={build} (train.py / eval.py: --config.model_options.include_root_block={build})')


def _image_channels_hint(scope: str, misshaped) -> Optional[str]:
  """The hint for a checkpoint of images with other channels: a layer that reads the images (the
  root conv1, or the first unit's conv1 and shortcut without a root block) differing in its
  in-channels alone; None otherwise."""
  readers = (f'{scope}/conv1/weights', *(f'/block1/unit_1/bottleneck_v{version}/{layer}/weights'
                                          for version in (1, 2) for layer in ('conv1', 'shortcut')))
  for name, ours, theirs in misshaped:
    if (len(ours) == len(theirs) == 4 and ours[2] != theirs[2] and ours[:2] == theirs[:2] and ours[3] == theirs[3]
        and (name == readers[0] or name.endswith(readers[1:]))):
      return (f'the checkpoint takes {theirs[2]}-channel images, the model was built for {ours[2]}: convert with '
              f'--channels {theirs[2]} (train.py / eval.py: a data set of {theirs[2]}-channel images)')
  return None


def _shape(shape) -> str:
  return f'({", ".join(str(d) for d in shape)}{"," if len(shape) == 1 else ""})'


def _some(scopes: list[str]) -> str:
  more = len(scopes) - _MAX_NAMES_IN_WARNING
  return ', '.join(scopes[:_MAX_NAMES_IN_WARNING]) + (f' and {more} more' if more > 0 else '')
