"""Offline teacher caches: distill students from stored top-k, sampled and hidden-state teachers.

1. Train a teacher on real text: an interpolated (Witten-Bell) byte-level 5-gram model counted on
   the Python standard library's ``.py`` sources that ship with this interpreter.
2. Run it once over the student's training tokens and write ``(ids, logprobs)`` of its top k
   for every position to a cache on disk (k = 8, 32, 128; ids uint8, logprobs float16), and
   sampled teachers of the same storage (``sample_teacher``: 8 and 32 draws per position).
3. Train a small neural student from each cache with ``sparse_distill_loss`` (each tail policy;
   ``tail="zero"`` for the sampled teachers), reading teacher batches aligned with the token
   batches, and one student from the dense teacher run online, all with the same seed, data
   order and number of steps.
4. Print bytes per token stored and, on held-out text, (a) how far each sparse loss is from the
   dense forward KL at the same student, (b) the dense forward KL reached by each trained student.
5. Exact offline teachers: the n-gram has no hidden states, so a neural teacher with a final
   hidden layer and an output kernel (an MLP wider than the student, distilled from the n-gram
   first) is cached as hidden states (``write_hidden_state_cache``, float32 and bfloat16) and as
   top-k and sampled teachers. Students trained from each with the fused head (hidden-state
   caches) or ``sparse_distill_loss`` are compared with one trained from the neural teacher run
   online.

``--divergences reverse_kl,generalized_jsd,...`` adds a table per divergence: students trained
from the caches (k = 8, 32) with that divergence, renormalised over the top k or with the tail
bucket, against a student trained with the same divergence on the dense teacher.

Runs in a few minutes on a laptop CPU (a few more with ``--divergences``), in well under one
with ``--quick`` (few steps on little text: a smoke test); nothing is downloaded.

    python examples/teacher_cache.py [--steps 400] [--keep-cache DIR] [--divergences A,B] [--quick]
"""

from __future__ import annotations

import functools
import os
import shutil
import sysconfig
import tempfile
import time

import _cli
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

import kdjax
from kdjax import (
    TAILS,
    fused_linear_distill_loss,
    read_hidden_state_cache,
    read_teacher_cache,
    read_teacher_head,
    sample_teacher,
    sparse_distill_loss,
    topk_teacher,
    write_hidden_state_cache,
    write_teacher_cache,
)

VOCAB = 256  # bytes
ORDER = 5  # the teacher conditions on the previous ORDER - 1 bytes
CONTEXT = ORDER - 1
SEQ = 256  # tokens per sequence
BATCH = 4  # sequences per batch
KS = (8, 32, 128)
SAMPLES = (8, 32)  # draws per position of the sampled teachers: the storage of top-k 8 and 32
# The neural teacher of the exact offline teachers: embeddings of 32 per context byte and a final
# hidden layer of 96 (the student: 16 and 128), then its output kernel [96, VOCAB] and bias.
TEACHER_EMBED, TEACHER_HIDDEN = 32, 96
# The shape the docs' bytes per token refer to: an 8B Llama 3's final hidden size and vocabulary.
REAL_HIDDEN, REAL_VOCAB = 4096, 128256
TEMPERATURE = 1.0  # of the cached log-probabilities, recorded in each cache's manifest


# ----------------------------------------------------------------------------------------------
# Data: bytes of the standard library's sources, split by file into three disjoint parts.
# ----------------------------------------------------------------------------------------------


def load_text(teacher_bytes: int, student_bytes: int, heldout_bytes: int):
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))
  parts, sizes, current = [[], [], []], (teacher_bytes, student_bytes, heldout_bytes), 0
  for name in files:
    with open(os.path.join(stdlib, name), "rb") as f:
      data = f.read()
    while current < 3 and sum(map(len, parts[current])) >= sizes[current]:
      current += 1
    if current == 3:
      break
    parts[current].append(data)
  return [np.frombuffer(b"".join(p), np.uint8)[:s] for p, s in zip(parts, sizes, strict=True)]


def contexts(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """``[..., CONTEXT]`` previous bytes of each position (positions >= CONTEXT)."""
  return tokens[positions[..., None] + np.arange(-CONTEXT, 0)]


# ----------------------------------------------------------------------------------------------
# The teacher: interpolated Witten-Bell n-gram over bytes, counted with NumPy.
# ----------------------------------------------------------------------------------------------


def train_ngram(tokens: np.ndarray):
  """Sorted unique (context, next byte) codes and their counts, for context lengths 0..4."""
  tokens = tokens.astype(np.int64)
  tables = []
  for length in range(ORDER):
    code = np.zeros(len(tokens) - CONTEXT, np.int64)
    for j in range(length):
      code = code * VOCAB + tokens[CONTEXT - length + j: len(tokens) - length + j]
    pairs = code * VOCAB + tokens[CONTEXT:]
    tables.append(np.unique(pairs, return_counts=True))
  return tables


def ngram_logits(tables, context: np.ndarray) -> np.ndarray:
  """Teacher logits (log-probabilities) ``[n, VOCAB]`` for contexts ``[n, CONTEXT]``."""
  n = context.shape[0]
  context = context.astype(np.int64)
  prob = np.full((n, VOCAB), 1.0 / VOCAB)
  for length, (pairs, counts) in enumerate(tables):
    code = np.zeros(n, np.int64)
    for j in range(length):
      code = code * VOCAB + context[:, CONTEXT - length + j]
    lo = np.searchsorted(pairs, code * VOCAB)
    hi = np.searchsorted(pairs, code * VOCAB + VOCAB)
    lengths = hi - lo
    rows = np.repeat(np.arange(n), lengths)
    index = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + (
        np.repeat(lo, lengths))
    count = np.zeros((n, VOCAB))
    count[rows, pairs[index] % VOCAB] = counts[index]
    total = count.sum(1, keepdims=True)
    distinct = (count > 0).sum(1, keepdims=True)
    prob = np.where(total > 0, (count + distinct * prob) / np.maximum(total + distinct, 1), prob)
  return np.log(prob).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The student: embeddings of the previous CONTEXT bytes -> MLP -> VOCAB logits.
# ----------------------------------------------------------------------------------------------


def init_student(key, embed=16, hidden=128):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "embed": jax.random.normal(k1, (CONTEXT, VOCAB, embed)) * 0.1,
      "w1": jax.random.normal(k2, (CONTEXT * embed, hidden)) / np.sqrt(CONTEXT * embed),
      "b1": jnp.zeros(hidden),
      "w2": jax.random.normal(k3, (hidden, VOCAB)) / np.sqrt(hidden),
      "b2": jnp.zeros(VOCAB),
  }


def student_hidden(params, context):
  """The final hidden states ``[..., hidden]``, the input of the output kernel ``w2``."""
  x = jnp.concatenate(
      [params["embed"][j][context[..., j]] for j in range(CONTEXT)], axis=-1)
  return jax.nn.gelu(x @ params["w1"] + params["b1"])


def student_logits(params, context):
  return student_hidden(params, context) @ params["w2"] + params["b2"]


# Compiled once per shape: the evaluations and the teacher runs call them outside a train step.
forward = jax.jit(student_logits)
forward_hidden = jax.jit(student_hidden)


def fused_loss(params, context, teacher):
  """Forward KL from the teacher's hidden states and output layer (the fused head): ``teacher``
  is ``(hidden states, kernel, bias)``. A teacher with a logit scale or a softcap would pass
  ``logit_scale=(None, head.logit_scale), softcap=(None, head.softcap)`` from its cached head."""
  teacher_hidden, kernel, bias = teacher
  return fused_linear_distill_loss(student_hidden(params, context), params["w2"], teacher_hidden,
                                   kernel, student_bias=params["b2"], teacher_bias=bias)


def token_batches(student_tokens: np.ndarray):
  """The student's token pipeline: ``[BATCH, SEQ, CONTEXT]`` inputs, in a fixed order."""
  num_seqs = (len(student_tokens) - CONTEXT) // SEQ
  positions = CONTEXT + np.arange(num_seqs * SEQ).reshape(num_seqs, SEQ)
  for start in range(0, num_seqs - BATCH + 1, BATCH):
    yield contexts(student_tokens, positions[start:start + BATCH])


def cache_batches(tables, student_tokens, k):
  """Runs the teacher once over the student's tokens, batch by batch: top-k per position."""
  for context in token_batches(student_tokens):
    logits = ngram_logits(tables, context.reshape(-1, CONTEXT)).reshape(BATCH, SEQ, VOCAB)
    yield topk_teacher(logits, k, temperature=TEMPERATURE)


def sampled_batches(tables, student_tokens, num_samples, seed=0):
  """Runs the teacher once over the student's tokens: ``num_samples`` draws per position (one
  key per batch, so the cache does not depend on how many batches are written at a time)."""
  key = jax.random.key(seed)
  for index, context in enumerate(token_batches(student_tokens)):
    logits = ngram_logits(tables, context.reshape(-1, CONTEXT)).reshape(BATCH, SEQ, VOCAB)
    yield sample_teacher(jax.random.fold_in(key, index), logits, num_samples=num_samples,
                         temperature=TEMPERATURE)


@functools.cache
def dense_objective(divergence="forward_kl"):
  return lambda logits, teacher: kdjax.distill_loss(logits, teacher, divergence=divergence)


@functools.cache
def sparse_objective(tail, divergence="forward_kl"):
  return lambda logits, teacher: sparse_distill_loss(logits, *teacher, tail=tail,
                                                     divergence=divergence)


@functools.cache
def train_step(loss_fn, on_params):
  """The optimizer and the jitted train step of an objective: one per objective, so students
  trained with the same loss on teachers of the same shapes share one compilation."""
  optimizer = optax.adam(3e-3)

  def objective(p, context, teacher):
    if on_params:
      return loss_fn(p, context, teacher)
    return loss_fn(student_logits(p, context), teacher)

  @jax.jit
  def step(params, opt_state, context, teacher):
    loss, grads = jax.value_and_grad(objective)(params, context, teacher)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, step


def train(student_tokens, steps, loss_fn, teacher_source, seed=0, init=init_student,
          on_params=False):
  """Trains a student for ``steps`` steps; ``teacher_source()`` yields teacher batches aligned
  with ``token_batches`` (one epoch per call). ``loss_fn(logits, teacher)``, or with
  ``on_params`` ``loss_fn(params, context, teacher)`` (the fused head reads the hidden states)."""
  optimizer, step = train_step(loss_fn, on_params)
  params = jax.jit(init)(jax.random.PRNGKey(seed))  # one compilation, not one per array
  opt_state = optimizer.init(params)
  done = 0
  while done < steps:
    for context, teacher in zip(token_batches(student_tokens), teacher_source(), strict=True):
      params, opt_state, _ = step(params, opt_state, context, teacher)
      done += 1
      if done == steps:
        break
  return params


def main():
  parser = _cli.Parser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=_cli.positive_int, default=400,
                      help="training steps of the teacher and of each student")
  parser.add_argument("--teacher-bytes", type=_cli.positive_int, default=3_000_000,
                      help="bytes of text the teacher trains on")
  parser.add_argument("--student-bytes", type=_cli.positive_int, default=131_072 + CONTEXT,
                      help="bytes of text the caches hold and the students train on")
  parser.add_argument("--heldout-bytes", type=_cli.positive_int, default=16_384 + CONTEXT,
                      help="held-out bytes of the evaluation")
  parser.add_argument("--keep-cache", default=None, help="write the caches here and keep them")
  parser.add_argument("--divergences", default="",
                      help="comma-separated divergences for the per-divergence table")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke test: 3 steps on little text, top-k students with the "
                      "bucket tail only (overrides the sizes above)")
  args = parser.parse_args()
  args.tails = TAILS
  if args.quick:
    args.steps, args.teacher_bytes = 3, 200_000
    args.student_bytes, args.heldout_bytes = 16_384 + CONTEXT, 2_048 + CONTEXT
    args.tails = ("bucket",)
  unknown = set(filter(None, args.divergences.split(","))) - set(kdjax.DIVERGENCES)
  if unknown:
    parser.error(f"--divergences: unknown {sorted(unknown)}; choose from {kdjax.DIVERGENCES}")
  start = time.time()

  teacher_text, student_tokens, heldout_tokens = load_text(
      args.teacher_bytes, args.student_bytes, args.heldout_bytes)
  tables = train_ngram(teacher_text)
  heldout_context = contexts(heldout_tokens, np.arange(CONTEXT, len(heldout_tokens)))
  heldout_teacher = ngram_logits(tables, heldout_context)
  heldout_nll = -np.mean(heldout_teacher[np.arange(len(heldout_context)),
                                         heldout_tokens[CONTEXT:]])
  print(f"teacher: byte-level {ORDER}-gram counted on {len(teacher_text):,} bytes of the stdlib "
        f"sources; held-out cross entropy {heldout_nll / np.log(2):.3f} bits/byte "
        f"({len(heldout_context):,} held-out positions)")

  cache_root = args.keep_cache or tempfile.mkdtemp(prefix="kdjax-teacher-cache-")
  try:
    run(args, tables, student_tokens, heldout_context, heldout_teacher, cache_root, start)
  finally:
    if not args.keep_cache:
      shutil.rmtree(cache_root, ignore_errors=True)


def run(args, tables, student_tokens, heldout_context, heldout_teacher, cache_root, start):
  infos = {}
  for k in KS:
    infos[k] = write_teacher_cache(
        os.path.join(cache_root, f"k{k}"), cache_batches(tables, student_tokens, k),
        vocab_size=VOCAB, temperature=TEMPERATURE, logprob_dtype="float16", overwrite=True,
        metadata={"teacher": f"byte {ORDER}-gram, Witten-Bell", "k": k})
  for n in SAMPLES:
    infos["sampled", n] = write_teacher_cache(
        os.path.join(cache_root, f"sampled{n}"), sampled_batches(tables, student_tokens, n),
        vocab_size=VOCAB, temperature=TEMPERATURE, logprob_dtype="float16", overwrite=True,
        metadata={"teacher": f"byte {ORDER}-gram, Witten-Bell", "num_samples": n})
  print(f"wrote caches for k={KS} and sampled teachers of {SAMPLES} draws over "
        f"{infos[KS[0]].num_tokens:,} student tokens to {cache_root} "
        f"({time.time() - start:.1f} s so far)\n")

  print("| teacher | k | ids | logprobs | bytes/token (file size / tokens) | "
        "152k vocab (uint32 ids) | distinct ids per token |")
  print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
  for name, info in infos.items():
    size = sum(os.path.getsize(os.path.join(info.directory, s.file)) for s in info.shards)
    distinct = np.mean(np.concatenate([np.isfinite(lp.astype(np.float32)).sum(-1).ravel()
                                       for _, lp in read_teacher_cache(
                                           info.directory, batch_shape=(BATCH, SEQ))]))
    kind = "sampled" if isinstance(name, tuple) else "top-k"
    print(f"| {kind} | {info.k} | {info.id_dtype} | {info.logprob_dtype} | "
          f"{size / info.num_tokens:.0f} | {info.k * (4 + 2)} | {distinct:.1f} |")

  # Held-out teachers, stored and read back exactly as training would see them (float16).
  heldout_sparse = {}
  heldout_batches = {k: topk_teacher(heldout_teacher, k, temperature=TEMPERATURE) for k in KS}
  for n in SAMPLES:
    heldout_batches["sampled", n] = sample_teacher(
        jax.random.key(1), heldout_teacher, num_samples=n, temperature=TEMPERATURE)
  for name, batch in heldout_batches.items():
    label = f"sampled{name[1]}" if isinstance(name, tuple) else f"k{name}"
    path = os.path.join(cache_root, f"heldout-{label}")
    write_teacher_cache(path, [batch], vocab_size=VOCAB, temperature=TEMPERATURE,
                        overwrite=True)
    (heldout_sparse[name],) = read_teacher_cache(path, batch_shape=(len(heldout_context),))

  def dense_kl(params):
    return float(kdjax.distill_loss(forward(params, heldout_context), heldout_teacher))

  # Students: one per (k, tail) from the caches, one from the dense teacher run online.
  def dense_source():
    for context in token_batches(student_tokens):
      yield ngram_logits(tables, context.reshape(-1, CONTEXT)).reshape(BATCH, SEQ, VOCAB)

  students = {"dense": train(
      student_tokens, args.steps, dense_objective(), dense_source)}
  for k in KS:
    for tail in args.tails:
      students[k, tail] = train(
          student_tokens, args.steps,
          sparse_objective(tail),
          lambda k=k: read_teacher_cache(infos[k].directory, batch_shape=(BATCH, SEQ)))
  # The sampled teachers' gradient is unbiased with tail="zero" (the weights sum to one, so
  # "bucket" has an empty remainder and is the same up to the float16 rounding).
  for n in SAMPLES:
    students["sampled", n] = train(
        student_tokens, args.steps,
        sparse_objective("zero"),
        lambda n=n: read_teacher_cache(infos["sampled", n].directory, batch_shape=(BATCH, SEQ)))

  reference = students["dense"]
  reference_logits = forward(reference, heldout_context)
  dense_at_reference = dense_kl(reference)
  print(f"\nheld-out forward KL(teacher || student), nats/token; {args.steps} steps of "
        f"{BATCH}x{SEQ} tokens, Adam 3e-3, same seed and data order for every student.")
  print(f"(a) sparse loss at the dense-trained student, whose dense KL is "
        f"{dense_at_reference:.4f}; (b) dense KL of the student trained on that sparse loss, "
        f"vs {dense_at_reference:.4f} for the dense-trained one.\n")
  print("| teacher | k | tail | (a) sparse loss | (a) minus dense KL | (b) dense KL of student "
        "| (b) minus dense-trained |")
  print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
  rows = [("top-k", k, tail, k, (k, tail)) for k in KS for tail in args.tails]
  rows += [("sampled", n, "zero", ("sampled", n), ("sampled", n)) for n in SAMPLES]
  for kind, k, tail, heldout, student in rows:
    ids, logprobs = heldout_sparse[heldout]
    sparse = float(sparse_distill_loss(reference_logits, ids, logprobs, tail=tail))
    trained = dense_kl(students[student])
    print(f"| {kind} | {k} | {tail} | {sparse:.4f} | {sparse - dense_at_reference:+.4f} | "
          f"{trained:.4f} | {trained - dense_at_reference:+.4f} |")
  exact_teacher_table(args, student_tokens, heldout_context, dense_source, cache_root, start)
  for divergence in filter(None, args.divergences.split(",")):
    divergence_table(args, divergence, student_tokens, infos, heldout_context, heldout_teacher,
                     heldout_sparse, dense_source)
  print(f"\ntotal time {time.time() - start:.1f} s")


def exact_teacher_table(args, student_tokens, heldout_context, dense_source, cache_root, start):
  """A neural teacher (final hidden layer and output kernel) cached as hidden states, top-k and
  sampled teachers; students trained from each against one trained from it run online."""
  # The teacher: a wider MLP, distilled from the n-gram (forward KL on the dense teacher).
  init_teacher = functools.partial(init_student, embed=TEACHER_EMBED, hidden=TEACHER_HIDDEN)
  teacher = train(student_tokens, args.steps, dense_objective(),
                  dense_source, seed=1, init=init_teacher)

  def online_hidden():  # the teacher run online: its final hidden states, float32
    for context in token_batches(student_tokens):
      yield forward_hidden(teacher, context)

  def teacher_logits(context):
    return forward(teacher, context)

  paths = {}
  for dtype in ("float32", "bfloat16"):
    paths["hidden", dtype] = os.path.join(cache_root, f"neural-hidden-{dtype}")
    write_hidden_state_cache(
        paths["hidden", dtype],
        (np.asarray(h).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
         for h in online_hidden()),
        teacher_kernel=np.asarray(teacher["w2"]), teacher_bias=np.asarray(teacher["b2"]),
        overwrite=True, metadata={"teacher": "MLP distilled from the byte 5-gram"})
  for k in SAMPLES:  # the storage of top-k 8 and 32, for top-k and sampled teachers alike
    paths["top-k", k] = os.path.join(cache_root, f"neural-k{k}")
    write_teacher_cache(paths["top-k", k],
                        (topk_teacher(teacher_logits(c), k, temperature=TEMPERATURE)
                         for c in token_batches(student_tokens)),
                        vocab_size=VOCAB, temperature=TEMPERATURE, overwrite=True)
    paths["sampled", k] = os.path.join(cache_root, f"neural-sampled{k}")
    key = jax.random.key(2)
    write_teacher_cache(paths["sampled", k],
                        (sample_teacher(jax.random.fold_in(key, i), teacher_logits(c),
                                        num_samples=k, temperature=TEMPERATURE)
                         for i, c in enumerate(token_batches(student_tokens))),
                        vocab_size=VOCAB, temperature=TEMPERATURE, overwrite=True)

  def hidden_source(path):
    head = read_teacher_head(path)  # read once; the batches are read as training goes
    assert head.logit_scale is None and head.softcap is None  # this teacher has neither
    return lambda: ((h, head.kernel, head.bias)
                    for h in read_hidden_state_cache(path, batch_shape=(BATCH, SEQ)))

  students = {"online": train(
      student_tokens, args.steps, fused_loss,
      lambda: ((h, teacher["w2"], teacher["b2"]) for h in online_hidden()), on_params=True)}
  for dtype in ("float32", "bfloat16"):
    students["hidden", dtype] = train(student_tokens, args.steps, fused_loss,
                                      hidden_source(paths["hidden", dtype]), on_params=True)
  for k in SAMPLES:
    for kind, tail in (("top-k", "bucket"), ("sampled", "zero")):
      students[kind, k] = train(
          student_tokens, args.steps,
          sparse_objective(tail),
          lambda path=paths[kind, k]: read_teacher_cache(path, batch_shape=(BATCH, SEQ)))

  heldout = teacher_logits(heldout_context)

  def dense_kl(params):
    return float(kdjax.distill_loss(forward(params, heldout_context), heldout))

  reference = students["online"]
  at_reference = dense_kl(reference)
  print(f"\nexact offline teachers: a neural teacher (embeddings {TEACHER_EMBED}, final hidden "
        f"layer {TEACHER_HIDDEN}, output kernel [{TEACHER_HIDDEN}, {VOCAB}] and bias) distilled "
        f"from the n-gram for {args.steps} steps; students trained from it as stored, "
        f"{args.steps} steps each ({time.time() - start:.1f} s so far). Held-out forward "
        f"KL(neural teacher || student), nats/token, vs {at_reference:.4f} for the student "
        "trained from the teacher run online (the fused head on its hidden states).\n")
  print(f"| teacher stored as | tail | bytes/token (file size / tokens) | at hidden "
        f"{REAL_HIDDEN}, vocab {REAL_VOCAB:,} | dense KL of student | minus online-trained | "
        "parameter distance to online-trained (relative) |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  rows = [("run online (fused head)", "-", None, None, "online")]
  rows += [(f"hidden states, {dtype}", "-", paths["hidden", dtype],
            REAL_HIDDEN * np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
            .itemsize, ("hidden", dtype)) for dtype in ("float32", "bfloat16")]
  rows += [(f"{kind} {k}", tail, paths[kind, k], k * (4 + 2), (kind, k))
           for k in SAMPLES for kind, tail in (("top-k", "bucket"), ("sampled", "zero"))]
  for name, tail, path, real_bytes, student in rows:
    if path is None:
      stored, real = "0", "0"
    else:
      manifest = (kdjax.open_hidden_state_cache(path) if name.startswith("hidden")
                  else kdjax.open_teacher_cache(path))
      size = sum(os.path.getsize(os.path.join(path, s.file)) for s in manifest.shards)
      stored, real = f"{size / manifest.num_tokens:.0f}", f"{real_bytes:,}"
    params = students[student]
    distance = np.sqrt(sum(float(jnp.sum((params[n] - reference[n]) ** 2)) for n in reference)
                       / sum(float(jnp.sum(reference[n] ** 2)) for n in reference))
    reached = dense_kl(params)
    print(f"| {name} | {tail} | {stored} | {real} | {reached:.5f} | "
          f"{reached - at_reference:+.5f} | {distance:.2g} |", flush=True)
  head = kdjax.open_hidden_state_cache(paths["hidden", "float32"]).head
  print(f"\n(the hidden-state caches also store the head once: {head.num_bytes:,} bytes here, "
        f"{REAL_HIDDEN * REAL_VOCAB * 2:,} in bfloat16 at hidden {REAL_HIDDEN}, vocab "
        f"{REAL_VOCAB:,})")


def divergence_table(args, divergence, student_tokens, infos, heldout_context, heldout_teacher,
                     heldout_sparse, dense_source):
  """Students trained with ``divergence`` from the caches (renormalised, tail bucket) against
  one trained with it on the dense teacher: the sparse loss's bias, the divergence and the
  forward KL they reach on held-out text."""
  def dense(params, name):
    return float(kdjax.distill_loss(forward(params, heldout_context), heldout_teacher,
                                    divergence=name))

  reference = train(student_tokens, args.steps, dense_objective(divergence), dense_source)
  at_reference = dense(reference, divergence)
  reference_logits = forward(reference, heldout_context)
  print(f"\n{divergence}: (a) sparse {divergence} at the student trained with dense "
        f"{divergence} (whose held-out {divergence} is {at_reference:.4f}), minus that; (b) "
        f"held-out dense {divergence} and (c) forward KL of the student trained from the cache, "
        f"vs {at_reference:.4f} and {dense(reference, 'forward_kl'):.4f} for the dense-trained "
        "one.\n")
  print("| k | tail | (a) sparse minus dense | (b) dense divergence | (b) minus dense-trained "
        "| (c) forward KL |")
  print("| ---: | --- | ---: | ---: | ---: | ---: |")
  for k in (8, 32):
    ids, logprobs = heldout_sparse[k]
    for tail in ("renormalize", "bucket"):
      student = train(
          student_tokens, args.steps,
          sparse_objective(tail, divergence),
          lambda k=k: read_teacher_cache(infos[k].directory, batch_shape=(BATCH, SEQ)))
      sparse = float(sparse_distill_loss(reference_logits, ids, logprobs, tail=tail,
                                         divergence=divergence))
      reached = dense(student, divergence)
      print(f"| {k} | {tail} | {sparse - at_reference:+.4f} | {reached:.4f} | "
            f"{reached - at_reference:+.4f} | {dense(student, 'forward_kl'):.4f} |", flush=True)


if __name__ == "__main__":
  main()
