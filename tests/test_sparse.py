"""Tests for kdjax/_src/sparse.py: top-k teachers and sparse_distill_loss.

References are float64 NumPy implementations of the formulas in the issue, written from the
definitions (full-vocabulary softmax, then the tail policy), and float64 central finite
differences of those references for the gradients.
"""

import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kdjax
from kdjax._src.sparse import (
    TAILS,
    sparse_distill_loss,
    sparse_distill_loss_sum_and_count,
    topk_teacher,
)

NEG_INF = -np.inf


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  row_max = np.max(x, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  with np.errstate(divide="ignore"):
    total = np.sum(np.exp(x - row_max), axis=-1, keepdims=True)
    return np.where(total > 0, x - row_max - np.log(np.where(total > 0, total, 1.0)), NEG_INF)


def np_kl_terms(p, q):
  """``p log(p / q)`` per entry with 0 log 0 = 0 and p log(p / 0) := 0."""
  both = (p > 0) & (q > 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(both, p * (np.log(np.where(both, p, 1)) - np.log(np.where(both, q, 1))), 0.0)


def np_sparse_kl(logits, ids, logprobs, tail, temperature=1.0):
  """Per-token sparse forward KL in float64, straight from the definitions."""
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  flat_logits = logits.reshape(-1, vocab)
  flat_ids = np.asarray(ids).reshape(flat_logits.shape[0], -1)
  flat_lp = np.asarray(logprobs, np.float64).reshape(flat_ids.shape)
  out = []
  for row, row_ids, row_lp in zip(flat_logits, flat_ids, flat_lp, strict=True):
    q_full = np.exp(np_log_softmax(row / temperature))
    q = q_full[row_ids]
    p = np.exp(row_lp)
    if tail == "renormalize":
      p = p / p.sum() if p.sum() > 0 else p
      q = q / q.sum() if q.sum() > 0 else q
      out.append(np_kl_terms(p, q).sum())
      continue
    value = np_kl_terms(p, q).sum()
    if tail == "bucket" and p.sum() > 0:
      rest = np.ones(vocab, bool)
      rest[row_ids] = False
      p_rest = max(1.0 - p.sum(), 0.0)
      q_rest = q_full[rest].sum()
      value += np_kl_terms(np.array(p_rest), np.array(q_rest))
    out.append(value)
  return np.array(out).reshape(logits.shape[:-1])


def np_numeric_grad(fn, x, eps=1e-6):
  """Central differences of a scalar float64 function; 0 at -inf entries (they cannot move)."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    if not np.isfinite(x[index]):
      continue
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    grad[index] = (fn(up) - fn(down)) / (2 * eps)
  return grad


def np_topk(teacher_logits, k, temperature=1.0):
  logp = np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
  ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
  return ids, np.take_along_axis(logp, ids, axis=-1)


def random_logits(rng, shape, scale=2.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# topk_teacher
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_teacher_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  teacher = random_logits(rng, (2, 3, 17))
  ids, logprobs = topk_teacher(teacher, 5, temperature=temperature, token_block=4)
  ref_ids, ref_logprobs = np_topk(teacher, 5, temperature)
  assert ids.dtype == jnp.int32 and logprobs.dtype == jnp.float32
  assert ids.shape == logprobs.shape == (2, 3, 5)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(np.asarray(logprobs), axis=-1) <= 0)
  # Over the full vocabulary, not renormalised over the k ids.
  assert np.all(np.exp(np.asarray(logprobs, np.float64)).sum(-1) < 1.0)


def test_topk_teacher_neg_inf_and_bf16():
  teacher = np.array([[0.0, NEG_INF, 1.0, NEG_INF], [NEG_INF] * 4], np.float32)
  ids, logprobs = topk_teacher(jnp.asarray(teacher, jnp.bfloat16), 3)
  np.testing.assert_array_equal(ids[0, :2], [2, 0])
  np.testing.assert_allclose(logprobs[0, :2], np_topk(teacher, 2)[1][0], rtol=1e-6)
  assert logprobs[0, 2] == -np.inf
  assert np.all(np.asarray(logprobs[1]) == -np.inf)  # an empty teacher row
  assert not np.any(np.isnan(np.asarray(logprobs)))


def test_topk_teacher_has_no_gradient():
  teacher = random_logits(np.random.default_rng(1), (3, 6))
  grad = jax.grad(lambda t: jnp.sum(topk_teacher(t, 2)[1]))(teacher)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("k, match", [(0, "k must be a positive integer"),
                                      (7, "k must be <= the vocabulary size"),
                                      (2.0, "k must be a positive integer")])
def test_topk_teacher_bad_k(k, match):
  with pytest.raises(ValueError, match=match):
    topk_teacher(jnp.zeros((2, 6)), k)


def test_topk_teacher_traced_k_says_it_must_be_static():
  teacher = random_logits(np.random.default_rng(2), (3, 16))
  with pytest.raises(TypeError, match=r"k must be a static argument.*static_argnames='k'"):
    jax.jit(kdjax.topk_teacher)(teacher, 8)
  ids, logprobs = jax.jit(kdjax.topk_teacher, static_argnames="k")(teacher, 8)
  np.testing.assert_array_equal(ids, np_topk(teacher, 8)[0])


def test_topk_teacher_bad_inputs():
  with pytest.raises(TypeError, match="teacher_logits must be a floating-point array"):
    topk_teacher(jnp.zeros((2, 6), jnp.int32), 2)
  with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
    topk_teacher(jnp.zeros((2, 6)), 2, temperature=0.0)


# ----------------------------------------------------------------------------------------------
# sparse_distill_loss: values and gradients against float64 references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k, temperature", [(1, 1.0), (4, 2.0), (9, 0.7)])
def test_value_matches_float64_reference(tail, k, temperature):
  rng = np.random.default_rng(k)
  logits = random_logits(rng, (2, 3, 11))
  teacher = random_logits(rng, (2, 3, 11))
  ids, logprobs = np_topk(teacher, k, temperature)
  got = sparse_distill_loss(
      logits, ids, logprobs.astype(np.float32), tail=tail, temperature=temperature,
      reduction="none", token_block=4)
  want = np_sparse_kl(logits, ids, logprobs, tail, temperature)
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_gradient_matches_float64_reference(tail):
  rng = np.random.default_rng(3)
  logits = random_logits(rng, (5, 9))
  ids, logprobs = np_topk(random_logits(rng, (5, 9)), 3, 1.5)
  logprobs32 = logprobs.astype(np.float32)

  def ref(x):
    return np.mean(np_sparse_kl(x, ids, logprobs32, tail, 1.5))

  grad = jax.grad(lambda x: sparse_distill_loss(
      x, ids, logprobs32, tail=tail, temperature=1.5, token_block=2))(logits)
  assert grad.dtype == jnp.float32
  np.testing.assert_allclose(grad, np_numeric_grad(ref, logits), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_check_grads(tail):
  rng = np.random.default_rng(4)
  logits = random_logits(rng, (2, 3, 7), scale=1.0)
  ids, logprobs = topk_teacher(random_logits(rng, (2, 3, 7)), 3)
  labels = np.array([[1, -100, 2], [0, 1, 2]])

  def loss(x):
    return sparse_distill_loss(x, ids, logprobs, labels, tail=tail, token_block=4)

  check_grads(loss, (jnp.asarray(logits, jnp.float32),), order=1, modes=["rev"],
              eps=1e-2, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_full_k_equals_dense_forward_kl(tail, temperature):
  rng = np.random.default_rng(5)
  logits = random_logits(rng, (4, 10))
  teacher = random_logits(rng, (4, 10))
  teacher[0, 3] = NEG_INF  # padded teacher entry; still one of the k = vocab ids
  logits[1, 2] = NEG_INF
  ids, logprobs = topk_teacher(teacher, 10, temperature=temperature)

  def sparse(x):
    return sparse_distill_loss(x, ids, logprobs, tail=tail, temperature=temperature,
                               reduction="none")

  np.testing.assert_allclose(
      sparse(logits), kdjax.forward_kl(logits, teacher, temperature=temperature),
      rtol=1e-5, atol=1e-6)
  grad_sparse = jax.grad(lambda x: jnp.sum(sparse(x)))(logits)
  grad_dense = jax.grad(lambda x: kdjax.distill_loss(
      x, teacher, temperature=temperature, reduction="sum"))(logits)
  np.testing.assert_allclose(grad_sparse, grad_dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_neg_inf_logits_and_logprobs(tail):
  rng = np.random.default_rng(6)
  logits = random_logits(rng, (5, 8))
  teacher = random_logits(rng, (5, 8))
  ids, logprobs = np_topk(teacher, 3)
  logits[0, ids[0, 0]] = NEG_INF  # student forbids the teacher's top id
  logits[1, ids[1, 2]] = NEG_INF
  logits[2, [i for i in range(8) if i not in ids[2]][:2]] = NEG_INF  # outside the top k
  logits[3, :] = NEG_INF  # an empty student row
  logprobs[1, 1] = NEG_INF  # a top-k entry without teacher mass
  logprobs[4, :] = NEG_INF  # an empty teacher row
  logprobs32 = logprobs.astype(np.float32)

  got = sparse_distill_loss(logits, ids, logprobs32, tail=tail, reduction="none")
  want = np_sparse_kl(logits, ids, logprobs32, tail)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert got[3] == 0.0 and got[4] == 0.0  # empty rows contribute 0

  grad = jax.grad(lambda x: sparse_distill_loss(x, ids, logprobs32, tail=tail))(logits)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[np.isinf(logits)], 0.0)
  finite_rows = [0, 1, 2]

  def ref(x):
    full = logits.astype(np.float64).copy()
    full[finite_rows] = x
    return np.mean(np_sparse_kl(full, ids, logprobs32, tail))

  np.testing.assert_allclose(
      np.asarray(grad)[finite_rows], np_numeric_grad(ref, logits[finite_rows]),
      rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Masks, reductions, dtypes, jit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
def test_ignored_labels_and_reductions(tail):
  rng = np.random.default_rng(7)
  logits = random_logits(rng, (2, 4, 6))
  ids, logprobs = topk_teacher(random_logits(rng, (2, 4, 6)), 2)
  labels = np.array([[1, -100, 3, 4], [-100, -100, 2, 5]])
  where = np.array([[True, True, False, True], [True, True, True, True]])
  per_token = np_sparse_kl(logits, ids, logprobs, tail)
  valid = (labels != -100) & where
  kwargs = dict(tail=tail, where=where)
  np.testing.assert_allclose(
      sparse_distill_loss(logits, ids, logprobs, labels, **kwargs),
      per_token[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(
      sparse_distill_loss(logits, ids, logprobs, labels, reduction="sum", **kwargs),
      per_token[valid].sum(), rtol=1e-5)
  np.testing.assert_allclose(
      sparse_distill_loss(logits, ids, logprobs, labels, normalizer=10.0, **kwargs),
      per_token[valid].sum() / 10.0, rtol=1e-5)
  np.testing.assert_allclose(
      sparse_distill_loss(logits, ids, logprobs, labels, reduction="none", **kwargs),
      np.where(valid, per_token, 0.0), rtol=1e-5, atol=1e-7)
  total, count = sparse_distill_loss_sum_and_count(logits, ids, logprobs, labels, **kwargs)
  np.testing.assert_allclose(total, per_token[valid].sum(), rtol=1e-5)
  assert count == valid.sum()
  seq_means = [per_token[b][valid[b]].mean() for b in range(2)]
  np.testing.assert_allclose(
      sparse_distill_loss(logits, ids, logprobs, labels, reduction="sequence_mean", **kwargs),
      np.mean(seq_means), rtol=1e-5)
  # Ignored tokens get no gradient.
  grad = jax.grad(lambda x: sparse_distill_loss(x, ids, logprobs, labels, **kwargs))(logits)
  np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
  assert np.all(np.any(np.asarray(grad)[valid] != 0, axis=-1))


@pytest.mark.parametrize("tail", TAILS)
def test_all_ignored_batch_is_zero_with_zero_grads(tail):
  rng = np.random.default_rng(8)
  logits = random_logits(rng, (3, 5))
  ids, logprobs = topk_teacher(random_logits(rng, (3, 5)), 2)
  labels = np.full((3,), -100)
  value, grad = jax.value_and_grad(
      lambda x: sparse_distill_loss(x, ids, logprobs, labels, tail=tail))(logits)
  assert value == 0.0
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("tail", TAILS)
def test_bf16_inputs(tail):
  rng = np.random.default_rng(9)
  logits = jnp.asarray(random_logits(rng, (4, 12)), jnp.bfloat16)
  ids, logprobs = topk_teacher(random_logits(rng, (4, 12)), 5)
  logprobs = logprobs.astype(jnp.bfloat16)
  got = sparse_distill_loss(logits, ids, logprobs, tail=tail, reduction="none")
  assert got.dtype == jnp.float32
  # Computed in float32 from the bf16 values: matches the float64 reference on those values.
  want = np_sparse_kl(np.asarray(logits, np.float64), ids, np.asarray(logprobs, np.float64), tail)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda x: sparse_distill_loss(x, ids, logprobs, tail=tail))(logits)
  assert grad.dtype == jnp.bfloat16
  grad32 = jax.grad(lambda x: sparse_distill_loss(x, ids, logprobs, tail=tail))(
      logits.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(grad, np.float32), grad32, rtol=2e-2, atol=1e-3)


def test_jit_traced_temperature_and_temperature_squared():
  rng = np.random.default_rng(10)
  logits = random_logits(rng, (3, 8))
  ids, logprobs = np_topk(random_logits(rng, (3, 8)), 3, 2.0)

  @jax.jit
  def loss(x, temperature):
    return sparse_distill_loss(x, ids, logprobs.astype(np.float32), tail="bucket",
                               temperature=temperature, temperature_squared=True)

  want = 4.0 * np_sparse_kl(logits, ids, logprobs, "bucket", 2.0).mean()
  np.testing.assert_allclose(loss(logits, jnp.float32(2.0)), want, rtol=1e-5)
  grad = jax.grad(loss)(logits, jnp.float32(2.0))
  grad_static = jax.grad(lambda x: sparse_distill_loss(
      x, ids, logprobs.astype(np.float32), tail="bucket", temperature=2.0,
      temperature_squared=True))(logits)
  np.testing.assert_allclose(grad, grad_static, rtol=1e-6)
  # The temperature is a hyperparameter, not a trained parameter: its gradient is 0.
  assert jax.grad(loss, argnums=1)(logits, jnp.float32(2.0)) == 0.0


def test_no_gradient_to_teacher_logprobs():
  rng = np.random.default_rng(11)
  logits = random_logits(rng, (3, 8))
  ids, logprobs = topk_teacher(random_logits(rng, (3, 8)), 3)
  for tail in TAILS:
    grad = jax.grad(lambda lp, tail=tail: sparse_distill_loss(logits, ids, lp, tail=tail))(
        logprobs)
    np.testing.assert_array_equal(grad, 0.0)


def test_vmap_matches_per_example():
  rng = np.random.default_rng(12)
  logits = random_logits(rng, (3, 4, 7))
  ids, logprobs = topk_teacher(random_logits(rng, (3, 4, 7)), 2)
  batched = jax.vmap(lambda x, i, lp: sparse_distill_loss(x, i, lp, tail="zero"))(
      logits, ids, logprobs)
  singles = [sparse_distill_loss(logits[b], ids[b], logprobs[b], tail="zero") for b in range(3)]
  np.testing.assert_allclose(batched, singles, rtol=1e-6)


@pytest.mark.parametrize("loss", [
    sparse_distill_loss, lambda *a, **kw: kdjax.sparse_distill_loss_sum_and_count(*a, **kw)[0]],
    ids=["loss", "sum_and_count"])
def test_labels_outside_the_vocabulary_are_an_error_at_the_call(loss):
  """Labels only mask, but a counted one must be a student id in [0, 6): known, a ValueError
  naming the first; under another ignore_index, -100 gets PyTorch's hint; traced, NaN."""
  rng = np.random.default_rng(12)
  logits = random_logits(rng, (2, 3, 6))
  ids, logprobs = topk_teacher(random_logits(rng, (2, 3, 6)), 2)
  labels = np.array([[1, -100, 6], [0, 9, 5]])
  with pytest.raises(ValueError, match=(
      r"^labels must be vocabulary ids in \[0, 6\) \(logits.shape\[-1\] = 6\) or "
      r"ignore_index=-100, got labels\[0, 2\] = 6 \(the first of 2 counted")):
    loss(logits, ids, logprobs, labels)
  with pytest.raises(ValueError, match=r"got labels\[0, 1\] = -100 .*ignore_index=-100"):
    loss(logits, ids, logprobs, np.array([[1, -100, 2], [0, 3, -1]]), ignore_index=-1)
  assert np.isnan(jax.jit(lambda y: loss(logits, ids, logprobs, y))(labels))
  where = labels < 6
  np.testing.assert_allclose(loss(logits, ids, logprobs, labels, where=where),
                             loss(logits, ids, logprobs, np.where(where, labels, -100)),
                             rtol=1e-6)


def test_out_of_range_id_gives_nan_not_wrong_data():
  logits = jnp.zeros((2, 4))
  ids = jnp.array([[0, 1], [2, 9]])
  logprobs = jnp.log(jnp.full((2, 2), 0.25))
  values = sparse_distill_loss(logits, ids, logprobs, tail="zero", reduction="none")
  assert values[0] == 0.0 and np.isnan(values[1])


# ----------------------------------------------------------------------------------------------
# Mathematical properties
# ----------------------------------------------------------------------------------------------


@hypothesis.settings(max_examples=15)  # k takes few values: each one compiles anew.
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 4, 8]), shift=st.floats(-50.0, 50.0))
def test_properties(seed, k, shift):
  rng = np.random.default_rng(seed)
  logits = random_logits(rng, (3, 9), scale=3.0)
  teacher = random_logits(rng, (3, 9), scale=3.0)
  ids, logprobs = topk_teacher(teacher, k)
  values = {tail: np.asarray(sparse_distill_loss(logits, ids, logprobs, tail=tail,
                                                 reduction="none")) for tail in TAILS}
  dense = np.asarray(kdjax.forward_kl(logits, teacher))
  # renormalize and bucket are KLs between distributions over k and k + 1 categories; bucket
  # coarsens the full distributions, so it is bounded by the full KL.
  assert np.all(values["renormalize"] >= -1e-6)
  assert np.all(values["bucket"] >= -1e-6)
  assert np.all(values["bucket"] <= dense + 1e-4)
  # A per-row constant added to the student logits changes nothing.
  shifted = sparse_distill_loss(logits + shift, ids, logprobs, tail="bucket", reduction="none")
  np.testing.assert_allclose(shifted, values["bucket"], rtol=1e-3, atol=1e-3)
  # A student equal to the teacher scores 0 under every KL policy.
  for tail in ("renormalize", "bucket"):
    same = sparse_distill_loss(teacher, ids, logprobs, tail=tail, reduction="none")
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
  logits = jnp.zeros((2, 6))
  ids = jnp.zeros((2, 3), jnp.int32)
  logprobs = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="tail must be one of"):
    sparse_distill_loss(logits, ids, logprobs, tail="drop")
  with pytest.raises(TypeError, match="teacher_ids must be an integer array"):
    sparse_distill_loss(logits, logprobs, logprobs)
  with pytest.raises(ValueError, match=r"teacher_ids must have shape logits.shape\[:-1\]"):
    sparse_distill_loss(logits, jnp.zeros((3, 3), jnp.int32), jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match="teacher_logprobs must have the shape of teacher_ids"):
    sparse_distill_loss(logits, ids, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="align_vocab"):
    sparse_distill_loss(logits, jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 8)))
  with pytest.raises(TypeError, match="logits must be a floating-point array"):
    sparse_distill_loss(jnp.zeros((2, 6), jnp.int32), ids, logprobs)
  with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
    sparse_distill_loss(logits, ids, logprobs, temperature=-1.0)
  with pytest.raises(ValueError, match="labels must have shape"):
    sparse_distill_loss(logits, ids, logprobs, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="reduction must be one of"):
    sparse_distill_loss(logits, ids, logprobs, reduction="avg")


# ----------------------------------------------------------------------------------------------
# Every divergence from a sparse teacher.
# ----------------------------------------------------------------------------------------------

SPARSE_HYPER = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2},
                "skew_reverse_kl": {"alpha": 0.2}}


def np_sparse_divergence(name, logits, ids, logprobs, tail, temperature=1.0):
  """Per-token sparse divergence in float64: the k (+ 1) categories built from the definitions,
  then the dense float64 divergence of tests/reference.py on them (whose log-softmax leaves
  normalised log-probabilities unchanged)."""
  from tests import reference

  logits = np.asarray(logits, np.float64)
  log_q = np_log_softmax(logits / temperature)
  q = np.exp(np.take_along_axis(log_q, np.asarray(ids), -1))
  p = np.exp(np.asarray(logprobs, np.float64))
  if tail == "renormalize":
    q, p = q / q.sum(-1, keepdims=True), p / p.sum(-1, keepdims=True)
  else:
    in_top = np.zeros(logits.shape, bool)
    np.put_along_axis(in_top, np.asarray(ids), True, -1)
    q_rest = np.where(in_top, 0.0, np.exp(log_q)).sum(-1, keepdims=True)
    p_rest = np.maximum(1.0 - p.sum(-1, keepdims=True), 0.0)
    q, p = np.concatenate([q, q_rest], -1), np.concatenate([p, p_rest], -1)
  with np.errstate(divide="ignore"):
    return reference.per_token(name, np.log(q), np.log(p), **SPARSE_HYPER.get(name, {}))


@pytest.mark.parametrize("name", kdjax.DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_every_divergence_against_float64(name, tail):
  rng = np.random.default_rng(hash((name, tail)) % 2**32)
  logits = random_logits(rng, (3, 4, 13))
  teacher = random_logits(rng, (3, 4, 13))
  ids, logprobs = topk_teacher(teacher, 5, temperature=1.5)
  kwargs = dict(tail=tail, divergence=name, temperature=1.5, reduction="none",
                **SPARSE_HYPER.get(name, {}))
  got = sparse_distill_loss(logits, ids, logprobs, **kwargs)
  want = np_sparse_divergence(name, logits, ids, logprobs, tail, temperature=1.5)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  weights = rng.random((3, 4))
  grad = jax.grad(lambda x: jnp.sum(sparse_distill_loss(x, ids, logprobs, **kwargs) * weights))(
      logits)
  want_grad = np_numeric_grad(lambda x: np.sum(np_sparse_divergence(
      name, x, ids, logprobs, tail, temperature=1.5) * weights), logits)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", kdjax.DIVERGENCES)
def test_every_divergence_with_every_id_is_the_dense_divergence(name):
  rng = np.random.default_rng(21)
  logits = random_logits(rng, (6, 9))
  teacher = random_logits(rng, (6, 9))
  teacher[0, :4] = -np.inf  # a padded teacher vocabulary on one token
  ids, logprobs = topk_teacher(teacher, 9, temperature=0.8)
  kwargs = dict(divergence=name, temperature=0.8, **SPARSE_HYPER.get(name, {}))
  dense, dense_grad = jax.value_and_grad(lambda x: kdjax.distill_loss(x, teacher, **kwargs))(
      logits)
  for tail in ("bucket", "renormalize"):
    value, grad = jax.value_and_grad(lambda x, t=tail: sparse_distill_loss(
        x, ids, logprobs, tail=t, **kwargs))(logits)
    np.testing.assert_allclose(value, dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6)


@hypothesis.settings(max_examples=15)
@hypothesis.given(st.integers(0, 2**31 - 1), st.sampled_from([1, 3, 8]),
                  st.sampled_from(["forward_kl", "reverse_kl", "generalized_jsd",
                                   "total_variation"]))
def test_bucket_never_exceeds_the_dense_divergence(seed, k, name):
  """Merging the categories outside the top k cannot increase a divergence that satisfies the
  data processing inequality."""
  rng = np.random.default_rng(seed)
  logits = random_logits(rng, (4, 12), scale=3.0)
  teacher = random_logits(rng, (4, 12), scale=3.0)
  ids, logprobs = topk_teacher(teacher, k)
  sparse = sparse_distill_loss(logits, ids, logprobs, tail="bucket", divergence=name,
                               reduction="none")
  dense = kdjax.distill_loss(logits, teacher, divergence=name, reduction="none")
  assert np.all(np.asarray(sparse) <= np.asarray(dense) + 1e-5)


def test_reverse_kl_renormalized_is_blind_to_mass_leaving_the_support():
  """With a renormalised top-k support, a student that moves its mass off the teacher's top k
  keeps the same reverse KL; the tail bucket sees it."""
  teacher = np.log(np.array([[0.6, 0.3, 0.05, 0.05]], np.float32))
  ids, logprobs = topk_teacher(teacher, 2)
  matched = np.log(np.array([[0.6, 0.3, 0.05, 0.05]], np.float32))
  leaking = np.log(np.array([[0.06, 0.03, 0.455, 0.455]], np.float32))  # same shape on the top 2
  losses = {tail: [float(sparse_distill_loss(x, ids, logprobs, tail=tail, divergence="reverse_kl"))
                   for x in (matched, leaking)] for tail in ("renormalize", "bucket")}
  np.testing.assert_allclose(losses["renormalize"], [0.0, 0.0], atol=1e-6)
  assert losses["bucket"][0] < 1e-6 < 0.5 < losses["bucket"][1]


def test_zero_tail_is_forward_kl_only():
  logits = np.zeros((2, 4), np.float32)
  ids, logprobs = topk_teacher(logits, 2)
  with pytest.raises(ValueError, match="tail='zero'.*forward KL.*'bucket'"):
    sparse_distill_loss(logits, ids, logprobs, tail="zero", divergence="reverse_kl")
  with pytest.raises(ValueError, match="divergence must be one of"):
    sparse_distill_loss(logits, ids, logprobs, tail="bucket", divergence="kl")


# ----------------------------------------------------------------------------------------------
# A concrete teacher that cannot be log-probabilities is refused
# ----------------------------------------------------------------------------------------------


def _valid_teacher():
  """Two tokens over a 6-id vocabulary, top 3 of hand-written probabilities."""
  ids = np.array([[1, 4, 0], [5, 2, 3]], np.int32)
  probs = np.array([[0.5, 0.25, 0.125], [0.4, 0.3, 0.2]])
  return ids, np.log(probs).astype(np.float32)


@pytest.mark.parametrize("loss", [sparse_distill_loss, sparse_distill_loss_sum_and_count])
def test_raw_logits_are_refused_and_point_at_topk_teacher(loss):
  rng = np.random.default_rng(20)
  teacher = random_logits(rng, (2, 3, 16), scale=4.0)
  top_logits, ids = jax.lax.top_k(jnp.asarray(teacher), 4)  # the mistake: no normalisation
  row = int(np.argmax(np.max(np.asarray(top_logits), -1).reshape(-1) > 2.0**-6))
  at = re.escape(f"teacher_logprobs[{row // 3}, {row % 3}]")
  with pytest.raises(ValueError, match=at + r" holds log-probabilities above 0.*raw logits"
                     r".*kdjax\.topk_teacher"):
    loss(teacher, ids, top_logits)
  # The same arrays under jit are traced: not checked, as documented (a number, no error).
  assert np.isfinite(np.asarray(jax.jit(loss)(teacher, ids, top_logits))).all()


def test_probabilities_instead_of_their_logs_are_refused():
  ids, logprobs = _valid_teacher()
  with pytest.raises(ValueError, match=r"teacher_logprobs\[0\] .*look like probabilities"
                     r".*kdjax\.topk_teacher"):
    sparse_distill_loss(np.zeros((2, 6), np.float32), ids, np.exp(logprobs))
  # Also for the gradient: the teacher arrays are concrete there.
  with pytest.raises(ValueError, match="look like probabilities"):
    jax.grad(lambda x: sparse_distill_loss(x, ids, np.exp(logprobs)))(np.zeros((2, 6)))


def test_probabilities_summing_past_one_are_refused():
  ids, logprobs = _valid_teacher()
  # Token 1's probabilities 0.4 + 0.3 + 0.2 times e^0.2: they sum to 0.9 * 1.2214 = 1.0993.
  shifted = logprobs.copy()
  shifted[1] += 0.2
  with pytest.raises(ValueError, match=r"exp\(teacher_logprobs\[1\]\) sum to 1\.099\d* > 1"):
    sparse_distill_loss(np.zeros((2, 6), np.float32), ids, shifted)
  with pytest.raises(ValueError, match=r"exp\(teacher_logprobs\[1\]\) sum to"):
    sparse_distill_loss_sum_and_count(np.zeros((2, 6), np.float32), ids, shifted)


def test_repeated_ids_are_refused_also_on_neg_inf_entries():
  ids, logprobs = _valid_teacher()
  repeated = ids.copy()
  repeated[1, 2] = 5  # token 1 holds id 5 at entries 0 and 2
  with pytest.raises(ValueError, match=r"teacher_ids\[1\] repeats id 5 \(entries 0 and 2\)"):
    sparse_distill_loss(np.zeros((2, 6), np.float32), repeated, logprobs)
  no_mass = logprobs.copy()
  no_mass[1, 2] = NEG_INF  # no teacher mass there, but the student's side still reads the id
  with pytest.raises(ValueError, match=r"teacher_ids\[1\] repeats id 5"):
    sparse_distill_loss(np.zeros((2, 6), np.float32), repeated, no_mass, tail="renormalize")


def test_the_first_bad_token_is_named():
  ids, logprobs = _valid_teacher()
  ids = np.stack([ids, ids])  # tokens [2, 2]
  logprobs = np.stack([logprobs, logprobs])
  ids[1, 1, 1] = ids[1, 1, 0]  # token (1, 1): a repeated id
  logprobs[1, 0, 2] = 0.5  # token (1, 0), earlier: a log-probability above 0
  with pytest.raises(ValueError, match=re.escape("teacher_logprobs[1, 0] holds")):
    sparse_distill_loss(np.zeros((2, 2, 6), np.float32), ids, logprobs)


def test_rounding_within_the_tolerance_is_accepted():
  """What rounding can do passes: a log-probability a little above 0 from float32 arithmetic,
  and full-vocabulary teachers rounded to the 16-bit formats a cache stores."""
  logits = np.zeros((2, 6), np.float32)
  ids, logprobs = _valid_teacher()
  # log(0.5) + 0.01 next to log(0.5): the sum is 0.5 * e^0.01 + 0.5 = 1.005, log 0.005 < 2^-6.
  nearly = np.log(np.array([[0.5, 0.5, 1e-30], [0.4, 0.3, 0.2]], np.float32))
  nearly[0, 0] += 0.01
  nearly[0, 2] = NEG_INF
  assert np.isfinite(float(sparse_distill_loss(logits, ids, nearly)))
  positive = logprobs.copy()
  positive[0] = [1e-3, NEG_INF, NEG_INF]  # one id with all the mass, 1e-3 over: rounding
  assert np.isfinite(float(sparse_distill_loss(logits, ids, positive)))
  # ... but 2^-5 above 0 is not rounding.
  positive[0, 0] = 2.0**-5
  with pytest.raises(ValueError, match=r"teacher_logprobs\[0\] holds log-probabilities above 0"):
    sparse_distill_loss(logits, ids, positive)
  # Every id of near-uniform teachers, rounded: the sum lands a little above 1.
  teacher = random_logits(np.random.default_rng(21), (64, 50), scale=0.01)
  full_ids, full = topk_teacher(teacher, 50)
  for dtype in (jnp.float16, jnp.bfloat16):
    rounded = full.astype(dtype)
    mass = np.exp(np.asarray(rounded, np.float64)).sum(-1)
    assert mass.max() > 1.0  # the case at hand
    student = jnp.zeros((64, 50))
    assert np.isfinite(float(sparse_distill_loss(student, full_ids, rounded)))
    if dtype == jnp.float16:  # read back from a float16 cache and upcast
      assert np.isfinite(float(sparse_distill_loss(student, full_ids,
                                                   rounded.astype(jnp.float32))))
