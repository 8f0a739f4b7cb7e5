"""The BN sweep's grid at its edges: decay 0, steps and sizes that are not positive integers, the
order given, zero recalibration and eval interval, a batch as big as the eval split."""

import numpy as np
import pytest

from resnet_flax import bn_sweep
from resnet_flax.bn_sweep import grid
from test_bn_sweep import TINY, _config


# Decay 0 (the moving value is the last batch's) is in [0, 1); an int decay reads as the float it is.
def test_decay_zero_is_in_range_and_reads_as_a_float():
  (run,) = grid.expand(_config(decay=(0,), zero_debias_moving_mean=(False,), batch_size=(8,), num_train_steps=(5,)))
  assert run.name == 'decay0.0_debias0_bs8_steps5'
  assert isinstance(run.settings['decay'], float) and run.config.bn.decay == 0.0


# A grid of numpy scalars (np.linspace(...).astype(np.float32)) had been refused: "0.9 is not a number".
def test_numpy_scalars_are_taken_as_the_numbers_they_print_as():
  (run,) = grid.expand(_config(decay=(np.float32(0.9),), zero_debias_moving_mean=(np.bool_(True),),
                               batch_size=(np.int64(8),), num_train_steps=(np.int32(5),)))
  assert run.name == 'decay0.9_debias1_bs8_steps5'
  assert run.settings == {'decay': 0.9, 'zero_debias_moving_mean': True, 'batch_size': 8, 'num_train_steps': 5}
  assert [type(value) for value in run.settings.values()] == [float, bool, int, int]
  assert (run.config.bn.decay, run.config.bn.zero_debias_moving_mean, run.config.batch_size) == (0.9, True, 8)
  with pytest.raises(ValueError, match=r'config.sweep.decay: 1.0 is not a number in \[0, 1\)'):
    grid.expand(_config(decay=(np.float64(1.0),)))
  with pytest.raises(ValueError, match='config.sweep.batch_size: 8.0 is not a positive integer'):
    grid.expand(_config(batch_size=(np.float32(8),)))


@pytest.mark.parametrize('sweep, message', [
    ({'num_train_steps': (0,)}, 'config.sweep.num_train_steps: 0 is not a positive integer'),
    ({'num_train_steps': (-5,)}, 'config.sweep.num_train_steps: -5 is not a positive integer'),
    ({'batch_size': (True,)}, 'config.sweep.batch_size: True is not a positive integer'),
    ({'num_train_steps': (True,)}, 'config.sweep.num_train_steps: True is not a positive integer'),
])
def test_grid_refuses_steps_and_sizes_that_are_not_positive_integers(sweep, message):
  with pytest.raises(ValueError, match=message):
    grid.expand(_config(**sweep))


# The grid keeps the order given, decay slowest, and refuses a repeat in any axis.
def test_grid_keeps_the_given_order_and_refuses_a_repeat_in_any_axis():
  runs = grid.expand(_config(decay=(0.99, 0.9), zero_debias_moving_mean=(True, False), batch_size=(32, 8),
                             num_train_steps=(10,)))
  expected = [(decay, debias, size) for decay in (0.99, 0.9) for debias in (True, False) for size in (32, 8)]
  assert [(run.settings['decay'], run.settings['zero_debias_moving_mean'], run.settings['batch_size'])
          for run in runs] == expected
  with pytest.raises(ValueError, match='would run twice'):
    grid.expand(_config(batch_size=(16, 16)))


# recalibration_batches=0 means no recalibrated column (configs/bn_sweep.py says so) and
# eval_every_steps=0 no curve; both are allowed.
def test_zero_recalibration_batches_and_eval_interval_are_allowed():
  (run,) = grid.expand(_config(decay=(0.9,), zero_debias_moving_mean=(False,), recalibration_batches=0,
                               eval_every_steps=0))
  assert run.config.eval_every_steps == 0


# A batch as big as the eval split (360 digits) is allowed; one more is not.
def test_a_grid_batch_size_equal_to_the_eval_split_is_allowed():
  config = _config(TINY, batch_size=(360,))
  bn_sweep.check_batch_sizes(grid.expand(config), config)
  with pytest.raises(ValueError, match=r'has \[361\]'):
    config = _config(TINY, batch_size=(361,))
    bn_sweep.check_batch_sizes(grid.expand(config), config)


def test_moving_averages_of_the_model_are_refused_in_a_sweep():
  # Its curves would be the variables' and its tables the averages': one row, two models.
  config = _config()
  config.model_ema_decay = 0.999
  with pytest.raises(ValueError, match='config.model_ema_decay=0.999: the sweep measures the BatchNorm statistics '
                                       'of the variables it trains'):
    grid.expand(config)
