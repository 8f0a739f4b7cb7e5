"""Config values out of range: refused before anything is built, in one line naming the field."""

import glob
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, digits
from resnet_flax import config_checks, data, optim, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_MODULES = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(REPO, 'configs', '[a-z]*.py')))


def _run(*args):
  """`python ARGS` (a script or -m module, then its flags) from the repository on CPU, output captured."""
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)


def _with(field, value):
  config = digits.get_config()
  config.update_from_flattened_dict({field: value})
  return config


@pytest.mark.parametrize('name', CONFIG_MODULES)
def test_every_shipped_config_passes(name):
  config_checks.check_config(importlib.import_module(f'configs.{name}').get_config())


def test_the_known_fields_are_default_py_s():
  config = default.get_config()
  assert config_checks._FIELDS == set(config.keys())
  for group, known in config_checks._GROUP_FIELDS.items():
    assert known == set(config[group].keys()), group
  assert config_checks._BN_FIELDS == set(config.bn.keys())
  # The fields that may be None are default.py's placeholders (its None values, data.* and
  # model_options.* aside: those are checked where they are read).
  nones = {name for name, value in _flattened(config.to_dict()) if value is None}
  assert config_checks._MAY_BE_NONE == {name for name in nones if not name.startswith(('data.', 'model_options.'))}


def _flattened(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flattened(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


# A config file that deleted a field, set a group to a value or a field to None had failed deep
# inside: AttributeError tracebacks (40 lines) or "'<=' not supported between 'float' and 'NoneType'".
@pytest.mark.parametrize('change, message', [
    (lambda c: c.__delitem__('keep_checkpoints'), "config.keep_checkpoints is missing: a config file changes the "
                                                  "fields of configs/default.py's get_config() and must keep every "
                                                  'one; put it back (configs/default.py shows its default).'),
    (lambda c: c.__delitem__('bn'), 'config.bn is missing'),
    (lambda c: c.bn.__delitem__('frozen'), 'config.bn.frozen is missing'),
    (lambda c: c.lars.__delitem__('eps'), 'config.lars.eps is missing'),
    (lambda c: setattr(c, 'data', None), 'config.data=None is not allowed: it is a group of fields (a ConfigDict, as '
                                         'in configs/default.py); set its fields instead.'),
    (lambda c: setattr(c.bn, 'decay', None), 'config.bn.decay=None is not allowed: it needs a value '
                                             '(configs/default.py shows its default).'),
    (lambda c: setattr(c, 'batch_size', None), 'config.batch_size=None is not allowed'),
    (lambda c: setattr(c, 'log_every_steps', None), 'config.log_every_steps=None is not allowed'),
    (lambda c: setattr(c.distributed, 'mode', None), 'config.distributed.mode=None is not allowed'),
])
def test_a_deleted_field_a_group_set_to_a_value_or_none_for_a_value_is_one_line(change, message):
  config = digits.get_config()
  config.unlock()
  change(config)
  with pytest.raises(ValueError) as error:
    config_checks.check_config(config)
  assert str(error.value).startswith(message)


# frozen_gamma_beta's stop_gradient is the layer's; the L2 term, the loss's, had moved gamma and beta anyway.
@pytest.mark.parametrize('settings, message', [
    ({'bn.frozen_gamma_beta': True}, 'config.bn_weight_decay=0.001 would decay gamma and beta, which '
                                     'config.bn.frozen_gamma_beta=True keeps fixed; set one of them.'),
    ({'bn.center': False, 'bn.scale': False}, 'config.bn_weight_decay=0.001 does nothing with config.bn.center=False '
                                              'and config.bn.scale=False'),
])
def test_bn_weight_decay_that_would_move_frozen_gamma_and_beta_or_decay_nothing_is_refused(settings, message):
  config = digits.get_config()
  config.update_from_flattened_dict(settings)
  config_checks.check_config(config)  # without bn_weight_decay: fine
  config.bn_weight_decay = 1e-3
  with pytest.raises(ValueError) as error:
    config_checks.check_config(config)
  assert str(error.value).startswith(message)


@pytest.mark.parametrize('group', ['bn', 'data', 'model_options', 'lars', 'adamw', 'distributed'])
def test_every_group_set_to_none_is_named_as_a_group(group):
  config = digits.get_config()
  config.unlock()
  setattr(config, group, None)
  with pytest.raises(ValueError, match=rf'^config\.{group}=None is not allowed: it is a group of fields'):
    config_checks.check_present(config)


def test_none_stays_allowed_where_a_field_means_the_default():
  config = digits.get_config()
  config.update_from_flattened_dict({'num_classes': None, 'bn.ghost_batch_size': None, 'bn.renorm_r_min': None,
                                     'distributed.num_processes': None, 'model_options.output_stride': None})
  config_checks.check_config(config)


def test_helper_fields_and_model_options_get_model_takes_are_not_unknown():
  # ml_collections' way: a field other fields are computed from is read through them.
  config = digits.get_config()
  config.unlock()
  config.steps_per_epoch = 2
  config.num_train_steps = config.get_ref('steps_per_epoch') * 3
  # Any option get_model takes (an unknown one is refused there, in one line).
  config.model_options.unlock()
  config.model_options.depth_multiplier = 0.25
  config_checks.check_config(config)
  assert config.num_train_steps == 6


@pytest.mark.parametrize('group, field, closest', [
    ('lars', 'trust_coeficient', 'trust_coefficient'), ('adamw', 'wieght_decay', 'weight_decay'),
    ('distributed', 'num_process', 'num_processes'),
    # It had reached get_model as "unknown argument(s) ['batch_norm_decya']", naming no config field.
    ('bn', 'decya', 'decay'),
])
def test_an_unknown_field_of_a_group_is_one_line_naming_the_closest(group, field, closest):
  # config.lars.trust_coeficient = ... in a config file had trained with the default, silently.
  config = digits.get_config()
  config[group].unlock()
  config[group][field] = 0.5
  with pytest.raises(ValueError, match=rf'^unknown config field config\.{group}\.{field} \(did you mean '
                                       rf'config\.{group}\.{closest}\?\)'):
    config_checks.check_config(config)


def test_config_bn_may_set_any_field_of_the_layer():
  config = digits.get_config()
  config.bn.unlock()
  config.bn.axis_name = 'batch'  # no field of configs/default.py, but the layer's: the model takes it as given
  config_checks.check_config(config)


@pytest.mark.parametrize('path, problem', [
    ('bn.decay', None), ('data.name', None),
    ('bn.decya', 'unknown config field config.bn.decya (did you mean config.bn.decay?)'),
    ('zzz', 'unknown config field config.zzz'),
    # It had said "did you mean config.seed?" (the sweep run without its --config).
    # The same for train.py and eval.py, which refuse config.sweep even from that file.
    ('sweep.decay', 'config.sweep is a field of configs/bn_sweep.py, read only by python -m resnet_flax.bn_sweep: '
                    'run that with --config=configs/bn_sweep.py (or a variant of it) before the overrides'),
    ('batch_size.x', 'config.batch_size holds a value (64), not fields, so config.batch_size.x names none; set '
                     'config.batch_size itself (--config.batch_size=<value>)'),
    # ml_collections takes no index into a tuple: the whole tuple is set.
    ('lr_boundaries.1', 'config.lr_boundaries holds a value ((0.5, 0.75)), not fields, so config.lr_boundaries.1 '
                        'names none; set config.lr_boundaries itself (--config.lr_boundaries=<value>)'),
])
def test_an_override_naming_no_field_says_why(path, problem):
  config = digits.get_config()
  config.lr_boundaries = (0.5, 0.75)
  assert config_checks.override_problem(config, path) == problem


def _with_new_field(field, value):
  config = digits.get_config()
  setattr(config, field, value)  # as a config file's `config.<field> = value` adds it
  return config


@pytest.mark.parametrize('field, closest', [
    ('lerning_rate', 'learning_rate'), ('num_train_step', 'num_train_steps'), ('swep', 'sweep'), ('zzz', None),
])
def test_an_unknown_field_in_a_config_file_is_one_line_naming_the_closest(field, closest):
  with pytest.raises(ValueError, match=rf'^unknown config field config\.{field}\b') as error:
    config_checks.check_config(_with_new_field(field, 0.01))
  message = str(error.value)
  assert '\n' not in message and message.endswith('(configs/default.py lists every field).')
  assert (f'(did you mean config.{closest}?)' in message) if closest else 'did you mean' not in message


def test_a_misspelt_field_in_a_config_file_stops_train_py_before_anything_is_written(tmp_path):
  # It had trained at the default learning rate, config.json holding both fields.
  config_file = tmp_path / 'typo.py'
  config_file.write_text('from configs import digits\n\n\ndef get_config():\n  config = digits.get_config()\n'
                         '  config.lerning_rate = 0.01\n  return config\n')
  workdir = tmp_path / 'run'
  result = _run('train.py', f'--config={config_file}', f'--workdir={workdir}', '--config.num_train_steps=2')
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      'error: unknown config field config.lerning_rate (did you mean config.learning_rate?): no program reads it, so '
      'the value would be ignored; fix or remove it in the config file (configs/default.py lists every field).']
  assert not workdir.exists()


# train.py read config.distributed before any check: an AttributeError traceback.
def test_a_field_deleted_in_a_config_file_stops_train_py_in_one_line(tmp_path):
  config_file = tmp_path / 'without.py'
  config_file.write_text("from configs import digits\n\n\ndef get_config():\n  config = digits.get_config()\n"
                         "  del config['distributed']\n  return config\n")
  result = _run('train.py', f'--config={config_file}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2 and result.stderr.splitlines() == [
      "error: config.distributed is missing: a config file changes the fields of configs/default.py's get_config() "
      'and must keep every one; put it back (configs/default.py shows its default).'], result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('field, value', [
    ('batch_size', 0), ('batch_size', -4), ('eval_batch_size', -1), ('num_train_steps', -5),
    ('learning_rate', -0.1), ('learning_rate', float('nan')), ('lr_batch_size', -1), ('warmup_steps', -1),
    ('lr_boundaries', (1.5,)), ('lr_boundaries', (0.6, 0.3)), ('lr_boundaries', (0.5, 0.5)),
    ('lr_decay_factor', 0.0), ('lr_end', -1.0),
    ('lr_power', -1.0), ('momentum', 1.5), ('momentum', 1.0), ('weight_decay', -1.0), ('bn_weight_decay', -1e-4),
    ('label_smoothing', 1.5),
    ('lars.weight_decay', -1.0), ('lars.trust_coefficient', -1.0), ('lars.eps', -1.0), ('bn.ghost_batch_size', 0),
    ('num_classes', 0), ('log_every_steps', -1), ('eval_every_steps', -1), ('checkpoint_every_steps', -3),
    ('keep_checkpoints', 0), ('keep_checkpoints', -1), ('bn_recalibration_batches', -1),
    ('bn_report_batch_sizes', (8, 0)), ('bn_report_batch_sizes', (8.5,)), ('bn_report_batch_sizes', ('8',)),
    ('data.num_workers', -1), ('seed', -1), ('seed', 2**32),
])
def test_value_out_of_range_is_one_line_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf'^config\.{field.replace(".", "[.]")}=') as error:
    config_checks.check_config(_with(field, value))
  assert '\n' not in str(error.value) and 'must be' in str(error.value)


@pytest.mark.parametrize('field, value', [
    ('learning_rate', float('inf')), ('weight_decay', float('inf')), ('bn_weight_decay', float('nan')),
    ('momentum', float('-inf')),
    ('label_smoothing', float('nan')), ('lr_decay_factor', float('inf')), ('lr_end', float('inf')),
    ('lr_power', float('inf')), ('lars.weight_decay', float('inf')), ('lars.trust_coefficient', float('inf')),
    ('lars.eps', float('inf')), ('adamw.weight_decay', float('inf')), ('lr_boundaries', (0.3, float('inf'))),
    ('lr_boundaries', (float('nan'),)),
])
def test_inf_and_nan_are_refused_as_not_finite(field, value):
  # inf passed `>= 0` and stopped the run at step 1 as a non-finite loss, blaming the learning rate.
  with pytest.raises(ValueError, match=rf'^config\.{field.replace(".", "[.]")}=.* must be finite and ') as error:
    config_checks.check_config(_with(field, value))
  assert '\n' not in str(error.value)


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
    ('eval_batch_size', 0), ('label_smoothing', 0.0), ('bn_report_batch_sizes', (1, 8)), ('seed', 2**32 - 1),
    ('log_every_steps', 10 ** 400),  # whole numbers are finite: math.isfinite would overflow on it
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
     r'config\.warmup_steps=50; use fractions above 0\.505 or lower config\.warmup_steps to at most 29\.$'),
    (100, 30, (0.3, 0.6), r'steps \(30, 60\) .* after the warm-up, config\.warmup_steps=30'),  # never at the peak
    (3, 0, (0.1,), r'steps \(0,\) .* config\.warmup_steps=0; use fractions above 0\.1667\.$'),  # round(0.3)
    (100, 97, (0.3, 0.6),
     r'steps \(30, 60\) .* use fractions above 0\.975 or lower config\.warmup_steps to at most 29\.$'),
    # A boundary at step 0 stays in any warm-up, and no fraction clears this one: both must move.
    (3, 5, (0.1,), r'steps \(0,\) .* lower config\.warmup_steps to at most 1 and use fractions above 0\.5\.$'),
])
def test_step_boundaries_landing_where_they_cannot_apply_are_refused(total, warmup, boundaries, problem):
  with pytest.raises(ValueError, match=r'^config\.lr_boundaries=.* lands on ' + problem) as error:
    config_checks.check_config(_step_schedule(total, warmup, boundaries))
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('total, warmup, boundaries, fix', [
    (3, 50, (0.3, 0.6), r'lower config\.warmup_steps to 0\.$'),  # fractions are below 1: none is above 16.83
    (100, 100, (0.5,), r'lower config\.warmup_steps to at most 49\.$'),  # it had said 98: step 50 was still in it
    (100, 97, (0.3, 0.6, 0.8), r'lower config\.warmup_steps to at most 29\.$'),  # steps 98, 99: two, not three
    (3, 0, (0.1, 0.4, 0.7), r'drop boundaries to at most 2 or raise config\.num_train_steps\.$'),
])
def test_step_boundaries_no_fraction_can_fix_name_only_a_possible_fix(total, warmup, boundaries, fix):
  after_warmup = r'^config\.lr_boundaries=.* each must be after the warm-up, config\.warmup_steps=\d+; '
  with pytest.raises(ValueError, match=after_warmup + fix) as error:
    config_checks.check_config(_step_schedule(total, warmup, boundaries))
  assert '\n' not in str(error.value) and 'fractions' not in str(error.value)


@pytest.mark.parametrize('total, warmup, boundaries, schedule', [
    (600, 50, (0.3, 0.6, 0.8), 'step'),  # digits: steps 180, 360, 480
    (10, 0, (0.31, 0.35), 'step'),  # steps 3 and 4
    (100, 29, (0.3, 0.99), 'step'),  # the step right after warm-up, and the last step
    (100, 0, (), 'step'),
    (0, 50, (0.3, 0.6, 0.8), 'step'),  # no step runs
    (150, 50, (0.3, 0.6, 0.8), 'cosine'),  # bn_sweep's length: the boundaries are not read
    (3, 50, (0.3, 0.6), 'cosine'),  # a warm-up longer than the run stops part-way up (default.py)
])
def test_step_boundaries_on_distinct_steps_after_warmup_are_allowed(total, warmup, boundaries, schedule):
  config_checks.check_config(_step_schedule(total, warmup, boundaries, schedule))


@pytest.mark.parametrize('option, gives', [
    ('spatial_squeeze', r'logits of shape \(batch, 1, 1, classes\)'), ('global_pool', 'logits per spatial position'),
])
def test_model_options_without_one_logit_vector_per_image_are_refused(option, gives):
  with pytest.raises(ValueError, match=rf'^config\.model_options\.{option}=False gives {gives}; training and '
                                       r'evaluation need logits of shape \(batch, classes\): keep it True') as error:
    config_checks.check_config(_with(f'model_options.{option}', False))
  assert '\n' not in str(error.value)
  for allowed in (True, None):  # None: the model's default, True
    config_checks.check_config(_with(f'model_options.{option}', allowed))


def test_spatial_squeeze_false_stops_training_before_anything_is_written(tmp_path):
  # It had crashed at the first step with a ShardingTypeError (logits (batch, 1, 1, classes) against
  # one-hot labels), leaving .lock, config.json and metrics.jsonl behind.
  with pytest.raises(ValueError, match=r'^config\.model_options\.spatial_squeeze=False '):
    train_lib.train_and_evaluate(_with('model_options.spatial_squeeze', False), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_training_refuses_before_building_anything(tmp_path):
  with pytest.raises(ValueError, match=r'config\.keep_checkpoints=0'):
    train_lib.train_and_evaluate(_with('keep_checkpoints', 0), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('overrides, field, current', [
    ({}, 'lars.eps', "config.optimizer='sgd'"),
    ({'optimizer': 'adamw'}, 'momentum', "config.optimizer='adamw'"),
    ({'optimizer': 'sgd'}, 'adamw.weight_decay', "config.optimizer='sgd'"),
    ({}, 'lr_end', "config.lr_schedule='cosine'"),
    ({'lr_schedule': 'constant'}, 'lr_boundaries', "config.lr_schedule='constant'"),
    ({}, 'data.dir', "config.data.name='digits'"),
    ({'data.name': 'synthetic'}, 'data.augment', "config.data.name='synthetic'"),
    ({}, 'data.color_distortion', "config.data.name='digits' and config.data.preprocessing='none'"),
])
def test_an_override_the_run_never_reads_is_one_line_naming_the_setting(overrides, field, current):
  config = digits.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=rf'^--config\.{field.replace(".", "[.]")} does nothing with ') as error:
    config_checks.check_overrides_read(config, [*overrides, field])
  assert current in str(error.value) and f'drop --config.{field}.' in str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('overrides', [
    {'optimizer': 'lars', 'lars.eps': 1e-9, 'momentum': 0.8}, {'optimizer': 'adamw', 'adamw.weight_decay': 0.05},
    {'lr_schedule': 'polynomial', 'lr_end': 0.0}, {'lr_schedule': 'step', 'lr_decay_factor': 0.5},
    {'data.name': 'cifar10', 'data.dir': '/x'}, {'data.name': 'synthetic', 'data.channels': 1},
    {'data.name': 'imagefolder', 'data.preprocessing': 'inception', 'data.color_distortion': True},
    {'bn.decay': 0.9, 'batch_size': 8, 'learning_rate': 0.01},  # read in every setting
])
def test_overrides_the_run_reads_are_allowed(overrides):
  config = digits.get_config()
  config.update_from_flattened_dict(overrides)
  config_checks.check_overrides_read(config, list(overrides))


def _sweep_config():
  return importlib.import_module('configs.bn_sweep').get_config()


@pytest.mark.parametrize('program, field, reader', [
    (config_checks.TRAIN, 'sweep.decay', config_checks.BN_SWEEP),
    (config_checks.TRAIN, 'bn_recalibration_batches', config_checks.EVAL),
    (config_checks.TRAIN, 'bn_report_batch_sizes', config_checks.EVAL),
    (config_checks.EVAL, 'sweep.batch_size', config_checks.BN_SWEEP),
    (config_checks.BN_SWEEP, 'bn_recalibration_batches', config_checks.EVAL),  # its own is sweep.recalibration_batches
])
def test_an_override_of_a_field_only_another_program_reads_names_that_program(program, field, reader):
  with pytest.raises(ValueError) as error:
    config_checks.check_overrides_read(_sweep_config(), [field], program)
  assert str(error.value) == (f'--config.{field} does nothing in {program}: it is read only by {reader}; run {reader} '
                              f'with it, or drop --config.{field}.')


@pytest.mark.parametrize('program, field', [
    (config_checks.BN_SWEEP, 'sweep.decay'), (config_checks.EVAL, 'bn_recalibration_batches'),
    (config_checks.EVAL, 'bn_report_batch_sizes'), (config_checks.TRAIN, 'batch_size'),
])
def test_an_override_the_program_reads_is_allowed(program, field):
  config_checks.check_overrides_read(_sweep_config(), [field], program)


def test_eval_leaves_fields_only_training_reads_to_a_warning_whatever_the_optimizer():
  # `--config.lars.eps` had been refused in eval.py with "set config.optimizer='lars' as well",
  # which changed nothing either; `--config.learning_rate` had passed without a word.
  overridden = ['learning_rate', 'lars.eps', 'batch_size', 'bn.decay', 'seed']
  config_checks.check_overrides_read(_sweep_config(), overridden, config_checks.EVAL)
  assert config_checks.training_only(overridden) == ['learning_rate', 'lars.eps']
  with pytest.raises(ValueError, match="--config.lars.eps does nothing with config.optimizer='sgd'"):
    config_checks.check_overrides_read(_sweep_config(), overridden, config_checks.TRAIN)


def test_every_training_only_field_is_a_config_field():
  flat = set(_flat_fields(default.get_config()))
  for field in config_checks.TRAINING_ONLY:
    assert field in flat or any(name.startswith(field + '.') for name in flat), field
  assert set(config_checks.RECALIBRATION_ONLY) <= flat


def test_statistics_groups_are_read_in_eval_only_to_recalibrate():
  overridden = ['bn.ghost_batch_size', 'bn.cross_device', 'bn.epsilon', 'batch_size']
  config = default.get_config()
  assert config_checks.recalibration_only(config, overridden) == ['bn.ghost_batch_size', 'bn.cross_device']
  config.bn_recalibration_batches = 2  # precise BN groups its statistics as training did
  assert config_checks.recalibration_only(config, overridden) == []


def test_eval_py_warns_of_overrides_it_does_not_read_by_name(tmp_path):
  # bn.ghost_batch_size had passed without a word, where evaluation groups no statistics.
  workdir = str(tmp_path / 'run')
  result = _run('eval.py', f'--workdir={workdir}', '--config.learning_rate=0.5', '--config.lars.eps=0.1',
                '--config.bn.ghost_batch_size=4')
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      'warning: eval.py does not read --config.learning_rate, --config.lars.eps: only training does, so they change '
      'nothing here.',
      'warning: eval.py does not read --config.bn.ghost_batch_size without a recalibration: evaluation uses the '
      'moving statistics, and only config.bn_recalibration_batches > 0 groups batch statistics as training did.',
      f'error: --workdir {workdir} does not exist; pass the workdir train.py wrote to.']


def test_a_library_caller_is_no_program():
  config_checks.check_overrides_read(_sweep_config(), ['sweep.decay', 'bn_recalibration_batches'])


@pytest.mark.parametrize('command, expected', [
    # It had trained one plain run, without a word about the sweep.
    (['train.py', '--config=configs/bn_sweep.py', '--workdir=WORKDIR', '--config.num_train_steps=2',
      '--config.sweep.decay=(0.9,0.99)'],
     'error: --config.sweep.decay does nothing in train.py: it is read only by python -m resnet_flax.bn_sweep; '),
    (['train.py', '--workdir=WORKDIR', '--config.num_train_steps=2', '--config.bn_recalibration_batches=4'],
     'error: --config.bn_recalibration_batches does nothing in train.py: it is read only by eval.py; '),  # ignored
    (['-m', 'resnet_flax.bn_sweep', '--config=configs/bn_sweep.py', '--config.bn_report_batch_sizes=(8,)'],
     'error: --config.bn_report_batch_sizes does nothing in python -m resnet_flax.bn_sweep: it is read only by '
     'eval.py'),
    # Past the flags, each stops at its own first check: no --workdir for the sweep, no such workdir for eval.py.
    (['-m', 'resnet_flax.bn_sweep', '--config=configs/bn_sweep.py', '--config.sweep.decay=(0.9,0.99)'],
     'error: pass --workdir=DIR'),
    (['eval.py', '--workdir=WORKDIR', '--config.bn_recalibration_batches=4'],
     'error: --workdir WORKDIR does not exist'),
])
def test_each_program_knows_itself_from_the_command_line(tmp_path, command, expected):
  workdir = str(tmp_path / 'run')
  result = _run(*[arg.replace('WORKDIR', workdir) for arg in command])
  assert result.returncode == 2, result.stderr
  assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected.replace('WORKDIR', workdir))
  assert not os.path.exists(workdir)


def test_every_field_only_some_settings_read_is_a_config_field():
  flat = set(_flat_fields(digits.get_config()))
  for fields, deciding in config_checks._READ_ONLY_WITH:
    for field in (*fields, *deciding):
      assert field in flat or any(name.startswith(field + '.') for name in flat), field


def _flat_fields(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _flat_fields(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def _one_update(config):
  params = {'conv': {'weights': jnp.full((2, 2), 3.0)}, 'BatchNorm': {'gamma': jnp.ones(2)}}
  grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 1.0, params)
  tx = optim.build_optimizer(config)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
  return updates


@pytest.mark.parametrize('optimizer, field, value', [
    ('sgd', 'lars.trust_coefficient', 0.5), ('sgd', 'adamw.weight_decay', 0.5), ('adamw', 'momentum', 0.1),
    ('adamw', 'nesterov', False), ('lars', 'adamw.weight_decay', 0.5),
])
def test_the_optimizer_fields_refused_as_unread_change_nothing(optimizer, field, value):
  # The rule table's claim, checked on the optimizer itself: the update is the same.
  config = _with('optimizer', optimizer)
  config.warmup_steps = 0
  changed = _with(field, value)
  changed.update(optimizer=optimizer, warmup_steps=0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, _one_update(config), _one_update(changed))
  with pytest.raises(ValueError, match='does nothing'):
    config_checks.check_overrides_read(changed, [field])


@pytest.mark.parametrize('schedule, field, value', [
    ('cosine', 'lr_end', 0.05), ('cosine', 'lr_power', 1.0), ('constant', 'lr_decay_factor', 0.5),
    ('polynomial', 'lr_boundaries', (0.5,)),
])
def test_the_schedule_fields_refused_as_unread_change_nothing(schedule, field, value):
  config = _with('lr_schedule', schedule)
  changed = _with(field, value)
  changed.lr_schedule = schedule
  steps = np.arange(config.num_train_steps)
  np.testing.assert_array_equal(optim.learning_rate_schedule(config)(steps),
                                optim.learning_rate_schedule(changed)(steps))
  with pytest.raises(ValueError, match='does nothing'):
    config_checks.check_overrides_read(changed, [field])


@pytest.mark.parametrize('name, field, value', [
    ('digits', 'data.dir', '/nowhere'), ('digits', 'data.num_examples', 7), ('synthetic', 'data.augment', True),
    ('synthetic', 'data.digits_resize', 'upsample'), ('digits', 'data.on_bad_image', 'skip'),
])
def test_the_data_fields_refused_as_unread_change_nothing(name, field, value):
  config = _with('data.name', name)
  changed = _with(field, value)
  changed.data.name = name
  first = [next(iter(data.build(c.data, 'train', batch_size=8, seed=0).train_batches(0))) for c in (config, changed)]
  jax.tree_util.tree_map(np.testing.assert_array_equal, *first)
  with pytest.raises(ValueError, match='does nothing'):
    config_checks.check_overrides_read(changed, [field])
