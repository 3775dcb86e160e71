"""ULD (cross-tokenizer) vs distill_loss: time per token and compiled memory, as ratios.

For ``value_and_grad`` with respect to the student logits ``[tokens, V_s]``, prints the time per
token of ``kdjax.uld_loss`` (the full sort, and ``top_k`` variants) against a teacher of
``V_t`` ids, each divided by the time of ``kdjax.distill_loss`` (forward KL) at the same student
shape with a teacher of the student's vocabulary, measured in the same run; and XLA's temporary
buffers as a fraction of one float32 ``[tokens, V_s]`` array, including the reference
implementation's (autodiff of ``jnp.sort``, compiled but not run).

    python benchmarks/bench_uld.py [--tokens 2048] [--student-vocab 32000]
        [--teacher-vocab 50000] [--top-k 32,256,1024] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import kdjax


def compile_value_and_grad(fn, *args):
  compiled = jax.jit(jax.value_and_grad(fn)).lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


def seconds_per_call(compiled, *args, budget: float, repeats: int) -> float:
  """The median of up to ``repeats`` timed calls after one warm-up, within about ``budget``."""
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(max(1, min(repeats, int(budget / max(first, 1e-9))))):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--student-vocab", type=int, default=32000)
  parser.add_argument("--teacher-vocab", type=int, default=50000)
  parser.add_argument("--top-k", default="32,256,1024")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget", type=float, default=3.0,
                      help="seconds of timed calls per row (at least one call)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  key_s, key_t = jax.random.split(jax.random.PRNGKey(0))
  logits = (jax.random.normal(key_s, (args.tokens, args.student_vocab)) * 2).astype(dtype)
  wide_teacher = (jax.random.normal(key_t, (args.tokens, args.teacher_vocab)) * 3).astype(dtype)
  same_teacher = (jax.random.normal(key_t, (args.tokens, args.student_vocab)) * 3).astype(dtype)
  logits_bytes = args.tokens * args.student_vocab * 4
  timing = dict(budget=args.budget, repeats=args.repeats)

  compiled, base_temp = compile_value_and_grad(kdjax.distill_loss, logits, same_teacher)
  base = seconds_per_call(compiled, logits, same_teacher, **timing)
  print(f"{jax.devices()[0].platform} ({jax.device_count()} device): value_and_grad wrt "
        f"{args.dtype} student logits [{args.tokens}, {args.student_vocab}]; distill_loss "
        f"(forward KL, teacher [{args.tokens}, {args.student_vocab}]): {base * 1e3:.0f} ms, "
        f"{base / args.tokens * 1e6:.1f} us/token\n")
  print("| loss | teacher vocab | top_k | ms | us / token | time / distill_loss | "
        "temporaries (x f32 logits) |")
  print("|---|---|---|---|---|---|---|")
  print(f"| distill_loss | {args.student_vocab} | - | {base * 1e3:.0f} | "
        f"{base / args.tokens * 1e6:.1f} | 1.00 | {base_temp / logits_bytes:.3f} |")
  top_ks = [None] + [int(k) for k in args.top_k.split(",") if k]
  rows = [(args.student_vocab, same_teacher, None)]
  rows += [(args.teacher_vocab, wide_teacher, k) for k in top_ks]
  for vocab, teacher, k in rows:
    fn = lambda x, t, k=k: kdjax.uld_loss(x, t, top_k=k)  # noqa: E731
    compiled, temp = compile_value_and_grad(fn, logits, teacher)
    seconds = seconds_per_call(compiled, logits, teacher, **timing)
    print(f"| uld_loss | {vocab} | {k if k else 'all'} | {seconds * 1e3:.0f} | "
          f"{seconds / args.tokens * 1e6:.1f} | {seconds / base:.2f} | "
          f"{temp / logits_bytes:.3f} |", flush=True)
  reference = lambda x, t: kdjax.uld_loss(x, t, implementation="reference")  # noqa: E731
  _, temp = compile_value_and_grad(reference, logits, wide_teacher)
  print(f"| uld_loss, implementation=\"reference\" (compiled, not run) | {args.teacher_vocab} | "
        f"all | - | - | - | {temp / logits_bytes:.3f} |")


if __name__ == "__main__":
  main()
