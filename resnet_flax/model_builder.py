"""From a config to a model: the one place config fields become model arguments."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from resnet_flax import models
from resnet_flax.models import resnet_utils

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
CROSS_DEVICE = ('global', 'per_device')
# config.bn fields that are not BatchNorm fields: how statistics are grouped, and model options.
_NOT_LAYER_FIELDS = ('cross_device', 'ghost_batch_size', 'zero_init_last_gamma', 'fold_in_eval')


def statistics_group_size(bn: ml_collections.ConfigDict, batch_size: int, device_count: int) -> Optional[int]:
  """Examples per train-mode statistics group, as BatchNorm's `ghost_batch_size`.

  'global': statistics over the global batch (under jit a mean over a batch-sharded
  array is already synchronized BN), or per ghost batch. 'per_device': over each
  device's share, as unsynchronized data parallelism computes them; the batch is
  laid out device by device, so groups of the per-device size are exactly the
  shards. Ghost batches, if set, then subdivide each device's share.
  """
  if bn.cross_device not in CROSS_DEVICE:
    raise ValueError(f'config.bn.cross_device={bn.cross_device!r} is unknown; use one of {CROSS_DEVICE}.')
  if bn.cross_device == 'global':
    if bn.ghost_batch_size is not None and batch_size % bn.ghost_batch_size:
      # Named here, before anything is traced, rather than by the first BatchNorm layer.
      raise ValueError(f'config.bn.ghost_batch_size={bn.ghost_batch_size} does not divide config.batch_size='
                       f'{batch_size}; use a divisor of it.')
    return bn.ghost_batch_size
  per_device = batch_size // device_count
  if bn.ghost_batch_size is None:
    return per_device
  if per_device % bn.ghost_batch_size:
    raise ValueError(f'config.bn.ghost_batch_size={bn.ghost_batch_size} does not divide the per-device batch of '
                     f'{per_device} (batch_size {batch_size} over {device_count} devices); use a divisor of it.')
  return bn.ghost_batch_size


def examples_per_group(bn: ml_collections.ConfigDict, batch_size: int, device_count: int) -> int:
  """Examples per train-mode statistics group: `statistics_group_size`'s, or the whole batch."""
  return statistics_group_size(bn, batch_size, device_count) or batch_size


def head_size(config: ml_collections.ConfigDict, data_num_classes: int) -> int:
  """The number of logits: `config.num_classes`, or the data set's when unset.

  More than the data's is fine (slim's 1001 with a background class); fewer would leave
  labels without a logit, which the loss and accuracy would not notice.
  """
  if config.num_classes is None:
    return data_num_classes
  if config.num_classes < data_num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} but the data has {data_num_classes} classes, so '
                     f'labels {config.num_classes}..{data_num_classes - 1} would have no logit; unset it or set it '
                     f'to at least {data_num_classes}.')
  return config.num_classes


def check_statistics_groups(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Raises, naming the setting, if training would compute BN statistics from single examples.

  With one example per statistics group, each example is normalized by its own spatial
  mean and variance and the moving variance averages those: not batch norm, and not
  what eval will use. Frozen statistics never use the batch's.
  """
  if config.bn.frozen:
    return
  setting = single_example_groups(config, device_count)
  if setting is not None:
    raise ValueError(f'{setting} leaves one example per BatchNorm statistics group in training; use at least 2 '
                     'examples per group, or config.bn.frozen=True to train with the moving statistics.')


def single_example_groups(config: ml_collections.ConfigDict, device_count: int) -> Optional[str]:
  """The setting that leaves one example per train-mode statistics group, as 'config.<field>=<value>',
  or None where the groups hold two or more."""
  if examples_per_group(config.bn, config.batch_size, device_count) >= 2:
    return None
  if config.bn.ghost_batch_size is not None:
    return f'config.bn.ghost_batch_size={config.bn.ghost_batch_size}'
  if config.bn.cross_device == 'per_device':
    return f"config.batch_size={config.batch_size} over {device_count} devices with cross_device='per_device'"
  return f'config.batch_size={config.batch_size}'


def build_model(config: ml_collections.ConfigDict, num_classes: int, device_count: Optional[int] = None, *,
                statistics_groups: bool = True) -> nn.Module:
  """`models.get_model(config.model, ...)` with `config.bn`, dtype and model options (slim's weight
  decay is the loss's, `config.weight_decay`).

  `device_count` (default: all devices) matters only for `config.bn.cross_device='per_device'`.
  Without `statistics_groups` the model's train-mode statistics are not grouped (ghost batches,
  per-device shares): a model for eval mode, which reads no batch statistics, so any batch size
  and device count evaluate it.
  """
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype={config.dtype!r} is unknown; use one of {sorted(DTYPES)}.')
  if config.bn.zero_init_last_gamma and not config.bn.scale:
    raise ValueError('config.bn.zero_init_last_gamma=True needs config.bn.scale=True: without scale there is no '
                     'gamma to start at zero.')
  overrides = {f'batch_norm_{field}': value for field, value in config.bn.items() if field not in _NOT_LAYER_FIELDS}
  if statistics_groups:
    overrides['batch_norm_ghost_batch_size'] = statistics_group_size(config.bn, config.batch_size,
                                                                     device_count or jax.device_count())
  overrides['zero_init_last_gamma'] = config.bn.zero_init_last_gamma
  overrides['fold_batch_norm_in_eval'] = config.bn.fold_in_eval
  # None means "the model's own default" (e.g. no root block for the digits variants).
  overrides.update({key: value for key, value in config.model_options.items() if value is not None})
  # Given once the config's own check has passed: get_model's message would name no config field.
  output_stride = overrides.pop('output_stride', None)
  model = models.get_model(config.model, num_classes=num_classes, dtype=DTYPES[config.dtype], **overrides)
  _check_for_classification(model, output_stride)
  if output_stride is None:
    return model
  return models.get_model(config.model, num_classes=num_classes, dtype=DTYPES[config.dtype],
                          output_stride=output_stride, **overrides)


def reachable_output_strides(model: nn.Module) -> list[int]:
  """The `output_stride` values `model`'s root and block strides allow."""
  return resnet_utils.reachable_output_strides(model.block_sizes, model.include_root_block)


# Model options whose False gives logits other than (batch, classes), which training and
# evaluation need: option -> (the logits it gives, what builds such a model).
_CLASSIFICATION_OPTIONS = {
    'global_pool': ('logits per spatial position', 'dense prediction: models.get_model'),
    'spatial_squeeze': ('logits of shape (batch, 1, 1, classes)', "tf_slim 1.1.0's unsqueezed logits: "
                        'models.get_model'),
}


def check_classification_options(options: Mapping[str, Any]) -> None:
  """Refuses `options` (config.model_options; None keeps the model's default, True) training and
  evaluation cannot use; `config_checks.check_config` runs it before anything is built."""
  for option, (gives, elsewhere) in _CLASSIFICATION_OPTIONS.items():
    if options.get(option) is not None and not options.get(option):
      raise ValueError(f'config.model_options.{option}=False gives {gives}; training and evaluation need logits of '
                       f'shape (batch, classes): keep it True ({elsewhere}).')


def _check_for_classification(model: nn.Module, output_stride: Optional[int]) -> None:
  """Model options training and eval cannot use, named before anything is traced, `output_stride`
  among them (`model` is built without it)."""
  check_classification_options({option: getattr(model, option) for option in _CLASSIFICATION_OPTIONS})
  reachable = reachable_output_strides(model)
  if output_stride is not None and output_stride not in reachable:
    raise ValueError(f'config.model_options.output_stride={output_stride} cannot be reached by '
                     f'{model.slim_scope}; use one of {reachable} or None.')
