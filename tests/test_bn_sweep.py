"""BN sweeps: grid expansion and run names, a 2x2 grid end to end (tables, plots), resume."""

import csv
import os
import re
import shutil
import subprocess
import sys

import pytest

from configs import bn_sweep as bn_sweep_config
from configs import digits
from resnet_flax import atomic_files, bn_sweep, checkpoints, eval_lib, metrics_writer
from resnet_flax.bn_sweep import grid, runner, tables
from resnet_flax.bn_sweep import results as results_lib
from test_train import SMALL_BLOCKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

# The CI grid: decay x zero-debias on tiny runs of digits. The same overrides go to the
# library and, as flags, to the command line, which must then find the same runs. Tracing
# and compiling, not arithmetic, are the cost here, so the model is the two-unit one.
TINY = {
    'model': 'resnet_v1_tiny',
    'model_options.include_root_block': False,
    'model_options.block_sizes': SMALL_BLOCKS,
    'sweep.decay': (0.9, 0.99),
    'sweep.zero_debias_moving_mean': (False, True),
    'sweep.batch_size': (16,),
    'sweep.num_train_steps': (20,),
    'sweep.eval_every_steps': 10,
    'sweep.recalibration_batches': 2,
    'eval_batch_size': 120,
    'warmup_steps': 0,
    'checkpoint_every_steps': 20,
    'log_every_steps': 10,
    'async_checkpointing': False,
}
TINY_NAMES = ['decay0.9_debias0_bs16_steps20', 'decay0.9_debias1_bs16_steps20',
              'decay0.99_debias0_bs16_steps20', 'decay0.99_debias1_bs16_steps20']


def _config(overrides=None, **sweep):
  config = bn_sweep_config.get_config()
  config.update_from_flattened_dict(overrides or {})
  config.sweep.update(sweep)
  return config


def _flag(value):
  return '(' + ''.join(f'{item},' for item in value) + ')' if isinstance(value, tuple) else str(value)


def test_grid_is_the_product_with_every_axis_in_the_name():
  runs = grid.expand(_config(decay=(0.9, 0.999), zero_debias_moving_mean=(False, True), batch_size=(32,),
                             num_train_steps=(200,)))
  assert [run.name for run in runs] == ['decay0.9_debias0_bs32_steps200', 'decay0.9_debias1_bs32_steps200',
                                        'decay0.999_debias0_bs32_steps200', 'decay0.999_debias1_bs32_steps200']
  assert runs[3].settings == {'decay': 0.999, 'zero_debias_moving_mean': True, 'batch_size': 32,
                              'num_train_steps': 200}


def test_default_grid_is_decay_by_zero_debias():
  runs = grid.expand(bn_sweep_config.get_config())
  assert [run.name for run in runs] == [f'decay{decay}_debias{debias}_bs32_steps150'
                                        for decay in (0.9, 0.99, 0.999) for debias in (0, 1)]


def test_run_config_is_the_base_with_the_settings():
  base = _config({'learning_rate': 0.05, 'data.name': 'synthetic'}, decay=(0.99,), zero_debias_moving_mean=(True,),
                 batch_size=(32,), num_train_steps=(200,), eval_every_steps=40)
  (run,) = grid.expand(base)
  assert run.name == 'decay0.99_debias1_bs32_steps200'
  config = run.config
  assert (config.bn.decay, config.bn.zero_debias_moving_mean, config.batch_size, config.num_train_steps,
          config.eval_every_steps) == (0.99, True, 32, 200, 40)
  assert config.learning_rate == 0.05 and config.data.name == 'synthetic'
  assert 'sweep' not in config
  assert base.bn.decay == 0.9 and base.batch_size == 64  # the base is left as it was


def test_run_names_are_exact():
  settings = {'decay': 0.9999999, 'zero_debias_moving_mean': False, 'batch_size': 8, 'num_train_steps': 5}
  assert grid.run_name(settings) == 'decay0.9999999_debias0_bs8_steps5'


@pytest.mark.parametrize('sweep, message', [
    ({'decay': ()}, 'config.sweep.decay is empty'),
    ({'decay': (1.0,)}, 'config.sweep.decay: 1.0 is not a number in [0, 1)'),
    ({'batch_size': (0,)}, 'config.sweep.batch_size: 0 is not a positive integer'),
    ({'decay': (0.9, 0.9)}, 'would run twice'),
    ({'recalibration_batches': -1}, 'config.sweep.recalibration_batches: -1'),
    ({'zero_debias_moving_mean': ('no',)}, "config.sweep.zero_debias_moving_mean: 'no' is not True or False"),
])
def test_grid_errors_name_the_field(sweep, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace('(', r'\(').replace(')', r'\)')):
    grid.expand(_config(**sweep))


def test_a_run_with_impossible_settings_stops_the_sweep_before_any_run_trains(tmp_path):
  # The debiased runs conflict with renorm; the plain ones come first in the grid.
  config = _config({'bn.renorm': True}, zero_debias_moving_mean=(False, True))
  with pytest.raises(ValueError, match='config.bn.renorm keeps plain moving averages'):
    bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('overrides, message', [
    ({'data.image_size': 8}, r'cifar10 images are 32x32; set config.data.image_size to 32 \(got 8\)'),
    ({}, r"config.data.dir='.*/cifar' does not exist"),
])
def test_a_data_set_that_cannot_be_built_as_configured_stops_the_sweep_before_any_run(tmp_path, overrides, message):
  # Had failed only in the first run, after making its directory.
  config = _config({'data.name': 'cifar10', 'data.dir': str(tmp_path / 'cifar'), **overrides})
  with pytest.raises(ValueError, match=message):
    bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert not (tmp_path / 'runs').exists()


def test_a_grid_batch_size_above_the_eval_split_is_refused_before_any_run(tmp_path):
  # Each run had trained first, then failed in its BN report naming config.bn_report_batch_sizes.
  config = _config(TINY, batch_size=(16, 400, 5000))
  with pytest.raises(ValueError, match=r'^config.sweep.batch_size has \[400, 5000\], more than the 360 examples of '
                                       r'the test split .*; use sizes up to 360\.$'):
    bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert not (tmp_path / 'runs').exists()


def test_an_unwritable_sweep_workdir_is_refused_in_one_line(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='is a file, not a directory'):
    bn_sweep.run_sweep(_config(), str(tmp_path / 'file'), log=lambda message: None)


def test_a_sweep_workdir_inside_another_runs_folders_is_refused_before_any_run_folder(tmp_path):
  # Each run had been refused, after the sweep had made its empty runs/<name> among the events.
  (tmp_path / 'tensorboard').mkdir()
  for name in ('config.json', 'metrics.jsonl'):
    (tmp_path / name).write_text('{}')
  for workdir in (tmp_path / 'tensorboard' / 'sweep', tmp_path / 'tensorboard'):
    with pytest.raises(ValueError) as refused:
      bn_sweep.run_sweep(_config(), str(workdir), log=lambda message: None)
    # Not train.py's "--workdir=RUN to go on with that run": a sweep is no run to go on with.
    assert str(refused.value) == (f'--workdir {workdir} lies inside the tensorboard/ folder of the run in {tmp_path}; '
                                  'pass a workdir outside that run.')
  assert os.listdir(tmp_path / 'tensorboard') == []


def test_a_sweep_workdir_may_be_a_pathlib_path_and_not_empty(tmp_path):
  with pytest.raises(ValueError, match=r'^--workdir is empty; pass a directory\.$'):
    bn_sweep.run_sweep(_config(), '', log=lambda message: None)
  (tmp_path / 'file').write_text('')
  with pytest.raises(ValueError, match='is a file, not a directory'):  # had been "'PosixPath' is not iterable"
    bn_sweep.run_sweep(_config(), tmp_path / 'file', log=lambda message: None)


def test_a_sweep_workdir_that_is_a_training_run_is_refused_with_nothing_written(tmp_path):
  # Its tables, plots and runs/ had been written among that run's checkpoints and metrics.
  for name in ('config.json', 'metrics.jsonl'):
    (tmp_path / name).write_text('{}')
  with pytest.raises(ValueError, match=f'^--workdir {tmp_path} holds a training run'):
    bn_sweep.run_sweep(_config(), str(tmp_path), log=lambda message: None)
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'metrics.jsonl']


def test_a_run_trained_with_another_config_stops_the_sweep_before_any_run_trains(tmp_path):
  # Found when its turn came, it had let the runs before it train under the new config: a workdir of two configs.
  config = _config(decay=(0.5, 0.9), zero_debias_moving_mean=(True,))
  second = grid.expand(config)[1]
  directory = runner.run_directory(str(tmp_path), second.name)
  os.makedirs(directory)
  writer = metrics_writer.MetricsWriter(directory)
  writer.record_config({**second.config.to_dict(), 'learning_rate': 0.5, 'device_count': 1})
  writer.close()
  with pytest.raises(ValueError, match=f'{directory} was trained with learning_rate=0.5'):
    bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert os.listdir(tmp_path / 'runs') == [second.name]


@pytest.mark.parametrize('argv, field, sweep_field', [
    (['--config=configs/bn_sweep.py', '--config.batch_size=16', "--config.sweep.batch_size=(8,)"],
     'batch_size', 'batch_size'),
    (['--config.bn.decay', '0.9'], 'bn.decay', 'decay'),
    (['--noconfig.bn.zero_debias_moving_mean'], 'bn.zero_debias_moving_mean', 'zero_debias_moving_mean'),
    (['-config.num_train_steps=5'], 'num_train_steps', 'num_train_steps'),
    (['--config.eval_every_steps=5'], 'eval_every_steps', 'eval_every_steps'),
])
def test_a_base_override_of_a_swept_field_is_refused(argv, field, sweep_field):
  with pytest.raises(ValueError) as error:
    grid.check_no_swept_overrides(argv, grid.SWEPT_FIELDS)
  assert str(error.value) == (f'config.{field} is set by the sweep (config.sweep.{sweep_field}); drop '
                              f'--config.{field} or put the value(s) in --config.sweep.{sweep_field}.')


def test_overrides_the_sweep_does_not_set_pass():
  grid.check_no_swept_overrides(['--config=configs/bn_sweep.py', '--config.sweep.batch_size=(8,16)',
                                 '--config.eval_batch_size=8', '--config.bn.decay_x=1', '--workdir=w',
                                 '--', '--config.batch_size=1'], grid.SWEPT_FIELDS)


@pytest.mark.parametrize('arguments, message', [
    # A tiny grid, should the override ever get through and train.
    (['--workdir={workdir}', '--config.batch_size=16', '--config.sweep.batch_size=(8,)', '--config.sweep.decay=(0.9,)',
      '--config.sweep.zero_debias_moving_mean=(False,)', '--config.sweep.num_train_steps=(2,)'],
     'error: config.batch_size is set by the sweep (config.sweep.batch_size); drop --config.batch_size or put the '
     'value(s) in --config.sweep.batch_size.'),
    (['--workdir='], 'error: --workdir is empty; pass a directory.'),
])
def test_command_line_mistakes_stop_the_sweep_in_one_line(tmp_path, arguments, message):
  arguments = [argument.format(workdir=tmp_path / 'sweep') for argument in arguments]
  completed = subprocess.run([sys.executable, '-m', 'resnet_flax.bn_sweep', '--config=configs/bn_sweep.py',
                              *arguments], cwd=REPO, capture_output=True, text=True)
  assert completed.returncode == 2 and completed.stderr.strip().splitlines() == [message], completed.stderr[-2000:]
  assert not (tmp_path / 'sweep').exists() and not os.path.exists(os.path.join(REPO, 'compilation_cache'))


def test_a_batch_of_one_in_the_grid_is_refused_before_any_run_naming_the_run(tmp_path):
  config = _config(TINY, decay=(0.9,), zero_debias_moving_mean=(False,), batch_size=(1, 8))
  with pytest.raises(ValueError, match=r'^sweep run decay0\.9_debias0_bs1_steps20: config\.batch_size=1 leaves '
                                       'one example per BatchNorm statistics group'):
    bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert not (tmp_path / 'runs').exists()


def test_a_config_without_sweep_says_which_to_use():
  with pytest.raises(ValueError, match='configs/bn_sweep.py'):
    grid.expand(digits.get_config())



def _fake_result(decay, recalibrated):
  metrics = lambda top1: {'top1': top1, 'loss': 1.0, 'num_examples': 360}
  return {'name': f'decay{decay}', 'settings': {'decay': decay, 'zero_debias_moving_mean': True, 'batch_size': 32,
                                                'num_train_steps': 150},
          'step': 150, 'eval_split': 'test', 'moving': metrics(0.5), 'batch': dict(metrics(0.875), num_examples=352),
          'recalibrated': metrics(recalibrated) if recalibrated is not None else None, 'recalibration_batches': 20,
          'gap': 0.375, 'curve': [{'step': 150, 'top1': 0.5, 'loss': 1.0}], 'seconds': 1.0}


def test_markdown_table_rows():
  table = tables.markdown_table([_fake_result(0.999, 0.96), _fake_result(0.9, None)]).splitlines()
  assert table[0].startswith('Final test top-1 (360 examples) with moving statistics')
  assert table[4:] == ['| 0.999 | yes | 32 | 150 | 50.00% | 87.50% | 96.00% | +37.50 |',
                       '| 0.9 | yes | 32 | 150 | 50.00% | 87.50% | — | +37.50 |']
  row = tables.result_row(_fake_result(0.9, None))
  assert (row['recalibrated_top1'], row['num_examples'], row['batch_num_examples']) == ('', 360, 352)


def test_an_accuracy_whose_evaluation_loss_is_not_finite_is_marked(tmp_path):
  # Moving statistics that do not fit the weights yet: a loss of inf and an accuracy of chance.
  result = _fake_result(0.9, None)
  result['moving'] = {'top1': 0.098, 'loss': float('inf'), 'num_examples': 360}
  atomic_files.write_json(str(tmp_path / 'result.json'), result)  # as the runner stores it
  read_back = atomic_files.read_json(str(tmp_path / 'result.json'))
  table = tables.markdown_table([read_back, _fake_result(0.999, 0.96)]).splitlines()
  assert 'an accuracy marked "loss not finite" means nothing' in table[0]
  assert table[4] == '| 0.9 | yes | 32 | 150 | 9.80% (loss not finite) | 87.50% | — | +37.50 |'
  assert tables.markdown_table([result]).splitlines()[4] == table[4]  # before it is stored: inf
  assert table[5] == '| 0.999 | yes | 32 | 150 | 50.00% | 87.50% | 96.00% | +37.50 |'


def test_a_diverged_run_has_a_row_without_numbers():
  diverged = dict(_fake_result(0.99, None), step=None, moving=None, batch=None, gap=None, diverged_at_step=3)
  table = tables.markdown_table([diverged, _fake_result(0.9, 0.96)]).splitlines()
  assert '(360 examples)' in table[0]  # from the run that has numbers
  assert table[4] == '| 0.99 | yes | 32 | 150 | diverged at step 3 | — | — | — |'
  row = tables.result_row(diverged)
  assert row['diverged_at_step'] == 3 and row['moving_top1'] == row['gap'] == row['step'] == ''
  assert tables.result_row(_fake_result(0.9, 0.96))['diverged_at_step'] == ''  # results from before the column


def test_a_diverged_runs_curve_stops_before_the_bad_step():
  (run,) = grid.expand(_config(decay=(0.9,), zero_debias_moving_mean=(False,), batch_size=(16,)))
  curve = [{'step': 10, 'top1': 0.5, 'loss': 1.0}, {'step': 20, 'top1': 0.1, 'loss': float('nan')}]
  result = results_lib.diverged_result(run, 15, curve, recalibration_batches=0, seconds=1.0)
  assert result['curve'] == curve[:1] and result['diverged_at_step'] == 15 and result['gap'] is None


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path):
  """Both runs diverge at a learning rate of 1e30: each is recorded, tables and plots are still
  written, and the same sweep again skips them."""
  overrides = dict(TINY, learning_rate=1e30, **{'sweep.decay': (0.9, 0.99), 'sweep.zero_debias_moving_mean': (True,),
                                                'sweep.num_train_steps': (4,)})
  messages = []
  results = bn_sweep.run_sweep(_config(overrides), str(tmp_path), log=messages.append)
  names = ['decay0.9_debias1_bs16_steps4', 'decay0.99_debias1_bs16_steps4']
  assert [result['name'] for result in results] == names
  assert all(result['moving'] is None and result['diverged_at_step'] >= 1 for result in results)
  assert sum('diverged at step' in message for message in messages) == 2
  table = (tmp_path / 'results.md').read_text(encoding='utf-8')
  assert table.count('diverged at step') == 2 and table.startswith('Final test top-1 with moving statistics')
  assert results_lib.is_finished(results[0], recalibration_batches=5)  # diverges again whatever the diagnostics
  for name in ('accuracy_vs_step.png', 'gap_vs_decay.png'):
    assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE), name
  messages.clear()
  bn_sweep.run_sweep(_config(overrides), str(tmp_path), log=messages.append)
  assert sum('finished before, skipped' in message for message in messages) == 2


def test_a_run_directory_refuses_another_training_config(tmp_path):
  (run,) = grid.expand(_config(decay=(0.9,), zero_debias_moving_mean=(False,), batch_size=(16,)))
  runner.check_same_config(str(tmp_path), run.config)  # a first start: nothing recorded yet
  # What train_and_evaluate records when the run starts.
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({**run.config.to_dict(), 'device_count': 1})
  writer.close()
  runner.check_same_config(str(tmp_path), run.config)
  run.config.eval_every_steps = 7  # bookkeeping: may change between starts
  runner.check_same_config(str(tmp_path), run.config)
  run.config.learning_rate = 0.05
  with pytest.raises(ValueError, match='was trained with learning_rate=0.1, this sweep has 0.05'):
    runner.check_same_config(str(tmp_path), run.config)


@pytest.fixture(scope='module')
def sweep_run(tmp_path_factory):
  """The tiny grid, run once for the tests below (which copy it before changing anything), and its log."""
  workdir = tmp_path_factory.mktemp('sweep')
  messages = []
  bn_sweep.run_sweep(_config(TINY), str(workdir), log=messages.append)
  return workdir, messages


@pytest.fixture(scope='module')
def sweep_dir(sweep_run):
  return sweep_run[0]


def test_the_sweeps_log_gives_percent_and_points_as_its_table(sweep_run):
  # It had given fractions (gap +0.4952) where results.md has points (+49.52).
  workdir, messages = sweep_run
  with open(workdir / 'results.csv', newline='', encoding='utf-8') as file:
    rows = list(csv.DictReader(file))
  for index, row in enumerate(rows, 1):
    expected = (f"[{index}/{len(rows)}] {row['name']}: top-1 {100 * float(row['moving_top1']):.2f}% with moving "
                f"statistics, gap {100 * float(row['gap']):+.2f} points, ")
    assert [message for message in messages if message.startswith(expected)], expected


def test_sweep_writes_tables_and_plots(sweep_dir):
  with open(sweep_dir / 'results.csv', newline='', encoding='utf-8') as file:
    rows = list(csv.DictReader(file))
  assert tuple(rows[0]) == tables.RESULT_COLUMNS
  assert [row['name'] for row in rows] == TINY_NAMES
  for row in rows:
    assert row['step'] == '20' and row['batch_size'] == '16' and row['num_examples'] == '360'
    for column in ('moving_top1', 'batch_top1', 'recalibrated_top1'):
      assert 0.0 <= float(row[column]) <= 1.0, column
    assert float(row['gap']) == pytest.approx(float(row['batch_top1']) - float(row['moving_top1']))
  assert [(row['decay'], row['zero_debias_moving_mean']) for row in rows] == [
      ('0.9', 'False'), ('0.9', 'True'), ('0.99', 'False'), ('0.99', 'True')]

  with open(sweep_dir / 'curves.csv', newline='', encoding='utf-8') as file:
    curves = list(csv.DictReader(file))
  assert [(row['name'], row['step']) for row in curves] == [
      (name, step) for name in TINY_NAMES for step in ('10', '20')]
  final = {row['name']: row['eval_top1'] for row in curves if row['step'] == '20'}
  assert all(float(final[row['name']]) == pytest.approx(float(row['moving_top1'])) for row in rows)

  table = (sweep_dir / 'results.md').read_text(encoding='utf-8').splitlines()
  assert table[2].startswith('| decay | zero-debias | batch size | steps | moving stats | batch stats | recalibrated')
  assert len([line for line in table if line.startswith('| 0.9')]) == 4
  assert '| 0.99 | yes | 16 | 20 |' in table[-1]

  for name in ('accuracy_vs_step.png', 'gap_vs_decay.png'):
    content = (sweep_dir / name).read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 10_000, name
  assert not [path for path in sweep_dir.rglob('*.tmp')]


def test_eval_py_on_a_sweeps_folder_names_its_runs(sweep_dir):
  # It had said "no checkpoint in DIR/checkpoints; train first".
  first = sweep_dir / 'runs' / TINY_NAMES[0]
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(
      f"--workdir {sweep_dir} is a BN sweep's folder, not one run's: pass one of its runs, --workdir={first} (runs: "
      f'{TINY_NAMES[0]}, {TINY_NAMES[1]}, ...).')):
    eval_lib.evaluate(_config(TINY), str(sweep_dir))
  # A sweep started in another sweep's runs/ is refused too; its own folder again goes on with it.
  with pytest.raises(ValueError, match=re.escape(f"--workdir {sweep_dir / 'runs'} is the runs/ folder of the sweep in "
                                                 f'{sweep_dir}; pass --workdir={sweep_dir} to go on with that sweep')):
    bn_sweep.run_sweep(_config(TINY), str(sweep_dir / 'runs'), log=lambda message: None)
  assert sorted(os.listdir(sweep_dir / 'runs')) == sorted(TINY_NAMES)


def _mtimes(workdir, file_name):
  return {name: os.stat(workdir / 'runs' / name / file_name).st_mtime_ns for name in TINY_NAMES}


def test_same_command_again_skips_finished_runs_and_redoes_one_without_result(sweep_dir, tmp_path):
  """The grid given as flags names the same runs; only the one without result.json runs, untrained."""
  workdir = tmp_path / 'sweep'
  shutil.copytree(sweep_dir, workdir)
  redone = TINY_NAMES[1]
  os.remove(workdir / 'runs' / redone / 'result.json')
  os.remove(workdir / 'results.md')
  results_before, metrics_before = _mtimes(sweep_dir, 'result.json'), _mtimes(workdir, 'metrics.jsonl')

  flags = [f'--config.{path}={_flag(value)}' for path, value in TINY.items()]
  completed = subprocess.run([sys.executable, '-m', 'resnet_flax.bn_sweep', '--config=configs/bn_sweep.py',
                              f'--workdir={workdir}', *flags], cwd=REPO, capture_output=True, text=True)
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert completed.stdout.count('finished before, skipped') == 3
  assert f'{redone}: running' in completed.stdout
  results_after = _mtimes(workdir, 'result.json')
  assert {name for name in TINY_NAMES if results_after[name] != results_before[name]} == {redone}
  # The redone run's training had finished: its checkpoint is evaluated, nothing is trained or logged.
  assert _mtimes(workdir, 'metrics.jsonl') == metrics_before
  old, new = (atomic_files.read_json(str(root / 'runs' / redone / 'result.json')) for root in (sweep_dir, workdir))
  assert {key: new[key] for key in ('step', 'moving', 'batch', 'recalibrated', 'curve')} == {
      key: old[key] for key in ('step', 'moving', 'batch', 'recalibrated', 'curve')}
  assert (workdir / 'results.md').read_text() == (sweep_dir / 'results.md').read_text()


# The two runs of a one-debias grid, and a sweep a signal stops after `step` of its first run.
FIRST, SECOND = 'decay0.9_debias0_bs16_steps20', 'decay0.99_debias0_bs16_steps20'


def _sweep_signalled_at(step, config, workdir, monkeypatch):
  """run_sweep's return and its last message, with SIGTERM seen after training step `step`."""
  messages = []
  monkeypatch.setattr(runner.train_lib, '_preemption_check', lambda: ((lambda now: now >= step), lambda: None))
  returned = bn_sweep.run_sweep(config, str(workdir), log=messages.append)
  monkeypatch.undo()
  return returned, messages[-1]


def test_a_preempted_run_stops_the_sweep_unrecorded_and_the_same_command_resumes_it(tmp_path, monkeypatch):
  # A signal had made train_and_evaluate return at the saved step: the run was then recorded
  # as finished (its row read 20 steps after 5) and the next run trained.
  config = _config(dict(TINY, checkpoint_every_steps=5), zero_debias_moving_mean=(False,))
  assert _sweep_signalled_at(5, config, tmp_path, monkeypatch) == (
      [], f'Preempted: {FIRST} stopped at step 5 of 20 (saved); rerun the same command to resume the sweep.')
  assert not (tmp_path / 'runs' / FIRST / 'result.json').exists() and not (tmp_path / 'runs' / SECOND).exists()
  assert not (tmp_path / 'results.csv').exists()
  results = bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert [result['name'] for result in results] == [FIRST, SECOND]
  assert [result['step'] for result in results] == [20, 20]


def test_a_signal_at_a_runs_last_step_records_the_run_and_stops_the_sweep(tmp_path, monkeypatch):
  # Its step count had not told it from a finished run: the sweep had trained the next one.
  config = _config(TINY, zero_debias_moving_mean=(False,))
  assert _sweep_signalled_at(20, config, tmp_path, monkeypatch) == (
      [], f'Preempted: {FIRST} finished, then a signal stopped the sweep; rerun the same command to go on.')
  assert (tmp_path / 'runs' / FIRST / 'result.json').exists() and not (tmp_path / 'runs' / SECOND).exists()


# As on the command line: the overrides are checked as absl read them, flag files included.
def test_a_swept_field_in_a_flag_file_is_refused_in_one_line(tmp_path):
  (tmp_path / 'flags').write_text('--config.batch_size=16\n')
  completed = subprocess.run([sys.executable, '-m', 'resnet_flax.bn_sweep', '--config=configs/bn_sweep.py',
                              f'--workdir={tmp_path / "sweep"}', f'--flagfile={tmp_path / "flags"}',
                              '--config.sweep.decay=(0.9,)', '--config.sweep.zero_debias_moving_mean=(False,)',
                              '--config.sweep.num_train_steps=(2,)'], cwd=REPO, capture_output=True, text=True)
  assert completed.returncode == 2, completed.stderr[-2000:]
  assert completed.stderr.strip().splitlines() == [
      'error: config.batch_size is set by the sweep (config.sweep.batch_size); drop --config.batch_size or put the '
      'value(s) in --config.sweep.batch_size.']
  assert not (tmp_path / 'sweep' / 'runs').exists()
