"""benchmarks/bench_cache.py runs on a tiny cache and reports what each format detects."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cache  # noqa: E402


def test_tiny_run_prints_a_row_per_format(capsys):
  bench_cache.main(["--tokens", "4096", "--k", "4", "--batch-tokens", "512",
                    "--record-tokens", "256", "--draws", "2", "--repeats", "1"])
  out = capsys.readouterr().out
  speed_table = out.split("\n\n")[1]  # the first table: speed and damage detection
  rows = {line.split(" | ")[0].lstrip("| "): line for line in speed_table.splitlines()[2:]}
  # The hand-written format notices a flipped data byte and a truncated shard.
  assert rows["kdjax shards"].endswith("| yes (TeacherCacheError) | yes (TeacherCacheError) |")
  # NumPy files carry no checksum: the flipped byte comes back as data.
  assert "| no: wrong data returned | yes" in rows["npy (memory map)"], out
  for name, module in (("safetensors", "safetensors"), ("array_record", "array_record")):
    installed = importlib.util.find_spec(module) is not None
    assert ("not installed" in rows[name]) != installed, out
