"""BatchNorm's train-mode outputs and gradients against the analytic BN gradient in float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import BatchNorm

EPSILON = 1e-3


def reference(x, g, gamma, beta, epsilon=EPSILON, relu=False):
  """y and the gradients of sum(y * g) for x, gamma and beta, statistics over all axes but the last."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  axes = tuple(range(x.ndim - 1))
  sigma = np.sqrt(x.var(axes) + epsilon)
  xhat = (x - x.mean(axes)) / sigma
  y = xhat * gamma + beta
  if relu:
    g = g * (y > 0)
    y = np.maximum(y, 0.0)
  dx = gamma / sigma * (g - g.mean(axes) - xhat * (g * xhat).mean(axes))
  return y, dx, (g * xhat).sum(axes), g.sum(axes)


def ghost_reference(x, g, gamma, beta, size):
  """`reference` per group of `size` consecutive examples; gamma and beta sum their groups' gradients."""
  parts = [reference(x[i:i + size], g[i:i + size], gamma, beta) for i in range(0, len(x), size)]
  y, dx, dgamma, dbeta = zip(*parts)
  return np.concatenate(y), np.concatenate(dx), np.sum(dgamma, 0), np.sum(dbeta, 0)


def layer_grads(layer, x, g, gamma, beta, train=True, stats=None):
  """The layer's y and the gradients of sum(y * g) for x, gamma and beta."""
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  stats = variables['batch_stats'] if stats is None else {**variables['batch_stats'], **stats}

  def loss(params, x):
    y, _ = layer.apply({'params': params, 'batch_stats': stats}, x, train=train, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * g), y

  params = {'gamma': jnp.asarray(gamma, jnp.float32), 'beta': jnp.asarray(beta, jnp.float32)}
  (_, y), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))
  return y, dx, dparams['gamma'], dparams['beta']


def inputs(shape, seed):
  """x with a different mean and spread per channel, a cotangent g, and gamma (one negative) and beta."""
  rng = np.random.RandomState(seed)
  channels = shape[-1]
  x = (rng.randn(*shape) * rng.uniform(0.2, 5.0, channels) + rng.uniform(-3, 3, channels)).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, channels) * np.where(np.arange(channels) == 1, -1, 1)
  return x, rng.randn(*shape).astype(np.float32), gamma.astype(np.float32), rng.randn(channels).astype(np.float32)


def assert_matches(got, want, rtol=1e-5, atol=1e-5):
  for name, a, b in zip(('y', 'dx', 'dgamma', 'dbeta'), got, want):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize('shape', [(8, 5), (4, 3, 3, 4)])
def test_train_gradients_match_analytic(shape):
  x, g, gamma, beta = inputs(shape, 0)
  layer = BatchNorm(scale=True, epsilon=EPSILON)
  assert_matches(layer_grads(layer, x, g, gamma, beta), reference(x, g, gamma, beta))


def test_constant_channel_outputs_beta_with_finite_gradients():
  x, g, gamma, beta = inputs((6, 2, 2, 3), 1)
  x[..., 2] = 0.3  # not a power of two: the float32 mean may be an ulp off the value
  got = layer_grads(BatchNorm(scale=True, epsilon=EPSILON), x, g, gamma, beta)
  for value in got:
    assert np.all(np.isfinite(value))
  np.testing.assert_allclose(got[0][..., 2], np.broadcast_to(beta[2], x.shape[:-1]), atol=1e-5)
  # dx there is gamma / sqrt(epsilon) * (g - mean(g)): ~30x g, hence the looser atol.
  assert_matches(got, reference(x, g, gamma, beta), atol=1e-4)


def test_relu_activation_in_train_matches_analytic():
  x, g, gamma, beta = inputs((6, 2, 2, 4), 2)
  layer = BatchNorm(scale=True, epsilon=EPSILON, activation=jax.nn.relu)
  want = reference(x, g, gamma, beta, relu=True)
  assert 0 < np.mean(want[0] > 0) < 1  # some outputs on each side of the kink
  assert_matches(layer_grads(layer, x, g, gamma, beta), want)


def test_relu_activation_in_eval_matches_numpy():
  x, g, gamma, beta = inputs((6, 2, 2, 4), 3)
  mean, variance = np.float32([0.5, -1.0, 2.0, 0.0]), np.float32([2.0, 0.5, 4.0, 1e-2])
  layer = BatchNorm(scale=True, epsilon=EPSILON, activation=jax.nn.relu)
  stats = {'moving_mean': jnp.asarray(mean), 'moving_variance': jnp.asarray(variance)}
  y, dx, dgamma, dbeta = layer_grads(layer, x, g, gamma, beta, train=False, stats=stats)
  xhat = (x.astype(np.float64) - mean) / np.sqrt(variance.astype(np.float64) + EPSILON)
  pre = xhat * gamma + beta
  assert 0 < np.mean(pre > 0) < 1
  active = g * (pre > 0)
  want = (np.maximum(pre, 0), active * gamma / np.sqrt(variance.astype(np.float64) + EPSILON),
          (active * xhat).sum((0, 1, 2)), active.sum((0, 1, 2)))
  assert_matches((y, dx, dgamma, dbeta), want)


def test_bfloat16_gradients_match_analytic_to_bfloat16_rounding():
  rng = np.random.RandomState(4)
  x32 = (rng.randn(8, 3, 3, 4) * [1.0, 10.0, 0.1, 3.0] + [50.0, -200.0, 1.0, 0.0]).astype(np.float32)
  x = jnp.asarray(x32, jnp.bfloat16)
  # bfloat16-exact cotangents, so that the only rounding is of y and dx themselves.
  g = np.asarray(jnp.asarray(rng.randn(*x.shape), jnp.bfloat16).astype(jnp.float32))
  gamma, beta = np.float32([0.5, -1.5, 1.0, 2.0]), np.float32([0.1, -0.2, 0.3, 5.0])
  y, dx, dgamma, dbeta = layer_grads(BatchNorm(scale=True, epsilon=EPSILON), x, g, gamma, beta)
  assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
  assert dgamma.dtype == jnp.float32 and dbeta.dtype == jnp.float32
  xe = np.asarray(x.astype(jnp.float32), np.float64)  # the values the layer saw
  want = reference(xe, g, gamma, beta)
  # Rounding to bfloat16 (8 significant bits) is off by at most 2^-8 relative; float32 statistics
  # keep the rest at float32 accuracy (bfloat16 ones would be off by ~1 at -200).
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want[0], rtol=2 ** -8, atol=1e-5)
  # One rounding of dx: its two paths (the normalization's gamma / sigma * g and the statistics')
  # add in float32 before the cast back. Each cast to bfloat16 on its own was off by 2^-8 of
  # the larger path, 13 % of dx where they cancel.
  np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), want[1], rtol=2 ** -8, atol=1e-5)
  np.testing.assert_allclose(dgamma, want[2], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dbeta, want[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape, size, options', [
    ((8, 2, 2, 3), 4, {}),
    ((12, 3), 3, dict(fused=False, zero_debias_moving_mean=True, zero_debias_moving_variance=True)),
], ids=['fused', 'unfused-zero-debias'])
def test_ghost_batch_gradients_are_per_group(shape, size, options):
  x, g, gamma, beta = inputs(shape, 5)
  # Examples with growing spread, so that any other grouping changes the statistics.
  x *= np.linspace(1, 4, shape[0], dtype=np.float32).reshape(-1, *[1] * (len(shape) - 1))
  layer = BatchNorm(scale=True, epsilon=EPSILON, ghost_batch_size=size, **options)
  assert_matches(layer_grads(layer, x, g, gamma, beta), ghost_reference(x, g, gamma, beta, size))


def test_large_mean_output_within_float32_limit():
  rng = np.random.RandomState(6)
  means, stds = np.array([1e4, -1e4, 5e4, 1e3]), np.array([1.0, 1.0, 1.0, 0.1])
  x = (rng.randn(8, 3, 3, 4) * stds + means).astype(np.float32)
  layer = BatchNorm(epsilon=1e-5)
  y, _ = layer.apply(layer.init(jax.random.PRNGKey(0), x, train=False), x, train=True, mutable=['batch_stats'])
  want = reference(x, np.zeros_like(x), 1.0, 0.0, epsilon=1e-5)[0]
  error = np.asarray(y, np.float64) - want
  x64 = x.astype(np.float64)
  sigma = np.sqrt(x64.var((0, 1, 2)) + 1e-5)
  floor = 0.5 * np.spacing(np.float32(np.abs(x64.mean((0, 1, 2))))).astype(np.float64) / sigma
  # Any float32 x - mean is off by up to `floor` (one rounding of the mean); a float32 sum of
  # 72 values adds a few ulps more (moments.py keeps them), so allow 8 ulps of the mean.
  assert np.all(np.abs(error).max((0, 1, 2)) <= 16 * floor)
  # What remains after that per-channel shift is the scale: float32-accurate, which an
  # uncorrected or cancelling variance is not.
  spread = np.abs(error - error.mean((0, 1, 2))).max((0, 1, 2))
  assert np.all(spread <= 2e-6 * np.abs(want).max((0, 1, 2)))
