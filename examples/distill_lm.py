"""Distil a byte-level transformer teacher into a smaller student with kdjax, end to end on a CPU.

The corpus is the Python standard library's own source (top-level ``.py`` files of the running
interpreter, whole files held out for evaluation), tokenized as bytes. The script trains

1. a teacher (or loads it from a previous run's checkpoint),
2. a student with cross entropy only,
3. the same student (same seed, same batches, same token budget) with
   ``(1 - kd_coef) * ce + kd_coef * kd`` from ``kdjax.distill_with_cross_entropy``,

then prints a table of held-out loss and perplexity and writes a plot of the held-out curves.
Every phase checkpoints with orbax and resumes from its latest checkpoint when rerun; a checkpoint
whose files no longer match the SHA-256 digest recorded when it was saved is skipped with a
warning, and the phase resumes from the one before.

Run: python examples/distill_lm.py [--out runs/demo] [--student-steps 400] [--kd-coef 0.5]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import tempfile
import textwrap

DIVERGENCES = (  # kdjax.DIVERGENCES, listed here so that --help and bad flags need no JAX.
    "forward_kl", "generalized_jsd", "reverse_kl", "skew_forward_kl", "skew_reverse_kl",
    "soft_cross_entropy", "total_variation")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    # One line on stderr and exit code 2, like argparse, without the long usage block.
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
  return value


def _float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def _positive_float(text: str) -> float:
  value = _float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
  return value


def _unit_interval(text: str) -> float:
  value = _float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="distill_lm.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add = parser.add_argument
  add("--out", default="runs/demo", help="output folder (created if missing): checkpoints, "
      "results.md, results.json, curves.png")
  add("--teacher-steps", type=_positive_int, default=500, help="teacher training steps")
  add("--student-steps", type=_positive_int, default=400,
      help="training steps of each student (same batches for both)")
  add("--batch-size", type=_positive_int, default=16, help="sequences per step")
  add("--seq-len", type=_positive_int, default=128, help="bytes per sequence")
  add("--teacher-layers", type=_positive_int, default=3)
  add("--teacher-dim", type=_positive_int, default=128, help="teacher width")
  add("--student-layers", type=_positive_int, default=2)
  add("--student-dim", type=_positive_int, default=64, help="student width")
  add("--head-dim", type=_positive_int, default=32,
      help="attention head size; widths must be multiples of it")
  add("--divergence", choices=DIVERGENCES, default="forward_kl",
      help="kdjax divergence between teacher and student")
  add("--temperature", type=_positive_float, default=1.0, help="distillation temperature > 0")
  add("--kd-coef", type=_unit_interval, default=0.5,
      help="weight of the distillation term in [0, 1]; 0 is cross entropy only")
  add("--teacher-learning-rate", type=_positive_float, default=2e-3)
  add("--student-learning-rate", type=_positive_float, default=3e-3)
  add("--eval-every", type=_positive_int, default=50, help="steps between held-out evaluations")
  add("--eval-windows", type=_positive_int, default=64, help="held-out sequences evaluated")
  add("--checkpoint-every", type=_positive_int, default=100, help="steps between checkpoints")
  add("--seed", type=_non_negative_int, default=0)
  add("--no-progress", action="store_true", help="no progress bars")
  # Test hook: seconds of sleep per student-KD step, so a test can kill the run mid-way.
  add("--step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
  return parser


def check_output_folder(parser: argparse.ArgumentParser, out: str) -> pathlib.Path:
  """Creates ``out`` if needed and checks that a file can be written there, or exits with 2."""
  if not out.strip():
    parser.error("--out: the output folder is missing (an empty path was given)")
  folder = pathlib.Path(out).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    parser.error(f"--out: {out!r} exists and is not a folder")
  except OSError as error:
    parser.error(f"--out: cannot create the output folder {out!r}: {error.strerror}")
  if not folder.is_dir():
    parser.error(f"--out: {out!r} is not a folder")
  try:
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as error:
    parser.error(f"--out: cannot write in the output folder {out!r}: {error.strerror}")
  return folder


def parse_args(argv=None) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  for name in ("teacher_dim", "student_dim"):
    if getattr(args, name) % args.head_dim:
      parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be a multiple of "
                   f"--head-dim ({args.head_dim})")
  if args.step_sleep < 0:
    parser.error("--step-sleep must be >= 0")
  args.out = check_output_folder(parser, args.out)
  return args


def results_table(rows: list[dict]) -> str:
  lines = [
      "| model | layers x width | parameters | training tokens | held-out loss (nats/byte) "
      "| held-out perplexity | bits/byte |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for row in rows:
    lines.append(
        f"| {row['model']} | {row['layers']} x {row['dim']} | {row['parameters']:,} "
        f"| {row['tokens']:,} | {row['loss']:.4f} | {math.exp(row['loss']):.3f} "
        f"| {row['loss'] / math.log(2):.3f} |")
  return "\n".join(lines)


def plot_curves(histories: dict[str, dict], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
  styles = {"teacher": ("black", "--"), "student-CE": ("tab:blue", "-"),
            "student-KD": ("tab:red", "-")}
  for name, history in histories.items():
    color, style = styles.get(name, (None, "-"))
    tokens = [t / 1e6 for t in history["tokens"]]
    axis.plot(tokens, history["heldout_loss"], style, color=color, marker=".", label=name)
  finals = [h["heldout_loss"][-1] for h in histories.values()]
  axis.set_ylim(min(finals) - 0.3, max(finals) + 1.5)  # The first evaluation is ~log(256).
  axis.set_xlabel("training tokens (millions of bytes)")
  axis.set_ylabel("held-out cross entropy (nats/byte)")
  axis.set_title(textwrap.fill(title, 95), fontsize=8)
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Heavy imports after validation: --help and bad flags answer at once.
  import dataclasses
  import json

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _lm

  train_tokens, heldout_tokens, heldout_names = _lm.load_corpus()
  print(f"corpus: {len(train_tokens):,} training bytes, {len(heldout_tokens):,} held-out bytes "
        f"({len(heldout_names)} whole stdlib files, e.g. {', '.join(heldout_names[:3])})")
  heldout = _lm.heldout_batches(heldout_tokens, windows=args.eval_windows,
                                batch_size=args.batch_size, seq_len=args.seq_len)
  progress = not args.no_progress

  def model_config(layers, dim):
    return _lm.ModelConfig(layers=layers, dim=dim, heads=dim // args.head_dim,
                           max_len=args.seq_len)

  data = dict(batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
              eval_every=args.eval_every, checkpoint_every=args.checkpoint_every)

  def phase(name, model, steps, learning_rate, kd=None, teacher=None, teacher_folder=None):
    # The folder name hashes everything that determines the result, so a rerun with the same
    # settings resumes (or reuses a finished model) and changed settings train afresh.
    identity = dict(name=name, model=dataclasses.asdict(model), steps=steps,
                    learning_rate=learning_rate, kd=kd, teacher=teacher_folder, **data)
    folder = args.out / f"{name}-{_lm.config_hash(identity)}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    return _lm.Phase(name=name, folder=folder, model=model, steps=steps,
                     learning_rate=learning_rate, kd=kd or {}, teacher=teacher, **data)

  teacher_model = model_config(args.teacher_layers, args.teacher_dim)
  student_model = model_config(args.student_layers, args.student_dim)
  teacher_phase = phase("teacher", teacher_model, args.teacher_steps, args.teacher_learning_rate)
  teacher_graphdef, teacher_params, teacher_history = _lm.train(
      teacher_phase, train_tokens, heldout, progress=progress)

  ce_phase = phase("student-CE", student_model, args.student_steps, args.student_learning_rate)
  _, ce_params, ce_history = _lm.train(
      ce_phase, train_tokens, heldout, progress=progress)

  kd = dict(kd_coef=args.kd_coef, divergence=args.divergence, temperature=args.temperature)
  kd_phase = phase("student-KD", student_model, args.student_steps, args.student_learning_rate,
                   kd=kd, teacher=(teacher_graphdef, teacher_params),
                   teacher_folder=teacher_phase.folder.name)
  _, kd_params, kd_history = _lm.train(
      kd_phase, train_tokens, heldout, progress=progress, step_sleep=args.step_sleep)

  rows = []
  for name, model, params, history in (
      ("teacher", teacher_model, teacher_params, teacher_history),
      ("student-CE", student_model, ce_params, ce_history),
      ("student-KD", student_model, kd_params, kd_history)):
    rows.append(dict(model=name, layers=model.layers, dim=model.dim,
                     parameters=_lm.count_params(params), tokens=history["tokens"][-1],
                     loss=history["heldout_loss"][-1]))
  table = results_table(rows)
  setting = (f"student-KD: (1 - {args.kd_coef:g}) * ce + {args.kd_coef:g} * {args.divergence} "
             f"at temperature {args.temperature:g}; held-out: {len(heldout_names)} unseen stdlib "
             f"files, {sum(len(b) for b in heldout) * args.seq_len:,} bytes")
  print()
  print(table)
  print()
  print(setting)
  (args.out / "results.md").write_text(table + "\n\n" + setting + "\n")
  (args.out / "results.json").write_text(json.dumps(
      {"rows": rows, "setting": setting, "args": {k: str(v) for k, v in vars(args).items()},
       "histories": {"teacher": teacher_history, "student-CE": ce_history,
                     "student-KD": kd_history}}, indent=1))
  plot_curves({"teacher": teacher_history, "student-CE": ce_history,
               "student-KD": kd_history}, args.out / "curves.png", setting)
  print(f"wrote {args.out / 'results.md'} and {args.out / 'curves.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
