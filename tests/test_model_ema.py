"""Exponential moving averages of the model's variables (config.model_ema_decay, `model_ema.py`):
TF's ExponentialMovingAverage rule by hand, the train step's averages against a recursion over
the states it went through, and a run's checkpoints, evaluations, resume and eval.py."""

import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_flax import checkpoints, eval_lib, metrics_writer, model_ema, steps, train_lib
from resnet_flax.train_state import TrainState
from test_steps import _Toy, _batch, _state
from test_train import tiny_config


def test_the_decay_is_tfs_at_num_updates_the_step():
  # tf.train.ExponentialMovingAverage(decay, num_updates): min(decay, (1 + n) / (10 + n)).
  for step, expected in [(0, 0.1), (1, 2 / 11), (8, 0.5), (90, 0.91), (10_000, 0.999)]:
    assert float(model_ema.decay_at(0.999, step)) == pytest.approx(expected, rel=1e-6)
  assert float(model_ema.decay_at(0.5, 1_000)) == 0.5


def test_an_update_moves_each_float_toward_the_variable_and_copies_counts():
  # BatchNorm's step counters are float32 variables, copied by name; integers are copied too.
  averages = {'w': jnp.array([1.0, 4.0]), 'half': jnp.array([2.0], jnp.bfloat16), 'count': jnp.int32(3),
              'BatchNorm': {'renorm_clipping_step': jnp.float32(3), 'moving_mean_local_step': jnp.float32(2),
                            'moving_mean_biased': jnp.ones(2)}}
  variables = {'w': jnp.array([3.0, 0.0]), 'half': jnp.array([4.0], jnp.bfloat16), 'count': jnp.int32(7),
               'BatchNorm': {'renorm_clipping_step': jnp.float32(4), 'moving_mean_local_step': jnp.float32(3),
                             'moving_mean_biased': jnp.zeros(2)}}
  moved = model_ema.update(averages, variables, 0.9, 90)  # d = 0.9
  np.testing.assert_allclose(moved['w'], [1.0 + 0.1 * 2.0, 4.0 - 0.1 * 4.0], rtol=1e-6)
  assert moved['half'].dtype == jnp.bfloat16 and float(moved['half'][0]) == pytest.approx(2.2, rel=1e-2)
  assert int(moved['count']) == 7
  assert float(moved['BatchNorm']['renorm_clipping_step']) == 4.0
  assert float(moved['BatchNorm']['moving_mean_local_step']) == 3.0
  np.testing.assert_allclose(moved['BatchNorm']['moving_mean_biased'], [0.9, 0.9], rtol=1e-6)


def _with_averages(state):
  return state.replace(ema={'params': state.params, 'batch_stats': state.batch_stats})


def test_the_train_step_averages_the_states_it_reaches_and_changes_nothing_else():
  model, tx = _Toy(), optax.sgd(0.1, momentum=0.9)
  step = jax.jit(lambda s, b, decay: steps.train_step(s, b, model=model, tx=tx, weight_decay=1e-3,
                                                       label_smoothing=0.0, model_ema_decay=decay), static_argnums=2)
  plain = _state(model, tx)
  averaged = _with_averages(plain)
  expected = jax.tree_util.tree_map(np.asarray, averaged.ema)
  for index in range(4):
    plain, plain_metrics = step(plain, _batch(index), 0.0)
    averaged, metrics = step(averaged, _batch(index), 0.5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (averaged.params, averaged.batch_stats, metrics),
                           (plain.params, plain.batch_stats, plain_metrics))
    keep = min(0.5, (1 + index + 1) / (10 + index + 1))  # the step count after this step
    expected = jax.tree_util.tree_map(lambda a, v: a - (1 - keep) * (a - np.asarray(v)), expected,
                                      {'params': plain.params, 'batch_stats': plain.batch_stats})
    jax.tree_util.tree_map(lambda ours, theirs: np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7),
                           averaged.ema, expected)
  # Not the variables themselves: the average lags them.
  assert not np.allclose(averaged.ema['params']['weights'], averaged.params['weights'])


def test_a_state_with_averages_and_no_decay_is_refused():
  model, tx = _Toy(), optax.sgd(0.1)
  with pytest.raises(ValueError, match=r'the state keeps moving averages, but model_ema_decay=0\.0 would make them'):
    steps.train_step(_with_averages(_state(model, tx)), _batch(), model=model, tx=tx, weight_decay=0.0,
                     label_smoothing=0.0)


def test_a_decay_for_a_state_without_averages_is_refused():
  # The decay had been ignored: no averages were ever kept.
  model, tx = _Toy(), optax.sgd(0.1)
  with pytest.raises(ValueError, match=re.escape('model_ema_decay=0.99 but the state keeps no moving averages to '
                                                 'update; create it with them')):
    steps.train_step(_state(model, tx), _batch(), model=model, tx=tx, weight_decay=0.0, label_smoothing=0.0,
                     model_ema_decay=0.99)


def test_a_state_of_another_optimizer_is_refused_naming_the_fix():
  # It had failed deep in optax: "'ScaleByAdamState' object has no attribute 'trace'".
  model = _Toy()
  with pytest.raises(ValueError, match=re.escape("the state's optimizer state does not fit this tx (another "
                                                 'optimizer, or other options, made it)')):
    steps.train_step(_state(model, optax.adam(0.1)), _batch(), model=model, tx=optax.sgd(0.1, momentum=0.9),
                     weight_decay=0.0, label_smoothing=0.0)


def test_a_skipped_non_finite_step_keeps_the_averages():
  model, tx = _Toy(), optax.sgd(0.1, momentum=0.9)
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, weight_decay=1e-3, label_smoothing=0.0,
                                               skip_nonfinite=True, model_ema_decay=0.9))
  after_one, _ = step(_with_averages(_state(model, tx)), _batch(1))
  poisoned = _batch(2)
  poisoned['image'][0, 0, 0, 1] = np.nan
  after_two, metrics = step(after_one, poisoned)
  assert float(metrics['nonfinite']) == 1.0
  jax.tree_util.tree_map(np.testing.assert_array_equal, after_two.ema, after_one.ema)


def _ema_config(num_train_steps):
  config = tiny_config(num_train_steps)
  config.model_ema_decay = 0.9
  config.eval_every_steps = 2
  return config


def test_a_run_evaluates_saves_and_resumes_its_averages_and_eval_py_reads_them(tmp_path):
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  result = train_lib.train_and_evaluate(_ema_config(4), str(straight))
  train_lib.train_and_evaluate(_ema_config(2), str(interrupted))
  resumed = train_lib.train_and_evaluate(_ema_config(4), str(interrupted))
  assert resumed == result
  saved = [checkpoints.restore_tree(str(workdir / 'checkpoints' / '4')) for workdir in (straight, interrupted)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, saved[0], saved[1])
  assert not np.allclose(saved[0]['ema']['params']['logits']['weights'], saved[0]['params']['logits']['weights'])
  # Both evaluations at each eval step; the run's result holds the averages' under 'ema'.
  records = metrics_writer.read_records(str(straight))
  assert [r['step'] for r in records if 'eval_ema/top1' in r] == [r['step'] for r in records if 'eval/top1' in r]
  assert [r['step'] for r in records if 'eval_ema/top1' in r] == [2, 4]
  final = next(r for r in records if r['step'] == 4 and 'eval_ema/loss' in r)
  assert final['eval_ema/loss'] == pytest.approx(result['ema']['loss']) and final['eval/loss'] == result['loss']
  json.dumps(result)  # train.py prints it as a JSON line
  # eval.py: the averages with the run's config, the variables with model_ema_decay=0.
  config = _ema_config(4)
  assert eval_lib.evaluate(config, str(straight)) == pytest.approx({'step': 4, **result['ema']})
  config.model_ema_decay = 0.0
  assert eval_lib.evaluate(config, str(straight)) == pytest.approx({k: result[k] for k in result if k != 'ema'})


def test_switching_averages_on_at_a_resume_is_refused_naming_the_change(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  with pytest.raises(checkpoints.StateMismatchError, match=r'ema/.*: in this run, not saved.*Changed since: '
                                                           r'eval_every_steps: 0 -> 2; model_ema_decay: 0\.0 -> 0\.9;'):
    train_lib.train_and_evaluate(_ema_config(4), str(tmp_path))
  config = _ema_config(2)
  with pytest.raises(checkpoints.CheckpointError, match=f'checkpoint {tmp_path}/checkpoints/2 holds no moving '
                                                        'averages .* with --config.model_ema_decay=0.$'):
    eval_lib.evaluate(config, str(tmp_path))


@pytest.mark.parametrize('decay', [-0.1, 1.0, float('nan')])
def test_a_decay_outside_zero_to_one_is_refused(decay):
  config = tiny_config()
  config.model_ema_decay = decay
  with pytest.raises(ValueError, match=f'config.model_ema_decay={decay!r} is not allowed: it must be'):
    train_lib.check_training_config(config)


def test_a_checkpoint_written_before_averages_existed_restores_into_the_state(tmp_path):
  # A TrainState of the fields it had before `ema`: a run without averages reads what it wrote.
  @flax.struct.dataclass
  class StateBefore:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple

  saved = StateBefore(step=jnp.int32(3), params={'w': jnp.arange(3.0)}, batch_stats={'m': jnp.ones(2)},
                      opt_state=({'w': jnp.full(3, 2.0)},))
  checkpointer = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(3, saved)
  checkpointer.close()
  target = TrainState(step=jnp.int32(0), params={'w': jnp.zeros(3)}, batch_stats={'m': jnp.zeros(2)},
                      opt_state=({'w': jnp.zeros(3)},))
  restored = checkpoints.Checkpointer(str(tmp_path)).restore(3, target)
  assert isinstance(restored, TrainState) and restored.ema is None and int(restored.step) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, (restored.params, restored.opt_state),
                         (saved.params, saved.opt_state))
  # And a state without averages writes the same keys as before.
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'new'), async_save=False)
  checkpointer.save(1, target)
  checkpointer.close()
  assert sorted(checkpoints.restore_tree(str(tmp_path / 'new' / '1'))) == ['batch_stats', 'opt_state', 'params',
                                                                            'step']
  assert os.path.isdir(tmp_path / 'new' / '1')
