"""Distillation from a sparse (top-k) teacher: ``topk_teacher`` and ``sparse_distill_loss``.

A sparse teacher is, per token, ``k`` vocabulary ids and the teacher's log-probabilities of
those ids over its **full** vocabulary (``log p_v = t_v - lse(t)``). It is computed once, stored
(see ``cache.py``) and read back during student training, so the teacher does not run then.

The loss is one of the divergences of ``divergences.py`` (forward KL by default), applied to the
``k`` gathered entries. What happens to the teacher's mass outside the top ``k`` is a policy,
``tail``; with ``p`` the teacher's and ``q`` the student's full-vocabulary probabilities on the
``k`` ids (``q`` at the same temperature as the stored teacher):

* ``"renormalize"``: both renormalised over the ``k`` ids, then the divergence. Only the
  relative shape of the top ``k`` is matched; the student's mass outside them gets no gradient
  (with reverse KL the student may also shrink its mass inside the support unchecked).
* ``"zero"`` (forward KL only): :math:`\\sum_k p_k (\\log p_k - \\log q_k)`, no
  renormalisation. The teacher's tail is dropped; the student is pulled up on the ``k`` ids (and
  so down everywhere else).
* ``"bucket"``: one extra category for the rest of the vocabulary on both sides,
  :math:`p_r = 1 - \\sum_k p_k`, :math:`q_r = 1 - \\sum_k q_k`: the divergence between two
  distributions over ``k + 1`` categories, which never exceeds the full-vocabulary divergence
  for forward and reverse KL, the JSDs and total variation (data processing inequality).

With ``k`` equal to the vocabulary size every policy is the dense divergence.

It is the block recipe (``recipe.py``) on other rows: only the row statistics differ from the
dense path. The student's log-normaliser is the full vocabulary log-sum-exp (``"zero"``,
``"bucket"``) or the log-sum-exp of the ``k`` gathered logits (``"renormalize"``); the teacher's
is 0 (stored log-probabilities are already normalised) or the log-sum-exp of the ``k`` stored
values. ``q_r`` is summed directly over the student's entries outside the top ``k`` (exact even
when it is tiny); ``p_r`` is ``log(1 - exp(lse_k(log p)))`` evaluated with ``log1mexp``, clamped
at 0 when rounded stored values sum to more than 1.

Conventions, on top of those of ``divergences.py``: an entry whose stored teacher
log-probability is ``-inf`` has no teacher mass and contributes 0; a token whose ``k`` teacher
entries are all ``-inf`` is an empty teacher distribution and contributes 0 under every policy
(no remainder category is invented for it); a student ``-inf`` logit among the ``k`` ids
contributes 0 (``x log(x / 0) := 0``). Ids must be valid (``0 <= id < vocab``) and distinct
within a token, which ``topk_teacher`` guarantees; an out-of-range id makes that token's value
NaN rather than silently reading another entry; so does a NaN logit or log-probability. A
teacher given as concrete arrays (not traced) is checked at the call
(:func:`sparse_teacher_problem`): a log-probability above 0, probabilities summing to more than
1 (each beyond rounding: :func:`logprob_tolerance`) or an id repeated within a token is a
``ValueError`` naming the first such token; traced teachers are not checked.

The blocked implementation runs in the engine of materialised logits (``dense.py``): the
gradient with respect to the student logits is analytic, computed with the values and written
over the logits. It has the recipe's form ``dlog_q - q * sum(dlog_q)``, where ``dlog_q`` is the
divergence's ``k``-entry derivative scattered into the vocabulary (plus, for ``"bucket"``, the
remainder's share ``g_r q_v / q_r`` on every other entry). No ``[tokens, vocab]`` float32
temporary is kept. No gradient flows to the teacher arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from kdjax._src import blocking, checks, implementations, meshes, recipe, reductions, reference
from kdjax._src import config as config_lib
from kdjax._src import divergences as div
from kdjax._src import metrics as metrics_lib
from kdjax._src.metrics import DistillMetrics

Array = jax.Array

TAILS = ("renormalize", "zero", "bucket")


# ----------------------------------------------------------------------------------------------
# topk_teacher
# ----------------------------------------------------------------------------------------------


def _topk_block(k, inv_temperature, teacher_logits):
  logits = teacher_logits.astype(jnp.float32)
  stats, _ = recipe.statistics(logits, inv_temperature)
  top, ids = lax.top_k(logits, k)  # The order of x / T for any T > 0.
  return ids.astype(jnp.int32), recipe.distribution(top, stats, inv_temperature).log


@functools.partial(jax.jit, static_argnames=("k", "token_block"))
def _topk(teacher_logits, inv_temperature, *, k, token_block):
  vocab = teacher_logits.shape[-1]
  flat = teacher_logits.reshape(-1, vocab)
  num_tokens = flat.shape[0]
  block = token_block or blocking.token_block(num_tokens, vocab,
                                              groups=blocking.mesh_devices(flat))
  ids, logprobs = blocking.map_token_blocks(
      functools.partial(_topk_block, k, inv_temperature), (flat,),
      (jnp.zeros((num_tokens, k), jnp.int32), jnp.zeros((num_tokens, k), jnp.float32)),
      block=block)
  shape = teacher_logits.shape[:-1] + (k,)
  return ids.reshape(shape), logprobs.reshape(shape)


def _topk_per_device(teacher_logits, inv_temperature, *, k, token_block, mesh):
  """``_topk`` on a mesh with Explicit axes, each device on its own tokens (``shard_map``).

  ``lax.top_k`` refuses a vocabulary-sharded row there, and XLA's partitioner would gather the
  rows of every device to each (it does so on Auto axes on CPU). With the vocabulary whole on
  each device, each runs ``_topk`` on its rows. With it split, each device takes the top ``k``
  of its slice, the row's max and sum of exponentials are reduced over the vocabulary axes,
  and the top ``k`` of the gathered candidates (``k`` per slice, ``[rows, k * slices]``) are
  the row's: ties still go to the lower id, since slices and each slice's candidates are in id
  order. Nothing of the vocabulary's size moves.
  """
  spec = tuple(jax.typeof(teacher_logits).sharding.spec)
  spec = spec + (None,) * (teacher_logits.ndim - len(spec))
  vocab_axes = spec[-1]
  out_spec = P(*spec[:-1], None)

  def local(x, inv):
    if vocab_axes is None:
      return _topk(x, inv, k=k, token_block=token_block)
    x = x.astype(jnp.float32)
    width = x.shape[-1]
    top, ids = lax.top_k(x, min(k, width))
    ids = ids.astype(jnp.int32) + lax.axis_index(vocab_axes).astype(jnp.int32) * width
    row_max = lax.pmax(jnp.max(x, axis=-1, keepdims=True), vocab_axes)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # an all -inf row: -inf below
    sum_exp = lax.psum(jnp.sum(jnp.exp((x - shift) * inv), axis=-1, keepdims=True), vocab_axes)
    log_sum = jnp.where(sum_exp > 0, jnp.log(jnp.where(sum_exp > 0, sum_exp, 1.0)), jnp.inf)
    top = lax.all_gather(top, vocab_axes, axis=x.ndim - 1, tiled=True)
    ids = lax.all_gather(ids, vocab_axes, axis=x.ndim - 1, tiled=True)
    top, order = lax.top_k(top, k)
    ids = jnp.take_along_axis(ids, order, axis=-1)
    return ids, (top - shift) * inv - log_sum

  # The gathered candidates are the same on every device of the vocabulary axes, which the
  # type system cannot infer from all_gather; nothing is differentiated here.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(*spec), P()),
                       out_specs=(out_spec, out_spec), check_vma=False)(
                           teacher_logits, inv_temperature)


def topk_teacher(
    teacher_logits: ArrayLike,
    k: int,
    *,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> tuple[Array, Array]:
  r"""The teacher's ``k`` most likely ids and their full-vocabulary log-probabilities.

  .. math::

      \text{logprobs}_{j} = \frac{t_{\text{ids}_j}}{T} - \log \sum_{v=1}^{V} e^{t_v / T},
      \qquad t_{\text{ids}_1} \ge t_{\text{ids}_2} \ge \dots \ge t_{\text{ids}_k}

  The log-probabilities are over the **full** vocabulary, not renormalised over the ``k`` ids,
  so ``1 - sum(exp(logprobs))`` is the teacher's mass outside them. Ties are broken towards the
  lower id. A token whose logits are all ``-inf`` gets log-probabilities ``-inf`` (an empty
  distribution, which every tail policy of :func:`sparse_distill_loss` scores 0). Computed in
  float32, blockwise over tokens; no gradient flows through it.

  Args:
    teacher_logits: ``[..., vocab]`` teacher logits, any float dtype.
    k: number of ids to keep per token, ``1 <= k <= vocab``: a Python int (it sets the output
      shape; under ``jax.jit`` pass it as a static argument, ``static_argnames="k"``).
    temperature: ``T > 0``. Use the temperature the student will be distilled at: the stored
      log-probabilities cannot be re-tempered later.
    token_block: rows per block (default: about 1 MiB of float32 per block).

  Returns:
    ``(ids, logprobs)``: int32 ``[..., k]`` and float32 ``[..., k]``, sorted by descending
    log-probability.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> ids, logprobs = kdjax.topk_teacher(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 2)
    >>> ids.tolist(), [round(float(p), 4) for p in jnp.exp(logprobs)[0]]
    ([[1, 2]], [0.6, 0.3])
  """
  teacher_logits = checks.logits("teacher_logits", teacher_logits)
  k = checks.entries_per_row("k", k, function="topk_teacher", vocab=teacher_logits.shape[-1])
  temperature = checks.temperature(temperature)
  token_block = checks.positive_int("token_block", token_block, optional=True)
  inv_temperature = jnp.asarray(1.0 / temperature, jnp.float32)
  mesh, _ = meshes.explicit_mesh(teacher_logits)
  if mesh is None:
    ids, logprobs = _topk(lax.stop_gradient(teacher_logits), inv_temperature, k=k,
                          token_block=token_block)
  else:
    ids, logprobs = _topk_per_device(lax.stop_gradient(teacher_logits), inv_temperature, k=k,
                                     token_block=token_block, mesh=mesh)
  return lax.stop_gradient(ids), lax.stop_gradient(logprobs)


# ----------------------------------------------------------------------------------------------
# Checking a concrete sparse teacher
# ----------------------------------------------------------------------------------------------


def logprob_tolerance(dtype) -> float:
  """How far above 0 rounding alone may take a stored log-probability, or the log of a token's
  total stored probability: ``max(2**-6, 16 * eps(dtype))`` nats.

  That is 2**-6 (0.0156) for float64, float32 and float16, 2**-3 for bfloat16. Rounding to a
  float format never makes a log-probability <= 0 positive; it moves the log of a row's total by
  at most the dtype's unit roundoff times ``log k`` (bfloat16: 2**-8 * 12 < 0.05 for ``k`` up to
  150k ids; float16: < 0.006), and float32 arithmetic (``logits - logsumexp(logits)``) by about
  ``6e-8`` times the logits' magnitude. 2**-6 also covers float16 values read back as float32.
  """
  return max(2.0 ** -6, 16 * float(np.finfo(dtype).eps))


def _entry(name: str, token_shape: tuple[int, ...], row: int) -> str:
  if not token_shape:
    return name
  index = np.unravel_index(row, token_shape)
  return f"{name}[{', '.join(str(int(i)) for i in index)}]"


def _row_text(values: np.ndarray) -> str:
  shown = ", ".join(f"{v:.4g}" for v in values[:6])
  return f"[{shown}{', ...' if values.size > 6 else ''}]"


_TOPK_HINT = ("kdjax.topk_teacher(teacher_logits, k, temperature=T) computes both from the "
              "teacher's logits")


def sparse_teacher_problem(
    teacher_ids: ArrayLike | None,
    teacher_logprobs: ArrayLike | None,
    *,
    names: tuple[str, str] = ("teacher_ids", "teacher_logprobs"),
) -> str | None:
  """What is wrong with a concrete sparse teacher ``[..., k]``, or None if nothing is.

  NumPy only, so any caller can use it on host arrays. A token (row of ``k`` entries) is
  refused when one of its log-probabilities is above 0, or the log of its total probability
  ``log(sum(exp(logprobs)))`` is above 0, by more than :func:`logprob_tolerance` of the
  log-probabilities' dtype; or when an id repeats within it (``-inf`` entries included: the
  student's side still reads each id). ``-inf`` entries, empty (all ``-inf``) tokens and NaN
  are not problems here (the losses' conventions cover them). Either argument may be None to
  skip its checks. The message names the first bad token, with ``names`` as the arguments.
  """
  ids_name, logprobs_name = names
  problems: list[tuple[int, str]] = []
  if teacher_logprobs is not None:
    logprobs = np.asarray(teacher_logprobs)
    if logprobs.size:
      problem = _logprob_problem(logprobs, logprobs_name)
      if problem is not None:
        problems.append(problem)
  if teacher_ids is not None:
    ids = np.asarray(teacher_ids)
    if ids.size:
      problem = _repeated_id_problem(ids, ids_name)
      if problem is not None:
        problems.append(problem)
  return min(problems, key=lambda problem: problem[0])[1] if problems else None


def _logprob_problem(logprobs: np.ndarray, name: str) -> tuple[int, str] | None:
  k, token_shape = logprobs.shape[-1], logprobs.shape[:-1]
  tolerance = logprob_tolerance(logprobs.dtype)
  rows = logprobs.reshape(-1, k).astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    row_max = np.max(rows, axis=-1)  # NaN rows compare False below: NaN is not judged here.
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    log_mass = shift + np.log(np.sum(np.exp(rows - shift[:, None]), axis=-1))
  above = row_max > tolerance
  over = log_mass > tolerance
  bad = above | over
  if not bad.any():
    return None
  row = int(np.argmax(bad))
  values = rows[row]
  at = _entry(name, token_shape, row)
  rule = (f"up to rounding ({tolerance:g} nats for {logprobs.dtype} log-probabilities)")
  if row_max[row] > 1.0:
    hint = (f"Values above 1 look like raw logits (for example from jax.lax.top_k), not "
            f"log-probabilities: {_TOPK_HINT}.")
  elif above[row] and np.all(values[~np.isnan(values)] >= 0.0):
    hint = (f"Values in [0, 1] look like probabilities rather than their logarithms: pass "
            f"log-probabilities ({_TOPK_HINT}).")
  else:
    hint = (f"They must be one distribution's log-probabilities over the teacher's full "
            f"vocabulary, of distinct ids: {_TOPK_HINT}.")
  if above[row]:
    entry = int(np.argmax(values > tolerance))
    message = (f"{at} holds log-probabilities above 0: {_row_text(values)} (entry {entry} is "
               f"{values[entry]:.4g}); a log-probability is <= 0 {rule}. {hint}")
  else:
    message = (f"the probabilities exp({at}) sum to {float(np.exp(log_mass[row])):.6g} > 1 "
               f"({_row_text(values)}): a token's probabilities sum to <= 1 {rule}. {hint}")
  return row, message


def _repeated_id_problem(ids: np.ndarray, name: str) -> tuple[int, str] | None:
  k, token_shape = ids.shape[-1], ids.shape[:-1]
  rows = ids.reshape(-1, k)
  ordered = np.sort(rows, axis=-1)
  repeated = np.any(ordered[:, 1:] == ordered[:, :-1], axis=-1)
  if not repeated.any():
    return None
  row = int(np.argmax(repeated))
  same = ordered[row, 1:] == ordered[row, :-1]
  value = ordered[row, 1:][same][0]
  first, second = np.flatnonzero(rows[row] == value)[:2]
  return row, (
      f"{_entry(name, token_shape, row)} repeats id {int(value)} (entries {int(first)} and "
      f"{int(second)}): the k ids of a token must be distinct, also where their "
      f"log-probability is -inf. {_TOPK_HINT}, with distinct ids.")


# ----------------------------------------------------------------------------------------------
# sparse_distill_loss: the block function of the blocked engine
# ----------------------------------------------------------------------------------------------


def _log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x <= 0`` (Maechler 2012); ``-inf`` at ``x = 0``."""
  x = jnp.minimum(x, 0.0)
  near_zero = x > -math.log(2.0)
  # Each branch is evaluated where the other is selected: keep its argument in range.
  small = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
  large = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  return jnp.where(near_zero, small, large)


def _log(x: Array) -> Array:
  return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def _append(d: div.Dist, log_rest: Array, prob_rest: Array) -> div.Dist:
  """``d`` with one more category (the rest of the vocabulary) appended."""
  return div.dist(jnp.concatenate([d.log, log_rest[:, None]], axis=-1),
                  jnp.concatenate([d.prob, prob_rest[:, None]], axis=-1))


def _block(config: config_lib.Config, hp, logits, ids, teacher_logprobs, *, weights,
           with_grad: bool):
  """One block of tokens: the recipe on the ``k`` teacher ids (plus the tail bucket).

  With ``config.metrics``: the student's entropy over its whole vocabulary, the teacher's over
  the categories the divergence compares (the ``k`` ids, renormalised or not, and the rest for
  ``"bucket"``), and the agreement of the student's top-1 id with the teacher's (the lowest id
  of its largest stored log-probability).
  """
  inv_temperature = recipe.inverse_temperature(hp)
  x = logits.astype(jnp.float32)
  x_top = recipe.gather_entries(x, ids)
  log_p = teacher_logprobs.astype(jnp.float32)
  # The stored log-probabilities are normalised: their statistics only serve to renormalise
  # them over the k ids and to find empty (all -inf) and NaN rows.
  teacher, _ = recipe.statistics(log_p, 1.0)
  bad_ids = ~jnp.all((ids >= 0) & (ids < x.shape[-1]), axis=-1)
  invalid = bad_ids
  if config.tail == "renormalize":
    student, top_exps = recipe.statistics(x_top, inv_temperature)
    q = recipe.distribution(x_top, student, inv_temperature, top_exps)
    p = recipe.distribution(log_p, teacher, 1.0)
    row_max = jnp.max(x, axis=-1)  # The rest of the row is not read otherwise: check it.
    invalid = invalid | jnp.isnan(row_max) | (row_max == jnp.inf)
  else:
    student, exps = recipe.statistics(x, inv_temperature, keep=True)
    q_full = recipe.distribution(x, student, inv_temperature, exps)
    q = recipe.distribution(x_top, student, inv_temperature)
    p = div.dist(log_p)
    if config.tail == "bucket":
      in_top = recipe.scatter_entries(jnp.zeros(x.shape, jnp.bool_), ids, True, add=False)
      # q_r summed over the entries outside the top k: exact even when it is tiny.
      q_rest = jnp.sum(jnp.where(in_top, 0.0, q_full.prob), axis=-1)
      log_q_rest = _log(q_rest)
      empty_teacher = teacher.sum_exp == 0  # No remainder category is invented for it.
      log_p_rest = jnp.where(empty_teacher, -jnp.inf,
                             _log1mexp(recipe.log_normaliser(teacher, 1.0)))
      q = _append(q, log_q_rest, q_rest)
      p = _append(p, log_p_rest, jnp.exp(log_p_rest))
  terms = recipe.terms(config, hp, p, q)
  sums = recipe.Sums(jnp.sum(terms.value, axis=-1),
                     jnp.sum(terms.dlog_q, axis=-1) if with_grad else None)
  rows, scale = recipe.finish(config, hp, student, teacher, sums, weights=weights,
                              invalid=invalid)
  result: recipe.Rows | recipe.MetricRows = rows
  if config.metrics:
    if config.tail == "renormalize":  # the whole row, read for the student's entropy alone
      whole, whole_exps = recipe.statistics(x, inv_temperature)
      q_whole = recipe.distribution(x, whole, inv_temperature, whole_exps)
    else:
      whole, q_whole = student, q_full
    at_max = log_p == teacher.max[:, None]
    teacher_top = jnp.min(jnp.where(at_max, ids, jnp.iinfo(jnp.int32).max), axis=-1)
    result = recipe.with_metrics(
        rows, whole, teacher, jnp.sum(recipe.entropy_terms(q_whole), axis=-1),
        jnp.sum(recipe.entropy_terms(p), axis=-1),
        jnp.min(recipe.top_ids(x, whole.max, 0), axis=-1), teacher_top,
        invalid=bad_ids)
  if not with_grad:
    return result, None
  if config.tail == "renormalize":
    # The student distribution lives on the k ids only: the gradient is zero elsewhere.
    grad_top = recipe.student_grad(
        scale, terms.dlog_q, q.prob, sums.dlog_q)  # type: ignore[arg-type]  # with_grad: summed
    return result, recipe.scatter_entries(jnp.zeros(x.shape, jnp.float32), ids, grad_top)
  k = ids.shape[-1]
  rest_dlog_q: Array | float = 0.0
  if config.tail == "bucket":
    # d log q_r / d log q_v = q_v / q_r for v outside the top k: the remainder's derivative is
    # shared among those entries (0 when q_r has no mass, by the conventions).
    share = jnp.exp(jnp.where(in_top, -jnp.inf, q_full.log)
                    - jnp.where(jnp.isfinite(log_q_rest), log_q_rest, 0.0)[:, None])
    rest_dlog_q = terms.dlog_q[:, k, None] * share
  # The recipe's gradient over the full vocabulary, with the k entries' derivatives added by a
  # scatter instead of materialising a dense dlog_q that is zero almost everywhere.
  grad = recipe.student_grad(
      scale, rest_dlog_q, q_full.prob, sums.dlog_q)  # type: ignore[arg-type]  # with_grad: summed
  return result, recipe.scatter_entries(grad, ids,
                                        recipe.scale_entries(scale, terms.dlog_q[:, :k]))


@functools.partial(jax.jit, static_argnames=("config", "output"))
def _sparse(config, traced, logits, teacher_ids, teacher_logprobs, labels, where, normalizer,
            token_weights, *, output):
  mask = reductions.token_mask(logits.shape[:-1], labels, where, config.ignore_index)
  reduction = "sum" if output == "sum_count" else config.reduction
  invalid = reductions.invalid_tokens(mask, labels, logits.shape[-1], traced)
  loss, rows = reductions.reduced_loss(
      lambda weights: implementations.materialised(
          config, traced, logits, (teacher_ids.astype(jnp.int32), teacher_logprobs), weights,
          mask=mask, block_fn=_block, reference_fn=reference.sparse_per_token),
      mask, reduction=reduction, normalizer=normalizer, invalid=invalid,
      token_weights=token_weights)
  if output == "metrics":
    return loss, metrics_lib.from_rows(rows, mask, cross_entropy=False, reduction=reduction,
                                       normalizer=normalizer, invalid=invalid,
                                       token_weights=token_weights)
  return reductions.outputs(output, loss, rows, mask)


def _concrete(x: Array) -> Array | None:
  """``x`` if its values can be read here (not traced, all on this host), else None."""
  if isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True):
    return None
  return x


def _call(logits, teacher_ids, teacher_logprobs, labels, *, tail, divergence, beta, alpha,
          temperature, temperature_squared, ignore_index, where, token_weights, reduction,
          normalizer, token_block, implementation, output):
  """Validates the inputs of the public losses (at trace time) and runs ``_sparse``."""
  logits, teacher_ids, teacher_logprobs = checks.sparse_teacher(
      logits, teacher_ids, teacher_logprobs)
  tokens = checks.token_arguments(
      logits.shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block,
      token_weights=token_weights, vocab_size=logits.shape[-1])
  checks.one_of("tail", tail, TAILS)
  hp = checks.hyperparameters(divergence, temperature=temperature, beta=beta, alpha=alpha)
  if tail == "zero" and divergence != "forward_kl":
    raise ValueError(
        f"tail='zero' drops the teacher's mass outside the top k without renormalising, which "
        f"only forward KL's terms allow; divergence={divergence!r} needs tail='bucket' (or "
        "'renormalize').")
  config, traced = config_lib.build(
      hp, divergence=divergence, tail=tail, temperature_squared=bool(temperature_squared),
      reduction=reduction, ignore_index=ignore_index,
      implementation=implementations.check(implementation), token_block=tokens.token_block,
      metrics=output == "metrics")
  problem = sparse_teacher_problem(_concrete(teacher_ids), _concrete(teacher_logprobs))
  if problem is not None:
    raise ValueError(problem)
  # On Explicit axes the gather and scatter at the ids along a (possibly vocabulary-sharded)
  # row have no unambiguous sharding: the partitioner decides them, as on Auto axes.
  token_spec = meshes.token_spec(logits, logits.ndim - 1)
  if output == "sum_count" or reduction != "none":
    out_specs: Any = (P(), P()) if output == "sum_count" else P()
  else:
    out_specs = token_spec
  if output == "metrics":
    out_specs = metrics_lib.out_specs(out_specs, token_spec, cross_entropy=False)
  return meshes.on_auto_axes(
      functools.partial(_sparse, config, output=output),
      (traced, logits, teacher_ids, teacher_logprobs, tokens.labels, tokens.where,
       tokens.normalizer, tokens.token_weights), out_specs)


def sparse_distill_loss(
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    beta: float | ArrayLike = 0.5,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  r"""A divergence from a sparse (top-k) teacher to the student, masked and reduced.

  With :math:`q = \mathrm{softmax}(\text{logits} / T)` over the student's full vocabulary,
  :math:`K` the ``k`` teacher ids of a token, :math:`p_K = \exp(\text{teacher\_logprobs})` and
  :math:`D` the divergence (forward KL shown):

  .. math::

      \text{renormalize:}\quad & D(\tilde p, \tilde q),
      \quad \tilde p_v = \frac{p_v}{\sum_K p}, \ \tilde q_v = \frac{q_v}{\sum_K q},
      \ v \in K \\
      \text{zero:}\quad & \sum_{v \in K} p_v \log \frac{p_v}{q_v} \\
      \text{bucket:}\quad & D\big((p_K, p_r), (q_K, q_r)\big),
      \quad p_r = 1 - \sum_K p, \ q_r = 1 - \sum_K q

  each optionally times :math:`T^2`, then masked and reduced over tokens as in
  :func:`kdjax.distill_loss`. With ``k`` equal to the vocabulary size every policy is the dense
  divergence. ``"zero"`` is not a divergence (it can be negative when the student puts more
  mass than the teacher on the ``k`` ids) and is offered for forward KL only;
  ``"renormalize"`` and ``"bucket"`` compare distributions over ``k`` and ``k + 1`` categories,
  so they are ``>= 0``.

  Args:
    logits: student logits ``[..., vocab]``, any float dtype; computed in float32, gradient
      returned in this dtype.
    teacher_ids: integer ``[..., k]``: the teacher's ids (``logits.shape[:-1] + (k,)``),
      distinct within a token and in ``[0, vocab)`` (an out-of-range id gives a NaN value for
      that token). From :func:`topk_teacher` or a teacher cache.
    teacher_logprobs: float ``[..., k]``: the teacher's full-vocabulary log-probabilities of
      those ids at ``temperature`` (any float dtype, for example bfloat16 from a cache).
      ``-inf`` marks an entry without teacher mass. No gradient flows to the teacher arrays.
      Concrete (untraced) teacher arrays are checked: a log-probability above 0 or a token's
      probabilities summing to more than 1, beyond rounding (``2**-6`` nats; ``2**-3`` for
      bfloat16), or a repeated id is a ``ValueError`` naming the first bad token (raw logits,
      for example from ``jax.lax.top_k``, are refused so). Traced ones are used as given.
    labels: optional integer ``logits.shape[:-1]``; tokens equal to ``ignore_index`` are
      excluded (the values are not used otherwise). A counted label outside ``[0, vocab)`` is
      a ``ValueError`` when the labels are known at the call, and makes the loss NaN when they
      are traced.
    tail: what to do with the teacher's mass outside the top ``k``: ``"bucket"`` (the
      default: a true divergence, ``0 <= bucket <= forward_kl``, and in training within a few
      thousandths of a nat of dense distillation at ``k = 32``), ``"zero"`` or
      ``"renormalize"`` (matches only the shape of the top ``k`` and leaves the student's mass
      outside it untrained: far worse from scratch). See above and the module docstring.
    divergence, beta, alpha: the divergence and its hyperparameters, as in
      :func:`kdjax.distill_loss` (``"zero"`` takes ``"forward_kl"`` only).
    temperature: ``T > 0`` for the student's softmax; must be the temperature the teacher's
      log-probabilities were computed at. A scalar array may be scheduled without retracing.
    temperature_squared: multiply per-token values by ``T**2``.
    ignore_index: label value that marks a token to ignore.
    where: optional boolean or integer mask ``logits.shape[:-1]``, combined with ``labels``
      by AND.
    token_weights: optional float per-token weights, as in :func:`kdjax.distill_loss`.
    reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"sequence_mean"`` (as in
      :func:`kdjax.distill_loss`; an all-ignored batch gives 0 with zero gradients).
    normalizer: optional scalar replacing the valid-token count of ``"mean"``.
    token_block: rows per block of the blocked computation (default: automatic).
    implementation: ``"blocked"``, ``"reference"`` or None, as in :func:`kdjax.distill_loss`.

  Returns:
    A float32 scalar, or ``logits.shape[:-1]`` for ``reduction="none"``.

  Example:
    >>> import jax.numpy as jnp
    >>> import kdjax
    >>> teacher = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
    >>> ids, logprobs = kdjax.topk_teacher(teacher, 4)
    >>> float(kdjax.sparse_distill_loss(teacher, ids, logprobs, tail="bucket"))  # same model
    0.0

  References:
    Raman et al., *For Distillation, Tokens Are Not All You Need*, 2023 (top-k teachers).
    Anshumann et al., *Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs*,
    2025 (bias of truncated top-k teachers).
  """
  return _call(
      logits, teacher_ids, teacher_logprobs, labels, tail=tail, divergence=divergence,
      beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, ignore_index=ignore_index, where=where,
      token_weights=token_weights,
      reduction=reduction, normalizer=normalizer, token_block=token_block,
      implementation=implementation, output="loss")


def sparse_distill_loss_sum_and_count(
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    beta: float | ArrayLike = 0.5,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    token_block: int | None = None,
    implementation: str | None = None,
) -> tuple[Array, Array]:
  """``(sum over valid tokens, number of valid tokens)`` of :func:`sparse_distill_loss`.

  Sum both over hosts, devices or gradient-accumulation steps, then divide once, so the mean
  is unbiased however the valid tokens are spread. Arguments as in :func:`sparse_distill_loss`,
  ``tail="bucket"`` by default.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import kdjax
    >>> ids, logprobs = jnp.array([[0], [1]]), jnp.log(jnp.array([[0.5], [0.5]]))
    >>> total, count = kdjax.sparse_distill_loss_sum_and_count(
    ...     jnp.zeros((2, 2)), ids, logprobs, jnp.array([1, -100]), tail="bucket")
    >>> float(total), float(count)
    (0.0, 1.0)
  """
  return _call(
      logits, teacher_ids, teacher_logprobs, labels, tail=tail, divergence=divergence,
      beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, ignore_index=ignore_index, where=where,
      token_weights=token_weights,
      reduction="sum", normalizer=None, token_block=token_block,
      implementation=implementation, output="sum_count")


def sparse_distill_loss_with_metrics(
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    beta: float | ArrayLike = 0.5,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
    implementation: str | None = None,
) -> tuple[Array, DistillMetrics]:
  r""":func:`sparse_distill_loss` and its metrics, from the same pass over the student's logits.

  The loss is :func:`sparse_distill_loss`'s (the same value and gradient). The metrics are those
  of :func:`kdjax.distill_loss_with_metrics`, with the teacher known only on its ``k`` ids:

  * ``student_entropy``: over the student's whole vocabulary, at ``temperature``;
  * ``teacher_entropy``: over the categories the divergence compares, as ``tail`` makes them:
    the ``k`` stored probabilities (``"zero"``: :math:`-\sum_K p \log p`, a lower bound of the
    full teacher's entropy), renormalised over them (``"renormalize"``), or with the rest of the
    vocabulary as one more category (``"bucket"``: :math:`-\sum_K p \log p - p_r \log p_r`);
  * ``top1_agreement``: whether the student's largest logit is at the teacher's top-1 id, the
    lowest id of its largest stored log-probability (``topk_teacher``'s first).

  Arguments as in :func:`sparse_distill_loss`.

  Returns:
    ``(loss, metrics)``: the loss and a :class:`kdjax.DistillMetrics`. With
    ``reduction="sum"``, ``(loss, metrics.token_count)`` is what
    :func:`sparse_distill_loss_sum_and_count` returns.

  Example:
    >>> import jax.numpy as jnp
    >>> import kdjax
    >>> teacher = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
    >>> ids, logprobs = kdjax.topk_teacher(teacher, 2)
    >>> loss, metrics = kdjax.sparse_distill_loss_with_metrics(teacher, ids, logprobs)
    >>> float(metrics.top1_agreement), round(float(metrics.teacher_entropy), 4)  # 0.5, 0.3, 0.2
    (1.0, 1.0297)
  """
  return _call(
      logits, teacher_ids, teacher_logprobs, labels, tail=tail, divergence=divergence,
      beta=beta, alpha=alpha, temperature=temperature,
      temperature_squared=temperature_squared, ignore_index=ignore_index, where=where,
      token_weights=token_weights, reduction=reduction, normalizer=normalizer,
      token_block=token_block, implementation=implementation, output="metrics")
