"""The train step of a toy model (our BatchNorm, one `weights` kernel, `biases`) against a second
code path: numpy cross entropy and top-k, slim's L2 by hand, jax.grad of a loss written here,
SGD's first momentum step by hand; and what a skipped non-finite step keeps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_flax import steps
from resnet_flax.layers import BatchNorm
from resnet_flax.train_state import TrainState
from test_losses import numpy_correct_top_k, numpy_cross_entropy

FEATURES, CLASSES = 4, 8


class _Toy(nn.Module):
  """BatchNorm then a dense layer; with `sqrt_kernel`, the kernel enters as sqrt(w) (w = 0: finite
  loss, infinite gradient)."""
  sqrt_kernel: bool = False

  @nn.compact
  def __call__(self, x, *, train):
    x = BatchNorm(decay=0.5, center=True, scale=True)(x, train=train).reshape(x.shape[0], -1)
    init = nn.initializers.zeros if self.sqrt_kernel else nn.initializers.normal(1.0)
    w = self.param('weights', init, (FEATURES, CLASSES))
    b = self.param('biases', nn.initializers.normal(0.5), (CLASSES,))
    return x @ (jnp.sqrt(w) if self.sqrt_kernel else w) + b


def _state(model, tx, seed=0):
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((2, 1, 1, FEATURES)), train=False)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    batch_stats=variables['batch_stats'], opt_state=tx.init(variables['params']))


def _batch(seed=0, mask=(1, 1, 0, 1, 1, 0, 1, 1)):
  rng = np.random.default_rng(seed)
  n = len(mask)
  return {'image': (rng.normal(size=(n, 1, 1, FEATURES)) * 2 + 1).astype(np.float32),
          'label': rng.integers(0, CLASSES, n).astype(np.int32), 'mask': np.float32(mask)}


# Pins (a mutation audit found each unpinned): top-k over real examples only, 'loss' without L2
# and 'total_loss' with it, grad_norm of the gradients, L2 and label smoothing in the optimized
# loss, the new optimizer state, moving statistics and step count carried.
def test_train_step_matches_a_hand_computation():
  model, tx = _Toy(), optax.sgd(0.1, momentum=0.9)
  state, batch = _state(model, tx), _batch()
  # Labels by the rank of the class in the (label-independent) train-mode logits: real examples
  # ranked 0, 2, 7, 4, 5, 1 (top-1: 1 of 6, top-5: 4 of 6); the two padding slots ranked 0.
  logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
                          mutable=['batch_stats'])
  order = np.argsort(-np.asarray(logits), axis=-1)
  batch['label'] = order[np.arange(8), [0, 2, 0, 7, 4, 0, 5, 1]].astype(np.int32)
  wd, bn_wd, smoothing = 0.05, 0.3, 0.2
  new_state, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, weight_decay=wd,
                                                             bn_weight_decay=bn_wd,
                                                             label_smoothing=smoothing))(state, batch)
  mask = batch['mask'].astype(bool)

  def reference_loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
                                  mutable=['batch_stats'])
    targets = jax.nn.one_hot(batch['label'], CLASSES) * (1 - smoothing) + smoothing / CLASSES
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits), -1)
    data = jnp.sum(per_example * batch['mask']) / jnp.sum(batch['mask'])
    bn = params['BatchNorm_0']
    l2 = (0.5 * wd * jnp.sum(params['weights'] ** 2)
          + 0.5 * bn_wd * (jnp.sum(bn['gamma'] ** 2) + jnp.sum(bn['beta'] ** 2)))
    return data + l2, (logits, updates['batch_stats'])

  (_, (logits, new_stats)), grads = jax.value_and_grad(reference_loss, has_aux=True)(state.params)
  data_loss = numpy_cross_entropy(logits, batch['label'], smoothing)[mask].mean()
  # The kernel (not biases) with weight_decay; BatchNorm's gamma (1) and beta (0) with bn_weight_decay.
  l2 = 0.5 * wd * np.sum(np.asarray(state.params['weights'], np.float64) ** 2) + 0.5 * bn_wd * FEATURES
  assert float(metrics['loss']) == pytest.approx(data_loss, rel=1e-5)
  assert float(metrics['total_loss']) == pytest.approx(data_loss + l2, rel=1e-5)
  for k in (1, 5):
    expected = numpy_correct_top_k(np.asarray(logits), batch['label'], batch['mask'], k) / mask.sum()
    assert float(metrics[f'top{k}']) == pytest.approx(expected), k
  assert (float(metrics['top1']), float(metrics['top5'])) == pytest.approx((1 / 6, 4 / 6))
  flat_grads = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])
  assert float(metrics['grad_norm']) == pytest.approx(np.linalg.norm(flat_grads), rel=1e-5)
  assert float(metrics['nonfinite']) == 0.0
  assert int(new_state.step) == 1
  # SGD's first momentum step: trace = g, w -= lr * g.
  for name in ('weights', 'biases'):
    np.testing.assert_allclose(new_state.params[name], state.params[name] - 0.1 * grads[name], rtol=1e-5, atol=1e-6)
  for name in ('gamma', 'beta'):
    bn_before, bn_grad = state.params['BatchNorm_0'][name], grads['BatchNorm_0'][name]
    np.testing.assert_allclose(new_state.params['BatchNorm_0'][name], bn_before - 0.1 * bn_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.opt_state[0].trace['weights'], grads['weights'], rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state.batch_stats, new_stats)
  # The moving mean moved half way (decay 0.5) to the mean of the whole batch (BN counts padding).
  np.testing.assert_allclose(new_state.batch_stats['BatchNorm_0']['moving_mean'],
                             0.5 * batch['image'].reshape(-1, FEATURES).mean(0), rtol=1e-5)


# With the optimizer state of the NaN step kept, every later step was NaN and skipped while the
# params stayed finite: a check of the params alone passed.
def test_a_skipped_non_finite_step_keeps_params_statistics_and_optimizer_state():
  model, tx = _Toy(), optax.sgd(0.1, momentum=0.9)
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, weight_decay=1e-3, label_smoothing=0.0,
                                               skip_nonfinite=True))
  start = _state(model, tx)
  after_one, metrics = step(start, _batch(1))  # a finite step is taken, skip or not
  assert float(metrics['nonfinite']) == 0.0 and int(after_one.step) == 1
  assert not np.allclose(after_one.params['weights'], start.params['weights'])
  assert not np.allclose(after_one.batch_stats['BatchNorm_0']['moving_mean'],
                         start.batch_stats['BatchNorm_0']['moving_mean'])
  poisoned = _batch(2)
  poisoned['image'][0, 0, 0, 1] = np.nan
  after_two, metrics = step(after_one, poisoned)
  assert float(metrics['nonfinite']) == 1.0
  assert int(after_two.step) == 2  # the count advances: the data order stays an unskipped run's
  for kept, before in [(after_two.params, after_one.params), (after_two.batch_stats, after_one.batch_stats),
                       (after_two.opt_state, after_one.opt_state)]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, before)


# sqrt(w) at w = 0: a finite loss (log 8), infinite gradients.
def test_a_finite_loss_with_non_finite_gradients_is_skipped():
  model, tx = _Toy(sqrt_kernel=True), optax.sgd(0.1)
  state = _state(model, tx)
  new_state, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, weight_decay=0.0,
                                                             label_smoothing=0.0, skip_nonfinite=True))(state, _batch())
  assert np.isfinite(float(metrics['loss'])) and not np.isfinite(float(metrics['grad_norm']))
  assert float(metrics['nonfinite']) == 1.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.params, state.params)


def test_a_skipped_step_advances_the_learning_rate_schedule_with_the_step():
  # The schedule's count had been kept with the rest of the optimizer state: after k skips the
  # rate applied at step t was schedule(t - k), while train.py logged schedule(t).
  schedule = optax.piecewise_constant_schedule(1.0, {2: 0.1})  # 1.0 at steps 0 and 1, 0.1 from step 2
  model, tx = _Toy(), optax.sgd(schedule)
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, weight_decay=0.0, label_smoothing=0.0,
                                               skip_nonfinite=True))
  poisoned = _batch(1)
  poisoned['image'][0, 0, 0, 0] = np.nan
  skipped, metrics = step(_state(model, tx), poisoned)
  assert float(metrics['nonfinite']) == 1.0
  before, batch = step(skipped, _batch(2))[0], _batch(3)
  after, _ = step(before, batch)  # step index 2: rate 0.1

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': before.batch_stats}, batch['image'], train=True,
                            mutable=['batch_stats'])
    per_example = -jnp.sum(jax.nn.one_hot(batch['label'], CLASSES) * jax.nn.log_softmax(logits), -1)
    return jnp.sum(per_example * batch['mask']) / jnp.sum(batch['mask'])

  grads = jax.grad(loss)(before.params)
  np.testing.assert_allclose(after.params['biases'], before.params['biases'] - 0.1 * grads['biases'], rtol=1e-5)


def test_without_bn_weight_decay_only_the_kernel_is_decayed():
  # resnet_arg_scope's L2: conv weights alone, BatchNorm's gamma (1) and beta untouched.
  model, tx = _Toy(), optax.sgd(0.1)
  state = _state(model, tx)
  weights = np.asarray(state.params['weights'], np.float64)
  _, metrics = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, weight_decay=0.05,
                                                     label_smoothing=0.0))(state, _batch())
  assert float(metrics['total_loss']) - float(metrics['loss']) == pytest.approx(0.5 * 0.05 * np.sum(weights ** 2),
                                                                                rel=1e-4)


def test_eval_step_given_a_train_state_names_the_variables_to_pass():
  model, tx = _Toy(), optax.sgd(0.1)
  state = _state(model, tx)
  with pytest.raises(TypeError, match=r"not a TrainState: pass \{'params': state.params"):
    steps.eval_step(state, _batch(), model=model)
  sums = steps.eval_step({'params': state.params, 'batch_stats': state.batch_stats}, _batch(), model=model)
  assert float(sums['num_examples']) == 6.0
