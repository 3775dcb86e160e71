"""Distil a tiny Qwen3 student from a tiny Qwen3 teacher with Tunix's trainer and kdjax's loss.

Both models are ``tunix.models.qwen3.Qwen3`` at random initialisation (a 2-layer teacher with
tied embeddings, a 1-layer student with its own output layer); the data are padded sequences
that count up by a fixed step. ``tunix.distillation.DistillationTrainer`` runs its own training
loop; the loss is ``kdjax.integrations.tunix.DistillStrategy``: kdjax's combined objective
``(1 - kd_coef) * cross entropy + kd_coef * divergence``, averaged over the tokens to learn
(padding does not count). With ``--fused`` the forward functions return the final hidden states
and output kernels instead of the logits and the loss is kdjax's fused head.

The script prints the trainer's loss at each step and exits with status 1 unless it falls.
``--compare`` instead prints the table of docs/tunix.md: on one padded batch of these models,
the value of Tunix's ``LogitStrategy`` against kdjax's.

Run: python examples/tunix_distill.py [--steps 30] [--fused] [--compare]
(needs Tunix: pip install "kdjax[tunix]")
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

try:
  import optax
  from flax import nnx
  from tunix.distillation import distillation_trainer, strategies
  from tunix.models.qwen3 import model as qwen3
  from tunix.sft import utils as sft_utils
except ModuleNotFoundError as error:
  print(f"{os.path.basename(sys.argv[0])}: error: the module {error.name!r} is missing; this "
        'example needs Tunix: pip install "kdjax[tunix]"', file=sys.stderr)
  raise SystemExit(2) from None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kdjax  # noqa: E402
from kdjax.integrations import tunix as kdjax_tunix  # noqa: E402

VOCAB, SEQ, BATCH, PAD = 128, 16, 8, 0


def model_configs() -> tuple[qwen3.ModelConfig, qwen3.ModelConfig]:
  """``(teacher, student)``: tiny Qwen3 configurations (float32, CPU-sized)."""
  common = dict(vocab_size=VOCAB, head_dim=16, rope_theta=10_000, norm_eps=1e-6)
  teacher = qwen3.ModelConfig(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4,
                              num_kv_heads=2, use_tied_embedding=True, **common)
  student = qwen3.ModelConfig(num_layers=1, embed_dim=32, hidden_dim=64, num_heads=2,
                              num_kv_heads=1, use_tied_embedding=False, **common)
  return teacher, student


def make_models(seed: int = 0) -> tuple[qwen3.Qwen3, qwen3.Qwen3]:
  """``(teacher, student)`` at random initialisation. The teacher's embedding (also its output
  kernel) is scaled up 10 times: at its initial scale (0.01) its logits are nearly uniform."""
  teacher_config, student_config = model_configs()
  teacher = qwen3.Qwen3(teacher_config, rngs=nnx.Rngs(seed))
  teacher.embedder.input_embedding[...] = 10.0 * teacher.embedder.input_embedding[...]
  return teacher, qwen3.Qwen3(student_config, rngs=nnx.Rngs(seed + 1))


def make_batch(rng: np.random.Generator, *, batch: int = BATCH,
               padded: bool = True) -> distillation_trainer.TrainingInput:
  """Sequences that count up by 1, 2 or 3 (mod the vocabulary, skipping the padding id),
  right-padded to ``SEQ`` from a random length; ``input_mask`` marks the real tokens."""
  start = rng.integers(0, VOCAB - 1, size=(batch, 1))
  step = rng.integers(1, 4, size=(batch, 1))
  tokens = 1 + (start + step * np.arange(SEQ)) % (VOCAB - 1)
  lengths = rng.integers(SEQ // 2, SEQ + 1, size=(batch, 1)) if padded else SEQ
  mask = np.broadcast_to(np.arange(SEQ) < lengths, tokens.shape)
  return distillation_trainer.TrainingInput(
      input_tokens=jnp.asarray(np.where(mask, tokens, PAD), jnp.int32),
      input_mask=jnp.asarray(mask))


def model_inputs(x: distillation_trainer.TrainingInput) -> dict[str, jax.Array]:
  """The trainer's ``gen_model_input_fn``: positions and a causal mask over the real tokens."""
  pad_mask = x.input_tokens != PAD
  return {
      "input_tokens": x.input_tokens,
      "input_mask": x.input_mask,
      "positions": sft_utils.build_positions_from_mask(pad_mask),
      "attention_mask": sft_utils.make_causal_attn_mask(pad_mask),
  }


def train(args) -> list[float]:
  """Runs Tunix's trainer for ``args.steps`` steps; returns the loss it logged at each."""
  teacher, student = make_models()
  forward = kdjax_tunix.head_forward if args.fused else kdjax_tunix.logits_forward
  strategy = kdjax_tunix.DistillStrategy(
      forward, forward, kd_coef=args.kd_coef, divergence=args.divergence,
      temperature=args.temperature)
  config = distillation_trainer.TrainingConfig(
      eval_every_n_steps=args.steps + 1, max_steps=args.steps, pbar_description=None)
  trainer = distillation_trainer.DistillationTrainer(
      student, teacher, strategy, optax.adam(args.learning_rate), config,
  ).with_gen_model_input_fn(model_inputs)
  rng = np.random.default_rng(0)
  trainer.train([make_batch(rng) for _ in range(args.steps)])
  return [float(x) for x in trainer.metrics_logger.get_metric_history("", "loss", "train")]


# ----------------------------------------------------------------------------------------------
# --compare: Tunix's LogitStrategy against kdjax on one padded batch
# ----------------------------------------------------------------------------------------------


def tunix_labels(input_tokens, input_mask, **unused):
  """LogitStrategy's labels as Tunix's examples build them: one-hot next tokens, zeroed where
  the next token is not one to learn, for logits that drop the last position."""
  del unused
  one_hot = jax.nn.one_hot(input_tokens[:, 1:], VOCAB)
  return one_hot * input_mask[:, 1:, None].astype(one_hot.dtype)


def comparison(models=None) -> list[tuple[str, float, float]]:
  """``(case, LogitStrategy's value, kdjax's value)`` on one batch of the tiny models.

  ``models`` is ``(teacher, student)``, by default ``make_models()``. The padded batch is
  ``make_batch(default_rng(1), batch=4)``; the unpadded one the same sequences at full length.
  ``loss`` is the combined objective (``alpha = kd_coef = 0.5``), ``soft`` the distillation
  term, ``hard`` the cross entropy (Tunix's metrics ``distill/soft_loss`` and
  ``distill/hard_loss``).
  """
  teacher, student = make_models() if models is None else models

  def batch(padded):
    x = make_batch(np.random.default_rng(1), batch=4, padded=padded)
    inputs = model_inputs(x)
    return (kdjax_tunix.logits_forward(student, **inputs),
            kdjax_tunix.logits_forward(teacher, **inputs),
            kdjax_tunix.next_token_labels(x.input_tokens, x.input_mask),
            tunix_labels(x.input_tokens, x.input_mask))

  def tunix(data, temperature=1.0, top_k=0):
    student_logits, teacher_logits, _, one_hot = data
    logit = strategies.LogitStrategy(
        kdjax_tunix.logits_forward, kdjax_tunix.logits_forward, tunix_labels,
        temperature=temperature, alpha=0.5, distill_top_k=top_k)
    loss, metrics = logit.compute_loss(student_logits[:, :-1], teacher_logits[:, :-1], one_hot)
    return {"loss": loss, "soft": metrics["distill/soft_loss"],
            "hard": metrics["distill/hard_loss"]}

  def ours(data, temperature=1.0, temperature_squared=True):
    student_logits, teacher_logits, labels, _ = data
    strategy = kdjax_tunix.DistillStrategy(
        kdjax_tunix.logits_forward, kdjax_tunix.logits_forward, kd_coef=0.5,
        temperature=temperature, temperature_squared=temperature_squared)
    loss, metrics = strategy.compute_loss(student_logits, teacher_logits, labels)
    return {"loss": loss, "soft": metrics["distill/soft_loss"],
            "hard": metrics["distill/hard_loss"]}

  unpadded, padded = batch(False), batch(True)
  student_logits, teacher_logits, labels, _ = unpadded
  ids, logprobs = kdjax.topk_teacher(teacher_logits, 8)
  top_8 = tunix(unpadded, top_k=8)["soft"]

  def sparse(tail):
    return kdjax.sparse_distill_loss(student_logits, ids, logprobs, labels, tail=tail)

  rows = [
      ("unpadded, T=1: loss", tunix(unpadded)["loss"], ours(unpadded)["loss"]),
      ("unpadded, T=2, temperature_squared=True: loss", tunix(unpadded, 2.0)["loss"],
       ours(unpadded, 2.0)["loss"]),
      ("unpadded, T=2, temperature_squared=False: loss", tunix(unpadded, 2.0)["loss"],
       ours(unpadded, 2.0, temperature_squared=False)["loss"]),
      ("unpadded, distill_top_k=8 vs full vocabulary: soft", top_8, ours(unpadded)["soft"]),
      ("unpadded, distill_top_k=8 vs sparse tail=renormalize: soft", top_8,
       sparse("renormalize")),
      ("unpadded, distill_top_k=8 vs sparse tail=bucket: soft", top_8, sparse("bucket")),
      ("padded, T=1: soft", tunix(padded)["soft"], ours(padded)["soft"]),
      ("padded, T=1: hard", tunix(padded)["hard"], ours(padded)["hard"]),
      ("padded, T=1: loss", tunix(padded)["loss"], ours(padded)["loss"]),
  ]
  return [(case, float(theirs), float(value)) for case, theirs, value in rows]


def print_comparison() -> None:
  print("| case | `LogitStrategy` | kdjax | kdjax - Tunix |")
  print("| --- | ---: | ---: | ---: |")
  for case, theirs, ours in comparison():
    print(f"| {case} | {theirs:.4f} | {ours:.4f} | {ours - theirs:+.4f} |")


def main(argv=None) -> None:
  parser = _cli.Parser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=_cli.positive_int, default=30, help="training steps")
  parser.add_argument("--fused", action="store_true",
                      help="the fused head: hidden states and output kernels, no logits")
  parser.add_argument("--kd-coef", type=_cli.unit_interval, default=0.5,
                      help="weight of the distillation term in [0, 1] (Tunix's alpha)")
  parser.add_argument("--divergence", choices=kdjax.DIVERGENCES, default="forward_kl")
  parser.add_argument("--temperature", type=_cli.temperature, default=1.0)
  parser.add_argument("--learning-rate", type=_cli.positive_float, default=3e-3,
                      help="Adam's learning rate")
  parser.add_argument("--compare", action="store_true",
                      help="print LogitStrategy against kdjax on one padded batch, and exit")
  args = parser.parse_args(argv)
  if args.compare:
    print_comparison()
    return

  head = "the fused head (hidden states, output kernels)" if args.fused else "logits"
  print(f"== DistillStrategy from {head}, {args.divergence}, kd_coef {args.kd_coef}, "
        f"temperature {args.temperature}")
  losses = train(args)
  for step, loss in enumerate(losses):
    print(f"step {step:3d}  loss {loss:.4f}")
  quarter = max(1, len(losses) // 4)
  first, last = np.mean(losses[:quarter]), np.mean(losses[-quarter:])
  falling = bool(last < first)
  print(f"loss (mean of the first and last {quarter} steps) {first:.4f} -> {last:.4f} "
        f"({'falling' if falling else 'NOT falling'})")
  if not falling:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
