"""Test-wide settings: CPU, float32 matmuls at full precision for exact references, and the
number of test workers."""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One compilation cache for this process and the train.py/eval.py subprocesses the tests
# start: the same programs recur (resume runs, CLI runs) and compiling dominates.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'resnet_flax_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Tests compile many small programs once each; XLA's optimization passes cost more
# than they save there (Flax's own train_test does the same). Set through the
# environment so subprocesses inherit it.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.hookimpl(optionalhook=True)  # With xdist off (`-p no:xdist -o addopts=`), nothing asks.
def pytest_xdist_auto_num_workers(config) -> int:
  """Workers for `-n auto`: the cores this process may use (xdist counts the machine's,
  which a CPU-limited container overstates), at most 8, each a JAX process of its own.

  Compiling is mostly single-threaded: one test process kept 1.2 of 2 cores busy (cold
  compilation cache), and two workers took the suite from 12.7 to 9.2 min.
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
  return max(1, min(cores, 8))
