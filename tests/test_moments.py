"""Both batch-moment algorithms against float64 numpy and hand-derived gradients, and the
platform choice between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import moments
from resnet_flax.models import resnet_v1
from test_multi_device import _run_code

ALGORITHMS = {'centred': moments.centred_moments, 'shifted': moments.shifted_moments,
              'batch_moments': moments.batch_moments}
algorithms = pytest.mark.parametrize('algorithm', list(ALGORITHMS))


@algorithms
@pytest.mark.parametrize('mean,std', [(1e4, 1.0), (300.0, 0.01), (-50.0, 1e-3), (0.0, 1.0)])
def test_moments_stay_exact_when_the_mean_dwarfs_the_spread(algorithm, mean, std):
  x = (mean + std * np.random.default_rng(0).standard_normal((16, 7, 7, 8))).astype(np.float32)
  expected = x.astype(np.float64).var(axis=(0, 1, 2))
  got_mean, got_variance = ALGORITHMS[algorithm](jnp.asarray(x), (0, 1, 2))
  np.testing.assert_allclose(got_mean, x.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-6 * std)
  np.testing.assert_allclose(got_variance, expected, rtol=1e-5)
  if abs(mean) / std > 100:  # Unshifted E[x^2] - E[x]^2 in float32 is useless here: the case has teeth.
    naive = np.mean(np.square(x), axis=(0, 1, 2)) - np.square(np.mean(x, axis=(0, 1, 2)))
    assert np.max(np.abs(naive - expected) / expected) > 0.5


@algorithms
@pytest.mark.parametrize('shape, axes', [((12, 5), (0,)), ((6, 7, 3), (0, 1)), ((5, 1, 1, 4), (0, 1, 2)),
                                         ((4, 3, 2, 2, 3), (0, 1, 2, 3)),
                                         ((3, 4, 2, 2, 3), (1, 2, 3))])  # ghost batches: 3 groups of 4
def test_moments_of_any_rank_equal_numpys(algorithm, shape, axes):
  x = (7.0 + np.random.default_rng(3).standard_normal(shape) * np.arange(1, shape[-1] + 1)).astype(np.float32)
  mean, variance = ALGORITHMS[algorithm](jnp.asarray(x), axes)
  np.testing.assert_allclose(mean, x.astype(np.float64).mean(axes), rtol=1e-6)
  np.testing.assert_allclose(variance, x.astype(np.float64).var(axes), rtol=1e-5)


@algorithms
@pytest.mark.parametrize('offset', [3.0, 1e4, 5e4])  # a hand-written variance gradient about the float mean: 5e-3 off
def test_gradients_are_those_of_the_exact_mean_and_variance(algorithm, offset):
  x = (offset + np.random.default_rng(1).standard_normal((6, 3, 3, 2))).astype(np.float32)
  mean_weights, variance_weights = np.float32([1.5, 0.25]), np.float32([0.5, -2.0])

  def weighted(x):
    mean, variance = ALGORITHMS[algorithm](x, (0, 1, 2))
    return jnp.sum(mean * mean_weights + variance * variance_weights)

  grad = jax.jit(jax.grad(weighted))(jnp.asarray(x))
  x64, n = x.astype(np.float64), 6 * 3 * 3
  # d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n, by hand.
  expected = mean_weights / n + 2 * (x64 - x64.mean(axis=(0, 1, 2))) / n * variance_weights
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_the_gradient_leaves_the_platform_switch_to_the_forward_pass():
  # Differentiated through, the switch was linearized for both algorithms: a second switch in the
  # gradient, and two thirds of a ResNet-50 train step's trace time (benchmarks/RESULTS.md).
  x = jnp.ones((4, 3, 3, 2))
  total = lambda x: sum(jnp.sum(m) for m in moments.batch_moments(x, (0, 1, 2)))
  assert str(jax.make_jaxpr(total)(x)).count('cond[') == 1
  assert str(jax.make_jaxpr(jax.grad(total))(x)).count('cond[') == 1
  # bfloat16 activations: float32 statistics, and their gradient in the input's dtype.
  x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 3, 3, 2)).astype(np.float32))
  grad = jax.grad(total)(x.astype(jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(grad), jax.grad(total)(x), rtol=2e-2, atol=1e-3)


def test_batch_norms_of_one_shape_trace_each_algorithm_once(monkeypatch):
  calls = []
  centred = moments.centred_moments
  monkeypatch.setattr(moments, 'centred_moments', lambda *args, **kwargs: calls.append(1) or centred(*args, **kwargs))
  moments._algorithm_over.cache_clear()  # so the switch binds the counting one
  try:
    x = jnp.ones((4, 3, 3, 2))
    jax.make_jaxpr(lambda x: [moments.batch_moments(x * scale, (0, 1, 2)) for scale in (1.0, 2.0, 3.0)])(x)
    assert len(calls) == 1
  finally:
    moments._algorithm_over.cache_clear()


def test_cpu_compiles_the_centred_algorithm():
  x = jnp.asarray((5.0 + np.random.default_rng(2).standard_normal((4, 5, 5, 3))).astype(np.float32))
  compiled = lambda fn: jax.jit(fn, static_argnums=1)(x, (0, 1, 2))
  chosen, centred, shifted = (compiled(fn) for fn in (moments.batch_moments, moments.centred_moments,
                                                       moments.shifted_moments))
  for got, want in zip(chosen, centred):
    np.testing.assert_array_equal(got, want)
  # The two algorithms round differently, so the bit-for-bit match above singles one out.
  assert any(not np.array_equal(a, b) for a, b in zip(centred, shifted))


def test_a_train_step_lowered_for_gpu_takes_the_shifted_sums_in_every_batch_norm():
  # Lowering for another platform needs none of its devices: the GPU's choice is checked here,
  # in a whole model's gradient, by the one slice the shifted sums take their shift with.
  model = resnet_v1.ResNetV1(block_sizes=((4, 2, 2),), num_classes=3)
  images = jnp.ones((4, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
    return jnp.mean(logits ** 2)
  def slices(platform):
    lowered = jax.jit(jax.grad(loss)).trace(variables['params']).lower(lowering_platforms=(platform,))
    return lowered.as_text().count('stablehlo.slice')
  batch_norms = len(jax.tree_util.tree_leaves(variables['batch_stats'])) // 2  # moving mean and variance each
  assert batch_norms == 8
  assert slices('cuda') - slices('cpu') == batch_norms


# Each algorithm's moments and gradients with the batch split over 8 devices, against one
# device, for the layer's statistics alone and inside a small ResNet's train-mode gradient:
# the shifted algorithm slices its shift out of every example, and such slices of a
# batch-sharded input have gone wrong before (an offset slice, with XLA's optimizations off
# as the tests run, gave wrong gradients elsewhere in the model). The tests' CPU picks the
# centred algorithm, so the shifted one is patched in for the model.
SHARDED_MOMENTS = '''
import json
import jax, jax.numpy as jnp, numpy as np
from resnet_flax import models, sharding
from resnet_flax.layers import batch_norm, moments
mesh = sharding.data_mesh()
split_batch = lambda x: sharding.to_global_batch({'x': x}, mesh)['x']
gap = lambda a, b: max(float(jnp.max(jnp.abs(u - v)) / (1.0 + jnp.max(jnp.abs(v)))) for u, v in  # relative
                       zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
on_mesh = lambda fn, *replicated: jax.jit(fn, in_shardings=(*(sharding.replicated(mesh),) * len(replicated),
                                                            sharding.batch_sharded(mesh)),
                                          out_shardings=sharding.replicated(mesh))
x = jnp.asarray((2.0 + np.random.default_rng(0).standard_normal((16, 3, 3, 4))).astype(np.float32))
weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32))
gaps = {}
for name in ('batch_moments', 'centred_moments', 'shifted_moments'):
  def weighted(x):
    mean, variance = getattr(moments, name)(x, (0, 1, 2))
    return jnp.sum(mean * weights[0] + variance * weights[1]), (mean, variance)
  step = jax.value_and_grad(weighted, has_aux=True)
  gaps[name] = gap(on_mesh(step)(split_batch(x)), jax.jit(step)(x))

model = models.get_model('resnet_v1_tiny', num_classes=10).clone(block_sizes=((4, 2, 2),))
images = jnp.asarray(np.random.default_rng(2).standard_normal((16, 16, 16, 3)).astype(np.float32))
variables = model.init(jax.random.PRNGKey(0), images[:2], train=False)
def loss(params, images):  # and the new moving statistics
  logits, updates = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
  return jnp.sum(logits * jnp.arange(10.0)), updates['batch_stats']
# The same model with its statistics shared along the mesh axis by the layer itself, in shard_map.
shared_model = models.get_model('resnet_v1_tiny', num_classes=10, batch_norm_axis_name=sharding.DATA_AXIS
                                ).clone(block_sizes=((4, 2, 2),))
def shared_loss(params, images):
  logits, updates = shared_model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
  return jax.lax.psum(jnp.sum(logits * jnp.arange(10.0)), sharding.DATA_AXIS), updates['batch_stats']
P = jax.sharding.PartitionSpec
in_shard_map = jax.shard_map(shared_loss, mesh=mesh, in_specs=(P(), P(sharding.DATA_AXIS)), out_specs=(P(), P()))
for name in ('centred_moments', 'shifted_moments'):
  # batch_moments with its algorithm forced, before tracing: each jit below traces afresh.
  batch_norm.batch_moments = moments.hand_differentiated(getattr(moments, name))
  step = jax.value_and_grad(loss, has_aux=True)
  whole = jax.jit(step)(variables['params'], images)
  on_devices = on_mesh(step, 'params')(sharding.replicate(variables['params'], mesh), split_batch(images))
  gaps['model_' + name] = gap(on_devices, whole)
  shared = jax.jit(jax.value_and_grad(in_shard_map, has_aux=True))(sharding.replicate(variables['params'], mesh),
                                                                   split_batch(images))
  gaps['shard_map_' + name] = gap(shared, whole)  # loss, moving statistics and gradients
print(json.dumps({'devices': len(mesh.devices.flat), **gaps}))
'''


def test_moments_and_gradients_of_a_batch_split_over_devices_are_one_devices():
  gaps = _run_code(SHARDED_MOMENTS, 8)
  assert gaps.pop('devices') == 8
  assert set(gaps) == {'batch_moments', 'centred_moments', 'shifted_moments', 'model_centred_moments',
                       'model_shifted_moments', 'shard_map_centred_moments', 'shard_map_shifted_moments'}
  # Relative gaps: the summation order differs between 1 and 8 devices (1e-7 in the moments,
  # amplified to ~5e-6 through a model's BN backward passes); a wrong gradient would be O(1)
  # (per-device statistics of 2 examples, as without batch_norm_axis_name, move the loss by far more).
  assert all(gap < (1e-4 if name.startswith(('model_', 'shard_map_')) else 1e-5) for name, gap in gaps.items()), gaps
