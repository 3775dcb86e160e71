"""Benchmark: what the metrics forms cost, against the loss alone, in this process.

For each path -- ``distill_loss``, ``distill_with_cross_entropy``, the fused head with whole
rows and with vocabulary tiles, a sparse top-k teacher -- a jitted value-and-grad step of the
loss alone and of its ``*_with_metrics`` form (``has_aux=True``: the loss's gradient, the
metrics carried out, per-token ones included) on the same inputs, timed interleaved (median of
``--reps`` calls after a warm-up) in wall-clock time and in the process's CPU time (every
thread's; steadier than the wall clock on a machine that other work shares), and the
temporaries XLA allocates for each step
(``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``). Prints a
markdown table of milliseconds, MiB and metrics / loss-alone ratios.

Usage: python benchmarks/bench_metrics.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax

import kdjax

TOKENS, VOCAB, HIDDEN, TOP_K = 1024, 32000, 256, 32
QUICK = (64, 512, 32, 8)


def cases(tokens, vocab, hidden, top_k):
  """name: (loss alone, its metrics form, arguments, differentiated argnums)."""
  keys = jax.random.split(jax.random.key(0), 5)
  logits = jax.random.normal(keys[0], (tokens, vocab)) * 2
  teacher = jax.random.normal(keys[1], (tokens, vocab)) * 2
  labels = jax.random.randint(keys[2], (tokens,), 0, vocab)
  h_s, h_t = (jax.random.normal(k, (tokens, hidden)) for k in keys[3:5])
  w_s, w_t = (jax.random.normal(k, (hidden, vocab)) / hidden ** 0.5 for k in keys[:2])
  ids, logprobs = kdjax.topk_teacher(teacher, top_k)
  fused_args = (h_s, w_s, h_t, w_t, labels)
  tiles = functools.partial(kdjax.fused_linear_distill_loss, vocab_block=vocab // 4)
  tiles_metrics = functools.partial(kdjax.fused_linear_distill_loss_with_metrics,
                                    vocab_block=vocab // 4)
  return {
      "distill_loss": (kdjax.distill_loss, kdjax.distill_loss_with_metrics,
                       (logits, teacher, labels), 0),
      "distill_with_cross_entropy": (
          functools.partial(kdjax.distill_with_cross_entropy, temperature=2.0),
          functools.partial(kdjax.distill_with_cross_entropy_with_metrics, temperature=2.0),
          (logits, teacher, labels), 0),
      "fused head": (kdjax.fused_linear_distill_loss,
                     kdjax.fused_linear_distill_loss_with_metrics, fused_args, (0, 1)),
      f"fused head, vocab_block={vocab // 4}": (tiles, tiles_metrics, fused_args, (0, 1)),
      f"sparse, k={top_k}": (kdjax.sparse_distill_loss, kdjax.sparse_distill_loss_with_metrics,
                             (logits, ids, logprobs, labels), 0),
  }


def steps(loss, with_metrics, argnums):
  plain = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  metrics = jax.jit(jax.value_and_grad(with_metrics, argnums=argnums, has_aux=True))
  return plain, metrics


def temporaries(step, args) -> float:
  """MiB of temporaries XLA allocates for ``step``."""
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2 ** 20


def timed(step, args) -> tuple[float, float]:
  """Milliseconds of one call: wall clock, CPU time."""
  start, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(step(*args))
  return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"tokens x vocab {QUICK[0]} x {QUICK[1]}, one repetition (checks "
                      "the script runs)")
  parser.add_argument("--reps", type=int, default=5, help="timed calls per step (median)")
  args = parser.parse_args()
  tokens, vocab, hidden, top_k = QUICK if args.quick else (TOKENS, VOCAB, HIDDEN, TOP_K)
  reps = 1 if args.quick else args.reps
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; {tokens} tokens x {vocab} "
        f"vocab (fused: hidden {hidden}), float32, value and gradient; median of {reps}\n")
  print("| loss | loss alone (ms) | with metrics (ms) | time ratio | CPU time ratio "
        "| temporaries: alone (MiB) | with metrics (MiB) | ratio |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, (loss, with_metrics, inputs, argnums) in cases(tokens, vocab, hidden,
                                                            top_k).items():
    plain, metrics = steps(loss, with_metrics, argnums)
    memory = [temporaries(step, inputs) for step in (plain, metrics)]
    for step in (plain, metrics):  # compile and warm up
      timed(step, inputs)
    times: list[list[tuple[float, float]]] = [[], []]
    for _ in range(reps):
      for i, step in enumerate((plain, metrics)):
        times[i].append(timed(step, inputs))
    (alone, alone_cpu), (with_, with_cpu) = (
        (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times)
    print(f"| {name} | {alone:.1f} | {with_:.1f} | {with_ / alone:.2f}x | "
          f"{with_cpu / max(alone_cpu, 1e-9):.2f}x | {memory[0]:.1f} | {memory[1]:.1f} | "
          f"{memory[1] / max(memory[0], 1e-9):.2f}x |", flush=True)


if __name__ == "__main__":
  main()
