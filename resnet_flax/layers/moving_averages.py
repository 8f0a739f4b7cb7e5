"""The one place where moving statistics are updated (TF's `assign_moving_average`)."""

from __future__ import annotations

import jax.numpy as jnp


def ema_update(moving: jnp.ndarray, value: jnp.ndarray, decay: float) -> jnp.ndarray:
  """Returns `moving - (1 - decay) * (moving - value)`, TF's exact update order."""
  return moving - (1.0 - decay) * (moving - value)


def zero_debiased_update(
    biased: jnp.ndarray, local_step: jnp.ndarray, value: jnp.ndarray, decay: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """TF's `zero_debias=True` update: returns (biased, local_step, debiased).

  The biased average starts at zero like the plain one; dividing by
  `1 - decay ** step` removes the pull toward that zero start (Kingma & Ba's
  bias correction). The step is counted before dividing, so the divisor is
  never zero and the first update yields `value` (to float32 rounding).
  """
  biased = ema_update(biased, value, decay)
  local_step = local_step + 1.0
  debiased = biased / (1.0 - jnp.power(jnp.float32(decay), local_step))
  return biased, local_step, debiased
