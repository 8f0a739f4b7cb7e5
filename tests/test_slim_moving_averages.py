"""TF-Slim checkpoints with exponential moving averages (`<name>/ExponentialMovingAverage`).

The fixtures `fixtures/slim_ckpt_ema/<case>/` are checkpoints of slim's tiny nets trained three
steps as `train_image_classifier.py --moving_average_decay` trains, with the eval-mode logits of
slim's graph restored as `eval_image_classifier.py` restores it with and without
`--moving_average_decay` (`make_slim_ema_fixtures.py`, TensorFlow's own numbers).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from resnet_flax import checkpoints, eval_lib, models, slim, train_lib
from resnet_flax.slim import __main__ as slim_cli
from resnet_flax.slim import names, tensor_bundle, tensor_bundle_writer
from test_pretrained import V1_CKPT, synthetic_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'slim_ckpt_ema')
# case -> (model name, get_model keyword arguments), as make_slim_ema_fixtures.CASES built them.
CASES = {
    'v1_tiny_10': ('resnet_v1_tiny', dict(num_classes=10)),
    'v2_tiny_11_zero_debias': ('resnet_v2_tiny', dict(num_classes=11, zero_debias_moving_mean=True)),
}
IMAGE_SHAPE = (32, 32, 3)


def _prefix(case: str) -> str:
  return os.path.join(ROOT, case, 'model.ckpt')


def _model(case: str):
  name, kwargs = CASES[case]
  return models.get_model(name, **kwargs)


def _load(case: str, moving_averages: bool, prefix: str | None = None) -> dict:
  return slim.load_variables(prefix or _prefix(case), _model(case), image_shape=IMAGE_SHAPE,
                             moving_averages=moving_averages)


@pytest.mark.parametrize('case', sorted(CASES))
def test_the_averages_give_slims_eval_logits_and_the_variables_its_logits_without_them(case):
  with np.load(os.path.join(ROOT, case, 'eval.npz')) as expected:
    images, averaged, plain = expected['images'], expected['logits_averages'], expected['logits_variables']
  apply = jax.jit(lambda variables, x: _model(case).apply(variables, x, train=False))
  for moving_averages, theirs in [(True, averaged), (False, plain)]:
    ours = np.asarray(apply(_load(case, moving_averages), images)).reshape(theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max(), err_msg=str(moving_averages))
  assert np.abs(averaged - plain).max() > 0.1  # the switch matters in these fixtures


@pytest.mark.parametrize('case', sorted(CASES))
def test_each_variable_comes_from_its_average_where_the_checkpoint_has_one(case):
  # v2's zero-debias state: slim averages that of a conv's BatchNorm (a model variable there), not preact's.
  reader = tensor_bundle.CheckpointReader(_prefix(case))
  found, scope = reader.variables(), _model(case).slim_scope
  loaded = _load(case, moving_averages=True)
  sources = []
  for collection in ('params', 'batch_stats'):
    for path, value in names.flatten(loaded[collection]).items():
      name = names.slim_name(scope, path)
      source = name + names.AVERAGE_SUFFIX if name + names.AVERAGE_SUFFIX in found else name
      np.testing.assert_array_equal(value, reader.read(source).astype(value.dtype), err_msg=name)
      sources.append((path[-1], source != name))
  assert all(averaged for leaf, averaged in sources if leaf in ('weights', 'gamma', 'beta', 'moving_mean'))
  if case.endswith('zero_debias'):
    assert {averaged for leaf, averaged in sources if leaf == 'moving_mean_local_step'} == {True, False}


def test_the_step_is_the_global_step_the_run_saved():
  model = _model('v1_tiny_10')
  assert slim.load_variables_and_step(_prefix('v1_tiny_10'), model, image_shape=IMAGE_SHAPE,
                                      moving_averages=True)[1] == 3


def test_a_checkpoint_without_averages_is_refused_in_one_line():
  with pytest.raises(slim.SlimCheckpointError, match=(
      f'checkpoint {V1_CKPT} holds no moving averages .* load its variables as they are '
      r'\(moving_averages=False; eval.py: --config.model_ema_decay=0; slim convert: leave out --moving_averages\)\.$')):
    slim.load_variables(V1_CKPT, _model('v1_tiny_10'), image_shape=IMAGE_SHAPE, moving_averages=True)


def test_averages_of_other_variables_are_refused_naming_a_param_without_one(tmp_path):
  # As a run that averaged some variables only: slim's eval would fail on the missing averages.
  reader = tensor_bundle.CheckpointReader(_prefix('v1_tiny_10'))
  tensors = {name: reader.read(name) for name in reader.variables()}
  bare = 'resnet_v1_tiny/logits/weights'
  del tensors[bare + names.AVERAGE_SUFFIX]
  prefix = tensor_bundle_writer.write_checkpoint(tmp_path / 'model.ckpt', tensors)
  with pytest.raises(slim.SlimCheckpointError, match=f'but none for 1 param\\(s\\) of the model, e.g. {bare}: '):
    _load('v1_tiny_10', True, prefix)
  assert _load('v1_tiny_10', False, prefix)  # as they are, it loads


def test_eval_and_convert_read_the_averages_with_the_switch(tmp_path):
  config = synthetic_config()
  spec = 'slim:' + _prefix('v1_tiny_10')
  expected = {True: _load('v1_tiny_10', True), False: _load('v1_tiny_10', False)}
  for decay in (0.999, 0.0):
    config.model_ema_decay = decay
    loaded = eval_lib.load_checkpoint(config, None, spec)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(loaded.variables), expected[decay > 0])
  target = slim_cli.convert(_prefix('v1_tiny_10'), 'resnet_v1_tiny', str(tmp_path), num_classes=10,
                            image_shape=IMAGE_SHAPE, moving_averages=True)
  converted = checkpoints.restore_tree(target)
  jax.tree_util.tree_map(np.testing.assert_array_equal, {k: converted[k] for k in expected[True]}, expected[True])
  assert int(converted['step']) == 3
  # The converted checkpoint holds the averages as its variables, and no averages of them.
  loaded = eval_lib.load_checkpoint(config, None, target)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(loaded.variables), expected[True])
  config.model_ema_decay = 0.999
  with pytest.raises(checkpoints.CheckpointError, match=f'checkpoint {target} holds no moving averages .* evaluate its '
                                                        r'variables with --config.model_ema_decay=0\.$'):
    eval_lib.load_checkpoint(config, None, target)


@pytest.mark.parametrize('num_classes', [10, 7])
def test_fine_tuning_reads_the_variables_as_slim_does_and_starts_the_averages_there(tmp_path, monkeypatch,
                                                                                    num_classes):
  # slim's train_image_classifier restores --checkpoint_path's variables, not their averages (its
  # averages start at the initializers' values instead). With 7 classes the head starts fresh: its
  # arrays had been both the variables' and the averages', one buffer donated twice at step 1; on
  # CPU, device_put had also given the averages the variables' buffers (not donated, silently).
  shared = []
  initialize_from = train_lib._initialize_from

  def counting_shared_buffers(*args, **kwargs):
    state = initialize_from(*args, **kwargs)
    pointers = [leaf.addressable_shards[0].data.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(state)]
    shared.append(len(pointers) - len(set(pointers)))
    return state

  monkeypatch.setattr(train_lib, '_initialize_from', counting_shared_buffers)
  config = synthetic_config(num_classes=num_classes)
  config.init_checkpoint = 'slim:' + _prefix('v1_tiny_10')
  config.model_ema_decay = 0.9
  # One step that changes nothing (no learning rate, frozen statistics): its checkpoint is the start.
  config.update(num_train_steps=1, learning_rate=0.0, warmup_steps=0)
  config.bn.frozen = True
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert shared == [0]
  started = checkpoints.restore_tree(str(tmp_path / 'checkpoints' / '1'))
  variables = _load('v1_tiny_10', False)
  if num_classes != 10:
    del variables['params']['logits']
    jax.tree_util.tree_map(np.testing.assert_array_equal, started['ema']['params']['logits'],
                           started['params']['logits'])
  for tree in (started, started['ema']):
    jax.tree_util.tree_map(np.testing.assert_array_equal, {'params': {k: tree['params'][k] for k in
                                                                      variables['params']},
                                                           'batch_stats': tree['batch_stats']}, variables)


def test_an_export_with_averages_reads_back_either_way(tmp_path):
  variables, averages = _load('v2_tiny_11_zero_debias', False), _load('v2_tiny_11_zero_debias', True)
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', variables, _model('v2_tiny_11_zero_debias'),
                                     global_step=3, image_shape=IMAGE_SHAPE, averages=averages)
  for moving_averages, expected in [(True, averages), (False, variables)]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, _load('v2_tiny_11_zero_debias', moving_averages, prefix),
                           expected)


# --- live: slim's eval restores the averages we write (TF venv) -----------------------------


@pytest.mark.parametrize('case', sorted(CASES))
def test_live_slims_eval_restores_the_averages_we_export(case, tmp_path):
  """eval_image_classifier's restore (`variables_to_restore(slim.get_model_variables())`) of our
  export computes our logits of the averages."""
  try:
    import tensorflow
    from slim_shim import build_tiny_resnet, import_tf_slim
    with tensorflow.Graph().as_default():  # import_tf_slim outside a graph would turn eager execution off
      tf, tf_slim = import_tf_slim()[:2]
  except ImportError as error:
    pytest.skip(f'needs TensorFlow, tf-keras and tf_slim (TF venv): {error}')
  model, (name, kwargs) = _model(case), CASES[case]
  # Other averages than the fixture's: ours, half way between its variables and its averages.
  variables = _load(case, False)
  averages = jax.tree_util.tree_map(lambda v, a: (v + a) / 2, variables, _load(case, True))
  prefix = slim.save_slim_checkpoint(tmp_path / 'model.ckpt', variables, model, global_step=5,
                                     image_shape=IMAGE_SHAPE, averages=averages)
  with np.load(os.path.join(ROOT, case, 'eval.npz')) as expected:
    images = expected['images']
  graph = tf.Graph()
  with graph.as_default():
    x = tf.placeholder(tf.float32, images.shape)
    net, _ = build_tiny_resnet(x, is_training=False, version=int(name[len('resnet_v')]), **kwargs)
    global_step = tf.train.get_or_create_global_step()
    restore = tf.train.ExponentialMovingAverage(0.9, global_step).variables_to_restore(tf_slim.get_model_variables())
    with tf.Session(graph=graph) as sess:
      tf.train.Saver(restore).restore(sess, prefix)
      theirs = sess.run(net, {x: images}).reshape(len(images), -1)
  ours = np.asarray(model.apply(averages, images, train=False)).reshape(theirs.shape)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  assert np.abs(ours - np.asarray(model.apply(variables, images, train=False)).reshape(theirs.shape)).max() > 0.1
