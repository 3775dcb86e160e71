"""What the sharded losses communicate, hold and cost per device, on 8 forced CPU devices.

    python benchmarks/bench_sharded.py [--reps 3]

For each loss -- under plain ``jax.jit`` with the tokens sharded over ``data`` and the
vocabulary (logits, kernels) over ``model`` (GSPMD), and ``vocab_parallel_distill_loss`` under
``shard_map`` -- and each mesh ``(data, model)``, ``jax.value_and_grad`` is compiled and run, and
the table gives: the bytes one device sends into each kind of collective per step (a collective
inside the token loop counts once per iteration), the temporaries per device as a ratio of the
single-device program's, and the wall time as a ratio of the single-device run's. The eight
devices share this machine's cores, so the time column measures the partitioned program's
overhead, not a speed-up.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kdjax  # noqa: E402

TOKENS, D, VOCAB, K = 2048, 128, 16384, 32
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "pred": 1, "u32": 4}
KWARGS = dict(divergence="generalized_jsd", beta=0.5, temperature=2.0)


def collective_bytes(hlo_text):
  """``{collective kind: bytes one device sends per step}`` of a compiled program.

  A collective inside a while loop (the token-block loop) counts once per iteration.
  """
  trips = {}
  for line in hlo_text.splitlines():
    body = re.search(r"body=(%[\w.\-]+)", line)
    count = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
    if body and count:
      trips[body.group(1)] = int(count.group(1))
  sent, computation = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
    if header:
      computation = header.group(1)
    match = re.search(
        r"=\s*(.*?)\s(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
        r"(?:-start)?\(", line)
    if not match:
      continue
    groups = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
    if groups and all(len(g.split(",")) <= 1 for g in re.findall(r"\{([\d,]*)\}", groups[1])):
      continue  # single-device groups move nothing.
    for dtype, dims in re.findall(r"([a-z]\w*)\[([\d,]*)\]", match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d]))
      sent[match.group(2)] = (sent.get(match.group(2), 0)
                              + BYTES.get(dtype, 4) * size * trips.get(computation, 1))
  return sent


def _data():
  keys = jax.random.split(jax.random.key(0), 5)
  hidden = jax.random.normal(keys[0], (TOKENS, D), jnp.bfloat16)
  kernel = (jax.random.normal(keys[1], (D, VOCAB)) / D ** 0.5).astype(jnp.bfloat16)
  teacher_hidden = jax.random.normal(keys[2], (TOKENS, D), jnp.bfloat16)
  teacher_kernel = (jax.random.normal(keys[3], (D, VOCAB)) / D ** 0.5).astype(jnp.bfloat16)
  labels = jnp.where(jnp.arange(TOKENS) % 9 == 0, -100,
                     jax.random.randint(keys[4], (TOKENS,), 0, VOCAB))
  logits, teacher = hidden @ kernel, teacher_hidden @ teacher_kernel
  ids, logprobs = kdjax.topk_teacher(teacher, K)
  return dict(hidden=hidden, kernel=kernel, teacher_hidden=teacher_hidden,
              teacher_kernel=teacher_kernel, labels=labels, logits=logits, teacher=teacher,
              ids=ids, logprobs=logprobs)


# (name, loss, its array arguments, what each argument is split over)
CASES = [
    ("GSPMD distill_loss", lambda s, t, y: kdjax.distill_loss(s, t, y, **KWARGS),
     ("logits", "teacher", "labels"), ("vocab", "vocab", "tokens")),
    ("GSPMD distill_with_cross_entropy",
     lambda s, t, y: kdjax.distill_with_cross_entropy(s, t, y, kd_coef=0.5, **KWARGS),
     ("logits", "teacher", "labels"), ("vocab", "vocab", "tokens")),
    ("GSPMD fused_linear_distill_loss",
     lambda h, w, ht, wt, y: kdjax.fused_linear_distill_loss(h, w, ht, wt, y, **KWARGS),
     ("hidden", "kernel", "teacher_hidden", "teacher_kernel", "labels"),
     ("tokens", "kernel", "tokens", "kernel", "tokens")),
    ("GSPMD fused_linear_distill_with_cross_entropy",
     lambda h, w, ht, wt, y: kdjax.fused_linear_distill_with_cross_entropy(
         h, w, ht, wt, y, kd_coef=0.5, **KWARGS),
     ("hidden", "kernel", "teacher_hidden", "teacher_kernel", "labels"),
     ("tokens", "kernel", "tokens", "kernel", "tokens")),
    ("GSPMD sparse_distill_loss (k=32, bucket)",
     lambda s, i, p, y: kdjax.sparse_distill_loss(s, i, p, y, tail="bucket", **KWARGS),
     ("logits", "ids", "logprobs", "labels"), ("vocab", "tokens", "tokens", "tokens")),
]


def _shardings(mesh, kinds):
  specs = {"tokens": P("data"), "vocab": P("data", "model"), "kernel": P(None, "model")}
  return [NamedSharding(mesh, specs[kind]) for kind in kinds]


def _time(fn, args, reps):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=3)
  args_ns = parser.parse_args()
  data = _data()
  print(f"{TOKENS} tokens, d {D}, vocab {VOCAB}, bfloat16, {KWARGS}; jax {jax.__version__}, "
        f"{jax.device_count()} CPU devices; median of {args_ns.reps} runs\n")
  print("| loss | mesh (data, model) | all-reduce B/device | all-gather B/device | "
        "other collectives | temporaries / 1 device | time / 1 device |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name, loss, names, kinds in CASES + [("shard_map vocab_parallel_distill_loss", None,
                                            ("logits", "teacher", "labels"),
                                            ("vocab", "vocab", "tokens"))]:
    argnums = (0, 1) if len(names) == 5 else 0
    args = [data[n] for n in names]
    if loss is not None:
      fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
      single = fn.lower(*args).compile()
      single_temp = single.memory_analysis().temp_size_in_bytes
      single_time = _time(single, args, args_ns.reps)
    for mesh_shape in MESHES:
      mesh = jax.make_mesh(mesh_shape, ("data", "model"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
      if loss is None:  # the shard_map path: compared with GSPMD distill_loss's single device
        sharded = jax.shard_map(
            functools.partial(kdjax.vocab_parallel_distill_loss, axis_name="model",
                              data_axis_name="data", **KWARGS),
            mesh=mesh, in_specs=(P("data", "model"),) * 2 + (P("data"),), out_specs=P())
        fn = jax.jit(jax.value_and_grad(sharded))
        if mesh_shape == MESHES[0]:
          base = jax.jit(jax.value_and_grad(CASES[0][1])).lower(*args).compile()
          single_temp = base.memory_analysis().temp_size_in_bytes
          single_time = _time(base, args, args_ns.reps)
      placed = [jax.device_put(x, s) for x, s in zip(args, _shardings(mesh, kinds),
                                                      strict=True)]
      compiled = fn.lower(*placed).compile()
      sent = collective_bytes(compiled.as_text())
      others = ", ".join(f"{k} {v:,}" for k, v in sorted(sent.items())
                         if k not in ("all-reduce", "all-gather")) or "-"
      temp = compiled.memory_analysis().temp_size_in_bytes
      print(f"| {name} | {mesh_shape} | {sent.get('all-reduce', 0):,} | "
            f"{sent.get('all-gather', 0):,} | {others} | {temp / single_temp:.3f} | "
            f"{_time(compiled, placed, args_ns.reps) / single_time:.2f} |", flush=True)


if __name__ == "__main__":
  main()
