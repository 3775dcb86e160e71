"""The user-facing example scripts run and do what they claim."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_optax_train_step_loss_falls():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "optax_train_step.py"), "--steps", "60"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
  last = result.stdout.strip().splitlines()[-1]
  assert "(falling)" in last, result.stdout
  # The hand-written objective and distill_with_cross_entropy agree at every printed step.
  for line in result.stdout.splitlines()[1:-1]:
    _, loss, _, _, fused = line.split()
    assert abs(float(loss) - float(fused)) < 1e-4, line


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
