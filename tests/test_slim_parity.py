"""Numerical parity with TF-Slim (tf_slim 1.1.0 on TensorFlow 2.21).

The fixture tests read `fixtures/slim_parity.npz` (written by `fixtures/make_slim_fixtures.py`
in a TensorFlow venv) and need no TensorFlow: the tiny ResNets with randomized variables,
eval-mode logits and end points, train-mode logits, and moving statistics after three
update steps, for the fused / non-fused and zero-debias code paths; plus one bare
`slim.batch_norm` per code path.

`TestLiveTfSlim` builds the slim graphs itself from *our* initialized variables (so it also
exercises `names.to_slim`) and runs only where TensorFlow, tf-keras and tf_slim import
(`/work/tfenv/bin/python -m pytest tests/test_slim_parity.py` after `pip install -e '.[test]'` there).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from resnet_flax import losses, models
from resnet_flax.layers import BatchNorm
from resnet_flax.slim import names

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_parity.npz')
RTOL = 1e-4
# Newer slim (tensorflow/models) adds these end points; tf_slim 1.1.0 does not have them.
NEWER_SLIM_END_POINTS = ('global_pool', '{scope}/spatial_squeeze')
DEBIAS_SUFFIXES = ('/biased', '/local_step')


@functools.lru_cache(maxsize=None)
def _fixture() -> dict[str, np.ndarray]:
  if not os.path.exists(FIXTURE):
    pytest.skip(f'{FIXTURE} is missing; run tests/fixtures/make_slim_fixtures.py with TensorFlow')
  with np.load(FIXTURE) as data:
    return {key: data[key] for key in data.files}


def _case_names() -> tuple[list[str], list[str], list[str]]:
  """(model cases, model cases that store their own images and end points, bn cases)."""
  if not os.path.exists(FIXTURE):
    return [], [], []
  with np.load(FIXTURE) as data:
    files = set(data.files)
  tops = sorted({key.split('/', 1)[0] for key in files})
  model_cases = [t for t in tops if not t.startswith('bn_')]
  return model_cases, [t for t in model_cases if f'{t}/images' in files], [t for t in tops if t.startswith('bn_')]


MODEL_CASES, BASE_CASES, BN_CASES = _case_names()


# Eager applies of the tiny models are cheap (~0.3 s) once their ops are compiled, but every
# new input shape compiles its ops again (several seconds): the default run covers each
# code path once and leaves the remaining geometry / combination cases to `-m slow`.
SLOW_CASES = {'v1_nonfused_zd', 'v1_odd33', 'v2_odd33', 'v2_os8'}
SLOW_TRAIN_CASES = SLOW_CASES | {'v1_os8'}


def _params(cases, slow):
  return [pytest.param(c, marks=pytest.mark.slow) if c in slow else c for c in cases]


def _sub(data: dict, prefix: str) -> dict[str, np.ndarray]:
  return {key[len(prefix):]: value for key, value in data.items() if key.startswith(prefix)}


@functools.lru_cache(maxsize=None)
def load_case(name: str) -> dict:
  """One case, with what it shares with its base case (images, initial variables) merged in."""
  data = _fixture()
  config = json.loads(str(data[f'{name}/config']))
  own = _sub(data, f'{name}/')
  base = _sub(data, f"{config['base']}/") if config['base'] else own
  return dict(
      config=config,
      var={**_sub(base, 'var/'), **_sub(own, 'var/')},
      images=base['images'],
      update_images=base['update_images'],
      eval_logits=own['eval/logits'],
      train_logits=own['train/logits'],
      end_points=_sub(own, 'end_point/'),
      after=_sub(own, 'after/'),
      regularization_loss=float(own['regularization_loss']),
  )


def make_model(config: dict, **overrides):
  """Our model for a fixture config; spatial_squeeze=False because tf_slim 1.1.0 does not squeeze."""
  kwargs = dict(
      zero_debias_moving_mean=config['zero_debias_moving_mean'],
      batch_norm_fused=config['batch_norm_fused'],
      batch_norm_scale=config['batch_norm_scale'],
      batch_norm_decay=config['batch_norm_decay'],
      batch_norm_epsilon=config['batch_norm_epsilon'],
      output_stride=config['output_stride'],
      spatial_squeeze=False,
  )
  kwargs.update(overrides)
  return models.get_model(config['model'], num_classes=config['num_classes'], **kwargs)


def our_variables(case: dict) -> dict:
  return names.from_slim(case['var'], case['config']['model'])


def assert_close(ours, theirs, what: str, rtol: float = RTOL) -> None:
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, f'{what}: shape {ours.shape} != slim {theirs.shape}'
  scale = float(np.max(np.abs(theirs))) if theirs.size else 1.0
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-5 * max(scale, 1e-3), err_msg=what)


def first_divergence(ours: dict, theirs: dict, order: list[str], rtol: float = RTOL) -> str | None:
  """The first end point (in network order) where ours and slim's differ, with the error size."""
  for key in order:
    if key not in theirs:
      continue
    a, b = np.asarray(ours[key]), theirs[key]
    if a.shape != b.shape:
      return f'{key}: shape {a.shape} != slim {b.shape}'
    scale = max(float(np.max(np.abs(b))), 1e-3)
    if not np.allclose(a, b, rtol=rtol, atol=1e-5 * scale):
      return f'{key}: max |ours - slim| = {np.max(np.abs(a - b)):.3g} (slim max |value| {scale:.3g})'
  return None


def run_updates(model, variables: dict, update_images: np.ndarray) -> dict:
  """Train-mode steps that keep the returned statistics, like slim running UPDATE_OPS."""
  for batch in update_images:
    _, updates = model.apply(variables, batch, train=True, mutable=['batch_stats'])
    variables = {**variables, 'batch_stats': updates['batch_stats']}
  return variables


# ---------------------------------------------------------------- fixture-based (no TF needed)


def test_fixture_has_the_expected_cases():
  data = _fixture()
  assert {'v1', 'v1_zd', 'v1_nonfused', 'v2', 'v2_zd', 'v2_nonfused', 'v1_odd33', 'v1_os8'} <= set(MODEL_CASES)
  assert {'bn_default', 'bn_zero_debias', 'bn_nonfused'} <= set(BN_CASES)
  assert all(value.dtype != np.float64 for value in data.values())


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_CASES))
def test_variable_names_and_shapes_match_slim(name):
  case = load_case(name)
  model = make_model(case['config'])
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), case['images'])
  shapes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ours = {key: value.shape for key, value in names.to_slim(shapes, case['config']['model']).items()}
  theirs = {key: value.shape for key, value in case['var'].items()}
  assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
  assert ours == theirs
  # from_slim is the exact inverse on these names.
  assert names.to_slim(our_variables(case), case['config']['model']).keys() == case['var'].keys()


@functools.lru_cache(maxsize=None)
def our_eval(name: str) -> dict:
  """Our eval-mode logits and end points on a case's images (computed once per case)."""
  case = load_case(name)
  model = make_model(case['config'])
  logits, state = model.apply(our_variables(case), case['images'], train=False, mutable=['intermediates'])
  end_points = {key: np.asarray(value) for key, value in models.end_points(state['intermediates'], model).items()}
  return dict(logits=np.asarray(logits), end_points=end_points)


@functools.lru_cache(maxsize=None)
def our_train(name: str) -> dict:
  """Our train-mode logits, and slim-named variables after the case's update steps."""
  case = load_case(name)
  model = make_model(case['config'])
  variables = our_variables(case)
  logits, _ = model.apply(variables, case['images'], train=True, mutable=['batch_stats'])
  after = names.to_slim(run_updates(model, variables, case['update_images']), case['config']['model'])
  return dict(logits=np.asarray(logits), after=after)


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_CASES))
def test_eval_logits(name):
  assert_close(our_eval(name)['logits'], load_case(name)['eval_logits'], f'{name} eval logits')


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_CASES))
def test_eval_logits_with_batch_norm_folded_into_the_convs(name):
  # Not slim's order of operations (fold_batch_norm_in_eval), but slim's numbers to the same tolerance.
  case = load_case(name)
  logits = make_model(case['config'], fold_batch_norm_in_eval=True).apply(our_variables(case), case['images'],
                                                                          train=False)
  assert_close(logits, case['eval_logits'], f'{name} eval logits, BatchNorm folded')


@pytest.mark.parametrize('name', _params(BASE_CASES, SLOW_CASES))
def test_eval_end_points(name):
  case = load_case(name)
  scope = case['config']['model']
  n = case['config']['end_point_examples']
  ours = {key: value[:n] for key, value in our_eval(name)['end_points'].items()}
  theirs = case['end_points']
  extra = set(ours) - set(theirs) - {e.format(scope=scope) for e in NEWER_SLIM_END_POINTS}
  assert sorted(set(theirs) - set(ours)) == [], 'slim end points we do not produce'
  assert sorted(extra) == [], 'end points slim does not have'
  diverged = first_divergence(ours, theirs, list(ours))
  assert diverged is None, f'{name}: first diverging end point (network order): {diverged}'


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_TRAIN_CASES))
def test_train_logits(name):
  assert_close(our_train(name)['logits'], load_case(name)['train_logits'], f'{name} train logits')


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_TRAIN_CASES))
def test_moving_statistics_after_updates(name):
  case = load_case(name)
  ours = our_train(name)['after']
  assert set(case['after']) <= set(ours)
  for key, theirs in case['after'].items():
    assert_close(ours[key], theirs, f'{name} {key} after {case["config"]["num_updates"]} updates')
  # Parameters do not move in a statistics update.
  for key, before in case['var'].items():
    if key not in case['after']:
      np.testing.assert_array_equal(ours[key], before, err_msg=key)


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_TRAIN_CASES))
def test_moving_statistics_change_after_updates(name):
  """The change (after - before) is what the update rule decides; compared alone it resolves
  what the values hide under decay 0.997 (e.g. n/(n-1) on the variance: 6.7% of the change
  for block3's n = 16 values per channel, 1e-4 of the value)."""
  case = load_case(name)
  ours = our_train(name)['after']
  for key, theirs in case['after'].items():
    before = case['var'][key].astype(np.float64)
    delta_ours, delta_theirs = ours[key].astype(np.float64) - before, theirs.astype(np.float64) - before
    np.testing.assert_allclose(delta_ours, delta_theirs, rtol=1e-3, atol=1e-6,
                               err_msg=f'{name} {key}: change over {case["config"]["num_updates"]} updates')


@pytest.mark.parametrize('name', ['v1', 'v2'])
def test_default_spatial_squeeze_matches_slim_logits(name):
  case = load_case(name)
  logits = make_model(case['config'], spatial_squeeze=True).apply(our_variables(case), case['images'], train=False)
  assert_close(logits, case['eval_logits'][:, 0, 0, :], f'{name} squeezed logits')


@pytest.mark.parametrize('name', _params(MODEL_CASES, SLOW_CASES))
def test_regularization_loss_is_half_l2_of_every_conv_weight(name):
  """slim: `l2_regularizer(wd)` = wd * sum(w**2) / 2 on each conv `weights` (logits included)."""
  case = load_case(name)
  wd = case['config']['weight_decay']
  formula = sum(0.5 * wd * float(np.sum(np.square(value, dtype=np.float64)))
                for key, value in case['var'].items() if key.endswith('/weights'))
  np.testing.assert_allclose(formula, case['regularization_loss'], rtol=1e-5)
  losses = pytest.importorskip('resnet_flax.losses')
  ours = losses.slim_l2_regularization(our_variables(case)['params'], wd)
  np.testing.assert_allclose(float(ours), case['regularization_loss'], rtol=1e-5)


def test_zero_debias_variable_names():
  """TF's zero-debias state sits under the BatchNorm scope written twice."""
  var = load_case('v1_zd')['var']
  bn = 'resnet_v1_tiny/block1/unit_1/bottleneck_v1/conv1/BatchNorm'
  assert f'{bn}/{bn}/moving_mean/biased' in var and f'{bn}/{bn}/moving_mean/local_step' in var
  preact = 'resnet_v2_tiny/block2/unit_1/bottleneck_v2/preact'
  assert f'{preact}/{preact}/moving_mean/local_step' in load_case('v2_zd')['var']
  assert not any('moving_variance/' in key for key in var), 'TF zero-debiases the mean only'
  step = var[f'{bn}/{bn}/moving_mean/local_step']
  assert step.dtype == np.float32 and step.shape == ()
  after = load_case('v1_zd')['after'][f'{bn}/{bn}/moving_mean/local_step']
  assert float(after) == 3.0


def _bn_case(name: str) -> dict:
  data = _fixture()
  own = _sub(data, f'{name}/')
  return dict(config=json.loads(str(own['config'])), **{k: v for k, v in own.items() if k != 'config'})


def _bn_layer(config: dict, **overrides) -> BatchNorm:
  kwargs = dict(decay=config['decay'], epsilon=config['epsilon'], center=config['center'], scale=config['scale'],
                zero_debias_moving_mean=config['zero_debias_moving_mean'], fused=config['fused'])
  kwargs.update(overrides)
  return BatchNorm(**kwargs)


def _bn_variables(layer: BatchNorm, x: np.ndarray, moving_mean: float, moving_variance: float) -> dict:
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  stats = dict(variables['batch_stats'])
  stats['moving_mean'] = np.full_like(stats['moving_mean'], moving_mean)
  stats['moving_variance'] = np.full_like(stats['moving_variance'], moving_variance)
  return {**variables, 'batch_stats': stats}


@pytest.mark.parametrize('name', BN_CASES)
def test_batch_norm_train_step_matches_slim_code_path(name):
  case = _bn_case(name)
  config = case['config']
  layer = _bn_layer(config)
  variables = _bn_variables(layer, case['x'], config['initial_moving_mean'], config['initial_moving_variance'])
  y, updates = layer.apply(variables, case['x'], train=True, mutable=['batch_stats'])
  assert_close(y, case['train/y'], f'{name} train output')
  ours = names.to_slim({**variables, **updates}, 'BatchNorm')
  theirs = _sub(case, 'after/')
  assert set(ours) == set(theirs)
  for key, value in theirs.items():
    assert_close(ours[key], value, f'{name} {key} after one update', rtol=1e-5)


@pytest.mark.parametrize('name', BN_CASES)
def test_batch_norm_feeds_the_same_variance_as_slim(name):
  """From moving_variance = 0, one update leaves (1 - decay) * (the variance fed to the average)."""
  case = _bn_case(name)
  config = case['config']
  layer = _bn_layer(config)
  x = case['x']
  _, updates = layer.apply(_bn_variables(layer, x, 0.0, 0.0), x, train=True, mutable=['batch_stats'])
  ratio = np.asarray(updates['batch_stats']['moving_variance'], np.float64) / (1 - config['decay'])
  ratio /= x.astype(np.float64).var(axis=(0, 1, 2))
  n = x.size // x.shape[-1]
  expected = n / (n - 1) if config['fused'] else 1.0
  np.testing.assert_allclose(ratio, expected, rtol=2e-6)
  # slim's tf-keras default path computes 1 - decay in float32 (0.00300002), hence rtol 2e-5.
  np.testing.assert_allclose(ratio, case['fed_variance_ratio'], rtol=2e-5)


@pytest.mark.parametrize('name', BN_CASES)
@pytest.mark.parametrize('epsilon', [1e-5, 1e-6])
def test_batch_norm_epsilon_is_not_clamped(name, epsilon):
  """TF 2.21 uses the configured epsilon even below 1.001e-5, fused or not, train and eval."""
  case = _bn_case(name)
  layer = _bn_layer(case['config'], epsilon=epsilon)
  x = case['tiny_x']
  variables = _bn_variables(layer, x, 0.0, 1e-7)
  y_train, _ = layer.apply(variables, x, train=True, mutable=['batch_stats'])
  y_eval = layer.apply(variables, x, train=False)
  assert_close(y_train, case[f'epsilon/{epsilon:g}/train_y'], f'{name} eps={epsilon:g} train')
  assert_close(y_eval, case[f'epsilon/{epsilon:g}/eval_y'], f'{name} eps={epsilon:g} eval')
  np.testing.assert_allclose(case[f'epsilon/{epsilon:g}/train'], epsilon, rtol=1e-3)
  np.testing.assert_allclose(case[f'epsilon/{epsilon:g}/eval'], epsilon, rtol=1e-3)


# ---------------------------------------------------------------- live tf_slim (TF venv only)


@pytest.fixture(scope='module')
def tf_slim_env():
  try:
    from slim_shim import import_tf_slim
    return import_tf_slim()
  except ImportError as e:
    pytest.skip(f'live tf_slim parity needs TensorFlow, tf-keras and tf_slim (TF venv): {e}')


def _randomized_slim_values(variables: dict, scope: str, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  values = {}
  for key, value in sorted(names.to_slim(variables, scope).items()):
    leaf = key.rsplit('/', 1)[-1]
    if leaf == 'gamma':
      value = rng.uniform(0.5, 1.5, value.shape)
    elif leaf in ('beta', 'biases') or (leaf == 'moving_mean' and '/moving_mean/' not in key):
      value = rng.normal(0.0, 0.1, value.shape)
    elif leaf == 'moving_variance':
      value = rng.uniform(0.5, 1.5, value.shape)
    values[key] = np.asarray(value, np.float32)
  return values


LIVE_CASES = {
    'v1_fused': dict(version=1, num_classes=10, size=32),
    'v2_zero_debias_odd33': dict(version=2, num_classes=11, size=33, zero_debias_moving_mean=True),
}


class TestLiveTfSlim:
  """Our model against tf_slim itself, on our own initialization."""

  @pytest.mark.parametrize('case', sorted(LIVE_CASES))
  def test_against_tf_slim(self, tf_slim_env, case):
    from slim_shim import build_tiny_resnet
    tf = tf_slim_env[0]
    cfg = LIVE_CASES[case]
    scope = f"resnet_v{cfg['version']}_tiny"
    zero_debias = cfg.get('zero_debias_moving_mean', False)
    rng = np.random.RandomState(5)
    shape = (4, cfg['size'], cfg['size'], 3)
    images = rng.normal(size=shape).astype(np.float32)
    update_images = rng.normal(size=(3,) + shape).astype(np.float32)

    model = models.get_model(scope, num_classes=cfg['num_classes'], zero_debias_moving_mean=zero_debias,
                             spatial_squeeze=False)
    init = model.init(jax.random.PRNGKey(1), images, train=False)
    values = _randomized_slim_values(init, scope, seed=6)
    variables = names.from_slim(values, scope)
    build = dict(version=cfg['version'], num_classes=cfg['num_classes'], zero_debias_moving_mean=zero_debias)

    graph = tf.Graph()
    with graph.as_default():
      tf.set_random_seed(0)
      x = tf.placeholder(tf.float32, shape)
      train_net, _ = build_tiny_resnet(x, is_training=True, **build)
      update_ops = tf.get_collection(tf.GraphKeys.UPDATE_OPS)
      with tf.Session(graph=graph) as sess:
        graph_vars = {v.op.name: v for v in tf.global_variables()}
        assert set(graph_vars) == set(values), 'slim variable names differ from names.to_slim'
        for key, var in graph_vars.items():
          var.load(values[key], sess)
        slim_train_logits = sess.run(train_net, {x: images})
        for batch in update_images:
          sess.run(update_ops, {x: batch})
        slim_after = {key: sess.run(var) for key, var in graph_vars.items()}

    graph = tf.Graph()
    with graph.as_default():
      tf.set_random_seed(0)
      x = tf.placeholder(tf.float32, shape)
      eval_net, end_points = build_tiny_resnet(x, is_training=False, **build)
      with tf.Session(graph=graph) as sess:
        for var in tf.global_variables():
          var.load(values[var.op.name], sess)
        slim_eval_logits, slim_end_points = sess.run([eval_net, end_points], {x: images})

    logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    ours = {key: np.asarray(value) for key, value in models.end_points(state['intermediates'], model).items()}
    diverged = first_divergence(ours, slim_end_points, list(ours))
    assert diverged is None, f'{case}: first diverging end point (network order): {diverged}'
    assert_close(logits, slim_eval_logits, f'{case} eval logits')

    train_logits, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    assert_close(train_logits, slim_train_logits, f'{case} train logits')
    after = names.to_slim(run_updates(model, variables, update_images), scope)
    for key, value in slim_after.items():
      assert_close(after[key], value, f'{case} {key} after updates')

  @pytest.mark.parametrize('version', [1, 2])
  def test_bn_weight_decay_is_slims_batch_norm_param_regularizers(self, tf_slim_env, version):
    """slim's regularization losses with `param_regularizers` on every batch_norm's gamma and
    beta (beside resnet_arg_scope's conv L2) against ours with `bn_weight_decay`."""
    from slim_shim import build_tiny_resnet
    tf, slim = tf_slim_env[0], tf_slim_env[1]
    scope, wd, bn_wd = f'resnet_v{version}_tiny', 1e-4, 3e-3
    model = models.get_model(scope, num_classes=10, spatial_squeeze=False)
    values = _randomized_slim_values(model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3), np.float32),
                                                train=False), scope, seed=7)
    graph = tf.Graph()
    with graph.as_default():
      regularizer = slim.l2_regularizer(bn_wd)
      with slim.arg_scope([slim.batch_norm], param_regularizers={'gamma': regularizer, 'beta': regularizer}):
        build_tiny_resnet(tf.placeholder(tf.float32, (1, 32, 32, 3)), version=version, num_classes=10,
                          is_training=True, weight_decay=wd)
      regularization = tf.add_n(tf.losses.get_regularization_losses())
      with tf.Session(graph=graph) as sess:
        for var in tf.global_variables():
          var.load(values[var.op.name], sess)
        theirs = sess.run(regularization)
        bn_terms = len([loss for loss in tf.losses.get_regularization_losses() if 'BatchNorm' in loss.name])
    assert bn_terms > 0, 'param_regularizers reached no batch_norm'
    params = names.from_slim(values, scope)['params']
    np.testing.assert_allclose(float(losses.slim_l2_regularization(params, wd, bn_wd)), theirs, rtol=1e-5)
    # Without them, slim's sum is the conv weights' alone, which bn_weight_decay must change.
    assert abs(float(losses.slim_l2_regularization(params, wd)) - theirs) > 1e-3 * theirs
