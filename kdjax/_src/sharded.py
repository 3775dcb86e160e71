"""Distillation losses on a device mesh: vocabulary-parallel and data-parallel reductions.

Large-vocabulary models shard the output projection, hence the logits, along the vocabulary
(a ``model`` mesh axis) and the batch along a ``data`` axis. There are two ways to run kdjax
there, and both give the single-device answer:

* **GSPMD** (``jax.jit`` on arrays placed with ``NamedSharding``): call :func:`kdjax.distill_loss`
  and friends unchanged. Every vocabulary reduction in the engine is a per-token ``max``/``sum``
  that the partitioner turns into an all-reduce of ``[tokens]`` vectors; the token blocks are
  strided (``blocking.map_token_blocks``) so a data-sharded token axis stays sharded. Nothing of
  size vocabulary is gathered.
* **shard_map** (explicit collectives): inside ``jax.shard_map`` each device holds a contiguous
  slice of the vocabulary and :func:`vocab_parallel_distill_loss` runs the same engine with
  ``axis_name``: the row statistics (max, sum of exponentials, sums of the divergence's terms)
  are ``pmax``/``psum``-ed over that axis, which is all that moves between devices. The
  gradient is local: given the per-token statistics, each device computes the gradient for its
  own vocabulary slice. ``data_axis_name`` makes the token reduction global: the sum and the
  number of valid tokens are ``psum``-ed, so the mean equals the single-device mean however the
  valid tokens are spread over devices. :func:`vocab_parallel_fused_linear_distill_loss` does
  the same from hidden states and the kernels' vocabulary slices (the fused engine in
  ``fused.py`` with ``axis_name``).

Under ``pmap`` (no record of which axes a value varies over) the transpose of ``psum`` is a
``psum``; the data-parallel sum is then written so that the gradient is this device's share of
the global loss, the usual pmap convention (see ``reductions.sum_over_data``).
"""

from __future__ import annotations

from collections.abc import Hashable

import jax
from jax import lax
from jax.typing import ArrayLike

from kdjax._src import blocking, checks, dense, fused, implementations, reductions, reference
from kdjax._src import config as config_lib

Array = jax.Array
AxisName = Hashable  # a mesh axis name, or a tuple of them.


def vocab_parallel_distill_loss(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    axis_name: AxisName | None,
    data_axis_name: AxisName | None = None,
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
  r""":func:`kdjax.distill_loss` inside ``jax.shard_map``, with the vocabulary split over devices.

  Each device along ``axis_name`` holds a contiguous slice of the vocabulary of both logits
  (device ``k`` of ``n`` holds entries ``[k V / n, (k + 1) V / n)``, which is what
  ``PartitionSpec(..., axis_name)`` gives). Only per-token statistics cross devices:

  .. math::

      m_i = \operatorname{pmax}_k \max_{v \in k} s_{iv}, \quad
      \operatorname{lse}(s_i) = m_i + \log \operatorname{psum}_k \sum_{v \in k} e^{s_{iv} - m_i},
      \quad D_i = \operatorname{psum}_k \sum_{v \in k} \text{terms}_{iv}

  (the same for the teacher, and for the sum of the divergence's ``dterms`` the gradient needs).
  The gradient of each device's slice is then computed locally. With ``data_axis_name`` the
  tokens are split too, and the masked sum and the valid-token count are ``psum``-ed over it:

  .. math::

      \text{loss} = \frac{\operatorname{psum}_{\text{data}} \sum_{i \text{ valid}} D_i}
      {\operatorname{psum}_{\text{data}} \#\{i \text{ valid}\}}

  The result is the same scalar on every device of the reduced axes (a value replicated over
  them, so ``out_specs=P()`` is valid when both axes are given), equal to
  :func:`kdjax.distill_loss` of the unsharded arrays.

  Args:
    logits: this device's student logits ``[..., vocab / n]``, any float dtype (computed in
      float32; the gradient comes back in this dtype).
    teacher_logits: this device's teacher logits, same shape; no gradient flows to them.
    labels: optional integer ids ``logits.shape[:-1]`` (global ids, replicated over
      ``axis_name``); ``ignore_index`` marks ignored tokens. Only used for the mask. A counted
      label outside the whole vocabulary (``logits.shape[-1]`` times the size of
      ``axis_name``) is a ``ValueError`` when the labels are known where the loss is traced
      (NumPy closed over), and makes the loss NaN when they are traced.
    axis_name: the mesh axis (or tuple of axes) that splits the vocabulary; ``None`` if the
      vocabulary is not split.
    data_axis_name: the mesh axis (or tuple) that splits the tokens, or ``None``. When given,
      ``"mean"``, ``"sum"`` and ``"sequence_mean"`` reduce over the tokens of every device
      (``"sequence_mean"`` needs each sequence on one device); ``"none"`` returns this device's
      per-token values.
    divergence, beta, alpha, temperature, temperature_squared, ignore_index, where, token_weights:
      as in :func:`kdjax.distill_loss`.
    reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"sequence_mean"``, as in
      :func:`kdjax.distill_loss`.
    normalizer: optional scalar divisor for ``"mean"``, used as given (not ``psum``-ed): pass
      the global count, for example across gradient-accumulation steps.
    token_block: rows per block of the blocked computation (default: automatic).
    implementation: ``"blocked"`` or None (the same); the whole-array ``"reference"`` does not
      apply to a split vocabulary.

  Returns:
    A float32 scalar (replicated over ``axis_name`` and ``data_axis_name``), or
    ``logits.shape[:-1]`` for ``reduction="none"``.

  Raises:
    ValueError: if ``axis_name`` or ``data_axis_name`` is not a mesh axis bound where the loss
      is traced (that is, outside ``shard_map``), or for the errors of
      :func:`kdjax.distill_loss`.

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"),
    ...                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
    >>> loss_fn = jax.shard_map(
    ...     lambda s, t, y: kdjax.vocab_parallel_distill_loss(
    ...         s, t, y, axis_name="model", data_axis_name="data"),
    ...     mesh=mesh, in_specs=(P("data", None, "model"),) * 2 + (P("data", None),),
    ...     out_specs=P())
    >>> logits = jnp.zeros((2, 3, 8)); labels = jnp.array([[1, 2, -100], [3, 4, 5]])
    >>> float(jax.jit(loss_fn)(logits, logits, labels))
    0.0
  """
  logits, teacher_logits = checks.logits_pair(logits, teacher_logits)
  checks.mesh_axes(axis_name, data_axis_name)
  vocab_size = logits.shape[-1] * (1 if axis_name is None else lax.axis_size(axis_name))
  tokens = checks.token_arguments(
      logits.shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block,
      token_weights=token_weights, vocab_size=vocab_size)
  hp = checks.hyperparameters(divergence, temperature=temperature, beta=beta, alpha=alpha)
  config, traced = config_lib.build(
      hp, divergence=divergence, temperature_squared=bool(temperature_squared),
      reduction=reduction, ignore_index=ignore_index,
      implementation=_blocked_only(implementation), token_block=tokens.token_block,
      axis_name=axis_name, data_axis_name=data_axis_name)
  mask = reductions.token_mask(logits.shape[:-1], tokens.labels, tokens.where, ignore_index)
  loss, _ = reductions.reduced_loss(
      lambda weights: implementations.materialised(
          config, traced, logits, (teacher_logits,), weights, mask=mask,
          block_fn=dense.teacher_logits_block, reference_fn=reference.per_token),
      mask, reduction=reduction, normalizer=tokens.normalizer, data_axis_name=data_axis_name,
      invalid=reductions.invalid_tokens(mask, tokens.labels, vocab_size, traced),
      token_weights=tokens.token_weights)
  return loss


def _blocked_only(implementation: str | None) -> str | None:
  implementation = implementations.check(implementation)
  if implementation == "reference":
    raise ValueError(
        "implementation='reference' computes whole arrays; with the vocabulary split over "
        "axis_name use 'blocked' or None.")
  return implementation


def _vary_like(param: Array | None, hidden: Array) -> Array | None:
  """Marks a parameter replicated over the data axes as varying like ``hidden``.

  Inside ``shard_map`` a parameter replicated over the data axis meets data-sharded hidden
  states; its gradient is then a sum over the data shards, which ``pcast``'s transpose (a
  ``psum``) provides. Nothing moves in the forward pass. Elsewhere this does nothing.
  """
  if param is None:
    return None
  missing = blocking.varying_axes(jax.typeof(hidden)) - blocking.varying_axes(
      jax.typeof(param))
  if not missing:
    return param
  return lax.pcast(param, tuple(sorted(missing, key=str)), to="varying")


def vocab_parallel_fused_linear_distill_loss(
    student_hidden: ArrayLike,
    student_kernel: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_kernel: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    axis_name: AxisName | None,
    data_axis_name: AxisName | None = None,
    divergence: str = "forward_kl",
    beta: float | ArrayLike = 0.5,
    alpha: float | ArrayLike = 0.1,
    temperature: float | ArrayLike = 1.0,
    temperature_squared: bool = False,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    logit_scale=None,
    softcap=None,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
    vocab_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  r""":func:`kdjax.fused_linear_distill_loss` inside ``jax.shard_map``, kernels split by vocabulary.

  Each device along ``axis_name`` holds a contiguous vocabulary slice of both output
  projections (``student_kernel`` ``[d_student, vocab / n]``, ``teacher_kernel``
  ``[d_teacher, vocab / n]``, and of the biases), and the full hidden states of its tokens
  (replicated over ``axis_name``). Each device computes the logits of its slice block by block;
  as in :func:`vocab_parallel_distill_loss`, only per-token statistics (max, sum of
  exponentials, sums of the divergence's terms) are ``pmax``/``psum``-ed. In the backward pass
  the gradient with respect to ``student_hidden`` is ``psum``-ed over ``axis_name`` (a
  ``[tokens, d_student]`` array: every vocabulary slice contributes to it), kernel and bias
  gradients stay on their slice. With ``data_axis_name`` the token reduction is global and the
  gradient of a parameter replicated over the data axis is summed over it.

  .. math::

      \text{loss} = \frac{\operatorname{psum}_{\text{data}} \sum_{i \text{ valid}}
      D\big(\operatorname{softmax}(z^t_i / T), \operatorname{softmax}(z^s_i / T)\big)}
      {\operatorname{psum}_{\text{data}} \#\{i \text{ valid}\}}, \qquad z = h W + b

  Args:
    student_hidden: ``[..., d_student]``, this device's tokens.
    student_kernel: this device's vocabulary slice ``[d_student, vocab / n]`` (flax layout).
    teacher_hidden: ``[..., d_teacher]``, the same tokens; no gradient flows to the teacher.
    teacher_kernel: ``[d_teacher, vocab / n]``, the same slice of the vocabulary.
    labels: optional integer ids ``student_hidden.shape[:-1]`` for the mask; a counted one
      must be an id of the whole vocabulary (``student_kernel.shape[-1]`` times the size of
      ``axis_name``), checked where known as in :func:`vocab_parallel_distill_loss`.
    axis_name: the mesh axis (or tuple) that splits the vocabulary; ``None`` if not split.
    data_axis_name: the mesh axis (or tuple) that splits the tokens, or ``None``; see
      :func:`vocab_parallel_distill_loss`.
    student_bias, teacher_bias: optional ``[vocab / n]`` slices of the biases.
    Others: as in :func:`kdjax.fused_linear_distill_loss` (``vocab_block`` blocks the local
    slice).

  Returns:
    A float32 scalar (replicated over both axes), or ``student_hidden.shape[:-1]`` for
    ``reduction="none"``.

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"),
    ...                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
    >>> loss_fn = jax.shard_map(
    ...     lambda hs, ws, ht, wt: kdjax.vocab_parallel_fused_linear_distill_loss(
    ...         hs, ws, ht, wt, axis_name="model", data_axis_name="data"),
    ...     mesh=mesh, in_specs=(P("data"), P(None, "model"), P("data"), P(None, "model")),
    ...     out_specs=P())
    >>> hidden, kernel = jnp.ones((4, 8)), jnp.ones((8, 32))
    >>> float(jax.jit(loss_fn)(hidden, kernel, hidden, kernel))
    0.0
  """
  checks.mesh_axes(axis_name, data_axis_name)
  prepared = fused.prepare(
      student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
      teacher_bias, labels=labels, where=where, token_weights=token_weights,
      reduction=reduction, normalizer=normalizer,
      ignore_index=ignore_index, divergence=divergence, temperature=temperature, beta=beta,
      alpha=alpha, temperature_squared=temperature_squared, logit_scale=logit_scale,
      softcap=softcap, token_block=token_block, vocab_block=vocab_block,
      implementation=_blocked_only(implementation),
      vocab_mismatch_hint="Inside shard_map both kernels must hold the same vocabulary slice.",
      axis_name=axis_name, data_axis_name=data_axis_name)
  inputs = prepared.inputs
  hidden = inputs.student_hidden
  inputs = inputs._replace(params=inputs.params._replace(
      student_kernel=_vary_like(inputs.params.student_kernel, hidden),  # type: ignore[arg-type]  # the kernel is always given
      student_bias=_vary_like(inputs.params.student_bias, hidden)))
  return fused.loss(*prepared._replace(inputs=inputs))
