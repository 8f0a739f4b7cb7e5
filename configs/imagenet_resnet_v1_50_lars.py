"""ImageNet, ResNet v1 50 at batch 32768 with LARS: MLPerf's large-batch recipe.

    python train.py --config=configs/imagenet_resnet_v1_50_lars.py --config.data.dir=/path/imagenet

The settings of MLPerf's 32k-batch ResNet-50 runs on TPU pods (reference: mlcommons/training
image_classification, lars_util.py): LARS with the trust ratio and weight decay on kernels
only, a 25-epoch linear warm-up to 31.2, then polynomial (power 2) decay to 1e-4, label
smoothing 0.1, about 76 epochs. Global batch: spread it over as many devices as you have,
e.g. 256 TPU chips x 128, or 512 GPUs x 64 (see README: Scaling out).
"""

import ml_collections

from configs import imagenet_resnet_v1_50

STEPS_PER_EPOCH = 1281167 // 32768  # 39


def get_config() -> ml_collections.ConfigDict:
  """ImageNet ResNet v1 50 at batch 32768 with LARS, as MLPerf's large-batch runs."""
  config = imagenet_resnet_v1_50.get_config()
  config.batch_size = 32768
  config.optimizer = 'lars'
  config.learning_rate = 31.2  # LARS's peak is absolute, not scaled with the batch.
  config.lr_batch_size = 0
  config.lr_schedule = 'polynomial'
  config.lr_end = 1e-4
  config.lr_power = 2.0
  config.warmup_steps = 25 * STEPS_PER_EPOCH
  config.num_train_steps = 76 * STEPS_PER_EPOCH
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 0.0  # Decay is LARS's own (config.lars), not slim's L2 in the loss.
  config.lars.weight_decay = 1e-4
  config.lars.trust_coefficient = 0.001
  config.lars.eps = 0.0
  config.label_smoothing = 0.1
  # At 32k an epoch is 39 steps: evaluate and checkpoint every 4 epochs, as MLPerf evaluates.
  config.log_every_steps = 10
  config.eval_every_steps = 4 * STEPS_PER_EPOCH
  config.checkpoint_every_steps = 4 * STEPS_PER_EPOCH
  # ZeRO-1: each device keeps and updates 1/N of the momentum (LARS's per-layer norms
  # then sum over the devices' slices); the same numbers as replicating it.
  config.shard_optimizer_state = True
  return config
