"""data.pipeline and data.sampling: the random streams a batch is drawn from, eval steps and
padding across processes, and what a Source, a Dataset and a loader must be."""

import numpy as np
import pytest

from resnet_flax import data
from resnet_flax.data import sampling
from resnet_flax.data.pipeline import Dataset, Loaded, Source
from resnet_flax.data.synthetic import ConstantLoader
from test_data import DIGITS


class _DrawLoader:
  """Fills each training image with draws from the batch's augmentation generator, so a test sees the draws."""

  def start_train(self, indices, rng):
    return lambda: Loaded(rng.random((len(indices), 1, 1, 1)).astype(np.float32))

  def start_eval(self, indices):
    return lambda: Loaded(np.zeros((len(indices), 1, 1, 1), np.float32))


def _draws(seed, step, process_index=0, process_count=1):
  source = Source(labels=np.arange(8) % 2, num_classes=2, image_shape=(1, 1, 1), loader=_DrawLoader(), name='draws')
  dataset = Dataset(source, batch_size=2, seed=seed, process_index=process_index, process_count=process_count)
  return next(dataset.train_batches(step))['image']


def test_augmentation_draws_differ_by_step_process_and_seed():
  # Mutants: sampling.augment_rng without `step` (the same crops/flips every step), without
  # `process_index` (every host augments its slots alike), without `seed`.
  np.testing.assert_array_equal(_draws(seed=3, step=5), _draws(seed=3, step=5))  # reproducible
  assert not np.array_equal(_draws(seed=3, step=5), _draws(seed=3, step=6))
  assert not np.array_equal(_draws(seed=3, step=5, process_index=0, process_count=2),
                            _draws(seed=3, step=5, process_index=1, process_count=2))
  assert not np.array_equal(_draws(seed=3, step=5), _draws(seed=4, step=5))


def test_augmentation_and_shuffle_streams_are_independent():
  # Mutant: _AUGMENT_STREAM == _SHUFFLE_STREAM. numpy's SeedSequence ignores trailing zero
  # words, so [0, seed, step, 0] would seed process 0's augmentation at step k exactly as the
  # shuffle of epoch k.
  for seed, k in [(0, 0), (3, 2), (7, 11)]:
    shuffled = sampling.epoch_permutation(seed, 100, k)
    assert not np.array_equal(sampling.augment_rng(seed, k, 0).permutation(100), shuffled)


def test_eval_step_count_is_over_the_global_batch():
  # Mutant: num_eval_steps ignoring process_count (extra all-padding steps on every host).
  # 360 test digits in global batches of 3 x 32 = 96: ceil(3.75) = 4 steps.
  shards = [data.build(DIGITS, 'test', batch_size=32, seed=0, process_index=p, process_count=3) for p in range(3)]
  for shard in shards:
    assert shard.num_eval_steps == 4 and len(list(shard.eval_batches())) == 4
  # Only the last host's last batch is padding: positions 3*96 + 2*32 = 352..383 hold 8 real examples.
  last = list(shards[2].eval_batches())[-1]
  np.testing.assert_array_equal(last['mask'], [1] * 8 + [0] * 24)


def test_eval_padding_is_example_zero_and_masks_are_float32():
  # Mutants: the eval mask left boolean; padding slots filled with other (wrapped) examples
  # instead of example 0, as sampling.eval_indices documents.
  ds = data.build(DIGITS, 'test', batch_size=100, seed=0)
  last = list(ds.eval_batches())[-1]
  assert last['mask'].dtype == np.float32 and last['label'].dtype == np.int32
  first = next(ds.eval_batches())
  padding = last['mask'] == 0
  assert padding.sum() == 40
  np.testing.assert_array_equal(last['image'][padding], np.broadcast_to(first['image'][0], (40, 8, 8, 1)))
  np.testing.assert_array_equal(last['label'][padding], np.full(40, first['label'][0]))


# --- Source and Dataset validation ---------------------------------------------------------

def test_source_and_dataset_refuse_impossible_settings():
  # Mutants: negative labels, empty labels, batch_size 0 and a negative process_index let through.
  loader = ConstantLoader(np.zeros((2, 4, 4, 1), np.float32))
  with pytest.raises(data.DataError, match=r'labels span \[-1, 1\]'):
    Source(labels=np.array([-1, 1]), num_classes=10, image_shape=(4, 4, 1), loader=loader, name='x')
  with pytest.raises(data.DataError, match='non-empty'):
    Source(labels=np.zeros(0, np.int32), num_classes=10, image_shape=(4, 4, 1), loader=loader, name='x')
  source = Source(labels=np.array([0, 1]), num_classes=2, image_shape=(4, 4, 1), loader=loader, name='x')
  with pytest.raises(data.DataError, match='batch_size'):
    Dataset(source, batch_size=0, seed=0)
  with pytest.raises(data.DataError, match='process_index -1'):
    Dataset(source, batch_size=2, seed=0, process_index=-1, process_count=2)


def test_a_loader_returning_the_wrong_dtype_is_named():
  # Mutant: Dataset._assemble checking the shape but not the dtype of the loader's images.
  loader = ConstantLoader(np.zeros((2, 4, 4, 1), np.float64))
  source = Source(labels=np.array([0, 1]), num_classes=2, image_shape=(4, 4, 1), loader=loader, name='x')
  with pytest.raises(data.DataError, match=r'x: loader returned images float64\(2, 4, 4, 1\), expected float32'):
    next(Dataset(source, batch_size=2, seed=0).train_batches())


def test_labels_are_int32_whatever_the_sources_dtype():
  # Mutant: Dataset._assemble not casting labels (an int64 or uint8 label array passed through).
  loader = ConstantLoader(np.zeros((2, 4, 4, 1), np.float32))
  source = Source(labels=np.array([0, 1, 1], np.int64), num_classes=2, image_shape=(4, 4, 1), loader=loader, name='x')
  dataset = Dataset(source, batch_size=2, seed=0)
  assert next(dataset.train_batches())['label'].dtype == np.int32
  assert next(dataset.eval_batches())['label'].dtype == np.int32
