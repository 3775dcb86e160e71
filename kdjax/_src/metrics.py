"""Metrics of a distillation loss, from the pass over the logits that computes it.

The ``*_with_metrics`` form of a loss returns ``(loss, metrics)``: the loss exactly as the plain
function returns it (the same value and gradient) and a :class:`DistillMetrics`, what a
distillation run logs next to its loss. The block recipe computes the per-token values while it
holds each block's distributions (``recipe.MetricRows``): no second pass over the logits.

Per token, with :math:`p` and :math:`q` the teacher's and the student's softmax at the
distillation temperature :math:`T`:

* ``divergence``: the loss's divergence term before any reduction (times :math:`T^2` with
  ``temperature_squared``; the distillation term alone in a combined objective);
* ``student_entropy`` :math:`-\\sum_v q_v \\log q_v` and ``teacher_entropy``
  :math:`-\\sum_v p_v \\log p_v`, at :math:`T` (not scaled by :math:`T^2`), in nats, with
  ``0 log 0 = 0``: ``-inf`` logits add nothing and a row of ``-inf`` has entropy 0;
* ``top1_agreement``: 1 where the student's and the teacher's largest logits are at the same id,
  else 0. A tie goes to the lowest id on each side (``jnp.argmax``), and a row with no mass has
  no top-1 id: 0;
* ``cross_entropy``: the hard-label cross entropy at temperature 1, in the combined objectives.

A NaN or ``+inf`` logit makes that side's entropy, and the agreement, NaN. Each metric is then
reduced as the loss is -- the same mask, ``token_weights``, ``reduction`` and ``normalizer`` --
so with ``reduction="sum"`` it is the sum over counted tokens and ``(metric, token_count)`` is
its ``(sum, count)`` form, to add over hosts or accumulation steps and divide once. The metrics
carry no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from kdjax._src import reductions
from kdjax._src.recipe import MetricRows

Array = jax.Array


class TokenMetrics(NamedTuple):
  """The metrics of each token, float32 ``logits.shape[:-1]``, 0 where a token is not counted
  (NaN where its label or a traced hyperparameter is invalid, as the loss is).

  Attributes:
    divergence: the divergence term of each token's loss, before weights and reduction.
    student_entropy: the student's entropy at the temperature, in nats.
    teacher_entropy: the teacher's entropy at the temperature, in nats.
    top1_agreement: 1 where both models' most likely tokens agree, else 0.
    cross_entropy: the hard-label cross entropy (the combined objectives; else None).
    counted: bool, the tokens the loss counts.
  """

  divergence: Array
  student_entropy: Array
  teacher_entropy: Array
  top1_agreement: Array
  cross_entropy: Array | None
  counted: Array


class DistillMetrics(NamedTuple):
  """What a distillation loss's ``*_with_metrics`` form returns next to the loss.

  Every field but ``token_count`` and ``per_token`` is reduced as the loss is (its mask,
  ``token_weights``, ``reduction`` and ``normalizer``): a float32 scalar, or per-token values
  for ``reduction="none"``. With ``reduction="sum"``, ``(field, token_count)`` is the field's
  ``(sum, count)``: sum both over hosts, devices or gradient-accumulation steps and divide once.
  Entropies are at the distillation temperature, in nats; nothing here carries a gradient.

  Attributes:
    divergence: the divergence term (times ``T**2`` with ``temperature_squared``).
    student_entropy: the student's entropy :math:`-\\sum_v q_v \\log q_v`.
    teacher_entropy: the teacher's entropy :math:`-\\sum_v p_v \\log p_v`.
    top1_agreement: the fraction of tokens whose top-1 ids agree (ties: the lowest id).
    cross_entropy: the hard-label cross entropy (the combined objectives; else None).
    token_count: the number of counted tokens (float32).
    per_token: the unreduced :class:`TokenMetrics`.
  """

  divergence: Array
  student_entropy: Array
  teacher_entropy: Array
  top1_agreement: Array
  cross_entropy: Array | None
  token_count: Array
  per_token: TokenMetrics


_METRICS = ("divergence", "student_entropy", "teacher_entropy", "top1_agreement")


def from_rows(rows: MetricRows, mask: Array, *, cross_entropy: bool, reduction: str,
              normalizer: Array | None = None, invalid: Array | None = None,
              token_weights: Array | None = None) -> DistillMetrics:
  """The :class:`DistillMetrics` of per-token ``rows`` (``mask.shape``), reduced as the loss
  (``reductions.reduce``'s arguments), under ``stop_gradient``."""

  def both(x: Array) -> tuple[Array, Array]:  # (reduced, per token)
    x = lax.stop_gradient(x)
    return (reductions.reduce(x, mask, reduction=reduction, normalizer=normalizer,
                              invalid=invalid, token_weights=token_weights),
            reductions.reduce(x, mask, reduction="none", invalid=invalid))

  divergence, student_entropy, teacher_entropy, top1_agreement = (
      both(getattr(rows, name)) for name in _METRICS)
  ce = both(rows.cross_entropy) if cross_entropy else (None, None)
  return DistillMetrics(
      divergence[0], student_entropy[0], teacher_entropy[0], top1_agreement[0], ce[0],
      jnp.sum(mask).astype(jnp.float32),
      TokenMetrics(divergence[1], student_entropy[1], teacher_entropy[1], top1_agreement[1],
                   ce[1], mask))


def out_specs(loss_spec: PartitionSpec, token_spec: PartitionSpec, *,
              cross_entropy: bool) -> tuple[PartitionSpec, DistillMetrics]:
  """The shardings of ``(loss, metrics)`` on a mesh, as a pytree like them: the reduced
  metrics like the loss (``loss_spec``), the per-token ones like the tokens."""
  ce, token_ce = (loss_spec, token_spec) if cross_entropy else (None, None)
  per_token = TokenMetrics._make((token_spec,) * 4 + (token_ce, token_spec))
  return loss_spec, DistillMetrics._make(
      (loss_spec,) * 4 + (ce, PartitionSpec(), per_token))
