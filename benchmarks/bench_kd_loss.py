"""Benchmark: value+grad of kdjax losses against same-process baselines.

Baselines, all run interleaved in this process on the same inputs:

* ``naive jnp``: the formula written with ``jax.nn.softmax``/``log_softmax`` and ``jnp.where``,
  differentiated by autodiff (what a user would write first);
* ``torch``: OpenRLHF's ``KDLoss`` formula in PyTorch, forward + backward, same CPU
  (``kd_loss`` only);
* ``stream``: a jitted op that reads both logits arrays once and writes one array of the same
  size -- the memory-traffic floor of any loss whose gradient has the logits' shape.

Prints markdown tables of median wall times, ratios and compiled temporary memory
(``memory_analysis().temp_size_in_bytes``, as a multiple of one logits array).

Usage: python benchmarks/bench_kd_loss.py [--quick] [--reps N] [--divergences]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# PyTorch's OpenMP threads spin for a while after each parallel region; interleaved with JAX,
# that spinning steals the CPU from whatever runs next. Let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kdjax  # noqa: E402


def _naive_per_token(divergence, logits, teacher_logits, *, beta=0.5, alpha=0.1):
  """Textbook autodiff versions: softmaxes as whole [tokens, vocab] float32 arrays."""
  s = logits.astype(jnp.float32)
  t = teacher_logits.astype(jnp.float32)
  log_q, log_p = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
  q, p = jnp.exp(log_q), jnp.exp(log_p)
  if divergence == "soft_cross_entropy":
    return -jnp.sum(jnp.where(jnp.isinf(s), 0.0, p * log_q), -1)
  if divergence == "forward_kl":
    return jnp.sum(p * (log_p - log_q), -1)
  if divergence == "reverse_kl":
    return jnp.sum(q * (log_q - log_p), -1)
  if divergence == "generalized_jsd":
    log_m = jnp.logaddexp(log_p + jnp.log(beta), log_q + jnp.log1p(-beta))
    return jnp.sum(beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m), -1)
  if divergence == "skew_forward_kl":
    log_m = jnp.log(alpha * p + (1 - alpha) * q)
    return jnp.sum(p * (log_p - log_m), -1)
  if divergence == "skew_reverse_kl":
    log_m = jnp.log(alpha * q + (1 - alpha) * p)
    return jnp.sum(q * (log_q - log_m), -1)
  if divergence == "total_variation":
    return 0.5 * jnp.sum(jnp.abs(p - q), -1)
  raise ValueError(divergence)


def naive_loss(divergence, logits, teacher_logits, labels):
  per_token = _naive_per_token(divergence, logits, jax.lax.stop_gradient(teacher_logits))
  mask = labels != -100
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.sum(mask)


def torch_kd_loss(logits, teacher_logits, labels):
  import torch
  import torch.nn.functional as F

  teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
  inf_mask = torch.isinf(logits)
  logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
  prod_probs = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
  x = torch.sum(prod_probs, dim=-1).view(-1)
  mask = (labels != -100).int()
  return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def _timer(fn):
  def run():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start
  return run


def _temp_ratio(jitted, args, logits_bytes):
  analysis = jitted.lower(*args).compile().memory_analysis()
  return analysis.temp_size_in_bytes / logits_bytes


def bench_case(tokens, vocab, dtype, divergences, reps, with_torch):
  rng = np.random.default_rng(0)
  logits_np = (rng.standard_normal((tokens, vocab), np.float32) * 2).astype(np.float32)
  teacher_np = (rng.standard_normal((tokens, vocab), np.float32) * 2).astype(np.float32)
  labels_np = rng.integers(0, vocab, tokens).astype(np.int32)
  labels_np[::7] = -100
  logits = jnp.asarray(logits_np, dtype)
  teacher = jnp.asarray(teacher_np, dtype)
  labels = jnp.asarray(labels_np)
  logits_bytes = logits.size * logits.dtype.itemsize

  stream = jax.jit(lambda a, b: a * b)
  runners = {"stream": _timer(lambda: stream(logits, teacher))}
  temps = {}
  for name in divergences:
    if name == "soft_cross_entropy":
      ours = jax.jit(jax.value_and_grad(kdjax.kd_loss))
    else:
      ours = jax.jit(jax.value_and_grad(
          lambda a, b, c, name=name: kdjax.distill_loss(a, b, c, divergence=name)))
    naive = jax.jit(jax.value_and_grad(lambda a, b, c, name=name: naive_loss(name, a, b, c)))
    runners[f"kdjax/{name}"] = _timer(lambda f=ours: f(logits, teacher, labels))
    runners[f"naive/{name}"] = _timer(lambda f=naive: f(logits, teacher, labels))
    temps[f"kdjax/{name}"] = _temp_ratio(ours, (logits, teacher, labels), logits_bytes)
    temps[f"naive/{name}"] = _temp_ratio(naive, (logits, teacher, labels), logits_bytes)

  if with_torch:
    import torch

    torch_dtype = torch.float32 if dtype == jnp.float32 else torch.bfloat16
    t_logits = torch.from_numpy(logits_np).to(torch_dtype).requires_grad_(True)
    t_teacher = torch.from_numpy(teacher_np).to(torch_dtype)
    t_labels = torch.from_numpy(labels_np.astype(np.int64))

    def torch_run():
      t_logits.grad = None
      loss = torch_kd_loss(t_logits, t_teacher, t_labels)
      loss.backward()
      return loss.detach()

    runners["torch/soft_cross_entropy"] = _timer(torch_run)

  for run in runners.values():  # Compile and warm up.
    run()
  times = {name: [] for name in runners}
  for _ in range(reps):  # Interleaved, so drifts in machine load hit every runner alike.
    for name, run in runners.items():
      times[name].append(run())
  return {name: statistics.median(ts) for name, ts in times.items()}, temps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="only (2048, 32000) float32")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--divergences", action="store_true",
                      help="every divergence (default: kd_loss only)")
  args = parser.parse_args()
  divergences = (
      sorted(kdjax.DIVERGENCES) if args.divergences else ["soft_cross_entropy"])
  cases = [(2048, 32000, jnp.float32)]
  if not args.quick:
    cases += [(2048, 32000, jnp.bfloat16), (8192, 32000, jnp.float32),
              (8192, 32000, jnp.bfloat16)]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{len(jax.devices())} device(s); median of {args.reps} interleaved runs\n")
  print("| tokens x vocab | dtype | loss | kdjax ms | / stream | / naive jnp | / torch "
        "| temp (x logits) kdjax | naive |")
  print("|---|---|---|---|---|---|---|---|---|")
  for tokens, vocab, dtype in cases:
    times, temps = bench_case(tokens, vocab, dtype, divergences, args.reps,
                              with_torch=not args.divergences)
    for name in divergences:
      ours = times[f"kdjax/{name}"]
      torch_time = times.get(f"torch/{name}")
      torch_ratio = f"{ours / torch_time:.2f}" if torch_time else "-"
      label = "kd_loss" if name == "soft_cross_entropy" else name
      print(f"| {tokens} x {vocab} | {jnp.dtype(dtype).name} | {label} | {ours * 1e3:.0f} "
            f"| {ours / times['stream']:.2f} | {ours / times[f'naive/{name}']:.2f} "
            f"| {torch_ratio} | {temps[f'kdjax/{name}']:.3f} | {temps[f'naive/{name}']:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
