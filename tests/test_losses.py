"""Metrics and losses against numpy, and under the batch-sharded jit the steps use."""

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import losses, sharding, steps


def numpy_correct_top_k(logits, labels, mask, k):
  """Hits among the top k, ties to the lower class index, an example with a non-finite logit never a hit."""
  top_k = np.argsort(-logits, axis=-1, kind='stable')[:, :k]  # stable: a tie keeps the lower index first
  hits = (top_k == labels[:, None]).any(-1)
  return float((hits * np.isfinite(logits).all(-1) * mask).sum())


def _logits_with_ties_and_non_finite_values(rng):
  logits = rng.integers(-3, 3, size=(64, 10)).astype(np.float32)  # many ties
  labels = rng.integers(0, 10, size=64).astype(np.int32)
  logits[0], labels[0] = -np.inf, 2
  logits[1, 4], labels[1] = np.inf, 4
  logits[2], labels[2] = np.nan, 7  # a diverged model: all NaN
  logits[3, 5], labels[3] = np.nan, 5  # NaN at the label only
  logits[4, 6], labels[4] = 9.0, 6  # the label first, but a NaN (or -inf) elsewhere: not counted,
  logits[4, 1] = np.nan  # as tf.math.in_top_k, though NaN compares false and would not outrank it
  logits[5, 0], labels[5] = 9.0, 0
  logits[5, 3] = -np.inf
  logits[6, 0], labels[6] = np.inf, 0
  logits[6, 3] = np.inf  # a tie at +inf
  mask = (rng.random(64) < 0.8).astype(np.float32)
  mask[:7] = 1.0
  return logits, labels, mask


@pytest.mark.parametrize('k', [1, 3, 5, 20])
def test_correct_top_k_matches_numpy_with_ties_non_finite_logits_and_mask(k):
  logits, labels, mask = _logits_with_ties_and_non_finite_values(np.random.default_rng(0))
  expected = numpy_correct_top_k(logits, labels, mask, k)
  assert float(losses.correct_top_k(logits, labels, mask, k)) == expected


def test_a_top_label_beside_a_non_finite_logit_is_not_counted():
  logits = np.array([[5.0, np.nan, 0.0], [5.0, -np.inf, 0.0], [5.0, 1.0, 0.0]], np.float32)
  hits = [float(losses.correct_top_k(logits[i:i + 1], np.zeros(1, np.int32), np.ones(1, np.float32), 1))
          for i in range(3)]
  assert hits == [0.0, 0.0, 1.0]  # tf.math.in_top_k gives False, False, True (TF 2.21)


def test_all_nan_logits_score_zero():
  logits = np.full((8, 10), np.nan, np.float32)
  labels = np.arange(8, dtype=np.int32)
  assert float(losses.correct_top_k(logits, labels, np.ones(8, np.float32), 1)) == 0.0


def test_equal_logits_credit_the_lowest_class_only():
  # tf.math.in_top_k counts ties for the label: a model whose logits were all equal scored 100%.
  logits = np.zeros((10, 10), np.float32)
  labels = np.arange(10, dtype=np.int32)
  ones = np.ones(10, np.float32)
  assert float(losses.correct_top_k(logits, labels, ones, 1)) == 1.0  # label 0 only, as argmax
  assert float(losses.correct_top_k(logits, labels, ones, 5)) == 5.0


@pytest.mark.parametrize('k', [1, 3, 5])
def test_correct_top_k_matches_tensorflow_argmax_and_top_k(k):
  tf = pytest.importorskip('tensorflow', reason='the TF reference needs tensorflow (run with /work/tfenv)')
  logits, labels, _ = _logits_with_ties_and_non_finite_values(np.random.default_rng(1))
  # In a graph of its own: tests/slim_shim.py turns eager execution off for the whole process.
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    # slim's eval_image_classifier: Accuracy from argmax; top-k membership as tf.nn.top_k ranks.
    argmax, top_k, in_top_k = session.run([tf.argmax(logits, axis=1, output_type=tf.int32),
                                           tf.nn.top_k(logits, k).indices, tf.math.in_top_k(labels, logits, k)])
  finite = np.isfinite(logits).all(-1)
  expected = (argmax == labels if k == 1 else (top_k == labels[:, None]).any(-1)) & finite
  ones = np.ones(1, np.float32)
  got = np.array([float(losses.correct_top_k(logits[i:i + 1], labels[i:i + 1], ones, k)) for i in range(len(labels))],
                 bool)
  np.testing.assert_array_equal(got, expected)
  # Where the label's logit is unique in its row, in_top_k (slim's Recall_5) agrees.
  label_logit = logits[np.arange(len(labels)), labels]
  unambiguous = finite & ((logits == label_logit[:, None]).sum(-1) == 1)
  np.testing.assert_array_equal(got[unambiguous], in_top_k[unambiguous])
  assert (got != in_top_k).any()  # the data has ties that in_top_k counts and we do not


@pytest.mark.parametrize('batch', [1, 2, 8])
def test_eval_sums_and_train_loss_work_under_the_batch_sharded_jit_for_any_batch(batch):
  # A batch of one used to fail here: gathers (take_along_axis, optax's integer-label cross
  # entropy) have no inferable output sharding then. eval_batch_size=1 crashed eval.py.
  mesh = sharding.data_mesh()

  def sums_and_loss(_, b):
    train_loss = losses.cross_entropy(b['logits'], b['label'], b['mask'])
    return {**steps.classification_sums(b['logits'], b), 'loss': train_loss}

  rng = np.random.default_rng(batch)
  host = {'logits': rng.normal(size=(batch, 10)).astype(np.float32),
          'label': rng.integers(0, 10, size=batch).astype(np.int32), 'mask': np.ones(batch, np.float32)}
  got = sharding.jit_over_batch(sums_and_loss, mesh)({}, sharding.to_global_batch(host, mesh))
  assert float(got['top1_hits']) == numpy_correct_top_k(host['logits'], host['label'], host['mask'], 1)
  assert float(got['top5_hits']) == numpy_correct_top_k(host['logits'], host['label'], host['mask'], 5)
  assert float(got['num_examples']) == batch
  shifted = host['logits'] - host['logits'].max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  per_example = -log_softmax[np.arange(batch), host['label']]
  np.testing.assert_allclose(float(got['loss_sum']), per_example.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(got['loss']), per_example.mean(), rtol=1e-6)


def numpy_cross_entropy(logits, labels, smoothing=0.0):
  """Per-example cross entropy in float64 against slim's smoothed targets: (1 - s) one-hot + s / classes."""
  logits = np.asarray(logits, np.float64)
  targets = np.eye(logits.shape[-1])[labels] * (1 - smoothing) + smoothing / logits.shape[-1]
  shifted = logits - logits.max(-1, keepdims=True)
  return -(targets * (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))).sum(-1)


def test_label_smoothing_matches_the_smoothed_target_cross_entropy():
  # Neither label's logit is the mean logit, where smoothing would leave the loss as it was.
  logits = np.float32([[2.0, 0.5, -1.0], [0.1, 3.0, -2.0]])
  labels = np.int32([0, 2])
  got = np.asarray(losses.per_example_cross_entropy(logits, labels, label_smoothing=0.1))
  np.testing.assert_allclose(got, numpy_cross_entropy(logits, labels, 0.1), rtol=1e-6)
  assert np.all(np.abs(got - numpy_cross_entropy(logits, labels)) > 0.05)


def test_cross_entropy_is_the_mean_over_real_examples_with_smoothing():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(6, 5)) * 3).astype(np.float32)
  labels = rng.integers(0, 5, 6).astype(np.int32)
  mask = np.float32([1, 0, 1, 1, 0, 1])
  logits[1], logits[4] = 40.0 * np.eye(5)[(labels[1] + 1) % 5], -30.0  # padding slots: garbage
  expected = numpy_cross_entropy(logits, labels, 0.2)[mask == 1].mean()
  assert float(losses.cross_entropy(logits, labels, mask, label_smoothing=0.2)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.cross_entropy(logits, labels, np.zeros(6, np.float32))) == 0.0  # all padding: 0, not NaN


def test_bfloat16_logits_give_the_float32_loss_of_their_values():
  # Through bfloat16's log-softmax the loss is off by ~1e-3.
  logits = np.float32([[3.0, -1.5, 0.25, 2.0], [-2.0, 1.0, 1.125, 0.5]])  # exact in bfloat16
  labels = np.int32([3, 1])
  got = losses.per_example_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), numpy_cross_entropy(logits, labels), rtol=1e-6)


_LOGITS = jnp.array([[2., 1, 0], [0, 3, 1], [1, 1, 1], [.5, .2, .1]])
_LABELS = jnp.array([0, 1, 2, 0])


@pytest.mark.parametrize('labels, mask, error, message', [
    # Each had given a number: (4, 1) labels or masks broadcast to (4, 4) (loss 5.48 and 2.56 for 0.639; top-1 of
    # 1.0 and top-5 of 1.75 in a train step), and float labels matched no class where not whole.
    (_LABELS[:, None], jnp.ones(4), ValueError, r'labels of shape \(4, 1\) for logits of shape \(4, 3\): give one '
                                                r'integer class index per example, shape \(4,\)'),
    (jnp.eye(4, 3, dtype=jnp.int32), jnp.ones(4), ValueError, r'one-hot labels: labels.argmax\(-1\)'),
    (_LABELS, jnp.ones((4, 1)), ValueError, r'a mask of shape \(4, 1\) for logits of shape \(4, 3\): give one weight '
                                            r'per example, shape \(4,\)'),
    (jnp.array([.3, 1.2, 2.7, 0.]), jnp.ones(4), TypeError, 'labels of dtype float32: give integer class indices'),
])
def test_labels_or_a_mask_not_one_per_example_are_refused_by_every_loss_and_metric(labels, mask, error, message):
  for compute in (lambda: losses.cross_entropy(_LOGITS, labels, mask),
                  lambda: losses.correct_top_k(_LOGITS, labels, mask, 1),
                  lambda: steps.classification_sums(_LOGITS, {'label': labels, 'mask': mask})):
    with pytest.raises(error, match=message):
      compute()


@pytest.mark.parametrize('label', [3, -1])
def test_a_label_outside_the_classes_makes_the_loss_nan_not_zero(label):
  # A one-hot target of zeros had given that example a loss of 0: a batch of such labels trained on nothing.
  labels = _LABELS.at[3].set(label)
  per_example = np.asarray(losses.per_example_cross_entropy(_LOGITS, labels))
  by_hand = np.log(np.exp(_LOGITS[:3]).sum(-1)) - np.asarray(_LOGITS)[np.arange(3), np.asarray(_LABELS[:3])]
  np.testing.assert_allclose(per_example[:3], by_hand, rtol=1e-6)
  assert np.isnan(per_example[3])
  assert np.isnan(losses.cross_entropy(_LOGITS, labels, jnp.ones(4)))
  assert np.isfinite(losses.cross_entropy(_LOGITS, _LABELS, jnp.ones(4)))
  # Left out by the mask (padding labelled -1), it adds nothing: the mean of the other three.
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(losses.cross_entropy(_LOGITS, labels, mask), by_hand.mean(), rtol=1e-6)
  sums = steps.classification_sums(_LOGITS, {'label': labels, 'mask': mask})
  np.testing.assert_allclose(sums['loss_sum'], by_hand.sum(), rtol=1e-6)
  assert float(sums['top1_hits']) == 2.0 and float(sums['num_examples']) == 3.0  # row 2's tie goes to class 0
