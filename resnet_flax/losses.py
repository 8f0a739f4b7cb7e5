"""Loss and metric functions: masked cross entropy, slim's L2, top-k counts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross entropy of each example against its integer label, in float32.

  Through one-hot targets, not optax's integer-label form: that one gathers, and under the
  batch-sharded jit a gather of a batch of one has no output sharding JAX can infer.
  """
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross entropy over the examples where `mask` is 1."""
  per_example = per_example_cross_entropy(logits, labels, label_smoothing)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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
  """Number of masked-in examples whose label is among the k largest logits, as tf.math.in_top_k.

  Ties count in the label's favour; an example with any non-finite logit never counts, so a
  model that outputs NaN scores 0, not 1 (NaN compares false with everything: rank 0).
  """
  num_classes = logits.shape[-1]
  k = min(k, num_classes)
  # A masked max, not take_along_axis: see per_example_cross_entropy.
  is_label = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
  label_logit = jnp.max(jnp.where(is_label, logits, -jnp.inf), axis=-1, keepdims=True)
  rank = jnp.sum(logits > label_logit, axis=-1)  # classes scoring strictly higher
  return jnp.sum(((rank < k) & jnp.all(jnp.isfinite(logits), axis=-1)) * mask)
