"""slim.conv2d: weights, then a normalizer or biases, then an activation."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_flax.layers import initializers
from resnet_flax.layers.end_points import sow_end_point

Array = jnp.ndarray


class Conv2D(nn.Module):
  """A square-kernel NHWC convolution with slim's variable names.

  `weights` are HWIO like TF's. As in slim, `biases` exist only without a
  normalizer; the normalizer (a BatchNorm factory) becomes the child `BatchNorm`.
  """
  features: int
  kernel_size: int
  stride: int = 1
  rate: int = 1
  padding: str = 'SAME'
  normalizer: Optional[Callable[..., nn.Module]] = None
  activation: Optional[Callable[[Array], Array]] = nn.relu
  kernel_init: Callable[..., Array] = initializers.variance_scaling()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    weights = self.param('weights', self.kernel_init, shape, jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), weights.astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        rhs_dilation=(self.rate, self.rate), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.normalizer is not None:
      y = self.normalizer(name='BatchNorm', dtype=self.dtype)(y, train=train)
    else:
      biases = self.param('biases', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + biases.astype(self.dtype)
    if self.activation is not None:
      y = self.activation(y)
    sow_end_point(self, y)
    return y
