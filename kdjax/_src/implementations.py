"""Which engine computes a loss: the ``implementation=`` argument of every public loss.

* ``"reference"``: the readable definition (``reference.py``): whole arrays, ``jax.nn`` and
  autodiff. The oracle the other implementations are tested against; memory ``O(tokens *
  vocab)`` in float32.
* ``"blocked"``: the token-blocked engines (``dense.py`` for materialised logits, dense or sparse
  teachers; ``fused.py`` for the fused linear head): analytic gradients computed with the values,
  temporaries ``O(block * vocab)``.
* ``None`` (the default): the best implementation for the platform and the problem, chosen at
  trace time. Today that is the blocked engine everywhere: on CPU it is faster than the
  reference at every size measured, from 8 x 128 to 2048 x 32000 (value and gradient,
  ``benchmarks/bench_kd_loss.py --small``), and it keeps no ``[tokens, vocab]`` float32 array.

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
  """The implementation that runs: the one asked for, or the default for ``num_logits``
  (tokens times vocabulary) on this platform."""
  del num_logits  # Every size measured favours the blocked engine (see the module docstring).
  return config.implementation or "blocked"


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
  if weights is None:
    return dense.per_token(block_fn, config, traced, logits, *others), None
  total, rows = dense.weighted_sum(block_fn, config, traced, logits, weights, *others)
  return rows, total
