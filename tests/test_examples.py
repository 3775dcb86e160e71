"""The user-facing example scripts run and do what they claim."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import optax_train_step  # noqa: E402


def test_optax_train_step_loss_falls():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "optax_train_step.py"), "--steps", "60"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  last = result.stdout.strip().splitlines()[-1]
  assert "(falling)" in last, result.stdout
  assert result.stdout.split()[:5] == ["step", "loss", "ce", "kd", "combined"], result.stdout
  # The hand-written objective and distill_with_cross_entropy agree at every printed step.
  for line in result.stdout.splitlines()[1:-1]:
    _, loss, _, _, combined = line.split()
    assert abs(float(loss) - float(combined)) < 1e-4, line


def test_optax_train_step_check_raises_on_a_mismatch():
  optax_train_step.check_agreement(3, 2.5, 2.5 + 1e-6)
  with pytest.raises(AssertionError, match="step 3: the hand-written objective is 2.500000"):
    optax_train_step.check_agreement(3, 2.5, 2.51)
  with pytest.raises(AssertionError):
    optax_train_step.check_agreement(3, 2.5, float("nan"))


def test_sharded_train_step_matches_shard_map_and_falls():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "sharded_train_step.py")],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  lines = result.stdout.splitlines()
  via_shard_map = next(float(line.split()[-1]) for line in lines if "via shard_map" in line)
  gspmd = [float(line.split()[-1]) for line in lines if "(GSPMD train step)" in line]
  assert abs(via_shard_map - gspmd[0]) < 1e-5, result.stdout
  assert gspmd[-1] < gspmd[0], result.stdout
  assert "still sharded as P(None, 'model')" in result.stdout


def test_cross_tokenizer_quick_run_prints_its_table():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "cross_tokenizer.py"), "--quick"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  rows = [[cell.strip() for cell in line.strip("|").split("|")]
          for line in result.stdout.splitlines() if line.startswith("| cross entropy")]
  assert [row[0] for row in rows] == ["cross entropy", "cross entropy + 1 x ULD"], result.stdout
  (_, bits, uld), (_, bits_with_uld, uld_with_uld) = rows
  assert all(0 < float(x) < 8 for x in (bits, bits_with_uld)), result.stdout
  # The term it adds is what it lowers: the student's held-out ULD to the teacher.
  assert float(uld_with_uld) < float(uld), result.stdout


def test_nnx_fused_head_matches_the_logits_and_trains():
  # -W default shows every DeprecationWarning (flax's for Variable.value among them).
  result = subprocess.run(
      [sys.executable, "-W", "default::DeprecationWarning",
       str(ROOT / "examples" / "nnx_fused_head.py"), "--steps", "30"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  assert "== distill_with_cross_entropy on the logits" in result.stdout, result.stdout
  assert result.stdout.strip().endswith("(falling)"), result.stdout
  assert "DeprecationWarning" not in result.stderr, result.stderr


_BAD_FLAGS = {
    "optax_train_step.py": ["--steps", "0"],
    "nnx_fused_head.py": ["--kd-coef", "1.5"],
    "cross_tokenizer.py": ["--student-steps", "0"],
    "teacher_cache.py": ["--steps", "-3"],
    "sharded_train_step.py": ["--bogus"],
    "distill_lm.py": ["--temperature", "-1"],
}


@pytest.mark.parametrize("script", sorted(_BAD_FLAGS))
def test_every_example_has_help_and_rejects_a_bad_flag_in_one_line(script):
  path = str(ROOT / "examples" / script)
  shown = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
  assert shown.returncode == 0 and shown.stdout.startswith("usage:"), shown.stderr[-2000:]
  if "--steps" in shown.stdout:
    assert "(default:" in shown.stdout, shown.stdout
  refused = subprocess.run([sys.executable, path, *_BAD_FLAGS[script]], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
  assert refused.returncode == 2, refused.stderr[-2000:]
  assert refused.stderr.count("\n") == 1 and "error:" in refused.stderr, refused.stderr
  assert refused.stdout == "", refused.stdout
