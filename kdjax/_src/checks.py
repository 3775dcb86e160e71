"""Every check of a public argument, at trace time, with messages that name the argument.

Shapes and dtypes are static, so bad inputs fail before anything runs. A hyperparameter is
checked wherever its value is known: a Python number, or an array that is not traced (a
``ValueError``). A traced one (a schedule inside ``jax.jit``) is known only when the program runs:
outside its range it becomes NaN (:func:`_in_range`), so the loss is NaN, never a plausible number.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kdjax._src import divergences, reductions

Array = jax.Array

_FLOAT32 = np.finfo(np.float32)


def float_array(name: str, x: Any, *, min_rank: int = 1) -> Array:
  """``x`` as an array, after checking it is floating point of rank >= ``min_rank``."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array (float32, bfloat16, float16, ...), "
        f"got dtype {x.dtype}.")
  if x.ndim < min_rank:
    raise ValueError(f"{name} must have rank >= {min_rank}, got shape {x.shape}.")
  return x


def logits(name: str, x: Any) -> Array:
  """A ``[..., vocab]`` float array with a nonempty vocabulary."""
  x = float_array(name, x)
  if x.shape[-1] == 0:
    raise ValueError(
        f"{name} has an empty vocabulary (shape {x.shape}): a distribution needs at least one "
        "entry on the last axis.")
  return x


def logits_pair(student: Any, teacher: Any, *,
                names: tuple[str, str] = ("logits", "teacher_logits")) -> tuple[Array, Array]:
  """Student and teacher logits of the same shape ``[..., vocab]``."""
  a, b = names
  student, teacher = logits(a, student), logits(b, teacher)
  if student.shape == teacher.shape:
    return student, teacher
  if student.shape[:-1] == teacher.shape[:-1]:
    raise ValueError(
        f"{a} and {b} have different vocabulary sizes: {a}.shape={student.shape}, "
        f"{b}.shape={teacher.shape}. If the larger vocabulary only adds padding rows, "
        f"cut both to the shared size with kdjax.align_vocab({a}, {b}) first.")
  raise ValueError(
      f"{a} and {b} must have the same shape, got {a}.shape={student.shape} and "
      f"{b}.shape={teacher.shape}.")


def labels(x: Any, token_shape: tuple[int, ...], *, required: bool = False,
           why: str = "", source: str = "logits") -> Array | None:
  """Integer token ids of shape ``token_shape`` (``source.shape[:-1]``)."""
  if x is None:
    if required:
      raise ValueError(f"labels is required{why}.")
    return None
  x = jnp.asarray(x)
  _token_shape("labels", x, token_shape, source)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"labels must be an integer array (token ids), got dtype {x.dtype}.")
  return x


def where(x: Any, token_shape: tuple[int, ...], source: str = "logits") -> Array | None:
  """A mask of shape ``token_shape``: boolean, or integer with nonzero meaning counted (the
  attention masks of Hugging Face tokenizers)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  _token_shape("where", x, token_shape, source)
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x != 0
  if x.dtype != jnp.bool_:
    raise TypeError(
        f"where must be a boolean or integer mask (nonzero = counted), got dtype {x.dtype}.")
  return x


def _token_shape(name: str, x: Array, token_shape: tuple[int, ...], source: str) -> None:
  """``x`` has the token shape: that of the argument ``source`` without its last axis."""
  if tuple(x.shape) != tuple(token_shape):
    raise ValueError(
        f"{name} must have shape {source}.shape[:-1] = {tuple(token_shape)}, got {x.shape}.")


def scalar(name: str, x: Any) -> float | Array:
  """A hyperparameter: a Python number (returned as a float, checked by the caller) or a scalar
  array (returned as is, traced)."""
  if isinstance(x, (bool, np.bool_)):
    raise TypeError(f"{name} must be a number, got {x!r}.")
  if isinstance(x, (int, float, np.integer, np.floating)):
    return float(x)
  if x is None:
    raise TypeError(f"{name} must be a number or a scalar array, got None.")
  arr = jnp.asarray(x)
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {arr.shape}.")
  return arr


def _in_range(name: str, x: Array, valid: Array, requirement: str) -> Array:
  """A hyperparameter array ``x`` and whether its value is ``valid`` (a bool scalar computed from
  it): a ``ValueError`` when the value is known and invalid; when it is traced, ``x`` where valid
  and NaN elsewhere (every loss reading it is then NaN)."""
  try:
    known_valid = bool(valid)
  except jax.errors.ConcretizationTypeError:  # Traced: decided when the program runs.
    return jnp.where(valid, x, jnp.nan)
  if not known_valid:
    raise ValueError(f"{name} must be {requirement}, got {np.asarray(x).item()!r}.")
  return x


def _positive_finite(x: Array) -> Array:
  x = jnp.asarray(x, jnp.float32)
  return (x > 0) & jnp.isfinite(x)


def temperature(x: Any, name: str = "temperature") -> float | Array:
  """``T > 0`` whose reciprocal is a finite, normal float32, since logits are multiplied by
  ``1 / T``."""
  x = scalar(name, x)
  if not isinstance(x, float):
    t = jnp.asarray(x, jnp.float32)
    reciprocal = 1.0 / jnp.where(t != 0, t, 1.0)
    valid = _positive_finite(t) & jnp.isfinite(reciprocal) & (reciprocal >= _FLOAT32.tiny)
    return _in_range(name, x, valid, "a finite number > 0 whose reciprocal is a normal float32")
  if not (x > 0 and math.isfinite(x)):
    raise ValueError(f"{name} must be a finite number > 0, got {x!r}.")
  with np.errstate(over="ignore"):
    inverse = np.float32(1.0 / x)
  if not (np.isfinite(inverse) and inverse >= _FLOAT32.tiny):
    raise ValueError(
        f"{name}={x!r} is outside the float32 range the losses compute in: 1 / "
        f"{name} must be a finite, normal float32 ({name} in about "
        f"[{1 / _FLOAT32.max:.3g}, {1 / _FLOAT32.tiny:.3g}]).")
  return x


def unit_interval(name: str, x: Any) -> float | Array:
  x = scalar(name, x)
  if not isinstance(x, float):
    return _in_range(name, x, (x >= 0) & (x <= 1), "in [0, 1]")
  if not (0.0 <= x <= 1.0):
    raise ValueError(f"{name} must be in [0, 1], got {x!r}.")
  return x


def positive(name: str, x: Any, role: str = "", *, zero: bool = False) -> float | Array | None:
  """An optional hyperparameter ``> 0`` (``>= 0`` with ``zero``; None: not used); ``role`` says
  what it is for in the error message."""
  if x is None:
    return None
  x = scalar(name, x)
  requirement = f"a finite number {'>=' if zero else '>'} 0{role}"
  if not isinstance(x, float):
    valid = _positive_finite(x)
    if zero:
      valid = valid | (jnp.asarray(x, jnp.float32) == 0)
    return _in_range(name, x, valid, requirement)
  if not ((x > 0 or (zero and x == 0)) and math.isfinite(x)):
    raise ValueError(f"{name} must be {requirement}, got {x!r}.")
  return x


@overload
def positive_int(name: str, x: Any, *, optional: Literal[False] = False) -> int: ...
@overload
def positive_int(name: str, x: Any, *, optional: bool) -> int | None: ...
def positive_int(name: str, x: Any, *, optional: bool = False) -> int | None:
  if x is None and optional:
    return None
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
    raise ValueError(f"{name} must be a positive integer, got {x!r}.")
  return int(x)


def entries_per_row(name: str, x: Any, *, function: str, vocab: int, why: str = "") -> int:
  """A static count of entries kept per row (``topk_teacher``'s ``k``): a positive Python int,
  at most ``vocab``; a traced value is refused with the way to mark it static."""
  if isinstance(x, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a static argument (a Python int: it sets the output's shape), got a "
        f"traced value {x!r}. Under jax.jit, mark it static: jax.jit(kdjax.{function}, "
        f"static_argnames='{name}').")
  x = positive_int(name, x)
  if x > vocab:
    raise ValueError(
        f"{name} must be <= the vocabulary size teacher_logits.shape[-1] = {vocab}{why}, got "
        f"{name}={x}.")
  return x


def divergence(name: Any) -> str:
  if not isinstance(name, str) or name not in divergences.DIVERGENCES:
    raise ValueError(
        f"divergence must be one of {sorted(divergences.DIVERGENCES)}, got {name!r}.")
  return name


def one_of(argument: str, value: Any, allowed: Sequence[Any]) -> Any:
  if value not in allowed:
    raise ValueError(f"{argument} must be one of {tuple(allowed)}, got {value!r}.")
  return value


# The combined checks below take arguments named like the validators above.
_labels, _where, _temperature = labels, where, temperature


# The defaults of the hyperparameters only some divergences read, as the public signatures write
# them, and what each is (for the error of a divergence that does not read it).
DIVERGENCE_DEFAULTS = {"beta": 0.5, "alpha": 0.1}
_ROLES = {
    "beta": "the teacher's weight in the generalized JSD's mixture (TRL's convention: beta=0 "
            "is forward KL, beta=1 reverse KL)",
    "alpha": "the skew weight of DistiLLM's mixture",
}


def hyperparameters(divergence_name: str, *, temperature: Any,
                    beta: Any = DIVERGENCE_DEFAULTS["beta"],
                    alpha: Any = DIVERGENCE_DEFAULTS["alpha"],
                    kd_coef: Any = None) -> dict[str, float | Array]:
  """The validated hyperparameters ``divergence_name`` reads (and ``kd_coef`` when given).

  One the divergence does not read must be left at its default (or None): any other value,
  and any array, is a ``ValueError``, since the loss would silently ignore it.
  """
  spec = divergences.DIVERGENCES[divergence(divergence_name)]
  hp = {"temperature": _temperature(temperature)}
  for name, value in (("beta", beta), ("alpha", alpha)):
    if name in spec.hyperparameters:
      hp[name] = unit_interval(name, value)
    else:
      _unread(name, value, divergence_name, combined=kd_coef is not None)
  if kd_coef is not None:
    hp["kd_coef"] = unit_interval("kd_coef", kd_coef)
  return hp


def _unread(name: str, value: Any, divergence_name: str, *, combined: bool) -> None:
  """Refuses a value of hyperparameter ``name``, which ``divergence_name`` does not read, other
  than its default: a Python number equal to it, or None. An array is refused whatever it
  holds: a traced one cannot be compared, and a step must behave alike eagerly and under jit."""
  default = DIVERGENCE_DEFAULTS[name]
  if value is None:
    return
  number = (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))
  if number and np.float32(value) == np.float32(default):
    return
  readers = [f"{reader!r}" for reader, spec in sorted(divergences.DIVERGENCES.items())
             if name in spec.hyperparameters]
  given = (f"{name} was given as an array" if isinstance(value, (jax.Array, np.ndarray))
           else f"{name}={value!r} was given")
  hint = ""
  if name == "alpha" and combined:
    hint = (" In the combined objective the weight of the distillation term is kd_coef "
            "(loss = (1 - kd_coef) * cross_entropy + kd_coef * distillation), not alpha as in "
            "Hinton-style code.")
  which = "that divergence" if len(readers) == 1 else "one of them"
  raise ValueError(
      f"divergence={divergence_name!r} does not read {name}, but {given}. {name} is "
      f"{_ROLES[name]}, read only by divergence={' or '.join(readers)}: pass {which} to use "
      f"{name}, or leave {name} out (its default, {default}, is accepted).{hint}")


def reduction(name: Any, normalizer: Any) -> tuple[str, Array | None]:
  """The reduction's name and its validated ``normalizer`` (a float32 scalar, or None)."""
  one_of("reduction", name, reductions.REDUCTIONS)
  if normalizer is None:
    return name, None
  if name != "mean":
    raise ValueError(
        f"normalizer replaces the token count of reduction='mean'; it cannot be used with "
        f"reduction={name!r}.")
  normalizer = positive(
      "normalizer", normalizer, " (the divisor of the mean; 0 only where no token is counted)",
      zero=True)
  return name, jnp.asarray(normalizer, jnp.float32)


def ignore_index(x: Any) -> int:
  if not isinstance(x, int) or isinstance(x, bool):
    raise TypeError(f"ignore_index must be a Python int, got {x!r}.")
  return x


_reduction, _ignore_index = reduction, ignore_index


class TokenArguments(NamedTuple):
  """The per-token arguments every loss shares, checked."""

  labels: Array | None
  where: Array | None  # bool
  normalizer: Array | None  # float32 scalar
  token_block: int | None
  token_weights: Array | None  # float


def token_arguments(token_shape, *, labels: Any, where: Any, reduction: Any, normalizer: Any,
                    ignore_index: Any, token_block: Any, token_weights: Any = None,
                    labels_required: str | None = None, token_source: str = "logits",
                    vocab_size: int | None = None) -> TokenArguments:
  """Checks the per-token arguments every loss shares; ``token_shape`` is
  ``token_source.shape[:-1]`` (the argument the error messages name).

  With ``vocab_size`` (the whole vocabulary's size, which the labels index), known labels are
  checked against it (:func:`label_range`); known labels and masks also check that a
  ``normalizer`` of 0 divides no counted token (:func:`zero_normalizer`).
  """
  checked_labels = _labels(labels, token_shape, required=labels_required is not None,
                           why=labels_required or "", source=token_source)
  _, checked_normalizer = _reduction(reduction, normalizer)
  _ignore_index(ignore_index)
  if token_weights is not None:
    token_weights = float_array("token_weights", token_weights, min_rank=0)
    _token_shape("token_weights", token_weights, token_shape, token_source)
  checked_where = _where(where, token_shape, token_source)
  # The arguments as given: a NumPy array is known even inside jax.jit, its jnp copy is not.
  if vocab_size is not None:
    label_range(labels, where, vocab_size=vocab_size, ignore_index=ignore_index,
                source=token_source)
  zero_normalizer(normalizer, token_shape, labels, where, ignore_index)
  return TokenArguments(checked_labels, checked_where, checked_normalizer,
                        positive_int("token_block", token_block, optional=True), token_weights)


def known(x: Any) -> np.ndarray | None:
  """``x``'s values when they can be read at the call (not traced, every shard on this
  process), else None."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return np.asarray(x)


def _counted(token_shape, labels: Any, where: Any, ignore_index: int) -> np.ndarray | None:
  """The tokens that count (as ``reductions.token_mask``), when the labels and the mask (checked
  arguments, as given) are known at the call; else None."""
  known_labels, known_where = known(labels), known(where)
  if (labels is not None and known_labels is None) or (where is not None and known_where is None):
    return None
  counted = np.ones(token_shape, np.bool_)
  if known_labels is not None:
    counted &= known_labels != ignore_index
  if known_where is not None:
    counted &= known_where != 0
  return counted


def label_range(labels: Any, where: Any, *, vocab_size: int, ignore_index: int,
                source: str = "logits") -> None:
  """A ``ValueError`` naming the first counted label outside ``[0, vocab_size)``, when the labels
  and the mask (checked arguments, as given) are known at the call. Traced ones are known only
  when the program runs: such a token makes the loss NaN (``reductions.invalid_tokens``)."""
  ids = known(labels)
  counted = None if ids is None else _counted(ids.shape, ids, where, ignore_index)
  if ids is None or counted is None:
    return
  outside = counted & ((ids < 0) | (ids >= vocab_size))
  if not outside.any():
    return
  position = tuple(int(i) for i in np.argwhere(outside)[0])
  value = int(ids[position])
  if value == -100:
    hint = (f"-100 is the padding label of PyTorch and Hugging Face, but ignore_index="
            f"{ignore_index}: pass ignore_index=-100 (the default) to ignore these tokens.")
  elif value < 0:
    hint = (f"Mark the tokens to ignore with ignore_index={ignore_index}, or pass "
            f"ignore_index={value} if {value} is the padding label.")
  else:
    hint = (f"An id past the vocabulary: do the labels come from a tokenizer with more ids "
            f"than {source}.shape[-1]?")
  where_label = "labels" + (f"[{', '.join(str(i) for i in position)}]" if position else "")
  raise ValueError(
      f"labels must be vocabulary ids in [0, {vocab_size}) ({source}.shape[-1] = "
      f"{vocab_size}) or ignore_index={ignore_index}, got {where_label} = {value} (the first "
      f"of {int(outside.sum())} counted label(s) outside the vocabulary). {hint}")


def zero_normalizer(normalizer: Any, token_shape, labels: Any, where: Any,
                    ignore_index: int) -> None:
  """A ``ValueError`` when a ``normalizer`` of 0 would divide counted tokens, all known at the
  call (0 is the divisor only of a batch with no counted token, whose loss is then 0)."""
  value = known(normalizer)
  if value is None or value != 0:
    return
  counted = _counted(token_shape, labels, where, ignore_index)
  if counted is None or not counted.any():
    return
  raise ValueError(
      f"normalizer must be > 0 when any token is counted, got 0 with {int(counted.sum())} "
      "counted token(s). A normalizer of 0 is accepted only for a batch with no counted token "
      "(an all-padding step whose global count is 0): its loss is then 0, as the default "
      "mean gives.")


def sparse_teacher(logits_: Any, teacher_ids: Any,
                   teacher_logprobs: Any) -> tuple[Array, Array, Array]:
  """Student logits ``[..., vocab]`` and a top-k teacher: ids and log-probabilities ``[..., k]``."""
  student = logits("logits", logits_)
  teacher_logprobs = float_array("teacher_logprobs", teacher_logprobs)
  teacher_ids = jnp.asarray(teacher_ids)
  if not jnp.issubdtype(teacher_ids.dtype, jnp.integer):
    raise TypeError(f"teacher_ids must be an integer array, got dtype {teacher_ids.dtype}.")
  token_shape, vocab = student.shape[:-1], student.shape[-1]
  if teacher_ids.shape[:-1] != token_shape or teacher_ids.ndim != student.ndim:
    raise ValueError(
        f"teacher_ids must have shape logits.shape[:-1] + (k,) = {token_shape + ('k',)}, got "
        f"{teacher_ids.shape} (logits.shape={student.shape}).")
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
  return student, teacher_ids, teacher_logprobs


def cross_vocabulary_logits(student: Any, teacher: Any) -> tuple[Array, Array]:
  """Student ``[..., V_s]`` and teacher ``[..., V_t]`` logits of the same tokens, whatever the
  two vocabularies (cross-tokenizer losses)."""
  student, teacher = logits("logits", student), logits("teacher_logits", teacher)
  if student.shape[:-1] != teacher.shape[:-1]:
    raise ValueError(
        f"logits and teacher_logits must hold the same positions (equal shapes but for the "
        f"vocabulary axis), got logits.shape={student.shape} and "
        f"teacher_logits.shape={teacher.shape}. Pick the positions where both tokenizations "
        "end at the same byte with kdjax.align_tokenizations, and gather both logits there.")
  return student, teacher


def top_k(x: Any) -> int | None:
  """None (every entry) or a positive Python int."""
  if x is None:
    return None
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
    raise ValueError(f"top_k must be None or a positive integer, got {x!r}.")
  return int(x)


def linear_head(hidden_name: str, hidden: Array, kernel_name: str, kernel: Array,
                bias_name: str, bias: Array | None) -> None:
  """``hidden [..., d]``, ``kernel [d, vocab]`` (flax layout) and ``bias [vocab]`` agree."""
  if kernel.ndim != 2:
    raise ValueError(
        f"{kernel_name} must be a [d, vocab] matrix (flax.nnx.Linear layout, [in_features, "
        f"out_features]), got shape {kernel.shape}.")
  if kernel.shape[1] == 0:
    raise ValueError(f"{kernel_name} has an empty vocabulary (shape {kernel.shape}).")
  if hidden.shape[-1] != kernel.shape[0]:
    hint = ""
    if hidden.shape[-1] == kernel.shape[1]:
      hint = (" It looks transposed: a PyTorch nn.Linear weight is [vocab, d]; pass "
              f"{kernel_name}.T.")
    raise ValueError(
        f"{hidden_name} has width {hidden.shape[-1]} (shape {hidden.shape}) but {kernel_name} "
        f"has shape {kernel.shape}; expected {kernel_name}.shape == ({hidden.shape[-1]}, "
        f"vocab).{hint}")
  if bias is not None and bias.shape != (kernel.shape[1],):
    raise ValueError(
        f"{bias_name} must have shape (vocab,) = ({kernel.shape[1]},) to match "
        f"{kernel_name}.shape={kernel.shape}, got {bias.shape}.")


def linear_heads(student_hidden: Any, student_kernel: Any, teacher_hidden: Any,
                 teacher_kernel: Any, student_bias: Any, teacher_bias: Any, *,
                 vocab_mismatch_hint: str) -> tuple[Array, ...]:
  """Both models' hidden states and output projections, checked against each other:
  ``(student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias,
  teacher_bias)``."""
  arrays = {
      "student_hidden": student_hidden, "student_kernel": student_kernel,
      "teacher_hidden": teacher_hidden, "teacher_kernel": teacher_kernel,
      "student_bias": student_bias, "teacher_bias": teacher_bias}
  arrays = {name: None if x is None else float_array(name, x) for name, x in arrays.items()}
  for side in ("student", "teacher"):
    linear_head(f"{side}_hidden", arrays[f"{side}_hidden"], f"{side}_kernel",
                arrays[f"{side}_kernel"], f"{side}_bias", arrays[f"{side}_bias"])
  if arrays["student_hidden"].shape[:-1] != arrays["teacher_hidden"].shape[:-1]:
    raise ValueError(
        "student_hidden and teacher_hidden must have the same token shape (all but the last "
        f"axis), got student_hidden.shape={arrays['student_hidden'].shape} and "
        f"teacher_hidden.shape={arrays['teacher_hidden'].shape}.")
  if arrays["student_kernel"].shape[1] != arrays["teacher_kernel"].shape[1]:
    raise ValueError(
        f"student_kernel and teacher_kernel have different vocabulary sizes: "
        f"student_kernel.shape={arrays['student_kernel'].shape}, teacher_kernel.shape="
        f"{arrays['teacher_kernel'].shape}. {vocab_mismatch_hint}")
  return tuple(arrays.values())


def per_model(name: str, value: Any) -> tuple[Any, Any]:
  """``value`` shared by both models, or a ``(student, teacher)`` pair."""
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ValueError(
          f"{name} must be a number, a scalar array or a (student, teacher) pair, got "
          f"{len(value)} values: {value!r}.")
    return tuple(value)
  return value, value


def mesh_axis(argument: str, axis_name: Hashable | None) -> None:
  """Raises a readable error when ``axis_name`` is not a bound mesh axis at trace time."""
  if axis_name is None:
    return
  try:
    lax.axis_size(axis_name)
  except NameError as error:  # jax raises NameError for an unbound axis name.
    raise ValueError(
        f"{argument}={axis_name!r} is not a mesh axis bound here: call this loss inside "
        f"jax.shard_map (or jax.pmap) over a mesh with an axis named {axis_name!r}. Outside "
        "shard_map, call kdjax.distill_loss on sharded arrays under jax.jit instead.") from error


def mesh_axes(axis_name: Hashable | None, data_axis_name: Hashable | None) -> None:
  if axis_name is not None and axis_name == data_axis_name:
    raise ValueError(
        f"axis_name and data_axis_name must be different mesh axes, both are {axis_name!r}.")
  mesh_axis("axis_name", axis_name)
  mesh_axis("data_axis_name", data_axis_name)
