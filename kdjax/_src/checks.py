"""Trace-time input checks with messages that name the argument (shapes and dtypes are static)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from kdjax._src import reductions


def float_array(name: str, x: Any, *, min_rank: int = 1):
  """Returns ``x`` as an array after checking it is floating point of rank >= ``min_rank``."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array (float32, bfloat16, float16, ...), "
        f"got dtype {x.dtype}.")
  if x.ndim < min_rank:
    raise ValueError(f"{name} must have rank >= {min_rank}, got shape {x.shape}.")
  return x


def same_logits_shape(logits, teacher_logits, *, names=("logits", "teacher_logits")) -> None:
  if logits.shape == teacher_logits.shape:
    return
  a, b = names
  if logits.shape[:-1] == teacher_logits.shape[:-1]:
    raise ValueError(
        f"{a} and {b} have different vocabulary sizes: {a}.shape={logits.shape}, "
        f"{b}.shape={teacher_logits.shape}. If the larger vocabulary only adds padding rows, "
        "cut both to the shared size with kdjax.align_vocab(logits, teacher_logits) first.")
  raise ValueError(
      f"{a} and {b} must have the same shape, got {a}.shape={logits.shape} and "
      f"{b}.shape={teacher_logits.shape}.")


def token_array(name: str, x: Any, token_shape: tuple[int, ...], *, integer: bool):
  """Checks a per-token array (labels or a mask) against the token shape ``[...]``."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if tuple(x.shape) != tuple(token_shape):
    raise ValueError(
        f"{name} must have shape logits.shape[:-1] = {tuple(token_shape)}, got {x.shape}.")
  if integer and not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array (token ids), got dtype {x.dtype}.")
  if not integer and x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean mask, got dtype {x.dtype}.")
  return x


def scalar(name: str, x: Any):
  """A hyperparameter: a Python number (checked now) or a scalar array (traced)."""
  if isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{name} must be a number, got {x!r}.")
  if isinstance(x, (int, float, np.integer, np.floating)):
    return float(x)
  arr = jnp.asarray(x)
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {arr.shape}.")
  return arr


def positive_int(name: str, x: Any, *, optional: bool = False):
  if x is None and optional:
    return None
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
    raise ValueError(f"{name} must be a positive integer, got {x!r}.")
  return int(x)


def token_arguments(token_shape, *, labels, where, reduction, normalizer, ignore_index,
                    token_block):
  """The per-token arguments every loss shares: ``(labels, where, token_block)``, checked."""
  labels = token_array("labels", labels, token_shape, integer=True)
  where = token_array("where", where, token_shape, integer=False)
  reductions.check_reduction(reduction, normalizer)
  if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
    raise TypeError(f"ignore_index must be a Python int, got {ignore_index!r}.")
  return labels, where, positive_int("token_block", token_block, optional=True)
