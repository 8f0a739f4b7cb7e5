"""Test-wide settings: CPU, and float32 matmuls at full precision for exact references."""

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

jax.config.update('jax_default_matmul_precision', 'highest')
