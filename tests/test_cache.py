"""Tests for kdjax/_src/cache.py: the offline teacher cache."""

import json
import os

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
  info = write_teacher_cache(tmp_path, batches, vocab_size=300, tokens_per_shard=7)
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
  write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=40)
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
                             tokens_per_shard=4)


def test_truncated_shard_raises(tmp_path):
  info = _write_small(tmp_path)
  shard = tmp_path / info.shards[1].file
  shard.write_bytes(shard.read_bytes()[:-5])
  with pytest.raises(TeacherCacheError, match=r"shard-00001.bin.* is truncated"):
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
  with pytest.raises(TeacherCacheError, match=r"shard-00000.bin.* is corrupted: its CRC-32"):
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
  _write_small_overwrite = write_teacher_cache(
      tmp_path, teacher_batches(2, (3,), vocab=9, k=4), vocab_size=9, tokens_per_shard=4,
      overwrite=True)
  assert _write_small_overwrite.shards == info.shards
  os.remove(tmp_path / info.shards[-1].file)
  with pytest.raises(TeacherCacheError, match="shard-00001.bin.* is missing"):
    open_teacher_cache(tmp_path)


def test_writer_errors(tmp_path):
  _write_small(tmp_path)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    _write_small(tmp_path)
  other = tmp_path / "other"
  ids = np.zeros((2, 3), np.int32)
  logprobs = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"ids must be in \[0, vocab_size=5\)"):
    write_teacher_cache(other, [(ids + 5, logprobs)], vocab_size=5)
  with pytest.raises(ValueError, match="k changed from 3 to 2"):
    write_teacher_cache(other, [(ids, logprobs), (ids[:, :2], logprobs[:, :2])], vocab_size=5)
  with pytest.raises(ValueError, match="same shape"):
    write_teacher_cache(other, [(ids, logprobs[:, :2])], vocab_size=5)
  with pytest.raises(TypeError, match="ids must be integers"):
    write_teacher_cache(other, [(logprobs, logprobs)], vocab_size=5)
  with pytest.raises(ValueError, match="logprob_dtype must be one of"):
    write_teacher_cache(other, [(ids, logprobs)], vocab_size=5, logprob_dtype="float8")
  with pytest.raises(ValueError, match="batches is empty"):
    write_teacher_cache(other, [], vocab_size=5)
  with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
    write_teacher_cache(other, [(ids, logprobs)], vocab_size=0)
  # No manifest is left behind by a failed write.
  with pytest.raises(TeacherCacheError, match="writer did not finish"):
    open_teacher_cache(other)


def test_bf16_jax_inputs_are_accepted(tmp_path):
  ids = jnp.array([[0, 1]], jnp.int32)
  logprobs = jnp.array([[-1.0, -2.5]], jnp.bfloat16)  # exact in bfloat16
  write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=2, logprob_dtype="bfloat16")
  ((got_ids, got_logprobs),) = read_teacher_cache(tmp_path, batch_shape=(1,))
  np.testing.assert_array_equal(got_ids, [[0, 1]])
  assert got_logprobs.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(np.asarray(got_logprobs, np.float32), [[-1.0, -2.5]])
