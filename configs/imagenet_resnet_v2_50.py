"""ImageNet, slim's ResNet v2 50: 1001 classes (class 0 = background), inception preprocessing.

Slim's public v2 checkpoints were evaluated with inception preprocessing at 299 px and
label 0 as background, so labels are shifted by one (`label_offset=1`).
"""

import ml_collections

from configs import imagenet_resnet_v1_50


def get_config() -> ml_collections.ConfigDict:
  """ImageNet with slim's ResNet v2 50: 1001 classes, inception preprocessing at 299 px."""
  config = imagenet_resnet_v1_50.get_config()
  config.model = 'resnet_v2_50'
  config.num_classes = 1001
  config.data.preprocessing = 'inception'
  config.data.worker_processes = True  # a core's worth of decoding each; threads share one GIL
  config.data.image_size = 299
  config.data.label_offset = 1
  return config
