r"""Cross-tokenizer distillation: Universal Logit Distillation (``uld_loss``) and the alignment
of two tokenizations of the same text (``align_tokenizations``; ``align_tokenizations_batch``
for a padded batch, as a gather index into the teacher and a ``where=`` mask over the student).

A teacher and a student from different model families split text into different tokens, so
their vocabularies share neither size nor ids, and position ``t`` of one sequence is not
position ``t`` of the other. ULD (Boizard et al., 2024) compares what can still be compared:

* **positions** where both models predict from the same text -- where a student token and a
  teacher token end at the same byte (:func:`align_tokenizations`);
* **distributions** without ids: both softmaxes sorted in descending order, the shorter one
  padded with zeros, and the L1 distance between the sorted vectors,

  .. math::

      \mathrm{ULD}(p, q) = \sum_{r=1}^{\max(V_s, V_t)} \left| q_{(r)} - p_{(r)} \right|,
      \qquad q = \mathrm{softmax}(s / T), \quad p = \mathrm{softmax}(t / T_t),

  with :math:`q_{(1)} \ge q_{(2)} \ge \dots` (and :math:`q_{(r)} = 0` past the student's
  vocabulary, likewise for the teacher). It is 0 exactly when the two distributions are
  permutations of each other, and at most 2.

``top_k`` keeps the first ``k`` sorted entries of each side (:math:`r \le k`). The entries it
drops add at most what both tails hold: :math:`0 \le \mathrm{ULD} - \mathrm{ULD}_k \le
(1 - \sum_{r \le k} q_{(r)}) + (1 - \sum_{r \le k} p_{(r)})`.

The gradient. Sorting is a permutation, so ``d ULD / d q_v = sign(q_v - p_(rank v))`` at the
rank ``v`` holds among the student's probabilities (0 where they are equal). With
``g_v = q_v sign(...)``, the derivative with respect to ``log q_v``, the gradient with respect to
the scaled student logits is ``g - q sum(g)``: the form of every divergence of the block recipe
(``recipe.py``), which computes the statistics, the per-token conventions and the gradient here
as everywhere. Where student probabilities are tied, the value has no derivative; the blocked
engine gives each tied entry the mean of the signs over the tied ranks (the mean of the
gradients of every order of the tied entries), the reference the sign at the rank ``jnp.sort``
gives it (ties in the order of their ids). The two agree wherever no probabilities are tied
(exactly 0 probabilities aside: their ``g`` is 0 either way).

The blocked engine (``dense.py``) runs it over blocks of tokens, with the gradient computed with
the values and written over the logits: no ``[tokens, vocab]`` float32 temporary. A full sort per
token is the expensive part; ``top_k`` replaces it with a partial one (``lax.top_k``). The full
sort orders the probabilities' bits as int32 keys (non-negative floats order as their bits do),
which XLA:CPU sorts about five times faster than float32 keys, and finds each entry's rank by a
binary search in the sorted keys instead of sorting an index alongside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from kdjax._src import checks, implementations, meshes, recipe, reductions, reference
from kdjax._src import config as config_lib

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# The block function of the blocked engine.
# ----------------------------------------------------------------------------------------------


def _sort_keys(prob: Array) -> Array:
  """int32 keys that order non-negative float32 probabilities in descending order."""
  return -lax.bitcast_convert_type(prob, jnp.int32)


def _sorted_descending(prob: Array) -> tuple[Array, Array]:
  """Each row of ``prob`` sorted in descending order, and the ascending sort keys."""
  keys = lax.sort(_sort_keys(prob), dimension=1)
  return lax.bitcast_convert_type(-keys, jnp.float32), keys


def _compare(q_sorted: Array, p_sorted: Array) -> tuple[Array, Array]:
  """``(sum_r |q_(r) - p_(r)|, sign(q_(r) - p_(r)))`` for descending rows, the shorter side
  padded with zeros; the signs at the student's ranks."""
  width, teacher_width = q_sorted.shape[-1], p_sorted.shape[-1]
  if teacher_width >= width:
    p_compared = p_sorted[:, :width]
    tail: Array | float = jnp.sum(p_sorted[:, width:], axis=-1)  # The student's zero padding.
  else:
    p_compared = jnp.pad(p_sorted, ((0, 0), (0, width - teacher_width)))
    tail = 0.0
  difference = q_sorted - p_compared
  return jnp.sum(jnp.abs(difference), axis=-1) + tail, jnp.sign(difference)


def _take(x: Array, index: Array) -> Array:
  return jnp.take_along_axis(x, index, axis=-1)


def _mean_over_ties(keys: Array, signs: Array) -> Array:
  """Per rank, the mean of ``signs`` over the ranks whose key is the same (tied entries)."""
  width = keys.shape[-1]
  rank = lax.broadcasted_iota(jnp.int32, keys.shape, 1)
  differs = keys[:, 1:] != keys[:, :-1]
  edge = jnp.ones((keys.shape[0], 1), jnp.bool_)
  start = lax.cummax(jnp.where(jnp.concatenate([edge, differs], 1), rank, 0), axis=1)
  end = lax.cummin(jnp.where(jnp.concatenate([differs, edge], 1), rank, width - 1), axis=1,
                   reverse=True)
  total = jnp.cumsum(signs, axis=1)  # Sums of signs are small integers: exact in float32.
  before = _take(total, start) - _take(signs, start)
  return (_take(total, end) - before) / (end - start + 1).astype(jnp.float32)


def _teacher_sorted(config: config_lib.Config, x: Array, stats: recipe.Stats,
                    inv_temperature, exps: Array) -> Array:
  """The teacher's probabilities in descending order: all of them, or the first ``top_k``."""
  vocab = x.shape[-1]
  if config.top_k is None or config.top_k >= vocab:
    return _sorted_descending(recipe.distribution(x, stats, inv_temperature, exps).prob)[0]
  top, _ = lax.top_k(x, config.top_k)  # The order of x / T for any T > 0.
  return recipe.distribution(top, stats, inv_temperature).prob


def _block(config: config_lib.Config, hp, logits: Array, teacher_logits: Array, *,
           weights: Array | None, with_grad: bool) -> tuple[recipe.Rows, Array | None]:
  """ULD of one block of tokens and, ``with_grad``, the gradient of ``sum(weights * value)``."""
  inv_temperature = recipe.inverse_temperature(hp)
  inv_teacher_temperature = 1.0 / hp["teacher_temperature"]
  x = logits.astype(jnp.float32)
  x_teacher = teacher_logits.astype(jnp.float32)
  student, exps = recipe.statistics(x, inv_temperature, keep=True)
  teacher, teacher_exps = recipe.statistics(x_teacher, inv_teacher_temperature)
  p_sorted = _teacher_sorted(config, x_teacher, teacher, inv_teacher_temperature, teacher_exps)
  q = recipe.distribution(x, student, inv_temperature, exps).prob
  vocab = x.shape[-1]
  whole_row = config.top_k is None or config.top_k >= vocab
  if whole_row:
    q_sorted, keys = _sorted_descending(q)
  else:
    x_top, ids = lax.top_k(x, config.top_k)  # type: ignore[arg-type]  # not whole_row: an int
    q_sorted = recipe.distribution(x_top, student, inv_temperature).prob
    keys = _sort_keys(q_sorted)
  distance, signs = _compare(q_sorted, p_sorted)
  if not with_grad:
    rows, _ = recipe.finish(config, hp, student, teacher, recipe.Sums(distance, None),
                            weights=weights)
    return rows, None
  # d ULD / d log q at each student rank; its sum over the row is the same in any order.
  sign_by_rank = _mean_over_ties(keys, signs)
  sum_dlog_q = jnp.sum(q_sorted * sign_by_rank, axis=-1)
  rows, scale = recipe.finish(config, hp, student, teacher, recipe.Sums(distance, sum_dlog_q),
                              weights=weights)
  if whole_row:
    # Each entry's rank: the first place of its key among the sorted keys (tied entries share
    # it, and their mean sign).
    rank = jax.vmap(functools.partial(jnp.searchsorted, side="left", method="scan"))(
        keys, _sort_keys(q))
    dlog_q = q * _take(sign_by_rank, rank)
    return rows, recipe.student_grad(scale, dlog_q, q, sum_dlog_q)
  # The top k's derivatives are added where they belong instead of materialising a dense
  # dlog_q that is zero almost everywhere.
  grad = recipe.student_grad(scale, 0.0, q, sum_dlog_q)
  return rows, recipe.scatter_entries(
      grad, ids, recipe.scale_entries(scale, q_sorted * sign_by_rank))


# ----------------------------------------------------------------------------------------------
# uld_loss
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _uld(config, traced, logits, teacher_logits, labels, where, normalizer, token_weights):
  mask = reductions.token_mask(logits.shape[:-1], labels, where, config.ignore_index)
  loss, _ = reductions.reduced_loss(
      lambda weights: implementations.materialised(
          config, traced, logits, (teacher_logits,), weights, mask=mask, block_fn=_block,
          reference_fn=reference.uld_per_token),
      mask, reduction=config.reduction, normalizer=normalizer,
      invalid=reductions.invalid_tokens(mask, labels, logits.shape[-1], traced),
      token_weights=token_weights)
  return loss


def uld_loss(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike = 1.0,
    teacher_temperature: float | ArrayLike | None = None,
    top_k: int | None = None,
    ignore_index: int = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    token_block: int | None = None,
    implementation: str | None = None,
) -> Array:
  r"""Universal Logit Distillation: a student and a teacher with different vocabularies.

  At each position, both softmaxes sorted in descending order, the shorter padded with zeros,
  and the L1 distance summed over the vocabulary:

  .. math::

      \text{value} = \sum_{r=1}^{\min(k, \max(V_s, V_t))} \left| q_{(r)} - p_{(r)} \right|,
      \qquad q = \mathrm{softmax}(\text{logits} / T), \quad
      p = \mathrm{softmax}(\text{teacher\_logits} / T_t)

  then masked and reduced over tokens as in :func:`kdjax.distill_loss`. The positions must be
  aligned first (``logits[..., i, :]`` and ``teacher_logits[..., i, :]`` predict from the same
  text): see :func:`kdjax.align_tokenizations`.

  Normalisation. The per-token value is the sum over the vocabulary (not the mean), in
  ``[0, 2]``, as in the paper and TRL's GOLD trainer, with no ``T**2`` factor. ``reduction=
  "mean"`` averages over the counted tokens; GOLD averages each sequence's aligned positions and
  then the sequences: ``reduction="sequence_mean"``. The two agree when every sequence has the
  same number of counted tokens. GOLD's separate student and teacher temperatures are
  ``temperature`` and ``teacher_temperature``; its cross-entropy term is not included (add
  ``(1 - w) * CE`` yourself).

  Args:
    logits: student logits ``[..., V_s]``, any float dtype; computed in float32, gradient
      returned in this dtype.
    teacher_logits: teacher logits ``[..., V_t]`` at the same positions (same shape but for the
      vocabulary axis; ``V_t`` may be smaller or larger than ``V_s``). No gradient flows to it.
    labels: optional integer ``logits.shape[:-1]``: tokens equal to ``ignore_index`` are not
      counted; a counted label outside ``[0, V_s)`` is a ``ValueError`` when the labels are
      known at the call and makes the loss NaN when they are traced, as in
      :func:`kdjax.distill_loss`. Not used otherwise.
    temperature: the student's softmax temperature ``T > 0`` (a number, or a scalar array to
      schedule it).
    teacher_temperature: the teacher's ``T_t > 0``; None: ``temperature``.
    top_k: compare only the ``k`` largest probabilities of each side (None: all of them; a
      ``k`` at least as large as both vocabularies is the full loss). Faster (a partial sort);
      it underestimates the loss by at most the mass both tails hold,
      ``(1 - sum of the student's top k) + (1 - sum of the teacher's top k)``, and only the
      student's top ``k`` entries get the gradient of the distance (all get the softmax's).
    ignore_index, where, token_weights, reduction, normalizer, token_block: as in
      :func:`kdjax.distill_loss`.
    implementation: ``"blocked"``, ``"reference"`` or None (the default), as in
      :func:`kdjax.distill_loss`. They agree to float32 rounding, except for the gradient at
      tied student probabilities: the value is not differentiable there; ``"blocked"`` shares
      the mean of the tied ranks' signs among the tied entries, ``"reference"`` (autodiff of
      ``jnp.sort``) gives them the ranks in the order of their ids.

  Returns:
    A float32 scalar, or ``logits.shape[:-1]`` for ``reduction="none"``. A token whose student
    or teacher logits are all ``-inf`` contributes 0; a NaN or ``+inf`` logit in a counted
    token makes the loss NaN.

  Example:
    >>> import jax.numpy as jnp, kdjax
    >>> student = jnp.log(jnp.array([[0.2, 0.7, 0.1]]))  # 3 ids
    >>> teacher = jnp.log(jnp.array([[0.1, 0.1, 0.6, 0.2]]))  # 4 other ids
    >>> # sorted: [0.7, 0.2, 0.1, 0] vs [0.6, 0.2, 0.1, 0.1]
    >>> round(float(kdjax.uld_loss(student, teacher)), 4)
    0.2
    >>> round(float(kdjax.uld_loss(student, teacher, top_k=1)), 4)  # |0.7 - 0.6|
    0.1

  References:
    Boizard et al., *Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
    Loss for LLMs*, 2024.
  """
  logits, teacher_logits = checks.cross_vocabulary_logits(logits, teacher_logits)
  tokens = checks.token_arguments(
      logits.shape[:-1], labels=labels, where=where, reduction=reduction,
      normalizer=normalizer, ignore_index=ignore_index, token_block=token_block,
      token_weights=token_weights, vocab_size=logits.shape[-1])
  temperature = checks.temperature(temperature)
  teacher_temperature = (temperature if teacher_temperature is None
                         else checks.temperature(teacher_temperature, "teacher_temperature"))
  config, traced = config_lib.build(
      {"temperature": temperature, "teacher_temperature": teacher_temperature},
      divergence="uld", top_k=checks.top_k(top_k), reduction=reduction,
      ignore_index=ignore_index, implementation=implementations.check(implementation),
      token_block=tokens.token_block)
  # On Explicit axes lax.sort and lax.top_k refuse a vocabulary-sharded row: the partitioner
  # decides, as on Auto axes (a full sort needs each row whole on one device).
  out_spec = (P() if reduction != "none"
              else meshes.token_spec(logits, logits.ndim - 1))
  return meshes.on_auto_axes(
      functools.partial(_uld, config),
      (traced, logits, teacher_logits, tokens.labels, tokens.where, tokens.normalizer,
       tokens.token_weights), out_spec)


# ----------------------------------------------------------------------------------------------
# align_tokenizations (host side, NumPy)
# ----------------------------------------------------------------------------------------------


def _token_ends(name: str, offsets) -> np.ndarray:
  """The end byte of each token, from end offsets ``[n]`` or ``(start, end)`` pairs ``[n, 2]``."""
  array = np.asarray(offsets)
  if array.shape in ((0,), (0, 2)):  # No token (a list [] arrives as float64).
    return np.zeros((0,), np.int64)
  if not (np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_)):
    raise TypeError(f"{name} must hold integer byte offsets, got dtype {array.dtype}.")
  if array.ndim == 2 and array.shape[1] == 2:
    starts, ends = array[:, 0].astype(np.int64), array[:, 1].astype(np.int64)
    if np.any(starts > ends):
      bad = int(np.argmax(starts > ends))
      raise ValueError(
          f"{name} has a token whose start is after its end: token {bad} is "
          f"{tuple(int(v) for v in array[bad])}; pairs are (start, end) byte offsets.")
    # A token that covers no text (a special token such as BOS or EOS at (0, 0)) ends where
    # the last token before it that covers text ends (at 0 if there is none).
    covers = starts < ends
    last_covering = np.maximum.accumulate(np.where(covers, np.arange(ends.size), -1))
    ends = np.where(last_covering >= 0, ends[np.maximum(last_covering, 0)], 0)
  elif array.ndim == 1:
    ends = array.astype(np.int64)
  else:
    raise ValueError(
        f"{name} must be the end byte offset of each token, shape [tokens], or (start, end) "
        f"pairs, shape [tokens, 2]; got shape {array.shape}. Align one sequence at a time (a "
        "padded batch: align_tokenizations_batch).")
  if np.any(ends < 0):
    raise ValueError(f"{name} has a negative byte offset: {int(ends.min())}.")
  if np.any(np.diff(ends) < 0):
    bad = int(np.argmax(np.diff(ends) < 0)) + 1
    raise ValueError(
        f"{name} must end in text order (non-decreasing end offsets), but token {bad} ends at "
        f"byte {int(ends[bad])}, before token {bad - 1} (byte {int(ends[bad - 1])}). Drop "
        "padding positions first; pass (start, end) pairs for special tokens that cover no "
        "text, such as an EOS at (0, 0).")
  return ends


def align_tokenizations(student_offsets, teacher_offsets) -> tuple[np.ndarray, np.ndarray]:
  """The positions of two tokenizations of one text where both models see the same prefix.

  A causal model's logits at token ``i`` predict from the text up to the end of token ``i``.
  Student token ``i`` and teacher token ``j`` therefore predict from the same text exactly when
  they end at the same byte: those ``(i, j)`` pairs are where :func:`kdjax.uld_loss` compares
  the two models. Between two such boundaries the tokenizations disagree and nothing is paired.

  Offsets are in bytes of the same text (UTF-8 for a string; a tokenizer's character offsets
  must be converted), per token either the end offset (exclusive) or the ``(start, end)`` pair
  that fast tokenizers return with ``return_offsets_mapping``; only ends are used. Ends must be
  non-decreasing (text order: remove padding positions first). Given as pairs, tokens that cover
  no text (``start == end``: special tokens, such as a BOS or an EOS at ``(0, 0)``) end where the
  token before them ends (at byte 0 if none does); at a byte where several tokens of one side
  end, the first of them is paired -- the one that completes the text up to that byte. Both
  sides must tokenize the same text: their last tokens must end at the same byte (the text's
  length; 0 for no tokens), else a ``ValueError``.

  Runs on the host with NumPy, one sequence at a time; :func:`kdjax.align_tokenizations_batch`
  aligns a padded batch.

  Args:
    student_offsets: integer ``[n_student]`` end offsets, or ``[n_student, 2]`` pairs.
    teacher_offsets: integer ``[n_teacher]`` end offsets, or ``[n_teacher, 2]`` pairs.

  Returns:
    ``(student_positions, teacher_positions)``: two int64 arrays of the same length, increasing;
    ``student_offsets`` position ``student_positions[m]`` and ``teacher_offsets`` position
    ``teacher_positions[m]`` end at the same byte. Gather the logits with them (for example
    ``logits[student_positions]``) before :func:`kdjax.uld_loss`.

  Example:
    >>> import kdjax
    >>> # "def f(x):" as ["def", " f", "(x", "):"] and as ["de", "f", " f(", "x", ")", ":"]
    >>> student, teacher = [3, 5, 7, 9], [(0, 2), (2, 3), (3, 6), (6, 7), (7, 8), (8, 9)]
    >>> s, t = kdjax.align_tokenizations(student, teacher)
    >>> s.tolist(), t.tolist()  # both predict after "def", after "def f(x", after the whole
    ([0, 2, 3], [1, 3, 5])
  """
  return _align(student_offsets, teacher_offsets)


def _align(student_offsets, teacher_offsets, row: str = "") -> tuple[np.ndarray, np.ndarray]:
  """:func:`align_tokenizations`; ``row`` (``"[i]"``) names a sequence of a batch in errors."""
  student_name, teacher_name = f"student_offsets{row}", f"teacher_offsets{row}"
  student_ends = _token_ends(student_name, student_offsets)
  teacher_ends = _token_ends(teacher_name, teacher_offsets)
  lengths = [int(ends[-1]) if ends.size else 0 for ends in (student_ends, teacher_ends)]
  if lengths[0] != lengths[1]:
    raise ValueError(
        f"{student_name} and {teacher_name} tokenize texts of different lengths: the "
        f"student's tokens end at byte {lengths[0]}, the teacher's at byte {lengths[1]}. Both "
        "must tokenize the same text: truncate the text before tokenizing it, not the tokens.")
  # The first token of each side to end at each byte (the ends are sorted).
  student_bytes, student_first = np.unique(student_ends, return_index=True)
  teacher_bytes, teacher_first = np.unique(teacher_ends, return_index=True)
  _, in_student, in_teacher = np.intersect1d(
      student_bytes, teacher_bytes, assume_unique=True, return_indices=True)
  return (student_first[in_student].astype(np.int64),
          teacher_first[in_teacher].astype(np.int64))


def _batch_offsets(name: str, offsets) -> np.ndarray:
  """``offsets`` as a padded batch: ``[batch, tokens]`` end offsets or ``[batch, tokens, 2]``
  pairs (the per-token checks are :func:`_token_ends`', row by row)."""
  try:
    array = np.asarray(offsets)
  except ValueError:  # NumPy refuses ragged nested lists.
    array = None
  if array is None or array.dtype == object:
    raise ValueError(
        f"{name} must be a padded batch, one row per sequence, of equal lengths; got rows of "
        "different lengths. Pad them and mark the tokens with student_mask / teacher_mask.")
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 2)):
    raise ValueError(
        f"{name} must be the end byte offset of each token of each sequence, shape "
        f"[batch, tokens], or (start, end) pairs, shape [batch, tokens, 2]; got shape "
        f"{array.shape}. One sequence: align_tokenizations.")
  if array.size and not (np.issubdtype(array.dtype, np.integer)
                         and not np.issubdtype(array.dtype, np.bool_)):
    raise TypeError(f"{name} must hold integer byte offsets, got dtype {array.dtype}.")
  return array


def _batch_mask(name: str, mask, shape: tuple[int, ...], offsets_name: str) -> np.ndarray:
  """``mask`` (None: every position is a token) as a boolean ``shape`` array."""
  if mask is None:
    return np.ones(shape, np.bool_)
  array = np.asarray(mask)
  if array.shape != shape:
    raise ValueError(
        f"{name} must have shape {offsets_name}.shape[:2] = {shape}, got {array.shape}.")
  if array.size and not (np.issubdtype(array.dtype, np.integer)
                         or np.issubdtype(array.dtype, np.bool_)):
    raise TypeError(
        f"{name} must be boolean or integer (nonzero marks a token, as an attention mask), "
        f"got dtype {array.dtype}.")
  return array != 0


def align_tokenizations_batch(
    student_offsets,
    teacher_offsets,
    *,
    student_mask=None,
    teacher_mask=None,
) -> tuple[np.ndarray, np.ndarray]:
  """The aligned positions of a padded batch: a gather index into the teacher, and ``where=``.

  Each sequence ``i`` of the batch is aligned as :func:`kdjax.align_tokenizations` aligns one:
  its tokens are the positions where ``student_mask[i]`` (``teacher_mask[i]``) is set, in
  order -- a tokenizer's ``attention_mask``, left or right padding alike -- and the rest is
  padding, whatever offsets it holds. The pairs come back laid out over the student's padded
  positions:

  * ``teacher_index[i, s]`` is the position, in the teacher's padded row ``i``, of the teacher
    token that ends at the same byte as student position ``s``, and 0 (a valid index) where
    there is none;
  * ``where[i, s]`` says whether there is one: False at padding and at student tokens that end
    inside a teacher token.

  So ``jnp.take_along_axis(teacher_logits, teacher_index[..., None], axis=1)`` gives, at each
  student position, the teacher's logits that predict from the same text, and
  ``kdjax.uld_loss(student_logits, that, where=where)`` compares the two models at the aligned
  positions only. The student's logits, the ones differentiated, enter the loss as they are
  (no gather, so their gradient comes back in their own layout), and ``where`` combines with
  the student's ``labels`` and with a cross-entropy term on the same logits. With the default
  ``reduction="mean"`` every aligned position of the batch counts once (a sequence weighs as
  many aligned positions as it has); ``reduction="sequence_mean"`` averages each sequence's
  aligned positions first, then the sequences (TRL GOLD's normalisation).

  Runs on the host with NumPy. Offsets and their rules are those of
  :func:`kdjax.align_tokenizations`; an error names the sequence (``student_offsets[2]``), and
  its token numbers count that sequence's tokens, not its padded positions.

  Args:
    student_offsets: integer ``[batch, student_len]`` end offsets, or ``[batch, student_len,
      2]`` ``(start, end)`` pairs (a fast tokenizer's ``offset_mapping``, in bytes).
    teacher_offsets: integer ``[batch, teacher_len]`` or ``[batch, teacher_len, 2]``, the same
      texts in the same order.
    student_mask: optional ``[batch, student_len]``, boolean or integer: nonzero marks the
      student's tokens (None: every position is one).
    teacher_mask: optional ``[batch, teacher_len]``, likewise for the teacher.

  Returns:
    ``(teacher_index, where)``: int32 and bool arrays ``[batch, student_len]``. For each
    sequence ``i``, ``student_positions = np.flatnonzero(where[i])`` and
    ``teacher_index[i, student_positions]`` are :func:`kdjax.align_tokenizations` of its tokens,
    as positions of the padded rows.

  Example:
    >>> import numpy as np, kdjax
    >>> # "def f(x):" as ["def", " f", "(x", "):"] and ["de", "f", " f(", "x", ")", ":"];
    >>> # "x = 1" as ["x", " =", " 1"] and ["x =", " 1"]: right-padded end offsets.
    >>> student = np.array([[3, 5, 7, 9], [1, 3, 5, 0]])
    >>> teacher = np.array([[2, 3, 6, 7, 8, 9], [3, 5, 0, 0, 0, 0]])
    >>> index, where = kdjax.align_tokenizations_batch(
    ...     student, teacher, student_mask=student > 0, teacher_mask=teacher > 0)
    >>> index.tolist()
    [[1, 0, 3, 5], [0, 0, 1, 0]]
    >>> where.tolist()
    [[True, False, True, True], [False, True, True, False]]
  """
  student = _batch_offsets("student_offsets", student_offsets)
  teacher = _batch_offsets("teacher_offsets", teacher_offsets)
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(
        f"student_offsets and teacher_offsets must hold the same sequences: got "
        f"{student.shape[0]} and {teacher.shape[0]} rows.")
  student_tokens = _batch_mask("student_mask", student_mask, student.shape[:2],
                               "student_offsets")
  teacher_tokens = _batch_mask("teacher_mask", teacher_mask, teacher.shape[:2],
                               "teacher_offsets")
  teacher_index = np.zeros(student.shape[:2], np.int32)
  where = np.zeros(student.shape[:2], np.bool_)
  for row in range(student.shape[0]):
    student_positions = np.flatnonzero(student_tokens[row])
    teacher_positions = np.flatnonzero(teacher_tokens[row])
    at_student, at_teacher = _align(student[row][student_positions],
                                    teacher[row][teacher_positions], row=f"[{row}]")
    teacher_index[row, student_positions[at_student]] = teacher_positions[at_teacher]
    where[row, student_positions[at_student]] = True
  return teacher_index, where
