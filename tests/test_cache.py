"""Tests for kdjax/_src/cache.py: the offline teacher cache."""

import contextlib
import errno
import json
import math
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import threading
import zlib

import jax
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
  assert len(list(read_teacher_cache(tmp_path, batch_shape=(4, 5), start_token=40))) == 1
  (tail,) = read_teacher_cache(tmp_path, batch_shape=(4, 5), start_token=50,
                               drop_remainder=False)
  np.testing.assert_array_equal(tail[0].reshape(-1, 3), all_ids[50:])
  assert tail[0].shape == (2, 5, 3)
  # Rows of 5 tokens, read in batches of 7 rows: the last 60 - 35 = 25 tokens are 5 rows.
  (_, tail) = read_teacher_cache(tmp_path, batch_shape=(7, 5), drop_remainder=False)
  assert tail[0].shape == (5, 5, 3)


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
  ids = np.array([[0, 1, 2], [2, 3, 4]], np.int32)
  logprobs = np.full((2, 3), -2.0, np.float32)
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
    (lambda m: m.pop("batch_shape"), "batch_shape"),
    (lambda m: m.update(batch_shape=3), "batch_shape"),
    (lambda m: m.update(batch_shape=[]), "batch_shape"),
    (lambda m: m.update(batch_shape=[3.0]), "batch_shape"),
    (lambda m: m.update(batch_shape=[True]), "batch_shape"),
    (lambda m: m.update(batch_shape=[0]), "batch_shape"),
    (lambda m: m.update(batch_shape=[1] * 33), "batch_shape"),
    (lambda m: m.update(batch_shape=[7]), "batch_shape"),  # more than the 6 tokens
    (lambda m: m.update(batch_shape=[1, 4]), "batch_shape"),  # 6 tokens are not rows of 4
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
    # Batches that hold no token at all (a filter that drops everything) must not empty it.
    ([(np.zeros((0, 2), int), np.zeros((0, 2)))], dict(vocab_size=4), "nothing to cache"),
    ([(np.zeros((0, 5, 4), int), np.zeros((0, 5, 4)))] * 3, {}, "3 batches, each of size 0"),
    ([_GOOD, (_GOOD[0][:, :2], _GOOD[1][:, :2])], {}, "k changed from 4 to 2"),
    ([_GOOD], dict(metadata={"teacher": object()}), "metadata must be JSON-serialisable"),
    ([_GOOD], dict(metadata={"loss": float("nan")}), "metadata must be JSON-serialisable"),
    (_raising_batches(), {}, "the teacher crashed"),
    # Not a teacher's log-probabilities (see the test below): the old cache is kept.
    ([_GOOD, (_GOOD[0], np.exp(_GOOD[1]))], {}, "batch 1: logprobs[0] holds log-probabilities"),
    ([(_GOOD[0], np.log(np.full((3, 4), 0.3)))], {}, "batch 0: the probabilities exp(logprobs"),
    ([(np.zeros((3, 4), np.int32), _GOOD[1])], {}, "batch 0: ids[0] repeats id 0"),
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


def _raw_topk_logits(seed=0, shape=(2, 3), vocab=50, k=4):
  logits = np.random.default_rng(seed).normal(size=shape + (vocab,)).astype(np.float32) * 3 + 5
  values, ids = jax.lax.top_k(logits, k)
  return np.asarray(ids), np.asarray(values), logits


def test_values_that_are_not_log_probabilities_are_refused_with_a_hint(tmp_path):
  # Float64 reference for what the writer must refuse: each row's max > 0, or log-sum-exp > 0.
  ids, raw, logits = _raw_topk_logits()
  assert (raw.max(-1) > 1).all()
  original = teacher_batches(1, (3,), vocab=50, k=4)
  write_teacher_cache(tmp_path, original, vocab_size=50, temperature=1.0)
  before = _snapshot(tmp_path)
  probabilities = np.exp(np.asarray(topk_teacher(logits, 4)[1], np.float64))
  for logprobs, needles in [
      (raw, ["logprobs[0, 0] holds log-probabilities above 0", "look like raw logits",
             "jax.lax.top_k", "kdjax.topk_teacher"]),
      (probabilities, ["look like probabilities rather than their logarithms",
                       "kdjax.topk_teacher"]),
  ]:
    with pytest.raises(TeacherCacheError) as raised:
      write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=50, temperature=1.0,
                          overwrite=True)
    for needle in needles:
      assert needle in str(raised.value), raised.value
    assert "Nothing was written" in str(raised.value)
    assert _snapshot(tmp_path) == before
  _assert_reads_back(tmp_path, original)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_rounding_of_true_log_probabilities_is_accepted_and_more_is_refused(tmp_path, dtype):
  # k = 2 ids holding all the mass, log(0.5) each, rounded to the dtype: the sum's log may be a
  # little above 0, never by more than the rounding allows.
  ids = np.array([[0, 1], [2, 3]], np.int32)
  halves = np.full((2, 2), np.log(0.5)).astype(dtype)
  assert abs(np.log(np.exp(halves.astype(np.float64)).sum(-1))).max() < 2.0**-6
  info = write_teacher_cache(tmp_path / "ok", [(ids, halves)], vocab_size=4, temperature=1.0)
  assert info.num_tokens == 2
  # 0.6 + 0.6 = 1.2: the log of the sum, log(1.2) = 0.18, is beyond rounding in every dtype.
  over = np.full((2, 2), np.log(0.6)).astype(dtype)
  total = np.exp(over.astype(np.float64)).sum(-1)[0]
  with pytest.raises(TeacherCacheError, match=r"batch 0: the probabilities exp\(logprobs\[0\]\) "
                     rf"sum to {total:.6g} > 1"):
    write_teacher_cache(tmp_path / "over", [(ids, over)], vocab_size=4, temperature=1.0)
  assert not (tmp_path / "over" / cache.MANIFEST).exists()


def test_repeated_ids_within_a_token_are_refused(tmp_path):
  good = np.array([[[0, 1, 2], [3, 4, 0]]], np.int32)
  ids = np.array([[[0, 1, 2], [3, 4, 3]]], np.int32)  # token [0, 1] repeats id 3
  logprobs = np.full((1, 2, 3), -2.0, np.float32)
  with pytest.raises(TeacherCacheError, match=r"batch 1: ids\[0, 1\] repeats id 3 \(entries 0 "
                     r"and 2\).*distinct"):
    write_teacher_cache(tmp_path, [(good, logprobs), (ids, logprobs)], vocab_size=5,
                        temperature=1.0, tokens_per_shard=1)
  assert sorted(p.name for p in tmp_path.iterdir()) == [cache.LOCK_FILE]  # nothing written
  # -inf entries still need distinct ids: the student's side reads each id.
  logprobs[0, 1, 2] = -np.inf
  with pytest.raises(TeacherCacheError, match="repeats id 3"):
    write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=5, temperature=1.0)


_KILLED_WRITER = """
import sys, time
import numpy as np
from kdjax._src.cache import write_teacher_cache

def batches():
  for i in range(3):
    yield np.full((4, 2), i, np.int32) + [0, 3], np.full((4, 2), -1.0, np.float32)
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


# ----------------------------------------------------------------------------------------------
# The recorded batch shape: a read whose rows are not the written rows is an error, never
# misaligned batches; so are arguments that are not integers, and a read that yields nothing.
# ----------------------------------------------------------------------------------------------


def _write_in_batches_of_4x8(path):
  """80 tokens: two (4, 8) batches and a shorter last one, (2, 8)."""
  batches = (teacher_batches(2, (4, 8), vocab=9, k=3, seed=5)
             + teacher_batches(1, (2, 8), vocab=9, k=3, seed=6))
  return batches, write_teacher_cache(path, batches, vocab_size=9, temperature=1.0,
                                      tokens_per_shard=24)


def test_the_written_batch_shape_is_recorded(tmp_path):
  batches, info = _write_in_batches_of_4x8(tmp_path)
  manifest = json.loads((tmp_path / cache.MANIFEST).read_text())
  assert manifest["version"] == 2 and manifest["batch_shape"] == [4, 8]
  assert manifest["num_tokens"] == 80
  assert info.batch_shape == (4, 8) == open_teacher_cache(tmp_path).batch_shape
  # One token per batch ([k] arrays) is a stream of tokens: rows of ().
  single = write_teacher_cache(tmp_path / "single", [(np.arange(3), np.full(3, -2.0))] * 2,
                               vocab_size=9, temperature=1.0)
  assert single.batch_shape == (1,) and single.num_tokens == 2
  # Empty batches hold no rows: they neither set nor break the recorded shape.
  empty = (np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32))
  info = write_teacher_cache(tmp_path / "empty_first", [empty, *batches], vocab_size=9,
                             temperature=1.0)
  assert info.batch_shape == (4, 8) and info.num_tokens == 80


def test_batches_with_other_rows_are_refused_when_written(tmp_path):
  original = teacher_batches(2, (3,), vocab=9, k=4)
  write_teacher_cache(tmp_path, original, vocab_size=9, temperature=1.0)
  before = _snapshot(tmp_path)
  for shapes in [((4, 8), (4, 7)), ((4, 8), (32,)), ((8,), (2, 4))]:
    batches = [teacher_batches(1, shape, vocab=9, k=4)[0] for shape in shapes]
    with pytest.raises(ValueError, match=rf"batch 1: its token shape \({shapes[1][0]}"):
      write_teacher_cache(tmp_path, batches, vocab_size=9, temperature=1.0, overwrite=True)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("batch_shape", [(4, 7), (5, 9), (7,), (32,), (4, 8, 1), (2, 4, 8)])
def test_a_read_with_other_rows_than_written_is_an_error(tmp_path, batch_shape):
  _write_in_batches_of_4x8(tmp_path)
  # Raised by the call itself, before any batch is asked for.
  with pytest.raises(TeacherCacheError) as raised:
    read_teacher_cache(tmp_path, batch_shape=batch_shape)
  message = str(raised.value)
  assert "written in batches of token shape (4, 8)" in message, message
  assert f"batch_shape={batch_shape} was asked" in message, message
  assert "or (n, 8) for n rows per batch" in message, message


def test_a_read_with_the_written_rows_and_another_first_axis_is_aligned(tmp_path):
  batches, _ = _write_in_batches_of_4x8(tmp_path)
  rows = np.concatenate([ids.reshape(-1, 8, 3) for ids, _ in batches])  # 10 rows of 8
  for batch_shape, count in [((4, 8), 2), ((2, 8), 5), ((5, 8), 2), ((10, 8), 1)]:
    read = [ids for ids, _ in read_teacher_cache(tmp_path, batch_shape=batch_shape)]
    assert len(read) == count and read[0].shape == batch_shape + (3,)
    np.testing.assert_array_equal(np.concatenate(read), rows[:count * batch_shape[0]])
  (last,) = [ids for ids, _ in read_teacher_cache(tmp_path, batch_shape=(4, 8), start_token=64,
                                                     drop_remainder=False)]
  np.testing.assert_array_equal(last, rows[8:])  # the short last batch, as it was written
  with pytest.raises(TeacherCacheError, match=r"start_token=12 is inside a row .* multiple of 8"):
    read_teacher_cache(tmp_path, batch_shape=(2, 8), start_token=12)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(batch_shape=32), r"batch_shape must be a tuple of positive integers such as \(batch, "
     r"seq\), got 32 of type int \(for one axis: \(32,\)\)"),
    (dict(batch_shape=(4.5, 8)), r"got \(4\.5, 8\): axis 0 is 4\.5 of type float"),
    (dict(batch_shape=(True, 8)), r"got \(True, 8\): axis 0 is True of type bool"),
    (dict(batch_shape=(4, np.float32(8))), r"axis 1 is np\.float32\(8\.0\) of type float32"),
    (dict(batch_shape="48"), r"got '48' of type str"),
    (dict(batch_shape=None), r"got None of type NoneType"),
    (dict(batch_shape=(4, 8), start_token=2.5), r"start_token must be an integer .* got 2\.5 "
     r"of type float"),
    (dict(batch_shape=(4, 8), start_token=True), r"got True of type bool"),
    (dict(batch_shape=(4, 8), start_token=np.bool_(True)), r"of type bool"),
    (dict(batch_shape=(4, 8), start_token="8"), r"got '8' of type str"),
])
def test_batch_shape_and_start_token_must_be_integers(tmp_path, kwargs, pattern):
  _write_in_batches_of_4x8(tmp_path)
  with pytest.raises(TypeError, match=pattern):
    read_teacher_cache(tmp_path, **kwargs)
  # Checked before the folder is read: the same error where there is no cache.
  with pytest.raises(TypeError, match=pattern):
    read_teacher_cache(tmp_path / "missing", **kwargs)


def test_numpy_integers_are_integers(tmp_path):
  batches, _ = _write_in_batches_of_4x8(tmp_path)
  read = list(read_teacher_cache(tmp_path, batch_shape=(np.int64(2), np.int32(8)),
                                 start_token=np.uint8(16)))
  assert len(read) == 4 and read[0][0].shape == (2, 8, 3)
  np.testing.assert_array_equal(read[0][0], batches[0][0][2:])
  for bad in [(0, 8), (-2, 8), ()]:
    with pytest.raises(ValueError, match="batch_shape must be a non-empty tuple of positive"):
      read_teacher_cache(tmp_path, batch_shape=bad)
  for bad in (-8, 88):
    with pytest.raises(ValueError, match=r"start_token must be in \[0, num_tokens=80\]"):
      read_teacher_cache(tmp_path, batch_shape=(2, 8), start_token=bad)


def test_a_batch_larger_than_the_cache_is_an_error_not_an_empty_read(tmp_path):
  ids, logprobs = np.tile(np.arange(2, dtype=np.int32), (10, 1)), np.full((10, 2), -1.0)
  write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=4, temperature=1.0)
  with pytest.raises(TeacherCacheError, match=r"batch_shape=\(20,\) takes 20 tokens per batch, "
                     r"but .* holds 10 tokens from start_token=0 \(num_tokens=10\): the read "
                     r"would yield no batch.*drop_remainder=False"):
    read_teacher_cache(tmp_path, batch_shape=(20,))
  with pytest.raises(TeacherCacheError, match="holds 3 tokens from start_token=7"):
    read_teacher_cache(tmp_path, batch_shape=(4,), start_token=7)
  with pytest.raises(TeacherCacheError, match="holds 0 tokens from start_token=10"):
    read_teacher_cache(tmp_path, batch_shape=(1,), start_token=10, drop_remainder=False)
  # drop_remainder=False yields what there is, in one shorter batch.
  ((got_ids, _),) = read_teacher_cache(tmp_path, batch_shape=(20,), drop_remainder=False)
  assert got_ids.shape == (10, 2)
  assert len(list(read_teacher_cache(tmp_path, batch_shape=(10,)))) == 1


def _as_version_1(path):
  """The manifest a writer of format version 1 wrote: no batch_shape."""
  def edit(manifest):
    manifest["version"] = 1
    del manifest["batch_shape"]
  _edit_manifest(path, edit)


def test_a_version_1_cache_reads_with_any_batch_shape_as_before(tmp_path):
  batches, _ = _write_in_batches_of_4x8(tmp_path)
  _as_version_1(tmp_path)
  info = open_teacher_cache(tmp_path)
  assert info.batch_shape is None and info.num_tokens == 80
  all_ids = np.concatenate([ids.reshape(-1, 3) for ids, _ in batches])
  for batch_shape, start_token in [((4, 8), 0), ((5, 4), 4), ((7,), 3), ((2, 2, 2), 0)]:
    read = [ids for ids, _ in read_teacher_cache(tmp_path, batch_shape=batch_shape,
                                                  start_token=start_token)]
    tokens = math.prod(batch_shape)
    assert len(read) == (80 - start_token) // tokens
    np.testing.assert_array_equal(np.concatenate([r.reshape(-1, 3) for r in read]),
                                  all_ids[start_token:start_token + len(read) * tokens])
  with pytest.raises(ValueError, match="the last 5 cached tokens do not fill whole rows"):
    read_teacher_cache(tmp_path, batch_shape=(5, 3), drop_remainder=False)
  # Types and the empty read are checked as for a version-2 cache.
  with pytest.raises(TypeError, match="axis 0 is True"):
    read_teacher_cache(tmp_path, batch_shape=(True, 8))
  with pytest.raises(TeacherCacheError, match="would yield no batch"):
    read_teacher_cache(tmp_path, batch_shape=(81,))
  # A version the reader does not know is refused; version 3 names its kind.
  _edit_manifest(tmp_path, lambda manifest: manifest.update(version=4))
  with pytest.raises(TeacherCacheError, match=r"manifest of version 1, 2 or 3 .*version=4"):
    open_teacher_cache(tmp_path)
  _edit_manifest(tmp_path, lambda manifest: manifest.update(version=3, batch_shape=[4, 8]))
  with pytest.raises(TeacherCacheError, match="field 'kind' is missing"):
    open_teacher_cache(tmp_path)
  _edit_manifest(tmp_path, lambda manifest: manifest.update(kind="topk"))
  assert open_teacher_cache(tmp_path).batch_shape == (4, 8)  # version 3 of a top-k cache


# ----------------------------------------------------------------------------------------------
# Files that are not regular files never block the reader.
# ----------------------------------------------------------------------------------------------


def _returns_within(call, seconds=20.0):
  """``call()``'s exception, raised in a thread that must finish within ``seconds`` (a reader
  that blocks fails the test instead of hanging the suite)."""
  outcome = {}

  def run():
    try:
      call()
    except BaseException as error:  # noqa: BLE001  # reported to the test
      outcome["error"] = error

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  return thread, outcome


def _release_blocked_readers(fifo):
  # A reader blocked in open() on a FIFO returns once a writer opens it.
  with contextlib.suppress(OSError):
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("reader", [
    lambda path: open_teacher_cache(path),
    lambda path: read_teacher_cache(path, batch_shape=(2,)),
    lambda path: write_teacher_cache(path, teacher_batches(1, (3,), vocab=9, k=4), vocab_size=9,
                                     temperature=1.0, overwrite=True),
])
def test_a_fifo_manifest_is_refused_without_blocking(tmp_path, reader):
  _write_small(tmp_path)
  manifest = tmp_path / cache.MANIFEST
  os.remove(manifest)
  os.mkfifo(manifest)
  thread, outcome = _returns_within(lambda: reader(tmp_path))
  if thread.is_alive():
    _release_blocked_readers(manifest)
    thread.join(10)
    pytest.fail("the call blocked on a FIFO named manifest.json")
  assert isinstance(outcome.get("error"), TeacherCacheError), outcome
  assert re.search(r"manifest\.json' is not a regular file", str(outcome["error"]))
  assert stat.S_ISFIFO(os.lstat(manifest).st_mode)  # nothing replaced it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_shard_replaced_by_a_fifo_after_open_is_refused_without_blocking(tmp_path):
  info = _write_small(tmp_path)
  shard = tmp_path / info.shards[0].file
  os.remove(shard)
  os.mkfifo(shard)
  thread, outcome = _returns_within(lambda: cache.read_shard(info, 0))
  if thread.is_alive():
    _release_blocked_readers(shard)
    thread.join(10)
    pytest.fail("read_shard blocked on a FIFO shard")
  assert isinstance(outcome.get("error"), TeacherCacheError), outcome
  assert "is not a regular file (a FIFO)" in str(outcome["error"])


# ----------------------------------------------------------------------------------------------
# A full disk or a file-size limit: a TeacherCacheError naming the file, the old cache kept.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, hint", [
    (errno.ENOSPC, "No space left on device (ENOSPC); the disk or the quota is full"),
    (errno.EFBIG, "File too large (EFBIG); the file would exceed the file-size limit"),
    (errno.EIO, "Input/output error (EIO)"),
])
@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_a_disk_error_is_a_teacher_cache_error_naming_the_file(tmp_path, monkeypatch, code,
                                                               hint, target):
  original = teacher_batches(2, (3,), vocab=9, k=4)
  write_teacher_cache(tmp_path, original, vocab_size=9, temperature=1.0, tokens_per_shard=4)
  before = _snapshot(tmp_path)
  write = os.write
  written = []

  def failing_write(fd, data):
    # Shards hold ids < 9; the staged manifest is JSON, so its first byte is "{".
    if written or (bytes(data[:1]) == b"{") == (target == "manifest"):
      if not written:  # part of the file first: a partial file must be removed too
        written.append(write(fd, data[:len(data) // 2]))
        return written[-1]
      raise OSError(code, os.strerror(code))
    return write(fd, data)

  monkeypatch.setattr(cache.os, "write", failing_write)
  with pytest.raises(TeacherCacheError) as raised:
    write_teacher_cache(tmp_path, teacher_batches(3, (3,), vocab=9, k=4, seed=3), vocab_size=9,
                        temperature=1.0, tokens_per_shard=4, overwrite=True)
  monkeypatch.undo()
  message = str(raised.value)
  name = r"\.manifest-[0-9a-f]{8}\.json\.tmp" if target == "manifest" else (
      r"shard-[0-9a-f]{8}-00000\.bin")
  assert re.search(rf"cannot write '{re.escape(str(tmp_path))}/{name}': ", message), message
  assert hint in message and "a cache already in the folder is kept" in message, message
  assert written and _snapshot(tmp_path) == before  # partial files removed, nothing replaced
  _assert_reads_back(tmp_path, original)


_FILE_SIZE_LIMITED_WRITER = """
import resource, sys
import numpy as np
from kdjax._src.cache import TeacherCacheError, write_teacher_cache

resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
batches = [(np.tile(np.int32([1, 2]), (4096, 1)), np.full((4096, 2), -1.0, np.float32))]
try:
  write_teacher_cache(sys.argv[1], batches, vocab_size=9, temperature=1.0, overwrite=True)
except TeacherCacheError as error:
  print(error)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
def test_a_file_size_limit_is_a_teacher_cache_error_and_keeps_the_old_cache(tmp_path):
  # A real limit (RLIMIT_FSIZE, as `ulimit -f` sets): the 24 KiB shard cannot be written.
  original = teacher_batches(2, (3,), vocab=9, k=4)
  write_teacher_cache(tmp_path, original, vocab_size=9, temperature=1.0)
  before = _snapshot(tmp_path)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  result = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED_WRITER, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"cannot write '.*/shard-[0-9a-f]{8}-00000\.bin': File too large \(EFBIG\); "
                   r"the file would exceed the file-size limit", result.stdout), result.stdout
  assert _snapshot(tmp_path) == before
  _assert_reads_back(tmp_path, original)


def test_teacher_cache_example_runs(tmp_path):
  # A few steps on little text: the caches are written, checked and read back by the example.
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "teacher_cache.py"), "--quick",
       "--keep-cache", str(tmp_path)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, check=True)
  assert "| top-k | 128 | bucket |" in result.stdout, result.stdout
  # The student trained from the float32 hidden-state cache is the online-trained one exactly.
  assert "| hidden states, float32 | - | 384 | 16,384 | " in result.stdout, result.stdout
  row = next(line for line in result.stdout.splitlines()
             if line.startswith("| hidden states, float32 |"))
  assert row.endswith("| +0.00000 | 0 |"), row
  hidden = cache.open_hidden_state_cache(tmp_path / "neural-hidden-bfloat16")
  assert hidden.hidden_dtype == "bfloat16" and hidden.num_tokens == 16384
  assert hidden.batch_shape == (4, 256) and hidden.bytes_per_token == 96 * 2
  assert "| sampled | 8 | zero |" in result.stdout and "| sampled | 32 | zero |" in result.stdout
  for name, k in [("k8", 8), ("k32", 32), ("k128", 128), ("sampled8", 8), ("sampled32", 32)]:
    info = open_teacher_cache(tmp_path / name)
    # 16384 of the 16388 student bytes: whole [4, 256] batches after 4 bytes of context.
    assert info.k == k and info.temperature == 1.0 and info.num_tokens == 16384
  # A sampled cache holds draw frequencies: multiples of 1/8 that sum to one per token.
  _, logprobs = next(read_teacher_cache(tmp_path / "sampled8", batch_shape=(4, 256)))
  weights = np.exp(logprobs.astype(np.float64))
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=2e-3)
  np.testing.assert_allclose(weights * 8, np.round(weights * 8), atol=1e-2)


# ----------------------------------------------------------------------------------------------
# Hidden-state caches: the teacher's final hidden states per token and its output layer once,
# with the guarantees of the top-k cache.
# ----------------------------------------------------------------------------------------------


def hidden_batches(num_batches, batch_shape, hidden_size, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=batch_shape + (hidden_size,)).astype(dtype)
          for _ in range(num_batches)]


def _head(hidden_size=6, vocab=11, seed=1, dtype=np.float32):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(hidden_size, vocab)).astype(dtype)
  bias = rng.normal(size=vocab).astype(dtype)
  bias[-1] = -np.inf  # a padded vocabulary entry
  return kernel, bias


def _write_hidden(path, batches=None, **kwargs):
  kernel, bias = _head()
  batches = hidden_batches(2, (3,), 6) if batches is None else batches
  options = dict(teacher_kernel=kernel, teacher_bias=bias, softcap=30.0, tokens_per_shard=4)
  return cache.write_hidden_state_cache(path, batches, **dict(options, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_hidden_states_and_head_round_trip_exactly(tmp_path, dtype):
  batches = hidden_batches(5, (2, 3), 6, dtype)
  kernel, bias = _head(dtype=ml_dtypes.bfloat16)
  info = cache.write_hidden_state_cache(
      tmp_path, batches, teacher_kernel=kernel, teacher_bias=bias, logit_scale=0.5, softcap=30,
      tokens_per_shard=4, metadata={"teacher": "t"})
  assert info.num_tokens == 30 and info.hidden_size == 6 and info.vocab_size == 11
  assert info.hidden_dtype == np.dtype(dtype).name and info.batch_shape == (2, 3)
  assert info.bytes_per_token == 6 * np.dtype(dtype).itemsize and info.metadata == {"teacher": "t"}
  assert [s.num_tokens for s in info.shards] == [4] * 7 + [2]
  assert info.head.logit_scale == 0.5 and info.head.softcap == 30.0
  assert info.head.num_bytes == 6 * 11 * 2 + 11 * 2 == os.path.getsize(tmp_path / info.head.file)
  read = list(cache.read_hidden_state_cache(tmp_path, batch_shape=(2, 3)))
  assert len(read) == 5
  for written, got in zip(batches, read, strict=True):
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 3, 6)
    np.testing.assert_array_equal(got, written)  # bit for bit, in the given dtype
  head = cache.read_teacher_head(tmp_path)
  assert head.kernel.dtype == head.bias.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(head.kernel, kernel)
  np.testing.assert_array_equal(head.bias, bias)  # -inf kept
  assert (head.logit_scale, head.softcap) == (0.5, 30.0)
  # Resuming, shorter batches and the recorded rows, as for a top-k cache.
  resumed = list(cache.read_hidden_state_cache(tmp_path, batch_shape=(1, 3), start_token=21))
  np.testing.assert_array_equal(np.concatenate(resumed).reshape(-1, 6),
                                np.concatenate(batches).reshape(-1, 6)[21:])
  (last,) = cache.read_hidden_state_cache(tmp_path, batch_shape=(4, 3), start_token=24,
                                          drop_remainder=False)
  assert last.shape == (2, 3, 6)
  with pytest.raises(TeacherCacheError, match=r"written in batches of token shape \(2, 3\)"):
    cache.read_hidden_state_cache(tmp_path, batch_shape=(3, 2))
  with pytest.raises(TypeError, match="axis 0 is True"):
    cache.read_hidden_state_cache(tmp_path, batch_shape=(True, 3))
  # No bias, no scale, no cap: recorded as absent.
  plain = cache.write_hidden_state_cache(tmp_path / "plain", batches, teacher_kernel=kernel)
  assert plain.head.bias_dtype is None and plain.head.num_bytes == 6 * 11 * 2
  assert cache.read_teacher_head(tmp_path / "plain")[1:] == (None, None, None)


def test_hidden_state_manifests_are_version_3_and_top_k_ones_stay_version_2(tmp_path):
  _write_hidden(tmp_path / "hidden")
  manifest = json.loads((tmp_path / "hidden" / cache.MANIFEST).read_text())
  assert manifest["version"] == 3 and manifest["kind"] == "hidden_states"
  assert manifest["hidden_dtype"] == "float32" and manifest["head"]["bias_dtype"] == "float32"
  _write_small(tmp_path / "topk")
  manifest = json.loads((tmp_path / "topk" / cache.MANIFEST).read_text())
  assert manifest["version"] == 2 and "kind" not in manifest


def test_each_reader_refuses_the_other_kind(tmp_path):
  _write_hidden(tmp_path / "hidden")
  _write_small(tmp_path / "topk")
  for call in (lambda: open_teacher_cache(tmp_path / "hidden"),
               lambda: read_teacher_cache(tmp_path / "hidden", batch_shape=(2,))):
    with pytest.raises(TeacherCacheError, match="holds a teacher's hidden states .*"
                       "kdjax.read_hidden_state_cache"):
      call()
  for call in (lambda: cache.open_hidden_state_cache(tmp_path / "topk"),
               lambda: cache.read_hidden_state_cache(tmp_path / "topk", batch_shape=(2,)),
               lambda: cache.read_teacher_head(tmp_path / "topk")):
    with pytest.raises(TeacherCacheError, match="holds sparse .*kdjax.read_teacher_cache"):
      call()


def test_an_overwrite_replaces_a_cache_of_the_other_kind_and_only_its_files(tmp_path):
  (tmp_path / "notes.txt").write_bytes(b"keep")
  first = _write_small(tmp_path)
  hidden = _write_hidden(tmp_path, overwrite=True)
  assert not any((tmp_path / s.file).exists() for s in first.shards)
  assert set(_snapshot(tmp_path)) == {"notes.txt", cache.MANIFEST, *hidden.files}
  again = write_teacher_cache(tmp_path, teacher_batches(2, (3,), vocab=9, k=4), vocab_size=9,
                              temperature=1.0, overwrite=True)
  assert set(_snapshot(tmp_path)) == {"notes.txt", cache.MANIFEST, *again.files}
  assert not (tmp_path / hidden.head.file).exists()


_HIDDEN = hidden_batches(1, (3,), 6, seed=8)[0]


def _raising_hidden_batches():
  yield from hidden_batches(2, (3,), 6, seed=7)
  raise RuntimeError("the teacher crashed")


@pytest.mark.parametrize("batches, kwargs, error, message", [
    ([], {}, ValueError, "batches is empty"),
    ([np.zeros((0, 6), np.float32)] * 2, {}, ValueError, "2 batches, each of size 0"),
    (_raising_hidden_batches(), {}, RuntimeError, "the teacher crashed"),
    ([_HIDDEN[:, :5]], {}, ValueError, "batch 0: hidden states must have shape [..., "
     "hidden_size] with hidden_size = teacher_kernel.shape[0] = 6"),
    ([_HIDDEN, _HIDDEN.astype(ml_dtypes.bfloat16)], {}, TypeError,
     "batch 1: dtype bfloat16 differs from the first batch's float32"),
    ([_HIDDEN.astype(np.float64)], {}, TypeError,
     "batch 0 must be a bfloat16, float16 or float32 array"),
    ([(_HIDDEN, _HIDDEN)], {}, TypeError, "batch 0 must be one array, got a tuple"),
    ([_HIDDEN, np.where(np.arange(6) == 2, np.nan, _HIDDEN)], {}, ValueError,
     "batch 1: hidden states must be finite"),
    ([_HIDDEN.reshape(1, 3, 6), _HIDDEN.reshape(3, 1, 6)], {}, ValueError,
     "batch 1: its token shape (3, 1) has other rows"),
    ([_HIDDEN], dict(teacher_kernel=np.ones((11, 6), np.float32), teacher_bias=None), ValueError,
     "= teacher_kernel.shape[0] = 11 (the input of the teacher's output projection), got (3, 6)."
     " teacher_kernel looks transposed"),
    ([_HIDDEN], dict(teacher_kernel=np.ones(6, np.float32)), ValueError,
     "teacher_kernel must be a [hidden_size, vocab_size] matrix"),
    ([_HIDDEN], dict(teacher_kernel=np.ones((6, 11), np.int32)), TypeError,
     "teacher_kernel must be a bfloat16, float16 or float32 array"),
    ([_HIDDEN], dict(teacher_kernel=np.full((6, 11), np.inf, np.float32)), ValueError,
     "teacher_kernel must be finite"),
    ([_HIDDEN], dict(teacher_bias=np.zeros(10, np.float32)), ValueError,
     "teacher_bias must have shape (vocab_size,) = (11,)"),
    ([_HIDDEN], dict(teacher_bias=np.full(11, np.inf, np.float32)), ValueError,
     "teacher_bias must be finite or -inf"),
    ([_HIDDEN], dict(logit_scale=0.0), ValueError, "logit_scale must be a finite number > 0"),
    ([_HIDDEN], dict(softcap="30"), TypeError, "softcap must be a number > 0 or None"),
    ([_HIDDEN], dict(softcap=True), TypeError, "softcap must be a number > 0 or None"),
    ([_HIDDEN], dict(tokens_per_shard=0), ValueError, "tokens_per_shard must be a positive"),
    ([_HIDDEN], dict(metadata={"x": object()}), TypeError, "metadata must be JSON-serialisable"),
])
def test_a_failed_hidden_state_write_keeps_the_existing_cache(tmp_path, batches, kwargs, error,
                                                             message):
  original = hidden_batches(2, (3,), 6)
  _write_hidden(tmp_path, original)
  before = _snapshot(tmp_path)
  with pytest.raises(error) as raised:
    _write_hidden(tmp_path, batches, overwrite=True, **kwargs)
  assert message in str(raised.value), raised.value
  assert _snapshot(tmp_path) == before
  read = list(cache.read_hidden_state_cache(tmp_path, batch_shape=(3,)))
  np.testing.assert_array_equal(np.stack(read), np.stack(original))


def test_hidden_shards_and_the_head_are_checked_before_use(tmp_path):
  info = _write_hidden(tmp_path)
  head_path = tmp_path / info.head.file
  good_head = head_path.read_bytes()
  # A flipped bit in the head: its CRC-32; verify=False still checks sizes.
  flipped = bytearray(good_head)
  flipped[5] ^= 0x01
  head_path.write_bytes(bytes(flipped))
  with pytest.raises(TeacherCacheError, match=rf"head '.*{info.head.file}' is corrupted: its CRC"):
    cache.read_teacher_head(tmp_path)
  cache.read_teacher_head(tmp_path, verify=False)
  # A truncated head is caught when the cache is opened, before any read.
  head_path.write_bytes(good_head[:-3])
  for call in (lambda: cache.open_hidden_state_cache(tmp_path),
               lambda: cache.read_hidden_state_cache(tmp_path, batch_shape=(3,), verify=False)):
    with pytest.raises(TeacherCacheError, match=rf"head '.*{info.head.file}' is truncated"):
      call()
  head_path.write_bytes(good_head)
  # A NaN in the kernel or +inf in the bias with a matching CRC-32: corruption, with or without
  # verify.
  for offset, value, what in [(0, np.nan, "kernel"), (len(good_head) - 4, np.inf, "bias")]:
    payload = bytearray(good_head)
    payload[offset:offset + 4] = np.array([value], np.float32).tobytes()
    head_path.write_bytes(bytes(payload))
    _edit_manifest(tmp_path, lambda m, p=payload: m["head"].update(crc32=zlib.crc32(bytes(p))))
    for verify in (True, False):
      with pytest.raises(TeacherCacheError, match=f"is corrupted: its {what} holds"):
        cache.read_teacher_head(tmp_path, verify=verify)
  # A NaN hidden state with a matching CRC-32, and a flipped bit without one.
  shard = tmp_path / info.shards[0].file
  payload = bytearray(shard.read_bytes())
  payload[-4:] = np.array([np.nan], np.float32).tobytes()
  shard.write_bytes(bytes(payload))
  _edit_manifest(tmp_path, _set_shard(0, crc32=zlib.crc32(bytes(payload))))
  with pytest.raises(TeacherCacheError, match="is corrupted: it holds NaN or infinite values"):
    next(cache.read_hidden_state_cache(tmp_path, batch_shape=(3,), verify=False))
  payload[-4:] = b"\0\0\0\0"
  shard.write_bytes(bytes(payload))
  with pytest.raises(TeacherCacheError, match="is corrupted: its CRC-32"):
    next(cache.read_hidden_state_cache(tmp_path, batch_shape=(3,)))


def test_a_hidden_state_manifest_cannot_point_outside_the_folder(tmp_path):
  folder = tmp_path / "cache"
  info = _write_hidden(folder)
  (tmp_path / "outside.bin").write_bytes((folder / info.head.file).read_bytes())
  for file in ["../outside.bin", str(tmp_path / "outside.bin"), "head-0000beef.bin/", "head.bin",
               "shard-00000.bin", "", ".."]:
    _edit_manifest(folder, lambda m, f=file: m["head"].update(file=f))
    with pytest.raises(TeacherCacheError, match=r"field 'head\.file'"):
      cache.read_teacher_head(folder)
  _edit_manifest(folder, lambda m: m["head"].update(file=info.head.file))
  os.remove(folder / info.head.file)
  os.symlink(tmp_path / "outside.bin", folder / info.head.file)
  with pytest.raises(TeacherCacheError, match="is not a regular file"):
    cache.read_teacher_head(folder)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(kind="logits"), "kind"),
    (lambda m: m.pop("kind"), "kind"),
    (lambda m: m.update(hidden_size=0), "hidden_size"),
    (lambda m: m.update(hidden_size=2**40), "hidden_size"),
    (lambda m: m.update(hidden_size="6"), "hidden_size"),
    (lambda m: m.update(hidden_dtype="float64"), "hidden_dtype"),
    (lambda m: m.update(vocab_size=0), "vocab_size"),
    (lambda m: m.pop("batch_shape"), "batch_shape"),
    (lambda m: m.pop("head"), "head"),
    (lambda m: m.update(head=[1]), "head"),
    (lambda m: m["head"].update(kernel_dtype="int8"), "head.kernel_dtype"),
    (lambda m: m["head"].update(bias_dtype=7), "head.bias_dtype"),
    (lambda m: m["head"].pop("bias_dtype"), "head.bias_dtype"),
    (lambda m: m["head"].update(num_bytes=10), "head.num_bytes"),
    (lambda m: m["head"].update(num_bytes=-1), "head.num_bytes"),
    (lambda m: m["head"].update(crc32=2**32), "head.crc32"),
    (lambda m: m["head"].update(softcap=-1.0), "head.softcap"),
    (lambda m: m["head"].update(logit_scale="2"), "head.logit_scale"),
    (lambda m: m["head"].pop("softcap"), "head.softcap"),
    (lambda m: m.update(metadata=[1]), "metadata"),
    (lambda m: m["shards"][0].update(num_bytes=4 * 5 * 4), "shards[0].num_bytes"),
    (lambda m: m["shards"][0].update(file="../x.bin"), "shards[0].file"),
])
def test_a_malformed_hidden_state_manifest_names_the_field(tmp_path, edit, field):
  _write_hidden(tmp_path)
  _edit_manifest(tmp_path, edit)
  pattern = rf"manifest\.json.* is corrupted: field '{re.escape(field)}'"
  for call in (lambda: cache.open_hidden_state_cache(tmp_path),
               lambda: cache.read_teacher_head(tmp_path, verify=False),
               lambda: next(cache.read_hidden_state_cache(tmp_path, batch_shape=(3,)))):
    with pytest.raises(TeacherCacheError, match=pattern):
      call()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_head_is_refused_without_blocking(tmp_path):
  info = _write_hidden(tmp_path)
  head = tmp_path / info.head.file
  os.remove(head)
  os.mkfifo(head)
  thread, outcome = _returns_within(lambda: cache.read_teacher_head(tmp_path))
  if thread.is_alive():
    _release_blocked_readers(head)
    thread.join(10)
    pytest.fail("read_teacher_head blocked on a FIFO")
  assert isinstance(outcome.get("error"), TeacherCacheError), outcome
  assert "is not a regular file (a FIFO)" in str(outcome["error"])


def test_a_disk_error_writing_the_head_names_it_and_keeps_the_old_cache(tmp_path, monkeypatch):
  original = hidden_batches(2, (3,), 6)
  _write_hidden(tmp_path, original)
  before = _snapshot(tmp_path)
  write = os.write

  def failing_write(fd, data):
    if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith("head-"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(fd, data)

  if not os.path.isdir("/proc/self/fd"):
    pytest.skip("needs /proc to name the file being written")
  monkeypatch.setattr(cache.os, "write", failing_write)
  with pytest.raises(TeacherCacheError, match=r"cannot write '.*/head-[0-9a-f]{8}\.bin': No "
                     r"space left on device \(ENOSPC\)"):
    _write_hidden(tmp_path, hidden_batches(3, (3,), 6, seed=3), overwrite=True)
  monkeypatch.undo()
  assert _snapshot(tmp_path) == before


# The bytes per token of the docs' table, at a real shape, computed here so the table cannot
# drift from the format.
def test_the_documented_bytes_per_token_table_is_the_formats():
  table = cache.bytes_per_token_table(hidden_size=4096, vocab_size=128256)
  page = (ROOT / "docs" / "cache_format.md").read_text()
  assert table in page, table
  # Independent arithmetic: bf16 hidden states, uint32 ids with float16 log-probabilities.
  assert "| 8,192 |" in table and "| 16,384 |" in table and "| 192 |" in table
  assert f"| {128256 * 2:,} |" in table and f"{4096 * 128256 * 2:,}" in page


def test_a_student_trained_from_a_hidden_state_cache_is_the_online_one(tmp_path):
  optax = pytest.importorskip("optax")
  import kdjax

  rng = np.random.default_rng(11)
  vocab, d_teacher, d_student, batch, seq, steps = 40, 12, 6, 2, 5, 4
  embed = rng.normal(size=(vocab, d_teacher)).astype(np.float32)
  kernel = (rng.normal(size=(d_teacher, vocab)) * 3 / np.sqrt(d_teacher)).astype(np.float32)
  bias = rng.normal(size=vocab).astype(np.float32)
  bias[-1] = -np.inf  # a padded vocabulary entry
  scale, cap = 0.7, 4.0
  tokens = rng.integers(0, vocab - 1, (steps, batch, seq))

  def teacher_hidden(batch_tokens):  # the online teacher's final hidden states, float32
    return np.tanh(embed[batch_tokens])

  init = {"embed": (rng.normal(size=(vocab, d_student)) * 0.5).astype(np.float32),
          "kernel": (rng.normal(size=(d_student, vocab)) * 0.3).astype(np.float32),
          "bias": np.zeros(vocab, np.float32)}
  optimizer = optax.adam(0.05)

  @jax.jit
  def step(params, state, batch_tokens, hidden, teacher_kernel, teacher_bias):
    def loss_fn(p):
      return kdjax.fused_linear_distill_loss(
          jnp.tanh(p["embed"][batch_tokens]), p["kernel"], hidden, teacher_kernel,
          student_bias=p["bias"], teacher_bias=teacher_bias, logit_scale=(None, scale),
          softcap=(None, cap))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def train(hidden_batches, teacher_kernel, teacher_bias):
    params, state = jax.tree.map(jnp.asarray, init), optimizer.init(init)
    losses = []
    for batch_tokens, hidden in zip(tokens, hidden_batches, strict=True):
      params, state, loss = step(params, state, batch_tokens, hidden, teacher_kernel,
                                 teacher_bias)
      losses.append(float(loss))
    return {name: np.asarray(value) for name, value in params.items()}, np.array(losses)

  online, online_losses = train([teacher_hidden(t) for t in tokens], kernel, bias)
  moved = max(np.abs(online[name] - init[name]).max() for name in init)
  assert moved > 0.1
  for dtype in (np.float32, ml_dtypes.bfloat16):
    path = tmp_path / np.dtype(dtype).name
    kdjax.write_hidden_state_cache(
        path, [teacher_hidden(t).astype(dtype) for t in tokens], teacher_kernel=kernel,
        teacher_bias=bias, logit_scale=scale, softcap=cap, tokens_per_shard=7)
    head = kdjax.read_teacher_head(path)
    assert (head.logit_scale, head.softcap) == (scale, cap)
    cached, cached_losses = train(
        list(kdjax.read_hidden_state_cache(path, batch_shape=(batch, seq))), head.kernel,
        head.bias)
    # Bit for bit the student of an online teacher handing over hidden states in this dtype.
    same, _ = train([teacher_hidden(t).astype(dtype) for t in tokens], kernel, bias)
    for name in init:
      np.testing.assert_array_equal(cached[name], same[name])
    # And, from bfloat16, the float32 online student up to bfloat16's rounding (2**-8): the
    # losses to it, the parameters to it relative to how far training moved them.
    np.testing.assert_allclose(cached_losses, online_losses, rtol=2.0**-8)
    for name in init:
      assert np.abs(cached[name] - online[name]).max() <= 2.0**-5 * moved, name
