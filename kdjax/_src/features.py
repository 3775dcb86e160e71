r"""Feature distillation: the student's hidden states matched to the teacher's.

Logit losses compare what two models predict; feature losses compare what they compute on the
way, one hidden-state vector per token (the last layer's, or any pair of layers the caller
picks). For each token ``i``, with ``s_i`` the student's hidden state ``[d_s]`` and ``t_i`` the
teacher's ``[d_t]``:

1. **Projection** (optional): :math:`h_i = s_i W + b`, with ``W = projection`` ``[d_s, d_t]``
   and ``b = projection_bias`` ``[d_t]`` the caller's trainable parameters (FitNets' regressor).
   Without one, :math:`h_i = s_i`, and the widths must be equal.
2. **Per-token value**, by ``metric``:

   * ``"cosine"``: the cosine distance

     .. math::

         v_i = 1 - \frac{\langle h_i, t_i \rangle}
                        {\max(\lVert h_i \rVert, \epsilon)\, \max(\lVert t_i \rVert, \epsilon)},
         \qquad \epsilon = 10^{-8},

     in :math:`[0, 2]` (up to rounding), 0 when the two point the same way. Each norm is
     floored at :math:`\epsilon` separately (PyTorch's ``F.normalize`` then a dot product, as
     Liger-Kernel's cosine loss computes it): a zero vector on either side has cosine 0, so
     its value is exactly 1 and its gradients are finite (a student vector shorter than
     :math:`\epsilon` gets the gradient of :math:`-\langle h, t \rangle / (\epsilon \lVert t
     \rVert)`, large but finite).
   * ``"mse"``: the squared error averaged over the feature axis,
     :math:`v_i = \frac{1}{d_t} \sum_k (h_{ik} - t_{ik})^2`. With ``reduction="mean"`` the loss
     is then the mean over every counted token's every feature: PyTorch's ``nn.MSELoss()``
     when every token is counted.

3. **Tokens**: the per-token values masked (``where``), weighted (``token_weights``) and
   reduced exactly as the logit losses reduce theirs (``reductions.py``): ``"mean"``,
   ``"sum"``, ``"sequence_mean"``, ``"none"``, ``normalizer``, and the ``(sum, count)`` form.

Conventions, once: the math is float32 whatever the inputs' dtype (the projection's matmul at
``HIGHEST`` precision); gradients come back in each input's dtype; the teacher's hidden states
are a constant (no gradient flows to them). A token whose weight is 0 (not counted, or a token
weight of 0) contributes exactly 0 and gives exactly zero gradients to the student's hidden
state, the projection and its bias, whatever it holds (NaN included): its vectors are replaced
by zeros before any arithmetic. A NaN or infinity in a counted token makes the loss NaN.

No ``[tokens, vocab]`` array is involved, so the loss is plain JAX with JAX's autodiff.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from kdjax._src import checks, reductions

Array = jax.Array

#: Names accepted by the ``metric=`` argument.
METRICS = ("cosine", "mse")

# The floor of each norm in the cosine's denominator. Its square (1e-16) is a normal float32.
_EPS = 1e-8


def _hidden_states(student_hidden: Any, teacher_hidden: Any, projection: Any,
                   projection_bias: Any) -> tuple[Array, Array, Array | None, Array | None]:
  """The four arrays, checked against each other; messages name the arguments."""
  student = checks.float_array("student_hidden", student_hidden)
  teacher = checks.float_array("teacher_hidden", teacher_hidden)
  for name, x in (("student_hidden", student), ("teacher_hidden", teacher)):
    if x.shape[-1] == 0:
      raise ValueError(f"{name} has an empty feature axis (shape {x.shape}).")
  if student.shape[:-1] != teacher.shape[:-1]:
    raise ValueError(
        "student_hidden and teacher_hidden must hold the same tokens (equal shapes but for the "
        f"last, feature axis), got student_hidden.shape={student.shape} and "
        f"teacher_hidden.shape={teacher.shape}.")
  d_s, d_t = student.shape[-1], teacher.shape[-1]
  if projection is None:
    if projection_bias is not None:
      raise ValueError(
          "projection_bias is added after projection: pass projection ([d_s, d_t]) too, or "
          "leave projection_bias out.")
    if d_s != d_t:
      raise ValueError(
          f"student_hidden has width {d_s} (shape {student.shape}) but teacher_hidden has width "
          f"{d_t} (shape {teacher.shape}): pass projection, a trainable [d_s, d_t] = [{d_s}, "
          f"{d_t}] matrix that maps the student's hidden states to the teacher's width (and "
          f"optionally projection_bias [{d_t}]).")
    return student, teacher, None, None
  kernel = checks.float_array("projection", projection)
  if kernel.shape != (d_s, d_t):
    hint = ""
    if kernel.shape == (d_t, d_s):
      hint = " It looks transposed: a PyTorch nn.Linear weight is [out, in]; pass projection.T."
    raise ValueError(
        f"projection must have shape (student_hidden.shape[-1], teacher_hidden.shape[-1]) = "
        f"({d_s}, {d_t}), got {kernel.shape}.{hint}")
  bias = None
  if projection_bias is not None:
    bias = checks.float_array("projection_bias", projection_bias)
    if bias.shape != (d_t,):
      raise ValueError(
          f"projection_bias must have shape (teacher_hidden.shape[-1],) = ({d_t},), got "
          f"{bias.shape}.")
  return student, teacher, kernel, bias


def per_token(metric: str, student: Array, teacher: Array) -> Array:
  """Per-token values ``student.shape[:-1]`` of float32 ``[..., d]`` vectors of equal width."""
  if metric == "mse":
    return jnp.mean(jnp.square(student - teacher), axis=-1)
  floor = jnp.float32(_EPS * _EPS)
  # sqrt(max(|x|^2, eps^2)) = max(|x|, eps), differentiable at a zero vector.
  student_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(student), axis=-1), floor))
  teacher_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(teacher), axis=-1), floor))
  cosine = jnp.sum(student * teacher, axis=-1) / (student_norm * teacher_norm)
  return 1.0 - cosine


@functools.partial(jax.jit, static_argnames=("metric", "reduction", "output"))
def _feature_loss(student_hidden, teacher_hidden, projection, projection_bias, where,
                  normalizer, token_weights, *, metric, reduction, output):
  mask = reductions.token_mask(student_hidden.shape[:-1], None, where, ignore_index=0)
  weights = reductions.reduction_weights(mask, reduction=reduction, normalizer=normalizer,
                                         token_weights=token_weights)
  # Zeros in place of the vectors of tokens that do not reach the loss, before any arithmetic:
  # their gradients (to the projection too) are then exactly 0, even where they hold NaN.
  reaches = (weights != 0)[..., None]
  student = jnp.where(reaches, student_hidden.astype(jnp.float32), 0.0)
  teacher = lax.stop_gradient(jnp.where(reaches, teacher_hidden.astype(jnp.float32), 0.0))
  if projection is not None:
    student = jnp.matmul(student, projection.astype(jnp.float32),
                         precision=lax.Precision.HIGHEST)
    if projection_bias is not None:
      student = student + projection_bias.astype(jnp.float32)
  values = per_token(metric, student, teacher)
  if reduction == "none":
    loss = jnp.where(weights != 0, weights * values, 0.0)
  else:
    loss = reductions.weighted_total(values, weights)
  return reductions.outputs(output, loss, None, mask)


def _call(student_hidden, teacher_hidden, *, metric, projection, projection_bias, where,
          token_weights, reduction, normalizer, output):
  """Validates every argument and runs ``_feature_loss``."""
  student, teacher, kernel, bias = _hidden_states(student_hidden, teacher_hidden, projection,
                                                  projection_bias)
  checks.one_of("metric", metric, METRICS)
  tokens = checks.token_arguments(
      student.shape[:-1], labels=None, where=where, reduction=reduction, normalizer=normalizer,
      ignore_index=-100, token_block=None, token_weights=token_weights,
      token_source="student_hidden")
  return _feature_loss(student, teacher, kernel, bias, tokens.where, tokens.normalizer,
                       tokens.token_weights, metric=metric, reduction=reduction, output=output)


def hidden_state_loss(
    student_hidden: ArrayLike,
    teacher_hidden: ArrayLike,
    *,
    metric: str = "cosine",
    projection: ArrayLike | None = None,
    projection_bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
) -> Array:
  r"""Feature-distillation loss between student and teacher hidden states, masked and reduced.

  With :math:`h_i = s_i W + b` the student's hidden state of token :math:`i`, projected to the
  teacher's width when ``projection`` is given (:math:`h_i = s_i` otherwise), and :math:`t_i`
  the teacher's:

  .. math::

      v_i = \begin{cases}
        1 - \dfrac{\langle h_i, t_i \rangle}{\max(\lVert h_i \rVert, \epsilon)\,
            \max(\lVert t_i \rVert, \epsilon)} & \text{metric="cosine"}, \ \epsilon = 10^{-8}
        \\[2ex]
        \dfrac{1}{d_t} \sum_{k=1}^{d_t} (h_{ik} - t_{ik})^2 & \text{metric="mse"}
      \end{cases}
      \qquad
      \text{loss} = \frac{1}{N} \sum_{i:\ \text{counted}} w_i v_i,

  with :math:`w_i` the optional ``token_weights`` and :math:`N` the number of counted tokens
  (or ``normalizer``), for ``reduction="mean"``; the other reductions as in
  :func:`kdjax.distill_loss`.

  Args:
    student_hidden: the student's hidden states ``[..., d_s]`` (for example ``[batch, seq,
      d_s]``), any float dtype; computed in float32, gradient returned in this dtype.
    teacher_hidden: the teacher's hidden states ``[..., d_t]`` for the same tokens (equal
      shapes but for the last axis). Treated as a constant: no gradient flows to it.
    metric: ``"cosine"`` (cosine distance, blind to each vector's length: a zero vector has
      cosine 0 with anything, so its value is 1) or ``"mse"`` (squared error, the mean over
      the ``d_t`` features).
    projection: optional trainable ``[d_s, d_t]`` matrix (flax ``nnx.Linear`` layout,
      ``[in_features, out_features]``) applied to ``student_hidden`` first. Required when
      ``d_s != d_t``; also accepted when they are equal. Its gradient comes back in its dtype.
    projection_bias: optional ``[d_t]`` added after ``projection`` (only with it).
    where: optional mask ``student_hidden.shape[:-1]``, boolean or integer (nonzero =
      counted), such as a tokenizer's attention mask or ``labels != -100``.
    token_weights: optional float weights ``student_hidden.shape[:-1]`` that multiply each
      counted token's value, as in :func:`kdjax.distill_loss` (no gradient flows to them; they
      do not change the mean's divisor).
    reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``"sequence_mean"``, as in
      :func:`kdjax.distill_loss`.
    normalizer: optional scalar that replaces the counted-token count of ``"mean"``, as in
      :func:`kdjax.distill_loss`.

  Returns:
    A float32 scalar, or ``student_hidden.shape[:-1]`` for ``reduction="none"`` (uncounted
    tokens 0). A token that is not counted, or whose weight is 0, contributes exactly 0 and
    gets a zero gradient whatever it holds.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> student = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    >>> teacher = jnp.array([[2.0, 0.0], [3.0, 0.0], [1.0, 1.0]])
    >>> kdjax.hidden_state_loss(student, teacher, reduction="none")  # same way, orthogonal, zero
    Array([0., 1., 1.], dtype=float32)
    >>> counted = jnp.array([1, 1, 0])  # (mean of [1, 0], mean of [9, 4]) = (0.5, 6.5)
    >>> float(kdjax.hidden_state_loss(student, teacher, metric="mse", where=counted))
    3.5
    >>> wide = jnp.ones((3, 5))  # a teacher of width 5: project the student's 2 features
    >>> kdjax.hidden_state_loss(student, wide, projection=jnp.ones((2, 5))).shape
    ()

  References:
    Romero et al., *FitNets: Hints for Thin Deep Nets*, 2015.
    Sanh et al., *DistilBERT, a distilled version of BERT* (its cosine loss on hidden states),
    2019.
  """
  return _call(student_hidden, teacher_hidden, metric=metric, projection=projection,
               projection_bias=projection_bias, where=where, token_weights=token_weights,
               reduction=reduction, normalizer=normalizer, output="loss")


def hidden_state_loss_sum_and_count(
    student_hidden: ArrayLike,
    teacher_hidden: ArrayLike,
    *,
    metric: str = "cosine",
    projection: ArrayLike | None = None,
    projection_bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
) -> tuple[Array, Array]:
  """``(sum over counted tokens, number of counted tokens)`` of :func:`hidden_state_loss`.

  Sum both over hosts, devices (``jax.lax.psum``) or gradient-accumulation steps, then divide
  once, as with :func:`kdjax.distill_loss_sum_and_count`. Arguments as in
  :func:`hidden_state_loss`; ``token_weights`` weigh the sum, not the count.

  Returns:
    Two float32 scalars ``(sum, count)``.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> student = jnp.array([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    >>> teacher = jnp.array([[2.0, 0.0], [3.0, 0.0], [1.0, 1.0]])
    >>> total, count = kdjax.hidden_state_loss_sum_and_count(
    ...     student, teacher, where=jnp.array([True, True, False]))
    >>> float(total), float(count)
    (1.0, 2.0)
  """
  return _call(student_hidden, teacher_hidden, metric=metric, projection=projection,
               projection_bias=projection_bias, where=where, token_weights=token_weights,
               reduction="sum", normalizer=None, output="sum_count")
