"""Precise-BN recalibration against numpy population statistics, and eval.py's use of it."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from resnet_flax import bn_diagnostics, data, eval_lib, model_builder, precise_bn, train_lib
from resnet_flax.layers import BatchNorm
from test_train import block_sizes_flag, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two units, wide enough to learn within 10 steps (top-1 0.12 -> 0.36 once recalibrated,
# against 0.11 -> 0.41 for the six-unit digits model) at two thirds of its cost.
BLOCKS = ((32, 1, 2), (64, 1, 1))


def _dataset(seed=0, shape=(60, 3, 3, 5)):
  rng = np.random.RandomState(seed)
  # Channel means far from 0 and unequal scales: a lagging EMA would be visibly off.
  return (rng.randn(*shape) * np.array([0.5, 1.0, 2.0, 4.0, 0.1]) + np.array([3.0, -1.0, 0.0, 10.0, 5.0])
          ).astype(np.float32)


@pytest.mark.parametrize('ghost_batch_size', [None, 5])
def test_recalibration_recovers_the_exact_population_statistics(ghost_batch_size):
  images = _dataset()
  layer = BatchNorm(decay=0.9, ghost_batch_size=ghost_batch_size)
  variables = layer.init(jax.random.PRNGKey(0), images[:1], train=False)
  statistics = precise_bn.population_statistics(layer, variables, (images[i:i + 10] for i in range(0, 60, 10)))
  mean, variance = statistics[()]
  np.testing.assert_allclose(mean, images.astype(np.float64).mean((0, 1, 2)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(variance, images.astype(np.float64).var((0, 1, 2)), rtol=1e-5)
  recalibrated = precise_bn.with_statistics(variables, statistics)
  np.testing.assert_allclose(recalibrated['batch_stats']['moving_mean'], mean, rtol=1e-6)
  # The eval-mode output is now the whole data set standardized.
  y = layer.apply(recalibrated, images, train=False)
  np.testing.assert_allclose(np.asarray(y).mean((0, 1, 2)), 0.0, atol=1e-4)


def test_batches_of_unequal_size_give_the_population_statistics():
  # A short last batch: equal weights per batch had put the mean off by 0.23, the variance by 1.2.
  images = _dataset()
  layer = BatchNorm(decay=0.9)
  variables = layer.init(jax.random.PRNGKey(0), images[:1], train=False)
  sizes = [10, 2, 25, 3, 20]
  edges = np.cumsum([0, *sizes])
  statistics = precise_bn.population_statistics(layer, variables, (images[a:b] for a, b in zip(edges, edges[1:])))
  mean, variance = statistics[()]
  np.testing.assert_allclose(mean, images.astype(np.float64).mean((0, 1, 2)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(variance, images.astype(np.float64).var((0, 1, 2)), rtol=1e-5)


# A diverged run's infinite moments: NaN statistics, which the evaluation's non-finite note
# explains, not a numpy RuntimeWarning naming a line of precise_bn.py.
def test_infinite_moments_give_nan_statistics_without_a_numpy_warning(recwarn):
  moments = precise_bn._PopulationMoments()
  moments.add({'BatchNorm_0': {'mean': np.array([[np.inf, 1.0]]), 'variance': np.array([[1.0, 2.0]])}}, 4)
  (mean, variance), = moments.statistics().values()
  assert np.isinf(mean[0]) and np.isnan(variance[0]) and (mean[1], variance[1]) == (1.0, 2.0)
  assert [str(warning.message) for warning in recwarn] == []


@pytest.mark.parametrize('num_batches', [None, -1, 0, 2.5, True])
def test_a_number_of_batches_that_is_not_a_positive_int_is_refused_not_a_hang(num_batches):
  with pytest.raises(ValueError, match=r'num_batches=.*: give a positive number of training batches'):
    precise_bn.recalibrate(None, None, {}, num_batches)


def test_recalibration_keeps_other_state_and_changes_only_moving_statistics():
  images = _dataset(1, (20, 4, 5))[..., :5]
  layer = BatchNorm(zero_debias_moving_mean=True)
  variables = layer.init(jax.random.PRNGKey(0), images[:1], train=False)
  variables = {**variables, 'batch_stats': {**variables['batch_stats'], 'moving_mean_local_step': jnp.float32(7)}}
  recalibrated = precise_bn.with_statistics(variables, precise_bn.population_statistics(layer, variables, [images]))
  assert float(recalibrated['batch_stats']['moving_mean_local_step']) == 7.0
  np.testing.assert_array_equal(recalibrated['params']['beta'], variables['params']['beta'])


def test_frozen_statistics_cannot_be_recalibrated():
  layer = BatchNorm(frozen=True)
  images = _dataset()
  variables = layer.init(jax.random.PRNGKey(0), images[:1], train=False)
  with pytest.raises(ValueError, match='frozen'):
    precise_bn.population_statistics(layer, variables, [images[:10]])


def test_recalibration_and_discrepancy_report_on_a_short_high_decay_run(tmp_path):
  """10 steps at decay 0.999 leave the moving averages near their initial 0 / 1: eval mode is
  poor, batch statistics and recalibrated ones are not."""
  config = digits.get_config()
  config.update(batch_size=16, eval_batch_size=360, num_train_steps=10, warmup_steps=0, log_every_steps=10,
                checkpoint_every_steps=10, async_checkpointing=False)
  config.bn.decay = 0.999
  config.model_options.block_sizes = BLOCKS
  trained = train_lib.train_and_evaluate(config, str(tmp_path))
  config.bn_recalibration_batches = 4
  result = eval_lib.evaluate(config, str(tmp_path))
  assert result['before_recalibration']['top1'] == pytest.approx(trained['top1'], rel=1e-6)
  assert result['top1'] > result['before_recalibration']['top1'] + 0.15

  args = [sys.executable, os.path.join(REPO, 'eval.py'), '--config=' + os.path.join(REPO, 'configs', 'digits.py'),
          f'--workdir={tmp_path}', '--config.bn.decay=0.999', '--config.batch_size=16', '--config.eval_batch_size=360',
          '--config.bn_recalibration_batches=4', "--config.bn_report_batch_sizes=(8,64)",
          block_sizes_flag(BLOCKS)]
  completed = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert '| batch statistics, batch 64 |' in completed.stdout
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  assert report['step'] == 10
  assert report['moving']['top1'] == pytest.approx(trained['top1'], rel=1e-6)
  assert report['recalibrated']['top1'] == pytest.approx(result['top1'], rel=1e-6)
  assert report['batch']['8']['num_examples'] == 360 and report['batch']['64']['num_examples'] == 320
  assert min(report['batch']['8']['top1'], report['batch']['64']['top1']) > report['moving']['top1'] + 0.15
  # A report batch larger than the split: named as such (it had blamed the eval batch size).
  with pytest.raises(ValueError, match=r'config.bn_report_batch_sizes has 512, more than the 360 examples of the '
                                       r'test split; use sizes up to 360.'):
    bn_diagnostics.discrepancy_report(config, str(tmp_path), batch_sizes=(512,))


def test_a_data_error_during_recalibration_is_the_error_reported(tmp_path):
  # The prefetch thread runs the batches; closing them from the main thread meanwhile had raised
  # 'generator already executing' in place of the error that stopped recalibration.
  from PIL import Image

  from configs import default
  from resnet_flax import data, models
  for label in ('a', 'b'):
    (tmp_path / 'train' / label).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(np.full((20, 24, 3), 60 + i, np.uint8)).save(tmp_path / 'train' / label / f'{i}.jpg')
  (tmp_path / 'train' / 'b' / 'broken.jpg').write_bytes(b'not a jpeg')
  config = default.get_config()
  config.batch_size = 3
  config.data.update(name='imagefolder', dir=str(tmp_path), image_size=16, preprocessing='vgg', num_workers=1)
  model = models.get_model('resnet_v1_tiny', num_classes=2)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)), train=False))()
  with pytest.raises(data.DataError, match='broken.jpg'):
    precise_bn.recalibrate(config, model, variables, num_batches=3)


# The statistics of exactly the first num_batches training batches (one fewer, or batches from
# step 1, had passed), read here straight from the data pipeline.
def test_recalibrate_uses_exactly_the_first_num_batches_training_batches():
  config = tiny_config()
  config.batch_size = 8
  layer = BatchNorm()
  variables = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  recalibrated = precise_bn.recalibrate(config, layer, variables, num_batches=3)
  dataset = data.build(config.data, 'train', batch_size=8, seed=config.seed)
  images = np.concatenate([np.asarray(dataset.model_input(batch['image']), np.float64)
                           for batch in itertools.islice(dataset.train_batches(0), 3)])
  assert images.shape[0] == 24
  np.testing.assert_allclose(recalibrated['batch_stats']['moving_mean'], images.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(recalibrated['batch_stats']['moving_variance'], images.var((0, 1, 2)), rtol=1e-5)


def test_recalibrating_on_more_examples_than_the_training_set_is_warned_of(capsys):
  # eval.py --config.batch_size=3000 --config.bn_recalibration_batches=2 on digits' 1437 had said nothing.
  config = tiny_config()
  config.batch_size = 1000
  layer = BatchNorm()
  variables = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  precise_bn.recalibrate(config, layer, variables, num_batches=2)
  assert [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')] == [
      'warning: precise BN reads 2 batches of 1000 = 2,000 examples, more than the 1,437 training examples, so some '
      'count more than once in its statistics; recalibrate on at most 1 batch(es) of 1000.']
  # A batch larger than the data: smaller batches, as many (fewer would do too).
  assert precise_bn.repeated_examples_note(2, 3000, 1437).endswith('recalibrate on batches of at most 718.')
  assert precise_bn.repeated_examples_note(2, 700, 1437) is None  # 1,400: each example at most once


def _reference_batch_statistics(config, variables, batch_size):
  """Loss and top-1 of the eval split's full batches with train-mode BN over each whole batch:
  the model built without ghost batches or frozen statistics, applied batch by batch, and the
  metrics in numpy."""
  plain = config.copy_and_resolve_references()
  plain.batch_size = batch_size
  plain.bn.update(ghost_batch_size=None, frozen=False)
  model = model_builder.build_model(plain, 10)
  dataset = data.build(config.data, config.eval_split, batch_size=batch_size, seed=config.seed)
  apply = jax.jit(lambda images: model.apply(variables, images, train=True, mutable=['batch_stats'])[0])
  losses, hits, count = [], 0, 0
  for batch in list(dataset.eval_batches())[:dataset.num_examples // batch_size]:
    logits = np.asarray(apply(dataset.model_input(batch['image'])), np.float64)
    labels = np.asarray(batch['label'])
    log_softmax = logits - logits.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    losses.append(-log_softmax[np.arange(len(labels)), labels])
    hits += int((logits.argmax(1) == labels).sum())
    count += len(labels)
  return {'loss': float(np.concatenate(losses).mean()), 'top1': hits / count, 'num_examples': count}


# "Statistics are over each whole batch (no ghost or per-device groups, not frozen)", whatever the
# run trained with (frozen, train mode would normalize with the moving statistics).
@pytest.mark.parametrize('bn', [{'ghost_batch_size': 4}, {'frozen': True}])
def test_batch_statistics_are_over_each_whole_batch_whatever_the_bn_config(bn):
  config = tiny_config()
  config.bn.update(bn)
  model = model_builder.build_model(config, 10)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False))()
  measured = bn_diagnostics.evaluate_with_batch_statistics(config, variables, 40, 10)
  expected = _reference_batch_statistics(config, variables, 40)
  assert measured['num_examples'] == expected['num_examples'] == 360
  assert measured['loss'] == pytest.approx(expected['loss'], rel=1e-5)
  assert measured['top1'] == pytest.approx(expected['top1'])


def report_row(top1, loss, examples):
  """One row of a discrepancy report, as `evaluate_with_batch_statistics` gives it."""
  return {'top1': top1, 'top5': 1.0, 'loss': loss, 'num_examples': examples}


# Batch rows by size, each number in its column, the recalibrated row also without batch rows.
def test_format_report_rows_by_batch_size_with_each_number_in_its_column():
  report = {'step': 7, 'moving': report_row(0.5, 1.25, 360),
            'batch': {64: report_row(0.75, 0.5, 320), 8: report_row(0.875, 0.375, 360)},
            'recalibrated': report_row(0.625, 0.75, 360)}
  assert bn_diagnostics.format_report(report).splitlines() == [
      'BatchNorm statistics at step 7:', '', '| statistics | top-1 | loss | examples |', '|---|---|---|---|',
      '| moving averages (eval mode) | 50.00% | 1.2500 | 360 |',
      '| batch statistics, batch 8 | 87.50% | 0.3750 | 360 |',
      '| batch statistics, batch 64 | 75.00% | 0.5000 | 320 |',
      '| recalibrated (precise BN) | 62.50% | 0.7500 | 360 |']
  only_recalibrated = dict(report, batch={})
  assert bn_diagnostics.format_report(only_recalibrated).splitlines()[-1] == (
      '| recalibrated (precise BN) | 62.50% | 0.7500 | 360 |')
  assert bn_diagnostics.format_report(dict(report, recalibrated=None)).splitlines()[-1].startswith(
      '| batch statistics, batch 64 |')


# Without recalibration, a frozen-BN config (which cannot recalibrate) still gets its moving- and
# batch-statistics report.
def test_a_report_without_recalibration_does_not_need_recalibratable_statistics(tmp_path):
  config = tiny_config(2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  config.bn.frozen = True
  report = bn_diagnostics.discrepancy_report(config, str(tmp_path), batch_sizes=(120,), recalibration_batches=0)
  assert report['step'] == 2 and report['recalibrated'] is None and report['batch'][120]['num_examples'] == 360
