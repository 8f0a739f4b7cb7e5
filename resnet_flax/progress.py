"""Console progress: training's one-line bar (step, loss, accuracy, img/s, ETA), and a line
now and then through a long pass over batches (an evaluation, precise BN)."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Callable, Iterator, Mapping, Optional, TextIO

import jax


@contextlib.contextmanager
def warnings_as_lines(category: type[Warning], show_line: Callable[[str], None]) -> Iterator[None]:
  """Within it, a warning of `category` is the one line `warning: <message>`, given to `show_line`
  (Python's form names a source location and the class); any other shows as before."""
  with warnings.catch_warnings():  # gives the showwarning before it back
    shown_before = warnings.showwarning

    def show(message, shown_category, filename, lineno, file=None, line=None):
      if issubclass(shown_category, category):
        show_line(f'warning: {message}')
      else:
        shown_before(message, shown_category, filename, lineno, file, line)
    warnings.showwarning = show
    yield


def format_duration(seconds: float) -> str:
  """`seconds` as 'MM:SS', or 'H:MM:SS' from an hour up (a negative duration reads as zero)."""
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes:02d}:{secs:02d}'


class ProgressBar:
  """Redraws one line on a terminal; prints a line per update when output is a file."""

  def __init__(self, total_steps: int, enabled: bool = True, stream: Optional[TextIO] = None, width: int = 24,
               warning_stream: Optional[TextIO] = None):
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.warning_stream = warning_stream or sys.stderr
    self.width = width
    self._interactive = getattr(self.stream, 'isatty', lambda: False)()
    self._on_the_bars_line = False  # a terminal's cursor, after the bar and before its newline

  def update(self, step: int, metrics: Mapping[str, float], images_per_second: float,
             seconds_per_step: float) -> None:
    """Shows `step` of the total with `metrics`, the img/s and the ETA at `seconds_per_step`."""
    if not self.enabled:
      return
    done = min(step / max(self.total_steps, 1), 1.0)
    bar = '#' * int(done * self.width) + '.' * (self.width - int(done * self.width))
    eta = format_duration((self.total_steps - step) * seconds_per_step)
    fields = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    line = f'[{bar}] {step}/{self.total_steps} {fields} | {images_per_second:,.0f} img/s | ETA {eta}'
    self.stream.write(('\r' + line + '\033[K') if self._interactive else line + '\n')
    self.stream.flush()
    self._on_the_bars_line = self._interactive

  def message(self, text: str) -> None:
    """Prints `text` on its own line, leaving the bar intact: a `warning:` line on the warning
    stream (stderr, where eval.py's and the command line's go), the others with the bar."""
    if not self.enabled:
      return
    self.end_line()  # once: two messages in a row had a blank line between them
    stream = self.warning_stream if text.startswith('warning:') else self.stream
    stream.write(text + '\n')
    stream.flush()

  def showing_warnings(self, category: type[Warning]) -> contextlib.AbstractContextManager:
    """Within it, a warning of `category` is a `message`, off the bar's line (it had been glued to
    its end on a terminal); a disabled bar (another process's) leaves them as they were shown."""
    return warnings_as_lines(category, self.message) if self.enabled else contextlib.nullcontext()

  def end_line(self) -> None:
    """Ends a terminal's bar line, so that what comes next (a message, an error, the shell's
    prompt) starts a line of its own."""
    if self._on_the_bars_line:
      self.stream.write('\n')
      self.stream.flush()
      self._on_the_bars_line = False


class BatchProgress:
  """Says how far a pass over `total_batches` batches of `batch_size` images has come, on a
  line of its own at most every `every_s` seconds: a pass over ImageNet's validation set
  takes minutes, which had gone by without a word. Nothing is shown for a pass shorter than that."""

  def __init__(self, label: str, total_batches: int, batch_size: int, stream: Optional[TextIO] = None,
               every_s: float = 10.0, clock: Callable[[], float] = time.perf_counter):
    self.label = label
    self.total_batches = total_batches
    self.batch_size = batch_size
    self.stream = stream or sys.stdout
    self.every_s = every_s
    self._clock = clock
    self._start = self._last = clock()

  def due(self) -> bool:
    """Whether a line is due; the caller then waits for the batches so far and calls `show`."""
    return self._clock() - self._last >= self.every_s

  def show(self, done_batches: int) -> None:
    """Prints the batches done of the total, the images per second since the start and the ETA."""
    now = self._clock()
    self._last = now
    elapsed = max(now - self._start, 1e-9)
    eta = format_duration((self.total_batches - done_batches) * elapsed / max(done_batches, 1))
    self.stream.write(f'{self.label}: {done_batches}/{self.total_batches} batches | '
                      f'{done_batches * self.batch_size / elapsed:,.0f} img/s | ETA {eta}\n')
    self.stream.flush()


def batch_progress(show: bool, label: str, total_batches: int, batch_size: int) -> Optional[BatchProgress]:
  """A `BatchProgress` where `show` is set, on process 0 only (the one that prints); else None."""
  if not show or jax.process_index() != 0:
    return None
  return BatchProgress(label, total_batches, batch_size)
