"""BatchNorm on inputs of rank 2 to 5 against tf_slim's numbers (`fixtures/slim_bn_ranks.npz`).

TF-Slim's `fused=True` runs a fused kernel, which feeds the moving variance the unbiased batch
variance, only for some ranks (`slim_fuses`): a rank-3 input, or a zero-debiased rank-5 one,
feeds the biased variance whatever `fused` says.
"""

import json
import os

import jax
import numpy as np
import pytest

from resnet_flax.layers.batch_norm import BatchNorm, slim_fuses
from resnet_flax.slim import names

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'slim_bn_ranks.npz')


def npz_cases(path: str) -> dict[str, dict[str, np.ndarray]]:
  """A fixture's arrays by case: `<case>/<leaf>` keys as {case: {leaf: array}}."""
  with np.load(path) as data:
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
      case, leaf = key.split('/', 1)
      cases.setdefault(case, {})[leaf] = data[key]
  return cases


CASES = npz_cases(FIXTURE)


def test_the_fixture_holds_every_rank_and_code_path():
  assert len(CASES) == 16
  assert {name.split('_')[0] for name in CASES} == {'2d', '3d', '4d', '5d'}


@pytest.mark.parametrize('name', sorted(CASES))
def test_one_train_step_matches_tf_slim(name):
  case = CASES[name]
  config = json.loads(str(case['config']))
  x = case['x']
  assert bool(case['kernel']) == slim_fuses(x.ndim, config['fused'], config['zero_debias_moving_mean'])
  layer = BatchNorm(decay=config['decay'], epsilon=config['epsilon'], center=True, scale=True, fused=config['fused'],
                    zero_debias_moving_mean=config['zero_debias_moving_mean'])
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  stats = dict(variables['batch_stats'])
  stats['moving_mean'] = np.full_like(stats['moving_mean'], 0.7)
  stats['moving_variance'] = np.full_like(stats['moving_variance'], 1.0)
  y, updates = layer.apply({**variables, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, case['train_y'], rtol=1e-5, atol=1e-5)
  ours = names.to_slim({**variables, **updates}, 'BatchNorm')
  theirs = {key.removeprefix('after/'): value for key, value in case.items() if key.startswith('after/')}
  assert set(ours) == set(theirs)
  for key, value in theirs.items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-5, err_msg=f'{name} {key}')
