"""Which engine computes a loss: the ``implementation=`` argument of every public loss.

* ``"reference"``: the readable definition (``reference.py``): whole arrays, ``jax.nn`` and
  autodiff. The oracle the other implementations are tested against; memory ``O(tokens *
  vocab)`` in float32.
* ``"blocked"``: the token-blocked engines (``dense.py`` for materialised logits, dense or sparse
  teachers; ``fused.py`` for the fused linear head): analytic gradients computed with the values,
  temporaries ``O(block * vocab)``. Blocks are sized per platform (``blocking.py``): about 1 MiB
  of float32 per block on CPU, 64 MiB on GPUs and TPUs.
* ``"pallas"``: kernels (``pallas.py``) for the dense losses on materialised logits with dense
  teachers: one pass over the logits per row block, an online log-sum-exp over vocabulary
  tiles. Pallas' Triton backend on NVIDIA GPUs, Mosaic on TPUs; on CPU the Triton kernel runs in
  Pallas interpret mode, a testing aid (slow). On a mesh each device runs the kernel on its own
  tokens (:func:`token_split`). Where no kernel applies (a vocabulary sharded over a mesh axis,
  tokens that do not split evenly over the mesh, a dtype the kernels do not take, a TPU block
  that does not fit VMEM) it is a ValueError that says why: ``"pallas"`` never runs another
  engine for the loss. The metrics forms (``*_with_metrics``) are the exception: the kernels
  compute the loss alone, so with ``"pallas"`` (and by default on GPUs and TPUs) they run the
  blocked engine.
* ``None`` (the default): the best implementation for the platform the program is lowered for
  (``platforms.per_platform``: only that platform's engine is traced): the blocked engine on CPU,
  the kernels on GPUs and TPUs where they apply (per device on a mesh), the blocked engine
  elsewhere. On CPU the blocked
  engine is faster than the reference at every size measured, from 8 x 128 to 2048 x 32000
  (value and gradient, ``benchmarks/bench_kd_loss.py --small``), and it keeps no ``[tokens,
  vocab]`` float32 array.

All implementations compute the same function, with the same conventions, to float32 rounding.
The engines are reverse-mode (``jax.grad``, ``jax.vjp``: a ``custom_vjp``); their second
derivatives (``jax.hessian``, gradients of gradients) are the blocked engine's on every platform,
and ``"pallas"`` has none. Forward mode (``jax.jvp``, ``jax.jacfwd``) is the reference's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kdjax._src import checks, dense, pallas, platforms, reductions
from kdjax._src.config import Config
from kdjax._src.recipe import MetricRows, Rows

Array = jax.Array

IMPLEMENTATIONS = ("reference", "blocked", "pallas")


def check(implementation: str | None, *, kernels: bool = False) -> str | None:
  """``implementation`` when it is None or the name of an implementation; else ValueError.

  ``kernels``: whether the loss has Pallas kernels (the dense losses on materialised logits).
  """
  if implementation is None:
    return None
  checks.one_of("implementation", implementation, IMPLEMENTATIONS)
  if implementation == "pallas" and not kernels:
    raise ValueError(
        "implementation='pallas' has kernels for the dense losses on materialised logits "
        "(distill_loss, kd_loss, distill_with_cross_entropy and the per-token divergences); "
        "use 'blocked', 'reference' or None for this one.")
  return implementation


def choose(config: Config, num_logits: int) -> str:
  """The implementation that runs: the one asked for, or the default (``"blocked"`` stands for
  the per-platform default of :func:`dense_loop`). ``num_logits`` is tokens times vocabulary:
  every size measured favours the blocked engine over the reference (see the module docstring).
  """
  del num_logits
  return config.implementation or "blocked"


def dense_loop(config: Config, block_fn: dense.BlockFn, *, kernels: bool) -> dense.Loop:
  """The loop of materialised logits for each platform.

  ``kernels``: ``block_fn`` is ``dense.teacher_logits_block``, which the Pallas kernels
  compute. The default runs the blocked engine on CPU and wherever no kernel applies, and
  differentiates it in forward mode on every platform; ``implementation="pallas"`` runs the
  interpreted kernel on CPU, refuses (``ValueError``) where no kernel applies, and has no
  forward mode. Only the loop of the platform lowered for is traced
  (``platforms.per_platform``); on a mesh each device runs the kernel on its own tokens
  (:func:`kernel_loop`). With ``config.metrics`` every platform runs the blocked engine,
  ``implementation="pallas"`` included: the kernels compute the loss's rows only.
  """
  blocked = dense.blocked(block_fn)
  if not kernels or config.implementation == "blocked":
    return blocked
  if config.metrics:  # The kernels compute the loss alone: the metrics forms run blocked.
    return platforms.per_platform(cpu=dense.blocked(block_fn, platform="cpu"), default=blocked,
                                  jvp=blocked)
  if config.implementation == "pallas":
    return _checked(platforms.per_platform(
        cpu=kernel_loop(pallas.INTERPRET, blocked, strict=True),
        cuda=kernel_loop(pallas.TRITON, blocked, strict=True),
        tpu=kernel_loop(pallas.MOSAIC, blocked, strict=True), default=blocked, jvp=None))
  return platforms.per_platform(
      cpu=dense.blocked(block_fn, platform="cpu"),
      cuda=kernel_loop(pallas.TRITON, blocked, strict=False),
      tpu=kernel_loop(pallas.MOSAIC, blocked, strict=False), default=blocked, jvp=blocked)


# ----------------------------------------------------------------------------------------------
# The kernels on a mesh.
# ----------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class _Tokens(NamedTuple):
  """How the tokens of a loss are split over a mesh for the kernels: ``shard_map`` over
  ``mesh``'s ``manual`` axes, each device taking its share of the tokens along ``axes``."""

  mesh: Any  # jax.sharding.AbstractMesh
  manual: frozenset  # the axes shard_map makes manual: every axis not manual yet.
  axes: tuple  # the axes the token axis is split over, in mesh order.


def token_split(logits: Array, others: Sequence[Array]) -> _Tokens | str | None:
  """How the kernels run on the mesh of ``logits`` (``[tokens, vocab]``) and ``others`` (per-token
  inputs, the teacher's logits first): None without a mesh (or inside ``shard_map`` over all of
  it), where the kernel runs as it is; a :class:`_Tokens` split; or why no kernel applies.

  XLA cannot partition a Pallas call, so on a mesh each device runs the kernel on its own tokens
  under ``shard_map``. With ``Explicit`` axes the arrays' types say how they are sharded: the
  tokens are split as the logits' are (devices along other axes compute the same rows, as the
  logits' copies there ask), and a vocabulary sharded over an axis has no kernel. With ``Auto``
  axes the sharding is not known until XLA partitions the program, so the split is a guess: the
  tokens over the one axis of more than one device. With several such axes there is no kernel: a
  guess that differs from the producer's sharding costs the partitioner gathers of token-sized
  arrays (splitting over both axes of a (2, 4) mesh whose tokens are sharded over the first made
  it gather the hidden states and the logits' gradient for the head's gradient).
  """
  mesh = None
  for aval in (*(jax.typeof(x) for x in (logits, *others)), None):
    candidate = (getattr(getattr(aval, "sharding", None), "mesh", None) if aval is not None
                 else jax.sharding.get_abstract_mesh())
    if candidate is not None and getattr(candidate, "shape", None):
      mesh = candidate
      break
  if mesh is None:
    return None
  manual = set(getattr(mesh, "manual_axes", ()))
  free = [name for name in mesh.axis_names if name not in manual]
  types = {name: t for name, t in zip(mesh.axis_names, mesh.axis_types, strict=True)}
  explicit = [name for name in free if types[name] == jax.sharding.AxisType.Explicit]
  if not explicit and math.prod(mesh.shape[name] for name in free) == 1:
    return None
  if explicit and len(explicit) < len(free):
    return (f"the mesh mixes Explicit axes {tuple(explicit)} with Auto axes "
            f"{tuple(n for n in free if n not in explicit)}: the kernels need either")
  if explicit:
    for name, x in (("logits", logits), ("teacher_logits", others[0])):
      spec = tuple(getattr(jax.typeof(x).sharding, "spec", ()))
      vocab_axes = _axes(spec[1]) if len(spec) > 1 else ()
      if vocab_axes:
        return (f"the vocabulary ({name}' last axis) is sharded over mesh axes {vocab_axes}; the "
                f"kernels need whole rows on each device")
    spec = tuple(jax.typeof(logits).sharding.spec)
    axes = _axes(spec[0]) if spec else ()
  else:
    axes = tuple(name for name in free if mesh.shape[name] > 1)
    if len(axes) > 1:
      return (f"the mesh's Auto axes {axes} leave the tokens' sharding unknown when the program "
              "is traced; with Explicit axes the kernels follow the arrays' shardings")
  devices = math.prod(mesh.shape[name] for name in axes)
  if logits.shape[0] % devices:
    return (f"the {logits.shape[0]} tokens do not split evenly over the {devices} devices of "
            f"mesh axes {axes}")
  return _Tokens(mesh, frozenset(free), axes)


def _axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


@functools.cache
def kernel_loop(variant: pallas.Variant, blocked: dense.Loop, *, strict: bool) -> dense.Loop:
  """The kernel ``variant`` as a loop that also runs on a mesh (:func:`token_split`); where no
  kernel applies, ``blocked`` runs, or with ``strict`` a ValueError says why."""
  fallback = functools.partial(_refuse, variant, blocked) if strict else blocked
  return functools.partial(_kernel_on_mesh, pallas.loop(variant, fallback), blocked, strict)


def _kernel_on_mesh(kernel: dense.Loop, blocked: dense.Loop, strict: bool, config: Config,
                    traced: Mapping[str, Array], logits: Array, weights: Array | None,
                    others: Sequence[Array], *, with_grad: bool) -> tuple[Array, ...]:
  split = token_split(logits, others)
  if split is None:
    return kernel(config, traced, logits, weights, others, with_grad=with_grad)
  if isinstance(split, str):
    if strict:
      raise ValueError(f"implementation='pallas': no kernel applies: {split}. "
                       "implementation=None runs the blocked engine there.")
    return blocked(config, traced, logits, weights, others, with_grad=with_grad)
  P = jax.sharding.PartitionSpec  # noqa: N806
  rows, block = P(split.axes), P(split.axes, None)
  arrays = (logits, *(() if weights is None else (weights,)), *others)
  specs = tuple(block if x.ndim > 1 else rows for x in arrays)
  if any(t == jax.sharding.AxisType.Explicit for t in split.mesh.axis_types):
    # Explicit types must match the specs: a teacher or labels sharded otherwise move first.
    arrays = tuple(
        x if tuple(jax.typeof(x).sharding.spec) == tuple(spec) + (None,) * (x.ndim - len(spec))
        else jax.sharding.reshard(x, jax.sharding.NamedSharding(split.mesh, spec))
        for x, spec in zip(arrays, specs, strict=True))

  def local(traced, logits, *rest):
    local_weights, *local_others = rest if weights is not None else (None, *rest)
    # The rows alone (a fallback loop's total would be this device's share): the total is
    # summed from the rows after.
    return dense.loop_results(
        config, kernel(config, traced, logits, local_weights, tuple(local_others),
                       with_grad=with_grad), local_weights, with_grad=with_grad, total=False)

  num_rows = len(Rows._fields)
  out_specs = (rows,) * num_rows + ((block,) if with_grad else ())
  # Interpret mode's masked loads do not type-check under shard_map's varying-axes check; every
  # output varies over the token axes, as out_specs say.
  return jax.shard_map(local, mesh=split.mesh, in_specs=(P(), *specs), out_specs=out_specs,
                       axis_names=split.manual, check_vma=False)(dict(traced), *arrays)


def _refuse(variant: pallas.Variant, blocked: dense.Loop, config: Config, traced, logits: Array,
            weights, others, *, with_grad: bool):
  """The fallback of ``implementation="pallas"``: a ValueError that says why (nothing to
  compute: the blocked engine's empty result)."""
  if logits.size == 0:
    return blocked(config, traced, logits, weights, others, with_grad=with_grad)
  teacher_logits = others[0]
  if logits.dtype not in _KERNEL_DTYPES or teacher_logits.dtype not in _KERNEL_DTYPES:
    why = (f"the kernels take float32, bfloat16 or float16 logits, not {logits.dtype} and "
           f"{teacher_logits.dtype}")
  elif variant.backend == "mosaic":
    why = (f"the TPU kernel's blocks of rows of {logits.shape[-1]} entries ({logits.dtype} and "
           f"{teacher_logits.dtype} logits, the gradient) do not fit the core's VMEM")
  else:
    why = f"the {variant.backend} kernel does not support {logits.dtype}{list(logits.shape)}"
  raise ValueError(f"implementation='pallas': no kernel applies: {why}. implementation=None "
                   "runs the blocked engine there.")


@functools.cache
def _checked(loop: dense.Loop) -> dense.Loop:
  return functools.partial(_check_then_run, loop)


def _check_then_run(loop: dense.Loop, config: Config, traced, logits: Array, weights, others, *,
                    with_grad: bool):
  """``loop`` after the checks that do not depend on the platform, at trace time."""
  split = token_split(logits, others)
  if isinstance(split, str):
    raise ValueError(f"implementation='pallas': no kernel applies: {split}. "
                     "implementation=None runs the blocked engine there.")
  return loop(config, traced, logits, weights, others, with_grad=with_grad)


def materialised(config: Config, traced: Mapping[str, Array], logits: Array,
                 others: Sequence[Array], weights: Array | None, *, mask: Array,
                 block_fn: dense.BlockFn, reference_fn: Callable[..., Rows | MetricRows],
                 kernels: bool = False) -> tuple[Rows | MetricRows, Array | None]:
  """Per-token rows of materialised ``logits`` (with their metrics for ``config.metrics``)
  and, with ``weights``, ``sum(weights * value)``.

  ``block_fn`` is the blocked engine's block function and ``reference_fn`` the readable
  definition, both taking ``(logits, *others)``; ``kernels``: the Pallas kernels compute
  ``block_fn`` (dense teachers). ``mask`` marks the counted tokens. Without ``weights`` the
  rows' ``value`` is differentiable; with them the total is (and the rows are under
  ``stop_gradient``).
  """
  if choose(config, logits.size) == "reference":
    rows = reference_fn(config, traced, logits, *others, counted=mask)
    if weights is None:
      return rows, None
    total = reductions.weighted_total(rows.value, weights)
    return jax.tree.map(jax.lax.stop_gradient, rows), total
  loop = dense_loop(config, block_fn, kernels=kernels)
  if weights is None:
    return dense.per_token(loop, config, traced, logits, *others), None
  total, rows = dense.weighted_sum(loop, config, traced, logits, weights, *others)
  return rows, total
