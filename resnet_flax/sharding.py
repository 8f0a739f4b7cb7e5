"""Data parallelism with jax.sharding: a 1-D mesh, the batch split, the state replicated or ZeRO-1."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def data_mesh() -> Mesh:
  """A mesh over every device of every process, along one `data` axis."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy of the array on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the `data` axis of `mesh`."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def optimizer_state_spec(shape: tuple[int, ...], num_devices: int) -> PartitionSpec:
  """ZeRO-1's split of one optimizer-state (or moving-average) array: its largest axis the devices
  divide evenly.

  Not simply the leading axis: conv kernels are HWIO, and a leading 1, 3 or 7 would
  leave nearly all of a ResNet's optimizer state replicated. Arrays no axis of which
  divides (scalars such as Adam's count, odd sizes) stay replicated.
  """
  divisible = [axis for axis, size in enumerate(shape) if size >= num_devices and size % num_devices == 0]
  if num_devices == 1 or not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda a: shape[a])
  return PartitionSpec(*(None,) * axis, DATA_AXIS)


def train_state_shardings(state: Any, mesh: Mesh, shard_optimizer_state: bool = False) -> Any:
  """Shardings shaped like `state` (a TrainState, concrete or abstract).

  Everything replicated; with `shard_optimizer_state` (ZeRO-1) the optimizer state, and the
  model's moving averages where the state keeps them, are split over the `data` axis instead,
  so each device keeps 1/N of them. The train step's in/out shardings say so, and XLA inserts
  the collectives (the update is computed on each device's slice, then the new parameters are
  gathered). Evaluating split averages takes `gather`.
  """
  shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), state)
  if not shard_optimizer_state:
    return shardings
  split = lambda tree: jax.tree_util.tree_map(
      lambda leaf: NamedSharding(mesh, optimizer_state_spec(leaf.shape, mesh.size)), tree)
  return shardings.replace(opt_state=split(state.opt_state),
                           ema=None if state.ema is None else split(state.ema))


def jit_over_batch(step: Callable, mesh: Mesh) -> Callable:
  """`step(variables, batch)` jitted with replicated variables, the batch split, results replicated."""
  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh))


def check_batch_size(global_batch_size: int, name: str = 'config.batch_size') -> None:
  """The global batch must split evenly over processes and devices; `name` is the setting that gave it."""
  devices = jax.device_count()
  if global_batch_size % devices:
    raise ValueError(f'{name}={global_batch_size} does not split over {devices} devices; '
                     f'use a multiple of {devices}.')


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's share of a batch -> global arrays sharded on the leading axis."""
  sharding = batch_sharded(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` with every array copied whole onto each device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def _identity(tree: Any) -> Any:
  """`tree` itself: jitted with other shardings, a reshard XLA's collectives carry out."""
  return tree


def _copied(tree: Any) -> Any:
  """A copy of every array of `tree` (`jnp.copy` under jit is computed, not passed through)."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def gather(tree: Any, mesh: Mesh) -> Any:
  """`tree` (arrays on `mesh`, split or not) whole on each device: as it is when it already is,
  else through a jitted identity, whose all-gathers also reach the shards other hosts hold."""
  if all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(tree)):
    return tree
  return jax.jit(_identity, out_shardings=replicated(mesh))(tree)


def copy_to(tree: Any, shardings: Any) -> Any:
  """New arrays holding `tree`'s values, laid out as `shardings` (a tree of them): for a state
  whose step donates it, where one buffer must not back two of its arrays (device_put may
  return the same buffer, or on CPU a view of host memory)."""
  return jax.jit(_copied, out_shardings=shardings)(tree)
