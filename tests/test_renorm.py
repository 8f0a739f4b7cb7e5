"""Batch renormalization against tf_slim (tests/fixtures/slim_renorm.npz) and by hand."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import BatchNorm, renorm

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_renorm.npz')
STATS = ('moving_mean', 'moving_variance', 'moving_stddev', 'renorm_mean', 'renorm_stddev')


def _layer_for(config, clipping):
  clipping = clipping or {}
  return BatchNorm(decay=config['decay'], epsilon=config['epsilon'], scale=True, center=True, renorm=True,
                   renorm_decay=config['renorm_decay'], renorm_r_max=clipping.get('rmax'),
                   renorm_r_min=clipping.get('rmin'), renorm_d_max=clipping.get('dmax'))  # absent: None, as TF


@pytest.mark.parametrize('setting', ['clip', 'noclip', 'loaded'])
def test_four_train_steps_and_eval_match_tf_slim(setting):
  fixture = np.load(FIXTURE)
  config = json.loads(str(fixture['config']))
  layer = _layer_for(config, config['settings'][setting]['renorm_clipping'])
  get = lambda key: jnp.asarray(fixture[f'{setting}/{key}'])
  params = {'gamma': get('init/BatchNorm/gamma'), 'beta': get('init/BatchNorm/beta')}
  stats = {name: get(f'init/BatchNorm/{name}') for name in STATS}
  g = get('g')

  for step in range(1, 5):
    x = get('x')[step - 1]

    def loss(params, x, stats=stats):
      y, updates = layer.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(y * g), (y, updates['batch_stats'])

    (_, (y, new_stats)), (grad_params, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    expected = lambda key: fixture[f'{setting}/step{step}/{key}']
    np.testing.assert_allclose(y, expected('y'), rtol=1e-5, atol=1e-5, err_msg=f'y step {step}')
    # r and d are constants for the gradient, as TF's stop_gradient makes them.
    np.testing.assert_allclose(grad_x, expected('grad_x'), rtol=1e-4, atol=1e-4, err_msg=f'dx step {step}')
    np.testing.assert_allclose(grad_params['gamma'], expected('grad_gamma'), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad_params['beta'], expected('grad_beta'), rtol=1e-5, atol=1e-5)
    for name in STATS:
      np.testing.assert_allclose(new_stats[name], expected(f'var/BatchNorm/{name}'), rtol=1e-5, atol=1e-6,
                                 err_msg=f'{name} step {step}')
    stats = new_stats

  y_eval = layer.apply({'params': params, 'batch_stats': stats}, get('x_eval'), train=False)
  np.testing.assert_allclose(y_eval, fixture[f'{setting}/eval/y'], rtol=1e-5, atol=1e-5)


def test_r_max_one_and_d_max_zero_is_plain_batch_norm():
  x = jnp.asarray(np.random.RandomState(0).randn(8, 3, 3, 4) * 3 + 1, jnp.float32)
  plain = BatchNorm(scale=True, fused=False)
  clipped = BatchNorm(scale=True, renorm=True, renorm_r_max=1.0, renorm_d_max=0.0)
  variables = plain.init(jax.random.PRNGKey(0), x, train=False)
  renorm_variables = clipped.init(jax.random.PRNGKey(0), x, train=False)
  # Renorm averages far from this batch: only the clipping can make r = 1 and d = 0.
  renorm_stats = {**renorm_variables['batch_stats'], 'renorm_mean': jnp.full(4, 5.0),
                  'renorm_stddev': jnp.full(4, 0.1)}
  y_plain, plain_updates = plain.apply(variables, x, train=True, mutable=['batch_stats'])
  y_renorm, renorm_updates = clipped.apply({**renorm_variables, 'batch_stats': renorm_stats}, x, train=True,
                                           mutable=['batch_stats'])
  np.testing.assert_allclose(y_renorm, y_plain, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(renorm_updates['batch_stats']['moving_mean'], plain_updates['batch_stats']['moving_mean'],
                             rtol=1e-6)


def test_clipping_schedule_holds_plain_bn_then_ramps_linearly():
  bounds = lambda step: [None if b is None else float(b)
                         for b in renorm.clipping_bounds(jnp.float32(step), 1 / 3, 3.0, 5.0, 10, 20)]
  assert bounds(0) == [1.0, 1.0, 0.0]
  assert bounds(10) == [1.0, 1.0, 0.0]
  np.testing.assert_allclose(bounds(15), [1 + (1 / 3 - 1) / 4, 1.5, 1.25])
  np.testing.assert_allclose(bounds(30), [1 / 3, 3.0, 5.0])
  np.testing.assert_allclose(bounds(1000), [1 / 3, 3.0, 5.0])
  assert renorm.clipping_bounds(jnp.float32(3), None, 3.0, None, 3, 0)[::2] == (None, None)
  assert float(renorm.clipping_bounds(jnp.float32(2), None, 3.0, None, 3, 0)[1]) == 1.0
  assert float(renorm.clipping_bounds(jnp.float32(3), None, 3.0, None, 3, 0)[1]) == 3.0


def test_the_layer_counts_its_own_schedule_steps():
  layer = BatchNorm(renorm=True, renorm_r_max=3.0, renorm_d_max=5.0, renorm_clipping_start_step=1,
                    renorm_clipping_ramp_steps=2)
  x = jnp.asarray(np.random.RandomState(1).randn(6, 4) * 2 + 3, jnp.float32)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  stats = variables['batch_stats']
  assert float(stats['renorm_clipping_step']) == 0.0
  plain = BatchNorm(fused=False)
  y_plain, _ = plain.apply(plain.init(jax.random.PRNGKey(0), x, train=False), x, train=True, mutable=['batch_stats'])
  outputs = []
  for _ in range(4):
    y, updates = layer.apply({**variables, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
    stats = updates['batch_stats']
    outputs.append(y)
  assert float(stats['renorm_clipping_step']) == 4.0
  np.testing.assert_allclose(outputs[0], y_plain, rtol=1e-6, atol=1e-6)  # step 0: r = 1, d = 0
  assert not np.allclose(outputs[3], y_plain, atol=1e-3)  # bounds relaxed: the correction shows


@pytest.mark.parametrize('options', [dict(zero_debias_moving_mean=True), dict(zero_debias_moving_variance=True),
                                     dict(renorm_r_max=0.5), dict(renorm_d_max=-1.0)])
def test_invalid_renorm_options_are_clear_errors(options):
  layer = BatchNorm(renorm=True, **options)
  with pytest.raises(ValueError, match='renorm'):
    layer.init(jax.random.PRNGKey(0), jnp.ones((4, 2)), train=False)


@pytest.mark.parametrize('r_min, expected_r_min', [(None, 0.0), (0.5, 0.5)])
def test_renorm_r_min_none_is_tf_s_zero(r_min, expected_r_min):
  """r_min=None with r_max set leaves r unclipped below, as TF's renorm_clipping without 'rmin'
  (TF: "missing rmax, rmin, dmax are set to inf, 0, inf"); the paper's 1 / r_max must be given."""
  rng = np.random.RandomState(0)
  x = (rng.randn(8, 3, 3, 4) * 0.1 + 0.5).astype(np.float32)  # batch std ~0.1 << renorm_stddev = 1
  eps = 1e-3
  layer = BatchNorm(renorm=True, renorm_r_max=2.0, renorm_r_min=r_min, epsilon=eps)  # no scale, beta = 0
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  y, _ = layer.apply(variables, x, train=True, mutable=['batch_stats'])
  xd = x.astype(np.float64)
  mean, var = xd.mean((0, 1, 2)), xd.var((0, 1, 2))
  r = np.clip(np.sqrt(var + eps) / 1.0, expected_r_min, 2.0)   # renorm_stddev starts at 1
  d = (mean - 0.0) / 1.0                                         # renorm_mean starts at 0; d unclipped
  assert np.all(np.sqrt(var + eps) < 0.5)                        # a lower bound of 0.5 would act here
  np.testing.assert_allclose(y, (xd - mean) / np.sqrt(var + eps) * r + d, rtol=1e-5, atol=1e-5)


def _renorm_ghost_reference(x, stats, gbs, decay, renorm_decay, eps):
  """numpy: contiguous ghost groups; r, d per group from the pre-update renorm averages;
  every average takes the mean over groups of the group mean / sqrt(var + eps)."""
  groups = x.astype(np.float64).reshape(-1, gbs, *x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  m, v = groups.mean(axes), groups.var(axes)            # (G, C)
  s = np.sqrt(v + eps)
  rs = np.maximum(stats['renorm_stddev'], np.sqrt(eps))
  r, d = s / rs, (m - stats['renorm_mean']) / rs
  ex = lambda a: a[:, None, None, None, :]
  y = ((groups - ex(m)) / ex(s) * ex(r) + ex(d)).reshape(x.shape)
  ema = lambda old, new, dec: old - (1 - dec) * (old - new)
  new = dict(moving_mean=ema(stats['moving_mean'], m.mean(0), decay),
             moving_stddev=ema(stats['moving_stddev'], s.mean(0), decay),
             renorm_mean=ema(stats['renorm_mean'], m.mean(0), renorm_decay),
             renorm_stddev=ema(stats['renorm_stddev'], s.mean(0), renorm_decay))
  new['moving_variance'] = np.maximum(new['moving_stddev'] ** 2 - eps, 0)
  return y, new


def test_renorm_with_ghost_batches_matches_numpy_per_group_reference():
  """Each ghost batch is renormalized by its own r and d. Our choice, not tf_keras': its
  virtual_batch_size with renorm groups strided examples and takes one r and d, and the
  stddev it averages, from the group-averaged moments (BatchNorm's docstring)."""
  rng = np.random.RandomState(1)
  x = (rng.randn(8, 3, 3, 4) * np.arange(1, 9).reshape(8, 1, 1, 1) + 2).astype(np.float32)
  layer = BatchNorm(renorm=True, renorm_decay=0.8, decay=0.9, ghost_batch_size=4)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  stats = {k: np.asarray(v, np.float64) for k, v in variables['batch_stats'].items()}
  stats.update(renorm_mean=np.full(4, 0.5), renorm_stddev=np.full(4, 2.0))
  y, upd = layer.apply({**variables, 'batch_stats': {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}},
                       x, train=True, mutable=['batch_stats'])
  ref_y, ref = _renorm_ghost_reference(x, stats, 4, 0.9, 0.8, layer.epsilon)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for k, v in ref.items():
    np.testing.assert_allclose(upd['batch_stats'][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_clipping_start_without_a_ramp_holds_plain_bn_then_jumps():
  layer = BatchNorm(renorm=True, renorm_r_max=1.5, renorm_d_max=0.5, renorm_clipping_start_step=2)
  x = jnp.asarray(np.random.RandomState(4).randn(6, 4) * 2 + 3, jnp.float32)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  stats = {**variables['batch_stats'], 'renorm_mean': jnp.full((4,), 1.0), 'renorm_stddev': jnp.full((4,), 4.0)}
  plain = BatchNorm(fused=False)
  y_plain, _ = plain.apply(plain.init(jax.random.PRNGKey(0), x, train=False), x, train=True, mutable=['batch_stats'])
  outputs = []
  for _ in range(3):
    y, updates = layer.apply({**variables, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
    stats = {**updates['batch_stats'], 'renorm_mean': jnp.full((4,), 1.0), 'renorm_stddev': jnp.full((4,), 4.0)}
    outputs.append(y)
  np.testing.assert_allclose(outputs[1], y_plain, rtol=1e-6, atol=1e-6)  # steps 0 and 1: r = 1, d = 0
  assert not np.allclose(outputs[2], y_plain, atol=1e-3)  # step 2: the full bounds at once


def test_renorm_adds_no_operation_per_element_to_the_train_step():
  # r and d fold into the per-channel scale and offset; an extra per-element add had cost 5 %
  # more flops in the benchmark's layer. Per-channel work (r, d, two more averages) is allowed.
  shape = (4, 8, 8, 16)
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 0.5
  def flops(layer):
    variables = layer.init(jax.random.PRNGKey(1), x, train=False)
    def step(params, x):
      return layer.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    def forward_backward(params, x):
      y, pullback, updates = jax.vjp(lambda p: step(p, x), params, has_aux=True)
      return y, pullback(jnp.ones(shape)), updates  # y too: else XLA drops the forward's last ops
    return jax.jit(forward_backward).lower(variables['params'], x).compile().cost_analysis()['flops']
  plain, renormed = (flops(BatchNorm(scale=True, renorm=flag)) for flag in (False, True))
  assert renormed - plain < 0.25 * np.prod(shape), (plain, renormed)
