"""What a BN sweep records and shows, without training: each number of a result from its own
report row, the runner's calls and resume checks, the tables' columns and the plotted data."""

import json
import os

import pytest

from resnet_flax import bn_sweep, metrics_writer, train_lib
from resnet_flax.bn_sweep import grid, plots, runner, tables
from resnet_flax.bn_sweep import results as results_lib
from test_bn_sweep import TINY, _config
from test_precise_bn import report_row


def _run(**sweep):
  (run,) = grid.expand(_config(**{'decay': (0.9,), 'zero_debias_moving_mean': (False,), 'batch_size': (16,),
                                  'num_train_steps': (20,), **sweep}))
  return run


# Each number comes from its own row, the batch row of the run's own batch size; gap = batch -
# moving by hand.
def test_a_result_takes_each_number_from_its_own_report_row():
  report = {'step': 20, 'moving': report_row(0.5, 1.25, 360),
            'batch': {8: report_row(0.625, 1.0, 360), 16: report_row(0.75, 0.5, 352)},
            'recalibrated': report_row(0.875, 0.25, 360)}
  result = results_lib.summarize(_run(), report, [], recalibration_batches=2, seconds=3.0)
  assert result['moving'] == {'top1': 0.5, 'loss': 1.25, 'num_examples': 360}
  assert result['batch'] == {'top1': 0.75, 'loss': 0.5, 'num_examples': 352}
  assert result['recalibrated'] == {'top1': 0.875, 'loss': 0.25, 'num_examples': 360}
  assert result['gap'] == 0.25 and result['step'] == 20


# An evaluation at the step that diverged scored the broken parameters.
def test_a_diverged_runs_curve_leaves_out_an_evaluation_at_the_bad_step():
  curve = [{'step': 10, 'top1': 0.5, 'loss': 1.0}, {'step': 20, 'top1': 0.1, 'loss': None}]
  result = results_lib.diverged_result(_run(), 20, curve, recalibration_batches=0, seconds=1.0)
  assert result['curve'] == curve[:1]


# A finished run with another recalibration count is redone (its diagnostics); a diverged one is not.
def test_a_result_with_another_recalibration_count_is_not_finished():
  done = {'diverged_at_step': None, 'recalibration_batches': 20}
  assert results_lib.is_finished(done, 20)
  assert not results_lib.is_finished(done, 5) and not results_lib.is_finished(done, 40)
  assert not results_lib.is_finished(None, 20)
  assert results_lib.is_finished({'diverged_at_step': 3, 'recalibration_batches': 20}, 5)


def _writereport_row(directory, records):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'metrics.jsonl'), 'w', encoding='utf-8') as file:
    file.writelines(json.dumps(record) + '\n' for record in records)


# A step logged twice counts with its last record, and the curve is ordered by step, not by line.
def test_eval_curve_is_by_step_with_the_last_record_of_a_step(tmp_path):
  _writereport_row(str(tmp_path), [
      {'step': 20, 'eval/top1': 0.25, 'eval/loss': 2.0},
      {'step': 10, 'train/loss': 2.5},
      {'step': 10, 'eval/top1': 0.125, 'eval/loss': 3.0},
      {'step': 20, 'eval/top1': 0.5, 'eval/loss': 1.5},  # logged again: this one counts
  ])
  assert runner.eval_curve(str(tmp_path)) == [{'step': 10, 'top1': 0.125, 'loss': 3.0},
                                              {'step': 20, 'top1': 0.5, 'loss': 1.5}]


# How often a run saves or logs changes nothing it computes.
def test_a_run_may_resume_with_other_bookkeeping(tmp_path):
  run = _run()
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({**run.config.to_dict(), 'device_count': 1})
  writer.close()
  for field, value in (('checkpoint_every_steps', 3), ('log_every_steps', 7), ('keep_checkpoints', 1),
                       ('async_checkpointing', not run.config.async_checkpointing)):
    setattr(run.config, field, value)
  # Nor do how processes meet and whether activations are recomputed: train.py resumes with others.
  run.config.distributed.initialization_timeout_s = 30
  run.config.model_options.remat = True
  runner.check_same_config(str(tmp_path), run.config)


# Refused, not tabled under this sweep's settings.
def test_a_finished_run_trained_with_another_config_is_refused_not_skipped(tmp_path):
  run = _run()
  directory = runner.run_directory(str(tmp_path), run.name)
  os.makedirs(directory)
  writer = metrics_writer.MetricsWriter(directory)
  writer.record_config({**run.config.to_dict(), 'learning_rate': 0.5, 'device_count': 1})
  writer.close()
  result = results_lib.diverged_result(run, 3, [], recalibration_batches=2, seconds=1.0)
  with open(os.path.join(directory, 'result.json'), 'w', encoding='utf-8') as file:
    json.dump(result, file)
  with pytest.raises(ValueError, match='was trained with learning_rate=0.5'):
    runner.run_all([run], str(tmp_path), recalibration_batches=2, log=lambda message: None)


def test_run_one_asks_for_the_report_at_the_runs_batch_size_and_records_the_diverged_step(tmp_path, monkeypatch):
  run = _run(batch_size=(24,))
  asked = {}

  def report(config, workdir, batch_sizes, recalibration_batches):
    asked.update(workdir=workdir, batch_sizes=tuple(batch_sizes), recalibration_batches=recalibration_batches)
    return {'step': 20, 'moving': report_row(0.5, 1.0, 360), 'batch': {24: report_row(0.75, 0.5, 336)},
            'recalibrated': report_row(0.625, 0.75, 360)}

  monkeypatch.setattr(runner.train_lib, 'train_and_evaluate', lambda config, workdir: {'step': 20})
  monkeypatch.setattr(runner.bn_diagnostics, 'discrepancy_report', report)
  result = runner.run_one(run, str(tmp_path), recalibration_batches=3)
  assert asked == {'workdir': runner.run_directory(str(tmp_path), run.name), 'batch_sizes': (24,),
                   'recalibration_batches': 3}
  assert result['batch']['num_examples'] == 336 and result['recalibration_batches'] == 3

  def diverge(config, workdir):
    raise train_lib.NonFiniteLossError('non-finite loss', step=7)

  monkeypatch.setattr(runner.train_lib, 'train_and_evaluate', diverge)
  assert runner.run_one(_run(decay=(0.5,)), str(tmp_path), recalibration_batches=3)['diverged_at_step'] == 7


# Its diagnostics, not the old numbers.
def test_a_finished_run_is_redone_under_another_recalibration_count(tmp_path, monkeypatch):
  run = _run()
  directory = runner.run_directory(str(tmp_path), run.name)
  os.makedirs(directory)
  with open(os.path.join(directory, 'result.json'), 'w', encoding='utf-8') as file:
    json.dump(dict(_result(), name=run.name, settings=run.settings, recalibration_batches=20), file)
  redone = []
  monkeypatch.setattr(runner, 'run_one', lambda run, workdir, batches: redone.append(batches) or
                      dict(_result(), name=run.name, recalibration_batches=batches))
  assert runner.run_all([run], str(tmp_path), 20, log=lambda message: None)[0]['recalibration_batches'] == 20
  assert redone == []
  assert runner.run_all([run], str(tmp_path), 5, log=lambda message: None)[0]['recalibration_batches'] == 5
  assert redone == [5]


# config.sweep.recalibration_batches, not config.bn_recalibration_batches (0 here).
def test_the_sweep_passes_its_recalibration_count_to_the_runs(tmp_path, monkeypatch):
  config = _config(TINY, decay=(0.9,), zero_debias_moving_mean=(False,), recalibration_batches=3)
  asked = []

  def run_all(runs, workdir, recalibration_batches, log):
    asked.append(recalibration_batches)
    result = dict(_result(), name=runs[0].name, settings=runs[0].settings, recalibration_batches=recalibration_batches)
    return [result]

  monkeypatch.setattr(runner, 'run_all', run_all)
  results = bn_sweep.run_sweep(config, str(tmp_path), log=lambda message: None)
  assert asked == [3] and results[0]['recalibration_batches'] == 3
  assert 'recalibration on 3 training batches' in (tmp_path / 'results.md').read_text(encoding='utf-8')


def _result(decay=0.9, recalibration_batches=20):
  return {'name': f'decay{decay}', 'settings': {'decay': decay, 'zero_debias_moving_mean': False, 'batch_size': 32,
                                                'num_train_steps': 150},
          'step': 150, 'eval_split': 'test', 'moving': {'top1': 0.5, 'loss': 1.25, 'num_examples': 360},
          'batch': {'top1': 0.875, 'loss': 0.5, 'num_examples': 352},
          'recalibrated': {'top1': 0.75, 'loss': 0.625, 'num_examples': 360},
          'recalibration_batches': recalibration_batches, 'gap': 0.375, 'diverged_at_step': None,
          'curve': [{'step': 75, 'top1': 0.25, 'loss': 2.0}, {'step': 150, 'top1': 0.5, 'loss': 1.25}],
          'seconds': 1.5}


# Every cell, each value distinct, against the result by hand.
def test_a_result_row_puts_every_number_in_its_own_column():
  assert tables.result_row(_result()) == {
      'name': 'decay0.9', 'decay': 0.9, 'zero_debias_moving_mean': False, 'batch_size': 32, 'num_train_steps': 150,
      'step': 150, 'diverged_at_step': '', 'moving_top1': 0.5, 'moving_loss': 1.25, 'batch_top1': 0.875,
      'batch_loss': 0.5, 'recalibrated_top1': 0.75, 'recalibrated_loss': 0.625, 'gap': 0.375,
      'recalibration_batches': 20, 'num_examples': 360, 'batch_num_examples': 352, 'seconds': 1.5}


@pytest.mark.parametrize('batches, says', [
    (20, 'after precise-BN recalibration on 20 training batches'),
    (0, 'no recalibration (recalibration_batches=0)'),
])
def test_markdown_table_says_how_many_batches_recalibrated(batches, says):
  first_line = tables.markdown_table([_result(recalibration_batches=batches)]).splitlines()[0]
  assert says in first_line


# Batch statistics worse than the moving ones: a negative gap.
def test_markdown_table_keeps_the_sign_of_a_negative_gap():
  result = dict(_result(), batch={'top1': 0.375, 'loss': 2.0, 'num_examples': 352}, gap=-0.125)
  assert tables.markdown_table([result]).splitlines()[-1] == (
      '| 0.9 | no | 32 | 150 | 50.00% | 37.50% | 75.00% | -12.50 |')


def _plotted(monkeypatch, plot, results):
  """The (label, x, y) of every line `plot` draws, read from the figure instead of its PNG."""
  figures = []
  monkeypatch.setattr(plots, '_save', lambda figure, path: figures.append(figure))
  plot(results, 'unused.png')
  (figure,) = figures
  return [[(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()
           if not line.get_label().startswith('_')] for axis in figure.axes if axis.get_lines()]


def _plot_result(decay, debias, batch_size, steps, gap, curve):
  return {'name': f'd{decay}{debias}{batch_size}', 'eval_split': 'test', 'diverged_at_step': None, 'gap': gap,
          'settings': {'decay': decay, 'zero_debias_moving_mean': debias, 'batch_size': batch_size,
                       'num_train_steps': steps},
          'curve': [{'step': step, 'top1': top1, 'loss': 9.0} for step, top1 in curve]}


# One panel per (batch size, steps); each line is its run's top-1 curve.
def test_accuracy_plot_draws_each_runs_curve_in_its_panel(monkeypatch):
  results = [_plot_result(0.9, False, 16, 20, 0.1, [(10, 0.25), (20, 0.5)]),
             _plot_result(0.99, True, 16, 20, 0.2, [(10, 0.125), (20, 0.375)]),
             _plot_result(0.9, False, 16, 40, 0.3, [(20, 0.625), (40, 0.75)])]
  panels = _plotted(monkeypatch, plots.plot_accuracy_vs_step, results)
  assert panels == [[('decay 0.9', [10, 20], [0.25, 0.5]), ('decay 0.99, zero-debias', [10, 20], [0.125, 0.375])],
                    [('decay 0.9', [20, 40], [0.625, 0.75])]]


# Zero-debias in a line's key (two lines, not one), points in order of decay.
def test_gap_plot_draws_the_gap_in_points_against_the_decays_rank(monkeypatch):
  results = [_plot_result(decay, debias, 32, 150, gap, [(150, 0.5)])
             for decay, debias, gap in [(0.999, False, 0.25), (0.9, False, 0.0625), (0.99, False, 0.125),
                                        (0.999, True, -0.03125), (0.9, True, 0.5), (0.99, True, 0.0)]]
  for result in results:
    result['moving'] = {'top1': 0.5}
  (lines,) = _plotted(monkeypatch, plots.plot_gap_vs_decay, results)
  assert lines == [('batch 32, biased mean', [0, 1, 2], [6.25, 12.5, 25.0]),
                   ('batch 32, zero-debias', [0, 1, 2], [50.0, 0.0, -3.125])]
