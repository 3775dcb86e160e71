"""Distillation losses on materialised logits: ``kd_loss``, ``distill_loss`` and friends.

All of them validate their inputs at trace time (``checks.py``), build one static config, then
run one jitted computation: the implementation chosen by ``implementation=``
(``implementations.py``) and the shared reductions (``reductions.py``). Logits of
any float dtype are computed in float32; the gradient comes back in the logits' dtype; no
gradient flows to ``teacher_logits``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kdjax._src import checks, dense, implementations, reductions, reference
from kdjax._src import config as config_lib
from kdjax._src import metrics as metrics_lib
from kdjax._src.metrics import DistillMetrics

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "output"))
def _distill(config, traced, logits, teacher_logits, labels, where, normalizer, token_weights, *,
             output):
  """The one jitted body behind every public loss in this module.

  ``output`` selects what is returned: ``"loss"`` (the reduced loss), ``"sum_count"``
  (``(sum, count)``), ``"combined"`` (the loss and its two terms, each reduced alike) or
  ``"metrics"`` (the loss and its :class:`DistillMetrics`; ``config.metrics``).
  """
  mask = reductions.token_mask(logits.shape[:-1], labels, where, config.ignore_index)
  invalid = reductions.invalid_tokens(mask, labels, logits.shape[-1], traced)
  reduction = "sum" if output == "sum_count" else config.reduction
  others = (teacher_logits, labels) if config.cross_entropy else (teacher_logits,)
  loss, rows = reductions.reduced_loss(
      lambda weights: implementations.materialised(
          config, traced, logits, others, weights, mask=mask,
          block_fn=dense.teacher_logits_block, reference_fn=reference.per_token, kernels=True),
      mask, reduction=reduction, normalizer=normalizer, invalid=invalid,
      token_weights=token_weights)
  if output == "metrics":
    return loss, metrics_lib.from_rows(rows, mask, cross_entropy=config.cross_entropy,
                                       reduction=reduction, normalizer=normalizer,
                                       invalid=invalid, token_weights=token_weights)
  return reductions.outputs(output, loss, rows, mask, reduction=reduction,
                            normalizer=normalizer, invalid=invalid, token_weights=token_weights)


def _call(logits, teacher_logits, labels, *, divergence, beta, alpha, temperature,
          temperature_squared, ignore_index, where, reduction, normalizer, token_block,
          implementation, output, kd_coef=None, token_weights=None):
  """Validates every argument, builds the config once and runs ``_distill``."""
  logits, teacher_logits = checks.logits_pair(logits, teacher_logits)
  tokens = checks.token_arguments(
      logits.shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block,
      token_weights=token_weights, vocab_size=logits.shape[-1],
      labels_required=None if kd_coef is None else ": it holds the cross-entropy targets")
  hp = checks.hyperparameters(divergence, temperature=temperature, beta=beta, alpha=alpha,
                              kd_coef=kd_coef)
  config, traced = config_lib.build(
      hp, divergence=divergence, temperature_squared=bool(temperature_squared),
      cross_entropy=kd_coef is not None, reduction=reduction, ignore_index=ignore_index,
      implementation=implementations.check(implementation, kernels=True),
      token_block=tokens.token_block, metrics=output == "metrics")
  return _distill(config, traced, logits, teacher_logits, tokens.labels, tokens.where,
                  tokens.normalizer, tokens.token_weights, output=output)


def distill_loss(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
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
  r"""Distillation loss between student and teacher logits, masked and reduced.

  With :math:`s = \text{logits} / T`, :math:`t = \text{teacher\_logits} / T`,
  :math:`p = \mathrm{softmax}(t)` (teacher) and :math:`q = \mathrm{softmax}(s)` (student), the
  per-token value is the chosen divergence :math:`D(p, q)` (see the docs' divergences table),
  optionally times :math:`T^2`, then masked and reduced over tokens.

  .. math::

      \text{loss} = \frac{1}{N} \sum_{i:\ \text{valid}} w_i\, T^{2[\text{temperature\_squared}]}
      D(p_i, q_i), \qquad N = \text{normalizer or the number of valid tokens}

  with :math:`w_i` the optional ``token_weights`` (1 by default).

  Args:
    logits: student logits ``[..., vocab]`` (for example ``[batch, seq, vocab]``), any float
      dtype; computed in float32, gradient returned in this dtype.
    teacher_logits: teacher logits, same shape. Treated as a constant: no gradient flows to it.
    labels: optional integer token ids ``logits.shape[:-1]``; tokens equal to ``ignore_index``
      are excluded. Not used otherwise (shift them with :func:`kdjax.shift_labels` for
      next-token alignment). A counted label outside ``[0, vocab)`` is a ``ValueError`` when
      the labels are known at the call, and makes the loss NaN when they are traced.
    divergence: ``"forward_kl"``, ``"reverse_kl"``, ``"generalized_jsd"``,
      ``"skew_forward_kl"``, ``"skew_reverse_kl"``, ``"total_variation"`` or
      ``"soft_cross_entropy"``.
    beta: generalized JSD mixture weight of the teacher, TRL's convention: ``0`` is forward KL,
      ``1`` is reverse KL (special cases, as in TRL). Only read by ``"generalized_jsd"``: with
      another divergence, a value other than the default (or any array) is a ``ValueError``.
    alpha: skew KL mixing weight (DistiLLM). Only read by the two skew divergences; with
      another, a value other than the default (or any array) is a ``ValueError``.
    temperature: softmax temperature ``T > 0`` applied to both logits. A Python number is a
      trace-time constant; pass a scalar array to schedule it without retracing. Like every
      hyperparameter, a value outside its range is a ``ValueError`` when known at the call,
      and makes the loss NaN when traced.
    temperature_squared: multiply per-token values by ``T**2`` (Hinton et al., 2015), which
      keeps gradient magnitudes comparable across temperatures.
    ignore_index: label value that marks a token to ignore.
    where: optional mask ``logits.shape[:-1]``, boolean or integer (nonzero = counted, as a
      tokenizer's attention mask); combined with ``labels`` by AND.
    token_weights: optional float weights ``logits.shape[:-1]`` that multiply each counted
      token's value: importance weights (clipped or not), per-sequence rewards. No gradient flows
      to them, and they do not change the mean's divisor (the number of counted tokens, or
      ``normalizer``). A token of weight 0 contributes exactly 0.
    reduction: ``"mean"`` (over valid tokens; 0 when there are none), ``"sum"``, ``"none"``
      (per-token, invalid tokens set to 0) or ``"sequence_mean"`` (mean per sequence along the
      last token axis, then over sequences with any valid token).
    normalizer: optional scalar that replaces the valid-token count of ``"mean"``, for example a
      global count across hosts or gradient-accumulation steps. 0 is accepted where no token
      is counted (an all-padding step whose global count is 0): the loss is then 0, with zero
      gradients, as the default mean gives.
    token_block: rows per block of the blocked computation (default: about 1 MiB of float32
      per block on CPU, 64 MiB on GPUs and TPUs).
    implementation: ``"blocked"`` (token blocks, analytic gradient, temporaries
      ``O(block * vocab)``), ``"pallas"`` (GPU and TPU kernels: one pass over the logits; on
      CPU the kernel in Pallas interpret mode, a slow testing aid), ``"reference"`` (the
      readable whole-array definition with JAX autodiff, the oracle of the tests;
      ``O(tokens * vocab)`` float32 temporaries) or None (the default: per platform, the
      blocked engine on CPU and the kernels on GPUs and TPUs; see ``docs/accelerators.md``).

  Returns:
    A float32 scalar, or ``logits.shape[:-1]`` for ``reduction="none"``. A NaN or ``+inf`` in
    a counted token's logits makes the loss NaN.

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    >>> teacher = jnp.array([[1.0, 1.0, -1.0], [0.0, 2.0, 0.0]])
    >>> labels = jnp.array([1, -100])
    >>> loss = kdjax.distill_loss(logits, teacher, labels, divergence="generalized_jsd")
    >>> bool(jnp.isfinite(loss))
    True

  References:
    Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.
    Agarwal et al., *On-Policy Distillation of Language Models* (GKD), 2024.
    Ko et al., *DistiLLM: Towards Streamlined Distillation for LLMs*, 2024.
  """
  return _call(
      logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=temperature_squared,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer,
      token_block=token_block, implementation=implementation, output="loss")


def distill_loss_sum_and_count(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
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
  """``(sum over valid tokens, number of valid tokens)`` of :func:`distill_loss`.

  Sum both over hosts, devices (``jax.lax.psum``) or gradient-accumulation steps, then divide
  once: the mean is then unbiased however the valid tokens are spread. Arguments as in
  :func:`distill_loss`.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> total, count = kdjax.distill_loss_sum_and_count(
    ...     jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.array([3, -100]))
    >>> float(total), float(count)
    (0.0, 1.0)
  """
  return _call(
      logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=temperature_squared,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction="sum",
      normalizer=None,
      token_block=token_block, implementation=implementation, output="sum_count")


def distill_loss_with_metrics(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
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
  r""":func:`distill_loss` and the metrics a distillation run logs, from the same pass.

  The loss is :func:`distill_loss`'s, with the same value and gradient. The metrics are, per
  token, the divergence term :math:`T^{2[\text{temperature\_squared}]} D(p_i, q_i)`, the
  entropies and the top-1 agreement

  .. math::

      H(q_i) = -\sum_v q_{iv} \log q_{iv}, \qquad H(p_i) = -\sum_v p_{iv} \log p_{iv},
      \qquad a_i = \big[\arg\max_v \text{logits}_{iv} =
      \arg\max_v \text{teacher\_logits}_{iv}\big]

  at the temperature :math:`T` (entropies in nats, not scaled by :math:`T^2`; a tie goes to
  the lowest id), each reduced as the loss is: its mask, ``token_weights``, ``reduction`` and
  ``normalizer``. The blocks the loss walks give them (no second pass over the logits), under
  ``stop_gradient``. The pair plugs into ``jax.value_and_grad(f, has_aux=True)``.

  Args:
    logits, teacher_logits, labels: as in :func:`distill_loss`.
    implementation: as in :func:`distill_loss`, except that ``"pallas"`` and the default on
      GPUs and TPUs run the blocked engine: the kernels compute the loss alone.
    Others: as in :func:`distill_loss`.

  Returns:
    ``(loss, metrics)``: the loss of :func:`distill_loss` and a :class:`kdjax.DistillMetrics`
    (``metrics.per_token`` holds the unreduced values, ``metrics.token_count`` the number of
    counted tokens). With ``reduction="sum"``, ``(loss, metrics.token_count)`` is what
    :func:`distill_loss_sum_and_count` returns and ``(metrics.student_entropy,
    metrics.token_count)`` is the entropy's ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    >>> teacher = jnp.log(jnp.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    >>> loss, metrics = kdjax.distill_loss_with_metrics(logits, teacher)
    >>> round(float(metrics.student_entropy), 4), float(metrics.top1_agreement)
    (1.0347, 0.5)
    >>> metrics.per_token.top1_agreement.tolist()
    [0.0, 1.0]
  """
  return _call(
      logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=temperature_squared,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer, token_block=token_block, implementation=implementation,
      output="metrics")


def kd_loss(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    ignore_index: int = -100,
    token_weights: ArrayLike | None = None,
    implementation: str | None = None,
) -> Array:
  r"""OpenRLHF's ``KDLoss``: teacher-weighted student cross entropy, mean over valid tokens.

  .. math::

      \text{kd\_loss} = -\frac{1}{N} \sum_{i:\ \text{label}_i \ne \text{ignore}}
      \sum_{v:\ |\text{logits}_{iv}| < \infty}
      \mathrm{softmax}(\text{teacher\_logits}_i)_v \, \mathrm{log\_softmax}(\text{logits}_i)_v

  Exactly ``distill_loss(..., divergence="soft_cross_entropy", reduction="mean")``. Deliberate
  differences from OpenRLHF: a batch with every label ignored returns 0 with zero gradients
  (OpenRLHF: NaN); values and gradients are finite when ``-inf`` appears in either logits; any
  float input dtype is computed in float32 and the gradient comes back in that dtype; no
  gradient flows to ``teacher_logits``.

  Args:
    logits: student logits ``[..., vocab]``.
    teacher_logits: teacher logits ``[..., vocab]``.
    labels: integer token ids ``logits.shape[:-1]``; ``ignore_index`` marks ignored tokens.
    ignore_index: the ignored label value (default -100).
    token_weights, implementation: as in :func:`distill_loss` (without ``token_weights``, the
      OpenRLHF loss exactly).

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    >>> round(float(kdjax.kd_loss(logits, logits, jnp.array([0]))), 4)  # teacher entropy
    1.0397
  """
  return _call(
      logits, teacher_logits, labels, divergence="soft_cross_entropy", beta=0.5, alpha=0.1,
      temperature=1.0, temperature_squared=False, ignore_index=ignore_index, where=None,
      token_weights=token_weights, reduction="mean", normalizer=None, token_block=None,
      implementation=implementation, output="loss")


def distill_with_cross_entropy(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    kd_coef: float | ArrayLike = 0.5,
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
    return_components: bool = False,
):
  r"""``(1 - kd_coef) * cross_entropy(logits, labels) + kd_coef * distill_loss(...)``.

  The combined objective of OpenRLHF's KD trainer. Both terms use the same mask and reduction;
  the hard-label cross entropy is at temperature 1 (on the raw logits), the distillation term
  at ``temperature``. Both come from one blocked pass over the logits, sharing its memory bound.

  Args:
    logits, teacher_logits, labels: as in :func:`distill_loss`; ``labels`` is required (the
      cross-entropy targets, already aligned: see :func:`kdjax.shift_labels`). A label whose
      student logit is ``-inf`` gives an infinite cross entropy; a counted label outside
      ``[0, vocab)`` is a ``ValueError`` when known at the call and gives a NaN loss when
      traced (padding must use ``ignore_index``).
    kd_coef: weight of the distillation term in ``[0, 1]``; a scalar array may be scheduled.
      (``alpha`` is not this weight, as it is in Hinton-style code: it is the skew divergences'
      mixing weight.)
    return_components: also return ``(cross_entropy, distill)``, each reduced.
    Others: as in :func:`distill_loss`.

  Returns:
    The float32 loss (or per-token values for ``reduction="none"``); with
    ``return_components=True``, ``(loss, (cross_entropy, distill))``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> logits = jnp.zeros((1, 2, 4)); teacher = jnp.zeros((1, 2, 4))
    >>> labels = kdjax.shift_labels(jnp.array([[1, 2]]))  # [[2, -100]]
    >>> round(float(kdjax.distill_with_cross_entropy(logits, teacher, labels, kd_coef=0.5)), 4)
    0.6931
  """
  loss, ce, distill = _call(
      logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=temperature_squared,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer,
      token_block=token_block, implementation=implementation, output="combined",
      kd_coef=kd_coef)
  if return_components:
    return loss, (ce, distill)
  return loss


def distill_with_cross_entropy_sum_and_count(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    kd_coef: float | ArrayLike = 0.5,
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
  r"""``(sum over counted tokens, number of counted tokens)`` of
  :func:`distill_with_cross_entropy`.

  .. math::

      \text{sum} = \sum_{i:\ \text{counted}} w_i \big((1 - \text{kd\_coef})\,
      \mathrm{CE}_i + \text{kd\_coef}\, T^{2[\text{temperature\_squared}]} D(p_i, q_i)\big)

  Sum both over micro-batches (gradient accumulation), devices (``jax.lax.psum``) or hosts,
  then divide once: the mean is then the one over every counted token, however they are spread
  (see the docs' gradient accumulation recipe). Arguments as in
  :func:`distill_with_cross_entropy`.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> total, count = kdjax.distill_with_cross_entropy_sum_and_count(
    ...     jnp.zeros((3, 10)), jnp.zeros((3, 10)), jnp.array([1, 2, -100]), kd_coef=0.0)
    >>> round(float(total / count), 4)  # a uniform student: log(10)
    2.3026
  """
  return _call(
      logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=temperature_squared,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction="sum",
      normalizer=None, token_block=token_block, implementation=implementation,
      output="sum_count", kd_coef=kd_coef)


def distill_with_cross_entropy_with_metrics(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    kd_coef: float | ArrayLike = 0.5,
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
  """:func:`distill_with_cross_entropy` and its metrics, from the same pass over the logits.

  The loss is :func:`distill_with_cross_entropy`'s (the same value and gradient); the metrics
  are :func:`distill_loss_with_metrics`'s, with ``metrics.cross_entropy`` the hard-label term
  (at temperature 1) and ``metrics.divergence`` the distillation term, each reduced as the loss
  is: what ``return_components=True`` gives, and the entropies and top-1 agreement besides.

  Args:
    implementation: as in :func:`distill_loss_with_metrics`.
    Others: as in :func:`distill_with_cross_entropy`.

  Returns:
    ``(loss, metrics)``: the loss and a :class:`kdjax.DistillMetrics`. With
    ``reduction="sum"``, ``(loss, metrics.token_count)`` is what
    :func:`distill_with_cross_entropy_sum_and_count` returns.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> logits, teacher = jnp.zeros((3, 4)), jnp.zeros((3, 4))
    >>> loss, metrics = kdjax.distill_with_cross_entropy_with_metrics(
    ...     logits, teacher, jnp.array([1, 2, -100]), kd_coef=0.5)
    >>> round(float(metrics.cross_entropy), 4), round(float(metrics.teacher_entropy), 4)
    (1.3863, 1.3863)
    >>> float(metrics.token_count)
    2.0
  """
  return _call(
      logits, teacher_logits, labels, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=temperature_squared,
      ignore_index=ignore_index, where=where, token_weights=token_weights, reduction=reduction,
      normalizer=normalizer, token_block=token_block, implementation=implementation,
      output="metrics", kd_coef=kd_coef)


def shift_labels(labels: ArrayLike, *, ignore_index: int = -100) -> Array:
  """Labels for next-token prediction: ``out[..., t] = labels[..., t + 1]``, last = ignored.

  A causal LM's logits at position ``t`` predict token ``t + 1``. Passing the input ids as
  labels unshifted compares each prediction with the token it was conditioned on: the
  cross entropy then rewards copying the input, and the mask is off by one (the last real
  token's prediction is kept and the first is dropped). Shifting the labels -- not the logits --
  aligns them without copying the ``[..., vocab]`` arrays; the last position, which predicts
  past the end of the sequence, is ignored.

  Args:
    labels: integer ``[..., seq]`` token ids (with ``ignore_index`` for padding).
    ignore_index: value written into the last position.

  Returns:
    An array of the same shape and dtype.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> kdjax.shift_labels(jnp.array([[5, 6, 7, -100]])).tolist()
    [[6, 7, -100, -100]]
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.ndim < 1:
    raise TypeError(
        f"labels must be an integer array of rank >= 1, got dtype {labels.dtype} and shape "
        f"{labels.shape}.")
  pad = jnp.full(labels.shape[:-1] + (1,), ignore_index, labels.dtype)
  return jnp.concatenate([labels[..., 1:], pad], axis=-1)


# ----------------------------------------------------------------------------------------------
# Per-token divergences: ``logits.shape[:-1]`` float32 values, no masking or reduction.
# ----------------------------------------------------------------------------------------------


def _divergence_per_token(divergence, logits, teacher_logits, *, temperature, beta=0.5,
                          alpha=0.1, token_block=None, implementation=None):
  return _call(
      logits, teacher_logits, None, divergence=divergence, beta=beta, alpha=alpha,
      temperature=temperature, temperature_squared=False, ignore_index=-100, where=None,
      reduction="none", normalizer=None, token_block=token_block,
      implementation=implementation, output="loss")


_PER_TOKEN_ARGS = """
  Args:
    logits: student logits ``[..., vocab]``, any float dtype (computed in float32).
    teacher_logits: teacher logits, same shape; no gradient flows to them.
    temperature: ``T > 0``; both logits are divided by it before the softmax.
    token_block: rows per block of the blocked computation (default: automatic).
    implementation: ``"blocked"``, ``"pallas"``, ``"reference"`` or None, as in
      :func:`kdjax.distill_loss`.

  Returns:
    float32 ``logits.shape[:-1]``: one value per token. ``-inf`` logits follow the numerical
    conventions (``0 log 0 = 0``; a term whose compared distribution has no mass is 0).

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> logits = jnp.array([[1.0, 2.0, -jnp.inf], [0.0, 0.0, 0.0]])
    >>> [round(v, 4) for v in kdjax.reverse_kl(logits, jnp.zeros((2, 3))).tolist()]
    [0.5164, 0.0]
"""


def forward_kl(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "forward_kl", logits, teacher_logits, temperature=temperature,
      token_block=token_block, implementation=implementation)


def reverse_kl(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "reverse_kl", logits, teacher_logits, temperature=temperature,
      token_block=token_block, implementation=implementation)


def generalized_jsd(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float | ArrayLike = 0.5,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "generalized_jsd", logits, teacher_logits, beta=beta, temperature=temperature,
      token_block=token_block, implementation=implementation)


def skew_forward_kl(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "skew_forward_kl", logits, teacher_logits, alpha=alpha, temperature=temperature,
      token_block=token_block, implementation=implementation)


def skew_reverse_kl(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "skew_reverse_kl", logits, teacher_logits, alpha=alpha, temperature=temperature,
      token_block=token_block, implementation=implementation)


def total_variation(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "total_variation", logits, teacher_logits, temperature=temperature,
      token_block=token_block, implementation=implementation)


def soft_cross_entropy(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  return _divergence_per_token(
      "soft_cross_entropy", logits, teacher_logits, temperature=temperature,
      token_block=token_block, implementation=implementation)


forward_kl.__doc__ = r"""Forward KL, per token.

  .. math::

      \sum_v p_v (\log p_v - \log q_v) = \mathrm{KL}(p \,\|\, q)

  ``p`` is the teacher's and ``q`` the student's softmax at the temperature. Mode-covering: the
  student is pushed to put mass everywhere the teacher does. Includes the teacher-entropy term,
  so it is 0 when the distributions are equal.
""" + _PER_TOKEN_ARGS
reverse_kl.__doc__ = r"""Reverse KL, per token.

  .. math::

      \sum_v q_v (\log q_v - \log p_v) = \mathrm{KL}(q \,\|\, p)

  Mode-seeking: the student is pushed to put mass only where the teacher does.
""" + _PER_TOKEN_ARGS
generalized_jsd.__doc__ = r"""Generalized Jensen-Shannon divergence (TRL / GKD convention).

  .. math::

      \beta \, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\, \mathrm{KL}(q \,\|\, m),
      \qquad m = \beta p + (1 - \beta) q

  ``beta=0`` is forward KL and ``beta=1`` reverse KL, special cases as in TRL (the formula
  itself tends to 0 at both ends). ``beta=0.5`` is the symmetric JSD, bounded by ``log 2``.
  ``beta`` must be in [0, 1].
""" + _PER_TOKEN_ARGS
skew_forward_kl.__doc__ = r"""Skew forward KL (DistiLLM), per token.

  .. math::

      \mathrm{KL}(p \,\|\, \alpha p + (1 - \alpha) q)

  ``alpha=0`` is forward KL; larger ``alpha`` bounds the loss where the student has no mass.
  ``alpha`` must be in [0, 1].
""" + _PER_TOKEN_ARGS
skew_reverse_kl.__doc__ = r"""Skew reverse KL (DistiLLM), per token.

  .. math::

      \mathrm{KL}(q \,\|\, \alpha q + (1 - \alpha) p)

  ``alpha=0`` is reverse KL. ``alpha`` must be in [0, 1].
""" + _PER_TOKEN_ARGS
total_variation.__doc__ = r"""Total variation distance, per token, in [0, 1].

  .. math::

      \tfrac12 \sum_v |p_v - q_v|
""" + _PER_TOKEN_ARGS
soft_cross_entropy.__doc__ = r"""Soft cross entropy (OpenRLHF's KD objective), per token.

  .. math::

      -\sum_v p_v \log q_v

  Equals forward KL plus the teacher entropy; same gradient as forward KL. Entries where the
  student logit is ``-inf`` contribute 0, as in OpenRLHF.
""" + _PER_TOKEN_ARGS
