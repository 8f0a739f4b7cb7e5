"""ImageNet, slim's ResNet v1 50 recipe: 1000 classes, VGG preprocessing, resnet_arg_scope BN.

    python train.py --config=configs/imagenet_resnet_v1_50.py --config.data.dir=/path/imagenet
The directory holds train/ and val/ with one folder per class (ImageFolder layout).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """ImageNet with slim's ResNet v1 50 recipe: 90 epochs at batch 256, VGG preprocessing."""
  config = default.get_config()
  config.model = 'resnet_v1_50'
  config.dtype = 'bfloat16'
  config.data.name = 'imagefolder'
  config.data.image_size = 224
  config.data.preprocessing = 'vgg'
  config.data.worker_processes = True  # a core's worth of decoding each; threads share one GIL
  config.data.augment = True
  config.eval_split = 'validation'
  config.batch_size = 256
  config.num_train_steps = 90 * 5005  # 90 epochs of 1,281,167 images
  config.warmup_steps = 5 * 5005
  config.learning_rate = 0.1
  config.lr_batch_size = 256  # the rate scales linearly with batch_size
  config.label_smoothing = 0.1
  config.bn.decay = 0.997  # resnet_arg_scope
  config.log_every_steps = 100
  config.eval_every_steps = 5005
  config.checkpoint_every_steps = 5005
  return config
