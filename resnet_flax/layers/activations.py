"""ReLU and ReLU6 as TF's `tf.nn.relu` and `tf.nn.relu6`: NaN in, NaN out, with TF's gradients.

`jax.nn.relu` is `max(x, 0)`, which XLA defines to keep NaN. XLA:CPU's YNNPACK reductions
(jaxlib 0.10 and 0.11) compute a max fused into them as maxnum, which drops it: a ResNet whose
last features were NaN pooled them to 0, so a diverged model evaluated on a CPU gave the loss
ln(classes) and, every logit tied, a top-1 of 100%. A select is not fused that way.

The ResNets use these where a ReLU's output may be the global pool's input (a v1 unit's output,
v2's postnorm). The convolutions' `activation_fn` stays `jax.nn.relu`: XLA:GPU fuses a conv's
`max(x, 0)`, and only that form, into cuDNN's conv-bias-activation (`fold_batch_norm_in_eval`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_jvp
def relu(x: Array) -> Array:
  """max(x, 0), NaN kept; gradient 1 where x > 0, else 0 (TF's ReluGrad, also at 0 and NaN)."""
  return jnp.where(x <= 0, jnp.zeros_like(x), x)


relu.defjvps(lambda g, ans, x: jnp.where(x > 0, g, jnp.zeros_like(g)))


@jax.custom_jvp
def relu6(x: Array) -> Array:
  """min(max(x, 0), 6), NaN kept; gradient 1 where 0 < x < 6, else 0 (TF's Relu6Grad)."""
  return jnp.where(x <= 0, jnp.zeros_like(x), jnp.where(x >= 6, jnp.full_like(x, 6), x))


relu6.defjvps(lambda g, ans, x: jnp.where((x > 0) & (x < 6), g, jnp.zeros_like(g)))
