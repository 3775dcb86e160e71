"""The block recipe: per-token values and student gradients from row statistics.

Every path that compares a teacher's softmax with a student's -- materialised logits blocked over
tokens, the fused linear head, vocabulary shards on a mesh, sparse top-k teachers, vocabulary
tiles with an online log-sum-exp -- computes them with the functions of this module. The paths
differ only in how they obtain a block of logits and how they reduce a row over the vocabulary:

* the whole row at once (``WHOLE_ROW``);
* this device's slice, followed by a ``pmax``/``psum`` over a mesh axis (``VocabReduce(axis)``);
* tile by tile, folding partial statistics with :func:`combine` (an online log-sum-exp) and
  summing the tiles' terms.

The recipe, for one block of rows (``x`` raw float32 logits, ``T`` the temperature), is written
out for each way of walking a row: :func:`block` for rows held whole, :func:`tiled` for rows
walked tile by tile (the fused head's vocabulary blocks), :func:`lanes` for rows a kernel walks
tile by tile with statistics per lane (the Pallas kernels):

1. **Row statistics** (:func:`statistics`): ``m = max_v x_v`` and ``S = sum_v exp((x_v - m) / T)``.
2. **Distributions** (:func:`distribution`): ``log q = (x - m) / T - log S``, exactly 0 at a
   row's largest entry when it is alone. The shift happens in raw-logit space, before scaling,
   and ``m + log S`` is never formed: subtracting it from a large logit would lose ``log S``.
3. **Terms**: the divergence's elementwise value and ``d value / d log q`` (``divergences.py``),
   summed over the vocabulary into :class:`Sums`.
4. **Tokens** (:func:`finish`): the per-token value -- times ``T**2`` with
   ``temperature_squared``, mixed with the hard-label cross entropy ``log S_1 - (x_label - m)``
   (at temperature 1) when the config asks for it -- and the per-row gradient coefficients.
5. **Gradient** (:func:`student_grad`): ``c (g - q sum_v g) + c_ce (softmax(x) - onehot(label))``
   per entry, ``g = d value / d log q``, with respect to the raw student logits.

With ``config.metrics`` (the losses' metrics forms) the same walk also gives, per token, the
student's and the teacher's entropies at ``T`` (``-sum_v q_v log q_v`` from the distributions of
step 2, summed with the terms of step 3; ``0 log 0 = 0``) and whether their largest raw logits
are at the same id (the lowest id of a tie: the entries equal to the maxima of step 1):
:class:`MetricRows`, made by :func:`with_metrics`. The kernels' walk (:func:`lanes`) does not
compute them.

Conventions applied here, once, per token: a token whose student or teacher row has no mass (all
``-inf``) contributes 0 with a zero gradient; a NaN or ``+inf`` logit, a hard label outside
``[0, vocab)``, or an input a caller flags as invalid makes the token's value and gradient NaN;
a token whose weight is 0 gets an exactly zero gradient whatever it holds. Everything is float32;
the caller rounds the gradient to the logits' dtype once, after all scaling.

The functions are plain ``jnp`` code on ``[rows, entries]`` arrays, so a kernel can run them on
tiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kdjax._src import blocking
from kdjax._src import divergences as div
from kdjax._src.config import Config

Array = jax.Array


class VocabReduce(NamedTuple):
  """How a row is reduced over the vocabulary: this array's last axis, then the mesh axis.

  ``axis_name`` None: the last axis holds the whole vocabulary. Otherwise each device along
  ``axis_name`` holds a contiguous slice of it (device ``i`` of ``n``: entries
  ``[i * width, (i + 1) * width)``) and every reduction is followed by ``pmax``/``psum``.
  """

  axis_name: Hashable | None = None

  def max(self, x: Array) -> Array:
    row_max = jnp.max(x, axis=-1)
    return row_max if self.axis_name is None else lax.pmax(row_max, self.axis_name)

  def sum(self, x: Array) -> Array:
    row_sum = jnp.sum(x, axis=-1)
    return row_sum if self.axis_name is None else lax.psum(row_sum, self.axis_name)

  def start(self, width: int) -> Array | int:
    """The vocabulary id of this array's first entry."""
    return 0 if self.axis_name is None else lax.axis_index(self.axis_name) * width

  def size(self, width: int) -> Array | int:
    """The whole vocabulary's size, for this array's ``width`` entries."""
    return width if self.axis_name is None else lax.axis_size(self.axis_name) * width

  def min(self, x: Array) -> Array:
    row_min = jnp.min(x, axis=-1)
    return row_min if self.axis_name is None else lax.pmin(row_min, self.axis_name)


WHOLE_ROW = VocabReduce()


def inverse_temperature(hp: Mapping[str, Any]):
  """``1 / T``: logits are multiplied by it (a Python float when ``T`` is static)."""
  return 1.0 / hp["temperature"]


def value_scale(config: Config, hp: Mapping[str, Any]):
  """``T**2`` with ``temperature_squared``, else 1."""
  # A product rather than jnp.square (the same operation): Pallas' Triton lowering cannot
  # square a Python number.
  temperature = hp["temperature"]
  return jnp.multiply(temperature, temperature) if config.temperature_squared else 1.0


# ----------------------------------------------------------------------------------------------
# 1-2. Row statistics and distributions.
# ----------------------------------------------------------------------------------------------


class Stats(NamedTuple):
  """Row statistics of one side's logits at one temperature, over the vocabulary so far."""

  max: Array  # [rows] the largest raw logit; -inf for a row with no mass, NaN if any is NaN.
  sum_exp: Array  # [rows] sum_v exp((x_v - max) / T); 0 exactly for a row with no mass.


def _finite(row_max: Array) -> Array:
  # An empty row is shifted by 0 (its entries stay -inf); NaN and +inf are kept, so they spread.
  return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def _safe_log(sum_exp: Array) -> Array:
  return jnp.log(jnp.where(sum_exp > 0, sum_exp, 1.0))


def _safe_reciprocal(sum_exp: Array) -> Array:
  return 1.0 / jnp.where(sum_exp > 0, sum_exp, 1.0)


def shifted(x: Array, row_max: Array, inv_temperature) -> Array:
  """``(x - max) / T``: shifted in raw-logit space first, so the largest entry is exactly 0."""
  return (x - _finite(row_max)[..., None]) * inv_temperature


def statistics(x: Array, inv_temperature, reduce: VocabReduce = WHOLE_ROW, *,
               keep: bool = False) -> tuple[Stats, Array]:
  """Row statistics of the float32 logits ``x`` ``[rows, entries]``, and ``exp((x - m) / T)``.

  ``keep``: materialise the exponentials once (an XLA optimisation barrier), so the
  probabilities computed from them cost a multiplication instead of a second ``exp``.
  """
  row_max = reduce.max(x)
  exps = jnp.exp(shifted(x, row_max, inv_temperature))
  if keep:
    exps = lax.optimization_barrier(exps)
  return Stats(row_max, reduce.sum(exps)), exps


def combine(a: Stats, b: Stats, inv_temperature) -> Stats:
  """Statistics of two disjoint parts of a row (vocabulary tiles): the online log-sum-exp."""
  row_max = jnp.maximum(a.max, b.max)
  shift = _finite(row_max)

  def rescaled(part: Stats) -> Array:  # exp(-inf) = 0 rescales an empty part's 0 to 0.
    return part.sum_exp * jnp.exp((part.max - shift) * inv_temperature)

  return Stats(row_max, rescaled(a) + rescaled(b))


def combine_over(stats: Stats, reduce: VocabReduce, inv_temperature) -> Stats:
  """Statistics of each device's vocabulary slice combined over ``reduce``'s mesh axis."""
  if reduce.axis_name is None:
    return stats
  row_max = reduce.max(stats.max[:, None])
  rescaled = stats.sum_exp * jnp.exp((stats.max - _finite(row_max)) * inv_temperature)
  return Stats(row_max, reduce.sum(rescaled[:, None]))


def log_normaliser(stats: Stats, inv_temperature) -> Array:
  """``log sum_v exp(x_v / T)`` per row (``-inf`` for an empty row), for callers that need the
  number itself (a sparse teacher's stored mass); never subtract it from logits."""
  return jnp.where(stats.sum_exp > 0, _finite(stats.max) * inv_temperature
                   + _safe_log(stats.sum_exp), -jnp.inf)


def distribution(x: Array, stats: Stats, inv_temperature,
                 exps: Array | None = None) -> div.Dist:
  """The softmax of ``x / T`` at the entries of ``x``, from the row statistics.

  ``x`` may hold any of the row's entries (a tile, gathered ids); ``exps`` are
  ``exp((x - m) / T)`` when :func:`statistics` computed them for the same entries.
  """
  log = shifted(x, stats.max, inv_temperature) - _safe_log(stats.sum_exp)[..., None]
  prob = None if exps is None else exps * _safe_reciprocal(stats.sum_exp)[..., None]
  return div.dist(log, prob)


def terms(config: Config, hp: Mapping[str, Any], teacher: div.Dist,
          student: div.Dist, log: div.Log = jnp.log) -> div.Terms:
  """The divergence's elementwise terms (``divergences.DIVERGENCES``)."""
  return div.DIVERGENCES[config.divergence].terms(teacher, student, hp, log=log)


def label_entry(x: Array, labels: Array, start, row_max: Array, *,
                gather: bool = True) -> Array:
  """``x[label] - max`` per row where the label's entry is in ``x`` (ids ``start + j``), else 0.

  Summed over the tiles or shards of a row, it is exact: one of them holds the entry.
  ``gather=False`` picks the entry by comparing every id with the label, for kernels, where a
  gather along the vocabulary does not lower, and for explicitly sharded vocabularies, where a
  gather's output sharding is ambiguous; the result is the same.
  """
  local = labels - start
  inside = (local >= 0) & (local < x.shape[-1])
  if gather:
    picked = jnp.take_along_axis(x, jnp.clip(local, 0, x.shape[-1] - 1)[:, None], axis=-1)[:, 0]
  else:
    picked = jnp.sum(jnp.where(one_hot(labels, start, x.shape[-1], like=x), x, 0.0), axis=-1)
  return jnp.where(inside, picked - _finite(row_max), 0.0)


def gather_entries(rows: Array, ids: Array, *, fill_value=-jnp.inf) -> Array:
  """``rows[r, ids[r, j]]``: ``[rows, k]`` entries of each row (``fill_value`` for an id outside
  the vocabulary). A gather batched over the rows, which GSPMD splits with the rows."""
  return jax.vmap(lambda row, row_ids: row.at[row_ids].get(
      mode="fill", fill_value=fill_value))(rows, ids)


def scatter_entries(rows: Array, ids: Array, values, *, add: bool = True) -> Array:
  """``rows`` ``[rows, vocab]`` with ``values`` added at (or, ``add=False``, set to) each row's
  entries ``ids`` ``[rows, k]`` (distinct within a row); ids outside the vocabulary are dropped.
  The entries a sparse or sorted view of a row (top-k ids, ranks) hands back to the row. A
  scatter batched over the rows, which GSPMD splits with the rows."""
  values = jnp.broadcast_to(jnp.asarray(values, rows.dtype), ids.shape)

  def one_row(row, row_ids, row_values):
    ref = row.at[row_ids]
    if add:
      return ref.add(row_values, mode="drop", unique_indices=True)
    return ref.set(row_values, mode="drop", unique_indices=True)

  return jax.vmap(one_row)(rows, ids, values)


def one_hot(labels: Array, start, width: int, *, like: Array | None = None) -> Array:
  """bool ``[rows, width]``: True at each row's label (vocabulary ids ``start + j``), sharded
  like ``like`` when explicit sharding types need it."""
  out_sharding = None if like is None else blocking.explicit_sharding(like)
  ids = start + lax.broadcasted_iota(labels.dtype, (labels.shape[0], width), 1,
                                     out_sharding=out_sharding)
  return ids == labels[:, None]


# ----------------------------------------------------------------------------------------------
# 3-5. Tokens and gradients.
# ----------------------------------------------------------------------------------------------


class Sums(NamedTuple):
  """Per-row sums over the whole vocabulary (all tiles and shards)."""

  value: Array  # [rows] of the divergence's value terms.
  dlog_q: Array | None  # [rows] of their derivatives with respect to log q (gradients only).
  label: Array | None = None  # [rows] x[label] - max (cross entropy only).


class Rows(NamedTuple):
  """Per-token results (float32 ``[rows]``)."""

  value: Array  # what the loss sums: kd_coef * divergence + (1 - kd_coef) * cross_entropy.
  divergence: Array  # the divergence, times T**2 with temperature_squared.
  cross_entropy: Array  # the hard-label cross entropy; 0 without it.


class MetricRows(NamedTuple):
  """:class:`Rows` and the per-token metrics of ``config.metrics`` (float32 ``[rows]``)."""

  value: Array
  divergence: Array
  cross_entropy: Array
  student_entropy: Array  # -sum q log q at temperature T; 0 for a row with no mass.
  teacher_entropy: Array  # -sum p log p at temperature T.
  top1_agreement: Array  # 1 where both rows' largest logits are at one id, else 0.


def row_type(config: Config) -> type[Rows] | type[MetricRows]:
  """The per-token rows an engine returns for ``config``: with the metrics or without."""
  return MetricRows if config.metrics else Rows


def constant_but_value(rows: Rows | MetricRows) -> Rows | MetricRows:
  """``rows`` with every field but ``value`` under ``stop_gradient`` (they are for logging)."""
  return rows._replace(**{name: lax.stop_gradient(getattr(rows, name))
                          for name in rows._fields[1:]})


def entropy_terms(d: div.Dist) -> Array:
  """``-p_v log p_v`` per entry, 0 where ``p_v`` has no mass (``0 log 0 = 0``)."""
  return jnp.where(d.has_mass, -d.prob * d.safe_log, 0.0)


_NO_ID = jnp.iinfo(jnp.int32).max


def top_ids(x: Array, row_max: Array, start) -> Array:
  """int32 ``[rows, entries]``: the vocabulary id (``start + j``) of each entry of ``x`` that is
  its row's largest, ``row_max``, and the largest int32 elsewhere; their minimum over the row
  is the top-1 id, the lowest of a tie (``jnp.argmax``'s), for a compare and a minimum an
  entry."""
  ids = start + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.where(x == row_max[..., None], ids, _NO_ID)


def with_metrics(rows: Rows, student: Stats, teacher: Stats, student_entropy: Array,
                 teacher_entropy: Array, student_top: Array, teacher_top: Array, *,
                 invalid: Array | None = None) -> MetricRows:
  """``rows`` and their metrics from whole-row statistics, entropy sums and top-1 ids.

  A side whose row has a NaN or ``+inf`` logit has a NaN entropy; the agreement is NaN when
  either side has one, and 0 when either row has no mass (no top-1 token to agree on). A row
  with no mass has entropy 0 (its sum is empty). ``invalid`` (bool ``[rows]``, optional):
  inputs a caller found invalid, NaN everywhere.
  """
  student_bad, teacher_bad = jnp.isnan(student.sum_exp), jnp.isnan(teacher.sum_exp)
  if invalid is not None:
    student_bad, teacher_bad = student_bad | invalid, teacher_bad | invalid
  empty = (student.sum_exp == 0) | (teacher.sum_exp == 0)
  agree = jnp.where(empty, 0.0, (student_top == teacher_top).astype(jnp.float32))
  return MetricRows(*rows, jnp.where(student_bad, jnp.nan, student_entropy),
                    jnp.where(teacher_bad, jnp.nan, teacher_entropy),
                    jnp.where(student_bad | teacher_bad, jnp.nan, agree))


class GradScale(NamedTuple):
  """Per-row coefficients of the gradient with respect to the raw student logits."""

  divergence: Array  # [rows] multiplies g - q * sum(g).
  cross_entropy: Array | None  # [rows] multiplies softmax(x) - onehot(label).
  live: Array | None  # bool [rows]: False where the token's weight is 0 (gradient exactly 0).


def finish(config: Config, hp: Mapping[str, Any], student: Stats, teacher: Stats, sums: Sums,
           *, weights: Array | None = None, labels: Array | None = None,
           vocab_size: int | None = None, cross_entropy_sum_exp: Array | None = None,
           invalid: Array | None = None) -> tuple[Rows, GradScale]:
  """Per-token values and gradient coefficients from whole-row statistics and sums.

  Args:
    config, hp: the static config and the hyperparameters (``temperature``, ``kd_coef``, ...).
    student, teacher: row statistics over the whole vocabulary.
    sums: per-row sums over the whole vocabulary.
    weights: float32 ``[rows]`` token weights folded into the gradient coefficients (the
      gradient is then that of ``sum(weights * value)``); None: 1.
    labels, vocab_size, cross_entropy_sum_exp: the hard labels, the vocabulary size and the
      student's ``S`` at temperature 1 (cross entropy only).
    invalid: optional bool ``[rows]``: inputs a caller found invalid (NaN value and gradient).
  """
  inv_temperature = inverse_temperature(hp)
  scale = value_scale(config, hp)
  empty = (student.sum_exp == 0) | (teacher.sum_exp == 0)
  bad = jnp.isnan(student.sum_exp) | jnp.isnan(teacher.sum_exp)
  if invalid is not None:
    bad = bad | invalid
  divergence = jnp.where(bad, jnp.nan, jnp.where(empty, 0.0, scale * sums.value))
  grad_divergence = jnp.where(bad, jnp.nan, jnp.where(empty, 0.0, scale * inv_temperature))
  row_weights: float | Array = 1.0 if weights is None else weights
  live = None if isinstance(row_weights, float) else row_weights != 0
  if not config.cross_entropy:
    return (Rows(divergence, divergence, jnp.zeros_like(divergence)),
            GradScale(grad_divergence * row_weights, None, live))
  assert labels is not None and vocab_size is not None and cross_entropy_sum_exp is not None
  assert sums.label is not None, "the cross entropy needs its labels and their statistics"
  kd_coef = hp["kd_coef"]
  valid_label = (labels >= 0) & (labels < vocab_size)
  cross_entropy = jnp.where(
      valid_label, _safe_log(cross_entropy_sum_exp) - sums.label, jnp.nan)
  # kd_coef 0 or 1 drops the other term exactly: 0 * inf (a label on a -inf student logit)
  # would be NaN. An invalid label stays NaN whatever the weight.
  hard = jnp.where(kd_coef == 1, jnp.where(valid_label, 0.0, jnp.nan),
                   (1.0 - kd_coef) * cross_entropy)
  value = jnp.where(kd_coef == 0, 0.0, kd_coef * divergence) + hard
  return (Rows(value, divergence, cross_entropy),
          GradScale(kd_coef * grad_divergence * row_weights,
                    jnp.where(valid_label, (1.0 - kd_coef) * row_weights, jnp.nan), live))


def scale_entries(scale: GradScale, dvalue: Array,
                  cross_entropy: tuple[Array, Array] | None = None) -> Array:
  """float32 gradient entries: ``dvalue`` (the divergence's derivative with respect to the
  scaled student logits) times the rows' coefficients, plus the cross entropy's share.

  ``cross_entropy``: ``(softmax(x) at temperature 1, onehot(label))`` of the same entries.
  Rows whose weight is 0 are exactly 0.
  """
  grad = scale.divergence[:, None] * dvalue
  if scale.cross_entropy is not None:
    assert cross_entropy is not None, "a cross-entropy coefficient needs its entries"
    softmax, label = cross_entropy
    grad = grad + scale.cross_entropy[:, None] * jnp.where(label, softmax - 1.0, softmax)
  if scale.live is not None:
    grad = jnp.where(scale.live[:, None], grad, 0.0)
  return grad


def student_grad(scale: GradScale, dlog_q: Array | float, student_prob: Array, sum_dlog_q: Array,
                 cross_entropy: tuple[Array, Array] | None = None) -> Array:
  """float32 gradient with respect to the raw student logits of the entries of ``dlog_q``:
  ``g - q sum(g)`` through :func:`scale_entries`."""
  return scale_entries(scale, dlog_q - student_prob * sum_dlog_q[:, None], cross_entropy)


# ----------------------------------------------------------------------------------------------
# The whole recipe for rows that hold their whole vocabulary (or this device's slice of it).
# ----------------------------------------------------------------------------------------------


def block(config: Config, hp: Mapping[str, Any], logits: Array, teacher_logits: Array,
          labels: Array | None = None, weights: Array | None = None, *,
          reduce: VocabReduce = WHOLE_ROW, with_grad: bool = True
          ) -> tuple[Rows | MetricRows, Array | None]:
  """Per-token results of a block of rows (with their metrics for ``config.metrics``) and,
  ``with_grad``, the gradient of ``sum(weights * value)`` with respect to ``logits`` (float32
  ``[rows, vocab]``).

  ``logits`` and ``teacher_logits`` are ``[rows, vocab]`` in any float dtype (this device's
  slice of the vocabulary with a mesh ``reduce``); ``labels`` ``[rows]`` are read only for the
  cross entropy. One ``exp`` per entry and side (two more for the cross entropy at ``T != 1``).
  """
  inv_temperature = inverse_temperature(hp)
  x_student = logits.astype(jnp.float32)
  x_teacher = teacher_logits.astype(jnp.float32)
  student, student_exps = statistics(x_student, inv_temperature, reduce, keep=True)
  teacher, teacher_exps = statistics(x_teacher, inv_temperature, reduce, keep=True)
  q = distribution(x_student, student, inv_temperature, student_exps)
  p = distribution(x_teacher, teacher, inv_temperature, teacher_exps)
  entry_terms = terms(config, hp, p, q)
  ce: dict[str, Any] = {}
  width = logits.shape[-1]
  if config.cross_entropy:
    assert labels is not None, "the cross entropy reads the labels"
    start = reduce.start(width)
    if config.is_static("temperature", 1.0):
      ce_exps, ce_sum_exp = student_exps, student.sum_exp
    else:
      ce_exps = jnp.exp(shifted(x_student, student.max, 1.0))
      ce_sum_exp = reduce.sum(ce_exps)
    # With explicit sharding types a gather along a sharded vocabulary has no unambiguous
    # output sharding; the comparison with every id does.
    label = reduce.sum(label_entry(x_student, labels, start, student.max,
                                   gather=blocking.explicit_sharding(logits) is None)[:, None])
    ce = dict(labels=labels, vocab_size=reduce.size(width), cross_entropy_sum_exp=ce_sum_exp)
  else:
    label = None
  sums = Sums(reduce.sum(entry_terms.value),
              reduce.sum(entry_terms.dlog_q) if with_grad else None, label)
  rows, scale = finish(config, hp, student, teacher, sums, weights=weights, **ce)
  result: Rows | MetricRows = rows
  if config.metrics:
    student_top, teacher_top = (reduce.min(top_ids(x, stats.max, reduce.start(width)))
                                for x, stats in ((x_student, student), (x_teacher, teacher)))
    result = with_metrics(rows, student, teacher, reduce.sum(entropy_terms(q)),
                          reduce.sum(entropy_terms(p)), student_top, teacher_top)
  if not with_grad:
    return result, None
  ce_grad = None
  if config.cross_entropy:
    ce_grad = (ce_exps * _safe_reciprocal(ce_sum_exp)[:, None],
               one_hot(labels, start, width, like=logits))  # type: ignore[arg-type]  # checked above
  return result, student_grad(scale, entry_terms.dlog_q, q.prob,
                              sums.dlog_q, ce_grad)  # type: ignore[arg-type]  # with_grad: summed


# ----------------------------------------------------------------------------------------------
# The whole recipe for rows walked tile by tile (an online log-sum-exp).
# ----------------------------------------------------------------------------------------------


class Tile(NamedTuple):
  """A tile of vocabulary entries: ids ``start .. start + width - 1`` of the rows' array."""

  start: Array | int
  width: int


def tiled(config: Config, hp: Mapping[str, Any], walk, read, *, zeros: Array,
          vocab_width: int, labels: Array | None = None, weights: Array | None = None,
          reduce: VocabReduce = WHOLE_ROW, emit=None, emit_init: Any = None
          ) -> tuple[Rows | MetricRows, Any]:
  """The recipe over a block of rows whose vocabulary is walked tile by tile, in three walks.

  The first folds the tiles' row statistics with :func:`combine`; the second sums the terms
  (and the label's entry for the cross entropy); then :func:`finish`; with ``emit``, the third
  recomputes each tile and hands its gradient over. Only per-row statistics are kept between
  tiles, so no row needs to fit anywhere whole. With ``config.metrics`` the second walk also
  sums the entropies and finds each row's top-1 ids.

  Args:
    config, hp: the static config and the hyperparameters.
    walk: ``walk(body, carry)`` returns ``carry`` after ``carry = body(tile, carry)`` for every
      :class:`Tile` (anything with ``start`` and ``width``) of the rows' vocabulary, in order.
    read: ``read(tile)`` returns ``(x_student, x_teacher, context)``: the raw float32 logits
      ``[rows, width]`` of the tile's entries (``-inf`` past the vocabulary) and anything
      ``emit`` needs of the tile.
    zeros: float32 zeros ``[rows]``, the initial per-row carries (inside ``shard_map``, varying
      like the inputs).
    vocab_width: the number of vocabulary entries of this array (of this device's slice with a
      mesh ``reduce``).
    labels, weights, reduce: as in :func:`block`.
    emit: ``emit(tile, context, grad, carry)`` returns the next ``carry`` given the tile's
      float32 gradient ``[rows, width]`` with respect to the raw student logits; None: no
      gradient.
    emit_init: the first ``carry`` of ``emit``.

  Returns:
    ``(rows, carry)``: the per-token :class:`Rows` (:class:`MetricRows` for ``config.metrics``)
    and ``emit``'s last carry (None without it).
  """
  inv_temperature = inverse_temperature(hp)
  # The cross entropy's softmax is at temperature 1: the student's own unless T may differ.
  separate = config.cross_entropy and not config.is_static("temperature", 1.0)
  temperatures = (inv_temperature, inv_temperature, 1.0)[:3 if separate else 2]

  def stats_step(tile, folded):
    x_student, x_teacher, _ = read(tile)
    return tuple(combine(part, statistics(x, inv)[0], inv) for part, x, inv in zip(
        folded, (x_student, x_teacher, x_student), temperatures, strict=False))

  empty = Stats(zeros - jnp.inf, zeros)
  stats = tuple(combine_over(s, reduce, inv) for s, inv in zip(
      walk(stats_step, (empty,) * len(temperatures)), temperatures, strict=True))
  student, teacher = stats[:2]
  ce_stats = stats[2] if separate else student
  start = reduce.start(vocab_width)

  def tile_terms(tile):
    x_student, x_teacher, context = read(tile)
    q = distribution(x_student, student, inv_temperature)
    p = distribution(x_teacher, teacher, inv_temperature)
    return x_student, x_teacher, context, q, p, terms(config, hp, p, q)

  def sums_step(tile, partial):
    x_student, x_teacher, _, q, p, entry_terms = tile_terms(tile)
    value, dlog_q, label, *metrics = partial
    value = value + jnp.sum(entry_terms.value, axis=-1)
    if emit is not None:
      dlog_q = dlog_q + jnp.sum(entry_terms.dlog_q, axis=-1)
    if config.cross_entropy:
      label = label + label_entry(x_student, labels, start + tile.start, student.max,
                                  gather=False)
    if metrics:  # the entropies' sums and the top-1 ids so far
      student_entropy, teacher_entropy, student_top, teacher_top = metrics
      metrics = [student_entropy + jnp.sum(entropy_terms(q), axis=-1),
                 teacher_entropy + jnp.sum(entropy_terms(p), axis=-1),
                 *(jnp.minimum(top, jnp.min(top_ids(x, stats.max, start + tile.start), axis=-1))
                   for top, x, stats in ((student_top, x_student, student),
                                         (teacher_top, x_teacher, teacher)))]
    return value, dlog_q, label, *metrics

  no_id = zeros.astype(jnp.int32) + _NO_ID  # varying like zeros inside shard_map
  value, dlog_q, label, *metrics = walk(
      sums_step, (zeros,) * 3 + ((zeros, zeros, no_id, no_id) if config.metrics else ()))
  sums = Sums(reduce.sum(value[:, None]), reduce.sum(dlog_q[:, None]) if emit else None,
              reduce.sum(label[:, None]) if config.cross_entropy else None)
  ce: dict[str, Any] = {}
  if config.cross_entropy:
    ce = dict(labels=labels, vocab_size=reduce.size(vocab_width),
              cross_entropy_sum_exp=ce_stats.sum_exp)
  rows, scale = finish(config, hp, student, teacher, sums, weights=weights, **ce)
  result: Rows | MetricRows = rows
  if config.metrics:
    student_entropy, teacher_entropy = (reduce.sum(h[:, None]) for h in metrics[:2])
    student_top, teacher_top = (reduce.min(top[:, None]) for top in metrics[2:])
    result = with_metrics(rows, student, teacher, student_entropy, teacher_entropy,
                          student_top, teacher_top)
  if emit is None:
    return result, None

  def grad_step(tile, carry):
    x_student, _, context, q, _, entry_terms = tile_terms(tile)
    ce_grad = None
    if config.cross_entropy:
      softmax = distribution(x_student, ce_stats, 1.0).prob if separate else q.prob
      ce_grad = (softmax, one_hot(labels, start + tile.start, tile.width))
    return emit(tile, context, student_grad(scale, entry_terms.dlog_q, q.prob, sums.dlog_q,
                                            ce_grad), carry)

  return result, walk(grad_step, emit_init)


# ----------------------------------------------------------------------------------------------
# The whole recipe for rows walked lane by lane (the kernels).
# ----------------------------------------------------------------------------------------------


class Lanes(NamedTuple):
  """Running statistics of a block of rows, one set per lane of a tile, through one walk.

  Every field is float32 ``[rows, lanes]`` during the walk (lane ``j`` has seen entries ``j``,
  ``j + lanes``, ...) and ``[rows]`` once :func:`reduce_lanes` has combined the lanes; a max is
  held as :class:`Arith` holds it. The entries enter in base-2 units, ``y = (x - m) c`` with
  ``c = log2(e) / T`` and ``m`` the lane's (or row's) max. With an online value
  (``divergences.OnlineValue``), ``w`` its weight side and ``o`` the other, and entries counted
  where both sides have mass:
  ``mass = sum 2**y_w`` and ``offset = sum 2**y_w (teacher y_t + student y_s) / lead``, with
  the value's coefficients (``divergences.OnlineValue``) over the first that is not 0
  (:func:`_offset_coefficients`): one sum of the difference, so equal inputs give exactly 0
  however the compiler rounds, and no entry is negated.
  (None where the value does not read them: the soft cross entropy has no ``log p`` term).
  """

  student: Stats
  teacher: Stats
  cross_entropy: Stats | None  # the student's at temperature 1 when T may differ from 1.
  mass: Array | None
  offset: Array | None
  label: Array | None  # the student's raw logit at the label (0 elsewhere), summed.


class Arith(NamedTuple):
  """The elementwise operations a kernel brings, and how its statistics hold a max.

  ``fma=None`` (plain ``jnp``): a max ``m`` is held raw, and an entry is ``y = (x - m) c`` in
  base-2 units (``c = log2(e) / T``), shifted in raw-logit space before scaling. With ``fma``,
  the hardware's multiply-add rounded once (a GPU's ``FFMA``, which the kernel's code does not
  get otherwise: every multiplication and addition reaches the assembler rounded on its own),
  a max is held as the float32 ``m c`` and ``y = fma(x, c, -m c)``: one instruction instead of
  two. The product ``x c`` is exact inside the multiply-add, and every ``2**y`` and ``y`` of a
  lane or row carries the same held ``m c`` (rounding commutes with the max, and a held max is
  never recomputed from the raw one), so its rounding cancels from the probabilities and
  log-probabilities as the raw shift's does: ``y`` keeps float32's relative precision at any
  magnitude of the logits (``x c - m c`` rounded twice would not: at ``x = 1e8`` the ulp of
  ``x c`` is 16).
  """

  exp2: Callable[[Array], Array] = jnp.exp2
  fma: Callable[[Any, Any, Any], Array] | None = None
  log: Callable[[Array], Array] = jnp.log  # of positive numbers (a mixture's probabilities).
  # log2 of positive normal numbers (a kernel's mixture, from its base-2 entries).
  log2: Callable[[Array], Array] = lambda x: jnp.log(x) * _LOG2_E
  # 1 / x of positive normal numbers as cheaply as an exp2 (None: a mixture's ratio is read as
  # 2**log2(p / m) instead).
  reciprocal: Callable[[Array], Array] | None = None

  def hold(self, row_max: Array, scale) -> Array:
    """A raw max as the statistics hold it (``-inf`` stays ``-inf``)."""
    return row_max if self.fma is None else row_max * scale

  def scaled(self, x: Array, shift: Array, scale) -> Array:
    """``y``: the raw entries ``x`` in base-2 units from a finite held max."""
    return (x - shift) * scale if self.fma is None else self.fma(x, scale, -shift)

  def between(self, a: Array, b: Array, scale) -> Array:
    """``(a - b) c`` for two held maxima."""
    return self.base2(a - b, scale)

  def base2(self, difference: Array, scale) -> Array:
    """A difference of held maxima in base-2 units. Combine differences before this (``(a - b)
    c``, not ``a c - b c``): a compiler may fuse the latter into one rounding, and equal
    inputs would not give exactly 0."""
    return difference * scale if self.fma is None else difference

  def madd(self, a, b, c) -> Array:
    return a * b + c if self.fma is None else self.fma(a, b, c)


JNP_ARITH = Arith()

# exp(x / T) = 2 ** (x c) with c = log2(e) / T: one multiplication (or multiply-add) and the
# hardware's base-2 exponential (GPUs: one MUFU.EX2) instead of a libm-accurate exp (ten
# instructions); its relative error, a few float32 ulps, is far below the divergences' float32
# rounding.
_LOG2_E = 1.4426950408889634
_LN_2 = 0.6931471805599453
# Entries of a side with no mass are y = -inf; clamped where a zero weight multiplies them.
_LOWEST = float(jnp.finfo(jnp.float32).min)


class _Folded(NamedTuple):
  """One side's chunks of a tile folded into its per-lane statistics."""

  stats: Stats  # the lanes' statistics with the tile.
  rescale: Array  # what the lanes had summed is multiplied by this (their max rose).
  rise: Array  # how far the lanes' (finite) max rose, as held; any number for a lane with no mass.
  ys: tuple[Array, ...]  # each chunk's entries in base-2 units from the lanes' new max.
  exps: tuple[Array, ...]  # 2 ** y: 0 at -inf entries.


def _fold_side(stats: Stats, chunks: tuple[Array, ...], scale, arith: Arith) -> _Folded:
  """A tile's chunks (``[rows, lanes]`` each) into per-lane statistics (their max held as
  :class:`Arith` holds it): the lanes' max moves once per tile, one ``exp2`` per entry and one
  per lane to rescale the old sum."""
  new_max = jnp.maximum(stats.max, arith.hold(functools.reduce(jnp.maximum, chunks), scale))
  shift = _finite(new_max)
  rescale = arith.exp2(arith.between(stats.max, shift, scale))  # 0 for a lane with no mass yet
  ys = tuple(arith.scaled(x, shift, scale) for x in chunks)
  exps = tuple(arith.exp2(y) for y in ys)
  total = functools.reduce(jnp.add, exps)
  return _Folded(Stats(new_max, arith.madd(stats.sum_exp, rescale, total)), rescale,
                 shift - _finite(stats.max), ys, exps)


def _offset_coefficients(online: div.OnlineValue) -> tuple[float, float, float]:
  """``(lead, teacher / lead, student / lead)``: the value's first coefficient that is not 0,
  and both over it."""
  lead = online.teacher or online.student
  return lead, online.teacher / lead, online.student / lead


def _fold_offsets(lanes: Lanes, online: div.OnlineValue, teacher: _Folded, student: _Folded,
                  other_has_mass: tuple[Array, ...], scale, arith: Arith
                  ) -> tuple[Array, Array]:
  """The online value's sums (see :class:`Lanes`) with a tile more; ``other_has_mass``: per
  chunk, the entries where the other side has mass (the weight side's own ``2**y`` is 0 where
  it has none)."""
  assert lanes.mass is not None and lanes.offset is not None
  weight_side = online.by_weight(teacher, student)[0]
  weights = tuple(jnp.where(m, e, 0.0) for m, e in zip(other_has_mass, weight_side.exps,
                                                       strict=True))
  # The old sum is rescaled and moves by the rise of the sides' maxima; a -inf entry has
  # weight 0: clamped, it adds 0.
  _, teacher_coefficient, student_coefficient = _offset_coefficients(online)
  rise = arith.base2(_linear(teacher_coefficient, teacher.rise, student_coefficient,
                             student.rise), scale)
  offset = weight_side.rescale * arith.madd(-rise, lanes.mass, lanes.offset)
  for weight, y_teacher, y_student in zip(weights, teacher.ys, student.ys, strict=True):
    linear = _linear(teacher_coefficient, jnp.maximum(y_teacher, _LOWEST),
                     student_coefficient, jnp.maximum(y_student, _LOWEST))
    offset = arith.madd(weight, linear, offset)
  return arith.madd(lanes.mass, weight_side.rescale, functools.reduce(jnp.add, weights)), offset


class _Side(NamedTuple):
  """One side's whole-row statistics as a kernel's later walks read them."""

  shift: Array  # [rows, 1] the finite max, as held.
  inverse_sum: Array  # [rows, 1] 1 / S (1 for an empty row).
  log_sum: Array  # [rows, 1] log S (0 for an empty row).


def _side(stats: Stats) -> _Side:
  return _Side(_finite(stats.max)[..., None],
               _safe_reciprocal(stats.sum_exp)[..., None], _safe_log(stats.sum_exp)[..., None])


def _kernel_distribution(x: Array, side: _Side, scale, arith: Arith) -> tuple[div.Dist, Array]:
  """:func:`distribution` in base 2 (``log = y ln 2 - log S``, ``prob = 2**y / S``), its mass
  read from the logits (``x > -inf``: the same entries, one comparison fewer down the chain);
  and ``2**y``."""
  y = arith.scaled(x, side.shift, scale)
  log = arith.madd(y, _LN_2, -side.log_sum)
  exps = arith.exp2(y)
  has_mass = x > -jnp.inf
  return div.Dist(log, exps * side.inverse_sum, has_mass, jnp.where(has_mass, log, 0.0)), exps


class Stash(NamedTuple):
  """float32 storage of a block's tiles: ``write(tile, chunks)``, ``read(tile) -> chunks``."""

  write: Callable[[Any, tuple[Array, ...]], None]
  read: Callable[[Any], tuple[Array, ...]]


class _MixtureEntries(NamedTuple):
  """A chunk's entries of a mixture divergence (``divergences.MixtureValue``) in base 2, all
  relative to the teacher's normaliser ``S_t``: ``p = e_t / S_t``, ``q = e_s R / S_t`` with
  ``R = S_t / S_s``, ``m = mixture / S_t``; so ``log2(p / m) = y_t - log2 mixture`` and
  ``log2(q / m) = y_s + log2 R - log2 mixture``."""

  x_student: Array
  y_student: Array
  y_teacher: Array
  student_exps: Array  # e_s = 2**y_s
  kl_teacher: Array | float  # teacher e_t (0 where the coefficient is)
  kl_student: Array | float  # student e_s R
  mass: Array  # the mixture (kept above the smallest normal float)
  log_mixture: Array  # its log2

  def student_gap(self, row: _MixtureRow) -> Array:
    """``log2(q / m)``."""
    return (self.y_student + row.log2_ratio) - self.log_mixture


class _MixtureRow(NamedTuple):
  """Per-row constants of a mixture's entries, ``[rows, 1]``."""

  ratio: Array  # R = S_t / S_s
  log2_ratio: Array  # log2 R


def _mixture_row(student: _Side, teacher: _Side) -> _MixtureRow:
  return _MixtureRow(student.inverse_sum / teacher.inverse_sum,
                     (teacher.log_sum - student.log_sum) * _LOG2_E)


def _mixture_entries(mixture: div.MixtureValue, x_student: Array, x_teacher: Array,
                     student: _Side, teacher: _Side, row: _MixtureRow, scale,
                     arith: Arith) -> _MixtureEntries:
  """The entries of a chunk: two ``exp2`` and one ``log2`` of the mixture."""
  y_student = arith.scaled(x_student, student.shift, scale)
  y_teacher = arith.scaled(x_teacher, teacher.shift, scale)
  e_student, e_teacher = arith.exp2(y_student), arith.exp2(y_teacher)
  teacher_products: dict[float, Array] = {}
  student_products: dict[float, Array] = {}

  def teacher_times(k: float) -> Array:  # k e_t
    if k not in teacher_products:
      teacher_products[k] = e_teacher if k == 1 else e_teacher * k
    return teacher_products[k]

  def student_times(k: float) -> Array:  # k e_s R
    if k not in student_products:
      student_products[k] = e_student * (row.ratio * k)
    return student_products[k]

  kl_teacher = teacher_times(mixture.teacher) if mixture.teacher else 0.0
  kl_student = student_times(mixture.student) if mixture.student else 0.0
  # One multiply-add where the teacher's weighted term is not a KL coefficient's as well.
  mass = (teacher_times(mixture.mix_teacher) + student_times(mixture.mix_student)
          if mixture.mix_teacher in teacher_products
          else arith.madd(e_teacher, mixture.mix_teacher, student_times(mixture.mix_student)))
  mass = jnp.maximum(mass, float(jnp.finfo(jnp.float32).tiny))
  return _MixtureEntries(x_student, y_student, y_teacher, e_student, kl_teacher, kl_student,
                         mass, arith.log2(mass))


def _mixture_ratio(mixture: div.MixtureValue, entries: _MixtureEntries, row: _MixtureRow,
                   arith: Arith, student_gap: Array | None = None, *,
                   needs_log: bool = True) -> Array | float:
  """``(teacher p + student q) / m``: 1 with the mixture's own weights, else one side's
  ``2**log2(p / m)`` (or ``q``'s), an ``exp2`` instead of a division; or, where nothing else
  needs the mixture's log (``needs_log=False``) and the kernel has a reciprocal as cheap, the
  teacher's ``e_t / mixture``."""
  if mixture.own_weights:
    return 1.0
  assert not (mixture.teacher and mixture.student), "a ratio of one side's"
  if mixture.teacher:
    if not needs_log and arith.reciprocal is not None:
      return entries.kl_teacher * arith.reciprocal(entries.mass)
    return mixture.teacher * arith.exp2(entries.y_teacher - entries.log_mixture)
  gap = entries.student_gap(row) if student_gap is None else student_gap
  return mixture.student * arith.exp2(gap)


def _mixture_fold(mixture: div.MixtureValue, sums: tuple[Array, Array, Array],
                  entries: _MixtureEntries, row: _MixtureRow,
                  arith: Arith) -> tuple[Array, Array, Array]:
  """Per-lane sums ``(V_t, V_s, W)`` with a chunk more: ``V_t = sum teacher e_t log2(p / m)``,
  ``V_s = sum student e_s R log2(q / m)`` and ``W = sum e_s R ratio`` (the last only without
  the mixture's own weights). An entry without mass has ``e = 0``: its gap is clamped."""
  value_teacher, value_student, weighted = sums
  student_gap = entries.student_gap(row) if mixture.student else None
  if mixture.teacher:
    gap = jnp.maximum(entries.y_teacher - entries.log_mixture, _LOWEST)
    value_teacher = arith.madd(entries.kl_teacher, gap, value_teacher)
  if student_gap is not None:
    value_student = arith.madd(entries.kl_student, jnp.maximum(student_gap, _LOWEST),
                               value_student)
  if not mixture.own_weights:
    hat_student = (entries.kl_student if mixture.student == 1
                   else entries.student_exps * row.ratio)
    weighted = arith.madd(hat_student, _mixture_ratio(mixture, entries, row, arith,
                                                      student_gap), weighted)
  return value_teacher, value_student, weighted


def _mixture_sums(mixture: div.MixtureValue, sums: tuple[Array, Array, Array],
                  teacher: _Side) -> tuple[Array, Array]:
  """The value and ``sum_v dlog_q`` per row from the reduced ``(V_t, V_s, W)``:
  ``value = ln 2 (V_t + V_s) / S_t`` and
  ``sum dlog_q = ln 2 V_s / S_t + student - mix_student W / S_t``
  (``W / S_t = 1`` with the mixture's own weights)."""
  value_teacher, value_student, weighted = sums
  inverse_sum = teacher.inverse_sum[:, 0]
  value = (value_teacher + value_student) * (inverse_sum * _LN_2)
  dlog_q = value_student * (inverse_sum * _LN_2)
  if mixture.own_weights:
    rest = mixture.student - mixture.mix_student  # 0 for the generalized JSD
    return value, dlog_q + rest if rest else dlog_q
  return value, dlog_q + (mixture.student - mixture.mix_student * weighted * inverse_sum)


def _mixture_grad(mixture: div.MixtureValue, scale: GradScale, sum_dlog_q: Array | None,
                  entries: _MixtureEntries, student: _Side, row: _MixtureRow,
                  arith: Arith) -> Array:
  """The divergence's share of a chunk's gradient, ``coefficient q (dlog_q / q - sum dlog_q)``:
  ``e_s (k_1 (y_s - log2 mixture) + k_2 ratio + k_0)`` with the rows' constants folded
  first."""
  coefficient = scale.divergence[:, None] * student.inverse_sum
  constant = (mixture.student if sum_dlog_q is None
              else mixture.student - sum_dlog_q[:, None])  # None: its share left out
  if mixture.own_weights:
    constant = constant - mixture.mix_student
  inner = coefficient * constant
  student_gap = None
  if mixture.student:
    k_1 = coefficient * (mixture.student * _LN_2)
    gap = entries.y_student - entries.log_mixture
    inner = arith.madd(gap, k_1, arith.madd(row.log2_ratio, k_1, inner))
    student_gap = gap + row.log2_ratio
  if not mixture.own_weights:
    ratio = _mixture_ratio(mixture, entries, row, arith, student_gap,
                           needs_log=bool(mixture.student))
    inner = arith.madd(ratio, coefficient * -mixture.mix_student, inner)
  # An entry without student mass: 0, or NaN in a NaN token (as its coefficient).
  return jnp.where(entries.x_student > -jnp.inf, entries.student_exps * inner, 0.0 * coefficient)


def reduce_lanes(lanes: Lanes, online: div.OnlineValue | None, scale, arith: Arith) -> Lanes:
  """Combines the lanes of every row (``[rows, lanes]`` to ``[rows]``): once per walk. A
  lane's sums are rescaled by ``2**(m_lane c - m_row c)``: 0 for a lane with no mass, NaN when
  the row's max is ``+inf`` (a ``+inf`` logit) or NaN."""

  def stats(part: Stats, scale) -> tuple[Stats, Array]:
    row_max = jnp.max(part.max, axis=-1)
    lane_scale = arith.exp2(arith.between(part.max, _finite(row_max)[..., None], scale))
    return Stats(row_max, jnp.sum(part.sum_exp * lane_scale, axis=-1)), lane_scale

  student, student_scale = stats(lanes.student, scale)
  teacher, teacher_scale = stats(lanes.teacher, scale)
  cross_entropy = (None if lanes.cross_entropy is None
                   else stats(lanes.cross_entropy, _LOG2_E)[0])
  label = None if lanes.label is None else jnp.sum(lanes.label, axis=-1)
  if online is None:
    return Lanes(student, teacher, cross_entropy, None, None, label)
  assert lanes.mass is not None and lanes.offset is not None
  mass_lanes = lanes.mass
  lane_scale = online.by_weight(teacher_scale, student_scale)[0]

  def rise(lane: Stats, row: Stats) -> Array:  # as held
    return _finite(lane.max) - _finite(row.max)[:, None]

  _, teacher_coefficient, student_coefficient = _offset_coefficients(online)
  rises = arith.base2(_linear(teacher_coefficient, rise(lanes.teacher, teacher),
                              student_coefficient, rise(lanes.student, student)), scale)
  offset = lane_scale * (lanes.offset + jnp.where(mass_lanes > 0, rises * mass_lanes, 0.0))
  return Lanes(student, teacher, cross_entropy, jnp.sum(mass_lanes * lane_scale, axis=-1),
               jnp.sum(offset, axis=-1), label)


def online_sums(online: div.OnlineValue, rows: Lanes) -> tuple[Array, Array]:
  """The divergence's value and ``sum_v dlog_q`` per row from reduced :class:`Lanes`."""
  assert rows.mass is not None and rows.offset is not None
  weight_stats = online.by_weight(rows.teacher, rows.student)[0]
  inverse_sum = _safe_reciprocal(weight_stats.sum_exp)
  mass = rows.mass * inverse_sum
  log_sums = _linear(online.teacher, _safe_log(rows.teacher.sum_exp),
                     online.student, _safe_log(rows.student.sum_exp))
  # (x - m) / T = y ln 2.
  lead = _offset_coefficients(online)[0]
  value = rows.offset * (inverse_sum * (lead * _LN_2)) - mass * log_sums
  return value, online.dvalue * value + online.dmass * mass


def _linear(a: float, x: Array, b: float, y: Array) -> Array:
  """``a x + b y`` for static coefficients, a subtraction where they are +-1."""
  terms = [x if a == 1 else -x if a == -1 else a * x for a, x in ((a, x), (b, y)) if a]
  return functools.reduce(jnp.add, terms)


def _online_grad(online: div.OnlineValue, scale: GradScale, sum_dlog_q: Array,
                 student: tuple[Array, Array, Array, _Side],
                 teacher: tuple[Array, Array, _Side], arith: Arith) -> Array:
  """The divergence's share of a chunk's gradient, :func:`student_grad` with the entries'
  ``dlog_q`` read from the online value: ``w (dvalue (teacher log p + student log q) + dmass)``
  where both sides have mass, with ``w`` the weight side's probability. The student side is
  ``(raw logits, y, 2**y, statistics)``, the teacher's ``(raw logits, y, statistics)``; the
  rows' coefficients are folded first, so an entry costs a few multiply-adds."""
  (x_student, y_student, student_exps, s), (x_teacher, y_teacher, t) = student, teacher
  coefficient = scale.divergence[:, None]
  # -q sum(g) = 2**y_s B, with q = 2**y_s / S_s.
  student_coefficient = -coefficient * s.inverse_sum * sum_dlog_q[:, None]
  weight_exps, weight = ((student_exps, s) if online.weight == "student"
                         else (arith.exp2(y_teacher), t))
  weight_coefficient = coefficient * weight.inverse_sum
  if not online.dvalue:
    # g = w dmass where the other side has mass (the weight side's 2**y is 0 where it has none).
    other_x = online.by_weight(x_teacher, x_student)[1]
    weights = jnp.where(other_x > -jnp.inf, weight_exps, 0.0)
    return arith.madd(weights, weight_coefficient * online.dmass,
                      student_exps * student_coefficient)
  # dvalue (teacher (y_t ln 2 - log S_t) + student (y_s ln 2 - log S_s)) + dmass.
  linear = _linear(online.teacher, y_teacher, online.student, y_student)
  constant = online.dmass - online.dvalue * (online.teacher * t.log_sum
                                             + online.student * s.log_sum)
  both = (x_student > -jnp.inf) & (x_teacher > -jnp.inf)
  inner = jnp.where(both, arith.madd(linear, online.dvalue * _LN_2, constant), 0.0)
  if online.weight == "student":  # q (inner A + B): one multiplication an entry fewer.
    return student_exps * arith.madd(inner, weight_coefficient, student_coefficient)
  return arith.madd(weight_exps * inner, weight_coefficient, student_exps * student_coefficient)


def lanes(config: Config, hp: Mapping[str, Any], walk, read, *, zeros: Array, lane_width: int,
          vocab_width: int, labels: Array | None = None, label_logits: Array | None = None,
          weights: Array | None = None, emit=None, emit_init: Any = None,
          arith: Arith = JNP_ARITH, stash: Stash | None = None) -> tuple[Rows, Any]:
  """The recipe over a block of rows whose vocabulary a kernel walks tile by tile, keeping
  statistics per lane and combining the lanes once per walk (:func:`reduce_lanes`).

  A tile is a few chunks of ``lane_width`` entries: each lane's max moves once per tile (one
  rescale per lane and tile), and each entry costs one ``exp2``. Two walks when the
  divergence's value folds online with the row statistics (its ``DIVERGENCES`` entry's
  ``online``): the first gathers the statistics and the value's sums, the second (with
  ``emit``) hands each tile's gradient over, its entries' ``dlog_q`` read from the same
  ``online`` entry. Three otherwise: statistics, the terms' sums, the gradient. Arguments as in
  :func:`tiled`, except:

  Args:
    walk: ``walk(body, carry)``; every tile's width is a multiple of ``lane_width``.
    read: ``read(tile)`` returns ``(student_chunks, teacher_chunks, context)``: tuples of the
      tile's raw float32 logits, chunk ``j`` ``[rows, lane_width]`` holding the entries
      ``tile.start + j * lane_width ...`` (``-inf`` past the vocabulary). A tile may have
      ``counted_from``: the sums skip its entries below that id, which an earlier tile holds
      (their gradient is then written twice, the same).
    emit: ``emit(tile, context, grad_chunks, carry)`` (context None where a token of weight 0
      in a one-row block gets its zero gradient without its tiles being read).
    zeros: float32 zeros ``[rows, lane_width]``.
    label_logits: float32 ``[rows]``, the student's raw logit at each row's label, gathered by
      the caller (any number for a label outside the vocabulary); None: matched entry by entry
      in a walk.
    lane_width: the lanes of the per-lane statistics.
    arith: the kernel's ``exp2`` and multiply-add (:class:`Arith`).
    stash: float32 storage of a block's ``[rows, vocab]`` (a TPU kernel's VMEM): with a
      mixture divergence (``divergences.MixtureValue``) and the gradient, the terms' walk also
      stores each entry's gradient but for the share of ``sum dlog_q`` (which is known only at
      its end), and the last walk adds that share from the student's logits alone
      (:class:`Stash`). None: the last walk recomputes the entries.
  """
  scale = inverse_temperature(hp) * _LOG2_E
  spec = div.DIVERGENCES[config.divergence]
  online = spec.online(hp)
  mixture = spec.mixture(hp) if online is None else None
  separate = config.cross_entropy and not config.is_static("temperature", 1.0)
  empty = Stats(zeros - jnp.inf, zeros)

  def starts(tile):
    return [tile.start + j * lane_width for j in range(tile.width // lane_width)]

  def counted_chunks(tile, student_chunks, teacher_chunks):
    """The chunks with the entries an earlier tile holds at -inf, and their masks."""
    counted_from = getattr(tile, "counted_from", None)
    if counted_from is None:
      return student_chunks, teacher_chunks, (None,) * len(student_chunks)
    masks = tuple(start + lax.broadcasted_iota(jnp.int32, zeros.shape, 1) >= counted_from
                  for start in starts(tile))

    def hide(chunks):
      return tuple(jnp.where(m, x, -jnp.inf) for m, x in zip(masks, chunks, strict=True))

    return hide(student_chunks), hide(teacher_chunks), masks

  def with_label(label, tile, student_chunks, masks):
    for start, x, mask in zip(starts(tile), student_chunks, masks, strict=True):
      at_label = one_hot(labels, start, lane_width)
      if mask is not None:
        at_label = at_label & mask
      label = label + jnp.where(at_label, x, 0.0)
    return label

  def first_step(tile, state: Lanes) -> Lanes:
    xs, xt, masks = counted_chunks(tile, *read(tile)[:2])
    student = _fold_side(state.student, xs, scale, arith)
    teacher = _fold_side(state.teacher, xt, scale, arith)
    cross_entropy = (None if state.cross_entropy is None
                     else _fold_side(state.cross_entropy, xs, _LOG2_E, arith).stats)
    mass, offset = state.mass, state.offset
    if online is not None:
      other_x = online.by_weight(xt, xs)[1]
      mass, offset = _fold_offsets(state, online, teacher, student,
                                   tuple(x > -jnp.inf for x in other_x), scale, arith)
    label = state.label
    if label is not None:
      label = with_label(label, tile, xs, masks)
    return Lanes(student.stats, teacher.stats, cross_entropy, mass, offset, label)

  folds = None if online is None else zeros  # the online value's mass and offset
  first = Lanes(empty, empty, empty if separate else None, folds, folds,
                zeros if config.cross_entropy and online is not None and label_logits is None
                else None)
  rows = reduce_lanes(walk(first_step, first), online, scale, arith)
  student, teacher = _side(rows.student), _side(rows.teacher)
  ce_stats = rows.cross_entropy if separate else rows.student
  assert ce_stats is not None
  ce_side = _side(ce_stats) if separate else student

  def chunk_terms(x_student, x_teacher):
    q, student_exps = _kernel_distribution(x_student, student, scale, arith)
    p, _ = _kernel_distribution(x_teacher, teacher, scale, arith)
    return q, student_exps, terms(config, hp, p, q, arith.log)

  def ce_arguments(label) -> dict[str, Any]:
    if not config.cross_entropy:
      return {}
    assert label is not None and ce_stats is not None
    return dict(labels=labels, vocab_size=vocab_width, cross_entropy_sum_exp=ce_stats.sum_exp)

  def with_cross_entropy(grad_scale, start, x_student, student_exps, grad):
    """The cross entropy's share of a chunk's gradient added, and tokens of weight 0 zeroed."""
    if config.cross_entropy:
      # (1 - kd_coef) (softmax(x) - onehot(label)) at T = 1.
      assert grad_scale.cross_entropy is not None
      if separate:
        student_exps = arith.exp2(arith.scaled(x_student, ce_side.shift, _LOG2_E))
      coefficient = grad_scale.cross_entropy[:, None]
      grad = arith.madd(student_exps, coefficient * ce_side.inverse_sum, grad)
      grad = grad - jnp.where(one_hot(labels, start, lane_width), coefficient, 0.0)
    if grad_scale.live is not None and not one_row:
      grad = jnp.where(grad_scale.live[:, None], grad, 0.0)
    return grad

  one_row = zeros.shape[0] == 1
  mixture_row = None if mixture is None else _mixture_row(student, teacher)
  stashed = stash is not None and mixture is not None and emit is not None
  early_scale = None
  if stashed:
    assert not config.cross_entropy or label_logits is not None, "stash: gather the labels"
    # The gradient's coefficients do not read the sums: known before the terms' walk.
    no_sums = jnp.zeros_like(rows.student.max)
    _, early_scale = finish(config, hp, rows.student, rows.teacher,
                            Sums(no_sums, no_sums, no_sums), weights=weights,
                            **ce_arguments(no_sums))

  def stash_tile(tile, xs, xt):
    """The entries' gradient but for the share of ``sum dlog_q``, into the stash."""
    assert stash is not None and mixture is not None and mixture_row is not None
    assert early_scale is not None
    grads = []
    for start, x_student, x_teacher in zip(starts(tile), xs, xt, strict=True):
      entries = _mixture_entries(mixture, x_student, x_teacher, student, teacher, mixture_row,
                                 scale, arith)
      grad = _mixture_grad(mixture, early_scale, None, entries, student, mixture_row, arith)
      grads.append(with_cross_entropy(early_scale, start, x_student, entries.student_exps, grad))
    stash.write(tile, tuple(grads))

  if online is not None:
    value, dlog_q = online_sums(online, rows)
    label = rows.label if label_logits is None else label_logits
  elif mixture is not None:
    assert mixture_row is not None

    def mixture_step(tile, partial):
      *folded, label = partial
      raw = read(tile)[:2]
      xs, xt, masks = counted_chunks(tile, *raw)
      if stashed:  # every entry of the tile, those an earlier tile holds as well
        stash_tile(tile, *raw)
      for x_student, x_teacher in zip(xs, xt, strict=True):
        entries = _mixture_entries(mixture, x_student, x_teacher, student, teacher,
                                   mixture_row, scale, arith)
        folded = _mixture_fold(mixture, tuple(folded), entries, mixture_row, arith)
      if config.cross_entropy and label_logits is None:
        label = with_label(label, tile, xs, masks)
      return (*folded, label)

    value_teacher, value_student, weighted, label = (
        jnp.sum(x, axis=-1) for x in walk(mixture_step, (zeros,) * 4))
    value, dlog_q = _mixture_sums(mixture, (value_teacher, value_student, weighted), teacher)
    if label_logits is not None:
      label = label_logits
  else:
    def sums_step(tile, partial):
      value, dlog_q, label = partial
      xs, xt, masks = counted_chunks(tile, *read(tile)[:2])
      for x_student, x_teacher in zip(xs, xt, strict=True):
        *_, entry_terms = chunk_terms(x_student, x_teacher)
        value = value + entry_terms.value
        if emit is not None:
          dlog_q = dlog_q + entry_terms.dlog_q
      if config.cross_entropy and label_logits is None:
        label = with_label(label, tile, xs, masks)
      return value, dlog_q, label

    value, dlog_q, label = (jnp.sum(x, axis=-1) for x in walk(sums_step, (zeros,) * 3))
    if label_logits is not None:
      label = label_logits
  label_entry_sum = None
  ce = ce_arguments(label)
  if config.cross_entropy:
    assert label is not None
    # x[label] - max as the sums see it: ln 2 (x c - m c) at T = 1. A label outside the
    # vocabulary matched no entry (0); finish makes its token NaN.
    label_entry_sum = arith.scaled(label, ce_side.shift[:, 0], _LOG2_E) * _LN_2
  sums = Sums(value, dlog_q if emit is not None else None, label_entry_sum)
  result, grad_scale = finish(config, hp, rows.student, rows.teacher, sums, weights=weights,
                              **ce)
  if emit is None:
    return result, None
  assert sums.dlog_q is not None

  def stashed_step(tile, carry):
    """The stashed entries plus the share of ``sum dlog_q``: ``-coefficient q sum dlog_q``."""
    assert stash is not None and sums.dlog_q is not None
    xs, _, context = read(tile)
    share = grad_scale.divergence[:, None] * student.inverse_sum * -sums.dlog_q[:, None]
    grads = []
    for x_student, stashed_grad in zip(xs, stash.read(tile), strict=True):
      student_exps = arith.exp2(arith.scaled(x_student, student.shift, scale))
      grad = arith.madd(student_exps, share, stashed_grad)
      if grad_scale.live is not None and not one_row:
        grad = jnp.where(grad_scale.live[:, None], grad, 0.0)
      grads.append(grad)
    return emit(tile, context, tuple(grads), carry)

  def grad_step(tile, carry):
    xs, xt, context = read(tile)
    grads = []
    for start, x_student, x_teacher in zip(starts(tile), xs, xt, strict=True):
      if mixture is not None:
        assert mixture_row is not None
        entries = _mixture_entries(mixture, x_student, x_teacher, student, teacher,
                                   mixture_row, scale, arith)
        grad = _mixture_grad(mixture, grad_scale, sums.dlog_q, entries, student, mixture_row,
                             arith)
        student_exps = entries.student_exps
      elif online is not None:
        y_student = arith.scaled(x_student, student.shift, scale)
        student_exps = arith.exp2(y_student)
        grad = _online_grad(
            online, grad_scale, sums.dlog_q, (x_student, y_student, student_exps, student),
            (x_teacher, arith.scaled(x_teacher, teacher.shift, scale), teacher), arith)
      else:
        q, student_exps, entry_terms = chunk_terms(x_student, x_teacher)
        # The divergence's share alone: the cross entropy's and the weights' follow.
        grad = student_grad(grad_scale._replace(cross_entropy=None, live=None),
                            entry_terms.dlog_q, q.prob, sums.dlog_q)
      grads.append(with_cross_entropy(grad_scale, start, x_student, student_exps, grad))
    return emit(tile, context, tuple(grads), carry)

  last_step = stashed_step if stashed else grad_step
  # One row (a GPU program): a token of weight 0 skips the arithmetic and writes zeros, rather
  # than selecting them entry by entry.
  if grad_scale.live is None or not one_row:
    return result, walk(last_step, emit_init)

  def zero_step(tile, carry):
    zero = jnp.zeros_like(zeros)
    return emit(tile, None, (zero,) * (tile.width // lane_width), carry)

  return result, lax.cond(grad_scale.live[0], lambda: walk(last_step, emit_init),
                          lambda: walk(zero_step, emit_init))
