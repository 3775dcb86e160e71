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
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from kdjax._src import (
    blocking,
    checks,
    head,
    implementations,
    meshes,
    recipe,
    reductions,
    reference,
)
from kdjax._src import config as config_lib
from kdjax._src import metrics as metrics_lib
from kdjax._src.config import Config, zero_cotangents
from kdjax._src.head import Grads, Inputs, Params
from kdjax._src.metrics import DistillMetrics

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# One token block: the recipe over the whole (local) vocabulary, or over vocabulary tiles.
# ----------------------------------------------------------------------------------------------


def _whole_vocab(config: Config, hp, params: Params, with_grad: bool, groups: int,
                 student_hidden, teacher_hidden, labels, weights):
  student, teacher = head.both_logits(hp, student_hidden, teacher_hidden, params)
  rows, grad = recipe.block(config, hp, student.raw, teacher.raw, labels, weights,
                            reduce=recipe.VocabReduce(config.axis_name), with_grad=with_grad)
  if not with_grad:
    return rows, None
  return rows, head.param_grads(student_hidden, params.student_kernel,
                                params.student_bias is not None,
                                head.logit_grad(hp, student, grad),  # type: ignore[arg-type]  # the gradient path: grad is set
                                weights, groups)


def _vocab_tiles(config: Config, hp, params: Params, with_grad: bool, groups: int,
                 student_hidden, teacher_hidden, labels, weights):
  """The recipe over vocabulary tiles of ``config.vocab_block`` columns (``recipe.tiled``).

  Each tile's logits are computed from the hidden states and the kernels' columns; its
  gradient goes through the head's chain rule into the hidden-state, kernel and bias
  gradients. The ``vocab % vocab_block`` columns left over form one last, smaller tile.
  """
  vocab = params.student_kernel.shape[1]
  width = min(config.vocab_block, vocab)  # type: ignore[type-var]  # vocab_block is resolved before the loop
  num_full, remainder = divmod(vocab, width)  # type: ignore[operator]  # vocab_block is resolved before the loop
  with_bias = params.student_bias is not None

  def walk(body, carry):
    carry = lax.fori_loop(0, num_full, lambda j, c: body(recipe.Tile(j * width, width), c),
                          carry)
    return body(recipe.Tile(num_full * width, remainder), carry) if remainder else carry

  def read(tile):
    sliced = head.vocab_slice(params, tile.start, tile.width)
    student, teacher = head.both_logits(hp, student_hidden, teacher_hidden, sliced)
    return student.raw, teacher.raw, (sliced, student)

  def accumulate(tile, context, grad, grads: Grads) -> Grads:
    sliced, student = context
    part = head.param_grads(student_hidden, sliced.student_kernel, with_bias,
                            head.logit_grad(hp, student, grad), weights, groups)

    def add(total, increment):  # into the tile's columns, the last axis
      axis = total.ndim - 1
      return lax.dynamic_update_slice_in_dim(
          total, lax.dynamic_slice_in_dim(total, tile.start, tile.width, axis=axis)
          + increment, tile.start, axis=axis)

    return Grads(grads.hidden + part.hidden, add(grads.kernel, part.kernel),
                 add(grads.bias, part.bias) if with_bias else None)

  like = (student_hidden, teacher_hidden, *params, weights)
  init = None
  if with_grad:
    grouped = (groups,) if groups > 1 else ()
    init = Grads(blocking.varying_zeros(student_hidden.shape, *like),
                 blocking.varying_zeros(grouped + params.student_kernel.shape, *like),
                 blocking.varying_zeros(grouped + (vocab,), *like) if with_bias else None)
  return recipe.tiled(
      config, hp, walk, read, zeros=blocking.varying_zeros(student_hidden.shape[:1], *like),
      vocab_width=vocab, labels=labels, weights=weights,
      reduce=recipe.VocabReduce(config.axis_name), emit=accumulate if with_grad else None,
      emit_init=init)


# ----------------------------------------------------------------------------------------------
# The loop over token blocks and the two custom_vjp entry points.
# ----------------------------------------------------------------------------------------------


def _loop(config: Config, traced, inputs: Inputs, labels: Array | None,
          weights: Array | None):
  """Per-token rows and, when ``weights`` is given, the gradients of ``sum(weights * value)``
  with respect to the student's hidden states, kernel and bias (in their dtypes)."""
  hp = config.hyperparameters_with(traced)
  with_grad = weights is not None
  block_fn = _whole_vocab if config.vocab_block is None else _vocab_tiles
  params = inputs.params
  num_tokens = inputs.student_hidden.shape[0]
  with_bias = params.student_bias is not None
  per_token_inputs = [inputs.student_hidden, inputs.teacher_hidden]
  if config.cross_entropy:
    per_token_inputs.append(labels)  # type: ignore[arg-type]  # cross entropy: labels are given
  weights_index = None
  if with_grad:
    weights_index = len(per_token_inputs)
    per_token_inputs.append(weights)  # type: ignore[arg-type]  # with_grad: weights are given

  # Under GSPMD the rows may be split over up to `devices` devices: strided blocks give each its
  # share of every block, and the kernel gradient is accumulated per share ([groups, d, vocab]),
  # so that it is summed over the devices once, after the loop, not in every block.
  devices = blocking.mesh_devices(inputs.student_hidden, inputs.teacher_hidden)
  row_type = recipe.row_type(config)
  num_rows = len(row_type._fields)

  def run(block: int):
    groups = devices if devices > 1 and block % devices == 0 and num_tokens % block == 0 else 1

    def fn(student_hidden, teacher_hidden, *rest):
      block_labels = rest[0] if config.cross_entropy else None
      block_weights = rest[-1] if with_grad else None
      rows, grads = block_fn(config, hp, params, with_grad, groups, student_hidden,
                             teacher_hidden, block_labels, block_weights)
      if not with_grad:
        return tuple(rows)
      return (*rows, grads.hidden, grads.kernel, *((grads.bias,) if with_bias else ()))

    outputs = (jnp.zeros((num_tokens,), jnp.float32),) * num_rows
    sums = ()
    if with_grad:
      # Sharded, the partial hidden-state gradients stay float32 until they are summed.
      d_hidden_dtype = (inputs.student_hidden.dtype if config.axis_name is None
                        else jnp.float32)
      grouped = (groups,) if groups > 1 else ()
      outputs += (jnp.zeros(inputs.student_hidden.shape, d_hidden_dtype),)
      sums = (jnp.zeros(grouped + params.student_kernel.shape, jnp.float32),
              *((jnp.zeros(grouped + params.student_bias.shape, jnp.float32),)  # type: ignore[union-attr]  # with_bias
                if with_bias else ()))
    results = blocking.map_token_blocks(
        fn, per_token_inputs, outputs, sums=sums, block=block, strided=groups > 1,
        weights=weights_index)
    if groups > 1 and with_grad:  # one sum over the devices' shares
      results = (*results[:num_rows + 1],
                 *(jnp.sum(x, axis=0) for x in results[num_rows + 1:]))
    return results

  results = blocking.per_platform(
      run, num_tokens, params.student_kernel.shape[1], cpu=blocking.FUSED,
      accelerator=blocking.FUSED_ACCELERATOR, block=config.token_block, groups=devices)
  rows = row_type(*results[:num_rows])
  if not with_grad:
    return rows, None
  d_hidden, d_kernel, *d_bias = results[num_rows:]
  if config.axis_name is not None:
    # Each shard saw only its vocabulary columns: sum the partial hidden-state gradients.
    d_hidden = lax.psum(d_hidden, config.axis_name)
  return rows, Grads(
      d_hidden.astype(inputs.student_hidden.dtype),
      d_kernel.astype(params.student_kernel.dtype),
      d_bias[0].astype(params.student_bias.dtype) if with_bias else None)  # type: ignore[union-attr]  # with_bias


def _student_cotangents(inputs: Inputs, grads: Grads) -> Inputs:
  # The teacher is a constant of the loss: no gradient flows to it.
  zeros = functools.partial(jax.tree.map, jnp.zeros_like)
  params = inputs.params
  return Inputs(grads.hidden, zeros(inputs.teacher_hidden),
                Params(grads.kernel, grads.bias, zeros(params.teacher_kernel),
                       zeros(params.teacher_bias)))


def _scale_grads(grads: Grads, scale: Array) -> Grads:
  return Grads(*(  # type: ignore[arg-type]  # None (no bias) stays None
      None if g is None else (g.astype(jnp.float32) * scale).astype(g.dtype) for g in grads))


# Weighted sum: value and gradient in one pass (the forward), the backward only scales.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weighted(config: Config, traced, weights, inputs: Inputs, labels):
  rows, _ = _loop(config, traced, inputs, labels, None)
  return reductions.weighted_total(rows.value, weights), rows


def _weighted_fwd(config: Config, traced, weights, inputs: Inputs, labels):
  rows, grads = _loop(config, traced, inputs, labels, weights)
  return (reductions.weighted_total(rows.value, weights), rows), (grads, weights, inputs, traced)


def _weighted_bwd(config: Config, residuals, cotangents):
  grads, weights, inputs, traced = residuals
  # The per-token rows are returned under stop_gradient; only the weighted sum is
  # differentiated. Weights (mask-derived), labels and hyperparameters get no gradient.
  return (zero_cotangents(traced), jnp.zeros_like(weights),
          _student_cotangents(inputs, _scale_grads(grads, cotangents[0])), None)


_weighted.defvjp(_weighted_fwd, _weighted_bwd)


# Per-token values with an arbitrary cotangent: the backward recomputes the logits.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config: Config, traced, inputs: Inputs, labels):
  return _loop(config, traced, inputs, labels, None)[0]


def _per_token_fwd(config: Config, traced, inputs: Inputs, labels):
  return _loop(config, traced, inputs, labels, None)[0], (inputs, labels, traced)


def _per_token_bwd(config: Config, residuals, cotangents):
  inputs, labels, traced = residuals
  # Only the value is differentiated: the other rows are returned under stop_gradient.
  _, grads = _loop(config, traced, inputs, labels, cotangents.value.astype(jnp.float32))
  return zero_cotangents(traced), _student_cotangents(inputs, grads), None


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


def _reference_rows(config: Config, traced, inputs: Inputs, labels, counted: Array | None):
  hp = config.hyperparameters_with(traced)
  hidden = (inputs.student_hidden, inputs.teacher_hidden)
  if counted is not None:  # Whatever an uncounted token holds never reaches a gradient.
    hidden = (jnp.where(counted[:, None], h, jnp.zeros((), h.dtype)) for h in hidden)  # type: ignore[assignment]  # a generator of the two, unpacked once
  student, teacher = head.both_logits(hp, *hidden, inputs.params)
  return reference.per_token(config, traced, student.raw, teacher.raw,
                             labels if config.cross_entropy else None, counted=counted)


def per_token(config: Config, traced, inputs: Inputs, labels: Array | None = None,
              weights: Array | None = None, *,
              counted: Array | None = None
              ) -> tuple[recipe.Rows | recipe.MetricRows, Array | None]:
  """Fused per-token rows of hidden states ``[tokens, d]`` (validated, flattened), with their
  metrics for ``config.metrics``.

  ``labels`` ``[tokens]`` are read for the cross entropy only. Returns ``(rows, total)``.
  ``weights is None``: ``total`` is None and the rows' value is differentiable (the blocked
  backward recomputes the logits block by block); ``counted`` (bool ``[tokens]``, optional)
  marks the tokens whose value is used. Otherwise ``total = sum(weights * value)`` is
  differentiable, with gradients computed in the forward pass. The other rows are under
  ``stop_gradient``; the teacher gets no gradient.
  """
  inputs = inputs._replace(
      teacher_hidden=lax.stop_gradient(inputs.teacher_hidden),
      params=inputs.params._replace(
          teacher_kernel=lax.stop_gradient(inputs.params.teacher_kernel),
          teacher_bias=None if inputs.params.teacher_bias is None
          else lax.stop_gradient(inputs.params.teacher_bias)))
  if labels is None or not config.cross_entropy:
    labels = jnp.zeros(inputs.student_hidden.shape[:1], jnp.int32)
  num_logits = inputs.student_hidden.shape[0] * inputs.params.student_kernel.shape[1]
  if implementations.choose(config, num_logits) == "reference":
    rows = _reference_rows(config, traced, inputs, labels,
                           counted if weights is None else weights != 0)
    if weights is None:
      return rows, None
    total = reductions.weighted_total(rows.value, weights)
    return jax.tree.map(lax.stop_gradient, rows), total
  if weights is None:
    return recipe.constant_but_value(_per_token(config, traced, inputs, labels)), None
  total, rows = _weighted(config, traced, lax.stop_gradient(weights), inputs, labels)
  return jax.tree.map(lax.stop_gradient, rows), total


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
            divergence, temperature, beta, alpha, temperature_squared, logit_scale, softcap,
            token_block, vocab_block, implementation, vocab_mismatch_hint, kd_coef=None,
            axis_name=None, data_axis_name=None, metrics=False) -> Prepared:
  """Checks every argument of a fused loss and builds its config (``kd_coef``: the hard-label
  cross entropy's weight is ``1 - kd_coef``; None: no cross entropy; ``metrics``: the
  metrics forms)."""
  inputs = checks.linear_heads(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
      teacher_bias, vocab_mismatch_hint=vocab_mismatch_hint)
  tokens = checks.token_arguments(
      inputs[0].shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block,
      token_weights=token_weights, token_source="student_hidden",
      labels_required=None if kd_coef is None else ": it holds the cross-entropy targets")
  # The labels index the kernel's columns (all of them: the slices over axis_name together).
  checks.label_range(
      labels, where, ignore_index=ignore_index, source="student_kernel",
      vocab_size=inputs[1].shape[1] * (1 if axis_name is None else lax.axis_size(axis_name)))
  hp = checks.hyperparameters(divergence, temperature=temperature, beta=beta, alpha=alpha,
                              kd_coef=kd_coef)
  for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
    for side, side_value in zip(head.SIDES, checks.per_model(name, value), strict=True):
      hp[f"{side}_{name}"] = checks.positive(name, side_value)  # type: ignore[assignment]  # per_model values are not None
  implementation = implementations.check(implementation)
  if axis_name is not None and implementation == "reference":
    raise ValueError(
        "implementation='reference' computes whole arrays; with the vocabulary split over "
        "axis_name use 'blocked' or None.")
  config, traced = config_lib.build(
      hp, divergence=divergence, temperature_squared=bool(temperature_squared),
      cross_entropy=kd_coef is not None, reduction=reduction, ignore_index=ignore_index,
      implementation=implementation, token_block=tokens.token_block,
      vocab_block=checks.positive_int("vocab_block", vocab_block, optional=True),
      axis_name=axis_name, data_axis_name=data_axis_name, metrics=metrics)
  student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias, teacher_bias = (
      inputs)
  return Prepared(config, traced, Inputs(student_hidden, teacher_hidden, Params(
      student_kernel, student_bias, teacher_kernel, teacher_bias)), tokens.labels, tokens.where,
      tokens.normalizer, tokens.token_weights)


def loss(config: Config, traced, inputs: Inputs, labels, where, normalizer, token_weights, *,
         output: str = "loss"):
  """The reduced fused loss of hidden states ``[..., d]`` (the token shape is ``[...]``):
  ``reductions.outputs(output, ...)``, or ``(loss, metrics)`` for ``output="metrics"``."""
  token_shape = inputs.student_hidden.shape[:-1]
  mask = reductions.token_mask(token_shape, labels, where, config.ignore_index)
  vocab_size = inputs.params.student_kernel.shape[1]
  if config.axis_name is not None:
    vocab_size *= lax.axis_size(config.axis_name)
  invalid = reductions.invalid_tokens(mask, labels, vocab_size, traced)
  reduction = "sum" if output == "sum_count" else config.reduction
  flat = inputs._replace(
      student_hidden=inputs.student_hidden.reshape(-1, inputs.student_hidden.shape[-1]),
      teacher_hidden=inputs.teacher_hidden.reshape(-1, inputs.teacher_hidden.shape[-1]))
  flat_labels = None if labels is None else labels.reshape(-1)

  def compute(weights):
    rows, total = per_token(config, traced, flat, flat_labels,
                            None if weights is None else weights.reshape(-1),
                            counted=mask.reshape(-1))
    return jax.tree.map(lambda x: x.reshape(token_shape), rows), total

  loss, rows = reductions.reduced_loss(
      compute, mask, reduction=reduction, normalizer=normalizer,
      data_axis_name=config.data_axis_name, invalid=invalid, token_weights=token_weights)
  if output == "metrics":
    return loss, metrics_lib.from_rows(rows, mask, cross_entropy=config.cross_entropy,
                                       reduction=reduction, normalizer=normalizer,
                                       invalid=invalid, token_weights=token_weights)
  return reductions.outputs(output, loss, rows, mask, reduction=reduction,
                            normalizer=normalizer, invalid=invalid, token_weights=token_weights)


_loss = jax.jit(loss, static_argnames=("config", "output"))


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
    labels: optional integer ids ``[...]``; tokens equal to ``ignore_index`` are excluded. A
      counted label outside ``[0, student_kernel.shape[-1])`` is a ``ValueError`` when the
      labels are known at the call, and makes the loss NaN when they are traced.
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
      A ``-inf`` logit (a ``-inf`` bias entry) stays ``-inf``: it masks under the cap too.
    ignore_index, where, token_weights, reduction, normalizer: as in
      :func:`kdjax.distill_loss`.
    token_block: tokens per block (default on CPU 128, fewer for vocabularies above 196608
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
  return _call(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels,
      divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, student_bias=student_bias,
      teacher_bias=teacher_bias, logit_scale=logit_scale, softcap=softcap,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation, output="loss")


def _call(student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels, *,
          student_bias, teacher_bias, output, **options):
  """Validates the arguments of a public fused loss (at trace time) and runs ``_loss``."""
  prepared = prepare(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
      teacher_bias, labels=labels,
      vocab_mismatch_hint="If the larger vocabulary only adds padding columns, slice the "
      "kernel (and bias) to the shared vocabulary first.", metrics=output == "metrics",
      **options)
  if prepared.config.vocab_block is None:
    return _loss(*prepared, output=output)
  # On Explicit axes the vocabulary tiles' loops carry per-row statistics and gradient
  # accumulators whose sharding their bodies decide, and a tile sliced out of a
  # vocabulary-sharded kernel has none: the partitioner decides, as on Auto axes.
  hidden = prepared.inputs.student_hidden
  token_spec = meshes.token_spec(hidden, hidden.ndim - 1)
  if output == "sum_count" or prepared.config.reduction != "none":
    out_specs: Any = (P(), P()) if output == "sum_count" else P()
  else:
    out_specs = token_spec
  if output == "metrics":
    out_specs = metrics_lib.out_specs(out_specs, token_spec,
                                      cross_entropy=prepared.config.cross_entropy)
  return meshes.on_auto_axes(functools.partial(_loss, prepared.config, output=output),
                             tuple(prepared)[1:], out_specs)


def fused_linear_distill_loss_sum_and_count(
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
    token_block: int | None = None,
    vocab_block: int | None = None,
    implementation: str | None = None,
) -> tuple[Array, Array]:
  """``(sum over counted tokens, number of counted tokens)`` of
  :func:`fused_linear_distill_loss`.

  Sum both over hosts, devices or gradient-accumulation steps, then divide once. Arguments as
  in :func:`fused_linear_distill_loss`.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> hidden, kernel = jnp.ones((3, 4)), jnp.ones((4, 10))
    >>> total, count = kdjax.fused_linear_distill_loss_sum_and_count(
    ...     hidden, kernel, hidden, kernel, jnp.array([1, 2, -100]))
    >>> float(total), float(count)
    (0.0, 2.0)
  """
  return _call(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels,
      divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, student_bias=student_bias,
      teacher_bias=teacher_bias, logit_scale=logit_scale, softcap=softcap,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction="sum",
      normalizer=None, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation, output="sum_count")


def fused_linear_distill_loss_with_metrics(
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
) -> tuple[Array, DistillMetrics]:
  """:func:`fused_linear_distill_loss` and its metrics, the logits still never materialised.

  The loss is :func:`fused_linear_distill_loss`'s (the same value and gradient); the metrics
  are those of :func:`kdjax.distill_loss_with_metrics` on the logits ``z`` of each model (after
  the logit scale and softcap): each token block computes them with its values, and with
  ``vocab_block`` the walk over the vocabulary tiles follows each row's top-1 id and sums the
  entropies with the terms. Arguments as in :func:`fused_linear_distill_loss`.

  Returns:
    ``(loss, metrics)``: the loss and a :class:`kdjax.DistillMetrics`. With
    ``reduction="sum"``, ``(loss, metrics.token_count)`` is what
    :func:`fused_linear_distill_loss_sum_and_count` returns.

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> hidden = jax.random.normal(keys[0], (6, 16))
    >>> w_s, w_t = (jax.random.normal(k, (16, 50)) for k in keys[1:])
    >>> loss, metrics = kdjax.fused_linear_distill_loss_with_metrics(
    ...     hidden, w_s, hidden, w_t, vocab_block=16)
    >>> _, dense = kdjax.distill_loss_with_metrics(hidden @ w_s, hidden @ w_t)
    >>> bool(jnp.allclose(metrics.student_entropy, dense.student_entropy, rtol=1e-5))
    True
  """
  return _call(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels,
      divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, student_bias=student_bias,
      teacher_bias=teacher_bias, logit_scale=logit_scale, softcap=softcap,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation, output="metrics")


def fused_linear_distill_with_cross_entropy(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_kernel: ArrayLike,
    labels: ArrayLike,
    *,
    kd_coef: float | ArrayLike = 0.5,
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
    return_components: bool = False,
):
  r"""``(1 - kd_coef) * cross_entropy + kd_coef * distill`` from hidden states, fused.

  The most common distillation objective (OpenRLHF's KD trainer, Liger-Kernel's
  ``LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss)``), with the value and gradients
  of :func:`kdjax.distill_with_cross_entropy` on the materialised logits

  .. math::

      z = \text{softcap} \cdot \tanh\!\Big(\frac{\text{logit\_scale} \cdot
      (h W + b)}{\text{softcap}}\Big)

  of each model, computed one block of tokens (and optionally of the vocabulary) at a time as
  :func:`fused_linear_distill_loss` does: the cross entropy of the student's logits ``z`` with
  ``labels`` at temperature 1, the divergence at ``temperature``, both from one pass over each
  block of logits, both masked and reduced alike.

  Args:
    student_hidden, student_kernel, teacher_hidden, teacher_kernel: as in
      :func:`fused_linear_distill_loss`.
    labels: integer ids ``student_hidden.shape[:-1]``: the cross-entropy targets, already
      aligned (see :func:`kdjax.shift_labels`); ``ignore_index`` marks ignored tokens. A
      counted label outside ``[0, vocab)`` is a ``ValueError`` when the labels are known at
      the call, and makes the loss NaN when they are traced.
    kd_coef: weight of the distillation term in ``[0, 1]``; a scalar array may be scheduled.
    return_components: also return ``(cross_entropy, distill)``, each reduced.
    Others: as in :func:`fused_linear_distill_loss`.

  Returns:
    The float32 loss (or per-token values for ``reduction="none"``); with
    ``return_components=True``, ``(loss, (cross_entropy, distill))``.

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> h_s, h_t = jax.random.normal(keys[0], (6, 16)), jax.random.normal(keys[1], (6, 32))
    >>> w_s = jax.random.normal(keys[2], (16, 50)) / 4
    >>> w_t = jax.random.normal(keys[3], (32, 50)) / 4
    >>> labels = jnp.array([3, 1, 4, 1, 5, -100])
    >>> loss = kdjax.fused_linear_distill_with_cross_entropy(
    ...     h_s, w_s, h_t, w_t, labels, kd_coef=0.5, temperature=2.0)
    >>> dense = kdjax.distill_with_cross_entropy(
    ...     h_s @ w_s, h_t @ w_t, labels, kd_coef=0.5, temperature=2.0)
    >>> bool(jnp.allclose(loss, dense, rtol=1e-5))
    True
  """
  loss, cross_entropy, distill = _call(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels, kd_coef=kd_coef,
      divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, student_bias=student_bias,
      teacher_bias=teacher_bias, logit_scale=logit_scale, softcap=softcap,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation, output="combined")
  if return_components:
    return loss, (cross_entropy, distill)
  return loss


def fused_linear_distill_with_cross_entropy_sum_and_count(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_kernel: ArrayLike,
    labels: ArrayLike,
    *,
    kd_coef: float | ArrayLike = 0.5,
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
    token_block: int | None = None,
    vocab_block: int | None = None,
    implementation: str | None = None,
) -> tuple[Array, Array]:
  """``(sum over counted tokens, number of counted tokens)`` of
  :func:`fused_linear_distill_with_cross_entropy`.

  Arguments as in :func:`fused_linear_distill_with_cross_entropy`.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> hidden, kernel = jnp.zeros((3, 4)), jnp.zeros((4, 10))
    >>> total, count = kdjax.fused_linear_distill_with_cross_entropy_sum_and_count(
    ...     hidden, kernel, hidden, kernel, jnp.array([1, 2, -100]), kd_coef=0.0)
    >>> round(float(total / count), 4)  # a uniform student: log(10)
    2.3026
  """
  return _call(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels, kd_coef=kd_coef,
      divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, student_bias=student_bias,
      teacher_bias=teacher_bias, logit_scale=logit_scale, softcap=softcap,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction="sum",
      normalizer=None, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation, output="sum_count")


def fused_linear_distill_with_cross_entropy_with_metrics(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_kernel: ArrayLike,
    labels: ArrayLike,
    *,
    kd_coef: float | ArrayLike = 0.5,
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
) -> tuple[Array, DistillMetrics]:
  """:func:`fused_linear_distill_with_cross_entropy` and its metrics, from the same blocks.

  The loss is :func:`fused_linear_distill_with_cross_entropy`'s (the same value and
  gradient); the metrics are those of :func:`kdjax.distill_with_cross_entropy_with_metrics` on
  the logits of each model, ``metrics.cross_entropy`` the hard-label term. Arguments as in
  :func:`fused_linear_distill_with_cross_entropy`.

  Returns:
    ``(loss, metrics)``: the loss and a :class:`kdjax.DistillMetrics`. With
    ``reduction="sum"``, ``(loss, metrics.token_count)`` is what
    :func:`fused_linear_distill_with_cross_entropy_sum_and_count` returns.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> hidden, kernel = jnp.zeros((3, 4)), jnp.zeros((4, 10))
    >>> loss, metrics = kdjax.fused_linear_distill_with_cross_entropy_with_metrics(
    ...     hidden, kernel, hidden, kernel, jnp.array([1, 2, -100]), kd_coef=0.5)
    >>> round(float(metrics.student_entropy), 4)  # a uniform student: log(10)
    2.3026
  """
  return _call(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels, kd_coef=kd_coef,
      divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, student_bias=student_bias,
      teacher_bias=teacher_bias, logit_scale=logit_scale, softcap=softcap,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer, token_block=token_block, vocab_block=vocab_block,
      implementation=implementation, output="metrics")
