"""benchmarks/bench_accelerator.py runs: ``--smoke`` (tiny shapes, CPU, kernels interpreted)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_prints_every_table():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "bench_accelerator.py"), "--smoke"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=True)
  out = result.stdout
  assert "Copy bandwidth" in out and "failed" not in out, out + result.stderr
  for loss in ("kd_loss", "forward_kl", "reverse_kl", "generalized_jsd"):
    for implementation in ("reference", "blocked", "pallas"):
      assert f"| {loss} | {implementation} |" in out, out
  for variant in ("fused", "materialised", "matmuls"):
    assert f"| {variant} |" in out, out
