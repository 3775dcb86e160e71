"""Tests for kdjax/_src/uld.py: uld_loss and align_tokenizations.

References: a float64 NumPy ULD written from the paper's definition (softmax, descending sort,
zero padding, L1), its float64 central differences for gradients, and the distillation term of
TRL's GOLD trainer written in PyTorch as GOLD writes it.
"""

import functools

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdjax
from tests import reference

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def np_uld(logits, teacher_logits, *, temperature=1.0, teacher_temperature=None, top_k=None):
  """Per-token ULD in float64: sorted softmaxes, the shorter padded with zeros, L1."""
  teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
  q = np.exp(reference.log_softmax(np.asarray(logits, np.float64) / temperature))
  p = np.exp(reference.log_softmax(np.asarray(teacher_logits, np.float64) / teacher_temperature))
  q = -np.sort(-q, axis=-1)[..., :top_k]
  p = -np.sort(-p, axis=-1)[..., :top_k]
  width = max(q.shape[-1], p.shape[-1])
  pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])  # noqa: E731
  value = np.abs(pad(q) - pad(p)).sum(-1)
  empty = np.all(np.isneginf(logits), -1) | np.all(np.isneginf(teacher_logits), -1)
  return np.where(empty, 0.0, value)


def gold_uld(student_logits, teacher_logits, lengths, student_temperature,
             teacher_temperature):
  """The distillation term of TRL's GOLD trainer (``ULDLoss``, sorted branch), on positions that
  are already aligned: per sequence, each side's softmax at its temperature, sorted in
  descending order, the smaller vocabulary zero-padded, ``l1_loss(reduction="sum")`` divided by
  the number of positions; then the mean over the sequences."""
  losses = []
  for i, size in enumerate(lengths):
    student_probs = F.softmax(student_logits[i, :size] / student_temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits[i, :size] / teacher_temperature, dim=-1)
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    width = max(student_sorted.size(-1), teacher_sorted.size(-1))
    student_sorted = F.pad(student_sorted, (0, width - student_sorted.size(-1)))
    teacher_sorted = F.pad(teacher_sorted, (0, width - teacher_sorted.size(-1)))
    loss = F.l1_loss(student_sorted, teacher_sorted, reduction="sum")
    losses.append(loss / student_probs.size(0))
  return torch.stack(losses).mean()


def _data(seed, token_shape, student_vocab, teacher_vocab, neg_inf=0.0):
  rng = np.random.default_rng(seed)
  logits = reference.random_logits(rng, token_shape + (student_vocab,), neg_inf_fraction=neg_inf)
  teacher = reference.random_logits(rng, token_shape + (teacher_vocab,), scale=3.0,
                                    neg_inf_fraction=neg_inf)
  return logits, teacher


VOCABS = [(7, 11), (11, 7), (9, 9)]


# ----------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocabs", VOCABS)
def test_value_matches_float64(vocabs):
  logits, teacher = _data(0, (3, 5), *vocabs, neg_inf=0.1)
  for implementation in ("blocked", "reference"):
    for top_k in (None, 1, 9, 50):
      got = kdjax.uld_loss(logits, teacher, temperature=1.3, teacher_temperature=0.8,
                           top_k=top_k, reduction="none", token_block=4,
                           implementation=implementation)
      want = np_uld(logits, teacher, temperature=1.3, teacher_temperature=0.8, top_k=top_k)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{implementation} {top_k}")


@pytest.mark.parametrize("vocabs, top_k", [((7, 11), None), ((11, 7), None), ((11, 7), 4),
                                           ((7, 11), 9)])
def test_gradient_matches_float64_differences_and_reference(vocabs, top_k):
  logits, teacher = _data(1, (2, 3), *vocabs)
  logits[0, 0, 2] = -np.inf
  kwargs = dict(temperature=0.9, teacher_temperature=1.4, top_k=top_k)

  def grad(implementation):
    return jax.grad(lambda x: kdjax.uld_loss(x, teacher, reduction="sum", token_block=4,
                                             implementation=implementation, **kwargs))(logits)

  want = reference.numerical_grad(lambda x: np_uld(x, teacher, **kwargs).sum(), logits)
  np.testing.assert_allclose(grad("blocked"), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad("blocked"), grad("reference"), rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(grad("blocked"))[np.isneginf(logits)] == 0)


def test_reference_in_float64_matches_the_float64_formula():
  logits, teacher = _data(2, (4,), 9, 13, neg_inf=0.2)
  logits, teacher = logits.astype(np.float64), teacher.astype(np.float64)
  with jax.enable_x64(True):
    for top_k in (None, 5):
      got = kdjax.uld_loss(logits, teacher, temperature=0.7, top_k=top_k, reduction="none",
                           implementation="reference")
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, np_uld(logits, teacher, temperature=0.7, top_k=top_k),
                                 rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("vocabs", [(7, 11), (11, 7)])
def test_matches_trl_gold_in_pytorch(vocabs):
  """Same value and gradient as GOLD's ULD term (reduction="sequence_mean", temperatures)."""
  logits, teacher = _data(3, (3, 6), *vocabs)
  lengths = [6, 4, 2]  # aligned positions per sequence; the rest is padding
  where = np.arange(6)[None, :] < np.array(lengths)[:, None]
  student_torch = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  want = gold_uld(student_torch, torch.tensor(teacher, dtype=torch.float64), lengths, 1.5, 0.7)
  want.backward()
  value, grad = jax.value_and_grad(lambda x: kdjax.uld_loss(
      x, teacher, where=where, reduction="sequence_mean", temperature=1.5,
      teacher_temperature=0.7))(logits)
  np.testing.assert_allclose(value, want.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, student_torch.grad.numpy(), rtol=1e-4, atol=1e-7)
  # With equal lengths, GOLD's mean of sequence means is the token mean.
  full = gold_uld(torch.tensor(logits), torch.tensor(teacher), [6, 6, 6], 1.0, 1.0)
  np.testing.assert_allclose(kdjax.uld_loss(logits, teacher), full.item(), rtol=1e-5)


def test_top_k_error_bound_and_full_k():
  logits, teacher = _data(4, (6,), 40, 64)
  full = np_uld(logits, teacher)
  for k in (1, 3, 10, 40):
    truncated = np.asarray(kdjax.uld_loss(logits, teacher, top_k=k, reduction="none"))
    q = -np.sort(-np.exp(reference.log_softmax(logits)), -1)
    p = -np.sort(-np.exp(reference.log_softmax(teacher)), -1)
    tails = (1 - q[:, :k].sum(-1)) + (1 - p[:, :k].sum(-1))
    assert np.all(truncated <= full + 1e-6)
    assert np.all(full - truncated <= tails + 1e-6)
  np.testing.assert_allclose(kdjax.uld_loss(logits, teacher, top_k=64, reduction="none"), full,
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Conventions: -inf, masks, NaN, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 3])
def test_neg_inf_rows_and_entries(top_k):
  logits, teacher = _data(5, (4,), 8, 6, neg_inf=0.3)
  logits[0] = -np.inf  # an empty student row
  teacher[1] = -np.inf  # an empty teacher row
  logits[2, 1:] = -np.inf  # a one-hot student
  for implementation in ("blocked", "reference"):
    value, grad = jax.value_and_grad(lambda x, i=implementation: kdjax.uld_loss(
        x, teacher, top_k=top_k, reduction="sum", implementation=i))(logits)
    per_token = np_uld(logits, teacher, top_k=top_k)
    assert per_token[0] == per_token[1] == 0
    np.testing.assert_allclose(value, per_token.sum(), rtol=1e-5)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[:2] == 0) and np.all(np.asarray(grad)[np.isneginf(logits)] == 0)


def test_ignored_labels_where_and_reductions():
  logits, teacher = _data(6, (2, 5), 10, 7)
  labels = np.array([[1, IGNORE, 3, 4, IGNORE], [IGNORE] * 5], np.int32)
  where = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], np.int32)
  logits[0, 1] = np.nan  # ignored: exactly no effect
  teacher[1, 2] = np.inf
  mask = (labels != IGNORE) & (where != 0)
  per_token = np_uld(np.where(mask[..., None], logits, 0), np.where(mask[..., None], teacher, 0))
  reductions = ("mean", "sum", "none", "sequence_mean")

  @jax.jit
  def run(x):
    return [jax.value_and_grad(lambda x, r=r: jnp.sum(
        kdjax.uld_loss(x, teacher, labels, where=where, reduction=r)))(x) for r in reductions]

  for reduction, (value, grad) in zip(reductions, run(logits), strict=True):
    want = reference.reduce(per_token, mask, reduction)
    np.testing.assert_allclose(value, np.sum(want), rtol=1e-5, err_msg=reduction)
    assert np.all(np.asarray(grad)[~mask] == 0), reduction
    assert np.all(np.isfinite(grad)), reduction
  everything_ignored = np.full((2, 5), IGNORE, np.int32)
  value, grad = jax.value_and_grad(lambda x: kdjax.uld_loss(x, teacher, everything_ignored))(
      logits)
  assert value == 0 and np.all(np.asarray(grad) == 0)


def test_token_weights_multiply_each_counted_token():
  logits, teacher = _data(11, (2, 4), 9, 6)
  token_weights = np.array([[0.5, 2.0, 0.0, 1.0], [1.0, 1.0, 3.0, 0.25]], np.float32)
  labels = np.array([[1, 2, 3, IGNORE], [4, 5, 6, 7]], np.int32)
  mask = labels != IGNORE
  want = np.sum(np.where(mask, token_weights * np_uld(logits, teacher), 0.0)) / mask.sum()
  for implementation in ("blocked", "reference"):
    value, grad = jax.value_and_grad(lambda x, i=implementation: kdjax.uld_loss(
        x, teacher, labels, token_weights=token_weights, implementation=i))(logits)
    np.testing.assert_allclose(value, want, rtol=1e-5)  # the divisor is still the count
    assert np.all(np.asarray(grad)[(token_weights == 0) | ~mask] == 0)


def test_nan_and_bad_labels_give_nan():
  logits, teacher = _data(7, (3,), 6, 9)
  bad_logits = logits.copy()
  bad_logits[1, 2] = np.nan
  assert np.isnan(kdjax.uld_loss(bad_logits, teacher))
  bad_teacher = teacher.copy()
  bad_teacher[0, 0] = np.inf
  assert np.isnan(kdjax.uld_loss(logits, bad_teacher))
  # Labels only mask, but a counted label must be a student id (6 ids), as in distill_loss:
  # known, a ValueError naming it; traced, NaN. Label 6 is a teacher id, not a student one.
  labels = np.array([0, 6, 1], np.int32)
  with pytest.raises(ValueError, match=(
      r"^labels must be vocabulary ids in \[0, 6\) \(logits.shape\[-1\] = 6\) or "
      r"ignore_index=-100, got labels\[1\] = 6")):
    kdjax.uld_loss(logits, teacher, labels)
  assert np.isnan(jax.jit(lambda y: kdjax.uld_loss(logits, teacher, y))(labels))
  assert np.isfinite(kdjax.uld_loss(logits, teacher, np.array([0, 5, 1], np.int32)))


def test_bf16_inputs():
  logits, teacher = _data(8, (6,), 100, 160)
  lo, te = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  value, grad = jax.value_and_grad(lambda x: kdjax.uld_loss(x, te, token_block=4))(lo)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  up_lo, up_te = np.asarray(lo, np.float32), np.asarray(te, np.float32)
  np.testing.assert_allclose(value, np_uld(up_lo, up_te).mean(), rtol=1e-5)
  # The float32 gradient of the rounded inputs, rounded once to bfloat16.
  want = jax.grad(lambda x: kdjax.uld_loss(x, up_te, token_block=4))(up_lo)
  np.testing.assert_allclose(np.asarray(grad, np.float32), want, rtol=2 ** -7, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Transformations, temperatures, properties
# ----------------------------------------------------------------------------------------------


def test_jit_vmap_and_traced_temperatures():
  logits, teacher = _data(9, (4, 6), 12, 8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_fn(x, t, temperature, teacher_temperature):
    return kdjax.uld_loss(x, t, temperature=temperature, teacher_temperature=teacher_temperature)

  for temperature, teacher_temperature in ((1.0, 1.0), (2.0, 0.5), (0.7, 3.0)):
    value = loss_fn(logits, teacher, jnp.float32(temperature), jnp.float32(teacher_temperature))
    want = np_uld(logits, teacher, temperature=temperature,
                  teacher_temperature=teacher_temperature).mean()
    np.testing.assert_allclose(value, want, rtol=1e-5)
  # teacher_temperature=None is the student's, static or traced.
  np.testing.assert_allclose(kdjax.uld_loss(logits, teacher, temperature=2.0),
                             kdjax.uld_loss(logits, teacher, temperature=jnp.float32(2.0),
                                            teacher_temperature=2.0), rtol=1e-6)
  batched = jax.vmap(lambda x, t: kdjax.uld_loss(x, t, top_k=3))(logits, teacher)
  want = [kdjax.uld_loss(x, t, top_k=3) for x, t in zip(logits, teacher, strict=True)]
  np.testing.assert_allclose(batched, want, rtol=1e-6)
  grads = jax.vmap(jax.grad(lambda x, t: kdjax.uld_loss(x, t)))(logits, teacher)
  want = [jax.grad(lambda x, t=t: kdjax.uld_loss(x, t))(x) for x, t in zip(logits, teacher,
                                                                             strict=True)]
  np.testing.assert_allclose(grads, np.stack(want), rtol=1e-5, atol=1e-8)


def test_no_gradient_to_the_teacher():
  logits, teacher = _data(10, (3,), 5, 8)
  grad = jax.grad(lambda t: kdjax.uld_loss(logits, t))(teacher)
  assert np.all(np.asarray(grad) == 0)


def test_tied_probabilities_share_their_ranks_signs():
  # Two tied student entries between two teacher probabilities: their rank signs are -1 and +1,
  # so each gets the mean 0 from the blocked engine, and the total gradient is the
  # average of the gradients of the two orders.
  logits = np.log(np.array([[0.5, 0.25, 0.25]], np.float32))
  teacher = np.log(np.array([[0.45, 0.35, 0.2]], np.float32))
  grad = jax.grad(lambda x: kdjax.uld_loss(x, teacher, implementation="blocked"))(logits)
  orders = []
  for order in ([0, 1, 2], [0, 2, 1]):
    nudged = logits.copy()
    nudged[0, order[1]] += 1e-3  # break the tie one way, then the other
    orders.append(jax.grad(lambda x: kdjax.uld_loss(x, teacher, implementation="reference"))(
        nudged))
  np.testing.assert_allclose(grad, (orders[0] + orders[1]) / 2, atol=2e-3)
  np.testing.assert_allclose(grad[0, 1], grad[0, 2], rtol=1e-6)


_rows = hnp.arrays(np.float32, (3, 6), elements=st.floats(-10, 10, width=32))


@hypothesis.given(_rows, _rows, st.integers(0, 2**31 - 1))
def test_properties(logits, teacher, seed):
  rng = np.random.default_rng(seed)
  values = np.asarray(kdjax.uld_loss(logits, teacher, reduction="none"))
  assert np.all(values >= 0) and np.all(values <= 2 + 1e-6)
  # Zero for any permutation of the student's distribution, padded with entries of no mass.
  permuted = rng.permuted(logits, axis=-1)
  padded = np.concatenate([permuted, np.full((3, 4), -np.inf, np.float32)], -1)
  np.testing.assert_allclose(kdjax.uld_loss(logits, padded, reduction="none"), 0, atol=1e-6)
  # Invariant to a constant added to a row of either side; symmetric in the two sides.
  shift = np.array([[-30.0], [0.0], [45.0]], np.float32)
  np.testing.assert_allclose(kdjax.uld_loss(logits + shift, teacher - shift, reduction="none"),
                             values, atol=2e-5)
  np.testing.assert_allclose(kdjax.uld_loss(teacher, logits, reduction="none"), values,
                             atol=1e-6)


def test_gradient_memory_is_blocked():
  tokens, student_vocab, teacher_vocab = 2048, 32000, 50000
  logits_bytes = tokens * student_vocab * 4
  for vocabs in ((student_vocab, teacher_vocab), (teacher_vocab, student_vocab)):
    x = jax.ShapeDtypeStruct((tokens, vocabs[0]), jnp.float32)
    t = jax.ShapeDtypeStruct((tokens, vocabs[1]), jnp.float32)
    top_k = None if vocabs[0] < vocabs[1] else 256
    fn = lambda a, b, k=top_k: kdjax.uld_loss(a, b, top_k=k)  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(fn)).lower(x, t).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.15 * logits_bytes, vocabs


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match, error", [
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((3, 7))),
     "same positions.*align_tokenizations", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 0))),
     "teacher_logits has an empty vocabulary", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5), np.int32), np.zeros((2, 7))),
     "logits must be a floating-point array", TypeError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), top_k=0),
     "top_k must be None or a positive integer", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), top_k=2.0),
     "top_k must be None or a positive integer", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), teacher_temperature=0.0),
     "teacher_temperature must be a finite number > 0", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), temperature=-1.0),
     "temperature must be a finite number > 0", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), np.zeros(3, np.int32)),
     r"labels must have shape logits.shape\[:-1\]", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), reduction="avg"),
     "reduction must be one of", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), implementation="fast"),
     "implementation must be one of", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), implementation="pallas"),
     "use 'blocked', 'reference' or None", ValueError),
    (lambda: kdjax.uld_loss(np.zeros((2, 5)), np.zeros((2, 7)), token_weights=np.ones(3)),
     r"token_weights must have shape logits.shape\[:-1\]", ValueError),
])
def test_errors_name_the_argument(call, match, error):
  with pytest.raises(error, match=match):
    call()


# ----------------------------------------------------------------------------------------------
# align_tokenizations
# ----------------------------------------------------------------------------------------------


def _ends(pieces):
  return np.cumsum([len(p) for p in pieces])


def test_align_unequal_lengths():
  text = "for item in items:"
  student = ["for", " item", " in", " items", ":"]
  teacher = ["fo", "r", " it", "em", " in", " it", "ems:"]
  assert "".join(student) == "".join(teacher) == text
  s, t = kdjax.align_tokenizations(_ends(student), _ends(teacher))
  assert s.dtype == t.dtype == np.int64
  assert s.tolist() == [0, 1, 2, 4] and t.tolist() == [1, 3, 4, 6]
  # (start, end) pairs give the same answer as end offsets.
  pairs = np.stack([_ends(teacher) - [len(p) for p in teacher], _ends(teacher)], -1)
  s2, t2 = kdjax.align_tokenizations(_ends(student), pairs)
  assert s2.tolist() == s.tolist() and t2.tolist() == t.tolist()


def test_align_empty_and_zero_width():
  s, t = kdjax.align_tokenizations([], np.zeros((0, 2), np.int32))
  assert s.size == t.size == 0
  # Only the end of the text in common: the last tokens pair.
  s, t = kdjax.align_tokenizations([2, 5], [1, 3, 5])
  assert s.tolist() == [1] and t.tolist() == [2]
  # A BOS at (0, 0) on both sides pairs (both predict the first token from no text); a zero-width
  # EOS after the last token does not take the place of the token that completes the text.
  s, t = kdjax.align_tokenizations([(0, 0), (0, 3), (3, 6), (6, 6)], [(0, 0), (0, 6), (6, 6)])
  assert s.tolist() == [0, 2] and t.tolist() == [0, 1]


def test_align_zero_width_special_tokens_follow_the_docstring():
  # "hello" as BOS, "hel", "lo", EOS and as BOS, "he", "llo", EOS; the special tokens at (0, 0).
  student = [(0, 0), (0, 3), (3, 5), (0, 0)]
  teacher = [(0, 0), (0, 2), (2, 5), (0, 0)]
  # By the docstring a token that covers no text ends where the token before it ends: the BOS at
  # byte 0 (nothing before it), the EOS at byte 5, after "lo" / "llo". Ends: student
  # [0, 3, 5, 5], teacher [0, 2, 5, 5]. Bytes where both sides end: 0 and 5; the first token of
  # each side to end there is paired: the BOS (position 0) at 0, "lo" / "llo" (position 2) at 5,
  # not the EOS after them.
  s, t = kdjax.align_tokenizations(student, teacher)
  assert s.tolist() == [0, 2] and t.tolist() == [0, 2]
  # A zero-width token in the middle (an inserted special token) ends with the one before it.
  s, t = kdjax.align_tokenizations([(0, 2), (0, 0), (2, 5)], [(0, 2), (2, 5)])
  assert s.tolist() == [0, 2] and t.tolist() == [0, 1]


@pytest.mark.parametrize("student, teacher, lengths", [
    ([(0, 3), (3, 5)], [(0, 2), (2, 5), (5, 9)], (5, 9)),
    ([2, 4], [1, 3, 5], (4, 5)),
    ([], [1, 2], (0, 2)),
    ([(0, 0), (0, 4), (0, 0)], [(0, 0), (0, 2), (2, 5)], (4, 5)),
])
def test_align_refuses_texts_of_different_lengths(student, teacher, lengths):
  with pytest.raises(ValueError, match=(
      f"texts of different lengths: the student's tokens end at byte {lengths[0]}, the "
      f"teacher's at byte {lengths[1]}")):
    kdjax.align_tokenizations(student, teacher)


@hypothesis.given(st.lists(st.integers(1, 4), min_size=1, max_size=30),
                  st.lists(st.integers(1, 4), max_size=30))
def test_align_pairs_exactly_the_common_ends(student_lengths, teacher_lengths):
  student_ends = np.cumsum(student_lengths)
  # The teacher splits the same text elsewhere: its own cuts inside it, then the text's end.
  cuts = np.cumsum(teacher_lengths, dtype=np.int64)
  teacher_ends = np.append(cuts[cuts < student_ends[-1]], student_ends[-1])
  s, t = kdjax.align_tokenizations(student_ends.astype(np.int32), teacher_ends)
  want = sorted(set(student_ends.tolist()) & set(teacher_ends.tolist()))
  assert student_ends[s].tolist() == teacher_ends[t].tolist() == want


@pytest.mark.parametrize("student, teacher, match, error", [
    ([1.0, 2.0], [1, 2], "student_offsets must hold integer byte offsets", TypeError),
    ([1, 2], np.zeros((2, 3), np.int32), r"teacher_offsets must be .* shape \[tokens, 2\]",
     ValueError),
    (np.zeros((2, 2, 2), np.int32), [1], "student_offsets must be", ValueError),
    ([3, 2], [1, 2], "student_offsets must end in text order.*token 1 ends at byte 2", ValueError),
    ([1, 2], [(0, 2), (3, 1)], "teacher_offsets has a token whose start is after its end",
     ValueError),
    ([-1, 2], [1, 2], "student_offsets has a negative byte offset", ValueError),
])
def test_align_bad_input(student, teacher, match, error):
  with pytest.raises(error, match=match):
    kdjax.align_tokenizations(student, teacher)


# ----------------------------------------------------------------------------------------------
# align_tokenizations_batch
# ----------------------------------------------------------------------------------------------


def _tokenize(rng, length, *, pairs):
  """A random split of a ``length``-byte text: end offsets, or (start, end) pairs with a
  zero-width BOS at (0, 0) in front."""
  ends = np.zeros(0, np.int64)
  if length:
    cuts = rng.choice(np.arange(1, length), size=rng.integers(0, length), replace=False)
    ends = np.append(np.sort(cuts), length).astype(np.int64)
  if not pairs:
    return ends
  starts = np.concatenate([[0], ends])[:-1].astype(np.int64)
  return np.concatenate([np.zeros((1, 2), np.int64), np.stack([starts, ends], -1)])


def _pad(rows, width, *, left):
  """Rows of different lengths in one ``[batch, width(, 2)]`` array, the rest filled with
  offsets no sequence has (so only the mask can tell them apart), and the mask."""
  offsets = np.full((len(rows), width) + rows[0].shape[1:], 10**6, np.int64)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    at = slice(width - len(row), width) if left else slice(0, len(row))
    offsets[i, at], mask[i, at] = row, 1
  return offsets, mask, [np.flatnonzero(m) for m in mask]


@hypothesis.given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans(), st.booleans())
def test_align_batch_rows_equal_the_single_sequence(seed, pairs, student_left, teacher_left):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, 12, size=rng.integers(1, 5))
  students = [_tokenize(rng, n, pairs=pairs) for n in lengths]
  teachers = [_tokenize(rng, n, pairs=not pairs) for n in lengths]
  student_width = max(map(len, students)) + int(rng.integers(0, 3))
  student, student_mask, student_at = _pad(students, student_width, left=student_left)
  teacher, teacher_mask, teacher_at = _pad(teachers, max(map(len, teachers)), left=teacher_left)
  index, where = kdjax.align_tokenizations_batch(student, teacher, student_mask=student_mask,
                                                 teacher_mask=teacher_mask.astype(bool))
  assert index.dtype == np.int32 and where.dtype == np.bool_
  assert index.shape == where.shape == student.shape[:2]
  for i in range(len(lengths)):
    s, t = kdjax.align_tokenizations(students[i], teachers[i])
    assert np.flatnonzero(where[i]).tolist() == student_at[i][s].tolist()
    assert index[i, where[i]].tolist() == teacher_at[i][t].tolist()
    assert not np.any(index[i, ~where[i]])
  assert not np.any(where[student_mask == 0])  # padding is never aligned
  # Without masks every position is a token: rows of equal lengths need none.
  full_index, full_where = kdjax.align_tokenizations_batch(
      np.stack([students[0]] * 2), np.stack([teachers[0]] * 2))
  s, t = kdjax.align_tokenizations(students[0], teachers[0])
  assert (np.flatnonzero(full_where[1]).tolist() == s.tolist()
          and full_index[1, s].tolist() == t.tolist())


def _uld_batch():
  """Three sequences: right-padded student rows, left-padded teacher rows, the last sequence
  empty; padded positions hold NaN logits. Returns the padded arrays and each sequence's
  padded (student, teacher) positions as align_tokenizations pairs them."""
  rng = np.random.default_rng(12)
  lengths = (14, 9, 0)
  students = [_tokenize(rng, n, pairs=False) for n in lengths]
  teachers = [_tokenize(rng, n, pairs=True) for n in lengths]
  _, student_mask, student_at = _pad(students, 16, left=False)
  _, teacher_mask, teacher_at = _pad(teachers, max(map(len, teachers)), left=True)
  student = np.zeros(student_mask.shape, np.int64)
  teacher = np.zeros(teacher_mask.shape + (2,), np.int64)
  for i in range(3):
    student[i, student_at[i]], teacher[i, teacher_at[i]] = students[i], teachers[i]
  logits, teacher_logits = _data(13, student_mask.shape, 9, 1)[0], _data(
      14, teacher_mask.shape, 1, 11)[1]
  logits[student_mask == 0] = np.nan
  teacher_logits[teacher_mask == 0] = np.nan
  pairs = []
  for i in range(3):
    s, t = kdjax.align_tokenizations(students[i], teachers[i])
    pairs.append((student_at[i][s], teacher_at[i][t]))
  return (student, student_mask, teacher, teacher_mask), logits, teacher_logits, pairs


def test_align_batch_feeds_uld_loss_as_the_per_sequence_losses():
  """The batch loss over the gathered teacher and where= is, per reduction, the per-sequence
  losses of the single-sequence recipe weighted as the reduction says: "mean" by each
  sequence's aligned positions, "sequence_mean" equally (the empty sequence skipped); the
  gradient is each sequence's, at its own positions, and 0 at padding (which holds NaN)."""
  (student, student_mask, teacher, teacher_mask), logits, teacher_logits, pairs = _uld_batch()
  index, where = kdjax.align_tokenizations_batch(student, teacher, student_mask=student_mask,
                                                 teacher_mask=teacher_mask)
  counts = np.array([len(s) for s, _ in pairs])
  assert counts[0] > 0 and counts[1] > 0 and counts[2] == 0

  @jax.jit
  def batch_losses(x):
    aligned_teacher = jnp.take_along_axis(teacher_logits, index[..., None], axis=1)
    loss = functools.partial(kdjax.uld_loss, teacher_logits=aligned_teacher, where=where,
                             temperature=1.5)
    return loss(x, reduction="mean"), loss(x, reduction="sequence_mean"), jax.value_and_grad(
        lambda x: loss(x, reduction="sum"))(x)

  per_sequence = [np_uld(logits[i, s], teacher_logits[i, t], temperature=1.5)
                  for i, (s, t) in enumerate(pairs)]
  singles = [jax.value_and_grad(lambda x, i=i, t=t: kdjax.uld_loss(
      x, teacher_logits[i, t], reduction="sum", temperature=1.5))(logits[i, s])
      for i, (s, t) in enumerate(pairs[:2])]
  np.testing.assert_allclose([v for v, _ in singles], [v.sum() for v in per_sequence[:2]],
                             rtol=1e-5)
  means = [float(v) / n for (v, _), n in zip(singles, counts, strict=False)]
  mean, sequence_mean, (total, grad) = batch_losses(logits)
  np.testing.assert_allclose(total, sum(v.sum() for v in per_sequence), rtol=1e-5)
  np.testing.assert_allclose(mean, np.dot(counts[:2], means) / counts.sum(), rtol=1e-5)
  np.testing.assert_allclose(sequence_mean, np.mean(means), rtol=1e-5)
  assert np.all(np.asarray(grad)[~where] == 0)
  for i, (s, _) in enumerate(pairs[:2]):
    np.testing.assert_allclose(grad[i, s], singles[i][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("call, match, error", [
    (lambda: kdjax.align_tokenizations_batch([[1, 2], [3]], [[1, 2], [3, 4]]),
     r"^student_offsets must be a padded batch.*student_mask / teacher_mask", ValueError),
    (lambda: kdjax.align_tokenizations_batch([1, 2], [[1, 2]]),
     r"^student_offsets must be .* shape \[batch, tokens\].*got shape \(2,\)", ValueError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2]], np.zeros((1, 2, 3), np.int32)),
     r"^teacher_offsets must be .* \[batch, tokens, 2\]", ValueError),
    (lambda: kdjax.align_tokenizations_batch([[1.0, 2.0]], [[1, 2]]),
     "^student_offsets must hold integer byte offsets", TypeError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2]], [[1, 2], [1, 2]]),
     "^student_offsets and teacher_offsets must hold the same sequences: got 1 and 2 rows",
     ValueError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2]], [[1, 2]], student_mask=[[1, 1, 0]]),
     r"^student_mask must have shape student_offsets.shape\[:2\] = \(1, 2\), got \(1, 3\)",
     ValueError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2]], [[1, 2]], teacher_mask=[[1.0, 1.0]]),
     "^teacher_mask must be boolean or integer", TypeError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2], [2, 4]], [[1, 2], [1, 3]]),
     r"^student_offsets\[1\] and teacher_offsets\[1\] tokenize texts of different lengths: "
     "the student's tokens end at byte 4, the teacher's at byte 3", ValueError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2], [1, 3]], [[2, 1], [1, 3]]),
     r"^teacher_offsets\[0\] must end in text order", ValueError),
    (lambda: kdjax.align_tokenizations_batch([[1, 2, 7]], [[2, 0, 9]], teacher_mask=[[1, 0, 0]]),
     r"^student_offsets\[0\] and teacher_offsets\[0\] tokenize texts of different lengths: "
     "the student's tokens end at byte 7, the teacher's at byte 2", ValueError),
])
def test_align_batch_bad_input(call, match, error):
  with pytest.raises(error, match=match):
    call()
