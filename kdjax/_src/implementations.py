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
  Pallas interpret mode, a testing aid (slow). Where a kernel does not apply (a TPU block that
  does not fit VMEM, another platform) the blocked engine runs instead.
* ``None`` (the default): the best implementation for the platform the program is lowered for
  (``platforms.per_platform``: only that platform's engine is traced): the blocked engine on CPU,
  the kernels on GPUs and TPUs where they apply, the blocked engine elsewhere. On CPU the blocked
  engine is faster than the reference at every size measured, from 8 x 128 to 2048 x 32000
  (value and gradient, ``benchmarks/bench_kd_loss.py --small``), and it keeps no ``[tokens,
  vocab]`` float32 array.

All implementations compute the same function, with the same conventions, to float32 rounding.
The engines are reverse-mode (``jax.grad``, ``jax.vjp``: a ``custom_vjp``); their second
derivatives (``jax.hessian``, gradients of gradients) are the blocked engine's on every platform,
and ``"pallas"`` has none. Forward mode (``jax.jvp``, ``jax.jacfwd``) is the reference's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from kdjax._src import checks, dense, pallas, platforms, reductions
from kdjax._src.config import Config
from kdjax._src.recipe import Rows

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
  interpreted kernel on CPU and has no forward mode. Only the loop of the platform lowered
  for is traced (``platforms.per_platform``).
  """
  blocked = dense.blocked(block_fn)
  if not kernels or config.implementation == "blocked":
    return blocked
  if config.implementation == "pallas":
    return platforms.per_platform(
        cpu=pallas.loop(pallas.INTERPRET, blocked), cuda=pallas.loop(pallas.TRITON, blocked),
        tpu=pallas.loop(pallas.MOSAIC, blocked), default=blocked, jvp=None)
  return platforms.per_platform(
      cpu=blocked, cuda=pallas.loop(pallas.TRITON, blocked),
      tpu=pallas.loop(pallas.MOSAIC, blocked), default=blocked, jvp=blocked)


def materialised(config: Config, traced: Mapping[str, Array], logits: Array,
                 others: Sequence[Array], weights: Array | None, *, mask: Array,
                 block_fn: dense.BlockFn, reference_fn: Callable[..., Rows],
                 kernels: bool = False) -> tuple[Rows, Array | None]:
  """Per-token rows of materialised ``logits`` and, with ``weights``, ``sum(weights * value)``.

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
