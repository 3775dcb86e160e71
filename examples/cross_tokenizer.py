"""Cross-tokenizer distillation with ULD: a byte-level teacher into a student over merged pairs.

The teacher and the student read the same text (the Python standard library's sources, whole
files held out, as in ``distill_lm.py``) through different tokenizers:

* the teacher, the demo's transformer (``_lm.py``), over bytes (256 ids);
* the student, a smaller transformer over a vocabulary of merged byte pairs learned on the
  training text (byte-pair encoding: 256 bytes plus ``--merges`` merged tokens).

Their vocabularies share no ids and their positions differ, so the student is distilled with
``kdjax.uld_loss`` at the positions where a student token and a teacher token end at the same
byte (``kdjax.align_tokenizations_batch``): there both predict from the same text. The students
train from the same initialisation on the same batches, one with cross entropy only and one
with ``cross entropy + w * ULD`` for each ``w`` of ``--uld-weights``; the script prints their
held-out loss in bits per byte (comparable across tokenizers) and their held-out ULD distance to
the teacher. About two minutes on two CPU cores.

Run: python examples/cross_tokenizer.py [--quick] [--merges 256] [--uld-weights 0.1,1]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parent))

import _cli  # noqa: E402
import _lm  # noqa: E402

import kdjax  # noqa: E402

IGNORE = _lm.IGNORE_INDEX

# ----------------------------------------------------------------------------------------------
# The student's tokenizer: byte-pair merges learned on the training text.
# ----------------------------------------------------------------------------------------------


def merge_pair(ids: np.ndarray, pair: tuple[int, int], new_id: int) -> np.ndarray:
  """``ids`` with the occurrences of ``pair`` replaced by ``new_id``, left to right."""
  match = (ids[:-1] == pair[0]) & (ids[1:] == pair[1])
  if pair[0] == pair[1]:  # In a run like "a a a" the matches overlap: take every other one.
    position = np.arange(match.size)
    first = match & ~np.concatenate([[False], match[:-1]])
    run_start = np.maximum.accumulate(np.where(first, position, 0))
    match &= (position - run_start) % 2 == 0
  starts = np.flatnonzero(match)
  merged = ids.copy()
  merged[starts] = new_id
  keep = np.ones(ids.size, bool)
  keep[starts + 1] = False
  return merged[keep]


def learn_merges(data: np.ndarray, num_merges: int) -> list[tuple[int, int]]:
  """The ``num_merges`` most frequent adjacent pairs, merged greedily one after the other."""
  ids, merges = data.astype(np.int32), []
  for new_id in range(256, 256 + num_merges):
    counts = np.bincount(ids[:-1].astype(np.int64) * new_id + ids[1:], minlength=new_id**2)
    best = int(np.argmax(counts))
    if counts[best] < 2:
      break
    merges.append(divmod(best, new_id))
    ids = merge_pair(ids, merges[-1], new_id)
  return merges


def encode(data: np.ndarray, merges: list[tuple[int, int]]) -> np.ndarray:
  ids = data.astype(np.int32)
  for new_id, pair in enumerate(merges, start=256):
    ids = merge_pair(ids, pair, new_id)
  return ids


def token_lengths(merges: list[tuple[int, int]]) -> np.ndarray:
  """Bytes per student token id."""
  lengths = [1] * 256
  for a, b in merges:
    lengths.append(lengths[a] + lengths[b])
  return np.array(lengths, np.int64)


# ----------------------------------------------------------------------------------------------
# Batches: one text window, tokenized both ways, and the aligned positions.
# ----------------------------------------------------------------------------------------------


class Text:
  """A text as bytes (the teacher's tokens) and as student tokens with their byte offsets."""

  def __init__(self, data: np.ndarray, merges, lengths):
    self.bytes = data
    self.ids = encode(data, merges)
    self.ends = np.cumsum(lengths[self.ids])  # end byte of each student token
    self.starts = self.ends - lengths[self.ids]


def window_batch(text: Text, first_tokens, *, byte_len: int, student_len: int):
  """For each start (a student token index), the ``byte_len`` bytes from there and the student
  tokens inside them, with the teacher position aligned to each student position.

  Returns ``(teacher_bytes [B, byte_len], student_ids [B, student_len], teacher_index
  [B, student_len], aligned [B, student_len] bool, labels [B, student_len])``.
  """
  batch = len(first_tokens)
  teacher_bytes = np.zeros((batch, byte_len), np.int32)
  student_ids = np.zeros((batch, student_len), np.int32)
  student_ends = np.zeros((batch, student_len), np.int64)
  student_mask = np.zeros((batch, student_len), bool)
  covered = np.zeros((batch, 1), np.int64)  # the bytes the student's whole tokens cover
  labels = np.full((batch, student_len), IGNORE, np.int32)
  for row, first in enumerate(first_tokens):
    start = text.starts[first]
    teacher_bytes[row] = text.bytes[start:start + byte_len]
    inside = np.searchsorted(text.ends, start + byte_len, side="right") - first
    count = min(inside, student_len)
    if count == 0:  # a single token longer than the window
      continue
    student_ids[row, :count] = text.ids[first:first + count]
    labels[row, :count - 1] = student_ids[row, 1:count]  # next-token targets
    student_ends[row, :count] = text.ends[first:first + count] - start
    student_mask[row, :count] = True
    covered[row] = student_ends[row, count - 1]
  # The teacher reads one byte per position: its token j ends at byte j + 1. Both
  # tokenizations must cover the same text: the bytes the student's whole tokens cover.
  teacher_ends = np.broadcast_to(np.arange(1, byte_len + 1), (batch, byte_len))
  teacher_index, aligned = kdjax.align_tokenizations_batch(
      student_ends, teacher_ends, student_mask=student_mask,
      teacher_mask=teacher_ends <= covered)
  return teacher_bytes, student_ids, teacher_index, aligned, labels


def train_starts(text: Text, step: int, *, seed: int, batch: int, byte_len: int):
  last = np.searchsorted(text.starts, len(text.bytes) - byte_len, side="right") - 1
  return np.random.default_rng([seed, step]).integers(0, last, size=batch)


# ----------------------------------------------------------------------------------------------
# Objectives and training.
# ----------------------------------------------------------------------------------------------


def student_terms(student_logits, teacher_logits, teacher_index, aligned, labels):
  """``(summed cross entropy in nats, ULD at the aligned positions)`` of a batch."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      student_logits.astype(jnp.float32), jnp.where(labels == IGNORE, 0, labels))
  total_ce = jnp.sum(jnp.where(labels == IGNORE, 0.0, per_token))
  teacher_at_student = jnp.take_along_axis(teacher_logits, teacher_index[..., None], axis=1)
  uld = kdjax.uld_loss(student_logits, teacher_at_student, where=aligned)
  return total_ce, uld


def make_student_step(graphdef, teacher_graphdef, optimizer):
  """A jitted train step of ``cross entropy + uld_weight * ULD`` (the weight is traced, so both
  students share one compilation)."""

  @jax.jit
  def step(params, opt_state, teacher_params, uld_weight, teacher_bytes, student_ids,
           teacher_index, aligned, labels):
    teacher_logits = _lm.apply(teacher_graphdef, teacher_params, teacher_bytes)

    def loss_fn(params):
      logits = _lm.apply(graphdef, params, student_ids)
      total_ce, uld = student_terms(logits, teacher_logits, teacher_index, aligned, labels)
      ce = total_ce / jnp.maximum(jnp.sum(labels != IGNORE), 1)
      return ce + uld_weight * uld

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@functools.partial(jax.jit, static_argnums=(0, 2))
def _heldout_terms(graphdef, params, teacher_graphdef, teacher_params, teacher_bytes,
                   student_ids, teacher_index, aligned, labels):
  """``(student's summed cross entropy, ULD to the teacher, teacher's mean cross entropy)``."""
  teacher_logits = _lm.apply(teacher_graphdef, teacher_params, teacher_bytes)
  logits = _lm.apply(graphdef, params, student_ids)
  total_ce, uld = student_terms(logits, teacher_logits, teacher_index, aligned, labels)
  return total_ce, uld, _lm.cross_entropy(teacher_logits, teacher_bytes)


def evaluate(student, teacher, batches, lengths):
  """``(student bits per byte, mean ULD to the teacher, teacher bits per byte)`` on held-out
  batches (the student's bits over the bytes of the tokens it predicts)."""
  nats = bytes_predicted = uld = teacher_nats = 0.0
  for batch in batches:
    total_ce, batch_uld, teacher_ce = _heldout_terms(*student, *teacher, *batch)
    labels = batch[-1]
    nats += float(total_ce)
    bytes_predicted += float(lengths[labels[labels != IGNORE]].sum())
    uld += float(batch_uld)
    teacher_nats += float(teacher_ce)
  return (nats / bytes_predicted / math.log(2), uld / len(batches),
          teacher_nats / len(batches) / math.log(2))


def _weights(text: str) -> tuple[float, ...]:
  try:
    weights = tuple(float(w) for w in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected numbers separated by commas, got {text!r}") from None
  if not all(math.isfinite(w) and w > 0 for w in weights):
    raise argparse.ArgumentTypeError(f"expected weights > 0, got {text!r}")
  return weights


def main(argv=None):
  parser = _cli.Parser(description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--quick", action="store_true", help="a small run for the tests (about 30 s)")
  add("--merges", type=_cli.non_negative_int, default=256,
      help="merged tokens of the student's vocabulary")
  add("--uld-weights", type=_weights, default=(0.1, 1.0),
      help="weights of the ULD term, one student each (plus one with cross entropy only)")
  add("--teacher-steps", type=_cli.positive_int, default=400, help="teacher training steps")
  add("--student-steps", type=_cli.positive_int, default=150,
      help="training steps of each student (the same batches for all)")
  add("--batch-size", type=_cli.positive_int, default=16, help="sequences per step")
  add("--seed", type=_cli.non_negative_int, default=0,
      help="seed of the initial parameters and the batches")
  args = parser.parse_args(argv)
  args.byte_len, args.student_len = 128, 64
  train_bytes, heldout_bytes, teacher_dim, heldout_batches = 2_000_000, 100_000, 128, 4
  if args.quick:
    args.merges, args.teacher_steps, args.student_steps, args.batch_size = 32, 40, 30, 8
    args.uld_weights = (1.0,)
    train_bytes, heldout_bytes, teacher_dim, heldout_batches = 100_000, 10_000, 64, 2
  clock = time.perf_counter()

  train_data, heldout_data, _ = _lm.load_corpus()
  train_data, heldout_data = train_data[:train_bytes], heldout_data[:heldout_bytes]
  merges = learn_merges(train_data[:400_000], args.merges)
  lengths = token_lengths(merges)
  train_text = Text(train_data, merges, lengths)
  heldout_text = Text(heldout_data, merges, lengths)
  print(f"student tokenizer: {256 + len(merges)} ids ({len(merges)} merged pairs), "
        f"{len(train_data) / len(train_text.ids):.2f} bytes per token on the training text")

  teacher_model = _lm.ModelConfig(layers=2, dim=teacher_dim, heads=4, max_len=args.byte_len)
  teacher_graphdef, teacher_params = _lm.build(teacher_model, args.seed)
  optimizer = _lm.make_optimizer(learning_rate=3e-3, steps=args.teacher_steps,
                                 warmup=max(1, args.teacher_steps // 20))
  teacher_step = _lm.make_train_step(teacher_graphdef, optimizer)
  opt_state = optimizer.init(teacher_params)
  for index in range(args.teacher_steps):
    tokens = _lm.train_batch(train_data, index, seed=args.seed, batch_size=args.batch_size,
                             seq_len=args.byte_len)
    teacher_params, opt_state, _, _ = teacher_step(teacher_params, opt_state, tokens)
  teacher = (teacher_graphdef, teacher_params)

  last = np.searchsorted(heldout_text.starts, len(heldout_data) - args.byte_len) - 1
  starts = np.linspace(0, last, 32 * heldout_batches).astype(np.int64)
  heldout = [window_batch(heldout_text, starts[i:i + 32], byte_len=args.byte_len,
                          student_len=args.student_len) for i in range(0, starts.size, 32)]

  student_model = _lm.ModelConfig(layers=2, dim=64, heads=4, max_len=args.student_len,
                                  vocab=256 + len(merges))
  graphdef, initial_params = _lm.build(student_model, args.seed + 1)
  optimizer = _lm.make_optimizer(learning_rate=3e-3, steps=args.student_steps,
                                 warmup=max(1, args.student_steps // 20))
  step = make_student_step(graphdef, teacher_graphdef, optimizer)
  rows = []
  for weight in (0.0, *args.uld_weights):
    params, opt_state = initial_params, optimizer.init(initial_params)
    for index in range(args.student_steps):  # the same batches for every student
      starts = train_starts(train_text, index, seed=args.seed, batch=args.batch_size,
                            byte_len=args.byte_len)
      batch = window_batch(train_text, starts, byte_len=args.byte_len,
                           student_len=args.student_len)
      params, opt_state, _ = step(params, opt_state, teacher_params, jnp.float32(weight), *batch)
    bits, uld, teacher_bits = evaluate((graphdef, params), teacher, heldout, lengths)
    name = "cross entropy" if weight == 0 else f"cross entropy + {weight:g} x ULD"
    rows.append((name, bits, uld))

  print(f"\nteacher: bytes, {_lm.count_params(teacher_params):,} parameters, "
        f"{args.teacher_steps} steps; held-out {teacher_bits:.3f} bits/byte")
  print(f"students: {256 + len(merges)} merged-pair ids, "
        f"{_lm.count_params(params):,} parameters, {args.student_steps} steps each, "
        "same initialisation and batches\n")
  print("| student objective | held-out bits/byte | held-out ULD to the teacher |")
  print("|---|---|---|")
  for name, bits, uld in rows:
    print(f"| {name} | {bits:.3f} | {uld:.3f} |")
  print(f"\n{time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
  main()
