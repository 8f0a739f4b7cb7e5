"""Batch-norm sweeps: a grid of training runs, their train/eval BN discrepancy, tables and plots.

`python -m resnet_flax.bn_sweep --config=configs/bn_sweep.py --workdir=DIR`, or `run_sweep`.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from resnet_flax import checkpoints, config_checks
from resnet_flax.bn_sweep import grid, plots, runner, tables


def run_sweep(config: ml_collections.ConfigDict, workdir: str,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every unfinished run of `config.sweep`'s grid, then writes tables and plots of them all."""
  runs = grid.expand(config)
  for run in runs:  # every run's settings, before the first one trains
    config_checks.check_config(run.config)
  checkpoints.check_workdir(workdir, needed_bytes=0)  # each run checks its own room when it starts
  plots.require_matplotlib()
  results = runner.run_all(runs, workdir, config.sweep.recalibration_batches, log)
  for path in tables.write_tables(results, workdir) + plots.write_plots(results, workdir):
    log(f'wrote {path}')
  return results
