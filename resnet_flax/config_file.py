"""`--config=FILE[:STRING]`: the file's `get_config(STRING)`, loaded as ml_collections loads it,
with each way a file can fail to give a config as one line (ConfigFileError)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import sys
import traceback
from typing import Callable

import ml_collections
from absl import flags


class ConfigFileError(Exception):
  """A `--config` file that gives no config; the message is the one line to show.

  Not a ValueError: absl would rewrap one as 'flag --config=...: <message>'.
  """


class ConfigFileParser(flags.ArgumentParser):
  """`--config=FILE[:STRING]` as ml_collections reads it (FILE's `get_config(STRING)`, locked),
  with each way a file fails as a ConfigFileError. ml_collections' own parser lets get_config's
  exceptions out with their tracebacks (a TypeError or ValueError rewritten with the traceback
  as its message), puts off a missing file until the config is first used, and returns whatever
  get_config returns (a dict then failed in train.py with an AttributeError)."""

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    path, colon, string = argument.partition(':')  # ml_collections splits at the first colon too
    if not path:
      raise ConfigFileError('--config is empty; pass --config=configs/<name>.py.')
    try:
      spec = importlib.util.spec_from_file_location('config_config', path,
                                                    loader=importlib.machinery.SourceFileLoader('config_config', path))
      module = importlib.util.module_from_spec(spec)
      # Registered as ml_collections' loader does: a dataclass under `from __future__ import
      # annotations` looks its module up in sys.modules while the file runs.
      sys.modules[spec.name] = module
      spec.loader.exec_module(module)
    except OSError as error:
      raise ConfigFileError(f'config file {path} cannot be loaded ({error.strerror or error}); pass '
                            '--config=configs/<name>.py.') from error
    except SyntaxError as error:  # error.filename: the config file or a module it imports
      raise ConfigFileError(f'config file {path} cannot be loaded ({error.msg} at {error.filename}:{error.lineno}); '
                            f'fix {error.filename}.') from error
    except Exception as error:  # pylint: disable=broad-except  # whatever its top level raises
      raise ConfigFileError(_config_file_raised(path, error)) from error
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
      raise ConfigFileError(f'config file {path} has no get_config(); configs/digits.py shows the form (it returns '
                            'a ConfigDict).')
    arguments = [string] if colon else []
    try:
      config = get_config(*arguments)
    except Exception as error:  # pylint: disable=broad-except  # whatever get_config raises
      if isinstance(error, TypeError) and not _accepts(get_config, arguments):
        call, fix = ((f'get_config({string!r}), the text after the colon,', f'pass --config={path} without ":{string}"')
                     if colon else ('get_config()', f'pass the argument it takes after a colon, --config={path}:VALUE'))
        raise ConfigFileError(f'config file {path}: {call} raised TypeError: {error}; {fix}.') from error
      raise ConfigFileError(_config_file_raised(path, error)) from error
    if not isinstance(config, ml_collections.ConfigDict):
      name = type(config).__name__
      returned = ('None (no return statement?)' if config is None
                  else f'{"an" if name[0].lower() in "aeiou" else "a"} {name}')
      convert = 'ml_collections.ConfigDict(d) makes one of a dict; ' if isinstance(config, dict) else ''
      raise ConfigFileError(f'config file {path}: get_config() returned {returned}; get_config() must return an '
                            f'ml_collections.ConfigDict ({convert}configs/digits.py shows the form).')
    config.lock()  # as DEFINE_config_file(lock_config=True): an override of a field no config has is an error
    return config

  def flag_type(self) -> str:
    return 'config object'


def _accepts(function: Callable, arguments: list[str]) -> bool:
  """Whether `function` can be called with `arguments` (True where its signature is unknown)."""
  try:
    inspect.signature(function).bind(*arguments)
  except TypeError:
    return False
  except ValueError:  # no signature to inspect
    pass
  return True


def _config_file_raised(path: str, error: BaseException) -> str:
  """'config file F raised NameError: ... at F:6 (in get_config); fix F ...': the innermost line of F
  in the traceback (a module F imports may have raised, below it)."""
  in_file = [frame for frame in traceback.extract_tb(error.__traceback__)
             if os.path.realpath(frame.filename) == os.path.realpath(path)]
  where = f' at {path}:{in_file[-1].lineno} (in {in_file[-1].name})' if in_file else ''
  message = str(error).strip()
  raised = f'{type(error).__name__}: {message.splitlines()[0]}' if message else type(error).__name__
  return f'config file {path} raised {raised}{where}; fix {path} (--traceback shows the whole traceback).'
