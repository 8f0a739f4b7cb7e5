"""ResNet v1/v2 structure: shapes, strides, end points, names, initializers, registry."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.ad_checkpoint import print_saved_residuals

from resnet_flax import models
from resnet_flax.layers import initializers
from resnet_flax.models import resnet_utils


def _shapes(model, image_size=224, batch=1, **kwargs):
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = _init_shapes(model, x.shape)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, out


@pytest.mark.parametrize('name', ['resnet_v1_50', 'resnet_v2_101'])
@pytest.mark.parametrize('output_stride,size', [(None, 7), (32, 7), (16, 14), (8, 28)])
def test_feature_map_size_follows_output_stride(name, output_stride, size):
  model = models.get_model(name, num_classes=None, global_pool=False, output_stride=output_stride)
  _, out = _shapes(model)
  assert out.shape == (1, size, size, 2048)


def test_output_stride_must_be_reachable():
  for name, stride, reachable in [('resnet_v1_50', 6, [4, 8, 16, 32]), ('resnet_v2_50', 64, [4, 8, 16, 32]),
                                  ('resnet_v1_tiny', 32, [4, 8, 16])]:
    # slim's message had named the stride left after the root's 4 (8 for 32).
    with pytest.raises(ValueError, match=re.escape(f'{name}: output_stride={stride} cannot be reached; use one of '
                                                   f'{reachable}, or None.')):
      _shapes(models.get_model(name, output_stride=stride))
  for stride in ('8', True, 0, 8.0):  # '8' had failed formatting slim's message; True had been 1
    with pytest.raises(ValueError, match=re.escape(f'output_stride={stride!r} must be a positive int')):
      models.get_model('resnet_v1_tiny', output_stride=stride)


# The deeper models' logits and features: test_param_counts, from the trace that counts them.
@pytest.mark.parametrize('name', ['resnet_v1_50', 'resnet_v2_50'])
def test_logits_and_features_shapes(name):
  _, logits = _shapes(models.get_model(name, num_classes=1001), batch=2)
  assert logits.shape == (2, 1001) and logits.dtype == jnp.float32
  _, features = _shapes(models.get_model(name, num_classes=None), batch=2)
  assert features.shape == (2, 1, 1, 2048)
  _, spatial = _shapes(models.get_model(name, num_classes=10, global_pool=False, spatial_squeeze=False), batch=2)
  assert spatial.shape == (2, 7, 7, 10)


def test_without_root_block_blocks_see_the_input():
  model = models.get_model('resnet_v1_tiny', num_classes=None, global_pool=False, include_root_block=False)
  _, out = _shapes(model, image_size=16)
  assert out.shape == (1, 4, 4, 64)  # strides 2, 2, 1 of the tiny blocks


def test_stride_sits_on_last_unit_of_each_block():
  variables, _ = _shapes(models.get_model('resnet_v1_50', num_classes=1000))
  plan = resnet_utils.plan_strides(
      [resnet_utils.bottleneck_block(f'block{i + 1}', None, *s)
       for i, s in enumerate(((64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1)))], None)
  strides = [[u[2] for u in units] for units, _ in plan]
  assert strides == [[1, 1, 2], [1, 1, 1, 2], [1] * 5 + [2], [1, 1, 1]]
  block1 = variables['params']['block1']
  assert 'shortcut' in block1['unit_1']['bottleneck_v1'] and 'shortcut' not in block1['unit_3']['bottleneck_v1']


def test_atrous_rates_replace_strides_past_output_stride():
  blocks = [resnet_utils.bottleneck_block(f'block{i + 1}', None, *s)
            for i, s in enumerate(((64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1)))]
  plan = resnet_utils.plan_strides(blocks, output_stride=2)  # 8 overall: root takes 4
  rates = [[(u[2], u[3]) for u in units] for units, _ in plan]
  assert rates[0] == [(1, 1), (1, 1), (2, 1)]
  # A unit's own would-be stride raises the rate only for the units after it (DeepLab's 1, 2, 4).
  assert rates[1] == [(1, 1)] * 4 and rates[2] == [(1, 2)] * 6 and rates[3] == [(1, 4)] * 3


def test_conv2d_same_pads_like_slim_not_like_xla_same():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(1, 8, 8, 2), jnp.float32)
  weights = jnp.asarray(rng.randn(7, 7, 2, 64), jnp.float32)
  # slim: pad_total = 6 -> (3, 3), then VALID.
  expected = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0))), weights, (2, 2), 'VALID',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  xla_same = jax.lax.conv_general_dilated(x, weights, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  from resnet_flax.layers import Conv2D

  def conv(features, kernel, **kw):
    return Conv2D(features, kernel, activation=None, normalizer=None, **kw)

  class Probe(__import__('flax').linen.Module):
    @__import__('flax').linen.compact
    def __call__(self, x):
      return resnet_utils.conv2d_same(conv, x, 64, 7, 2, name='conv1', train=False)

  out = Probe().apply({'params': {'conv1': {'weights': weights, 'biases': jnp.zeros(64)}}}, x)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, xla_same, atol=1e-3)


def test_subsample_takes_every_factor_th_pixel():
  x = jnp.arange(2 * 5 * 5 * 1.0).reshape(2, 5, 5, 1)
  np.testing.assert_array_equal(resnet_utils.subsample(x, 2), x[:, ::2, ::2])
  assert resnet_utils.subsample(x, 2).shape == (2, 3, 3, 1)
  assert resnet_utils.subsample(x, 1) is x


@pytest.mark.parametrize('name', ['resnet_v1_tiny', 'resnet_v2_tiny'])
def test_eval_output_does_not_depend_on_batch_mates(name):
  model = models.get_model(name, num_classes=5)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 32, 32, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  variables = {**variables, 'batch_stats': jax.tree_util.tree_map(lambda s: s + 0.3, variables['batch_stats'])}
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
  mixed = jnp.concatenate([x[:1], -5 * x[1:]])
  full = evaluate(variables, x)
  np.testing.assert_allclose(full[0], evaluate(variables, mixed)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(full[:1], evaluate(variables, x[:1]), rtol=1e-5, atol=1e-6)
  # Train mode, by contrast, does depend on them, which is why the mode is explicit.
  train_full, train_other = train(variables, x), train(variables, mixed)
  assert not np.allclose(train_full[0], train_other[0], atol=1e-3)


@pytest.mark.parametrize('name, options', [('resnet_v1_tiny', {}), ('resnet_v2_tiny', {}),
                                           ('resnet_v1_tiny', {'use_bounded_activations': True})])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_nan_statistics_give_nan_logits_not_a_tie(name, options, dtype):
  # A NaN reached the pool and XLA:CPU (jaxlib 0.10, 0.11) pooled it to a finite number through a
  # fused jax.nn.relu (jax.nn.relu6: in bfloat16): every logit came out the bias, 0, and a top-1
  # that counts ties scored 100%.
  model = models.get_model(name, num_classes=5, dtype=dtype, **options)
  x = jnp.asarray(np.random.RandomState(0).rand(16, 32, 32, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  broken = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.full_like(s, jnp.nan) if path[-1].key == 'moving_variance' else s, variables['batch_stats'])
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))({**variables, 'batch_stats': broken}, x)
  assert np.isnan(np.asarray(logits)).all()


def test_apply_without_train_fails():
  model = models.get_model('resnet_v2_tiny', num_classes=3)
  x = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(TypeError, match='train'):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  with pytest.raises(TypeError, match='train'):
    model.apply(variables, x)
  with pytest.raises(ValueError, match='batch_stats'):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)


def test_end_points_named_as_slim():
  model = models.get_model('resnet_v1_tiny', num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(variables, x)
  ends = models.end_points(state['intermediates'], model)
  s = 'resnet_v1_tiny'
  for name in [f'{s}/conv1', f'{s}/block1/unit_1/bottleneck_v1/shortcut', f'{s}/block1/unit_2/bottleneck_v1/conv2',
               f'{s}/block1/unit_2/bottleneck_v1', f'{s}/block3', 'global_pool', f'{s}/logits',
               f'{s}/spatial_squeeze', 'predictions']:
    assert name in ends, name
  assert ends[f'{s}/block1'].shape == (2, 4, 4, 16)
  np.testing.assert_array_equal(ends[f'{s}/spatial_squeeze'], logits)
  assert 'intermediates' not in variables
  # The whole state, or the variables, had come back as "end points": 'global_pool' and
  # 'predictions' missing, or 97 parameter arrays.
  for tree, collections in ((state, "'intermediates'"), (variables, "'batch_stats', 'params'")):
    with pytest.raises(ValueError, match=f"got one holding the collection\\(s\\) {collections}: pass "
                                         r"state\['intermediates'\]"):
      models.end_points(tree, model)


def test_parameter_names_match_slim_layout():
  variables, _ = _shapes(models.get_model('resnet_v2_50', num_classes=1001))
  p = variables['params']
  unit = p['block1']['unit_1']['bottleneck_v2']
  assert set(unit) == {'preact', 'shortcut', 'conv1', 'conv2', 'conv3'}
  assert set(unit['preact']) == {'gamma', 'beta'} and set(unit['conv3']) == {'weights', 'biases'}
  assert set(unit['conv1']) == {'weights', 'BatchNorm'}
  assert set(p['conv1']) == {'weights', 'biases'}  # v2's root conv has no BN
  assert p['logits']['weights'].shape == (1, 1, 2048, 1001)
  assert set(variables['batch_stats']['postnorm']) == {'moving_mean', 'moving_variance'}


def test_variance_scaling_initializer_is_slims():
  init = initializers.variance_scaling()
  w = np.asarray(init(jax.random.PRNGKey(0), (3, 3, 64, 256)))
  stddev_param = math.sqrt(1.3 * 2.0 / (3 * 3 * 64))
  assert np.abs(w).max() <= 2 * stddev_param + 1e-7
  # A normal truncated at +-2 sigma has std 0.8796 sigma.
  assert abs(w.std() / (0.87962566 * stddev_param) - 1) < 0.01


def test_arg_scope_overrides_reach_batch_norm():
  model = models.get_model('resnet_v1_tiny', num_classes=2, batch_norm_decay=0.9, batch_norm_epsilon=1e-3,
                           batch_norm_scale=False, zero_debias_moving_mean=True, batch_norm_fused=False)
  assert dict(model.arg_scope.batch_norm) == {'decay': 0.9, 'epsilon': 1e-3, 'scale': False,
                                              'zero_debias_moving_mean': True, 'fused': False}
  variables, _ = _shapes(model, image_size=32)
  bn = variables['params']['conv1']['BatchNorm']
  assert set(bn) == {'beta'}
  assert 'moving_mean_biased' in variables['batch_stats']['conv1']['BatchNorm']


def test_research_switches_reach_every_batch_norm():
  model = models.get_model('resnet_v2_tiny', num_classes=2, batch_norm_frozen=True, batch_norm_ghost_batch_size=2)
  x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  # Frozen: train mode equals eval mode and the statistics stay as they were.
  train, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  np.testing.assert_allclose(train, jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x), rtol=1e-6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])
  assert dict(model.arg_scope.batch_norm)['ghost_batch_size'] == 2


def test_zero_init_last_gamma_makes_every_v1_unit_start_as_its_shortcut():
  model = models.get_model('resnet_v1_tiny', num_classes=2, zero_init_last_gamma=True)
  x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  gammas = {'/'.join(path[:-1]): np.asarray(leaf) for path, leaf in flatten_dict(variables['params']).items()
            if path[-1] == 'gamma'}
  last = [name for name in gammas if '/conv3/' in name]
  assert len(last) == 5 and all(np.all(gammas[name] == 0) for name in last)
  assert all(np.all(gammas[name] == 1) for name in gammas if '/conv3/' not in name)
  _, ends = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(variables, x)
  unit = ends['intermediates']['block1']['unit_1']['bottleneck_v1']
  shortcut = unit['shortcut']['end_point']
  np.testing.assert_allclose(unit['end_point'], np.maximum(shortcut, 0), rtol=1e-6, atol=1e-6)


def test_registry_errors_are_clear():
  with pytest.raises(ValueError, match='resnet_v1_50'):
    models.get_model('resnet_v1_51')
  with pytest.raises(TypeError, match='outptu_stride'):
    models.get_model('resnet_v1_50', outptu_stride=8)
  with pytest.raises(TypeError, match=r'the ResNets are channels last throughout \(NHWC\); .* leave '
                                      'batch_norm_data_format out'):
    models.get_model('resnet_v1_50', batch_norm_data_format='NCHW')
  # TF-Slim's param_initializers reach every BatchNorm of a ResNet.
  model = models.get_model('resnet_v1_tiny', num_classes=3,
                           batch_norm_moving_variance_init=jax.nn.initializers.constant(2.0))
  stats = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)['batch_stats']
  variances = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats)
               if 'moving_variance' in jax.tree_util.keystr(path)]
  assert variances and all(np.all(np.asarray(leaf) == 2.0) for leaf in variances)


@pytest.mark.parametrize('overrides, named', [
    ({'batch_norm_scale': False}, 'batch_norm_scale=False'), ({'use_batch_norm': False}, 'no BatchNorm'),
])
def test_zero_init_last_gamma_without_a_gamma_is_refused_not_ignored(overrides, named):
  # The zeros initializer had reached no gamma: every unit started as itself, not its shortcut.
  with pytest.raises(ValueError, match=re.escape(f"get_model('resnet_v1_tiny'): zero_init_last_gamma=True needs a "
                                                 f'gamma to start at zero, but the model has {named}')):
    models.get_model('resnet_v1_tiny', num_classes=3, zero_init_last_gamma=True, **overrides)


def test_depth_options_of_small_variants_name_block_sizes():
  with pytest.raises(ValueError, match=re.escape("resnet_v1_tiny: depth_multiplier and min_base_depth scale the "
                                                 "full-size v1 models' depths")):
    models.get_model('resnet_v1_tiny', depth_multiplier=0.5)
  with pytest.raises(TypeError, match=r"valid: \[.*'block_sizes'"):
    models.get_model('resnet_v1_tiny', blocks=((4, 1, 1),))


def test_an_activation_that_is_no_function_is_refused_and_none_is_slims_none():
  with pytest.raises(TypeError, match=re.escape("activation_fn='relu' must be a function, e.g. nn.relu, or None")):
    models.get_model('resnet_v1_tiny', activation_fn='relu')
  model = models.get_model('resnet_v1_tiny', num_classes=3, activation_fn=None)  # convolutions without one
  x = jnp.ones((2, 32, 32, 3))
  logits, _ = model.apply(model.init(jax.random.PRNGKey(0), x, train=False), x, train=True, mutable=['batch_stats'])
  assert logits.shape == (2, 3)


def test_v1_depth_multiplier_and_min_base_depth():
  model = models.get_model('resnet_v1_50', num_classes=None, depth_multiplier=0.25, min_base_depth=32)
  variables, out = _shapes(model)
  assert out.shape[-1] == 512  # block4: max(int(512 * 0.25), 32) * 4
  assert variables['params']['block1']['unit_1']['bottleneck_v1']['conv1']['weights'].shape[-1] == 32


@pytest.mark.parametrize('overrides, error, named', [
    # A text had been repeated by `d * depth_multiplier` ("invalid literal for int(): '0.250.250.25...'"); 0 with
    # min_base_depth 0 had built layers of width 0; an int dtype failed only at apply.
    ({'depth_multiplier': '0.25'}, TypeError, "depth_multiplier='0.25' must be a number."),
    ({'min_base_depth': 8.0}, TypeError, 'min_base_depth=8.0 must be a whole number.'),
    ({'depth_multiplier': 0.0}, ValueError, 'depth_multiplier=0.0 must be > 0'),
    ({'depth_multiplier': 0.01, 'min_base_depth': 0}, ValueError, 'depth_multiplier=0.01 with min_base_depth=0 gives '
                                                                  'base depths [0, 1, 2, 5], some of no width; raise '
                                                                  'min_base_depth to at least 1.'),
    ({'dtype': jnp.int32}, TypeError, 'must be a float type (jnp.float32, jnp.bfloat16, jnp.float16), or None for '
                                      'float32'),
])
def test_depth_scaling_and_a_dtype_that_build_no_working_model_are_refused(overrides, error, named):
  with pytest.raises(error, match=r"get_model\('resnet_v1_50'\): .*" + re.escape(named)):
    models.get_model('resnet_v1_50', num_classes=10, **overrides)
  # slim takes min_base_depth=0 ("no floor") where the scaled depths stay positive.
  models.get_model('resnet_v1_50', num_classes=10, depth_multiplier=0.5, min_base_depth=0)


def test_list_models_names_all():
  names = models.list_models()
  for version in (1, 2):
    for depth in (50, 101, 152, 200):
      assert f'resnet_v{version}_{depth}' in names


def test_models_are_hashable_for_jit_static_arguments():
  a = models.get_model('resnet_v1_tiny', num_classes=3, batch_norm_decay=0.9)
  b = models.get_model('resnet_v1_tiny', num_classes=3, batch_norm_decay=0.9)
  assert hash(a) == hash(b) and a == b and a.slim_scope == 'resnet_v1_tiny'


@pytest.mark.parametrize('stride,padding,size', [(1, 'SAME', 7), (2, 'SAME', 7), (2, 'VALID', 8), (3, 'SAME', 8)])
def test_one_by_one_convolution_as_a_dot_equals_xla_convolution(stride, padding, size):
  from resnet_flax.layers.conv import convolve
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, size, size, 5), jnp.float32)
  w = jnp.asarray(rng.randn(1, 1, 5, 4), jnp.float32)
  reference = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(convolve(x, w, stride, 1, padding), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides, error, named', [
    ({'batch_norm_frozen': 'False'}, TypeError, "the BatchNorm field frozen='False' must be True or False"),
    ({'zero_debias_moving_mean': 'no'}, TypeError, "zero_debias_moving_mean='no' must be True or False"),
    ({'global_pool': 'False'}, TypeError, "global_pool='False' must be True or False"),
    ({'use_batch_norm': 0}, TypeError, 'use_batch_norm=0 must be True or False'),
    ({'num_classes': 0}, ValueError, 'num_classes=0 must be a positive int, or None'),
    ({'num_classes': 5.0}, ValueError, 'num_classes=5.0 must be a positive int'),
    ({'num_classes': True}, ValueError, 'num_classes=True must be a positive int'),
    # slim's resnet_arg_scope argument: a model field the loss never read had been accepted silently.
    ({'weight_decay': 0.0}, TypeError, 'weight_decay is not a model argument; slim\'s L2 on conv weights is a term '
                                       'of the loss: add losses.slim_l2_regularization(params, weight_decay)'),
    # BatchNorm's options and the output stride had been refused only at the model's first call.
    ({'batch_norm_decay': '0.9'}, TypeError, "get_model('resnet_v1_tiny'): batch_norm_decay='0.9' (str) must be a "
                                             'number'),
    ({'batch_norm_ghost_batch_size': 2.0}, TypeError, 'batch_norm_ghost_batch_size=2.0 (float) must be an integer'),
    ({'batch_norm_gamma_init': 'zeros'}, TypeError, "batch_norm_gamma_init='zeros' must be a flax initializer"),
    ({'batch_norm_renorm': True, 'zero_debias_moving_mean': True}, ValueError,
     'batch_norm_renorm keeps plain moving averages'),
    ({'output_stride': 3}, ValueError, 'resnet_v1_tiny: output_stride=3 cannot be reached; use one of [4, 8, 16]'),
])
def test_switches_and_class_counts_of_the_wrong_type_are_refused(overrides, error, named):
  # Each had been read by its truthiness: 'False' froze the statistics, 0 dropped the logits.
  overrides = {'num_classes': 5, **overrides}
  with pytest.raises(error, match=re.escape(named)):
    models.get_model('resnet_v1_tiny', **overrides)
  models.get_model('resnet_v1_tiny', num_classes=np.int64(5), batch_norm_frozen=True)  # numpy ints are counts


@pytest.mark.parametrize('shape, named', [
    ((4, 3, 32, 32), 'look NCHW (channels first); the models take NHWC'),  # had trained with 32 "channels"
    ((4, 3, 24, 40), 'look NCHW (channels first); the models take NHWC'),  # not square: had been accepted
    ((4, 1, 28, 28), 'look NCHW (channels first); the models take NHWC'),
    ((32, 32, 3), 'give a batch of NHWC images'),
])
def test_inputs_that_are_not_a_batch_of_nhwc_images_are_refused(shape, named):
  model = models.get_model('resnet_v1_tiny', num_classes=5)
  with pytest.raises(ValueError, match=re.escape(named)):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)


@pytest.mark.parametrize('name, options, shape', [
    ('resnet_v1_tiny', {}, (2, 1, 64, 8)),  # a spectrogram: height 1, not square
    ('resnet_v1_tiny', {'include_root_block': False}, (2, 4, 4, 16)),  # a feature map, no root block
    ('resnet_v2_tiny', {'include_root_block': False}, (2, 3, 3, 64)),
])
def test_nhwc_inputs_that_merely_have_few_rows_are_taken(name, options, shape):
  model = models.get_model(name, num_classes=5, **options)
  assert model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)['params']


@pytest.mark.parametrize('fold', [False, True])
def test_a_trained_gamma_the_model_is_built_without_is_refused_folded_or_not(fold):
  # Folded eval reads the layer's variables itself; it had dropped the gamma silently.
  trained = models.get_model('resnet_v1_tiny', num_classes=5).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)),
                                                                   train=False)
  model = models.get_model('resnet_v1_tiny', num_classes=5, batch_norm_scale=False, fold_batch_norm_in_eval=fold)
  with pytest.raises(ValueError, match='has gamma among its params but scale=False: build the model with '
                                       r'batch_norm_scale=True \(config.bn.scale=True\)'):
    model.apply(trained, jnp.zeros((2, 32, 32, 3)), train=False)


def test_bounded_activations_clip_the_residual_and_relu6_the_sum():
  """Newer slim's use_bounded_activations: relu6(shortcut + clip(residual, -6, 6)). With a shortcut in
  [0, 6] (relu6 outputs) the clip cannot change the sum's relu6, so the test needs an identity shortcut of
  unbounded input: no root block, input channels = the unit's depth."""
  model = models.get_model('resnet_v1_tiny', num_classes=2, block_sizes=((16, 1, 1),), include_root_block=False,
                           use_bounded_activations=True)
  x = jnp.asarray(np.random.RandomState(2).randn(2, 8, 8, 64) * 10, jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  params = flatten_dict(variables['params'])
  params = {k: (v * 20.0 if k[-1] == 'gamma' and 'conv3' in k else v) for k, v in params.items()}
  variables = {**variables, 'params': unflatten_dict(params)}
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  unit = state['intermediates']['block1']['unit_1']['bottleneck_v1']
  residual = np.asarray(unit['conv3']['end_point'])
  shortcut = np.asarray(x)
  expected = np.clip(shortcut + np.clip(residual, -6, 6), 0, 6)
  assert not np.allclose(expected, np.clip(shortcut + residual, 0, 6), atol=1e-3)  # the clip matters here
  np.testing.assert_allclose(unit['end_point'], expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('name', ['resnet_v1_tiny'])
def test_store_non_strided_activations_keeps_block_end_points_full_size_same_logits(name):
  """slim's store_non_strided_activations: each block's end point before its stride, same eval logits."""
  x = jnp.asarray(np.random.RandomState(3).randn(2, 32, 32, 3), jnp.float32)
  plain = models.get_model(name, num_classes=3)
  stored = models.get_model(name, num_classes=3, store_non_strided_activations=True)
  variables = jax.jit(lambda x: plain.init(jax.random.PRNGKey(0), x, train=False))(x)
  a, sa = plain.apply(variables, x, train=False, mutable=['intermediates'])
  b, sb = stored.apply(variables, x, train=False, mutable=['intermediates'])
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  ea, eb = models.end_points(sa['intermediates'], plain), models.end_points(sb['intermediates'], stored)
  assert eb[f'{name}/block1'].shape[1] == 2 * ea[f'{name}/block1'].shape[1]
  np.testing.assert_allclose(eb[f'{name}/block1'][:, ::2, ::2], ea[f'{name}/block1'], rtol=1e-5, atol=1e-5)


def _init_shapes(model, shape):
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize('channels', [1, 4])
def test_nchw_gray_and_rgba_batches_are_refused_too(channels):
  # Gray and RGBA channels-first batches too, not only RGB ones.
  model = models.get_model('resnet_v1_tiny', num_classes=5)
  with pytest.raises(ValueError, match=re.escape('look NCHW (channels first)')):
    _init_shapes(model, (2, channels, 32, 32))


def test_store_non_strided_activations_with_output_stride_keeps_the_atrous_plan():
  # With output_stride as well: the rates stay DeepLab's, and the one real stride moves to block1's end.
  blocks = [resnet_utils.bottleneck_block(f'block{i + 1}', None, *s)
            for i, s in enumerate(((64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1)))]
  plain = resnet_utils.plan_strides(blocks, output_stride=2)
  stored = resnet_utils.plan_strides(blocks, output_stride=2, store_non_strided_activations=True)
  # Same atrous rates per unit (DeepLab's 1, 2, 4); the one real stride moves to block1's end.
  assert [[u[3] for u in units] for units, _ in stored] == [[u[3] for u in units] for units, _ in plain]
  assert [block_stride for _, block_stride in stored] == [2, 1, 1, 1]
  assert all(u[2] == 1 for units, _ in stored for u in units)


def test_spatial_squeeze_of_spatial_logits_names_the_fix():
  # jnp.squeeze's own error would name neither option.
  model = models.get_model('resnet_v1_tiny', num_classes=5, global_pool=False)
  with pytest.raises(ValueError, match=r'spatial_squeeze needs 1x1 logits but they are 2x2; use global_pool=True'):
    _init_shapes(model, (1, 32, 32, 3))


@pytest.mark.parametrize('name', ['resnet_v1_tiny', 'resnet_v2_tiny'])
def test_a_block_of_one_strided_unit_strides_its_projection_shortcut(name):
  # slim strides the projection shortcut as the residual: a unit that is both strided and
  # projecting (a block of one unit) must agree on the output size.
  model = models.get_model(name, num_classes=None, global_pool=False, block_sizes=((4, 1, 2), (8, 1, 1)))
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = _init_shapes(model, x.shape)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out.shape == (1, 4, 4, 32)  # root 32 -> 8, block1's stride 2 on shortcut and residual alike


def test_bounded_activations_relu6_the_projection_shortcut():
  # slim's use_bounded_activations clips the projection shortcut too, not only identity ones.
  model = models.get_model('resnet_v1_tiny', num_classes=2, use_bounded_activations=True)
  x = jnp.asarray(np.random.RandomState(4).randn(2, 32, 32, 3) * 10, jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(x)
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(variables, x)
  shortcut = np.asarray(state['intermediates']['block1']['unit_1']['bottleneck_v1']['shortcut']['end_point'])
  assert shortcut.min() == 0.0 and shortcut.max() == 6.0  # relu6: clipped at both ends


@pytest.mark.parametrize('name', ['resnet_v1_tiny', 'resnet_v2_tiny'])
def test_bfloat16_models_return_float32_logits(name):
  # The loss and metrics read float32 logits whatever the compute dtype.
  model = models.get_model(name, num_classes=5, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), _init_shapes(model, x.shape), x)
  assert out.shape == (2, 5) and out.dtype == jnp.float32
  # Features stay in the compute dtype, as README says.
  features = model.clone(num_classes=None)
  out = jax.eval_shape(lambda v, x: features.apply(v, x, train=False), _init_shapes(features, x.shape), x)
  assert out.dtype == jnp.bfloat16


def test_v1_min_base_depth_defaults_to_slims_8():
  # slim's resnet_v1 default min_base_depth is 8, which a depth_multiplier below 1/8 reaches.
  model = models.get_model('resnet_v1_50', num_classes=None, depth_multiplier=1 / 16)
  params = _init_shapes(model, (1, 64, 64, 3))['params']
  # block1: max(int(64 / 16), 8) = 8, not 4; block4 keeps int(512 / 16) = 32 (x4 = 128 outputs).
  assert params['block1']['unit_1']['bottleneck_v1']['conv1']['weights'].shape[-1] == 8
  assert params['block4']['unit_3']['bottleneck_v1']['conv3']['weights'].shape[-1] == 128


@pytest.mark.parametrize('name', ['resnet_v1_digits', 'resnet_v2_digits'])
def test_digits_variants_default_to_no_root_block(name):
  # 8x8 digits leave no room for the 7x7/2 root and its pool: the digits variants drop it by default.
  model = models.get_model(name, num_classes=10)
  params = _init_shapes(model, (1, 8, 8, 1))['params']
  assert model.include_root_block is False and 'conv1' not in params
  (unit,) = params['block1']['unit_1'].values()  # bottleneck_v1 / bottleneck_v2
  assert unit['conv1']['weights'].shape[2] == 1  # the first unit reads the 1-channel digits directly


def _saved_residual_bytes(fn, *args, capsys):
  """Bytes of the values `fn`'s backward pass keeps from its forward pass (jax's own listing)."""
  capsys.readouterr()
  print_saved_residuals(fn, *args)
  shapes = re.findall(r'^(f32|bf16)\[([\d,]*)\]', capsys.readouterr().out, re.MULTILINE)
  return sum(math.prod(int(d) for d in dims.split(',') if d) * (4 if kind == 'f32' else 2) for kind, dims in shapes)


@pytest.mark.parametrize('name', ['resnet_v1_tiny', 'resnet_v2_tiny'])
def test_remat_keeps_only_each_units_input_and_changes_no_number(name, capsys):
  # flax's own nn.remat could not wrap a unit from outside: `train`, keyword-only, was traced.
  # No root block: its activations, kept either way, would be most of this small model's.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 8)).astype(np.float32))
  results, kept = {}, {}
  for remat in (False, True):
    model = models.get_model(name, num_classes=10, remat=remat, include_root_block=False)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)

    def loss(params):
      logits, state = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats', 'intermediates'])
      return jnp.sum(logits * jnp.arange(10.0)), state
    results[remat] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
    kept[remat] = _saved_residual_bytes(lambda params: loss(params)[0], variables['params'], capsys=capsys)
  # The same loss, statistics, end points and gradients, under the same names (to rounding: the
  # recomputed forward pass may be fused otherwise).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), results[True],
                         results[False])
  assert kept[True] < 0.5 * kept[False], kept


@pytest.mark.parametrize('name', ['resnet_v1_tiny', 'resnet_v2_tiny'])
def test_variables_passed_as_their_params_alone_are_refused_naming_the_fix(name):
  # flax had read 'block1', 'conv1', ... as collections: "ScopeCollectionNotFound ... collection is empty".
  model = models.get_model(name, num_classes=5)
  images = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  with pytest.raises(ValueError, match=re.escape(f"{name}: the variables hold no 'params' collection (their "
                                                 "top-level keys: 'block1', 'block2', 'block3', 'conv1', ...): apply "
                                                 "with all the variables init or a checkpoint gave")):
    model.apply(variables['params'], images, train=False)
