"""End points: module outputs sown under slim's names into `intermediates`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

INTERMEDIATES = 'intermediates'
END_POINT = 'end_point'


def keep_latest(_: Any, value: Any) -> Any:
  """A `sow` reducer that stores the latest value instead of appending to a tuple."""
  return value


def sow_end_point(module: nn.Module, value: jnp.ndarray, name: str = END_POINT) -> None:
  """Records `value` as this module's end point when the caller asks for intermediates."""
  if not module.is_initializing():
    module.sow(INTERMEDIATES, name, value, reduce_fn=keep_latest, init_fn=lambda: None)
