"""Exponential moving averages of a model's variables, as slim's `--moving_average_decay` keeps them.

TF-Slim's `train_image_classifier.py` averages every model variable (weights, biases, gamma, beta
and BatchNorm's moving statistics) with `tf.train.ExponentialMovingAverage(decay, global_step)`;
its `eval_image_classifier.py` evaluates the averages. The step count makes the first updates
follow the variables closely, so an average started at random weights does not linger there.

The averages move after each step toward its new variables, with the step count after it, as
TF documents the class (`ema.apply` under a control dependency on the optimizer's op). slim's
script groups the two without an order; measured with TF 2.21 on CPU, its averages then read
the variables and the step count from before the step, so they trail these by one step.
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


def is_counter(name: str) -> bool:
  """Whether BatchNorm state `name` counts steps (renorm's clipping step, zero-debias's `local_step`):
  float32 variables, but an average of a count is no count."""
  return name == 'renorm_clipping_step' or name.endswith('_local_step')


def update(averages: Any, variables: Any, decay: float, step: jax.Array) -> Any:
  """`averages` moved toward `variables` (trees of one structure) after training step `step`
  (1 for the first): average -= (1 - d) * (average - variable), d = `decay_at(decay, step)`.

  Step counters (`is_counter`) and integer state are copied, so averages that go on training
  (converted or exported) continue the counts; slim averages the `local_step` of some layers.
  """
  keep = decay_at(decay, step)

  def move(path: tuple, average: jax.Array, variable: jax.Array) -> jax.Array:
    name = str(getattr(path[-1], 'key', path[-1])) if path else ''
    if is_counter(name) or not jnp.issubdtype(average.dtype, jnp.floating):
      return variable
    return (average - (1.0 - keep) * (average - variable)).astype(average.dtype)

  return jax.tree_util.tree_map_with_path(move, averages, variables)
