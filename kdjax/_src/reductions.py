"""Token masks and the one definition of every reduction over tokens.

Masking: a token counts when ``labels != ignore_index`` (if ``labels`` is given) and ``where``
is nonzero (if ``where`` is given). Every scalar reduction is a weighted sum of the per-token
values, ``sum_i w_i v_i``, with weights that depend only on the mask and the user's optional
per-token weights (:func:`reduction_weights`):

* ``"mean"``: ``w = mask / N``, ``N`` the number of counted tokens (over every device of the
  data axes, when given) or ``normalizer``. 0 when ``N`` is 0, so an all-ignored batch gives a
  loss of 0 and zero gradients; so does a ``normalizer`` of 0 (a global count of 0), which may
  divide no counted token.
* ``"sum"``: ``w = mask``.
* ``"sequence_mean"``: the mean over each sequence's counted tokens (the last token axis is the
  sequence), then the mean over the sequences that have any counted token.
* ``"none"``: no sum; the per-token values with uncounted tokens set to 0.

Every engine computes its gradient in the forward pass from these weights, and every path --
materialised, fused, sparse, vocabulary- and data-parallel, reference -- ends in
:func:`weighted_total`. A token whose weight is 0 contributes exactly 0, whatever its value
(NaN included). Sums of per-token values are pairwise (:func:`pairwise_sum`): their rounding
error grows like ``log n``, not ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kdjax._src.blocking import varying_axes

Array = jax.Array

REDUCTIONS = ("mean", "sum", "none", "sequence_mean")


def token_mask(token_shape, labels: Array | None, where: Array | None,
               ignore_index: int) -> Array:
  """bool ``token_shape``: the tokens that count."""
  mask = jnp.ones(token_shape, jnp.bool_)
  if labels is not None:
    mask = mask & (labels != ignore_index)
  if where is not None:
    mask = mask & where
  return mask


def invalid_tokens(mask: Array, labels: Array | None, vocab_size,
                   traced: Mapping[str, Array] | None = None) -> Array | None:
  """bool: counted tokens whose loss is NaN rather than a plausible number.

  A token is invalid when its label is neither ``ignore_index`` nor an id in
  ``[0, vocab_size)`` (``-1`` padding, say). Every counted token is invalid when a traced
  hyperparameter is NaN: the checks turn one outside its range into NaN, since its value is not
  known until the program runs.
  """
  invalid = None if labels is None else mask & ((labels < 0) | (labels >= vocab_size))
  if traced:
    nan_hyperparameter = mask & jnp.any(jnp.isnan(jnp.stack(
        [jnp.asarray(value, jnp.float32) for value in traced.values()])))
    invalid = nan_hyperparameter if invalid is None else invalid | nan_hyperparameter
  return invalid


def _safe_divide(total: Array, count: Array) -> Array:
  return total / jnp.where(count > 0, count, 1).astype(jnp.float32)


def _normalized(mask: Array, normalizer: Array) -> Array:
  """``mask / normalizer``, with a normalizer of 0 dividing no counted token: 0 where the mask
  is 0 (an all-padding step whose global count is 0 gives 0, as the default mean does) and NaN
  where it is 1. Checked ``>= 0`` where known; a traced invalid one is NaN, and so is every
  weight."""
  divided = mask / jnp.where(normalizer > 0, normalizer, 1.0)
  zero = jnp.where(mask > 0, jnp.nan, 0.0)
  return jnp.where(normalizer > 0, divided, jnp.where(normalizer == 0, zero, jnp.nan))


def global_sum(x: Array, data_axis_name: Hashable | None = None) -> Array:
  """``sum(x)`` over this device's tokens and, with ``data_axis_name``, every device's."""
  total = jnp.sum(x)
  return total if data_axis_name is None else lax.psum(total, data_axis_name)


def reduction_weights(mask: Array, *, reduction: str, normalizer: Array | None = None,
                      data_axis_name: Hashable | None = None, invalid: Array | None = None,
                      token_weights: Array | None = None) -> Array:
  """float32 weights ``w`` (``mask.shape``) with ``reduced loss = sum(w * values)``.

  ``reduction="none"`` gives the mask (the per-token values are then multiplied, not summed).
  With ``data_axis_name`` (inside ``shard_map``) the mean's divisor and the number of sequences
  count the tokens of every device along it; each sequence must live on one device.
  ``normalizer`` is used as given (0 only where no token counts). ``token_weights`` (float
  ``mask.shape``, optional) multiply each counted token's weight; they do not change the mean's
  divisor (the number of counted tokens). ``invalid`` tokens (:func:`invalid_tokens`) get a NaN
  weight, so the loss and their gradient are NaN. The weights are constants of the loss (no
  gradient flows through them, nor to ``normalizer`` or ``token_weights``).
  """
  weights = mask.astype(jnp.float32)
  if reduction == "mean":
    if normalizer is None:
      weights = _safe_divide(weights, global_sum(weights, data_axis_name))
    else:
      weights = _normalized(weights, jnp.asarray(normalizer, jnp.float32))
  elif reduction == "sequence_mean":
    sequences = jnp.atleast_1d(weights)
    per_sequence = jnp.sum(sequences, axis=-1, keepdims=True)
    num_sequences = global_sum((per_sequence > 0).astype(jnp.float32), data_axis_name)
    weights = _safe_divide(_safe_divide(sequences, per_sequence), num_sequences)
    weights = weights.reshape(mask.shape)
  elif reduction not in ("sum", "none"):
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  if token_weights is not None:
    weights = jnp.where(mask, weights * token_weights.astype(jnp.float32), 0.0)
  if invalid is not None:
    weights = jnp.where(invalid, jnp.nan, weights)
  return lax.stop_gradient(weights)


# Token sums run in this many (or fewer) independent groups of contiguous tokens, so the groups
# split evenly over a data-parallel mesh axis whose size divides it: every power of two up to
# 64, and 3, 5, 6, 12, 24, 48, ... devices.
_GROUPS = 64 * 3 * 5


def pairwise_sum(x: Array, *, groups: int = _GROUPS) -> Array:
  """``sum(x)``, added in pairs level by level: a rounding error growing like ``log n``.

  An XLA reduction of a float32 vector may run sequentially (XLA:CPU sums 1024 per-token losses
  with a relative error of 2e-7 where pairs give 7e-9), and XLA merges nested reductions into
  one, so the pairs are explicit additions. They run within contiguous groups of tokens (the
  leading axis of a ``[g, n / g]`` view, ``g`` the largest divisor of ``n`` that divides
  ``groups``), which keeps a sharded token axis where it is under GSPMD; the groups' sums are
  added last. ``groups=1``: every level in pairs, for a few values (a blocked loop's lanes).
  """
  x = x.reshape(-1)
  if x.shape[0] == 0:
    return jnp.zeros((), x.dtype)
  x = x.reshape(math.gcd(x.shape[0], groups), -1)
  while x.shape[1] > 1:
    if x.shape[1] % 2:
      x = jnp.pad(x, ((0, 0), (0, 1)))
    pairs = x.reshape(x.shape[0], -1, 2)
    x = pairs[..., 0] + pairs[..., 1]
  return jnp.sum(x)


def weighted_values(values: Array, weights: Array) -> Array:
  """``weights * values``, exactly 0 where a weight is 0, even for a NaN value: the terms of
  :func:`weighted_total` (a blocked engine adds them up block by block)."""
  return jnp.where(weights != 0, weights * values, 0.0)


def weighted_total(values: Array, weights: Array) -> Array:
  """``sum_i weights[i] * values[i]``; a token of weight 0 adds exactly 0, even a NaN one."""
  return pairwise_sum(weighted_values(values, weights))


def reduce(values: Array, mask: Array, *, reduction: str, normalizer: Array | None = None,
           data_axis_name: Hashable | None = None, invalid: Array | None = None,
           token_weights: Array | None = None) -> Array:
  """``values`` (float32 ``mask.shape``) reduced over tokens: a scalar, or weighted values."""
  weights = reduction_weights(mask, reduction=reduction, normalizer=normalizer,
                              data_axis_name=data_axis_name, invalid=invalid,
                              token_weights=token_weights)
  if reduction == "none":
    return jnp.where(weights != 0, weights * values, 0.0)
  return weighted_total(values, weights)


def reduced_loss(compute: Callable[[Array | None], tuple[Any, Array | None]], mask: Array, *,
                 reduction: str, normalizer: Array | None = None,
                 data_axis_name: Hashable | None = None, invalid: Array | None = None,
                 token_weights: Array | None = None) -> tuple[Array, Any]:
  """The loss every public function returns: ``(loss, rows)``.

  ``compute(weights)`` runs an engine: per-token ``rows`` (with a ``value`` field) and, when
  ``weights`` is not None, ``sum(weights * value)`` with its gradient. ``reduction="none"``
  gives the per-token values (times ``token_weights``; uncounted tokens 0); the others the
  weighted total, summed over ``data_axis_name`` when given.
  """
  if reduction == "none":
    rows, _ = compute(None)
    return reduce(rows.value, mask, reduction="none", invalid=invalid,
                  token_weights=token_weights), rows
  weights = reduction_weights(mask, reduction=reduction, normalizer=normalizer,
                              data_axis_name=data_axis_name, invalid=invalid,
                              token_weights=token_weights)
  rows, total = compute(weights)
  assert total is not None, "compute returns the total whenever it gets weights"
  if data_axis_name is not None:
    total = sum_over_data(total, data_axis_name)
  return total, rows


OUTPUTS = ("loss", "sum_count", "combined")


def outputs(output: str, loss: Array, rows: Any, mask: Array, **reduce_kwargs):
  """What a public loss returns, from :func:`reduced_loss`'s ``(loss, rows)``.

  ``"loss"``: the loss; ``"sum_count"``: ``(sum, number of counted tokens)`` (the loss must be
  the ``"sum"`` reduction); ``"combined"``: ``(loss, cross_entropy, divergence)``, the rows'
  two terms reduced like the loss (``reduce_kwargs`` as in :func:`reduce`).
  """
  if output == "sum_count":
    return loss, jnp.sum(mask).astype(jnp.float32)
  if output == "loss":
    return loss
  cross_entropy, divergence = (reduce(x, mask, **reduce_kwargs)
                               for x in (rows.cross_entropy, rows.divergence))
  return loss, cross_entropy, divergence


def sum_and_count(values: Array, mask: Array) -> tuple[Array, Array]:
  """``(sum of the counted values, number of counted tokens)`` as float32 scalars."""
  return weighted_total(values, mask.astype(jnp.float32)), jnp.sum(mask).astype(jnp.float32)


def sum_over_data(local_total: Array, data_axis_name: Hashable) -> Array:
  """``psum`` of each device's share of a loss, with the gradient of the global loss.

  Under ``shard_map`` (which tracks the axes a value varies over) ``psum`` is differentiated
  exactly. Under ``pmap`` or ``shard_map(check_vma=False)`` the transpose of ``psum`` is another
  ``psum``, which would scale the gradient by the number of devices; there the value is the
  global sum and the gradient that of this device's share, the usual data-parallel convention
  (``psum`` the parameter gradients afterwards).
  """
  axes = set(data_axis_name) if isinstance(data_axis_name, tuple) else {data_axis_name}
  if axes <= varying_axes(jax.typeof(local_total)):
    return lax.psum(local_total, data_axis_name)
  others = lax.stop_gradient(lax.psum(local_total, data_axis_name) - local_total)
  return local_total + others
