"""Per-token divergences of materialised logits, blocked over tokens, with an analytic gradient.

This is the engine behind :func:`kdjax.distill_loss`, :func:`kdjax.kd_loss` and the per-token
divergence functions. It flattens the token axes, walks over blocks of tokens, and per block:

1. upcasts both logits to float32 and divides them by the temperature;
2. computes the row statistics ``lse(s)``, ``lse(t)`` (and, for the optional hard-label cross
   entropy, ``lse`` of the unscaled logits);
3. sums the divergence's elementwise terms (``divergences.py``) over the vocabulary.

The gradient is a ``jax.custom_vjp`` computed in the same pass as the values (the block's
probabilities are at hand), in the logits' dtype, and written over the logits block by block
(``blocking.map_token_blocks(overwrite=...)``): in a train step, where the logits are dead after
the loss, their buffer becomes the gradient's. No ``[tokens, vocab]`` float32 array is ever
live; a call that is not differentiated runs only the value loop. ``axis_name`` turns the same
code into the vocabulary-parallel version: every reduction over the vocabulary is followed by a
``pmax``/``psum`` over that mesh axis.
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
  temperature_squared: bool = False
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


def hyperparameters(config, dynamic_hp: Mapping[str, Array]) -> dict:
  """Static (``config.static_hp``) and traced hyperparameters in one dict."""
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


def _block(config: Config, hp, with_grad: bool, logits, teacher_logits, labels):
  """One block of tokens: per-token (value, divergence, cross entropy) and optionally the
  gradient of ``value`` with respect to ``logits`` (in ``logits.dtype``)."""
  reduce = reducers(config.axis_name)
  spec = div.get_divergence(config.divergence)
  temperature = hp["temperature"]
  raw = logits.astype(jnp.float32)
  s = raw / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  _, student, student_nonempty = div.log_softmax(
      s, reduce_max=reduce.max, reduce_sum=reduce.sum)
  _, teacher, teacher_nonempty = div.log_softmax(
      t, reduce_max=reduce.max, reduce_sum=reduce.sum)
  nonempty = student_nonempty & teacher_nonempty  # Empty rows contribute 0 (conventions).
  terms = spec.terms(teacher, student, hp)
  divergence = jnp.where(nonempty, reduce.sum(terms.value), 0.0)
  div_scale = jnp.square(temperature) if config.temperature_squared else 1.0
  if config.with_cross_entropy:
    kd_coef = hp["kd_coef"]
    raw_lse = div.logsumexp(raw, reduce_max=reduce.max, reduce_sum=reduce.sum)
    offset = _vocab_offset(config.axis_name, raw.shape[-1])
    cross_entropy = raw_lse - _label_logit(raw, labels, offset, reduce)
    value = (1.0 - kd_coef) * cross_entropy + kd_coef * div_scale * divergence
  else:
    kd_coef = 1.0
    cross_entropy = jnp.zeros_like(divergence)
    value = div_scale * divergence
  outputs = (value, div_scale * divergence, cross_entropy)
  if not with_grad:
    return outputs
  grad = div.student_grad(terms, student.prob, reduce.sum(terms.dlog_q))
  grad = jnp.where(nonempty[:, None], grad, 0.0) * (kd_coef * div_scale / temperature)
  if config.with_cross_entropy:
    softmax = jnp.exp(raw - raw_lse[:, None])
    vocab_ids = offset + lax.broadcasted_iota(labels.dtype, raw.shape, 1)
    grad = grad + (1.0 - kd_coef) * jnp.where(vocab_ids == labels[:, None], softmax - 1.0, softmax)
  return outputs + (grad.astype(logits.dtype),)


def _loop(config: Config, dynamic_hp, logits, teacher_logits, labels, row_weights, *,
          with_grad: bool):
  """Runs ``_block`` over token blocks; the gradient rows are scaled by ``row_weights``."""
  hp = hyperparameters(config, dynamic_hp)
  num_tokens, vocab = logits.shape
  block = config.token_block or blocking.default_token_block(num_tokens, vocab)

  def block_fn(logits, teacher_logits, labels, row_weights):
    outputs = _block(config, hp, with_grad, logits, teacher_logits, labels)
    if not with_grad:
      return outputs
    *outputs, grad = outputs
    return (*outputs, (grad * row_weights[:, None]).astype(logits.dtype))

  outputs = (jnp.zeros((num_tokens,), jnp.float32),) * 3
  overwrite = {}
  if with_grad:  # The gradient is written over the logits (see map_token_blocks).
    outputs += (logits,)
    overwrite = {0: 3}
  return blocking.map_token_blocks(
      block_fn, (logits, teacher_logits, labels, row_weights), outputs, block=block,
      overwrite=overwrite)


def _hp_zeros(dynamic_hp):
  # The teacher is a constant of the loss: no gradient flows to it, nor to labels, token
  # weights (masks and counts) or hyperparameters such as a scheduled temperature.
  return jax.tree.map(jnp.zeros_like, dynamic_hp)


# Two entry points share the loop above. ``_per_token`` returns per-token values and scales
# the stored gradient by the per-token cotangent in its backward pass. ``_weighted_sum``
# returns ``sum_i w_i value_i`` for token weights known in the forward pass (masks and the
# mean's divisor), so the stored gradient already is the final one: under ``jax.grad`` its
# backward multiplies by the constant 1, which XLA removes. Either way the gradient is
# computed in the same pass as the values (the probabilities are already at hand) and kept
# in the logits' dtype: nothing [tokens, vocab] in float32 is kept.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config: Config, logits, teacher_logits, labels, dynamic_hp):
  ones = jnp.ones(logits.shape[:1], jnp.float32)
  return _loop(config, dynamic_hp, logits, teacher_logits, labels, ones, with_grad=False)


def _per_token_fwd(config: Config, logits, teacher_logits, labels, dynamic_hp):
  ones = jnp.ones(logits.shape[:1], jnp.float32)
  *outputs, grad = _loop(
      config, dynamic_hp, logits, teacher_logits, labels, ones, with_grad=True)
  return tuple(outputs), (grad, dynamic_hp)


def _per_token_bwd(config: Config, residuals, cotangents):
  grad, dynamic_hp = residuals
  value_ct = cotangents[0]  # The other two outputs are returned under stop_gradient.
  return blocking.scale_rows(grad, value_ct), None, None, _hp_zeros(dynamic_hp)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def _weighted_total(value, row_weights):
  return jnp.sum(jnp.where(row_weights != 0, row_weights * value, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted_sum(config: Config, logits, teacher_logits, labels, row_weights, dynamic_hp):
  outputs = _loop(
      config, dynamic_hp, logits, teacher_logits, labels, row_weights, with_grad=False)
  return (_weighted_total(outputs[0], row_weights), *outputs)


def _weighted_sum_fwd(config: Config, logits, teacher_logits, labels, row_weights, dynamic_hp):
  *outputs, grad = _loop(
      config, dynamic_hp, logits, teacher_logits, labels, row_weights, with_grad=True)
  return (_weighted_total(outputs[0], row_weights), *outputs), (grad, dynamic_hp)


def _weighted_sum_bwd(config: Config, residuals, cotangents):
  grad, dynamic_hp = residuals
  total_ct = cotangents[0]  # The per-token outputs are returned under stop_gradient.
  grad = grad * total_ct.astype(grad.dtype)
  return grad, None, None, None, _hp_zeros(dynamic_hp)


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def _prepare(logits, teacher_logits, labels, *, divergence, hyperparameters,
             temperature_squared, kd_coef, token_block, axis_name):
  token_shape = logits.shape[:-1]
  vocab = logits.shape[-1]
  with_ce = kd_coef is not None
  hp = dict(hyperparameters)
  if with_ce:
    if labels is None:
      raise ValueError("labels are required for the cross-entropy term (kd_coef is set).")
    hp["kd_coef"] = kd_coef
  static_hp = tuple(sorted((k, float(v)) for k, v in hp.items() if isinstance(v, (int, float))))
  dynamic_hp = {
      k: jnp.asarray(v, jnp.float32) for k, v in hp.items() if not isinstance(v, (int, float))}
  config = Config(divergence, static_hp, token_block, with_ce, bool(temperature_squared),
                  axis_name)
  flat_labels = labels if with_ce else jnp.zeros(token_shape, jnp.int32)
  flat = (
      logits.reshape(-1, vocab),
      lax.stop_gradient(teacher_logits).reshape(-1, teacher_logits.shape[-1]),
      flat_labels.reshape(-1).astype(jnp.int32),
  )
  return config, flat, dynamic_hp, token_shape


def _components(config: Config, outputs, token_shape):
  value, divergence_values, cross_entropy = (x.reshape(token_shape) for x in outputs)
  if not config.with_cross_entropy:
    return value, None
  return value, tuple(lax.stop_gradient(x) for x in (divergence_values, cross_entropy))


def weighted_sum(
    logits: Array,
    teacher_logits: Array,
    labels: Array | None,
    token_weights: Array,
    *,
    divergence: str,
    hyperparameters: Mapping[str, float | Array],
    temperature_squared: bool = False,
    kd_coef: float | Array | None = None,
    token_block: int | None = None,
    axis_name: Hashable | None = None,
) -> tuple[Array, tuple[Array, tuple[Array, Array] | None]]:
  """``sum_i token_weights[i] * value[i]`` of :func:`per_token`'s values, and those values.

  ``token_weights`` (``logits.shape[:-1]``, float32) are constants of the loss -- a mask
  divided by a count, say -- and get no gradient; a token whose weight is 0 contributes 0
  even if its value is not finite. Returns ``(total, (value, components))`` where the per-token
  ``value`` and ``components`` are under ``stop_gradient`` (for logging); see
  :func:`per_token` for their meaning. This is the fastest way to a reduced loss: the gradient
  is complete after the forward pass.
  """
  config, flat, dynamic_hp, token_shape = _prepare(
      logits, teacher_logits, labels, divergence=divergence, hyperparameters=hyperparameters,
      temperature_squared=temperature_squared, kd_coef=kd_coef, token_block=token_block,
      axis_name=axis_name)
  weights = lax.stop_gradient(jnp.asarray(token_weights, jnp.float32)).reshape(-1)
  total, *outputs = _weighted_sum(config, *flat, weights, dynamic_hp)
  value, components = _components(config, outputs, token_shape)
  return total, (lax.stop_gradient(value), components)


def per_token(
    logits: Array,
    teacher_logits: Array,
    labels: Array | None = None,
    *,
    divergence: str,
    hyperparameters: Mapping[str, float | Array],
    temperature_squared: bool = False,
    kd_coef: float | Array | None = None,
    token_block: int | None = None,
    axis_name: Hashable | None = None,
) -> tuple[Array, tuple[Array, Array] | None]:
  """Per-token divergence, or the combined hard-label objective, with an analytic gradient.

  Inputs must already be validated. ``logits`` and ``teacher_logits`` are ``[..., vocab]``
  (inside ``shard_map`` with ``axis_name``: this device's contiguous vocabulary slice).
  Python-number hyperparameters are baked into the trace; array ones (for example a scheduled
  temperature) stay traced.

  Returns ``(value, components)``, float32 arrays of shape ``logits.shape[:-1]``:

  * ``kd_coef is None``: ``value`` is the divergence (times ``T**2`` with
    ``temperature_squared``) and ``components`` is None; ``labels`` is not read.
  * otherwise ``value = (1 - kd_coef) * cross_entropy(logits, labels) + kd_coef * divergence``
    (cross entropy at temperature 1) and ``components = (divergence, cross_entropy)`` for
    logging, under ``stop_gradient``. ``labels`` must be valid ids wherever the value is used.
  """
  config, flat, dynamic_hp, token_shape = _prepare(
      logits, teacher_logits, labels, divergence=divergence, hyperparameters=hyperparameters,
      temperature_squared=temperature_squared, kd_coef=kd_coef, token_block=token_block,
      axis_name=axis_name)
  return _components(config, _per_token(config, *flat, dynamic_hp), token_shape)
