"""Exponential moving averages of a model's variables, as slim's `--moving_average_decay` keeps them.

TF-Slim's `train_image_classifier.py` averages every model variable (weights, biases, gamma, beta
and BatchNorm's moving statistics) with `tf.train.ExponentialMovingAverage(decay, global_step)`;
its `eval_image_classifier.py` evaluates the averages. The step count makes the first updates
follow the variables closely, so an average started at random weights does not linger there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The decay TF's ExponentialMovingAverage applies at `num_updates=step`:
  min(decay, (1 + step) / (10 + step))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update(averages: Any, variables: Any, decay: float, step: jax.Array) -> Any:
  """`averages` moved toward `variables` (trees of one structure) after training step `step`
  (1 for the first): average -= (1 - d) * (average - variable), d = `decay_at(decay, step)`.

  Integer state (renorm's clipping-step counter) is a count, not a weight: it is copied.
  """
  keep = decay_at(decay, step)

  def move(average: jax.Array, variable: jax.Array) -> jax.Array:
    if not jnp.issubdtype(average.dtype, jnp.floating):
      return variable
    return (average - (1.0 - keep) * (average - variable)).astype(average.dtype)

  return jax.tree_util.tree_map(move, averages, variables)
