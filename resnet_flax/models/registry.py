"""Model names -> constructors, with slim's arg-scope names as overrides."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from resnet_flax.layers import BatchNorm
from resnet_flax.layers.batch_norm import check_options as check_batch_norm_options
from resnet_flax.models import resnet_utils
from resnet_flax.models.arg_scope import ResNetArgScope
from resnet_flax.models.resnet_v1 import ResNetV1
from resnet_flax.models.resnet_v2 import ResNetV2

# (base_depth, num_units, stride) per block, as slim's resnet_v{1,2}_{50,...} define them.
_UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
_BASE_DEPTHS = (64, 128, 256, 512)
_STRIDES = (2, 2, 2, 1)
# Tiny variants for tests: every code path (subsample and projection shortcuts,
# strided last units, a stride-1 final block) at a fraction of the cost.
_TINY = ((4, 2, 2), (8, 2, 2), (16, 1, 1))
# For 8x8 digits: no 7x7/2 root (it would leave 2x2 pixels), three blocks 8 -> 4 -> 2.
_DIGITS = ((16, 2, 2), (32, 2, 2), (64, 2, 1))


def _full_size(depth: int) -> tuple[tuple[int, int, int], ...]:
  return tuple(zip(_BASE_DEPTHS, _UNITS[depth], _STRIDES))


def _is_block(block: Any) -> bool:
  return (isinstance(block, (tuple, list)) and len(block) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in block))


def _checked_block_sizes(blocks: Any) -> tuple[tuple[int, int, int], ...]:
  """`blocks` as int triples, or a one-line error saying what a block is."""
  triples = blocks if isinstance(blocks, (tuple, list)) else ()
  if not triples or not all(_is_block(block) for block in triples):
    raise ValueError(f'block_sizes={blocks!r}: give one or more blocks as ((base_depth, num_units, stride), ...) '
                     'of positive integers, e.g. ((8,1,2),(16,1,1)).')
  return tuple(tuple(block) for block in triples)


def _v1_depth_func(block_sizes, depth_multiplier: float, min_base_depth: int):
  """slim's `depth_func = max(int(d * depth_multiplier), min_base_depth)` for v1."""
  return tuple((max(int(d * depth_multiplier), min_base_depth), n, s) for d, n, s in block_sizes)


_REGISTRY: dict[str, tuple[type, tuple]] = {
    **{f'resnet_v1_{d}': (ResNetV1, _full_size(d)) for d in _UNITS},
    **{f'resnet_v2_{d}': (ResNetV2, _full_size(d)) for d in _UNITS},
    'resnet_v1_tiny': (ResNetV1, _TINY),
    'resnet_v2_tiny': (ResNetV2, _TINY),
    'resnet_v1_digits': (ResNetV1, _DIGITS),
    'resnet_v2_digits': (ResNetV2, _DIGITS),
}
# Defaults a variant changes from slim's (callers may still override them).
_VARIANT_DEFAULTS = {'resnet_v1_digits': {'include_root_block': False},
                     'resnet_v2_digits': {'include_root_block': False}}
_SMALL_VARIANTS = ('_tiny', '_digits')

# resnet_arg_scope's own argument names, mapped onto ResNetArgScope / BatchNorm fields.
_ARG_SCOPE_NAMES = {'activation_fn', 'use_batch_norm', 'dtype', 'fold_batch_norm_in_eval'}
_BATCH_NORM_ALIASES = {'batch_norm_decay': 'decay', 'batch_norm_epsilon': 'epsilon',
                       'batch_norm_scale': 'scale', 'batch_norm_center': 'center',
                       'batch_norm_fused': 'fused', 'zero_debias_moving_mean': 'zero_debias_moving_mean'}


def list_models() -> list[str]:
  """All registered model names."""
  return sorted(_REGISTRY)


def _batch_norm_fields() -> set[str]:
  # The ResNets are channels last throughout: their BatchNorm has no data_format to choose.
  return {f.name for f in dataclasses.fields(BatchNorm)} - {'parent', 'name', 'dtype', 'activation', 'data_format'}


def split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
  """Sorts keyword overrides into (arg scope, batch norm, model) keyword arguments.

  BatchNorm fields are accepted as `batch_norm_<field>` (slim's spelling for decay,
  epsilon, scale) or, for `zero_debias_moving_mean`, bare.
  """
  scope_kwargs, bn_kwargs, model_kwargs = {}, {}, {}
  bn_fields = _batch_norm_fields()
  for key, value in overrides.items():
    if key in _ARG_SCOPE_NAMES:
      scope_kwargs[key] = value
    elif key in _BATCH_NORM_ALIASES:
      bn_kwargs[_BATCH_NORM_ALIASES[key]] = value
    elif key.startswith('batch_norm_') and key[len('batch_norm_'):] in bn_fields:
      bn_kwargs[key[len('batch_norm_'):]] = value
    else:
      model_kwargs[key] = value
  return scope_kwargs, bn_kwargs, model_kwargs


def _check_types(name: str, num_classes: Any, targets: tuple) -> None:
  """Refuses what would be silently misread: a switch that is not a bool ('False' is truthy),
  a class count that is not a positive int (0 and None alike give slim's logit-less features)."""
  if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                  or num_classes < 1):
    raise ValueError(f'get_model({name!r}): num_classes={num_classes!r} must be a positive int, or None for the '
                     'pooled features without a logits layer.')
  for module, given in targets:
    switches = {field.name for field in dataclasses.fields(module) if isinstance(field.default, bool)}
    for field, value in given.items():
      if field in switches and not isinstance(value, (bool, np.bool_)):
        owner = 'the BatchNorm field ' if module is BatchNorm else ''
        raise TypeError(f'get_model({name!r}): {owner}{field}={value!r} must be True or False (a string or number '
                        'would be read by its truthiness).')


def _scaled_depths(name: str, block_sizes: tuple, depth_multiplier: Any, min_base_depth: Any) -> tuple:
  """`block_sizes` with slim's `depth_func` applied, refusing a depth_multiplier or min_base_depth
  that is no number ('0.25' had been repeated by `d * depth_multiplier` into a width int() could
  not read) and a scaling that leaves a block of no width (slim takes min_base_depth=0)."""
  for argument, value, kind, what in (('depth_multiplier', depth_multiplier, numbers.Real, 'a number'),
                                      ('min_base_depth', min_base_depth, numbers.Integral, 'a whole number')):
    if isinstance(value, bool) or not isinstance(value, kind):
      raise TypeError(f'get_model({name!r}): {argument}={value!r} must be {what}.')
  if not depth_multiplier > 0:
    raise ValueError(f"get_model({name!r}): depth_multiplier={depth_multiplier!r} must be > 0 (it scales each block's "
                     'base depth).')
  scaled = _v1_depth_func(block_sizes, depth_multiplier, min_base_depth)
  if min(depth for depth, _, _ in scaled) < 1:
    raise ValueError(f'get_model({name!r}): depth_multiplier={depth_multiplier!r} with min_base_depth='
                     f'{min_base_depth!r} gives base depths {[depth for depth, _, _ in scaled]}, some of no width; '
                     'raise min_base_depth to at least 1.')
  return scaled


def _check_values(name: str, scope_kwargs: dict, model_kwargs: dict) -> None:
  """Refuses an output stride or activation a model would fail on deep inside JAX."""
  output_stride = model_kwargs.get('output_stride')
  if output_stride is not None and (isinstance(output_stride, bool) or not isinstance(output_stride, numbers.Integral)
                                    or output_stride < 1):
    raise ValueError(f'get_model({name!r}): output_stride={output_stride!r} must be a positive int, or None for the '
                     "network's own stride.")
  dtype = scope_kwargs.get('dtype')
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):  # it had failed at apply, in a layer
    raise TypeError(f'get_model({name!r}): dtype={dtype!r} must be a float type (jnp.float32, jnp.bfloat16, '
                    'jnp.float16), or None for float32.')
  activation_fn = scope_kwargs.get('activation_fn')
  if activation_fn is not None and not callable(activation_fn):  # None: slim's convolutions without one
    raise TypeError(f'get_model({name!r}): activation_fn={activation_fn!r} must be a function, e.g. nn.relu, or '
                    'None.')


def get_model(name: str, num_classes: Optional[int] = None, **overrides: Any) -> nn.Module:
  """Builds a registered ResNet, e.g. `get_model('resnet_v1_50', num_classes=1000)`.

  Overrides use resnet_arg_scope's names (`batch_norm_decay`, `batch_norm_epsilon`,
  `batch_norm_scale`, `activation_fn`, `use_batch_norm`; its `weight_decay` is the loss's:
  `losses.slim_l2_regularization`),
  `zero_debias_moving_mean`, `batch_norm_<field>` for any other BatchNorm field,
  `dtype`, `fold_batch_norm_in_eval` (`ResNetArgScope`), and the model's own arguments (`global_pool`, `output_stride`,
  `spatial_squeeze`, `include_root_block`, ...; v1 also `depth_multiplier`,
  `min_base_depth`, `use_bounded_activations`, `store_non_strided_activations`), and
  `block_sizes`, ((base_depth, num_units, stride), ...) per block as slim's
  `resnet_v1_block`, used as given instead of the named model's blocks.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; choose one of: {", ".join(list_models())}.')
  if 'weight_decay' in overrides:  # resnet_arg_scope's argument, which a model field here could not apply
    raise TypeError(f'get_model({name!r}): weight_decay is not a model argument; slim\'s L2 on conv weights is a '
                    'term of the loss: add losses.slim_l2_regularization(params, weight_decay) to it '
                    '(config.weight_decay in train.py).')
  cls, block_sizes = _REGISTRY[name]
  scope_kwargs, bn_kwargs, model_kwargs = split_overrides({**_VARIANT_DEFAULTS.get(name, {}), **overrides})
  custom_blocks = model_kwargs.pop('block_sizes', None)
  if custom_blocks is not None and {'depth_multiplier', 'min_base_depth'} & set(model_kwargs):
    raise ValueError(f'{name}: block_sizes are used as given; scale their base depths instead of passing '
                     'depth_multiplier or min_base_depth with them.')
  if custom_blocks is not None:
    block_sizes = _checked_block_sizes(custom_blocks)
  elif name.endswith(_SMALL_VARIANTS) and {'depth_multiplier', 'min_base_depth'} & set(model_kwargs):
    raise ValueError(f"{name}: depth_multiplier and min_base_depth scale the full-size v1 models' depths (slim's "
                     "resnet_v1_50 & co.); a small variant's are chosen with block_sizes=((base_depth, num_units, "
                     'stride), ...).')
  elif cls is ResNetV1 and not name.endswith(_SMALL_VARIANTS):
    # slim applies depth_func in resnet_v1_50 & co., not to custom blocks.
    depth_multiplier = model_kwargs.pop('depth_multiplier', 1.0)
    min_base_depth = model_kwargs.pop('min_base_depth', 8)
    block_sizes = _scaled_depths(name, block_sizes, depth_multiplier, min_base_depth)
  # False is accepted for v2 so one config can switch between v1 and v2.
  if cls is ResNetV2 and model_kwargs.pop('zero_init_last_gamma', False):
    raise ValueError(f'{name}: v2 units end in conv3 without BatchNorm, so there is no last gamma to zero; '
                     'zero_init_last_gamma applies to resnet_v1 models.')
  valid = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name', 'slim_scope', 'arg_scope', 'num_classes'}
  if 'batch_norm_data_format' in model_kwargs:
    raise TypeError(f"get_model({name!r}): the ResNets are channels last throughout (NHWC); BatchNorm's data_format "
                    'is for the layer used alone: leave batch_norm_data_format out.')
  unknown = sorted(set(model_kwargs) - valid)
  if unknown:
    raise TypeError(f'get_model({name!r}): unknown argument(s) {unknown}; valid: '
                    f'{sorted(valid | _ARG_SCOPE_NAMES | set(_BATCH_NORM_ALIASES))} '
                    'or batch_norm_<BatchNorm field>.')
  _check_types(name, num_classes, ((BatchNorm, bn_kwargs), (ResNetArgScope, scope_kwargs), (cls, model_kwargs)))
  _check_values(name, scope_kwargs, model_kwargs)
  batch_norm = FrozenDict({**ResNetArgScope().batch_norm, **bn_kwargs})
  # The layers and the model check these again when called; here they are named at get_model.
  check_batch_norm_options(f'get_model({name!r}): batch_norm_', batch_norm)
  resnet_utils.root_output_stride(model_kwargs.get('output_stride'), model_kwargs.get('include_root_block', True),
                                  block_sizes, name)
  arg_scope = ResNetArgScope(batch_norm=batch_norm, **scope_kwargs)
  if model_kwargs.get('zero_init_last_gamma') and not (arg_scope.use_batch_norm and batch_norm['scale']):
    # The gamma initializer would reach no gamma: each unit would start as itself, not its shortcut.
    raise ValueError(f'get_model({name!r}): zero_init_last_gamma=True needs a gamma to start at zero, but the model '
                     'has ' + ('no BatchNorm (use_batch_norm=False)' if not arg_scope.use_batch_norm else
                               'batch_norm_scale=False') + '; leave zero_init_last_gamma out or turn them on.')
  return cls(block_sizes=block_sizes, num_classes=num_classes, slim_scope=name, arg_scope=arg_scope,
             **model_kwargs)

