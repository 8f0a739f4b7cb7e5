"""TF-Slim's resnet_utils: Block, subsample, conv2d_same and stack_blocks_dense."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from resnet_flax.layers import sow_end_point

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Block:
  """A named group of residual units: `unit_fn` applied once per entry of `args`.

  Each entry is a dict with `depth`, `depth_bottleneck` and `stride`, as in slim.
  """
  scope: str
  unit_fn: Callable[..., nn.Module]
  args: tuple[dict, ...]


def check_image_shape(image_shape: Any) -> tuple[int, ...]:
  """`image_shape` as a tuple, if it is one image's (height, width, channels) in positive whole
  numbers: variables are traced on a batch of such images, and a batch's shape or (height,
  width) had been reported as the model's inputs, (1, 32, 32)."""
  shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
  if (shape is None or len(shape) != 3
      or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape)):
    raise ValueError(f'image_shape={image_shape!r} must be one image\'s (height, width, channels), e.g. (224, 224, 3): '
                     'positive whole numbers, without the batch.')
  return shape


def check_inputs(inputs: Array, images: bool) -> Array:
  """`inputs`, if they are a 4-D NHWC float batch: integer pixels would silently skip
  preprocessing. With `images` (a root block reads them), a batch that looks channels first
  is refused too, as it would be read with its height as the channels: (N, 3|4, H, W) with
  W > 4 (no photo is 3 or 4 pixels high), and (N, 1, S, S) with S > 4 (a batch one pixel
  high, (N, 1, T, F), is a 1-D signal's F features over T, taken as such). Without a root
  block the input may be any feature map."""
  if inputs.ndim != 4:
    raise ValueError(f'ResNet inputs are {tuple(inputs.shape)}: give a batch of NHWC images, (batch, height, width, '
                     'channels); one image is x[None].')
  _, height, width, channels = inputs.shape
  if images and channels > 4 and (height in (3, 4) or (height == 1 and width == channels)):
    raise ValueError(f'ResNet inputs {tuple(inputs.shape)} look NCHW (channels first); the models take NHWC, as '
                     'slim: jnp.transpose(images, (0, 2, 3, 1)).')
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise ValueError(f'ResNet inputs are {inputs.dtype} {tuple(inputs.shape)}, raw pixels: map them to the '
                     "preprocessing's float values first (dataset.model_input, which resnet_flax.device_input "
                     'applies on the device).')
  return inputs


def check_variables(module: nn.Module) -> None:
  """Refuses variables without a 'params' collection, as passing `variables['params']` whole
  makes them: flax took each top-level name in it for a collection and failed at the first
  layer, naming neither the mistake nor the fix."""
  if module.is_initializing():
    return
  collections = sorted(module.variables)
  if 'params' not in collections:
    shown = ', '.join(repr(name) for name in collections[:4]) + (', ...' if len(collections) > 4 else '')
    raise ValueError(f"{module.slim_scope}: the variables hold no 'params' collection (their top-level keys: "
                     f"{shown or 'none'}): apply with all the variables init or a checkpoint gave, "
                     "{'params': ..., 'batch_stats': ...}, not variables['params'].")


def subsample(x: Array, factor: int) -> Array:
  """slim's 1x1 max pool with stride `factor`, i.e. taking every factor-th pixel."""
  if factor == 1:
    return x
  return x[:, ::factor, ::factor, :]


def conv2d_same(conv: Callable[..., nn.Module], x: Array, num_outputs: int, kernel_size: int,
                stride: int, *, rate: int = 1, name: str, train: bool) -> Array:
  """Strided convolution whose padding does not depend on the input size.

  Stride 1 is plain SAME. Otherwise slim pads `kernel_effective - 1` explicitly,
  the smaller half first, then convolves VALID; SAME would pad one less at the
  start for even inputs and change every downstream number.
  """
  if stride == 1:
    return conv(num_outputs, kernel_size, stride=1, rate=rate, padding='SAME', name=name)(x, train=train)
  kernel_size_effective = kernel_size + (kernel_size - 1) * (rate - 1)
  pad_total = kernel_size_effective - 1
  pad_beg = pad_total // 2
  pad_end = pad_total - pad_beg
  x = jnp.pad(x, ((0, 0), (pad_beg, pad_end), (pad_beg, pad_end), (0, 0)))
  return conv(num_outputs, kernel_size, stride=stride, rate=rate, padding='VALID', name=name)(x, train=train)


class Unit(nn.Module):
  """slim's `unit_%d` scope around one residual unit (keeps the names one-to-one)."""
  unit_fn: Callable[..., nn.Module]
  depth: int
  depth_bottleneck: int
  stride: int
  rate: int

  # `train` may be positional: nn.remat's static_argnums reach positional arguments only.
  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    unit = self.unit_fn(depth=self.depth, depth_bottleneck=self.depth_bottleneck,
                        stride=self.stride, rate=self.rate)
    return unit(x, train=train)


# A unit whose activations the backward pass recomputes instead of keeping: less memory for
# about one more forward pass. `train` (argument 2, counting the module) stays a Python bool.
RematUnit = nn.remat(Unit, static_argnums=(2,))


class BlockStack(nn.Module):
  """One `Block`'s scope: its units in order, end point sown before subsampling."""
  units: tuple[tuple[int, int, int, int], ...]  # (depth, depth_bottleneck, stride, rate)
  unit_fn: Callable[..., nn.Module]
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    unit = RematUnit if self.remat else Unit
    for i, (depth, depth_bottleneck, stride, rate) in enumerate(self.units):
      x = unit(self.unit_fn, depth, depth_bottleneck, stride, rate, name=f'unit_{i + 1}')(x, train)
    sow_end_point(self, x)
    return x


def plan_strides(blocks: Sequence[Block], output_stride: Optional[int],
                 store_non_strided_activations: bool = False
                 ) -> list[tuple[tuple[tuple[int, int, int, int], ...], int]]:
  """Per unit (stride, rate) and per block trailing subsample, as stack_blocks_dense does.

  Once the network has reached `output_stride`, further strides turn into atrous
  rates. Returns a list of (units, block_stride) with units as
  (depth, depth_bottleneck, stride, rate).
  """
  current_stride, rate = 1, 1
  plan = []
  for block in blocks:
    block_stride = 1
    units = []
    for i, unit in enumerate(block.args):
      unit_stride = unit.get('stride', 1)
      if store_non_strided_activations and i == len(block.args) - 1:
        block_stride, unit_stride = unit_stride, 1
      if output_stride is not None and current_stride == output_stride:
        units.append((unit['depth'], unit['depth_bottleneck'], 1, rate))
        rate *= unit_stride
      else:
        units.append((unit['depth'], unit['depth_bottleneck'], unit_stride, 1))
        current_stride *= unit_stride
        if output_stride is not None and current_stride > output_stride:
          raise ValueError(f'The target output_stride {output_stride} cannot be reached.')
    if output_stride is not None and current_stride == output_stride:
      rate *= block_stride
      block_stride = 1
    else:
      current_stride *= block_stride
      if output_stride is not None and current_stride > output_stride:
        raise ValueError(f'The target output_stride {output_stride} cannot be reached.')
    plan.append((tuple(units), block_stride))
  if output_stride is not None and current_stride != output_stride:
    raise ValueError(f'The target output_stride {output_stride} cannot be reached.')
  return plan


def stack_blocks_dense(x: Array, blocks: Sequence[Block], output_stride: Optional[int] = None,
                       store_non_strided_activations: bool = False, *, train: bool, remat: bool = False) -> Array:
  """Applies the blocks in order, with atrous rates past `output_stride`; with `remat`, each
  unit's activations are recomputed in the backward pass rather than kept.

  Call from a compact module: the blocks become its children named `block.scope`.
  """
  plan = plan_strides(blocks, output_stride, store_non_strided_activations)
  for block, (units, block_stride) in zip(blocks, plan):
    x = BlockStack(units, block.unit_fn, remat, name=block.scope)(x, train=train)
    x = subsample(x, block_stride)
  return x


def bottleneck_block(scope: str, unit_fn: Callable[..., nn.Module], base_depth: int, num_units: int,
                     stride: int) -> Block:
  """slim's resnet_v{1,2}_block: the stride sits on the block's last unit."""
  unit = {'depth': base_depth * 4, 'depth_bottleneck': base_depth, 'stride': 1}
  return Block(scope, unit_fn, tuple([unit] * (num_units - 1) + [dict(unit, stride=stride)]))


def bottleneck_blocks(block_sizes: Sequence[tuple[int, int, int]], unit_fn: Callable[..., nn.Module]) -> list[Block]:
  """`block1`, `block2`, ... from (base_depth, num_units, stride) per block."""
  return [bottleneck_block(f'block{i + 1}', unit_fn, *sizes) for i, sizes in enumerate(block_sizes)]


def max_pool_same(x: Array) -> Array:
  """The root's 3x3/2 max pool, SAME-padded as resnet_arg_scope sets it."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')


def head(module: nn.Module, x: Array, conv: Callable[..., nn.Module], num_classes: Optional[int],
         global_pool: bool, spatial_squeeze: bool, scope: str) -> Array:
  """Global pool, 1x1 `logits` conv and squeeze, shared by v1 and v2."""
  if global_pool:
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    sow_end_point(module, x, 'global_pool')
  if not num_classes:
    return x
  x = conv(num_classes, 1, activation=None, normalizer=None, name='logits')(x, train=False)
  if spatial_squeeze:
    if x.shape[1:3] != (1, 1):
      raise ValueError(f'{scope}: spatial_squeeze needs 1x1 logits but they are {x.shape[1]}x{x.shape[2]}; '
                       'use global_pool=True or spatial_squeeze=False.')
    x = jnp.squeeze(x, axis=(1, 2))
    sow_end_point(module, x, 'spatial_squeeze')
  sow_end_point(module, nn.softmax(x.astype(jnp.float32)), 'predictions')
  return x.astype(jnp.float32)


def reachable_output_strides(block_sizes: Sequence[tuple[int, int, int]], include_root_block: bool) -> list[int]:
  """The `output_stride` values the root (stride 4) and the blocks' strides allow (slim's
  rule: the network's stride after some unit; atrous convolution past it)."""
  strides = [4 if include_root_block else 1]
  for _, _, stride in block_sizes:
    strides.append(strides[-1] * stride)
  return sorted(set(strides))


def root_output_stride(output_stride: Optional[int], include_root_block: bool,
                       block_sizes: Sequence[tuple[int, int, int]], scope: str) -> Optional[int]:
  """The stride left for the blocks once the root (conv1 + pool1, stride 4) is counted; an
  `output_stride` the network cannot reach is refused by its own value (slim's message names
  the value left after the root)."""
  if output_stride is None:
    return None
  reachable = reachable_output_strides(block_sizes, include_root_block)
  if output_stride not in reachable:
    raise ValueError(f'{scope}: output_stride={output_stride} cannot be reached; use one of {reachable}, or None.')
  return output_stride // 4 if include_root_block else output_stride
