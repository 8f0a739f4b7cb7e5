"""flax's `nn.BatchNorm` behind our BatchNorm's interface, to price our BN inside a whole ResNet.

Only for the benchmark: it swaps the normalizer in `ResNetArgScope`, leaving every conv,
shortcut and the loss as they are, so a ResNet step with it differs from ours in BN alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from resnet_flax.models.arg_scope import ResNetArgScope

Array = jnp.ndarray


class FlaxBatchNorm(nn.Module):
  """`nn.BatchNorm` called as ours is: `(x, train=...)`, slim's field names, optional activation.

  Accepts only the fields that have a flax equivalent, so an arg scope asking for one of
  our options (zero-debias, ghost batches, ...) fails instead of being silently dropped.
  """
  decay: float = 0.999
  epsilon: float = 0.001
  center: bool = True
  scale: bool = False
  activation: Optional[Callable[[Array], Array]] = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    y = nn.BatchNorm(use_running_average=not train, momentum=self.decay, epsilon=self.epsilon,
                     use_bias=self.center, use_scale=self.scale, dtype=self.dtype, name='flax')(x)
    return self.activation(y) if self.activation is not None else y


@dataclasses.dataclass(frozen=True)
class FlaxBatchNormArgScope(ResNetArgScope):
  """`ResNetArgScope` whose normalizer is flax's `nn.BatchNorm` (same decay, epsilon, scale)."""

  def make_batch_norm(self, **overrides: Any) -> FlaxBatchNorm:
    """flax's BatchNorm with this scope's fields (for v2's `preact` and `postnorm`)."""
    return FlaxBatchNorm(**{**self.batch_norm, 'dtype': self.dtype, **overrides})

  def conv2d(self) -> Callable[..., nn.Module]:
    """The scope's conv factory with flax's BatchNorm as its normalizer, never folded in eval."""
    factory = super().conv2d()
    if factory.normalizer is None:
      return factory
    # flax's layer has no affine map to hand a convolution: never folded.
    return dataclasses.replace(factory, normalizer=functools.partial(FlaxBatchNorm, **self.batch_norm),
                               fold_batch_norm_in_eval=False)


def with_flax_batch_norm(model: nn.Module) -> nn.Module:
  """A copy of a registry ResNet whose BatchNorm layers are flax's `nn.BatchNorm`."""
  scope = model.arg_scope
  fields = {field.name: getattr(scope, field.name) for field in dataclasses.fields(ResNetArgScope)}
  return model.clone(arg_scope=FlaxBatchNormArgScope(**fields))
