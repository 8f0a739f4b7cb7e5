"""Data parallelism with jax.sharding: a 1-D mesh, batch split, everything else replicated."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def data_mesh() -> Mesh:
  """A mesh over every device of every process, along one `data` axis."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, name: str = 'batch_size') -> None:
  """The global batch must split evenly over processes and devices."""
  devices = jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f'config.{name}={global_batch_size} does not split over {devices} devices; '
                     f'use a multiple of {devices}.')


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's share of a batch -> global arrays sharded on the leading axis."""
  sharding = batch_sharded(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
