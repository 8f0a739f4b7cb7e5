"""Test-wide settings: CPU, and float32 matmuls at full precision for exact references."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Tests compile many small programs once each; XLA's optimization passes cost more
# than they save there (Flax's own train_test does the same).
jax.config.update('jax_disable_most_optimizations', True)
