"""Pure train and eval steps; the caller binds the model and optimizer and jits them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_flax import losses, model_ema
from resnet_flax.train_state import TrainState

Batch = dict[str, jax.Array]


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               weight_decay: float, label_smoothing: float, skip_nonfinite: bool = False,
               bn_weight_decay: float = 0.0, model_ema_decay: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; the new moving statistics come back inside the new state.

  `batch` holds 'image' (the model's float input), 'label' (int, below the model's class
  count) and 'mask' (1.0 for a real example, 0.0 for one the loss and accuracy leave out).
  The loss adds slim's L2 terms (`losses.slim_l2_regularization`): `weight_decay` on conv
  weights, `bn_weight_decay` on BatchNorm's gamma and beta. A state with averages
  (`state.ema`) moves them toward the new params and statistics (`model_ema.update`).

  `metrics['nonfinite']` is 1 when the loss or gradients were NaN/Inf; with
  `skip_nonfinite` such a step leaves params, statistics, averages and optimizer state as they were,
  but for the learning-rate schedule's step count (that of optax's `scale_by_schedule`, as
  `optim.build_optimizer`'s optimizers keep it): it advances with the state's step, as the data
  order does, so warm-up and decay steps stay those of an unskipped run.
  """

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['image'],
                                  train=True, mutable=['batch_stats'])
    data_loss = losses.cross_entropy(logits, batch['label'], batch['mask'], label_smoothing)
    total = data_loss + losses.slim_l2_regularization(params, weight_decay, bn_weight_decay)
    return total, (data_loss, logits, updates['batch_stats'])

  _check_state_fits(state, tx, model_ema_decay)
  (total, (data_loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  ema = state.ema
  if ema is not None:
    ema = model_ema.update(ema, {'params': params, 'batch_stats': batch_stats}, model_ema_decay, state.step + 1)
  if skip_nonfinite:
    keep_old = lambda new, old: jnp.where(finite, new, old)
    params, batch_stats, ema, kept_opt_state = jax.tree_util.tree_map(
        keep_old, (params, batch_stats, ema, opt_state), (state.params, state.batch_stats, state.ema, state.opt_state))
    opt_state = _with_schedule_counts(kept_opt_state, opt_state)
  count = jnp.maximum(jnp.sum(batch['mask']), 1.0)
  metrics = {
      'loss': data_loss,
      'total_loss': total,
      'top1': losses.correct_top_k(logits, batch['label'], batch['mask'], 1) / count,
      'top5': losses.correct_top_k(logits, batch['label'], batch['mask'], 5) / count,
      'grad_norm': grad_norm,
      'nonfinite': 1.0 - finite.astype(jnp.float32),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)
  return new_state, metrics


def _check_state_fits(state: TrainState, tx: optax.GradientTransformation, model_ema_decay: Any) -> None:
  """Refuses a state made for another optimizer, or averages and a decay that do not go together
  (a traced decay is taken as given)."""
  if jax.tree_util.tree_structure(state.opt_state) != jax.tree_util.tree_structure(jax.eval_shape(tx.init,
                                                                                                 state.params)):
    # It had failed deep in optax: "'TraceState' object has no attribute 'mu'".
    raise ValueError("the state's optimizer state does not fit this tx (another optimizer, or other options, made "
                     'it): create the state with the tx the step takes.')
  if not isinstance(model_ema_decay, (int, float)):
    return
  if state.ema is None and model_ema_decay:  # it had been ignored: no averages were ever kept
    raise ValueError(f'model_ema_decay={model_ema_decay!r} but the state keeps no moving averages to update; create '
                     'it with them (train_state.create_train_state(..., with_averages=True)), or pass 0.')
  if state.ema is not None and not 0 < model_ema_decay < 1:
    raise ValueError(f'the state keeps moving averages, but model_ema_decay={model_ema_decay!r} would make them '
                     'the variables themselves; pass the run\'s decay, in (0, 1).')


def _with_schedule_counts(kept: Any, advanced: Any) -> Any:
  """`kept` optimizer state with the learning-rate schedules' counts of `advanced`.

  A skipped step keeps the optimizer's moments and Adam's count (its bias correction counts
  the moment updates), but the rate keeps pace with `state.step`: otherwise each skip moved
  every later warm-up end and decay boundary a step later, and the logged rate was not the
  applied one.
  """
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  return jax.tree_util.tree_map(lambda old, new: new if is_schedule(old) else old, kept, advanced,
                                is_leaf=is_schedule)


def classification_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
  """Sums over the batch (loss, top-1 and top-5 hits, examples), padding masked out."""
  mask = batch['mask']
  losses.check_labels(logits, batch['label'], mask)
  per_example = losses.per_example_cross_entropy(logits, batch['label'])
  return {
      'loss_sum': losses.masked_sum(per_example, mask),
      'top1_hits': losses.correct_top_k(logits, batch['label'], mask, 1),
      'top5_hits': losses.correct_top_k(logits, batch['label'], mask, 5),
      'num_examples': jnp.sum(mask),
  }


def eval_step(variables: dict[str, Any], batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """`classification_sums` of the eval-mode model (moving statistics)."""
  if isinstance(variables, TrainState):  # flax's own error: "argument of type 'TrainState' is not iterable"
    raise TypeError("eval_step takes the model's variables, not a TrainState: pass {'params': state.params, "
                    "'batch_stats': state.batch_stats} (or the averages, state.ema).")
  return classification_sums(model.apply(variables, batch['image'], train=False), batch)
