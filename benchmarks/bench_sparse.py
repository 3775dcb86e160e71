"""Sparse (top-k) distillation vs the dense teacher: time and compiled memory, as ratios.

For ``value_and_grad`` with respect to bf16 student logits ``[tokens, vocab]``, prints per tail
policy the wall time and XLA's temporary-buffer size, each divided by the same figures for
``kdjax.distill_loss`` on the dense bf16 teacher logits (run in the same process), and also for
a naive autodiff implementation of the ``"zero"`` policy. The dense path must read a
``[tokens, vocab]`` teacher array per step; the sparse one reads ``[tokens, k]``.

    python benchmarks/bench_sparse.py [--tokens 1024] [--vocab 32768] [--k 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import kdjax
from kdjax import TAILS, sparse_distill_loss, topk_teacher


def naive_zero(logits, ids, logprobs):
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_q_top = jnp.take_along_axis(log_q, ids, axis=-1)
  p = jnp.exp(logprobs)
  return jnp.mean(jnp.sum(p * (logprobs - log_q_top), axis=-1))


def measure(fn, *args, repeats):
  compiled = jax.jit(jax.value_and_grad(fn)).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(compiled(*args))
  return (time.perf_counter() - start) / repeats, temp


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  key_s, key_t = jax.random.split(jax.random.PRNGKey(0))
  shape = (args.tokens, args.vocab)
  logits = jax.random.normal(key_s, shape, jnp.bfloat16)
  teacher = jax.random.normal(key_t, shape, jnp.bfloat16) * 3
  ids, logprobs = topk_teacher(teacher, args.k)

  dense_time, dense_temp = measure(kdjax.distill_loss, logits, teacher, repeats=args.repeats)
  print(f"{jax.devices()[0].platform}: tokens={args.tokens} vocab={args.vocab} k={args.k}, bf16 "
        f"logits; dense distill_loss value_and_grad: {dense_time * 1e3:.1f} ms, temporaries "
        f"{dense_temp / 2**20:.1f} MiB (a float32 [tokens, vocab] array is "
        f"{args.tokens * args.vocab * 4 / 2**20:.0f} MiB)\n")
  print("| path | time / dense | temporaries / dense | temporaries / f32 logits |")
  print("| --- | ---: | ---: | ---: |")
  rows = [(f"sparse_distill_loss tail={tail!r}",
           lambda x, i, lp, tail=tail: sparse_distill_loss(x, i, lp, tail=tail))
          for tail in TAILS]
  rows.append(("naive autodiff, tail='zero'", naive_zero))
  for name, fn in rows:
    seconds, temp = measure(fn, logits, ids, logprobs, repeats=args.repeats)
    print(f"| {name} | {seconds / dense_time:.2f} | {temp / dense_temp:.2f} | "
          f"{temp / (args.tokens * args.vocab * 4):.2f} |")


if __name__ == "__main__":
  main()
