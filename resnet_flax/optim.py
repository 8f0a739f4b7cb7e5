"""Optimizer and learning-rate schedule from a config."""

from __future__ import annotations

import ml_collections
import optax


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`learning_rate`, scaled by `batch_size / lr_batch_size` when that is set (> 0).

  Computed from the final config, so `--config.batch_size` keeps it consistent.
  """
  if config.lr_batch_size > 0:
    return config.learning_rate * config.batch_size / config.lr_batch_size
  return config.learning_rate


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0, then cosine to 0 or steps down by `lr_decay_factor`."""
  peak = base_learning_rate(config)
  total = config.num_train_steps
  warmup = min(config.warmup_steps, total)
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end_value=0.0)
  if config.lr_schedule == 'step':
    boundaries = {int(fraction * total): config.lr_decay_factor for fraction in config.lr_boundaries}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup]) if warmup else decay
  if config.lr_schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup]) if warmup else optax.constant_schedule(peak)
  raise ValueError(f"config.lr_schedule={config.lr_schedule!r} is unknown; use 'cosine', 'step' or 'constant'.")


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum on the schedule; L2 is in the loss, as in slim."""
  schedule = learning_rate_schedule(config)
  if config.optimizer == 'sgd':
    return optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=0.0)
  raise ValueError(f"config.optimizer={config.optimizer!r} is unknown; use 'sgd' or 'adamw'.")
