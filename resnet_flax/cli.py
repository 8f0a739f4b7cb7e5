"""What train.py and eval.py share: config flags and one-line errors for user mistakes."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Callable, NoReturn, Optional

import jax
from absl import flags, logging
from ml_collections import config_flags

from resnet_flax import (atomic_files, checkpoints, config_checks, config_file, data, distributed, error_lines,
                         metrics_writer, progress, train_lib)

DEFAULT_TRAIN_WORKDIR = '/tmp/resnet_flax'
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'digits.py')

# Mistakes a user makes (config, data, checkpoints, diverging runs) get one line and exit
# status 2; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, FloatingPointError, FileNotFoundError, PermissionError)


def _innermost_message(error: BaseException) -> str:
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  return ' '.join(text.replace("\\'", "'").split())


def _exit(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _none_given(arg: str) -> str:
  """The error for `--config.<field>=None`, which the command line cannot express."""
  return (f'{arg}: None cannot be given on the command line; leave the flag out for the config '
          "file's value, or set the field to None in a config file (configs/default.py shows which may be).")


def _exit_unknown_field(error: BaseException, argv: list[str]) -> NoReturn:
  """Names the override that names no field and why; ml_collections' own message (a TypeError
  from indexing a string, for --config.model.name) says neither."""
  overrides = [arg for arg in argv if arg.startswith('--config.')]
  config = _config_of(argv)
  for override in overrides if config is not None else []:
    problem = config_checks.override_problem(config, override[len('--config.'):].partition('=')[0])
    if problem:
      _exit(f'{problem} (in: {override}); configs/default.py lists every field.')
  unknown = 'unknown config field ' if isinstance(error, (AttributeError, KeyError)) else ''
  _exit(f'{unknown}{_innermost_message(error)} (in: {" ".join(overrides)}); configs/default.py lists every field.')


def _config_of(argv: list[str]):
  """The config file `argv` names (its last --config, else the default) loaded without its
  overrides, or None where it does not load (that error is then the one to report)."""
  files = _config_files(argv)
  try:
    return config_file.ConfigFileParser().parse(files[-1][1] if files else DEFAULT_CONFIG)
  except Exception:  # pylint: disable=broad-except  # only used to explain an error already found
    return None


def _config_files(args: list[str]) -> list[tuple[int, str]]:
  """(position, FILE) of each `--config=FILE` or `--config FILE` in `args`."""
  return [(index, arg[len('--config='):] if arg.startswith('--config=') else args[index + 1])
          for index, arg in enumerate(args)
          if arg.startswith('--config=') or (arg == '--config' and index + 1 < len(args))]


def define_flags() -> None:
  """`--config` (an ml_collections file, fields overridable as --config.a.b=v) and `--workdir`.

  config_flags applies `--config.x=v` overrides while defining the flag, so an unknown
  field surfaces here, before main(); it is reported in one line.
  """
  try:
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None,
                                    'Experiment config file (configs/*.py).', lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as error:  # as in parse_flags
    _exit_unknown_field(error, sys.argv[1:])
  # DEFINE_config_file takes no parser: ours replaces ml_collections' before the command line's
  # --config=FILE is loaded (the default file, this repository's, is loaded by then).
  flags.FLAGS['config'].parser = config_file.ConfigFileParser()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and TensorBoard events '
                      f'(train.py: {DEFAULT_TRAIN_WORKDIR} if left out).')
  flags.DEFINE_bool('traceback', False, 'Show the full traceback of user errors too.')


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """`parse_flags` for `program` (config_checks.TRAIN, EVAL or BN_SWEEP): what `app.run` takes."""
  return functools.partial(parse_flags, program=program)


def parse_flags(argv: list[str], program: Optional[str] = None) -> list[str]:
  """absl's parsing, with a config file that gives no config (`--traceback`: its traceback), a
  malformed value, an unknown field, a word that is not a flag or an override of a field the
  chosen optimizer, schedule or data set, or `program` (see `flags_parser`), never reads
  reported in one line (exit 2).

  With `--config=FILE` given, the overrides are applied here rather than in `define_flags`.
  """
  files = _config_files(argv[1:])
  if len(files) > 1:  # absl would keep the last silently (with overrides: a flag "defined twice")
    _exit(f'--config is given {len(files)} times ({", ".join(name for _, name in files)}); give one config file '
          'and change its fields with --config.<field>=value.')
  try:
    remaining = flags.FLAGS(argv)
    if flags.FLAGS.config is None:  # no --config, and no configs/digits.py beside the package
      _exit('no config given; pass --config=configs/<name>.py.')
    _refuse_repeated_tuple_overrides(argv[1:], flags.FLAGS.config)
    # A text field takes 'None' as the text 'None' (init_checkpoint: a file of that name). The parsed
    # overrides hold `--config.x None` and a --flagfile's lines too, which argv does not show.
    given_none = [field for field, value in config_flags.get_override_values(flags.FLAGS['config']).items()
                  if value == 'None']
    if given_none:
      _exit(_none_given(f'--config.{given_none[0]}=None'))
  except config_file.ConfigFileError as error:
    if _traceback_in(argv):
      raise
    _exit(str(error))
  except flags.Error as error:
    # ml_collections parses a placeholder's value as its type: 'None' is no int. absl's message names
    # the flag as `--config.x=None` however it was given (`--config.x None`, a --flagfile).
    given_none = re.match(r'flag (--config\.[\w.]+=None): ', str(error))
    if given_none:
      _exit(_none_given(given_none.group(1)))
    early = _override_before_config_file(argv[1:])
    if early:  # ml_collections applies an override to the file given before it
      _exit(f'{early} comes before --config=FILE; put --config=FILE first, then the --config.<field> overrides.')
    _exit(f'{error}; configs/default.py shows every field with its type.')
  except (AttributeError, KeyError, TypeError, ValueError) as error:  # ml_collections' for a field it cannot reach
    _exit_unknown_field(error, argv[1:])
  if len(remaining) > 1:
    # absl leaves words that are not flags to main(); dropped there, `--config.bn.scale False`
    # would set scale to True (a bare boolean flag) and `train.py configs/x.py` train the default.
    stray = ' '.join(repr(word) for word in remaining[1:])
    _exit(f'unexpected argument(s) {stray}: every setting is a flag with its value after "=", e.g. '
          '--config.bn.scale=False (a boolean flag alone means True) and --config=configs/<name>.py.')
  try:
    config_checks.check_present(flags.FLAGS.config)
    config_checks.check_overrides_read(flags.FLAGS.config, config_flags.get_override_values(flags.FLAGS['config']),
                                       program)
  except ValueError as error:
    _exit(str(error))
  return remaining


def _override_before_config_file(args: list[str]) -> Optional[str]:
  """The first `--config.<field>=...` in `args` that comes before the first `--config FILE`, or None."""
  files = _config_files(args)
  early = [arg for arg in args[:files[0][0]] if arg.startswith('--config.')] if files else []
  return early[0] if early else None


def _traceback_in(argv: list[str]) -> bool:
  """Whether `argv` sets --traceback, read from the words themselves: a --config that fails
  stops absl's parsing before the flags after it."""
  wanted = False
  for word in argv[1:]:
    if word == '--':
      break
    name, equals, value = word.lstrip('-').partition('=')
    if name == 'traceback' and word.startswith('-'):
      wanted = not equals or value.lower() in ('true', 't', '1')
    elif name == 'notraceback' and word.startswith('-'):
      wanted = False
  return wanted


def warn_of_unread_overrides(program: str) -> None:
  """Says (process 0, on stderr) which `--config.<field>` overrides `program`, an evaluation, does
  not read: those only training reads (a repeated training command line is no error, but its
  learning rate or step count changes nothing here), and the statistics groups without a
  recalibration."""
  overridden = config_flags.get_override_values(flags.FLAGS['config'])
  if jax.process_index() != 0:
    return
  training = config_checks.training_only(overridden)
  if training:
    print(f'warning: {program} does not read {_flags(training)}: only training does, so they change nothing here.',
          file=sys.stderr)
  grouping = config_checks.recalibration_only(flags.FLAGS.config, overridden)
  if grouping:
    print(f'warning: {program} does not read {_flags(grouping)} without a recalibration: evaluation uses the moving '
          'statistics, and only config.bn_recalibration_batches > 0 groups batch statistics as training did.',
          file=sys.stderr)


def _flags(fields: list[str]) -> str:
  return ', '.join(f'--config.{field}' for field in fields)


def json_line(result: dict) -> str:
  """`result` as the one JSON line a program ends stdout with: NaN and infinities as null, so
  that strict readers (jq, JavaScript) take it; Python's json writes them as bare NaN."""
  return json.dumps(atomic_files.finite_or_null(result), allow_nan=False)


def workdir(default: Optional[str] = None) -> Optional[str]:
  """`--workdir`, or `default` when it is left out (said on stdout: a later run of another config
  there is refused, and the user should know where to look); an empty `--workdir=` is an error."""
  given = flags.FLAGS.workdir
  if given is not None and not given.strip():
    leave_out = f' or leave the flag out ({default})' if default else ''
    raise ValueError(f'--workdir is empty; pass a directory{leave_out}.')
  if given is None and default is not None and jax.process_index() == 0:
    print(f'--workdir left out: the run is in {default} (pass --workdir=DIR for a folder of its own).')
  return default if given is None else given


def _refuse_repeated_tuple_overrides(args: list[str], config) -> None:
  """A tuple field given twice: ml_collections joins the two tuples, where a scalar's last value wins."""
  names = [arg.partition('=')[0][len('--config.'):] for arg in args if arg.startswith('--config.')]
  for name in sorted({name for name in names if names.count(name) > 1}):
    value = functools.reduce(lambda node, key: node[key], name.split('.'), config)
    if isinstance(value, (tuple, list)):
      _exit(f'--config.{name} is given {names.count(name)} times, which joins the tuples into {tuple(value)}; '
            'give it once.')


def _wants_traceback() -> bool:
  """--traceback's value; False where the command line defines no such flag."""
  return 'traceback' in flags.FLAGS and bool(flags.FLAGS['traceback'].value)


def run_reporting_user_errors(main: Callable[[], None], resumes: bool = True) -> None:
  """Runs `main`; a user error prints `error: <message>` on stderr and exits with status 2.
  `resumes`: whether the same command again resumes the work (training, a sweep), which a
  Ctrl-C's message then says."""
  if not flags.FLAGS['verbosity'].present:
    # orbax logs every save step at INFO; the progress bar already says what matters.
    logging.set_verbosity(logging.WARNING)
  try:
    with progress.warnings_as_lines(data.SkippedImageWarning, _print_to_stderr):
      main()
  except train_lib.StoppedBySignal as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: it joins the input pipeline's threads, and one stuck on a hung read never returns.
    os._exit(128 + error.signum)
  except KeyboardInterrupt:
    # Training turns Ctrl-C into a save and a clean stop; this is a Ctrl-C before (or after) that.
    resume = '; rerun the same command to resume from the newest checkpoint' if resumes else ''
    print(f'interrupted (Ctrl-C){resume}.', file=sys.stderr)
    sys.exit(130)
  except Exception as error:  # pylint: disable=broad-except  # a user's mistake is one line; anything else, a bug
    line = _user_error_line(error)
    if line is None or _wants_traceback():
      raise
    print(f'error: {line}', file=sys.stderr)
    sys.exit(2)


def _print_to_stderr(line: str) -> None:
  print(line, file=sys.stderr)


def _user_error_line(error: Exception) -> Optional[str]:
  """The line a user error is shown as (running out of memory, however wrapped, with what to
  lower), or None for an error that is a bug."""
  memory = error_lines.out_of_memory(error)
  if memory is not None:
    return _out_of_memory_message(memory)
  if isinstance(error, USER_ERRORS + (data.DataError, checkpoints.CheckpointError, metrics_writer.MetricsWriteError,
                                      distributed.FailedOnAnotherProcess)):
    return error_lines.first_line(error)
  return None


def _out_of_memory_message(error: BaseException) -> str:
  """One line for `error`, a host's MemoryError or a device's out-of-memory error, with what to lower."""
  if isinstance(error, MemoryError):
    return (f'out of host memory ({error_lines.first_line(error)}); lower config.batch_size or '
            'config.data.image_size.')
  # The step's activations, evaluation's batch, or another program holding the device.
  return (f'out of device memory ({error_lines.first_line(error)}); lower config.batch_size (config.eval_batch_size '
          'when it is evaluation that fails) or config.data.image_size, or free the device of other programs.')
