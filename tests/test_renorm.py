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
                   # TF leaves an absent rmin unclipped; ours would default it to 1 / rmax.
                   renorm_r_min=clipping.get('rmin', 0.0 if 'rmax' in clipping else None),
                   renorm_d_max=clipping.get('dmax'))


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
