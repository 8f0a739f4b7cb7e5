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
    ('lr_boundaries', (1.5,)), ('lr_boundaries', (0.6, 0.3)), ('lr_boundaries', (0.5, 0.5)),
    ('lr_decay_factor', 0.0), ('lr_end', -1.0),
    ('lr_power', -1.0), ('momentum', 1.5), ('momentum', 1.0), ('weight_decay', -1.0), ('label_smoothing', 1.5),
    ('lars.weight_decay', -1.0), ('lars.trust_coefficient', -1.0), ('lars.eps', -1.0), ('bn.ghost_batch_size', 0),
    ('num_classes', 0), ('log_every_steps', -1), ('eval_every_steps', -1), ('checkpoint_every_steps', -3),
    ('keep_checkpoints', 0), ('keep_checkpoints', -1), ('bn_recalibration_batches', -1),
    ('bn_report_batch_sizes', (8, 0)), ('bn_report_batch_sizes', (8.5,)), ('bn_report_batch_sizes', ('8',)),
    ('data.num_workers', -1),
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


def test_renorm_options_without_renorm_are_refused_in_the_config():
  with pytest.raises(ValueError, match=r'^config\.bn\.renorm_r_max=3\.0 would do nothing without renorm=True'):
    config_checks.check_config(_with('bn.renorm_r_max', 3.0))


@pytest.mark.parametrize('field, value', [
    ('bn.decay', 0.0), ('bn.decay', 1.0), ('num_train_steps', 0), ('keep_checkpoints', 1), ('momentum', 0.0),
    ('eval_batch_size', 0), ('label_smoothing', 0.0), ('bn_report_batch_sizes', (1, 8)),
])
def test_boundary_values_that_mean_something_are_allowed(field, value):
  config_checks.check_config(_with(field, value))


def _step_schedule(num_train_steps, warmup_steps, lr_boundaries, lr_schedule='step'):
  config = digits.get_config()
  config.update(lr_schedule=lr_schedule, num_train_steps=num_train_steps, warmup_steps=warmup_steps,
                lr_boundaries=lr_boundaries)
  return config


@pytest.mark.parametrize('total, warmup, boundaries, problem', [
    (10, 0, (0.31, 0.34), r'steps \(3, 3\) of num_train_steps=10: they must be strictly increasing steps; space'),
    (10, 0, (0.3, 0.96), r'steps \(3, 10\) of num_train_steps=10: each must be below 10 .* below 0\.95 or drop it\.$'),
    (100, 50, (0.3, 0.6, 0.8), r'steps \(30, 60, 80\) of num_train_steps=100: each must be after the warm-up, '
     r'config\.warmup_steps=50; use fractions above 0\.505 or lower config\.warmup_steps\.$'),
    (100, 30, (0.3, 0.6), r'steps \(30, 60\) .* after the warm-up, config\.warmup_steps=30'),  # never at the peak
    (3, 0, (0.1,), r'steps \(0,\) .* config\.warmup_steps=0; use fractions above 0\.1667\.$'),  # round(0.3)
])
def test_step_boundaries_landing_where_they_cannot_apply_are_refused(total, warmup, boundaries, problem):
  with pytest.raises(ValueError, match=r'^config\.lr_boundaries=.* lands on ' + problem) as error:
    config_checks.check_config(_step_schedule(total, warmup, boundaries))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('total, warmup, boundaries, schedule', [
    (600, 50, (0.3, 0.6, 0.8), 'step'),  # digits: steps 180, 360, 480
    (10, 0, (0.31, 0.35), 'step'),  # steps 3 and 4
    (100, 29, (0.3, 0.99), 'step'),  # the step right after warm-up, and the last step
    (100, 0, (), 'step'),
    (0, 50, (0.3, 0.6, 0.8), 'step'),  # no step runs
    (150, 50, (0.3, 0.6, 0.8), 'cosine'),  # bn_sweep's length: the boundaries are not read
])
def test_step_boundaries_on_distinct_steps_after_warmup_are_allowed(total, warmup, boundaries, schedule):
  config_checks.check_config(_step_schedule(total, warmup, boundaries, schedule))


def test_training_refuses_before_building_anything(tmp_path):
  with pytest.raises(ValueError, match=r'config\.keep_checkpoints=0'):
    train_lib.train_and_evaluate(_with('keep_checkpoints', 0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
