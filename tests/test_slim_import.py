"""TF-Slim checkpoint import and export (`slim/checkpoint_import.py`, `slim/checkpoint_export.py`).

The fixtures `fixtures/slim_ckpt/<ckpt>/` are real `tf.compat.v1.train.Saver` checkpoints of the
tiny slim nets, with `expected.npz` = every variable as `tf.train.load_checkpoint` reads it. The
first three are saved by `make_slim_fixtures.py` from the *train* graph of a parity case *after*
its three `UPDATE_OPS` runs: their params equal `slim_parity.npz`'s `<case>/var/...` and their
moving statistics (and zero-debias state) `<case>/after/...`. The fixture's eval logits were
computed with the statistics before the updates, so the offline logits test pairs the loaded
params with `<case>/var/`'s statistics; the live test (TF venv) evaluates slim's graph restored
from the checkpoint itself.

Live tests skip unless TensorFlow (and, for the graph test, tf_slim) import:
`/work/tfenv/bin/python -m pytest tests/test_slim_import.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import models
from resnet_flax import slim
from resnet_flax.slim import names
from resnet_flax.slim import tensor_bundle
from resnet_flax.slim import tensor_bundle_writer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
CKPT_ROOT = os.path.join(FIXTURES, 'slim_ckpt')
PARITY = os.path.join(FIXTURES, 'slim_parity.npz')
RTOL = 1e-4

# checkpoint -> (model name, get_model keyword arguments) as make_slim_fixtures.py built the graph.
CHECKPOINTS = {
    'v1_tiny_10': ('resnet_v1_tiny', dict(num_classes=10)),
    'v2_tiny_11_zero_debias': ('resnet_v2_tiny', dict(num_classes=11, zero_debias_moving_mean=True)),
    'v1_tiny_10_noscale': ('resnet_v1_tiny', dict(num_classes=10, batch_norm_scale=False)),
    'v1_tiny_10_momentum': ('resnet_v1_tiny', dict(num_classes=10)),
}
# checkpoint -> the slim_parity.npz case whose variables it holds (make_slim_fixtures.CHECKPOINTS).
PARITY_CASES = {'v1_tiny_10': 'v1', 'v2_tiny_11_zero_debias': 'v2_zd', 'v1_tiny_10_noscale': 'v1_noscale'}


def ckpt_prefix(ckpt: str) -> str:
  return os.path.join(CKPT_ROOT, ckpt, 'model.ckpt')


@functools.lru_cache(maxsize=None)
def expected_tensors(ckpt: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(CKPT_ROOT, ckpt, 'expected.npz')) as data:
    return {key: data[key] for key in data.files}


@functools.lru_cache(maxsize=None)
def parity_case(case: str) -> dict:
  """var (params and statistics before the updates), after (statistics after them), images,
  eval_logits of one slim_parity.npz case, with its base case's shared arrays merged in."""
  with np.load(PARITY) as data:
    base = json.loads(str(data[f'{case}/config']))['base'] or case

    def sub(name, prefix):
      start = f'{name}/{prefix}'
      return {key[len(start):]: data[key] for key in data.files if key.startswith(start)}

    return dict(var={**sub(base, 'var/'), **sub(case, 'var/')}, after=sub(case, 'after/'),
                images=data[f'{base}/images'], eval_logits=data[f'{case}/eval/logits'])


@functools.lru_cache(maxsize=None)
def model_for(name: str, **kwargs):
  return models.get_model(name, **kwargs)


def fixture_model(ckpt: str):
  name, kwargs = CHECKPOINTS[ckpt]
  return model_for(name, **kwargs)


# One compiled eval / train function per model (jit: eager flax runs op by op, slowly). Keyed by
# id: flax modules are not hashable, and model_for keeps every model alive.
_COMPILED: dict = {}


def eval_fn(model):
  key = (id(model), 'eval')
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(functools.partial(model.apply, train=False))
  return _COMPILED[key]


def train_fn(model):
  key = (id(model), 'train')
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  return _COMPILED[key]


@functools.lru_cache(maxsize=None)
def loaded(ckpt: str) -> dict:
  return slim.load_variables(ckpt_prefix(ckpt), fixture_model(ckpt))


def model_tensors(ckpt: str) -> dict[str, np.ndarray]:
  """The checkpoint's variables that the model has (expected.npz without slots, global_step)."""
  scope = fixture_model(ckpt).slim_scope
  return {key: value for key, value in expected_tensors(ckpt).items() if names.flax_path(scope, key)}


def assert_tree_equal(actual: dict, expected: dict) -> None:
  actual, expected = names.flatten(actual), names.flatten(expected)
  assert sorted(actual) == sorted(expected)
  for path, value in expected.items():
    assert actual[path].dtype == value.dtype, path
    np.testing.assert_array_equal(actual[path], value, err_msg='/'.join(path))


def assert_close(ours, theirs, what: str) -> None:
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, f'{what}: shape {ours.shape} != {theirs.shape}'
  scale = max(float(np.max(np.abs(theirs))), 1e-3)
  np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-5 * scale, err_msg=what)


def copy_checkpoint(ckpt: str, tmp_path) -> str:
  for filename in os.listdir(os.path.join(CKPT_ROOT, ckpt)):
    if filename.startswith('model.ckpt'):
      shutil.copy(os.path.join(CKPT_ROOT, ckpt, filename), tmp_path)
  return os.path.join(tmp_path, 'model.ckpt')


# --- loading the TF-written fixtures --------------------------------------------------------


@pytest.mark.parametrize('ckpt', sorted(CHECKPOINTS))
def test_fixture_loads_exactly(ckpt):
  model = fixture_model(ckpt)
  variables = loaded(ckpt)
  assert set(variables) == {'params', 'batch_stats'}
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert jax.tree.structure(variables) == jax.tree.structure(
      {'params': shapes['params'], 'batch_stats': shapes['batch_stats']})
  ours = names.to_slim(variables, model.slim_scope)
  theirs = model_tensors(ckpt)
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == np.float32 and value.dtype == np.float32, key
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_fixture_extras_are_ignored():
  ignored = set(expected_tensors('v1_tiny_10_momentum')) - set(model_tensors('v1_tiny_10_momentum'))
  assert 'global_step' in ignored and len([k for k in ignored if k.endswith('/Momentum')]) == len(ignored) - 1
  # The zero-debias state is loaded as TF saved it (after 3 updates, local_step = 3.0).
  stats = names.flatten(loaded('v2_tiny_11_zero_debias')['batch_stats'])
  steps = [value for path, value in stats.items() if path[-1] == 'moving_mean_local_step']
  assert len(steps) == len([path for path in stats if path[-1] == 'moving_mean'])
  assert all(s.shape == () and s.dtype == np.float32 and float(s) == 3.0 for s in steps)


@pytest.mark.parametrize('ckpt', sorted(PARITY_CASES))
def test_fixture_holds_the_parity_case(ckpt):
  """The checkpoint = the case's params (`var/`) and statistics after its updates (`after/`)."""
  case = parity_case(PARITY_CASES[ckpt])
  scope = fixture_model(ckpt).slim_scope
  after = names.from_slim(case['after'], scope)['batch_stats']
  assert after, 'the case has no statistics after its updates'
  params = names.from_slim(case['var'], scope)['params']
  assert_tree_equal(loaded(ckpt), {'params': params, 'batch_stats': after})


@pytest.mark.parametrize('ckpt', sorted(PARITY_CASES))
def test_eval_logits_with_loaded_params_match_tf_slim(ckpt):
  """slim's eval logits for the case's variables (statistics before the updates, see above)."""
  case = parity_case(PARITY_CASES[ckpt])
  model = fixture_model(ckpt)
  variables = {'params': loaded(ckpt)['params'],
               'batch_stats': names.from_slim(case['var'], model.slim_scope)['batch_stats']}
  logits = eval_fn(model)(variables, case['images'])
  theirs = case['eval_logits']
  assert_close(logits, theirs.reshape(theirs.shape[0], -1), f'{ckpt} eval logits')


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize('ckpt', sorted(CHECKPOINTS))
def test_round_trip_is_bitwise(ckpt, tmp_path):
  model = fixture_model(ckpt)
  step = 2 if ckpt == 'v1_tiny_10_momentum' else None
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', loaded(ckpt), model, global_step=step)
  original = tensor_bundle.CheckpointReader(ckpt_prefix(ckpt))
  ours = tensor_bundle.CheckpointReader(prefix)
  wanted = set(model_tensors(ckpt))
  assert set(ours.variables()) == wanted | ({'global_step'} if step else set())
  for name in wanted:
    assert ours.variables()[name] == original.variables()[name], name
    assert ours.read(name).tobytes() == original.read(name).tobytes(), name
  if step:
    assert prefix.endswith('model.ckpt-2') and ours.read('global_step') == np.int64(2)
    assert ours.read('global_step').dtype == original.read('global_step').dtype
  assert_tree_equal(slim.load_variables(prefix, model), loaded(ckpt))


def test_a_global_step_that_is_no_count_is_refused_and_a_runs_step_array_is_one(tmp_path):
  # int() had cut 5.5 to model.ckpt-5, and -1 had named model.ckpt--1.
  model, variables = fixture_model('v1_tiny_10_momentum'), loaded('v1_tiny_10_momentum')
  for step in (5.5, -1, np.array([3])):
    with pytest.raises(ValueError, match=r'must be a whole number >= 0 \(a step count, as tf.train.Saver.save takes\)'):
      slim.save_slim_checkpoint(tmp_path / 'model.ckpt', variables, model, global_step=step)
  assert os.listdir(tmp_path) == []
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', variables, model, global_step=jnp.array(7, jnp.int32))
  assert prefix.endswith('model.ckpt-7')
  assert tensor_bundle.CheckpointReader(prefix).read('global_step') == np.int64(7)


def test_variables_to_slim_casts_and_checks():
  model = fixture_model('v2_tiny_11_zero_debias')
  variables = loaded('v2_tiny_11_zero_debias')
  as_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), variables)
  tensors = slim.variables_to_slim(as_bf16, model)
  assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in tensors.values())
  assert sorted(tensors) == sorted(model_tensors('v2_tiny_11_zero_debias'))
  with pytest.raises(slim.SlimCheckpointError, match="no 'batch_stats'"):
    slim.variables_to_slim({'params': variables['params']}, model)
  stats = names.flatten(variables['batch_stats'])
  path = next(p for p in stats if p[-1] == 'moving_mean_biased')
  del stats[path]
  with pytest.raises(slim.SlimCheckpointError, match='missing batch_stats/' + '/'.join(path)) as error:
    slim.variables_to_slim({'params': variables['params'], 'batch_stats': names.unflatten(stats)}, model)
  assert error.value.summary.startswith("variables do not fit model 'resnet_v2_tiny': 1 problem(s), the first: "
                                        'missing batch_stats/' + '/'.join(path))


# --- what does not fit ----------------------------------------------------------------------


def test_missing_and_misshaped_variables_are_listed_together(tmp_path):
  tensors = dict(expected_tensors('v1_tiny_10'))
  dropped = ['resnet_v1_tiny/block2/unit_1/bottleneck_v1/conv2/weights',
             'resnet_v1_tiny/block3/unit_1/bottleneck_v1/conv1/BatchNorm/moving_variance']
  reshaped = 'resnet_v1_tiny/block1/unit_2/bottleneck_v1/conv3/BatchNorm/beta'
  for name in dropped:
    del tensors[name]
  tensors[reshaped] = np.zeros((3,), np.float32)
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors)
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, fixture_model('v1_tiny_10'))
  message = str(error.value)
  assert isinstance(error.value, ValueError)
  assert '2 variable(s) missing' in message and '1 variable(s) with another shape' in message
  assert f'{dropped[0]}  (model shape (3, 3, 8, 8))' in message
  assert f'{dropped[1]}  (model shape (16,))' in message
  assert f'{reshaped}  model (16,), checkpoint (3,)' in message
  # What command lines print: one line, each kind counted with its first variable.
  assert error.value.summary == (
      f'checkpoint {prefix} does not fit model {"resnet_v1_tiny"!r} (num_classes=10): 2 variable(s) missing from '
      f'the checkpoint, e.g. {dropped[0]}  (model shape (3, 3, 8, 8)); 1 variable(s) with another shape, e.g. '
      f'{reshaped}  model (16,), checkpoint (3,)')


def test_wrong_num_classes_hints_at_the_class_count():
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(ckpt_prefix('v2_tiny_11_zero_debias'), model_for('resnet_v2_tiny', num_classes=10))
  message = str(error.value)
  assert 'resnet_v2_tiny/logits/weights  model (1, 1, 64, 10), checkpoint (1, 1, 64, 11)' in message
  assert ("the checkpoint has 11 classes, the model 10: slim's ResNet v2 checkpoints include a background "
          'class 0; use num_classes=11 (--config.num_classes=11 for train.py / eval.py, --num_classes 11 for '
          'convert)') in message
  # A feature extractor ignores the checkpoint's logits layer.
  features = slim.load_variables(ckpt_prefix('v2_tiny_11_zero_debias'), model_for('resnet_v2_tiny'))
  assert 'logits' not in features['params']


# `slim convert` of a 1-channel run's export without --channels 1 (its default is 3) had
# said only "model (1, 1, 3, 16), checkpoint (1, 1, 1, 16)".
@pytest.mark.parametrize('model_name, image_shape, read_as', [
    ('resnet_v1_digits', (8, 8, 1), (8, 8, 3)),  # no root block: the first unit's conv1 and shortcut read the images
    ('resnet_v2_tiny', (32, 32, 3), (32, 32, 1)),  # the root conv1
])
def test_a_checkpoint_of_other_image_channels_hints_at_them(tmp_path, model_name, image_shape, read_as):
  model = model_for(model_name, num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, *image_shape)), train=False)
  prefix = slim.save_slim_checkpoint(str(tmp_path / 'model.ckpt'), variables, model)
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, model, image_shape=read_as)
  assert error.value.summary.endswith(
      f'hint: the checkpoint takes {image_shape[2]}-channel images, the model was built for {read_as[2]}: convert with '
      f'--channels {image_shape[2]} (train.py / eval.py: a data set of {image_shape[2]}-channel images)')


# README's fine-tuning of a root-less CIFAR model from an ImageNet checkpoint, without
# include_root_block=True, had hinted "convert with --channels 64".
@pytest.mark.parametrize('saved_root', [True, False])
def test_a_root_block_on_one_side_only_hints_at_include_root_block(tmp_path, saved_root):
  saved = model_for('resnet_v1_tiny', num_classes=10, include_root_block=saved_root)
  variables = saved.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
  prefix = slim.save_slim_checkpoint(str(tmp_path / 'model.ckpt'), variables, saved)
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, model_for('resnet_v1_tiny', num_classes=10, include_root_block=not saved_root))
  has, model_has = ('a root block (conv1 and its pool)', 'none') if saved_root else ('no root block (conv1 and its '
                                                                                     'pool)', 'one')
  assert error.value.summary.endswith(
      f'hint: the checkpoint has {has}, the model {model_has}: build the model with include_root_block={saved_root} '
      f'(train.py / eval.py: --config.model_options.include_root_block={saved_root})')
  assert 'channel' not in error.value.summary.split('hint:', 1)[1]


def test_a_deeper_networks_checkpoint_is_refused_naming_the_units_the_model_lacks(tmp_path):
  # Its extra units had been dropped without a word: a shallower network, another function. The
  # orbax path refused the same variables.
  deep = model_for('resnet_v1_tiny', num_classes=10, block_sizes=((4, 3, 2), (8, 2, 2), (16, 2, 1)))
  variables = deep.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
  prefix = slim.save_slim_checkpoint(str(tmp_path / 'model.ckpt'), variables, deep)
  shallow = model_for('resnet_v1_tiny', num_classes=10, block_sizes=((4, 2, 2), (8, 2, 2), (16, 1, 1)))
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, shallow, image_shape=(32, 32, 3))
  assert str(error.value).splitlines()[1:4] == [
      '  2 scope(s) of layers in the checkpoint that the model does not have (leaving them out would change the '
      'outputs):', '    resnet_v1_tiny/block1/unit_3', '    resnet_v1_tiny/block3/unit_2']
  assert error.value.summary.endswith(
      'hint: the checkpoint holds a deeper network (more units per block, or more blocks): build the model it was '
      "saved from (models.get_model's name and block_sizes; train.py / eval.py: --config.model and "
      '--config.model_options.block_sizes), or, to load a part of it on purpose (a truncated backbone), pass '
      'allow_unused_layers=True')
  # Its own network, and its features without the logits layer, still load.
  loaded = slim.load_variables(prefix, deep, image_shape=(32, 32, 3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.tree_util.tree_map(np.asarray, variables))
  features = model_for('resnet_v1_tiny', num_classes=None, block_sizes=((4, 3, 2), (8, 2, 2), (16, 2, 1)))
  assert 'logits' not in slim.load_variables(prefix, features, image_shape=(32, 32, 3))['params']
  # A backbone cut after block 2 on purpose, as detection feature extractors are: its own layers, as saved.
  cut = model_for('resnet_v1_tiny', num_classes=None, block_sizes=((4, 3, 2), (8, 2, 2)))
  with pytest.raises(slim.SlimCheckpointError, match='resnet_v1_tiny/block3'):
    slim.load_variables(prefix, cut, image_shape=(32, 32, 3))
  part = names.flatten(slim.load_variables(prefix, cut, image_shape=(32, 32, 3), allow_unused_layers=True)['params'])
  saved = names.flatten(jax.tree_util.tree_map(np.asarray, variables['params']))
  assert part and all(path[0] in ('conv1', 'block1', 'block2') for path in part)
  for path, value in part.items():
    np.testing.assert_array_equal(value, saved[path])


def test_a_weight_directly_under_the_models_scope_is_a_layer_it_lacks(tmp_path):
  # A module path of no scope had ended the search for its outermost scope in a bare StopIteration.
  model = fixture_model('v1_tiny_10_momentum')
  tensors = {**model_tensors('v1_tiny_10_momentum'), 'resnet_v1_tiny/weights': np.zeros((1,), np.float32)}
  prefix = tensor_bundle_writer.write_checkpoint(str(tmp_path / 'model.ckpt'), tensors)
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, model)
  assert str(error.value).splitlines()[1:3] == [
      '  1 scope(s) of layers in the checkpoint that the model does not have (leaving them out would change the '
      'outputs):', '    resnet_v1_tiny']


def test_an_image_shape_without_channels_is_refused_naming_the_argument():
  # It had been reported as the model's inputs: "ResNet inputs are (1, 32, 32)".
  with pytest.raises(ValueError, match=r"^image_shape=\(32, 32\) must be one image's \(height, width, channels\)"):
    slim.load_variables(ckpt_prefix('v1_tiny_10_momentum'), fixture_model('v1_tiny_10_momentum'), image_shape=(32, 32))


def test_a_model_name_in_place_of_a_model_is_refused_naming_get_model():
  with pytest.raises(TypeError, match=re.escape("expected a model built by models.get_model, got str 'resnet_v1_tiny': "
                                                "pass models.get_model('resnet_v1_tiny', num_classes=...).")):
    slim.load_variables(ckpt_prefix('v1_tiny_10'), 'resnet_v1_tiny')


def test_wrong_scope_hints_at_the_checkpoint_scope():
  with pytest.raises(slim.SlimCheckpointError, match="its variables are under 'resnet_v1_tiny'"):
    slim.load_variables(ckpt_prefix('v1_tiny_10'), model_for('resnet_v2_tiny', num_classes=10))


def test_missing_gamma_becomes_ones_with_a_warning(caplog):
  ckpt = 'v1_tiny_10_noscale'
  model = model_for('resnet_v1_tiny', num_classes=10)
  with caplog.at_level(logging.WARNING):
    variables = slim.load_variables(ckpt_prefix(ckpt), model)
  assert any('have no gamma' in r.getMessage() and '19 BatchNorm' in r.getMessage() for r in caplog.records)
  gammas = [v for p, v in names.flatten(variables['params']).items() if p[-1] == 'gamma']
  assert len(gammas) == 19 and all(g.dtype == np.float32 and np.all(g == 1.0) for g in gammas)
  images = parity_case('v1')['images']
  np.testing.assert_allclose(eval_fn(model)(variables, images),
                             eval_fn(fixture_model(ckpt))(loaded(ckpt), images), rtol=1e-6, atol=1e-6)


def test_gamma_the_model_lacks_is_refused():
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(ckpt_prefix('v1_tiny_10'), fixture_model('v1_tiny_10_noscale'))
  message = str(error.value)
  assert '19 BatchNorm param(s) in the checkpoint that the model does not have' in message
  assert 'resnet_v1_tiny/conv1/BatchNorm/gamma' in message and 'batch_norm_scale=True (config.bn.scale=True)' in message


def test_missing_zero_debias_state_starts_at_zero_and_restarts_debiasing():
  """A checkpoint without `biased` / `local_step` (e.g. from an eval graph): zeros, as TF's fresh
  variables; the first update then makes moving_mean the batch mean (debiasing restarts)."""
  decay = 0.997
  model = model_for('resnet_v1_tiny', num_classes=10, zero_debias_moving_mean=True)
  variables = slim.load_variables(ckpt_prefix('v1_tiny_10'), model)
  stats = names.flatten(variables['batch_stats'])
  checkpoint = names.flatten(loaded('v1_tiny_10')['batch_stats'])
  assert {p[-1] for p in stats} == {'moving_mean', 'moving_variance', 'moving_mean_biased',
                                    'moving_mean_local_step'}
  for path, value in stats.items():
    if path[-1] == 'moving_mean_biased':
      assert value.dtype == np.float32 and np.all(value == 0.0)
    elif path[-1] == 'moving_mean_local_step':
      assert value.dtype == np.float32 and value.shape == () and value == 0.0
    else:
      np.testing.assert_array_equal(value, checkpoint[path])

  images = parity_case('v1')['images']
  _, updates = train_fn(model)(variables, images)
  after = names.flatten(jax.device_get(updates['batch_stats']))
  # decay 0 stores the batch statistics themselves (train-mode outputs do not use the moving ones).
  plain = model_for('resnet_v1_tiny', num_classes=10, batch_norm_decay=0.0)
  _, batch = train_fn(plain)(loaded('v1_tiny_10'), images)
  batch = names.flatten(jax.device_get(batch['batch_stats']))
  for path in checkpoint:
    module = path[:-1]
    if path[-1] == 'moving_mean':
      np.testing.assert_allclose(after[path], batch[path], rtol=1e-5, atol=1e-6, err_msg='/'.join(path))
      assert float(after[module + ('moving_mean_local_step',)]) == 1.0
    else:  # the variance's plain EMA goes on from the checkpoint's value
      expected = checkpoint[path] - (1 - decay) * (checkpoint[path] - batch[path].astype(np.float64))
      np.testing.assert_allclose(after[path], expected, rtol=1e-5, err_msg='/'.join(path))


def test_renorm_model_starts_its_averages_at_the_checkpoints_moving_statistics():
  """Fine-tuning a plain checkpoint with renorm: renorm_mean = moving_mean and both stddevs =
  sqrt(moving_variance + epsilon), so eval is unchanged and r, d start near 1, 0."""
  model = model_for('resnet_v1_tiny', num_classes=10, batch_norm_renorm=True, batch_norm_renorm_r_max=3.0,
                    batch_norm_renorm_clipping_ramp_steps=10)
  variables = slim.load_variables(ckpt_prefix('v1_tiny_10'), model)
  stats = names.flatten(variables['batch_stats'])
  checkpoint = names.flatten(loaded('v1_tiny_10')['batch_stats'])
  epsilon = dict(model.arg_scope.batch_norm)['epsilon']
  for path, value in checkpoint.items():
    module = path[:-1]
    if path[-1] == 'moving_mean':
      np.testing.assert_array_equal(stats[module + ('renorm_mean',)], value)
      assert float(stats[module + ('renorm_clipping_step',)]) == 0.0
    else:
      expected = np.sqrt(value + epsilon).astype(np.float32)
      np.testing.assert_array_equal(stats[module + ('renorm_stddev',)], expected)
      np.testing.assert_array_equal(stats[module + ('moving_stddev',)], expected)
  images = parity_case('v1')['images']
  plain = model_for('resnet_v1_tiny', num_classes=10)
  np.testing.assert_allclose(eval_fn(model)(variables, images), eval_fn(plain)(loaded('v1_tiny_10'), images),
                             rtol=1e-6, atol=1e-6)


def test_renorm_and_variance_debias_state_round_trip(tmp_path):
  model = model_for('resnet_v1_tiny', num_classes=10, batch_norm_renorm=True)
  variables = slim.load_variables(ckpt_prefix('v1_tiny_10'), model)
  stats = names.flatten(variables['batch_stats'])
  stats = {path: value + 0.25 for path, value in stats.items()}
  variables = {**variables, 'batch_stats': names.unflatten(stats)}
  prefix = slim.save_slim_checkpoint(str(tmp_path / 'model.ckpt'), variables, model)
  assert 'resnet_v1_tiny/block1/unit_1/bottleneck_v1/conv1/BatchNorm/renorm_stddev' in (
      tensor_bundle.CheckpointReader(prefix).variables())
  assert_tree_equal(slim.load_variables(prefix, model), variables)
  debiased = model_for('resnet_v1_tiny', num_classes=10, batch_norm_zero_debias_moving_variance=True)
  exported = slim.variables_to_slim(slim.load_variables(ckpt_prefix('v1_tiny_10'), debiased), debiased)
  bn = 'resnet_v1_tiny/block1/unit_1/bottleneck_v1/conv1/BatchNorm'
  # The doubled scope TF's assign_moving_average(zero_debias=True) would give the variance's state.
  assert f'{bn}/{bn}/moving_variance/local_step' in exported and f'{bn}/{bn}/moving_variance/biased' in exported


@pytest.mark.parametrize('model_name, image_shape', [('resnet_v1_digits', (8, 8, 1)), ('resnet_v2_tiny', (32, 32, 1))])
def test_a_one_channel_model_exports_without_being_told_its_input(tmp_path, model_name, image_shape):
  # The variables say how many channels the image has; the 3-channel default had failed with
  # "shape (1, 1, 1, 64), model (1, 1, 3, 64)" and no hint.
  model = model_for(model_name, num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, *image_shape)), train=False)
  prefix = slim.save_slim_checkpoint(str(tmp_path / 'model.ckpt'), variables, model)
  assert_tree_equal(slim.load_variables(prefix, model, image_shape=image_shape), variables)


@pytest.mark.parametrize('damage', ['truncated_data', 'flipped_byte', 'truncated_index'])
def test_damaged_checkpoint_names_the_file(damage, tmp_path):
  prefix = copy_checkpoint('v1_tiny_10', tmp_path)
  target = prefix + ('.index' if damage == 'truncated_index' else '.data-00000-of-00001')
  with open(target, 'r+b') as f:
    if damage == 'flipped_byte':
      f.seek(1000)
      byte = f.read(1)
      f.seek(1000)
      f.write(bytes([byte[0] ^ 0x40]))
    else:
      f.truncate(os.path.getsize(target) // 2)
  with pytest.raises(ValueError) as error:
    slim.load_variables(prefix, fixture_model('v1_tiny_10'))
  assert not isinstance(error.value, slim.SlimCheckpointError)
  assert target in str(error.value)
  assert {'truncated_data': 'truncated', 'flipped_byte': 'checksum', 'truncated_index': 'truncated'}[damage] \
      in str(error.value)


# --- live: TensorFlow reads what we write (TF venv) -----------------------------------------


@pytest.fixture(scope='module')
def tf():
  return pytest.importorskip('tensorflow', reason='live checks need tensorflow (run with /work/tfenv)')


@pytest.mark.parametrize('ckpt', sorted(CHECKPOINTS))
def test_live_tf_reads_our_checkpoint(tf, ckpt, tmp_path):
  model = fixture_model(ckpt)
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', loaded(ckpt), model, global_step=7)
  reader = tf.train.load_checkpoint(str(tmp_path))  # through the `checkpoint` state file
  shapes = reader.get_variable_to_shape_map()
  ours = slim.variables_to_slim(loaded(ckpt), model)
  assert set(shapes) == set(ours) | {'global_step'}
  assert reader.get_tensor('global_step') == 7 and prefix.endswith('-7')
  for name, value in ours.items():
    tensor = reader.get_tensor(name)
    assert tensor.dtype == value.dtype and tensor.tobytes() == value.tobytes(), name


@pytest.fixture(scope='module')
def tf_slim_env():
  try:
    import tensorflow
    from slim_shim import import_tf_slim
    # Inside a graph context import_tf_slim leaves eager execution on: switching it off for the
    # whole process would break the TF2 (eager) live tests of other modules run after this one.
    with tensorflow.Graph().as_default():
      return import_tf_slim()
  except ImportError as e:
    pytest.skip(f'needs TensorFlow, tf-keras and tf_slim (TF venv): {e}')


@pytest.mark.parametrize('ckpt', sorted(CHECKPOINTS))
def test_live_slim_restores_our_checkpoint(tf_slim_env, ckpt, tmp_path):
  """slim's own eval graph restores our export with `tf.train.Saver` and computes our logits; a
  zero-debias model's train graph (which alone has the `biased` / `local_step` variables)
  restores every variable it has."""
  from slim_shim import build_tiny_resnet
  tf = tf_slim_env[0]
  name, kwargs = CHECKPOINTS[ckpt]
  model = fixture_model(ckpt)
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', loaded(ckpt), model)
  build = dict(version=int(name[len('resnet_v')]), num_classes=kwargs['num_classes'],
               zero_debias_moving_mean=kwargs.get('zero_debias_moving_mean', False),
               scale=kwargs.get('batch_norm_scale', True))
  images = parity_case('v1')['images']
  ours = slim.variables_to_slim(loaded(ckpt), model)
  for is_training in (False, True) if build['zero_debias_moving_mean'] else (False,):
    graph = tf.Graph()
    with graph.as_default():
      x = tf.placeholder(tf.float32, images.shape)
      net, _ = build_tiny_resnet(x, is_training=is_training, **build)
      with tf.Session(graph=graph) as sess:
        tf.train.Saver(var_list=tf.global_variables()).restore(sess, prefix)
        restored = sess.run({v.op.name: v for v in tf.global_variables()})
        logits = None if is_training else sess.run(net, {x: images})
    assert set(restored) <= set(ours)
    for key, value in restored.items():
      np.testing.assert_array_equal(value, ours[key], err_msg=key)
    if logits is not None:
      assert_close(eval_fn(model)(loaded(ckpt), images), logits.reshape(len(images), -1), f'{ckpt} logits')


def test_from_slim_inverts_to_slim_for_renorm_state():
  """Every statistic leaf (renorm's averages and schedule step too) comes back where it was."""
  model = models.get_model('resnet_v1_tiny', num_classes=2, batch_norm_renorm=True, batch_norm_renorm_r_max=3.0,
                           batch_norm_renorm_clipping_ramp_steps=5)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(0)  # distinct values, so that a leaf put in another's place shows
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), variables)
  back = names.from_slim(names.to_slim(variables, 'resnet_v1_tiny'), 'resnet_v1_tiny')
  jax.tree.map(np.testing.assert_array_equal, back,
               {'params': variables['params'], 'batch_stats': variables['batch_stats']})




def test_a_batch_norm_absent_whole_lists_its_gamma_as_missing(tmp_path):
  # A BatchNorm missing whole is missing its gamma too: only one that has statistics without
  # a gamma is slim's scale=False, read as gamma = 1.
  tensors = dict(expected_tensors('v1_tiny_10'))
  bn = 'resnet_v1_tiny/block2/unit_1/bottleneck_v1/conv1/BatchNorm'
  for leaf in ('gamma', 'beta', 'moving_mean', 'moving_variance'):
    del tensors[f'{bn}/{leaf}']
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors)
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, models.get_model('resnet_v1_tiny', num_classes=10))
  assert '4 variable(s) missing' in str(error.value) and f'{bn}/gamma  (model shape (8,))' in str(error.value)


def test_half_of_a_zero_debias_pair_is_missing_not_zeroed(tmp_path):
  # A trained `biased` average paired with a fresh local_step 0 would be debiased wrongly, silently.
  tensors = dict(expected_tensors('v2_tiny_11_zero_debias'))
  bn = 'resnet_v2_tiny/block2/unit_1/bottleneck_v2/preact'
  step = f'{bn}/{bn}/moving_mean/local_step'
  del tensors[step]  # its `biased` partner stays
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors)
  model = models.get_model('resnet_v2_tiny', num_classes=11, zero_debias_moving_mean=True)
  with pytest.raises(slim.SlimCheckpointError) as error:
    slim.load_variables(prefix, model)
  assert '1 variable(s) missing' in str(error.value) and f'{step}  (model shape ())' in str(error.value)


def test_integer_typed_state_is_read_and_cast_to_the_models_dtype(tmp_path):
  # Step counters saved as int64 load, cast to the model's float32.
  tensors = dict(expected_tensors('v2_tiny_11_zero_debias'))
  steps = [key for key in tensors if key.endswith('/local_step')]
  tensors.update({key: tensors[key].astype(np.int64) for key in steps})
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors)
  model = models.get_model('resnet_v2_tiny', num_classes=11, zero_debias_moving_mean=True)
  stats = names.flatten(slim.load_variables(prefix, model)['batch_stats'])
  loaded = [value for path, value in stats.items() if path[-1] == 'moving_mean_local_step']
  assert len(loaded) == len(steps) == 16 and all(v.dtype == np.float32 and v == 3.0 for v in loaded)


def test_from_slim_ignores_a_scope_that_merely_starts_with_the_models():
  # Another network whose scope extends ours (an EMA or teacher copy) is not ours.
  ours, other = np.ones((1, 1, 3, 4), np.float32), np.zeros((1, 1, 3, 4), np.float32)
  tree = names.from_slim({'resnet_v1_50/conv1/weights': ours, 'resnet_v1_50_ema/conv1/weights': other},
                         'resnet_v1_50')
  np.testing.assert_array_equal(tree['params']['conv1']['weights'], ours)
  assert names.flax_path('resnet_v1_50', 'resnet_v1_500/conv1/weights') is None


def test_gammas_of_one_the_model_lacks_are_accepted(tmp_path):
  # A scale=False model exported with its gammas of 1 loads back into scale=False.
  tensors = dict(expected_tensors('v1_tiny_10'))
  gammas = [key for key in tensors if key.endswith('/gamma')]
  tensors.update({key: np.ones_like(tensors[key]) for key in gammas})
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors)
  model = models.get_model('resnet_v1_tiny', num_classes=10, batch_norm_scale=False)
  params = names.flatten(slim.load_variables(prefix, model)['params'])
  assert len(gammas) == 19 and not any(path[-1] == 'gamma' for path in params)
