"""kd_loss, distill_loss, reductions and the combined objective against independent references."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import kdjax
from tests import reference

IGNORE = -100
# The divergences that read each hyperparameter (docs/divergences.md's table).
_READS = {"generalized_jsd": ("beta",), "skew_forward_kl": ("alpha",),
          "skew_reverse_kl": ("alpha",)}
_READS = {name: _READS.get(name, ()) for name in kdjax.DIVERGENCES}


def openrlhf_kd_loss(logits, teacher_logits, label):
  """OpenRLHF's KDLoss.forward, verbatim formula (PyTorch)."""
  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  inf_mask = torch.isinf(logits)
  logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  prod_probs = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  mask = (label != IGNORE).int()
  return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def _inputs(rng, shape, *, neg_inf=0.0, ignore=0.3):
  logits = reference.random_logits(rng, shape, neg_inf_fraction=neg_inf)
  teacher = reference.random_logits(rng, shape, neg_inf_fraction=neg_inf)
  labels = rng.integers(0, shape[-1], shape[:-1])
  labels = np.where(rng.random(shape[:-1]) < ignore, IGNORE, labels).astype(np.int32)
  labels.reshape(-1)[0] = 1  # At least one valid token.
  return logits, teacher, labels


@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 19)])
@pytest.mark.parametrize("neg_inf", [0.0, 0.15])
def test_kd_loss_matches_openrlhf_pytorch(shape, neg_inf):
  rng = np.random.default_rng(sum(shape) + int(neg_inf * 100))
  logits, teacher, labels = _inputs(rng, shape, neg_inf=neg_inf)
  # Teacher -inf only where the student is -inf too, as with a shared padded vocabulary:
  # OpenRLHF's formula gives NaN (0 * -inf) where only the teacher is -inf.
  teacher = np.where(np.isneginf(logits) | np.isfinite(teacher), teacher, 0.0)
  t_logits = torch.tensor(logits, requires_grad=True)
  want = openrlhf_kd_loss(t_logits, torch.tensor(teacher), torch.tensor(labels))
  want.backward()
  value, grad = jax.value_and_grad(kdjax.kd_loss)(logits, teacher, labels)
  np.testing.assert_allclose(value, want.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("neg_inf", [0.0, 0.2])
def test_kd_loss_matches_float64_numpy(neg_inf):
  rng = np.random.default_rng(1)
  logits, teacher, labels = _inputs(rng, (3, 4, 21), neg_inf=neg_inf)
  mask = labels != IGNORE
  per_token = reference.per_token("soft_cross_entropy", logits, teacher)
  want = reference.reduce(per_token, mask, "mean")
  np.testing.assert_allclose(kdjax.kd_loss(logits, teacher, labels), want, rtol=1e-5)
  want_grad = reference.numerical_grad(
      lambda x: reference.reduce(
          reference.per_token("soft_cross_entropy", x, teacher), mask, "mean"), logits)
  grad = jax.grad(kdjax.kd_loss)(logits, teacher, labels)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
  rng = np.random.default_rng(2)
  logits, teacher, labels = _inputs(rng, (5, 9))
  grad_teacher = jax.grad(kdjax.kd_loss, argnums=1)(logits, teacher, labels)
  assert np.all(np.asarray(grad_teacher) == 0)


@pytest.mark.parametrize("divergence", kdjax.DIVERGENCES)
def test_all_ignored_gives_zero_and_zero_grad(divergence):
  rng = np.random.default_rng(3)
  logits, teacher, _ = _inputs(rng, (2, 3, 8), neg_inf=0.2)
  labels = np.full((2, 3), IGNORE, np.int32)
  for reduction in ("mean", "sum", "sequence_mean"):
    fn = lambda x, r=reduction: kdjax.distill_loss(  # noqa: E731
        x, teacher, labels, divergence=divergence, reduction=r)
    value, grad = jax.value_and_grad(fn)(logits)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
  value, grad = jax.value_and_grad(kdjax.kd_loss)(logits, teacher, labels)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_neg_inf_everywhere_is_finite():
  logits = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf], [2.0, 0.0, -np.inf]],
                    np.float32)
  teacher = np.array([[-np.inf, 0.0, 1.0], [0.0, 1.0, 2.0], [-np.inf, -np.inf, -np.inf]],
                     np.float32)
  labels = np.array([0, 1, 2], np.int32)
  for divergence in kdjax.DIVERGENCES:
    value, grad = jax.value_and_grad(
        lambda x, d=divergence: kdjax.distill_loss(x, teacher, labels, divergence=d))(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), divergence


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
  rng = np.random.default_rng(4)
  logits, teacher, labels = _inputs(rng, (6, 40), neg_inf=0.1)
  lo, te = jnp.asarray(logits, dtype), jnp.asarray(teacher, dtype)
  value, grad = jax.value_and_grad(kdjax.kd_loss)(lo, te, labels)
  assert value.dtype == jnp.float32 and grad.dtype == dtype
  up_lo, up_te = np.asarray(lo, np.float32), np.asarray(te, np.float32)
  want = reference.reduce(reference.per_token("soft_cross_entropy", up_lo, up_te),
                          labels != IGNORE, "mean")
  np.testing.assert_allclose(value, want, rtol=1e-5)  # Computed in float32 from the inputs.
  want_grad = jax.grad(kdjax.kd_loss)(up_lo, up_te, labels)
  np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=1e-2, atol=1e-4)


def test_jit_vmap_check_grads_and_single_trace():
  rng = np.random.default_rng(5)
  logits, teacher, labels = _inputs(rng, (4, 6, 10))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_fn(x, t, y, temperature):
    return kdjax.distill_loss(x, t, y, temperature=temperature, temperature_squared=True)

  for temperature in (1.0, 2.0, 3.0):  # A traced temperature schedule does not retrace.
    value = loss_fn(logits, teacher, labels, jnp.float32(temperature))
    per_token = reference.per_token("forward_kl", logits, teacher, temperature=temperature)
    want = reference.reduce(per_token * temperature**2, labels != IGNORE, "mean")
    np.testing.assert_allclose(value, want, rtol=1e-5)
  batched = jax.vmap(kdjax.kd_loss)(logits, teacher, labels)
  want = [kdjax.kd_loss(a, b, c) for a, b, c in zip(logits, teacher, labels, strict=True)]
  np.testing.assert_allclose(batched, want, rtol=1e-6)
  check_grads(lambda x: kdjax.kd_loss(x, teacher, labels), (jnp.asarray(logits),), order=1,
              modes=["rev"], eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("divergence", kdjax.DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence_mean"])
def test_reductions_and_masks_match_numpy(divergence, reduction):
  rng = np.random.default_rng(6)
  logits, teacher, labels = _inputs(rng, (3, 5, 12), neg_inf=0.1)
  where = rng.random((3, 5)) < 0.8
  labels[1] = IGNORE  # A sequence with no valid token.
  kw = dict(divergence=divergence, temperature=1.5, where=where, reduction=reduction,
            **{name: value for name, value in (("beta", 0.4), ("alpha", 0.2))
               if name in _READS[divergence]})
  mask = (labels != IGNORE) & where
  per_token = reference.per_token(divergence, logits, teacher, temperature=1.5, beta=0.4,
                                  alpha=0.2)
  want = reference.reduce(per_token, mask, reduction)
  got = kdjax.distill_loss(logits, teacher, labels, **kw)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  weights = rng.random(np.shape(want)) if reduction == "none" else 1.0
  want_grad = reference.numerical_grad(
      lambda x: np.sum(weights * reference.reduce(
          reference.per_token(divergence, x, teacher, temperature=1.5, beta=0.4, alpha=0.2),
          mask, reduction)), logits)
  grad = jax.grad(
      lambda x: jnp.sum(weights * kdjax.distill_loss(x, teacher, labels, **kw)))(logits)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=2e-6)


def test_normalizer_and_sum_and_count():
  rng = np.random.default_rng(7)
  logits, teacher, labels = _inputs(rng, (2, 8, 16))
  per_token = reference.per_token("forward_kl", logits, teacher)
  mask = labels != IGNORE
  np.testing.assert_allclose(
      kdjax.distill_loss(logits, teacher, labels, normalizer=100.0),
      np.sum(per_token[mask]) / 100.0, rtol=1e-5)
  # Two "hosts" holding different numbers of valid tokens: (sum, count) gives the global mean.
  sums, counts = zip(*(kdjax.distill_loss_sum_and_count(logits[i], teacher[i], labels[i])
                       for i in range(2)), strict=True)
  np.testing.assert_allclose(sum(sums) / sum(counts), per_token[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(counts, mask.sum(-1))
  total_grad = jax.grad(lambda x: kdjax.distill_loss_sum_and_count(x, teacher, labels)[0])(
      logits)
  np.testing.assert_allclose(
      total_grad, jax.grad(
          lambda x: kdjax.distill_loss(x, teacher, labels, reduction="sum"))(logits),
      rtol=1e-6)


@pytest.mark.parametrize("kd_coef", [0.0, 0.3, 1.0])
def test_distill_with_cross_entropy(kd_coef):
  rng = np.random.default_rng(8)
  logits, teacher, labels = _inputs(rng, (2, 6, 11), neg_inf=0.05)
  logits = np.where(np.arange(11) == labels[..., None], 1.0, logits)  # Labels never -inf.
  mask = labels != IGNORE

  def want_fn(x):
    kd = reference.reduce(reference.per_token("reverse_kl", x, teacher, temperature=2.0),
                          mask, "mean")
    ce = reference.reduce(reference.cross_entropy(x, labels), mask, "mean")
    return (1 - kd_coef) * ce + kd_coef * 4.0 * kd, ce, 4.0 * kd

  kw = dict(kd_coef=kd_coef, divergence="reverse_kl", temperature=2.0,
            temperature_squared=True)
  loss, (ce, distill) = kdjax.distill_with_cross_entropy(
      logits, teacher, labels, return_components=True, **kw)
  np.testing.assert_allclose([loss, ce, distill], want_fn(logits), rtol=1e-5)
  grad = jax.grad(lambda x: kdjax.distill_with_cross_entropy(x, teacher, labels, **kw))(logits)
  np.testing.assert_allclose(
      grad, reference.numerical_grad(lambda x: want_fn(x)[0], logits), rtol=1e-4, atol=1e-6)
  traced = jax.jit(lambda k: kdjax.distill_with_cross_entropy(
      logits, teacher, labels, kd_coef=k, divergence="reverse_kl", temperature=2.0,
      temperature_squared=True))(jnp.float32(kd_coef))
  np.testing.assert_allclose(traced, loss, rtol=1e-6)
  none = kdjax.distill_with_cross_entropy(logits, teacher, labels, reduction="none", **kw)
  assert none.shape == labels.shape and np.all(np.asarray(none)[~mask] == 0)


def test_shift_labels_aligns_next_token():
  ids = np.array([[5, 6, 7, IGNORE]], np.int32)
  np.testing.assert_array_equal(kdjax.shift_labels(ids), [[6, 7, IGNORE, IGNORE]])
  # A model that predicts the next token perfectly has ~0 loss only with shifted labels.
  vocab = 10
  logits = np.full((1, 4, vocab), -20.0, np.float32)
  for t, nxt in enumerate([6, 7, 8, 9]):
    logits[0, t, nxt] = 20.0
  shifted = kdjax.distill_with_cross_entropy(logits, logits, kdjax.shift_labels(ids),
                                             kd_coef=0.0)
  unshifted = kdjax.distill_with_cross_entropy(logits, logits, ids, kd_coef=0.0)
  assert float(shifted) < 1e-6 and float(unshifted) > 10.0


def test_gradient_memory_is_blocked():
  tokens, vocab = 2048, 32000
  x = jax.ShapeDtypeStruct((tokens, vocab), jnp.float32)
  y = jax.ShapeDtypeStruct((tokens,), jnp.int32)
  logits_bytes = tokens * vocab * 4
  for divergence in kdjax.DIVERGENCES:
    fn = lambda a, b, c, d=divergence: kdjax.distill_loss(a, b, c, divergence=d)  # noqa: E731
    grad_temp = jax.jit(jax.value_and_grad(fn)).lower(x, x, y).compile().memory_analysis()
    assert grad_temp.temp_size_in_bytes <= 0.1 * logits_bytes, divergence
    value_temp = jax.jit(fn).lower(x, x, y).compile().memory_analysis()
    # A call that is not differentiated keeps no gradient-sized buffer.
    assert value_temp.temp_size_in_bytes <= 0.05 * logits_bytes, divergence
  # bfloat16 on XLA:CPU: one 16-bit copy of each input (its compiler cannot slice bfloat16 in
  # place inside a loop), never a float32 upcast of the whole array (which would be 2x here).
  x16 = jax.ShapeDtypeStruct((tokens, vocab), jnp.bfloat16)
  grad_temp = jax.jit(jax.value_and_grad(kdjax.kd_loss)).lower(x16, x16, y).compile()
  assert grad_temp.memory_analysis().temp_size_in_bytes <= 1.1 * logits_bytes


_logit_rows = hnp.arrays(np.float32, (3, 9), elements=st.floats(-15, 15, width=32))


@given(_logit_rows, _logit_rows)
def test_kd_loss_is_at_least_teacher_entropy(logits, teacher):
  labels = np.array([0, 1, 2], np.int32)
  log_p = reference.log_softmax(teacher)
  entropy = -np.sum(np.exp(log_p) * log_p, -1).mean()
  assert float(kdjax.kd_loss(logits, teacher, labels)) >= entropy - 1e-4
  np.testing.assert_allclose(kdjax.kd_loss(teacher, teacher, labels), entropy, rtol=1e-4,
                             atol=1e-5)
  shift = np.array([[-50.0], [0.0], [75.0]], np.float32)
  np.testing.assert_allclose(kdjax.kd_loss(logits + shift, teacher - shift, labels),
                             kdjax.kd_loss(logits, teacher, labels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, match, error", [
    (lambda: kdjax.kd_loss(np.zeros((2, 5)), np.zeros((2, 6)), np.zeros(2, np.int32)),
     "different vocabulary sizes.*align_vocab", ValueError),
    (lambda: kdjax.kd_loss(np.zeros((2, 5)), np.zeros((3, 5)), np.zeros(2, np.int32)),
     "same shape", ValueError),
    (lambda: kdjax.kd_loss(np.zeros((2, 5)), np.zeros((2, 5)), np.zeros(3, np.int32)),
     r"labels must have shape logits.shape\[:-1\]", ValueError),
    (lambda: kdjax.kd_loss(np.zeros((2, 5)), np.zeros((2, 5)), np.zeros(2, np.float32)),
     "labels must be an integer array", TypeError),
    (lambda: kdjax.kd_loss(np.zeros((2, 5), np.int32), np.zeros((2, 5)), np.zeros(2, np.int32)),
     "logits must be a floating-point array", TypeError),
    (lambda: kdjax.kd_loss(np.zeros((2, 5)), np.zeros((2, 5), np.int32), np.zeros(2, np.int32)),
     "teacher_logits must be a floating-point array", TypeError),
    (lambda: kdjax.distill_loss(np.zeros((2, 5)), np.zeros((2, 5)), reduction="avg"),
     "reduction must be one of", ValueError),
    (lambda: kdjax.distill_loss(np.zeros((2, 5)), np.zeros((2, 5)), reduction="sum",
                                normalizer=3.0),
     "normalizer replaces", ValueError),
    (lambda: kdjax.distill_loss(np.zeros((2, 5)), np.zeros((2, 5)), where=np.ones(2)),
     "where must be a boolean or integer mask", TypeError),
    (lambda: kdjax.distill_with_cross_entropy(np.zeros((2, 5)), np.zeros((2, 5)),
                                              np.zeros(2, np.int32), kd_coef=1.5),
     "kd_coef must be in", ValueError),
    (lambda: kdjax.distill_loss(np.zeros((2, 5)), np.zeros((2, 5)), token_block=0),
     "token_block must be a positive integer", ValueError),
])
def test_errors_name_the_argument(call, match, error):
  with pytest.raises(error, match=match):
    call()


# ----------------------------------------------------------------------------------------------
# Misuse that used to give a plausible number: a hyperparameter the divergence does not read,
# labels outside the vocabulary.
# ----------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(21)
_S, _T = (jnp.asarray(reference.random_logits(_RNG, (2, 4, 12))) for _ in range(2))
_Y = jnp.asarray([[1, 2, IGNORE, 3], [0, IGNORE, 5, 11]], jnp.int32)
_H, _H_TEACHER = (jnp.asarray(_RNG.standard_normal((2, 4, 6)), jnp.float32) for _ in range(2))
_W = jnp.asarray(_RNG.standard_normal((6, 12)), jnp.float32) / 2
_IDS, _LOGPROBS = kdjax.topk_teacher(_T, 3)


def _in_shard_map(loss, *arrays):
  """``loss`` inside ``jax.shard_map`` over a one-device vocabulary axis, jitted."""
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.jit(jax.shard_map(loss, mesh=mesh, in_specs=(jax.P(),) * len(arrays),
                               out_specs=jax.P()))(*arrays)


# Every public loss that takes beta and alpha, as a function of its divergence's keywords.
_FAMILIES = {
    "distill_loss": lambda **kw: kdjax.distill_loss(_S, _T, _Y, **kw),
    "distill_loss_sum_and_count": lambda **kw: kdjax.distill_loss_sum_and_count(
        _S, _T, _Y, **kw)[0],
    "distill_with_cross_entropy": lambda **kw: kdjax.distill_with_cross_entropy(
        _S, _T, _Y, **kw),
    "distill_with_cross_entropy_sum_and_count": lambda **kw: (
        kdjax.distill_with_cross_entropy_sum_and_count(_S, _T, _Y, **kw)[0]),
    "fused_linear_distill_loss": lambda **kw: kdjax.fused_linear_distill_loss(
        _H, _W, _H_TEACHER, _W, _Y, **kw),
    "fused_linear_distill_with_cross_entropy": lambda **kw: (
        kdjax.fused_linear_distill_with_cross_entropy(_H, _W, _H_TEACHER, _W, _Y, **kw)),
    "sparse_distill_loss": lambda **kw: kdjax.sparse_distill_loss(
        _S, _IDS, _LOGPROBS, _Y, **kw),
    "vocab_parallel_distill_loss": lambda **kw: _in_shard_map(
        lambda s, t, y: kdjax.vocab_parallel_distill_loss(s, t, y, axis_name="model", **kw),
        _S, _T, _Y),
    "vocab_parallel_fused_linear_distill_loss": lambda **kw: _in_shard_map(
        lambda h, w, ht, y: kdjax.vocab_parallel_fused_linear_distill_loss(
            h, w, ht, w, y, axis_name="model", **kw), _H, _W, _H_TEACHER, _Y),
}
_COMBINED = ("distill_with_cross_entropy", "distill_with_cross_entropy_sum_and_count",
             "fused_linear_distill_with_cross_entropy")


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_hyperparameter_the_divergence_does_not_read_is_an_error(family):
  """beta with forward KL (a GKD user expecting the JSD), alpha with reverse KL: a ValueError
  naming the divergences that read it, whether a number or an array, eagerly or traced; the
  default, given explicitly, is the loss without it."""
  loss = _FAMILIES[family]
  cases = [(dict(beta=0.3), "beta", "'generalized_jsd'"),
           (dict(divergence="reverse_kl", alpha=0.5), "alpha",
            "'skew_forward_kl' or 'skew_reverse_kl'"),
           (dict(divergence="skew_forward_kl", beta=jnp.float32(0.5)), "beta",
            "'generalized_jsd'")]
  for kwargs, name, readers in cases:
    with pytest.raises(ValueError, match=(
        f"^divergence='{kwargs.get('divergence', 'forward_kl')}' does not read {name}, but "
        f".*read only by divergence={readers}")):
      loss(**kwargs)
  with pytest.raises(ValueError, match="does not read beta, but beta was given as an array"):
    jax.jit(lambda beta: loss(beta=beta))(jnp.float32(0.3))
  want = loss()
  # The defaults (as numbers of any type) and None are what leaving them out gives.
  np.testing.assert_array_equal(loss(beta=0.5, alpha=np.float32(0.1)), want)
  np.testing.assert_array_equal(loss(beta=None, alpha=None), want)
  # A divergence that reads it still takes any value, and arrays.
  assert np.isfinite(loss(divergence="generalized_jsd", beta=jnp.float32(0.3)))
  if family in _COMBINED:  # In Hinton-style code alpha is the distillation weight.
    with pytest.raises(ValueError, match=r"the weight of the distillation term is kd_coef"):
      loss(alpha=0.5)
  else:
    with pytest.raises(ValueError, match=r"leave alpha out \(its default, 0.1, is accepted\)"):
      loss(alpha=0.5)


@pytest.mark.parametrize("loss", [
    lambda y, **kw: kdjax.distill_loss(_S, _T, y, **kw),
    lambda y, **kw: kdjax.kd_loss(_S, _T, y, **kw),
    lambda y, **kw: kdjax.distill_with_cross_entropy(_S, _T, y, **kw),
    lambda y, **kw: kdjax.distill_loss_sum_and_count(_S, _T, y, **kw)[0],
    lambda y, **kw: kdjax.distill_with_cross_entropy_sum_and_count(_S, _T, y, **kw)[0],
], ids=["distill_loss", "kd_loss", "distill_with_cross_entropy", "distill_loss_sum_and_count",
        "distill_with_cross_entropy_sum_and_count"])
def test_labels_outside_the_vocabulary_are_an_error_at_the_call(loss):
  """Known labels: a ValueError naming the first counted label outside [0, 12) and the
  vocabulary size, with a hint for PyTorch's -100 under another ignore_index; traced labels
  make the loss NaN (as the docs say); an uncounted one changes nothing."""
  past = np.asarray(_Y).copy()
  past[1, 2], past[1, 3] = 12, 40
  with pytest.raises(ValueError, match=(
      r"^labels must be vocabulary ids in \[0, 12\) \(logits.shape\[-1\] = 12\) or "
      r"ignore_index=-100, got labels\[1, 2\] = 12 \(the first of 2 counted")):
    loss(past)
  with pytest.raises(ValueError, match=(
      r"got labels\[0, 2\] = -100 .*-100 is the padding label of PyTorch and Hugging Face, but "
      r"ignore_index=-1: pass ignore_index=-100")):
    loss(_Y, ignore_index=-1)
  padded = np.where(np.asarray(_Y) == IGNORE, -1, np.asarray(_Y))
  with pytest.raises(ValueError, match=r"got labels\[0, 2\] = -1 .*ignore_index=-1 if -1 is"):
    loss(padded)
  # Every known form: a list, a NumPy array closed over inside jit, a jax array.
  for labels in (past.tolist(), jnp.asarray(past)):
    with pytest.raises(ValueError, match=r"got labels\[1, 2\] = 12"):
      loss(labels)
  with pytest.raises(ValueError, match=r"got labels\[1, 2\] = 12"):
    jax.jit(lambda: loss(past))()
  assert np.isnan(jax.jit(loss)(past))  # Traced: NaN, never a plausible number.
  np.testing.assert_allclose(loss(padded, ignore_index=-1), loss(_Y), rtol=1e-6)


def test_labels_outside_the_vocabulary_are_checked_on_counted_tokens_only():
  labels = np.array([[1, 2, 99, 3], [0, -7, 5, 11]], np.int32)
  where = labels >= 0
  where[0, 2] = False
  np.testing.assert_allclose(
      kdjax.distill_loss(_S, _T, labels, where=where),
      kdjax.distill_loss(_S, _T, np.where(where, labels, IGNORE)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"got labels\[0, 2\] = 99"):
    kdjax.distill_loss(_S, _T, labels, where=labels >= 0)
  # A traced mask: the labels' check waits for the program (NaN there).
  assert np.isnan(jax.jit(lambda w: kdjax.distill_loss(_S, _T, labels, where=w))(labels >= 0))
  scalar_labels = np.int32(12)
  with pytest.raises(ValueError, match="got labels = 12"):
    kdjax.distill_loss(_S[0, 0], _T[0, 0], scalar_labels)


# ----------------------------------------------------------------------------------------------
# distill_with_cross_entropy_sum_and_count
# ----------------------------------------------------------------------------------------------


def _combined_float64(x, teacher, labels, counted, weights, *, kd_coef, temperature):
  """float64: per-token (1 - kd_coef) CE + kd_coef T**2 reverse KL, times the token weights,
  summed over the counted tokens; and their number."""
  per_token = ((1 - kd_coef) * reference.cross_entropy(x, labels) + kd_coef * temperature**2
               * reference.per_token("reverse_kl", x, teacher, temperature=temperature))
  return np.sum(np.where(counted, weights * per_token, 0.0)), counted.sum()


@pytest.mark.parametrize("implementation", ["blocked", "reference"])
def test_distill_with_cross_entropy_sum_and_count_against_float64(implementation):
  rng = np.random.default_rng(4)
  logits, teacher, labels = _inputs(rng, (2, 7, 13), neg_inf=0.05)
  logits = np.where(np.arange(13) == labels[..., None], 1.0, logits)  # Labels never -inf.
  where = rng.random((2, 7)) < 0.85
  weights = rng.choice([0.0, 0.5, 1.0, 2.0], (2, 7)).astype(np.float32)
  counted = (labels != IGNORE) & where
  kw = dict(kd_coef=0.3, divergence="reverse_kl", temperature=2.0, temperature_squared=True,
            where=where, token_weights=weights, implementation=implementation)

  def fn(x):
    return kdjax.distill_with_cross_entropy_sum_and_count(x, teacher, labels, **kw)

  total, count = jax.jit(fn)(logits)
  want_total, want_count = _combined_float64(logits, teacher, labels, counted, weights,
                                             kd_coef=0.3, temperature=2.0)
  assert total.dtype == count.dtype == jnp.float32
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  assert count == want_count
  grad = jax.jit(jax.grad(lambda x: fn(x)[0]))(logits)
  want_grad = reference.numerical_grad(lambda x: _combined_float64(
      x, teacher, labels, counted, weights, kd_coef=0.3, temperature=2.0)[0], logits)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-4, atol=2e-6)
  assert np.all(np.asarray(grad)[~counted] == 0)
  # The mean form is the sum over the count, and a traced kd_coef is the same loss.
  np.testing.assert_allclose(
      kdjax.distill_with_cross_entropy(logits, teacher, labels, **kw), total / count,
      rtol=1e-6)
  traced = jax.jit(lambda k: kdjax.distill_with_cross_entropy_sum_and_count(
      logits, teacher, labels, **dict(kw, kd_coef=k)))(jnp.float32(0.3))
  np.testing.assert_allclose(traced, (total, count), rtol=1e-6)


def test_distill_with_cross_entropy_sum_and_count_of_micro_batches_is_the_global_mean():
  """Two micro-batches with 5 and 1 counted tokens: summed, then divided once, they give the
  mean over the six (the mean of the two means does not); no counted token gives (0, 0)."""
  rng = np.random.default_rng(5)
  logits, teacher, labels = _inputs(rng, (2, 6, 9), ignore=0.0)
  labels[1, 1:] = IGNORE
  labels[0, 5] = IGNORE
  pairs = [kdjax.distill_with_cross_entropy_sum_and_count(logits[i], teacher[i], labels[i],
                                                          kd_coef=0.5) for i in range(2)]
  total, count = (sum(x) for x in zip(*pairs, strict=True))
  counted = labels != IGNORE
  per_token = 0.5 * reference.cross_entropy(logits, labels) + 0.5 * reference.per_token(
      "forward_kl", logits, teacher)
  want_mean = per_token[counted].mean()
  assert count == 6
  np.testing.assert_allclose(total / count, want_mean, rtol=1e-5)
  np.testing.assert_allclose(
      kdjax.distill_with_cross_entropy(logits, teacher, labels, kd_coef=0.5), want_mean,
      rtol=1e-5)
  mean_of_means = np.mean([per_token[i][counted[i]].mean() for i in range(2)])
  assert abs(mean_of_means - want_mean) > 1e-2
  ignored = np.full((6,), IGNORE, np.int32)
  value, grad = jax.value_and_grad(
      lambda x: kdjax.distill_with_cross_entropy_sum_and_count(x, teacher[0], ignored)[0])(
          logits[0])
  assert value == 0 and not np.any(grad)
  assert kdjax.distill_with_cross_entropy_sum_and_count(logits[0], teacher[0], ignored)[1] == 0
