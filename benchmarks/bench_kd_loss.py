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

Usage: python benchmarks/bench_kd_loss.py [--quick] [--reps N]
       [--divergences | --train-step | --floor | --small]
"""

from __future__ import annotations

import argparse
import functools
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


def _interleaved_medians(runners, reps):
  """Median seconds of each runner, after one warm-up call each."""
  for run in runners.values():  # Compile and warm up.
    run()
  times = {name: [] for name in runners}
  for _ in range(reps):  # Interleaved, so drifts in machine load hit every runner alike.
    for name, run in runners.items():
      times[name].append(run())
  return {name: statistics.median(ts) for name, ts in times.items()}


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

  return _interleaved_medians(runners, reps), temps


def bench_train_step(tokens, vocab, width, reps):
  """``logits = hidden @ kernel`` inside the jitted step; value and gradient w.r.t. the kernel.

  Here the logits are dead after the loss, so kdjax writes their gradient over them. Baselines:
  naive autodiff of the same loss, and ``linear``: the step with ``sum(logits * teacher)`` as
  its loss (the two matmuls and one pass over the logits, the floor of any such step).
  """
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.standard_normal((tokens, width), np.float32))
  kernel = jnp.asarray(rng.standard_normal((width, vocab), np.float32) / np.sqrt(width))
  teacher = jnp.asarray(rng.standard_normal((tokens, vocab), np.float32) * 2)
  labels_np = rng.integers(0, vocab, tokens).astype(np.int32)
  labels_np[::7] = -100
  labels = jnp.asarray(labels_np)
  losses = {
      "kdjax": lambda k, h, t, y: kdjax.kd_loss(h @ k, t, y),
      "naive": lambda k, h, t, y: naive_loss("soft_cross_entropy", h @ k, t, y),
      "linear": lambda k, h, t, y: jnp.sum((h @ k) * t),
  }
  args = (kernel, hidden, teacher, labels)
  steps = {name: jax.jit(jax.value_and_grad(fn)) for name, fn in losses.items()}
  logits_bytes = tokens * vocab * 4
  temps = {name: _temp_ratio(step, args, logits_bytes) for name, step in steps.items()}
  runners = {name: _timer(lambda s=step: s(*args)) for name, step in steps.items()}
  times = _interleaved_medians(runners, reps)
  print(f"| {tokens} x {width} x {vocab} | {times['kdjax'] * 1e3:.0f} "
        f"| {times['kdjax'] / times['linear']:.2f} | {times['kdjax'] / times['naive']:.2f} "
        f"| {temps['kdjax']:.2f} | {temps['naive']:.2f} | {temps['linear']:.2f} |", flush=True)


def _minimal_kd_loss(logits, teacher_logits, labels, block=8):
  """The least work any blocked kd_loss can do on XLA:CPU -- a floor, not a usable loss.

  OpenRLHF's formula with its gradient written by hand for float32 inputs without ``-inf``
  (no masks, no empty-row handling, one block size that must divide the token count): five
  row reductions and two ``exp`` per entry, the gradient written in the same pass.
  """
  mask = (labels != -100).astype(jnp.float32)
  weights = mask / jnp.maximum(jnp.sum(mask), 1.0)

  def block_fn(s, t, w):
    s_max, t_max = jnp.max(s, -1), jnp.max(t, -1)
    shifted = s - s_max[:, None]
    s_exp, t_exp = jnp.exp(shifted), jnp.exp(t - t_max[:, None])
    s_sum, t_sum = jnp.sum(s_exp, -1), jnp.sum(t_exp, -1)
    value = jnp.log(s_sum) - jnp.sum(t_exp * shifted, -1) / t_sum
    grad = (s_exp / s_sum[:, None] - t_exp / t_sum[:, None]) * w[:, None]
    return value, grad

  def fwd(s):
    def body(i, carry):
      values, grad = carry
      value, g = block_fn(*(jax.lax.dynamic_slice_in_dim(x, i * block, block)
                            for x in (s, teacher_logits, weights)))
      return (jax.lax.dynamic_update_slice_in_dim(values, value, i * block, 0),
              jax.lax.dynamic_update_slice_in_dim(grad, g, i * block, 0))

    values, grad = jax.lax.fori_loop(
        0, s.shape[0] // block, body, (jnp.zeros(s.shape[:1]), jnp.zeros_like(s)))
    return jnp.sum(values * weights), grad

  loss = jax.custom_vjp(lambda s: fwd(s)[0])
  loss.defvjp(fwd, lambda grad, ct: (grad * ct,))
  return loss(logits)


def bench_floor(tokens, vocab, reps):
  """Where the time of a value-and-gradient over two [tokens, vocab] arrays goes on XLA:CPU."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((tokens, vocab), np.float32) * 2)
  teacher = jnp.asarray(rng.standard_normal((tokens, vocab), np.float32) * 2)
  labels_np = rng.integers(0, vocab, tokens).astype(np.int32)
  labels_np[::7] = -100
  labels = jnp.asarray(labels_np)
  fns = {
      "stream (a * b)": jax.jit(lambda a, b, c: a * b),
      "fresh zeros [tokens, vocab]": jax.jit(lambda a, b, c: jnp.zeros_like(a)),
      "read both (row sums)": jax.jit(lambda a, b, c: jnp.sum(a, -1) + jnp.sum(b, -1)),
      "exp-sum of both": jax.jit(lambda a, b, c: jnp.sum(jnp.exp(a), -1) + jnp.sum(jnp.exp(b), -1)),
      "minimal blocked kd (floor)": jax.jit(jax.value_and_grad(_minimal_kd_loss)),
      "kdjax.kd_loss": jax.jit(jax.value_and_grad(kdjax.kd_loss)),
  }
  # The floor computes the same loss and gradient on these inputs (no -inf).
  floor_value, floor_grad = fns["minimal blocked kd (floor)"](logits, teacher, labels)
  value, grad = fns["kdjax.kd_loss"](logits, teacher, labels)
  np.testing.assert_allclose(floor_value, value, rtol=1e-5)
  np.testing.assert_allclose(floor_grad, grad, rtol=1e-4, atol=1e-9)
  del floor_grad, grad
  runners = {name: _timer(lambda f=f: f(logits, teacher, labels)) for name, f in fns.items()}
  times = _interleaved_medians(runners, reps)
  print(f"| {tokens} x {vocab} float32 | ms | / stream |")
  print("|---|---|---|")
  for name, t in times.items():
    print(f"| {name} | {t * 1e3:.0f} | {t / times['stream (a * b)']:.2f} |")


SMALL_CASES = [(8, 128), (16, 1000), (64, 4096), (256, 4096), (1024, 8192), (512, 32000),
               (2048, 32000)]


def bench_small(reps):
  """implementation="blocked" against "reference" and plain jnp autodiff, small to large: what
  the default implementation (None) picks is the fastest at every size."""
  print("| tokens x vocab | blocked ms | reference ms | naive jnp ms | blocked / reference "
        "| blocked / naive |")
  print("|---|---|---|---|---|---|")
  for tokens, vocab in SMALL_CASES:
    rng = np.random.default_rng(0)
    logits, teacher = (jnp.asarray(rng.standard_normal((tokens, vocab)), jnp.float32)
                       for _ in range(2))
    labels = jnp.asarray(rng.integers(0, vocab, tokens), jnp.int32)
    losses = {implementation: functools.partial(kdjax.kd_loss, implementation=implementation)
              for implementation in ("blocked", "reference")}
    losses["naive"] = functools.partial(naive_loss, "soft_cross_entropy")
    runners = {name: _timer(functools.partial(jax.jit(jax.value_and_grad(loss)), logits, teacher,
                                              labels))
               for name, loss in losses.items()}
    times = _interleaved_medians(runners, reps)
    print(f"| {tokens} x {vocab} | {times['blocked'] * 1e3:.3f} "
          f"| {times['reference'] * 1e3:.3f} | {times['naive'] * 1e3:.3f} "
          f"| {times['blocked'] / times['reference']:.2f} "
          f"| {times['blocked'] / times['naive']:.2f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="only (2048, 32000) float32")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--divergences", action="store_true",
                      help="every divergence (default: kd_loss only)")
  parser.add_argument("--train-step", action="store_true",
                      help="kd_loss inside a step that computes the logits (hidden @ kernel)")
  parser.add_argument("--floor", action="store_true",
                      help="what the streaming op and a minimal blocked loss cost on this machine")
  parser.add_argument("--small", action="store_true",
                      help="the implementations from 8 x 128 to 2048 x 32000 (kd_loss)")
  args = parser.parse_args()
  if args.small:
    bench_small(args.reps)
    return
  if args.floor:
    bench_floor(2048, 32000, args.reps)
    return
  if args.train_step:
    print("| tokens x width x vocab | kdjax ms | / linear | / naive jnp "
          "| temp (x logits) kdjax | naive | linear |")
    print("|---|---|---|---|---|---|---|")
    bench_train_step(2048, 32000, 256, args.reps)
    return
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
