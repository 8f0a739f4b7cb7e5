"""Device batches: order and values of the host batches, pixels mapped on the device, threads stopped."""

import dataclasses
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import data, device_input, sharding
from resnet_flax.data import vgg_preprocessing
from resnet_flax.data.pipeline import Source
from resnet_flax.models import registry


def _host_batches(count, dtype=np.uint8):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (4, 6, 6, 3)).astype(dtype), 'label': np.arange(4, dtype=np.int32) + i,
           'mask': np.ones(4, np.float32)} for i in range(count)]


@pytest.mark.parametrize('ahead', [0, 1, 3])
def test_every_batch_arrives_in_order_with_pixels_mapped_on_the_device(ahead):
  host = _host_batches(5)
  mesh = sharding.data_mesh()
  out = list(device_input.device_batches(iter(host), mesh, vgg_preprocessing.mean_image_subtraction, ahead=ahead))
  assert len(out) == 5
  for got, sent in zip(out, host):
    assert isinstance(got['image'], jax.Array) and got['image'].dtype == jnp.float32
    assert got['image'].sharding.is_equivalent_to(sharding.batch_sharded(mesh), 4)
    # The host-side mapping, in numpy: the values the model saw before pixels travelled.
    channel_means = np.float32([123.68, 116.78, 103.94])
    np.testing.assert_array_equal(np.asarray(got['image']), sent['image'].astype(np.float32) - channel_means)
    np.testing.assert_array_equal(np.asarray(got['label']), sent['label'])
    np.testing.assert_array_equal(np.asarray(got['mask']), sent['mask'])


def test_float_batches_pass_through_unchanged():
  host = _host_batches(2, np.float32)
  out = list(device_input.device_batches(iter(host), sharding.data_mesh()))
  for got, sent in zip(out, host):
    np.testing.assert_array_equal(np.asarray(got['image']), sent['image'])


def test_the_digits_dataset_is_model_input_as_it_is():
  ds = data.build({'name': 'digits'}, 'test', batch_size=16, seed=0)
  host = next(ds.eval_batches())
  got = next(device_input.dataset_batches(ds, ds.eval_batches(), sharding.data_mesh()))
  assert ds.image_dtype == np.float32
  np.testing.assert_array_equal(np.asarray(got['image']), host['image'])


def test_closing_stops_the_host_thread():
  def endless():
    while True:
      yield _host_batches(1)[0]

  before = {thread for thread in threading.enumerate() if thread.name == 'prefetch'}
  batches = device_input.device_batches(endless(), sharding.data_mesh(), vgg_preprocessing.mean_image_subtraction)
  next(batches)
  started = {thread for thread in threading.enumerate() if thread.name == 'prefetch'} - before
  assert len(started) == 1
  batches.close()
  thread, = started
  thread.join(timeout=5)
  assert not thread.is_alive()


def test_negative_lookahead_is_refused():
  with pytest.raises(ValueError, match='ahead'):
    next(device_input.device_batches(iter(_host_batches(1)), sharding.data_mesh(), ahead=-1))


def test_raw_pixels_into_a_model_name_the_missing_mapping():
  model = registry.get_model('resnet_v1_tiny', num_classes=3)
  pixels = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  with pytest.raises(ValueError, match='model_input'):
    model.init(jax.random.PRNGKey(0), pixels, train=False)


def test_uint8_source_without_a_mapping_is_refused():
  loader = object()
  with pytest.raises(data.DataError, match='model_input'):
    Source(labels=np.zeros(3, np.int32), num_classes=1, image_shape=(2, 2, 3), loader=loader,
                         name='pixels', image_dtype=np.uint8)


def test_the_split_summary_tells_apart_splits_that_differ_in_any_label():
  # What agreed_dataset compares across processes: equal for the same split, different for one
  # relabelled example (same counts) or another image shape.
  dataset = data.build({'name': 'digits'}, 'train', batch_size=8, seed=0)
  same = data.build({'name': 'digits'}, 'train', batch_size=4, seed=1, process_index=1, process_count=2)
  labels = dataset.source.labels.copy()
  labels[[0, 1]] = labels[[1, 0]] if labels[0] != labels[1] else (labels[0], (labels[0] + 1) % 10)
  relabelled = dataclasses.replace(dataset, source=dataclasses.replace(dataset.source, labels=labels))
  upsampled = data.build({'name': 'digits', 'image_size': 16, 'digits_resize': 'upsample'}, 'train', batch_size=8,
                         seed=0)
  summary = device_input.split_summary(dataset)
  assert summary.startswith(f'{dataset.num_examples:,} examples in 10 classes (8x8x1, labels #')
  assert device_input.split_summary(same) == summary
  assert device_input.split_summary(relabelled) != summary
  assert device_input.split_summary(upsampled) != summary
  assert device_input.split_summary(relabelled).split(', labels')[0] == summary.split(', labels')[0]  # same counts


def test_each_process_builds_its_share_of_the_global_batch(monkeypatch):
  # Mutants: process_dataset giving each process the whole global batch, or process_index 0
  # on every host (all hosts would train on the same examples).
  monkeypatch.setattr(device_input.jax, 'process_count', lambda: 4)
  monkeypatch.setattr(device_input.jax, 'process_index', lambda: 3)
  config = types.SimpleNamespace(data={'name': 'digits'}, seed=5)
  dataset = device_input.process_dataset(config, 'train', 32 * jax.device_count())
  assert (dataset.batch_size, dataset.process_index, dataset.process_count, dataset.seed) == (
      8 * jax.device_count(), 3, 4, 5)


@pytest.mark.parametrize('ahead', [1, 2])
def test_ahead_batches_are_on_the_devices_before_one_is_handed_out(monkeypatch, ahead):
  # Mutants: `len(pending) > ahead` off by one either way (one batch fewer or more in flight
  # than `ahead` promises: a copy no longer overlapping the step, or device memory for one more).
  copied = []
  to_global_batch = sharding.to_global_batch

  def counting(batch, mesh):
    copied.append(int(batch['label'][0]))
    return to_global_batch(batch, mesh)

  monkeypatch.setattr(device_input.sharding, 'to_global_batch', counting)
  batches = device_input.device_batches(iter(_host_batches(6, np.float32)), sharding.data_mesh(), ahead=ahead)
  first = next(batches)
  assert int(first['label'][0]) == 0 and copied == list(range(ahead + 1))
  assert [int(b['label'][0]) for b in batches] == [1, 2, 3, 4, 5]
