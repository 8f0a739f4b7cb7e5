"""Expands `config.sweep` into runs: stable readable names, each the base config with overrides."""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import re
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Axis:
  """One grid field: where it goes in the run's config and how it reads in a run name."""
  field: str  # in config.sweep
  config_path: str  # dotted, in the run's config
  prefix: str  # in the run name
  kind: type  # float, bool or int


AXES = (
    Axis('decay', 'bn.decay', 'decay', float),
    Axis('zero_debias_moving_mean', 'bn.zero_debias_moving_mean', 'debias', bool),
    Axis('batch_size', 'batch_size', 'bs', int),
    Axis('num_train_steps', 'num_train_steps', 'steps', int),
)
SETTINGS = tuple(axis.field for axis in AXES)
# Every base field a run overwrites -> the config.sweep field it comes from.
SWEPT_FIELDS = {**{axis.config_path: axis.field for axis in AXES}, 'eval_every_steps': 'eval_every_steps'}
# How ml_collections recognizes an override: --config.a.b=v, -config.a.b v, --noconfig.a.b for booleans.
_OVERRIDE = re.compile(r'-{1,2}(?:no)?config\.([^=]+)')


def check_no_swept_overrides(argv: Sequence[str], swept: Mapping[str, str]) -> None:
  """Refuses a `--config.<field>` the sweep sets per run: every run would silently replace its value.

  `swept` maps a run's config field to its config.sweep field, as SWEPT_FIELDS does.
  """
  for arg in argv:
    if arg == '--':  # absl: what follows are arguments, not flags
      return
    match = _OVERRIDE.fullmatch(arg.split('=', 1)[0])
    if match and match.group(1) in swept:
      field, sweep_field = match.group(1), swept[match.group(1)]
      raise ValueError(f'config.{field} is set by the sweep (config.sweep.{sweep_field}); drop --config.{field} '
                       f'or put the value(s) in --config.sweep.{sweep_field}.')


@dataclasses.dataclass
class Run:
  """One point of the grid."""
  name: str  # e.g. decay0.99_debias1_bs32_steps200, the directory under WORKDIR/runs
  settings: dict[str, Any]  # {axis field: value}
  config: ml_collections.ConfigDict  # what train_and_evaluate gets


def _format(value: Any) -> str:
  if isinstance(value, bool):
    return str(int(value))
  # repr() is the shortest exact form: 0.999 stays '0.999' and 0.9999999 does not round to '1'.
  return repr(value)


def run_name(settings: dict[str, Any]) -> str:
  """`decay0.99_debias1_bs32_steps200`: every axis, so a name never changes with the grid's size."""
  return '_'.join(axis.prefix + _format(settings[axis.field]) for axis in AXES)


def _values(sweep: ml_collections.ConfigDict, field: str) -> tuple:
  values = sweep[field]
  values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
  if not values:
    raise ValueError(f'config.sweep.{field} is empty; give at least one value.')
  return values


def _shown(value: Any) -> str:
  """`value` as written in a config: numpy 2 prints its scalars as `np.float64(1.0)`."""
  return repr(value.item() if isinstance(value, np.generic) else value)


def _settings(values: tuple) -> dict[str, Any]:
  """Checked values of one combination, each as its axis's type."""
  raw = dict(zip(SETTINGS, values))
  # numpy's scalars too (a grid from np.linspace): numbers.Real and Integral take them. They take
  # bools as well, which are no decay or count, so those are refused by name.
  decay = raw['decay']
  if isinstance(decay, (bool, np.bool_)) or not (isinstance(decay, numbers.Real) and 0.0 <= decay < 1.0):
    raise ValueError(f"config.sweep.decay: {_shown(decay)} is not a number in [0, 1).")
  if not isinstance(raw['zero_debias_moving_mean'], (bool, np.bool_)):  # bool('no') would be True
    raise ValueError(f"config.sweep.zero_debias_moving_mean: {_shown(raw['zero_debias_moving_mean'])} is not "
                     'True or False.')
  for field in ('batch_size', 'num_train_steps'):
    if isinstance(raw[field], (bool, np.bool_)) or not isinstance(raw[field], numbers.Integral) or raw[field] <= 0:
      raise ValueError(f'config.sweep.{field}: {_shown(raw[field])} is not a positive integer.')
  # A float32 0.9 is meant as 0.9 (its shortest digits), not as 0.8999999761581421 in the run's name and config.
  raw['decay'] = float(str(decay)) if isinstance(decay, np.floating) else decay
  return {axis.field: axis.kind(raw[axis.field]) for axis in AXES}


def run_config(base: ml_collections.ConfigDict, settings: dict[str, Any]) -> ml_collections.ConfigDict:
  """The base config without `sweep`, with the run's settings and the sweep's eval interval."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    del config['sweep']  # A run's config is a plain training config, compared on resume.
  config.update_from_flattened_dict({axis.config_path: settings[axis.field] for axis in AXES})
  config.eval_every_steps = int(base.sweep.eval_every_steps)
  return config


def expand(config: ml_collections.ConfigDict) -> list[Run]:
  """Every combination of the grid axes, decay varying slowest; a 1-tuple axis is fixed."""
  if 'sweep' not in config:
    raise ValueError('the config has no `sweep` field; pass --config=configs/bn_sweep.py (or a variant of it).')
  if config.get('model_ema_decay'):
    # Its curves are the variables' evaluations and its tables would read the averages: one row, two models.
    raise ValueError(f'config.model_ema_decay={config.model_ema_decay!r}: the sweep measures the BatchNorm '
                     'statistics of the variables it trains, not of their moving averages; drop it.')
  for field in ('eval_every_steps', 'recalibration_batches'):
    value = config.sweep[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'config.sweep.{field}: {value!r} is not an integer >= 0.')
  runs = []
  for values in itertools.product(*(_values(config.sweep, axis.field) for axis in AXES)):
    settings = _settings(values)
    runs.append(Run(run_name(settings), settings, run_config(config, settings)))
  names = [run.name for run in runs]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f'config.sweep repeats a value: {repeated[0]} would run twice.')
  return runs
