"""Checks of a config before anything is built: one-line errors naming the field.

A field no program reads (a misspelling in a config file) is refused, and so is a command-line
override of one the running program, or its optimizer, schedule or data set, never reads.
ml_collections checks types; these check what the values mean. BatchNorm's options are
checked by `layers.batch_norm.check_options` (the layer runs it too), the steps the 'step'
schedule's boundaries land on by `optim.check_lr_boundaries` (the schedule runs it too) and
block_sizes by the model registry, where library users meet them as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections
from ml_collections import config_dict

from resnet_flax import data, distributed, metrics_writer, model_builder, optim
from resnet_flax.layers import batch_norm

# Every top-level field train.py and eval.py read: configs/default.py's (a test keeps the two
# equal). Assigning to a config in a file adds any name, so a misspelt one would be ignored.
_FIELDS = frozenset({
    'model', 'model_options', 'num_classes', 'init_checkpoint', 'model_ema_decay', 'dtype', 'bn', 'data',
    'eval_split', 'bn_recalibration_batches', 'bn_report_batch_sizes', 'batch_size', 'eval_batch_size',
    'num_train_steps', 'optimizer', 'learning_rate', 'lr_batch_size', 'lr_schedule', 'warmup_steps', 'lr_boundaries',
    'lr_decay_factor', 'lr_end', 'lr_power', 'momentum', 'nesterov', 'weight_decay', 'label_smoothing',
    'skip_nonfinite_steps', 'max_skipped_in_a_row', 'bn_weight_decay', 'lars', 'adamw', 'shard_optimizer_state',
    'distributed', 'seed',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'async_checkpointing',
})
# The fields of the groups no other check lists (data.* and model_options.*, which a config file may
# extend with any option get_model takes, are refused where they are read; bn.* by `_check_fields`).
_GROUP_FIELDS = {
    'lars': frozenset({'weight_decay', 'trust_coefficient', 'eps'}),
    'adamw': frozenset({'weight_decay'}),
    'distributed': frozenset({'mode', 'coordinator_address', 'num_processes', 'process_id',
                              'cluster_detection_method', 'initialization_timeout_s'}),
}
# configs/default.py's config.bn fields (a test keeps the two equal): each is read by name.
_BN_FIELDS = frozenset({
    'center', 'cross_device', 'decay', 'epsilon', 'fold_in_eval', 'frozen', 'frozen_gamma_beta', 'fused',
    'ghost_batch_size', 'renorm', 'renorm_clipping_ramp_steps', 'renorm_clipping_start_step', 'renorm_d_max',
    'renorm_decay', 'renorm_r_max', 'renorm_r_min', 'scale', 'zero_debias_moving_mean', 'zero_debias_moving_variance',
    'zero_init_last_gamma',
})
# Groups of fields; data.* and model_options.* are checked where they are read.
_GROUPS = ('bn', 'data', 'model_options', 'lars', 'adamw', 'distributed')
# The fields of _FIELDS, _GROUP_FIELDS and _BN_FIELDS that may be None (configs/default.py's
# placeholders: "None: the data set's", "None: unclipped", ...); every other one needs a value.
_MAY_BE_NONE = frozenset({
    'num_classes', 'bn.ghost_batch_size', 'bn.renorm_r_min', 'bn.renorm_r_max', 'bn.renorm_d_max',
    'distributed.cluster_detection_method', 'distributed.coordinator_address', 'distributed.num_processes',
    'distributed.process_id',
})
# The programs, as their users start them.
TRAIN, EVAL, BN_SWEEP = 'train.py', 'eval.py', 'python -m resnet_flax.bn_sweep'
# Fields only one program reads -> that program. A config file may set them (train.py trains
# configs/bn_sweep.py's base run); a command-line override in another program is refused.
_READ_ONLY_BY: tuple[tuple[tuple[str, ...], str], ...] = (
    (('sweep',), BN_SWEEP),
    (('bn_recalibration_batches', 'bn_report_batch_sizes'), EVAL),
)
# Fields (and groups) only training reads, train.py's and the sweep's: eval.py takes a checkpoint's
# weights as they are. Its command line may repeat a training one, so they are warned of there, not refused.
TRAINING_ONLY = ('num_train_steps', 'optimizer', 'learning_rate', 'lr_batch_size', 'lr_schedule', 'warmup_steps',
                 'lr_boundaries', 'lr_decay_factor', 'lr_end', 'lr_power', 'momentum', 'nesterov', 'weight_decay',
                 'bn_weight_decay', 'label_smoothing', 'skip_nonfinite_steps', 'max_skipped_in_a_row', 'lars', 'adamw',
                 'shard_optimizer_state', 'init_checkpoint', 'log_every_steps', 'eval_every_steps',
                 'checkpoint_every_steps', 'keep_checkpoints', 'async_checkpointing')
# Fields eval.py reads only to recalibrate BatchNorm (precise BN groups statistics as training
# did); evaluation itself uses the moving statistics, in no groups.
RECALIBRATION_ONLY = ('bn.ghost_batch_size', 'bn.cross_device')
# Top-level fields only another program reads, set in its own configs (configs/bn_sweep.py's sweep).
_OTHER_PROGRAMS_FIELDS = frozenset(field for fields, _ in _READ_ONLY_BY for field in fields) - _FIELDS
# The config file that has each of them: an override of one needs that file's --config.
_CONFIG_FILE_WITH = {'sweep': 'configs/bn_sweep.py'}

# (field, allowed, what it must be). Every number in a value must also be finite (`_finite`):
# `v >= 0` holds for inf, which then surfaces only as a non-finite loss at step 1.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ('batch_size', lambda v: v >= 1, 'a positive number of examples'),
    ('eval_batch_size', lambda v: v >= 0, '>= 0 (0: batch_size)'),
    ('num_train_steps', lambda v: v >= 0, '>= 0'),
    ('learning_rate', lambda v: v >= 0, '>= 0'),
    ('lr_batch_size', lambda v: v >= 0, '>= 0 (0: no scaling)'),
    ('warmup_steps', lambda v: v >= 0, '>= 0'),
    # Strictly: two equal fractions land on one step, where optax decays once, not twice.
    ('lr_boundaries', lambda v: all(0 < b < 1 for b in v) and all(a < b for a, b in zip(v, v[1:])),
     'strictly increasing fractions of num_train_steps, each in (0, 1)'),
    ('lr_decay_factor', lambda v: v > 0, '> 0'),
    ('lr_end', lambda v: v >= 0, '>= 0'),
    ('lr_power', lambda v: v > 0, '> 0'),
    ('momentum', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('weight_decay', lambda v: v >= 0, '>= 0'),
    ('bn_weight_decay', lambda v: v >= 0, '>= 0'),
    ('model_ema_decay', lambda v: 0 <= v < 1, 'in [0, 1) (0: no averages)'),
    ('label_smoothing', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('lars.weight_decay', lambda v: v >= 0, '>= 0'),
    ('adamw.weight_decay', lambda v: v >= 0, '>= 0'),
    ('lars.trust_coefficient', lambda v: v > 0, '> 0'),
    ('lars.eps', lambda v: v >= 0, '>= 0'),
    ('bn.ghost_batch_size', lambda v: v >= 1, 'a positive number of examples, or None for the whole batch'),
    ('num_classes', lambda v: v >= 1, '>= 1, or None for the data set\'s'),
    ('log_every_steps', lambda v: v >= 0, '>= 0 (0: only at the end)'),
    ('eval_every_steps', lambda v: v >= 0, '>= 0 (0: only at the end)'),
    ('checkpoint_every_steps', lambda v: v >= 0, '>= 0 (0: only at the end)'),
    ('keep_checkpoints', lambda v: v >= 1, '>= 1 (the newest is what a rerun resumes from)'),
    ('max_skipped_in_a_row', lambda v: v >= 1, '>= 1 (steps in a row skipped as non-finite before stopping)'),
    ('bn_recalibration_batches', lambda v: v >= 0, '>= 0 (0: no recalibration)'),
    # 8.5 had been cut to 8 silently.
    ('bn_report_batch_sizes', lambda v: all(isinstance(size, int) and size >= 1 for size in v),
     'positive whole batch sizes, e.g. (8, 32)'),
    ('data.num_workers', lambda v: v >= 0, '>= 0 (0: one per core)'),
    ('seed', lambda v: 0 <= v < 2**32, 'an integer in [0, 2**32) (numpy seeds the data order with 32-bit words)'),
)


# Fields only some settings read: (fields, {deciding setting: the values that read them}).
# A config file may set them all (one base serves every optimizer and data set); a
# command-line override of one the run ignores is a mistake, refused by `check_overrides_read`.
_READ_ONLY_WITH: tuple[tuple[tuple[str, ...], dict[str, tuple[str, ...]]], ...] = (
    (('lars',), {'optimizer': ('lars',)}),
    (('adamw',), {'optimizer': ('adamw',)}),
    (('momentum', 'nesterov'), {'optimizer': ('sgd', 'lars')}),
    (('lr_boundaries', 'lr_decay_factor'), {'lr_schedule': ('step',)}),
    (('lr_end', 'lr_power'), {'lr_schedule': ('polynomial',)}),
    # Which data source reads which field is said where the sources are built.
    *((tuple(f'data.{field}' for field in fields), {f'data.{key}': values for key, values in readers.items()})
      for fields, readers in data.READ_ONLY_WITH),
)


def _lookup(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value at dotted `field`, or None where the config has no such field."""
  node: Any = config
  for part in field.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return None
    node = node[part]
  return node


def _finite(value: Any) -> bool:
  """False for inf or NaN, alone or in a tuple or list; True for anything that is not a number."""
  if isinstance(value, (tuple, list)):
    return all(_finite(item) for item in value)
  # Whole numbers are finite, and math.isfinite overflows on those past float's range.
  return not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral) or math.isfinite(value)


def _allowed(allowed: Callable[[Any], bool], value: Any) -> bool:
  try:
    return bool(allowed(value))
  except TypeError:  # e.g. a tuple where a number belongs: ml_collections let a placeholder through
    return False


def override_problem(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
  """Why `--config.<path>=...` names no field of `config` (an unknown one, with the closest, or a
  field below one that holds a value, not fields), or None where it names one."""
  node, walked = config, []
  for key in path.split('.'):
    where = ''.join(f'{name}.' for name in walked)
    if isinstance(node, ml_collections.ConfigDict):
      if key not in node:
        if not walked and key in _CONFIG_FILE_WITH:  # "did you mean config.seed?" had pointed away from the fix
          reader = next(program for fields, program in _READ_ONLY_BY if key in fields)
          return (f'config.{key} is a field of {_CONFIG_FILE_WITH[key]}, read only by {reader}: run that with '
                  f'--config={_CONFIG_FILE_WITH[key]} (or a variant of it) before the overrides')
        close = difflib.get_close_matches(key, list(node.keys()), n=1)
        closest = f' (did you mean config.{where}{close[0]}?)' if close else ''
        return f'unknown config field config.{where}{key}{closest}'
      node = node[key]
    else:
      return (f'config.{where[:-1]} holds a value ({node!r}), not fields, so config.{path} names none; set '
              f'config.{where[:-1]} itself (--config.{where[:-1]}=<value>)')
    walked.append(key)
  return None


def _unknown_fields(group: ml_collections.ConfigDict, known: frozenset, prefix: str) -> list[str]:
  """'config.<prefix><field>' for each field of `group` not in `known`, with the known one closest to it.

  A field made a reference (`config.get_ref('steps_per_epoch')`, a placeholder) is a helper
  other fields are computed from, ml_collections' way: it is read through them.
  """
  named = []
  referenced = {name for name, value in group.items(preserve_field_references=True)
                if isinstance(value, config_dict.FieldReference)}
  for field in sorted(set(group.keys()) - known - referenced):
    close = difflib.get_close_matches(field, known, n=1)
    named.append(f'config.{prefix}{field}' + (f' (did you mean config.{prefix}{close[0]}?)' if close else ''))
  return named


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """Refuses fields no program reads (top-level ones, and those of `_GROUP_FIELDS`' groups),
  each with the known field closest to it."""
  named = _unknown_fields(config, _FIELDS | _OTHER_PROGRAMS_FIELDS, '')
  # A config file may give config.bn any other field of the layer (the model takes it as batch_norm_<field>).
  layer_fields = frozenset(field.name for field in dataclasses.fields(batch_norm.BatchNorm)) - {'parent', 'name'}
  for group, known in (*_GROUP_FIELDS.items(), ('bn', _BN_FIELDS | layer_fields)):
    if isinstance(config.get(group), ml_collections.ConfigDict):
      named += _unknown_fields(config[group], known, f'{group}.')
  if not named:
    return
  several = len(named) > 1
  raise ValueError(f'unknown config field{"s" * several} {", ".join(named)}: no program reads '
                   f'{"them" if several else "it"}, so the value would be ignored; fix or remove '
                   f'{"them" if several else "it"} in the config file (configs/default.py lists every field).')


def check_present(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for a field a config file deleted, a group that is not a
  group, or None where a field needs a value: each had been an AttributeError or a TypeError
  from deep inside. The programs run it on the parsed config, before anything reads it."""
  wanted = [*sorted(_FIELDS), *(f'{group}.{field}' for group, known in sorted(_GROUP_FIELDS.items())
                                for field in sorted(known)), *(f'bn.{field}' for field in sorted(_BN_FIELDS))]
  for name in wanted:
    group, _, field = name.rpartition('.')
    node = config[group] if group else config
    if field not in node:
      raise ValueError(f"config.{name} is missing: a config file changes the fields of configs/default.py's "
                       'get_config() and must keep every one; put it back (configs/default.py shows its default).')
    value = node[field]
    if name in _GROUPS and not isinstance(value, ml_collections.ConfigDict):
      raise ValueError(f'config.{name}={value!r} is not allowed: it is a group of fields (a ConfigDict, as in '
                       'configs/default.py); set its fields instead.')
    if value is None and name not in _MAY_BE_NONE:
      raise ValueError(f'config.{name}=None is not allowed: it needs a value (configs/default.py shows its '
                       'default).')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError for a field no program reads, or one missing (a config holds
  every field of configs/default.py), or the first field of `config` out of its range, or at
  odds with others."""
  _check_fields(config)
  check_present(config)
  for field, allowed, expected in _RULES:
    value = _lookup(config, field)
    if value is None:  # a field that may be None (check_present refused the others)
      continue
    if not _finite(value):
      raise ValueError(f'config.{field}={value!r} is not allowed: it must be finite and {expected}.')
    if not _allowed(allowed, value):
      raise ValueError(f'config.{field}={value!r} is not allowed: it must be {expected}.')
  optim.check_lr_boundaries(config)
  batch_norm.check_options('config.bn.', config.bn)
  _check_bn_weight_decay(config)
  model_builder.check_classification_options(config.model_options)  # the model's shape, before a step is traced


# Fields each process may set for itself: how processes meet (each has its own id), where its
# copies of the data (their contents are compared: `device_input.agreed_dataset`) and of the
# checkpoint to start from are mounted, and how it decodes images (the same batches either way).
_PER_PROCESS_FIELDS = ('distributed.', 'data.dir', 'init_checkpoint', 'data.num_workers', 'data.worker_processes')


def check_same_on_every_process(config: ml_collections.ConfigDict) -> None:
  """Raises the same one-line ValueError on every process of a multi-host run whose processes
  were given other configs (but for `_PER_PROCESS_FIELDS`) or other device counts, naming the
  first field that differs. A collective: every process calls it."""
  fields = {name: value for name, value in metrics_writer.as_recorded(config.to_dict()).items()
            if not name.startswith(_PER_PROCESS_FIELDS)}
  # Each process feeds batch_size / process_count examples to its own devices.
  fields['jax.local_device_count()'] = jax.local_device_count()
  distributed.check_same_fields(fields, 'config')


def _check_bn_weight_decay(config: ml_collections.ConfigDict) -> None:
  """Refuses a BatchNorm L2 term that would decay gamma and beta that are meant to stay, or that
  has none to decay."""
  if not config.bn_weight_decay:
    return
  if config.bn.frozen_gamma_beta:  # the term is the loss's, outside the layer's stop_gradient
    raise ValueError(f'config.bn_weight_decay={config.bn_weight_decay} would decay gamma and beta, which '
                     'config.bn.frozen_gamma_beta=True keeps fixed; set one of them.')
  if not (config.bn.center or config.bn.scale):
    raise ValueError(f'config.bn_weight_decay={config.bn_weight_decay} does nothing with config.bn.center=False and '
                     'config.bn.scale=False (no beta, no gamma); set one of them True, or drop it.')


def _within(field: str, group: str) -> bool:
  return field == group or field.startswith(group + '.')


def _one_of(values: tuple[str, ...]) -> str:
  """('a',) -> "'a'"; ('a', 'b', 'c') -> "'a', 'b' or 'c'"."""
  quoted = [repr(value) for value in values]
  return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _check_program_reads(field: str, program: str) -> None:
  for groups, reader in _READ_ONLY_BY:
    if reader != program and any(_within(field, group) for group in groups):
      raise ValueError(f'--config.{field} does nothing in {program}: it is read only by {reader}; run {reader} '
                       f'with it, or drop --config.{field}.')


def training_only(overridden: Iterable[str]) -> list[str]:
  """The fields of `overridden` (dotted names) that only training reads (`TRAINING_ONLY`)."""
  return [field for field in overridden if any(_within(field, group) for group in TRAINING_ONLY)]


def recalibration_only(config: ml_collections.ConfigDict, overridden: Iterable[str]) -> list[str]:
  """The fields of `overridden` eval.py reads only to recalibrate (`RECALIBRATION_ONLY`), where
  `config` recalibrates nothing (config.bn_recalibration_batches=0)."""
  if config.bn_recalibration_batches > 0:
    return []
  return [field for field in overridden if field in RECALIBRATION_ONLY]


def check_overrides_read(config: ml_collections.ConfigDict, overridden: Iterable[str],
                         program: Optional[str] = None) -> None:
  """Raises a one-line ValueError for a command-line override (`--config.<field>`, dotted
  `overridden` names) of a field `program` (TRAIN, EVAL or BN_SWEEP; None: a library caller,
  not checked) or `config`'s optimizer, schedule or data set never reads. In EVAL, fields only
  training reads are left to a warning (`training_only`): whichever optimizer they go with."""
  overridden = list(overridden)
  if program == EVAL:
    overridden = [field for field in overridden if field not in training_only(overridden)]
  for field in overridden:
    if program is not None:
      _check_program_reads(field, program)
    for groups, readers in _READ_ONLY_WITH:
      if not any(_within(field, group) for group in groups):
        continue
      current = {name: _lookup(config, name) for name in readers}
      if None in current.values() or all(current[name] in values for name, values in readers.items()):
        break
      now = ' and '.join(f'config.{name}={value!r}' for name, value in current.items())
      needed = ' and '.join(f'config.{name}={_one_of(values)}' for name, values in readers.items())
      raise ValueError(f'--config.{field} does nothing with {now}: it is read only with {needed}; set that as well, '
                       f'or drop --config.{field}.')
