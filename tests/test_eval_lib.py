"""eval_lib: metrics over padded batches against numpy; what an evaluation tells of itself (other
settings than its run's, a non-finite loss, a batch that does not split, a damaged checkpoint)
and what it refuses before any pass."""

import json
import re

import jax
import numpy as np
import pytest

from resnet_flax import checkpoints, data, eval_lib, model_builder, precise_bn, steps, train_lib
from test_losses import numpy_correct_top_k, numpy_cross_entropy
from test_reliability import _truncate_files
from test_train import tiny_config


def test_evaluating_a_run_on_other_inputs_than_it_trained_on_is_warned_of(tmp_path, capsys):
  # Digits trained upsampled to 16 px and evaluated padded to 8 (eval.py's default config) had
  # scored 13.9% against 93.6%, without a word.
  config = tiny_config(2)
  config.data.update(image_size=16, digits_resize='upsample')
  train_lib.train_and_evaluate(config, str(tmp_path))
  capsys.readouterr()
  config.data.update(image_size=None, digits_resize='pad')
  eval_lib.evaluate(config, str(tmp_path))
  warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
  assert warning == [f"warning: evaluating {tmp_path} with other settings than its run's (data.image_size: 16 -> "
                     "8; data.digits_resize: upsample -> pad); give it the run's values to evaluate it as "
                     'trained.']
  # A step named by its path is its run's too (it had been evaluated without a word).
  step = tmp_path / 'checkpoints' / '2'
  eval_lib.evaluate(config, None, str(step))
  warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
  assert warning == [f"warning: evaluating {step} with other settings than its run's (data.image_size: 16 -> 8; "
                     "data.digits_resize: upsample -> pad); give it the run's values to evaluate it as trained."]
  assert checkpoints.run_workdir_of(str(step)) == str(tmp_path) and checkpoints.run_workdir_of(str(tmp_path)) is None
  assert checkpoints.run_workdir_of(str(step / 'default')) == str(tmp_path)  # the step's orbax item, as orbax names it
  config.eval_split = 'train'  # another split is no other input
  config.data.update(image_size=16, digits_resize='upsample')
  assert eval_lib.input_differences(config, str(tmp_path)) == []
  # Precise BN over per-device groups: the device count decides them.
  config.bn.cross_device = 'per_device'
  config.bn_recalibration_batches = 2
  assert eval_lib.input_differences(config, str(tmp_path)) == []  # on one device, the run's global groups
  recorded = json.loads((tmp_path / 'config.json').read_text())
  recorded['bn']['cross_device'] = 'per_device'
  (tmp_path / 'config.json').write_text(json.dumps({**recorded, 'device_count': 4}))
  assert eval_lib.input_differences(config, str(tmp_path)) == [
      "precise BN's statistics groups: 4 -> 16 examples (device_count: 4 -> 1)"]


def test_precise_bn_warns_of_other_statistics_groups_than_the_runs(tmp_path):
  config = tiny_config()
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  config.update(batch_size=64)  # eval.py's default config against a run at 16
  config.bn.ghost_batch_size = 8
  assert eval_lib.input_differences(config, str(tmp_path)) == []  # eval mode groups nothing
  config.bn_recalibration_batches = 2
  assert eval_lib.input_differences(config, str(tmp_path)) == [
      "precise BN's statistics groups: 16 -> 8 examples (batch_size: 16 -> 64, bn.ghost_batch_size: None -> 8)"]
  config.update(batch_size=16)
  config.bn.update(ghost_batch_size=None, cross_device='per_device')  # one device: the same groups
  assert eval_lib.input_differences(config, str(tmp_path)) == []
  recorded = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**recorded, 'batch_size': 'sixteen'}))  # edited by hand
  assert eval_lib.input_differences(config, str(tmp_path)) == []
  # Global statistics: the device count splits no group, so it is not named (it had been).
  (tmp_path / 'config.json').write_text(json.dumps({**recorded, 'device_count': 8}))
  config.update(batch_size=64)
  config.bn.cross_device = 'global'
  assert eval_lib.input_differences(config, str(tmp_path)) == [
      "precise BN's statistics groups: 16 -> 64 examples (batch_size: 16 -> 64)"]
  # A run with frozen statistics (at batch 1, say) had no groups to match: "1 -> 64 examples; give it the
  # run's values" had led to a batch of one, which recalibration refuses.
  frozen = {**recorded, 'batch_size': 1, 'bn': {**recorded['bn'], 'frozen': True}}
  (tmp_path / 'config.json').write_text(json.dumps(frozen))
  assert eval_lib.input_differences(config, str(tmp_path)) == []


def test_evaluating_the_variables_of_a_run_that_kept_averages_is_warned_of(tmp_path):
  # eval.py without the run's model_ema_decay had evaluated its variables without a word.
  config = tiny_config()
  config.model_ema_decay = 0.9
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  config.model_ema_decay = 0.99  # the same stored averages
  assert eval_lib.input_differences(config, str(tmp_path)) == []
  config.model_ema_decay = 0.0
  assert eval_lib.input_differences(config, str(tmp_path)) == [
      "model_ema_decay: 0.9 -> 0.0 (the run's variables, not its moving averages)"]


def test_a_default_given_explicitly_or_a_field_the_data_ignores_is_no_other_input(tmp_path):
  config = tiny_config()
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  # digits' defaults; label_offset is imagefolder's
  config.data.update(image_size=8, digits_resize='pad', label_offset=0)
  assert eval_lib.input_differences(config, str(tmp_path)) == []
  config.data.image_size = 12
  assert eval_lib.input_differences(config, str(tmp_path)) == ['data.image_size: 8 -> 12']


# The checkpoint holds no epsilon: one trained with bn.epsilon=1 and evaluated with
# the config's 1e-5 had scored 9.7% (79.2% as trained), without a word.
def test_paths_may_be_pathlib_paths_and_an_empty_workdir_is_refused(tmp_path):
  # A pathlib checkpoint had failed on `.strip`, a pathlib workdir deep in a path check; '' had
  # looked for checkpoints in the current directory.
  config = tiny_config(2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  by_text = eval_lib.evaluate(config, str(tmp_path))
  assert eval_lib.evaluate(config, tmp_path) == by_text
  assert eval_lib.evaluate(config, None, tmp_path / 'checkpoints' / '2') == by_text
  with pytest.raises(ValueError, match=r'^--workdir is empty; pass the directory of a training run\.$'):
    eval_lib.evaluate(config, ' ')


def test_another_batch_norm_epsilon_is_another_function(tmp_path):
  config = tiny_config()
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))
  config.bn.decay = 0.5  # training only
  config.bn.fold_in_eval = True  # the same function, rounded otherwise
  assert eval_lib.input_differences(config, str(tmp_path)) == []
  config.bn.epsilon = 1.0
  assert eval_lib.input_differences(config, str(tmp_path)) == [f'bn.epsilon: {tiny_config().bn.epsilon} -> 1.0']


def test_precise_bn_of_frozen_batch_norm_is_refused_before_any_pass(tmp_path):
  # It had evaluated with the moving statistics first, then stopped: "recalibration saw no batch statistics".
  config = tiny_config()
  config.bn.frozen = True
  config.bn_recalibration_batches = 2
  with pytest.raises(ValueError, match=r'^config.bn_recalibration_batches recomputes .* leave --config.bn.frozen out'):
    eval_lib.evaluate(config, str(tmp_path))


@pytest.mark.parametrize('settings, devices, named', [
    ({'batch_size': 1}, 1, 'config.batch_size=1'),
    ({'batch_size': 4, 'bn.ghost_batch_size': 1}, 1, 'config.bn.ghost_batch_size=1'),
    ({'batch_size': 4, 'bn.cross_device': 'per_device'}, 4,
     "config.batch_size=4 over 4 devices with cross_device='per_device'"),
    ({'batch_size': 2, 'bn.cross_device': 'per_device'}, 4, 'config.batch_size=2 does not split over 4 devices')])
def test_precise_bn_from_groups_of_one_example_is_refused_before_any_pass(tmp_path, monkeypatch, settings, devices,
                                                                         named):
  # A group of one normalizes each example by itself; recalibration had gone ahead (loss 3.9 -> 9.3).
  config = tiny_config()
  config.update_from_flattened_dict(settings)
  config.bn_recalibration_batches = 2
  monkeypatch.setattr(jax, 'device_count', lambda: devices)
  with pytest.raises(ValueError, match=rf'^{re.escape(named)}( leaves one example per BatchNorm statistics group|;)'
                     ) as error:
    eval_lib.evaluate(config, str(tmp_path))  # no checkpoint there: refused before looking
  # Not training's advice, config.bn.frozen=True, which recalibration refuses.
  assert 'frozen' not in str(error.value)


def test_eval_mode_ignores_statistics_groups_and_precise_bn_takes_training_s(tmp_path):
  # A run's ghost batches need not divide another evaluation batch or device count: eval mode
  # reads no batch statistics (it had been refused). Precise BN groups as training does.
  config = tiny_config(2)
  config.bn.ghost_batch_size = 4
  train_lib.train_and_evaluate(config, str(tmp_path))
  config.batch_size = 6  # ghost batches of 4 do not divide it
  assert eval_lib.evaluate(config, str(tmp_path))['step'] == 2
  loaded = eval_lib.load_checkpoint(config, str(tmp_path))
  assert loaded.model.arg_scope.batch_norm.get('ghost_batch_size') is None
  with pytest.raises(ValueError, match=r'^config.bn.ghost_batch_size=4 does not divide config.batch_size=6'):
    loaded.recalibrated(config, 1)
  config.batch_size = 16
  grouped = precise_bn.recalibrate(config, model_builder.build_model(config, 10), loaded.variables, 2)
  ungrouped = precise_bn.recalibrate(config, loaded.model, loaded.variables, 2)
  ours = loaded.recalibrated(config, 2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(ours), jax.device_get(grouped))
  # Pooled statistics of a layer do not depend on its groups, but each group normalized by its
  # own moments feeds the next layers other activations: groups of 4 are not groups of 16.
  same = jax.tree_util.tree_map(np.allclose, jax.device_get(ours['batch_stats']),
                                jax.device_get(ungrouped['batch_stats']))
  assert not all(jax.tree_util.tree_leaves(same))


@pytest.mark.parametrize('eval_batch_size, named', [(0, 'config.eval_batch_size=0, so config.batch_size=3 does'),
                                                     (5, 'config.eval_batch_size=5 does')])
def test_an_eval_batch_that_does_not_split_names_the_setting_that_gave_it(monkeypatch, eval_batch_size, named):
  config = tiny_config()
  config.update(batch_size=3, eval_batch_size=eval_batch_size)
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  with pytest.raises(ValueError, match=rf'^{named} not split over 2 devices; use a multiple of 2'):
    eval_lib.build_eval_dataset(config)


def test_a_non_finite_evaluation_is_explained():
  config = tiny_config()
  assert eval_lib.nonfinite_note({'loss': 0.5, 'top1': 0.9}, config) is None
  note = eval_lib.nonfinite_note({'loss': float('nan'), 'top1': 0.0}, config)
  assert 'accuracy means nothing' in note and '--config.bn_recalibration_batches' in note
  # After recalibration, that advice would be what the user just did.
  note = eval_lib.nonfinite_note({'loss': float('inf'), 'before_recalibration': {'loss': float('nan')}}, config)
  assert 'even with BatchNorm statistics recomputed' in note and '--config.bn_recalibration_batches' not in note


def test_a_damaged_config_record_does_not_stop_an_evaluation(tmp_path):
  (tmp_path / 'config.json').write_text('{"bro')
  assert eval_lib.input_differences(tiny_config(), str(tmp_path)) == []


# Sums over batches, then divided by the examples: padding counts nowhere, and a loss averaged
# per batch (or top-5 taken from top-1 hits, or only the last batch kept) would differ.
def test_metrics_over_batches_with_a_padded_last_one_are_those_of_the_real_examples():
  rng = np.random.default_rng(0)
  sizes, batch_size = [8, 8, 3], 8  # 19 examples; the last batch padded with 5 garbage slots
  logits = rng.normal(size=(19, 10)).astype(np.float32) * 2
  labels = rng.integers(0, 10, 19).astype(np.int32)
  labels[:4] = np.argmax(logits[:4], -1)  # some top-1 hits
  batches, start = [], 0
  for size in sizes:
    pad = batch_size - size
    batches.append({'logits': np.concatenate([logits[start:start + size], np.full((pad, 10), 9.0, np.float32)]),
                    'label': np.concatenate([labels[start:start + size], np.zeros(pad, np.int32)]),
                    'mask': np.concatenate([np.ones(size, np.float32), np.zeros(pad, np.float32)])})
    start += size
  step_fn = jax.jit(lambda _, batch: steps.classification_sums(batch['logits'], batch))
  got = eval_lib.metrics_over(step_fn, {}, batches)
  assert got['num_examples'] == 19
  assert got['loss'] == pytest.approx(numpy_cross_entropy(logits, labels).mean(), rel=1e-6)
  assert got['top1'] == pytest.approx(numpy_correct_top_k(logits, labels, 1.0, 1) / 19)
  assert got['top5'] == pytest.approx(numpy_correct_top_k(logits, labels, 1.0, 5) / 19)
  assert got['top1'] < got['top5']


def test_an_evaluation_whose_every_example_was_skipped_is_refused_not_scored_zero():
  # on_bad_image='skip' on an eval split of unreadable files: every slot masked out. It had
  # reported loss 0.0 and top-1 0.00% over 0 examples, with exit status 0.
  batch = {'logits': np.zeros((4, 10), np.float32), 'label': np.zeros(4, np.int32), 'mask': np.zeros(4, np.float32)}
  step_fn = jax.jit(lambda _, batch: steps.classification_sums(batch['logits'], batch))
  with pytest.raises(data.DataError, match=r'^no example of the eval split could be read: every one was skipped'):
    eval_lib.metrics_over(step_fn, {}, [batch, batch])


# A record written before the device count was recorded is no other device count.
def test_a_config_record_without_a_device_count_is_no_other_device_count(tmp_path):
  config = tiny_config()
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict()))  # no 'device_count'
  config.bn.cross_device = 'per_device'
  config.bn_recalibration_batches = 2
  assert eval_lib.input_differences(config, str(tmp_path)) == []


# The fix offered is an older checkpoint, never the damaged one itself.
def test_a_damaged_newest_checkpoint_names_the_older_ones_only(tmp_path):
  config = tiny_config(2)
  config.checkpoint_every_steps = 1
  train_lib.train_and_evaluate(config, str(tmp_path))
  _truncate_files(tmp_path / 'checkpoints' / '2')
  directory = tmp_path / 'checkpoints'
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(f'Older checkpoints in {directory}: steps [1]; if this one is damaged, pass '
                                     f'--checkpoint={directory}/1.')):
    eval_lib.load_checkpoint(config, str(tmp_path))


def test_a_workdir_that_does_not_exist_is_named_so(tmp_path):
  # It had said "no checkpoint in DIR/checkpoints; train first", where DIR was most likely a typo.
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'^--workdir {tmp_path}/typo does not exist; pass the workdir train.py wrote to.$'):
    eval_lib.evaluate(tiny_config(), str(tmp_path / 'typo'))
  assert not (tmp_path / 'typo').exists()
  (tmp_path / 'file').write_text('')
  with pytest.raises(checkpoints.CheckpointError,
                     match=f'^--workdir {tmp_path}/file is a file, not a directory; pass the workdir train.py wrote'):
    eval_lib.evaluate(tiny_config(), str(tmp_path / 'file'))
  # A folder this user may not enter exists: the message is the one for an empty workdir, not "does not exist".
  (tmp_path / 'locked' / 'run').mkdir(parents=True)
  (tmp_path / 'locked').chmod(0)
  try:
    with pytest.raises(checkpoints.CheckpointError, match='^no checkpoint in'):  # root enters it: the same message
      eval_lib.evaluate(tiny_config(), str(tmp_path / 'locked' / 'run'))
  finally:
    (tmp_path / 'locked').chmod(0o755)
