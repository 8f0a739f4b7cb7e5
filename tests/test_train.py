"""End to end: train, evaluate, checkpoint, resume, command-line overrides and errors."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import digits
from resnet_flax import (checkpoints, cli, data, eval_lib, losses, metrics_writer, model_builder, optim, sharding, slim,
                         train_lib)
from resnet_flax.slim import names
from resnet_flax.train_state import abstract_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What these tests check (the loop, checkpoints, resume, devices, faults) does not depend on
# the model's depth, but tracing and compiling grow with it: two units (a strided projection
# unit, then a stride-1 one) instead of the digits model's six halve a run's time. Runs
# through train.py and eval.py get the same model with SMALL_MODEL_FLAG.
SMALL_BLOCKS = ((8, 1, 2), (16, 1, 1))


def block_sizes_flag(block_sizes):
  """The train.py / eval.py flag that builds the model from `block_sizes`."""
  return '--config.model_options.block_sizes=' + repr(block_sizes).replace(' ', '')


SMALL_MODEL_FLAG = block_sizes_flag(SMALL_BLOCKS)


def tiny_config(num_train_steps=4):
  config = digits.get_config()
  config.batch_size = 16
  config.eval_batch_size = 128
  config.num_train_steps = num_train_steps
  config.warmup_steps = 0
  config.lr_schedule = 'constant'  # so a 2-step run continued to 4 equals a 4-step run
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.async_checkpointing = False
  config.model_options.block_sizes = SMALL_BLOCKS
  return config


def test_logged_throughput_waits_for_the_steps(tmp_path, monkeypatch):
  # Steps run asynchronously; an interval is timed after its summary's host sync, which waits
  # for them. Timed before it, img/s had counted dispatch only (1,450 img/s logged for a
  # ResNet-50 step that takes 2 s on this CPU).
  summarize = train_lib._summarize

  def summarize_after_a_wait(*args, **kwargs):
    time.sleep(0.5)  # standing in for steps still running when the sync starts
    return summarize(*args, **kwargs)

  monkeypatch.setattr(train_lib, '_summarize', summarize_after_a_wait)
  config = tiny_config()
  train_lib.train_and_evaluate(config, str(tmp_path))
  rates = [record['train/images_per_second'] for record in metrics_writer.read_records(str(tmp_path))
           if 'train/images_per_second' in record]
  assert len(rates) == 2 and max(rates) <= config.log_every_steps * config.batch_size / 0.5


def _read_params(workdir, config, step):
  target = abstract_train_state(model_builder.build_model(config, 10), optim.build_optimizer(config), (8, 8, 1),
                                with_averages=config.model_ema_decay > 0)
  return checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints')).restore(step, target)


def test_a_run_switched_to_frozen_statistics_resumes_and_keeps_them(tmp_path, capsys):
  # Freezing BN for the last steps of a run: its statistics options stay as they were, since
  # they decide the state the checkpoints hold (here zero-debias's biased mean and step count).
  config = tiny_config(2)
  config.bn.zero_debias_moving_mean = True
  train_lib.train_and_evaluate(config, str(tmp_path))
  config.num_train_steps, config.bn.frozen = 4, True
  assert train_lib.train_and_evaluate(config, str(tmp_path))['step'] == 4
  assert 'warning: resuming with a changed config: bn.frozen: False -> True' in capsys.readouterr().err
  before, after = _read_params(tmp_path, config, 2), _read_params(tmp_path, config, 4)
  assert 'biased' in str(jax.tree_util.tree_structure(after.batch_stats))
  jax.tree_util.tree_map(np.testing.assert_array_equal, after.batch_stats, before.batch_stats)
  assert not np.array_equal(*(jax.tree_util.tree_leaves(state.params)[0] for state in (before, after)))


def test_train_eval_round_trip_and_logs(tmp_path, caplog, capsys):
  config = tiny_config()
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 4 and result['num_examples'] == 360
  assert 0.0 <= result['top1'] <= result['top5'] <= 1.0
  caplog.clear()
  capsys.readouterr()
  again = eval_lib.evaluate(config, str(tmp_path))
  assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
  assert 'warning' not in capsys.readouterr().err
  for key in ('step', 'loss', 'top1', 'top5', 'num_examples'):
    assert again[key] == pytest.approx(result[key], rel=1e-6), key
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines if 'train/loss' in line] == [2, 4]
  assert {'train/loss', 'train/top1', 'train/top5', 'train/learning_rate', 'train/images_per_second'} <= set(lines[0])
  assert any('eval/top1' in line for line in lines)
  assert list((tmp_path / 'tensorboard').iterdir()), 'no TensorBoard event file'
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


def test_a_failing_evaluation_keeps_the_checkpoint_of_its_step(tmp_path, monkeypatch):
  # The evaluation ran before the save of the same step: a bad validation image stopped the run
  # with nothing saved, and with eval_every_steps == checkpoint_every_steps (the ImageNet
  # configs) no checkpoint was ever written.
  config = tiny_config(4)
  config.eval_every_steps = 2

  def failing(*args, **kwargs):
    raise ValueError('image val/dog/x.png cannot be read')

  monkeypatch.setattr(eval_lib, 'evaluate_dataset', failing)
  with pytest.raises(ValueError, match='cannot be read'):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert checkpoints.committed_steps(str(tmp_path / 'checkpoints')) == [2]


@pytest.mark.parametrize('step, named', [(1, 'from the initial weights, so not from the learning rate'),
                                         (5, 'Lower config.learning_rate')])
def test_a_non_finite_step_names_the_likely_cause(step, named):
  # At step 1 the advice had been to lower a learning rate that was 0 (warm-up) and had not acted.
  history = [{'loss': np.float32(np.nan), 'nonfinite': np.bool_(True)}]
  with pytest.raises(train_lib.NonFiniteLossError, match=named):
    train_lib._summarize(history, step, skip_nonfinite=False, last_saved=None)


def test_resuming_on_another_data_set_is_refused(tmp_path):
  # Digits and synthetic data both have 10 classes: the state fit, and the run trained on.
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  config = tiny_config(4)
  config.data.update(name='synthetic', num_examples=64, image_size=8, channels=1)
  with pytest.raises(ValueError, match=rf"{tmp_path} holds a run on digits \(its config.json\), but "
                                       r"config.data.name is 'synthetic'; pass another --workdir"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_config_json_describes_the_newest_checkpoint_when_a_changed_start_fails(tmp_path, monkeypatch):
  # A resumed start with a changed config rewrote config.json at once; when it then failed
  # before saving, the record of what trained the checkpoints was lost.
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  config = tiny_config(4)
  config.learning_rate = 0.5

  def failing(*args, **kwargs):
    raise FloatingPointError('non-finite loss or gradients at step 4')

  with monkeypatch.context() as patched:
    patched.setattr(train_lib, '_log_interval', failing)
    with pytest.raises(FloatingPointError):
      train_lib.train_and_evaluate(config, str(tmp_path))
  assert metrics_writer.recorded_config(str(tmp_path))['learning_rate'] == tiny_config().learning_rate
  train_lib.train_and_evaluate(config, str(tmp_path))  # saves step 4: now the record is its config
  assert metrics_writer.recorded_config(str(tmp_path))['learning_rate'] == 0.5


def test_resume_equals_uninterrupted_run(tmp_path):
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  train_lib.train_and_evaluate(tiny_config(4), str(straight))
  train_lib.train_and_evaluate(tiny_config(2), str(interrupted))
  resumed = train_lib.train_and_evaluate(tiny_config(4), str(interrupted))
  assert resumed['step'] == 4
  finished_again = train_lib.train_and_evaluate(tiny_config(4), str(interrupted))  # nothing left to train
  assert finished_again['top1'] == resumed['top1']
  a, b = _read_params(straight, tiny_config(), 4), _read_params(interrupted, tiny_config(), 4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_zero_steps_evaluate_the_initial_weights_and_record_them_as_step_0(tmp_path):
  # A baseline run (the initial or init_checkpoint's weights) had printed its evaluation and recorded nothing.
  config = tiny_config(0)
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  model = model_builder.build_model(config, 10)
  variables = model.init(jax.random.PRNGKey(config.seed), np.zeros((1, 8, 8, 1), np.float32), train=False)
  eval_ds = eval_lib.build_eval_dataset(config)
  by_hand = eval_lib.evaluate_dataset(eval_lib.make_eval_step(model, sharding.data_mesh()), variables, eval_ds,
                                      sharding.data_mesh())
  assert result == {'step': 0, **by_hand}
  expected = [{'step': 0, **{f'eval/{key}': float(value) for key, value in by_hand.items()}}]
  assert metrics_writer.read_records(str(tmp_path)) == expected
  train_lib.train_and_evaluate(config, str(tmp_path))  # again: step 0 is recorded once
  assert metrics_writer.read_records(str(tmp_path)) == expected
  # A training run started afresh in the same workdir keeps it, the baseline of its curve.
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  assert [record['step'] for record in metrics_writer.read_records(str(tmp_path))] == [0, 2, 2]


def test_a_nonfinite_evaluation_warns_at_zero_steps_and_when_a_finished_run_restarts(tmp_path, capsys):
  # Moving variances of NaN (statistics that fit no weights) make every evaluation's loss NaN. The
  # loop's evaluations warned of it; a zero-step run's (a baseline) had printed its NaN without a word.
  config = tiny_config(0)
  model = model_builder.build_model(config, 10)
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32), train=False))
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, np.nan) if path[-1].key == 'moving_variance' else x, variables['batch_stats'])
  checkpoints.save_tree(str(tmp_path / 'negative'), {**variables, 'step': 0})
  config.init_checkpoint = str(tmp_path / 'negative')
  for steps in (0, 1):
    config.num_train_steps = steps
    result = train_lib.train_and_evaluate(config, str(tmp_path / f'run{steps}'))
    assert np.isnan(result['loss'])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: ')]
    assert warnings == [f"warning: the evaluation's loss is nan, so its accuracy means nothing: most likely the "
                        f'moving BatchNorm statistics (decay {config.bn.decay}) do not fit the weights yet. Evaluate '
                        'after more steps, or with statistics recomputed from training batches: eval.py '
                        '--config.bn_recalibration_batches=20.'], steps
  # The finished run started again reports its evaluation, and the warning with it.
  train_lib.train_and_evaluate(config, str(tmp_path / 'run1'))
  assert [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: ')] == warnings


def test_train_step_updates_moving_statistics(tmp_path):
  config = tiny_config(2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  state = _read_params(tmp_path, config, 2)
  moving_means = [v for path, v in names.flatten(state.batch_stats).items() if path[-1] == 'moving_mean']
  assert moving_means and all(not np.allclose(v, 0.0) for v in moving_means), 'moving statistics never updated'


def test_slim_l2_counts_conv_weights_and_with_bn_weight_decay_gamma_and_beta():
  params = {'conv1': {'weights': np.full((1, 1, 1, 2), 2.0), 'biases': np.ones(2),
                      'BatchNorm': {'gamma': np.full(3, 5.0), 'beta': np.full(3, -2.0)}},
            'preact': {'beta': np.ones(3)}, 'logits': {'weights': np.full((1, 1, 2, 1), 3.0), 'biases': np.ones(1)}}
  assert float(losses.slim_l2_regularization(params, 1e-2)) == pytest.approx(0.5 * 1e-2 * (8.0 + 18.0))
  # gamma: 3 * 25, beta: 3 * 4 + 3 * 1; biases never.
  assert float(losses.slim_l2_regularization(params, 1e-2, 1e-3)) == pytest.approx(
      0.5 * 1e-2 * 26.0 + 0.5 * 1e-3 * (75.0 + 12.0 + 3.0))
  assert float(losses.slim_l2_regularization(params, 0.0, 1e-3)) == pytest.approx(0.5 * 1e-3 * 90.0)
  # Decays may be traced (a sweep vmapped over them): no Python test of their value.
  swept = jax.vmap(lambda decay: losses.slim_l2_regularization(params, decay, decay))(np.array([0.0, 1e-2]))
  np.testing.assert_allclose(swept, [0.0, 0.5 * 1e-2 * (26.0 + 90.0)], rtol=1e-6)


def run_script(script, *args):
  """`python <script> ARGS` from the repository on CPU; the CompletedProcess, output captured."""
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)


def test_command_line_overrides_train_and_eval_json(tmp_path):
  workdir = str(tmp_path)
  overrides = ['--config=configs/digits.py', f'--workdir={workdir}', '--config.num_train_steps=2',
               '--config.batch_size=8', '--config.bn.decay=0.5', '--config.bn.zero_debias_moving_mean=True',
               '--config.checkpoint_every_steps=0', SMALL_MODEL_FLAG]
  trained = run_script('train.py', *overrides)
  assert trained.returncode == 0, trained.stderr
  assert 'Final test accuracy' in trained.stdout
  state = _read_params(workdir, _override(tiny_config(), decay=0.5, zero_debias=True), 2)
  bn = state.batch_stats['block1']['unit_1']['bottleneck_v1']['conv1']['BatchNorm']
  assert float(bn['moving_mean_local_step']) == 2.0  # zero-debias on, from the command line
  evaluated = run_script('eval.py', '--config=configs/digits.py', f'--workdir={workdir}',
                   '--config.bn.zero_debias_moving_mean=True', SMALL_MODEL_FLAG)
  assert evaluated.returncode == 0, evaluated.stderr
  result = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert result['step'] == 2 and result['num_examples'] == 360 and {'loss', 'top1', 'top5'} <= set(result)


def _override(config, decay, zero_debias):
  config.bn.decay = decay
  config.bn.zero_debias_moving_mean = zero_debias
  return config


@pytest.mark.parametrize('config_file, override, named', [
    ([], '--config.bn.decya=0.9', ('decya', 'decay')),
    # With --config=FILE the overrides are applied while parsing, not while defining flags.
    (['--config=configs/digits.py'], '--config.bn.decya=0.9', ('decya', 'decay')),
    (['--config=configs/digits.py'], '--config.batch_norm.decay=0.9', ('batch_norm',)),
    # A field below a value: ml_collections' TypeError (indexing a string) had been a traceback,
    # and its ValueError for a None field one too.
    ([], '--config.model.name=x', ("config.model holds a value ('resnet_v1_digits'), not fields, so "
                                   'config.model.name names none; set config.model itself (--config.model=<value>) '
                                   '(in: --config.model.name=x)',)),
    (['--config=configs/cifar10.py'], '--config.data.dir.x=/data', ('config.data.dir holds a value (None)',)),
    ([], '--config.data.dir.x=/data', ('config.data.dir holds a value (None)',)),  # applied while defining flags
])
def test_bad_config_key_is_one_line_naming_it(tmp_path, config_file, override, named):
  result = run_script('train.py', f'--workdir={tmp_path}', *config_file, override)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and all(word in lines[0] for word in named), result.stderr


@pytest.mark.parametrize('settings, devices, named', [
    ({'batch_size': 1}, 1, 'config.batch_size=1'),
    ({'batch_size': 8, 'bn.ghost_batch_size': 1}, 1, 'config.bn.ghost_batch_size=1'),
    ({'batch_size': 8, 'bn.cross_device': 'per_device'}, 8, "over 8 devices with cross_device='per_device'"),
])
def test_one_example_per_bn_statistics_group_in_training_is_refused(tmp_path, settings, devices, named):
  config = tiny_config()
  config.update_from_flattened_dict(settings)
  with pytest.raises(ValueError, match='one example per BatchNorm statistics group') as error:
    model_builder.check_statistics_groups(config, devices)
  assert named in str(error.value) and 'config.bn.frozen=True' in str(error.value)
  config.bn.frozen = True  # statistics never come from the batch: nothing to refuse
  model_builder.check_statistics_groups(config, devices)
  config.bn.frozen = False
  if devices == 1:  # what train.py runs: refused before any data or compilation
    with pytest.raises(ValueError, match=named.replace('.', r'\.')):
      train_lib.train_and_evaluate(config, str(tmp_path))


def test_a_head_smaller_than_the_data_classes_is_refused_and_a_larger_one_kept(tmp_path):
  config = tiny_config()
  assert model_builder.head_size(config, 10) == 10
  config.num_classes = 1001  # slim's background class: more logits than labels is fine
  assert model_builder.head_size(config, 1000) == 1001
  config.num_classes = 5
  with pytest.raises(ValueError, match=r'config\.num_classes=5 but the data has 10 classes, so labels 5\.\.9'):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_two_examples_per_statistics_group_are_enough():
  config = tiny_config()
  config.batch_size = 2
  model_builder.check_statistics_groups(config, 1)
  config.batch_size, config.bn.cross_device = 16, 'per_device'
  model_builder.check_statistics_groups(config, 8)


def test_a_batch_larger_than_the_training_split_is_warned_of(tmp_path, capsys):
  # It trains (every batch repeats examples), but BatchNorm's statistics then count repeats.
  config = tiny_config(1)
  config.data.update(name='synthetic', image_size=8, channels=1, num_classes=10, num_examples=12)
  config.batch_size = 16
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert ('warning: config.batch_size=16 is more than the 12 training examples, so every batch holds some of '
          "them more than once (and BatchNorm's statistics count each copy); lower config.batch_size unless that "
          'is meant.') in capsys.readouterr().err


def test_frozen_bn_trains_and_evaluates_at_batch_one(tmp_path):
  # Frozen statistics make a batch of one legitimate; eval_batch_size=1 used to crash in
  # the metrics (gathers with no inferable sharding).
  config = tiny_config(2)
  config.update(batch_size=1, eval_batch_size=1)
  config.bn.frozen = True
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 2 and result['num_examples'] == 360


@pytest.mark.parametrize('contents, named', [
    (None, 'No such file'), ('def get_config(:\n', 'invalid syntax at'), ('x = 1\n', 'no get_config()'),
])
def test_a_config_file_that_cannot_load_is_one_line(tmp_path, contents, named):
  path = tmp_path / 'my_config.py'
  if contents is not None:
    path.write_text(contents)
  result = run_script('train.py', f'--workdir={tmp_path}', f'--config={path}')
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and named in lines[0], result.stderr


def test_eval_without_checkpoint_is_one_line(tmp_path):
  result = run_script('eval.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'error: no checkpoint in {tmp_path}/checkpoints; '
                                                'train first or pass --checkpoint=PATH.']


@pytest.mark.parametrize('files, named', [
    (['checkpoint', 'model.ckpt-9.index', 'model.ckpt-9.data-00000-of-00001'], ''),
    (['model.ckpt-999.index', 'model.ckpt-1000.index', 'model.ckpt-1000.data-00000-of-00001'], '/model.ckpt-1000'),
    (['resnet_v1_50.ckpt'], '/resnet_v1_50.ckpt'),
])
def test_eval_of_a_tensorflow_checkpoint_folder_as_workdir_names_the_slim_checkpoint(tmp_path, files, named):
  for name in files:
    (tmp_path / name).write_text('')
  result = run_script('eval.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  # It had said "train first or pass --checkpoint=PATH".
  assert result.stderr.strip().splitlines() == [
      f'error: no checkpoint in {tmp_path}/checkpoints; train first or pass --checkpoint=slim:{tmp_path}{named} '
      '(the TensorFlow checkpoint there) without --workdir.']


def test_a_run_may_train_in_the_folder_of_the_tensorflow_checkpoint_it_starts_from(tmp_path):
  # As a fine-tuning run written into the folder its TF-Slim checkpoint was downloaded to.
  config = tiny_config(2)
  model = model_builder.build_model(config, 10)
  variables = model.init(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), np.float32), train=False)
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', variables, model, image_shape=(8, 8, 1))
  config.init_checkpoint = f'slim:{prefix}'
  assert train_lib.train_and_evaluate(config, str(tmp_path))['step'] == 2


def test_a_workdir_with_its_own_runs_and_an_exported_tensorflow_checkpoint_is_still_a_workdir(tmp_path):
  assert train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))['step'] == 2
  (tmp_path / 'model.ckpt-2.index').write_text('')  # e.g. `python -m resnet_flax.slim export` into it
  assert eval_lib.evaluate(tiny_config(2), str(tmp_path))['step'] == 2


@pytest.mark.parametrize('script', ['train.py', 'eval.py'])
def test_help_lists_the_main_flags(script):
  # They are defined in resnet_flax/cli.py; absl had listed them only under --helpfull.
  result = run_script(script, '--help')  # absl exits with status 1 after the help
  assert all(f'--{flag}' in result.stdout for flag in ('config', 'workdir', '[no]traceback')), result.stdout


def test_a_tuple_override_given_twice_is_refused_not_joined():
  result = run_script('train.py', '--config.lr_boundaries=(0.2,)', '--config.lr_boundaries=(0.5,)')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == ['error: --config.lr_boundaries is given 2 times, which joins the '
                                                'tuples into (0.2, 0.5); give it once.']


def test_an_override_the_run_never_reads_is_refused_in_one_line():
  # A config file may set every optimizer's fields; an override of one the run ignores is a mistake.
  result = run_script('train.py', '--config.lars.trust_coefficient=0.002')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --config.lars.trust_coefficient does nothing with config.optimizer='sgd': it is read only with "
      "config.optimizer='lars'; set that as well, or drop --config.lars.trust_coefficient."]


@pytest.mark.parametrize('script, words, stray', [
    ('train.py', ('--config.bn.zero_debias_moving_mean', 'False'), "'False'"),  # would have set it to True
    ('eval.py', ('configs/cifar10.py',), "'configs/cifar10.py'"),  # would have run the default config
])
def test_a_word_that_is_not_a_flag_is_refused_not_dropped(tmp_path, script, words, stray):
  result = run_script(script, f'--workdir={tmp_path}', *words)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f'error: unexpected argument(s) {stray}: every setting is a flag with its value after "=", e.g. '
      '--config.bn.scale=False (a boolean flag alone means True) and --config=configs/<name>.py.']
  assert not (tmp_path / 'checkpoints').exists()


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys):
  def interrupted():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_status:
    cli.run_reporting_user_errors(interrupted)
  assert exit_status.value.code == 130
  assert capsys.readouterr().err == ('interrupted (Ctrl-C); rerun the same command to resume from the newest '
                                     'checkpoint.\n')
  with pytest.raises(SystemExit) as exit_status:  # eval.py: nothing to resume
    cli.run_reporting_user_errors(interrupted, resumes=False)
  assert exit_status.value.code == 130 and capsys.readouterr().err == 'interrupted (Ctrl-C).\n'


def test_running_out_of_host_memory_is_one_line(capsys):
  def too_big():  # what numpy raises for --config.data.image_size=100000 (112 GiB of synthetic images)
    raise MemoryError('Unable to allocate 112. GiB for an array with shape (4, 100000, 100000, 3)')

  with pytest.raises(SystemExit) as exit_status:
    cli.run_reporting_user_errors(too_big)
  assert exit_status.value.code == 2
  assert capsys.readouterr().err == ('error: out of host memory (Unable to allocate 112. GiB for an array with shape '
                                     '(4, 100000, 100000, 3)); lower config.batch_size or config.data.image_size.\n')


@pytest.mark.parametrize('wrapped', [False, True])
def test_running_out_of_device_memory_is_one_line(capsys, wrapped):
  def too_big():  # XLA's own failure: what a batch too large for the GPU raises there
    try:
      jax.numpy.ones((2**61,), np.uint8).block_until_ready()
    except jax.errors.JaxRuntimeError as error:
      if wrapped:  # as orbax's read of an array re-raises it: a ValueError, a user error's type, naming an index
        raise ValueError('Encountered error while reading array index 0') from error
      raise

  with pytest.raises(SystemExit) as exit_status:
    cli.run_reporting_user_errors(too_big)
  assert exit_status.value.code == 2
  assert capsys.readouterr().err == (
      'error: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating 2305843009213693952 bytes.); lower '
      'config.batch_size (config.eval_batch_size when it is evaluation that fails) or config.data.image_size, or free '
      'the device of other programs.\n')


def test_errors_that_are_bugs_keep_their_traceback():
  def bug():
    raise RuntimeError('an invariant broke')

  with pytest.raises(RuntimeError, match='an invariant broke'):
    cli.run_reporting_user_errors(bug)


@pytest.mark.parametrize('script, default', [('train.py', ' or leave the flag out (/tmp/resnet_flax)'),
                                             ('eval.py', '')])
def test_empty_workdir_is_one_line_not_the_default(script, default):
  result = run_script(script, '--workdir=')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'error: --workdir is empty; pass a directory{default}.']


@pytest.mark.parametrize('checkpoint, named', [
    ('', '--checkpoint is empty; pass a checkpoint directory or slim:PATH, or leave the flag out.'),
    ('slim:', "'slim:' names no checkpoint; give slim:PATH"),
    # A TF checkpoint passed without slim: (its prefix, one of its files, or its folder); any other file.
    ('{workdir}/model.ckpt', '{workdir}/model.ckpt is a TensorFlow checkpoint, not an orbax one; pass '
                             'slim:{workdir}/model.ckpt.'),
    ('{workdir}/model.ckpt.data-00000-of-00001', '{workdir}/model.ckpt.data-00000-of-00001 is a TensorFlow '
                                                 'checkpoint, not an orbax one; pass slim:{workdir}/model.ckpt.'),
    ('{workdir}/tf', '{workdir}/tf holds a TensorFlow checkpoint, not an orbax one; pass '
                     'slim:{workdir}/tf/model.ckpt-3.'),
    ('{workdir}/notes.txt', '{workdir}/notes.txt is a file, not an orbax checkpoint directory; for a TF-Slim '
                            'checkpoint pass slim:{workdir}/notes.txt.'),
    ('{workdir}', '{workdir} is a training workdir, not a checkpoint; name one of its checkpoints, '
                  '{workdir}/checkpoints/<step> (eval.py: or pass --workdir={workdir} for the newest).'),
    ('{workdir}/converted', '{workdir}/converted is what `python -m resnet_flax.slim convert` wrote; pass '
                            '{workdir}/converted/variables.'),
    ('{workdir}/checkpoints', '{workdir}/checkpoints holds checkpoints, it is not one; name one of them, e.g. the '
                              'newest: {workdir}/checkpoints/4.'),
])
def test_checkpoint_paths_that_name_no_checkpoint_say_what_to_name(tmp_path, checkpoint, named):
  for step in (2, 4):
    (tmp_path / 'checkpoints' / str(step)).mkdir(parents=True)
  (tmp_path / 'model.ckpt.index').write_bytes(b'')  # a TF checkpoint's prefix, passed without slim:
  (tmp_path / 'model.ckpt.data-00000-of-00001').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('')
  (tmp_path / 'tf').mkdir()
  (tmp_path / 'tf' / 'model.ckpt-3.index').write_bytes(b'')
  (tmp_path / 'converted' / 'variables').mkdir(parents=True)
  with pytest.raises(ValueError) as error:
    eval_lib.load_checkpoint(tiny_config(), None, checkpoint.format(workdir=tmp_path))
  assert str(error.value).startswith(named.format(workdir=tmp_path))


def test_bfloat16_training_keeps_float32_state(tmp_path):
  config = tiny_config(2)
  config.dtype = 'bfloat16'
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result['loss'])
  state = _read_params(tmp_path, config, 2)
  leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
  assert all(leaf.dtype == np.float32 for leaf in leaves)  # bf16 activations, f32 weights and statistics


def test_eval_with_both_workdir_and_checkpoint_is_refused(tmp_path):
  # --workdir had been ignored without a word when --checkpoint was given too.
  with pytest.raises(ValueError, match=r'pass --workdir=DIR \(its latest checkpoint\) or --checkpoint=PATH, one'):
    eval_lib.load_checkpoint(tiny_config(), str(tmp_path), str(tmp_path / 'checkpoints' / '2'))


def test_training_gives_the_signal_handlers_back(tmp_path):
  # A BN sweep's Ctrl-C during a run's evaluation had only set a flag nobody read any more.
  before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
  train_lib.train_and_evaluate(tiny_config(1), str(tmp_path))
  assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once(signum):
  # The first is read at a step's end, which a run stuck waiting for an image on a hung
  # mount never reached: SIGTERM and Ctrl-C had both been ignored until kill -9 (the whole
  # process: tests/test_reliability.py).
  before = signal.getsignal(signum)
  stop_after, restore = train_lib._preemption_check(second_signal_after_s=0.0)
  try:
    os.kill(os.getpid(), signum)
    assert stop_after(1)  # the first: save after this step, then stop
    with pytest.raises(train_lib.StoppedBySignal, match='a second time: stopped without saving'):
      os.kill(os.getpid(), signum)
      time.sleep(1)  # the handler runs at the next bytecode; the sleep is interrupted
    assert signal.getsignal(signum) == before  # a third is the process's own handler's
  finally:
    restore()


def test_a_signal_delivered_twice_at_once_is_one_request():
  # e.g. to the process group and again by a wrapper forwarding it: a save, not an unsaved stop.
  stop_after, restore = train_lib._preemption_check(second_signal_after_s=60.0)
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert stop_after(1)
  finally:
    restore()


def test_traceback_shows_running_out_of_memory_whole(monkeypatch):
  monkeypatch.setattr(cli, '_wants_traceback', lambda: True)

  def too_big():
    raise MemoryError('Unable to allocate 112. GiB for an array with shape (4, 100000, 100000, 3)')

  with pytest.raises(MemoryError, match='112. GiB'):
    cli.run_reporting_user_errors(too_big)


def test_an_unknown_field_is_looked_up_in_the_config_file_given():
  assert cli._config_of(['--config.bn.decay=0.9', '--config', 'configs/cifar10.py']).data.name == 'cifar10'
  assert cli._config_of(['--config.bn.decay=0.9']).model == cli.config_file.ConfigFileParser().parse(
      cli.DEFAULT_CONFIG).model


def test_an_error_no_override_explains_says_unknown_field_only_for_a_missing_key(capsys):
  # No override names a missing field (the config file does not load): ml_collections' own
  # message, called an unknown field where it is one (AttributeError, KeyError).
  argv = ['--config=/nonexistent/config.py', '--config.bn.decya=0.9']
  with pytest.raises(SystemExit) as exit_status:
    cli._exit_unknown_field(AttributeError("'ConfigDict' has no attribute 'decya'"), argv)
  assert exit_status.value.code == 2
  assert capsys.readouterr().err.startswith("error: unknown config field 'ConfigDict' has no attribute 'decya'")
  with pytest.raises(SystemExit):
    cli._exit_unknown_field(TypeError('string indices must be integers'), argv)
  assert capsys.readouterr().err.startswith('error: string indices must be integers (in: --config.bn.decya=0.9)')


def test_the_train_step_takes_both_weight_decays_from_the_config():
  config = tiny_config()
  config.weight_decay, config.bn_weight_decay = 1e-2, 0.5
  mesh = sharding.data_mesh()
  model, tx = model_builder.build_model(config, 10), optim.build_optimizer(config)
  state, shardings = train_lib.initial_state(config, model, tx, (8, 8, 1), mesh)
  params = names.flatten(jax.device_get(state.params))  # before the step, which donates the state
  batch = next(data.build(config.data, 'train', batch_size=config.batch_size, seed=0).train_batches())
  _, metrics = train_lib.make_train_step(config, model, tx, mesh, shardings)(state,
                                                                             sharding.to_global_batch(batch, mesh))

  def squares(keys):
    return sum(float(np.sum(np.square(value, dtype=np.float64))) for path, value in params.items()
               if path[-1] in keys)

  assert squares(('gamma', 'beta')) > 0
  expected = 0.5 * 1e-2 * squares(('weights',)) + 0.5 * 0.5 * squares(('gamma', 'beta'))
  assert float(metrics['total_loss']) - float(metrics['loss']) == pytest.approx(expected, rel=1e-4)


def test_a_state_donated_to_an_earlier_step_is_refused_naming_the_state_to_pass():
  # XLA:CPU on two devices had died of a segmentation fault; on one, it named a deleted buffer.
  config = tiny_config()
  mesh = sharding.data_mesh()
  model, tx = model_builder.build_model(config, 10), optim.build_optimizer(config)
  state, shardings = train_lib.initial_state(config, model, tx, (8, 8, 1), mesh)
  batch = sharding.to_global_batch(next(data.build(config.data, 'train', batch_size=config.batch_size,
                                                   seed=0).train_batches()), mesh)
  train_step = train_lib.make_train_step(config, model, tx, mesh, shardings)
  new_state, _ = train_step(state, batch)
  with pytest.raises(ValueError, match='this TrainState was donated to an earlier train step, which reused its '
                                       'buffers for the state it returned; pass that returned state.'):
    train_step(state, batch)
  assert int(train_step(new_state, batch)[0].step) == 2
  assert train_step.lower(new_state, batch) is not None  # the jitted step's, for XLA's cost and memory counts
