"""Slim checkpoints in the training system: convert, evaluate directly, fine-tune with a new head."""

import os
import re
import shlex

import jax
import numpy as np
import pytest

from configs import default
from resnet_flax import checkpoints, eval_lib, models, pretrained, slim, train_lib
from resnet_flax.slim import __main__ as slim_cli
from resnet_flax.slim import checkpoint_state, tensor_bundle_writer
from test_train import SMALL_BLOCKS, tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_ckpt')
V1_CKPT = os.path.join(FIXTURES, 'v1_tiny_10', 'model.ckpt')
IMAGE_SHAPE = (32, 32, 3)


def synthetic_config(num_classes=10):
  config = default.get_config()
  config.model = 'resnet_v1_tiny'
  config.data.name = 'synthetic'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = num_classes
  config.data.num_examples = 32
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 1
  config.checkpoint_every_steps = 0
  config.async_checkpointing = False
  return config


def _reference(model):
  return eval_lib.abstract_variables(model, IMAGE_SHAPE)


def test_convert_then_load_equals_direct_slim_load(tmp_path):
  target = slim_cli.convert(V1_CKPT, 'resnet_v1_tiny', str(tmp_path), num_classes=10, image_shape=IMAGE_SHAPE)
  model = models.get_model('resnet_v1_tiny', num_classes=10)
  converted, step, fresh = pretrained.load_for_model(target, model, _reference(model), IMAGE_SHAPE)
  direct = slim.load_variables(V1_CKPT, model, image_shape=IMAGE_SHAPE)
  assert step == 0 and fresh == []
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, direct)


def test_cli_reports_mismatch_in_one_line(tmp_path, capsys):
  code = slim_cli.main(['convert', '--checkpoint', V1_CKPT, '--model', 'resnet_v2_tiny', '--workdir', str(tmp_path)])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error:')
  assert "hint: the checkpoint has no variable under 'resnet_v2_tiny/'" in err[0]
  assert "its variables are under 'resnet_v1_tiny'" in err[0] and 'slim convert: --model <that scope>' in err[0]


def test_cli_keeps_the_class_count_hint_in_its_one_line(tmp_path, capsys):
  # The checkpoint has 10 classes; slim's v1 default is 1000.
  code = slim_cli.main(['convert', '--checkpoint', V1_CKPT, '--model', 'resnet_v1_tiny', '--workdir', str(tmp_path),
                        '--image_size', '32'])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert ('2 variable(s) with another shape, e.g. resnet_v1_tiny/logits/biases  model (1000,), checkpoint (10,)'
          in err[0])
  assert err[0].endswith('hint: the checkpoint has 10 classes, the model 1000; use num_classes=10 '
                         '(--config.num_classes=10 for train.py / eval.py, --num_classes 10 for convert)')
  with pytest.raises(slim.SlimCheckpointError, match=r'(?s)does not fit.*\n.*logits/weights'):
    slim_cli.main(['convert', '--checkpoint', V1_CKPT, '--model', 'resnet_v1_tiny', '--workdir', str(tmp_path),
                   '--image_size', '32', '--traceback'])


def test_eval_of_slim_checkpoint_directly_and_converted_agree(tmp_path):
  config = synthetic_config()
  direct = eval_lib.evaluate(config, None, 'slim:' + V1_CKPT)
  target = slim_cli.convert(V1_CKPT, 'resnet_v1_tiny', str(tmp_path), num_classes=10, image_shape=IMAGE_SHAPE)
  converted = eval_lib.evaluate(config, None, target)
  assert direct['num_examples'] == converted['num_examples'] == 32
  assert direct['loss'] == pytest.approx(converted['loss'], rel=1e-6)


def test_eval_reports_the_step_a_tf_checkpoint_was_saved_at(tmp_path):
  # TF's trainer saved this one with global_step 2; V1_CKPT has no global_step (step 0).
  momentum = os.path.join(FIXTURES, 'v1_tiny_10_momentum', 'model.ckpt')
  config = synthetic_config()
  assert eval_lib.evaluate(config, None, 'slim:' + momentum)['step'] == 2
  target = slim_cli.convert(momentum, 'resnet_v1_tiny', str(tmp_path), num_classes=10, image_shape=IMAGE_SHAPE)
  assert eval_lib.evaluate(config, None, target)['step'] == 2
  assert eval_lib.evaluate(config, None, 'slim:' + V1_CKPT)['step'] == 0


def test_a_global_step_tf_did_not_write_is_not_taken_for_the_step(tmp_path):
  model = models.get_model('resnet_v1_tiny', num_classes=10)
  variables = slim.load_variables(V1_CKPT, model, image_shape=IMAGE_SHAPE)
  tensors = slim.variables_to_slim(variables, model, image_shape=IMAGE_SHAPE)
  as_float = tensor_bundle_writer.write_checkpoint(tmp_path / 'float.ckpt', {**tensors, 'global_step': np.float32(5)})
  as_vector = tensor_bundle_writer.write_checkpoint(tmp_path / 'vector.ckpt',
                                                    {**tensors, 'global_step': np.arange(3, dtype=np.int64)})
  step = lambda prefix: slim.load_variables_and_step(prefix, model, image_shape=IMAGE_SHAPE)[1]
  assert step(as_float) == step(as_vector) == 0
  assert step(tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors, 9)) == 9
  config = synthetic_config()
  assert eval_lib.evaluate(config, None, 'slim:' + as_float)['step'] == 0


def test_evaluating_data_with_fewer_classes_than_the_model_warns_that_labels_may_not_match(capsys):
  # An image folder with only val/, lacking a class: its labels shift past the missing one.
  config = synthetic_config(num_classes=9)
  config.num_classes = 10  # the checkpoint's, as the class-count error says to set
  eval_lib.evaluate(config, None, 'slim:' + V1_CKPT)
  err = capsys.readouterr().err
  assert ("warning: the model has 10 classes but synthetic's labels index 9; unless the classes the data lacks "
          "are the model's last ones") in err
  eval_lib.evaluate(synthetic_config(num_classes=10), None, 'slim:' + V1_CKPT)
  assert 'warning' not in capsys.readouterr().err


def test_fine_tuning_keeps_backbone_and_replaces_head():
  model = models.get_model('resnet_v1_tiny', num_classes=5)
  reference = jax.tree_util.tree_map(np.zeros_like, jax.jit(
      lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *IMAGE_SHAPE), np.float32), train=False))())
  fitted, _, fresh = pretrained.load_for_model('slim:' + V1_CKPT, model, reference, IMAGE_SHAPE, allow_new_head=True)
  assert sorted(fresh) == ['logits/biases', 'logits/weights']
  original = slim.load_variables(V1_CKPT, models.get_model('resnet_v1_tiny', num_classes=10), image_shape=IMAGE_SHAPE)
  np.testing.assert_array_equal(fitted['params']['block2']['unit_1']['bottleneck_v1']['conv2']['weights'],
                                original['params']['block2']['unit_1']['bottleneck_v1']['conv2']['weights'])
  np.testing.assert_array_equal(fitted['params']['logits']['weights'], 0.0)  # the fresh (here zero) head
  # Evaluating (no new head): slim's own error, which names the checkpoint's class count.
  with pytest.raises(slim.SlimCheckpointError) as error:
    pretrained.load_for_model('slim:' + V1_CKPT, model, reference, IMAGE_SHAPE, allow_new_head=False)
  assert error.value.summary.endswith('hint: the checkpoint has 10 classes, the model 5; use num_classes=10 '
                                      '(--config.num_classes=10 for train.py / eval.py, --num_classes 10 for '
                                      'convert)')


def test_a_backbone_that_does_not_fit_a_fine_tuning_names_the_model_it_tried_and_the_fix():
  # Fine-tuning a root-less model from a checkpoint with a root block (README's CIFAR example
  # without include_root_block=True): the header had said "(num_classes=None)" of a 5-class model.
  model = models.get_model('resnet_v1_tiny', num_classes=5, include_root_block=False)
  with pytest.raises(slim.SlimCheckpointError) as error:
    pretrained.load_for_model('slim:' + V1_CKPT, model, _reference(model), IMAGE_SHAPE, allow_new_head=True)
  assert error.value.summary.startswith(f"checkpoint {V1_CKPT} does not fit model 'resnet_v1_tiny' without its "
                                        'logits layer: ')
  assert error.value.summary.endswith('build the model with include_root_block=True (train.py / eval.py: '
                                      '--config.model_options.include_root_block=True)')


def test_a_new_head_from_a_reference_of_shapes_is_refused_and_any_other_load_takes_one():
  # The shapes had been returned as the head's values, failing later at apply ("no attribute 'astype'").
  model = models.get_model('resnet_v1_tiny', num_classes=5)
  with pytest.raises(ValueError, match=re.escape(f"slim:{V1_CKPT}: the new head (logits/biases) starts at the "
                                                 "reference's values, but the reference holds shapes only")):
    pretrained.load_for_model('slim:' + V1_CKPT, model, _reference(model), IMAGE_SHAPE, allow_new_head=True)
  model = models.get_model('resnet_v1_tiny', num_classes=10)
  fitted, _, fresh = pretrained.load_for_model('slim:' + V1_CKPT, model, _reference(model), IMAGE_SHAPE)
  assert not fresh and all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(fitted))


def test_train_from_init_checkpoint(tmp_path):
  config = synthetic_config(num_classes=5)
  config.init_checkpoint = 'slim:' + V1_CKPT
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 1 and result['num_examples'] == 32


def test_mismatched_model_lists_offenders(tmp_path):
  model = models.get_model('resnet_v2_tiny', num_classes=10)
  target = slim_cli.convert(V1_CKPT, 'resnet_v1_tiny', str(tmp_path), num_classes=10, image_shape=IMAGE_SHAPE)
  with pytest.raises(checkpoints.CheckpointError, match='does not fit the model') as error:
    pretrained.load_for_model(target, model, _reference(model), IMAGE_SHAPE)
  # Another model first: its layers' names differ (resnet_v1_tiny's, resnet_v2_tiny's).
  assert re.search(r"does not fit the model \(\d+ variables\)\. Its layers are not this model's: it was saved from "
                   r'another model or other model options; check --config\.model and its options '
                   r'\(config\.model_options, config\.bn\)\. What differs', str(error.value))


@pytest.mark.parametrize('workdir_is_a_file, arguments, named', [
    (True, ['--num_classes', '10', '--image_size', '32'], 'is a file, not a directory'),
    (False, ['--num_classes', '-3'], 'give num_classes >= 0'),
    (False, ['--num_classes', '10', '--channels', '0'], 'positive image size and channel count'),
])
def test_convert_refuses_bad_arguments_and_unwritable_workdirs_in_one_line(tmp_path, capsys, workdir_is_a_file,
                                                                           arguments, named):
  # An unwritable workdir used to hang: orbax's writer threads failed and the process never exited.
  workdir = tmp_path / 'out'
  if workdir_is_a_file:
    workdir.write_text('')
  code = slim_cli.main(['convert', '--checkpoint', V1_CKPT, '--model', 'resnet_v1_tiny', '--workdir', str(workdir),
                        *arguments])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and named in lines[0], lines
  assert not (tmp_path / 'out' / 'variables').exists()


@pytest.mark.parametrize('arguments, named', [
    (['convert', '--checkpoint', V1_CKPT, '--model', 'bogus', '--workdir', 'out'],
     "argument --model: invalid choice: 'bogus'"),
    (['convert', '--checkpoint', V1_CKPT, '--model', 'resnet_v1_tiny', '--workdir', 'out', '--image_size', 'abc'],
     "argument --image_size: invalid int value: 'abc'"),
    (['convert', '--checkpoint', V1_CKPT, '--workdir', 'out'], 'the following arguments are required: --model'),
    ([], 'the following arguments are required: command'),
])
def test_cli_refuses_malformed_arguments_in_one_line_without_usage(capsys, arguments, named):
  assert slim_cli.main(arguments) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and named in lines[0], lines
  assert lines[0].endswith('--help` lists the arguments.')


def test_cli_help_still_prints_usage(capsys):
  with pytest.raises(SystemExit) as exit_info:
    slim_cli.main(['convert', '--help'])
  assert exit_info.value.code == 0 and '--checkpoint' in capsys.readouterr().out


@pytest.mark.parametrize('existing, message', [
    (True, 'variables already exists; delete it or pass another --workdir.'),
    (False, 'error: --workdir is empty; pass a directory.'),
])
def test_convert_refuses_a_taken_or_empty_workdir_before_reading(tmp_path, capsys, monkeypatch, existing, message):
  def must_not_read(*args, **kwargs):
    raise AssertionError('the checkpoint was read before the workdir was checked')
  monkeypatch.setattr(slim_cli.slim, 'load_variables', must_not_read)
  if existing:
    (tmp_path / 'variables').mkdir()
  workdir = str(tmp_path) if existing else ''
  code = slim_cli.main(['convert', '--checkpoint', V1_CKPT, '--model', 'resnet_v1_tiny', '--workdir', workdir,
                        '--num_classes', '10', '--image_size', '32'])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].endswith(message), lines


def test_convert_refuses_eval_pys_slim_mark_and_a_converted_checkpoint_naming_what_to_pass(tmp_path, capsys):
  # Both had been "no checkpoint here" / "directory has no 'checkpoint' state file".
  target = slim_cli.convert(V1_CKPT, 'resnet_v1_tiny', str(tmp_path / 'converted'), num_classes=10,
                            image_shape=IMAGE_SHAPE)
  expected = {
      'slim:' + V1_CKPT: f'--checkpoint slim:{V1_CKPT}: convert reads TF checkpoints only, without the slim: mark '
                         f'eval.py and train.py take; pass --checkpoint {V1_CKPT}.',
      target: f'--checkpoint {target} is an orbax checkpoint, converted already or saved by train.py; evaluate it '
              f'with eval.py --checkpoint={target} or fine-tune from it with --config.init_checkpoint={target}.',
      str(tmp_path / 'converted'): f'--checkpoint {tmp_path}/converted holds an orbax checkpoint, converted already',
  }
  # A training run's folder and its checkpoints/ folder name the newest step.
  checkpoints.save_tree(str(tmp_path / 'run' / 'checkpoints' / '3'), {'params': {'w': np.zeros(2, np.float32)}})
  step = f'{tmp_path}/run/checkpoints/3'
  for run in (tmp_path / 'run', tmp_path / 'run' / 'checkpoints'):
    expected[str(run)] = f'--checkpoint {run} holds an orbax checkpoint, converted already or saved by train.py; ' \
                         f'evaluate it with eval.py --checkpoint={step} '
  expected['slim:'] = "--checkpoint slim:: convert reads TF checkpoints only, without the slim: mark eval.py and " \
                      "train.py take; pass the TF checkpoint's prefix or folder."
  for checkpoint, message in expected.items():
    code = slim_cli.main(['convert', '--checkpoint', checkpoint, '--model', 'resnet_v1_tiny', '--workdir',
                          str(tmp_path / 'again'), '--num_classes', '10', '--image_size', '32'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f'error: {message}'), lines
  assert not (tmp_path / 'again').exists()


def test_a_tf_checkpoints_folder_converted_into_itself_converts_again(tmp_path):
  # Its variables/ (the first conversion, into the download's folder) had made convert refuse the
  # TF checkpoint beside it as "an orbax checkpoint, converted already".
  download = tmp_path / 'download'
  download.mkdir()
  for name in os.listdir(os.path.dirname(V1_CKPT)):
    os.link(os.path.join(os.path.dirname(V1_CKPT), name), download / name)
  (download / 'checkpoint').write_bytes(checkpoint_state.state_text('model.ckpt'))  # as TF's Saver leaves it
  first = slim_cli.convert(str(download), 'resnet_v1_tiny', str(download), num_classes=10, image_shape=IMAGE_SHAPE)
  again = slim_cli.convert(str(download), 'resnet_v1_tiny', str(tmp_path / 'again'), num_classes=10,
                           image_shape=IMAGE_SHAPE)
  jax.tree_util.tree_map(np.testing.assert_array_equal, checkpoints.restore_tree(first),
                         checkpoints.restore_tree(again))


def test_slim_mark_on_what_convert_wrote_names_its_variables_without_the_mark(tmp_path):
  target = slim_cli.convert(V1_CKPT, 'resnet_v1_tiny', str(tmp_path), num_classes=10, image_shape=IMAGE_SHAPE)
  for spec, message in ((f'slim:{tmp_path}', f'{tmp_path} is what `python -m resnet_flax.slim convert` wrote, an '
                                             f'orbax checkpoint: pass {target} without the slim: prefix.'),
                        (f'slim:{target}', f'{target} is an orbax checkpoint (this package\'s own), not a TF one: '
                                           'pass it without the slim: prefix.')):
    with pytest.raises(checkpoints.CheckpointError) as error:
      eval_lib.load_checkpoint(synthetic_config(), None, spec)
    assert str(error.value) == message


def _leaves(**arrays):
  """{'params': ..., 'batch_stats': ...} from 'collection/a/b' = array keyword pairs (with / as __)."""
  tree = {'params': {}, 'batch_stats': {}}
  for name, value in arrays.items():
    collection, *path = name.split('__')
    node = tree[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.asarray(value, np.float32)
  return tree


def test_checkpoint_leaves_the_model_would_drop_are_refused_when_they_matter():
  model = _leaves(params__unit_1__conv__weights=np.ones(2), batch_stats__unit_1__bn__moving_mean=np.zeros(2))
  exact = _leaves(params__unit_1__conv__weights=np.ones(2), batch_stats__unit_1__bn__moving_mean=np.zeros(2),
                  params__unit_1__bn__gamma=np.ones(2), params__unit_1__bn__beta=np.zeros(2),  # identities
                  batch_stats__unit_1__bn__moving_mean_biased=np.zeros(2))  # zero-debias state: optional
  pretrained.fit_variables(exact, model, allow_new_head=False, source='ckpt', epsilon=1e-5)
  scaled = {**exact, 'params': {'unit_1': {**exact['params']['unit_1'], 'bn': {'gamma': np.full(2, 0.5)}}}}
  with pytest.raises(checkpoints.CheckpointError, match=r'params/unit_1/bn/gamma: in the checkpoint, not in the '
                                                        r'model \(build it with config.bn.scale=True\)'):
    pretrained.fit_variables(scaled, model, allow_new_head=False, source='ckpt', epsilon=1e-5)
  # A deeper network's extra unit had been dropped without a word, its first units loaded.
  deeper = _leaves(params__unit_1__conv__weights=np.ones(2), batch_stats__unit_1__bn__moving_mean=np.zeros(2),
                   params__unit_2__conv__weights=np.ones(2))
  with pytest.raises(checkpoints.CheckpointError, match='params/unit_2/conv/weights: in the checkpoint, not in '
                                                        'the model'):
    pretrained.fit_variables(deeper, model, allow_new_head=False, source='ckpt', epsilon=1e-5)


def test_another_class_count_names_num_classes_as_the_fix():
  model = _leaves(params__logits__weights=np.ones((4, 12)), params__logits__biases=np.ones(12))
  saved = _leaves(params__logits__weights=np.ones((4, 10)), params__logits__biases=np.ones(10))
  with pytest.raises(checkpoints.CheckpointError, match=r'The checkpoint has 10 classes, the model 12: set '
                                                        r'config.num_classes=10'):
    pretrained.fit_variables(saved, model, allow_new_head=False, source='ckpt', epsilon=1e-5)
  features = _leaves(params__unit_1__conv__weights=np.ones(2))  # a feature extractor leaves the head out
  pretrained.fit_variables({**saved, 'params': {**saved['params'], 'unit_1': {'conv': {'weights': np.ones(2)}}}},
                           features, allow_new_head=False, source='ckpt', epsilon=1e-5)


def test_a_checkpoint_without_a_head_names_that_not_a_class_count_of_0():
  # `convert --num_classes 0` writes features only; the hint had said "set config.num_classes=0", which is refused.
  model = _leaves(params__unit_1__conv__weights=np.ones(2), params__logits__weights=np.ones((4, 10)),
                  params__logits__biases=np.ones(10))
  saved = _leaves(params__unit_1__conv__weights=np.ones(2))
  with pytest.raises(checkpoints.CheckpointError) as error:
    pretrained.fit_variables(saved, model, allow_new_head=False, source='ckpt', epsilon=1e-5)
  assert 'The checkpoint has no logits layer (features only' in str(error.value)
  assert 'num_classes=0' not in str(error.value)


def test_fine_tuning_names_the_input_channels_not_the_class_count_a_new_head_replaces():
  # A 3-channel, 2-class run's checkpoint fine-tuned on digits (1 channel, 10 classes, no root
  # block): the hint had said to set num_classes=2, which the new head makes needless.
  first_conv = 'params__block1__unit_1__bottleneck_v1__conv1__weights'
  saved = _leaves(**{first_conv: np.ones((1, 1, 3, 4))}, params__logits__weights=np.ones((4, 2)),
                  params__logits__biases=np.ones(2))
  model = _leaves(**{first_conv: np.ones((1, 1, 1, 4))}, params__logits__weights=np.ones((4, 10)),
                  params__logits__biases=np.ones(10))
  with pytest.raises(checkpoints.CheckpointError) as error:
    pretrained.fit_variables(saved, model, allow_new_head=True, source='ckpt', epsilon=1e-5)
  # Not "evaluate it on ...": fine-tuning in train.py meets this hint too; the same layers, so no other model.
  assert ('ckpt does not fit the model (1 variables). The checkpoint takes 3-channel images, the data set gives 1: '
          'use it with data like those it was trained on (config.data). What differs') in str(error.value)
  assert 'num_classes' not in str(error.value)


def test_statistics_a_checkpoint_lacks_are_filled_alike_from_orbax_and_tf_slim(tmp_path):
  # Fine-tuning one's own checkpoint with zero-debias or renorm switched on: the orbax path had
  # refused the state its run never kept, where the TF-Slim path fills it as TF would.
  plain = models.get_model('resnet_v1_tiny', num_classes=10)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(lambda v: rng.uniform(0.5, 1.5, v.shape).astype(np.float32),
                                     plain.init(jax.random.PRNGKey(0), np.zeros((1, *IMAGE_SHAPE)), train=False))
  checkpoints.save_tree(str(tmp_path / 'orbax'), variables)
  prefix = slim.save_slim_checkpoint(str(tmp_path / 'slim' / 'model.ckpt'), variables, plain, image_shape=IMAGE_SHAPE)
  for options in ({'batch_norm_zero_debias_moving_mean': True}, {'batch_norm_renorm': True}):
    model = models.get_model('resnet_v1_tiny', num_classes=10, **options)
    from_orbax, _, _ = pretrained.load_for_model(str(tmp_path / 'orbax'), model, _reference(model), IMAGE_SHAPE)
    from_slim, _, _ = pretrained.load_for_model('slim:' + prefix, model, _reference(model), IMAGE_SHAPE)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_orbax, from_slim)
    layer = from_orbax['batch_stats']['conv1']['BatchNorm']
    original = variables['batch_stats']['conv1']['BatchNorm']
    if 'renorm_stddev' in layer:  # the renorm averages start at the moving statistics
      np.testing.assert_allclose(layer['renorm_stddev'], np.sqrt(original['moving_variance'] + 1e-5), rtol=1e-6)
      np.testing.assert_array_equal(layer['renorm_mean'], original['moving_mean'])
    else:  # zero-debias state starts at 0, as TF creates it beside a restored moving mean
      assert not np.any(layer['moving_mean_biased']) and not np.any(layer['moving_mean_local_step'])


def test_slim_prefix_on_an_orbax_checkpoint_says_to_drop_it(tmp_path):
  step = tmp_path / 'checkpoints' / '40'
  checkpoints.save_tree(str(step), {'params': {'w': np.zeros(2, np.float32)}})
  model = models.get_model('resnet_v1_tiny', num_classes=10)
  with pytest.raises(checkpoints.CheckpointError, match=rf'^{step} is an orbax checkpoint .* pass it without the '
                                                        r'slim: prefix\.$'):
    pretrained.load_for_model(f'slim:{step}', model, _reference(model), IMAGE_SHAPE)


def test_a_checkpoint_of_another_config_names_its_runs_model_fields_as_flags(tmp_path):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  other = tiny_config(2)
  other.num_classes = 12
  with pytest.raises(checkpoints.StateMismatchError) as error:
    eval_lib.evaluate(other, None, str(tmp_path / 'checkpoints' / '2'))
  blocks = '(' + ','.join('(' + ','.join(str(n) for n in block) + ')' for block in SMALL_BLOCKS) + ')'
  # Quoted as a shell needs: pasted unquoted, a tuple's parentheses had been a bash syntax error.
  hint = (f"Its run was trained with --config.model=resnet_v1_digits '--config.model_options.block_sizes={blocks}' "
          '--config.data.name=digits --config.bn.center=True --config.bn.scale=True '
          '--config.bn.zero_debias_moving_mean=False --config.bn.renorm=False.')
  assert hint in str(error.value)
  assert shlex.split(hint.removeprefix('Its run was trained with ').removesuffix('.'))[1] == (
      f'--config.model_options.block_sizes={blocks}')
  assert 'num_classes=None' not in str(error.value)


def _fit(loaded, reference, allow_new_head=False):
  return pretrained.fit_variables(loaded, reference, allow_new_head=allow_new_head, source='src',
                                  epsilon=1e-3)


# Guards against leaves not cast to the model's dtype.
def test_fitted_leaves_take_the_models_dtype():
  reference = {'params': {'conv1': {'weights': np.zeros(2, np.float32)}}}
  fitted, fresh = _fit({'params': {'conv1': {'weights': np.array([1.5, 2.0], np.float64)}}}, reference)
  assert fitted['params']['conv1']['weights'].dtype == np.float32 and fresh == []


# Guards against (`np.all(value == identity)` -> `np.any`, and the `params` check
# dropped): a gamma that is not all ones changes the outputs, so dropping it must be refused.
def test_a_gamma_not_all_ones_is_refused_for_a_model_without_scale():
  reference = {'params': {'conv1': {'BatchNorm': {'beta': np.zeros(2, np.float32)}}}}
  ok = {'params': {'conv1': {'BatchNorm': {'beta': np.zeros(2), 'gamma': np.ones(2)}}}}
  _fit(ok, reference)
  bad = {'params': {'conv1': {'BatchNorm': {'beta': np.zeros(2), 'gamma': np.array([1.0, 2.0])}}}}
  with pytest.raises(checkpoints.StateMismatchError, match='gamma: in the checkpoint, not in the model'):
    _fit(bad, reference)


# Guards against the orbax checkpoint's step dropped by the loader (reported as 0), which
# would restart a resumed run's step count and schedules.
def test_orbax_checkpoint_step_is_returned(tmp_path):
  checkpoints.save_tree(str(tmp_path / 'ckpt'), {'params': {'w': np.array([1.0, 2.0], np.float32)},
                                                 'step': np.int64(37)})
  model = models.get_model('resnet_v1_tiny', num_classes=10)  # only its BN epsilon is used
  reference = {'params': {'w': np.zeros(2, np.float32)}}
  fitted, step, fresh = pretrained.load_for_model(str(tmp_path / 'ckpt'), model, reference, IMAGE_SHAPE)
  assert step == 37 and fresh == []
  np.testing.assert_array_equal(fitted['params']['w'], [1.0, 2.0])


def _variables(*layers, classes=None):
  params = {layer: {'weights': np.zeros((3, 3, 3, 8), np.float32)} for layer in layers}
  if classes:
    params['logits'] = {'weights': np.zeros((1, 1, 8, classes), np.float32), 'biases': np.zeros(classes, np.float32)}
  return {'params': params}


def test_the_layers_hint_comes_first_and_leaves_the_head_out(tmp_path):
  source = str(tmp_path / 'model')
  # Another model's layers and another class count: the layers are named first.
  fix = pretrained._fix(_variables('conv1', 'block1', classes=10), _variables('conv1', 'block2', classes=5), source,
                        False)
  assert fix.startswith("Its layers are not this model's") and 'The checkpoint has 10 classes, the model 5' in fix
  # The model's own layers, saved without a head: not another model's.
  fix = pretrained._fix(_variables('conv1', 'block1'), _variables('conv1', 'block1', classes=5), source, False)
  assert "Its layers are not this model's" not in fix
