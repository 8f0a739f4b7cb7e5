"""The one pytree a training run carries from step to step."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Parameters, moving statistics, optimizer state and the step count.

  Static things (the model, the optimizer) stay out of it and are bound to the
  step functions instead, so the state is plain data that orbax saves as is.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, int, int]) -> TrainState:
  """Initializes the model on a dummy batch of two, compiled (eager init runs op by op)."""

  def init(rng: jax.Array) -> TrainState:
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))

  return jax.jit(init)(rng)
