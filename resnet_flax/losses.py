"""Loss and metric functions: masked cross entropy, slim's L2, top-k counts."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax


def check_labels(logits: jax.Array, labels: jax.Array, mask: Optional[jax.Array] = None) -> None:
  """Refuses labels (and a mask) that are not one integer (one weight) per example of `logits`:
  (batch, 1) labels or masks had broadcast against (batch,) into a wrong number, and float
  labels had matched no class. Shapes and dtypes are static, so this costs nothing in a jit."""
  batch = tuple(jnp.shape(logits)[:-1])
  if tuple(jnp.shape(labels)) != batch:
    raise ValueError(f'labels of shape {tuple(jnp.shape(labels))} for logits of shape {tuple(jnp.shape(logits))}: '
                     f'give one integer class index per example, shape {batch} (one-hot labels: labels.argmax(-1)).')
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f'labels of dtype {jnp.result_type(labels)}: give integer class indices (labels.astype(jnp.int32) '
                    'where they hold whole numbers).')
  if mask is not None and tuple(jnp.shape(mask)) != batch:
    raise ValueError(f'a mask of shape {tuple(jnp.shape(mask))} for logits of shape {tuple(jnp.shape(logits))}: give '
                     f'one weight per example, shape {batch} (1.0 for a real example, 0.0 for padding).')


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross entropy of each example against its integer label, in float32.

  A label outside [0, classes) gives NaN, as TF's sparse cross entropy does on a GPU: its
  one-hot target of zeros had given a loss of 0, an example trained on as nothing, without a word.
  Through one-hot targets, not optax's integer-label form: that one gathers, and under the
  batch-sharded jit a gather of a batch of one has no output sharding JAX can infer.
  """
  check_labels(logits, labels)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.where((labels >= 0) & (labels < num_classes), loss, jnp.nan)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross entropy over the examples where `mask` is 1."""
  check_labels(logits, labels, mask)
  per_example = per_example_cross_entropy(logits, labels, label_smoothing)
  return masked_sum(per_example, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_sum(per_example: jax.Array, mask: jax.Array) -> jax.Array:
  """`sum(per_example * mask)` over the examples `mask` keeps: one it leaves out (mask 0) adds
  nothing, not even a NaN (padding labelled -1, whose loss is NaN, as JAX code often marks it)."""
  return jnp.sum(jnp.where(mask != 0, per_example * mask, 0.0))


def slim_l2_regularization(params: Any, weight_decay: float, bn_weight_decay: float = 0.0) -> jax.Array:
  """`sum(0.5 * weight_decay * sum(w ** 2))` over conv `weights`, as slim.l2_regularizer, plus
  the same with `bn_weight_decay` over BatchNorm's `gamma` and `beta`, as slim's
  `batch_norm(param_regularizers={'gamma': l2_regularizer(d), 'beta': l2_regularizer(d)})`.

  resnet_arg_scope regularizes conv2d weights only (bn_weight_decay 0); biases never are.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = jnp.zeros(())
  for decay, keys in ((weight_decay, ('weights',)), (bn_weight_decay, ('gamma', 'beta'))):
    squares = [jnp.sum(jnp.square(leaf)) for path, leaf in leaves if path[-1].key in keys]
    # A decay of 0 adds no term (and no reduction to the step); a traced decay always adds one.
    if squares and not (isinstance(decay, (int, float)) and decay == 0):
      total = total + 0.5 * decay * sum(squares)
  return total


def correct_top_k(logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """Number of masked-in examples whose label is among the k largest logits.

  Ties go to the lower class index, as `tf.argmax` and `tf.nn.top_k`: top-1 is slim's
  `eval_image_classifier` "Accuracy" (argmax == label). Not `tf.math.in_top_k` (slim's
  "Recall_5"), which counts a tie in the label's favour: bfloat16 logits tie often enough for
  that to lift top-1, and a model whose logits are all equal scored 100%. An example with any
  non-finite logit never counts, as in_top_k: a model that outputs NaN scores 0.
  """
  check_labels(logits, labels, mask)
  num_classes = logits.shape[-1]
  k = min(k, num_classes)
  # A masked max, not take_along_axis: see per_example_cross_entropy.
  is_label = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
  label_logit = jnp.max(jnp.where(is_label, logits, -jnp.inf), axis=-1, keepdims=True)
  ranked_before = jnp.arange(num_classes) < labels[..., None]
  ahead = (logits > label_logit) | ((logits == label_logit) & ranked_before)
  rank = jnp.sum(ahead, axis=-1)
  return jnp.sum(((rank < k) & jnp.all(jnp.isfinite(logits), axis=-1)) * mask)
