"""Config -> model: how config.bn.cross_device and ghost batches become statistics groups."""

import pytest

from configs import default
from resnet_flax import model_builder


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
