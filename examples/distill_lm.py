"""Distil a byte-level transformer teacher into a smaller student with kdjax, end to end on a CPU.

The corpus is the Python standard library's own source (top-level ``.py`` files of the running
interpreter, whole files held out for evaluation), tokenized as bytes. The script trains

1. a teacher (or loads it from a previous run's checkpoint),
2. a student with cross entropy only,
3. the same student (same seed, same batches, same token budget) with
   ``(1 - kd_coef) * ce + kd_coef * kd`` from ``kdjax.distill_with_cross_entropy`` (off-policy:
   it learns on the corpus' text),
4. the same student again, on-policy (generalized knowledge distillation, GKD): a fraction
   ``--on-policy-fraction`` of its batches are the student's own continuations of prompts from
   the training windows, scored by the teacher and trained with ``kdjax.distill_loss`` on the
   generated positions; its other batches are those of 3, with the same objective,

then prints a table of held-out loss, perplexity and the teacher's log-likelihood of each model's
samples, and writes a plot of the held-out curves and of that log-likelihood.
Every phase checkpoints with orbax and resumes from its latest checkpoint when rerun; a checkpoint
whose files no longer match the SHA-256 digest recorded when it was saved is skipped with a
warning, and the phase resumes from the one before.

Run: python examples/distill_lm.py [--quick] [--out runs/demo] [--student-steps 400]
                                  [--kd-coef 0.5] [--on-policy-fraction 0.5]

``--quick`` trains tiny models for a few steps (under a minute on a 2-core CPU). Progress bars
are drawn when stderr is a terminal; otherwise (a log file, CI) each phase prints plain lines.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import tempfile
import textwrap

# The examples' helper modules (_cli, _requires, _lm) sit next to this script, which may run
# from anywhere (runpy, another working directory).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

# The --quick run: small models, few steps. Flags given explicitly still override these.
QUICK = dict(
    out="runs/quick", teacher_steps=400, student_steps=200, batch_size=8, seq_len=64,
    teacher_layers=1, teacher_dim=64, student_layers=1, student_dim=32, head_dim=32,
    eval_every=50, eval_windows=16, checkpoint_every=200, sample_length=16)

DIVERGENCES = (  # kdjax.DIVERGENCES, listed here so that --help and bad flags need no JAX.
    "forward_kl", "generalized_jsd", "reverse_kl", "skew_forward_kl", "skew_reverse_kl",
    "soft_cross_entropy", "total_variation")


def build_parser() -> argparse.ArgumentParser:
  parser = _cli.Parser(prog="distill_lm.py", description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--quick", action="store_true",
      help="a run of under a minute on a CPU: " + ", ".join(
          f"--{name.replace('_', '-')} {value}" for name, value in QUICK.items()))
  add("--out", default="runs/demo", help="output folder (created if missing): checkpoints, "
      "results.md, results.json, curves.png")
  add("--teacher-steps", type=_cli.positive_int, default=500, help="teacher training steps")
  add("--student-steps", type=_cli.positive_int, default=400,
      help="training steps of each student (same batches for both)")
  add("--batch-size", type=_cli.positive_int, default=16, help="sequences per step")
  add("--seq-len", type=_cli.positive_int, default=128, help="bytes per sequence")
  add("--teacher-layers", type=_cli.positive_int, default=3, help="teacher transformer blocks")
  add("--teacher-dim", type=_cli.positive_int, default=128, help="teacher width")
  add("--student-layers", type=_cli.positive_int, default=2, help="student transformer blocks")
  add("--student-dim", type=_cli.positive_int, default=64, help="student width")
  add("--head-dim", type=_cli.positive_int, default=32,
      help="attention head size; widths must be multiples of it")
  add("--divergence", choices=DIVERGENCES, default="forward_kl",
      help="kdjax divergence between teacher and student")
  add("--temperature", type=_cli.temperature, default=1.0,
      help="distillation temperature > 0 (its reciprocal a normal float32)")
  add("--kd-coef", type=_cli.unit_interval, default=0.5,
      help="weight of the distillation term in [0, 1]; 0 is cross entropy only")
  add("--on-policy-fraction", type=_cli.unit_interval, default=0.5,
      help="fraction of the on-policy student's batches sampled from the student itself, in "
      "[0, 1]; 0 skips the on-policy student")
  add("--on-policy-divergence", choices=DIVERGENCES, default="generalized_jsd",
      help="kdjax divergence on the student's samples")
  add("--on-policy-beta", type=_cli.unit_interval, default=0.5,
      help="generalized_jsd's teacher weight in [0, 1] (0: forward KL, 1: reverse KL)")
  add("--sample-length", type=_cli.positive_int, default=32,
      help="bytes the student generates per sequence (the rest of the window is the prompt)")
  add("--sample-temperature", type=_cli.temperature, default=1.0,
      help="temperature of the student's samples, in training and in the evaluation (the "
      "range of --temperature; near its low end, greedy decoding)")
  add("--teacher-learning-rate", type=_cli.positive_float, default=2e-3,
      help="teacher's peak learning rate (AdamW, warmup then cosine decay)")
  add("--student-learning-rate", type=_cli.positive_float, default=3e-3,
      help="students' peak learning rate (AdamW, warmup then cosine decay)")
  add("--eval-every", type=_cli.positive_int, default=50, help="steps between held-out evaluations")
  add("--eval-windows", type=_cli.positive_int, default=64, help="held-out sequences evaluated")
  add("--checkpoint-every", type=_cli.positive_int, default=100, help="steps between checkpoints")
  add("--seed", type=_cli.non_negative_int, default=0,
      help="seed of the initial parameters, the batches and the samples")
  add("--no-progress", action="store_true",
      help="plain lines at each evaluation instead of progress bars (the default when stderr "
      "is not a terminal)")
  # Test hook: seconds of sleep per step of the last student, so a test can kill it mid-way.
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
  if args.quick:  # Parse again with the quick defaults, so that explicit flags still win.
    parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
  for name in ("teacher_dim", "student_dim"):
    if getattr(args, name) % args.head_dim:
      parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be a multiple of "
                   f"--head-dim ({args.head_dim})")
  if args.sample_length >= args.seq_len:
    parser.error(f"--sample-length ({args.sample_length}) must be less than --seq-len "
                 f"({args.seq_len}): the prompt is the rest of the window")
  if args.step_sleep < 0:
    parser.error("--step-sleep must be >= 0")
  # The losses refuse a beta that their divergence does not read; say so before any training.
  default_beta = parser.get_default("on_policy_beta")
  if args.on_policy_divergence != "generalized_jsd" and args.on_policy_beta != default_beta:
    parser.error(f"--on-policy-beta ({args.on_policy_beta:g}) is read only by "
                 f"--on-policy-divergence generalized_jsd, got --on-policy-divergence "
                 f"{args.on_policy_divergence}: drop --on-policy-beta (or leave it at "
                 f"{default_beta:g})")
  args.out = check_output_folder(parser, args.out)
  return args


def results_table(rows: list[dict]) -> str:
  lines = [
      "| model | layers x width | parameters | training tokens | held-out loss (nats/byte) "
      "| held-out perplexity | bits/byte | teacher log-likelihood of samples (nats/byte, "
      "± s.e.) |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for row in rows:
    lines.append(
        f"| {row['model']} | {row['layers']} x {row['dim']} | {row['parameters']:,} "
        f"| {row['tokens']:,} | {row['loss']:.4f} | {math.exp(row['loss']):.3f} "
        f"| {row['loss'] / math.log(2):.3f} | {row['sample_log_likelihood']:.4f} "
        f"± {row['sample_log_likelihood_se']:.3f} |")
  return "\n".join(lines)


STYLES = {"teacher": ("black", "--"), "student-CE": ("tab:blue", "-"),
          "student-KD": ("tab:red", "-"), "student-GKD": ("tab:green", "-")}


def plot_curves(histories: dict[str, dict],
                sample_log_likelihoods: dict[str, tuple[float, float]], path: pathlib.Path,
                title: str) -> None:
  """Held-out curves (left) and the teacher's log-likelihood of each model's samples (right)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (curves, samples) = plt.subplots(
      1, 2, figsize=(10, 4.4), dpi=120, gridspec_kw={"width_ratios": [2.2, 1]})
  for name, history in histories.items():
    color, style = STYLES.get(name, (None, "-"))
    tokens = [t / 1e6 for t in history["tokens"]]
    curves.plot(tokens, history["heldout_loss"], style, color=color, marker=".", label=name)
  finals = [h["heldout_loss"][-1] for h in histories.values()]
  curves.set_ylim(min(finals) - 0.3, max(finals) + 1.5)  # The first evaluation is ~log(256).
  curves.set_xlabel("training tokens (millions of bytes)")
  curves.set_ylabel("held-out cross entropy (nats/byte)")
  curves.grid(alpha=0.3)
  curves.legend()

  # Points, not bars: the differences that matter are small next to the values.
  names = list(sample_log_likelihoods)
  for index, name in enumerate(names):
    value, standard_error = sample_log_likelihoods[name]
    samples.errorbar(index, value, yerr=standard_error, fmt="o", capsize=4, markersize=7,
                     color=STYLES.get(name, ("gray", ""))[0])
    samples.annotate(f"{value:.3f}", (index, value), textcoords="offset points",
                     xytext=(9, -3), fontsize=7)
  samples.set_xticks(range(len(names)), [name.replace("student-", "") for name in names])
  samples.set_xlim(-0.6, len(names) - 0.4)
  samples.margins(y=0.25)
  samples.set_ylabel("teacher log-likelihood of samples (nats/byte)")
  samples.set_title("held-out prompts, ± s.e.; higher is better", fontsize=8)
  samples.grid(alpha=0.3, axis="y")
  figure.suptitle(textwrap.fill(title, 130), fontsize=7)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Heavy imports after validation: --help and bad flags answer at once.
  import dataclasses
  import json

  import _requires

  _requires.require("tqdm", "matplotlib", "optax", "orbax.checkpoint", "flax")
  import _lm

  train_tokens, heldout_tokens, heldout_names = _lm.load_corpus()
  print(f"corpus: {len(train_tokens):,} training bytes, {len(heldout_tokens):,} held-out bytes "
        f"({len(heldout_names)} whole stdlib files, e.g. {', '.join(heldout_names[:3])})")
  heldout = _lm.heldout_batches(heldout_tokens, windows=args.eval_windows,
                                batch_size=args.batch_size, seq_len=args.seq_len)
  # A bar redrawn with carriage returns only on a terminal; in a log, plain periodic lines.
  progress = not args.no_progress and sys.stderr.isatty()

  def model_config(layers, dim):
    return _lm.ModelConfig(layers=layers, dim=dim, heads=dim // args.head_dim,
                           max_len=args.seq_len)

  data = dict(batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
              eval_every=args.eval_every, checkpoint_every=args.checkpoint_every)

  def phase(name, model, steps, learning_rate, kd=None, teacher=None, teacher_folder=None,
            on_policy=None):
    # The folder name hashes everything that determines the result, so a rerun with the same
    # settings resumes (or reuses a finished model) and changed settings train afresh.
    identity = dict(name=name, model=dataclasses.asdict(model), steps=steps,
                    learning_rate=learning_rate, kd=kd, teacher=teacher_folder, **data)
    if on_policy:
      identity["on_policy"] = on_policy
    folder = args.out / f"{name}-{_lm.config_hash(identity)}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    return _lm.Phase(name=name, folder=folder, model=model, steps=steps,
                     learning_rate=learning_rate, kd=kd or {}, teacher=teacher,
                     on_policy=on_policy or {}, **data)

  teacher_model = model_config(args.teacher_layers, args.teacher_dim)
  student_model = model_config(args.student_layers, args.student_dim)
  teacher_phase = phase("teacher", teacher_model, args.teacher_steps, args.teacher_learning_rate)
  teacher_graphdef, teacher_params, teacher_history = _lm.train(
      teacher_phase, train_tokens, heldout, progress=progress)
  teacher = (teacher_graphdef, teacher_params)
  models = {"teacher": (teacher_model, teacher_graphdef, teacher_params, teacher_history)}

  ce_phase = phase("student-CE", student_model, args.student_steps, args.student_learning_rate)
  models["student-CE"] = (student_model, *_lm.train(
      ce_phase, train_tokens, heldout, progress=progress))

  kd = dict(kd_coef=args.kd_coef, divergence=args.divergence, temperature=args.temperature)
  on_policy = dict(
      fraction=args.on_policy_fraction, sample_length=args.sample_length,
      sample_temperature=args.sample_temperature, divergence=args.on_policy_divergence,
      beta=args.on_policy_beta, temperature=args.temperature)
  students = [("student-KD", None)]
  if args.on_policy_fraction > 0:
    students.append(("student-GKD", on_policy))
  for index, (name, student_on_policy) in enumerate(students):
    student_phase = phase(name, student_model, args.student_steps, args.student_learning_rate,
                          kd=kd, teacher=teacher, teacher_folder=teacher_phase.folder.name,
                          on_policy=student_on_policy)
    last = index == len(students) - 1
    models[name] = (student_model, *_lm.train(
        student_phase, train_tokens, heldout, progress=progress,
        step_sleep=args.step_sleep if last else 0.0))

  score = _lm.make_sample_score(teacher, heldout, sample_length=args.sample_length,
                                temperature=args.sample_temperature, seed=args.seed)
  rows = []
  for name, (model, graphdef, params, history) in models.items():
    log_likelihood, standard_error = score(graphdef, params)
    rows.append(dict(model=name, layers=model.layers, dim=model.dim,
                     parameters=_lm.count_params(params), tokens=history["tokens"][-1],
                     loss=history["heldout_loss"][-1], sample_log_likelihood=log_likelihood,
                     sample_log_likelihood_se=standard_error))
  table = results_table(rows)
  prompt_len = args.seq_len - args.sample_length
  setting = (f"student-KD: (1 - {args.kd_coef:g}) * ce + {args.kd_coef:g} * {args.divergence} "
             f"at temperature {args.temperature:g}")
  if args.on_policy_fraction > 0:
    beta = (f" (beta {args.on_policy_beta:g})"
            if args.on_policy_divergence == "generalized_jsd" else "")
    setting += (f"; student-GKD: {args.on_policy_fraction:g} of its batches are its own "
                f"{args.sample_length}-byte continuations of {prompt_len}-byte training "
                f"prefixes, trained with {args.on_policy_divergence}{beta} on the generated "
                f"bytes, the others as student-KD")
  setting += (f"; samples at temperature {args.sample_temperature:g}; held-out: "
              f"{len(heldout_names)} unseen stdlib files, "
              f"{sum(len(b) for b in heldout) * args.seq_len:,} bytes; samples: "
              f"{args.sample_length} bytes after each held-out window's first {prompt_len}")
  print()
  print(table)
  print()
  print(setting)
  (args.out / "results.md").write_text(table + "\n\n" + setting + "\n")
  histories = {name: history for name, (_, _, _, history) in models.items()}
  (args.out / "results.json").write_text(json.dumps(
      {"rows": rows, "setting": setting, "args": {k: str(v) for k, v in vars(args).items()},
       "histories": histories}, indent=1))
  plot_curves(histories, {row["model"]: (row["sample_log_likelihood"],
                                         row["sample_log_likelihood_se"]) for row in rows},
              args.out / "curves.png", setting)
  print(f"wrote {args.out / 'results.md'} and {args.out / 'curves.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
