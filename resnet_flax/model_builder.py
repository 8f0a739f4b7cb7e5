"""From a config to a model: the one place config fields become model arguments."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from resnet_flax import models

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """`models.get_model(config.model, ...)` with `config.bn`, weight decay, dtype and model options."""
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype={config.dtype!r} is unknown; use one of {sorted(DTYPES)}.')
  overrides = {f'batch_norm_{field}': value for field, value in config.bn.items()}
  # None means "the model's own default" (e.g. no root block for the digits variants).
  overrides.update({key: value for key, value in config.model_options.items() if value is not None})
  return models.get_model(config.model, num_classes=num_classes, weight_decay=config.weight_decay,
                          dtype=DTYPES[config.dtype], **overrides)
