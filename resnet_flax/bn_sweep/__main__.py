"""python -m resnet_flax.bn_sweep --config=configs/bn_sweep.py --workdir=DIR [--config.sweep.decay='(0.9,0.999)']

Runs the grid of `config.sweep` into DIR/runs/<name>/ (rerunning resumes: finished runs are
skipped), then writes DIR/results.csv, DIR/curves.csv, DIR/results.md and two PNG plots.
Compiled programs are cached in DIR/compilation_cache unless JAX_COMPILATION_CACHE_DIR is set.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags

from resnet_flax import bn_sweep, cli, config_checks

cli.define_flags()
flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir, --traceback
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  """Runs `--config`'s sweep grid into `--workdir`; a user error is one line on stderr and exit status 2."""
  del argv

  def run():
    workdir = cli.workdir()  # an empty --workdir= is refused here
    if workdir is None:
      raise ValueError('pass --workdir=DIR: the sweep keeps its runs, tables and plots there.')
    # Expanded as ml_collections reads the overrides, so a flag file's are caught too.
    argv = flags.FLAGS.read_flags_from_files(sys.argv[1:], force_gnu=False)
    bn_sweep.grid.check_no_swept_overrides(argv, bn_sweep.grid.SWEPT_FIELDS)
    try:
      bn_sweep.plots.require_matplotlib()
    except ImportError as error:  # One line, before any training.
      raise ValueError(str(error)) from error
    if not jax.config.jax_compilation_cache_dir:
      # Runs differ in a few constants: their evaluation and recalibration programs come out
      # identical and compile once for the grid, and a resumed sweep compiles nothing twice.
      jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'compilation_cache'))
    bn_sweep.run_sweep(FLAGS.config, workdir)

  cli.run_reporting_user_errors(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(config_checks.BN_SWEEP))
