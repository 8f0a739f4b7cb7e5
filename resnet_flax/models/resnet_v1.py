"""ResNet v1 exactly as TF-Slim's nets/resnet_v1.py (post-activation, stride on conv2)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_flax.layers import activations, sow_end_point
from resnet_flax.models import resnet_utils
from resnet_flax.models.arg_scope import ResNetArgScope

Array = jnp.ndarray


class BottleneckV1(nn.Module):
  """1x1 -> 3x3 (strided, atrous) -> 1x1, BN after each conv, ReLU after the sum."""
  depth: int
  depth_bottleneck: int
  stride: int
  rate: int = 1
  arg_scope: ResNetArgScope = ResNetArgScope()
  use_bounded_activations: bool = False
  zero_init_last_gamma: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    conv = self.arg_scope.conv2d()
    if self.depth == x.shape[-1]:
      shortcut = resnet_utils.subsample(x, self.stride)
    else:
      shortcut = conv(self.depth, 1, stride=self.stride,
                      activation=nn.relu6 if self.use_bounded_activations else None,
                      name='shortcut')(x, train=train)
    residual = conv(self.depth_bottleneck, 1, name='conv1')(x, train=train)
    residual = resnet_utils.conv2d_same(conv, residual, self.depth_bottleneck, 3, self.stride,
                                        rate=self.rate, name='conv2', train=train)
    # Zero gammas make the unit start as the identity (Goyal et al. 2017).
    last_conv = self.arg_scope.conv2d(gamma_init=nn.initializers.zeros) if self.zero_init_last_gamma else conv
    residual = last_conv(self.depth, 1, activation=None, name='conv3')(residual, train=train)
    # The last unit's output is the global pool's input: TF's ReLU keeps a NaN there on every
    # backend (layers/activations). Every unit uses it, since a unit does not know it is the last.
    if self.use_bounded_activations:
      # Bounded activations make the network friendlier to fixed-point inference.
      output = activations.relu6(shortcut + jnp.clip(residual, -6.0, 6.0))
    else:
      output = activations.relu(shortcut + residual)
    sow_end_point(self, output)
    return output


def bottleneck_v1(arg_scope: ResNetArgScope, use_bounded_activations: bool = False,
                  zero_init_last_gamma: bool = False) -> Callable[..., BottleneckV1]:
  """The unit function for v1 blocks, with the model's arg scope bound."""
  def unit_fn(**kwargs) -> BottleneckV1:
    return BottleneckV1(**kwargs, arg_scope=arg_scope, use_bounded_activations=use_bounded_activations,
                        zero_init_last_gamma=zero_init_last_gamma, name='bottleneck_v1')
  return unit_fn


class ResNetV1(nn.Module):
  """slim's `resnet_v1(inputs, blocks, ...)`; `slim_scope` names its variables.

  Returns logits (N, num_classes) or, with `num_classes=None`, features. End
  points are sown into `intermediates` (see `models.end_points`).
  """
  block_sizes: Sequence[tuple[int, int, int]]  # (base_depth, num_units, stride) per block
  num_classes: Optional[int] = None
  slim_scope: str = 'resnet_v1'  # slim's variable scope; flax's own `scope` is taken
  global_pool: bool = True
  output_stride: Optional[int] = None
  include_root_block: bool = True
  spatial_squeeze: bool = True
  store_non_strided_activations: bool = False
  use_bounded_activations: bool = False
  zero_init_last_gamma: bool = False  # not slim's: each unit's conv3 BN starts with gamma = 0
  remat: bool = False  # not slim's: each unit's activations recomputed in the backward pass, not kept
  arg_scope: ResNetArgScope = ResNetArgScope()

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool) -> Array:
    conv = self.arg_scope.conv2d()
    unit_fn = bottleneck_v1(self.arg_scope, self.use_bounded_activations, self.zero_init_last_gamma)
    blocks = resnet_utils.bottleneck_blocks(self.block_sizes, unit_fn)
    output_stride = resnet_utils.root_output_stride(self.output_stride, self.include_root_block, self.block_sizes,
                                                     self.slim_scope)
    x = resnet_utils.check_inputs(inputs, images=self.include_root_block)
    resnet_utils.check_variables(self)
    if self.include_root_block:
      x = resnet_utils.conv2d_same(conv, x, 64, 7, 2, name='conv1', train=train)
      x = resnet_utils.max_pool_same(x)
    x = resnet_utils.stack_blocks_dense(x, blocks, output_stride, self.store_non_strided_activations,
                                        train=train, remat=self.remat)
    return resnet_utils.head(self, x, conv, self.num_classes, self.global_pool, self.spatial_squeeze,
                             self.slim_scope)
