"""Console progress: training's bar, and the lines a long evaluation or recalibration prints."""

import functools
import io
import warnings

import pytest

from resnet_flax import bn_diagnostics, eval_lib, progress, train_lib
from resnet_flax.data import SkippedImageWarning
from resnet_flax.progress import BatchProgress, ProgressBar, format_duration
from test_train import tiny_config


@pytest.mark.parametrize('seconds, shown', [(0, '00:00'), (59.9, '00:59'), (61, '01:01'), (3725, '1:02:05'),
                                            (-3, '00:00')])
def test_durations_read_as_minutes_and_seconds_then_hours(seconds, shown):
  assert format_duration(seconds) == shown


def test_the_bar_prints_a_line_per_update_into_a_file():
  stream = io.StringIO()
  bar = ProgressBar(10, stream=stream, width=10)
  bar.update(5, {'loss': 0.5}, 1234.0, 2.0)
  bar.message('eval at step 5')
  assert stream.getvalue() == '[#####.....] 5/10 loss 0.5 | 1,234 img/s | ETA 00:10\neval at step 5\n'
  ProgressBar(10, enabled=False, stream=stream).update(6, {}, 1.0, 1.0)
  assert stream.getvalue().count('\n') == 2


def test_warnings_go_to_stderr_and_a_terminals_bar_line_ends_first():
  # train.py's warnings had gone to stdout, eval.py's to stderr: `> log` kept one kind only.
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal, errors = Terminal(), io.StringIO()
  bar = ProgressBar(10, stream=terminal, width=10, warning_stream=errors)
  bar.update(5, {}, 1.0, 1.0)
  bar.message('warning: resuming with a changed config: batch_size: 16 -> 8.')
  bar.message('eval at step 5')
  bar.update(6, {}, 1.0, 1.0)
  bar.message('eval at step 6')
  assert errors.getvalue() == 'warning: resuming with a changed config: batch_size: 16 -> 8.\n'
  # One newline ends the bar's line; two messages in a row had a blank line between them.
  bar.update(7, {}, 1.0, 1.0)
  bar.end_line()  # a run that stops here: its error starts a line of its own
  bar.end_line()
  assert terminal.getvalue() == ('\r[#####.....] 5/10  | 1 img/s | ETA 00:05\033[K\neval at step 5\n'
                                 '\r[######....] 6/10  | 1 img/s | ETA 00:04\033[K\neval at step 6\n'
                                 '\r[#######...] 7/10  | 1 img/s | ETA 00:03\033[K\n')


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_skipped_image_during_training_ends_the_bars_line_first():
  # On a terminal, the line had been glued to the bar's end: "... ETA 00:00\033[Kwarning: skipped ...".
  terminal, errors = _Terminal(), io.StringIO()
  bar = ProgressBar(10, stream=terminal, width=10, warning_stream=errors)
  bar.update(5, {}, 1.0, 1.0)
  with warnings.catch_warnings(), bar.showing_warnings(SkippedImageWarning):
    warnings.simplefilter('always')
    warnings.warn('skipped, left out of its batch: cannot decode image a.jpg', SkippedImageWarning)
  assert terminal.getvalue() == '\r[#####.....] 5/10  | 1 img/s | ETA 00:05\033[K\n'
  assert errors.getvalue() == 'warning: skipped, left out of its batch: cannot decode image a.jpg\n'
  # Another process's bar (disabled) leaves them to the hook before it: the command line's, or here pytest's.
  quiet = ProgressBar(10, enabled=False, stream=terminal, warning_stream=errors)
  with pytest.warns(SkippedImageWarning), quiet.showing_warnings(SkippedImageWarning):
    warnings.warn('skipped, left out of its batch: cannot decode image b.jpg', SkippedImageWarning)
  assert 'b.jpg' not in errors.getvalue() + terminal.getvalue()


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_batch_progress_speaks_only_every_interval():
  clock, stream = _Clock(), io.StringIO()
  shown = BatchProgress('eval', total_batches=100, batch_size=50, stream=stream, every_s=10, clock=clock)
  clock.now += 9.9
  assert not shown.due()
  clock.now += 0.1
  assert shown.due()
  shown.show(25)  # 25 batches of 50 in 10 s: 125 img/s, 75 batches left at 0.4 s each
  assert stream.getvalue() == 'eval: 25/100 batches | 125 img/s | ETA 00:30\n'
  assert not shown.due()


def test_a_long_evaluation_and_recalibration_say_how_far_they_have_come(tmp_path, monkeypatch):
  config = tiny_config(2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  stream = io.StringIO()
  # Every batch counts as long: each is due.
  monkeypatch.setattr(progress, 'BatchProgress', functools.partial(BatchProgress, every_s=0, stream=stream))
  config.bn_recalibration_batches = 3
  result = eval_lib.evaluate(config, str(tmp_path))
  lines = stream.getvalue().splitlines()
  eval_steps = -(-360 // config.eval_batch_size)  # the digits test split: 360 images
  evals = [f'eval: {done}/{eval_steps} batches' for done in range(1, eval_steps + 1)]
  recalibration = [f'recalibrating BN: {done}/3 batches' for done in range(1, 4)]
  assert [line.split(' |')[0] for line in lines] == evals + recalibration + evals
  assert result['num_examples'] == 360 and 'before_recalibration' in result


def test_nothing_is_shown_without_asking(tmp_path, monkeypatch):
  config = tiny_config(2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  stream = io.StringIO()
  monkeypatch.setattr(progress, 'BatchProgress', functools.partial(BatchProgress, every_s=0, stream=stream))
  eval_lib.load_checkpoint(config, str(tmp_path)).evaluate()  # as the BN diagnostics and sweeps call it
  assert stream.getvalue() == ''


def test_the_bn_discrepancy_report_says_how_far_each_pass_has_come(tmp_path, monkeypatch):
  config = tiny_config(2)
  train_lib.train_and_evaluate(config, str(tmp_path))
  stream = io.StringIO()
  monkeypatch.setattr(progress, 'BatchProgress', functools.partial(BatchProgress, every_s=0, stream=stream))
  bn_diagnostics.discrepancy_report(config, str(tmp_path), batch_sizes=(120,), recalibration_batches=2,
                                    show_progress=True)
  labels = [line.split(':')[0] for line in stream.getvalue().splitlines()]
  passes = [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label]
  assert passes == ['eval', 'eval with the statistics of batches of 120', 'recalibrating BN', 'eval']
  assert 'eval with the statistics of batches of 120: 3/3 batches' in stream.getvalue()  # 360 images, full batches


# A step past the total (a run resumed with fewer steps) fills the bar, no more; the ETA reads zero.
def test_the_bar_is_full_past_its_total():
  stream = io.StringIO()
  ProgressBar(10, stream=stream, width=10).update(12, {}, 100.0, 1.0)
  assert stream.getvalue() == '[##########] 12/10  | 100 img/s | ETA 00:00\n'


# A run with nothing to do still draws (no division by its total of 0).
def test_a_bar_with_no_steps_draws_empty():
  stream = io.StringIO()
  ProgressBar(0, stream=stream, width=4).update(0, {}, 0.0, 1.0)
  assert stream.getvalue() == '[....] 0/0  | 0 img/s | ETA 00:00\n'


# A line is due exactly `every_s` after the last (whole-number times: no rounding decides it).
def test_a_line_is_due_exactly_at_the_interval():
  clock = _Clock()
  shown = BatchProgress('eval', total_batches=10, batch_size=1, stream=io.StringIO(), every_s=8, clock=clock)
  clock.now = 108.0
  assert shown.due()


# The second line's rate and ETA are over the whole 40 s, not since the last line, by hand.
def test_the_second_line_times_the_whole_pass_so_far():
  clock, stream = _Clock(), io.StringIO()
  shown = BatchProgress('eval', total_batches=100, batch_size=8, stream=stream, every_s=10, clock=clock)
  clock.now = 110.0
  shown.show(10)  # 80 images in 10 s; 90 batches left at 1 s each
  clock.now = 140.0
  shown.show(40)  # 320 images in 40 s; 60 batches left at 1 s each
  assert stream.getvalue().splitlines() == ['eval: 10/100 batches | 8 img/s | ETA 01:30',
                                            'eval: 40/100 batches | 8 img/s | ETA 01:00']
