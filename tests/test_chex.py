"""The public losses under chex's variants, against float64 NumPy references.

Every loss runs jitted, eagerly and on device-placed inputs (``chex.variants(with_jit=True,
without_jit=True, with_device=True)``); the ``(sum, count)`` forms and the data-parallel
``vocab_parallel_distill_loss``, which are meant for ``pmap`` (see the sharding guide), also run
under ``with_pmap``, the batch split over devices. Values and gradients are checked with
``chex.assert_shape`` and ``chex.assert_trees_all_close`` against float64 NumPy (the formulas
of ``tests/reference.py`` and a few written here; gradients by central differences), with
``-inf`` logits and ignored labels in the inputs. ``chex.assert_max_traces`` shows that a
temperature, ``beta`` or ``kd_coef`` following a schedule as arrays never retraces a jitted
train step.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import kdjax
from tests import reference

IGNORE = -100
SHAPE = (2, 3, 11)  # batch, sequence, vocabulary
DEVICES = 4
RTOL, ATOL = 2e-5, 2e-6  # float32 against float64; gradients by central differences
GRAD_ATOL = 1e-5
# Non-default hyperparameters, each passed only to a divergence that reads it.
HYPER = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2},
         "skew_reverse_kl": {"alpha": 0.2}}


def _inputs(seed, shape=SHAPE, *, neg_inf=0.1):
  """Student and teacher logits with ``-inf`` entries (an all-``-inf`` student row among them),
  labels with ignored tokens, and labels pointing at finite student logits."""
  rng = np.random.default_rng(seed)
  logits = reference.random_logits(rng, shape, neg_inf_fraction=neg_inf)
  teacher = reference.random_logits(rng, shape, neg_inf_fraction=neg_inf)
  if neg_inf:
    logits[0, 2] = -np.inf
  labels = np.argmax(logits, -1).astype(np.int32)  # finite: a finite cross entropy
  labels[0, 1] = labels[0, 2] = IGNORE
  labels[-1, 0] = IGNORE
  return logits, teacher, labels


def _mean(per_token, labels):
  return reference.reduce(per_token, labels != IGNORE, "mean")


def _dense(divergence, *, temperature=1.0, temperature_squared=False, **hyper):
  """float64 ``distill_loss``: the masked mean of the per-token divergence."""
  def loss(logits, teacher, labels):
    per_token = reference.per_token(divergence, logits, teacher, temperature=temperature,
                                    **hyper)
    return _mean(per_token * (temperature**2 if temperature_squared else 1.0), labels)
  return loss


def _combined(divergence, kd_coef, **kwargs):
  """float64 ``(1 - kd_coef) * cross entropy + kd_coef * distill_loss``."""
  def loss(logits, teacher, labels):
    cross_entropy = _mean(reference.cross_entropy(logits, labels), labels)
    return (1 - kd_coef) * cross_entropy + kd_coef * _dense(divergence, **kwargs)(
        logits, teacher, labels)
  return loss


def _uld(logits, teacher, labels):
  """float64 ULD: the L1 distance of the two softmaxes sorted in descending order."""
  q = -np.sort(-np.exp(reference.log_softmax(logits)), -1)
  p = -np.sort(-np.exp(reference.log_softmax(teacher)), -1)
  width = max(q.shape[-1], p.shape[-1])  # the shorter padded with zeros
  q, p = (np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]) for x in (q, p))
  return _mean(np.abs(q - p).sum(-1), labels)


def _topk_teacher(teacher, k):
  """The teacher's k most likely ids and their float64 log-probabilities (full softmax)."""
  log_p = reference.log_softmax(teacher)
  ids = np.argsort(-log_p, -1, kind="stable")[..., :k].astype(np.int32)
  return ids, np.take_along_axis(log_p, ids, -1).astype(np.float32)


def _sparse_bucket_forward_kl(ids, teacher_logprobs):
  """float64 forward KL between the (k + 1)-category coarsenings: the k ids and the rest."""
  def loss(logits, labels):
    log_q = reference.log_softmax(logits)
    q_k = np.exp(np.take_along_axis(log_q, ids, -1))
    p_k = np.exp(np.asarray(teacher_logprobs, np.float64))
    p = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)
    q = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return _mean(terms.sum(-1), labels)
  return loss


def _grad(fn, x):
  return reference.numerical_grad(fn, np.asarray(x, np.float64))


def _check(test, value, grads, want_value, want_grads, value_shape=()):
  """Shapes first (chex names the mismatch), then values and gradients against float64."""
  chex.assert_shape(value, value_shape)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      grads, jax.tree.map(lambda g: np.zeros(np.shape(g), np.float32), want_grads))
  chex.assert_tree_all_finite((value, grads))
  chex.assert_trees_all_close(value, np.asarray(want_value, np.float32), rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(grads, jax.tree.map(lambda g: np.asarray(g, np.float32),
                                                  want_grads), rtol=1e-4, atol=GRAD_ATOL)
  del test


# Each case: (kdjax loss of (logits, teacher, labels), float64 reference of the same).
DENSE_CASES = {
    "kd_loss": (lambda x, t, y: kdjax.kd_loss(x, t, y), _dense("soft_cross_entropy")),
    **{f"distill_loss_{name}": (
        lambda x, t, y, name=name: kdjax.distill_loss(
            x, t, y, divergence=name, temperature=2.0, temperature_squared=True,
            **HYPER.get(name, {})),
        _dense(name, temperature=2.0, temperature_squared=True, **HYPER.get(name, {})))
       for name in kdjax.DIVERGENCES},
    "distill_with_cross_entropy": (
        lambda x, t, y: kdjax.distill_with_cross_entropy(
            x, t, y, kd_coef=0.7, divergence="generalized_jsd", beta=0.3, temperature=1.5),
        _combined("generalized_jsd", 0.7, beta=0.3, temperature=1.5)),
    "vocab_parallel_distill_loss": (
        lambda x, t, y: kdjax.vocab_parallel_distill_loss(
            x, t, y, axis_name=None, divergence="reverse_kl", temperature=0.8),
        _dense("reverse_kl", temperature=0.8)),
}


class DenseLossesTest(chex.TestCase):
  """Losses of materialised logits: value and gradient with respect to the student logits."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(*((name, name) for name in DENSE_CASES))
  def test_value_and_grad_match_float64(self, name):
    loss, want = DENSE_CASES[name]
    logits, teacher, labels = _inputs(1)
    value, grad = self.variant(jax.value_and_grad(loss))(logits, teacher, labels)
    want_grad = _grad(lambda x: want(x, teacher, labels), logits)
    _check(self, value, grad, want(logits, teacher, labels), want_grad)

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(*((name, name) for name in kdjax.DIVERGENCES))
  def test_per_token_divergences_match_float64(self, name):
    logits, teacher, _ = _inputs(2)
    fn = getattr(kdjax, name)
    hyper = HYPER.get(name, {})

    def summed(x, t):
      per_token = fn(x, t, temperature=1.5, **hyper)
      chex.assert_shape(per_token, SHAPE[:-1])
      return jnp.sum(per_token), per_token

    (_, per_token), grad = self.variant(jax.value_and_grad(summed, has_aux=True))(
        logits, teacher)
    want = reference.per_token(name, logits, teacher, temperature=1.5, **hyper)
    want_grad = _grad(lambda x: reference.per_token(name, x, teacher, temperature=1.5,
                                                    **hyper).sum(), logits)
    _check(self, per_token, grad, want, want_grad, value_shape=SHAPE[:-1])

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_sum_and_count_match_float64(self):
    logits, teacher, labels = _inputs(3)

    def total(x, t, y):
      total, count = kdjax.distill_loss_sum_and_count(x, t, y, divergence="skew_forward_kl",
                                                      alpha=0.2)
      chex.assert_shape((total, count), ())
      return total, count

    (value, count), grad = self.variant(jax.value_and_grad(total, has_aux=True))(
        logits, teacher, labels)
    counted = labels != IGNORE

    def want(x):
      return np.where(counted, reference.per_token("skew_forward_kl", x, teacher, alpha=0.2),
                      0.0).sum()

    chex.assert_trees_all_close(count, np.float32(counted.sum()))
    _check(self, value, grad, want(logits), _grad(want, logits))

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_uld_matches_float64(self):
    logits, teacher, labels = _inputs(4, neg_inf=0.0)
    teacher = teacher[..., :7]  # another vocabulary
    value, grad = self.variant(jax.value_and_grad(
        lambda x, t, y: kdjax.uld_loss(x, t, y)))(logits, teacher, labels)
    want_grad = _grad(lambda x: _uld(x, teacher, labels), logits)
    _check(self, value, grad, _uld(logits, teacher, labels), want_grad)

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_sparse_matches_float64(self):
    logits, teacher, labels = _inputs(5, neg_inf=0.0)
    ids, logprobs = _topk_teacher(teacher, 4)
    value, grad = self.variant(jax.value_and_grad(
        lambda x, i, lp, y: kdjax.sparse_distill_loss(x, i, lp, y, tail="bucket")))(
            logits, ids, logprobs, labels)
    want = _sparse_bucket_forward_kl(ids, logprobs)
    _check(self, value, grad, want(logits, labels), _grad(lambda x: want(x, labels), logits))


def _fused_inputs(seed, width=5):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal(SHAPE[:-1] + (width,)).astype(np.float32)
  kernel = (rng.standard_normal((width, SHAPE[-1])) / 2).astype(np.float32)
  teacher_hidden = rng.standard_normal(SHAPE[:-1] + (width + 2,)).astype(np.float32)
  teacher_kernel = (rng.standard_normal((width + 2, SHAPE[-1])) / 2).astype(np.float32)
  labels = _inputs(seed, neg_inf=0.0)[2]
  return hidden, kernel, teacher_hidden, teacher_kernel, labels


FUSED_CASES = {
    "fused_linear_distill_loss": (
        lambda h, w, th, tw, y: kdjax.fused_linear_distill_loss(
            h, w, th, tw, y, divergence="generalized_jsd", beta=0.3, temperature=2.0),
        _dense("generalized_jsd", beta=0.3, temperature=2.0)),
    "fused_linear_distill_with_cross_entropy": (
        lambda h, w, th, tw, y: kdjax.fused_linear_distill_with_cross_entropy(
            h, w, th, tw, y, kd_coef=0.4, divergence="total_variation"),
        _combined("total_variation", 0.4)),
    "vocab_parallel_fused_linear_distill_loss": (
        lambda h, w, th, tw, y: kdjax.vocab_parallel_fused_linear_distill_loss(
            h, w, th, tw, y, axis_name=None, divergence="forward_kl"),
        _dense("forward_kl")),
}


class FusedHeadTest(chex.TestCase):
  """The fused head: gradients with respect to the student's hidden states and kernel."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(*((name, name) for name in FUSED_CASES))
  def test_value_and_grads_match_float64(self, name):
    loss, want = FUSED_CASES[name]
    hidden, kernel, teacher_hidden, teacher_kernel, labels = _fused_inputs(6)
    value, grads = self.variant(jax.value_and_grad(loss, argnums=(0, 1)))(
        hidden, kernel, teacher_hidden, teacher_kernel, labels)
    teacher = np.asarray(teacher_hidden, np.float64) @ teacher_kernel

    def want_of(h, w):
      return want(np.asarray(h, np.float64) @ np.asarray(w, np.float64), teacher, labels)

    want_grads = (_grad(lambda h: want_of(h, kernel), hidden),
                  _grad(lambda w: want_of(hidden, w), kernel))
    _check(self, value, grads, want_of(hidden, kernel), want_grads)


# ----------------------------------------------------------------------------------------------
# pmap: the batch split over devices, the (sum, count) pair or data_axis_name making the mean
# global.
# ----------------------------------------------------------------------------------------------


def _split(x):
  """``[batch, ...]`` as ``[DEVICES, batch / DEVICES, ...]``."""
  return np.asarray(x).reshape((DEVICES, -1) + np.shape(x)[1:])


def _share_of_sum_and_count(sum_and_count):
  """This device's share of the global mean, its gradient, and the psum-ed global mean."""
  def step(*args):
    def share(logits):
      total, count = sum_and_count(logits, *args[1:])
      return total / jnp.maximum(jax.lax.psum(count, "batch"), 1.0)
    value, grad = jax.value_and_grad(share)(args[0])
    return jax.lax.psum(value, "batch"), grad
  return step


PMAP_CASES = {
    "distill_loss_sum_and_count": (
        _share_of_sum_and_count(lambda x, t, y: kdjax.distill_loss_sum_and_count(
            x, t, y, divergence="generalized_jsd", beta=0.3, temperature=1.5)),
        _dense("generalized_jsd", beta=0.3, temperature=1.5)),
    "distill_with_cross_entropy_sum_and_count": (
        _share_of_sum_and_count(lambda x, t, y: kdjax.distill_with_cross_entropy_sum_and_count(
            x, t, y, kd_coef=0.6)),
        _combined("forward_kl", 0.6)),
    "vocab_parallel_distill_loss": (
        # Under pmap its value is the global mean, its gradient that of this device's share.
        lambda x, t, y: jax.value_and_grad(lambda x: kdjax.vocab_parallel_distill_loss(
            x, t, y, axis_name=None, data_axis_name="batch", divergence="skew_reverse_kl",
            alpha=0.2))(x),
        _dense("skew_reverse_kl", alpha=0.2)),
}


class PmapTest(chex.TestCase):
  """The losses meant for pmap, on 4 devices against the whole batch in float64."""

  @chex.variants(with_pmap=True)
  @parameterized.named_parameters(*((name, name) for name in PMAP_CASES))
  def test_global_mean_and_gradient(self, name):
    step, want = PMAP_CASES[name]
    logits, teacher, labels = _inputs(7, (8, 3, 11))
    value, grad = self.variant(step, broadcast_args_to_devices=False, axis_name="batch",
                               n_devices=DEVICES, reduce_fn=None)(
        _split(logits), _split(teacher), _split(labels))
    chex.assert_shape(value, (DEVICES,))
    chex.assert_trees_all_close(value, np.full(DEVICES, want(logits, teacher, labels),
                                               np.float32), rtol=RTOL, atol=ATOL)
    want_grad = _grad(lambda x: want(x, teacher, labels), logits)
    _check(self, value[0], np.asarray(grad).reshape(logits.shape),
           want(logits, teacher, labels), want_grad)

  @chex.variants(with_pmap=True)
  def test_fused_sum_and_count_kernel_gradient(self):
    """The kernel is replicated: its gradient is the psum of the devices' shares."""
    hidden, kernel, teacher_hidden, teacher_kernel, labels = _fused_inputs(8)
    hidden, teacher_hidden = (np.concatenate([x, x[::-1] * 0.5]) for x in
                              (hidden, teacher_hidden))
    labels = np.concatenate([labels, labels[::-1]])

    def step(h, w, th, tw, y):
      def share(h, w):
        total, count = kdjax.fused_linear_distill_loss_sum_and_count(h, w, th, tw, y)
        return total / jnp.maximum(jax.lax.psum(count, "batch"), 1.0)
      value, (grad_h, grad_w) = jax.value_and_grad(share, argnums=(0, 1))(h, w)
      return jax.lax.psum(value, "batch"), grad_h, jax.lax.psum(grad_w, "batch")

    value, grad_h, grad_w = self.variant(
        step, broadcast_args_to_devices=False, axis_name="batch", n_devices=DEVICES,
        in_axes=(0, None, 0, None, 0), reduce_fn=None)(
            _split(hidden), kernel, _split(teacher_hidden), teacher_kernel, _split(labels))
    teacher = np.asarray(teacher_hidden, np.float64) @ teacher_kernel
    want = _dense("forward_kl")

    def want_of(h, w):
      return want(np.asarray(h, np.float64) @ np.asarray(w, np.float64), teacher, labels)

    want_grads = (_grad(lambda h: want_of(h, kernel), hidden),
                  _grad(lambda w: want_of(hidden, w), kernel))
    chex.assert_shape(grad_w, (DEVICES,) + kernel.shape)
    _check(self, value[0], (np.asarray(grad_h).reshape(hidden.shape), grad_w[0]),
           want_of(hidden, kernel), want_grads)


# ----------------------------------------------------------------------------------------------
# Schedules: hyperparameters as arrays never retrace a jitted train step.
# ----------------------------------------------------------------------------------------------

SCHEDULE = [(1.0, 0.1, 0.9), (1.7, 0.4, 0.6), (3.0, 0.8, 0.2)]  # (temperature, beta, kd_coef)


def _train_inputs(seed=9, width=6):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal(SHAPE[:-1] + (width,)).astype(np.float32)
  kernel = (rng.standard_normal((width, SHAPE[-1])) / 2).astype(np.float32)
  _, teacher, labels = _inputs(seed)
  return hidden, kernel, teacher, labels


def _dense_train_step(kernel, hidden, teacher, labels, temperature, beta, kd_coef):
  def objective(kernel):
    return kdjax.distill_with_cross_entropy(
        hidden @ kernel, teacher, labels, kd_coef=kd_coef, divergence="generalized_jsd",
        beta=beta, temperature=temperature, temperature_squared=True)
  loss, grad = jax.value_and_grad(objective)(kernel)
  return kernel - 0.1 * grad, loss


def _fused_train_step(kernel, hidden, teacher, labels, temperature, beta, kd_coef):
  teacher_hidden, teacher_kernel = teacher
  def objective(kernel):
    return kdjax.fused_linear_distill_with_cross_entropy(
        hidden, kernel, teacher_hidden, teacher_kernel, labels, kd_coef=kd_coef,
        divergence="generalized_jsd", beta=beta, temperature=temperature,
        temperature_squared=True)
  loss, grad = jax.value_and_grad(objective)(kernel)
  return kernel - 0.1 * grad, loss


class ScheduleTest(chex.TestCase):

  @parameterized.named_parameters(("dense", "dense"), ("fused", "fused"))
  def test_scheduled_hyperparameters_never_retrace(self, engine):
    hidden, kernel, teacher_logits, labels = _train_inputs()
    if engine == "dense":
      step_fn, teacher = _dense_train_step, teacher_logits
      teacher_of = lambda: teacher_logits  # noqa: E731
    else:
      step_fn, rng = _fused_train_step, np.random.default_rng(10)
      teacher = (rng.standard_normal(SHAPE[:-1] + (4,)).astype(np.float32),
                 rng.standard_normal((4, SHAPE[-1])).astype(np.float32))
      teacher_of = lambda: np.asarray(teacher[0], np.float64) @ teacher[1]  # noqa: E731
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(step_fn, n=1))
    for temperature, beta, kd_coef in SCHEDULE:
      want_loss = _combined("generalized_jsd", kd_coef, beta=beta, temperature=temperature,
                            temperature_squared=True)(
          np.asarray(hidden, np.float64) @ kernel, teacher_of(), labels)
      kernel, loss = step(kernel, hidden, teacher, labels, jnp.float32(temperature),
                          jnp.float32(beta), jnp.float32(kd_coef))
      chex.assert_shape(loss, ())
      chex.assert_trees_all_close(loss, np.float32(want_loss), rtol=RTOL, atol=ATOL)

  def test_python_floats_would_retrace(self):
    """The check can fail: the same step with the schedule as static Python floats retraces."""
    hidden, kernel, teacher, labels = _train_inputs()
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(_dense_train_step, n=1),
                   static_argnames=("temperature", "beta", "kd_coef"))
    temperature, beta, kd_coef = SCHEDULE[0]
    step(kernel, hidden, teacher, labels, temperature=temperature, beta=beta, kd_coef=kd_coef)
    temperature, beta, kd_coef = SCHEDULE[1]
    with pytest.raises(AssertionError, match="traced > 1 times"):
      step(kernel, hidden, teacher, labels, temperature=temperature, beta=beta,
           kd_coef=kd_coef)
