"""benchmarks/bench_compile.py runs: ``--quick`` (the smallest shape, one repetition). No timing
is checked; the table's rows and ratios are."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_run_prints_every_row():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"), "--quick"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=True)
  out = result.stdout
  for step in ("kd_loss", "fused head"):
    row = re.search(rf"^\| {step} \| 256 x 128 \| (.*) \|$", out, flags=re.M)
    assert row, out + result.stderr
    trace, plain, ratio, total, plain_total, total_ratio = row.group(1).split(" | ")
    assert float(trace) > 0 and float(plain) > 0 and float(total) >= float(trace)
    # The ratios are kdjax over plain (of the unrounded times printed rounded).
    for value, over, printed in ((trace, plain, ratio), (total, plain_total, total_ratio)):
      assert printed.endswith("x")
      assert abs(float(printed[:-1]) - float(value) / float(over)) <= 0.05 * float(
          printed[:-1]) + 0.02, row.group(0)
