"""Tests for kdjax/_src/features.py: hidden_state_loss and hidden_state_loss_sum_and_count.

References: float64 NumPy written from the definitions (an optional projection ``s W + b``, the
cosine distance with each norm floored at 1e-8, or the squared error averaged over the
features; the token reductions) and the float64 gradients of those formulas written out by
hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import kdjax
from tests import reference

EPS = 1e-8
REDUCTIONS = ("mean", "sum", "none", "sequence_mean")


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def np_project(student, projection=None, bias=None):
  h = np.asarray(student, np.float64)
  if projection is not None:
    h = h @ np.asarray(projection, np.float64)
  if bias is not None:
    h = h + np.asarray(bias, np.float64)
  return h


def np_values(metric, student, teacher, projection=None, bias=None):
  """Per-token values, float64."""
  h, t = np_project(student, projection, bias), np.asarray(teacher, np.float64)
  if metric == "mse":
    return np.mean((h - t) ** 2, axis=-1)
  h_norm = np.maximum(np.linalg.norm(h, axis=-1), EPS)
  t_norm = np.maximum(np.linalg.norm(t, axis=-1), EPS)
  return 1.0 - np.sum(h * t, axis=-1) / (h_norm * t_norm)


def np_d_values(metric, h, t):
  """d value_i / d h_i, float64, from the formulas: 2 (h - t) / d for the squared error;
  for the cosine distance with |h|, |t| > eps, -(t / (|h| |t|) - cos h / |h|^2)."""
  if metric == "mse":
    return 2.0 * (h - t) / h.shape[-1]
  h_norm = np.linalg.norm(h, axis=-1, keepdims=True)
  t_norm = np.linalg.norm(t, axis=-1, keepdims=True)
  cosine = np.sum(h * t, axis=-1, keepdims=True) / (h_norm * t_norm)
  return -(t / (h_norm * t_norm) - cosine * h / h_norm**2)


def np_token_weights(mask, reduction, token_weights=None, normalizer=None):
  """The weight of each token in the reduced loss, float64 (the last axis is the sequence)."""
  mask = np.asarray(mask, np.float64)
  scale = np.ones_like(mask) if token_weights is None else np.asarray(token_weights, np.float64)
  if reduction in ("sum", "none"):
    return mask * scale
  if reduction == "mean":
    count = mask.sum() if normalizer is None else normalizer
    return mask * scale / count if count > 0 else np.zeros_like(mask)
  per_sequence = mask.sum(-1, keepdims=True)
  sequences = (per_sequence > 0).sum()
  return np.where(per_sequence > 0, mask * scale / np.maximum(per_sequence, 1), 0) / sequences


def np_loss(metric, student, teacher, mask, reduction, token_weights=None, normalizer=None,
            projection=None, bias=None):
  values = np_values(metric, student, teacher, projection, bias)
  weights = np_token_weights(mask, reduction, token_weights, normalizer)
  return weights * values if reduction == "none" else np.sum(weights * values)


def np_grads(metric, student, teacher, mask, reduction, token_weights=None, projection=None,
             bias=None):
  """float64 gradients of the reduced loss: (student_hidden, projection, projection_bias)."""
  h, t = np_project(student, projection, bias), np.asarray(teacher, np.float64)
  weights = np_token_weights(mask, reduction, token_weights)[..., None]
  d_h = weights * np_d_values(metric, h, t)
  s = np.asarray(student, np.float64)
  if projection is None:
    return d_h, None, None
  d_student = d_h @ np.asarray(projection, np.float64).T
  d_projection = s.reshape(-1, s.shape[-1]).T @ d_h.reshape(-1, d_h.shape[-1])
  return d_student, d_projection, d_h.reshape(-1, d_h.shape[-1]).sum(0)


def _data(seed=0, shape=(2, 5), d_s=4, d_t=4):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=shape + (d_s,)).astype(np.float32)
  teacher = rng.normal(size=shape + (d_t,)).astype(np.float32)
  where = rng.random(shape) < 0.7
  where[0, 0] = True
  where[-1, :] = False  # a sequence with no counted token
  token_weights = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
  return student, teacher, where, token_weights


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "mse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_matches_reference(metric, reduction):
  student, teacher, where, token_weights = _data(shape=(3, 5))
  got = kdjax.hidden_state_loss(student, teacher, metric=metric, where=where,
                                token_weights=token_weights, reduction=reduction)
  want = np_loss(metric, student, teacher, where, reduction, token_weights)
  assert got.dtype == jnp.float32
  assert got.shape == np.shape(want)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  if reduction == "none":  # uncounted tokens are exactly 0
    assert np.all(np.asarray(got)[~where] == 0)


@pytest.mark.parametrize("metric", ["cosine", "mse"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_projection_to_a_wider_teacher_matches_reference(metric, with_bias):
  student, teacher, where, _ = _data(seed=1, d_s=3, d_t=6)
  rng = np.random.default_rng(2)
  projection = rng.normal(size=(3, 6)).astype(np.float32)
  bias = rng.normal(size=(6,)).astype(np.float32) if with_bias else None
  got = kdjax.hidden_state_loss(student, teacher, metric=metric, projection=projection,
                                projection_bias=bias, where=where)
  want = np_loss(metric, student, teacher, where, "mean", projection=projection, bias=bias)
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_sum_and_count_and_normalizer():
  student, teacher, where, token_weights = _data(seed=3)
  for metric in ("cosine", "mse"):
    total, count = kdjax.hidden_state_loss_sum_and_count(
        student, teacher, metric=metric, where=where, token_weights=token_weights)
    assert total.dtype == count.dtype == jnp.float32
    assert float(count) == where.sum()  # weights weigh the sum, not the count
    np.testing.assert_allclose(
        total, np_loss(metric, student, teacher, where, "sum", token_weights), rtol=2e-6)
    mean = kdjax.hidden_state_loss(student, teacher, metric=metric, where=where,
                                   token_weights=token_weights)
    np.testing.assert_allclose(mean, total / count, rtol=2e-6)
    # A global count from elsewhere (other hosts, other micro-batches) divides the local sum.
    global_mean = kdjax.hidden_state_loss(student, teacher, metric=metric, where=where,
                                          token_weights=token_weights, normalizer=17.0)
    np.testing.assert_allclose(global_mean, total / 17.0, rtol=2e-6)


def test_equal_states_give_zero_and_no_counted_token_gives_zero():
  student, _, _, _ = _data(seed=4)
  for metric in ("cosine", "mse"):
    np.testing.assert_allclose(
        kdjax.hidden_state_loss(student, 3.0 * student if metric == "cosine" else student,
                                metric=metric, reduction="none"), 0.0, atol=1e-6)
  nothing = np.zeros(student.shape[:-1], bool)
  loss, grad = jax.value_and_grad(
      lambda s: kdjax.hidden_state_loss(s, student + 1.0, where=nothing))(student)
  assert float(loss) == 0.0 and not np.any(np.asarray(grad))
  assert float(kdjax.hidden_state_loss(student, student + 1.0, where=nothing,
                                       normalizer=0.0)) == 0.0


def test_zero_vectors_have_cosine_zero_and_finite_gradients():
  teacher = jnp.array([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
  student = jnp.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
  # zero student, zero teacher, both zero: cosine 0, value exactly 1.
  values = kdjax.hidden_state_loss(student, teacher, reduction="none")
  np.testing.assert_array_equal(values, [1.0, 1.0, 1.0])
  grad = jax.grad(lambda s: kdjax.hidden_state_loss(s, teacher, reduction="sum"))(student)
  assert np.all(np.isfinite(grad))
  # Below the floor the value is 1 - <s, t> / (eps |t|): gradient -t / (eps |t|) at s = 0.
  np.testing.assert_allclose(grad[0], -np.array([3.0, 4.0]) / (EPS * 5.0), rtol=1e-6)
  # A zero teacher: the value is 1 whatever the student, so its gradient is 0.
  np.testing.assert_array_equal(grad[1:], 0.0)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_gradients_match_reference(metric):
  student, teacher, where, token_weights = _data(seed=5, d_s=3, d_t=5)
  rng = np.random.default_rng(6)
  projection = rng.normal(size=(3, 5)).astype(np.float32)
  bias = rng.normal(size=(5,)).astype(np.float32)

  def loss(s, w, b, t):
    return kdjax.hidden_state_loss(s, t, metric=metric, projection=w, projection_bias=b,
                                   where=where, token_weights=token_weights)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(student, projection, bias, teacher)
  want = np_grads(metric, student, teacher, where, "mean", token_weights, projection, bias)
  for got, expected in zip(grads[:3], want, strict=True):
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
  assert not np.any(np.asarray(grads[3]))  # the teacher is a constant
  assert not np.any(np.asarray(grads[0])[~where])
  check_grads(lambda s, w, b: loss(s, w, b, teacher), (student, projection, bias), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2)


def test_uncounted_and_zero_weight_tokens_get_exactly_zero_gradient_even_nan():
  student, teacher, where, token_weights = _data(seed=7, d_s=3, d_t=4)
  token_weights[0, 0] = 0.0  # counted, but weighed 0
  projection = np.random.default_rng(8).normal(size=(3, 4)).astype(np.float32)
  dead = ~where
  dead[0, 0] = True
  poisoned_student, poisoned_teacher = student.copy(), teacher.copy()
  poisoned_student[dead] = np.nan
  poisoned_teacher[dead] = np.inf
  for metric in ("cosine", "mse"):
    def loss(s, w, t, metric=metric):
      return kdjax.hidden_state_loss(s, t, metric=metric, projection=w, where=where,
                                     token_weights=token_weights)

    clean = jax.value_and_grad(loss, argnums=(0, 1))(student, projection, teacher)
    poisoned = jax.value_and_grad(loss, argnums=(0, 1))(
        poisoned_student, projection, poisoned_teacher)
    np.testing.assert_array_equal(poisoned[0], clean[0])
    np.testing.assert_array_equal(poisoned[1][1], clean[1][1])  # the projection's
    np.testing.assert_array_equal(poisoned[1][0][dead], 0.0)
    np.testing.assert_array_equal(poisoned[1][0][~dead], clean[1][0][~dead])
  # A NaN in a counted token is not hidden.
  poisoned_student[tuple(np.argwhere(~dead)[0])] = np.nan
  assert np.isnan(kdjax.hidden_state_loss(poisoned_student, teacher, projection=projection,
                                          where=where))


def test_the_projection_trains():
  rng = np.random.default_rng(9)
  student = rng.normal(size=(4, 8, 6)).astype(np.float32)
  target_projection = rng.normal(size=(6, 10)).astype(np.float32)
  teacher = student @ target_projection + 0.5
  params = {"projection": jnp.asarray(rng.normal(size=(6, 10)), jnp.float32) * 0.1,
            "projection_bias": jnp.zeros(10)}
  optimizer = optax.adam(0.05)

  for metric in ("cosine", "mse"):
    def loss(p, metric=metric):
      return kdjax.hidden_state_loss(student, teacher, metric=metric, **p)

    @jax.jit
    def step(p, state, loss=loss):
      value, grads = jax.value_and_grad(loss)(p)
      updates, state = optimizer.update(grads, state, p)
      return optax.apply_updates(p, updates), state, value

    p, state = params, optimizer.init(params)
    first = float(loss(p))
    for _ in range(60):
      p, state, _ = step(p, state)
    assert float(loss(p)) < 0.2 * first, (metric, first, float(loss(p)))


# ----------------------------------------------------------------------------------------------
# Dtypes and transformations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_bfloat16_inputs(metric):
  student, teacher, where, _ = _data(seed=10, d_s=3, d_t=4)
  projection = np.random.default_rng(11).normal(size=(3, 4)).astype(np.float32)
  s16, t16, w16 = (jnp.asarray(x, jnp.bfloat16) for x in (student, teacher, projection))
  loss, (d_s, d_w) = jax.value_and_grad(
      lambda s, w: kdjax.hidden_state_loss(s, t16, metric=metric, projection=w, where=where),
      argnums=(0, 1))(s16, w16)
  assert loss.dtype == jnp.float32
  assert d_s.dtype == d_w.dtype == jnp.bfloat16
  # The float32 math on the bf16 values: the float64 reference of the rounded inputs.
  as64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
  np.testing.assert_allclose(
      loss, np_loss(metric, as64(s16), as64(t16), where, "mean", projection=as64(w16)),
      rtol=1e-5)
  want_s, want_w, _ = np_grads(metric, as64(s16), as64(t16), where, "mean",
                               projection=as64(w16))
  np.testing.assert_allclose(d_s.astype(jnp.float32), want_s, rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(d_w.astype(jnp.float32), want_w, rtol=1e-2, atol=1e-3)


def test_jit_and_vmap():
  student, teacher, where, token_weights = _data(seed=12)
  eager = kdjax.hidden_state_loss(student, teacher, where=where, token_weights=token_weights)
  jitted = jax.jit(lambda s, t, m, w: kdjax.hidden_state_loss(s, t, where=m, token_weights=w))
  np.testing.assert_allclose(jitted(student, teacher, where, token_weights), eager, rtol=1e-6)
  # vmap over sequences: each sequence's own mean.
  per_sequence = jax.vmap(lambda s, t: kdjax.hidden_state_loss(s, t, metric="mse"))(
      student, teacher)
  want = [np_loss("mse", s, t, np.ones(s.shape[:-1]), "mean")
          for s, t in zip(student, teacher, strict=True)]
  np.testing.assert_allclose(per_sequence, want, rtol=2e-6)
  # vmap over every token: rank-1 hidden states inside, one token each.
  flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
  per_token = jax.vmap(lambda s, t: kdjax.hidden_state_loss(s, t, reduction="sum"))(
      flat(student), flat(teacher))
  np.testing.assert_allclose(per_token, np_values("cosine", flat(student), flat(teacher)),
                             rtol=2e-6, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# With a logit loss in one train step
# ----------------------------------------------------------------------------------------------


def test_one_train_step_with_a_logit_loss_is_the_sum_of_the_two():
  rng = np.random.default_rng(13)
  tokens, d_student, d_teacher, vocab = (2, 6), 4, 8, 11
  inputs = rng.normal(size=tokens + (5,)).astype(np.float32)
  teacher_hidden = rng.normal(size=tokens + (d_teacher,)).astype(np.float32)
  teacher_logits = rng.normal(size=tokens + (vocab,)).astype(np.float32)
  labels = rng.integers(0, vocab, size=tokens)
  labels[0, :2] = -100
  params = {"body": rng.normal(size=(5, d_student)).astype(np.float32),
            "head": rng.normal(size=(d_student, vocab)).astype(np.float32),
            "projection": rng.normal(size=(d_student, d_teacher)).astype(np.float32)}

  def forward(p):
    hidden = jnp.tanh(inputs @ p["body"])
    return hidden, hidden @ p["head"]

  def logit_term(p):
    return kdjax.distill_loss(forward(p)[1], teacher_logits, labels)

  def feature_term(p):
    return 0.5 * kdjax.hidden_state_loss(forward(p)[0], teacher_hidden, metric="mse",
                                         projection=p["projection"], where=labels != -100)

  value, grads = jax.jit(jax.value_and_grad(lambda p: logit_term(p) + feature_term(p)))(params)
  (logit_value, logit_grads), (feature_value, feature_grads) = (
      jax.value_and_grad(term)(params) for term in (logit_term, feature_term))
  np.testing.assert_allclose(value, logit_value + feature_value, rtol=1e-6)
  for name in params:
    np.testing.assert_allclose(grads[name], logit_grads[name] + feature_grads[name],
                               rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(logit_grads["projection"]))
  # And the value against float64 references of both terms.
  counted = labels != -100
  hidden = np.tanh(inputs.astype(np.float64) @ params["body"])
  kl = reference.per_token("forward_kl", hidden @ params["head"], teacher_logits)
  want = (kl[counted].mean()
          + 0.5 * np_loss("mse", hidden, teacher_hidden, counted, "mean",
                          projection=params["projection"]))
  np.testing.assert_allclose(value, want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"teacher_hidden": np.zeros((2, 3, 5))}, ValueError,
     r"student_hidden has width 4.*teacher_hidden has width 5.*pass projection"),
    ({"teacher_hidden": np.zeros((2, 4, 4))}, ValueError,
     r"student_hidden and teacher_hidden must hold the same tokens"),
    ({"projection": np.zeros((4, 3))}, ValueError,
     r"projection must have shape .*\(4, 4\), got \(4, 3\)"),
    ({"teacher_hidden": np.zeros((2, 3, 6)), "projection": np.zeros((6, 4))}, ValueError,
     r"projection must have shape .*It looks transposed"),
    ({"projection_bias": np.zeros(4)}, ValueError, r"projection_bias is added after projection"),
    ({"projection": np.zeros((4, 4)), "projection_bias": np.zeros(3)}, ValueError,
     r"projection_bias must have shape \(teacher_hidden.shape\[-1\],\) = \(4,\)"),
    ({"metric": "l2"}, ValueError, r"metric must be one of \('cosine', 'mse'\), got 'l2'"),
    ({"student_hidden": np.zeros((2, 3, 4), np.int32)}, TypeError,
     r"student_hidden must be a floating-point array"),
    ({"teacher_hidden": np.zeros((2, 3, 0))}, ValueError, r"teacher_hidden has an empty feature"),
    ({"where": np.ones((2, 4), bool)}, ValueError,
     r"where must have shape student_hidden.shape\[:-1\] = \(2, 3\)"),
    ({"token_weights": np.ones(3)}, ValueError,
     r"token_weights must have shape student_hidden.shape\[:-1\]"),
    ({"reduction": "max"}, ValueError, r"reduction must be one of"),
    ({"reduction": "sum", "normalizer": 2.0}, ValueError, r"normalizer replaces the token count"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
  arguments = {"student_hidden": np.zeros((2, 3, 4), np.float32),
               "teacher_hidden": np.zeros((2, 3, 4), np.float32), **kwargs}
  student, teacher = arguments.pop("student_hidden"), arguments.pop("teacher_hidden")
  with pytest.raises(error, match=match):
    kdjax.hidden_state_loss(student, teacher, **arguments)
