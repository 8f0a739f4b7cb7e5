"""BatchNorm's `batch_weights`, `data_format='NCHW'`, initializers and `adjustment` against
tf_slim's numbers (`fixtures/slim_bn_options.npz`, written by `fixtures/make_bn_options_fixtures.py`)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import BatchNorm
from resnet_flax.layers.moments import weighted_moments
from resnet_flax.slim import names
from test_bn_ranks import npz_cases

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_bn_options.npz')
CASES = npz_cases(FIXTURE)


def _layer(config: dict, case: dict) -> BatchNorm:
  options = {}
  if config.get('initializers'):
    options = {f'{name}_init': jax.nn.initializers.constant(value) for name, value in config['initial'].items()}
  if config.get('renorm'):
    clipping = config['renorm_clipping']
    options.update(renorm=True, renorm_r_max=clipping['rmax'], renorm_r_min=clipping['rmin'],
                   renorm_d_max=clipping['dmax'])
  if config.get('adjusted'):  # TF's draws were fixed values: the key goes unused
    options['adjustment'] = lambda shape, key: (case['adj_scale'], case['adj_offset'])
  return BatchNorm(decay=config['decay'], epsilon=config['epsilon'], center=True, scale=True,
                   fused=config.get('fused', True), zero_debias_moving_mean=config.get('zero_debias', False),
                   data_format=config.get('data_format', 'NHWC'), **options)


def _slim(case: dict, prefix: str) -> dict[str, np.ndarray]:
  return {key.removeprefix(prefix): value for key, value in case.items() if key.startswith(prefix)}


def test_the_fixture_holds_every_option():
  assert sorted(CASES) == ['adjustment', 'adjustment_per_example', 'adjustment_renorm', 'initializers',
                           'initializers_renorm', 'nchw_fused', 'nchw_fused_zd', 'nchw_nonfused', 'nchw_nonfused_zd',
                           'nchw_weighted', 'weighted_2d', 'weighted_2d_zd', 'weighted_4d', 'weighted_4d_zd']


@pytest.mark.parametrize('name', sorted(CASES))
def test_init_eval_train_gradients_and_update_match_tf_slim(name):
  case = CASES[name]
  config = json.loads(str(case['config']))
  layer = _layer(config, case)
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
                             mutable=['batch_stats'], rngs={'adjustment': jax.random.PRNGKey(2)})
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


@pytest.mark.parametrize('weights', [[1, 0, 1, 1, 2, 1, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0], [1, 2, 1, 1, 1, 1, 1, 1]])
def test_weights_take_each_ghost_batch_s_own_examples_and_groups_count_by_their_weight(weights):
  # Frequency weights: a group of total weight 3 stands for 3 examples, one of 0 (padding at the
  # batch's end) for none. Averaged alike, a padding group had fed moments of 0, halving the
  # moving mean's step and the variance's.
  x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32) + 2.0
  weights = np.array(weights, np.float32)
  layer = BatchNorm(ghost_batch_size=4, decay=0.0, fused=False)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  _, updates = layer.apply(variables, x, train=True, batch_weights=weights, mutable=['batch_stats'])
  groups = [weighted_moments(x[i:i + 4], weights[i:i + 4, None], (0,)) for i in (0, 4)]
  totals = [weights[:4].sum(), weights[4:].sum()]
  np.testing.assert_allclose(updates['batch_stats']['moving_mean'],
                             np.average([m for m, _ in groups], axis=0, weights=totals), rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['moving_variance'],
                             np.average([v for _, v in groups], axis=0, weights=totals), rtol=1e-5)
  if totals[1] == 0:  # the real examples' group alone: as the layer without ghost batches takes them
    _, whole = BatchNorm(decay=0.0, fused=False).apply(variables, x[:4], train=True, batch_weights=weights[:4],
                                                       mutable=['batch_stats'])
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-5), updates, whole)


@pytest.mark.parametrize('weights, layer, error', [
    (np.ones((3,), np.float32), BatchNorm(), r'batch_weights must be one real weight per example, shape \(4,\)'),
    (np.ones((4, 1), np.float32), BatchNorm(), r'got float32 \(4, 1\)'),
    (np.ones((4,), np.float32), BatchNorm(renorm=True), 'renorm is not supported with batch_weights'),
])
def test_batch_weights_that_cannot_be_used_are_refused_in_one_line(weights, layer, error):
  x = np.ones((4, 2, 2, 3), np.float32)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  with pytest.raises(ValueError, match=error):
    layer.apply(variables, x, train=True, batch_weights=weights, mutable=['batch_stats'])


def test_counts_and_masks_weigh_as_their_float_values_and_eval_mode_ignores_weights():
  x = np.random.default_rng(4).normal(size=(4, 2, 2, 3)).astype(np.float32)
  layer = BatchNorm(decay=0.0)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  train = lambda weights: layer.apply(variables, x, train=True, batch_weights=weights, mutable=['batch_stats'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, train(np.array([2, 0, 1, 1], np.int32)),
                         train(np.array([2.0, 0.0, 1.0, 1.0], np.float32)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, train(np.array([True, False, True, True])),
                         train(np.array([1.0, 0.0, 1.0, 1.0], np.float32)))
  np.testing.assert_array_equal(layer.apply(variables, x, train=False, batch_weights=np.array([1.0, 0, 0, 0])),
                                layer.apply(variables, x, train=False))


def test_initializers_and_zero_debias_start_as_tf_and_init_needs_no_key_for_the_defaults():
  layer = BatchNorm(zero_debias_moving_mean=True, moving_mean_init=jax.nn.initializers.constant(0.5),
                    moving_variance_init=jax.nn.initializers.constant(2.0), scale=True)
  stats = layer.init(jax.random.PRNGKey(0), np.ones((2, 3), np.float32), train=False)['batch_stats']
  np.testing.assert_array_equal(stats['moving_mean'], [0.5] * 3)  # TF: the biased state at 0, the mean at its init
  np.testing.assert_array_equal(stats['moving_mean_biased'], [0.0] * 3)
  np.testing.assert_array_equal(stats['moving_variance'], [2.0] * 3)
  assert BatchNorm(center=False).init({}, np.ones((2, 3), np.float32), train=False)['batch_stats']  # drew nothing, as before


def test_nchw_needs_a_channel_axis():
  with pytest.raises(ValueError, match=r"data_format='NCHW' needs channels on axis 1, but the input has shape \(3,\)"):
    BatchNorm(data_format='NCHW').init(jax.random.PRNGKey(0), np.ones((3,)), train=False)


def test_an_unknown_data_format_is_refused():
  with pytest.raises(ValueError, match=r"data_format='NWHC' is unknown; use 'NHWC'"):
    BatchNorm(data_format='NWHC').init(jax.random.PRNGKey(0), np.ones((2, 3)), train=False)


def _shift_and_scale(shape, key):
  """A fixed per-example adjustment for (4, 3) inputs; the key is ignored."""
  del key
  return np.array([[1.5], [0.5], [1.0], [2.0]], np.float32), np.array([[0.1], [-0.2], [0.0], [0.3]], np.float32)


def test_an_adjustment_acts_on_each_ghost_batch_s_x_hat_in_train_mode_only():
  x = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
  layer = BatchNorm(ghost_batch_size=2, adjustment=_shift_and_scale, epsilon=1e-3)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  y, _ = layer.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'adjustment': jax.random.PRNGKey(1)})
  scale, offset = _shift_and_scale(x.shape, None)
  groups = x.reshape(2, 2, 3).astype(np.float64)
  x_hat = ((groups - groups.mean(1, keepdims=True)) / np.sqrt(groups.var(1, keepdims=True) + 1e-3)).reshape(4, 3)
  np.testing.assert_allclose(y, x_hat * scale + offset, rtol=1e-5, atol=1e-6)
  # Eval mode, and frozen statistics, take no adjustment (nor need a key).
  plain = BatchNorm(ghost_batch_size=2, epsilon=1e-3)
  np.testing.assert_array_equal(layer.apply(variables, x, train=False), plain.apply(variables, x, train=False))
  frozen = layer.clone(frozen=True)
  np.testing.assert_array_equal(frozen.apply(variables, x, train=True), plain.apply(variables, x, train=False))


def test_an_adjusted_layer_feeds_the_biased_variance_as_slim_s_non_fused_code():
  # tf-keras refuses fused=True with an adjustment; slim users pass fused=False. Here fused=True
  # (the default) takes the same non-fused path.
  x = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
  updates = [BatchNorm(adjustment=_shift_and_scale, fused=fused, decay=0.0).apply(
      BatchNorm().init(jax.random.PRNGKey(0), x, train=False), x, train=True, mutable=['batch_stats'],
      rngs={'adjustment': jax.random.PRNGKey(1)})[1] for fused in (True, False)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, *updates)
  np.testing.assert_allclose(updates[0]['batch_stats']['moving_variance'], x.var(0), rtol=1e-5)


@pytest.mark.parametrize('adjustment, rngs, error', [
    (_shift_and_scale, {}, r"has an adjustment, whose random draws need a key: apply in train mode with rngs="),
    (lambda shape, key: (np.ones((5, 1)), np.zeros(())), {'adjustment': jax.random.PRNGKey(0)},
     r"the adjustment's scale has shape \(5, 1\), which does not broadcast to the input's \(4, 3\)"),
])
def test_an_adjustment_without_a_key_or_of_another_shape_is_refused_in_one_line(adjustment, rngs, error):
  x = np.ones((4, 3), np.float32)
  layer = BatchNorm(adjustment=adjustment)
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  with pytest.raises(ValueError, match=error):
    layer.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
