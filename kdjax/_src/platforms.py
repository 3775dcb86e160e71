"""A loop per lowering platform, traced only when the program is lowered for that platform.

The default implementation runs a different loop of the dense engine (``dense.Loop``) on each
platform: the blocked engine on CPU, the Pallas kernels on GPUs and TPUs. Tracing cannot know
which platform a program will be lowered for, and ``lax.platform_dependent`` traces every
branch: a CPU program would hold (and differentiate, and take the time to trace) the kernels
too. Here the choice is one primitive, ``kdjax_loop``, standing for "the loop of the platform":

1. tracing binds it: its abstract evaluation gives the outputs' types (shape, dtype, sharding,
   the ``shard_map`` axes they vary over) without tracing any loop;
2. lowering for a platform traces that platform's loop and lowers it in place (a lowering rule
   per platform; lowering for several platforms at once emits a switch on the platform, as
   ``lax.platform_dependent`` does), under the abstract mesh that was current when the
   primitive was bound, so the loop sees what it would have seen at trace time;
3. differentiating it (``jax.jvp``, so ``jax.hessian`` and gradients of gradients: the engine's
   ``custom_vjp`` forward pass is differentiated) differentiates one loop on every platform, the
   blocked engine (the kernels have no derivative rules), or is an error where no loop is to
   stand in for another (``implementation="pallas"``);
4. batching it (``jax.vmap``) folds the batch into the token axis: rows are independent, so one
   call over ``batch * tokens`` rows computes the batch. A batched hyperparameter (a
   temperature per batch entry) instead maps the loop over the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from kdjax._src import blocking, dense, recipe, reductions
from kdjax._src.config import Config

Array = jax.Array
Loop = dense.Loop

# Platforms with a lowering rule of their own (names as in ``lax.platform_dependent``); any other
# platform lowers the default loop.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def per_platform(*, default: Loop, jvp: Loop | None = None, **platforms: Loop) -> Loop:
  """The loop of the platform the program is lowered for: ``platforms[name]`` (names as in
  ``lax.platform_dependent``: ``cpu``, ``cuda``, ``rocm``, ``tpu``), else ``default``.

  Only the loop of the platform lowered for is traced. ``jvp``: the loop differentiated in
  forward mode on every platform (None: forward mode is a ValueError).
  """
  unknown = set(platforms) - set(PLATFORMS)
  if unknown:
    raise ValueError(f"unknown platforms {sorted(unknown)}; expected some of {PLATFORMS}.")
  others = tuple(sorted((name, loop) for name, loop in platforms.items() if loop is not default))
  if not others and jvp is default:
    return default
  return _platform_loop(default, others, jvp)


@functools.cache
def _platform_loop(default: Loop, platforms: tuple[tuple[str, Loop], ...],
                   jvp: Loop | None) -> Loop:
  return functools.partial(_bind, default, platforms, jvp)


def _bind(default: Loop, platforms, jvp: Loop | None, config: Config,
          traced: Mapping[str, Array], logits: Array, weights: Array | None, others, *,
          with_grad: bool) -> tuple[Array, ...]:
  names = tuple(sorted(traced))
  operands = (logits, *(() if weights is None else (weights,)), *others,
              *(traced[name] for name in names))
  return tuple(_loop_p.bind(
      *operands, default=default, platforms=platforms, jvp=jvp, config=config, names=names,
      weighted=weights is not None, num_others=len(others), with_grad=with_grad,
      mesh=jax.sharding.get_abstract_mesh()))


def _run(loop: Loop, *operands, config: Config, names, weighted: bool, num_others: int,
         with_grad: bool, **_) -> list[Array]:
  """``loop`` on the primitive's flat operands; given weights, with their weighted total."""
  logits, *rest = operands
  weights = rest.pop(0) if weighted else None
  others, values = rest[:num_others], rest[num_others:]
  traced = dict(zip(names, values, strict=True))
  return list(dense.loop_results(
      config, loop(config, traced, logits, weights, tuple(others), with_grad=with_grad),
      weights, with_grad=with_grad, total=True))


_loop_p = jex_core.Primitive("kdjax_loop")
_loop_p.multiple_results = True


def _impl(*operands, **params):
  return jax.jit(functools.partial(_loop_p.bind, **params))(*operands)


_loop_p.def_impl(_impl)


def _with_varying(aval, axes: frozenset):
  """``aval`` varying over the ``shard_map`` axes ``axes``."""
  if hasattr(aval, "manual_axis_type"):
    if blocking.varying_axes(aval) == axes:
      return aval
    return aval.update(manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
  return aval.update(vma=axes)


def _abstract_eval(*avals, with_grad: bool, config: Config, weighted: bool, **_):
  logits = avals[0]
  sharding = getattr(logits, "sharding", None)
  row_sharding = total_sharding = None
  if sharding is not None and getattr(sharding, "mesh", None) is not None:
    token_spec = tuple(sharding.spec)[:1] or (None,)
    row_sharding = jax.sharding.NamedSharding(sharding.mesh,
                                              jax.sharding.PartitionSpec(*token_spec))
    total_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  varying = frozenset().union(*(blocking.varying_axes(a) for a in avals))
  row = logits.update(shape=logits.shape[:1], dtype=jax.numpy.float32, weak_type=False,
                      **({} if row_sharding is None else {"sharding": row_sharding}))
  # value, divergence, cross_entropy (and the metrics for config.metrics)
  outs = [_with_varying(row, varying)] * len(recipe.row_type(config)._fields)
  if weighted:  # the weighted total
    outs.append(_with_varying(row.update(
        shape=(), **({} if total_sharding is None else {"sharding": total_sharding})), varying))
  if with_grad:
    outs.append(_with_varying(logits.update(weak_type=False), varying))
  return outs


_loop_p.def_abstract_eval(_abstract_eval)


def _jvp(primals, tangents, *, jvp: Loop | None, default: Loop, platforms, mesh, **params):
  del default, platforms, mesh
  if jvp is None:
    raise ValueError(
        "implementation='pallas' has no forward-mode derivative (jax.jvp, jax.jacfwd, "
        "jax.hessian, gradients of gradients): the kernels are differentiated in reverse mode "
        "only. Use implementation=None or 'blocked' (reverse-mode derivatives of any order, "
        "jax.hessian) or 'reference' (every JAX transformation).")
  differentiated = [i for i, t in enumerate(tangents) if type(t) is not ad.Zero]

  def fn(*inputs):
    operands = list(primals)
    for i, x in zip(differentiated, inputs, strict=True):
      operands[i] = x
    return _run(jvp, *operands, **params)

  return jax.jvp(fn, [primals[i] for i in differentiated],
                 [tangents[i] for i in differentiated])


ad.primitive_jvps[_loop_p] = _jvp


def _batch(operands, dims, *, weighted: bool, num_others: int, **params):
  size = next(x.shape[d] for x, d in zip(operands, dims, strict=True) if d is not None)
  num_rows = 1 + weighted + num_others  # operands with a token axis first
  params = dict(params, weighted=weighted, num_others=num_others)
  if all(d is None for d in dims[num_rows:]):
    # Rows are independent: [batch, tokens, ...] is [batch * tokens, ...].
    rows = [batching.bdim_at_front(x, d, size) for x, d in
            zip(operands[:num_rows], dims[:num_rows], strict=True)]
    num_tokens = rows[0].shape[1]
    folded = [x.reshape((size * num_tokens,) + x.shape[2:]) for x in rows]
    outs = _loop_p.bind(*folded, *operands[num_rows:], **params)
    outs = [o.reshape((size, num_tokens) + o.shape[1:]) if o.ndim else o for o in outs]
    if weighted:  # the loop's total is the whole batch's: each batch entry's instead
      num_fields = len(recipe.row_type(params["config"])._fields)
      outs[num_fields] = jax.vmap(reductions.weighted_total)(outs[0], rows[1])
    return outs, [0] * len(outs)
  batched = [batching.bdim_at_front(x, d, size) for x, d in zip(operands, dims, strict=True)]
  outs = lax.map(lambda xs: tuple(_loop_p.bind(*xs, **params)), tuple(batched))
  return list(outs), [0] * len(outs)


batching.primitive_batchers[_loop_p] = _batch


def _lowering(platform: str | None):
  def rule(ctx, *operands, default: Loop, platforms, jvp, mesh, **params):
    del jvp
    loop = dict(platforms).get(platform, default) if platform else default
    with jax.sharding.use_abstract_mesh(mesh):
      return mlir.lower_fun(functools.partial(_run, loop, **params), multiple_results=True)(
          ctx, *operands)
  return rule


mlir.register_lowering(_loop_p, _lowering(None))
for _platform in PLATFORMS:
  mlir.register_lowering(_loop_p, _lowering(_platform), platform=_platform)
