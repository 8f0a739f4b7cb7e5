"""Batch renormalization (Ioffe 2017) as TF's `renorm=True`: the corrections r and d.

Train mode normalizes with the batch statistics, then applies `x_hat * r + d` with
`r = batch_std / renorm_std` and `d = (batch_mean - renorm_mean) / renorm_std`
(clipped, and constants for the gradient), so the output matches what the moving
statistics would give while gradients still see the batch.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def clipping_bounds(step: Array, r_min: Optional[float], r_max: Optional[float], d_max: Optional[float],
                    start_step: int, ramp_steps: int) -> tuple[Optional[Array], Optional[Array], Optional[Array]]:
  """(r_min, r_max, d_max) at `step`: plain BN's (1, 1, 0) until `start_step`, then linear to the targets.

  The paper's schedule (hold r = 1, d = 0, then relax the bounds) with a linear ramp
  over `ramp_steps`; `ramp_steps = 0` jumps at `start_step`. A None target is no bound.
  """
  if ramp_steps == 0:
    progress = (step >= start_step).astype(jnp.float32)
  else:
    progress = jnp.clip((step - start_step) / ramp_steps, 0.0, 1.0)
  towards = lambda target, start: None if target is None else start + (target - start) * progress
  return towards(r_min, 1.0), towards(r_max, 1.0), towards(d_max, 0.0)


def corrections(mean: Array, stddev: Array, renorm_mean: Array, renorm_stddev: Array, epsilon: float,
                r_min: Optional[Array], r_max: Optional[Array], d_max: Optional[Array]) -> tuple[Array, Array]:
  """(r, d) from the batch's mean and stddev (sqrt(variance + epsilon)) and the renorm averages.

  As TF: the renorm stddev is floored at sqrt(epsilon) so an early tiny average cannot
  divide by zero; r is clipped to [r_min, r_max], d to [-d_max, d_max] (None: that side
  unclipped); neither carries gradient.
  """
  renorm_stddev = jnp.maximum(renorm_stddev, jnp.sqrt(jnp.float32(epsilon)))
  r = stddev / renorm_stddev
  d = (mean - renorm_mean) / renorm_stddev
  if r_min is not None:
    r = jnp.maximum(r, r_min)
  if r_max is not None:
    r = jnp.minimum(r, r_max)
  if d_max is not None:
    d = jnp.clip(d, -d_max, d_max)
  return jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
