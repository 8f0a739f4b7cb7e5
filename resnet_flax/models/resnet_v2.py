"""ResNet v2 exactly as TF-Slim's nets/resnet_v2.py (pre-activation)."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_flax.layers import activations, sow_end_point
from resnet_flax.models import resnet_utils
from resnet_flax.models.arg_scope import ResNetArgScope

Array = jnp.ndarray


class BottleneckV2(nn.Module):
  """BN + ReLU (`preact`) first; 1x1 -> 3x3 (strided) -> 1x1 with no BN after conv3."""
  depth: int
  depth_bottleneck: int
  stride: int
  rate: int = 1
  arg_scope: ResNetArgScope = ResNetArgScope()

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    conv = self.arg_scope.conv2d()
    preact = self.arg_scope.make_batch_norm(activation=nn.relu, name='preact')(x, train=train)
    if self.depth == x.shape[-1]:
      shortcut = resnet_utils.subsample(x, self.stride)
    else:
      # The projection reads the pre-activated input, unlike v1's.
      shortcut = conv(self.depth, 1, stride=self.stride, normalizer=None, activation=None,
                      name='shortcut')(preact, train=train)
    residual = conv(self.depth_bottleneck, 1, name='conv1')(preact, train=train)
    residual = resnet_utils.conv2d_same(conv, residual, self.depth_bottleneck, 3, self.stride,
                                        rate=self.rate, name='conv2', train=train)
    residual = conv(self.depth, 1, normalizer=None, activation=None, name='conv3')(residual, train=train)
    output = shortcut + residual
    sow_end_point(self, output)
    return output


def bottleneck_v2(arg_scope: ResNetArgScope) -> Callable[..., BottleneckV2]:
  """The unit function for v2 blocks, with the model's arg scope bound."""
  def unit_fn(**kwargs) -> BottleneckV2:
    return BottleneckV2(**kwargs, arg_scope=arg_scope, name='bottleneck_v2')
  return unit_fn


class ResNetV2(nn.Module):
  """slim's `resnet_v2(inputs, blocks, ...)`; `slim_scope` names its variables."""
  block_sizes: Sequence[tuple[int, int, int]]  # (base_depth, num_units, stride) per block
  num_classes: Optional[int] = None
  slim_scope: str = 'resnet_v2'  # slim's variable scope; flax's own `scope` is taken
  global_pool: bool = True
  output_stride: Optional[int] = None
  include_root_block: bool = True
  spatial_squeeze: bool = True
  remat: bool = False  # not slim's: each unit's activations recomputed in the backward pass, not kept
  arg_scope: ResNetArgScope = ResNetArgScope()

  @nn.compact
  def __call__(self, inputs: Array, *, train: bool) -> Array:
    conv = self.arg_scope.conv2d()
    blocks = resnet_utils.bottleneck_blocks(self.block_sizes, bottleneck_v2(self.arg_scope))
    output_stride = resnet_utils.root_output_stride(self.output_stride, self.include_root_block, self.block_sizes,
                                                     self.slim_scope)
    x = resnet_utils.check_inputs(inputs, images=self.include_root_block)
    resnet_utils.check_variables(self)
    if self.include_root_block:
      # No BN or activation here: the first unit's `preact` does both.
      root_conv = functools.partial(conv, normalizer=None, activation=None)
      x = resnet_utils.conv2d_same(root_conv, x, 64, 7, 2, name='conv1', train=train)
      x = resnet_utils.max_pool_same(x)
    x = resnet_utils.stack_blocks_dense(x, blocks, output_stride, train=train, remat=self.remat)
    # Pre-activation units end without BN, so the stack needs one before pooling.
    # The global pool's input: TF's ReLU keeps a NaN there on every backend (layers/activations).
    x = self.arg_scope.make_batch_norm(activation=activations.relu, name='postnorm')(x, train=train)
    return resnet_utils.head(self, x, conv, self.num_classes, self.global_pool, self.spatial_squeeze,
                             self.slim_scope)
