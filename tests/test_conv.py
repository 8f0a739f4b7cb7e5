"""`layers/conv.py`'s BatchNorm folding (`Conv2D.fold_batch_norm_in_eval`): in eval mode the
same function as the unfolded model to rounding, with no per-channel multiply left after a
convolution, and nothing changed in train mode or in the variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from resnet_flax import model_builder, models
from resnet_flax.layers import BatchNorm, Conv2D
from resnet_flax.layers import normalization

MODELS = ('resnet_v1_tiny', 'resnet_v2_tiny')


def _trained_looking(variables, seed):
  """Moving statistics and gamma/beta away from their initial values, so folding has work to do."""
  rng = np.random.default_rng(seed)
  def perturb(path, leaf):
    name = jax.tree_util.keystr(path)
    low, high = (0.3, 2.0) if ('variance' in name or 'gamma' in name) else (-0.3, 0.3)
    values = rng.uniform(low, high, leaf.shape) if ('BatchNorm' in name or 'preact' in name or
                                                    'postnorm' in name) else np.asarray(leaf)
    return jnp.asarray(values, leaf.dtype)
  return jax.tree_util.tree_map_with_path(perturb, variables)


def _images(seed=0, batch=4):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, 32, 32, 3)), jnp.float32)


def _model_and_variables(name, seed=0, **overrides):
  plain = models.get_model(name, num_classes=5, **overrides)
  folded = models.get_model(name, num_classes=5, fold_batch_norm_in_eval=True, **overrides)
  variables = _trained_looking(plain.init(jax.random.PRNGKey(seed), _images(), train=False), seed)
  return plain, folded, variables


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('bn', [{}, {'batch_norm_scale': False}, {'batch_norm_center': False}])
def test_folded_eval_is_the_same_function_in_float32(name, bn):
  plain, folded, variables = _model_and_variables(name, **bn)
  images = _images(1)
  want = plain.apply(variables, images, train=False)
  got = folded.apply(variables, images, train=False)
  assert float(jnp.max(jnp.abs(want))) > 0.1  # the perturbed statistics leave a signal to compare
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('name', MODELS)
def test_folded_bfloat16_eval_errs_about_as_much_as_plain_bfloat16(name):
  reference, _, variables = _model_and_variables(name, seed=3)
  images = _images(2, batch=8)
  exact = reference.apply(variables, images, train=False)
  def relative_error(fold):
    model = models.get_model(name, num_classes=5, dtype=jnp.bfloat16, fold_batch_norm_in_eval=fold)
    got = model.apply(variables, images, train=False).astype(jnp.float32)
    return float(jnp.sqrt(jnp.mean((got - exact) ** 2) / jnp.mean(exact ** 2)))
  plain_error, folded_error = relative_error(False), relative_error(True)
  # bfloat16 keeps 8 bits: about 1 % after a dozen layers; folding rounds the scaled weights
  # instead of the conv outputs, which may cost a little but not a different order.
  assert plain_error < 0.03 and folded_error < 2.5 * plain_error, (plain_error, folded_error)


@pytest.mark.parametrize('name', MODELS)
def test_train_mode_and_variables_are_untouched(name):
  plain, folded, variables = _model_and_variables(name)
  assert jax.tree_util.tree_structure(folded.init(jax.random.PRNGKey(0), _images(), train=False)) == \
      jax.tree_util.tree_structure(variables)
  step = lambda model: model.apply(variables, _images(1), train=True, mutable=['batch_stats'])
  (want, want_stats), (got, got_stats) = step(plain), step(folded)
  np.testing.assert_array_equal(got, want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_stats, want_stats)


def _activation_multiplies(model, variables):
  """Multiplications shaped as a batch of activations (not as a kernel): the BN normalizations."""
  images = _images(batch=5)  # no kernel is 5 wide
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(variables)
  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      shape = eqn.outvars[0].aval.shape
      total += eqn.primitive.name == 'mul' and len(shape) == 4 and shape[0] == images.shape[0]
      for param in eqn.params.values():
        if hasattr(param, 'jaxpr'):
          total += count(param.jaxpr)
    return total
  return count(jaxpr.jaxpr)


def test_no_activation_sized_multiply_is_left_after_a_convolution():
  plain, folded, variables = _model_and_variables('resnet_v1_tiny')
  conv_batch_norms = len(jax.tree_util.tree_leaves(variables['batch_stats'])) // 2
  assert _activation_multiplies(plain, variables) == conv_batch_norms
  assert _activation_multiplies(folded, variables) == 0
  # v2's preact and postnorm follow no convolution: they stay.
  plain, folded, variables = _model_and_variables('resnet_v2_tiny')
  standalone = sum('preact' in jax.tree_util.keystr(path) or 'postnorm' in jax.tree_util.keystr(path)
                   for path, _ in jax.tree_util.tree_leaves_with_path(variables['batch_stats'])) // 2
  assert 0 < standalone < _activation_multiplies(plain, variables)
  assert _activation_multiplies(folded, variables) == standalone


def test_a_conv_layer_folds_its_batch_norm_and_activation():
  layer = lambda fold: Conv2D(6, 3, normalizer=lambda **kw: BatchNorm(scale=True, activation=jax.nn.relu6, **kw),
                              activation=jnp.tanh, fold_batch_norm_in_eval=fold)
  x = _images(4)[..., :2]
  variables = _trained_looking(layer(False).init(jax.random.PRNGKey(1), x, train=False), 4)
  folded, plain = (layer(fold).apply(variables, x, train=False) for fold in (True, False))
  np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-6)


def test_eval_affine_is_normalize():
  rng = np.random.default_rng(5)
  x, mean, gamma, beta = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((7, 3), (3,), (3,), (3,)))
  variance = jnp.asarray(rng.uniform(0.1, 3.0, 3), jnp.float32)
  for g, b in ((gamma, beta), (None, beta), (gamma, None), (None, None)):
    scale, shift = normalization.eval_affine(mean, variance, g, b, 1e-3)
    np.testing.assert_allclose(x * scale + shift, normalization.normalize(x, mean, variance, g, b, 1e-3),
                               rtol=1e-6, atol=1e-6)


def test_frozen_gamma_and_beta_get_no_gradient_folded_either():
  _, folded, variables = _model_and_variables('resnet_v1_tiny', batch_norm_frozen_gamma_beta=True)
  grads = jax.grad(lambda p: jnp.sum(folded.apply({**variables, 'params': p}, _images(), train=False) ** 2))(
      variables['params'])
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    if 'BatchNorm' in jax.tree_util.keystr(path):
      assert not np.any(np.asarray(grad)), jax.tree_util.keystr(path)
    elif 'weights' in jax.tree_util.keystr(path) and 'conv1' in jax.tree_util.keystr(path):
      assert np.any(np.asarray(grad)), jax.tree_util.keystr(path)  # the conv weights still learn


def test_a_checkpoint_without_the_gamma_the_layer_wants_is_refused_not_taken_as_one():
  _, folded, variables = _model_and_variables('resnet_v1_tiny')
  drop_gamma = lambda tree: {k: drop_gamma(v) for k, v in tree.items() if k != 'gamma'} if isinstance(tree, dict) \
      else tree
  with pytest.raises(ValueError, match='no gamma among its params.*batch_norm_scale=False'):
    folded.apply({**variables, 'params': drop_gamma(variables['params'])}, _images(), train=False)


def test_a_normalizer_that_cannot_fold_is_named():
  class Plain(nn.Module):  # a normalizer without BatchNorm's affine map
    dtype: object = None
    @nn.compact
    def __call__(self, x, *, train):
      return x
  layer = Conv2D(3, 1, normalizer=Plain, fold_batch_norm_in_eval=True)
  variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 2)), train=False)
  with pytest.raises(ValueError, match='Plain cannot be folded.*fold_batch_norm_in_eval'):
    layer.apply(variables, jnp.ones((1, 4, 4, 2)), train=False)


def test_a_model_folded_without_its_moving_statistics_is_refused():
  _, folded, variables = _model_and_variables('resnet_v1_tiny')
  with pytest.raises(ValueError, match="no moving statistics to fold.*'batch_stats'"):
    folded.apply({'params': variables['params']}, _images(), train=False)


def test_the_config_switch_reaches_every_conv():
  config = default.get_config()
  config.model, config.bn.fold_in_eval = 'resnet_v1_tiny', True
  model = model_builder.build_model(config, num_classes=5)
  assert model.arg_scope.fold_batch_norm_in_eval
  assert not model_builder.build_model(default.get_config(), num_classes=5).arg_scope.fold_batch_norm_in_eval
