"""Vocabulary alignment between a teacher and a student whose output layers differ in size.

Model vocabularies are often padded to a multiple of 64 or 128 for efficient matmuls (for
example 152064 vs 151936 rows for two models sharing one tokenizer): the extra trailing rows
are padding that no token id maps to. :func:`align_vocab` cuts both logits to the shared size.
It does not reorder or map ids between different tokenizers: the first ``vocab_size`` ids must
mean the same tokens in both models.
"""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from kdjax._src import checks

Array = jax.Array


def align_vocab(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    vocab_size: int | None = None,
) -> tuple[Array, Array]:
  r"""Cuts student and teacher logits to a shared vocabulary, dropping trailing padding rows.

  .. math::

      \text{logits}' = \text{logits}[\dots, :V], \qquad
      \text{teacher\_logits}' = \text{teacher\_logits}[\dots, :V], \qquad
      V = \text{vocab\_size} \text{ or } \min(V_\text{student}, V_\text{teacher})

  Dropping rows renormalises each softmax over the kept ids; padding rows of a trained model
  have (near) zero probability, so this changes nothing that matters, and it is what the
  losses' "vocabulary sizes differ" error asks for. Slicing is cheap under ``jit`` (XLA fuses
  it into the consumer); the gradient of the dropped student rows is 0.

  For the fused linear path (logits computed inside the loss from hidden states), slice the
  output layer instead, so the padded rows are never computed:
  ``kernel[:, :vocab_size]`` (a ``[hidden, vocab]`` kernel; ``embedding[:vocab_size]`` for a
  tied ``[vocab, hidden]`` embedding) and ``bias[:vocab_size]``, for each model.

  Args:
    logits: student logits ``[..., student_vocab]``.
    teacher_logits: teacher logits ``[..., teacher_vocab]`` with the same leading shape.
    vocab_size: the number of leading ids to keep, ``1 <= vocab_size <= min(student_vocab,
      teacher_vocab)``; default: that minimum. Growing a vocabulary is an error: there are no
      logits to invent for the missing rows.

  Returns:
    ``(logits, teacher_logits)``, both ``[..., vocab_size]``, dtypes unchanged.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax._src.vocab import align_vocab
    >>> student, teacher = align_vocab(jnp.zeros((2, 8, 151936)), jnp.zeros((2, 8, 152064)))
    >>> student.shape, teacher.shape
    ((2, 8, 151936), (2, 8, 151936))
  """
  logits = checks.float_array("logits", logits)
  teacher_logits = checks.float_array("teacher_logits", teacher_logits)
  if logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ValueError(
        "logits and teacher_logits must have the same leading (token) shape, got "
        f"logits.shape={logits.shape} and teacher_logits.shape={teacher_logits.shape}.")
  student_vocab, teacher_vocab = logits.shape[-1], teacher_logits.shape[-1]
  shared = min(student_vocab, teacher_vocab)
  if vocab_size is None:
    vocab_size = shared
  vocab_size = checks.positive_int("vocab_size", vocab_size)
  if vocab_size > shared:
    raise ValueError(
        f"vocab_size={vocab_size} would grow a vocabulary: align_vocab only drops trailing "
        f"rows, and the smaller of logits.shape[-1]={student_vocab} and "
        f"teacher_logits.shape[-1]={teacher_vocab} is {shared}.")
  return logits[..., :vocab_size], teacher_logits[..., :vocab_size]
