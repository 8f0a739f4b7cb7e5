"""Throughput of the whole training loop: slim's ResNet v1 50 recipe on synthetic data.

    python train.py --config=configs/synthetic_resnet_v1_50.py --workdir=/tmp/synthetic

The images are one fixed batch of random pixels (copied to the device every step, as real
batches are), so `train/images_per_second` in metrics.jsonl is what the loop itself
sustains: it should equal the bare train step's figure from `python -m benchmarks.run`
(`train_loop` cases compare the two). Nothing is learned; the final evaluation is one batch.
"""

import ml_collections

from configs import imagenet_resnet_v1_50


def get_config() -> ml_collections.ConfigDict:
  """The ImageNet ResNet v1 50 recipe on synthetic data, to time the training loop itself."""
  config = imagenet_resnet_v1_50.get_config()
  config.data.name = 'synthetic'
  config.data.preprocessing = 'none'
  config.data.num_classes = 1000
  config.data.num_examples = config.get_ref('batch_size')  # the final evaluation: one batch
  config.eval_split = 'test'
  config.num_train_steps = 300
  config.warmup_steps = 10
  config.log_every_steps = 50  # the first interval includes compilation
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 0  # only the final state
  config.keep_checkpoints = 1
  return config
