"""The static configuration of one loss call, and its traced hyperparameters.

A public loss validates its arguments (``checks.py``) and then calls :func:`build` once. What is
known at trace time becomes one hashable :class:`Config` -- a ``jax.jit`` static argument and a
``jax.custom_vjp`` non-differentiable argument -- and every hyperparameter given as an array (a
scheduled temperature, say) goes into one dict of float32 scalars, ``traced``. Both travel down
to the engines unchanged; the engines read hyperparameters through
:meth:`Config.hyperparameters_with`, the one place where the two halves meet again.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Config(NamedTuple):
  """Everything static about one loss call (hashable).

  Engines read the fields they need and ignore the others.
  """

  divergence: str = "forward_kl"
  # Hyperparameters given as Python numbers: (name, value) pairs, sorted by name.
  static_hp: tuple[tuple[str, float], ...] = ()
  temperature_squared: bool = False
  # The hard-label cross entropy term (weighted by the hyperparameter ``kd_coef``).
  cross_entropy: bool = False
  reduction: str = "mean"
  ignore_index: int = -100
  implementation: str | None = None
  token_block: int | None = None
  vocab_block: int | None = None
  # Mesh axes inside shard_map: the vocabulary's (statistics are pmax/psum-ed over it) and the
  # tokens' (the reduction over tokens is global over it).
  axis_name: Hashable | None = None
  data_axis_name: Hashable | None = None
  tail: str | None = None  # sparse teachers: what to do with the mass outside the top k.
  top_k: int | None = None  # ULD: sorted entries compared per token (None: all of them).
  # The metrics forms: per-token entropies and top-1 agreement with the values
  # (recipe.MetricRows), from the same walk over the logits.
  metrics: bool = False

  def hyperparameters_with(self, traced: Mapping[str, Array]) -> dict[str, Any]:
    """The static and traced hyperparameters as one dict, by name."""
    return {**dict(self.static_hp), **traced}

  def is_static(self, name: str, value: float) -> bool:
    """Whether hyperparameter ``name`` is the Python number ``value`` (decided at trace time)."""
    return dict(self.static_hp).get(name) == value


def build(hyperparameters: Mapping[str, float | Array | None],
          **fields: Any) -> tuple[Config, dict[str, Array]]:
  """Splits validated hyperparameters into the static config and the traced dict.

  ``hyperparameters`` hold Python floats (static) or scalar arrays (traced); a None entry is a
  hyperparameter that is not used. ``fields`` are the other :class:`Config` fields.
  """
  static = tuple(sorted(
      (name, float(value)) for name, value in hyperparameters.items()
      if isinstance(value, float)))
  traced = {
      name: jnp.asarray(value, jnp.float32) for name, value in hyperparameters.items()
      if value is not None and not isinstance(value, float)}
  return Config(static_hp=static, **fields), traced


def zero_cotangents(traced: Mapping[str, Array]) -> dict[str, Array]:
  """The gradient of a loss with respect to its traced hyperparameters: none flows to them."""
  return jax.tree.map(jnp.zeros_like, dict(traced))
