"""Batch mean and variance in float32, exact to rounding however far the mean is from zero.

Two algorithms, equal to rounding, because the cheaper one depends on the compiler.
XLA:CPU's library reductions cannot take a subtraction in, so `shifted_moments`' shifted
values are written out and read back (~5 % of a ResNet-50 train step on CPU), while the
centred values `centred_moments` reduces are the ones the normalization writes anyway.
XLA:GPU and XLA:TPU are expected to fuse the shift into one reduction pass over `x`, where
`centred_moments` reads `x` once more; the GPU benchmark's forced-algorithm BN cases check
that. Plain E[x^2] - E[x]^2, the cheapest everywhere, cancels catastrophically when
|mean| >> std. `batch_moments`, which picks one, is differentiated by hand
(`hand_differentiated`): the derivative of the exact mean and variance, whichever computed them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def values_per_channel(shape: tuple[int, ...], reduction_axes: tuple[int, ...]) -> int:
  """Number of elements each channel's statistics are computed from."""
  return math.prod(shape[axis] for axis in reduction_axes)


def hand_differentiated(moments: Callable[[Array, tuple[int, ...]], tuple[Array, Array]]
                        ) -> Callable[[Array, tuple[int, ...]], tuple[Array, Array]]:
  """`moments` (x, reduction_axes) -> (mean, variance), with the derivative of the exact mean
  and variance given by hand (`_moments_jvp`) instead of traced through `moments`."""
  differentiated = jax.custom_jvp(moments, nondiff_argnums=(1,))
  differentiated.defjvp(functools.partial(_moments_jvp, moments))
  return differentiated


def _moments_jvp(moments: Callable[[Array, tuple[int, ...]], tuple[Array, Array]], reduction_axes: tuple[int, ...],
                 primals: tuple[Array], tangents: tuple[Array]) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
  """d mean = E[dx], d variance = 2 (E[d dx] - E[d] E[dx]) with d = x - mean: the variance about
  the exact mean, as the algorithms compute it. E[d] is the float32 mean's own rounding error;
  left out, it put an error of ~6e-8 |mean| / std into the gradient (5e-3 at 5e4)."""
  (x,), (dx,) = primals, tangents
  mean, variance = moments(x, reduction_axes)
  dx32 = dx.astype(jnp.float32)
  deviations = x.astype(jnp.float32) - jnp.expand_dims(mean, reduction_axes)
  mean_tangent = jnp.mean(dx32, axis=reduction_axes)
  variance_tangent = 2.0 * (jnp.mean(deviations * dx32, axis=reduction_axes)
                            - jnp.mean(deviations, axis=reduction_axes) * mean_tangent)
  return (mean, variance), (mean_tangent, variance_tangent)


def _platform_moments(x: Array, reduction_axes: tuple[int, ...]) -> tuple[Array, Array]:
  """Mean and biased variance over `reduction_axes` (the batch axis, then the spatial ones),
  always in float32: `centred_moments` on CPU, else `shifted_moments`.

  Picked for the platform a function is lowered for (`jax.lax.platform_dependent`; an
  export for several platforms defers it to compilation), not by a Python check of the
  default backend; both are traced, one is compiled. Differentiated by hand
  (`batch_moments`): differentiating through the switch linearized both algorithms, two
  thirds of the time to trace a ResNet-50 train step.
  """
  axes = tuple(reduction_axes)  # hashable, for the cache below
  return jax.lax.platform_dependent(x, cpu=_algorithm_over(centred_moments, axes),
                                    default=_algorithm_over(shifted_moments, axes))


@functools.lru_cache(maxsize=None)  # a few entries: one per algorithm and reduction_axes
def _algorithm_over(algorithm: Callable[..., tuple[Array, Array]], reduction_axes: tuple[int, ...]
                    ) -> Callable[[Array], tuple[Array, Array]]:
  """`algorithm` over `reduction_axes`, the same callable each time: JAX reuses a switch
  branch's trace for the same callable and input shape, so the BatchNorms of a shape trace
  the algorithms once (a quarter of a ResNet-50 train step's trace time)."""
  return functools.partial(algorithm, reduction_axes=reduction_axes)


batch_moments = hand_differentiated(_platform_moments)


def centred_moments(x: Array, reduction_axes: tuple[int, ...]) -> tuple[Array, Array]:
  """The mean, then the mean square of the deviations from it less their own mean squared:
  two reads of `x` (the corrected two-pass algorithm, Chan, Golub and LeVeque 1983).

  Without the correction, the float32 mean's few ulps of rounding would add (ulps / std)^2
  to the variance: 3e-5 of it at |mean| / std = 3e4. The mean returned keeps those ulps
  (0.02 std at |mean| / std = 5e4): adding the deviations' mean to it would make the
  normalization's `x - mean` differ from the deviations, one more full-size buffer on CPU.
  """
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=reduction_axes, keepdims=True)
  # The variance below does not change with `mean` (its derivative, -2 * residual + 2 * residual,
  # is zero), so cutting the gradient there changes none and saves a full-size backward reduction.
  deviations = x32 - jax.lax.stop_gradient(mean)
  residual = jnp.mean(deviations, axis=reduction_axes)
  variance = jnp.maximum(jnp.mean(jnp.square(deviations), axis=reduction_axes) - jnp.square(residual), 0.0)
  return jnp.squeeze(mean, reduction_axes), variance


def shifted_moments(x: Array, reduction_axes: tuple[int, ...]) -> tuple[Array, Array]:
  """Mean and variance from one read of `x`.

  Per example, the sums of `x - s` and `(x - s) ** 2` about `s`, the example's first
  value of each channel, read `x` once together and lose about (mean - s)^2 / variance
  ulps of the sums, with `s` a sample of the same values; the per-example means and
  squared deviations then combine exactly (law of total variance) over the small (batch,
  channels) arrays. The shift never slices the batch axis, which may be split over devices.
  """
  x32 = x.astype(jnp.float32)
  batch_axis, within_axes = reduction_axes[0], reduction_axes[1:]
  # The first value, not a central one: with XLA's optimizations off (JAX_DISABLE_MOST_
  # OPTIMIZATIONS, as the tests run), an offset slice of a batch-sharded input gave wrong
  # gradients elsewhere in the model on 8 devices (jax 0.10.2, CPU).
  first = tuple(slice(0, 1) if axis in within_axes else slice(None) for axis in range(x.ndim))
  shift = jax.lax.stop_gradient(x32[first])  # A constant: the gradient is the variance's own.
  shifted = x32 - shift
  per_example = values_per_channel(x.shape, within_axes)
  sums = jnp.sum(shifted, axis=within_axes, keepdims=True)
  squares = jnp.sum(jnp.square(shifted), axis=within_axes, keepdims=True)
  example_deviations = jnp.maximum(squares - jnp.square(sums) / per_example, 0.0)  # per_example * variance
  # Example means are taken relative to the mean shift, never added up: at a mean of 1e4,
  # float32 would keep only ~1e-3 of the offsets that make up the variance between
  # examples. `centred` has a mean of about the mean shift's rounding error, so its
  # mean square minus that mean squared is exact.
  mean_shift = jnp.mean(shift, axis=batch_axis, keepdims=True)
  centred = (shift - mean_shift) + sums / per_example
  centred_mean = jnp.mean(centred, axis=batch_axis, keepdims=True)
  between = jnp.mean(jnp.square(centred), axis=batch_axis, keepdims=True) - jnp.square(centred_mean)
  variance = jnp.mean(example_deviations, axis=batch_axis, keepdims=True) / per_example + jnp.maximum(between, 0.0)
  return jnp.squeeze(mean_shift + centred_mean, reduction_axes), jnp.squeeze(variance, reduction_axes)


def weighted_moments(x: Array, weights: Array, reduction_axes: tuple[int, ...]) -> tuple[Array, Array]:
  """Frequency-weighted mean and biased variance over `reduction_axes`, as TF's
  `tf.nn.weighted_moments` (`weights` broadcast against `x`), in float32; a total weight of 0
  gives 0 for both, as TF's `div_no_nan`."""
  x32 = x.astype(jnp.float32)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), x32.shape)
  total = jnp.sum(weights, axis=reduction_axes, keepdims=True)
  mean = _divide_no_nan(jnp.sum(weights * x32, axis=reduction_axes, keepdims=True), total)
  variance = _divide_no_nan(jnp.sum(weights * jnp.square(x32 - mean), axis=reduction_axes, keepdims=True), total)
  return jnp.squeeze(mean, reduction_axes), jnp.squeeze(variance, reduction_axes)


def _divide_no_nan(sums: Array, total: Array) -> Array:
  """`sums / total`, 0 where `total` is 0 (TF's `div_no_nan`), with finite gradients there too."""
  return jnp.where(total != 0, sums / jnp.where(total != 0, total, 1.0), 0.0)


def moments_across(mean: Array, variance: Array, axis_name: Any, total_weight: Optional[Array] = None
                   ) -> tuple[Array, Array]:
  """The mean and biased variance of the examples of every device along `axis_name` (a
  `shard_map`, `pmap` or `vmap` axis), from each device's own: the law of total variance.

  Each device's moments count alike (its share of the batch has the same shape); with
  `total_weight`, each device's sum of `weighted_moments`' weights, they count by it, and a
  total of 0 gives 0 for both, as `weighted_moments`.
  """
  if total_weight is None:
    global_mean = jax.lax.pmean(mean, axis_name)
    return global_mean, jax.lax.pmean(variance + jnp.square(mean - global_mean), axis_name)
  total = jax.lax.psum(total_weight, axis_name)
  global_mean = _divide_no_nan(jax.lax.psum(total_weight * mean, axis_name), total)
  deviations = total_weight * (variance + jnp.square(mean - global_mean))
  return global_mean, _divide_no_nan(jax.lax.psum(deviations, axis_name), total)
