"""Fused linear-head distillation vs. materialised logits: time and compiled temporaries.

For each ``(tokens, d, vocab)`` shape, in one process and interleaved (one run of each variant
per round, median over rounds), float32, forward KL, value and gradient with respect to the
student's hidden states and kernel:

* ``materialised``: ``distill_loss(h_s @ W_s, h_t @ W_t)`` under ``jax.value_and_grad``;
* ``fused``: ``fused_linear_distill_loss(h_s, W_s, h_t, W_t)`` under ``jax.value_and_grad``;
* ``4 matmuls``: four plain ``[tokens, d] x [d, vocab]`` products, the compute floor of
  either (two logit matmuls forward, two gradient matmuls backward).

Temporaries are ``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``.
Prints a markdown table of ratios. Usage::

    python benchmarks/bench_fused.py                      # the README table
    python benchmarks/bench_fused.py --sweep 128,256,512  # choose the default token_block
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import kdjax
from kdjax._src import blocking


def _inputs(tokens: int, d: int, vocab: int):
  keys = jax.random.split(jax.random.key(0), 4)
  scale = d ** -0.5
  return (jax.random.normal(keys[0], (tokens, d)),
          jax.random.normal(keys[1], (d, vocab)) * scale,
          jax.random.normal(keys[2], (tokens, d)),
          jax.random.normal(keys[3], (d, vocab)) * scale,
          jnp.zeros((tokens,), jnp.int32))


def _materialised(h_s, w_s, h_t, w_t, labels):
  def loss(h_s, w_s):
    return kdjax.distill_loss(h_s @ w_s, jax.lax.stop_gradient(h_t @ w_t), labels)
  return jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)


def _fused(token_block, vocab_block=None):
  def run(h_s, w_s, h_t, w_t, labels):
    def loss(h_s, w_s):
      return kdjax.fused_linear_distill_loss(
          h_s, w_s, h_t, w_t, labels, token_block=token_block, vocab_block=vocab_block)
    return jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)
  return run


def _four_matmuls(h_s, w_s, h_t, w_t, labels):
  del labels
  # Four products of the same shapes as the logits; summed so only scalars leave the call.
  return [jnp.sum(h @ w) for h, w in ((h_s, w_s), (h_t, w_t), (h_s + 1.0, w_s), (h_t + 1.0, w_t))]


def _temp_bytes(fn, args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _time(variants: dict, args, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
  """Median wall-clock and process CPU seconds (all threads) per variant.

  On a shared machine the wall clock also counts time spent waiting for other processes; the
  CPU time counts only the work done, so its ratios are the steadier of the two.
  """
  compiled = {name: jax.jit(fn).lower(*args).compile() for name, fn in variants.items()}
  for fn in compiled.values():  # warm up
    jax.block_until_ready(fn(*args))
  wall = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  for _ in range(repeats):
    for name, fn in compiled.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  median = lambda d: {name: statistics.median(t) for name, t in d.items()}  # noqa: E731
  return median(wall), median(cpu)


def _check(args, token_block):
  (value_m, grads_m) = jax.jit(_materialised)(*args)
  (value_f, grads_f) = jax.jit(_fused(token_block))(*args)
  errors = [abs(float(value_f - value_m)) / abs(float(value_m))]
  for gf, gm in zip(grads_f, grads_m, strict=True):
    errors.append(float(jnp.linalg.norm(gf - gm) / jnp.linalg.norm(gm)))
  return max(errors)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="4096x512x32000,2048x512x128000",
                      help="comma-separated TOKENSxDxVOCAB")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--token-block", type=int, default=None)
  parser.add_argument("--sweep", default=None,
                      help="comma-separated token blocks: time only the fused path")
  args_ns = parser.parse_args()

  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float32, forward KL, "
        f"value+grad (h_s, W_s), median of {args_ns.repeats} interleaved runs "
        "(wall clock and process CPU time of all threads)\n")
  for shape in args_ns.shapes.split(","):
    tokens, d, vocab = (int(x) for x in shape.split("x"))
    args = _inputs(tokens, d, vocab)
    if args_ns.sweep:
      blocks = [int(b) for b in args_ns.sweep.split(",")]
      variants = {f"fused token_block={b}": _fused(b) for b in blocks}
      variants["materialised"] = _materialised
      times, cpu = _time(variants, args, args_ns.repeats)
      print(f"| {tokens}x{d}x{vocab} | wall (s) | / materialised | CPU (s) | / materialised "
            "| temp MiB |")
      print("| --- | --- | --- | --- | --- | --- |")
      for name, t in times.items():
        temp = _temp_bytes(variants[name], args) / 2**20
        print(f"| {name} | {t:.3f} | {t / times['materialised']:.3f} | {cpu[name]:.3f} | "
              f"{cpu[name] / cpu['materialised']:.3f} | {temp:.0f} |")
      print()
      continue
    token_block = args_ns.token_block or blocking.token_block(tokens, vocab, blocking.FUSED)
    variants = {"materialised": _materialised, "fused": _fused(token_block),
                "4 matmuls": _four_matmuls}
    temps = {name: _temp_bytes(fn, args) for name, fn in variants.items()}
    times, cpu = _time(variants, args, args_ns.repeats)
    error = _check(args, token_block)
    print("| tokens x d x vocab | token_block | clock | materialised (s) | fused (s) | "
          "fused / materialised | fused / 4 matmuls | materialised temp (MiB) | "
          "fused temp (MiB) | fused / materialised temp | max rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clock, t in (("wall", times), ("CPU", cpu)):
      print(f"| {tokens} x {d} x {vocab} | {token_block} | {clock} | {t['materialised']:.3f} | "
            f"{t['fused']:.3f} | {t['fused'] / t['materialised']:.3f} | "
            f"{t['fused'] / t['4 matmuls']:.3f} | {temps['materialised'] / 2**20:.0f} | "
            f"{temps['fused'] / 2**20:.0f} | {temps['fused'] / temps['materialised']:.3f} | "
            f"{error:.1e} |")
    print(flush=True)


if __name__ == "__main__":
  main()
