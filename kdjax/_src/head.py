"""The linear output head of the fused losses: logits from hidden states, gradients back to them.

Each model's raw logits are

.. math::

    x = c \\tanh\\!\\Big(\\frac{s \\, (h W + b)}{c}\\Big), \\qquad z = h W + b,

with an optional ``logit_scale`` ``s`` (Cohere) and an optional ``softcap`` ``c`` (Gemma),
per model; a ``-inf`` logit (a ``-inf`` bias entry) stays ``-inf`` under the cap, so it masks
that entry as it does without one (``c tanh(-inf) = -c`` would not). The block recipe turns
``x`` into values and ``dD/dx``; the chain rule here gives

.. math::

    \\frac{\\partial D}{\\partial z} = \\frac{\\partial D}{\\partial x}\\, s\\,
    \\big(1 - \\tanh^2(s z / c)\\big), \\qquad dh = \\frac{\\partial D}{\\partial z} W^T,\\quad
    dW = h^T \\frac{\\partial D}{\\partial z},\\quad db = \\sum_\\text{tokens}
    \\frac{\\partial D}{\\partial z}.

Matmuls run in the inputs' dtype with float32 accumulation; everything after them is float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kdjax._src import blocking

Array = jax.Array

SIDES = ("student", "teacher")


class Params(NamedTuple):
  """Both models' output projections: kernels ``[d, vocab]``, biases ``[vocab]`` or None."""

  student_kernel: Array
  student_bias: Array | None
  teacher_kernel: Array
  teacher_bias: Array | None


class Inputs(NamedTuple):
  """The arrays of a fused loss, the token axis flattened: hidden states ``[tokens, d]``."""

  student_hidden: Array
  teacher_hidden: Array
  params: Params


class Logits(NamedTuple):
  """One side's raw float32 logits of a block, and what the chain rule needs of them."""

  raw: Array  # [tokens, vocab columns]
  tanh: Array | None  # tanh(s z / c), kept for the chain rule; None without a softcap.


class Grads(NamedTuple):
  """Gradients with respect to the student's hidden states and projection (float32)."""

  hidden: Array  # [tokens, d_student]
  kernel: Array  # [d_student, vocab columns], or [groups, d_student, vocab columns]
  bias: Array | None  # [vocab columns], or [groups, vocab columns]


def logits(hp: Mapping[str, Any], side: str, hidden: Array, kernel: Array,
           bias: Array | None) -> Logits:
  """``side``'s raw logits of the rows ``hidden`` and the columns of ``kernel``."""
  x = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  if bias is not None:
    x = x + bias.astype(jnp.float32)
  scale = hp.get(f"{side}_logit_scale")
  if scale is not None:
    x = x * scale
  softcap = hp.get(f"{side}_softcap")
  tanh = None
  if softcap is not None:
    tanh = jnp.tanh(x / softcap)
    # A -inf logit (a -inf bias entry: padded vocabulary) stays -inf, not -softcap: masked.
    x = jnp.where(x == -jnp.inf, -jnp.inf, softcap * tanh)
  return Logits(x, tanh)


def both_logits(hp: Mapping[str, Any], student_hidden: Array, teacher_hidden: Array,
                params: Params) -> tuple[Logits, Logits]:
  return (logits(hp, "student", student_hidden, params.student_kernel, params.student_bias),
          logits(hp, "teacher", teacher_hidden, params.teacher_kernel, params.teacher_bias))


def logit_grad(hp: Mapping[str, Any], student: Logits, grad_raw: Array) -> Array:
  """``dD/dz`` from ``dD/dx`` (float32), through the softcap and the logit scale."""
  grad = grad_raw
  if student.tanh is not None:
    grad = grad * (1.0 - jnp.square(student.tanh))
  scale = hp.get("student_logit_scale")
  if scale is not None:
    grad = grad * scale
  return grad


def param_grads(hidden: Array, kernel: Array, with_bias: bool, grad_logits: Array,
                weights: Array | None = None, groups: int = 1) -> Grads:
  """The three matmul-shaped gradients of ``z = h W + b`` for one block.

  Rows whose ``weights`` are 0 (uncounted tokens) add exactly nothing to the kernel's gradient,
  whatever their hidden states hold. With ``groups > 1`` the block's rows are that many
  contiguous groups (the devices' shares under GSPMD) and the kernel and bias gradients are
  per group, ``[groups, ...]``, so no device sums another's rows.
  """
  if weights is not None:
    hidden = jnp.where((weights != 0)[:, None], hidden, jnp.zeros((), hidden.dtype))
  compute_dtype = jnp.result_type(hidden.dtype, kernel.dtype)
  grad_logits_c = grad_logits.astype(compute_dtype)
  # With explicit sharding types the vocabulary it contracts may be sharded: the result is
  # sharded like the hidden states.
  d_hidden = lax.dot_general(
      grad_logits_c, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
      out_sharding=blocking.explicit_sharding(hidden))
  if groups > 1:
    hidden = hidden.reshape(groups, -1, hidden.shape[-1])
    grad_logits = grad_logits.reshape(groups, -1, grad_logits.shape[-1])
    grad_logits_c = grad_logits_c.reshape(groups, -1, grad_logits_c.shape[-1])
  d_kernel = lax.dot_general(
      hidden, grad_logits_c, (((hidden.ndim - 2,), (hidden.ndim - 2,)),
                              ((0,), (0,)) if groups > 1 else ((), ())),
      preferred_element_type=jnp.float32)
  d_bias = jnp.sum(grad_logits, axis=-2) if with_bias else None
  return Grads(d_hidden, d_kernel, d_bias)


def vocab_slice(params: Params, start, width: int) -> Params:
  """The columns ``[start, start + width)`` of both projections."""
  def cut(x, axis):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, width, axis=axis)
  return Params(cut(params.student_kernel, 1), cut(params.student_bias, 0),
                cut(params.teacher_kernel, 1), cut(params.teacher_bias, 0))
