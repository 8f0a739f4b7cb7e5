"""Weight initializers as TF-Slim defines them."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def variance_scaling(factor: float = 2.0) -> Callable[..., jax.Array]:
  """slim.variance_scaling_initializer(factor, mode='FAN_IN', uniform=False).

  Slim draws from a normal truncated at two standard deviations whose *parameter*
  is sqrt(1.3 * factor / fan_in) (the 1.3 roughly undoes the truncation), so this
  is not flax's variance_scaling('truncated_normal'), which rescales differently.
  """
  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    fan_in = math.prod(shape[:-1])
    stddev = math.sqrt(1.3 * factor / fan_in)
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * stddev
  return init
