"""What the sharded losses communicate and hold per device, read from the compiled programs.

    python benchmarks/bench_sharded.py

Compiles (does not run) ``jax.value_and_grad`` of ``kdjax.distill_loss`` under GSPMD and of
``vocab_parallel_distill_loss`` under ``shard_map`` on 8 forced CPU devices, and prints per
mesh: the bytes each device sends into collectives per step, as a ratio of its share of the
student logits, whether anything is gathered, and the temporary memory per device as a ratio
of the single-device program's. Sizes: [8, 512] tokens, a 32768 vocabulary, bfloat16 logits.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kdjax  # noqa: E402
from kdjax._src.sharded import vocab_parallel_distill_loss  # noqa: E402

BATCH, SEQ, VOCAB = 8, 512, 32768
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "pred": 1}
KWARGS = dict(divergence="generalized_jsd", beta=0.5, temperature=2.0)


def collective_bytes(hlo_text):
  """(bytes into communicating collectives, set of collective kinds) of one device's program.

  A collective inside a while loop (the token-block loop) counts once per iteration.
  """
  trips = {}
  for line in hlo_text.splitlines():
    body = re.search(r"body=(%[\w.\-]+)", line)
    count = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
    if body and count:
      trips[body.group(1)] = int(count.group(1))
  total, kinds, computation = 0, set(), None
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
    kinds.add(match.group(2))
    for dtype, dims in re.findall(r"([a-z]\w*)\[([\d,]*)\]", match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d]))
      total += BYTES.get(dtype, 4) * size * trips.get(computation, 1)
  return total, kinds


def main():
  shape = jax.ShapeDtypeStruct((BATCH, SEQ, VOCAB), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
  loss = lambda s, t, y: kdjax.distill_loss(s, t, y, **KWARGS)  # noqa: E731
  single = jax.jit(jax.value_and_grad(loss)).lower(shape, shape, labels).compile()
  single_temp = single.memory_analysis().temp_size_in_bytes
  logits_bytes = BATCH * SEQ * VOCAB * 2
  print(f"tokens {BATCH}x{SEQ}, vocab {VOCAB}, bf16 logits {logits_bytes / 2**20:.0f} MiB; "
        f"single-device temporaries {single_temp / 2**20:.1f} MiB")
  print("| path | mesh (data, model) | sent per device per step (/ its logits shard) | gathers | "
        "temporaries per device / single device |")
  print("| --- | --- | --- | --- | --- |")
  for mesh_shape in MESHES:
    mesh = jax.make_mesh(mesh_shape, ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    vocab = NamedSharding(mesh, P("data", None, "model"))
    tokens = NamedSharding(mesh, P("data", None))
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            for x, s in ((shape, vocab), (shape, vocab), (labels, tokens))]
    shard_map_loss = jax.shard_map(
        lambda s, t, y: vocab_parallel_distill_loss(
            s, t, y, axis_name="model", data_axis_name="data", **KWARGS),
        mesh=mesh, in_specs=(P("data", None, "model"),) * 2 + (P("data", None),),
        out_specs=P())
    for name, fn in (("GSPMD distill_loss", loss), ("shard_map vocab_parallel", shard_map_loss)):
      compiled = jax.jit(jax.value_and_grad(fn)).lower(*args).compile()
      sent, kinds = collective_bytes(compiled.as_text())
      temp = compiled.memory_analysis().temp_size_in_bytes
      share = logits_bytes / 8
      gathers = ", ".join(sorted(k for k in kinds if k != "all-reduce")) or "none"
      print(f"| {name} | {mesh_shape} | {sent:,} B ({sent / share:.1e}) | {gathers} "
            f"| {temp / single_temp:.3f} |")


if __name__ == "__main__":
  main()
