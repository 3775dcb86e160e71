"""Distillation from a sparse (top-k) teacher: ``topk_teacher`` and ``sparse_distill_loss``.

A sparse teacher is, per token, ``k`` vocabulary ids and the teacher's log-probabilities of
those ids over its **full** vocabulary (``log p_v = t_v - lse(t)``). It is computed once, stored
(see ``cache.py``) and read back during student training, so the teacher does not run then.

The loss is forward KL, the definition in ``divergences.py`` (``DIVERGENCES["forward_kl"]``),
applied to the ``k`` gathered entries. What happens to the teacher's mass outside the top ``k``
is a policy, ``tail``; with ``p`` the teacher's and ``q`` the student's full-vocabulary
probabilities on the ``k`` ids (``q`` at the same temperature as the stored teacher):

* ``"renormalize"``: both renormalised over the ``k`` ids, then KL. Only the relative shape of
  the top ``k`` is matched; the student's mass outside them gets no gradient.
* ``"zero"``: :math:`\\sum_k p_k (\\log p_k - \\log q_k)`, no renormalisation. The teacher's tail
  is dropped; the student is pulled up on the ``k`` ids (and so down everywhere else).
* ``"bucket"``: ``"zero"`` plus one extra category for the rest of the vocabulary,
  :math:`p_r = 1 - \\sum_k p_k`, :math:`q_r = 1 - \\sum_k q_k`: a proper KL between two
  distributions over ``k + 1`` categories, which never exceeds the full-vocabulary KL (data
  processing inequality).

With ``k`` equal to the vocabulary size all three equal ``forward_kl``.

Only the row statistics differ from the dense path: the student's log-normaliser is the full
vocabulary log-sum-exp (``"zero"``, ``"bucket"``) or the log-sum-exp of the ``k`` gathered
logits (``"renormalize"``); the teacher's is 0 (stored log-probabilities are already normalised)
or the log-sum-exp of the ``k`` stored values. ``q_r`` is summed directly over the student's
entries outside the top ``k`` (exact even when it is tiny); ``p_r`` is
``log(1 - exp(lse_k(log p)))`` evaluated with ``log1mexp``, clamped at 0 when rounded
stored values sum to more than 1.

Conventions, on top of those of ``divergences.py``: an entry whose stored teacher
log-probability is ``-inf`` has no teacher mass and contributes 0; a token whose ``k`` teacher
entries are all ``-inf`` is an empty teacher distribution and contributes 0 under every policy
(no remainder category is invented for it); a student ``-inf`` logit among the ``k`` ids
contributes 0 (``x log(x / 0) := 0``). Ids must be valid (``0 <= id < vocab``) and distinct
within a token, which ``topk_teacher`` guarantees; an out-of-range id makes that token's value
NaN rather than silently reading another entry.

The gradient with respect to the student logits is analytic (``jax.custom_vjp``), computed
blockwise over tokens like the dense engine: it has the form ``dlog_q - q * sum(dlog_q)`` of
``divergences.student_grad``, where ``dlog_q`` is the divergence's ``k``-entry derivative
scattered into the vocabulary (plus, for ``"bucket"``, the remainder's share ``g_r q_v / q_r``
on every other entry). No ``[tokens, vocab]`` float32 temporary is kept; the gradient is stored
in the logits' dtype. No gradient flows to the teacher arrays.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from kdjax._src import blocking, checks, reductions
from kdjax._src import divergences as div

Array = jax.Array

TAILS = ("renormalize", "zero", "bucket")


# ----------------------------------------------------------------------------------------------
# topk_teacher
# ----------------------------------------------------------------------------------------------


def _topk_block(k, temperature, teacher_logits):
  scaled = teacher_logits.astype(jnp.float32) / temperature
  lse = div.logsumexp(scaled)
  values, ids = lax.top_k(scaled, k)
  return ids.astype(jnp.int32), values - lse[:, None]


@functools.partial(jax.jit, static_argnames=("k", "token_block"))
def _topk(teacher_logits, temperature, *, k, token_block):
  vocab = teacher_logits.shape[-1]
  flat = teacher_logits.reshape(-1, vocab)
  num_tokens = flat.shape[0]
  block = token_block or blocking.default_token_block(num_tokens, vocab)
  ids, logprobs = blocking.map_token_blocks(
      functools.partial(_topk_block, k, temperature), (flat,),
      (jnp.zeros((num_tokens, k), jnp.int32), jnp.zeros((num_tokens, k), jnp.float32)),
      block=block)
  shape = teacher_logits.shape[:-1] + (k,)
  return ids.reshape(shape), logprobs.reshape(shape)


def topk_teacher(
    teacher_logits: ArrayLike,
    k: int,
    *,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
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
    k: number of ids to keep per token, ``1 <= k <= vocab``.
    temperature: ``T > 0``. Use the temperature the student will be distilled at: the stored
      log-probabilities cannot be re-tempered later.
    token_block: rows per block (default: about 1 MiB of float32 per block).

  Returns:
    ``(ids, logprobs)``: int32 ``[..., k]`` and float32 ``[..., k]``, sorted by descending
    log-probability.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax._src.sparse import topk_teacher
    >>> ids, logprobs = topk_teacher(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 2)
    >>> ids.tolist(), [round(float(p), 4) for p in jnp.exp(logprobs)[0]]
    ([[1, 2]], [0.6, 0.3])
  """
  teacher_logits = checks.float_array("teacher_logits", teacher_logits)
  k = checks.positive_int("k", k)
  vocab = teacher_logits.shape[-1]
  if k > vocab:
    raise ValueError(
        f"k must be <= the vocabulary size teacher_logits.shape[-1] = {vocab}, got k={k}.")
  temperature = checks.scalar("temperature", temperature)
  div.check_temperature(temperature)
  token_block = checks.positive_int("token_block", token_block, optional=True)
  ids, logprobs = _topk(
      lax.stop_gradient(teacher_logits), jnp.asarray(temperature, jnp.float32), k=k,
      token_block=token_block)
  return lax.stop_gradient(ids), lax.stop_gradient(logprobs)


# ----------------------------------------------------------------------------------------------
# sparse_distill_loss: the blocked per-token engine
# ----------------------------------------------------------------------------------------------


class _Config(NamedTuple):
  tail: str
  static_temperature: float | None  # None: the temperature is traced (a dynamic argument).
  temperature_squared: bool
  token_block: int | None


def _log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x <= 0`` (Maechler 2012); ``-inf`` at ``x = 0``."""
  x = jnp.minimum(x, 0.0)
  near_zero = x > -math.log(2.0)
  # Each branch is evaluated where the other is selected: keep its argument in range.
  small = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
  large = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  return jnp.where(near_zero, small, large)


def _scatter_rows(dense: Array, ids: Array, values: Array, *, add: bool = True) -> Array:
  rows = lax.broadcasted_iota(jnp.int32, ids.shape, 0)
  ref = dense.at[rows, ids]
  return ref.add(values, mode="drop") if add else ref.set(values, mode="drop")


def _block(config: _Config, with_grad: bool, temperature, logits, ids, teacher_logprobs):
  """One block of tokens: per-token value and optionally its gradient w.r.t. ``logits``."""
  forward_kl = div.get_divergence("forward_kl")
  num_rows, vocab = logits.shape
  s = logits.astype(jnp.float32) / temperature
  s_top = jnp.take_along_axis(s, ids, axis=-1, mode="fill", fill_value=-jnp.inf)
  log_p = teacher_logprobs.astype(jnp.float32)

  if config.tail == "renormalize":
    student_log_norm = div.logsumexp(s_top)
    teacher_log_norm = div.logsumexp(log_p)
  else:
    student_log_norm = div.logsumexp(s)
    teacher_log_norm = jnp.zeros((num_rows,), jnp.float32)
  log_q_top = s_top - student_log_norm[:, None]
  log_p_top = log_p - teacher_log_norm[:, None]
  if config.tail == "bucket":
    in_top = _scatter_rows(jnp.zeros(s.shape, jnp.bool_), ids, True, add=False)
    q_full = jnp.exp(s - student_log_norm[:, None])
    q_rest = jnp.sum(jnp.where(in_top, 0.0, q_full), axis=-1)
    log_q_rest = jnp.where(q_rest > 0, jnp.log(jnp.where(q_rest > 0, q_rest, 1.0)), -jnp.inf)
    # div.logsumexp is 0 for an all -inf row, so an empty teacher gets p_r = 0, not 1.
    log_p_rest = _log1mexp(div.logsumexp(log_p))
    log_q_top = jnp.concatenate([log_q_top, log_q_rest[:, None]], axis=-1)
    log_p_top = jnp.concatenate([log_p_top, log_p_rest[:, None]], axis=-1)

  # The k (+ 1) categories arrive already normalised: their log-normalisers are 0 here.
  zeros = jnp.zeros((num_rows,), jnp.float32)
  terms, q_top = div.pointwise_terms(forward_kl, log_q_top, log_p_top, zeros, zeros, {})
  scale = jnp.square(temperature) if config.temperature_squared else 1.0
  # The conventions would score a NaN read from an invalid id as "no mass" (0): flag it instead.
  valid_ids = jnp.all((ids >= 0) & (ids < vocab), axis=-1)
  value = jnp.where(valid_ids, scale * jnp.sum(terms.value, axis=-1), jnp.nan)
  if not with_grad:
    return (value,)

  sum_dlog_q = jnp.sum(terms.dlog_q, axis=-1)
  if config.tail == "renormalize":
    # The student distribution lives on the k ids only: the gradient is zero elsewhere.
    grad_top = div.student_grad(terms, q_top, sum_dlog_q)
    grad = _scatter_rows(jnp.zeros(s.shape, jnp.float32), ids, grad_top)
  else:
    k = ids.shape[-1]
    if config.tail == "zero":
      q_full = jnp.exp(s - student_log_norm[:, None])
      rest_dlog_q = 0.0
    else:
      # d log q_r / d log q_v = q_v / q_r for v outside the top k: the remainder's derivative
      # is shared among those entries (0 when q_r has no mass, by the conventions).
      share = jnp.exp(jnp.where(in_top, -jnp.inf, s - student_log_norm[:, None])
                      - jnp.where(jnp.isfinite(log_q_rest), log_q_rest, 0.0)[:, None])
      rest_dlog_q = terms.dlog_q[:, k, None] * share
    # student_grad over the full vocabulary, with the k-entry derivatives added by a scatter
    # instead of materialising a dense dlog_q that is zero almost everywhere.
    grad = div.student_grad(terms._replace(dlog_q=rest_dlog_q), q_full, sum_dlog_q)
    grad = _scatter_rows(grad, ids, terms.dlog_q[:, :k])
  grad = jnp.where(valid_ids[:, None], grad * (scale / temperature), jnp.nan)
  return value, grad.astype(logits.dtype)


def _loop(config: _Config, dynamic_temperature, logits, ids, teacher_logprobs, *, with_grad):
  temperature = (config.static_temperature if dynamic_temperature is None
                 else dynamic_temperature)
  num_tokens, vocab = logits.shape
  block = config.token_block or blocking.default_token_block(num_tokens, vocab)
  outputs = (jnp.zeros((num_tokens,), jnp.float32),)
  overwrite = {}
  if with_grad:  # The gradient is written over the logits (see map_token_blocks).
    outputs += (logits,)
    overwrite = {0: 1}
  return blocking.map_token_blocks(
      functools.partial(_block, config, with_grad, temperature),
      (logits, ids, teacher_logprobs), outputs, block=block, overwrite=overwrite)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(config, logits, ids, teacher_logprobs, dynamic_temperature):
  (value,) = _loop(config, dynamic_temperature, logits, ids, teacher_logprobs, with_grad=False)
  return value


def _per_token_fwd(config, logits, ids, teacher_logprobs, dynamic_temperature):
  # As in dense.py: the per-token gradient is computed with the value (the probabilities are at
  # hand) and kept in the logits' dtype; the backward pass only scales it.
  value, grad = _loop(config, dynamic_temperature, logits, ids, teacher_logprobs, with_grad=True)
  return value, (grad, dynamic_temperature)


def _per_token_bwd(config, residuals, value_ct):
  grad, dynamic_temperature = residuals
  grad = blocking.scale_rows(grad, value_ct)
  temperature_ct = (None if dynamic_temperature is None
                    else jnp.zeros_like(dynamic_temperature))
  # The teacher (ids and log-probabilities) is a constant of the loss.
  return grad, None, None, temperature_ct


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("config", "ignore_index", "reduction", "output"),
)
def _sparse(logits, teacher_ids, teacher_logprobs, labels, where, normalizer,
            dynamic_temperature, *, config, ignore_index, reduction, output):
  token_shape = logits.shape[:-1]
  vocab, k = logits.shape[-1], teacher_ids.shape[-1]
  per_token = _per_token(
      config, logits.reshape(-1, vocab), teacher_ids.reshape(-1, k).astype(jnp.int32),
      lax.stop_gradient(teacher_logprobs).reshape(-1, k), dynamic_temperature,
  ).reshape(token_shape)
  mask = reductions.token_mask(token_shape, labels, where, ignore_index)
  if output == "sum_count":
    return reductions.sum_and_count(per_token, mask)
  return reductions.reduce(per_token, mask, reduction=reduction, normalizer=normalizer)


def _call(logits, teacher_ids, teacher_logprobs, labels, *, tail, temperature,
          temperature_squared, ignore_index, where, reduction, normalizer, token_block, output):
  """Validates the inputs of the public losses (at trace time) and runs ``_sparse``."""
  logits = checks.float_array("logits", logits)
  teacher_logprobs = checks.float_array("teacher_logprobs", teacher_logprobs)
  teacher_ids = jnp.asarray(teacher_ids)
  if not jnp.issubdtype(teacher_ids.dtype, jnp.integer):
    raise TypeError(f"teacher_ids must be an integer array, got dtype {teacher_ids.dtype}.")
  token_shape, vocab = logits.shape[:-1], logits.shape[-1]
  if teacher_ids.shape[:-1] != token_shape or teacher_ids.ndim != logits.ndim:
    raise ValueError(
        f"teacher_ids must have shape logits.shape[:-1] + (k,) = {token_shape + ('k',)}, got "
        f"{teacher_ids.shape} (logits.shape={logits.shape}).")
  if teacher_logprobs.shape != teacher_ids.shape:
    raise ValueError(
        f"teacher_logprobs must have the shape of teacher_ids {teacher_ids.shape}, got "
        f"{teacher_logprobs.shape}.")
  k = teacher_ids.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(
        f"teacher_ids must hold 1 <= k <= vocab = logits.shape[-1] = {vocab} ids per token, "
        f"got k={k}. If the teacher's vocabulary is larger, cut the teacher logits with "
        "kdjax.align_vocab before kdjax.topk_teacher.")
  if tail not in TAILS:
    raise ValueError(f"tail must be one of {TAILS}, got {tail!r}.")
  labels, where, token_block = checks.token_arguments(
      token_shape, labels=labels, where=where, reduction=reduction, normalizer=normalizer,
      ignore_index=ignore_index, token_block=token_block)
  temperature = checks.scalar("temperature", temperature)
  div.check_temperature(temperature)
  if isinstance(temperature, float):
    static_temperature, dynamic_temperature = temperature, None
  else:
    static_temperature, dynamic_temperature = None, jnp.asarray(temperature, jnp.float32)
  config = _Config(tail, static_temperature, bool(temperature_squared), token_block)
  return _sparse(
      logits, teacher_ids, teacher_logprobs, labels, where, normalizer, dynamic_temperature,
      config=config, ignore_index=ignore_index, reduction=reduction, output=output)


def sparse_distill_loss(
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    tail: str = "renormalize",
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
) -> Array:
  r"""Forward KL from a sparse (top-k) teacher to the student, masked and reduced.

  With :math:`q = \mathrm{softmax}(\text{logits} / T)` over the student's full vocabulary,
  :math:`K` the ``k`` teacher ids of a token and :math:`p_K = \exp(\text{teacher\_logprobs})`:

  .. math::

      \text{renormalize:}\quad & \sum_{v \in K} \tilde p_v \log \frac{\tilde p_v}{\tilde q_v},
      \quad \tilde p_v = \frac{p_v}{\sum_K p}, \ \tilde q_v = \frac{q_v}{\sum_K q} \\
      \text{zero:}\quad & \sum_{v \in K} p_v \log \frac{p_v}{q_v} \\
      \text{bucket:}\quad & \sum_{v \in K} p_v \log \frac{p_v}{q_v}
      + p_r \log \frac{p_r}{q_r}, \quad p_r = 1 - \sum_K p, \ q_r = 1 - \sum_K q

  each optionally times :math:`T^2`, then masked and reduced over tokens as in
  :func:`kdjax.distill_loss`. With ``k`` equal to the vocabulary size all three are
  :func:`kdjax.forward_kl`. ``"zero"`` is not a divergence (it can be negative when the student
  puts more mass than the teacher on the ``k`` ids); ``"renormalize"`` and ``"bucket"`` are KLs
  between distributions over ``k`` and ``k + 1`` categories, so they are ``>= 0``.

  Args:
    logits: student logits ``[..., vocab]``, any float dtype; computed in float32, gradient
      returned in this dtype.
    teacher_ids: integer ``[..., k]``: the teacher's ids (``logits.shape[:-1] + (k,)``),
      distinct within a token and in ``[0, vocab)`` (an out-of-range id gives a NaN value for
      that token). From :func:`topk_teacher` or a teacher cache.
    teacher_logprobs: float ``[..., k]``: the teacher's full-vocabulary log-probabilities of
      those ids at ``temperature`` (any float dtype, for example bfloat16 from a cache).
      ``-inf`` marks an entry without teacher mass. No gradient flows to the teacher arrays.
    labels: optional integer ``logits.shape[:-1]``; tokens equal to ``ignore_index`` are
      excluded (the values are not used otherwise).
    tail: what to do with the teacher's mass outside the top ``k``: ``"renormalize"``,
      ``"zero"`` or ``"bucket"`` (see above and the module docstring).
    temperature: ``T > 0`` for the student's softmax; must be the temperature the teacher's
      log-probabilities were computed at. A scalar array may be scheduled without retracing.
    temperature_squared: multiply per-token values by ``T**2``.
    ignore_index: label value that marks a token to ignore.
    where: optional boolean mask ``logits.shape[:-1]``, combined with ``labels`` by AND.
    reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"sequence_mean"`` (as in
      :func:`kdjax.distill_loss`; an all-ignored batch gives 0 with zero gradients).
    normalizer: optional scalar replacing the valid-token count of ``"mean"``.
    token_block: rows per block of the blocked computation (default: automatic).

  Returns:
    A float32 scalar, or ``logits.shape[:-1]`` for ``reduction="none"``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax._src.sparse import sparse_distill_loss, topk_teacher
    >>> teacher = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
    >>> ids, logprobs = topk_teacher(teacher, 4)
    >>> float(sparse_distill_loss(teacher, ids, logprobs, tail="bucket"))  # student == teacher
    0.0

  References:
    Raman et al., *For Distillation, Tokens Are Not All You Need*, 2023 (top-k teachers).
    Anshumann et al., *Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs*,
    2025 (bias of truncated top-k teachers).
  """
  return _call(
      logits, teacher_ids, teacher_logprobs, labels, tail=tail, temperature=temperature,
      temperature_squared=temperature_squared, ignore_index=ignore_index, where=where,
      reduction=reduction, normalizer=normalizer, token_block=token_block, output="loss")


def sparse_distill_loss_sum_and_count(
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    tail: str = "renormalize",
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    token_block: int | None = None,
) -> tuple[Array, Array]:
  """``(sum over valid tokens, number of valid tokens)`` of :func:`sparse_distill_loss`.

  Sum both over hosts, devices or gradient-accumulation steps, then divide once, so the mean
  is unbiased however the valid tokens are spread. Arguments as in :func:`sparse_distill_loss`.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax._src.sparse import sparse_distill_loss_sum_and_count
    >>> ids, logprobs = jnp.array([[0], [1]]), jnp.log(jnp.array([[0.5], [0.5]]))
    >>> total, count = sparse_distill_loss_sum_and_count(
    ...     jnp.zeros((2, 2)), ids, logprobs, jnp.array([3, -100]), tail="bucket")
    >>> float(total), float(count)
    (0.0, 1.0)
  """
  return _call(
      logits, teacher_ids, teacher_logprobs, labels, tail=tail, temperature=temperature,
      temperature_squared=temperature_squared, ignore_index=ignore_index, where=where,
      reduction="sum", normalizer=None, token_block=token_block, output="sum_count")
