"""Which engine computes a loss: the ``implementation=`` argument of every public loss.

* ``"reference"``: the readable definition (``reference.py``): whole arrays, ``jax.nn`` and
  autodiff. The oracle the other implementations are tested against; memory ``O(tokens *
  vocab)`` in float32.
* ``"blocked"``: the token-blocked engines (``dense.py`` for materialised logits, dense or sparse
  teachers; ``fused.py`` for the fused linear head): analytic gradients computed with the values,
  temporaries ``O(block * vocab)``. Blocks are sized per platform (``blocking.py``): about 1 MiB
  of float32 per block on CPU, 64 MiB on GPUs and TPUs.
* ``None`` (the default): the best implementation for the problem, chosen at trace time from
  its size. Every platform runs the blocked engines today, except problems small enough that
  the reference's whole-array fusions beat the loop (:data:`SMALL_PROBLEM`).

All implementations compute the same function, with the same conventions, to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from kdjax._src import checks, dense, reductions
from kdjax._src.config import Config
from kdjax._src.recipe import Rows

Array = jax.Array

IMPLEMENTATIONS = ("reference", "blocked")

# Up to this many logits per call the default is the reference: at these sizes one whole-array
# fusion costs less than the blocked loop, and its float32 temporaries are small (measured by
# benchmarks/bench_kd_loss.py --small).
SMALL_PROBLEM = 0


def check(implementation: str | None) -> str | None:
  """``implementation`` when it is None or the name of an implementation; else ValueError."""
  if implementation is None:
    return None
  if isinstance(implementation, str) and implementation == "pallas":
    raise ValueError(
        "implementation='pallas' (GPU and TPU kernels) is not available in this version of "
        f"kdjax; use one of {IMPLEMENTATIONS} or None.")
  return checks.one_of("implementation", implementation, IMPLEMENTATIONS)


def choose(config: Config, num_logits: int) -> str:
  """The implementation that runs: the one asked for, or the default for the size.

  With the vocabulary split over a mesh axis only the blocked engines apply.
  """
  if config.implementation is not None:
    return config.implementation
  if config.axis_name is None and num_logits <= SMALL_PROBLEM:
    return "reference"
  return "blocked"


def materialised(config: Config, traced: Mapping[str, Array], logits: Array,
                 others: Sequence[Array], weights: Array | None, *, mask: Array,
                 block_fn: dense.BlockFn,
                 reference_fn: Callable[..., Rows]) -> tuple[Rows, Array | None]:
  """Per-token rows of materialised ``logits`` and, with ``weights``, ``sum(weights * value)``.

  ``block_fn`` is the blocked engine's block function and ``reference_fn`` the readable
  definition, both taking ``(logits, *others)``; ``mask`` marks the counted tokens. Without
  ``weights`` the rows' ``value`` is differentiable; with them the total is (and the rows are
  under ``stop_gradient``).
  """
  if choose(config, logits.size) == "reference":
    rows = reference_fn(config, traced, logits, *others, counted=mask)
    if weights is None:
      return rows, None
    total = reductions.weighted_total(rows.value, weights)
    return jax.tree.map(jax.lax.stop_gradient, rows), total
  loop = dense.blocked(block_fn)
  if weights is None:
    return dense.per_token(loop, config, traced, logits, *others), None
  total, rows = dense.weighted_sum(loop, config, traced, logits, weights, *others)
  return rows, total
