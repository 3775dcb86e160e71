"""Fused linear-head distillation: the loss from hidden states, never materialising the logits.

The student's and teacher's logits are ``hidden @ kernel (+ bias)`` through the optional logit
scale and softcap of ``head.py``. The blocked implementation computes them one block of tokens
at a time (``blocking.map_token_blocks``) and hands each block to the block recipe
(``recipe.py``), exactly as the engine of materialised logits does; with ``vocab_block`` each
token block walks the vocabulary in tiles instead, with the recipe's online log-sum-exp. Only
per-token statistics are kept between blocks: temporaries are ``O(token_block * vocab)`` (or
``O(token_block * vocab_block)``) instead of ``O(tokens * vocab)``.

Gradients come from a ``jax.custom_vjp``: the recipe's ``dD/dx`` per block, the chain rule of
``head.py`` to ``dD/dz``, then ``dh``, ``dW`` and ``db``, the latter two accumulated over token
blocks. The teacher is a constant: no gradient flows to its hidden states, kernel or bias. Two
gradient strategies, chosen by the reduction:

* ``mean``/``sum``/``sequence_mean``: the reduced loss is a weighted sum of per-token values
  with weights that depend only on the mask (``reductions.reduction_weights``). The forward pass
  computes each block's gradient right after its value, while the block's logits are at hand,
  and the backward pass only scales the result by the scalar cotangent: four matmuls in all, as
  many as the materialised computation.
* ``none``: the per-token cotangent is unknown in the forward pass, so the forward pass keeps
  only the inputs and the backward pass recomputes each block's logits (six matmuls).

Vocabulary parallelism: with ``config.axis_name`` (inside ``shard_map``, kernels and biases
sharded along the vocabulary) the recipe reduces every row statistic over the mesh axis and the
partial ``d(student_hidden)`` is ``psum``-ed; kernel and bias gradients stay on their slice.

``implementation="reference"`` materialises both logits with the same head functions and runs
the readable definition on them, differentiated by JAX autodiff.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from kdjax._src import blocking, checks, head, implementations, recipe, reductions, reference
from kdjax._src import config as config_lib
from kdjax._src.config import Config, zero_cotangents
from kdjax._src.head import Grads, Inputs, Params

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# One token block: the recipe over the whole (local) vocabulary, or over vocabulary tiles.
# ----------------------------------------------------------------------------------------------


def _whole_vocab(config: Config, hp, params: Params, with_grad: bool, student_hidden,
                 teacher_hidden, weights):
  student, teacher = head.both_logits(hp, student_hidden, teacher_hidden, params)
  rows, grad = recipe.block(config, hp, student.raw, teacher.raw, weights=weights,
                            reduce=recipe.VocabReduce(config.axis_name), with_grad=with_grad)
  if not with_grad:
    return rows, None
  return rows, head.param_grads(student_hidden, params.student_kernel,
                                params.student_bias is not None,
                                head.logit_grad(hp, student, grad), weights)


def _vocab_tiles(config: Config, hp, params: Params, with_grad: bool, student_hidden,
                 teacher_hidden, weights):
  """The recipe over vocabulary tiles of ``config.vocab_block`` columns, in three passes.

  Pass 1 folds the tiles' row statistics (the online log-sum-exp); pass 2 sums the divergence's
  terms and their derivatives; pass 3 (gradients only) recomputes each tile and accumulates its
  gradients. The ``vocab % vocab_block`` columns left over form one last, smaller tile.
  """
  reduce = recipe.VocabReduce(config.axis_name)
  inv_temperature = recipe.inverse_temperature(hp)
  vocab = params.student_kernel.shape[1]
  width = min(config.vocab_block, vocab)
  num_full, remainder = divmod(vocab, width)

  def over_tiles(step, carry):
    """``carry = step(start, tile_width, carry)`` for every tile."""
    carry = lax.fori_loop(0, num_full, lambda j, c: step(j * width, width, c), carry)
    return step(num_full * width, remainder, carry) if remainder else carry

  def tile_logits(start, tile_width):
    sliced = head.vocab_slice(params, start, tile_width)
    return (sliced, *head.both_logits(hp, student_hidden, teacher_hidden, sliced))

  def stats_step(start, tile_width, carry):
    _, student, teacher = tile_logits(start, tile_width)
    return tuple(recipe.combine(acc, recipe.statistics(side.raw, inv_temperature)[0],
                                inv_temperature)
                 for acc, side in zip(carry, (student, teacher), strict=True))

  like = (student_hidden, teacher_hidden, *params, weights)
  empty = recipe.Stats(blocking.varying_zeros(student_hidden.shape[:1], *like) - jnp.inf,
                       blocking.varying_zeros(student_hidden.shape[:1], *like))
  student_stats, teacher_stats = (recipe.combine_over(s, reduce, inv_temperature)
                                  for s in over_tiles(stats_step, (empty, empty)))

  def tile_terms(start, tile_width):
    sliced, student, teacher = tile_logits(start, tile_width)
    q = recipe.distribution(student.raw, student_stats, inv_temperature)
    p = recipe.distribution(teacher.raw, teacher_stats, inv_temperature)
    return sliced, student, q, recipe.terms(config, hp, p, q)

  def sums_step(start, tile_width, carry):
    *_, terms = tile_terms(start, tile_width)
    return carry[0] + jnp.sum(terms.value, axis=-1), carry[1] + jnp.sum(terms.dlog_q, axis=-1)

  zeros = blocking.varying_zeros(student_hidden.shape[:1], *like)
  value_sum, dlog_q_sum = over_tiles(sums_step, (zeros, zeros))
  sums = recipe.Sums(reduce.sum(value_sum[:, None]), reduce.sum(dlog_q_sum[:, None]))
  rows, scale = recipe.finish(config, hp, student_stats, teacher_stats, sums, weights=weights)
  if not with_grad:
    return rows, None
  with_bias = params.student_bias is not None

  def grad_step(start, tile_width, grads: Grads):
    sliced, student, q, terms = tile_terms(start, tile_width)
    grad = recipe.student_grad(scale, terms.dlog_q, q.prob, sums.dlog_q)
    tile = head.param_grads(student_hidden, sliced.student_kernel, with_bias,
                            head.logit_grad(hp, student, grad), weights)

    def add(total, part, axis):
      return lax.dynamic_update_slice_in_dim(
          total, lax.dynamic_slice_in_dim(total, start, tile_width, axis=axis) + part, start,
          axis=axis)

    return Grads(grads.hidden + tile.hidden, add(grads.kernel, tile.kernel, 1),
                 add(grads.bias, tile.bias, 0) if with_bias else None)

  return rows, over_tiles(grad_step, Grads(
      blocking.varying_zeros(student_hidden.shape[:1] + student_hidden.shape[1:], *like),
      blocking.varying_zeros(params.student_kernel.shape, *like),
      blocking.varying_zeros((vocab,), *like) if with_bias else None))


# ----------------------------------------------------------------------------------------------
# The loop over token blocks and the two custom_vjp entry points.
# ----------------------------------------------------------------------------------------------


def _loop(config: Config, traced, inputs: Inputs, weights: Array | None):
  """Per-token rows and, when ``weights`` is given, the gradients of ``sum(weights * value)``
  with respect to the student's hidden states, kernel and bias (in their dtypes)."""
  hp = config.hyperparameters_with(traced)
  with_grad = weights is not None
  block_fn = _whole_vocab if config.vocab_block is None else _vocab_tiles
  params = inputs.params
  num_tokens = inputs.student_hidden.shape[0]
  with_bias = params.student_bias is not None

  def fn(student_hidden, teacher_hidden, *block_weights):
    rows, grads = block_fn(config, hp, params, with_grad, student_hidden, teacher_hidden,
                           *(block_weights or (None,)))
    if not with_grad:
      return tuple(rows)
    return (*rows, grads.hidden, grads.kernel, *((grads.bias,) if with_bias else ()))

  outputs = (jnp.zeros((num_tokens,), jnp.float32),) * len(recipe.Rows._fields)
  sums = ()
  if with_grad:
    # Sharded, the partial hidden-state gradients stay float32 until they are summed.
    d_hidden_dtype = (inputs.student_hidden.dtype if config.axis_name is None
                      else jnp.float32)
    outputs += (jnp.zeros(inputs.student_hidden.shape, d_hidden_dtype),)
    sums = (jnp.zeros(params.student_kernel.shape, jnp.float32),
            *((jnp.zeros(params.student_bias.shape, jnp.float32),) if with_bias else ()))
  results = blocking.per_platform(
      lambda block: blocking.map_token_blocks(
          fn, (inputs.student_hidden, inputs.teacher_hidden,
               *(() if weights is None else (weights,))),
          outputs, sums=sums, block=block, strided=False, weights=2),
      num_tokens, params.student_kernel.shape[1], cpu=blocking.FUSED,
      accelerator=blocking.FUSED_ACCELERATOR, block=config.token_block)
  rows = recipe.Rows(*results[:3])
  if not with_grad:
    return rows, None
  d_hidden, d_kernel, *d_bias = results[3:]
  if config.axis_name is not None:
    # Each shard saw only its vocabulary columns: sum the partial hidden-state gradients.
    d_hidden = lax.psum(d_hidden, config.axis_name)
  return rows, Grads(
      d_hidden.astype(inputs.student_hidden.dtype),
      d_kernel.astype(params.student_kernel.dtype),
      d_bias[0].astype(params.student_bias.dtype) if with_bias else None)


def _student_cotangents(inputs: Inputs, grads: Grads) -> Inputs:
  # The teacher is a constant of the loss: no gradient flows to it.
  zeros = functools.partial(jax.tree.map, jnp.zeros_like)
  params = inputs.params
  return Inputs(grads.hidden, zeros(inputs.teacher_hidden),
                Params(grads.kernel, grads.bias, zeros(params.teacher_kernel),
                       zeros(params.teacher_bias)))


def _scale_grads(grads: Grads, scale: Array) -> Grads:
  return Grads(*(
      None if g is None else (g.astype(jnp.float32) * scale).astype(g.dtype) for g in grads))


# Weighted sum: value and gradient in one pass (the forward), the backward only scales.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted(config: Config, traced, weights, inputs: Inputs):
  rows, _ = _loop(config, traced, inputs, None)
  return reductions.weighted_total(rows.value, weights), rows


def _weighted_fwd(config: Config, traced, weights, inputs: Inputs):
  rows, grads = _loop(config, traced, inputs, weights)
  return (reductions.weighted_total(rows.value, weights), rows), (grads, weights, inputs, traced)


def _weighted_bwd(config: Config, residuals, cotangents):
  grads, weights, inputs, traced = residuals
  # The per-token rows are returned under stop_gradient; only the weighted sum is
  # differentiated. Weights (mask-derived) and hyperparameters get no gradient.
  return (zero_cotangents(traced), jnp.zeros_like(weights),
          _student_cotangents(inputs, _scale_grads(grads, cotangents[0])))


_weighted.defvjp(_weighted_fwd, _weighted_bwd)


# Per-token values with an arbitrary cotangent: the backward recomputes the logits.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config: Config, traced, inputs: Inputs):
  return _loop(config, traced, inputs, None)[0].value


def _per_token_fwd(config: Config, traced, inputs: Inputs):
  return _loop(config, traced, inputs, None)[0].value, (inputs, traced)


def _per_token_bwd(config: Config, residuals, values_ct):
  inputs, traced = residuals
  _, grads = _loop(config, traced, inputs, values_ct.astype(jnp.float32))
  return zero_cotangents(traced), _student_cotangents(inputs, grads)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def _reference_values(config: Config, traced, inputs: Inputs, counted: Array | None):
  hp = config.hyperparameters_with(traced)
  hidden = (inputs.student_hidden, inputs.teacher_hidden)
  if counted is not None:  # Whatever an uncounted token holds never reaches a gradient.
    hidden = (jnp.where(counted[:, None], h, jnp.zeros((), h.dtype)) for h in hidden)
  student, teacher = head.both_logits(hp, *hidden, inputs.params)
  return reference.per_token(config, traced, student.raw, teacher.raw, counted=counted).value


def per_token(config: Config, traced, inputs: Inputs, weights: Array | None = None, *,
              counted: Array | None = None) -> tuple[Array, Array | None]:
  """Fused per-token values of hidden states ``[tokens, d]`` (validated, flattened).

  Returns ``(values, total)``. ``weights is None``: ``total`` is None and the float32 values
  ``[tokens]`` are differentiable (the blocked backward recomputes the logits block by block);
  ``counted`` (bool ``[tokens]``, optional) marks the tokens whose value is used. Otherwise
  ``total = sum(weights * values)`` is differentiable, with gradients computed in the forward
  pass, and the values are under ``stop_gradient``. The teacher gets no gradient.
  """
  inputs = inputs._replace(
      teacher_hidden=lax.stop_gradient(inputs.teacher_hidden),
      params=inputs.params._replace(
          teacher_kernel=lax.stop_gradient(inputs.params.teacher_kernel),
          teacher_bias=None if inputs.params.teacher_bias is None
          else lax.stop_gradient(inputs.params.teacher_bias)))
  num_logits = inputs.student_hidden.shape[0] * inputs.params.student_kernel.shape[1]
  if implementations.choose(config, num_logits) == "reference":
    if weights is None:
      return _reference_values(config, traced, inputs, counted), None
    values = _reference_values(config, traced, inputs, weights != 0)
    return lax.stop_gradient(values), reductions.weighted_total(values, weights)
  if weights is None:
    return _per_token(config, traced, inputs), None
  total, rows = _weighted(config, traced, lax.stop_gradient(weights), inputs)
  return lax.stop_gradient(rows.value), total


# ----------------------------------------------------------------------------------------------
# The public loss (and what its vocabulary-parallel variant shares with it).
# ----------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
  """A fused loss call, validated: the config, traced hyperparameters and arrays."""

  config: Config
  traced: dict[str, Array]
  inputs: Inputs  # hidden states with their token shape [..., d]
  labels: Array | None
  where: Array | None
  normalizer: Array | None
  token_weights: Array | None


def prepare(student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
            teacher_bias, *, labels, where, token_weights, reduction, normalizer, ignore_index,
            divergence,
            temperature, beta, alpha, temperature_squared, logit_scale, softcap, token_block,
            vocab_block, implementation, vocab_mismatch_hint, axis_name=None,
            data_axis_name=None) -> Prepared:
  """Checks every argument of a fused loss and builds its config."""
  inputs = checks.linear_heads(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
      teacher_bias, vocab_mismatch_hint=vocab_mismatch_hint)
  tokens = checks.token_arguments(
      inputs[0].shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block,
      token_weights=token_weights)
  hp = checks.hyperparameters(divergence, temperature=temperature, beta=beta, alpha=alpha)
  for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
    for side, side_value in zip(head.SIDES, checks.per_model(name, value), strict=True):
      hp[f"{side}_{name}"] = checks.positive(name, side_value)
  implementation = implementations.check(implementation)
  if axis_name is not None and implementation == "reference":
    raise ValueError(
        "implementation='reference' computes whole arrays; with the vocabulary split over "
        "axis_name use 'blocked' or None.")
  config, traced = config_lib.build(
      hp, divergence=divergence, temperature_squared=bool(temperature_squared),
      reduction=reduction, ignore_index=ignore_index, implementation=implementation,
      token_block=tokens.token_block,
      vocab_block=checks.positive_int("vocab_block", vocab_block, optional=True),
      axis_name=axis_name, data_axis_name=data_axis_name)
  student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias, teacher_bias = (
      inputs)
  return Prepared(config, traced, Inputs(student_hidden, teacher_hidden, Params(
      student_kernel, student_bias, teacher_kernel, teacher_bias)), tokens.labels, tokens.where,
      tokens.normalizer, tokens.token_weights)


def loss(config: Config, traced, inputs: Inputs, labels, where, normalizer,
         token_weights) -> Array:
  """The reduced fused loss of hidden states ``[..., d]`` (the token shape is ``[...]``)."""
  token_shape = inputs.student_hidden.shape[:-1]
  mask = reductions.token_mask(token_shape, labels, where, config.ignore_index)
  vocab_size = inputs.params.student_kernel.shape[1]
  if config.axis_name is not None:
    vocab_size *= lax.axis_size(config.axis_name)
  flat = inputs._replace(
      student_hidden=inputs.student_hidden.reshape(-1, inputs.student_hidden.shape[-1]),
      teacher_hidden=inputs.teacher_hidden.reshape(-1, inputs.teacher_hidden.shape[-1]))

  def compute(weights):
    values, total = per_token(config, traced, flat, None if weights is None
                              else weights.reshape(-1), counted=mask.reshape(-1))
    return _Values(values.reshape(token_shape)), total

  loss, _ = reductions.reduced_loss(
      compute, mask, reduction=config.reduction, normalizer=normalizer,
      data_axis_name=config.data_axis_name,
      invalid=reductions.invalid_labels(labels, mask, vocab_size), token_weights=token_weights)
  return loss


class _Values(NamedTuple):
  value: Array  # per-token values [...]


_loss = jax.jit(loss, static_argnames=("config",))


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
    token_weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
    implementation: str | None = None,
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
    ignore_index, where, token_weights, reduction, normalizer: as in
      :func:`kdjax.distill_loss`.
    token_block: tokens per block (default on CPU 192, fewer for vocabularies above 131072
      entries: 96 at 262144; on GPUs and TPUs about 512 MiB per ``[block, vocab]`` float32
      array, 1024 tokens at 128256). Temporaries are about ``5 * token_block * vocab * 4``
      bytes.
    vocab_block: optional vocabulary columns per block. When set, each token block walks the
      vocabulary with an online log-sum-exp, so temporaries are
      ``O(token_block * vocab_block)``; it costs two extra logit matmuls per step.
    implementation: ``"blocked"`` (the default's choice: blocks of tokens, analytic gradient),
      ``"reference"`` (materialises both logits and runs the readable definition of
      :func:`kdjax.distill_loss` with JAX autodiff; the oracle of the tests) or None.

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
  prepared = prepare(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
      teacher_bias, labels=labels, where=where, token_weights=token_weights,
      reduction=reduction, normalizer=normalizer,
      ignore_index=ignore_index, divergence=divergence, temperature=temperature, beta=beta,
      alpha=alpha, temperature_squared=temperature_squared, logit_scale=logit_scale,
      softcap=softcap, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation,
      vocab_mismatch_hint="If the larger vocabulary only adds padding columns, slice the "
      "kernel (and bias) to the shared vocabulary first.")
  return _loss(*prepared)
