"""Turns the sown `intermediates` tree into slim's end-point dictionary."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from resnet_flax.layers.end_points import END_POINT

# Slim names these two without the network's scope.
_UNSCOPED = ('global_pool', 'predictions')


def end_points(intermediates: Mapping[str, Any], model: nn.Module) -> dict[str, jnp.ndarray]:
  """`{slim end point name: array}` from `apply(..., mutable=['intermediates'])`."""
  out: dict[str, jnp.ndarray] = {}

  def visit(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for key, value in tree.items():
      if isinstance(value, Mapping):
        visit(value, path + (key,))
      elif key == END_POINT:
        out['/'.join((model.slim_scope,) + path)] = value
      elif not path and key in _UNSCOPED:
        out[key] = value
      else:
        out['/'.join((model.slim_scope,) + path + (key,))] = value

  visit(intermediates, ())
  return out
