"""Tests for kdjax/_src/cache.py: the offline teacher cache."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kdjax._src import cache
from kdjax._src.cache import (
    TeacherCacheError,
    open_teacher_cache,
    read_teacher_cache,
    write_teacher_cache,
)
from kdjax._src.sparse import sparse_distill_loss, topk_teacher

ROOT = pathlib.Path(__file__).resolve().parents[1]


def teacher_batches(num_batches, batch_shape, vocab, k, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_batches):
    logits = (rng.normal(size=batch_shape + (vocab,)) * 3).astype(np.float32)
    logits[..., -1] = -np.inf  # a padded vocabulary entry: some stored logprobs are -inf
    ids, logprobs = topk_teacher(logits, k)
    out.append((np.asarray(ids), np.asarray(logprobs)))
  return out


@pytest.mark.parametrize("logprob_dtype, storage, rel", [
    ("float16", np.float16, 2.0**-11), ("bfloat16", ml_dtypes.bfloat16, 2.0**-8)])
def test_round_trip_is_exact_within_storage_precision(tmp_path, logprob_dtype, storage, rel):
  batches = teacher_batches(5, (2, 3), vocab=12, k=12)
  info = write_teacher_cache(tmp_path, batches, vocab_size=12, logprob_dtype=logprob_dtype,
                             tokens_per_shard=4, temperature=2.0, metadata={"teacher": "t"})
  assert info.num_tokens == 30 and info.k == 12 and info.temperature == 2.0
  assert [s.num_tokens for s in info.shards] == [4] * 7 + [2]
  assert info.id_dtype == "uint8" and info.metadata == {"teacher": "t"}
  read = list(read_teacher_cache(tmp_path, batch_shape=(2, 3)))
  assert len(read) == 5
  for (ids, logprobs), (got_ids, got_logprobs) in zip(batches, read, strict=True):
    assert got_ids.dtype == np.int32 and got_ids.shape == (2, 3, 12)
    assert got_logprobs.dtype == storage
    np.testing.assert_array_equal(got_ids, ids)
    got = np.asarray(got_logprobs, np.float64)
    # -inf survives exactly; finite values are within half an ulp of the storage type.
    np.testing.assert_array_equal(np.isinf(got), np.isinf(logprobs))
    finite = np.isfinite(logprobs)
    np.testing.assert_allclose(got[finite], logprobs[finite], rtol=rel, atol=0)
    # And the exact rounding, as an independent cast would do it.
    np.testing.assert_array_equal(got_logprobs, logprobs.astype(storage))


def test_batches_span_shards_and_resume(tmp_path):
  batches = teacher_batches(3, (4, 5), vocab=300, k=3, seed=1)
  info = write_teacher_cache(tmp_path, batches, vocab_size=300, temperature=1.0,
                             tokens_per_shard=7)
  assert info.id_dtype == "uint16" and info.bytes_per_token == 3 * (2 + 2)
  all_ids = np.concatenate([ids.reshape(-1, 3) for ids, _ in batches])
  read = [ids for ids, _ in read_teacher_cache(tmp_path, batch_shape=(2, 5))]
  assert len(read) == 6
  np.testing.assert_array_equal(np.concatenate([r.reshape(-1, 3) for r in read]), all_ids)
  resumed = [ids for ids, _ in read_teacher_cache(tmp_path, batch_shape=(2, 5), start_token=30)]
  np.testing.assert_array_equal(np.concatenate([r.reshape(-1, 3) for r in resumed]),
                                all_ids[30:])
  # A final partial batch: dropped by default, yielded with whole rows otherwise.
  assert len(list(read_teacher_cache(tmp_path, batch_shape=(4, 5), start_token=50))) == 0
  (tail,) = read_teacher_cache(tmp_path, batch_shape=(4, 5), start_token=50,
                               drop_remainder=False)
  np.testing.assert_array_equal(tail[0].reshape(-1, 3), all_ids[50:])
  assert tail[0].shape == (2, 5, 3)
  with pytest.raises(ValueError, match="do not fill whole rows"):
    list(read_teacher_cache(tmp_path, batch_shape=(4, 7), drop_remainder=False))


def test_cached_teacher_gives_the_same_loss(tmp_path):
  rng = np.random.default_rng(2)
  teacher = rng.normal(size=(2, 4, 40)).astype(np.float32)
  student = rng.normal(size=(2, 4, 40)).astype(np.float32)
  ids, logprobs = topk_teacher(teacher, 8)
  write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=40, temperature=1.0)
  ((cached_ids, cached_logprobs),) = read_teacher_cache(tmp_path, batch_shape=(2, 4))
  for tail in ("renormalize", "zero", "bucket"):
    direct = sparse_distill_loss(student, ids, logprobs, tail=tail)
    cached = sparse_distill_loss(student, cached_ids, cached_logprobs, tail=tail)
    np.testing.assert_allclose(cached, direct, rtol=2e-3)


def test_id_dtype_and_bytes_per_token():
  assert cache.id_dtype(256) == np.uint8 and cache.id_dtype(257) == np.uint16
  assert cache.id_dtype(65536) == np.uint16 and cache.id_dtype(65537) == np.uint32
  assert cache.id_dtype(152064) == np.uint32
  assert cache.bytes_per_token(32, 152064) == 32 * 6
  assert cache.bytes_per_token(8, 256, logprob_dtype="bfloat16") == 8 * 3


def _write_small(path):
  return write_teacher_cache(path, teacher_batches(2, (3,), vocab=9, k=4), vocab_size=9,
                             temperature=1.0, tokens_per_shard=4)


def test_truncated_shard_raises(tmp_path):
  info = _write_small(tmp_path)
  shard = tmp_path / info.shards[1].file
  shard.write_bytes(shard.read_bytes()[:-5])
  with pytest.raises(TeacherCacheError, match=rf"{info.shards[1].file}' is truncated"):
    list(read_teacher_cache(tmp_path, batch_shape=(2,)))
  with pytest.raises(TeacherCacheError, match="is truncated"):
    cache.read_shard(info, 1)  # also caught when the file shrinks after opening


def test_corrupted_shard_raises(tmp_path):
  info = _write_small(tmp_path)
  shard = tmp_path / info.shards[0].file
  payload = bytearray(shard.read_bytes())
  payload[-1] ^= 0x01  # one flipped bit in a stored log-probability
  shard.write_bytes(bytes(payload))
  reader = read_teacher_cache(tmp_path, batch_shape=(2,))
  with pytest.raises(TeacherCacheError, match=rf"{info.shards[0].file}' is corrupted: its CRC"):
    next(reader)
  # verify=False skips the checksum (for speed) but still checks sizes.
  assert len(list(read_teacher_cache(tmp_path, batch_shape=(2,), verify=False))) == 3


def test_missing_or_corrupted_manifest_and_missing_shard(tmp_path):
  with pytest.raises(TeacherCacheError, match="is not a teacher cache, or its writer did not"):
    open_teacher_cache(tmp_path)
  info = _write_small(tmp_path)
  manifest_path = tmp_path / cache.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  manifest["num_tokens"] += 1
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(TeacherCacheError, match="token counts do not add up"):
    open_teacher_cache(tmp_path)
  manifest_path.write_text("{not json")
  with pytest.raises(TeacherCacheError, match="is corrupted"):
    open_teacher_cache(tmp_path)
  rewritten = write_teacher_cache(
      tmp_path, teacher_batches(2, (3,), vocab=9, k=4), vocab_size=9, temperature=1.0,
      tokens_per_shard=4, overwrite=True)
  # The same data in new files (each write names its shards afresh).
  assert [s[1:] for s in rewritten.shards] == [s[1:] for s in info.shards]
  assert not {s.file for s in rewritten.shards} & {s.file for s in info.shards}
  os.remove(tmp_path / rewritten.shards[-1].file)
  with pytest.raises(TeacherCacheError, match=rf"{rewritten.shards[-1].file}' is missing"):
    open_teacher_cache(tmp_path)


def test_writer_errors(tmp_path):
  _write_small(tmp_path)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    _write_small(tmp_path)
  other = tmp_path / "other"
  ids = np.zeros((2, 3), np.int32)
  logprobs = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"ids must be in \[0, vocab_size=5\)"):
    write_teacher_cache(other, [(ids + 5, logprobs)], vocab_size=5, temperature=1.0)
  with pytest.raises(ValueError, match="k changed from 3 to 2"):
    write_teacher_cache(other, [(ids, logprobs), (ids[:, :2], logprobs[:, :2])], vocab_size=5,
                        temperature=1.0)
  with pytest.raises(ValueError, match="same shape"):
    write_teacher_cache(other, [(ids, logprobs[:, :2])], vocab_size=5, temperature=1.0)
  with pytest.raises(TypeError, match="ids must be integers"):
    write_teacher_cache(other, [(logprobs, logprobs)], vocab_size=5, temperature=1.0)
  with pytest.raises(ValueError, match="logprob_dtype must be one of"):
    write_teacher_cache(other, [(ids, logprobs)], vocab_size=5, temperature=1.0,
                        logprob_dtype="float8")
  with pytest.raises(ValueError, match="batches is empty"):
    write_teacher_cache(other, [], vocab_size=5, temperature=1.0)
  with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
    write_teacher_cache(other, [(ids, logprobs)], vocab_size=0, temperature=1.0)
  # No manifest is left behind by a failed write.
  with pytest.raises(TeacherCacheError, match="writer did not finish"):
    open_teacher_cache(other)


def test_temperature_is_required_and_recorded(tmp_path):
  teacher = np.random.default_rng(4).normal(size=(2, 3, 10)).astype(np.float32)
  batch = topk_teacher(teacher, 4, temperature=2.0)
  # No default: a cache of tempered log-probabilities is never silently recorded as 1.0.
  with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'temperature'"):
    write_teacher_cache(tmp_path, [batch], vocab_size=10)
  for bad, error in [("2.0", TypeError), (True, TypeError), (None, TypeError), (0.0, ValueError),
                     (-2.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError)]:
    with pytest.raises(error, match="temperature must be a"):
      write_teacher_cache(tmp_path, [batch], vocab_size=10, temperature=bad)
  assert not (tmp_path / cache.MANIFEST).exists()
  info = write_teacher_cache(tmp_path, [batch], vocab_size=10, temperature=np.float32(2.0))
  assert info.temperature == 2.0 and open_teacher_cache(tmp_path).temperature == 2.0
  assert json.loads((tmp_path / cache.MANIFEST).read_text())["temperature"] == 2.0


def test_bf16_jax_inputs_are_accepted(tmp_path):
  ids = jnp.array([[0, 1]], jnp.int32)
  logprobs = jnp.array([[-1.0, -2.5]], jnp.bfloat16)  # exact in bfloat16
  write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=2, temperature=1.0,
                      logprob_dtype="bfloat16")
  ((got_ids, got_logprobs),) = read_teacher_cache(tmp_path, batch_shape=(1,))
  np.testing.assert_array_equal(got_ids, [[0, 1]])
  assert got_logprobs.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(np.asarray(got_logprobs, np.float32), [[-1.0, -2.5]])


# ----------------------------------------------------------------------------------------------
# Hostile or damaged manifests: a TeacherCacheError naming the file and the field, nothing read
# from outside the cache folder, nothing yielded from counts the files cannot hold.
# ----------------------------------------------------------------------------------------------


def _edit_manifest(path, edit):
  manifest_path = path / cache.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  edit(manifest)
  manifest_path.write_text(json.dumps(manifest))


def _set_shard(index, **fields):
  def edit(manifest):
    manifest["shards"][index].update(fields)
  return edit


@pytest.mark.parametrize("verify", [True, False])
def test_manifest_cannot_point_outside_the_cache_folder(tmp_path, verify):
  folder = tmp_path / "cache"
  info = _write_small(folder)
  shard = info.shards[0]
  rng = np.random.default_rng(3)
  # Outside files: one of the shard's size (so only its CRC-32 could tell), one of another size.
  same_size = rng.integers(0, 256, shard.num_bytes, dtype=np.uint8).tobytes()
  other_size = rng.integers(0, 256, 12345, dtype=np.uint8).tobytes()
  (tmp_path / "same_size.bin").write_bytes(same_size)
  (tmp_path / "other_size.bin").write_bytes(other_size)
  secrets = ["12345", f"{zlib.crc32(same_size):#010x}", f"{zlib.crc32(other_size):#010x}"]
  outside = ["../same_size.bin", "../other_size.bin", str(tmp_path / "same_size.bin"),
             "../../x", "sub/shard-00000.bin", "./shard-00000.bin", "shard-00000.bin/",
             "shard-00000.bin.tmp", "", ".", ".."]
  for file in outside:
    _edit_manifest(folder, _set_shard(0, file=file))
    with pytest.raises(TeacherCacheError, match=r"shards\[0\]\.file") as raised:
      next(read_teacher_cache(folder, batch_shape=(2,), verify=verify))
    assert not any(secret in str(raised.value) for secret in secrets), raised.value
  # A shard that is a symbolic link to an outside file is not followed either.
  _edit_manifest(folder, _set_shard(0, file=shard.file))
  os.remove(folder / shard.file)
  os.symlink(tmp_path / "same_size.bin", folder / shard.file)
  with pytest.raises(TeacherCacheError, match="is not a regular file") as raised:
    next(read_teacher_cache(folder, batch_shape=(2,), verify=verify))
  assert not any(secret in str(raised.value) for secret in secrets), raised.value
  with pytest.raises(TeacherCacheError, match="is not a regular file"):
    cache.read_shard(info, 0, verify=verify)


def test_hostile_counts_are_rejected_before_reading(tmp_path):
  _write_small(tmp_path)
  (tmp_path / "shard-00009.bin").write_bytes(b"")

  def edit(manifest):
    # k = 0 and an empty shard that claims 10**15 tokens: "consistent" at 0 bytes per token.
    manifest.update(k=0, num_tokens=10**15)
    manifest["shards"] = [dict(file="shard-00009.bin", num_tokens=10**15, num_bytes=0, crc32=0)]

  _edit_manifest(tmp_path, edit)
  with pytest.raises(TeacherCacheError, match="field 'k' must be an integer in"):
    next(read_teacher_cache(tmp_path, batch_shape=(1,), verify=False))
  # With k >= 1 a count must match the bytes in the file.
  _edit_manifest(tmp_path, lambda manifest: manifest.update(k=4))
  with pytest.raises(TeacherCacheError, match=r"'shards\[0\].num_bytes' is 0 for 10{15}"):
    next(read_teacher_cache(tmp_path, batch_shape=(1,), verify=False))
  with pytest.raises(TeacherCacheError, match="is truncated"):
    _edit_manifest(tmp_path, _set_shard(0, num_bytes=12 * 10**15))
    next(read_teacher_cache(tmp_path, batch_shape=(1,), verify=False))


def _shard_entry(index):
  return lambda manifest: manifest["shards"][index]


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(num_tokens="6"), "num_tokens"),
    (lambda m: m.update(num_tokens=6.0), "num_tokens"),
    (lambda m: m.update(num_tokens=1e15), "num_tokens"),
    (lambda m: m.update(num_tokens=-6), "num_tokens"),
    (lambda m: m.update(k=True), "k"),
    (lambda m: m.update(vocab_size=None), "vocab_size"),
    (lambda m: m.update(vocab_size=2**40), "vocab_size"),
    (lambda m: m.update(id_dtype="uint64"), "id_dtype"),
    (lambda m: m.update(logprob_dtype=["float16"]), "logprob_dtype"),
    (lambda m: m.update(temperature="2"), "temperature"),
    (lambda m: m.update(temperature=0), "temperature"),
    (lambda m: m.update(temperature=10**400), "temperature"),
    (lambda m: m.update(metadata=[1]), "metadata"),
    (lambda m: m.pop("shards"), "shards"),
    (lambda m: m.update(shards={"file": "shard-00000.bin"}), "shards"),
    (lambda m: m["shards"].__setitem__(0, ["shard-00000.bin", 4]), "shards[0]"),
    (lambda m: m["shards"][0].update(crc32="abc"), "shards[0].crc32"),
    (lambda m: m["shards"][0].update(crc32=2**32), "shards[0].crc32"),
    (lambda m: m["shards"][0].update(file=5), "shards[0].file"),
    (lambda m: m["shards"][0].update(file=None), "shards[0].file"),
    (lambda m: m["shards"][1].pop("num_bytes"), "shards[1].num_bytes"),
    (lambda m: m["shards"][1].update(num_tokens="2"), "shards[1].num_tokens"),
    (lambda m: m["shards"][1].update(num_tokens=0, num_bytes=0), "shards[1].num_tokens"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "shards[2].file"),
])
def test_malformed_manifest_names_the_file_and_the_field(tmp_path, edit, field):
  _write_small(tmp_path)
  _edit_manifest(tmp_path, edit)
  pattern = rf"manifest\.json.* is corrupted: field '{re.escape(field)}'"
  with pytest.raises(TeacherCacheError, match=pattern):
    open_teacher_cache(tmp_path)
  with pytest.raises(TeacherCacheError, match=pattern):
    next(read_teacher_cache(tmp_path, batch_shape=(2,), verify=False))


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"format": "kdjax-teacher-cache", "version": 1, "num_tokens": NaN}', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"format": "kdjax-teacher-cache", "version": true}', "is not a kdjax-teacher-cache"),
])
def test_unparseable_manifest_is_a_teacher_cache_error(tmp_path, text, message):
  _write_small(tmp_path)
  manifest_path = tmp_path / cache.MANIFEST
  if isinstance(text, bytes):
    manifest_path.write_bytes(text)
  else:
    manifest_path.write_text(text)
  with pytest.raises(TeacherCacheError, match=rf"manifest\.json.* {message}"):
    open_teacher_cache(tmp_path)


def test_manifest_that_is_a_folder_is_a_teacher_cache_error(tmp_path):
  (tmp_path / cache.MANIFEST).mkdir()
  with pytest.raises(TeacherCacheError, match=r"manifest\.json' is not a regular file"):
    open_teacher_cache(tmp_path)


def test_nan_logprobs_are_rejected_on_write_and_detected_on_read(tmp_path):
  ids = np.array([[0, 1], [2, 3]], np.int32)
  for bad in (np.nan, np.inf):
    logprobs = np.array([[-0.5, -1.0], [-0.25, bad]], np.float32)
    with pytest.raises(ValueError, match=r"batch 1: logprobs must be finite or -inf, got NaN"):
      write_teacher_cache(tmp_path / "w", [(ids, np.full((2, 2), -1.0)), (ids, logprobs)],
                          vocab_size=4, temperature=1.0)
  # A shard with a NaN and a matching CRC-32 (written by something else): corrupt on read.
  info = write_teacher_cache(tmp_path / "r", [(ids, -np.ones((2, 2), np.float32))],
                             vocab_size=4, temperature=1.0)
  shard = tmp_path / "r" / info.shards[0].file
  payload = bytearray(shard.read_bytes())
  payload[-2:] = np.array([np.nan], np.float16).tobytes()
  shard.write_bytes(bytes(payload))
  _edit_manifest(tmp_path / "r", _set_shard(0, crc32=zlib.crc32(bytes(payload))))
  for verify in (True, False):
    with pytest.raises(TeacherCacheError, match="is corrupted: it holds NaN or \\+inf"):
      next(read_teacher_cache(tmp_path / "r", batch_shape=(2,), verify=verify))


# ----------------------------------------------------------------------------------------------
# Writing is all or nothing, never touches files it did not write, and one writer at a time.
# ----------------------------------------------------------------------------------------------


def _snapshot(folder):
  """Every file in ``folder`` (but the writers' lock file) with its bytes."""
  return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != cache.LOCK_FILE}


def _assert_reads_back(folder, batches):
  read = list(read_teacher_cache(folder, batch_shape=batches[0][0].shape[:-1]))
  assert len(read) == len(batches)
  for (ids, logprobs), (got_ids, got_logprobs) in zip(batches, read, strict=True):
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_logprobs, logprobs.astype(np.float16))


def _raising_batches():
  yield from teacher_batches(2, (3,), vocab=9, k=4, seed=7)
  raise RuntimeError("the teacher crashed")


_GOOD = teacher_batches(1, (3,), vocab=9, k=4, seed=8)[0]


@pytest.mark.parametrize("batches, kwargs, error", [
    ([], dict(vocab_size=300), "batches is empty"),
    ([_GOOD, (_GOOD[0][:, :2], _GOOD[1][:, :2])], {}, "k changed from 4 to 2"),
    ([_GOOD], dict(metadata={"teacher": object()}), "metadata must be JSON-serialisable"),
    ([_GOOD], dict(metadata={"loss": float("nan")}), "metadata must be JSON-serialisable"),
    (_raising_batches(), {}, "the teacher crashed"),
])
def test_failed_overwrite_keeps_the_existing_cache(tmp_path, batches, kwargs, error):
  original = teacher_batches(2, (3,), vocab=9, k=4)
  write_teacher_cache(tmp_path, original, vocab_size=9, temperature=1.0, tokens_per_shard=4)
  before = _snapshot(tmp_path)
  kwargs = dict(dict(vocab_size=9, temperature=1.0, tokens_per_shard=1, overwrite=True), **kwargs)
  with pytest.raises((ValueError, TypeError, RuntimeError)) as raised:
    write_teacher_cache(tmp_path, batches, **kwargs)
  # The old cache is whole and readable, and the failed write left nothing behind.
  assert _snapshot(tmp_path) == before
  _assert_reads_back(tmp_path, original)
  assert error in str(raised.value)


_KILLED_WRITER = """
import sys, time
import numpy as np
from kdjax._src.cache import write_teacher_cache

def batches():
  for i in range(3):
    yield np.full((4, 2), i, np.int32), np.full((4, 2), -1.0, np.float32)
  print("3 shards written", flush=True)
  time.sleep(600)

write_teacher_cache(sys.argv[1], batches(), vocab_size=9, temperature=1.0, tokens_per_shard=4,
                    overwrite=True)
"""


def test_killed_overwrite_keeps_the_existing_cache_and_releases_the_lock(tmp_path):
  original = teacher_batches(2, (3,), vocab=9, k=4)
  write_teacher_cache(tmp_path, original, vocab_size=9, temperature=1.0, tokens_per_shard=4)
  before = _snapshot(tmp_path)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = writer.stdout.readline()
    assert line == "3 shards written\n", writer.communicate(timeout=60)
    # While it writes, the old cache reads as before and a second writer is refused at once.
    _assert_reads_back(tmp_path, original)
    with pytest.raises(TeacherCacheError, match="another writer is writing a teacher cache"):
      write_teacher_cache(tmp_path, original, vocab_size=9, temperature=1.0, overwrite=True)
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=60)
  assert writer.returncode == -signal.SIGKILL
  after = _snapshot(tmp_path)
  new_files = sorted(set(after) - set(before))
  assert len(new_files) == 3 and all(name.startswith("shard-") for name in new_files), after
  assert {name: after[name] for name in before} == before
  _assert_reads_back(tmp_path, original)
  # The killed writer's lock died with it: the next write goes through.
  replacement = teacher_batches(1, (5,), vocab=9, k=4, seed=9)
  write_teacher_cache(tmp_path, replacement, vocab_size=9, temperature=1.0, overwrite=True)
  _assert_reads_back(tmp_path, replacement)


def test_a_second_writer_in_the_same_folder_fails_clearly(tmp_path):
  batch = teacher_batches(1, (3,), vocab=9, k=4)[0]

  def batches_racing_a_second_writer():
    yield batch
    with pytest.raises(TeacherCacheError, match="another writer is writing a teacher cache"):
      write_teacher_cache(tmp_path, [batch], vocab_size=9, temperature=1.0, overwrite=True)
    yield batch

  info = write_teacher_cache(tmp_path, batches_racing_a_second_writer(), vocab_size=9,
                             temperature=1.0, tokens_per_shard=1)
  assert info.num_tokens == 6
  _assert_reads_back(tmp_path, [batch, batch])


def test_writer_never_removes_files_it_did_not_write(tmp_path):
  user_files = {"shard-00042.bin": b"mine", "shard-00000.bin": b"also mine",
                "shard-00001.bin.tmp": b"mine too", "notes.txt": b"keep"}
  for name, data in user_files.items():
    (tmp_path / name).write_bytes(data)
  first = write_teacher_cache(tmp_path, teacher_batches(2, (3,), vocab=9, k=4), vocab_size=9,
                              temperature=1.0, tokens_per_shard=4)
  assert {name: _snapshot(tmp_path)[name] for name in user_files} == user_files
  # Overwriting removes the old cache's own shards, and only those.
  second = write_teacher_cache(tmp_path, teacher_batches(1, (3,), vocab=9, k=4), vocab_size=9,
                               temperature=1.0, overwrite=True)
  after = _snapshot(tmp_path)
  assert set(after) == set(user_files) | {cache.MANIFEST} | {s.file for s in second.shards}
  assert {name: after[name] for name in user_files} == user_files
  assert not any((tmp_path / s.file).exists() for s in first.shards)
  # A manifest that is unreadable lists nothing: nothing but the manifest is replaced.
  (tmp_path / cache.MANIFEST).write_text("{not json")
  third = write_teacher_cache(tmp_path, teacher_batches(1, (3,), vocab=9, k=4), vocab_size=9,
                              temperature=1.0, overwrite=True)
  assert set(_snapshot(tmp_path)) == set(after) | {s.file for s in third.shards}


def test_writer_never_replaces_a_file_with_a_shard_name(tmp_path, monkeypatch):
  # A user's file that happens to carry the first write id drawn: the writer draws another.
  ids = iter(["0000beef", "0000cafe"])
  monkeypatch.setattr(cache.secrets, "token_hex", lambda nbytes: next(ids))
  (tmp_path / "shard-0000beef-00000.bin").write_bytes(b"mine")
  info = write_teacher_cache(tmp_path, teacher_batches(1, (3,), vocab=9, k=4), vocab_size=9,
                             temperature=1.0)
  assert [s.file for s in info.shards] == ["shard-0000cafe-00000.bin"]
  assert (tmp_path / "shard-0000beef-00000.bin").read_bytes() == b"mine"


def test_teacher_cache_example_runs(tmp_path):
  # A few steps on little text: the caches are written, checked and read back by the example.
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "teacher_cache.py"), "--steps", "3",
       "--teacher-bytes", "200000", "--student-bytes", "16388", "--heldout-bytes", "2052",
       "--keep-cache", str(tmp_path)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
  assert "| 128 | bucket |" in result.stdout, result.stdout
  for k in (8, 32, 128):
    info = open_teacher_cache(tmp_path / f"k{k}")
    # 16384 of the 16388 student bytes: whole [4, 256] batches after 4 bytes of context.
    assert info.k == k and info.temperature == 1.0 and info.num_tokens == 16384
