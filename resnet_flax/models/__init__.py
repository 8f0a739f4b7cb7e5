"""ResNet v1 and v2 as TF-Slim defines them, and a name -> constructor registry."""

from resnet_flax.models.arg_scope import ResNetArgScope
from resnet_flax.models.end_points import end_points
from resnet_flax.models.registry import get_model, list_models
from resnet_flax.models.resnet_v1 import ResNetV1
from resnet_flax.models.resnet_v2 import ResNetV2

__all__ = ['ResNetArgScope', 'ResNetV1', 'ResNetV2', 'end_points', 'get_model', 'list_models']
