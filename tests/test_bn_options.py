"""BatchNorm's `batch_weights`, `data_format='NCHW'` and initializers against tf_slim's numbers
(`fixtures/slim_bn_options.npz`, written by `fixtures/make_bn_options_fixtures.py`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import BatchNorm
from resnet_flax.layers.moments import weighted_moments
from resnet_flax.slim import names

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_bn_options.npz')


def _cases() -> dict[str, dict[str, np.ndarray]]:
  with np.load(FIXTURE) as data:
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
      case, leaf = key.split('/', 1)
      cases.setdefault(case, {})[leaf] = data[key]
  return cases


CASES = _cases()


def _layer(config: dict) -> BatchNorm:
  initializers = {}
  if config.get('initializers'):
    initializers = {f'{name}_init': jax.nn.initializers.constant(value) for name, value in config['initial'].items()}
  return BatchNorm(decay=config['decay'], epsilon=config['epsilon'], center=True, scale=True,
                   fused=config.get('fused', True), zero_debias_moving_mean=config.get('zero_debias', False),
                   renorm=config.get('renorm', False), data_format=config.get('data_format', 'NHWC'), **initializers)


def _slim(case: dict, prefix: str) -> dict[str, np.ndarray]:
  return {key.removeprefix(prefix): value for key, value in case.items() if key.startswith(prefix)}


def test_the_fixture_holds_every_option():
  assert sorted(CASES) == ['initializers', 'initializers_renorm', 'nchw_fused', 'nchw_fused_zd', 'nchw_nonfused',
                           'nchw_nonfused_zd', 'nchw_weighted', 'weighted_2d', 'weighted_2d_zd', 'weighted_4d',
                           'weighted_4d_zd']


@pytest.mark.parametrize('name', sorted(CASES))
def test_init_eval_train_gradients_and_update_match_tf_slim(name):
  case = CASES[name]
  config = json.loads(str(case['config']))
  layer = _layer(config)
  x, g = case['x'], case['g']
  weights = case['weights'] if config['weighted'] else None
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  ours = names.to_slim(variables, 'BatchNorm')
  theirs = _slim(case, 'init/')
  assert set(ours) == set(theirs)
  for key, value in theirs.items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-6, err_msg=f'{name} init {key}')
  np.testing.assert_allclose(layer.apply(variables, x, train=False), case['eval_y'], rtol=1e-5, atol=1e-5)

  def loss(params, x):
    y, updates = layer.apply({**variables, 'params': params}, x, train=True, batch_weights=weights,
                             mutable=['batch_stats'])
    return jnp.sum(y * g), (y, updates)

  (_, (y, updates)), (grad_params, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables['params'], x)
  np.testing.assert_allclose(y, case['train_y'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, case['grad/x'], rtol=1e-4, atol=1e-5)
  for leaf in ('gamma', 'beta'):
    np.testing.assert_allclose(grad_params[leaf], case[f'grad/{leaf}'], rtol=1e-4, atol=1e-5)
  ours = names.to_slim({**variables, **updates}, 'BatchNorm')
  for key, value in _slim(case, 'after/').items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-5, err_msg=f'{name} after {key}')


def test_an_example_of_weight_zero_changes_nothing_and_weight_two_counts_twice():
  # Frequency weights, checked by hand: weight 2 is the example twice, weight 0 is no example.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32) + 3.0
  mean, variance = weighted_moments(x, np.array([2.0, 0.0, 1.0]).reshape(3, 1, 1, 1), (0, 1, 2))
  repeated = np.concatenate([x[:1], x[:1], x[2:]]).astype(np.float64)
  np.testing.assert_allclose(mean, repeated.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(variance, repeated.var((0, 1, 2)), rtol=1e-5)
  zero_mean, zero_variance = weighted_moments(x, np.zeros((3, 1, 1, 1)), (0, 1, 2))
  assert not np.any(zero_mean) and not np.any(zero_variance)  # as TF's div_no_nan


def test_weights_take_each_ghost_batch_s_own_examples():
  x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
  weights = np.array([1, 0, 1, 1, 2, 1, 0, 1], np.float32)
  layer = BatchNorm(ghost_batch_size=4, decay=0.0, fused=False)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  _, updates = layer.apply(variables, x, train=True, batch_weights=weights, mutable=['batch_stats'])
  groups = [weighted_moments(x[i:i + 4], weights[i:i + 4, None], (0,)) for i in (0, 4)]
  np.testing.assert_allclose(updates['batch_stats']['moving_mean'], np.mean([m for m, _ in groups], 0), rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['moving_variance'], np.mean([v for _, v in groups], 0),
                             rtol=1e-6)


@pytest.mark.parametrize('weights, layer, error', [
    (np.ones((3,), np.float32), BatchNorm(), r'batch_weights must be one float weight per example, shape \(4,\)'),
    (np.ones((4,), np.int32), BatchNorm(), r'got int32 \(4,\)'),
    (np.ones((4,), np.float32), BatchNorm(renorm=True), 'renorm is not supported with batch_weights'),
])
def test_batch_weights_that_cannot_be_used_are_refused_in_one_line(weights, layer, error):
  x = np.ones((4, 2, 2, 3), np.float32)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  with pytest.raises(ValueError, match=error):
    layer.apply(variables, x, train=True, batch_weights=weights, mutable=['batch_stats'])


def test_an_unknown_data_format_is_refused():
  with pytest.raises(ValueError, match=r"data_format='NWHC' is unknown; use 'NHWC'"):
    BatchNorm(data_format='NWHC').init(jax.random.PRNGKey(0), np.ones((2, 3)), train=False)
