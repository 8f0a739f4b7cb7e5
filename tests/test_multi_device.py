"""One code path for 1 to N devices: 8 fake CPU devices train like 1 (synchronized BN), and
checkpoints move between device counts. Each device count needs its own process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from test_train import REPO, _read_params, tiny_config

# A gentle learning rate: at the default 0.1 (gradient norms near 90 in the first steps)
# the 1e-7 differences in summation order between 1 and 8 devices grow to O(1) by step
# ~14 (measured), which would hide what this test checks: the same function, with batch
# statistics over the global batch (per-device statistics would move the moving
# variances by far more than the tolerance).
ARGS = ['--config=configs/digits.py', '--config.num_train_steps=20', '--config.batch_size=16',
        '--config.eval_batch_size=360', '--config.checkpoint_every_steps=0', '--config.log_every_steps=10',
        '--config.learning_rate=1e-4', '--config.warmup_steps=0']


def _run(script, devices, *args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  done = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                        text=True, env=env, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_eight_devices_train_like_one_and_checkpoints_move_between_device_counts(tmp_path):
  eight, one = tmp_path / 'eight', tmp_path / 'one'
  trained_on_8 = _run('train.py', 8, f'--workdir={eight}', *ARGS)
  trained_on_1 = _run('train.py', 1, f'--workdir={one}', *ARGS)
  config = tiny_config(20)
  config.lr_schedule = 'cosine'
  a, b = _read_params(eight, config, 20), _read_params(one, config, 20)
  # Batch statistics under jit are over the global batch, so only summation order differs.
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
                         (a.params, a.batch_stats), (b.params, b.batch_stats))
  assert abs(trained_on_8['loss'] - trained_on_1['loss']) < 1e-5
  # Saved on 8 devices, restored on 4 (and on 1 above, by _read_params in this process).
  evaluated_on_4 = _run('eval.py', 4, f'--workdir={eight}', '--config=configs/digits.py',
                        '--config.eval_batch_size=360')
  assert evaluated_on_4['step'] == 20
  assert abs(evaluated_on_4['loss'] - trained_on_8['loss']) < 1e-5
  assert evaluated_on_4['top1'] == trained_on_8['top1']
