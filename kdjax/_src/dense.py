"""The blocked engine on materialised student logits (``implementation="blocked"``).

It serves every loss whose student logits are an array: :func:`kdjax.distill_loss` and friends
(teacher logits), the vocabulary-parallel losses (teacher logits, statistics over a mesh axis)
and :func:`kdjax.sparse_distill_loss` (a top-k teacher). The loss supplies a *block function*
that turns a block of rows into per-token :class:`recipe.Rows` and the float32 gradient with
respect to the student logits -- :func:`teacher_logits_block` here, the sparse one in
``sparse.py``, both made of the block recipe (``recipe.py``). This module owns what they share:

* the walk over token blocks (``blocking.map_token_blocks``), so temporaries stay
  ``O(block * vocab)`` and no ``[tokens, vocab]`` float32 array is ever live;
* the gradient, a ``jax.custom_vjp`` computed in the same pass as the values (the block's
  probabilities are at hand), rounded once to the logits' dtype and written over the logits block
  by block: in a train step, where the logits are dead after the loss, their buffer becomes the
  gradient's. A call that is not differentiated runs only the value loop.

What walks the rows is pluggable: a :data:`Loop` returns the per-token rows and, asked for it,
the gradient. :func:`blocked` makes the loop of a block function (token blocks sized by a
``blocking.BlockPolicy``); given token weights, it also adds up their weighted total as it goes
(compensated across blocks, ``blocking.map_token_blocks``' ``totals``), which spares XLA:CPU the
kernels of writing the per-token values and summing them after the loop. The Pallas kernels
(``pallas.py``) are loops too, and share this module's ``custom_vjp``; their total is summed from
their rows (:func:`loop_results`).

Two entry points. :func:`weighted_sum` returns ``sum_i w_i value_i`` for token weights known in
the forward pass (the mask and the mean's divisor, ``reductions.reduction_weights``): the stored
gradient already is the final one, and under ``jax.grad`` its backward multiplies by the constant
1, which XLA removes. :func:`per_token` returns the per-token values and scales the stored
gradient by their cotangent in its backward (one more rounding of a 16-bit gradient unless that
cotangent is a power of two). No gradient flows to the teacher, labels, weights or hyperparameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from kdjax._src import blocking, recipe, reductions
from kdjax._src.config import Config, zero_cotangents

Array = jax.Array

# block_fn(config, hp, logits_block, *other_blocks, weights=..., with_grad=...)
#   -> (recipe.row_type(config) rows, float32 gradient with respect to logits_block, or None)
BlockFn = Callable[..., tuple[recipe.Rows | recipe.MetricRows, Array | None]]

# loop(config, traced, logits, weights, others, *, with_grad)
#   -> (value, divergence, cross_entropy[, metrics...][, total][, gradient]): per-token float32
#   [tokens] rows (recipe.row_type(config)'s fields) of [tokens, vocab] logits; given weights,
#   optionally their weighted total sum(weights * value), a float32 scalar (loop_results); and,
#   with_grad, the gradient of sum(weights * value) (weights None: of sum(value)) with respect
#   to the logits, in their dtype.
Loop = Callable[..., tuple[Array, ...]]


def loop_results(config: Config, results, weights: Array | None, *, with_grad: bool,
                 total: bool | None = None) -> tuple[Array, ...]:
  """A loop's ``results`` with the weighted total (given ``weights``) when ``total``, without it
  when not, as they come when None (the total is then there or not, as the loop chose).

  A missing total is summed from the rows (``reductions.weighted_total``).
  """
  num_rows = len(recipe.row_type(config)._fields)
  rows, rest = tuple(results[:num_rows]), tuple(results[num_rows:])
  grad = rest[-1:] if with_grad else ()
  has_total = weights is not None and len(rest) == len(grad) + 1
  if total is None or weights is None or total == has_total:
    return (*rows, *rest)
  if not total:
    return (*rows, *grad)
  return (*rows, reductions.weighted_total(rows[0], weights), *grad)


def teacher_logits_block(config: Config, hp: Mapping, logits: Array, teacher_logits: Array,
                         labels: Array | None = None, *, weights: Array | None,
                         with_grad: bool) -> tuple[recipe.Rows | recipe.MetricRows, Array | None]:
  """The block function of dense teachers: the recipe over this device's vocabulary."""
  return recipe.block(config, hp, logits, teacher_logits, labels, weights,
                      reduce=recipe.VocabReduce(config.axis_name), with_grad=with_grad)


@functools.cache
def blocked(block_fn: BlockFn, *, platform: str | None = None) -> Loop:
  """The loop that runs ``block_fn`` over token blocks: ``config.token_block`` rows, or as many
  as ``blocking.DENSE`` gives on CPU and ``blocking.ACCELERATOR`` on GPUs and TPUs.

  ``platform="cpu"``: the loop of a program known to be lowered for CPU (the CPU lowering rule
  of ``platforms.per_platform``): the same program, without tracing the accelerators' block
  size and loop as well (``lax.platform_dependent`` traces every branch), which halves the time
  that lowering spends tracing it.
  """
  return functools.partial(_blocked_loop, block_fn, platform)


def _blocked_loop(block_fn: BlockFn, platform: str | None, config: Config, traced, logits,
                  weights, others, *, with_grad: bool):
  num_tokens, vocab = logits.shape
  groups = blocking.mesh_devices(logits, *others)

  def run(block):
    return _map_blocks(block_fn, config, traced, logits, weights, others, block=block,
                       with_grad=with_grad, platform=platform)

  if platform == "cpu":
    return run(config.token_block or blocking.token_block(num_tokens, vocab, blocking.DENSE,
                                                          groups=groups))
  return blocking.per_platform(run, num_tokens, vocab, cpu=blocking.DENSE,
                               accelerator=blocking.ACCELERATOR, block=config.token_block,
                               groups=groups)


def _map_blocks(block_fn: BlockFn, config: Config, traced, logits, weights, others, *,
                block: int, with_grad: bool, platform: str | None):
  hp = config.hyperparameters_with(traced)
  num_tokens = logits.shape[0]

  def fn(logits, *rest):
    block_weights, *block_others = rest if weights is not None else (None, *rest)
    rows, grad = block_fn(config, hp, logits, *block_others, weights=block_weights,
                          with_grad=with_grad)
    results = (*rows, grad.astype(logits.dtype)) if with_grad else tuple(rows)
    if block_weights is None:
      return results
    # The block's terms of the weighted total, which the loop adds up as it goes.
    return (*results, reductions.weighted_values(rows.value, block_weights))

  inputs = (logits, *(() if weights is None else (weights,)), *others)
  num_rows = len(recipe.row_type(config)._fields)
  outputs = (jnp.zeros((num_tokens,), jnp.float32),) * num_rows
  overwrite = {}
  if with_grad:  # The gradient is written over the logits (see map_token_blocks).
    outputs += (logits,)
    overwrite = {0: len(outputs) - 1}
  results = blocking.map_token_blocks(
      fn, inputs, outputs, block=block, overwrite=overwrite, totals=int(weights is not None),
      weights=None if weights is None else 1, platform=platform)
  if weights is None:
    return results
  lanes = results[-1]
  if lanes.shape[0] == num_tokens:  # one block: its lanes are its rows
    total = reductions.pairwise_sum(lanes)
  else:
    # The lanes of several blocks are few: added in pairs all the way, or, where GSPMD may split
    # them over devices, within each device's share (the shares' sums are added last, as one
    # all-reduce, where pairs across devices would move lanes between them).
    groups = blocking.mesh_devices(lanes)
    sharding = blocking.explicit_sharding(lanes)
    if sharding is not None:  # pairs of a sharded axis would not type-check: gather the lanes
      lanes = jax.sharding.reshard(lanes, jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec()))
      groups = 1
    total = reductions.pairwise_sum(lanes, groups=groups)
  return (*results[:num_rows], total, *results[num_rows:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _per_token(loop, config, traced, logits, *others):
  return recipe.row_type(config)(*loop(config, traced, logits, None, others, with_grad=False))


def _per_token_fwd(loop, config, traced, logits, *others):
  *rows, grad = loop(config, traced, logits, None, others, with_grad=True)
  return recipe.row_type(config)(*rows), (grad, traced, len(others))


def _per_token_bwd(loop, config, residuals, cotangents):
  del loop, config
  grad, traced, num_others = residuals
  # Only the value is differentiated: the other outputs are returned under stop_gradient.
  return (zero_cotangents(traced), blocking.scale_rows(grad, cotangents.value),
          *(None,) * num_others)


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _weighted_sum(loop, config, traced, logits, weights, *others):
  *row_arrays, total = loop_results(
      config, loop(config, traced, logits, weights, others, with_grad=False), weights,
      with_grad=False, total=True)
  return total, recipe.row_type(config)(*row_arrays)


def _weighted_sum_fwd(loop, config, traced, logits, weights, *others):
  *row_arrays, total, grad = loop_results(
      config, loop(config, traced, logits, weights, others, with_grad=True), weights,
      with_grad=True, total=True)
  return ((total, recipe.row_type(config)(*row_arrays)),
          (grad, traced, len(others)))


def _weighted_sum_bwd(loop, config, residuals, cotangents):
  del loop, config
  grad, traced, num_others = residuals
  total_ct = cotangents[0]  # The per-token rows are returned under stop_gradient.
  return (zero_cotangents(traced), grad * total_ct.astype(grad.dtype), None,
          *(None,) * num_others)


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def _flat(logits: Array, others) -> tuple[Array, list[Array]]:
  num_tokens = logits.size // logits.shape[-1] if logits.shape[-1] else 0
  flat_others = [lax.stop_gradient(x).reshape((num_tokens,) + x.shape[logits.ndim - 1:])
                 for x in others]
  return logits.reshape(num_tokens, logits.shape[-1]), flat_others


def _unflat(rows: recipe.Rows | recipe.MetricRows, token_shape
            ) -> recipe.Rows | recipe.MetricRows:
  return type(rows)(*(x.reshape(token_shape) for x in rows))


def per_token(loop: Loop, config: Config, traced: Mapping[str, Array], logits: Array,
              *others: Array) -> recipe.Rows | recipe.MetricRows:
  """Per-token :class:`recipe.Rows` of ``logits`` ``[..., vocab]`` (shape ``[...]``), or
  :class:`recipe.MetricRows` for ``config.metrics``.

  ``loop`` computes them (:func:`blocked`, or a kernel). ``others`` are its other per-token
  inputs (``[..., ...]``: teacher logits,
  labels, top-k ids and log-probabilities); no gradient flows to them. Only ``value`` is
  differentiable; the other rows are for logging.
  """
  flat_logits, flat_others = _flat(logits, others)
  rows = _per_token(loop, config, traced, flat_logits, *flat_others)
  return recipe.constant_but_value(_unflat(rows, logits.shape[:-1]))


def weighted_sum(loop: Loop, config: Config, traced: Mapping[str, Array], logits: Array,
                 weights: Array, *others: Array
                 ) -> tuple[Array, recipe.Rows | recipe.MetricRows]:
  """``(sum_i weights[i] * value[i], rows)``: the fastest way to a reduced loss.

  ``weights`` (``logits.shape[:-1]``, float32; ``reductions.reduction_weights``) are constants
  of the loss and get no gradient; a token whose weight is 0 contributes exactly 0 to the total
  and its gradient, whatever its inputs hold. The gradient is complete after the forward pass;
  the rows are under ``stop_gradient``.
  """
  flat_logits, flat_others = _flat(logits, others)
  flat_weights = lax.stop_gradient(jnp.asarray(weights, jnp.float32)).reshape(-1)
  total, rows = _weighted_sum(loop, config, traced, flat_logits, flat_weights, *flat_others)
  return total, jax.tree.map(lax.stop_gradient, _unflat(rows, logits.shape[:-1]))
