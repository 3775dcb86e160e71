"""The one definition of every divergence kdjax computes.

Conventions
-----------
Every divergence compares a teacher distribution ``p`` with a student distribution ``q`` over the
same vocabulary. Both arrive as *log-probabilities* ``log_p = t - lse(t)`` and
``log_q = s - lse(s)``, where ``s`` and ``t`` are the float32 logits already divided by the
temperature and ``lse`` is the row log-sum-exp (a per-token statistic).

A divergence is written here once, as two elementwise arrays over the vocabulary:

* ``terms``: the per-entry contribution, whose sum over the vocabulary is the per-token value;
* ``dterms``: the partial derivative of ``terms`` with respect to ``log_q`` at that entry.

Because ``d log_q[v] / d s[j] = delta(v, j) - q[j]``, the gradient of the per-token value with
respect to the scaled student logits is

.. math::

    \\frac{\\partial D}{\\partial s_j} = g_j - q_j \\sum_v g_v, \\qquad g = \\text{dterms},

so every path in the library (dense, fused linear head, vocabulary-parallel, sparse) needs only
the elementwise definitions below plus three per-token statistics: ``lse(s)``, ``lse(t)`` and
``sum(g)``. Paths differ only in how they obtain the logits and how they reduce over the
vocabulary (one array, a loop over vocabulary blocks, or a ``psum`` across devices).

Numerical conventions (documented once, used everywhere):

* ``0 * log 0 = 0``: an entry where the first argument of a KL term has no mass contributes 0;
* an entry ``x * log(x / 0)`` -- the compared distribution has no mass where the other has some,
  which happens only at ``-inf`` logits -- contributes 0 instead of ``+inf``. For the student side
  this is OpenRLHF's ``masked_fill(isinf(logits), 0)``; kdjax applies the same rule to the teacher
  so reverse KL stays finite. The loss is then blind to mass on entries the other side forbids:
  mask padded vocabulary entries on both sides alike.
* a token whose student or teacher logits are all ``-inf`` (an empty distribution, for
  example a fully masked position) contributes 0 and gets a zero gradient.
* ``+inf`` and NaN logits are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Any  # a Python float or a float32 scalar array (traced under jit).


class Terms(NamedTuple):
  """Elementwise value terms and their derivative with respect to ``log_q``."""

  value: Array
  dlog_q: Array


class _Dist(NamedTuple):
  """One distribution in log space, with the masks the conventions above need."""

  log: Array  # log-probabilities, -inf where there is no mass.
  prob: Array  # exp(log), exactly 0 where log is -inf.
  has_mass: Array  # bool, log > -inf.
  safe_log: Array  # log where has_mass, else 0 (keeps unselected branches finite).


def _dist(log: Array) -> _Dist:
  has_mass = log > -jnp.inf
  return _Dist(log, jnp.exp(log), has_mass, jnp.where(has_mass, log, 0.0))


def _mixture(weight_a: Scalar, a: _Dist, b: _Dist) -> _Dist:
  """``weight_a * a + (1 - weight_a) * b`` in probability space.

  Probability space costs one log per entry instead of a log-add-exp. Entries whose
  probabilities both underflow get no mass, and every term that would read them is then 0 by the
  conventions, which is their float32 value anyway.
  """
  prob = weight_a * a.prob + (1.0 - weight_a) * b.prob
  has_mass = prob > 0
  safe_log = jnp.log(jnp.where(has_mass, prob, 1.0))
  return _Dist(jnp.where(has_mass, safe_log, -jnp.inf), prob, has_mass, safe_log)


def _kl_terms(x: _Dist, y: _Dist) -> Array:
  """``x * (log x - log y)`` with ``0 log 0 = 0`` and ``x log(x / 0) := 0``."""
  both = x.has_mass & y.has_mass
  return jnp.where(both, x.prob * (x.safe_log - y.safe_log), 0.0)


# ----------------------------------------------------------------------------------------------
# The divergences. Each takes (teacher, student, hyperparameters) and returns Terms.
# ----------------------------------------------------------------------------------------------


def _soft_cross_entropy(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  del hp
  both = p.has_mass & q.has_mass
  return Terms(jnp.where(both, -p.prob * q.safe_log, 0.0), jnp.where(both, -p.prob, 0.0))


def _forward_kl(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  del hp
  both = p.has_mass & q.has_mass
  return Terms(_kl_terms(p, q), jnp.where(both, -p.prob, 0.0))


def _reverse_kl(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  del hp
  both = p.has_mass & q.has_mass
  value = _kl_terms(q, p)
  return Terms(value, jnp.where(both, value + q.prob, 0.0))


def _jsd_interior(p: _Dist, q: _Dist, beta: Scalar) -> Terms:
  m = _mixture(beta, p, q)
  student_side = _kl_terms(q, m)
  value = beta * _kl_terms(p, m) + (1.0 - beta) * student_side
  # d/dlog_q of the two KL terms; the mixture's own derivative cancels exactly.
  return Terms(value, (1.0 - beta) * student_side)


def _generalized_jsd(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  beta = hp["beta"]
  if isinstance(beta, (int, float)):  # Static: pick the branch at trace time.
    if beta == 0:
      return _forward_kl(p, q, hp)
    if beta == 1:
      return _reverse_kl(p, q, hp)
    return _jsd_interior(p, q, beta)
  # Traced beta (for example a schedule): TRL's endpoints are special cases, not limits of the
  # interior formula (which tends to 0 at both ends), so select them explicitly.
  interior = _jsd_interior(p, q, beta)
  forward = _forward_kl(p, q, hp)
  reverse = _reverse_kl(p, q, hp)
  return Terms(*(
      jnp.where(beta == 0, f, jnp.where(beta == 1, r, i))
      for f, r, i in zip(forward, reverse, interior, strict=True)
  ))


def _skew_forward_kl(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  alpha = hp["alpha"]
  m = _mixture(alpha, p, q)
  both = p.has_mass & m.has_mass
  ratio = q.prob / jnp.where(m.has_mass, m.prob, 1.0)
  return Terms(_kl_terms(p, m), jnp.where(both, -(1.0 - alpha) * p.prob * ratio, 0.0))


def _skew_reverse_kl(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  alpha = hp["alpha"]
  m = _mixture(alpha, q, p)
  both = q.has_mass & m.has_mass
  value = _kl_terms(q, m)
  ratio = q.prob / jnp.where(m.has_mass, m.prob, 1.0)
  return Terms(value, jnp.where(both, value + q.prob * (1.0 - alpha * ratio), 0.0))


def _total_variation(p: _Dist, q: _Dist, hp: Mapping[str, Scalar]) -> Terms:
  del hp
  diff = p.prob - q.prob
  return Terms(0.5 * jnp.abs(diff), -0.5 * jnp.sign(diff) * q.prob)


class DivergenceSpec(NamedTuple):
  name: str
  terms: Callable[[_Dist, _Dist, Mapping[str, Scalar]], Terms]
  hyperparameters: tuple[str, ...]
  formula: str


DIVERGENCES: dict[str, DivergenceSpec] = {
    spec.name: spec
    for spec in (
        DivergenceSpec("forward_kl", _forward_kl, (), "sum p (log p - log q)"),
        DivergenceSpec("reverse_kl", _reverse_kl, (), "sum q (log q - log p)"),
        DivergenceSpec(
            "generalized_jsd", _generalized_jsd, ("beta",),
            "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q"),
        DivergenceSpec(
            "skew_forward_kl", _skew_forward_kl, ("alpha",),
            "KL(p || alpha p + (1 - alpha) q)"),
        DivergenceSpec(
            "skew_reverse_kl", _skew_reverse_kl, ("alpha",),
            "KL(q || alpha q + (1 - alpha) p)"),
        DivergenceSpec("total_variation", _total_variation, (), "0.5 sum |p - q|"),
        DivergenceSpec("soft_cross_entropy", _soft_cross_entropy, (), "-sum p log q"),
    )
}


def get_divergence(name: str) -> DivergenceSpec:
  if not isinstance(name, str) or name not in DIVERGENCES:
    raise ValueError(
        f"divergence must be one of {sorted(DIVERGENCES)}, got {name!r}.")
  return DIVERGENCES[name]


def check_unit_interval(name: str, value: Scalar) -> None:
  """Raises for a concrete hyperparameter outside [0, 1]; traced values are not checked."""
  if isinstance(value, (int, float)) and not (0.0 <= value <= 1.0 and math.isfinite(value)):
    raise ValueError(f"{name} must be in [0, 1], got {value!r}.")


def check_temperature(temperature: Scalar) -> None:
  if isinstance(temperature, (int, float)) and not (
      temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")


# ----------------------------------------------------------------------------------------------
# Row statistics and the per-token value and gradient, shared by every path.
# ----------------------------------------------------------------------------------------------

Reducer = Callable[[Array], Array]


def _sum_last(x: Array) -> Array:
  return jnp.sum(x, axis=-1)


def _max_last(x: Array) -> Array:
  return jnp.max(x, axis=-1)


def _row_max(scaled_logits: Array, reduce_max: Reducer) -> tuple[Array, Array]:
  """``(finite row max, whether the row has any entry > -inf)``."""
  row_max = reduce_max(scaled_logits)
  nonempty = row_max > -jnp.inf
  return jax.lax.stop_gradient(jnp.where(nonempty, row_max, 0.0)), nonempty


def _lse_from(row_max: Array, sum_exp: Array) -> Array:
  # An all -inf row has sum_exp == 0; lse 0 then makes every log-probability -inf.
  return jnp.where(sum_exp > 0, row_max + jnp.log(jnp.where(sum_exp > 0, sum_exp, 1.0)), 0.0)


def logsumexp(
    scaled_logits: Array, *, reduce_max: Reducer = _max_last, reduce_sum: Reducer = _sum_last
) -> Array:
  """Row log-sum-exp over the last axis; 0 for a row that is all ``-inf``.

  ``reduce_max``/``reduce_sum`` reduce over the last axis; the vocabulary-parallel path passes
  versions that also ``pmax``/``psum`` across devices, which is all it changes.
  """
  row_max, _ = _row_max(scaled_logits, reduce_max)
  return _lse_from(row_max, reduce_sum(jnp.exp(scaled_logits - row_max[..., None])))


def log_softmax(
    scaled_logits: Array, *, reduce_max: Reducer = _max_last, reduce_sum: Reducer = _sum_last
) -> tuple[Array, _Dist, Array]:
  """``(lse, distribution, nonempty)`` of a block of rows, with one ``exp`` per entry.

  ``nonempty`` is False for a row whose logits are all ``-inf``. The shifted exponentials are
  computed once and kept (a block-sized temporary): the probabilities are then a
  multiplication, not a second ``exp``. Use it on blocks of rows.
  """
  row_max, nonempty = _row_max(scaled_logits, reduce_max)
  shifted_exp = jax.lax.optimization_barrier(jnp.exp(scaled_logits - row_max[..., None]))
  sum_exp = reduce_sum(shifted_exp)
  lse = _lse_from(row_max, sum_exp)
  inv_sum = jnp.where(sum_exp > 0, 1.0 / jnp.where(sum_exp > 0, sum_exp, 1.0), 0.0)
  log = scaled_logits - lse[..., None]
  has_mass = log > -jnp.inf
  return lse, _Dist(log, shifted_exp * inv_sum[..., None], has_mass,
                    jnp.where(has_mass, log, 0.0)), nonempty


def pointwise_terms(
    divergence: DivergenceSpec,
    student_scaled: Array,
    teacher_scaled: Array,
    student_lse: Array,
    teacher_lse: Array,
    hp: Mapping[str, Scalar],
) -> tuple[Terms, Array]:
  """Elementwise terms of ``divergence`` and the student probabilities ``q``."""
  q = _dist(student_scaled - student_lse[..., None])
  p = _dist(teacher_scaled - teacher_lse[..., None])
  return divergence.terms(p, q, hp), q.prob


def student_grad(terms: Terms, student_prob: Array, sum_dlog_q: Array) -> Array:
  """Gradient of the per-token value with respect to the *scaled* student logits."""
  return terms.dlog_q - student_prob * sum_dlog_q[..., None]
