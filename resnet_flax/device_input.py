"""Batches on their way to the devices: copied ahead of the step that needs them, made model input there.

Host batches are assembled by a background thread (`data.prefetch`); each is copied to the
devices one batch before it is handed out, so the copy overlaps the step in flight, and
its images go through the data set's `model_input` on the devices: photos cross as uint8
pixels (a quarter of float32's bytes) and become float32 values in one small jitted map.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_flax import data, distributed, sharding
from resnet_flax.data.pipeline import as_model_input

DeviceBatch = dict[str, jax.Array]


def process_dataset(config: Any, split: str, global_batch_size: int, setting: str = 'config.batch_size'
                    ) -> data.Dataset:
  """This process's share of `config.data`'s `split`, for global batches of `global_batch_size`
  (which must split over the devices: `setting`, the config field that gave it, is named if not)."""
  sharding.check_batch_size(global_batch_size, setting)
  return data.build(config.data, split, batch_size=global_batch_size // jax.process_count(), seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count())


def agreed_dataset(config: Any, split: str, global_batch_size: int, setting: str = 'config.batch_size'
                   ) -> data.Dataset:
  """`process_dataset` built by every process together: if it fails on one, it fails on all
  (`distributed.failing_together`), and every process must see the same split.

  Each process lists the split by itself, and takes its share of each global batch by
  example index: a host whose copy of the data differs (a node's local copy missing files)
  would train on other examples than the others think, silently.
  """
  with distributed.failing_together(f'to build its {split} data'):  # each process reads its own mount
    dataset = process_dataset(config, split, global_batch_size, setting)
    summary = split_summary(dataset)
  differs = distributed.disagreement(summary)
  if differs is not None:
    first, index, other = differs
    raise data.DataError(f'the {split} split differs between processes: process 0 has {first}, process {index} '
                         f'has {other}; every host must read the same copy of config.data.dir, with the '
                         'same config.data settings.')
  return dataset


def split_summary(dataset: data.Dataset) -> str:
  """What a split is, in a line that differs where two splits do: sizes, image shape and a
  digest of every example's label (an image folder's files are listed by class, so two copies
  with the same counts per class and other files are not told apart)."""
  digest = hashlib.blake2b(np.ascontiguousarray(dataset.source.labels, np.int64).tobytes(), digest_size=6)
  height, width, channels = dataset.image_shape
  return (f'{dataset.num_examples:,} examples in {dataset.num_classes} classes ({height}x{width}x{channels}, labels '
          f'#{digest.hexdigest()})')


def _model_input_on_device(model_input: Callable[[Any], Any]) -> Callable[[DeviceBatch], DeviceBatch]:
  if model_input is as_model_input:
    return lambda batch: batch
  # jit caches per function object, so every pass over a data set reuses one compilation;
  # the output keeps the input's batch sharding (the map is elementwise).
  on_device = jax.jit(model_input)
  return lambda batch: {**batch, 'image': on_device(batch['image'])}


def device_batches(host_batches: Iterable[data.Batch], mesh: Mesh,
                   model_input: Callable[[Any], Any] = as_model_input, *, ahead: int = 1) -> Iterator[DeviceBatch]:
  """Global batches sharded over `mesh` from this process's host batches, `model_input` applied.

  `ahead` batches beyond the one handed out are already on the devices, so an error in
  reading batch s + ahead surfaces when batch s is asked for. Closing the generator (or
  leaving a loop over it) stops the host thread.
  """
  if ahead < 0:
    raise ValueError(f'ahead must be >= 0, got {ahead}.')
  return _copied_ahead(host_batches, mesh, _model_input_on_device(model_input), ahead)


def _copied_ahead(host_batches: Iterable[data.Batch], mesh: Mesh, to_model_input: Callable[[DeviceBatch], DeviceBatch],
                  ahead: int) -> Iterator[DeviceBatch]:
  host = data.prefetch(host_batches)
  pending: deque[DeviceBatch] = deque()
  try:
    for batch in host:
      pending.append(to_model_input(sharding.to_global_batch(batch, mesh)))
      if len(pending) > ahead:
        yield pending.popleft()
    while pending:
      yield pending.popleft()
  finally:
    host.close()


def dataset_batches(dataset: data.Dataset, host_batches: Iterable[data.Batch], mesh: Mesh, *, ahead: int = 1
                    ) -> Iterator[DeviceBatch]:
  """`device_batches` with `dataset`'s own `model_input` (host_batches come from `dataset`)."""
  return device_batches(host_batches, mesh, dataset.model_input, ahead=ahead)
