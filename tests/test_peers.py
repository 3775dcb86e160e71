"""The conventions of TRL, Liger-Kernel, torchtune and OpenRLHF that docs/coming_from.md maps
onto kdjax, each against the peer's formula written here in PyTorch (float64 autograd) from its
documented definition: TRL's ``generalized_jsd_loss`` with its reductions, Liger-Kernel's fused
distillation base (``weight_hard_loss``, ``weight_soft_loss``, ``temperature``) and its
``LigerJSD``, ``LigerKLDIVLoss`` and ``LigerTVDLoss`` modules, torchtune's KD losses, and
OpenRLHF's KD trainer objective. Each test checks the value and the gradient with respect to
the student logits, and what each peer gives for a batch with every label ignored.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdjax
from tests import reference

IGNORE = -100
BATCH, SEQ, VOCAB = 3, 5, 23


def _inputs(seed, *, neg_inf=0.0, teacher_neg_inf_where_student=False):
  """``[BATCH, SEQ, VOCAB]`` logits and ``[BATCH, SEQ]`` labels with about a third ignored."""
  rng = np.random.default_rng(seed)
  shape = (BATCH, SEQ, VOCAB)
  logits = reference.random_logits(rng, shape, neg_inf_fraction=neg_inf)
  teacher = reference.random_logits(rng, shape, scale=3.0, neg_inf_fraction=neg_inf)
  if teacher_neg_inf_where_student:  # a vocabulary padded on both sides alike
    teacher = np.where(np.isneginf(logits) | np.isfinite(teacher), teacher, 0.0)
  labels = rng.integers(0, VOCAB, shape[:2]).astype(np.int32)
  labels[rng.random(shape[:2]) < 0.35] = IGNORE
  labels[0, 0] = 1
  # A counted label never points at a -inf student entry (its cross entropy would be infinite).
  finite = np.take_along_axis(np.isfinite(logits), np.maximum(labels, 0)[..., None], -1)[..., 0]
  labels = np.where(finite, labels, IGNORE).astype(np.int32)
  return logits, teacher, labels


def _torch(x, grad=False):
  return torch.tensor(np.asarray(x, np.float64), requires_grad=grad)


def _value_and_grad(fn, logits):
  """A PyTorch loss of float64 student logits: ``(value, d value / d logits)``."""
  student = _torch(logits, grad=True)
  value = fn(student)
  value.backward()
  return value.item(), student.grad.numpy()


def _assert_matches(kdjax_fn, torch_fn, logits, *, rtol=1e-5, atol=1e-7, grad=True):
  value, grad_value = jax.value_and_grad(kdjax_fn)(logits)
  want, want_grad = _value_and_grad(torch_fn, logits)
  np.testing.assert_allclose(value, want, rtol=rtol, atol=atol)
  if grad:
    np.testing.assert_allclose(grad_value, want_grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# TRL: GKDTrainer.generalized_jsd_loss
# ----------------------------------------------------------------------------------------------


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                             temperature=1.0, reduction="batchmean", num_items_in_batch=None):
  """TRL's ``GKDTrainer.generalized_jsd_loss`` as TRL defines it: both logits divided by the
  temperature; per vocabulary entry the forward KL at ``beta=0``, the reverse KL at ``beta=1``,
  else ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``; the
  entries of tokens whose label is -100 dropped; then the sum over the kept entries divided by
  ``num_items_in_batch`` when given, else by the reduction: "batchmean" by the number of counted
  tokens (at least 1) with labels and by the first axis (the batch size) without, "sum", "mean"
  over every kept entry (tokens times vocabulary), or none (the kept entries, per vocabulary
  entry)."""
  student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
  if beta == 0:
    jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
  elif beta == 1:
    jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
  else:
    log_mixture = torch.logsumexp(torch.stack([
        student_log_probs + np.log1p(-beta), teacher_log_probs + np.log(beta)]), dim=0)
    jsd = (beta * F.kl_div(log_mixture, teacher_log_probs, reduction="none", log_target=True)
           + (1 - beta) * F.kl_div(log_mixture, student_log_probs, reduction="none",
                                   log_target=True))
  if labels is not None:
    mask = labels != IGNORE
    jsd = jsd[mask]
  if num_items_in_batch is not None:
    return jsd.sum() / num_items_in_batch
  if reduction == "batchmean":
    return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
  if reduction == "sum":
    return jsd.sum()
  if reduction == "mean":
    return jsd.mean()
  return jsd


def test_trl_generalized_jsd_loss_reductions():
  """TRL's reductions in kdjax terms: "batchmean" with labels is reduction="mean" (the mean over
  counted tokens); without labels it divides the sum by the batch size, normalizer=batch; a
  num_items_in_batch is normalizer=; "sum" is "sum"; "mean" also divides by the vocabulary size;
  none holds the per-entry terms, whose sum over the vocabulary is reduction="none". (The
  per-token values at every beta, endpoints included, are test_divergences.py's.)"""
  beta = 0.3
  logits, teacher, labels = _inputs(1)
  t_teacher, t_labels = _torch(teacher), torch.tensor(labels)
  kw = dict(divergence="generalized_jsd", beta=beta, temperature=2.0)

  def trl(**trl_kw):
    return lambda x: trl_generalized_jsd_loss(x, t_teacher, beta=beta, temperature=2.0,
                                              **trl_kw)

  count = int((labels != IGNORE).sum())
  cases = [
      (lambda x: kdjax.distill_loss(x, teacher, labels, **kw), trl(labels=t_labels)),
      (lambda x: kdjax.distill_loss(x, teacher, normalizer=BATCH, **kw), trl()),
      (lambda x: kdjax.distill_loss(x, teacher, labels, normalizer=40, **kw),
       trl(labels=t_labels, num_items_in_batch=40)),
      (lambda x: kdjax.distill_loss(x, teacher, labels, reduction="sum", **kw),
       trl(labels=t_labels, reduction="sum")),
      (lambda x: kdjax.distill_loss(x, teacher, labels, **kw) / VOCAB,
       trl(labels=t_labels, reduction="mean")),
  ]
  for kdjax_fn, torch_fn in cases:
    _assert_matches(kdjax_fn, torch_fn, logits)
  per_entry = trl(labels=t_labels, reduction="none")(_torch(logits))
  assert per_entry.shape == (count, VOCAB)
  per_token = kdjax.distill_loss(logits, teacher, labels, reduction="none", **kw)
  np.testing.assert_allclose(np.asarray(per_token)[labels != IGNORE],
                             per_entry.sum(-1).detach().numpy(), rtol=1e-5, atol=1e-7)
  # Every label ignored: TRL's "batchmean" (the count clamped to 1) and kdjax's "mean" give 0.
  ignored = np.full_like(labels, IGNORE)
  assert trl(labels=torch.tensor(ignored))(_torch(logits)).item() == 0.0
  assert float(kdjax.distill_loss(logits, teacher, ignored, **kw)) == 0.0


def test_generalized_jsd_near_its_ends_is_a_scaled_kl():
  """TRL's (and kdjax's) beta=0 and beta=1 are the KLs by special case, not as limits: the
  formula near beta=0 is about beta times the forward KL, near 1 about (1 - beta) times the
  reverse KL (first order in the small weight)."""
  rng = np.random.default_rng(8)
  logits, teacher = (reference.random_logits(rng, (4, VOCAB), scale=1.0) for _ in range(2))
  for beta, kl in ((1e-3, kdjax.forward_kl), (1 - 1e-3, kdjax.reverse_kl)):
    np.testing.assert_allclose(kdjax.generalized_jsd(logits, teacher, beta=beta),
                               1e-3 * np.asarray(kl(logits, teacher)), rtol=2e-2)
  np.testing.assert_allclose(kdjax.generalized_jsd(logits, teacher, beta=0.0),
                             kdjax.forward_kl(logits, teacher), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Liger-Kernel
# ----------------------------------------------------------------------------------------------


def liger_fused_linear_jsd(student_logits, teacher_logits, labels, *, weight_hard_loss=0.5,
                           weight_soft_loss=0.5, beta=0.5, temperature=1.0):
  """Liger-Kernel's ``LigerFusedLinearJSDLoss`` objective on logits (its distillation base,
  without the matmul): the hard loss, cross entropy of the unscaled student logits summed over
  the tokens whose label is not -100; the soft loss, the generalized JSD of ``beta`` (TRL's
  convention) between the logits divided by ``temperature``, summed over the same tokens; each
  divided by the number of counted tokens (at least 1), then ``weight_hard_loss * hard +
  weight_soft_loss * soft``."""
  flat = student_logits.reshape(-1, student_logits.shape[-1])
  targets = labels.reshape(-1)
  count = (targets != IGNORE).sum().clamp_min(1)
  hard = F.nll_loss(F.log_softmax(flat, dim=-1), targets, reduction="sum",
                    ignore_index=IGNORE) / count
  log_q = F.log_softmax(flat / temperature, dim=-1)
  log_p = F.log_softmax(teacher_logits.reshape(flat.shape) / temperature, dim=-1)
  if beta == 0:
    jsd = F.kl_div(log_q, log_p, reduction="none", log_target=True)
  elif beta == 1:
    jsd = F.kl_div(log_p, log_q, reduction="none", log_target=True)
  else:
    log_m = torch.logsumexp(torch.stack([log_q + np.log(1 - beta), log_p + np.log(beta)]), 0)
    jsd = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
           + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
  soft = jsd.sum(-1).masked_fill(targets == IGNORE, 0.0).sum() / count
  return weight_hard_loss * hard + weight_soft_loss * soft


@pytest.mark.parametrize("weight_hard_loss, weight_soft_loss, beta", [
    (0.5, 0.5, 0.5),   # Liger's defaults
    (0.25, 0.75, 0.0),
    (0.0, 1.0, 1.0),   # TRL's GKD trainer with use_liger_kernel: the JSD alone
    (0.3, 0.9, 0.7),   # weights that do not sum to 1
])
def test_liger_distillation_weights_are_kd_coef(weight_hard_loss, weight_soft_loss, beta):
  """weight_soft_loss is kd_coef and weight_hard_loss 1 - kd_coef; weights of another sum scale
  distill_with_cross_entropy(kd_coef=w_soft / (w_hard + w_soft)) by that sum; both terms are
  means over the counted tokens, the cross entropy at temperature 1 and no T**2 on the soft
  term. With weight_hard_loss=0 it is distill_loss."""
  logits, teacher, labels = _inputs(2)
  t_teacher, t_labels = _torch(teacher), torch.tensor(labels, dtype=torch.long)
  total = weight_hard_loss + weight_soft_loss
  # beta and kd_coef as arrays (the endpoints still selected at run time): one compilation for
  # every case.
  kw = dict(divergence="generalized_jsd", beta=jnp.float32(beta), temperature=1.7)

  def kdjax_fn(x):
    if weight_hard_loss == 0:
      return weight_soft_loss * kdjax.distill_loss(x, teacher, labels, **kw)
    return total * kdjax.distill_with_cross_entropy(
        x, teacher, labels, kd_coef=jnp.float32(weight_soft_loss / total), **kw)

  _assert_matches(kdjax_fn, lambda x: liger_fused_linear_jsd(
      x, t_teacher, t_labels, weight_hard_loss=weight_hard_loss,
      weight_soft_loss=weight_soft_loss, beta=beta, temperature=1.7), logits)
  ignored = np.full_like(labels, IGNORE)
  assert liger_fused_linear_jsd(_torch(logits), t_teacher, torch.tensor(ignored, dtype=torch.long),
                                weight_hard_loss=weight_hard_loss,
                                weight_soft_loss=weight_soft_loss, beta=beta).item() == 0.0
  assert float(kdjax.distill_with_cross_entropy(logits, teacher, ignored, kd_coef=0.5)) == 0.0


def liger_jsd(log_q, log_p, shift_labels=None, beta=0.5):
  """``LigerJSD(beta)(log_q, log_p, shift_labels)`` as its kernel defines it, on ``[BT, V]``
  student and teacher log-probabilities: per entry ``P (log P - log Q)`` at ``beta=0``,
  ``Q (log Q - log P)`` at ``beta=1``, else ``beta P log P + (1 - beta) Q log Q - M log M`` with
  ``M = beta P + (1 - beta) Q``; rows whose label is the ignore index contribute 0, and the sum
  is divided by the number of the other rows (all ``BT`` without labels)."""
  q, p = log_q.exp(), log_p.exp()
  if beta == 0:
    terms = p * (log_p - log_q)
  elif beta == 1:
    terms = q * (log_q - log_p)
  else:
    m = beta * p + (1 - beta) * q
    terms = beta * p * log_p + (1 - beta) * q * log_q - m * m.log()
  rows = terms.sum(-1)
  if shift_labels is None:
    return rows.sum() / rows.shape[0]
  kept = shift_labels != IGNORE
  return rows[kept].sum() / kept.sum()


@pytest.mark.parametrize("beta, with_labels", [(0.0, True), (0.4, False), (1.0, True)])
def test_liger_jsd_module(beta, with_labels):
  """LigerJSD(beta) takes log-probabilities (no temperature) of [BT, V] rows: distill_loss with
  divergence="generalized_jsd" and the same beta, the mean over the counted rows (all rows
  without shift_labels)."""
  logits, teacher, labels = _inputs(3)
  flat_logits, flat_teacher = logits.reshape(-1, VOCAB), teacher.reshape(-1, VOCAB)
  shift_labels = labels.reshape(-1) if with_labels else None
  log_p = F.log_softmax(_torch(flat_teacher), -1)
  _assert_matches(
      lambda x: kdjax.distill_loss(jax.nn.log_softmax(x), flat_teacher, shift_labels,
                                   divergence="generalized_jsd", beta=beta),
      lambda x: liger_jsd(F.log_softmax(x, -1), log_p,
                          None if shift_labels is None else torch.tensor(shift_labels),
                          beta=beta),
      flat_logits)


def test_liger_kl_div_and_tvd_modules():
  """LigerKLDIVLoss(reduction="batchmean", log_target=True)(log_q, log_p), torch's KLDivLoss
  convention (the first argument is the student's log-probabilities), is forward_kl averaged
  over all BT rows, with no labels; LigerTVDLoss()(p, q, shift_labels) on probabilities is
  total_variation averaged over the counted rows ("batchmean"), divided by the vocabulary size
  too for "mean"."""
  logits, teacher, labels = _inputs(4)
  flat_logits, flat_teacher = logits.reshape(-1, VOCAB), teacher.reshape(-1, VOCAB)
  flat_labels = labels.reshape(-1)
  log_p = F.log_softmax(_torch(flat_teacher), -1)

  def liger_kl_div_batchmean(log_q):
    # torch.nn.KLDivLoss: target * (log target - input) per entry; "batchmean": / rows.
    return (log_p.exp() * (log_p - log_q)).sum() / log_q.shape[0]

  _assert_matches(lambda x: kdjax.distill_loss(x, flat_teacher),
                  lambda x: liger_kl_div_batchmean(F.log_softmax(x, -1)), flat_logits)

  def liger_tvd(p, q, shift_labels, reduction):
    kept = shift_labels != IGNORE
    total = (0.5 * (p - q).abs()).sum(-1)[kept].sum()
    return total / (kept.sum() * (p.shape[-1] if reduction == "mean" else 1))

  t_labels = torch.tensor(flat_labels)
  for reduction, scale in (("batchmean", 1.0), ("mean", 1.0 / VOCAB)):
    _assert_matches(
        lambda x, s=scale: s * kdjax.distill_loss(x, flat_teacher, flat_labels,
                                                  divergence="total_variation"),
        lambda x, r=reduction: liger_tvd(log_p.exp(), F.softmax(x, -1), t_labels, r),
        flat_logits)


# ----------------------------------------------------------------------------------------------
# torchtune
# ----------------------------------------------------------------------------------------------


def torchtune_forward_kl_loss(student_logits, teacher_logits, labels, normalize=True):
  """torchtune's ``ForwardKLLoss``: per token ``sum_v softmax(teacher)_v log_softmax(student)_v``
  with the entries where the student logit is infinite set to 0, negated and summed over the
  tokens whose label is not -100; divided by their number when ``normalize`` (0 when there are
  none)."""
  teacher_prob = F.softmax(teacher_logits, dim=-1)
  student_logprob = F.log_softmax(student_logits, dim=-1)
  prod = torch.masked_fill(teacher_prob * student_logprob, torch.isinf(student_logits), 0)
  x = prod.sum(-1).view(-1)
  mask = (labels != IGNORE).int().view(-1)
  if not normalize:
    return -(x * mask).sum()
  if mask.sum() == 0:
    return torch.tensor(0.0, dtype=x.dtype)
  return -(x * mask).sum() / mask.sum()


def torchtune_reverse_kl_loss(student_logits, teacher_logits, labels, normalize=True):
  """torchtune's ``ReverseKLLoss``: per token ``sum_v q_v (log q_v - log p_v)`` with the entries
  where either logit is infinite set to 0, then as ``ForwardKLLoss``."""
  student_prob = F.softmax(student_logits, dim=-1)
  student_logprob = F.log_softmax(student_logits, dim=-1)
  teacher_logprob = F.log_softmax(teacher_logits, dim=-1)
  inf = torch.isinf(student_logits) | torch.isinf(teacher_logits)
  prod = (torch.masked_fill(student_prob * teacher_logprob, inf, 0)
          - torch.masked_fill(student_prob * student_logprob, inf, 0))
  x = prod.sum(-1).view(-1)
  mask = (labels != IGNORE).int().view(-1)
  if not normalize:
    return -(x * mask).sum()
  if mask.sum() == 0:
    return torch.tensor(0.0, dtype=x.dtype)
  return -(x * mask).sum() / mask.sum()


@pytest.mark.parametrize("normalize", [True, False])
def test_torchtune_kd_losses(normalize):
  """ForwardKLLoss is kd_loss (the soft cross entropy, despite its name: forward KL plus the
  teacher's entropy); ReverseKLLoss is distill_loss(divergence="reverse_kl");
  SymmetricKLLoss(r) is r times the first plus 1 - r times the second; normalize=False is
  reduction="sum". -inf entries (a padded vocabulary, masked student entries) included."""
  logits, teacher, labels = _inputs(5, neg_inf=0.1, teacher_neg_inf_where_student=True)
  t_teacher, t_labels = _torch(teacher), torch.tensor(labels)
  reduction = "mean" if normalize else "sum"

  def forward(x):
    return kdjax.distill_loss(x, teacher, labels, divergence="soft_cross_entropy",
                              reduction=reduction)

  def reverse(x):
    return kdjax.distill_loss(x, teacher, labels, divergence="reverse_kl", reduction=reduction)

  _assert_matches(forward, lambda x: torchtune_forward_kl_loss(x, t_teacher, t_labels, normalize),
                  logits)
  if normalize:
    np.testing.assert_allclose(kdjax.kd_loss(logits, teacher, labels), forward(logits),
                               rtol=1e-6)
  # torchtune's masked_fill leaves NaN gradients (0 * -inf) at -inf entries: values only there.
  _assert_matches(reverse, lambda x: torchtune_reverse_kl_loss(x, t_teacher, t_labels,
                                                               normalize), logits, grad=False)
  finite_logits, finite_teacher, _ = _inputs(6)
  _assert_matches(
      lambda x: 0.3 * kdjax.distill_loss(x, finite_teacher, labels,
                                         divergence="soft_cross_entropy", reduction=reduction)
      + 0.7 * kdjax.distill_loss(x, finite_teacher, labels, divergence="reverse_kl",
                                 reduction=reduction),
      lambda x: 0.3 * torchtune_forward_kl_loss(x, _torch(finite_teacher), t_labels, normalize)
      + 0.7 * torchtune_reverse_kl_loss(x, _torch(finite_teacher), t_labels, normalize),
      finite_logits)
  if normalize:
    # The KD recipes' objective, (1 - kd_ratio) * class_loss + kd_ratio * kd_loss on the same
    # labels: kd_ratio is kd_coef.
    _assert_matches(
        lambda x: kdjax.distill_with_cross_entropy(x, finite_teacher, labels, kd_coef=0.4,
                                                   divergence="soft_cross_entropy"),
        lambda x: 0.6 * F.cross_entropy(x.reshape(-1, VOCAB), t_labels.reshape(-1).long(),
                                        ignore_index=IGNORE)
        + 0.4 * torchtune_forward_kl_loss(x, _torch(finite_teacher), t_labels), finite_logits)
    ignored = torch.full_like(t_labels, IGNORE)
    assert torchtune_forward_kl_loss(_torch(logits), t_teacher, ignored).item() == 0.0
    assert float(kdjax.kd_loss(logits, teacher, np.full_like(labels, IGNORE))) == 0.0


# ----------------------------------------------------------------------------------------------
# OpenRLHF: the KD trainer's objective
# ----------------------------------------------------------------------------------------------


def openrlhf_kd_objective(logits, teacher_logits, labels, kd_coef, *, shift_kd_mask=False):
  """OpenRLHF's KD trainer: ``gpt_loss * (1 - kd_coef) + distil_loss * kd_coef``, with
  ``GPTLMLoss`` (cross entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``, mean over the
  labels that are not -100) and ``KDLoss`` (OpenRLHF's soft cross entropy at every position,
  masked by ``labels`` as given: not shifted). ``shift_kd_mask`` masks ``KDLoss`` with the
  shifted labels at ``logits[:, :-1]`` instead."""
  gpt_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=IGNORE)
  kd_logits, kd_teacher, kd_labels = logits, teacher_logits, labels
  if shift_kd_mask:
    kd_logits, kd_teacher, kd_labels = logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
  distil_loss = torchtune_forward_kl_loss(kd_logits, kd_teacher, kd_labels)  # = KDLoss
  return gpt_loss * (1 - kd_coef) + distil_loss * kd_coef


def test_openrlhf_kd_coef_is_kd_coef():
  """kdjax's kd_coef is OpenRLHF's: with divergence="soft_cross_entropy" (KDLoss's value;
  the default "forward_kl" differs by the teacher's entropy, with the same gradient),
  distill_with_cross_entropy on shift_labels(labels) is OpenRLHF's objective with both terms on
  the same positions. OpenRLHF's trainer masks KDLoss with the unshifted labels: that objective
  is the cross entropy on the shifted labels plus kd_loss on the unshifted ones."""
  logits, teacher, labels = _inputs(7)
  labels[:, 0] = 2  # the first token (a prompt's) is a label too, as in pretraining mode
  t_teacher, t_labels = _torch(teacher), torch.tensor(labels, dtype=torch.long)
  shifted = np.asarray(kdjax.shift_labels(labels))
  _assert_matches(
      lambda x: kdjax.distill_with_cross_entropy(x, teacher, shifted, kd_coef=0.3,
                                                 divergence="soft_cross_entropy"),
      lambda x: openrlhf_kd_objective(x, t_teacher, t_labels, 0.3, shift_kd_mask=True), logits)
  _assert_matches(
      lambda x: 0.7 * kdjax.distill_with_cross_entropy(x, teacher, shifted, kd_coef=0.0)
      + 0.3 * kdjax.kd_loss(x, teacher, labels),
      lambda x: openrlhf_kd_objective(x, t_teacher, t_labels, 0.3), logits)
  # forward_kl, the default divergence, is the same objective less kd_coef times the teacher's
  # entropy over the counted tokens.
  entropy = reference.reduce(-np.sum(np.exp(reference.log_softmax(teacher))
                                     * reference.log_softmax(teacher), -1), shifted != IGNORE,
                             "mean")
  np.testing.assert_allclose(
      kdjax.distill_with_cross_entropy(logits, teacher, shifted, kd_coef=0.3) + 0.3 * entropy,
      openrlhf_kd_objective(_torch(logits), t_teacher, t_labels, 0.3,
                            shift_kd_mask=True).item(), rtol=1e-5)
