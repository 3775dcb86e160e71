"""The end-to-end demo ``examples/distill_lm.py``: its objective, data, model, outputs (with the
on-policy student), checkpoint resumption after a kill, and its answers to bad flags."""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "distill_lm.py"
sys.path.insert(0, str(ROOT / "examples"))

import _cli  # noqa: E402
import _lm  # noqa: E402
import distill_lm  # noqa: E402

import kdjax  # noqa: E402

# A tiny configuration: every phase compiles and runs in seconds.
TINY = [
    "--teacher-steps", "8", "--student-steps", "12", "--batch-size", "4", "--seq-len", "32",
    "--teacher-layers", "1", "--teacher-dim", "32", "--student-layers", "1",
    "--student-dim", "16", "--head-dim", "16", "--eval-every", "4", "--eval-windows", "8",
    "--checkpoint-every", "3", "--divergence", "generalized_jsd", "--temperature", "2.0",
    "--kd-coef", "0.7", "--on-policy-fraction", "0.5", "--sample-length", "8",
]  # Without --no-progress: the runs' output is a pipe, where the demo prints plain lines.
PHASES = ("teacher", "student-CE", "student-KD", "student-GKD")
# One compilation per architecture instead of one per eager operation.
apply = jax.jit(_lm.apply, static_argnums=0)


# ----------------------------------------------------------------------------------------------
# The objective against independent references.
# ----------------------------------------------------------------------------------------------


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _reference_objective(logits, teacher_logits, tokens, *, kd_coef, temperature, beta):
  """float64 NumPy: next-token CE (labels = tokens[:, 1:]) and TRL's generalized JSD."""
  logits = np.asarray(logits, np.float64)[:, :-1]  # the last position has no next token.
  teacher_logits = np.asarray(teacher_logits, np.float64)[:, :-1]
  targets = np.asarray(tokens)[:, 1:]
  log_q_raw = _log_softmax64(logits)
  ce = -np.take_along_axis(log_q_raw, targets[..., None], axis=-1)[..., 0].mean()
  p = np.exp(_log_softmax64(teacher_logits / temperature))
  q = np.exp(_log_softmax64(logits / temperature))
  m = beta * p + (1 - beta) * q

  def kl(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0).sum(-1)

  jsd = (beta * kl(p, m) + (1 - beta) * kl(q, m)).mean()
  return (1 - kd_coef) * ce + kd_coef * jsd, ce, jsd


def _objective_inputs(seed=0, batch=2, seq=5, vocab=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, seq, vocab)).astype(np.float32)
  teacher = (2 * rng.normal(size=(batch, seq, vocab))).astype(np.float32)
  teacher[0, 1, 3] = -np.inf  # a vocabulary entry the teacher forbids
  tokens = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
  return logits, teacher, tokens


def test_distill_objective_matches_float64_reference_value_and_grad():
  logits, teacher, tokens = _objective_inputs()
  hp = dict(kd_coef=0.3, temperature=1.5)

  def loss(x):
    return _lm.distill_objective(x, teacher, tokens, divergence="generalized_jsd", **hp)[0]

  value, (ce, kd) = jax.jit(
      lambda x: _lm.distill_objective(x, teacher, tokens, divergence="generalized_jsd", **hp)
  )(logits)
  want, want_ce, want_kd = _reference_objective(logits, teacher, tokens, beta=0.5, **hp)
  np.testing.assert_allclose([value, ce, kd], [want, want_ce, want_kd], rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(loss))(logits)
  assert np.all(np.isfinite(grad))
  # Central differences of the float64 reference, entry by entry.
  eps, numeric = 1e-5, np.zeros(logits.shape)
  for index in np.ndindex(logits.shape):
    up, down = logits.astype(np.float64), logits.astype(np.float64)
    up[index] += eps
    down[index] -= eps
    numeric[index] = (_reference_objective(up, teacher, tokens, beta=0.5, **hp)[0]
                      - _reference_objective(down, teacher, tokens, beta=0.5, **hp)[0]) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, atol=2e-6)
  # The last position predicts past the end: no gradient reaches it.
  assert np.all(grad[:, -1] == 0)


def test_cross_entropy_matches_pytorch_causal_lm_shift():
  logits, _, tokens = _objective_inputs(seed=1)
  # The loss a Hugging Face causal LM computes: shift the logits left and the labels right.
  want = torch.nn.functional.cross_entropy(
      torch.tensor(logits[:, :-1]).reshape(-1, logits.shape[-1]).double(),
      torch.tensor(tokens[:, 1:]).reshape(-1).long())
  got = jax.jit(_lm.cross_entropy)(logits, tokens)
  np.testing.assert_allclose(got, want.item(), rtol=1e-6)


def test_objective_with_bfloat16_logits():
  logits, teacher, tokens = _objective_inputs(seed=2)
  hp = dict(kd_coef=0.5, divergence="generalized_jsd", temperature=1.0)
  low = jnp.asarray(logits, jnp.bfloat16)
  value, (ce, kd) = _lm.distill_objective(low, jnp.asarray(teacher, jnp.bfloat16), tokens, **hp)
  rounded = np.asarray(low.astype(jnp.float32))
  rounded_teacher = np.asarray(jnp.asarray(teacher, jnp.bfloat16).astype(jnp.float32))
  want = _reference_objective(rounded, rounded_teacher, tokens, beta=0.5, kd_coef=0.5,
                              temperature=1.0)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose([value, ce, kd], want, rtol=1e-5)
  grad = jax.grad(lambda x: _lm.distill_objective(x, teacher, tokens, **hp)[0])(low)
  assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))


def test_student_loss_is_the_reference_objective_of_both_models():
  config = _lm.ModelConfig(layers=1, dim=16, heads=1, max_len=8)
  graphdef, params = _lm.build(config, seed=0)
  teacher_graphdef, teacher_params = _lm.build(config, seed=1)
  hp = dict(kd_coef=0.6, temperature=2.0)
  loss_fn = _lm.make_loss_fn(graphdef, (teacher_graphdef, teacher_params),
                             divergence="generalized_jsd", **hp)
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  loss, logs = jax.jit(loss_fn)(params, tokens)
  # The logits of both models, then the float64 objective: the teacher sees the same tokens
  # and the labels are shifted once.
  logits = apply(graphdef, params, tokens)
  teacher_logits = apply(teacher_graphdef, teacher_params, tokens)
  want, want_ce, want_kd = _reference_objective(logits, teacher_logits, tokens, beta=0.5, **hp)
  np.testing.assert_allclose([loss, logs["ce"], logs["kd"]], [want, want_ce, want_kd],
                             rtol=1e-5)
  # The logged metrics, over the positions that have a next token, at the temperature.
  def tempered(x):
    x = np.asarray(x, np.float64)[:, :-1] / hp["temperature"]
    log_p = x - x.max(-1, keepdims=True)
    return log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))

  log_q, log_p = tempered(logits), tempered(teacher_logits)
  np.testing.assert_allclose(
      [logs["student_entropy"], logs["teacher_entropy"]],
      [-(np.exp(log_q) * log_q).sum(-1).mean(), -(np.exp(log_p) * log_p).sum(-1).mean()],
      rtol=1e-5)
  agree = np.argmax(log_q, -1) == np.argmax(log_p, -1)
  np.testing.assert_allclose(logs["top1_agreement"], agree.mean(), rtol=1e-6)
  assert set(_lm.make_loss_fn(graphdef)(params, tokens)[1]) == {"ce"}


# ----------------------------------------------------------------------------------------------
# Data and model.
# ----------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_split_by_whole_files():
  train, heldout, heldout_names = _lm.load_corpus()
  train2, heldout2, _ = _lm.load_corpus()
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(heldout, heldout2)
  names = [p.name for p in _lm.stdlib_files()]
  assert heldout_names and set(heldout_names) < set(names)
  assert len(heldout) < len(train)
  # A held-out file's text does not occur in the training text.
  sample = (_lm.stdlib_files()[names.index(heldout_names[0])].read_bytes())[:2000]
  assert sample in heldout.tobytes() and sample not in train.tobytes()


def test_byte_tokenizer_round_trip():
  text = "def f(x):\n  return 'héllo' + x  # ünïcode\n"
  tokens = _lm.encode(text)
  assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode())
  assert _lm.decode(tokens) == text


def test_training_batches_depend_only_on_seed_and_step():
  tokens = np.arange(1000, dtype=np.uint8)
  args = dict(batch_size=3, seq_len=10)
  a = _lm.train_batch(tokens, 7, seed=1, **args)
  np.testing.assert_array_equal(a, _lm.train_batch(tokens, 7, seed=1, **args))
  assert not np.array_equal(a, _lm.train_batch(tokens, 8, seed=1, **args))
  assert not np.array_equal(a, _lm.train_batch(tokens, 7, seed=2, **args))
  assert a.shape == (3, 10) and a.dtype == np.int32
  # Windows are contiguous text.
  np.testing.assert_array_equal(np.diff(a, axis=1) % 256, 1)


def test_transformer_is_causal():
  config = _lm.ModelConfig(layers=1, dim=16, heads=2, max_len=12)
  graphdef, params = _lm.build(config, seed=0)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)
  changed = tokens.copy()
  changed[:, 7:] = (changed[:, 7:] + 1) % 256
  logits = np.asarray(apply(graphdef, params, tokens))
  logits_changed = np.asarray(apply(graphdef, params, changed))
  assert logits.shape == (2, 12, 256)
  np.testing.assert_array_equal(logits[:, :7], logits_changed[:, :7])
  assert not np.allclose(logits[:, 7:], logits_changed[:, 7:])


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback.
# ----------------------------------------------------------------------------------------------


def _expect_usage_error(argv, capsys, *needles):
  with pytest.raises(SystemExit) as raised:
    distill_lm.parse_args(argv)
  assert raised.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error:" in err, err
  for needle in needles:
    assert needle in err, err
  return err


@pytest.mark.parametrize("argv, needles", [
    (["--teacher-steps", "-5"], ["--teacher-steps", "positive integer", "-5"]),
    (["--student-steps", "0"], ["--student-steps", "positive integer"]),
    (["--student-steps", "ten"], ["--student-steps", "'ten'"]),
    (["--kd-coef", "1.5"], ["--kd-coef", "[0, 1]", "1.5"]),
    (["--kd-coef", "-0.1"], ["--kd-coef", "[0, 1]"]),
    (["--kd-coef", "nan"], ["--kd-coef", "finite"]),
    (["--temperature", "0"], ["--temperature", "> 0"]),
    (["--temperature", "-1"], ["--temperature", "> 0"]),
    (["--divergence", "kl"], ["--divergence", "forward_kl"]),
    (["--teacher-dim", "100"], ["--teacher-dim", "multiple of --head-dim"]),
    (["--out", ""], ["--out", "missing"]),
    (["--out"], ["--out", "expected one argument"]),
    (["--seed", "-1"], ["--seed"]),
    (["--on-policy-fraction", "1.5"], ["--on-policy-fraction", "[0, 1]"]),
    (["--on-policy-beta", "-1"], ["--on-policy-beta", "[0, 1]"]),
    (["--on-policy-divergence", "jsd"], ["--on-policy-divergence", "generalized_jsd"]),
    (["--on-policy-divergence", "reverse_kl", "--on-policy-beta", "0.2"],
     ["--on-policy-beta (0.2)", "only by --on-policy-divergence generalized_jsd", "reverse_kl"]),
    (["--sample-temperature", "0"], ["--sample-temperature", "> 0"]),
    # Positive, but outside the float32 range the losses check (1 / T a finite, normal float32).
    (["--temperature", "1e-50"], ["--temperature", "normal float32", "got 1e-50"]),
    (["--temperature", "1e39"], ["--temperature", "normal float32", "got 1e+39"]),
    (["--sample-temperature", "1e-50"], ["--sample-temperature", "normal float32", "1e-50"]),
    (["--sample-temperature", "1e39"], ["--sample-temperature", "normal float32", "1e+39"]),
    (["--sample-length", "0"], ["--sample-length", "positive integer"]),
    (["--sample-length", "128"], ["--sample-length", "less than --seq-len"]),
])
def test_bad_flags_exit_2_with_one_line(argv, needles, capsys):
  _expect_usage_error(argv, capsys, *needles)


def test_on_policy_beta_goes_with_generalized_jsd_only(tmp_path):
  # The losses refuse a beta other than the default for a divergence that does not read it.
  out = ["--out", str(tmp_path / "run")]
  args = distill_lm.parse_args(["--on-policy-beta", "0.2"] + out)
  assert (args.on_policy_divergence, args.on_policy_beta) == ("generalized_jsd", 0.2)
  args = distill_lm.parse_args(["--on-policy-divergence", "reverse_kl"] + out)
  assert args.on_policy_beta == 0.5


@pytest.mark.parametrize("temperature", [
    1e-50, 1e-45, 2.9e-39, 2.95e-39, 3e-39, 1e-38, 1.2e-38, 1e-30, 0.5, 1.0, 1e30, 8.5e37, 8.52e37,
    1e38, 3e38, 1e39])
def test_temperature_flags_accept_exactly_what_the_losses_accept(temperature):
  # The reference is kdjax itself: a concrete temperature is checked at the call.
  logits = jnp.zeros((2, 4))
  try:
    kdjax.distill_loss(logits, logits, temperature=temperature)
    losses_accept = True
  except ValueError:
    losses_accept = False
  try:
    _cli.temperature(repr(temperature))
    flag_accepts = True
  except argparse.ArgumentTypeError:
    flag_accepts = False
  assert flag_accepts == losses_accept
  # By hand: 1 / T between float32's smallest normal, 2**-126, and its largest, (2 - 2**-23) *
  # 2**127 (no value above is within rounding of either end).
  assert losses_accept == (2.0**-126 <= 1 / temperature <= (2 - 2.0**-23) * 2.0**127)


def test_output_folder_under_a_file(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  _expect_usage_error(["--out", str(blocker / "run")], capsys, "--out", "cannot create")
  _expect_usage_error(["--out", str(blocker)], capsys, "--out", "not a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into a read-only folder")
def test_output_folder_read_only(tmp_path, capsys):
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o555)
  try:
    _expect_usage_error(["--out", str(folder)], capsys, "--out", "cannot write")
    _expect_usage_error(["--out", str(folder / "sub")], capsys, "--out", "cannot create")
  finally:
    folder.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_folder_on_a_pseudo_filesystem(capsys):
  # Refused even to root, unlike a chmod-ed folder.
  _expect_usage_error(["--out", "/proc"], capsys, "--out", "cannot write")
  _expect_usage_error(["--out", "/proc/kdjax_demo"], capsys, "--out", "cannot create")


def test_valid_flags_create_the_output_folder(tmp_path):
  args = distill_lm.parse_args(["--out", str(tmp_path / "new" / "run"), "--kd-coef", "0"])
  assert args.out.is_dir() and args.kd_coef == 0.0


def test_bad_flags_as_a_process_exit_2_without_traceback(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  for argv in (["--kd-coef", "2"], ["--out", str(blocker / "x")], ["--temperature", "1e-50"],
               ["--sample-temperature", "1e39"]):
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
  result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
  assert result.returncode == 0
  for flag in ("--teacher-steps", "--student-steps", "--teacher-dim", "--student-layers",
               "--divergence", "--temperature", "--kd-coef", "--out", "--on-policy-fraction",
               "--on-policy-divergence", "--sample-length", "--sample-temperature"):
    assert flag in result.stdout


def test_help_shows_every_default():
  parser = distill_lm.build_parser()
  options = [action for action in parser._actions
             if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)]
  assert all(action.help for action in options)  # the formatter adds defaults to help texts only
  assert parser.format_help().count("(default:") == len(options)


def test_quick_sets_small_defaults_that_explicit_flags_override(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  args = distill_lm.parse_args(["--quick"])
  for name, value in distill_lm.QUICK.items():
    assert getattr(args, name) == (pathlib.Path(value) if name == "out" else value), name
  args = distill_lm.parse_args(["--quick", "--student-steps", "7", "--out", "elsewhere"])
  assert args.student_steps == 7 and args.out == pathlib.Path("elsewhere")
  assert args.teacher_steps == distill_lm.QUICK["teacher_steps"]
  assert distill_lm.parse_args([]).teacher_steps == 500


@pytest.mark.parametrize("module", ["tqdm", "matplotlib", "optax", "orbax.checkpoint", "flax"])
def test_a_missing_optional_dependency_is_one_line_naming_the_extra(module, tmp_path):
  # The module is made unimportable (None in sys.modules), then the script runs as __main__.
  run = (f"import runpy, sys; sys.modules[{module!r}] = None; "
         f"sys.argv = [{str(SCRIPT)!r}, '--out', {str(tmp_path)!r}]; "
         f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
  result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
  assert result.returncode == 2, result
  assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
  assert f"{module!r} is missing" in result.stderr
  assert 'pip install "kdjax[examples]"' in result.stderr


# ----------------------------------------------------------------------------------------------
# End to end: outputs, and a run killed part-way then resumed equals an uninterrupted run.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
  """Environment of the demo subprocesses: a persistent compilation cache shared by them, so
  only the first run compiles (a cached executable is the same program, so results are
  unchanged)."""
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _run(out, env, *extra):
  return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY, *extra],
                        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
                        check=True)


@pytest.fixture(scope="module", autouse=True)
def _reference_process(tmp_path_factory, run_env):
  """Starts the uninterrupted tiny run when the module starts, so that its compilation overlaps
  the in-process tests above (XLA compiles on one core)."""
  out = tmp_path_factory.mktemp("uninterrupted")
  process = subprocess.Popen(
      [sys.executable, str(SCRIPT), "--out", str(out), *TINY], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, cwd=ROOT, env=run_env)
  yield out, process
  if process.poll() is None:
    process.kill()
  process.communicate()


@pytest.fixture(scope="module")
def reference_run(_reference_process):
  """The uninterrupted tiny run, finished: ``(output folder, stdout)``."""
  out, process = _reference_process
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr
  # Output to a pipe (a log): plain lines at each evaluation, no progress bar redrawn with "\r".
  assert "\r" not in stdout and "\r" not in stderr, stderr
  assert "student-KD step 4: train ce" in stdout, stdout
  return out, stdout


def _phase_folder(out, name):
  (folder,) = [p for p in out.iterdir() if p.name.startswith(name + "-")]
  return folder


def _final_state(out, name):
  import orbax.checkpoint as ocp

  folder = _phase_folder(out, name) / "checkpoints"
  with ocp.CheckpointManager(folder.absolute()) as manager:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), history=ocp.args.JsonRestore()))
  return step, restored.state, restored.history


def test_demo_writes_table_plot_and_histories(reference_run):
  out, stdout = reference_run
  table = (out / "results.md").read_text()
  for name in PHASES:
    assert f"| {name} |" in table and f"| {name} |" in stdout
  assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  results = json.loads((out / "results.json").read_text())
  rows = {row["model"]: row for row in results["rows"]}
  # The same token budget for every student, on-policy batches included.
  assert (rows["student-CE"]["tokens"] == rows["student-KD"]["tokens"]
          == rows["student-GKD"]["tokens"] == 12 * 4 * 32)
  assert rows["teacher"]["tokens"] == 8 * 4 * 32
  for name in PHASES:
    history = results["histories"][name]
    # Evaluations at step 0, every 4 steps, and at the end; the first is an untrained model's.
    assert history["step"] == ([0, 4, 8] if name == "teacher" else [0, 4, 8, 12])
    # The distilled students' last step's metrics at each evaluation (none at step 0); none
    # for the models trained on cross entropy alone.
    distilled = name in ("student-KD", "student-GKD")
    for metric in ("kd", "student_entropy", "teacher_entropy", "top1_agreement"):
      values = history[f"train_{metric}"]
      assert len(values) == len(history["step"]) and values[0] is None, (name, metric)
      assert all((v is not None) == distilled for v in values[1:]), (name, metric, values)
    if distilled:
      assert all(0 <= v <= 1 for v in history["train_top1_agreement"][1:])
      assert all(0 < v <= math.log(256) for v in history["train_student_entropy"][1:])
      line = re.search(rf"^{name} step 12: train ce [\d.]+, held-out [\d.]+, kd ([\d.]+), "
                       r"entropy student ([\d.]+) teacher ([\d.]+), top-1 agreement "
                       r"([\d.]+), [\d,]+ tokens/s$", stdout, flags=re.M)
      assert line, stdout
      assert [float(x) for x in line.groups()] == [round(history[f"train_{m}"][-1], n) for m, n in (
          ("kd", 4), ("student_entropy", 3), ("teacher_entropy", 3), ("top1_agreement", 3))]
    else:
      assert re.search(rf"^{name} step {history['step'][-1]}: train ce [\d.]+, held-out "
                       r"[\d.]+, [\d,]+ tokens/s$", stdout, flags=re.M), stdout
    assert math.log(256) - 0.5 < history["heldout_loss"][0] < math.log(256) + 1.0
    assert history["heldout_loss"][-1] == rows[name]["loss"]
    assert history["heldout_loss"][-1] < history["heldout_loss"][0] - 0.3  # it learns
    assert f"{rows[name]['loss']:.4f} | {math.exp(rows[name]['loss']):.3f}" in table
    # The teacher's mean log-likelihood of the model's 8-byte continuations of held-out
    # prompts: a log-probability per byte, at most 0 and above an untrained model's ~ -log 256.
    assert -math.log(256) - 1.5 < rows[name]["sample_log_likelihood"] < 0
    assert 0 < rows[name]["sample_log_likelihood_se"] < 1
    assert (f"| {rows[name]['sample_log_likelihood']:.4f} "
            f"± {rows[name]['sample_log_likelihood_se']:.3f} |") in table
  assert "teacher log-likelihood of samples (nats/byte, ± s.e.)" in table.splitlines()[0]
  # Same student seed: the three students start from the same parameters.
  assert len({results["histories"][name]["heldout_loss"][0] for name in PHASES[1:]}) == 1
  # The on-policy student differs from the off-policy one only by its sampled batches.
  assert (results["histories"]["student-GKD"]["heldout_loss"][1:]
          != results["histories"]["student-KD"]["heldout_loss"][1:])
  assert "generalized_jsd" in table or "generalized_jsd" in results["setting"]
  assert "student-GKD: 0.5 of its batches are its own 8-byte continuations" in results["setting"]
  config = json.loads((_phase_folder(out, "student-GKD") / "config.json").read_text())
  assert config["on_policy"] == dict(fraction=0.5, sample_length=8, sample_temperature=1.0,
                                     divergence="generalized_jsd", beta=0.5, temperature=2.0)


def test_no_on_policy_fraction_reuses_the_other_phases_and_drops_the_on_policy_row(
    reference_run, run_env, tmp_path):
  reference_out, _ = reference_run
  out = tmp_path / "copy"
  shutil.copytree(reference_out, out)
  result = _run(out, run_env, "--on-policy-fraction", "0")
  for name in PHASES[:-1]:
    # The on-policy flags are not part of the other phases' settings.
    assert f"{name}: loaded the finished checkpoint" in result.stdout
  table = (out / "results.md").read_text()
  assert "| student-KD |" in table and "student-GKD" not in table
  reference_rows = (reference_out / "results.md").read_text().splitlines()[:5]
  assert table.splitlines()[:5] == reference_rows


def test_killed_run_resumes_to_the_same_parameters(reference_run, run_env, tmp_path):
  reference_out, _ = reference_run
  out = tmp_path / "interrupted"
  # Slow steps of the last student (the on-policy one) widen the window: the kill lands after
  # its checkpoint at step 6 (and that checkpoint's digest) and before its last step (12),
  # possibly in the middle of writing a later checkpoint.
  process = subprocess.Popen(
      [sys.executable, str(SCRIPT), "--out", str(out), *TINY, "--step-sleep", "0.3"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=run_env)
  deadline = time.monotonic() + 240
  try:
    while True:
      assert process.poll() is None, "the run ended before it could be killed"
      assert time.monotonic() < deadline, "no student-GKD checkpoint (and digest) at step 6 in time"
      if list(out.glob("student-GKD-*/checkpoint_digests/6.json")):
        break
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  assert not (out / "results.md").exists()
  killed_step, _, _ = _final_state(out, "student-GKD")
  assert 6 <= killed_step < 12

  resumed = _run(out, run_env)
  # The on-policy schedule and its sampling keys are functions of the step: nothing else to
  # restore for the resumed phase to draw the same samples.
  assert "student-GKD: resuming from the checkpoint at step" in resumed.stdout
  assert "teacher: loaded the finished checkpoint at step 8" in resumed.stdout
  assert "student-CE: loaded the finished checkpoint at step 12" in resumed.stdout
  assert "student-KD: loaded the finished checkpoint at step 12" in resumed.stdout
  for name in PHASES:
    step, state, history = _final_state(out, name)
    want_step, want_state, want_history = _final_state(reference_out, name)
    assert step == want_step
    # Bit-for-bit: same batches, same restored optimizer state, same deterministic CPU program.
    jax.tree.map(np.testing.assert_array_equal, state, want_state)
    assert history == want_history
  assert (out / "results.md").read_text() == (reference_out / "results.md").read_text()
