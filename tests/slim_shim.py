"""Imports tf_slim 1.1.0 on TensorFlow 2.x (tests and fixture scripts only; never the library).

tf_slim 1.1.0 imports `tf_keras.legacy_tf_layers...` and `tensorflow.python.framework.ops.Tensor`,
both gone from recent releases: tf-keras keeps the legacy layers under `tf_keras.src`, and
`ops.Tensor` moved. Registering the modules under their old names and restoring the attribute
lets the unmodified package import.

    tf, slim, resnet_v1, resnet_v2, resnet_utils = import_tf_slim()

raises ImportError (so `pytest.importorskip`-style skips work) when TensorFlow, tf-keras or
tf_slim are missing.
"""

from __future__ import annotations

import importlib
import os
import sys

_LEGACY = ('base', 'core', 'convolutional', 'normalization', 'pooling')


def _register_legacy_layers() -> None:
  """Makes `tf_keras.legacy_tf_layers[.X]` resolve to `tf_keras.src.legacy_tf_layers[.X]`."""
  package = importlib.import_module('tf_keras.src.legacy_tf_layers')
  sys.modules.setdefault('tf_keras.legacy_tf_layers', package)
  import tf_keras
  if not hasattr(tf_keras, 'legacy_tf_layers'):
    tf_keras.legacy_tf_layers = package
  for sub in _LEGACY:
    module = importlib.import_module(f'tf_keras.src.legacy_tf_layers.{sub}')
    sys.modules.setdefault(f'tf_keras.legacy_tf_layers.{sub}', module)
    if not hasattr(package, sub):
      setattr(package, sub, module)


def import_tf_slim():
  """Returns `(tf, slim, resnet_v1, resnet_v2, resnet_utils)`, with `tf = tensorflow.compat.v1`
  in graph mode (eager execution disabled)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
  try:
    import tensorflow as tf2
    from tensorflow.python.framework import ops
    _register_legacy_layers()
  except ImportError as e:  # TF / tf-keras missing or broken
    raise ImportError(f'TensorFlow with tf-keras is needed for live tf_slim tests: {e}') from e
  if not hasattr(ops, 'Tensor') or ops.Tensor is not tf2.Tensor:
    ops.Tensor = tf2.Tensor
  try:
    import tf_slim as slim
    from tf_slim.nets import resnet_utils, resnet_v1, resnet_v2
  except ImportError as e:
    raise ImportError(f'tf_slim could not be imported: {e}') from e
  tf = tf2.compat.v1
  if tf.executing_eagerly():
    tf.disable_eager_execution()
  return tf, slim, resnet_v1, resnet_v2, resnet_utils


TINY_BLOCKS = (('block1', 4, 2, 2), ('block2', 8, 2, 2), ('block3', 16, 1, 1))


def build_tiny_resnet(images, *, version: int, num_classes, is_training: bool,
                      zero_debias_moving_mean: bool = False, fused=None, scale: bool = True,
                      output_stride=None, weight_decay: float = 1e-4, batch_norm_decay: float = 0.997,
                      batch_norm_epsilon: float = 1e-5, reuse=None):
  """Builds slim's `resnet_v{1,2}_tiny` (as our registry defines it) on `images` in the default graph.

  Returns `(net, end_points)` from `resnet_v1.resnet_v1` / `resnet_v2.resnet_v2`, built inside
  `resnet_arg_scope(...)`, with `zero_debias_moving_mean` and `fused` layered on top for
  `batch_norm`. `fused=None` is slim's default (fused where possible).
  """
  _, slim, resnet_v1, resnet_v2, resnet_utils = import_tf_slim()
  block_fn = resnet_v1.resnet_v1_block if version == 1 else resnet_v2.resnet_v2_block
  network_fn = resnet_v1.resnet_v1 if version == 1 else resnet_v2.resnet_v2
  blocks = [block_fn(name, base_depth=d, num_units=n, stride=s) for name, d, n, s in TINY_BLOCKS]
  scope = f'resnet_v{version}_tiny'
  with slim.arg_scope(resnet_utils.resnet_arg_scope(weight_decay=weight_decay,
                                                    batch_norm_decay=batch_norm_decay,
                                                    batch_norm_epsilon=batch_norm_epsilon,
                                                    batch_norm_scale=scale)):
    with slim.arg_scope([slim.batch_norm], zero_debias_moving_mean=zero_debias_moving_mean, fused=fused):
      return network_fn(images, blocks, num_classes=num_classes, is_training=is_training,
                        output_stride=output_stride, reuse=reuse, scope=scope)
