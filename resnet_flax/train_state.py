"""The one pytree a training run carries from step to step."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_flax.models import resnet_utils


RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@flax.struct.dataclass
class TrainState:
  """Parameters, moving statistics, optimizer state and the step count; with
  `config.model_ema_decay`, the moving averages of params and statistics (`model_ema.py`).

  Static things (the model, the optimizer) stay out of it and are bound to the
  step functions instead, so the state is plain data that orbax saves as is.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # {'params', 'batch_stats'} averaged over the steps, or None: a run without averages saves
  # what it saved before they existed.
  ema: Any = None


def train_state_initializer(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, int, int],
                            with_averages: bool = False) -> Callable[[jax.Array], TrainState]:
  """The pure function rng -> initial TrainState (the model initialized in eval mode on two zero
  images: only the variables' shapes follow from them); with `with_averages`, its averages start
  at its variables."""
  image_shape = resnet_utils.check_image_shape(image_shape)

  def init(rng: jax.Array) -> TrainState:
    variables = model.init(rng, jnp.zeros((2, *image_shape), jnp.float32), train=False)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params),
                      ema={'params': params, 'batch_stats': batch_stats} if with_averages else None)

  return init


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, int, int],
                         with_averages: bool = False) -> TrainState:
  """The initial TrainState's structure, shapes and dtypes, without computing anything."""
  return jax.eval_shape(train_state_initializer(model, tx, image_shape, with_averages), jax.random.PRNGKey(0))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, int, int], shardings: Any = None,
                       with_averages: bool = False) -> TrainState:
  """The initial TrainState, compiled (eager init runs op by op and is slower still).

  `shardings` (a TrainState of them, e.g. `sharding.train_state_shardings`) places it
  straight on a mesh, every process computing its own shards: no host copy, which a
  multi-process run could not make of a state spread over several hosts.
  """
  initializer = train_state_initializer(model, tx, image_shape, with_averages)
  # `rng` is closed over, a constant of the program, so no process has to pass in an
  # array on devices the others do not see.
  init = jax.jit(lambda: initializer(rng), out_shardings=shardings)
  return compile_run_once(init.lower())()


def compile_run_once(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  """`lowered` compiled for a program run once: XLA's optimization passes would triple an
  init's compile time for nothing. An XLA that no longer knows those options (they are
  debug options, and jax versions move) gets a plain compile rather than a failed run."""
  try:
    return lowered.compile(compiler_options=RUN_ONCE_COMPILER_OPTIONS)
  except RuntimeError as error:
    if 'No such compile option' not in str(error):
      raise
    return lowered.compile()
