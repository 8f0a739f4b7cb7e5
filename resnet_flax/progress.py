"""A one-line console progress bar: step, loss, accuracy, img/s and ETA."""

from __future__ import annotations

import sys
from typing import Mapping, Optional, TextIO


def format_duration(seconds: float) -> str:
  """`seconds` as 'MM:SS', or 'H:MM:SS' from an hour up (a negative duration reads as zero)."""
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes:02d}:{secs:02d}'


class ProgressBar:
  """Redraws one line on a terminal; prints a line per update when output is a file."""

  def __init__(self, total_steps: int, enabled: bool = True, stream: Optional[TextIO] = None, width: int = 24):
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.width = width
    self._interactive = getattr(self.stream, 'isatty', lambda: False)()

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

  def message(self, text: str) -> None:
    """Prints `text` on its own line, leaving the bar intact."""
    if self.enabled:
      self.stream.write(('\n' if self._interactive else '') + text + '\n')
      self.stream.flush()
