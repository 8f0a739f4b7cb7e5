"""Optimizer and learning-rate schedule from a config."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ('cosine', 'step', 'constant', 'polynomial')
OPTIMIZERS = ('sgd', 'adamw', 'lars')


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`learning_rate`, scaled by `batch_size / lr_batch_size` when that is set (> 0).

  Computed from the final config, so `--config.batch_size` keeps it consistent.
  """
  if config.lr_batch_size > 0:
    return config.learning_rate * config.batch_size / config.lr_batch_size
  return config.learning_rate


def _after_warmup(peak: float, warmup: int, schedule: optax.Schedule) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup` steps, then `schedule` (counted from 0)."""
  if not warmup:
    return schedule
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), schedule], [warmup])


def lr_boundary_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The 'step' schedule's decay steps: `round(fraction * num_train_steps)` for each of `lr_boundaries`.

  Absolute steps, counted from 0 with the warm-up included, as configs/default.py documents.
  """
  return tuple(round(fraction * config.num_train_steps) for fraction in config.lr_boundaries)


def check_lr_boundaries(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError unless each of `lr_boundaries` decays once, after warm-up, within training.

  Only the 'step' schedule reads the boundaries. `config_checks.check_config` runs this
  before anything is built, and `learning_rate_schedule` does too, for library users.
  """
  total, warmup = config.num_train_steps, config.warmup_steps
  if config.lr_schedule != 'step' or total <= 0:  # no step runs, so no boundary can mislead
    return
  steps = lr_boundary_steps(config)
  where = f'config.lr_boundaries={tuple(config.lr_boundaries)!r} lands on steps {steps} of num_train_steps={total}'
  if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
    # optax keys the decays by step: two on one step would multiply in once, not twice.
    raise ValueError(f'{where}: they must be strictly increasing steps; space the fractions at least '
                     f'1 / num_train_steps = {1 / total:.3g} apart or drop one.')
  # The bounds in the fixes are where round() moves to the next step.
  if steps and steps[-1] >= total:
    raise ValueError(f'{where}: each must be below {total} (a later one never applies); use fractions below '
                     f'{(total - 0.5) / total:.4g} or drop it.')
  if steps and steps[0] <= warmup:
    # The warm-up ramps up to the peak until step warmup_steps: a decay by then contradicts it.
    raise ValueError(f'{where}: each must be after the warm-up, config.warmup_steps={warmup}; '
                     f'{_after_warmup_fix(steps, total, warmup)}.')


def _after_warmup_fix(steps: tuple[int, ...], total: int, warmup: int) -> str:
  """How boundaries at `steps` can land on distinct steps after the warm-up and before `total`.

  Either fix named works by itself: a warm-up ending before the first boundary keeps the
  fractions; a fraction range is named only where one exists (fractions are below 1, so past
  a warm-up as long as the run, "use fractions above 1.5" would be impossible).
  """
  count = len(steps)
  if count > total - 1:  # even without warm-up, steps 1 .. total - 1 are too few for them all
    return f'drop boundaries to at most {total - 1} or raise config.num_train_steps'
  fixes = []
  if count <= total - 1 - warmup:  # steps warmup + 1 .. total - 1
    fixes.append(f'use fractions above {(warmup + 0.5) / total:.4g}')
  if steps[0] >= 1:
    fixes.append(f'lower config.warmup_steps to {"" if steps[0] == 1 else "at most "}{steps[0] - 1}')
  if fixes:
    return ' or '.join(fixes)
  most = total - 1 - count  # a first boundary at step 0: both must move
  return f'lower config.warmup_steps to at most {most} and use fractions above {(most + 0.5) / total:.4g}'


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0, then cosine to 0, steps down by `lr_decay_factor`, stays
  constant, or decays polynomially to `lr_end` (MLPerf's large-batch schedule)."""
  peak = base_learning_rate(config)
  total = config.num_train_steps
  # The warm-up's slope never depends on the run's length: a run shorter than it stops
  # part-way up, and lengthening a run leaves the rates of its first steps as they were.
  warmup = config.warmup_steps
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end_value=0.0)
  if config.lr_schedule == 'step':
    check_lr_boundaries(config)
    # The boundaries are absolute steps; the schedule after the warm-up counts from its end.
    boundaries = {step - warmup: config.lr_decay_factor for step in lr_boundary_steps(config)}
    return _after_warmup(peak, warmup, optax.piecewise_constant_schedule(peak, boundaries))
  if config.lr_schedule == 'constant':
    return _after_warmup(peak, warmup, optax.constant_schedule(peak))
  if config.lr_schedule == 'polynomial':
    # (peak - end) * (1 - t / T) ** power + end with T = total - warmup + 1, as MLPerf's
    # reference (image_classification/tensorflow2/lars_util.py): the last step's rate
    # stays just above `lr_end`.
    decay = optax.polynomial_schedule(peak, config.lr_end, config.lr_power, max(total - warmup + 1, 1))
    return _after_warmup(peak, warmup, decay)
  raise ValueError(f'config.lr_schedule={config.lr_schedule!r} is unknown; use one of {SCHEDULES}.')


def kernels_only(params: Any) -> Any:
  """True for conv and fully connected kernels (`weights`), False for biases and BN's gamma/beta.

  LARS as MLPerf runs it leaves BN parameters and biases out of both weight decay and
  the trust ratio (its `skip_list=['batch_normalization', 'bias']`).
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], 'key', None) == 'weights', params)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, AdamW or LARS on the schedule.

  `config.weight_decay` is slim's L2 in the loss (for every optimizer); LARS adds its
  own `config.lars.weight_decay` to the gradient of the kernels, before the trust ratio;
  AdamW decays the kernels by `config.adamw.weight_decay`, decoupled from Adam's step.
  """
  schedule = learning_rate_schedule(config)
  if config.optimizer == 'sgd':
    return optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.adamw.weight_decay, mask=kernels_only)
  if config.optimizer == 'lars':
    lars = config.lars
    return optax.lars(schedule, weight_decay=lars.weight_decay, weight_decay_mask=kernels_only,
                      trust_coefficient=lars.trust_coefficient, eps=lars.eps, trust_ratio_mask=kernels_only,
                      momentum=config.momentum, nesterov=config.nesterov)
  raise ValueError(f'config.optimizer={config.optimizer!r} is unknown; use one of {OPTIMIZERS}.')
