"""Metrics to `workdir/metrics.jsonl` and TensorBoard event files (no TensorFlow needed)."""

from __future__ import annotations

import json
import os
from typing import Mapping


class MetricsWriter:
  """Appends one JSON object per logged step and the same scalars to TensorBoard.

  Only process 0 writes (`enabled=False` elsewhere), so multi-host runs keep one record.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # Imported here: only process 0 needs it.
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records scalars for `step`; keys like 'train/loss' become TensorBoard tags."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': int(step), **{k: float(v) for k, v in metrics.items()}}) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
