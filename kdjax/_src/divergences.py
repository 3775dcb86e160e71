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

so every path in the library needs only the elementwise definitions below plus per-token
statistics. ``recipe.py`` turns logits into the :class:`Dist` arguments and the terms into
per-token values and gradients; this module holds nothing but the divergences themselves. The
functions are plain ``jnp`` code on arrays of any shape, so a kernel body can call them on a tile.

Numerical conventions (documented once, used everywhere):

* ``0 * log 0 = 0``: an entry where the first argument of a KL term has no mass contributes 0;
* an entry ``x * log(x / 0)`` -- the compared distribution has no mass where the other has some,
  which happens only at ``-inf`` logits -- contributes 0 instead of ``+inf``. For the student side
  this is OpenRLHF's ``masked_fill(isinf(logits), 0)``; kdjax applies the same rule to the teacher
  so reverse KL stays finite. The loss is then blind to mass on entries the other side forbids:
  mask padded vocabulary entries on both sides alike.
* a token whose student or teacher logits are all ``-inf`` (an empty distribution, for
  example a fully masked position) contributes 0 and gets a zero gradient.
* a NaN (or ``+inf``) logit makes its token's value and gradient NaN: a wrong input is never
  scored as a plausible number. ``recipe.py`` applies the last two rules, per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

Array = jax.Array
_T = TypeVar("_T")
Scalar = Any  # a Python float or a float32 scalar array (traced under jit).
# The natural log a divergence takes of what it computes itself (a mixture's probabilities); a
# kernel may bring the hardware's own.
Log = Callable[[Array], Array]


class Terms(NamedTuple):
  """Elementwise value terms and their derivative with respect to ``log_q``."""

  value: Array
  dlog_q: Array


class Dist(NamedTuple):
  """One distribution in log space, with the masks the conventions above need."""

  log: Array  # log-probabilities, -inf where there is no mass.
  prob: Array  # exp(log), exactly 0 where log is -inf.
  has_mass: Array  # bool, log > -inf.
  safe_log: Array  # log where has_mass, else 0 (keeps unselected branches finite).


def dist(log: Array, prob: Array | None = None) -> Dist:
  """A distribution from its log-probabilities (and its probabilities, when already at hand)."""
  has_mass = log > -jnp.inf
  prob = jnp.exp(log) if prob is None else prob
  return Dist(log, prob, has_mass, jnp.where(has_mass, log, 0.0))


def _mixture(weight_a: Scalar, a: Dist, b: Dist, log: Log) -> Dist:
  """``weight_a * a + (1 - weight_a) * b`` in probability space.

  Probability space costs one log per entry instead of a log-add-exp. Entries whose
  probabilities both underflow get no mass, and every term that would read them is then 0 by the
  conventions, which is their float32 value anyway.
  """
  prob = weight_a * a.prob + (1.0 - weight_a) * b.prob
  has_mass = prob > 0
  safe_log = log(jnp.where(has_mass, prob, 1.0))
  return Dist(jnp.where(has_mass, safe_log, -jnp.inf), prob, has_mass, safe_log)


def _kl_terms(x: Dist, y: Dist) -> Array:
  """``x * (log x - log y)`` with ``0 log 0 = 0`` and ``x log(x / 0) := 0``."""
  both = x.has_mass & y.has_mass
  return jnp.where(both, x.prob * (x.safe_log - y.safe_log), 0.0)


# ----------------------------------------------------------------------------------------------
# The divergences. Each takes (teacher, student, hyperparameters) and returns Terms.
# ----------------------------------------------------------------------------------------------


def _soft_cross_entropy(p: Dist, q: Dist, hp: Mapping[str, Scalar], log: Log = jnp.log) -> Terms:
  del hp, log
  both = p.has_mass & q.has_mass
  return Terms(jnp.where(both, -p.prob * q.safe_log, 0.0), jnp.where(both, -p.prob, 0.0))


def _forward_kl(p: Dist, q: Dist, hp: Mapping[str, Scalar], log: Log = jnp.log) -> Terms:
  del hp, log
  both = p.has_mass & q.has_mass
  return Terms(_kl_terms(p, q), jnp.where(both, -p.prob, 0.0))


def _reverse_kl(p: Dist, q: Dist, hp: Mapping[str, Scalar], log: Log = jnp.log) -> Terms:
  del hp, log
  both = p.has_mass & q.has_mass
  value = _kl_terms(q, p)
  return Terms(value, jnp.where(both, value + q.prob, 0.0))


def _jsd_interior(p: Dist, q: Dist, beta: Scalar, log: Log) -> Terms:
  m = _mixture(beta, p, q, log)
  student_side = _kl_terms(q, m)
  value = beta * _kl_terms(p, m) + (1.0 - beta) * student_side
  # d/dlog_q of the two KL terms; the mixture's own derivative cancels exactly.
  return Terms(value, (1.0 - beta) * student_side)


def _generalized_jsd(p: Dist, q: Dist, hp: Mapping[str, Scalar],
                     log: Log = jnp.log) -> Terms:
  beta = hp["beta"]
  if isinstance(beta, (int, float)):  # Static: pick the branch at trace time.
    if beta == 0:
      return _forward_kl(p, q, hp)
    if beta == 1:
      return _reverse_kl(p, q, hp)
    return _jsd_interior(p, q, beta, log)
  # Traced beta (for example a schedule): TRL's endpoints are special cases, not limits of the
  # interior formula (which tends to 0 at both ends), so select them explicitly.
  interior = _jsd_interior(p, q, beta, log)
  forward = _forward_kl(p, q, hp)
  reverse = _reverse_kl(p, q, hp)
  return Terms(*(
      jnp.where(beta == 0, f, jnp.where(beta == 1, r, i))
      for f, r, i in zip(forward, reverse, interior, strict=True)
  ))


def _skew_forward_kl(p: Dist, q: Dist, hp: Mapping[str, Scalar],
                     log: Log = jnp.log) -> Terms:
  alpha = hp["alpha"]
  m = _mixture(alpha, p, q, log)
  both = p.has_mass & m.has_mass
  ratio = q.prob / jnp.where(m.has_mass, m.prob, 1.0)
  return Terms(_kl_terms(p, m), jnp.where(both, -(1.0 - alpha) * p.prob * ratio, 0.0))


def _skew_reverse_kl(p: Dist, q: Dist, hp: Mapping[str, Scalar],
                     log: Log = jnp.log) -> Terms:
  alpha = hp["alpha"]
  m = _mixture(alpha, q, p, log)
  both = q.has_mass & m.has_mass
  value = _kl_terms(q, m)
  ratio = q.prob / jnp.where(m.has_mass, m.prob, 1.0)
  return Terms(value, jnp.where(both, value + q.prob * (1.0 - alpha * ratio), 0.0))


def _total_variation(p: Dist, q: Dist, hp: Mapping[str, Scalar], log: Log = jnp.log) -> Terms:
  del hp, log
  diff = p.prob - q.prob
  return Terms(0.5 * jnp.abs(diff), -0.5 * jnp.sign(diff) * q.prob)


class OnlineValue(NamedTuple):
  """How a divergence's value folds with the row statistics in one walk over the vocabulary.

  The value is ``sum_v w_v (teacher * log p_v + student * log q_v)`` over the entries where both
  distributions have mass, with ``w = p`` (``weight="teacher"``) or ``w = q``; and the sum of its
  derivatives ``sum_v dlog_q_v`` is ``dvalue * value + dmass * sum_v w_v`` over the same entries.
  Since ``log p_v = (t_v - max t) / T - log S_t``, the value needs only the running sums
  ``sum w_v (t_v - max t)``, ``sum w_v (s_v - max s)`` and ``sum w_v``, which rescale with the
  log-sum-exp as the maxima grow: a kernel gets values and statistics from one walk, and the
  gradient from a second.
  """

  weight: str  # "teacher" (w = p) or "student" (w = q).
  teacher: float
  student: float
  dvalue: float
  dmass: float

  def by_weight(self, teacher: _T, student: _T) -> tuple[_T, _T]:
    """``(teacher, student)`` reordered as (weight side, other side)."""
    return (teacher, student) if self.weight == "teacher" else (student, teacher)


_FORWARD_KL_ONLINE = OnlineValue("teacher", 1.0, -1.0, 0.0, -1.0)
_REVERSE_KL_ONLINE = OnlineValue("student", -1.0, 1.0, 1.0, 1.0)


def _no_fold(hp: Mapping[str, Scalar]) -> None:
  del hp


def _jsd_fold(hp: Mapping[str, Scalar]) -> OnlineValue | None:
  """A static ``beta`` of 0 or 1 is the forward or reverse KL; the interior needs the final
  normalisers (its mixture's log)."""
  beta = hp["beta"]
  if isinstance(beta, (int, float)):
    return {0.0: _FORWARD_KL_ONLINE, 1.0: _REVERSE_KL_ONLINE}.get(float(beta))
  return None


class MixtureValue(NamedTuple):
  """How a divergence of a mixture reads where the value needs the final normalisers.

  The value is ``teacher * KL(p || m) + student * KL(q || m)`` with the mixture
  ``m = mix_teacher * p + mix_student * q`` (both weights in ``(0, 1)``, so ``m`` has mass
  wherever ``p`` or ``q`` has), and its derivative with respect to ``log q_v`` is
  ``q_v (student (log(q_v / m_v) + 1) - mix_student (teacher p_v + student q_v) / m_v)``. A
  kernel reads the entries in base 2 from the row maxima and needs per entry two exponentials
  and one logarithm of the mixture and, where the coefficients are not the mixture's own weights
  (the skew divergences, each with one side's), an exponential of ``log(p / m)`` (or ``q``'s)
  for the ratio: the generalized JSD's coefficients are its weights, so its
  ``(teacher p + student q) / m`` is 1.
  """

  mix_teacher: float
  mix_student: float
  teacher: float
  student: float

  @property
  def own_weights(self) -> bool:
    """Whether the KL coefficients are the mixture's weights (``(teacher p + student q) = m``)."""
    return (self.teacher, self.student) == (self.mix_teacher, self.mix_student)


def _interior(hp: Mapping[str, Scalar], name: str) -> float | None:
  """A static hyperparameter strictly inside ``(0, 1)``, else None (traced, or an endpoint,
  where the divergence is not a proper mixture's)."""
  value = hp[name]
  if isinstance(value, (int, float)) and 0.0 < value < 1.0:
    return float(value)
  return None


def _jsd_mixture(hp: Mapping[str, Scalar]) -> MixtureValue | None:
  beta = _interior(hp, "beta")
  return None if beta is None else MixtureValue(beta, 1.0 - beta, beta, 1.0 - beta)


def _skew_forward_mixture(hp: Mapping[str, Scalar]) -> MixtureValue | None:
  alpha = _interior(hp, "alpha")
  return None if alpha is None else MixtureValue(alpha, 1.0 - alpha, 1.0, 0.0)


def _skew_reverse_mixture(hp: Mapping[str, Scalar]) -> MixtureValue | None:
  alpha = _interior(hp, "alpha")
  return None if alpha is None else MixtureValue(1.0 - alpha, alpha, 0.0, 1.0)


class DivergenceSpec(NamedTuple):
  """One divergence: its elementwise terms, the hyperparameters they read, and (``online``)
  how its value folds online with the row statistics, for given hyperparameters: an
  :class:`OnlineValue`, or None when the value needs the final normalisers; and (``mixture``)
  where it does, whether it is a mixture's :class:`MixtureValue` (None: only its terms)."""

  name: str
  terms: Callable[..., Terms]  # (teacher, student, hyperparameters, log=jnp.log)
  hyperparameters: tuple[str, ...]
  formula: str
  online: Callable[[Mapping[str, Scalar]], OnlineValue | None] = _no_fold
  mixture: Callable[[Mapping[str, Scalar]], MixtureValue | None] = _no_fold


DIVERGENCES: dict[str, DivergenceSpec] = {
    spec.name: spec
    for spec in (
        DivergenceSpec("forward_kl", _forward_kl, (), "sum p (log p - log q)",
                       lambda hp: _FORWARD_KL_ONLINE),
        DivergenceSpec("reverse_kl", _reverse_kl, (), "sum q (log q - log p)",
                       lambda hp: _REVERSE_KL_ONLINE),
        DivergenceSpec(
            "generalized_jsd", _generalized_jsd, ("beta",),
            "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q", _jsd_fold,
            _jsd_mixture),
        DivergenceSpec(
            "skew_forward_kl", _skew_forward_kl, ("alpha",),
            "KL(p || alpha p + (1 - alpha) q)", mixture=_skew_forward_mixture),
        DivergenceSpec(
            "skew_reverse_kl", _skew_reverse_kl, ("alpha",),
            "KL(q || alpha q + (1 - alpha) p)", mixture=_skew_reverse_mixture),
        DivergenceSpec("total_variation", _total_variation, (), "0.5 sum |p - q|"),
        DivergenceSpec("soft_cross_entropy", _soft_cross_entropy, (), "-sum p log q",
                       lambda hp: OnlineValue("teacher", 0.0, -1.0, 0.0, -1.0)),
    )
}
