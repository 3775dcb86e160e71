"""Per-token divergences of materialised logits, blocked over tokens, with an analytic gradient.

This is the engine behind :func:`kdjax.distill_loss`, :func:`kdjax.kd_loss` and the per-token
divergence functions. It flattens the token axes, walks over blocks of tokens, and per block:

1. upcasts both logits to float32 and divides them by the temperature;
2. computes the row statistics ``lse(s)``, ``lse(t)`` (and, for the optional hard-label cross
   entropy, ``lse`` of the unscaled logits);
3. sums the divergence's elementwise terms (``divergences.py``) over the vocabulary.

The gradient is a ``jax.custom_vjp``: the forward pass keeps only per-token statistics
(``[tokens]`` float32 vectors) besides the inputs themselves, and the backward pass recomputes
each block's probabilities and writes the gradient directly in the logits' dtype. No
``[tokens, vocab]`` float32 array is ever live; a call that is not differentiated runs only the
value loop. ``axis_name`` turns the same code into the vocabulary-parallel version: every
reduction over the vocabulary is followed by a ``pmax``/``psum`` over that mesh axis.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kdjax._src import blocking
from kdjax._src import divergences as div

Array = jax.Array


class Config(NamedTuple):
  """Everything static about one per-token computation (hashable)."""

  divergence: str
  static_hp: tuple[tuple[str, float], ...]  # hyperparameters known at trace time.
  token_block: int | None
  with_cross_entropy: bool
  axis_name: Hashable | None = None  # vocabulary-parallel mesh axis, inside shard_map.


class Reducers(NamedTuple):
  max: div.Reducer
  sum: div.Reducer


def reducers(axis_name: Hashable | None) -> Reducers:
  """Reductions over the (possibly sharded) vocabulary axis."""
  if axis_name is None:
    return Reducers(lambda x: jnp.max(x, axis=-1), lambda x: jnp.sum(x, axis=-1))
  return Reducers(
      lambda x: lax.pmax(jnp.max(x, axis=-1), axis_name),
      lambda x: lax.psum(jnp.sum(x, axis=-1), axis_name),
  )


def _vocab_offset(axis_name: Hashable | None, local_vocab: int) -> Array | int:
  if axis_name is None:
    return 0
  return lax.axis_index(axis_name) * local_vocab


def _hyperparameters(config: Config, dynamic_hp: Mapping[str, Array]):
  hp = dict(config.static_hp)
  hp.update(dynamic_hp)
  return hp


def _label_logit(raw_logits: Array, labels: Array, offset, reduce: Reducers) -> Array:
  """``raw_logits[label]`` per row, gathering only from the shard that holds the label."""
  local = labels - offset
  in_shard = (local >= 0) & (local < raw_logits.shape[-1])
  picked = jnp.take_along_axis(
      raw_logits, jnp.clip(local, 0, raw_logits.shape[-1] - 1)[:, None], axis=-1)[:, 0]
  picked = jnp.where(in_shard, picked, 0.0)
  return reduce.sum(picked[:, None])


def _block_forward(config: Config, hp, logits, teacher_logits, labels):
  """Per-token value, statistics for the backward pass, and the optional cross entropy."""
  reduce = reducers(config.axis_name)
  spec = div.get_divergence(config.divergence)
  temperature = hp["temperature"]
  raw = logits.astype(jnp.float32)
  s = raw / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  student_lse = div.logsumexp(s, reduce_max=reduce.max, reduce_sum=reduce.sum)
  teacher_lse = div.logsumexp(t, reduce_max=reduce.max, reduce_sum=reduce.sum)
  terms, _ = div.pointwise_terms(spec, s, t, student_lse, teacher_lse, hp)
  value = reduce.sum(terms.value)
  sum_dlog_q = reduce.sum(terms.dlog_q)
  if config.with_cross_entropy:
    raw_lse = div.logsumexp(raw, reduce_max=reduce.max, reduce_sum=reduce.sum)
    offset = _vocab_offset(config.axis_name, raw.shape[-1])
    cross_entropy = raw_lse - _label_logit(raw, labels, offset, reduce)
  else:
    raw_lse = cross_entropy = jnp.zeros_like(value)
  return value, cross_entropy, student_lse, teacher_lse, sum_dlog_q, raw_lse


def _block_backward(config: Config, hp, logits, teacher_logits, labels,
                    student_lse, teacher_lse, sum_dlog_q, raw_lse, value_ct, ce_ct):
  spec = div.get_divergence(config.divergence)
  temperature = hp["temperature"]
  raw = logits.astype(jnp.float32)
  s = raw / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  terms, q = div.pointwise_terms(spec, s, t, student_lse, teacher_lse, hp)
  grad = div.student_grad(terms, q, sum_dlog_q) * (value_ct / temperature)[:, None]
  if config.with_cross_entropy:
    softmax = jnp.exp(raw - raw_lse[:, None])
    offset = _vocab_offset(config.axis_name, raw.shape[-1])
    vocab_ids = offset + lax.broadcasted_iota(labels.dtype, raw.shape, 1)
    onehot = (vocab_ids == labels[:, None]).astype(jnp.float32)
    grad = grad + (softmax - onehot) * ce_ct[:, None]
  return (grad.astype(logits.dtype),)


def _forward_loop(config: Config, hp, logits, teacher_logits, labels):
  num_tokens, vocab = logits.shape
  block = config.token_block or blocking.default_token_block(num_tokens, vocab)
  vector = jnp.zeros((num_tokens,), jnp.float32)
  return blocking.map_token_blocks(
      functools.partial(_block_forward, config, hp),
      (logits, teacher_logits, labels), (vector,) * 6, block=block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config: Config, logits, teacher_logits, labels, dynamic_hp):
  hp = _hyperparameters(config, dynamic_hp)
  value, cross_entropy, *_ = _forward_loop(config, hp, logits, teacher_logits, labels)
  return value, cross_entropy


def _per_token_fwd(config: Config, logits, teacher_logits, labels, dynamic_hp):
  hp = _hyperparameters(config, dynamic_hp)
  value, cross_entropy, *stats = _forward_loop(config, hp, logits, teacher_logits, labels)
  return (value, cross_entropy), (logits, teacher_logits, labels, dynamic_hp, tuple(stats))


def _per_token_bwd(config: Config, residuals, cotangents):
  logits, teacher_logits, labels, dynamic_hp, stats = residuals
  value_ct, ce_ct = cotangents
  hp = _hyperparameters(config, dynamic_hp)
  num_tokens, vocab = logits.shape
  block = config.token_block or blocking.default_token_block(num_tokens, vocab)
  (grad,) = blocking.map_token_blocks(
      functools.partial(_block_backward, config, hp),
      (logits, teacher_logits, labels, *stats, value_ct, ce_ct),
      (jnp.zeros_like(logits),), block=block)
  # The teacher is a constant of the loss: no gradient flows to it (nor to labels and
  # hyperparameters such as a scheduled temperature).
  hp_ct = jax.tree.map(jnp.zeros_like, dynamic_hp)
  return grad, None, None, hp_ct


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def per_token(
    logits: Array,
    teacher_logits: Array,
    labels: Array | None,
    *,
    divergence: str,
    hyperparameters: Mapping[str, float | Array],
    token_block: int | None = None,
    axis_name: Hashable | None = None,
) -> tuple[Array, Array | None]:
  """Per-token divergence (and hard-label cross entropy when ``labels`` is given).

  Inputs must already be validated. ``logits`` and ``teacher_logits`` are ``[..., vocab]``;
  returns float32 arrays of shape ``logits.shape[:-1]``. Python-number hyperparameters are
  baked into the trace; array ones (for example a scheduled temperature) stay traced.
  """
  token_shape = logits.shape[:-1]
  vocab = logits.shape[-1]
  static_hp = tuple(sorted(
      (k, float(v)) for k, v in hyperparameters.items() if isinstance(v, (int, float))))
  dynamic_hp = {
      k: jnp.asarray(v, jnp.float32)
      for k, v in hyperparameters.items() if not isinstance(v, (int, float))}
  config = Config(divergence, static_hp, token_block, labels is not None, axis_name)
  flat_labels = (jnp.zeros(token_shape, jnp.int32) if labels is None else labels)
  value, cross_entropy = _per_token(
      config,
      logits.reshape(-1, vocab),
      lax.stop_gradient(teacher_logits).reshape(-1, teacher_logits.shape[-1]),
      flat_labels.reshape(-1).astype(jnp.int32),
      dynamic_hp,
  )
  value = value.reshape(token_shape)
  if labels is None:
    return value, None
  return value, cross_entropy.reshape(token_shape)
