"""resnet_arg_scope: the defaults slim binds to conv2d and batch_norm inside ResNets."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from resnet_flax.layers import BatchNorm, Conv2D


@dataclasses.dataclass(frozen=True)
class ResNetArgScope:
  """What slim's `resnet_arg_scope(...)` sets, as a value a model carries.

  `batch_norm` holds BatchNorm fields (decay, epsilon, scale, zero_debias_moving_mean,
  fused, ...). slim's `weight_decay` is not here: its L2 regularizer is a term of the loss,
  `losses.slim_l2_regularization(params, weight_decay)` (`config.weight_decay`), one place
  for it rather than a model field the loss could disagree with. `fold_batch_norm_in_eval`
  (not slim's) folds each conv's BatchNorm into it in eval mode (`Conv2D`); v2's `preact`
  and `postnorm`, which follow no convolution, stay as they are.
  """
  batch_norm: FrozenDict = FrozenDict(decay=0.997, epsilon=1e-5, scale=True)
  activation_fn: Callable = nn.relu
  use_batch_norm: bool = True
  dtype: Any = jnp.float32
  fold_batch_norm_in_eval: bool = False

  def make_batch_norm(self, **overrides: Any) -> BatchNorm:
    """slim.batch_norm under this scope (for v2's `preact` and `postnorm`)."""
    return BatchNorm(**{**self.batch_norm, 'dtype': self.dtype, **overrides})

  def conv2d(self, **batch_norm_overrides: Any) -> Callable[..., nn.Module]:
    """slim.conv2d under this scope: BN (with these field overrides) or biases, and the scope's activation."""
    normalizer: Optional[Callable[..., nn.Module]] = (
        functools.partial(BatchNorm, **{**self.batch_norm, **batch_norm_overrides}) if self.use_batch_norm else None)
    return _Conv2DFactory(normalizer, self.activation_fn, self.dtype, self.fold_batch_norm_in_eval)


@dataclasses.dataclass(frozen=True)
class _Conv2DFactory:
  """Builds Conv2D with the scope's defaults; keyword arguments override them as in slim."""
  normalizer: Optional[Callable[..., nn.Module]]
  activation: Optional[Callable]
  dtype: Any
  fold_batch_norm_in_eval: bool = False

  def __call__(self, features: int, kernel_size: int, **kwargs) -> Conv2D:
    kwargs.setdefault('normalizer', self.normalizer)
    kwargs.setdefault('activation', self.activation)
    return Conv2D(features, kernel_size, dtype=self.dtype, fold_batch_norm_in_eval=self.fold_batch_norm_in_eval,
                  **kwargs)
