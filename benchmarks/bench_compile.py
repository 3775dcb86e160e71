"""Benchmark: the time to trace and to compile a jitted value-and-grad step, against plain code.

What a user pays per new shape (each bucketed sequence length, each new batch size) before the
first step runs: ``jax.jit(jax.value_and_grad(loss)).trace(...)`` (Python tracing, kdjax's
validation, its ``custom_vjp``, the engine's loops), then ``.lower().compile()`` (XLA). The step
takes the teacher's logits as arguments, as a training step does. Baselines, in this process,
interleaved with kdjax on the same shapes:

* ``kd_loss``: ``kdjax.kd_loss`` against the plain ``jax.nn`` formula, ``-(softmax(t) *
  log_softmax(s)).sum(-1)``, masked mean over the labels that are not -100, differentiated by
  autodiff;
* ``fused head``: ``kdjax.fused_linear_distill_loss(..., divergence="soft_cross_entropy")``
  against ``h @ w`` for both models, then the same plain formula (gradients for the student's
  hidden states and kernel).

JAX's caches are cleared before every measurement (``jax.clear_caches()``) and every step is a new
function, so each row is the cost of a shape seen for the first time. Prints a markdown table of
median times and kdjax / plain ratios.

Usage: python benchmarks/bench_compile.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import kdjax

SHAPES = ((256, 128), (1024, 8192), (1024, 32000))  # tokens x vocab
HIDDEN = 256  # the fused head's hidden width


def plain_kd_loss(logits, teacher_logits, labels):
  per_token = -jnp.sum(jax.nn.softmax(teacher_logits, -1) * jax.nn.log_softmax(logits, -1), -1)
  mask = labels != -100
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def kdjax_kd_loss(logits, teacher_logits, labels):
  return kdjax.kd_loss(logits, teacher_logits, labels)


def plain_fused(student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels):
  return plain_kd_loss(student_hidden @ student_kernel, teacher_hidden @ teacher_kernel, labels)


def kdjax_fused(student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels):
  return kdjax.fused_linear_distill_loss(student_hidden, student_kernel, teacher_hidden,
                                         teacher_kernel, labels, divergence="soft_cross_entropy")


CASES = {  # name: (kdjax, plain, argnums differentiated, argument shapes for tokens x vocab)
    "kd_loss": (kdjax_kd_loss, plain_kd_loss, 0,
                lambda n, v: ((n, v), (n, v), (n,))),
    "fused head": (kdjax_fused, plain_fused, (0, 1),
                   lambda n, v: ((n, HIDDEN), (HIDDEN, v), (n, HIDDEN), (HIDDEN, v), (n,))),
}


def measure(loss, argnums, shapes) -> tuple[float, float]:
  """Seconds to trace, and to trace, lower and compile, a new jitted value-and-grad step."""
  args = [jax.ShapeDtypeStruct(s, jnp.int32 if len(s) == 1 else jnp.float32) for s in shapes]
  jax.clear_caches()
  step = jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=argnums))
  start = time.perf_counter()
  traced = step.trace(*args)
  traced_at = time.perf_counter()
  traced.lower().compile()
  return traced_at - start, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="the smallest shape only, one repetition (checks the script runs)")
  parser.add_argument("--reps", type=int, default=5, help="repetitions per row (median)")
  args = parser.parse_args()
  shapes = SHAPES[:1] if args.quick else SHAPES
  reps = 1 if args.quick else args.reps
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; median of {reps}; seconds\n")
  print("| step | tokens x vocab | trace: kdjax | plain | ratio | trace + compile: kdjax | plain "
        "| ratio |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, (kdjax_loss, plain_loss, argnums, arg_shapes) in CASES.items():
    for tokens, vocab in shapes:
      times = {"kdjax": [], "plain": []}
      measure(plain_loss, argnums, arg_shapes(tokens, vocab))  # warm up JAX itself
      for _ in range(reps):
        for side, loss in (("kdjax", kdjax_loss), ("plain", plain_loss)):
          times[side].append(measure(loss, argnums, arg_shapes(tokens, vocab)))
      trace = {side: statistics.median(t for t, _ in ts) for side, ts in times.items()}
      total = {side: statistics.median(c for _, c in ts) for side, ts in times.items()}
      print(f"| {name} | {tokens} x {vocab} | {trace['kdjax']:.3f} | {trace['plain']:.3f} | "
            f"{trace['kdjax'] / trace['plain']:.2f}x | {total['kdjax']:.2f} | "
            f"{total['plain']:.2f} | {total['kdjax'] / total['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
