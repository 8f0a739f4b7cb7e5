"""Batch normalization with TF-Slim's semantics and an explicit train/eval mode."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_flax.layers import moving_averages, renorm
from resnet_flax.layers.end_points import keep_latest
from resnet_flax.layers.moments import batch_moments, moments_across, values_per_channel, weighted_moments
from resnet_flax.layers.normalization import Correction, compose, eval_affine, normalize

Array = jnp.ndarray

# The collection that holds moving statistics; callers update it only by asking for it
# with `mutable=[BATCH_STATS]` and storing what comes back.
BATCH_STATS = 'batch_stats'
# Per-group batch means and variances, sown in train mode only when a caller asks for
# this collection (precise-BN recalibration); nothing is stored otherwise.
BATCH_MOMENTS = 'batch_moments'


def ghost_batches(x: Array, ghost_batch_size: Optional[int], name: str) -> Array:
  """`x` as (groups, ghost_batch_size, ...), or `x` itself when it is one group
  (`ghost_batch_size` None or the whole batch, or an empty batch)."""
  if ghost_batch_size is None or ghost_batch_size == x.shape[0] or x.shape[0] == 0:
    # Not x[None]: the reshapes to and from a group axis split XLA:CPU's fusions (one more
    # full-size pass in the backward), ~10 % of a ResNet-50 train step on CPU. An empty batch
    # is one group, which the statistics check refuses (zero groups had averaged to NaN).
    return x
  if ghost_batch_size <= 0 or x.shape[0] % ghost_batch_size:
    raise ValueError(f'BatchNorm {name!r}: batch of {x.shape[0]} does not split into ghost batches of '
                     f'{ghost_batch_size}; use a ghost_batch_size that divides the per-device batch.')
  return x.reshape(x.shape[0] // ghost_batch_size, ghost_batch_size, *x.shape[1:])


def check_batch_statistics_possible(shape: tuple[int, ...], reduction_axes: tuple[int, ...], name: str,
                                    devices: int = 1) -> None:
  """Raises if train-mode statistics would come from a single value per channel (of `shape`'s
  on each of `devices` that share statistics)."""
  values = values_per_channel(shape, reduction_axes) * devices
  if values == 0:
    raise ValueError(f'BatchNorm {name!r} in train mode got no values (input shape {shape}): an empty batch has no '
                     'statistics; pass a batch of at least 2.')
  if values < 2:
    raise ValueError(
        f'BatchNorm {name!r} in train mode got one value per channel (input shape {shape}): '
        'batch statistics would set every output to beta and the variance estimate is undefined. '
        'Use a batch of at least 2 (or more examples per ghost batch), or freeze the statistics '
        '(evaluate with train=False) for this step.')


def slim_fuses(rank: int, fused: bool, zero_debias_moving_mean: bool) -> bool:
  """Whether TF-Slim's `batch_norm(fused=fused)` runs a fused kernel on a rank-`rank` input, which
  feeds the moving variance the unbiased batch variance (the non-fused code feeds the biased one).

  Slim fuses ranks 2 and 4 itself; tf-keras's layer, which it builds otherwise, fuses ranks 4 and
  5, but slim keeps zero-debiased layers off it. Rank 3 never fuses, whatever `fused` says
  (measured: tests/fixtures/make_bn_rank_fixtures.py).
  """
  return fused and (rank in (2, 4) or (rank == 5 and not zero_debias_moving_mean))


_CHECKED_OPTIONS = ('decay', 'epsilon', 'center', 'scale', 'zero_debias_moving_mean', 'zero_debias_moving_variance',
                    'fused', 'frozen', 'frozen_gamma_beta', 'renorm', 'renorm_decay', 'renorm_r_min', 'renorm_r_max',
                    'renorm_d_max', 'renorm_clipping_start_step', 'renorm_clipping_ramp_steps', 'data_format',
                    'ghost_batch_size', 'axis_name')
DATA_FORMATS = ('NHWC', 'NCHW')
# Numeric options: a string or bool in one would be compared or multiplied deep in JAX, or, a
# bool, read as 0 or 1; a ghost batch size must count examples. Those that may be None (unset)
# are in _UNSET_ALLOWED.
_REALS = ('decay', 'epsilon', 'renorm_decay', 'renorm_r_min', 'renorm_r_max', 'renorm_d_max',
          'renorm_clipping_start_step', 'renorm_clipping_ramp_steps')
_COUNTS = ('ghost_batch_size',)
# Switches: read by their truth value, so frozen='False' froze the layer and 1 passed for True.
_SWITCHES = ('center', 'scale', 'zero_debias_moving_mean', 'zero_debias_moving_variance', 'fused', 'frozen',
             'frozen_gamma_beta', 'renorm')
_UNSET_ALLOWED = ('renorm_r_min', 'renorm_r_max', 'renorm_d_max', 'ghost_batch_size')


# The layer's function fields (not config fields: a config holds no functions), with what they take.
# (field, what it must be, whether None is allowed).
_FUNCTIONS = tuple((f'{name}_init', 'a flax initializer, init(key, shape, dtype), e.g. nn.initializers.zeros', False)
                   for name in ('gamma', 'beta', 'moving_mean', 'moving_variance')) + (
    ('activation', 'a function of the output, e.g. nn.relu, or None', True),
    ('adjustment', 'a function adjustment(shape, key) -> (scale, offset), or None', True))

# Fields that only batch renormalization reads.
_RENORM_ONLY = ('renorm_decay', 'renorm_r_max', 'renorm_r_min', 'renorm_d_max', 'renorm_clipping_start_step',
                'renorm_clipping_ramp_steps')


def check_options(prefix: str, options: Mapping[str, Any]) -> None:
  """Raises a one-line ValueError for BatchNorm options out of range or in conflict (TypeError
  for one of the wrong type); the message starts with `prefix` ("config.bn." or "BatchNorm 'x': ")
  and the option's name. `options` has BatchNorm's field names; missing ones take its defaults.

  The layer checks itself; configs and `get_model` call this first, so a sweep fails before its
  first run and a model is refused where it is built.
  """
  def get(field: str) -> Any:
    return options[field] if field in options else getattr(BatchNorm, field)  # the dataclass default

  for fields, kinds, what in ((_REALS, (np.integer, np.floating), 'a number'), (_COUNTS, (np.integer,), 'an integer')):
    for field in fields:
      value = get(field)
      if (value is not None or field not in _UNSET_ALLOWED) and not _is_scalar_of(value, kinds):
        raise TypeError(f'{prefix}{field}={value!r} ({type(value).__name__}) must be {what}.')
  for field in _SWITCHES:
    if not isinstance(get(field), (bool, np.bool_)):
      raise TypeError(f'{prefix}{field}={get(field)!r} ({type(get(field)).__name__}) must be True or False.')
  for field, expected, may_be_none in _FUNCTIONS:
    value = get(field)
    if not callable(value) and not (value is None and may_be_none):
      raise TypeError(f'{prefix}{field}={value!r} must be {expected}.')
  if get('renorm') and (get('zero_debias_moving_mean') or get('zero_debias_moving_variance')):
    # TF-Slim rejects renorm with zero_debias_moving_mean too; its moving averages are plain.
    raise ValueError(f'{prefix}renorm keeps plain moving averages (a moving stddev for the variance); turn off '
                     'zero_debias_moving_mean / zero_debias_moving_variance or renorm.')
  if get('decay') == 1.0 and (get('zero_debias_moving_mean') or get('zero_debias_moving_variance')):
    # TF gives NaN moving statistics too, and they reach eval silently.
    raise ValueError(f'{prefix}decay=1 with zero-debiasing divides by 1 - decay ** step = 0 (NaN moving '
                     'statistics); use a decay below 1, or turn zero_debias_moving_mean / '
                     'zero_debias_moving_variance off to keep the statistics fixed.')
  # Written so NaN fails too: every comparison with NaN is False.
  for field in ('decay', 'renorm_decay'):
    if not 0.0 <= get(field) <= 1.0:
      raise ValueError(f'{prefix}{field}={get(field)} must be in [0, 1] (the weight the moving average keeps; '
                       '1 never updates it).')
  if not 0.0 < get('epsilon') < float('inf'):
    raise ValueError(f"{prefix}epsilon={get('epsilon')} must be > 0 and finite (it keeps 1 / sqrt(variance + "
                     'epsilon) finite for a constant channel; an infinite one zeroes every output).')
  bounds = (('renorm_r_max', lambda v: v >= 1.0, '>= 1 (1 is plain BN)'),
            ('renorm_r_min', lambda v: 0.0 <= v <= 1.0, 'in [0, 1] (1 is plain BN)'),
            ('renorm_d_max', lambda v: v >= 0.0, '>= 0 (0 is plain BN)'),
            ('renorm_clipping_start_step', lambda v: v >= 0, '>= 0'),
            ('renorm_clipping_ramp_steps', lambda v: v >= 0, '>= 0'),
            ('ghost_batch_size', lambda v: v >= 1, '>= 1 examples per group, or None for the whole batch'))
  for field, allowed, expected in bounds:
    if get(field) is not None and not allowed(get(field)):
      raise ValueError(f'{prefix}{field}={get(field)} must be {expected}.')
  if get('axis_name') is not None and get('ghost_batch_size') is not None:
    raise ValueError(f"{prefix}axis_name={get('axis_name')!r} shares statistics between devices, ghost_batch_size="
                     f"{get('ghost_batch_size')} splits each device's share into groups of its own; leave one out.")
  if get('data_format') not in DATA_FORMATS:
    raise ValueError(f"{prefix}data_format={get('data_format')!r} is unknown; use 'NHWC' (channels last) or 'NCHW' "
                     '(channels on axis 1).')
  if not get('renorm'):
    unused = [f'{field}={get(field)}' for field in _RENORM_ONLY if get(field) != getattr(BatchNorm, field)]
    if unused:
      raise ValueError(f"{prefix}{', '.join(unused)} would do nothing without renorm=True; set renorm=True or "
                       'leave them at their defaults.')


class BatchNorm(nn.Module):
  """TF-Slim's `batch_norm`, with the mode a required argument.

  Defaults are those of a bare `slim.batch_norm` (decay 0.999, epsilon 1e-3,
  center True, scale False); the ResNets bind `resnet_arg_scope`'s instead.

  Attributes:
    decay: moving-average decay; `moving -= (1 - decay) * (moving - batch_value)`.
    epsilon: added to the variance before the reciprocal square root.
    center: learn `beta`.
    scale: learn `gamma` (slim's default is False: many checkpoints have no gamma).
    zero_debias_moving_mean: keep TF's `biased` and `local_step` state and store
      `biased / (1 - decay ** step)` as the moving mean.
    zero_debias_moving_variance: the same for the moving variance (as Haiku debiases
      both); before the first update the moving variance keeps its initial value.
    fused: match TF-Slim's fused code path, which feeds the unbiased batch variance
      (times n / (n - 1)) to the moving variance; False matches the non-fused path,
      which feeds the biased one. Both normalize with the biased variance. As in
      TF-Slim, only inputs of rank 2, 4 and 5 (5 without zero-debias) take the fused
      path (`slim_fuses`); others feed the biased variance either way.
    frozen: train mode normalizes with the moving statistics and never updates them
      (fine-tuning at small batch); gamma and beta still get gradients. The options
      that shape the statistics (renorm, zero-debias, ghost batches) are accepted and
      idle, so that a run can switch to frozen and resume from its own checkpoints,
      whose state they decide.
    frozen_gamma_beta: gamma and beta get no gradient (with `frozen`, the layer is
      a fixed affine map).
    ghost_batch_size: train-mode statistics per group of this many consecutive examples
      (ghost batches, Hoffer et al. 2017). Consecutive, so that per-device statistics are
      the groups of each device's share; TF's `virtual_batch_size` groups strided
      examples instead (example j joins group j mod groups), feeds the biased variance
      and, with renorm, one r and d from the averaged moments. Here each group is
      normalized by its own statistics (with renorm, its own r and d) and the moving
      averages take the mean over groups of the group mean and variance (n / (n - 1)
      per group with `fused`; with `batch_weights`, weighted by each group's total weight,
      so a group of weight 0, padding, counts for nothing). None: the whole batch.
    axis_name: train-mode statistics over the examples of every device along this named axis
      (or tuple of names) of a `shard_map`, `pmap` or `vmap`: synchronized BN where each device
      holds its share, as flax's `nn.BatchNorm(axis_name=...)`; the moving statistics then agree
      on every device. Not needed under `jax.jit` with a batch-sharded input, whose statistics
      are the global batch's already. `init` outside the mapped function is fine (it skips the
      collective). None: each call's own examples.
    gamma_init: initializer of gamma (zeros for the last BN of a residual unit makes
      each unit start as the identity, Goyal et al. 2017).
    beta_init, moving_mean_init, moving_variance_init: the other initializers of TF-Slim's
      `param_initializers` (flax initializers: `init(key, shape, dtype)`). With renorm, as
      TF, the renorm mean starts at `moving_mean_init` and the moving and renorm stddevs at
      the square root of `moving_variance_init`; zero-debias state starts at 0.
    renorm: batch renormalization as TF's `renorm=True` (see `layers/renorm.py`); as
      in TF it takes the non-fused path (biased variance) and tracks the moving
      variance through a moving stddev, `moving_variance = max(moving_stddev ** 2 - epsilon, 0)`.
    renorm_decay: decay of the renorm mean and stddev (TF's `renorm_momentum`).
    renorm_r_min, renorm_r_max, renorm_d_max: TF's `renorm_clipping` rmin, rmax, dmax;
      None leaves that side unclipped (r_min None is TF's 0; the paper's 1 / r_max must be given).
    renorm_clipping_start_step, renorm_clipping_ramp_steps: the clipping schedule: r = 1,
      d = 0 (plain BN) for the first steps, then bounds relax linearly to the targets;
      counted by this layer's own train-mode updates (`renorm_clipping_step`).
    activation: applied to the output, as slim's `activation_fn`.
    dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
    data_format: 'NHWC' (channels last, any rank) or TF-Slim's 'NCHW' (channels on axis 1).
    adjustment: TF-Slim's `adjustment`, with a key for its random draws: `adjustment(shape,
      key) -> (scale, offset)`, both broadcasting to the input's shape, turns `x_hat` into
      `x_hat * scale + offset` before gamma and beta (after renorm's r and d), in train mode
      with batch statistics only; `key` comes from the 'adjustment' rng stream
      (`apply(..., rngs={'adjustment': key})`), folded in per layer.

  `__call__(x, train=..., batch_weights=w)` takes TF-Slim's `batch_weights`: a frequency weight
  per example, shape (batch,), for weighted batch moments in train mode (ignored in eval mode,
  as slim ignores it). As in TF-Slim they take the non-fused path (the biased weighted variance
  feeds the moving variance) and exclude renorm; a batch whose weights sum to 0 gives moments 0.
  """
  decay: float = 0.999
  epsilon: float = 0.001
  center: bool = True
  scale: bool = False
  zero_debias_moving_mean: bool = False
  zero_debias_moving_variance: bool = False
  fused: bool = True
  frozen: bool = False
  frozen_gamma_beta: bool = False
  ghost_batch_size: Optional[int] = None
  axis_name: Any = None
  gamma_init: Callable[..., Array] = nn.initializers.ones
  beta_init: Callable[..., Array] = nn.initializers.zeros
  moving_mean_init: Callable[..., Array] = nn.initializers.zeros
  moving_variance_init: Callable[..., Array] = nn.initializers.ones
  renorm: bool = False
  renorm_decay: float = 0.99
  renorm_r_min: Optional[float] = None
  renorm_r_max: Optional[float] = None
  renorm_d_max: Optional[float] = None
  renorm_clipping_start_step: int = 0
  renorm_clipping_ramp_steps: int = 0
  activation: Optional[Callable[[Array], Array]] = None
  dtype: Any = None
  data_format: str = 'NHWC'
  adjustment: Optional[Callable[[tuple[int, ...], jax.Array], Correction]] = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool, batch_weights: Optional[Array] = None) -> Array:
    self._check_options()
    self._check_call(x, train)
    if self.data_format == 'NCHW' and x.ndim < 2:
      raise ValueError(f"BatchNorm {module_path(self)!r}: data_format='NCHW' needs channels on axis 1, but the "
                       f'input has shape {x.shape}; pass (batch, channels, ...).')
    if batch_weights is not None:
      batch_weights = self._checked_batch_weights(batch_weights, x)
    # TF adjusts in training only; frozen statistics are the eval path's.
    adjustment = self._adjustment(x.shape) if self.adjustment is not None and train and not self.frozen else None
    if self.data_format == 'NCHW':  # the channels-last computation, on a view XLA lays out as it likes
      if adjustment is not None:
        adjustment = tuple(jnp.moveaxis(jnp.broadcast_to(v, x.shape), 1, -1) for v in adjustment)
      return jnp.moveaxis(self._channels_last(jnp.moveaxis(x, 1, -1), train, batch_weights, adjustment), -1, 1)
    return self._channels_last(x, train, batch_weights, adjustment)

  def _devices_along_axis(self) -> int:
    """The devices sharing statistics along `axis_name`, or a one-line error outside its map."""
    try:
      return jax.lax.axis_size(self.axis_name)
    except NameError as error:  # jax's 'unbound axis name: ...'
      raise ValueError(f'BatchNorm {module_path(self)!r}: axis_name={self.axis_name!r} is not an axis here ({error}): '
                       'call the model inside shard_map, pmap or vmap over that axis, or leave axis_name out (under '
                       "jax.jit a batch-sharded input's statistics are the global batch's already).") from None

  def _adjustment(self, shape: tuple[int, ...]) -> Correction:
    """TF's `adjustment(shape)`, given this layer's own key from the 'adjustment' rng stream."""
    if not self.has_rng('adjustment'):
      raise ValueError(f"BatchNorm {module_path(self)!r} has an adjustment, whose random draws need a key: apply "
                       "in train mode with rngs={'adjustment': key} (a new key each step).")
    scale, offset = self.adjustment(shape, self.make_rng('adjustment'))
    for name, value in (('scale', scale), ('offset', offset)):
      if not _broadcasts_to(np.shape(value), shape):
        raise ValueError(f'BatchNorm {module_path(self)!r}: the adjustment\'s {name} has shape {jnp.shape(value)}, '
                         f'which does not broadcast to the input\'s {tuple(shape)}.')
    return jnp.asarray(scale, jnp.float32), jnp.asarray(offset, jnp.float32)

  def _channels_last(self, x: Array, train: bool, batch_weights: Optional[Array],
                     adjustment: Optional[Correction]) -> Array:
    channels = x.shape[-1]
    beta = self.param('beta', self.beta_init, (channels,), jnp.float32) if self.center else None
    gamma = self.param('gamma', self.gamma_init, (channels,), jnp.float32) if self.scale else None
    if self.frozen_gamma_beta:
      beta, gamma = (None if v is None else jax.lax.stop_gradient(v) for v in (beta, gamma))
    stats = self._statistics(channels)

    if train and not self.frozen:
      # One cast for the statistics and the normalization: a bfloat16 x's gradient is then their
      # float32 sum rounded once, not two paths each rounded to bfloat16 before the sum.
      groups = ghost_batches(x.astype(jnp.float32), self.ghost_batch_size, module_path(self))
      group_axis_count = groups.ndim - x.ndim  # 1 with ghost batches, else 0
      group_shape = groups.shape[group_axis_count:]  # one group's: x's shape, its batch axis smaller
      within_group = tuple(range(x.ndim - 1))
      group_axes = tuple(axis + group_axis_count for axis in within_group)
      # init may run outside the mapped function, where the axis is unbound: each call's own statistics.
      across = self.axis_name is not None and not self.is_initializing()
      devices = self._devices_along_axis() if across else 1
      if across or self.axis_name is None:  # init's statistics are not kept: a device's share may be 1 example
        check_batch_statistics_possible(group_shape, within_group, module_path(self), devices)
      # One (mean, variance) per ghost batch: shape (C,), or (groups, C) for ghost batches.
      group_weights = None  # each ghost batch's total weight, where they differ
      if batch_weights is None:
        mean, variance = batch_moments(groups, group_axes)
      else:  # one weight per example, broadcast over its values like groups' batch axis
        weights = batch_weights.reshape(groups.shape[:group_axis_count + 1] + (1,) * (x.ndim - 1))
        mean, variance = weighted_moments(groups, weights, group_axes)
        if group_axis_count:
          group_weights = jnp.sum(weights.astype(jnp.float32), axis=tuple(range(1, weights.ndim)))  # (groups,)
      if across:  # each device's shares are equal in shape: weighted ones count by their total weight
        total_weight = None if batch_weights is None else jnp.sum(weights, axis=group_axes)
        mean, variance = moments_across(mean, variance, self.axis_name, total_weight)
      if not self.is_initializing():  # init makes every collection mutable; keep it out of variables
        # For precise-BN recalibration (`resnet_flax.precise_bn`), always (groups, C); a no-op unless asked for.
        self.sow(BATCH_MOMENTS, 'mean', mean.reshape(-1, channels), reduce_fn=keep_latest, init_fn=lambda: None)
        self.sow(BATCH_MOMENTS, 'variance', variance.reshape(-1, channels), reduce_fn=keep_latest,
                 init_fn=lambda: None)
      mean, variance = (jnp.expand_dims(v, group_axes) for v in (mean, variance))  # broadcast against groups
      if adjustment is not None and groups.ndim != x.ndim:  # per example: laid out as the groups
        adjustment = tuple(jnp.broadcast_to(v, x.shape).reshape(groups.shape) for v in adjustment)
      correction = self._renorm_corrections(stats, mean, variance) if self.renorm else None
      # As TF: renorm's r and d act on x_hat first, the adjustment after them.
      correction = compose(correction, adjustment)
      if not self.is_initializing():
        self._require_mutable_stats()
        n = values_per_channel(group_shape, within_group) * devices
        # TF-Slim runs weighted moments and adjustments in non-fused code only.
        unbiased = (batch_weights is None and adjustment is None
                    and slim_fuses(x.ndim, self.fused, self.zero_debias_moving_mean))
        self._update_statistics(stats, mean, variance, n / (n - 1) if unbiased else 1.0, group_weights)
      y = normalize(groups, mean, variance, gamma, beta, self.epsilon, correction).reshape(x.shape)
    else:
      y = normalize(x, stats['moving_mean'].value, stats['moving_variance'].value, gamma, beta, self.epsilon)
    if self.activation is not None:
      y = self.activation(y)
    return y.astype(self.dtype or x.dtype)

  def eval_scale_and_shift(self) -> tuple[Array, Array]:
    """Eval mode as one affine map per channel, `x * scale + shift` before the activation:
    what the convolution before this layer can take in (`Conv2D.fold_batch_norm_in_eval`)."""
    self._check_options()
    self._check_no_unused_params()
    mean, variance = (self.get_variable(BATCH_STATS, name) for name in ('moving_mean', 'moving_variance'))
    if mean is None or variance is None:
      raise ValueError(f'BatchNorm {module_path(self)!r} has no moving statistics to fold: apply the model with '
                       f'the {BATCH_STATS!r} collection its init returned.')
    gamma = self.get_variable('params', 'gamma') if self.scale else None
    beta = self.get_variable('params', 'beta') if self.center else None
    missing = [name for name, wanted, value in (('gamma', self.scale, gamma), ('beta', self.center, beta))
               if wanted and value is None]
    if missing:  # get_variable answers None where __call__ would have raised
      raise ValueError(f'BatchNorm {module_path(self)!r} has scale={self.scale}, center={self.center} but no '
                       f'{" or ".join(missing)} among its params: match the layer to the checkpoint (e.g. '
                       'batch_norm_scale=False for slim checkpoints without gamma).')
    if self.frozen_gamma_beta:
      gamma, beta = (None if v is None else jax.lax.stop_gradient(v) for v in (gamma, beta))
    return eval_affine(mean, variance, gamma, beta, self.epsilon)

  def _check_call(self, x: Array, train: Any) -> None:
    """Refuses a call whose result would be silently wrong: a mode that is not a bool ('False'
    is truthy), integer activations or dtype (truncated), and params the layer does not use."""
    if not hasattr(x, 'ndim'):  # a list: flax's layers take any array-like, and this had been an AttributeError
      raise TypeError(f'BatchNorm {module_path(self)!r} got a {type(x).__name__}; pass an array, jnp.asarray(x).')
    if x.ndim == 0:
      raise ValueError(f'BatchNorm {module_path(self)!r} got a scalar; pass an array of shape (batch, ..., channels).')
    if not isinstance(train, (bool, np.bool_)):
      # A traced mode comes from a transformation that was not told it is static.
      traced = ('; a model wrapped in nn.remat or jax.checkpoint: get_model(..., remat=True) recomputes each unit'
                if isinstance(train, jax.core.Tracer) else '')
      raise TypeError(f'BatchNorm {module_path(self)!r}: train={train!r} ({type(train).__name__}) must be True or '
                      f'False, a Python bool (under jax.jit, a static argument: static_argnames=("train",){traced}).')
    for what, dtype in (('input', x.dtype), ('dtype', self.dtype)):
      if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f'BatchNorm {module_path(self)!r}: {what} {jnp.dtype(dtype).name} is not a float type, so '
                        'its output would be truncated; use float32 or bfloat16.')
    if not self.is_initializing():
      self._check_no_unused_params()

  def _check_no_unused_params(self) -> None:
    """Refuses a gamma or beta among the params of a layer built without it: flax would
    ignore it, silently dropping a trained scale or shift (in folded eval too)."""
    for name, kept, field in (('gamma', self.scale, 'scale'), ('beta', self.center, 'center')):
      if not kept and self.has_variable('params', name):
        raise ValueError(f'BatchNorm {module_path(self)!r} has {name} among its params but {field}=False: build the '
                         f'model with batch_norm_{field}=True (config.bn.{field}=True) to use it, or leave it out of '
                         'the params.')

  def _checked_batch_weights(self, batch_weights: Any, x: Array) -> Array:
    """`batch_weights` as float32 (batch,) (counts and masks too, as TF casts them), or a
    one-line error naming what is wrong."""
    batch_weights = jnp.asarray(batch_weights)
    if batch_weights.shape != (x.shape[0],) or jnp.issubdtype(batch_weights.dtype, jnp.complexfloating):
      raise ValueError(f'BatchNorm {module_path(self)!r}: batch_weights must be one real weight per example, '
                       f'shape ({x.shape[0]},); got {batch_weights.dtype} {batch_weights.shape}.')
    if self.renorm:  # as TF-Slim, whose weighted code path has no renorm
      raise ValueError(f'BatchNorm {module_path(self)!r}: renorm is not supported with batch_weights (neither in '
                       'TF-Slim); leave one of them out.')
    return batch_weights.astype(jnp.float32)

  def _statistics(self, channels: int) -> dict[str, Any]:
    """The `batch_stats` variables this configuration keeps, by name."""
    def initialized(init: Callable[..., Array], root: bool = False) -> tuple[Callable[..., Array], tuple]:
      # zeros and ones draw nothing: a key is asked for only where an initializer may use it
      # (init alone creates these, a missing one is refused below), as `init({}, ...)` worked.
      def value(shape: tuple[int, ...], dtype: Any) -> Array:
        key = None if init in (nn.initializers.zeros, nn.initializers.ones) else self.make_rng('params')
        initial = init(key, shape, dtype)
        return jnp.sqrt(initial) if root else initial
      return value, (channels,)
    zeros, step = (jnp.zeros, (channels,)), (jnp.zeros, ())
    wanted = {'moving_mean': initialized(self.moving_mean_init),
              'moving_variance': initialized(self.moving_variance_init)}
    if self.zero_debias_moving_mean:
      wanted.update(moving_mean_biased=zeros, moving_mean_local_step=step)
    if self.zero_debias_moving_variance:
      wanted.update(moving_variance_biased=zeros, moving_variance_local_step=step)
    if self.renorm:
      # As TF: the stddevs start at the root of the variance's initial value, the renorm mean at the mean's.
      wanted.update(moving_stddev=initialized(self.moving_variance_init, root=True),
                    renorm_mean=initialized(self.moving_mean_init),
                    renorm_stddev=initialized(self.moving_variance_init, root=True))
      if self.renorm_clipping_start_step or self.renorm_clipping_ramp_steps:
        wanted.update(renorm_clipping_step=step)
    if not self.is_initializing():
      missing = [name for name in wanted if not self.has_variable(BATCH_STATS, name)]
      if missing:  # with the collection mutable, flax would create them afresh at their initial values
        raise ValueError(f'BatchNorm {module_path(self)!r} has no {", ".join(missing)} in the {BATCH_STATS!r} '
                         f'collection (a fresh start at their initial values would be silent): apply with all the '
                         f'variables init or a checkpoint gave, {{"params": ..., "{BATCH_STATS}": ...}}; for variables '
                         'of a model with other BatchNorm options (zero-debias, renorm), build the model as they were, '
                         'or load them with pretrained.load_for_model (config.init_checkpoint), which fills the state '
                         'they lack.')
    return {name: self.variable(BATCH_STATS, name, init, shape, jnp.float32)
            for name, (init, shape) in wanted.items()}

  def _renorm_corrections(self, stats: dict[str, Any], mean: Array, variance: Array) -> tuple[Array, Array]:
    """r and d from the renorm averages before this step's update, as TF orders it."""
    # A missing r_min is TF's 0 (r > 0, so no bound), which a clipping schedule can relax towards from 1.
    bounds = (0.0 if self.renorm_r_min is None else self.renorm_r_min, self.renorm_r_max, self.renorm_d_max)
    if 'renorm_clipping_step' in stats:
      bounds = renorm.clipping_bounds(stats['renorm_clipping_step'].value, *bounds,
                                      self.renorm_clipping_start_step, self.renorm_clipping_ramp_steps)
    return renorm.corrections(mean, jnp.sqrt(variance + self.epsilon), stats['renorm_mean'].value,
                              stats['renorm_stddev'].value, self.epsilon, *bounds)

  def _update_statistics(self, stats: dict[str, Any], mean: Array, variance: Array, variance_factor: float,
                         group_weights: Optional[Array] = None) -> None:
    """One train-mode update of every moving statistic from the per-group moments, the variance
    fed times `variance_factor` (n / (n - 1) where TF-Slim's fused kernel runs, else 1), averaged
    over ghost batches alike or, given their `group_weights`, by them."""
    def over_groups(v: Array) -> Array:
      axes = tuple(range(v.ndim - 1))
      if group_weights is None:
        return jnp.mean(v, axis=axes)
      weights = group_weights.reshape(group_weights.shape + (1,) * (v.ndim - 1))
      total = jnp.sum(weights)  # 0: every group's moments are 0 already (weighted_moments)
      return jnp.sum(weights * v, axis=axes) / jnp.where(total != 0, total, 1.0)
    batch_mean = over_groups(mean)
    if self.zero_debias_moving_mean:
      (stats['moving_mean_biased'].value, stats['moving_mean_local_step'].value,
       stats['moving_mean'].value) = moving_averages.zero_debiased_update(
           stats['moving_mean_biased'].value, stats['moving_mean_local_step'].value, batch_mean, self.decay)
    else:
      stats['moving_mean'].value = moving_averages.ema_update(stats['moving_mean'].value, batch_mean, self.decay)
    if self.renorm:
      batch_stddev = over_groups(jnp.sqrt(variance + self.epsilon))
      stats['moving_stddev'].value = moving_averages.ema_update(stats['moving_stddev'].value, batch_stddev,
                                                                self.decay)
      stats['moving_variance'].value = jnp.maximum(jnp.square(stats['moving_stddev'].value) - self.epsilon, 0.0)
      stats['renorm_mean'].value = moving_averages.ema_update(stats['renorm_mean'].value, batch_mean,
                                                              self.renorm_decay)
      stats['renorm_stddev'].value = moving_averages.ema_update(stats['renorm_stddev'].value, batch_stddev,
                                                                self.renorm_decay)
      if 'renorm_clipping_step' in stats:
        stats['renorm_clipping_step'].value = stats['renorm_clipping_step'].value + 1.0
      return
    batch_variance = over_groups(variance * variance_factor)
    if self.zero_debias_moving_variance:
      (stats['moving_variance_biased'].value, stats['moving_variance_local_step'].value,
       stats['moving_variance'].value) = moving_averages.zero_debiased_update(
           stats['moving_variance_biased'].value, stats['moving_variance_local_step'].value, batch_variance,
           self.decay)
    else:
      stats['moving_variance'].value = moving_averages.ema_update(stats['moving_variance'].value, batch_variance,
                                                                  self.decay)

  def _check_options(self) -> None:
    checked = (*_CHECKED_OPTIONS, *(field for field, _, _ in _FUNCTIONS))
    check_options(f'BatchNorm {module_path(self)!r}: ', {name: getattr(self, name) for name in checked})

  def _require_mutable_stats(self) -> None:
    if not self.is_mutable_collection(BATCH_STATS):
      raise ValueError(
          f'BatchNorm {module_path(self)!r} is in train mode but {BATCH_STATS!r} is immutable, so the moving '
          f'statistics would silently never update: call apply(..., train=True, mutable=[{BATCH_STATS!r}]) '
          'and keep the returned statistics, or use train=False.')


def _is_scalar_of(value: Any, kinds: tuple[type, ...]) -> bool:
  """Whether `value` is one number of one of the numpy `kinds` (Python, numpy, ml_dtypes and
  0-d jax scalars alike), not a bool."""
  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None or np.ndim(value) != 0:
    return False
  dtype = np.asarray(value).dtype
  return any(np.issubdtype(dtype, kind) for kind in kinds) or (np.floating in kinds and dtype == jnp.bfloat16)


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  try:
    return np.broadcast_shapes(shape, target) == tuple(target)
  except ValueError:
    return False


def module_path(module: nn.Module) -> str:
  """The module's slash-separated path in the variable tree (its slim scope); a module
  applied by itself has none, so it is named by its class."""
  path = '/'.join(module.scope.path) if module.scope is not None else module.name
  return path or f'(top-level {type(module).__name__})'
