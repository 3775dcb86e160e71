"""A jitted optax train step with kdjax: distil a teacher's token distributions into a student.

The teacher is a fixed random two-layer network over a vocabulary of 512 "tokens"; the student
is a smaller one. Labels are sampled from the teacher, with some positions ignored (-100) as
padding would be. The objective is OpenRLHF's: ``(1 - kd_coef) * ce + kd_coef * kd``, written
by hand from optax's cross entropy and ``kdjax.kd_loss``. Every step checks it against the same
objective from one call, ``kdjax.distill_with_cross_entropy`` (the "combined" column), and the
script fails if they differ or if the loss does not fall.

Run: python examples/optax_train_step.py [--steps 300] [--kd-coef 0.5]
"""

from __future__ import annotations

import _cli
import jax
import jax.numpy as jnp
import optax

import kdjax

VOCAB, FEATURES, BATCH, SEQ = 512, 64, 8, 32
TOLERANCE = 1e-4  # float32 sums of 256 tokens in two different orders


def check_agreement(step: int, loss: float, combined: float) -> None:
  """Raises unless the hand-written objective and distill_with_cross_entropy agree."""
  if not abs(loss - combined) <= TOLERANCE * max(1.0, abs(loss)):
    raise AssertionError(
        f"step {step}: the hand-written objective is {loss:.6f} but "
        f"kdjax.distill_with_cross_entropy gives {combined:.6f}")


def init_mlp(key, hidden):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (FEATURES, hidden)) / jnp.sqrt(FEATURES),
      "w2": jax.random.normal(k2, (hidden, VOCAB)) / jnp.sqrt(hidden),
  }


def apply_mlp(params, features):
  return jnp.tanh(features @ params["w1"]) @ params["w2"]


def make_batch(key, teacher_params):
  k_features, k_labels, k_pad = jax.random.split(key, 3)
  features = jax.random.normal(k_features, (BATCH, SEQ, FEATURES))
  teacher_logits = 3.0 * apply_mlp(teacher_params, features)
  labels = jax.random.categorical(k_labels, teacher_logits)
  labels = jnp.where(jax.random.uniform(k_pad, (BATCH, SEQ)) < 0.1, -100, labels)
  return features, teacher_logits, labels


def main():
  parser = _cli.Parser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=_cli.positive_int, default=300, help="training steps")
  parser.add_argument("--kd-coef", type=_cli.unit_interval, default=0.5,
                      help="weight of the distillation term in [0, 1]")
  parser.add_argument("--learning-rate", type=_cli.positive_float, default=3e-3,
                      help="Adam's learning rate")
  args = parser.parse_args()

  teacher_params = init_mlp(jax.random.key(0), hidden=256)
  student_params = init_mlp(jax.random.key(1), hidden=64)
  optimizer = optax.adam(args.learning_rate)
  opt_state = optimizer.init(student_params)

  def loss_fn(params, features, teacher_logits, labels):
    logits = apply_mlp(params, features)
    # Hard-label cross entropy over the valid tokens ...
    mask = labels != -100
    ce_per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(mask, labels, 0))
    ce = jnp.sum(jnp.where(mask, ce_per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    # ... plus OpenRLHF's distillation loss, averaged over the same tokens.
    kd = kdjax.kd_loss(logits, teacher_logits, labels)
    return (1.0 - args.kd_coef) * ce + args.kd_coef * kd, (ce, kd)

  @jax.jit
  def train_step(params, opt_state, key):
    features, teacher_logits, labels = make_batch(key, teacher_params)
    (loss, (ce, kd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, features, teacher_logits, labels)
    # The same objective from one call (one pass over the logits):
    combined = kdjax.distill_with_cross_entropy(
        apply_mlp(params, features), teacher_logits, labels, kd_coef=args.kd_coef,
        divergence="soft_cross_entropy")
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, ce, kd, combined

  print(f"{'step':>5} {'loss':>8} {'ce':>8} {'kd':>8} {'combined':>8}")
  key = jax.random.key(42)
  first = last = None
  for step in range(args.steps):
    key, batch_key = jax.random.split(key)
    student_params, opt_state, loss, ce, kd, combined = train_step(
        student_params, opt_state, batch_key)
    check_agreement(step, float(loss), float(combined))
    first = float(loss) if first is None else first
    last = float(loss)
    if step % 50 == 0 or step == args.steps - 1:
      print(f"{step:5d} {float(loss):8.4f} {float(ce):8.4f} {float(kd):8.4f} "
            f"{float(combined):8.4f}")
  print(f"loss {first:.4f} -> {last:.4f} ({'falling' if last < first else 'NOT falling'})")
  if not last < first:
    raise AssertionError(f"the loss did not fall in {args.steps} steps")


if __name__ == "__main__":
  main()
