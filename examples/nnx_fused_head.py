"""Distil a Flax NNX teacher into a student with kdjax's fused linear head.

The fused losses take each model's last hidden states and the weights of its output layer
instead of its logits, so the ``[tokens, vocab]`` logits are never materialised (their
gradient neither). An ``nnx.Linear(dim, vocab)`` output layer computes ``h @ kernel + bias``
with ``kernel`` of shape ``[dim, vocab]``, the layout kdjax expects: pass
``model.out.kernel[...]`` and ``model.out.bias[...]`` (reading a variable with ``[...]``;
``.value`` is deprecated in current flax) inside the loss that ``nnx.value_and_grad``
differentiates, and the gradient reaches the student's parameters through them.

The script first checks that the fused loss equals ``kdjax.distill_with_cross_entropy`` on the
materialised logits, then trains the student, and fails if the two differ or if the student's
forward KL from the teacher on a held-out batch does not fall.

Run: python examples/nnx_fused_head.py [--steps 100] [--kd-coef 0.5]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402
import _requires  # noqa: E402

_requires.require("flax", "optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import kdjax  # noqa: E402

VOCAB, BATCH, SEQ = 512, 8, 32


class LanguageModel(nnx.Module):
  """A toy model: embedding, one hidden layer, and an ``nnx.Linear`` output layer."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
    self.body = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, VOCAB, rngs=rngs)

  def hidden(self, tokens):
    """``[batch, seq, dim]``: the input of the output layer."""
    return jnp.tanh(self.body(self.embed(tokens)))

  def __call__(self, tokens):
    return self.out(self.hidden(tokens))


def fused_loss(student, teacher, tokens, labels, kd_coef):
  """``(1 - kd_coef) * ce + kd_coef * forward KL`` from hidden states and output weights."""
  return kdjax.fused_linear_distill_with_cross_entropy(
      student.hidden(tokens), student.out.kernel[...],
      teacher.hidden(tokens), teacher.out.kernel[...], labels,
      student_bias=student.out.bias[...], teacher_bias=teacher.out.bias[...], kd_coef=kd_coef)


def distill_only_loss(student, teacher, tokens, labels):
  """The distillation term alone (no cross entropy), fused in the same way."""
  return kdjax.fused_linear_distill_loss(
      student.hidden(tokens), student.out.kernel[...],
      teacher.hidden(tokens), teacher.out.kernel[...], labels,
      student_bias=student.out.bias[...], teacher_bias=teacher.out.bias[...])


@nnx.jit(static_argnames="kd_coef")
def train_step(student, teacher, optimizer, tokens, labels, kd_coef):
  # Gradients with respect to the first argument (the student) only; the teacher is fixed.
  loss, grads = nnx.value_and_grad(fused_loss)(student, teacher, tokens, labels, kd_coef)
  optimizer.update(student, grads)
  return loss


def make_batch(key, teacher):
  """Random tokens; labels sampled from the teacher, a tenth ignored (-100) as padding would be."""
  k_tokens, k_labels, k_pad = jax.random.split(key, 3)
  tokens = jax.random.randint(k_tokens, (BATCH, SEQ), 0, VOCAB)
  labels = jax.random.categorical(k_labels, teacher(tokens))
  return tokens, jnp.where(jax.random.uniform(k_pad, (BATCH, SEQ)) < 0.1, -100, labels)


def main(argv=None) -> None:
  parser = _cli.Parser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=_cli.positive_int, default=100, help="training steps")
  parser.add_argument("--kd-coef", type=_cli.unit_interval, default=0.5,
                      help="weight of the distillation term in [0, 1]")
  parser.add_argument("--learning-rate", type=_cli.positive_float, default=1e-2,
                      help="Adam's learning rate")
  args = parser.parse_args(argv)

  teacher = LanguageModel(128, rngs=nnx.Rngs(0))
  teacher.out.kernel[...] = 8.0 * teacher.out.kernel[...]  # A confident teacher.
  student = LanguageModel(32, rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(student, optax.adam(args.learning_rate), wrt=nnx.Param)

  tokens, labels = make_batch(jax.random.key(42), teacher)  # held out: not a training batch
  fused = float(fused_loss(student, teacher, tokens, labels, args.kd_coef))
  dense = float(kdjax.distill_with_cross_entropy(student(tokens), teacher(tokens), labels,
                                                 kd_coef=args.kd_coef))
  if not abs(fused - dense) <= 1e-4 * max(1.0, abs(dense)):
    raise AssertionError(f"fused head {fused:.6f} != loss on the logits {dense:.6f}")
  print(f"fused head {fused:.4f} == distill_with_cross_entropy on the logits {dense:.4f}")

  before = float(distill_only_loss(student, teacher, tokens, labels))
  key = jax.random.key(0)
  for step in range(args.steps):
    key, batch_key = jax.random.split(key)
    loss = train_step(student, teacher, optimizer, *make_batch(batch_key, teacher), args.kd_coef)
    if step % 25 == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")
  after = float(distill_only_loss(student, teacher, tokens, labels))
  print(f"held-out forward KL {before:.4f} -> {after:.4f} "
        f"({'falling' if after < before else 'NOT falling'})")
  if not after < before:
    raise AssertionError(f"the student did not get closer to the teacher in {args.steps} steps")


if __name__ == "__main__":
  main()
