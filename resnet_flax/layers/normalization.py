"""BatchNorm's arithmetic: normalizing with given statistics, and the same as one affine map."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jnp.ndarray
Correction = tuple[Array, Array]  # (scale, offset): `x_hat * scale + offset` before gamma and beta


def eval_affine(mean: Array, variance: Array, gamma: Optional[Array], beta: Optional[Array],
                epsilon: float) -> tuple[Array, Array]:
  """(scale, shift) with `x * scale + shift` equal to `normalize(x, mean, variance, gamma, beta,
  epsilon)` up to rounding: the normalization folded into one multiply-add per channel."""
  scale = jax.lax.rsqrt(variance + epsilon)
  if gamma is not None:
    scale = scale * gamma
  shift = -mean * scale
  if beta is not None:
    shift = shift + beta
  return scale, shift


def compose(first: Optional[Correction], then: Optional[Correction]) -> Optional[Correction]:
  """The correction applying `first`, then `then` (TF's `_compose_transforms`); None is none."""
  if first is None or then is None:
    return then if first is None else first
  return first[0] * then[0], first[1] * then[0] + then[1]


def normalize(x: Array, mean: Array, variance: Array, gamma: Optional[Array], beta: Optional[Array],
              epsilon: float, correction: Optional[Correction] = None) -> Array:
  """`x_hat = (x - mean) / sqrt(variance + epsilon)`, then `[x_hat * scale + offset]` (a
  `correction`: renorm's r and d, an adjustment), then `* gamma + beta`, in float32.

  Everything folds into one scale and one offset per channel (`offset * gamma + beta`), as TF
  composes them: one multiply and one add per element, as without a correction.
  """
  inv = jax.lax.rsqrt(variance + epsilon)
  offset = None
  if correction is not None:
    inv, offset = inv * correction[0], correction[1]
  if gamma is not None:
    inv = inv * gamma
    offset = None if offset is None else offset * gamma
  if beta is not None:
    offset = beta if offset is None else offset + beta
  y = (x.astype(jnp.float32) - mean) * inv
  return y if offset is None else y + offset
