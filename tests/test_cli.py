"""train.py's command line: a --config file that raises or returns no ConfigDict is one line, exit status 2."""

import types
import warnings

import numpy as np
import pytest

from resnet_flax import cli, config_file
from resnet_flax.data import pipeline
from test_train import run_script

RAISES = ('import ml_collections\n\n\ndef get_config():\n  config = ml_collections.ConfigDict()\n'
          '  config.batch_size = bach_size\n  return config\n')
RETURNS_A_DICT = "def get_config():\n  return {'batch_size': 8}\n"


def _error_line(*args):
  done = run_script('train.py', *args)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, done.stderr
  return lines[0]


@pytest.mark.parametrize('contents, expected', [
    # Had been a 36-line traceback, exit status 1.
    (RAISES, "error: config file {path} raised NameError: name 'bach_size' is not defined at {path}:6 (in get_config); "
             'fix {path} (--traceback shows the whole traceback).'),
    # Had failed in train.py, at config.distributed: "AttributeError: 'dict' object has no attribute".
    (RETURNS_A_DICT, 'error: config file {path}: get_config() returned a dict; get_config() must return an '
                     'ml_collections.ConfigDict (ml_collections.ConfigDict(d) makes one of a dict; configs/digits.py '
                     'shows the form).'),
], ids=['raises', 'returns_a_dict'])
def test_a_config_file_that_raises_or_returns_no_config_dict_is_one_line(tmp_path, contents, expected):
  path = tmp_path / 'my_config.py'
  path.write_text(contents)
  # The override is applied after get_config: a dict had reached it too.
  assert _error_line(f'--workdir={tmp_path}', f'--config={path}', '--config.batch_size=4') == expected.format(path=path)


def test_a_config_string_get_config_does_not_take_is_one_line(tmp_path):
  # Had been absl's "error: flag --config=...: Error whilst parsing config file:" and a traceback.
  assert _error_line(f'--workdir={tmp_path}', '--config=configs/default.py:foo') == (
      "error: config file configs/default.py: get_config('foo'), the text after the colon, raised TypeError: "
      'get_config() takes 0 positional arguments but 1 was given; pass --config=configs/default.py without ":foo".')


def test_traceback_shows_where_the_config_file_raised(tmp_path):
  path = tmp_path / 'my_config.py'
  path.write_text(RAISES)
  done = run_script('train.py', f'--workdir={tmp_path}', f'--config={path}', '--traceback')
  assert done.returncode == 1
  assert f'File "{path}", line 6, in get_config' in done.stderr and 'NameError' in done.stderr, done.stderr


def test_a_config_file_with_a_dataclass_under_postponed_annotations_loads(tmp_path):
  # The file's module must be in sys.modules while it runs, as ml_collections' loader had it;
  # without, dataclasses failed ("'NoneType' object has no attribute '__dict__'").
  path = tmp_path / 'dataclass_config.py'
  path.write_text('from __future__ import annotations\nimport dataclasses\nfrom configs import digits\n\n\n'
                  '@dataclasses.dataclass\nclass Schedule:\n  steps: int = 4\n\n\n'
                  'def get_config():\n  config = digits.get_config()\n  config.num_train_steps = Schedule().steps\n'
                  '  return config\n')
  assert config_file.ConfigFileParser().parse(str(path)).num_train_steps == 4


def test_the_closing_json_line_is_strict_json():
  # Python's json wrote a NaN evaluation as bare NaN, which jq and JavaScript refuse.
  line = cli.json_line({'step': 2, 'loss': float('nan'), 'before_recalibration': {'loss': float('inf'), 'top1': 0.5}})
  assert line == '{"step": 2, "loss": null, "before_recalibration": {"loss": null, "top1": 0.5}}'


def test_a_default_workdir_is_said_and_an_empty_one_refused(monkeypatch, capsys):
  # train.py had trained into /tmp/resnet_flax without a word; a second run of another config there
  # was the first the user heard of that folder.
  monkeypatch.setattr(cli.flags, 'FLAGS', types.SimpleNamespace(workdir=None))
  assert cli.workdir('/tmp/default_run') == '/tmp/default_run'
  assert capsys.readouterr().out == ('--workdir left out: the run is in /tmp/default_run (pass --workdir=DIR for a '
                                     'folder of its own).\n')
  assert cli.workdir() is None  # eval.py and the sweep have no default: nothing to say
  monkeypatch.setattr(cli.flags, 'FLAGS', types.SimpleNamespace(workdir='/tmp/given'))
  assert cli.workdir('/tmp/default_run') == '/tmp/given'
  assert capsys.readouterr().out == ''
  monkeypatch.setattr(cli.flags, 'FLAGS', types.SimpleNamespace(workdir=' '))
  with pytest.raises(ValueError, match=r'^--workdir is empty; pass a directory or leave the flag out '
                                       r'\(/tmp/default_run\)\.$'):
    cli.workdir('/tmp/default_run')


def test_a_skipped_image_is_a_warning_line_and_other_warnings_are_pythons(capsys):
  # It had printed as "<resnet_flax.data>:0: SkippedImageWarning: skipped (mask 0): ...".
  problem = 'cannot decode image /data/train/a/broken.jpg: cannot identify image file; replace or delete the file'

  def main():
    with warnings.catch_warnings():
      warnings.simplefilter('always')
      pipeline.Loaded.with_problems(np.zeros((2, 1), np.float32), [None, problem])
      warnings.warn('something else', DeprecationWarning)

  with pytest.warns(DeprecationWarning, match='^something else$'):  # passed on to Python's (here pytest's) own
    original = warnings.showwarning
    cli.run_reporting_user_errors(main)
    assert warnings.showwarning is original  # given back
  assert capsys.readouterr().err.splitlines() == [f'warning: skipped, left out of its batch: {problem}']
