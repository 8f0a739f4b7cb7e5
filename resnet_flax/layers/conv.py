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

  `fold_batch_norm_in_eval`: with train=False, the normalizer's affine map is taken into
  the convolution (weights scaled per output channel, its shift added as a bias). The same
  function, rounded differently (about 1e-6 relative in float32), and no longer TF-Slim's
  order of operations; what it buys is the pattern XLA:GPU fuses into one cuDNN call or
  cuBLAS epilogue (convolution, per-channel bias, then a residual add where v1 has one, and
  ReLU), which a per-channel multiply after the convolution prevents. Variables and train
  mode are unchanged; the BatchNorm's own `__call__` does not run (no intermediates of it).
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
  fold_batch_norm_in_eval: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    weights = self.param('weights', self.kernel_init, shape, jnp.float32)
    conv = lambda kernel: convolve(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.rate,
                                   self.padding)
    if self.normalizer is not None:
      norm = self.normalizer(name='BatchNorm', dtype=self.dtype)
      if self.fold_batch_norm_in_eval and not train and not self.is_initializing():
        if not hasattr(norm, 'eval_scale_and_shift'):
          raise ValueError(f'{type(norm).__name__} cannot be folded into a convolution (no eval_scale_and_shift); '
                           'turn off fold_batch_norm_in_eval or use resnet_flax.layers.BatchNorm.')
        scale, shift = norm.eval_scale_and_shift()
        y = conv(weights * scale) + shift.astype(self.dtype)
        if norm.activation is not None:
          y = norm.activation(y)
      else:
        y = norm(conv(weights), train=train)
    else:
      y = conv(weights)
      biases = self.param('biases', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + biases.astype(self.dtype)
    if self.activation is not None:
      y = self.activation(y)
    sow_end_point(self, y)
    return y


def convolve(x: Array, weights: Array, stride: int, rate: int, padding: str) -> Array:
  """NHWC x HWIO convolution; a 1x1 kernel is a matrix product on every `stride`-th pixel.

  Same numbers either way (with k = 1, SAME and VALID both sample pixels 0, s, 2s, ...), but
  on some CPUs XLA lowers the weight gradient of a 1x1 convolution 35-100x slower than the
  forward: as dots the ResNet-50 train step took 0.30x the time there, 0.90x on an AVX-512
  CPU (benchmarks/RESULTS.md).
  """
  if weights.shape[:2] == (1, 1):
    return jnp.einsum('nhwc,cd->nhwd', x[:, ::stride, ::stride, :], weights[0, 0])
  return convolution(x, weights, stride, rate, padding)


def convolution(x: Array, weights: Array, stride: int, rate: int, padding: str) -> Array:
  """NHWC x HWIO `lax.conv_general_dilated`, whatever the kernel size."""
  return jax.lax.conv_general_dilated(x, weights, window_strides=(stride, stride), padding=padding,
                                      rhs_dilation=(rate, rate), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
