"""Config -> model: how config.bn.cross_device and ghost batches become statistics groups."""

import flax
import jax
import jax.numpy as jnp
import pytest

from configs import default
from resnet_flax import model_builder, models


def _bn(**fields):
  bn = default.get_config().bn
  bn.update(fields)
  return bn


def test_global_statistics_use_the_whole_batch_or_ghost_batches():
  assert model_builder.statistics_group_size(_bn(), batch_size=64, device_count=8) is None
  assert model_builder.statistics_group_size(_bn(ghost_batch_size=16), batch_size=64, device_count=8) == 16


def test_per_device_statistics_group_each_devices_share():
  assert model_builder.statistics_group_size(_bn(cross_device='per_device'), 64, 8) == 8
  assert model_builder.statistics_group_size(_bn(cross_device='per_device'), 64, 1) == 64
  assert model_builder.statistics_group_size(_bn(cross_device='per_device', ghost_batch_size=4), 64, 8) == 4


def test_bad_grouping_is_a_clear_error():
  with pytest.raises(ValueError, match='cross_device'):
    model_builder.statistics_group_size(_bn(cross_device='sync'), 64, 8)
  with pytest.raises(ValueError, match='does not divide the per-device batch of 8'):
    model_builder.statistics_group_size(_bn(cross_device='per_device', ghost_batch_size=3), 64, 8)
  # The first BatchNorm layer had named this, by its scope, once tracing began.
  with pytest.raises(ValueError, match=r'config.bn.ghost_batch_size=3 does not divide config.batch_size=8'):
    model_builder.statistics_group_size(_bn(ghost_batch_size=3), 8, 1)


def test_build_model_passes_the_group_size_to_every_batch_norm():
  config = default.get_config()
  config.bn.cross_device = 'per_device'
  model = model_builder.build_model(config, num_classes=10, device_count=4)
  assert dict(model.arg_scope.batch_norm)['ghost_batch_size'] == config.batch_size // 4


def test_every_bn_field_reaches_the_model():
  config = default.get_config()
  config.bn.update(renorm=True, renorm_r_max=3.0, renorm_d_max=5.0, renorm_clipping_ramp_steps=100,
                   zero_debias_moving_variance=False, frozen_gamma_beta=True, zero_init_last_gamma=True)
  model = model_builder.build_model(config, num_classes=10, device_count=1)
  bn = dict(model.arg_scope.batch_norm)
  assert (bn['renorm'], bn['renorm_r_max'], bn['renorm_d_max'], bn['frozen_gamma_beta']) == (True, 3.0, 5.0, True)
  assert bn['renorm_clipping_ramp_steps'] == 100
  assert model.zero_init_last_gamma


def test_zero_init_last_gamma_on_v2_is_a_clear_error():
  config = default.get_config()
  config.model = 'resnet_v2_digits'
  config.bn.zero_init_last_gamma = True
  with pytest.raises(ValueError, match='applies to resnet_v1'):
    model_builder.build_model(config, num_classes=10, device_count=1)
  config.bn.zero_init_last_gamma = False
  model_builder.build_model(config, num_classes=10, device_count=1)


def test_zero_init_last_gamma_without_scale_is_a_clear_error():
  config = default.get_config()
  config.bn.update(zero_init_last_gamma=True, scale=False)
  with pytest.raises(ValueError, match='needs config.bn.scale=True'):
    model_builder.build_model(config, num_classes=10, device_count=1)


def test_block_sizes_build_another_depth_of_the_same_design():
  config = default.get_config()
  config.model = 'resnet_v1_50'
  config.model_options.block_sizes = ((64, 2, 2), (128, 1, 1))
  model = model_builder.build_model(config, 10)
  assert model.block_sizes == ((64, 2, 2), (128, 1, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
  units = {path[1] for path in flax.traverse_util.flatten_dict(variables['params'])
           if path[0].startswith('block')}
  assert units == {'unit_1', 'unit_2'}
  assert set(variables['params']) == {'conv1', 'block1', 'block2', 'logits'}
  conv3 = variables['params']['block2']['unit_1']['bottleneck_v1']['conv3']
  assert conv3['weights'].shape == (1, 1, 128, 512)  # 4 x base depth


@pytest.mark.parametrize('remat', [None, False, True])
def test_remat_reaches_the_model_from_the_config(remat):
  config = default.get_config()
  config.model_options.remat = remat
  assert model_builder.build_model(config, 10).remat is bool(remat)


def test_block_sizes_with_a_depth_multiplier_is_a_clear_error():
  with pytest.raises(ValueError, match='block_sizes are used as given'):
    models.get_model('resnet_v1_50', block_sizes=((64, 2, 2),), depth_multiplier=0.5)


@pytest.mark.parametrize('model, include_root_block, expected', [
    ('resnet_v1_50', None, [4, 8, 16, 32]),
    ('resnet_v2_digits', None, [1, 2, 4]),  # digits variants: no root block
    ('resnet_v1_digits', True, [4, 8, 16]),
])
def test_reachable_output_strides_are_the_ones_slims_plan_accepts(model, include_root_block, expected):
  config = default.get_config()
  config.model = model
  config.model_options.include_root_block = include_root_block
  built = model_builder.build_model(config, num_classes=10, device_count=1)
  assert model_builder.reachable_output_strides(built) == expected
  for stride in range(1, 40):
    config.model_options.output_stride = stride
    if stride in expected:  # the model traces with it (slim's own check)
      jax.eval_shape(lambda: model_builder.build_model(config, 10, 1).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)), train=False))
    else:
      with pytest.raises(ValueError, match=rf'config.model_options.output_stride={stride} cannot be reached by '
                                           rf'{model}; use one of \[.*\] or None.'):
        model_builder.build_model(config, num_classes=10, device_count=1)


def test_global_pool_false_is_refused_for_training_and_eval():
  config = default.get_config()
  config.model_options.global_pool = False
  with pytest.raises(ValueError, match='global_pool=False gives logits per spatial position'):
    model_builder.build_model(config, num_classes=10, device_count=1)


def test_a_head_one_logit_short_of_the_data_is_refused():
  # 1000 logits for 1001 labels (slim's v1 head on v2's data) is the case that happens.
  config = default.get_config()
  config.num_classes = 9
  with pytest.raises(ValueError, match=r'config\.num_classes=9 but the data has 10 classes, so labels 9\.\.9'):
    model_builder.head_size(config, 10)
  config.num_classes = 10
  assert model_builder.head_size(config, 10) == 10
