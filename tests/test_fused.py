"""Tests for the fused linear-head path (kdjax/_src/fused.py).

References: ``kdjax.distill_loss`` on logits materialised with plain ``jnp`` (itself tested
against float64 NumPy in its own test file), autodiff through that materialised computation for
the gradients, and an independent float64 NumPy implementation of the logit transform (bias,
logit scale, softcap, temperature) with the hand-derived forward-KL gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kdjax
from kdjax._src import config as config_lib
from kdjax._src import divergences as div
from kdjax._src import fused, head
from kdjax._src.fused import fused_linear_distill_loss

# Token count and vocabulary size are deliberately not multiples of the blocks used below.
BATCH, SEQ = 3, 5  # 15 tokens; token_block=4 leaves an overlapping last block.
D_STUDENT, D_TEACHER = 8, 12
VOCAB = 37  # vocab_block=10 leaves an overlapping last block.
TOKEN_BLOCK, VOCAB_BLOCK = 4, 10

ALL_DIVERGENCES = sorted(div.DIVERGENCES)


def _make(seed=0, *, dtype=jnp.float32, vocab=VOCAB, d_student=D_STUDENT, d_teacher=D_TEACHER,
          shape=(BATCH, SEQ)):
  keys = jax.random.split(jax.random.key(seed), 7)
  data = dict(
      student_hidden=jax.random.normal(keys[0], shape + (d_student,)),
      student_kernel=jax.random.normal(keys[1], (d_student, vocab)) * 0.7,
      teacher_hidden=jax.random.normal(keys[2], shape + (d_teacher,)),
      teacher_kernel=jax.random.normal(keys[3], (d_teacher, vocab)) * 0.7,
      student_bias=jax.random.normal(keys[4], (vocab,)),
      teacher_bias=jax.random.normal(keys[5], (vocab,)),
  )
  data = {k: v.astype(dtype) for k, v in data.items()}
  labels = jax.random.randint(keys[6], shape, 0, vocab)
  flat = labels.reshape(-1)
  labels = flat.at[1].set(-100).at[5].set(-100).at[-1].set(-100).reshape(shape)
  return data, labels


def _transform(logits, scale, softcap):
  if scale is not None:
    logits = logits * scale
  if softcap is not None:  # a -inf logit (a masked entry) stays -inf under the cap
    logits = jnp.where(logits == -jnp.inf, -jnp.inf, softcap * jnp.tanh(logits / softcap))
  return logits


def _pair(value):
  return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _dense_loss(student_hidden, student_kernel, student_bias, teacher_hidden, teacher_kernel,
                teacher_bias, labels, *, logit_scale=None, softcap=None, **kwargs):
  """The materialised reference: logits with plain jnp, then kdjax.distill_loss."""
  (s_scale, t_scale), (s_cap, t_cap) = _pair(logit_scale), _pair(softcap)
  s = jnp.dot(student_hidden, student_kernel, preferred_element_type=jnp.float32)
  t = jnp.dot(teacher_hidden, teacher_kernel, preferred_element_type=jnp.float32)
  if student_bias is not None:
    s = s + student_bias.astype(jnp.float32)
  if teacher_bias is not None:
    t = t + teacher_bias.astype(jnp.float32)
  s = _transform(s, s_scale, s_cap)
  t = _transform(t, t_scale, t_cap)
  kwargs = {k: v for k, v in kwargs.items() if k not in ("token_block", "vocab_block")}
  return kdjax.distill_loss(s, jax.lax.stop_gradient(t), labels, **kwargs)


def _fused_loss(student_hidden, student_kernel, student_bias, teacher_hidden, teacher_kernel,
                teacher_bias, labels, **kwargs):
  return fused_linear_distill_loss(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels,
      student_bias=student_bias, teacher_bias=teacher_bias, **kwargs)


def _scalarise(fn, reduction):
  """Reduce ``reduction='none'`` outputs with arbitrary weights to test any cotangent."""
  if reduction != "none":
    return fn

  def scalar(*args, **kwargs):
    values = fn(*args, **kwargs)
    weights = jnp.linspace(0.5, 2.0, values.size).reshape(values.shape)
    return jnp.sum(values * weights)
  return scalar


def _value_and_grads(fn, data, labels, reduction="mean", **kwargs):
  fn = functools.partial(_scalarise(fn, reduction), reduction=reduction, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(
      data["student_hidden"], data["student_kernel"], data["student_bias"],
      data["teacher_hidden"], data["teacher_kernel"], data["teacher_bias"], labels)


def _assert_matches_dense(data, labels, *, rtol=2e-5, atol=2e-6, **kwargs):
  value, grads = _value_and_grads(_fused_loss, data, labels, **kwargs)
  ref_value, ref_grads = _value_and_grads(_dense_loss, data, labels, **kwargs)
  assert np.all(np.isfinite(np.asarray(value)))
  np.testing.assert_allclose(value, ref_value, rtol=rtol, atol=atol)
  names = ("student_hidden", "student_kernel", "student_bias")
  for name, g, ref in zip(names, grads, ref_grads, strict=True):
    assert g.dtype == ref.dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    np.testing.assert_allclose(
        np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=rtol, atol=atol,
        err_msg=name)
  return value, grads


# ----------------------------------------------------------------------------------------------
# Value and gradients against the materialised path.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_every_divergence_matches_dense(divergence):
  """Every divergence, with -inf biases (padded vocabulary) on both sides and one more on the
  teacher's, a temperature, and vocabulary blocks for every other divergence."""
  data, labels = _make(1)
  pad = jnp.arange(VOCAB) >= VOCAB - 5
  data["student_bias"] = jnp.where(pad, -jnp.inf, data["student_bias"])
  data["teacher_bias"] = jnp.where(pad | (jnp.arange(VOCAB) == 3), -jnp.inf,
                                   data["teacher_bias"])
  vocab_block = VOCAB_BLOCK if ALL_DIVERGENCES.index(divergence) % 2 else None
  hyper = {"beta": 0.3} if divergence == "generalized_jsd" else (
      {"alpha": 0.2} if divergence.startswith("skew") else {})
  _, grads = _assert_matches_dense(
      data, labels, divergence=divergence, token_block=TOKEN_BLOCK, vocab_block=vocab_block,
      temperature=1.5, **hyper)
  np.testing.assert_array_equal(grads[1][:, -5:], 0.0)
  np.testing.assert_array_equal(grads[2][-5:], 0.0)


@pytest.mark.parametrize("implementation, vocab_block", [
    (None, None), (None, VOCAB_BLOCK), ("reference", None)])
def test_neg_inf_bias_masks_under_softcap(implementation, vocab_block):
  """A vocabulary padded with -inf bias entries on both sides gives exactly the loss and
  gradients of the unpadded one at softcap 2 (c tanh(-inf / c) = -c would leave the padded
  entries a share exp(-c) each instead of none)."""
  data, labels = _make(11)
  pad = 6
  padded = dict(data)
  rng = np.random.default_rng(11)
  for side in ("student", "teacher"):
    kernel = data[f"{side}_kernel"]
    padded[f"{side}_kernel"] = jnp.concatenate(
        [kernel, jnp.asarray(rng.normal(size=(kernel.shape[0], pad)), kernel.dtype)], axis=1)
    padded[f"{side}_bias"] = jnp.concatenate([data[f"{side}_bias"], jnp.full((pad,), -jnp.inf)])
  options = dict(softcap=2.0, divergence="generalized_jsd", temperature=1.5,
                 token_block=TOKEN_BLOCK, vocab_block=vocab_block, implementation=implementation)
  value, grads = _value_and_grads(_fused_loss, padded, labels, **options)
  want, want_grads = _value_and_grads(_fused_loss, data, labels, **options)
  assert np.isfinite(float(value))
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(grads[0], want_grads[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads[1][:, :VOCAB], want_grads[1], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grads[1][:, VOCAB:], 0.0)
  np.testing.assert_array_equal(grads[2][VOCAB:], 0.0)
  # The hard-label term too: the cross entropy's normaliser excludes the padded entries.
  ce_padded = kdjax.fused_linear_distill_with_cross_entropy(
      padded["student_hidden"], padded["student_kernel"], padded["teacher_hidden"],
      padded["teacher_kernel"], labels, student_bias=padded["student_bias"],
      teacher_bias=padded["teacher_bias"], kd_coef=0.5, softcap=2.0, vocab_block=vocab_block,
      implementation=implementation)
  ce = kdjax.fused_linear_distill_with_cross_entropy(
      data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
      data["teacher_kernel"], labels, student_bias=data["student_bias"],
      teacher_bias=data["teacher_bias"], kd_coef=0.5, softcap=2.0, vocab_block=vocab_block,
      implementation=implementation)
  np.testing.assert_allclose(ce_padded, ce, rtol=1e-6)


@pytest.mark.parametrize("reduction, vocab_block", [
    ("none", None), ("none", VOCAB_BLOCK), ("sequence_mean", None)])
def test_reductions_match_dense(reduction, vocab_block):
  data, labels = _make(3)
  where = jnp.arange(BATCH * SEQ).reshape(BATCH, SEQ) % 3 != 2
  _assert_matches_dense(data, labels, reduction=reduction, where=where,
                        token_block=TOKEN_BLOCK, vocab_block=vocab_block,
                        divergence="reverse_kl")


def test_normalizer_and_temperature_squared():
  data, labels = _make(4)
  _assert_matches_dense(data, labels, normalizer=40.0, temperature=2.0,
                        temperature_squared=True, token_block=TOKEN_BLOCK)


def test_logit_scale_softcap_per_model():
  data, labels = _make(5)
  data["student_kernel"] = data["student_kernel"] * 4.0  # large logits: the cap matters
  _assert_matches_dense(data, labels, logit_scale=(0.8, 1.3), softcap=(5.0, None),
                        temperature=1.7, token_block=TOKEN_BLOCK, vocab_block=VOCAB_BLOCK,
                        divergence="skew_forward_kl")


def test_shared_logit_scale_and_softcap_without_biases():
  data, labels = _make(6)
  data["student_bias"] = None
  data["teacher_bias"] = None
  value, grads = _value_and_grads(_fused_loss, data, labels, logit_scale=0.5, softcap=3.0,
                                  token_block=TOKEN_BLOCK)
  ref_value, ref_grads = _value_and_grads(_dense_loss, data, labels, logit_scale=0.5,
                                          softcap=3.0)
  np.testing.assert_allclose(value, ref_value, rtol=2e-5)
  assert grads[2] is None and ref_grads[2] is None
  for g, ref in zip(grads[:2], ref_grads[:2], strict=True):
    np.testing.assert_allclose(g, ref, rtol=2e-5, atol=2e-6)


def test_traced_hyperparameters_under_jit():
  """Scheduled temperature, beta, logit scale and softcap stay traced: one trace, right value."""
  data, labels = _make(7)

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1))
  def loss(student_hidden, student_kernel, temperature, beta, scale, cap):
    return fused_linear_distill_loss(
        student_hidden, student_kernel, data["teacher_hidden"], data["teacher_kernel"],
        labels, divergence="generalized_jsd", temperature=temperature, beta=beta,
        logit_scale=scale, softcap=cap, token_block=TOKEN_BLOCK, vocab_block=VOCAB_BLOCK)

  for temperature, beta in ((2.5, 0.4), (0.7, 1.0)):
    value, grads = loss(data["student_hidden"], data["student_kernel"], jnp.float32(temperature),
                        jnp.float32(beta), jnp.float32(1.2), jnp.float32(6.0))
    ref_value, ref_grads = jax.value_and_grad(
        lambda h, w: _dense_loss(  # noqa: B023
            h, w, None, data["teacher_hidden"], data["teacher_kernel"], None, labels,
            divergence="generalized_jsd", temperature=temperature, beta=beta,  # noqa: B023
            logit_scale=1.2, softcap=6.0), argnums=(0, 1))(
                data["student_hidden"], data["student_kernel"])
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
      np.testing.assert_allclose(g, ref, rtol=2e-5, atol=2e-6)
  assert loss._cache_size() == 1


def test_jit_equals_eager_and_single_trace():
  data, labels = _make(8)
  args = (data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
          data["teacher_kernel"], labels)
  eager = fused_linear_distill_loss(*args, token_block=TOKEN_BLOCK)
  traces = []

  @jax.jit
  def jitted(*args):
    traces.append(1)
    return fused_linear_distill_loss(*args, token_block=TOKEN_BLOCK)

  np.testing.assert_allclose(jitted(*args), eager, rtol=1e-6)
  np.testing.assert_allclose(jitted(*args), eager, rtol=1e-6)
  assert len(traces) == 1


def test_vmap_over_a_batch_of_heads():
  data, labels = _make(9)
  kernels = jnp.stack([data["student_kernel"], 0.5 * data["student_kernel"]])
  values = jax.vmap(lambda w: fused_linear_distill_loss(
      data["student_hidden"], w, data["teacher_hidden"], data["teacher_kernel"], labels,
      token_block=TOKEN_BLOCK))(kernels)
  for value, w in zip(values, kernels, strict=True):
    ref = _dense_loss(data["student_hidden"], w, None, data["teacher_hidden"],
                      data["teacher_kernel"], None, labels)
    np.testing.assert_allclose(value, ref, rtol=2e-5)


def test_default_blocks_single_block_and_one_token():
  data, labels = _make(10)
  _assert_matches_dense(data, labels)  # default token_block covers all 15 tokens
  one, _ = _make(11, shape=(1,))
  _assert_matches_dense(one, jnp.array([3]), token_block=TOKEN_BLOCK)


# ----------------------------------------------------------------------------------------------
# Independent float64 NumPy reference of the transform and the forward-KL gradient.
# ----------------------------------------------------------------------------------------------


def _numpy_forward_kl(data, labels, *, scale, cap, temperature):
  """Forward KL mean over valid tokens, and its gradients, in float64 NumPy.

  Gradient by hand: d KL / d s = q - p per token (s = scaled student logits), then the chain
  rule through temperature, softcap and scale: dz = (q - p) * scale * (1 - tanh^2(x / c)) / T.
  """
  f64 = {k: np.asarray(v, np.float64) for k, v in data.items()}
  hs = f64["student_hidden"].reshape(-1, D_STUDENT)
  ht = f64["teacher_hidden"].reshape(-1, D_TEACHER)
  valid = (np.asarray(labels).reshape(-1) != -100).astype(np.float64)

  def head(h, w, b):
    x = scale * (h @ w + b)
    tanh = np.tanh(x / cap)
    return cap * tanh / temperature, tanh

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  s, tanh = head(hs, f64["student_kernel"], f64["student_bias"])
  t, _ = head(ht, f64["teacher_kernel"], f64["teacher_bias"])
  log_q, log_p = log_softmax(s), log_softmax(t)
  p = np.exp(log_p)
  per_token = (p * (log_p - log_q)).sum(-1)
  loss = (per_token * valid).sum() / valid.sum()
  dz = (np.exp(log_q) - p) * valid[:, None] / valid.sum()
  dz = dz * scale * (1.0 - tanh ** 2) / temperature
  grads = (dz @ f64["student_kernel"].T, hs.T @ dz, dz.sum(0))
  return loss, grads


@pytest.mark.parametrize("vocab_block", [None, VOCAB_BLOCK])
def test_against_float64_numpy_transform(vocab_block):
  data, labels = _make(12)
  kwargs = dict(scale=1.4, cap=4.0, temperature=1.3)
  ref_loss, ref_grads = _numpy_forward_kl(data, labels, **kwargs)
  value, grads = _value_and_grads(
      _fused_loss, data, labels, logit_scale=kwargs["scale"], softcap=kwargs["cap"],
      temperature=kwargs["temperature"], token_block=TOKEN_BLOCK, vocab_block=vocab_block)
  np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grads[0].reshape(-1, D_STUDENT), ref_grads[0], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[2], ref_grads[2], rtol=1e-4, atol=1e-6)


def test_check_grads_numerically():
  data, labels = _make(13, vocab=11, shape=(6,))
  fn = jax.jit(lambda h, w, b: fused_linear_distill_loss(
      h, w, data["teacher_hidden"], data["teacher_kernel"], labels, student_bias=b,
      divergence="generalized_jsd", softcap=3.0, token_block=4))
  jax.test_util.check_grads(
      fn, (data["student_hidden"], data["student_kernel"], data["student_bias"]), order=1,
      modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_against_pytorch_trl_generalized_jsd():
  """TRL's generalized JSD on a PyTorch linear head with a softcap, float64 autograd."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F  # noqa: N812

  data, labels = _make(22)
  beta, temperature, cap = 0.3, 1.6, 5.0
  t = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=k.startswith("student"))
       for k, v in data.items()}

  def head(prefix):
    z = t[f"{prefix}_hidden"] @ t[f"{prefix}_kernel"] + t[f"{prefix}_bias"]
    return cap * torch.tanh(z / cap)

  # trl.GKDTrainer.generalized_jsd_loss, with the mean over tokens whose label is not -100.
  student_log_probs = F.log_softmax(head("student") / temperature, dim=-1)
  teacher_log_probs = F.log_softmax(head("teacher").detach() / temperature, dim=-1)
  mixture_log_probs = torch.logsumexp(torch.stack([
      student_log_probs + np.log(1 - beta), teacher_log_probs + np.log(beta)]), dim=0)
  kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
  kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
  jsd = (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
  mask = torch.tensor(np.asarray(labels) != -100)
  ref = jsd[mask].sum() / mask.sum()
  ref.backward()

  value, grads = _value_and_grads(
      _fused_loss, data, labels, divergence="generalized_jsd", beta=beta,
      temperature=temperature, softcap=cap, token_block=TOKEN_BLOCK)
  np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
  for g, name in zip(grads, ("student_hidden", "student_kernel", "student_bias"), strict=True):
    np.testing.assert_allclose(g, t[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Masks, -inf and dtypes.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_block", [None, VOCAB_BLOCK])
def test_all_ignored_or_empty_is_zero_with_zero_grads(vocab_block):
  data, labels = _make(14)
  all_ignored = (data, jnp.full_like(labels, -100))
  # A teacher bias of -inf everywhere leaves the teacher distributions empty: every token
  # contributes 0 (conventions), as in the dense path.
  empty_teacher = (dict(data, teacher_bias=jnp.full((VOCAB,), -jnp.inf)), labels)
  for case_data, case_labels in (all_ignored, empty_teacher):
    value, grads = _value_and_grads(_fused_loss, case_data, case_labels,
                                    token_block=TOKEN_BLOCK, vocab_block=vocab_block)
    assert float(value) == 0.0
    for g in grads:
      np.testing.assert_array_equal(g, np.zeros_like(g))
  ref = _dense_loss(*(empty_teacher[0][k] for k in (
      "student_hidden", "student_kernel", "student_bias", "teacher_hidden", "teacher_kernel",
      "teacher_bias")), labels)
  assert float(ref) == 0.0


def test_ignored_tokens_do_not_affect_loss():
  data, labels = _make(15)
  value = _fused_loss(**data, labels=labels, token_block=TOKEN_BLOCK)
  # Garbage in the hidden states of ignored tokens changes nothing, including gradients.
  ignored = (labels == -100)[..., None]
  noisy = dict(data, student_hidden=jnp.where(ignored, 1e3, data["student_hidden"]),
               teacher_hidden=jnp.where(ignored, -1e3, data["teacher_hidden"]))
  noisy_value, noisy_grads = _value_and_grads(_fused_loss, noisy, labels,
                                              token_block=TOKEN_BLOCK)
  _, grads = _value_and_grads(_fused_loss, data, labels, token_block=TOKEN_BLOCK)
  np.testing.assert_allclose(noisy_value, value, rtol=1e-6)
  np.testing.assert_allclose(noisy_grads[1], grads[1], rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(noisy_grads[0])[np.asarray(ignored[..., 0])] == 0)


def test_bfloat16_inputs():
  data, labels = _make(17, dtype=jnp.bfloat16)
  value, grads = _assert_matches_dense(
      data, labels, rtol=2e-2, atol=2e-3, token_block=TOKEN_BLOCK, vocab_block=VOCAB_BLOCK,
      softcap=8.0, divergence="generalized_jsd")
  assert value.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  # And close to the float32 computation of the same (rounded) inputs.
  data32 = {k: v.astype(jnp.float32) for k, v in data.items()}
  value32 = _fused_loss(**data32, labels=labels, softcap=8.0, divergence="generalized_jsd")
  np.testing.assert_allclose(value, value32, rtol=1e-2)


def test_mixed_dtypes_grads_in_input_dtypes():
  data, labels = _make(18)
  data["student_hidden"] = data["student_hidden"].astype(jnp.bfloat16)
  data["teacher_kernel"] = data["teacher_kernel"].astype(jnp.bfloat16)
  _, grads = _value_and_grads(_fused_loss, data, labels, token_block=TOKEN_BLOCK)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]


def test_no_gradient_to_teacher():
  data, labels = _make(19)
  grads = jax.grad(
      lambda ht, wt, bt: _fused_loss(
          data["student_hidden"], data["student_kernel"], data["student_bias"], ht, wt, bt,
          labels, token_block=TOKEN_BLOCK),
      argnums=(0, 1, 2))(data["teacher_hidden"], data["teacher_kernel"], data["teacher_bias"])
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# Memory: temporaries scale with the block, not with tokens * vocab.
# ----------------------------------------------------------------------------------------------


def test_compiled_temporaries_are_blockwise():
  tokens, d, vocab = 256, 16, 2048
  args = (jnp.zeros((tokens, d)), jnp.zeros((d, vocab)), jnp.zeros((tokens, d)),
          jnp.zeros((d, vocab)), jnp.zeros((tokens,), jnp.int32))

  def temp_bytes(fn):
    grad_fn = jax.value_and_grad(fn, argnums=(0, 1))
    return jax.jit(grad_fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

  def materialised(h, w, ht, wt, labels):
    return kdjax.distill_loss(h @ w, ht @ wt, labels)

  def blocked(token_block, vocab_block=None):
    return lambda h, w, ht, wt, labels: fused_linear_distill_loss(
        h, w, ht, wt, labels, token_block=token_block, vocab_block=vocab_block)

  logits_bytes = tokens * vocab * 4
  dense_temp = temp_bytes(materialised)
  assert dense_temp >= 2 * logits_bytes  # the two logits arrays, at least
  assert temp_bytes(blocked(16)) < 0.1 * dense_temp
  # Vocabulary blocks shrink the [block, vocab] temporaries; what remains is mostly the float32
  # kernel-gradient accumulator [d, vocab], the size of the kernel itself.
  assert temp_bytes(blocked(16, 256)) < 0.6 * temp_bytes(blocked(16))


# ----------------------------------------------------------------------------------------------
# Vocabulary parallelism: the internal per_token function inside shard_map.
# ----------------------------------------------------------------------------------------------


def test_vocab_parallel_per_token_in_shard_map():
  """Kernels sharded along the vocabulary over 4 devices: value and gradients as unsharded,
  for the weighted-sum entry (whole local vocabulary) and the per-token entry (vocabulary
  blocks of 3 columns within each 9-column shard)."""
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 devices (conftest forces 8 CPU devices)")
  mesh = Mesh(np.array(devices[:4]), ("vocab",))
  data, labels = _make(20, vocab=36, shape=(7,))  # 9 vocabulary columns per device
  hp = {"temperature": 1.3, "student_softcap": 4.0, "teacher_logit_scale": 0.9}
  weights = jnp.where(labels != -100, 1.0, 0.0) / jnp.sum(labels != -100)

  def inputs(student_hidden, student_kernel, student_bias, teacher_hidden, teacher_kernel,
             teacher_bias):
    return head.Inputs(student_hidden, teacher_hidden, head.Params(
        student_kernel, student_bias, teacher_kernel, teacher_bias))

  def loss(axis_name, weights, *args):
    config, traced = config_lib.build(dict(hp, beta=0.3), divergence="generalized_jsd",
                                      token_block=3, axis_name=axis_name)
    _, total = fused.per_token(config, traced, inputs(*args), None, weights)
    return total

  def per_token_weighted(axis_name, weights, *args):
    config, traced = config_lib.build(hp, divergence="reverse_kl", token_block=3,
                                      vocab_block=3, axis_name=axis_name)
    rows, _ = fused.per_token(config, traced, inputs(*args))
    return jnp.sum(rows.value * weights)

  args = (data["student_hidden"], data["student_kernel"], data["student_bias"],
          data["teacher_hidden"], data["teacher_kernel"], data["teacher_bias"])
  specs = (P(), P(), P(None, "vocab"), P("vocab"), P(), P(None, "vocab"), P("vocab"))
  for fn in (loss, per_token_weighted):
    ref_value, ref_grads = jax.value_and_grad(
        functools.partial(fn, None), argnums=(1, 2, 3))(weights, *args)
    sharded = jax.shard_map(functools.partial(fn, "vocab"), mesh=mesh, in_specs=specs,
                            out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(1, 2, 3)))(weights, *args)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
      np.testing.assert_allclose(g, ref, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# Errors name the argument.
# ----------------------------------------------------------------------------------------------


def _error_args(**overrides):
  data, labels = _make(21)
  args = dict(student_hidden=data["student_hidden"], student_kernel=data["student_kernel"],
              teacher_hidden=data["teacher_hidden"], teacher_kernel=data["teacher_kernel"],
              labels=labels)
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides, kwargs, error, match", [
    (dict(student_kernel=jnp.zeros((D_TEACHER, VOCAB))), {}, ValueError,
     r"student_hidden has width 8.*student_kernel"),
    (dict(teacher_kernel=jnp.zeros((D_STUDENT, VOCAB))), {}, ValueError,
     r"teacher_hidden has width 12.*teacher_kernel"),
    (dict(student_kernel=jnp.zeros((VOCAB, D_STUDENT))), {}, ValueError, r"pass student_kernel\.T"),
    (dict(teacher_kernel=jnp.zeros((D_TEACHER, VOCAB + 3))), {}, ValueError,
     r"different vocabulary sizes.*student_kernel.*teacher_kernel"),
    (dict(student_kernel=jnp.zeros((D_STUDENT, VOCAB, 1))), {}, ValueError,
     r"student_kernel must be a \[d, vocab\] matrix"),
    (dict(teacher_hidden=jnp.zeros((BATCH, SEQ + 1, D_TEACHER))), {}, ValueError,
     r"same token shape"),
    (dict(labels=jnp.zeros((BATCH, SEQ + 1), jnp.int32)), {}, ValueError, r"labels must have"),
    (dict(student_hidden=jnp.zeros((BATCH, SEQ, D_STUDENT), jnp.int32)), {}, TypeError,
     r"student_hidden must be a floating-point"),
    ({}, dict(student_bias=jnp.zeros((VOCAB + 1,))), ValueError, r"student_bias must have shape"),
    ({}, dict(teacher_bias=jnp.zeros((2, VOCAB))), ValueError, r"teacher_bias must have shape"),
    ({}, dict(softcap=0.0), ValueError, r"softcap must be a finite number > 0"),
    ({}, dict(logit_scale=(1.0, 2.0, 3.0)), ValueError, r"logit_scale must be .* pair"),
    ({}, dict(logit_scale=jnp.ones(2)), ValueError, r"logit_scale must be a scalar"),
    ({}, dict(vocab_block=0), ValueError, r"vocab_block must be a positive integer"),
    ({}, dict(token_block=2.5), ValueError, r"token_block must be a positive integer"),
    ({}, dict(temperature=0.0), ValueError, r"temperature"),
    ({}, dict(divergence="kl"), ValueError, r"divergence must be one of"),
    ({}, dict(reduction="max"), ValueError, r"reduction must be one of"),
])
def test_errors_name_the_argument(overrides, kwargs, error, match):
  with pytest.raises(error, match=match):
    fused_linear_distill_loss(**_error_args(**overrides), **kwargs)


# ----------------------------------------------------------------------------------------------
# The fused hard + soft objective, and the (sum, count) forms.
# ----------------------------------------------------------------------------------------------


def _dense_combined(student_hidden, student_kernel, student_bias, teacher_hidden, teacher_kernel,
                    teacher_bias, labels, *, logit_scale=None, softcap=None, **kwargs):
  """distill_with_cross_entropy on logits materialised with plain jnp."""
  (s_scale, t_scale), (s_cap, t_cap) = _pair(logit_scale), _pair(softcap)
  s = student_hidden @ student_kernel + student_bias
  t = teacher_hidden @ teacher_kernel + teacher_bias
  kwargs = {k: v for k, v in kwargs.items() if k not in ("token_block", "vocab_block")}
  return kdjax.distill_with_cross_entropy(
      _transform(s, s_scale, s_cap), jax.lax.stop_gradient(_transform(t, t_scale, t_cap)),
      labels, **kwargs)


def _fused_combined(student_hidden, student_kernel, student_bias, teacher_hidden,
                    teacher_kernel, teacher_bias, labels, **kwargs):
  return kdjax.fused_linear_distill_with_cross_entropy(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels,
      student_bias=student_bias, teacher_bias=teacher_bias, **kwargs)


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("vocab_block", [None, VOCAB_BLOCK])
def test_combined_matches_materialised(divergence, vocab_block):
  data, labels = _make(30)
  kwargs = dict(divergence=divergence, kd_coef=0.3, temperature=2.0, softcap=(5.0, None),
                logit_scale=(None, 0.9), token_block=TOKEN_BLOCK, vocab_block=vocab_block,
                temperature_squared=divergence == "forward_kl")
  value, grads = _value_and_grads(_fused_combined, data, labels, **kwargs)
  want, want_grads = _value_and_grads(_dense_combined, data, labels, **kwargs)
  np.testing.assert_allclose(value, want, rtol=2e-5)
  for g, w in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence_mean"])
def test_combined_reductions_components_and_traced_hyperparameters(reduction):
  data, labels = _make(31)
  args = (data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
          data["teacher_kernel"], labels)

  @jax.jit
  def both(temperature, kd_coef):
    common = dict(kd_coef=kd_coef, temperature=temperature, reduction=reduction,
                  divergence="reverse_kl", return_components=True)
    fused_out = kdjax.fused_linear_distill_with_cross_entropy(
        *args, vocab_block=VOCAB_BLOCK, token_block=TOKEN_BLOCK, **common)
    dense_out = kdjax.distill_with_cross_entropy(
        args[0] @ args[1], args[2] @ args[3], labels, **common)
    return fused_out, dense_out

  (loss, (ce, kd)), (want, (want_ce, want_kd)) = both(jnp.float32(1.5), jnp.float32(0.7))
  for got, ref in ((loss, want), (ce, want_ce), (kd, want_kd)):
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_combined_against_float64_numpy():
  data, labels = _make(32)
  h_s, w_s, b_s = (np.asarray(data[k], np.float64) for k in
                   ("student_hidden", "student_kernel", "student_bias"))
  h_t, w_t = np.asarray(data["teacher_hidden"], np.float64), np.asarray(data["teacher_kernel"],
                                                                        np.float64)
  labels_np = np.asarray(labels)
  s, t = h_s @ w_s + b_s, h_t @ w_t
  log_q, log_p = _np_log_softmax(s / 2.0), _np_log_softmax(t / 2.0)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)
  ce = -np.take_along_axis(_np_log_softmax(s), np.maximum(labels_np, 0)[..., None], -1)[..., 0]
  mask = labels_np != -100
  want = np.sum(np.where(mask, 0.6 * ce + 0.4 * kl, 0.0)) / mask.sum()
  got = kdjax.fused_linear_distill_with_cross_entropy(
      data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
      data["teacher_kernel"], labels, student_bias=data["student_bias"], kd_coef=0.4,
      temperature=2.0, token_block=TOKEN_BLOCK)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _liger_combined_formula(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            labels, *, weight_hard_loss, weight_soft_loss, beta, temperature):
  """Liger-Kernel's LigerFusedLinearJSDLoss objective in plain PyTorch: cross entropy at
  temperature 1 and the generalized JSD (its beta convention) at the temperature, both averaged
  over the tokens whose label is not -100. Weights are nn.Linear-style [vocab, d]."""
  import torch
  import torch.nn.functional as F  # noqa: N812

  student = student_hidden @ student_weight.T
  teacher = teacher_hidden @ teacher_weight.T
  mask = labels != -100
  hard = F.cross_entropy(student, labels, ignore_index=-100, reduction="sum") / mask.sum()
  log_q = F.log_softmax(student / temperature, dim=-1)
  log_p = F.log_softmax(teacher / temperature, dim=-1)
  log_m = torch.logsumexp(torch.stack([log_q + np.log(1 - beta), log_p + np.log(beta)]), dim=0)
  jsd = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
         + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True)).sum(-1)
  soft = jsd.masked_fill(~mask, 0.0).sum() / mask.sum()
  return weight_hard_loss * hard + weight_soft_loss * soft


def test_combined_against_liger_formula_in_pytorch():
  import torch

  data, labels = _make(33, shape=(13,))
  h_s, w_s = np.asarray(data["student_hidden"]), np.asarray(data["student_kernel"])
  h_t, w_t = np.asarray(data["teacher_hidden"]), np.asarray(data["teacher_kernel"])
  torch_inputs = [torch.tensor(x, requires_grad=i < 2) for i, x in enumerate(
      (h_s, w_s.T.copy(), h_t, w_t.T.copy()))]
  want = _liger_combined_formula(*torch_inputs, torch.tensor(np.asarray(labels), dtype=torch.long),
                                 weight_hard_loss=0.25, weight_soft_loss=0.75, beta=0.3,
                                 temperature=1.7)
  want.backward()
  value, (g_h, g_w) = jax.value_and_grad(
      lambda h, w: kdjax.fused_linear_distill_with_cross_entropy(
          h, w, h_t, w_t, labels, kd_coef=0.75, divergence="generalized_jsd", beta=0.3,
          temperature=1.7, token_block=4), argnums=(0, 1))(h_s, w_s)
  np.testing.assert_allclose(value, want.item(), rtol=1e-5)
  np.testing.assert_allclose(g_h, torch_inputs[0].grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_w, torch_inputs[1].grad.numpy().T, rtol=1e-4, atol=1e-6)


def test_sum_and_count_forms():
  data, labels = _make(34)
  args = (data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
          data["teacher_kernel"], labels)
  count = np.sum(np.asarray(labels) != -100)
  for sum_and_count, mean, kwargs in (
      (kdjax.fused_linear_distill_loss_sum_and_count, kdjax.fused_linear_distill_loss, {}),
      (kdjax.fused_linear_distill_with_cross_entropy_sum_and_count,
       kdjax.fused_linear_distill_with_cross_entropy, dict(kd_coef=0.5))):
    total, got_count = sum_and_count(*args, token_block=TOKEN_BLOCK, **kwargs)
    assert float(got_count) == count
    np.testing.assert_allclose(total / got_count, mean(*args, **kwargs), rtol=2e-5)
    grad = jax.grad(lambda h, f=sum_and_count, k=kwargs: f(h, *args[1:], **k)[0])(args[0])
    want = jax.grad(lambda h, f=mean, k=kwargs: f(h, *args[1:], reduction="sum", **k))(args[0])
    np.testing.assert_allclose(grad, want, rtol=2e-5, atol=1e-6)


def test_combined_bf16_labels_and_ignored_tokens():
  data, labels = _make(35, dtype=jnp.bfloat16)
  args = (data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
          data["teacher_kernel"])
  grads = jax.grad(lambda h, w: kdjax.fused_linear_distill_with_cross_entropy(
      h, w, *args[2:], labels, vocab_block=VOCAB_BLOCK), argnums=(0, 1))(*args[:2])
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  want = jax.grad(lambda h, w: kdjax.distill_with_cross_entropy(
      (h @ w).astype(jnp.float32), (args[2] @ args[3]).astype(jnp.float32), labels),
      argnums=(0, 1))(*(x.astype(jnp.float32) for x in args[:2]))
  for g, w in zip(grads, want, strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=3e-2, atol=3e-3)
  # A counted label outside the vocabulary: known, a ValueError at the call; traced, NaN. An
  # ignored one with NaN hidden states is 0.
  bad = labels.at[0, 0].set(VOCAB)
  with pytest.raises(ValueError, match=r"got labels\[0, 0\] = 37"):
    kdjax.fused_linear_distill_with_cross_entropy(*args, bad)
  assert np.isnan(jax.jit(lambda y: kdjax.fused_linear_distill_with_cross_entropy(*args, y))(bad))
  hidden = args[0].astype(jnp.float32).at[0, 1].set(jnp.nan)  # token (0, 1) is ignored
  grads = jax.grad(lambda h: kdjax.fused_linear_distill_with_cross_entropy(
      h, *(x.astype(jnp.float32) for x in args[1:]), labels))(hidden)
  assert np.all(np.isfinite(grads)) and np.all(grads[0, 1] == 0)
  with pytest.raises(ValueError, match="labels is required"):
    kdjax.fused_linear_distill_with_cross_entropy(*args, None)


@pytest.mark.parametrize("loss", [
    kdjax.fused_linear_distill_loss,
    kdjax.fused_linear_distill_with_cross_entropy,
    lambda *a, **kw: kdjax.fused_linear_distill_loss_sum_and_count(*a, **kw)[0],
    lambda *a, **kw: kdjax.fused_linear_distill_with_cross_entropy_sum_and_count(*a, **kw)[0],
], ids=["loss", "with_cross_entropy", "sum_and_count", "with_cross_entropy_sum_and_count"])
def test_labels_outside_the_vocabulary_are_an_error_at_the_call(loss):
  """Known labels index the kernel's 37 columns: label 37 is a ValueError naming its position
  and the vocabulary size (with or without vocab_block, under jit when closed over); 36 is a
  valid id; an uncounted 37 changes nothing; traced labels make the loss NaN."""
  data, labels = _make(38)
  args = (data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
          data["teacher_kernel"])
  past = np.asarray(labels).copy()
  past[1, 2], past[2, 0] = VOCAB, VOCAB + 5
  for kwargs in ({}, dict(vocab_block=VOCAB_BLOCK)):
    with pytest.raises(ValueError, match=(
        r"^labels must be vocabulary ids in \[0, 37\) \(student_kernel.shape\[-1\] = 37\) or "
        r"ignore_index=-100, got labels\[1, 2\] = 37 \(the first of 2 counted")):
      loss(*args, past, **kwargs)
  with pytest.raises(ValueError, match=r"got labels\[1, 2\] = 37"):
    jax.jit(lambda: loss(*args, past))()
  with pytest.raises(ValueError, match=r"got labels\[1, 2\] = 37"):
    loss(*args, past.tolist())
  last = np.asarray(labels).copy()
  last[1, 2] = VOCAB - 1
  assert np.isfinite(loss(*args, last))
  where = np.ones(past.shape, bool)
  where[1, 2] = where[2, 0] = False
  np.testing.assert_allclose(loss(*args, past, where=where),
                             loss(*args, np.where(where, past, -100)), rtol=1e-6)
  assert np.isnan(jax.jit(lambda y: loss(*args, y))(past))


def test_combined_compiled_temporaries_are_blockwise():
  # As test_compiled_temporaries_are_blockwise: 16 of 256 tokens per block.
  data, labels = _make(36, vocab=2048, shape=(256,), d_student=16, d_teacher=16)
  args = (data["student_hidden"], data["student_kernel"], data["teacher_hidden"],
          data["teacher_kernel"], labels)

  def temporaries(fn):
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  fused_bytes = temporaries(lambda h, w, ht, wt, y: kdjax.fused_linear_distill_with_cross_entropy(
      h, w, ht, wt, y, token_block=16))
  materialised = temporaries(lambda h, w, ht, wt, y: kdjax.distill_with_cross_entropy(
      h @ w, ht @ wt, y))
  assert fused_bytes <= 0.1 * materialised, (fused_bytes, materialised)
