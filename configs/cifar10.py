"""CIFAR-10 (python-pickle directory) with slim's ResNet v2 50 without its root block.

    python train.py --config=configs/cifar10.py --config.data.dir=/path/cifar-10-batches-py
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """CIFAR-10 with slim's ResNet v2 50, without the root block for 32x32 images."""
  config = default.get_config()
  config.model = 'resnet_v2_50'
  # 32x32 inputs: the 7x7/2 root and 3x3/2 pool would leave 8x8 before block1.
  config.model_options.include_root_block = False
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.augment = True
  config.batch_size = 128
  config.num_train_steps = 64_000
  config.warmup_steps = 1_000
  config.learning_rate = 0.1
  config.lr_batch_size = 128
  config.weight_decay = 5e-4
  config.bn.decay = 0.99
  config.log_every_steps = 200
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 2_000
  return config
