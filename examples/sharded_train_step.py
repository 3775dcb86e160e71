"""Distill a small student on a (data, model) mesh: batch over `data`, vocabulary over `model`.

Runs on 8 forced CPU devices (set below when XLA_FLAGS is unset), or on a real 8-device host:

    python examples/sharded_train_step.py

The student and the teacher are tiny token models (embedding -> MLP -> output
projection); their output projections (and so the logits) are sharded along the vocabulary.
The train step is one ``jax.jit`` of an optax update: GSPMD partitions ``kdjax.distill_loss``
without gathering the vocabulary. The same loss is also computed with explicit collectives
(``jax.shard_map`` + ``kdjax.vocab_parallel_distill_loss``) to show the two agree.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import _cli  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kdjax  # noqa: E402

VOCAB, STUDENT_WIDTH, TEACHER_WIDTH = 512, 64, 128
BATCH, SEQ = 16, 32
DATA, MODEL = 4, 2  # 8 devices.

# Where each parameter lives: output projections split along the vocabulary (`model`), the
# rest replicated. Activations: batch over `data`.
PARAM_SPECS = {"embed": P(None, None), "hidden": P(None, None), "unembed": P(None, "model")}
TOKENS_SPEC = P("data", None)
LOGITS_SPEC = P("data", None, "model")


def init(key, width):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "embed": jax.random.normal(k1, (VOCAB, width)) * 0.5,
      "hidden": jax.random.normal(k2, (width, width)) / jnp.sqrt(width),
      "unembed": jax.random.normal(k3, (width, VOCAB)) / jnp.sqrt(width),
  }


def logits_fn(params, tokens, mesh):
  h = params["embed"][tokens]
  h = h + jax.nn.gelu(h @ params["hidden"])
  logits = h @ params["unembed"]  # [batch, seq, vocab]
  # Already what GSPMD infers from the shardings above; the constraint documents it.
  return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, LOGITS_SPEC))


def main():
  _cli.Parser(description=__doc__.split("\n\n")[0]).parse_args()  # No options: --help.
  mesh = jax.make_mesh((DATA, MODEL), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  place = lambda tree, specs: jax.tree.map(  # noqa: E731
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree, specs)
  student = place(init(jax.random.key(0), STUDENT_WIDTH), PARAM_SPECS)
  teacher = place(init(jax.random.key(1), TEACHER_WIDTH), PARAM_SPECS)
  tokens = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, VOCAB)
  labels = kdjax.shift_labels(tokens.at[:, SEQ - 4:].set(-100))  # some padding at the end.
  tokens = jax.device_put(tokens, NamedSharding(mesh, TOKENS_SPEC))
  labels = jax.device_put(labels, NamedSharding(mesh, TOKENS_SPEC))

  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(student)

  def loss_fn(params, teacher, tokens, labels):
    student_logits = logits_fn(params, tokens, mesh)
    teacher_logits = logits_fn(teacher, tokens, mesh)
    return kdjax.distill_loss(student_logits, teacher_logits, labels,
                              divergence="generalized_jsd", beta=0.5, temperature=2.0)

  @jax.jit
  def train_step(params, opt_state, teacher, tokens, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, teacher, tokens, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # The same loss with explicit collectives: each device sees its [batch/4, seq, vocab/2]
  # logits and only per-token statistics cross devices.
  shard_map_loss = jax.jit(jax.shard_map(
      lambda s, t, y: kdjax.vocab_parallel_distill_loss(
          s, t, y, axis_name="model", data_axis_name="data",
          divergence="generalized_jsd", beta=0.5, temperature=2.0),
      mesh=mesh, in_specs=(LOGITS_SPEC, LOGITS_SPEC, TOKENS_SPEC), out_specs=P()))

  print(f"mesh: {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")
  for name, value in (("student unembed", student["unembed"]), ("tokens", tokens)):
    print(f"  {name:16s} {value.shape} sharded as {value.sharding.spec}")
  logits = jax.jit(lambda p, x: logits_fn(p, x, mesh))(student, tokens)
  print(f"  {'student logits':16s} {logits.shape} sharded as {logits.sharding.spec}, "
        f"{logits.addressable_shards[0].data.shape} per device")

  for step in range(5):
    if step == 0:
      teacher_logits = jax.jit(lambda p, x: logits_fn(p, x, mesh))(teacher, tokens)
      reference = shard_map_loss(logits, teacher_logits, labels)
      print(f"step 0 loss via shard_map: {float(reference):.6f}")
    student, opt_state, loss = train_step(student, opt_state, teacher, tokens, labels)
    print(f"step {step} loss (GSPMD train step): {float(loss):.6f}")
  print(f"updated unembed still sharded as {student['unembed'].sharding.spec}")


if __name__ == "__main__":
  main()
