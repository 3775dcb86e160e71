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

    python benchmarks/bench_fused.py                      # the docs table
    python benchmarks/bench_fused.py --sweep 128,256,512  # choose the default token_block
    python benchmarks/bench_fused.py --peers              # against Liger-Kernel and a scan

``--peers`` times the combined objective ``(1 - kd_coef) * CE + kd_coef * JSD(beta=0.5)``
(``kd_coef = 0.5``, temperature 1), value and gradient with respect to ``h_s`` and ``W_s``, at
one shape (default 2048 x 512 x 32000), against:

* ``materialised``: ``distill_with_cross_entropy`` on ``h_s @ W_s`` and ``h_t @ W_t``;
* ``scan``: the same loss over chunks of 128 tokens, ``lax.scan`` over the chunks with
  ``jax.checkpoint`` on each (the chunked approach of EasyDeL), differentiated by autodiff;
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss(weight_hard_loss=0.5,
  weight_soft_loss=0.5, beta=0.5, compiled=False)`` (its chunked forward computes the gradient
  too), PyTorch on the same CPU threads, when ``liger_kernel`` is importable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# PyTorch's OpenMP threads spin after each parallel region; interleaved with JAX that steals the
# CPU from whatever runs next. Let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kdjax  # noqa: E402
from kdjax._src import blocking  # noqa: E402


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


def _combined_fused(token_block=None, vocab_block=None):
  def run(h_s, w_s, h_t, w_t, labels):
    def loss(h_s, w_s):
      return kdjax.fused_linear_distill_with_cross_entropy(
          h_s, w_s, h_t, w_t, labels, kd_coef=0.5, divergence="generalized_jsd", beta=0.5,
          token_block=token_block, vocab_block=vocab_block)
    return jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)
  return run


def _combined_materialised(h_s, w_s, h_t, w_t, labels):
  def loss(h_s, w_s):
    return kdjax.distill_with_cross_entropy(
        h_s @ w_s, jax.lax.stop_gradient(h_t @ w_t), labels, kd_coef=0.5,
        divergence="generalized_jsd", beta=0.5)
  return jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)


def _combined_scan(chunk):
  """The chunked autodiff baseline: lax.scan over token chunks, jax.checkpoint per chunk."""
  def run(h_s, w_s, h_t, w_t, labels):
    tokens = h_s.shape[0]
    count = jnp.maximum(jnp.sum(labels != -100), 1)

    def loss(h_s, w_s):
      @jax.checkpoint
      def chunk_loss(w_s, h_chunk, t_chunk, y_chunk):
        return kdjax.distill_with_cross_entropy(
            h_chunk @ w_s, jax.lax.stop_gradient(t_chunk @ w_t), y_chunk, kd_coef=0.5,
            divergence="generalized_jsd", beta=0.5, reduction="sum",
            implementation="reference")

      def body(acc, xs):
        return acc + chunk_loss(w_s, *xs), None

      xs = (h_s.reshape(tokens // chunk, chunk, -1), h_t.reshape(tokens // chunk, chunk, -1),
            labels.reshape(tokens // chunk, chunk))
      total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
      return total / count
    return jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)
  return run


def _liger_runner(args):
  """Liger-Kernel's chunked fused-linear JSD (forward + backward), or None if not installed."""
  try:
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
  except ImportError:
    return None
  h_s, w_s, h_t, w_t, labels = (torch.from_numpy(np.asarray(x)) for x in args)
  h_s = h_s.clone().requires_grad_(True)
  weight = w_s.T.contiguous().requires_grad_(True)  # nn.Linear layout: [vocab, d]
  teacher_weight = w_t.T.contiguous()
  labels = labels.long()
  loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                    compiled=False)

  def run():
    h_s.grad = weight.grad = None
    loss = loss_fn(h_s, weight, h_t, teacher_weight, labels)
    loss.backward()
    return loss.detach()
  return run, loss_fn


def bench_peers(shape: str, repeats: int):
  tokens, d, vocab = (int(x) for x in shape.split("x"))
  args = _inputs(tokens, d, vocab)
  labels = jax.random.randint(jax.random.key(5), (tokens,), 0, vocab)
  args = (*args[:4], jnp.where(jnp.arange(tokens) % 7 == 0, -100, labels))
  variants = {"kdjax fused": _combined_fused(), "materialised": _combined_materialised,
              "scan (128-token chunks)": _combined_scan(128)}
  temps = {name: _temp_bytes(fn, args) for name, fn in variants.items()}
  compiled = {name: jax.jit(fn).lower(*args).compile() for name, fn in variants.items()}
  runners = {name: (lambda f=fn: jax.block_until_ready(f(*args))) for name, fn in compiled.items()}
  liger = _liger_runner(args)
  if liger is not None:
    runners["liger (torch, compiled=False)"] = liger[0]
  for run in runners.values():
    run()
  wall = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      start = time.perf_counter()
      run()
      wall[name].append(time.perf_counter() - start)
  times = {name: statistics.median(t) for name, t in wall.items()}
  value = float(compiled["kdjax fused"](*args)[0])
  checks = {name: abs(float(compiled[name](*args)[0]) - value) / abs(value)
            for name in ("materialised", "scan (128-token chunks)")}
  if liger is not None:
    checks["liger (torch, compiled=False)"] = abs(float(liger[0]()) - value) / abs(value)
  base = times["kdjax fused"]
  print(f"{tokens} x {d} x {vocab} float32, (1 - 0.5) CE + 0.5 JSD(beta 0.5), value+grad "
        f"(h_s, W_s), median of {repeats} interleaved runs\n")
  print("| variant | wall (s) | kdjax fused / this | temporaries (MiB) | loss rel. diff |")
  print("| --- | --- | --- | --- | --- |")
  for name, t in times.items():
    temp = f"{temps[name] / 2**20:.0f}" if name in temps else "-"
    diff = f"{checks[name]:.1e}" if name in checks else "-"
    print(f"| {name} | {t:.3f} | {base / t:.3f} | {temp} | {diff} |", flush=True)


def bench_combined(shapes: str, repeats: int):
  """fused_linear_distill_with_cross_entropy (forward KL, kd_coef 0.5) against
  distill_with_cross_entropy on the materialised logits."""
  print("| tokens x d x vocab | clock | materialised (s) | fused (s) | fused / materialised | "
        "materialised temp (MiB) | fused temp (MiB) | fused / materialised temp |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for shape in shapes.split(","):
    tokens, d, vocab = (int(x) for x in shape.split("x"))
    args = _inputs(tokens, d, vocab)
    labels = jax.random.randint(jax.random.key(5), (tokens,), 0, vocab)
    args = (*args[:4], jnp.where(jnp.arange(tokens) % 7 == 0, -100, labels))

    def fused(h_s, w_s, h_t, w_t, labels):
      return jax.value_and_grad(lambda h, w: kdjax.fused_linear_distill_with_cross_entropy(
          h, w, h_t, w_t, labels, kd_coef=0.5), argnums=(0, 1))(h_s, w_s)

    def materialised(h_s, w_s, h_t, w_t, labels):
      return jax.value_and_grad(lambda h, w: kdjax.distill_with_cross_entropy(
          h @ w, jax.lax.stop_gradient(h_t @ w_t), labels, kd_coef=0.5), argnums=(0, 1))(
              h_s, w_s)

    variants = {"materialised": materialised, "fused": fused}
    temps = {name: _temp_bytes(fn, args) for name, fn in variants.items()}
    times, cpu = _time(variants, args, repeats)
    for clock, t in (("wall", times), ("CPU", cpu)):
      print(f"| {tokens} x {d} x {vocab} | {clock} | {t['materialised']:.3f} | {t['fused']:.3f} | "
            f"{t['fused'] / t['materialised']:.3f} | {temps['materialised'] / 2**20:.0f} | "
            f"{temps['fused'] / 2**20:.0f} | {temps['fused'] / temps['materialised']:.3f} |",
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="4096x512x32000,2048x512x128000",
                      help="comma-separated TOKENSxDxVOCAB")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--token-block", type=int, default=None)
  parser.add_argument("--sweep", default=None,
                      help="comma-separated token blocks: time only the fused path")
  parser.add_argument("--peers", action="store_true",
                      help="the combined objective against Liger-Kernel and a chunked scan")
  parser.add_argument("--combined", action="store_true",
                      help="the fused (1 - kd_coef) CE + kd_coef KL against its materialised form")
  args_ns = parser.parse_args()
  if args_ns.peers:
    bench_peers(args_ns.shapes if "--shapes" in sys.argv else "2048x512x32000",
                args_ns.repeats)
    return
  if args_ns.combined:
    bench_combined(args_ns.shapes, args_ns.repeats)
    return

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
