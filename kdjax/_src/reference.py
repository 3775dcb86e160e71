"""The readable definition of every loss (``implementation="reference"``).

Whole ``[tokens, vocab]`` arrays, ``jax.nn.log_softmax``, the divergences' value terms
(``divergences.py``) and ``jnp.where`` for the conventions, differentiated by JAX autodiff. It is
the oracle every other implementation is tested against, in float32 and float64. It keeps
several ``[tokens, vocab]`` float32 arrays alive for the backward pass: use it to check, or for
small problems.

With ``config.metrics`` it also computes the metrics of ``recipe.MetricRows`` from the same
distributions: the entropies ``-sum p log p`` and the top-1 agreement of ``jnp.argmax``.

It follows the conventions of the other implementations exactly: logits are shifted by their row
maximum before they are divided by the temperature; a row with no mass contributes 0; a NaN or
``+inf`` logit, or a hard label outside ``[0, vocab)``, makes its token's value NaN; the inputs
of a token that is not counted are replaced by zeros first, so whatever they hold never reaches
a gradient. It computes in float32, or in float64 for float64 inputs (with ``jax_enable_x64``):
the tests check it against an independent float64 NumPy formula that way.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from kdjax._src import divergences as div
from kdjax._src.config import Config
from kdjax._src.recipe import MetricRows, Rows

Array = jax.Array


def log_softmax(logits: Array, inv_temperature) -> Array:
  """``log softmax(logits / T)`` over the last axis; ``-inf`` everywhere in a row of ``-inf``."""
  row_max = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  empty = row_max == -jnp.inf
  scaled = jnp.where(empty, 0.0, logits - jnp.where(empty, 0.0, row_max)) * inv_temperature
  return jnp.where(empty, -jnp.inf, jax.nn.log_softmax(scaled, axis=-1))


def _inputs(x: Array, counted: Array | None) -> Array:
  """``x`` in the compute dtype, with the rows of uncounted tokens replaced by zeros."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if counted is None:
    return x
  return jnp.where(counted[..., None], x, jnp.zeros((), x.dtype))


def _not_a_distribution(logits: Array) -> Array:
  return jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)


def _finish(config: Config, hp: Mapping, divergence: Array, empty: Array,
            invalid: Array) -> Array:
  scale = jnp.square(hp["temperature"]) if config.temperature_squared else 1.0
  return jnp.where(invalid, jnp.nan, jnp.where(empty, 0.0, scale * divergence))


def _entropy(d: div.Dist) -> Array:
  return -jnp.sum(jnp.where(d.has_mass, d.prob * d.safe_log, 0.0), axis=-1)


def _with_metrics(config: Config, rows: Rows, entropies: tuple[Array, Array],
                  tops: tuple[Array, Array], bad: tuple[Array, Array],
                  empty: Array) -> Rows | MetricRows:
  """``rows`` with the metrics of the (student, teacher) pairs ``entropies`` and top-1 ``tops``,
  NaN on a ``bad`` side, the agreement 0 where a side is ``empty``."""
  if not config.metrics:
    return rows
  student_bad, teacher_bad = bad
  agree = jnp.where(empty, 0.0, (tops[0] == tops[1]).astype(rows.value.dtype))
  return MetricRows(*rows, lax.stop_gradient(jnp.where(student_bad, jnp.nan, entropies[0])),
                    lax.stop_gradient(jnp.where(teacher_bad, jnp.nan, entropies[1])),
                    jnp.where(student_bad | teacher_bad, jnp.nan, agree))


def per_token(config: Config, traced: Mapping[str, Array], logits: Array,
              teacher_logits: Array, labels: Array | None = None, *,
              counted: Array | None = None) -> Rows | MetricRows:
  """Per-token rows of ``[..., vocab]`` logits; only ``value`` carries a gradient.

  ``counted`` (bool ``[...]``, optional) marks the tokens whose value is used.
  """
  hp = config.hyperparameters_with(traced)
  inv_temperature = 1.0 / hp["temperature"]
  student = _inputs(logits, counted)
  teacher = _inputs(lax.stop_gradient(teacher_logits), counted)
  q = div.dist(log_softmax(student, inv_temperature))
  p = div.dist(log_softmax(teacher, inv_temperature))
  terms = div.DIVERGENCES[config.divergence].terms(p, q, hp)
  empty = jnp.all(student == -jnp.inf, axis=-1) | jnp.all(teacher == -jnp.inf, axis=-1)
  bad = _not_a_distribution(student), _not_a_distribution(teacher)
  invalid = bad[0] | bad[1]
  divergence = _finish(config, hp, jnp.sum(terms.value, axis=-1), empty, invalid)
  metrics = ((_entropy(q), _entropy(p)),
             (jnp.argmax(student, axis=-1), jnp.argmax(teacher, axis=-1)), bad, empty)
  if not config.cross_entropy:
    return _with_metrics(config, Rows(divergence, lax.stop_gradient(divergence),
                                      jnp.zeros_like(divergence)), *metrics)
  vocab = student.shape[-1]
  valid = (labels >= 0) & (labels < vocab)  # type: ignore[operator]  # cross entropy: given
  label_log_prob = jnp.take_along_axis(
      log_softmax(student, 1.0), jnp.clip(labels, 0, vocab - 1)[..., None], axis=-1)[..., 0]
  cross_entropy = jnp.where(valid, -label_log_prob, jnp.nan)
  kd_coef = hp["kd_coef"]
  # kd_coef 0 or 1 drops the other term exactly (0 * inf is NaN); an invalid label stays NaN.
  hard = jnp.where(kd_coef == 1, jnp.where(valid, 0.0, jnp.nan), (1.0 - kd_coef) * cross_entropy)
  value = jnp.where(kd_coef == 0, 0.0, kd_coef * divergence) + hard
  return _with_metrics(config, Rows(value, lax.stop_gradient(divergence),
                                    lax.stop_gradient(cross_entropy)), *metrics)


def sparse_per_token(config: Config, traced: Mapping[str, Array], logits: Array,
                     teacher_ids: Array, teacher_logprobs: Array, *,
                     counted: Array | None = None) -> Rows | MetricRows:
  """Per-token rows of the student ``[..., vocab]`` against a top-k teacher (``[..., k]``)."""
  hp = config.hyperparameters_with(traced)
  student = _inputs(logits, counted)
  if counted is not None:
    teacher_ids = jnp.where(counted[..., None], teacher_ids, 0)
    teacher_logprobs = jnp.where(counted[..., None], teacher_logprobs, 0.0)
  vocab = student.shape[-1]
  log_q = log_softmax(student, 1.0 / hp["temperature"])
  log_q_top = jnp.take_along_axis(log_q, teacher_ids, axis=-1, mode="fill",
                                  fill_value=-jnp.inf)
  log_p_top = lax.stop_gradient(teacher_logprobs).astype(student.dtype)
  if config.tail == "renormalize":
    log_q_top, log_p_top = log_softmax(log_q_top, 1.0), log_softmax(log_p_top, 1.0)
  elif config.tail == "bucket":
    in_top = jnp.any(teacher_ids[..., :, None] == jnp.arange(vocab), axis=-2)
    q_rest = jnp.sum(jnp.where(in_top, 0.0, jnp.exp(log_q)), axis=-1, keepdims=True)
    p_rest = jnp.maximum(1.0 - jnp.sum(jnp.exp(log_p_top), axis=-1, keepdims=True), 0.0)
    log_q_top = jnp.concatenate([log_q_top, _log(q_rest)], axis=-1)
    log_p_top = jnp.concatenate([log_p_top, _log(p_rest)], axis=-1)
  terms = div.DIVERGENCES[config.divergence].terms(div.dist(log_p_top), div.dist(log_q_top), hp)
  empty = jnp.all(teacher_logprobs == -jnp.inf, axis=-1)
  bad = _not_a_distribution(student), jnp.any(jnp.isnan(log_p_top), axis=-1)
  bad_ids = jnp.any((teacher_ids < 0) | (teacher_ids >= vocab), axis=-1)
  divergence = _finish(config, hp, jnp.sum(terms.value, axis=-1), empty,
                       bad[0] | bad[1] | bad_ids)
  rows = Rows(divergence, lax.stop_gradient(divergence), jnp.zeros_like(divergence))
  # The teacher's top-1 token: the lowest id of its largest stored log-probability.
  largest = teacher_logprobs == jnp.max(teacher_logprobs, axis=-1, keepdims=True)
  teacher_top = jnp.min(jnp.where(largest, teacher_ids, jnp.iinfo(teacher_ids.dtype).max),
                        axis=-1)
  return _with_metrics(
      config, rows, entropies=(_entropy(div.dist(log_q)), _entropy(div.dist(log_p_top))),
      tops=(jnp.argmax(student, axis=-1), teacher_top), bad=(bad[0] | bad_ids, bad[1] | bad_ids),
      empty=empty | jnp.all(student == -jnp.inf, axis=-1))


def _log(x: Array) -> Array:
  return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def _sorted_descending(prob: Array, top_k: int | None) -> Array:
  return -jnp.sort(-prob, axis=-1)[..., :top_k]


def _zero_padded(x: Array, width: int) -> Array:
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def uld_per_token(config: Config, traced: Mapping[str, Array], logits: Array,
                  teacher_logits: Array, *, counted: Array | None = None) -> Rows:
  """Universal Logit Distillation per token: student ``[..., V_s]``, teacher ``[..., V_t]``.

  Both softmaxes sorted in descending order (the first ``top_k`` entries of each), the shorter
  padded with zeros, then the L1 distance. ``jnp.sort`` is differentiated by autodiff: tied
  student probabilities take their ranks in the order of their ids.
  """
  hp = config.hyperparameters_with(traced)
  student = _inputs(logits, counted)
  teacher = _inputs(lax.stop_gradient(teacher_logits), counted)
  q = jnp.exp(log_softmax(student, 1.0 / hp["temperature"]))
  p = jnp.exp(log_softmax(teacher, 1.0 / hp["teacher_temperature"]))
  q_sorted = _sorted_descending(q, config.top_k)
  p_sorted = _sorted_descending(p, config.top_k)
  width = max(q_sorted.shape[-1], p_sorted.shape[-1])
  distance = jnp.sum(jnp.abs(_zero_padded(q_sorted, width) - _zero_padded(p_sorted, width)),
                     axis=-1)
  empty = jnp.all(student == -jnp.inf, axis=-1) | jnp.all(teacher == -jnp.inf, axis=-1)
  invalid = _not_a_distribution(student) | _not_a_distribution(teacher)
  value = _finish(config, hp, distance, empty, invalid)
  return Rows(value, lax.stop_gradient(value), jnp.zeros_like(value))
