"""Fused linear-head distillation: the loss from hidden states, never materialising the logits.

The student and teacher logits are ``hidden @ kernel (+ bias)``, optionally multiplied by a
``logit_scale`` (Cohere) and soft-capped as ``softcap * tanh(x / softcap)`` (Gemma), then divided
by the temperature. This module computes them one block of tokens at a time (and, with
``vocab_block``, one block of the vocabulary at a time with an online log-sum-exp), feeds each
block to the shared divergence definitions in ``divergences.py`` -- the same ``logsumexp``,
``pointwise_terms`` and ``student_grad`` that the dense path uses -- and keeps only per-token
statistics between blocks. Peak temporaries are ``O(token_block * vocab)`` (or
``O(token_block * vocab_block)``) instead of ``O(tokens * vocab)``.

Gradients come from a ``jax.custom_vjp`` with an analytic backward. With the chain rule through
the logit transform,

.. math::

    \\frac{\\partial D}{\\partial z} = \\frac{\\partial D}{\\partial s}\\,
    \\frac{\\text{logit\\_scale}\\,(1 - \\tanh^2(x / c))}{T},
    \\qquad x = \\text{logit\\_scale} \\cdot z,\\quad z = h W + b,

and ``dh = (dD/dz) W^T``, ``dW = h^T (dD/dz)``, ``db = sum_tokens dD/dz``, accumulated over
blocks. Matmuls run in the inputs' dtype with float32 accumulation; the softmax math is float32.
The teacher is a constant: no gradient flows to its hidden states, kernel or bias.

Two gradient strategies, chosen by the reduction:

* ``mean``/``sum``/``sequence_mean``: the reduced loss is a weighted sum of per-token values
  with weights that depend only on the mask (``reductions.py``). The forward pass of the
  ``custom_vjp`` then computes each block's gradient right after its value, while the block's
  logits are at hand, and the backward pass only scales the result by the scalar cotangent:
  four matmuls in all, as many as the materialised computation.
* ``none``: the per-token cotangent is unknown in the forward pass, so the forward pass keeps
  only the inputs and the backward pass recomputes each block's logits (six matmuls).

Vocabulary parallelism: with ``axis_name`` (inside ``shard_map``, kernels and biases sharded
along the vocabulary) every reduction over the vocabulary is followed by a ``pmax``/``psum``
(``dense.reducers``) and the partial ``d(student_hidden)`` is ``psum``-ed; see
:func:`per_token` for the contract.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from kdjax._src import checks, dense, losses, reductions
from kdjax._src import divergences as div

Array = jax.Array

# Tokens per block by default, chosen by measurement (benchmarks/bench_fused.py, CPU, float32,
# d=512, value and gradient): the kernel is re-read, and the float32 kernel gradient [d, vocab]
# accumulated, once per token block, so blocks must be large enough to amortise that (at 2048
# tokens and vocab 128000: 96-token blocks ran 1.32x the materialised time, 192-token blocks
# 0.98x, 384-token blocks 0.97x), and small enough that the five [block, vocab] float32
# temporaries of a block (two logits, two exponentials, one gradient) stay small (at 4096
# tokens and vocab 32000: 0.078x the materialised version's temporaries with 192-token
# blocks, 0.104x with 256). At most DEFAULT_TOKEN_BLOCK tokens and about
# _DEFAULT_BLOCK_ELEMENTS elements (96 MiB of float32) per [block, vocab] array: 192 tokens up
# to vocab 131072, 96 at vocab 262144.
DEFAULT_TOKEN_BLOCK = 192
_DEFAULT_BLOCK_ELEMENTS = 192 * 131072


_SIDES = ("student", "teacher")


class Config(NamedTuple):
  """Everything static about one fused computation (hashable)."""

  divergence: str
  static_hp: tuple[tuple[str, float], ...]  # hyperparameters known at trace time.
  token_block: int
  vocab_block: int | None
  temperature_squared: bool = False
  axis_name: Hashable | None = None  # vocabulary-parallel mesh axis, inside shard_map.


def default_token_block(num_tokens: int, vocab_size: int) -> int:
  by_memory = max(8, _DEFAULT_BLOCK_ELEMENTS // max(vocab_size, 1) // 8 * 8)
  return max(1, min(num_tokens, DEFAULT_TOKEN_BLOCK, by_memory))


# ----------------------------------------------------------------------------------------------
# One block: logits, row statistics, values and gradients.
# ----------------------------------------------------------------------------------------------


class _Side(NamedTuple):
  """One model's block of scaled logits ``s = softcap(scale * (h W + b)) / T``."""

  scaled: Array  # float32 [tokens, vocab columns]
  tanh: Array | None  # tanh(x / softcap), kept for the chain rule; None without softcap.


def _logits(hp, side: str, hidden: Array, kernel: Array, bias: Array | None,
            valid_columns: Array | None) -> _Side:
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  scale = hp.get(f"{side}_logit_scale")
  if scale is not None:
    logits = logits * scale
  softcap = hp.get(f"{side}_softcap")
  tanh = None
  if softcap is not None:
    tanh = jnp.tanh(logits / softcap)
    logits = softcap * tanh
  scaled = logits / hp["temperature"]
  if valid_columns is not None:
    # Columns already covered by an earlier (overlapping) vocabulary block carry no mass here.
    scaled = jnp.where(valid_columns, scaled, -jnp.inf)
  return _Side(scaled, tanh)


def _logit_grad(hp, student: _Side, grad_scaled: Array) -> Array:
  """d/dz from d/ds, through temperature, softcap and logit scale (``z = h W + b``)."""
  grad = grad_scaled / hp["temperature"]
  if student.tanh is not None:
    grad = grad * (1.0 - jnp.square(student.tanh))
  scale = hp.get("student_logit_scale")
  if scale is not None:
    grad = grad * scale
  return grad


def _column_mask(start, width: int, first_new_column) -> Array:
  return (start + lax.broadcasted_iota(jnp.int32, (1, width), 1)) >= first_new_column


class _Params(NamedTuple):
  student_kernel: Array
  student_bias: Array | None
  teacher_kernel: Array
  teacher_bias: Array | None


def _vocab_slice(params: _Params, start, width: int) -> _Params:
  def cut(x, axis):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, width, axis=axis)
  return _Params(cut(params.student_kernel, 1), cut(params.student_bias, 0),
                 cut(params.teacher_kernel, 1), cut(params.teacher_bias, 0))


def _both_logits(hp, student_hidden, teacher_hidden, params: _Params, valid_columns=None):
  student = _logits(hp, "student", student_hidden, params.student_kernel, params.student_bias,
                    valid_columns)
  teacher = _logits(hp, "teacher", teacher_hidden, params.teacher_kernel, params.teacher_bias,
                    valid_columns)
  return student, teacher


def _zeros(shape, *like: Array | None) -> Array:
  """float32 zeros that vary over the same ``shard_map`` axes as ``like`` (loop carries must
  match the type of what the loop body makes of them); plain zeros outside ``shard_map``."""
  out = jnp.zeros(shape, jnp.float32)
  for ref in like:
    if ref is not None:
      out = out + jnp.zeros_like(ref, dtype=jnp.float32, shape=())
  return out


def _lse_or_empty(x: Array) -> Array:
  """Local row log-sum-exp, ``-inf`` for a row with no mass (so partial results combine)."""
  lse = div.logsumexp(x)
  return jnp.where(jnp.max(x, axis=-1) > -jnp.inf, lse, -jnp.inf)


class _Stats(NamedTuple):
  student_lse: Array
  teacher_lse: Array


def _terms(config: Config, hp, student: _Side, teacher: _Side, stats: _Stats):
  """Terms of a vocabulary block from row statistics computed beforehand (online)."""
  spec = div.get_divergence(config.divergence)
  return div.pointwise_terms(
      spec, student.scaled, teacher.scaled, stats.student_lse, stats.teacher_lse, hp)


def _value_scale(config: Config, hp):
  return jnp.square(hp["temperature"]) if config.temperature_squared else 1.0


class _BlockGrads(NamedTuple):
  hidden: Array  # float32 [tokens, d_student], partial over a vocabulary shard.
  kernel: Array  # float32 [d_student, vocab columns]
  bias: Array | None  # float32 [vocab columns]


def _param_grads(hidden, kernel, with_bias: bool, grad_logits: Array) -> _BlockGrads:
  """The three matmul-shaped gradients of ``z = h W + b`` for one block."""
  compute_dtype = jnp.result_type(hidden.dtype, kernel.dtype)
  grad_logits_c = grad_logits.astype(compute_dtype)
  d_hidden = lax.dot_general(
      grad_logits_c, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  d_kernel = lax.dot_general(
      hidden, grad_logits_c, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  d_bias = jnp.sum(grad_logits, axis=0) if with_bias else None
  return _BlockGrads(d_hidden, d_kernel, d_bias)


def _token_block_full_vocab(config: Config, hp, with_grad: bool, student_hidden, teacher_hidden,
                            weights, params: _Params):
  """One token block over the whole (local) vocabulary at once, exactly as ``dense._block``.

  Returns the per-token values and, with ``with_grad``, the gradients of
  ``sum(weights * values)``.
  """
  reduce = dense.reducers(config.axis_name)
  spec = div.get_divergence(config.divergence)
  student_side, teacher_side = _both_logits(hp, student_hidden, teacher_hidden, params)
  _, student, student_nonempty = div.log_softmax(
      student_side.scaled, reduce_max=reduce.max, reduce_sum=reduce.sum)
  _, teacher, teacher_nonempty = div.log_softmax(
      teacher_side.scaled, reduce_max=reduce.max, reduce_sum=reduce.sum)
  nonempty = student_nonempty & teacher_nonempty  # Empty rows contribute 0 (conventions).
  terms = spec.terms(teacher, student, hp)
  value = jnp.where(nonempty, _value_scale(config, hp) * reduce.sum(terms.value), 0.0)
  if not with_grad:
    return value, None
  grad_scaled = div.student_grad(terms, student.prob, reduce.sum(terms.dlog_q))
  row_weights = jnp.where(nonempty, weights * _value_scale(config, hp), 0.0)
  grad_logits = _logit_grad(hp, student_side, grad_scaled * row_weights[:, None])
  return value, _param_grads(student_hidden, params.student_kernel,
                             params.student_bias is not None, grad_logits)


def _token_block_vocab_blocks(config: Config, hp, with_grad: bool, student_hidden,
                              teacher_hidden, weights, params: _Params):
  """One token block, walking the (local) vocabulary in blocks of ``config.vocab_block``.

  Pass 1 builds the row log-sum-exps online; pass 2 sums the divergence terms and ``dlog_q``;
  pass 3 (gradients only) recomputes each vocabulary block and accumulates its gradients. When
  ``vocab_block`` does not divide the vocabulary, the last block starts at ``vocab - block`` and
  its columns seen before are masked to ``-inf``, which contributes exactly 0 to every sum.
  """
  reduce = dense.reducers(config.axis_name)
  vocab = params.student_kernel.shape[1]
  block = min(config.vocab_block, vocab)
  num_blocks = -(-vocab // block)
  num_tokens = student_hidden.shape[0]

  def block_logits(j):
    start = jnp.minimum(j * block, vocab - block)
    valid = _column_mask(start, block, j * block)
    sliced = _vocab_slice(params, start, block)
    student, teacher = _both_logits(hp, student_hidden, teacher_hidden, sliced, valid)
    return start, sliced, student, teacher

  def lse_pass(j, carry):
    _, _, student, teacher = block_logits(j)
    return tuple(
        _lse_or_empty(jnp.stack([acc, _lse_or_empty(side.scaled)], axis=-1))
        for acc, side in zip(carry, (student, teacher), strict=True))

  empty = _zeros((num_tokens,), student_hidden, teacher_hidden, *params) - jnp.inf
  local_lse = lax.fori_loop(0, num_blocks, lse_pass, (empty, empty))
  # Combine the shards' partial log-sum-exps; a row with no mass anywhere gets 0 as in
  # ``div.logsumexp``.
  stats = _Stats(*(
      div.logsumexp(x[:, None], reduce_max=reduce.max, reduce_sum=reduce.sum)
      for x in local_lse))
  nonempty = (reduce.max(local_lse[0][:, None]) > -jnp.inf) & (
      reduce.max(local_lse[1][:, None]) > -jnp.inf)

  def terms_pass(j, carry):
    _, _, student, teacher = block_logits(j)
    terms, _ = _terms(config, hp, student, teacher, stats)
    return carry[0] + jnp.sum(terms.value, axis=-1), carry[1] + jnp.sum(terms.dlog_q, axis=-1)

  zeros = _zeros((num_tokens,), student_hidden, teacher_hidden, *params)
  value_sum, dlog_q_sum = lax.fori_loop(0, num_blocks, terms_pass, (zeros, zeros))
  value = jnp.where(nonempty, _value_scale(config, hp) * reduce.sum(value_sum[:, None]), 0.0)
  if not with_grad:
    return value, None
  dlog_q_sum = reduce.sum(dlog_q_sum[:, None])
  row_weights = jnp.where(nonempty, weights * _value_scale(config, hp), 0.0)[:, None]
  with_bias = params.student_bias is not None

  def grad_pass(j, grads: _BlockGrads):
    start, sliced, student, teacher = block_logits(j)
    terms, q = _terms(config, hp, student, teacher, stats)
    grad_logits = _logit_grad(hp, student, div.student_grad(terms, q, dlog_q_sum) * row_weights)
    block_grads = _param_grads(student_hidden, sliced.student_kernel, with_bias, grad_logits)
    # Masked (already seen) columns have a zero gradient, so adding is exact.
    d_kernel = lax.dynamic_update_slice_in_dim(
        grads.kernel,
        lax.dynamic_slice_in_dim(grads.kernel, start, block, axis=1) + block_grads.kernel,
        start, axis=1)
    d_bias = None
    if with_bias:
      d_bias = lax.dynamic_update_slice_in_dim(
          grads.bias,
          lax.dynamic_slice_in_dim(grads.bias, start, block, axis=0) + block_grads.bias,
          start, axis=0)
    return _BlockGrads(grads.hidden + block_grads.hidden, d_kernel, d_bias)

  like = (student_hidden, teacher_hidden, *params, weights)
  init = _BlockGrads(
      _zeros((num_tokens, student_hidden.shape[1]), *like),
      _zeros(params.student_kernel.shape, *like),
      _zeros((vocab,), *like) if with_bias else None)
  return value, lax.fori_loop(0, num_blocks, grad_pass, init)


# ----------------------------------------------------------------------------------------------
# The loop over token blocks.
# ----------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
  student_hidden: Array  # [tokens, d_student]
  teacher_hidden: Array  # [tokens, d_teacher]
  params: _Params


def _loop(config: Config, dynamic_hp, inputs: _Inputs, weights: Array | None):
  """Per-token values and, when ``weights`` is given, the gradients of ``sum(weights * values)``
  with respect to the student's hidden states, kernel and bias (in their dtypes)."""
  hp = dense.hyperparameters(config, dynamic_hp)
  with_grad = weights is not None
  block_fn = (_token_block_full_vocab if config.vocab_block is None
              else _token_block_vocab_blocks)
  params = inputs.params
  num_tokens, d_student = inputs.student_hidden.shape
  block = max(1, min(config.token_block, num_tokens))
  num_blocks = -(-num_tokens // block) if num_tokens else 0
  with_bias = params.student_bias is not None

  if not with_grad:
    weights = jnp.zeros((num_tokens,), jnp.float32)
  # Per-token values are complete (reduced over the vocabulary shards); gradients are partial
  # sums over this shard's vocabulary columns until the final psum.
  values = _zeros((num_tokens,), inputs.student_hidden, inputs.teacher_hidden)
  like = (inputs.student_hidden, inputs.teacher_hidden, *params, weights)
  # Sharded, the partial hidden-state gradients stay float32 until they are summed.
  d_hidden_dtype = inputs.student_hidden.dtype if config.axis_name is None else jnp.float32
  d_hidden = _zeros((num_tokens, d_student), *like).astype(d_hidden_dtype)
  d_kernel = _zeros(params.student_kernel.shape, *like)
  d_bias = _zeros(params.student_kernel.shape[1:], *like) if with_bias else None

  def body(i, carry):
    values, d_hidden, d_kernel, d_bias = carry
    # The last block may overlap the one before it (no padding copy): its rows seen before are
    # recomputed with identical values and given weight 0 so no gradient is counted twice.
    start = jnp.minimum(i * block, num_tokens - block)
    rows = lambda x: lax.dynamic_slice_in_dim(x, start, block, axis=0)  # noqa: E731
    new_rows = start + jnp.arange(block) >= i * block
    value, grads = block_fn(
        config, hp, with_grad, rows(inputs.student_hidden), rows(inputs.teacher_hidden),
        jnp.where(new_rows, rows(weights), 0.0), params)
    values = lax.dynamic_update_slice_in_dim(values, value, start, axis=0)
    if with_grad:
      old_rows = rows(d_hidden)
      d_hidden = lax.dynamic_update_slice_in_dim(
          d_hidden, jnp.where(new_rows[:, None], grads.hidden.astype(d_hidden.dtype), old_rows),
          start, axis=0)
      d_kernel = d_kernel + grads.kernel
      if with_bias:
        d_bias = d_bias + grads.bias
    return values, d_hidden, d_kernel, d_bias

  carry = (values, d_hidden, d_kernel, d_bias)
  if num_blocks:
    carry = lax.fori_loop(0, num_blocks, body, carry)
  values, d_hidden, d_kernel, d_bias = carry
  if not with_grad:
    return values, None
  if config.axis_name is not None:
    # Each shard saw only its vocabulary columns: sum the partial hidden-state gradients.
    d_hidden = lax.psum(d_hidden, config.axis_name)
  return values, _BlockGrads(
      d_hidden.astype(inputs.student_hidden.dtype),
      d_kernel.astype(params.student_kernel.dtype),
      None if d_bias is None else d_bias.astype(params.student_bias.dtype))


def _zeros_like_tree(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _scale_grads(grads: _BlockGrads, scale: Array) -> _BlockGrads:
  return _BlockGrads(*(
      None if g is None else (g.astype(jnp.float32) * scale).astype(g.dtype) for g in grads))


# Weighted sum: value and gradient in one pass (the forward), the backward only scales.


def _weighted_total(weights, values):
  return jnp.sum(jnp.where(weights != 0, weights * values, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted(config: Config, weights, inputs: _Inputs, dynamic_hp):
  values, _ = _loop(config, dynamic_hp, inputs, None)
  return _weighted_total(weights, values), values


def _weighted_fwd(config: Config, weights, inputs: _Inputs, dynamic_hp):
  values, grads = _loop(config, dynamic_hp, inputs, weights)
  return (_weighted_total(weights, values), values), (grads, weights, inputs, dynamic_hp)


def _student_cotangents(inputs: _Inputs, grads: _BlockGrads) -> _Inputs:
  # The teacher is a constant of the loss: no gradient flows to it.
  params = inputs.params
  return _Inputs(
      grads.hidden, _zeros_like_tree(inputs.teacher_hidden),
      _Params(grads.kernel, grads.bias, _zeros_like_tree(params.teacher_kernel),
              _zeros_like_tree(params.teacher_bias)))


def _weighted_bwd(config: Config, residuals, cotangents):
  grads, weights, inputs, dynamic_hp = residuals
  # The per-token values are returned under stop_gradient; only the weighted sum is
  # differentiated. Weights (mask-derived) and hyperparameters get no gradient here.
  sum_ct = cotangents[0]
  return (jnp.zeros_like(weights), _student_cotangents(inputs, _scale_grads(grads, sum_ct)),
          _zeros_like_tree(dynamic_hp))


_weighted.defvjp(_weighted_fwd, _weighted_bwd)


# Per-token values with an arbitrary cotangent: the backward recomputes the logits.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config: Config, inputs: _Inputs, dynamic_hp):
  return _loop(config, dynamic_hp, inputs, None)[0]


def _per_token_fwd(config: Config, inputs: _Inputs, dynamic_hp):
  return _loop(config, dynamic_hp, inputs, None)[0], (inputs, dynamic_hp)


def _per_token_bwd(config: Config, residuals, values_ct):
  inputs, dynamic_hp = residuals
  _, grads = _loop(config, dynamic_hp, inputs, values_ct.astype(jnp.float32))
  return _student_cotangents(inputs, grads), _zeros_like_tree(dynamic_hp)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def _split_hp(hp: Mapping[str, Any]):
  static = tuple(sorted((k, float(v)) for k, v in hp.items() if isinstance(v, (int, float))))
  dynamic = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()
             if v is not None and not isinstance(v, (int, float))}
  return static, dynamic


def per_token(
    student_hidden: Array,
    student_kernel: Array,
    teacher_hidden: Array,
    teacher_kernel: Array,
    student_bias: Array | None = None,
    teacher_bias: Array | None = None,
    *,
    divergence: str,
    hyperparameters: Mapping[str, Any],
    temperature_squared: bool = False,
    token_block: int | None = None,
    vocab_block: int | None = None,
    weights: Array | None = None,
    axis_name: Hashable | None = None,
):
  """Fused per-token divergence from hidden states (internal; inputs must be validated).

  Args:
    student_hidden: ``[tokens..., d_student]``; any float dtype.
    student_kernel: ``[d_student, vocab]`` (``flax.nnx.Linear`` layout). With ``axis_name``,
      this device's contiguous vocabulary slice ``[d_student, vocab / n]`` (shard ``i`` holds
      columns ``[i * vocab / n, (i + 1) * vocab / n)``).
    teacher_hidden: ``[tokens..., d_teacher]`` with the same token shape.
    teacher_kernel: ``[d_teacher, vocab]`` (sliced like ``student_kernel``).
    student_bias, teacher_bias: optional ``[vocab]`` (sliced like the kernels).
    divergence: a name from ``divergences.DIVERGENCES``.
    hyperparameters: ``temperature`` and what the divergence reads (``beta``/``alpha``), plus
      optional ``student_logit_scale``, ``teacher_logit_scale``, ``student_softcap``,
      ``teacher_softcap`` (absent or None: not applied). Python numbers are baked into the
      trace; arrays stay traced (no gradient flows to them).
    temperature_squared: multiply values (and gradients) by ``T**2``.
    token_block: tokens per block (default :func:`default_token_block`).
    vocab_block: vocabulary columns per block (of the local slice); None: the whole slice.
    weights: None, or float32 ``[tokens...]`` per-token weights that do not depend on the
      values (for example ``mask / count``).
    axis_name: the mesh axis the vocabulary is sharded over, inside ``shard_map``. Every
      vocabulary reduction is followed by ``pmax``/``psum`` over it and the gradient with
      respect to ``student_hidden`` is ``psum``-ed, so it is the full gradient on every device
      (hidden states replicated over the axis); kernel and bias gradients stay local.

  Returns:
    ``weights is None``: float32 per-token values ``[tokens...]``, differentiable (the backward
    recomputes the logits block by block). Otherwise ``(weighted_sum, values)``: the float32
    scalar ``sum(weights * values)``, differentiable with gradients computed in the forward
    pass, and the per-token values under ``stop_gradient``.
  """
  token_shape = student_hidden.shape[:-1]
  hp = dict(hyperparameters)
  static_hp, dynamic_hp = _split_hp(hp)
  if token_block is None:
    token_block = default_token_block(math.prod(token_shape), student_kernel.shape[1])
  config = Config(divergence, static_hp, int(token_block),
                  None if vocab_block is None else int(vocab_block),
                  bool(temperature_squared), axis_name)
  inputs = _Inputs(
      student_hidden.reshape(-1, student_hidden.shape[-1]),
      lax.stop_gradient(teacher_hidden).reshape(-1, teacher_hidden.shape[-1]),
      _Params(student_kernel, student_bias, lax.stop_gradient(teacher_kernel),
              None if teacher_bias is None else lax.stop_gradient(teacher_bias)))
  if weights is None:
    return _per_token(config, inputs, dynamic_hp).reshape(token_shape)
  total, values = _weighted(config, weights.reshape(-1).astype(jnp.float32), inputs, dynamic_hp)
  return total, lax.stop_gradient(values).reshape(token_shape)


# ----------------------------------------------------------------------------------------------
# The public loss.
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("divergence", "static_hp", "temperature_squared", "ignore_index",
                     "reduction", "token_block", "vocab_block"),
)
def _fused(student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
           teacher_bias, labels, where, normalizer, dynamic_hp, *, divergence, static_hp,
           temperature_squared, ignore_index, reduction, token_block, vocab_block):
  hp = dict(static_hp)
  hp.update(dynamic_hp)
  token_shape = student_hidden.shape[:-1]
  mask = reductions.token_mask(token_shape, labels, where, ignore_index)
  common = dict(divergence=divergence, hyperparameters=hp,
                temperature_squared=temperature_squared, token_block=token_block,
                vocab_block=vocab_block)
  args = (student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
          teacher_bias)
  if reduction == "none":
    values = per_token(*args, **common)
    return reductions.reduce(values, mask, reduction=reduction)

  def reduce(values):
    return reductions.reduce(values, mask, reduction=reduction, normalizer=normalizer)

  # The reductions are linear in the per-token values with mask-only weights: read the weights
  # off reductions.reduce itself, so both share one definition.
  zeros = jnp.zeros(token_shape, jnp.float32)
  (weights,) = jax.linear_transpose(reduce, zeros)(jnp.ones((), jnp.float32))
  weighted, values = per_token(*args, weights=lax.stop_gradient(weights), **common)
  # The value is exactly reductions.reduce of the per-token values; the gradient is that of
  # the weighted sum (identical, the reduction being linear), computed in the forward pass.
  return reduce(values) + (weighted - lax.stop_gradient(weighted))


def _per_model(name: str, value) -> tuple[Any, Any]:
  """``value`` shared by both models, or a ``(student, teacher)`` pair."""
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ValueError(
          f"{name} must be a number, a scalar array or a (student, teacher) pair, got "
          f"{len(value)} values: {value!r}.")
    return tuple(value)
  return value, value


def _positive(name: str, value):
  if value is None:
    return None
  value = checks.scalar(name, value)
  if isinstance(value, float) and not (value > 0 and value < float("inf")):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
  return value


def _check_head(hidden_name, hidden, kernel_name, kernel, bias_name, bias):
  if kernel.ndim != 2:
    raise ValueError(
        f"{kernel_name} must be a [d, vocab] matrix (flax.nnx.Linear layout, [in_features, "
        f"out_features]), got shape {kernel.shape}.")
  if hidden.shape[-1] != kernel.shape[0]:
    hint = ""
    if hidden.shape[-1] == kernel.shape[1]:
      hint = (" It looks transposed: a PyTorch nn.Linear weight is [vocab, d]; pass "
              f"{kernel_name}.T.")
    raise ValueError(
        f"{hidden_name} has width {hidden.shape[-1]} (shape {hidden.shape}) but {kernel_name} "
        f"has shape {kernel.shape}; expected {kernel_name}.shape == ({hidden.shape[-1]}, "
        f"vocab).{hint}")
  if bias is not None:
    if bias.shape != (kernel.shape[1],):
      raise ValueError(
          f"{bias_name} must have shape (vocab,) = ({kernel.shape[1]},) to match "
          f"{kernel_name}.shape={kernel.shape}, got {bias.shape}.")


def fused_linear_distill_loss(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_kernel: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float | ArrayLike = 0.5,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    logit_scale: Any = None,
    softcap: Any = None,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
) -> Array:
  r"""Distillation loss from the models' last hidden states, without materialising the logits.

  Equal to :func:`kdjax.distill_loss` on the logits

  .. math::

      z = \text{softcap} \cdot \tanh\!\Big(\frac{\text{logit\_scale} \cdot
      (h W + b)}{\text{softcap}}\Big)

  of each model (the scale and the cap each optional), but computed one block of tokens (and
  optionally of the vocabulary) at a time, so temporaries are ``O(token_block * vocab)``
  instead of ``O(tokens * vocab)``, with an analytic gradient (``jax.custom_vjp``). Matmuls run
  in the inputs' dtype with float32 accumulation; the softmax math is float32; gradients come
  back in the inputs' dtypes.

  Args:
    student_hidden: student hidden states ``[..., d_student]`` (for example
      ``[batch, seq, d_student]``), the input of the student's output projection.
    student_kernel: student output projection ``[d_student, vocab]``, the ``flax.nnx.Linear``
      layout ``[in_features, out_features]`` (a PyTorch ``nn.Linear`` weight is its transpose).
    teacher_hidden: teacher hidden states ``[..., d_teacher]``, the same token shape;
      ``d_teacher`` may differ from ``d_student``. No gradient flows to the teacher.
    teacher_kernel: teacher output projection ``[d_teacher, vocab]``, the same vocabulary.
    labels: optional integer ids ``[...]``; tokens equal to ``ignore_index`` are excluded.
    divergence, beta, alpha, temperature, temperature_squared: as in
      :func:`kdjax.distill_loss`.
    student_bias: optional student output bias ``[vocab]``; receives a gradient.
    teacher_bias: optional teacher output bias ``[vocab]`` (``-inf`` entries mask padded
      vocabulary entries).
    logit_scale: optional multiplier of the logits (Cohere's ``logit_scale``), ``> 0``: a number
      or scalar array shared by both models, or a ``(student, teacher)`` pair whose entries may
      be None. Applied before the softcap.
    softcap: optional Gemma-style cap ``c > 0``: logits become ``c * tanh(logits / c)``. Shared
      or a ``(student, teacher)`` pair, like ``logit_scale``. Applied before the temperature.
    ignore_index, where, reduction, normalizer: as in :func:`kdjax.distill_loss`.
    token_block: tokens per block (default 192, fewer for vocabularies above 131072 entries:
      96 at 262144). Temporaries are about ``5 * token_block * vocab * 4`` bytes.
    vocab_block: optional vocabulary columns per block. When set, each token block walks the
      vocabulary with an online log-sum-exp, so temporaries are
      ``O(token_block * vocab_block)``; it costs two extra logit matmuls per step.

  Returns:
    A float32 scalar, or per-token values ``student_hidden.shape[:-1]`` for
    ``reduction="none"``.

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> h_s = jax.random.normal(keys[0], (2, 5, 16))  # [batch, seq, d_student]
    >>> w_s = jax.random.normal(keys[1], (16, 100)) / 4  # [d_student, vocab]
    >>> h_t = jax.random.normal(keys[2], (2, 5, 32))  # the teacher is wider
    >>> w_t = jax.random.normal(keys[3], (32, 100)) / 4
    >>> labels = jnp.array([[1, 2, 3, 4, -100], [5, 6, -100, -100, -100]])
    >>> loss, grads = jax.value_and_grad(kdjax.fused_linear_distill_loss, argnums=(0, 1))(
    ...     h_s, w_s, h_t, w_t, labels, softcap=30.0, token_block=4)
    >>> dense = kdjax.distill_loss(
    ...     30.0 * jnp.tanh(h_s @ w_s / 30.0), 30.0 * jnp.tanh(h_t @ w_t / 30.0), labels)
    >>> bool(jnp.allclose(loss, dense, rtol=1e-5)), grads[1].shape
    (True, (16, 100))
  """
  (student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias, teacher_bias,
   labels, where, token_block, vocab_block, hp) = validate(
       student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
       teacher_bias, labels, where=where, reduction=reduction, normalizer=normalizer,
       ignore_index=ignore_index, token_block=token_block, vocab_block=vocab_block,
       divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
       logit_scale=logit_scale, softcap=softcap,
       vocab_mismatch_hint="If the larger vocabulary only adds padding columns, slice the "
       "kernel (and bias) to the shared vocabulary first.")
  token_shape = student_hidden.shape[:-1]
  static_hp, dynamic_hp = _split_hp(hp)
  if token_block is None:
    token_block = default_token_block(math.prod(token_shape), student_kernel.shape[1])
  return _fused(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
      teacher_bias, labels, where, normalizer, dynamic_hp, divergence=divergence,
      static_hp=static_hp, temperature_squared=bool(temperature_squared),
      ignore_index=ignore_index, reduction=reduction, token_block=token_block,
      vocab_block=vocab_block)


def validate(student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
             teacher_bias, labels, *, where, reduction, normalizer, ignore_index, token_block,
             vocab_block, divergence, temperature, beta, alpha, logit_scale, softcap,
             vocab_mismatch_hint):
  """Checks every argument of a fused loss; returns them validated, plus the hyperparameters.

  Shared by :func:`fused_linear_distill_loss` and its vocabulary-parallel variant, which differ
  only in what a vocabulary mismatch means (``vocab_mismatch_hint``).
  """
  student_hidden = checks.float_array("student_hidden", student_hidden)
  student_kernel = checks.float_array("student_kernel", student_kernel)
  teacher_hidden = checks.float_array("teacher_hidden", teacher_hidden)
  teacher_kernel = checks.float_array("teacher_kernel", teacher_kernel)
  student_bias = None if student_bias is None else checks.float_array(
      "student_bias", student_bias)
  teacher_bias = None if teacher_bias is None else checks.float_array(
      "teacher_bias", teacher_bias)
  _check_head("student_hidden", student_hidden, "student_kernel", student_kernel,
              "student_bias", student_bias)
  _check_head("teacher_hidden", teacher_hidden, "teacher_kernel", teacher_kernel,
              "teacher_bias", teacher_bias)
  if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
    raise ValueError(
        "student_hidden and teacher_hidden must have the same token shape (all but the last "
        f"axis), got student_hidden.shape={student_hidden.shape} and "
        f"teacher_hidden.shape={teacher_hidden.shape}.")
  if student_kernel.shape[1] != teacher_kernel.shape[1]:
    raise ValueError(
        f"student_kernel and teacher_kernel have different vocabulary sizes: "
        f"student_kernel.shape={student_kernel.shape}, teacher_kernel.shape="
        f"{teacher_kernel.shape}. {vocab_mismatch_hint}")
  labels, where, token_block = checks.token_arguments(
      student_hidden.shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block)
  vocab_block = checks.positive_int("vocab_block", vocab_block, optional=True)
  hp = losses.hyperparameters(divergence, temperature=temperature, beta=beta, alpha=alpha)
  for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
    for side, side_value in zip(_SIDES, _per_model(name, value), strict=True):
      hp[f"{side}_{name}"] = _positive(name, side_value)
  return (student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
          teacher_bias, labels, where, token_block, vocab_block, hp)
