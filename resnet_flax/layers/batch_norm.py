"""Batch normalization with TF-Slim's semantics and an explicit train/eval mode."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_flax.layers import moving_averages

Array = jnp.ndarray

# The collection that holds moving statistics; callers update it only by asking for it
# with `mutable=[BATCH_STATS]` and storing what comes back.
BATCH_STATS = 'batch_stats'


def batch_moments(x: Array, reduction_axes: tuple[int, ...]) -> tuple[Array, Array]:
  """Mean and biased variance over `reduction_axes`, always in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=reduction_axes)
  # Two passes (mean of squared deviations) rather than E[x^2] - E[x]^2: the latter
  # cancels catastrophically when |mean| >> std, which pre-activation ResNets hit.
  centered = x32 - jnp.expand_dims(mean, reduction_axes)
  variance = jnp.mean(jnp.square(centered), axis=reduction_axes)
  return mean, variance


def ghost_batches(x: Array, ghost_batch_size: Optional[int], name: str) -> Array:
  """`x` as (groups, ghost_batch_size, ...); one group when `ghost_batch_size` is None."""
  if ghost_batch_size is None or ghost_batch_size == x.shape[0]:
    return x[None]
  if ghost_batch_size <= 0 or x.shape[0] % ghost_batch_size:
    raise ValueError(f'BatchNorm {name!r}: batch of {x.shape[0]} does not split into ghost batches of '
                     f'{ghost_batch_size}; use a ghost_batch_size that divides the per-device batch.')
  return x.reshape(x.shape[0] // ghost_batch_size, ghost_batch_size, *x.shape[1:])


def values_per_channel(shape: tuple[int, ...], reduction_axes: tuple[int, ...]) -> int:
  """Number of elements each channel's statistics are computed from."""
  return math.prod(shape[axis] for axis in reduction_axes)


def check_batch_statistics_possible(shape: tuple[int, ...], reduction_axes: tuple[int, ...], name: str) -> None:
  """Raises if train-mode statistics would come from a single value per channel."""
  if values_per_channel(shape, reduction_axes) < 2:
    raise ValueError(
        f'BatchNorm {name!r} in train mode got one value per channel (input shape {shape}): '
        'batch statistics would set every output to beta and the variance estimate is undefined. '
        'Use a batch of at least 2 (or more examples per ghost batch), or freeze the statistics '
        '(evaluate with train=False) for this step.')


class BatchNorm(nn.Module):
  """TF-Slim's `batch_norm`, with the mode a required argument.

  Defaults are those of a bare `slim.batch_norm` (decay 0.999, epsilon 1e-3,
  center True, scale False); the ResNets bind `resnet_arg_scope`'s instead.

  Attributes:
    decay: moving-average decay; `moving -= (1 - decay) * (moving - batch_value)`.
    epsilon: added to the variance before the reciprocal square root.
    center: learn `beta`.
    scale: learn `gamma` (slim's default is False: many checkpoints have no gamma).
    zero_debias_moving_mean: keep TF's `biased` and `local_step` state and store
      `biased / (1 - decay ** step)` as the moving mean.
    fused: match TF-Slim's fused code path (taken for 4-D inputs), which feeds the
      unbiased batch variance (times n / (n - 1)) to the moving variance; False
      matches the non-fused path, which feeds the biased one. Both normalize with
      the biased variance.
    frozen: train mode normalizes with the moving statistics and never updates them
      (fine-tuning at small batch); gamma and beta still get gradients.
    ghost_batch_size: train-mode statistics per group of this many examples (ghost /
      virtual batches, as TF's `virtual_batch_size`); the moving averages take the mean
      over groups of the group mean and variance. None: the whole batch.
    activation: applied to the output, as slim's `activation_fn`.
    dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
  """
  decay: float = 0.999
  epsilon: float = 0.001
  center: bool = True
  scale: bool = False
  zero_debias_moving_mean: bool = False
  fused: bool = True
  frozen: bool = False
  ghost_batch_size: Optional[int] = None
  activation: Optional[Callable[[Array], Array]] = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    reduction_axes = tuple(range(x.ndim - 1))
    channels = x.shape[-1]
    beta = self.param('beta', nn.initializers.zeros, (channels,), jnp.float32) if self.center else None
    gamma = self.param('gamma', nn.initializers.ones, (channels,), jnp.float32) if self.scale else None
    moving_mean = self.variable(BATCH_STATS, 'moving_mean', jnp.zeros, (channels,), jnp.float32)
    moving_variance = self.variable(BATCH_STATS, 'moving_variance', jnp.ones, (channels,), jnp.float32)
    if self.zero_debias_moving_mean:
      biased = self.variable(BATCH_STATS, 'moving_mean_biased', jnp.zeros, (channels,), jnp.float32)
      local_step = self.variable(BATCH_STATS, 'moving_mean_local_step', jnp.zeros, (), jnp.float32)

    if train and not self.frozen:
      groups = ghost_batches(x, self.ghost_batch_size, module_path(self))
      group_axes = tuple(range(1, groups.ndim - 1))
      check_batch_statistics_possible(groups.shape[1:], tuple(a - 1 for a in group_axes), module_path(self))
      # One (mean, variance) per ghost batch; shape (groups, 1, ..., 1, C) so they broadcast.
      mean, variance = batch_moments(groups, group_axes)
      mean, variance = (jnp.expand_dims(v, group_axes) for v in (mean, variance))
      if not self.is_initializing():
        self._require_mutable_stats()
        n = values_per_channel(groups.shape[1:], tuple(a - 1 for a in group_axes))
        variance_for_average = variance * (n / (n - 1)) if self.fused else variance
        batch_mean = jnp.mean(mean, axis=tuple(range(mean.ndim - 1)))
        batch_variance = jnp.mean(variance_for_average, axis=tuple(range(mean.ndim - 1)))
        moving_variance.value = moving_averages.ema_update(moving_variance.value, batch_variance, self.decay)
        if self.zero_debias_moving_mean:
          biased.value, local_step.value, moving_mean.value = moving_averages.zero_debiased_update(
              biased.value, local_step.value, batch_mean, self.decay)
        else:
          moving_mean.value = moving_averages.ema_update(moving_mean.value, batch_mean, self.decay)
      y = normalize(groups, mean, variance, gamma, beta, self.epsilon).reshape(x.shape)
    else:
      y = normalize(x, moving_mean.value, moving_variance.value, gamma, beta, self.epsilon)
    if self.activation is not None:
      y = self.activation(y)
    return y.astype(self.dtype or x.dtype)

  def _require_mutable_stats(self) -> None:
    if not self.is_mutable_collection(BATCH_STATS):
      raise ValueError(
          f'BatchNorm {module_path(self)!r} is in train mode but {BATCH_STATS!r} is immutable, so the moving '
          f'statistics would silently never update: call apply(..., train=True, mutable=[{BATCH_STATS!r}]) '
          'and keep the returned statistics, or use train=False.')


def module_path(module: nn.Module) -> str:
  """The module's slash-separated path in the variable tree (its slim scope)."""
  return '/'.join(module.scope.path) if module.scope is not None else str(module.name)


def normalize(x: Array, mean: Array, variance: Array, gamma: Optional[Array], beta: Optional[Array],
              epsilon: float) -> Array:
  """`(x - mean) / sqrt(variance + epsilon) * gamma + beta`, computed in float32."""
  inv = jax.lax.rsqrt(variance + epsilon)
  if gamma is not None:
    inv = inv * gamma
  y = (x.astype(jnp.float32) - mean) * inv
  if beta is not None:
    y = y + beta
  return y
