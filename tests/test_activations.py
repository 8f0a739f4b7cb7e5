"""ReLU and ReLU6 as TF's: the values and gradients of tf.nn.relu / relu6, NaN kept, also where
XLA fuses them into a reduction (the global pool)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.layers import activations

INPUTS = np.array([np.nan, -np.inf, -1.0, -0.0, 0.0, 2.0, 6.0, 7.0, np.inf], np.float32)
# tf.nn.relu / relu6 and their gradients (tf.GradientTape) on INPUTS, tensorflow-cpu 2.21.
TF_RELU = [np.nan, 0.0, 0.0, 0.0, 0.0, 2.0, 6.0, 7.0, np.inf]
TF_RELU_GRADIENT = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
TF_RELU6 = [np.nan, 0.0, 0.0, 0.0, 0.0, 2.0, 6.0, 6.0, 6.0]
TF_RELU6_GRADIENT = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize('activation, values, gradient', [
    (activations.relu, TF_RELU, TF_RELU_GRADIENT),
    (activations.relu6, TF_RELU6, TF_RELU6_GRADIENT),
])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_are_tfs(activation, values, gradient, dtype):
  x = jnp.asarray(INPUTS, dtype)
  out = jax.jit(activation)(x)
  assert out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(values, np.float32))
  grad = jax.grad(lambda v: jnp.sum(activation(v)))(x)
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(gradient, np.float32))


def test_finite_inputs_give_jaxs_relu_bit_for_bit():
  x = np.random.default_rng(0).normal(size=(4, 5, 5, 8)).astype(np.float32)
  np.testing.assert_array_equal(activations.relu(x), jax.nn.relu(x))
  np.testing.assert_array_equal(activations.relu6(4 * x), jax.nn.relu6(4 * x))


@pytest.mark.parametrize('activation', [activations.relu, activations.relu6])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_a_nan_feature_reaches_the_pooled_mean(activation, dtype):
  # XLA:CPU (jaxlib 0.10, 0.11) fuses max(x, 0) into this reduction as maxnum: jax.nn.relu's NaN
  # features pooled to finite numbers, and a diverged model scored a top-1 of 100% (every logit tied).
  # jax.nn.relu6 lost them in bfloat16 only.
  features = np.random.default_rng(0).normal(size=(128, 8, 8, 16)).astype(np.float32)
  features[:, 3, 3, :] = np.nan
  pooled = jax.jit(lambda x: jnp.mean(activation(x.astype(dtype)), axis=(1, 2)))(features)
  assert np.isnan(np.asarray(pooled)).all()
