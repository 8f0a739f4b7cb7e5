"""Schedules and optimizers against hand computations: MLPerf's warm-up + polynomial decay, LARS."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, imagenet_resnet_v1_50_lars
from resnet_flax import optim


def _config(**fields):
  config = default.get_config()
  config.update(fields)
  return config


def test_polynomial_schedule_is_mlperfs():
  config = _config(lr_schedule='polynomial', learning_rate=2.0, warmup_steps=2, num_train_steps=10, lr_end=0.01,
                   lr_power=2.0)
  schedule = optim.learning_rate_schedule(config)
  # MLPerf's lars_util.py: peak * t / warmup up to the warm-up, then
  # (peak - end) * (1 - (t - warmup) / T) ** 2 + end with T = total - warmup + 1 = 9.
  expected = {0: 0.0, 1: 1.0, 2: 2.0, 3: 1.99 * (8 / 9) ** 2 + 0.01, 6: 1.99 * 25 / 81 + 0.01,
              9: 1.99 * 4 / 81 + 0.01, 11: 0.01, 50: 0.01}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-7), step
  no_warmup = optim.learning_rate_schedule(_config(lr_schedule='polynomial', learning_rate=2.0, warmup_steps=0,
                                                   num_train_steps=3, lr_end=0.0, lr_power=1.0))
  assert [float(no_warmup(t)) for t in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])


def test_step_boundaries_are_absolute_steps_warmup_included():
  # Boundaries 0.3, 0.6, 0.8 of 100 steps are steps 30, 60, 80, warm-up (20 steps, 0 -> 1) included:
  # not 20 + 30, 20 + 60, 20 + 80.
  schedule = optim.learning_rate_schedule(_config(lr_schedule='step', learning_rate=1.0, warmup_steps=20,
                                                  num_train_steps=100, lr_boundaries=(0.3, 0.6, 0.8),
                                                  lr_decay_factor=0.1))
  expected = {0: 0.0, 10: 0.5, 19: 0.95, 20: 1.0, 29: 1.0, 30: 0.1, 49: 0.1, 50: 0.1, 59: 0.1, 60: 0.01, 79: 0.01,
              80: 0.001, 99: 0.001}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-9), step


@pytest.mark.parametrize('boundaries, total, decay_steps', [
    ((0.31, 0.35), 10, (3, 4)),  # round(3.1), round(3.5): two steps, two decays (int() put both on 3)
    ((0.29,), 100, (29,)),  # 0.29 * 100 = 28.999...: round, not truncate
])
def test_step_boundaries_round_to_the_nearest_step(boundaries, total, decay_steps):
  schedule = optim.learning_rate_schedule(_config(lr_schedule='step', learning_rate=1.0, warmup_steps=0,
                                                  num_train_steps=total, lr_boundaries=boundaries,
                                                  lr_decay_factor=0.1))
  expected = [0.1 ** sum(step >= boundary for boundary in decay_steps) for step in range(total)]
  assert [float(schedule(step)) for step in range(total)] == pytest.approx(expected, rel=1e-6)
  assert optim.lr_boundary_steps(_config(num_train_steps=total, lr_boundaries=boundaries)) == decay_steps


@pytest.mark.parametrize('fields, message', [
    (dict(warmup_steps=50, num_train_steps=100, lr_boundaries=(0.3, 0.6, 0.8)),
     r'steps \(30, 60, 80\) of num_train_steps=100: each must be after the warm-up, config\.warmup_steps=50;'),
    (dict(warmup_steps=0, num_train_steps=10, lr_boundaries=(0.31, 0.34)), r'steps \(3, 3\) .* strictly increasing'),
    (dict(warmup_steps=50, num_train_steps=3, lr_boundaries=(0.3, 0.6)),
     r'steps \(1, 2\) of num_train_steps=3: .* config\.warmup_steps=50; lower config\.warmup_steps to 0\.$'),
])
def test_step_schedule_refuses_boundaries_it_cannot_honour(fields, message):
  # A library user who builds the schedule without config_checks gets the same one-line error.
  with pytest.raises(ValueError, match=r'^config\.lr_boundaries=.*' + message) as error:
    optim.learning_rate_schedule(_config(lr_schedule='step', **fields))
  assert '\n' not in str(error.value)


def test_cosine_and_polynomial_end_at_num_train_steps_warmup_included():
  # 'cosine': warm-up, then half a cosine from the peak to 0 at num_train_steps (counted from step 0).
  cosine = optim.learning_rate_schedule(_config(lr_schedule='cosine', learning_rate=1.0, warmup_steps=20,
                                                num_train_steps=100))
  expected = {0: 0.0, 10: 0.5, 20: 1.0, 40: (1 + np.cos(np.pi / 4)) / 2, 60: 0.5, 100: 0.0}
  for step, value in expected.items():
    assert float(cosine(step)) == pytest.approx(value, rel=1e-5, abs=1e-7), step
  # 'polynomial': t counts from the warm-up's end and T = total - warmup + 1, so lr_end comes at
  # num_train_steps + 1 (MLPerf's; test_polynomial_schedule_is_mlperfs has the values).
  polynomial = optim.learning_rate_schedule(_config(lr_schedule='polynomial', learning_rate=1.0, warmup_steps=20,
                                                    num_train_steps=100, lr_end=0.0, lr_power=1.0))
  assert [float(polynomial(t)) for t in (20, 60, 100, 101)] == pytest.approx([1.0, 41 / 81, 1 / 81, 0.0], abs=1e-6)


def test_unknown_schedule_and_optimizer_name_the_choices():
  with pytest.raises(ValueError, match="lr_schedule='poly' is unknown.*'polynomial'"):
    optim.learning_rate_schedule(_config(lr_schedule='poly'))
  with pytest.raises(ValueError, match="optimizer='lamb' is unknown.*'lars'"):
    optim.build_optimizer(_config(optimizer='lamb'))


def test_lars_decays_and_scales_kernels_only():
  params = {'conv1': {'weights': jnp.array([[3.0, 0.0], [0.0, 4.0]]), 'biases': jnp.array([1.0, -1.0])},
            'BatchNorm': {'gamma': jnp.array([1.0, 2.0]), 'beta': jnp.array([0.5, 0.0])}}
  grads = [jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params),
           jax.tree_util.tree_map(lambda p: jnp.full_like(p, -1.0), params)]
  config = _config(optimizer='lars', lr_schedule='constant', learning_rate=0.5, warmup_steps=0, momentum=0.9,
                   nesterov=False)
  config.lars.update(weight_decay=0.1, trust_coefficient=0.02, eps=0.0)
  assert optim.kernels_only(params) == {'conv1': {'weights': True, 'biases': False},
                                        'BatchNorm': {'gamma': False, 'beta': False}}
  tx = optim.build_optimizer(config)
  state, current, trajectory = tx.init(params), params, []
  for grad in grads:
    updates, state = tx.update(grad, state, current)
    current = optax.apply_updates(current, updates)
    trajectory.append(current)
  # The first kernel step by the numbers: u = 0.5 + 0.1 * w = [[.8, .5], [.5, .9]],
  # |u| = sqrt(1.95), |w| = 5, so w[0, 0] = 3 - 0.5 * (0.02 * 5 / sqrt(1.95)) * 0.8.
  assert float(trajectory[0]['conv1']['weights'][0, 0]) == pytest.approx(3 - 0.04 / np.sqrt(1.95), rel=1e-6)
  assert float(trajectory[0]['BatchNorm']['gamma'][0]) == pytest.approx(1.0 - 0.5 * 0.5)  # plain SGD

  # By hand: kernels get u = g + wd * w, scaled by eta * |w| / |u|; everything else the
  # plain gradient; then -lr, and momentum m = step + 0.9 * m (the first m is the step).
  def by_hand(w, grads_of_w, kernel):
    momentum = np.zeros_like(w)
    for g in grads_of_w:
      u = g + 0.1 * w if kernel else g
      ratio = 0.02 * np.linalg.norm(w) / np.linalg.norm(u) if kernel else 1.0
      momentum = -0.5 * ratio * u + 0.9 * momentum
      w = w + momentum
    return w

  for (layer, name), kernel in [(('conv1', 'weights'), True), (('conv1', 'biases'), False),
                                (('BatchNorm', 'gamma'), False), (('BatchNorm', 'beta'), False)]:
    expected = by_hand(np.asarray(params[layer][name]), [np.asarray(g[layer][name]) for g in grads], kernel)
    np.testing.assert_allclose(current[layer][name], expected, rtol=1e-6, err_msg=f'{layer}/{name}')


def test_lars_config_is_mlperfs_32k_recipe():
  config = imagenet_resnet_v1_50_lars.get_config()
  assert (config.batch_size, config.optimizer, config.weight_decay, config.lars.weight_decay) == (32768, 'lars', 0.0,
                                                                                                 1e-4)
  schedule = optim.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0
  assert float(schedule(config.warmup_steps)) == pytest.approx(31.2)
  assert float(schedule(config.num_train_steps)) == pytest.approx(1e-4, rel=0.1)
  optim.build_optimizer(config)


@pytest.mark.parametrize('schedule', ['cosine', 'step', 'constant', 'polynomial'])
def test_warmup_keeps_its_slope_in_a_run_shorter_than_it(schedule):
  # It had been cut to num_train_steps: 4 steps of a 50-step warm-up ramped to the peak in 4,
  # and lengthening the run changed the rates of the steps already taken.
  short = optim.learning_rate_schedule(_config(lr_schedule=schedule, learning_rate=1.0, warmup_steps=50,
                                               num_train_steps=4, lr_boundaries=()))
  assert [float(short(t)) for t in range(4)] == pytest.approx([0.0, 0.02, 0.04, 0.06])


def test_adamw_decays_kernels_decoupled_from_adams_step():
  # optimizer='adamw' had been Adam (decay fixed at 0); a zero gradient isolates the decay.
  params = {'conv1': {'weights': jnp.array([2.0, -4.0]), 'biases': jnp.array([1.0, 1.0])},
            'BatchNorm': {'gamma': jnp.array([1.0, 2.0])}}
  config = _config(optimizer='adamw', lr_schedule='constant', learning_rate=0.1, warmup_steps=0)
  config.adamw.weight_decay = 0.5
  tx = optim.build_optimizer(config)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['conv1']['weights'], [2.0 * (1 - 0.1 * 0.5), -4.0 * (1 - 0.1 * 0.5)], rtol=1e-6)
  np.testing.assert_array_equal(new['conv1']['biases'], params['conv1']['biases'])  # kernels only
  np.testing.assert_array_equal(new['BatchNorm']['gamma'], params['BatchNorm']['gamma'])


# cifar10.py and imagenet_resnet_v1_50.py set lr_batch_size; the LARS recipe (the one tested) does not.
def test_learning_rate_scales_linearly_with_the_batch_size():
  config = _config(learning_rate=0.1, batch_size=1024, lr_batch_size=256, lr_schedule='constant', warmup_steps=0)
  assert optim.base_learning_rate(config) == pytest.approx(0.4)
  assert float(optim.learning_rate_schedule(config)(7)) == pytest.approx(0.4)
  config.lr_batch_size = 0
  assert optim.base_learning_rate(config) == pytest.approx(0.1)  # 0: unscaled


def _trajectory(config, w, grads):
  tx = optim.build_optimizer(config)
  params = {'conv1': {'weights': jnp.asarray(w)}}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({'conv1': {'weights': jnp.asarray(g)}}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params['conv1']['weights'])


_GRADS = [np.float32([0.5, 1.0]), np.float32([-1.0, 0.25]), np.float32([2.0, 2.0])]


# The default optimizer's update (no other test runs it).
@pytest.mark.parametrize('momentum, nesterov', [(0.9, True), (0.9, False), (0.0, False)])
def test_sgd_momentum_and_nesterov_by_hand(momentum, nesterov):
  config = _config(optimizer='sgd', lr_schedule='constant', learning_rate=0.5, warmup_steps=0, momentum=momentum,
                   nesterov=nesterov)
  # By hand (TF's MomentumOptimizer, use_nesterov as slim's train_image_classifier):
  # v = m * v + g; w -= lr * (g + m * v) with Nesterov, lr * v without.
  w, v = np.float32([1.0, -2.0]), np.zeros(2)
  for g in _GRADS:
    v = momentum * v + g
    w = w - 0.5 * (g + momentum * v if nesterov else v)
  np.testing.assert_allclose(_trajectory(config, [1.0, -2.0], _GRADS), w, rtol=1e-6)


# test_lars_decays_and_scales_kernels_only runs nesterov=False only.
def test_lars_with_nesterov_by_hand():
  config = _config(optimizer='lars', lr_schedule='constant', learning_rate=0.5, warmup_steps=0, momentum=0.9,
                   nesterov=True)
  config.lars.update(weight_decay=0.1, trust_coefficient=0.02, eps=0.0)
  w, m = np.float64([3.0, -4.0]), np.zeros(2)
  for g in _GRADS:
    u = g + 0.1 * w
    step = -0.5 * 0.02 * np.linalg.norm(w) / np.linalg.norm(u) * u
    m = step + 0.9 * m
    w = w + step + 0.9 * m  # Nesterov: the step plus the new momentum
  np.testing.assert_allclose(_trajectory(config, [3.0, -4.0], _GRADS), w, rtol=1e-5)
