"""Parameter counts and output shapes of the full-size models: the counts equal TF-Slim's (traced,
never compiled)."""

import math

import jax
import jax.numpy as jnp
import pytest

from resnet_flax import models

# (trainable parameters, all variables incl. moving statistics), printed by
# tests/fixtures/slim_param_counts.py from tf_slim 1.1.0's own resnet_v1/resnet_v2.
SLIM_COUNTS = {
    ('resnet_v1_50', 1000): (25557032, 25610152),
    ('resnet_v1_50', 1001): (25559081, 25612201),
    ('resnet_v1_50', None): (23508032, 23561152),
    ('resnet_v1_101', 1000): (44549160, 44654504),
    ('resnet_v1_101', 1001): (44551209, 44656553),
    ('resnet_v1_101', None): (42500160, 42605504),
    ('resnet_v1_152', 1000): (60192808, 60344232),
    ('resnet_v1_152', 1001): (60194857, 60346281),
    ('resnet_v1_152', None): (58143808, 58295232),
    ('resnet_v1_200', 1000): (64673832, 64849832),
    ('resnet_v1_200', 1001): (64675881, 64851881),
    ('resnet_v1_200', None): (62624832, 62800832),
    ('resnet_v2_50', 1000): (25568360, 25613800),
    ('resnet_v2_50', 1001): (25570409, 25615849),
    ('resnet_v2_50', None): (23519360, 23564800),
    ('resnet_v2_101', 1000): (44577896, 44675560),
    ('resnet_v2_101', 1001): (44579945, 44677609),
    ('resnet_v2_101', None): (42528896, 42626560),
    ('resnet_v2_152', 1000): (60236904, 60380648),
    ('resnet_v2_152', 1001): (60238953, 60382697),
    ('resnet_v2_152', None): (58187904, 58331648),
    ('resnet_v2_200', 1000): (64726120, 64894440),
    ('resnet_v2_200', 1001): (64728169, 64896489),
    ('resnet_v2_200', None): (62677120, 62845440),
}


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('name,num_classes', sorted(SLIM_COUNTS, key=str))
def test_parameter_count_equals_slims(name, num_classes):
  model = models.get_model(name, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), x)
  trainable, total = SLIM_COUNTS[(name, num_classes)]
  assert _count(variables['params']) == trainable
  assert _count(variables['params']) + _count(variables['batch_stats']) == total
  # slim's spatial_squeeze: logits (1, classes); without a logits layer, the pooled features.
  assert out.shape == ((1, num_classes) if num_classes else (1, 1, 1, 2048)) and out.dtype == jnp.float32
