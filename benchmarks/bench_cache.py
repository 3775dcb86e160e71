"""The teacher cache's shard format against established formats for the same arrays.

A realistic cache: ``--tokens`` tokens (default 1M) with ``k`` (default 32) uint32 ids (a 152k
vocabulary) and float16 log-probabilities, 192 bytes per token. Each format stores the same two
``[tokens, k]`` arrays:

* ``kdjax``: :func:`kdjax.write_teacher_cache` / :func:`kdjax.read_teacher_cache` (CRC-32 per
  shard checked on read, atomic manifest, writer lock);
* ``safetensors``: one file with the two tensors (``safetensors.numpy``; read back whole, and by
  slices through ``safe_open``, as PyTorch tooling does);
* ``array_record``: one record per ``--record-tokens`` tokens (a training sequence), the ids'
  bytes then the log-probabilities' bytes, uncompressed, ``group_size:1`` for random access;
* ``npy``: two ``.npy`` files, read with ``np.load`` (whole) and ``mmap_mode="r"`` (slices).

Measured per format: write throughput up to a sync to disk, and sequential read throughput (MB/s
of array bytes; the files are in the page cache right after writing, so reads measure the CPU
cost of each format, not the disk's),
the time of one random batch of ``--batch-tokens`` tokens, and whether the reader notices one
flipped byte in the data or a truncated file. A format whose package is not installed is a row
that says so.

Run: python benchmarks/bench_cache.py [--tokens 1000000] [--k 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

VOCAB = 151_936  # Qwen2's vocabulary: ids need uint32.


def _timed(fn, repeats=1):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return min(times), result


# ----------------------------------------------------------------------------------------------
# One class per format: write(folder, ids, logprobs), read_all(folder) -> (ids, logprobs),
# read_batch(folder, start, count) -> (ids, logprobs), data_file(folder) -> a file to damage.
# ----------------------------------------------------------------------------------------------


class Kdjax:
  name = "kdjax shards"
  pytorch = "no: NumPy reader (kdjax.read_teacher_cache), then torch.from_numpy"
  integrity = "CRC-32 of every shard checked before use; manifest fields and sizes checked; " \
              "atomic commit; one writer at a time"

  def __init__(self, batch_tokens):
    import kdjax

    self.kdjax = kdjax
    self.batch_tokens = batch_tokens

  def write(self, folder, ids, logprobs):
    self.kdjax.write_teacher_cache(
        folder, [(ids, logprobs)], vocab_size=VOCAB, temperature=1.0, overwrite=True)

  def read_all(self, folder):
    batches = list(self.kdjax.read_teacher_cache(
        folder, batch_shape=(self.batch_tokens,), drop_remainder=False))
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))

  def read_batch(self, folder, start, count):
    return next(self.kdjax.read_teacher_cache(folder, batch_shape=(count,), start_token=start))

  def data_file(self, folder):
    return max((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".bin")),
               key=os.path.getsize)


class Safetensors:
  name = "safetensors"
  pytorch = "yes: safetensors.torch.load_file / safe_open(framework='pt'), as HF and vLLM load"
  integrity = "header (dtypes, shapes, offsets) checked against the file size; no checksum"

  def __init__(self, batch_tokens):
    import safetensors.numpy

    self.st = safetensors
    self.batch_tokens = batch_tokens

  def write(self, folder, ids, logprobs):
    import safetensors.numpy

    safetensors.numpy.save_file({"ids": ids, "logprobs": logprobs},
                                os.path.join(folder, "cache.safetensors"))

  def read_all(self, folder):
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(os.path.join(folder, "cache.safetensors"))
    return tensors["ids"], tensors["logprobs"]

  def read_batch(self, folder, start, count):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "cache.safetensors"), framework="np") as f:
      return (f.get_slice("ids")[start:start + count],
              f.get_slice("logprobs")[start:start + count])

  def data_file(self, folder):
    return os.path.join(folder, "cache.safetensors")


class ArrayRecord:
  name = "array_record"
  pytorch = "no: needs the array_record package and a record encoding of our own"
  integrity = "Riegeli chunk hashes (checked on read); file footer and index"

  def __init__(self, batch_tokens, record_tokens):
    from array_record.python import array_record_module

    self.module = array_record_module
    self.batch_tokens = batch_tokens
    self.record_tokens = record_tokens

  def _path(self, folder):
    return os.path.join(folder, "cache.array_record")

  def write(self, folder, ids, logprobs):
    writer = self.module.ArrayRecordWriter(self._path(folder), "group_size:1,uncompressed")
    self.k = ids.shape[1]
    for start in range(0, ids.shape[0], self.record_tokens):
      stop = start + self.record_tokens
      writer.write(ids[start:stop].tobytes() + logprobs[start:stop].tobytes())
    writer.close()

  def _decode(self, records):
    ids, logprobs = [], []
    for record in records:
      tokens = len(record) // (self.k * 6)
      ids.append(np.frombuffer(record, np.uint32, tokens * self.k).reshape(tokens, self.k))
      logprobs.append(np.frombuffer(record, np.float16, offset=tokens * self.k * 4)
                      .reshape(tokens, self.k))
    return np.concatenate(ids), np.concatenate(logprobs)

  def read_all(self, folder):
    reader = self.module.ArrayRecordReader(self._path(folder))
    try:
      return self._decode(reader.read_all())
    finally:
      reader.close()

  def read_batch(self, folder, start, count):
    reader = self.module.ArrayRecordReader(self._path(folder))
    try:
      first, last = start // self.record_tokens, (start + count - 1) // self.record_tokens
      ids, logprobs = self._decode(reader.read(list(range(first, last + 1))))
      offset = start - first * self.record_tokens
      return ids[offset:offset + count], logprobs[offset:offset + count]
    finally:
      reader.close()

  def data_file(self, folder):
    return self._path(folder)


class Npy:
  name = "npy (memory map)"
  pytorch = "via NumPy: torch.from_numpy(np.load(path, mmap_mode='r'))"
  integrity = "header (dtype, shape) only; no checksum"

  def __init__(self, batch_tokens):
    self.batch_tokens = batch_tokens

  def write(self, folder, ids, logprobs):
    np.save(os.path.join(folder, "ids.npy"), ids)
    np.save(os.path.join(folder, "logprobs.npy"), logprobs)

  def read_all(self, folder):
    return (np.load(os.path.join(folder, "ids.npy")),
            np.load(os.path.join(folder, "logprobs.npy")))

  def read_batch(self, folder, start, count):
    ids = np.load(os.path.join(folder, "ids.npy"), mmap_mode="r")
    logprobs = np.load(os.path.join(folder, "logprobs.npy"), mmap_mode="r")
    return np.array(ids[start:start + count]), np.array(logprobs[start:start + count])

  def data_file(self, folder):
    return os.path.join(folder, "ids.npy")


# ----------------------------------------------------------------------------------------------


def _detects(fmt, folder, damage, expected):
  """Whether reading after ``damage(path)`` raises or returns data that differs visibly."""
  path = fmt.data_file(folder)
  original = open(path, "rb").read()
  try:
    damage(path, original)
    try:
      ids, logprobs = fmt.read_all(folder)
    except Exception as error:  # noqa: BLE001 - any error is a detection
      return f"yes ({type(error).__name__})"
    same = ids.shape == expected[0].shape and np.array_equal(ids, expected[0]) and \
        np.array_equal(logprobs, expected[1], equal_nan=True)
    return "no (same data)" if same else "no: wrong data returned"
  finally:
    with open(path, "wb") as f:
      f.write(original)


def _flip_byte(path, original):
  # A byte in the second half of the file: past every header, inside the arrays.
  with open(path, "r+b") as f:
    position = len(original) * 3 // 4
    f.seek(position)
    f.write(bytes([original[position] ^ 0x10]))


def _truncate(path, original):
  with open(path, "r+b") as f:
    f.truncate(len(original) - 4096)


def measure(fmt, ids, logprobs, *, batch_tokens, draws, repeats):
  folder = tempfile.mkdtemp(prefix="bench-cache-")
  try:
    megabytes = (ids.nbytes + logprobs.nbytes) / 1e6
    # Durable writes for every format: the kdjax writer fsyncs its files, so the others are
    # timed up to a sync too.
    write_s, _ = _timed(lambda: (fmt.write(folder, ids, logprobs), os.sync()), repeats)
    files = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    read_s, (got_ids, got_lp) = _timed(lambda: fmt.read_all(folder), repeats)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_lp, logprobs), fmt.name
    rng = np.random.default_rng(0)
    starts = rng.integers(0, ids.shape[0] - batch_tokens, size=draws)
    batch_times = []
    for start in starts:
      seconds, (batch_ids, _) = _timed(lambda s=int(start): fmt.read_batch(folder, s, batch_tokens))
      assert np.array_equal(batch_ids, ids[start:start + batch_tokens]), fmt.name
      batch_times.append(seconds)
    flipped = _detects(fmt, folder, _flip_byte, (ids, logprobs))
    truncated = _detects(fmt, folder, _truncate, (ids, logprobs))
    return dict(write=megabytes / write_s, read=megabytes / read_s,
                batch_ms=1e3 * statistics.median(batch_times), bytes_per_token=files / ids.shape[0],
                flipped=flipped, truncated=truncated)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens in the cache")
  parser.add_argument("--k", type=int, default=32, help="teacher entries per token")
  parser.add_argument("--batch-tokens", type=int, default=8192,
                      help="tokens of one random-access batch")
  parser.add_argument("--record-tokens", type=int, default=1024,
                      help="tokens per array_record record (one training sequence)")
  parser.add_argument("--draws", type=int, default=20, help="random batches read per format")
  parser.add_argument("--repeats", type=int, default=3, help="best of this many writes/reads")
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  # A valid sparse teacher (the writer refuses anything else): k distinct ids per token, and
  # log-probabilities whose probabilities sum to 0.8 (the rest is outside the top k).
  offsets = rng.choice(VOCAB, size=args.k, replace=False)
  ids = ((rng.integers(0, VOCAB, size=(args.tokens, 1)) + offsets) % VOCAB).astype(np.uint32)
  logits = np.sort(-rng.exponential(2.0, size=(args.tokens, args.k)), axis=1)[:, ::-1]
  logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True) / 0.8)
  logprobs = np.ascontiguousarray(logprobs.astype(np.float16))
  print(f"{args.tokens:,} tokens x k={args.k}: uint32 ids + float16 log-probabilities, "
        f"{(ids.nbytes + logprobs.nbytes) / 1e6:.0f} MB; random batches of "
        f"{args.batch_tokens} tokens; best of {args.repeats}, warm page cache\n")

  factories = [
      ("kdjax shards", lambda: Kdjax(args.batch_tokens)),
      ("safetensors", lambda: Safetensors(args.batch_tokens)),
      ("array_record", lambda: ArrayRecord(args.batch_tokens, args.record_tokens)),
      ("npy (memory map)", lambda: Npy(args.batch_tokens)),
  ]
  print("| format | write MB/s | read MB/s | random batch (ms) | bytes/token | flipped data byte "
        "detected | truncated file detected |")
  print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
  formats = []
  for name, factory in factories:
    try:
      fmt = factory()
    except ImportError as error:
      print(f"| {name} | not installed ({error.name}) | | | | | |")
      continue
    formats.append(fmt)
    r = measure(fmt, ids, logprobs, batch_tokens=args.batch_tokens, draws=args.draws,
                repeats=args.repeats)
    print(f"| {fmt.name} | {r['write']:,.0f} | {r['read']:,.0f} | {r['batch_ms']:.2f} "
          f"| {r['bytes_per_token']:.1f} | {r['flipped']} | {r['truncated']} |", flush=True)
  print("\n| format | readable from PyTorch tooling | integrity |")
  print("| --- | --- | --- |")
  for fmt in formats:
    print(f"| {fmt.name} | {fmt.pytorch} | {fmt.integrity} |")


if __name__ == "__main__":
  main()
