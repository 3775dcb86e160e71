"""Benchmark on one GPU or TPU: the dense losses against the memory-bandwidth bound, and the
fused head against its matmuls.

Prints markdown tables:

* the measured copy bandwidth (an elementwise op that reads and writes a 2 GiB array): the
  roofline of a loss whose gradient has the logits' shape;
* value+grad of ``kd_loss`` and ``distill_loss(divergence=...)`` for ``forward_kl``,
  ``reverse_kl`` and ``generalized_jsd`` at (16384, 128256) bfloat16 and (8192, 32000) float32
  for ``implementation="reference"``, ``"blocked"`` and ``"pallas"``: median time, the achieved
  bandwidth counting the bound's bytes -- both logits read once and the gradient written once,
  ``6 N V`` bytes in bfloat16 -- and its fraction of the copy bandwidth; the compiled
  temporaries and the process's peak device memory;
* the fused head at (8192 tokens, hidden 4096, vocabulary 128256) bfloat16 against materialised
  logits (two matmuls, then ``distill_loss``) and against the four plain matmuls of its forward
  and backward passes;
* when ``liger_kernel`` and a CUDA device are there: Liger-Kernel's ``LigerJSD``,
  ``LigerKLDIVLoss`` and ``LigerFusedLinearJSD`` on the same inputs (PyTorch, in a process that
  made them with JAX and shares them through DLPack).

The logits are donated to each call, as in a train step where they die in the loss: the
gradient may take their buffer. Each group of measurements runs in a fresh process, so
``device.memory_stats()``'s peak belongs to it and an out-of-memory case is reported rather
than ending the run. The whole run takes a few minutes on one H100 or H200.

``--smoke`` runs tiny shapes on CPU, the kernels in Pallas interpret mode, in one process: a
check that the script runs (the test suite runs it), not a measurement.

Usage: python benchmarks/bench_accelerator.py [--smoke] [--reps N] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time

LOSSES = ("kd_loss", "forward_kl", "reverse_kl", "generalized_jsd")
IMPLEMENTATIONS = ("reference", "blocked", "pallas")
SIZES = {
    "full": dict(dense=[(16384, 128256, "bfloat16"), (8192, 32000, "float32")],
                 fused=(8192, 4096, 128256), copy_bytes=2 << 30),
    "smoke": dict(dense=[(24, 300, "bfloat16")], fused=(32, 16, 300), copy_bytes=1 << 20),
}
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------
# Workers: each measures a group of cases in its own process and prints one JSON line per case.
# ----------------------------------------------------------------------------------------------


def _emit(**result):
  print("RESULT " + json.dumps(result), flush=True)


def _median_seconds(fn, make_args, reps):
  """Median seconds of ``fn(*make_args())``; the arguments are made outside the timed part."""
  import jax

  jax.block_until_ready(fn(*make_args()))  # Compile and warm up.
  times = []
  for _ in range(reps):
    args = jax.block_until_ready(make_args())
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _peak_bytes():
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _temp_bytes(compiled):
  try:
    return getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
  except Exception:  # noqa: BLE001 -- not every backend reports it.
    return None


def _dense_inputs(tokens, vocab, dtype, seed=0):
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(seed), 3)
  logits = (2 * jax.random.normal(keys[0], (tokens, vocab), jnp.float32)).astype(dtype)
  teacher = (2 * jax.random.normal(keys[1], (tokens, vocab), jnp.float32)).astype(dtype)
  labels = jax.random.randint(keys[2], (tokens,), 0, vocab).at[::7].set(-100)
  return logits, teacher, labels


def _loss_fn(name, implementation):
  import kdjax

  if name == "kd_loss":
    return lambda x, t, y: kdjax.kd_loss(x, t, y, implementation=implementation)
  return lambda x, t, y: kdjax.distill_loss(x, t, y, divergence=name,
                                            implementation=implementation)


def _is_oom(error):
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def worker_copy(copy_bytes, reps):
  import jax
  import jax.numpy as jnp

  x = jnp.zeros((copy_bytes // 2,), jnp.bfloat16)
  add = jax.jit(lambda a: a + jnp.ones((), a.dtype))
  seconds = _median_seconds(add, lambda: (x,), reps)
  device = jax.devices()[0]
  _emit(kind="copy", bytes=2 * copy_bytes, seconds=seconds, jax=jax.__version__,
        device=f"{device.device_kind} ({device.platform})")


def worker_dense(tokens, vocab, dtype, implementation, reps):
  import jax
  import jax.numpy as jnp

  logits, teacher, labels = _dense_inputs(tokens, vocab, dtype)
  for name in LOSSES:
    jitted = jax.jit(jax.value_and_grad(_loss_fn(name, implementation)), donate_argnums=0)
    try:
      compiled = jitted.lower(logits, teacher, labels).compile()
      temp = _temp_bytes(compiled)
      seconds = _median_seconds(compiled, lambda: (jnp.copy(logits), teacher, labels), reps)
    except Exception as error:  # noqa: BLE001 -- reported in the table.
      if not _is_oom(error):
        raise
      _emit(kind="dense", shape=[tokens, vocab, dtype], loss=name,
            implementation=implementation, error="out of memory")
      continue
    _emit(kind="dense", shape=[tokens, vocab, dtype], loss=name, implementation=implementation,
          seconds=seconds, temp_bytes=temp, peak_bytes=_peak_bytes())


def _fused_inputs(tokens, hidden, vocab, seed=1):
  import jax
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(seed), 5)
  scale = hidden ** -0.5
  student_hidden, teacher_hidden = (
      jax.random.normal(k, (tokens, hidden), jnp.bfloat16) for k in keys[:2])
  student_kernel, teacher_kernel = (
      (scale * jax.random.normal(k, (hidden, vocab), jnp.float32)).astype(jnp.bfloat16)
      for k in keys[2:4])
  labels = jax.random.randint(keys[4], (tokens,), 0, vocab).at[::7].set(-100)
  return student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels


def worker_fused(variant, tokens, hidden, vocab, reps):
  import jax
  import jax.numpy as jnp

  import kdjax

  student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels = _fused_inputs(
      tokens, hidden, vocab)
  if variant == "matmuls":
    grad = jnp.ones((tokens, vocab), jnp.bfloat16)
    jitted = jax.jit(lambda hs, ws, ht, wt, g: (hs @ ws, ht @ wt, g @ ws.T, hs.T @ g))
    args = (student_hidden, student_kernel, teacher_hidden, teacher_kernel, grad)
  else:
    if variant == "fused":
      def loss(hs, ws, ht, wt, y):
        return kdjax.fused_linear_distill_loss(hs, ws, ht, wt, y, divergence="generalized_jsd")
    else:
      def loss(hs, ws, ht, wt, y):
        return kdjax.distill_loss(hs @ ws, ht @ wt, y, divergence="generalized_jsd")
    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = (student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels)
  try:
    compiled = jitted.lower(*args).compile()
    temp = _temp_bytes(compiled)
    seconds = _median_seconds(compiled, lambda: args, reps)
  except Exception as error:  # noqa: BLE001 -- reported in the table.
    if not _is_oom(error):
      raise
    _emit(kind="fused", variant=variant, error="out of memory")
    return
  _emit(kind="fused", variant=variant, seconds=seconds, temp_bytes=temp,
        peak_bytes=_peak_bytes())


def _backward(module, log_q, log_p):
  log_q.grad = None
  module(log_q, log_p).backward()


def worker_liger(sizes, reps):
  """Liger-Kernel on the inputs the JAX cases use, made with JAX and shared through DLPack."""
  import jax
  import torch
  from liger_kernel.transformers import LigerFusedLinearJSD, LigerJSD, LigerKLDIVLoss

  def timed(step):
    step()  # Compile (Triton) and warm up.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
      torch.cuda.synchronize()
      start = time.perf_counter()
      step()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated()

  def to_torch(x):
    return torch.from_dlpack(jax.block_until_ready(x))

  for tokens, vocab, dtype in sizes["dense"]:
    logits, teacher, _ = _dense_inputs(tokens, vocab, dtype)
    # Liger's losses take log-probabilities: the log-softmax is done here, not timed.
    log_q = torch.log_softmax(to_torch(logits).float(), -1).to(to_torch(logits).dtype)
    log_p = torch.log_softmax(to_torch(teacher).float(), -1).to(log_q.dtype)
    del logits, teacher
    log_q.requires_grad_(True)
    for name, module in (("LigerJSD", LigerJSD(beta=0.5)),
                         ("LigerKLDIVLoss", LigerKLDIVLoss(reduction="batchmean",
                                                           log_target=True))):
      try:
        seconds, peak = timed(functools.partial(_backward, module, log_q, log_p))
        _emit(kind="liger", name=name, shape=[tokens, vocab, dtype], seconds=seconds,
              peak_bytes=peak)
      except Exception as error:  # noqa: BLE001 -- reported in the table.
        _emit(kind="liger", name=name, shape=[tokens, vocab, dtype], error=str(error)[:60])
    del log_q, log_p
    torch.cuda.empty_cache()

  tokens, hidden, vocab = sizes["fused"]
  student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels = (
      to_torch(x) for x in _fused_inputs(tokens, hidden, vocab))
  student_hidden.requires_grad_(True)
  student_weight = student_kernel.t().contiguous().requires_grad_(True)  # Liger: [V, H].
  teacher_weight = teacher_kernel.t().contiguous()
  fused = LigerFusedLinearJSD(jsd_beta=0.5)

  def fused_step():
    student_hidden.grad = student_weight.grad = None
    fused(student_hidden, student_weight, teacher_hidden, teacher_weight,
          labels.long()).backward()

  try:
    seconds, peak = timed(fused_step)
    _emit(kind="liger", name="LigerFusedLinearJSD", shape=[tokens, hidden, vocab],
          seconds=seconds, peak_bytes=peak)
  except Exception as error:  # noqa: BLE001 -- reported in the table.
    _emit(kind="liger", name="LigerFusedLinearJSD", shape=[tokens, hidden, vocab],
          error=str(error)[:60])


def run_worker(groups, reps, sizes):
  for group in groups:
    kind, *args = group
    if kind == "copy":
      worker_copy(sizes["copy_bytes"], reps)
    elif kind == "dense":
      worker_dense(*args, reps)
    elif kind == "fused":
      worker_fused(args[0], *sizes["fused"], reps)
    elif kind == "liger":
      worker_liger(sizes, reps)


# ----------------------------------------------------------------------------------------------
# The parent: runs the workers and prints the tables.
# ----------------------------------------------------------------------------------------------


def _liger_available() -> bool:
  try:
    import liger_kernel  # noqa: F401
    import torch
  except ImportError:
    return False
  return torch.cuda.is_available()


def _spawn(groups, args, env):
  command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(groups),
             "--reps", str(args.reps)] + (["--smoke"] if args.smoke else [])
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
             if line.startswith("RESULT ")]
  if done.returncode:
    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
    results.append(dict(kind="failed", groups=groups, error=tail[:200]))
  return results


def _gib(value):
  return "n/a" if value is None else f"{value / GIB:.2f}"


def _bound_bytes(tokens, vocab, dtype):
  itemsize = 2 if dtype in ("bfloat16", "float16") else 4
  return 3 * tokens * vocab * itemsize  # Two logits read, the gradient written.


def print_tables(results, elapsed, smoke):
  copy = next((r for r in results if r["kind"] == "copy"), None)
  device, version = (copy["device"], copy["jax"]) if copy else ("?", "?")
  print(f"## kdjax on {device}, jax {version}, {datetime.date.today().isoformat()}")
  print()
  if smoke:
    print("Smoke run (tiny shapes, CPU, kernels in interpret mode): not a measurement.")
    print()
  copy_rate = copy["bytes"] / copy["seconds"] if copy else None
  if copy_rate:
    print(f"Copy bandwidth (read + write of {copy['bytes'] // 2 / GIB:.3g} GiB): "
          f"{copy_rate / 1e9:.3g} GB/s.")
    print()
  print("Value+grad, logits donated. Bound: both logits read and the gradient written once "
        "(6·N·V bytes in bfloat16, 12·N·V in float32); temp: compiled temporaries; peak: the "
        "process's peak device memory over its four losses (inputs included).")
  print()
  print("| tokens × vocab | dtype | loss | implementation | ms | GB/s of the bound | "
        "fraction of copy | temp GiB | peak GiB |")
  print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for r in results:
    if r["kind"] != "dense":
      continue
    tokens, vocab, dtype = r["shape"]
    head = f"| {tokens} × {vocab} | {dtype} | {r['loss']} | {r['implementation']} |"
    if "error" in r:
      print(f"{head} {r['error']} | | | | |")
      continue
    rate = _bound_bytes(tokens, vocab, dtype) / r["seconds"]
    fraction = f"{rate / copy_rate:.2f}" if copy_rate else "n/a"
    print(f"{head} {r['seconds'] * 1e3:.3g} | {rate / 1e9:.3g} | {fraction} | "
          f"{_gib(r.get('temp_bytes'))} | {_gib(r.get('peak_bytes'))} |")
  print()
  fused = {r["variant"]: r for r in results if r["kind"] == "fused"}
  if fused:
    matmuls = fused.get("matmuls", {}).get("seconds")
    materialised_peak = fused.get("materialised", {}).get("peak_bytes")
    print("Fused head, value+grad with respect to the student's hidden states and kernel "
          "(generalized_jsd), against materialised logits and the four plain matmuls of its "
          "forward and backward passes.")
    print()
    print("| variant | ms | vs four matmuls | temp GiB | peak GiB | peak vs materialised |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("fused", "materialised", "matmuls"):
      r = fused.get(name)
      if r is None:
        continue
      if "error" in r:
        print(f"| {name} | {r['error']} | | | | |")
        continue
      ratio = f"{r['seconds'] / matmuls:.2f}" if matmuls else "n/a"
      peak_ratio = (f"{r['peak_bytes'] / materialised_peak:.2f}"
                    if r.get("peak_bytes") and materialised_peak else "n/a")
      print(f"| {name} | {r['seconds'] * 1e3:.2f} | {ratio} | {_gib(r.get('temp_bytes'))} | "
            f"{_gib(r.get('peak_bytes'))} | {peak_ratio} |")
    print()
  liger = [r for r in results if r["kind"] == "liger"]
  if liger:
    pallas = {(tuple(r["shape"]), r["loss"]): r.get("seconds") for r in results
              if r["kind"] == "dense" and r["implementation"] == "pallas"}
    ours = {"LigerJSD": "generalized_jsd", "LigerKLDIVLoss": "forward_kl"}
    print("Liger-Kernel, forward + backward on the same inputs (its losses take "
          "log-probabilities: the log-softmax is not timed).")
    print()
    print("| Liger | shape | ms | peak GiB | kdjax pallas ms | Liger / kdjax |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    fused_seconds = fused.get("fused", {}).get("seconds")
    for r in liger:
      shape = " × ".join(str(s) for s in r["shape"])
      if "error" in r:
        print(f"| {r['name']} | {shape} | {r['error']} | | | |")
        continue
      mine = (fused_seconds if r["name"] == "LigerFusedLinearJSD"
              else pallas.get((tuple(r["shape"]), ours[r["name"]])))
      speedup = f"{r['seconds'] / mine:.2f}" if mine else "n/a"
      mine_ms = f"{mine * 1e3:.2f}" if mine else "n/a"
      print(f"| {r['name']} | {shape} | {r['seconds'] * 1e3:.2f} | {_gib(r['peak_bytes'])} | "
            f"{mine_ms} | {speedup} |")
    print()
  for r in results:
    if r["kind"] in ("failed", "skipped"):
      print(f"- {r['kind']}: {r['groups']}: {r.get('error', '')}")
  print(f"Total {elapsed:.0f} s.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes on CPU, kernels in interpret mode (checks the script)")
  parser.add_argument("--reps", type=int, default=None, help="timed calls per case")
  parser.add_argument("--budget", type=float, default=330.0,
                      help="seconds after which the remaining groups are skipped")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.reps = args.reps or (2 if args.smoke else 10)
  sizes = SIZES["smoke" if args.smoke else "full"]
  if args.worker:
    run_worker(json.loads(args.worker), args.reps, sizes)
    return

  env = dict(os.environ)
  # Allocate on demand: the peak is what the case used, and PyTorch can share the device.
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  groups = [["copy"]]
  groups += [["dense", *shape, implementation] for shape in sizes["dense"]
             for implementation in IMPLEMENTATIONS]
  groups += [["fused", variant] for variant in ("fused", "materialised", "matmuls")]
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
    batches = [groups]  # One process: a check of the script, not of memory.
  else:
    batches = [[group] for group in groups]
    if _liger_available():
      batches.append([["liger"]])
  start = time.perf_counter()
  results = []
  for batch in batches:
    if time.perf_counter() - start > args.budget:
      results.append(dict(kind="skipped", groups=batch, error="time budget"))
      continue
    results += _spawn(batch, args, env)
  print_tables(results, time.perf_counter() - start, args.smoke)


if __name__ == "__main__":
  main()
