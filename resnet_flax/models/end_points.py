"""Turns the sown `intermediates` tree into slim's end-point dictionary."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from resnet_flax.layers.end_points import END_POINT

# Slim names these two without the network's scope.
_UNSCOPED = ('global_pool', 'predictions')
# Variable collections, never a module of the intermediates tree: a tree holding one is another tree.
_COLLECTIONS = frozenset({'intermediates', 'params', 'batch_stats', 'batch_moments'})


def end_points(intermediates: Mapping[str, Any], model: nn.Module) -> dict[str, jnp.ndarray]:
  """`{slim end point name: array}` from `apply(..., mutable=['intermediates'])`'s
  `state['intermediates']`."""
  collections = sorted(set(intermediates) & _COLLECTIONS)
  if collections:  # the whole state, or the variables: their arrays had come back named as end points
    raise ValueError(f'end_points takes the intermediates tree, but got one holding the collection(s) '
                     f"{', '.join(map(repr, collections))}: pass state['intermediates'] of "
                     "`_, state = model.apply(variables, x, train=False, mutable=['intermediates'])`.")
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
