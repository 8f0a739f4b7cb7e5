"""Config values out of range: refused before anything is built, in one line naming the field."""

import glob
import importlib
import os

import pytest

from configs import digits
from resnet_flax import config_checks, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_MODULES = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, 'configs', '[a-z]*.py')))


def _with(field, value):
  config = digits.get_config()
  config.update_from_flattened_dict({field: value})
  return config


@pytest.mark.parametrize('name', CONFIG_MODULES)
def test_every_shipped_config_passes(name):
  config_checks.check_config(importlib.import_module(f'configs.{name}').get_config())


@pytest.mark.parametrize('field, value', [
    ('batch_size', 0), ('batch_size', -4), ('eval_batch_size', -1), ('num_train_steps', -5),
    ('learning_rate', -0.1), ('learning_rate', float('nan')), ('lr_batch_size', -1), ('warmup_steps', -1),
    ('lr_boundaries', (1.5,)), ('lr_boundaries', (0.6, 0.3)), ('lr_decay_factor', 0.0), ('lr_end', -1.0),
    ('lr_power', -1.0), ('momentum', 1.5), ('momentum', 1.0), ('weight_decay', -1.0), ('label_smoothing', 1.5),
    ('lars.weight_decay', -1.0), ('lars.trust_coefficient', -1.0), ('lars.eps', -1.0), ('bn.ghost_batch_size', 0),
    ('num_classes', 0), ('log_every_steps', -1), ('eval_every_steps', -1), ('checkpoint_every_steps', -3),
    ('keep_checkpoints', 0), ('keep_checkpoints', -1), ('bn_recalibration_batches', -1),
    ('bn_report_batch_sizes', (8, 0)), ('data.num_workers', -1),
])
def test_value_out_of_range_is_one_line_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf'^config\.{field.replace(".", "[.]")}=') as error:
    config_checks.check_config(_with(field, value))
  assert '\n' not in str(error.value) and 'must be' in str(error.value)


@pytest.mark.parametrize('field, value', [
    ('bn.decay', 1.5), ('bn.decay', float('nan')), ('bn.epsilon', 0.0), ('bn.renorm_decay', 2.0),
    ('bn.renorm_clipping_ramp_steps', -5),
])
def test_batch_norm_options_are_checked_as_the_layer_checks_them(field, value):
  with pytest.raises(ValueError, match=rf'^config\.{field.replace(".", "[.]")}=.* must be'):
    config_checks.check_config(_with(field, value))


@pytest.mark.parametrize('field, value', [
    ('bn.decay', 0.0), ('bn.decay', 1.0), ('num_train_steps', 0), ('keep_checkpoints', 1), ('momentum', 0.0),
    ('eval_batch_size', 0), ('label_smoothing', 0.0), ('bn_report_batch_sizes', (1, 8)),
])
def test_boundary_values_that_mean_something_are_allowed(field, value):
  config_checks.check_config(_with(field, value))


def test_training_refuses_before_building_anything(tmp_path):
  with pytest.raises(ValueError, match=r'config\.keep_checkpoints=0'):
    train_lib.train_and_evaluate(_with('keep_checkpoints', 0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
