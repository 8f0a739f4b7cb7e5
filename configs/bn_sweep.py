"""BN sweep on digits: decay x zero-debias x batch size x steps (python -m resnet_flax.bn_sweep).

Every base field stays overridable (--config.data.name=cifar10 --config.data.dir=...), and so is
the grid: --config.sweep.decay='(0.9,0.999)'. A grid field set to a 1-tuple is simply fixed.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  """The BN sweep's base run (digits) and its grid, `config.sweep`, for `python -m resnet_flax.bn_sweep`."""
  config = digits.get_config()
  # Runs are short: checkpoint and log often enough that an interrupted run loses little
  # and the training curves have points.
  config.checkpoint_every_steps = 50
  config.log_every_steps = 25
  config.sweep = ml_collections.ConfigDict({
      # Grid axes: one run per combination.
      'decay': (0.9, 0.99, 0.999),  # config.bn.decay
      'zero_debias_moving_mean': (False, True),  # config.bn.zero_debias_moving_mean
      # One batch size keeps the default grid (6 runs) to a few minutes on 2 CPU cores;
      # '(16,64)' adds the batch-size axis.
      'batch_size': (32,),  # config.batch_size
      'num_train_steps': (150,),  # config.num_train_steps
      # The same for every run.
      'eval_every_steps': 25,  # points on the accuracy curve (sets config.eval_every_steps)
      'recalibration_batches': 20,  # precise-BN training batches for the recalibrated column; 0: none
  })
  return config
