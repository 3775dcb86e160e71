"""Independent float64 NumPy references for the tests (no kdjax code is used here).

Conventions, as documented in docs/divergences.md: ``0 log 0 = 0``; a term ``x log(x / y)`` with
``y = 0`` is 0; a token whose student or teacher logits are all ``-inf`` contributes 0.
"""

from __future__ import annotations

import numpy as np


def log_softmax(x):
  """``x - logsumexp(x)`` over the last axis, as ``(x - max) - log(sum(exp(x - max)))``: even in
  float64, ``max + log(sum)`` loses ``log(sum)`` next to a max of 1e30."""
  x = np.asarray(x, np.float64)
  finite_max = np.where(np.isfinite(x), x, -np.inf).max(-1, keepdims=True)
  finite_max = np.where(np.isfinite(finite_max), finite_max, 0.0)
  shifted = x - finite_max
  with np.errstate(divide="ignore"):
    total = np.exp(shifted).sum(-1, keepdims=True)
  return shifted - np.log(np.where(total > 0, total, 1.0))


def _kl_terms(x, log_x, log_y):
  """x (log x - log y), 0 where x == 0 or y == 0 (log = -inf)."""
  ok = np.isfinite(log_x) & np.isfinite(log_y)
  with np.errstate(invalid="ignore"):
    return np.where(ok, x * (log_x - log_y), 0.0)


def _log_mixture(weight, log_a, log_b):
  with np.errstate(divide="ignore"):
    return np.log(weight * np.exp(log_a) + (1 - weight) * np.exp(log_b))


def per_token(divergence, logits, teacher_logits, *, temperature=1.0, beta=0.5, alpha=0.1):
  """Per-token divergence, float64, shape logits.shape[:-1]."""
  log_q = log_softmax(np.asarray(logits, np.float64) / temperature)
  log_p = log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
  q, p = np.exp(log_q), np.exp(log_p)
  if divergence == "soft_cross_entropy":
    ok = np.isfinite(log_q) & (p > 0)
    terms = np.where(ok, -p * np.where(ok, log_q, 0.0), 0.0)
  elif divergence == "forward_kl" or (divergence == "generalized_jsd" and beta == 0):
    terms = _kl_terms(p, log_p, log_q)
  elif divergence == "reverse_kl" or (divergence == "generalized_jsd" and beta == 1):
    terms = _kl_terms(q, log_q, log_p)
  elif divergence == "generalized_jsd":
    log_m = _log_mixture(beta, log_p, log_q)
    terms = beta * _kl_terms(p, log_p, log_m) + (1 - beta) * _kl_terms(q, log_q, log_m)
  elif divergence == "skew_forward_kl":
    terms = _kl_terms(p, log_p, _log_mixture(alpha, log_p, log_q))
  elif divergence == "skew_reverse_kl":
    terms = _kl_terms(q, log_q, _log_mixture(alpha, log_q, log_p))
  elif divergence == "total_variation":
    terms = 0.5 * np.abs(p - q)
  else:
    raise ValueError(divergence)
  empty = np.all(np.isneginf(log_q), -1) | np.all(np.isneginf(log_p), -1)
  return np.where(empty, 0.0, terms.sum(-1))


def reduce(per_token_values, mask, reduction, normalizer=None):
  values = np.where(mask, per_token_values, 0.0)
  if reduction == "none":
    return values
  if reduction == "sum":
    return values.sum()
  if reduction == "mean":
    count = mask.sum() if normalizer is None else normalizer
    return values.sum() / count if count > 0 else 0.0
  if reduction == "sequence_mean":
    values, mask = np.atleast_2d(values), np.atleast_2d(mask)
    values = values.reshape(-1, values.shape[-1])
    mask = mask.reshape(-1, mask.shape[-1])
    means = [v[m].mean() for v, m in zip(values, mask, strict=True) if m.any()]
    return float(np.mean(means)) if means else 0.0
  raise ValueError(reduction)


def cross_entropy(logits, labels):
  log_q = log_softmax(logits)
  safe = np.where(labels >= 0, labels, 0)
  return -np.take_along_axis(log_q, safe[..., None], -1)[..., 0]


def numerical_grad(fn, x, eps=1e-6):
  """Central differences of a scalar float64 function; entries at -inf get 0."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  flat, gflat = x.reshape(-1), grad.reshape(-1)
  for i in range(flat.size):
    if not np.isfinite(flat[i]):
      continue
    orig = flat[i]
    flat[i] = orig + eps
    up = fn(x)
    flat[i] = orig - eps
    down = fn(x)
    flat[i] = orig
    gflat[i] = (up - down) / (2 * eps)
  return grad


def random_logits(rng, shape, *, scale=2.0, neg_inf_fraction=0.0):
  x = rng.standard_normal(shape) * scale
  if neg_inf_fraction:
    x = np.where(rng.random(shape) < neg_inf_fraction, -np.inf, x)
  return x.astype(np.float32)
