"""One process of the 2-process test in test_sharded.py (not a test module itself).

Usage: python _multiprocess_worker.py COORDINATOR_ADDRESS PROCESS_ID OUTPUT.npz

Each process owns 4 CPU devices; together they form a (data=2, model=4) mesh whose data axis
spans the two processes. Every process builds its half of the batch (the rows it owns) and the
global arrays come from ``jax.make_array_from_process_local_data``. Process 0 writes the loss
and the gathered gradients of the GSPMD path and of the shard_map path to OUTPUT.npz.
"""

import os
import sys

if __name__ == "__main__":
  # Only as a process of its own: the test imports this module for make_data and KWARGS, and
  # must not change the environment its later subprocesses inherit.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if __name__ == "__main__":
  # gloo is the CPU cross-process collective implementation; it is the default in recent jax
  # but set it explicitly so older versions do not fall back to no collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kdjax  # noqa: E402
from kdjax._src import sharded  # noqa: E402

# Shared with the test, which recomputes the single-process reference from the same data.
BATCH, SEQ, VOCAB = 4, 4, 32
KWARGS = dict(divergence="generalized_jsd", beta=0.3, temperature=1.5)


def make_data():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(BATCH, SEQ, VOCAB)).astype(np.float32)
  teacher = rng.normal(size=(BATCH, SEQ, VOCAB)).astype(np.float32)
  labels = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  labels[0, 1:] = -100  # process 0 holds fewer valid tokens than process 1.
  logits[3, 2, :5] = -np.inf
  return logits, teacher, labels


def main():
  coordinator, process_id, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=2, process_id=process_id,
      initialization_timeout=60)
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  logits, teacher, labels = make_data()
  rows = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
  vocab_spec, token_spec = P("data", None, "model"), P("data", None)

  def global_array(local, spec):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)

  logits_g = global_array(logits[rows], vocab_spec)
  teacher_g = global_array(teacher[rows], vocab_spec)
  labels_g = global_array(labels[rows], token_spec)
  assert not logits_g.is_fully_addressable

  def gspmd_loss(s, t, y):
    return kdjax.distill_loss(s, t, y, **KWARGS)

  shard_map_loss = jax.shard_map(
      lambda s, t, y: sharded.vocab_parallel_distill_loss(
          s, t, y, axis_name="model", data_axis_name="data", **KWARGS),
      mesh=mesh, in_specs=(vocab_spec, vocab_spec, token_spec), out_specs=P())

  results = {}
  for name, fn in (("gspmd", gspmd_loss), ("shard_map", shard_map_loss)):
    value, grad = jax.jit(jax.value_and_grad(fn))(logits_g, teacher_g, labels_g)
    results[f"{name}_value"] = np.asarray(value.addressable_data(0))  # replicated scalar.
    results[f"{name}_grad"] = np.asarray(multihost_utils.process_allgather(grad, tiled=True))
  if process_id == 0:
    np.savez(output, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
