"""The initial train state: compiled with run-once options, equal to a plain init, and still
built where an XLA version no longer knows those options."""

import jax
import jax.numpy as jnp
import optax
import pytest

from resnet_flax import train_state
from resnet_flax.models import resnet_v1


def _tiny_model():
  return resnet_v1.ResNetV1(block_sizes=((4, 1, 1),), num_classes=3)


def _leaves_equal(a, b):
  return all(jnp.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_the_run_once_compile_gives_the_plain_init():
  model, tx, rng = _tiny_model(), optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(3)
  state = train_state.create_train_state(model, tx, rng, (8, 8, 1))
  plain = jax.jit(train_state.train_state_initializer(model, tx, (8, 8, 1)))(rng)
  assert int(state.step) == 0 and state.batch_stats
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(plain)
  assert _leaves_equal(state, plain)


def test_compile_options_an_xla_does_not_know_fall_back_to_a_plain_compile(monkeypatch):
  monkeypatch.setattr(train_state, 'RUN_ONCE_COMPILER_OPTIONS', {'xla_option_of_another_version': 0})
  lowered = jax.jit(lambda: jnp.arange(3.0) * 2).lower()
  assert jnp.array_equal(train_state.compile_run_once(lowered)(), jnp.array([0.0, 2.0, 4.0]))


def test_other_compile_failures_are_not_hidden(monkeypatch):
  monkeypatch.setattr(train_state, 'RUN_ONCE_COMPILER_OPTIONS', {'xla_backend_optimization_level': 'not a number'})
  with pytest.raises(RuntimeError) as raised:
    train_state.compile_run_once(jax.jit(lambda: jnp.ones(2)).lower())
  assert 'No such compile option' not in str(raised.value)


@pytest.mark.parametrize('image_shape', [(8, 8), (2, 8, 8, 1), (8, 8, 0), (8.0, 8, 1), 8])
def test_an_image_shape_that_is_no_images_is_refused_naming_the_argument(image_shape):
  # A batch's shape, or (height, width), had been reported as the model's inputs: "ResNet inputs are (2, 8, 8)".
  with pytest.raises(ValueError, match=r"^image_shape=.* must be one image's \(height, width, channels\), e\.g\. "
                                       r'\(224, 224, 3\): positive whole numbers, without the batch\.$'):
    train_state.abstract_train_state(_tiny_model(), optax.sgd(0.1), image_shape)
  train_state.abstract_train_state(_tiny_model(), optax.sgd(0.1), [8, 8, 1])  # a list is a shape too
