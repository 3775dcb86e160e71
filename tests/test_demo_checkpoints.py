"""The demo's checkpoints (``examples/_lm.py``): every saved step has a SHA-256 digest, and a step
that fails it (flipped bytes, a truncated file, no digest) is never restored: it is skipped with
one warning line and the run resumes from the step before, as an uninterrupted run would."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _lm  # noqa: E402

TOKENS = np.frombuffer(bytes(range(256)) * 8, np.uint8)
HELDOUT = [np.arange(32, dtype=np.int32).reshape(2, 16)]
WARNING = "tiny: warning: skipping the checkpoint at step"


def _phase(folder: pathlib.Path) -> _lm.Phase:
  # Checkpoints at steps 3, 6 and 9; a phase compiles and runs in a few seconds.
  return _lm.Phase(
      name="tiny", folder=folder, model=_lm.ModelConfig(layers=1, dim=16, heads=1, max_len=16),
      steps=9, batch_size=2, seq_len=16, learning_rate=1e-2, seed=0, eval_every=3,
      checkpoint_every=3)


def _train(folder):
  return _lm.train(_phase(folder), TOKENS, HELDOUT, progress=False)


def _train_killed_before_step_9(folder):
  """A run with checkpoints at steps 3 and 6 that has 3 steps left to do."""
  _train(folder)
  shutil.rmtree(folder / "checkpoints" / "9")
  (folder / "checkpoint_digests" / "9.json").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """``(params, history)`` of an uninterrupted run."""
  _, params, history = _train(tmp_path_factory.mktemp("reference"))
  return params, history


def _assert_same_run(got, reference):
  _, params, history = got
  # Bit for bit: same batches, same restored optimizer state, same deterministic CPU program.
  jax.tree.map(np.testing.assert_array_equal, params, reference[0])
  assert history == reference[1]


def _largest_file(step_folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in step_folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(path: pathlib.Path, count: int = 64) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _warnings(err: str) -> list[str]:
  return [line for line in err.splitlines() if WARNING in line]


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate])
def test_damaged_last_step_is_skipped_and_the_run_resumes_from_the_step_before(
    tmp_path, reference, damage, capsys):
  _train_killed_before_step_9(tmp_path)
  checkpoints, digests = tmp_path / "checkpoints", tmp_path / "checkpoint_digests"
  damaged = _largest_file(checkpoints / "6")
  damage(damaged)
  capsys.readouterr()
  resumed = _train(tmp_path)
  out, err = capsys.readouterr()
  _assert_same_run(resumed, reference)
  (warning,) = _warnings(err)
  name = damaged.relative_to(checkpoints / "6").as_posix()
  assert f"step 6: its file {name} does not match its SHA-256 digest" in warning, warning
  assert "Traceback" not in err
  assert "tiny: resuming from the checkpoint at step 3" in out
  # The damaged step is kept aside for inspection, and a good step 6 was saved in its place.
  assert (tmp_path / "unusable_checkpoints" / "step-6").is_dir()
  assert sorted(p.name for p in digests.iterdir()) == ["3.json", "6.json", "9.json"]
  assert _lm.step_problem(checkpoints, digests, 3) is None
  assert _lm.step_problem(checkpoints, digests, 6) is None
  _flip_bytes(_largest_file(checkpoints / "3"), count=1)
  assert "does not match its SHA-256 digest" in _lm.step_problem(checkpoints, digests, 3)


def test_no_good_step_starts_afresh_and_says_so(tmp_path, reference, capsys):
  _train_killed_before_step_9(tmp_path)
  _flip_bytes(_largest_file(tmp_path / "checkpoints" / "6"))
  (tmp_path / "checkpoint_digests" / "3.json").unlink(missing_ok=True)  # an interrupted save
  capsys.readouterr()
  restarted = _train(tmp_path)
  out, err = capsys.readouterr()
  warnings = _warnings(err)
  assert len(warnings) == 2 and "step 6: its file" in warnings[0], warnings
  assert "step 3: it has no digest (its save did not finish" in warnings[1], warnings
  assert "tiny: no usable checkpoint is left; starting from step 0" in out
  _assert_same_run(restarted, reference)


_RESUME = """
import pathlib, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_demo_checkpoints import HELDOUT, TOKENS, _phase
import _lm
_lm.train(_phase(pathlib.Path(sys.argv[3])), TOKENS, HELDOUT, progress=False)
"""


def test_truncated_checkpoint_gives_one_line_not_tracebacks(tmp_path):
  # In a separate process: a failed restore used to print hundreds of lines of tracebacks from
  # background threads, some of them at interpreter exit.
  _train_killed_before_step_9(tmp_path)
  _truncate(_largest_file(tmp_path / "checkpoints" / "6"))
  result = subprocess.run(
      [sys.executable, "-c", _RESUME, str(ROOT / "tests"), str(ROOT / "examples"), str(tmp_path)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(_warnings(result.stderr)) == 1, result.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "Error"):
    assert noise not in result.stderr, result.stderr[-3000:]
  assert "tiny: resuming from the checkpoint at step 3" in result.stdout


def _truncate_every_data_file(step_folder: pathlib.Path) -> int:
  """Halves every array data file of a saved step (TensorStore's ``d/`` chunk files)."""
  data = [p for p in step_folder.rglob("*") if p.is_file() and p.parent.name == "d"]
  for path in data:
    _truncate(path)
  return len(data)


def test_a_step_that_matches_its_digest_but_does_not_restore_gives_one_line(tmp_path):
  # A step whose files match their digest and still do not restore (a save that wrote bad
  # files, a checkpoint of another model): orbax fails in the middle of reading many arrays at
  # once. That used to print dozens of "Event loop is closed" tracebacks from TensorStore's
  # threads after the warning.
  _train_killed_before_step_9(tmp_path)
  checkpoints, digests = tmp_path / "checkpoints", tmp_path / "checkpoint_digests"
  assert _truncate_every_data_file(checkpoints / "6") > 1
  _lm.record_step_digest(checkpoints, digests, 6)
  assert _lm.step_problem(checkpoints, digests, 6) is None
  result = subprocess.run(
      [sys.executable, "-c", _RESUME, str(ROOT / "tests"), str(ROOT / "examples"), str(tmp_path)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  (warning,) = _warnings(result.stderr)
  assert "step 6: it does not restore" in warning, warning
  assert result.stderr.count("\n") == 1, result.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "never retrieved", "never awaited"):
    assert noise not in result.stderr, result.stderr[-3000:]
  assert "tiny: resuming from the checkpoint at step 3" in result.stdout
  assert (tmp_path / "unusable_checkpoints" / "step-6").is_dir()


def test_restore_loops_finish_their_tasks_and_drop_late_completions(caplog):
  # The pattern behind those tracebacks, without orbax: a gather in which one read fails while
  # another waits for a result that a worker thread delivers after the loop is closed.
  thread_errors = []
  previous_hook = threading.excepthook
  threading.excepthook = lambda args: thread_errors.append(args.exc_value)
  try:
    with _lm._loops_that_finish_their_tasks():
      loop = asyncio.new_event_loop()
      started = threading.Event()

      async def read_from_a_worker():
        future = loop.create_future()

        def worker():
          started.wait()
          time.sleep(0.2)
          loop.call_soon_threadsafe(future.set_result, "late")

        threading.Thread(target=worker).start()
        return await future

      async def failing_read():
        started.set()
        raise OSError("a truncated chunk")

      async def restore():
        return await asyncio.gather(read_from_a_worker(), failing_read())

      with pytest.raises(OSError, match="a truncated chunk"):
        loop.run_until_complete(restore())
      loop.close()
      assert not asyncio.all_tasks(loop)
    time.sleep(0.5)  # the worker delivers its result to the closed loop
    gc.collect()
  finally:
    threading.excepthook = previous_hook
  assert not thread_errors, thread_errors
  assert "never retrieved" not in caplog.text and "destroyed" not in caplog.text
  assert asyncio.get_event_loop_policy().__class__ is not _lm._DrainingEventLoopPolicy
