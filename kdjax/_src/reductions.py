"""Token masks and reductions shared by every loss (dense, fused, sparse, vocabulary-parallel).

Masking: a token counts when ``labels != ignore_index`` (if ``labels`` is given) and
``where`` is True (if ``where`` is given). Reductions:

* ``"mean"``: sum over valid tokens divided by their count, or by ``normalizer`` when given (for
  example the global token count across gradient-accumulation steps or hosts). 0 when the
  divisor is 0, so an all-ignored batch gives a loss of 0 and zero gradients.
* ``"sum"``: sum over valid tokens.
* ``"none"``: the per-token values with invalid tokens set to 0.
* ``"sequence_mean"``: the mean over each sequence's valid tokens (the last token axis is the
  sequence), then the mean over the sequences that have any valid token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

REDUCTIONS = ("mean", "sum", "none", "sequence_mean")


def check_reduction(reduction: str, normalizer) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  if normalizer is not None and reduction != "mean":
    raise ValueError(
        f"normalizer replaces the token count of reduction='mean'; it cannot be used with "
        f"reduction={reduction!r}.")
  if normalizer is not None and jnp.ndim(normalizer) != 0:
    raise ValueError(f"normalizer must be a scalar, got shape {jnp.shape(normalizer)}.")


def token_mask(token_shape, labels, where, ignore_index: int) -> Array:
  mask = jnp.ones(token_shape, jnp.bool_)
  if labels is not None:
    mask = mask & (labels != ignore_index)
  if where is not None:
    mask = mask & where
  return mask


def _safe_divide(total: Array, count: Array) -> Array:
  return total / jnp.where(count > 0, count, 1).astype(jnp.float32)


def sum_and_count(per_token: Array, mask: Array) -> tuple[Array, Array]:
  """``(sum of valid per-token values, number of valid tokens)`` as float32 scalars."""
  total = jnp.sum(jnp.where(mask, per_token, 0.0))
  return total, jnp.sum(mask).astype(jnp.float32)


def token_weights(mask: Array, *, reduction: str, normalizer=None) -> Array:
  """Weights ``w`` such that ``reduce(v, mask, ...) == sum(w * v)`` for the scalar reductions.

  They are constants of the loss (a mask divided by a count): no gradient flows to
  ``normalizer``.
  """
  weights = mask.astype(jnp.float32)
  if reduction == "sum":
    return weights
  if reduction == "mean":
    count = jnp.sum(weights) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    return _safe_divide(weights, jax.lax.stop_gradient(count))
  if reduction == "sequence_mean":
    seq_weights = jnp.atleast_1d(weights)
    seq_count = jnp.sum(seq_weights, axis=-1, keepdims=True)
    num_sequences = jnp.sum(seq_count > 0)
    return _safe_divide(_safe_divide(seq_weights, seq_count), num_sequences).reshape(mask.shape)
  raise ValueError(f"reduction {reduction!r} has no token weights.")


def reduce(per_token: Array, mask: Array, *, reduction: str, normalizer=None) -> Array:
  masked = jnp.where(mask, per_token, 0.0)
  if reduction == "none":
    return masked
  if reduction == "sum":
    return jnp.sum(masked)
  if reduction == "mean":
    count = jnp.sum(mask) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    return _safe_divide(jnp.sum(masked), count)
  # sequence_mean: the last token axis is the sequence; a rank-1 input is one sequence.
  masked = jnp.atleast_1d(masked)
  seq_mask = jnp.atleast_1d(mask)
  seq_count = jnp.sum(seq_mask, axis=-1)
  seq_mean = _safe_divide(jnp.sum(masked, axis=-1), seq_count)
  has_tokens = seq_count > 0
  return _safe_divide(jnp.sum(jnp.where(has_tokens, seq_mean, 0.0)), jnp.sum(has_tokens))
