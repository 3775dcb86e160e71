"""kdjax as the loss of Tunix's distillation trainer: :class:`DistillStrategy` and its inputs.

Tunix's ``tunix.distillation.DistillationTrainer`` takes its loss from a *strategy*. Each step:

1. the trainer turns a batch (``input_tokens``, ``input_mask``) into the models' inputs with its
   ``gen_model_input_fn`` (positions and a causal attention mask are added there);
2. the strategy runs ``teacher_forward_fn(teacher, **inputs)`` once, outside the gradient, and
   ``student_forward_fn(student, **inputs)`` inside it;
3. ``labels_fn(**inputs)`` gives the labels, and ``compute_loss(student_output, teacher_output,
   labels)`` the loss that the trainer differentiates.

:class:`DistillStrategy` is that strategy with kdjax's combined objective in step 3:
:func:`kdjax.distill_with_cross_entropy` when the forward functions return logits, or
:func:`kdjax.fused_linear_distill_with_cross_entropy` when they return a :class:`Head` (final
hidden states and output kernel), which never materialises the ``[tokens, vocab]`` logits.

Conventions, which differ from Tunix's ``LogitStrategy``:

* **Every position.** The forward functions return all ``seq`` positions (``logits`` of shape
  ``[batch, seq, vocab]``), not ``logits[:, :-1]``. The labels are shifted instead: the label of
  position ``t`` is token ``t + 1`` and the last position is ignored.
* **Integer labels with an ignored id**, not one-hot ones. :func:`next_token_labels` (the
  default ``labels_fn``) is ``shift_labels(where(input_mask, input_tokens, ignore_index))``:
  Tunix's ``input_mask`` marks the tokens to learn, so position ``t`` counts exactly when token
  ``t + 1`` is one. (Shifting the tokens but passing the unshifted mask as ``where=`` would
  count the last real position, whose label is the padding id.)
* **Means over counted tokens.** Both terms are averaged over the counted tokens, not over
  every position: padding changes neither the value nor the gradient.
* **Temperature as in kdjax.** ``temperature_squared=False`` by default; Tunix always multiplies
  its KL term by ``T**2`` (pass ``temperature_squared=True`` for that). Tunix's ``alpha`` is
  ``kd_coef`` here.

Example:
  >>> import jax.numpy as jnp
  >>> from kdjax.integrations import tunix as kdjax_tunix
  >>> strategy = kdjax_tunix.DistillStrategy(
  ...     kdjax_tunix.logits_forward, kdjax_tunix.logits_forward, kd_coef=0.5)
  >>> tokens = jnp.array([[5, 6, 7, 0]]); mask = jnp.array([[1, 1, 1, 0]])
  >>> kdjax_tunix.next_token_labels(tokens, mask).tolist()  # position 2's label is padding
  [[6, 7, -100, -100]]
  >>> loss, metrics = strategy.compute_loss(
  ...     jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8)), jnp.array([[6, 7, -100, -100]]))
  >>> round(float(loss), 4)  # half of log(8): the KL of equal distributions is 0
  1.0397
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

import kdjax

try:
  from flax import nnx
  from tunix.distillation import strategies as _tunix_strategies
except ModuleNotFoundError as error:  # pragma: no cover - exercised without Tunix installed
  raise ModuleNotFoundError(
      f"kdjax.integrations.tunix needs Tunix (the module {error.name!r} is missing): "
      'pip install "kdjax[tunix]"', name=error.name) from error

Array = jax.Array

__all__ = ("DistillStrategy", "Head", "head_forward", "logits_forward", "next_token_labels")


class Head(NamedTuple):
  """What a forward function returns for the fused head: the inputs of the output layer.

  Attributes:
    hidden: final hidden states ``[batch, seq, dim]``, after the final norm.
    kernel: output kernel ``[dim, vocab]`` (tied embeddings: the embedding table transposed).
    bias: optional output bias ``[vocab]``.
  """

  hidden: Array
  kernel: Array
  bias: Array | None = None


def next_token_labels(input_tokens: ArrayLike, input_mask: ArrayLike, *,
                      ignore_index: int = -100, **unused: Any) -> Array:
  """Next-token labels from Tunix's inputs: ``shift_labels(where(input_mask, tokens, ignore))``.

  ``out[:, t] = input_tokens[:, t + 1]`` where ``input_mask[:, t + 1]`` is nonzero, else
  ``ignore_index``; the last position is ignored. The mask is applied *before* the shift, so a
  position counts when the token it predicts is one to learn (Tunix's ``input_mask[:, 1:]``).

  Args:
    input_tokens: integer ``[batch, seq]`` token ids.
    input_mask: ``[batch, seq]`` boolean or integer mask of the tokens to learn (nonzero:
      learn), Tunix's ``TrainingInput.input_mask``.
    ignore_index: the label of ignored positions.
    **unused: the trainer's other inputs (positions, attention mask), not read.

  Returns:
    int32 ``[batch, seq]`` labels for :func:`kdjax.distill_with_cross_entropy`.
  """
  del unused
  tokens = jnp.asarray(input_tokens)
  mask = jnp.asarray(input_mask)
  if mask.shape != tokens.shape:
    raise ValueError(
        f"input_mask must have the shape of input_tokens {tokens.shape}, got {mask.shape}.")
  return kdjax.shift_labels(jnp.where(mask != 0, tokens, ignore_index),
                            ignore_index=ignore_index)


def logits_forward(model: Any, input_tokens: Array, positions: Array, attention_mask: Array,
                   **unused: Any) -> Array:
  """The logits of a Tunix model (``tunix.models``) at every position, ``[batch, seq, vocab]``.

  For the trainer's ``student_forward_fn``/``teacher_forward_fn``, with a
  ``gen_model_input_fn`` that provides ``positions`` and ``attention_mask``.
  """
  del unused
  logits, _ = model(input_tokens, positions, None, attention_mask)
  return logits


def head_forward(model: Any, input_tokens: Array, positions: Array, attention_mask: Array,
                 **unused: Any) -> Head:
  """A Tunix model's final hidden states and output kernel, for the fused head.

  Runs the model with ``output_hidden_states=True`` and reads the hidden states it records after
  its final norm. Its logits are not used, so under ``jax.jit`` (where the trainer runs the
  forward functions) XLA drops them. The kernel is ``lm_head.w`` where the model has an
  untied output layer, else the transposed embedding table ``embedder.input_embedding``.
  This is the layout of Tunix's Qwen2, Qwen3, Gemma and Gemma 3 models; for another model
  (Tunix's Llama 3 records no hidden states), write a forward function that returns a
  :class:`Head`. A final logit softcap (Gemma 2's ``final_logit_softcap``) is not part of the
  :class:`Head`: pass it to :class:`DistillStrategy` as ``softcap=``.

  Raises:
    TypeError: the model's ``__call__`` takes no ``output_hidden_states``.
  """
  del unused
  if "output_hidden_states" not in inspect.signature(model.__call__).parameters:
    raise TypeError(
        "head_forward needs a model that records its final hidden states; "
        f"{type(model).__name__}.__call__ takes no output_hidden_states. Write a forward "
        "function that returns Head(hidden after the final norm, kernel [dim, vocab]).")
  args = (input_tokens, positions, None, attention_mask)
  recorded: Any
  if hasattr(nnx, "capture"):  # Current Flax deprecates sow() outside nnx.capture.
    _, recorded = nnx.capture(model, nnx.Intermediate)(*args, output_hidden_states=True)
  else:
    model(*args, output_hidden_states=True)
    recorded = nnx.pop(model, nnx.Intermediate)
  hidden = recorded["all_hidden_states"].get_value()[-1]
  lm_head = getattr(model, "lm_head", None)
  if lm_head is not None:
    kernel = lm_head.w[...]
  else:
    kernel = model.embedder.input_embedding[...].T
  return Head(hidden, kernel)


class DistillStrategy(_tunix_strategies.BaseStrategy):
  r"""A Tunix distillation strategy whose loss is kdjax's combined objective.

  .. math::

      \text{loss} = (1 - \text{kd\_coef})\, \mathrm{CE}(\text{student}, \text{labels})
      + \text{kd\_coef}\, T^{2[\text{temperature\_squared}]} D(p, q)

  each term averaged over the counted tokens (labels other than ``ignore_index``), as
  :func:`kdjax.distill_with_cross_entropy` computes it. When both forward functions return a
  :class:`Head`, the same objective comes from
  :func:`kdjax.fused_linear_distill_with_cross_entropy`, without the logits.

  ``compute_loss`` returns ``(loss, metrics)`` with ``metrics["distill/hard_loss"]`` (the cross
  entropy) and ``metrics["distill/soft_loss"]`` (the distillation term), the names Tunix's
  ``LogitStrategy`` uses; ``compute_eval_loss`` returns the cross entropy.

  Args:
    student_forward_fn: ``f(student, **inputs)`` returning logits ``[batch, seq, vocab]`` at
      every position (:func:`logits_forward`) or a :class:`Head` (:func:`head_forward`).
    teacher_forward_fn: the same for the teacher; it must return the same kind.
    labels_fn: ``f(**inputs)`` returning integer ``[batch, seq]`` labels, already aligned for
      next-token prediction, ``ignore_index`` where not counted. Default:
      :func:`next_token_labels`.
    kd_coef: weight of the distillation term in ``[0, 1]`` (Tunix's ``alpha``).
    divergence, beta, alpha, temperature, temperature_squared: as in
      :func:`kdjax.distill_loss` (``alpha`` is the skew divergences' mixing weight, not the
      weight of the distillation term).
    ignore_index: the label of ignored positions.
    reduction: ``"mean"``, ``"sum"`` or ``"sequence_mean"``, as in :func:`kdjax.distill_loss`
      (not ``"none"``: the trainer differentiates a scalar).
    logit_scale, softcap: the fused head's logit transform, as in
      :func:`kdjax.fused_linear_distill_with_cross_entropy` (a number shared by both models or
      a ``(student, teacher)`` pair; Gemma 2's ``final_logit_softcap`` is ``softcap=``). Only
      for :class:`Head` outputs: dense logits already include them.
    token_block, vocab_block, implementation: as in the kdjax losses (``vocab_block`` for the
      fused head only).

  Raises:
    ValueError, TypeError: a hyperparameter out of its range or of the wrong kind, naming the
      argument (checked here, not at the first training step).
  """

  def __init__(
      self,
      student_forward_fn: Callable[..., Any],
      teacher_forward_fn: Callable[..., Any],
      labels_fn: Callable[..., Array] | None = None,
      *,
      kd_coef: float = 0.5,
      divergence: str = "forward_kl",
      beta: float = 0.5,
      alpha: float = 0.1,
      temperature: float = 1.0,
      temperature_squared: bool = False,
      ignore_index: int = -100,
      reduction: str = "mean",
      logit_scale: Any = None,
      softcap: Any = None,
      token_block: int | None = None,
      vocab_block: int | None = None,
      implementation: str | None = None,
  ):
    if labels_fn is None:
      labels_fn = functools.partial(next_token_labels, ignore_index=ignore_index)
    super().__init__(student_forward_fn, teacher_forward_fn, labels_fn)
    if reduction == "none":
      raise ValueError(
          "reduction must give a scalar, the loss the trainer differentiates: 'mean', 'sum' or "
          "'sequence_mean', got 'none'.")
    self.kd_coef = kd_coef
    self._options: dict[str, Any] = dict(
        divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
        temperature_squared=temperature_squared, ignore_index=ignore_index,
        reduction=reduction, token_block=token_block, implementation=implementation)
    self._head_options: dict[str, Any] = dict(
        logit_scale=logit_scale, softcap=softcap, vocab_block=vocab_block)
    # Every hyperparameter through kdjax's own checks now, on abstract shapes (nothing runs).
    jax.eval_shape(lambda: self._dense(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                       jnp.zeros((1,), jnp.int32), kd_coef))
    head = Head(jnp.zeros((1, 2)), jnp.zeros((2, 2)))
    jax.eval_shape(lambda: self._fused(head, head, jnp.zeros((1,), jnp.int32), kd_coef))

  def _dense(self, student_logits, teacher_logits, labels, kd_coef):
    return kdjax.distill_with_cross_entropy(
        student_logits, teacher_logits, labels, kd_coef=kd_coef, return_components=True,
        **self._options)

  def _fused(self, student: Head, teacher: Head, labels, kd_coef):
    return kdjax.fused_linear_distill_with_cross_entropy(
        student.hidden, student.kernel, teacher.hidden, teacher.kernel, labels,
        student_bias=student.bias, teacher_bias=teacher.bias, kd_coef=kd_coef,
        return_components=True, **self._options, **self._head_options)

  def _combined(self, student_output, teacher_output, labels, kd_coef):
    student_head = isinstance(student_output, Head)
    if student_head != isinstance(teacher_output, Head):
      raise TypeError(
          "student_forward_fn and teacher_forward_fn must both return logits or both a Head; "
          f"got {type(student_output).__name__} and {type(teacher_output).__name__}.")
    tokens = (student_output.hidden if student_head else student_output).shape[:-1]
    labels_shape = jnp.shape(labels)
    if tokens != labels_shape:
      hint = ""
      if len(tokens) == len(labels_shape) and tokens[-1] == labels_shape[-1] - 1:
        hint = (" The forward functions drop the last position (logits[:, :-1], as for "
                "Tunix's LogitStrategy); return every position instead: the labels are "
                "shifted, and the last one is ignored.")
      raise ValueError(
          f"labels_fn gave labels of shape {labels_shape}, but the student's output covers "
          f"tokens {tokens}.{hint}")
    if student_head:
      return self._fused(student_output, teacher_output, labels, kd_coef)
    return self._dense(student_output, teacher_output, labels, kd_coef)

  def compute_loss(self, student_output: Any, teacher_output: Any,
                   labels: Array) -> tuple[Array, dict[str, Array]]:
    """The combined objective and its two terms: ``(loss, metrics)``."""
    loss, (cross_entropy, distill) = self._combined(
        student_output, teacher_output, labels, self.kd_coef)
    return loss, {"distill/hard_loss": cross_entropy, "distill/soft_loss": distill}

  def compute_eval_loss(self, student_output: Any,
                        labels: Array) -> tuple[Array, dict[str, Array]]:
    """The student's cross entropy with the labels (no teacher runs in evaluation)."""
    _, (cross_entropy, _) = self._combined(student_output, student_output, labels, 0.0)
    return cross_entropy, {}
