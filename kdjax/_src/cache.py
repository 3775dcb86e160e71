"""Offline teacher cache: a teacher's outputs written once, read during training.

Run the teacher over the training tokens once and keep, for every position, either

* a sparse teacher: :func:`kdjax.topk_teacher`'s (or :func:`kdjax.sample_teacher`'s)
  ``(ids, logprobs)`` (:func:`write_teacher_cache`), to distill with
  :func:`kdjax.sparse_distill_loss`; or
* its final hidden states, with its output layer (kernel, bias, logit scale, softcap) stored
  once per cache (:func:`write_hidden_state_cache`), to distill exactly, over the full
  vocabulary, with the fused losses (:func:`kdjax.fused_linear_distill_loss`): the logits are
  recomputed from the hidden states blockwise, as they would be with the teacher run online;

and distill the student later without the teacher in memory.

On disk a cache is a directory::

    manifest.json                format, version, k, vocab_size, dtypes, temperature, num_tokens,
                                 batch_shape (the written batches' token shape), and per shard:
                                 file name, number of tokens, number of bytes, CRC-32 of the bytes
    shard-1f0c9a2e-00000.bin     ids of the shard's tokens ([tokens, k], little endian), then
    shard-1f0c9a2e-00001.bin     their log-probabilities ([tokens, k], little endian)
    ...
    .kdjax-cache.lock            the writers' lock file (empty)

* ids use the narrowest unsigned type that holds ``vocab_size - 1`` (uint8 up to 256 ids,
  uint16 up to 65536, else uint32); they are returned as int32.
* log-probabilities are stored as float16 (default) or bfloat16. float16 is the better choice
  for log-probabilities: they lie in ``[-inf, 0]``, where float16's 10-bit mantissa is 8 times
  finer than bfloat16's 7 bits and its range (down to -65504) loses nothing that matters
  (``exp(-65504)`` is 0 in float32); ``-inf`` is kept exactly. NaN and ``+inf`` are refused.
* bytes per token: ``k * (id bytes + 2)``; for example k = 32 with a 152k vocabulary: 192 B.

A hidden-state cache (format version 3, ``"kind": "hidden_states"``) has the same layout, with
``[tokens, hidden_size]`` hidden states (bfloat16, float16 or float32, as given) in its shards,
and the output layer in one more file, ``head-1f0c9a2e.bin`` (the kernel ``[hidden_size,
vocab_size]``, then the bias ``[vocab_size]`` if there is one, little endian, in their own
dtypes), whose size and CRC-32 the manifest records next to the logit scale and softcap. Top-k
caches are still written as version 2, which earlier readers read; versions 1 and 2 are top-k
caches. Bytes per token: ``hidden_size`` times 2 (bfloat16) or 4 (float32), plus the head once.

Tokens are stored in the order the writer received them (the leading axes of each batch
flattened in C order), so a reader with the same batch shape yields batches aligned with the
token batches. The manifest records that shape (format version 2): batches may differ in their
first axis only, and a reader must ask for the same rows (the axes after the first) or fails
with :class:`TeacherCacheError`. Version-1 caches, written before the shape was recorded, are
read with any batch shape, as they always were.

What is guaranteed:

* **A write is atomic.** Shards are new files named with the write's own id (8 hex digits), so
  they never replace a file; the manifest that makes them a cache is written to a temporary file
  and renamed over ``manifest.json`` last. A write that fails (bad batch, metadata that is not
  JSON, an exception in the batch stream) removes the files it created; one that is killed
  leaves them behind (shards that no manifest lists: never read, safe to delete). A full disk
  or a file-size limit is a :class:`TeacherCacheError` naming the file. Batches that hold no
  token at all are refused like an empty stream, so an overwrite never empties a cache. Either
  way a cache already in the folder is untouched and reads as before. After an ``overwrite``
  commits, the old cache's shards are removed: only the files its (valid) manifest lists; no
  other file in the folder is ever removed or replaced.
* **One writer at a time.** A writer holds an ``flock`` on ``.kdjax-cache.lock``; a second
  writer to the same folder fails at once with :class:`TeacherCacheError`. The operating
  system releases the lock when the writer exits, however it exits. (Where ``fcntl`` does not
  exist there is no lock; writers still never share a file.) A reader that opened the cache
  before an overwrite committed gets a "missing shard" error, not data from two caches.
* **Everything read is checked.** Every manifest field is checked for type and range before
  use, and the counts must agree with each other and with the file sizes, so a hostile or
  damaged manifest cannot make the reader loop or allocate without bound; shard entries must
  be plain file names of the writer's form, opened inside the folder without following
  symbolic links; a file's type is checked before it is opened, so a FIFO or a device cannot
  block the reader. Each shard's size and (unless ``verify=False``) CRC-32 are checked before
  any of it is returned, and ids out of range or NaN log-probabilities are reported as
  corruption.
  Every failure is a :class:`TeacherCacheError` naming the file (and the field), never wrong
  data.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import re
import secrets
import stat
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from kdjax._src.sparse import sparse_teacher_problem

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None  # type: ignore[assignment]  # no lock where the module does not exist

FORMAT = "kdjax-teacher-cache"
# Version 2 records the token shape of the written batches ("batch_shape"); version 1 caches
# (without it) are still read, without the check of the reader's batch shape. Version 3 adds the
# cache's "kind": "topk" (what versions 1 and 2 hold) or "hidden_states". Each cache is written
# at the lowest version that describes it, so top-k caches stay readable by version-2 readers.
VERSION = 2
HIDDEN_STATES_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
KINDS = ("topk", "hidden_states")
# A recorded batch shape has at most this many axes (a bound on what a manifest can ask for).
MAX_BATCH_RANK = 32
MANIFEST = "manifest.json"
LOCK_FILE = ".kdjax-cache.lock"
DEFAULT_SHARD_BYTES = 1 << 28  # 256 MiB: few files, and a shard is cheap to read and check.
# A manifest lists one short entry per shard: 64 MiB is hundreds of thousands of shards. The bound
# keeps a hostile or damaged file from being read whole into memory.
MAX_MANIFEST_BYTES = 1 << 26
# The shard file names the writer produces (shard-<write id>-NNNNN.bin; before write ids,
# shard-NNNNN.bin); a manifest naming anything else is rejected, so a cache never reads outside
# its folder.
_SHARD_FILE = re.compile(r"shard-(?:[0-9a-f]{8}-)?[0-9]{5,}\.bin")
# The output layer of a hidden-state cache: head-<write id>.bin.
_HEAD_FILE = re.compile(r"head-[0-9a-f]{8}\.bin")
# The widest hidden state a manifest may claim (a bound on what a hostile one can ask for).
MAX_HIDDEN_SIZE = 1 << 24
# Not following symbolic links keeps every read inside the cache folder.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Opening a FIFO for reading blocks until a writer opens it; with O_NONBLOCK it returns at once
# and the file's type is checked on the open file. (No effect on reads of regular files.)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

_LOGPROB_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Hidden states and the output layer are stored in the dtype they are given in.
_FLOAT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype("<f2"),
                 "float32": np.dtype("<f4")}


class TeacherCacheError(ValueError):
  """A teacher cache that is missing, incomplete, truncated or corrupted, or a folder that
  another writer is writing to."""


class ShardInfo(NamedTuple):
  file: str
  num_tokens: int
  num_bytes: int
  crc32: int


class CacheInfo(NamedTuple):
  """What a cache's manifest says (see :func:`open_teacher_cache`)."""

  directory: str
  num_tokens: int
  k: int
  vocab_size: int
  id_dtype: str
  logprob_dtype: str
  temperature: float
  shards: tuple[ShardInfo, ...]
  metadata: dict[str, Any]
  # The token shape of the written batches (the first one's; later ones may have a shorter first
  # axis), or None for a cache written before it was recorded (format version 1).
  batch_shape: tuple[int, ...] | None = None

  @property
  def bytes_per_token(self) -> int:
    return bytes_per_token(self.k, self.vocab_size, logprob_dtype=self.logprob_dtype)

  @property
  def files(self) -> tuple[str, ...]:
    """The files of the cache the manifest lists."""
    return tuple(shard.file for shard in self.shards)


class HeadInfo(NamedTuple):
  """What a hidden-state cache's manifest says of the teacher's output layer."""

  file: str
  kernel_dtype: str
  bias_dtype: str | None  # None: no bias
  num_bytes: int
  crc32: int
  logit_scale: float | None
  softcap: float | None


class HiddenStateCacheInfo(NamedTuple):
  """What a hidden-state cache's manifest says (see :func:`open_hidden_state_cache`)."""

  directory: str
  num_tokens: int
  hidden_size: int
  hidden_dtype: str
  vocab_size: int
  head: HeadInfo
  shards: tuple[ShardInfo, ...]
  metadata: dict[str, Any]
  batch_shape: tuple[int, ...]

  @property
  def bytes_per_token(self) -> int:
    return hidden_state_bytes_per_token(self.hidden_size, self.hidden_dtype)

  @property
  def files(self) -> tuple[str, ...]:
    """The files of the cache the manifest lists."""
    return (self.head.file, *(shard.file for shard in self.shards))


class TeacherHead(NamedTuple):
  """The teacher's output layer, as :func:`kdjax.fused_linear_distill_loss` takes it.

  ``kernel`` ``[hidden_size, vocab_size]`` and ``bias`` ``[vocab_size]`` (or None) are NumPy
  arrays in their stored dtypes; ``logit_scale`` and ``softcap`` are numbers or None. Pass
  ``teacher_kernel=kernel, teacher_bias=bias, logit_scale=(s, logit_scale),
  softcap=(c, softcap)`` with the student's own ``s`` and ``c`` (or None).
  """

  kernel: np.ndarray
  bias: np.ndarray | None
  logit_scale: float | None
  softcap: float | None


def id_dtype(vocab_size: int) -> np.dtype:
  """The narrowest little-endian unsigned integer type that holds ids ``0 .. vocab_size - 1``."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or (
      vocab_size < 1):
    raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}.")
  for dtype in ("<u1", "<u2", "<u4"):
    if vocab_size - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"vocab_size must be < 2**32, got {vocab_size}.")


def bytes_per_token(k: int, vocab_size: int, *, logprob_dtype: str = "float16") -> int:
  """Bytes stored per token for ``k`` entries: ``k * (id bytes + log-probability bytes)``."""
  return k * (id_dtype(vocab_size).itemsize + _logprob_dtype(logprob_dtype).itemsize)


def hidden_state_bytes_per_token(hidden_size: int, hidden_dtype: str = "bfloat16") -> int:
  """Bytes stored per token for hidden states: ``hidden_size * (2 or 4)``; the head is extra,
  once per cache (:func:`head_bytes`)."""
  return int(hidden_size) * _float_dtype("hidden_dtype", hidden_dtype).itemsize


def head_bytes(hidden_size: int, vocab_size: int, *, kernel_dtype: str = "bfloat16",
               bias_dtype: str | None = None) -> int:
  """Bytes of a hidden-state cache's head file: the kernel, then the bias if any."""
  kernel = int(hidden_size) * int(vocab_size) * _float_dtype("kernel_dtype", kernel_dtype).itemsize
  bias = 0 if bias_dtype is None else int(vocab_size) * _float_dtype("bias_dtype",
                                                                     bias_dtype).itemsize
  return kernel + bias


def bytes_per_token_table(hidden_size: int, vocab_size: int,
                          ks: tuple[int, ...] = (8, 32, 128)) -> str:
  """The bytes stored per token by each kind of teacher at one shape, as a Markdown table (the
  one ``docs/cache_format.md`` shows, computed here so that it follows the format)."""
  full = vocab_size * 2
  ids = id_dtype(vocab_size).name
  rows = [(f"hidden states, [{hidden_size:,}]", dtype, hidden_state_bytes_per_token(hidden_size,
                                                                                     dtype))
          for dtype in ("bfloat16", "float32")]
  rows += [(f"top-k, k = {k} (or {k} sampled draws)", f"{ids} ids, float16 log-probabilities",
            bytes_per_token(k, vocab_size)) for k in ks]
  rows += [(f"full logits, [{vocab_size:,}]", dtype, vocab_size * size)
           for dtype, size in (("bfloat16", 2), ("float32", 4))]
  lines = ["| stored per token | dtypes | bytes/token | of full bfloat16 logits |",
           "| --- | --- | ---: | ---: |"]
  lines += [f"| {what} | {dtypes} | {count:,} | {_percent(100 * count / full)} |"
            for what, dtypes, count in rows]
  return "\n".join(lines)


def _percent(value: float) -> str:
  return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"


def _float_dtype(name: str, dtype_name: str) -> np.dtype:
  if dtype_name not in _FLOAT_DTYPES:
    raise ValueError(f"{name} must be one of {sorted(_FLOAT_DTYPES)}, got {dtype_name!r}.")
  return _FLOAT_DTYPES[dtype_name]


def _logprob_dtype(name: str) -> np.dtype:
  if name not in _LOGPROB_DTYPES:
    raise ValueError(f"logprob_dtype must be one of {sorted(_LOGPROB_DTYPES)}, got {name!r}.")
  return _LOGPROB_DTYPES[name]


def _check_metadata(metadata: Any) -> dict[str, Any]:
  if metadata is None:
    return {}
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
  try:
    json.dumps(metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise type(e)(
        f"metadata must be JSON-serialisable (str keys; str, finite numbers, bool, None, lists "
        f"and dicts), got an error from json: {e}") from None
  return metadata


@contextlib.contextmanager
def _writer_lock(directory: str) -> Iterator[None]:
  """Holds an exclusive lock on ``directory``'s lock file for one writer.

  ``flock`` locks belong to the open file: the operating system releases them when the writer
  exits, however it exits, so a crashed writer never leaves a stale lock behind.
  """
  if fcntl is None:  # No advisory locks here; writers still never share a file (see _Writer).
    yield
    return
  path = os.path.join(directory, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW, 0o644)
  except OSError as e:
    raise TeacherCacheError(f"cannot open the writer's lock file {path!r}: {e.strerror}.") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise TeacherCacheError(
          f"another writer is writing a teacher cache in {directory!r} (it holds the lock "
          f"{path!r}); wait for it to finish or write to another folder.") from None
    yield
  finally:
    os.close(fd)


class _Writer:
  """The files of one write: shards named with a fresh write id, and the manifest, committed
  last by an atomic rename. Until then an existing cache in the folder is untouched."""

  def __init__(self, directory: str):
    self.directory = directory
    self.created: list[str] = []
    taken = os.listdir(directory)
    while True:
      self.write_id = secrets.token_hex(4)
      if not any(self.write_id in name for name in taken):
        break

  def shard_name(self, index: int) -> str:
    return f"shard-{self.write_id}-{index:05d}.bin"

  def head_name(self) -> str:
    return f"head-{self.write_id}.bin"

  def create(self, name: str, chunks: Iterable[bytes]) -> str:
    """Writes a new file (never an existing one) and flushes it to the disk.

    An operating-system error (a full disk, a file-size limit, a quota) is a
    :class:`TeacherCacheError` naming the file; the caller removes what was created.
    """
    path = os.path.join(self.directory, name)
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      raise TeacherCacheError(
          f"{path!r} already exists: the writer never replaces a file that it did not "
          "write.") from None
    except OSError as e:
      raise _write_error(path, "create", e) from None
    self.created.append(path)
    try:
      try:
        for chunk in chunks:
          view = memoryview(chunk)
          while view:  # os.write may write less than it is given.
            view = view[os.write(fd, view):]
        os.fsync(fd)
      finally:
        os.close(fd)
    except OSError as e:
      raise _write_error(path, "write", e) from None
    return path

  def commit(self, manifest: dict[str, Any]) -> None:
    staged = self.create(f".manifest-{self.write_id}.json.tmp",
                         [json.dumps(manifest, indent=1, allow_nan=False).encode()])
    path = os.path.join(self.directory, MANIFEST)
    try:
      os.replace(staged, path)
    except OSError as e:
      raise _write_error(path, f"rename {staged!r} to", e) from None
    self.created.remove(staged)
    _sync_directory(self.directory)

  def remove_created(self) -> None:
    for path in reversed(self.created):
      with contextlib.suppress(OSError):
        os.remove(path)
    self.created.clear()


def _write_error(path: str, action: str, error: OSError) -> TeacherCacheError:
  """A failed write of ``path`` as the error the writer raises: the file, the cause, a hint."""
  code = errno.errorcode.get(error.errno or 0, "")
  cause = f"{error.strerror or error}" + (f" ({code})" if code else "")
  if error.errno == errno.EFBIG:
    hint = ("the file would exceed the file-size limit (ulimit -f) or the file system's "
            "largest file: pass a smaller tokens_per_shard")
  elif error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
    hint = "the disk or the quota is full: free space or write the cache elsewhere"
  else:
    hint = "check the folder's file system"
  return TeacherCacheError(
      f"cannot {action} {path!r}: {cause}; {hint}. Nothing was committed: the files of this "
      "write were removed and a cache already in the folder is kept.")


def _sync_directory(directory: str) -> None:
  """Makes the folder's renames durable (where the platform can)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _listed_shard_files(directory: str) -> list[str]:
  """The files (shards, and a hidden-state cache's head) that the cache now in ``directory``
  lists, to remove once it is replaced.

  None when its manifest cannot be read: the writer never removes a file that a valid manifest
  of this cache does not list.
  """
  try:
    return list(_read_manifest(directory).files)
  except TeacherCacheError:
    return []


def _check_write_arguments(directory, tokens_per_shard, metadata) -> tuple[str, dict[str, Any]]:
  directory = os.fspath(directory)
  if tokens_per_shard is not None and (
      isinstance(tokens_per_shard, bool) or not isinstance(tokens_per_shard, int)
      or tokens_per_shard < 1):
    raise ValueError(f"tokens_per_shard must be a positive integer, got {tokens_per_shard!r}.")
  return directory, _check_metadata(metadata)


def _commit(directory: str, overwrite: bool, write) -> None:
  """Runs ``write(writer) -> manifest`` under the writers' lock and commits its manifest: the
  atomic swap every cache kind shares (see :func:`write_teacher_cache`)."""
  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, MANIFEST)
  with _writer_lock(directory):
    if os.path.lexists(manifest_path):
      if not overwrite:
        raise FileExistsError(
            f"{directory!r} already holds a teacher cache; pass overwrite=True to replace it.")
      if not stat.S_ISREG(os.lstat(manifest_path).st_mode):
        raise TeacherCacheError(
            f"{manifest_path!r} is not a regular file; the writer will not replace it.")
    replaced = _listed_shard_files(directory) if overwrite else []
    writer = _Writer(directory)
    try:
      manifest = write(writer)
      writer.commit(manifest)
    except BaseException:
      writer.remove_created()
      raise
    written = {shard["file"] for shard in manifest["shards"]}
    if "head" in manifest:
      written.add(manifest["head"]["file"])
    for name in replaced:
      path = os.path.join(directory, name)
      if name not in written and os.path.isfile(path) and not os.path.islink(path):
        with contextlib.suppress(OSError):  # An orphan is never read; the new cache is whole.
          os.remove(path)


def write_teacher_cache(
    directory: str | os.PathLike,
    batches: Iterable[tuple[Any, Any]],
    *,
    vocab_size: int,
    temperature: float,
    logprob_dtype: str = "float16",
    tokens_per_shard: int | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> CacheInfo:
  """Writes a stream of top-k teacher batches to ``directory`` as checksummed shards.

  The write is all or nothing: the shards are new files, and the manifest that makes them a
  cache is renamed into place last. If the write fails or is killed, a cache already in
  ``directory`` is untouched and still readable; with ``overwrite`` its shard files are removed
  only after the new manifest has replaced its own. The writer never removes or replaces a file
  that it did not write or that the old manifest does not list, and a second writer to the same
  folder fails at once with :class:`TeacherCacheError` (an operating-system lock, released when
  the writer exits however it exits).

  Args:
    directory: where to write; created if missing. It must not already hold a cache unless
      ``overwrite``.
    batches: iterable of ``(ids, logprobs)``, NumPy or JAX arrays ``[..., k]`` (for example
      :func:`kdjax.topk_teacher` of a ``[batch, seq, vocab]`` teacher batch); the leading axes
      are flattened into tokens in C order, batch after batch. The first batch's token shape
      is recorded (:attr:`CacheInfo.batch_shape`); later batches may have another first axis
      (a shorter last batch), not other rows. At least one token in all.
    vocab_size: the teacher's (aligned) vocabulary size; every id must be in ``[0, vocab_size)``.
    temperature: required: the temperature the log-probabilities were computed at (the
      ``temperature`` given to :func:`kdjax.topk_teacher`), recorded in the manifest so that
      the student is distilled at the same one. There is no default, so that a cache of
      tempered log-probabilities is never recorded as ``1.0``.
    logprob_dtype: ``"float16"`` (default, 8x finer than bfloat16 on log-probabilities) or
      ``"bfloat16"``.
    tokens_per_shard: tokens per shard file (default: about 256 MiB per shard).
    metadata: JSON-serialisable extras recorded in the manifest (teacher name, dataset, ...).
    overwrite: replace an existing cache in ``directory``.

  Returns:
    The :class:`CacheInfo` of the written cache.

  Raises:
    FileExistsError: ``directory`` holds a cache and ``overwrite`` is false.
    TeacherCacheError: another writer is writing to ``directory``, or a file cannot be written
      (a full disk, a file-size limit: the error names the file; nothing is left behind).
    ValueError, TypeError: a bad argument or batch, or batches that hold no token (nothing is
      left behind).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from kdjax._src.sparse import topk_teacher
    >>> from kdjax._src.cache import write_teacher_cache, read_teacher_cache
    >>> teacher_logits = jnp.arange(24.0).reshape(2, 3, 4)  # [batch, seq, vocab]
    >>> path = tempfile.mkdtemp()
    >>> batches = [topk_teacher(teacher_logits, 2, temperature=2.0)]
    >>> info = write_teacher_cache(path, batches, vocab_size=4, temperature=2.0)
    >>> info.num_tokens, info.bytes_per_token, info.temperature
    (6, 6, 2.0)
    >>> ids, logprobs = next(read_teacher_cache(path, batch_shape=(2, 3)))
    >>> ids.shape, ids[0, 0].tolist()
    ((2, 3, 2), [3, 2])
  """
  ids_dtype = id_dtype(vocab_size)
  _logprob_dtype(logprob_dtype)  # Every argument is checked before anything is written.
  if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
    raise TypeError(
        f"temperature must be a number (the temperature given to topk_teacher), got "
        f"{_short(temperature)}.")
  if not _is_positive_finite(temperature):
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
  directory, metadata = _check_write_arguments(directory, tokens_per_shard, metadata)

  def write(writer: _Writer) -> dict[str, Any]:
    manifest = _write_shards(writer, batches, vocab_size=vocab_size, ids_dtype=ids_dtype,
                             logprob_dtype=logprob_dtype, tokens_per_shard=tokens_per_shard)
    manifest.update(temperature=float(temperature), metadata=metadata)
    return manifest

  _commit(directory, overwrite, write)
  return open_teacher_cache(directory)


class _ShardStream:
  """Per-token columns (``[tokens, width]`` arrays, each of one dtype) written as shards of
  ``tokens_per_shard`` tokens; a shard holds each column's bytes in turn, and its CRC-32 is
  that of the whole payload."""

  def __init__(self, writer: _Writer, tokens_per_shard: int):
    self.writer = writer
    self.tokens_per_shard = tokens_per_shard
    self.shards: list[ShardInfo] = []
    self.pending: list[list[np.ndarray]] = []
    self.count = 0

  def add(self, columns: list[np.ndarray]) -> None:
    if not self.pending:
      self.pending = [[] for _ in columns]
    for pending, column in zip(self.pending, columns, strict=True):
      pending.append(column)
    self.count += columns[0].shape[0]
    while self.count >= self.tokens_per_shard:
      self._flush(self.tokens_per_shard)

  def finish(self) -> list[ShardInfo]:
    if self.count:
      self._flush(self.count)
    return self.shards

  def _flush(self, count: int) -> None:
    joined = [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in self.pending]
    payload = [np.ascontiguousarray(column[:count]).tobytes() for column in joined]
    crc = 0
    for part in payload:
      crc = zlib.crc32(part, crc)
    name = self.writer.shard_name(len(self.shards))
    self.writer.create(name, payload)
    self.shards.append(ShardInfo(name, count, sum(map(len, payload)), crc))
    self.pending = [[column[count:]] for column in joined]
    self.count -= count


def _batch_shape(batch_index: int, token_shape: tuple[int, ...],
                 batch_shape: tuple[int, ...] | None) -> tuple[int, ...]:
  """The recorded batch shape after a batch of ``token_shape`` (which holds tokens): the first
  such batch's; later ones may have another first axis (a shorter last batch), not other rows."""
  if batch_shape is None:
    return token_shape
  if token_shape[1:] != batch_shape[1:]:
    raise ValueError(
        f"batch {batch_index}: its token shape {token_shape} has other rows than the first "
        f"batch's {batch_shape}: batches may differ in their first axis only (a shorter "
        "last batch), since the cache is read back in batches of one shape.")
  return batch_shape


def _write_shards(writer: _Writer, batches: Iterable[tuple[Any, Any]], *, vocab_size: int,
                  ids_dtype: np.dtype, logprob_dtype: str,
                  tokens_per_shard: int | None) -> dict[str, Any]:
  """Writes the batches as shards; returns the manifest without temperature and metadata."""
  lp_dtype = _logprob_dtype(logprob_dtype)
  k = None
  # The token shape of the first batch that holds tokens (a single [k] token counts as (1,)).
  # Later batches may have another first axis (a shorter last batch), never other rows.
  batch_shape: tuple[int, ...] | None = None
  stream: _ShardStream | None = None
  for batch_index, batch in enumerate(batches):
    try:
      ids, logprobs = batch
    except (TypeError, ValueError):
      raise ValueError(
          f"batch {batch_index}: each batch must be a pair (ids, logprobs).") from None
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"batch {batch_index}: ids must be integers, got dtype {ids.dtype}.")
    if not (np.issubdtype(logprobs.dtype, np.floating)
            or logprobs.dtype == _LOGPROB_DTYPES["bfloat16"]):
      raise TypeError(
          f"batch {batch_index}: logprobs must be floating point, got dtype {logprobs.dtype}.")
    if ids.ndim < 1 or ids.shape != logprobs.shape:
      raise ValueError(
          f"batch {batch_index}: ids and logprobs must have the same shape [..., k], got "
          f"{ids.shape} and {logprobs.shape}.")
    if k is None:
      k = ids.shape[-1]
      if k < 1:
        raise ValueError(f"batch {batch_index}: k must be >= 1, got shape {ids.shape}.")
      stream = _ShardStream(writer, tokens_per_shard or max(
          1, DEFAULT_SHARD_BYTES // (k * (ids_dtype.itemsize + 2))))
    elif ids.shape[-1] != k:
      raise ValueError(f"batch {batch_index}: k changed from {k} to {ids.shape[-1]}.")
    if ids.size:
      batch_shape = _batch_shape(batch_index, ids.shape[:-1] or (1,), batch_shape)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(
          f"batch {batch_index}: ids must be in [0, vocab_size={vocab_size}), got values in "
          f"[{ids.min()}, {ids.max()}].")
    given = logprobs
    logprobs = logprobs.reshape(-1, k).astype(np.float32)
    if np.isnan(logprobs).any() or np.isposinf(logprobs).any():
      raise ValueError(
          f"batch {batch_index}: logprobs must be finite or -inf, got NaN or +inf (check the "
          "teacher's logits for NaN).")
    # What the losses refuse at the call is never stored: log-probabilities above 0, rows whose
    # probabilities sum past 1, repeated ids (each beyond the rounding of the given dtype).
    problem = sparse_teacher_problem(ids, given, names=("ids", "logprobs"))
    if problem is not None:
      raise TeacherCacheError(
          f"batch {batch_index}: {problem} Nothing was written; a cache already in the folder "
          "is kept.")
    stream.add([ids.reshape(-1, k).astype(ids_dtype),  # type: ignore[union-attr]  # set with k
                logprobs.astype(lp_dtype)])
  if k is None or stream is None:
    raise ValueError("batches is empty: there is nothing to cache.")
  if batch_shape is None:  # Batches that all hold zero tokens would write an empty cache.
    raise ValueError(
        f"batches hold no tokens ({batch_index + 1} batches, each of size 0): there is nothing "
        "to cache.")
  shards = stream.finish()

  return {
      "format": FORMAT, "version": VERSION, "num_tokens": sum(s.num_tokens for s in shards),
      "batch_shape": list(batch_shape), "k": k, "vocab_size": int(vocab_size),
      "id_dtype": ids_dtype.name, "logprob_dtype": logprob_dtype,
      "shards": [shard._asdict() for shard in shards],
  }


def _float_array(name: str, value: Any) -> np.ndarray:
  """``value`` as a NumPy array of one of the stored float dtypes (bfloat16, float16, float32)."""
  if isinstance(value, (tuple, list)):
    raise TypeError(f"{name} must be one array, got a {type(value).__name__}.")
  array = np.asarray(value)
  if array.dtype.name not in _FLOAT_DTYPES:
    raise TypeError(
        f"{name} must be a bfloat16, float16 or float32 array (stored as given), got dtype "
        f"{array.dtype}.")
  return array


def _little_endian_bytes(array: np.ndarray) -> bytes:
  return np.ascontiguousarray(array.astype(_FLOAT_DTYPES[array.dtype.name])).tobytes()


def _optional_positive(name: str, value: Any) -> float | None:
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"{name} must be a number > 0 or None, got {_short(value)}.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(
        f"{name} must be a number > 0 or None (the teacher's own; a Python number, recorded "
        f"in the manifest), got {_short(value)}.") from None
  if not (math.isfinite(number) and number > 0):
    raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}.")
  return number


def write_hidden_state_cache(
    directory: str | os.PathLike,
    batches: Iterable[Any],
    *,
    teacher_kernel: Any,
    teacher_bias: Any = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    tokens_per_shard: int | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> HiddenStateCacheInfo:
  """Writes a stream of teacher hidden-state batches, and the teacher's output layer once.

  The exact offline teacher: the fused losses recompute the teacher's logits
  ``softcap * tanh(logit_scale * (h W + b) / softcap)`` from the stored hidden states ``h`` and
  the stored head, blockwise, as they would with the teacher run online, so a student trained
  from the cache is the student trained from the online teacher (bit for bit when the hidden
  states are stored in the dtype the online teacher hands over). It costs ``hidden_size``
  values per token instead of ``k`` ids and log-probabilities, and the head once.

  The guarantees are those of :func:`write_teacher_cache`: the shards and the head file are new
  files, the manifest is renamed into place last, a failed or killed write leaves a cache
  already in ``directory`` untouched (with ``overwrite`` its files are removed only after the
  new manifest replaced its own, whatever kind of cache it was), and a second writer to the
  same folder fails at once with :class:`TeacherCacheError`. Everything is checked before it is
  written: nothing non-finite is stored (a ``-inf`` bias entry, a masked vocabulary entry, is
  kept).

  Args:
    directory: where to write; created if missing. It must not already hold a cache unless
      ``overwrite``.
    batches: iterable of hidden-state arrays ``[..., hidden_size]`` (NumPy or JAX), bfloat16,
      float16 or float32, stored as given: every batch in the first one's dtype. The leading
      axes are flattened into tokens in C order, batch after batch, and the first batch's
      token shape is recorded (:attr:`HiddenStateCacheInfo.batch_shape`); later batches may
      have another first axis (a shorter last batch), not other rows. At least one token in
      all. Pass the teacher's final hidden states, the input of its output projection (after
      its final norm).
    teacher_kernel: the teacher's output projection ``[hidden_size, vocab_size]`` (the
      ``flax.nnx.Linear`` layout; a PyTorch ``nn.Linear`` weight is its transpose), finite,
      bfloat16, float16 or float32, stored as given.
    teacher_bias: optional output bias ``[vocab_size]``, in one of those dtypes; ``-inf``
      entries (padded vocabulary entries) are kept, NaN and ``+inf`` refused.
    logit_scale: the teacher's logit scale (Cohere), a number ``> 0``, or None.
    softcap: the teacher's softcap (Gemma), a number ``> 0``, or None.
    tokens_per_shard: tokens per shard file (default: about 256 MiB per shard).
    metadata: JSON-serialisable extras recorded in the manifest (teacher name, dataset, ...).
    overwrite: replace an existing cache (of either kind) in ``directory``.

  Returns:
    The :class:`HiddenStateCacheInfo` of the written cache.

  Raises:
    FileExistsError: ``directory`` holds a cache and ``overwrite`` is false.
    TeacherCacheError: another writer is writing to ``directory``, or a file cannot be written
      (a full disk, a file-size limit: the error names the file; nothing is left behind).
    ValueError, TypeError: a bad argument or batch, or batches that hold no token (nothing is
      left behind).

  Example:
    >>> import tempfile, numpy as np
    >>> from kdjax._src.cache import (write_hidden_state_cache, read_hidden_state_cache,
    ...                               read_teacher_head)
    >>> rng = np.random.default_rng(0)
    >>> kernel = rng.normal(size=(8, 50)).astype(np.float32)  # [hidden, vocab]
    >>> hidden = rng.normal(size=(2, 3, 8)).astype(np.float32)  # [batch, seq, hidden]
    >>> path = tempfile.mkdtemp()
    >>> info = write_hidden_state_cache(path, [hidden], teacher_kernel=kernel, softcap=30.0)
    >>> info.num_tokens, info.bytes_per_token, info.vocab_size
    (6, 32, 50)
    >>> read = next(read_hidden_state_cache(path, batch_shape=(2, 3)))
    >>> bool((read == hidden).all()), read_teacher_head(path).softcap
    (True, 30.0)
  """
  kernel = _float_array("teacher_kernel", teacher_kernel)
  if kernel.ndim != 2 or 0 in kernel.shape:
    raise ValueError(
        f"teacher_kernel must be a [hidden_size, vocab_size] matrix (flax.nnx.Linear layout; a "
        f"PyTorch nn.Linear weight is its transpose), got shape {kernel.shape}.")
  hidden_size, vocab_size = kernel.shape
  if hidden_size > MAX_HIDDEN_SIZE:
    raise ValueError(f"teacher_kernel has {hidden_size} rows, more than {MAX_HIDDEN_SIZE}.")
  if not np.isfinite(kernel.astype(np.float32)).all():
    raise ValueError("teacher_kernel must be finite, got NaN or inf entries.")
  bias = None
  if teacher_bias is not None:
    bias = _float_array("teacher_bias", teacher_bias)
    if bias.shape != (vocab_size,):
      raise ValueError(
          f"teacher_bias must have shape (vocab_size,) = ({vocab_size},) to match "
          f"teacher_kernel.shape={kernel.shape}, got {bias.shape}.")
    wide = bias.astype(np.float32)
    if np.isnan(wide).any() or np.isposinf(wide).any():
      raise ValueError(
          "teacher_bias must be finite or -inf (a masked vocabulary entry), got NaN or +inf.")
  logit_scale = _optional_positive("logit_scale", logit_scale)
  softcap = _optional_positive("softcap", softcap)
  directory, metadata = _check_write_arguments(directory, tokens_per_shard, metadata)

  def write(writer: _Writer) -> dict[str, Any]:
    head_parts = [_little_endian_bytes(kernel)]
    if bias is not None:
      head_parts.append(_little_endian_bytes(bias))
    head_crc = 0
    for part in head_parts:
      head_crc = zlib.crc32(part, head_crc)
    head_file = writer.head_name()
    writer.create(head_file, head_parts)
    manifest = _write_hidden_shards(writer, batches, hidden_size=hidden_size,
                                    vocab_size=vocab_size, tokens_per_shard=tokens_per_shard)
    manifest.update(
        vocab_size=int(vocab_size),
        head={"file": head_file, "kernel_dtype": kernel.dtype.name,
              "bias_dtype": None if bias is None else bias.dtype.name,
              "num_bytes": sum(map(len, head_parts)), "crc32": head_crc,
              "logit_scale": logit_scale, "softcap": softcap},
        metadata=metadata)
    return manifest

  _commit(directory, overwrite, write)
  return open_hidden_state_cache(directory)


def _write_hidden_shards(writer: _Writer, batches: Iterable[Any], *, hidden_size: int,
                         vocab_size: int, tokens_per_shard: int | None) -> dict[str, Any]:
  """Writes the hidden-state batches as shards; returns the manifest without the head."""
  dtype: np.dtype | None = None
  batch_shape: tuple[int, ...] | None = None
  stream: _ShardStream | None = None
  batch_index = -1
  for batch_index, batch in enumerate(batches):
    hidden = _float_array(f"batch {batch_index}", batch)
    if hidden.ndim < 1 or hidden.shape[-1] != hidden_size:
      hint = ""
      if hidden.ndim and hidden.shape[-1] == vocab_size:
        hint = (" teacher_kernel looks transposed: a PyTorch nn.Linear weight is [vocab, d]; "
                "pass its transpose.")
      raise ValueError(
          f"batch {batch_index}: hidden states must have shape [..., hidden_size] with "
          f"hidden_size = teacher_kernel.shape[0] = {hidden_size} (the input of the teacher's "
          f"output projection), got {hidden.shape}.{hint}")
    if dtype is None:
      dtype = hidden.dtype
      stream = _ShardStream(writer, tokens_per_shard or max(
          1, DEFAULT_SHARD_BYTES // (hidden_size * dtype.itemsize)))
    elif hidden.dtype != dtype:
      raise TypeError(
          f"batch {batch_index}: dtype {hidden.dtype} differs from the first batch's {dtype}; "
          "hidden states are stored as given, in one dtype: cast every batch to it.")
    if hidden.size:
      batch_shape = _batch_shape(batch_index, hidden.shape[:-1] or (1,), batch_shape)
    rows = hidden.reshape(-1, hidden_size)
    if not np.isfinite(rows.astype(np.float32)).all():
      raise ValueError(
          f"batch {batch_index}: hidden states must be finite, got NaN or inf (check the "
          "teacher's activations).")
    stream.add([rows.astype(_FLOAT_DTYPES[dtype.name])])  # type: ignore[union-attr]  # set with dtype
  if dtype is None or stream is None:
    raise ValueError("batches is empty: there is nothing to cache.")
  if batch_shape is None:
    raise ValueError(
        f"batches hold no tokens ({batch_index + 1} batches, each of size 0): there is nothing "
        "to cache.")
  shards = stream.finish()
  return {
      "format": FORMAT, "version": HIDDEN_STATES_VERSION, "kind": "hidden_states",
      "num_tokens": sum(s.num_tokens for s in shards), "batch_shape": list(batch_shape),
      "hidden_size": int(hidden_size), "hidden_dtype": dtype.name,
      "shards": [shard._asdict() for shard in shards],
  }


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


class _Manifest:
  """Typed access to a parsed manifest: every failure names the file and the field."""

  def __init__(self, path: str, data: Any):
    self.path = path
    if not isinstance(data, dict):
      raise TeacherCacheError(
          f"{path!r} is corrupted: the manifest must be a JSON object, got {_short(data)}.")

  def error(self, field: str, expected: str, value: Any) -> TeacherCacheError:
    return TeacherCacheError(
        f"{self.path!r} is corrupted: field {field!r} must be {expected}, got {_short(value)}.")

  def get(self, mapping: dict, key: str, field: str) -> Any:
    if key not in mapping:
      raise TeacherCacheError(f"{self.path!r} is corrupted: field {field!r} is missing.")
    return mapping[key]

  def integer(self, mapping: dict, key: str, field: str, low: int, high: int) -> int:
    value = self.get(mapping, key, field)
    # JSON integers only: a float, a string or a boolean is not a count.
    if type(value) is not int or not low <= value <= high:
      raise self.error(field, f"an integer in [{low}, {high}]", value)
    return value


def _open_regular_file(path: str, name: str):
  """Opens ``path`` for reading if it is a regular file, not a folder, a symbolic link, a FIFO or
  a device.

  The type is checked before the file is opened (opening a FIFO or a device can block or act),
  and again on the open file, in case the path was replaced in between.
  """
  try:
    status = os.lstat(path)
  except FileNotFoundError:
    raise TeacherCacheError(f"{name} is missing.") from None
  except OSError as e:
    raise TeacherCacheError(f"{name} cannot be opened: {e.strerror}.") from None
  if not stat.S_ISREG(status.st_mode):
    raise TeacherCacheError(f"{name} is not a regular file ({_file_kind(status.st_mode)}).")
  try:
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
  except FileNotFoundError:
    raise TeacherCacheError(f"{name} is missing.") from None
  except OSError as e:
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link.
      raise TeacherCacheError(f"{name} is not a regular file (a symbolic link).") from None
    raise TeacherCacheError(f"{name} cannot be opened: {e.strerror}.") from None
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise TeacherCacheError(f"{name} is not a regular file ({_file_kind(mode)}).")
  return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
  for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                     (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
    if test(mode):
      return kind
  return "not a plain file"


def _read_manifest(directory: str) -> CacheInfo | HiddenStateCacheInfo:
  path = os.path.join(directory, MANIFEST)
  if not os.path.lexists(path):
    raise TeacherCacheError(
        f"{path!r} does not exist: {directory!r} is not a teacher cache, or its writer did not "
        "finish.")
  with _open_regular_file(path, repr(path)) as f:
    raw = f.read(MAX_MANIFEST_BYTES + 1)
  if len(raw) > MAX_MANIFEST_BYTES:
    raise TeacherCacheError(
        f"{path!r} is corrupted: it is larger than {MAX_MANIFEST_BYTES} bytes.")
  try:
    data = json.loads(raw, parse_constant=_reject_constant)
  except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting.
    raise TeacherCacheError(
        f"{path!r} is corrupted: it is not valid JSON ({_short(str(e))}).") from None
  manifest = _Manifest(path, data)
  fmt, version = data.get("format"), data.get("version")
  if fmt != FORMAT or type(version) is not int or version not in READABLE_VERSIONS:
    versions = ", ".join(map(str, READABLE_VERSIONS[:-1])) + f" or {READABLE_VERSIONS[-1]}"
    raise TeacherCacheError(
        f"{path!r} is not a {FORMAT} manifest of version {versions} (format={_short(fmt)}, "
        f"version={_short(version)}).")
  kind = "topk"  # what versions 1 and 2 hold
  if version >= 3:
    kind = manifest.get(data, "kind", "kind")
    if not isinstance(kind, str) or kind not in KINDS:
      raise manifest.error("kind", f"one of {list(KINDS)}", kind)
  if kind == "hidden_states":
    return _hidden_state_manifest(directory, manifest, data)
  vocab_size = manifest.integer(data, "vocab_size", "vocab_size", 1, 2**32)
  k = manifest.integer(data, "k", "k", 1, 2**31 - 1)
  num_tokens = manifest.integer(data, "num_tokens", "num_tokens", 0, 2**63 - 1)
  batch_shape = None
  if version >= 2:
    batch_shape = _recorded_batch_shape(manifest, data, num_tokens)
  ids_name = manifest.get(data, "id_dtype", "id_dtype")
  if ids_name != id_dtype(vocab_size).name:
    raise manifest.error("id_dtype", f"{id_dtype(vocab_size).name!r} for vocab_size={vocab_size}",
                         ids_name)
  logprob_dtype = manifest.get(data, "logprob_dtype", "logprob_dtype")
  if not isinstance(logprob_dtype, str) or logprob_dtype not in _LOGPROB_DTYPES:
    raise manifest.error("logprob_dtype", f"one of {sorted(_LOGPROB_DTYPES)}", logprob_dtype)
  temperature = manifest.get(data, "temperature", "temperature")
  if not _is_positive_finite(temperature):
    raise manifest.error("temperature", "a finite number > 0", temperature)
  metadata = _manifest_metadata(manifest, data)
  shards = _shard_entries(manifest, data, num_tokens,
                          bytes_per_token(k, vocab_size, logprob_dtype=logprob_dtype))
  return CacheInfo(directory, num_tokens, k, vocab_size, ids_name, logprob_dtype,
                   float(temperature), shards, metadata, batch_shape)


def _manifest_metadata(manifest: _Manifest, data: dict) -> dict[str, Any]:
  metadata = data.get("metadata", {})
  if not isinstance(metadata, dict):
    raise manifest.error("metadata", "a JSON object", metadata)
  return metadata


def _shard_entries(manifest: _Manifest, data: dict, num_tokens: int,
                   token_bytes: int) -> tuple[ShardInfo, ...]:
  """The manifest's ``shards``: plain file names of the writer's form, each listed once, with
  counts that agree with ``token_bytes`` per token and add up to ``num_tokens``."""
  path = manifest.path
  entries = manifest.get(data, "shards", "shards")
  if not isinstance(entries, list):
    raise manifest.error("shards", "a list", entries)
  shards: list[ShardInfo] = []
  seen: dict[str, int] = {}
  for index, entry in enumerate(entries):
    field = f"shards[{index}]"
    if not isinstance(entry, dict):
      raise manifest.error(field, "a JSON object", entry)
    file = manifest.get(entry, "file", f"{field}.file")
    if not isinstance(file, str) or not _SHARD_FILE.fullmatch(file):
      raise manifest.error(
          f"{field}.file", "a plain shard file name such as 'shard-0123abcd-00000.bin'", file)
    if file in seen:
      raise TeacherCacheError(
          f"{path!r} is corrupted: field '{field}.file' repeats shards[{seen[file]}].file "
          f"({file!r}).")
    seen[file] = index
    shard_tokens = manifest.integer(entry, "num_tokens", f"{field}.num_tokens", 1, 2**63 - 1)
    num_bytes = manifest.integer(entry, "num_bytes", f"{field}.num_bytes", 0, 2**63 - 1)
    crc = manifest.integer(entry, "crc32", f"{field}.crc32", 0, 2**32 - 1)
    if num_bytes != shard_tokens * token_bytes:
      raise TeacherCacheError(
          f"{path!r} is corrupted: field '{field}.num_bytes' is {num_bytes} for {shard_tokens} "
          f"tokens of {token_bytes} bytes.")
    shards.append(ShardInfo(file, shard_tokens, num_bytes, crc))
  if sum(shard.num_tokens for shard in shards) != num_tokens:
    raise TeacherCacheError(
        f"{path!r} is corrupted: field 'num_tokens' is {num_tokens} but the shard token counts "
        f"do not add up to it.")
  return tuple(shards)


def _optional_number(manifest: _Manifest, mapping: dict, key: str, field: str) -> float | None:
  value = manifest.get(mapping, key, field)
  if value is None:
    return None
  if not _is_positive_finite(value):
    raise manifest.error(field, "a finite number > 0 or null", value)
  return float(value)


def _hidden_state_manifest(directory: str, manifest: _Manifest,
                           data: dict) -> HiddenStateCacheInfo:
  """The fields of a hidden-state cache (version 3, kind "hidden_states"), each checked."""
  vocab_size = manifest.integer(data, "vocab_size", "vocab_size", 1, 2**32)
  hidden_size = manifest.integer(data, "hidden_size", "hidden_size", 1, MAX_HIDDEN_SIZE)
  num_tokens = manifest.integer(data, "num_tokens", "num_tokens", 0, 2**63 - 1)
  batch_shape = _recorded_batch_shape(manifest, data, num_tokens)
  hidden_dtype = manifest.get(data, "hidden_dtype", "hidden_dtype")
  if not isinstance(hidden_dtype, str) or hidden_dtype not in _FLOAT_DTYPES:
    raise manifest.error("hidden_dtype", f"one of {sorted(_FLOAT_DTYPES)}", hidden_dtype)
  entry = manifest.get(data, "head", "head")
  if not isinstance(entry, dict):
    raise manifest.error("head", "a JSON object", entry)
  file = manifest.get(entry, "file", "head.file")
  if not isinstance(file, str) or not _HEAD_FILE.fullmatch(file):
    raise manifest.error("head.file", "a plain head file name such as 'head-0123abcd.bin'", file)
  kernel_dtype = manifest.get(entry, "kernel_dtype", "head.kernel_dtype")
  if not isinstance(kernel_dtype, str) or kernel_dtype not in _FLOAT_DTYPES:
    raise manifest.error("head.kernel_dtype", f"one of {sorted(_FLOAT_DTYPES)}", kernel_dtype)
  bias_dtype = manifest.get(entry, "bias_dtype", "head.bias_dtype")
  if bias_dtype is not None and (not isinstance(bias_dtype, str)
                                 or bias_dtype not in _FLOAT_DTYPES):
    raise manifest.error("head.bias_dtype", f"null or one of {sorted(_FLOAT_DTYPES)}",
                         bias_dtype)
  num_bytes = manifest.integer(entry, "num_bytes", "head.num_bytes", 1, 2**63 - 1)
  expected = head_bytes(hidden_size, vocab_size, kernel_dtype=kernel_dtype,
                        bias_dtype=bias_dtype)
  if num_bytes != expected:
    raise TeacherCacheError(
        f"{manifest.path!r} is corrupted: field 'head.num_bytes' is {num_bytes} for a "
        f"[{hidden_size}, {vocab_size}] {kernel_dtype} kernel"
        f"{'' if bias_dtype is None else f' and a {bias_dtype} bias'} ({expected} bytes).")
  crc = manifest.integer(entry, "crc32", "head.crc32", 0, 2**32 - 1)
  head = HeadInfo(file, kernel_dtype, bias_dtype, num_bytes, crc,
                  _optional_number(manifest, entry, "logit_scale", "head.logit_scale"),
                  _optional_number(manifest, entry, "softcap", "head.softcap"))
  metadata = _manifest_metadata(manifest, data)
  shards = _shard_entries(manifest, data, num_tokens,
                          hidden_state_bytes_per_token(hidden_size, hidden_dtype))
  return HiddenStateCacheInfo(directory, num_tokens, hidden_size, hidden_dtype, vocab_size, head,
                              shards, metadata, batch_shape)


def _recorded_batch_shape(manifest: _Manifest, data: dict, num_tokens: int) -> tuple[int, ...]:
  """The manifest's ``batch_shape``: positive integers, the first batch within the cache's tokens
  and the tokens whole rows of it (what every cache the writer commits satisfies)."""
  value = manifest.get(data, "batch_shape", "batch_shape")
  if (not isinstance(value, list) or not 1 <= len(value) <= MAX_BATCH_RANK
      or any(type(d) is not int or d < 1 for d in value)):
    raise manifest.error(
        "batch_shape", f"a list of 1 to {MAX_BATCH_RANK} positive integers", value)
  if math.prod(value) > num_tokens or num_tokens % math.prod(value[1:]):
    raise TeacherCacheError(
        f"{manifest.path!r} is corrupted: field 'batch_shape' is {value}, which "
        f"num_tokens={num_tokens} cannot hold (one batch, whole rows of {value[1:]}).")
  return tuple(value)


def _is_positive_finite(value: Any) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  try:
    return math.isfinite(float(value)) and float(value) > 0
  except OverflowError:  # an integer too large for a float
    return False


def _reject_constant(name: str) -> None:
  raise ValueError(f"{name} is not valid JSON")


def _shard_path(directory: str, file: str) -> str:
  """The path of a shard named ``file``, which must be a plain name the writer produces."""
  if not isinstance(file, str) or not _SHARD_FILE.fullmatch(file):
    raise TeacherCacheError(
        f"{_short(file)} is not a plain shard file name such as 'shard-0123abcd-00000.bin' "
        "(a file inside the cache folder).")
  return os.path.join(directory, file)


def _head_path(directory: str, file: str) -> str:
  """The path of a head file named ``file``, which must be a plain name the writer produces."""
  if not isinstance(file, str) or not _HEAD_FILE.fullmatch(file):
    raise TeacherCacheError(
        f"{_short(file)} is not a plain head file name such as 'head-0123abcd.bin' (a file "
        "inside the cache folder).")
  return os.path.join(directory, file)


def _check_file_size(path: str, name: str, num_bytes: int) -> None:
  try:
    status = os.lstat(path)
  except FileNotFoundError:
    raise TeacherCacheError(f"{name} {path!r} is missing.") from None
  if not stat.S_ISREG(status.st_mode):
    raise TeacherCacheError(
        f"{name} {path!r} is not a regular file ({_file_kind(status.st_mode)}).")
  if status.st_size != num_bytes:
    raise TeacherCacheError(
        f"{name} {path!r} is "
        f"{'truncated' if status.st_size < num_bytes else 'too long'}: the manifest "
        f"records {num_bytes} bytes, the file has {status.st_size}.")


def _open_checked(directory: str | os.PathLike, kind: str) -> CacheInfo | HiddenStateCacheInfo:
  """The manifest of the cache in ``directory``, which must be of ``kind``, with every file it
  lists present at its recorded size."""
  directory = os.fspath(directory)
  info = _read_manifest(directory)
  if isinstance(info, HiddenStateCacheInfo) and kind == "topk":
    raise TeacherCacheError(
        f"{directory!r} holds a teacher's hidden states (a hidden-state cache), not top-k "
        "log-probabilities: read it with kdjax.read_hidden_state_cache and "
        "kdjax.read_teacher_head, and distill with the fused losses.")
  if isinstance(info, CacheInfo) and kind == "hidden_states":
    raise TeacherCacheError(
        f"{directory!r} holds sparse (top-k) teacher log-probabilities, not hidden states: "
        "read it with kdjax.read_teacher_cache and distill with kdjax.sparse_distill_loss.")
  if isinstance(info, HiddenStateCacheInfo):
    _check_file_size(_head_path(directory, info.head.file), "head", info.head.num_bytes)
  for shard in info.shards:
    _check_file_size(_shard_path(directory, shard.file), "shard", shard.num_bytes)
  return info


def open_teacher_cache(directory: str | os.PathLike) -> CacheInfo:
  """Reads and checks a cache's manifest, and that every shard file has its recorded size.

  Every field of the manifest is checked (types, ranges, and that the byte and token counts
  agree with each other and with the files), and shard files must be plain file names of the
  writer's form, inside ``directory``, and regular files (not symbolic links or FIFOs).

  Returns:
    The :class:`CacheInfo`; its ``batch_shape`` is the token shape the cache was written in, or
    None for a cache of format version 1 (written before the shape was recorded).

  Raises:
    TeacherCacheError: no manifest (missing or unfinished cache), an unreadable or
      inconsistent manifest (naming the field), a missing or truncated shard, or a
      hidden-state cache (see :func:`open_hidden_state_cache`).
  """
  info = _open_checked(directory, "topk")
  assert isinstance(info, CacheInfo)
  return info


def open_hidden_state_cache(directory: str | os.PathLike) -> HiddenStateCacheInfo:
  """Reads and checks a hidden-state cache's manifest, and the sizes of its files.

  As :func:`open_teacher_cache` does for a top-k cache: every field is checked (the head's
  dtypes, its byte count against its shape, the logit scale and softcap), the head and the
  shards must be plain file names of the writer's form, inside ``directory``, regular files of
  their recorded sizes.

  Returns:
    The :class:`HiddenStateCacheInfo`: ``num_tokens``, ``hidden_size``, ``hidden_dtype``,
    ``vocab_size``, ``batch_shape`` (the token shape the cache was written in), ``head`` (its
    file, dtypes, logit scale and softcap), ``metadata`` and ``bytes_per_token``.

  Raises:
    TeacherCacheError: no manifest, an unreadable or inconsistent manifest (naming the field),
      a missing or truncated file, or a top-k cache (see :func:`open_teacher_cache`).

  Example:
    >>> import tempfile, numpy as np
    >>> from kdjax._src.cache import open_hidden_state_cache, write_hidden_state_cache
    >>> path = tempfile.mkdtemp()
    >>> _ = write_hidden_state_cache(path, [np.ones((4, 16), np.float32)],
    ...                              teacher_kernel=np.ones((16, 100), np.float32))
    >>> info = open_hidden_state_cache(path)
    >>> info.hidden_size, info.hidden_dtype, info.vocab_size, info.batch_shape
    (16, 'float32', 100, (4,))
  """
  info = _open_checked(directory, "hidden_states")
  assert isinstance(info, HiddenStateCacheInfo)
  return info


def _read_file(path: str, name: str, num_bytes: int, crc32: int, *, verify: bool) -> bytes:
  """A file's bytes, after checking its size and (with ``verify``) its CRC-32."""
  with _open_regular_file(path, f"{name} {path!r}") as f:
    payload = f.read(num_bytes + 1)
  if len(payload) != num_bytes:
    raise TeacherCacheError(
        f"{name} {path!r} is {'truncated' if len(payload) < num_bytes else 'too long'}: "
        f"the manifest records {num_bytes} bytes, the file has "
        f"{'more' if len(payload) > num_bytes else len(payload)}.")
  if verify and zlib.crc32(payload) != crc32:
    raise TeacherCacheError(
        f"{name} {path!r} is corrupted: its CRC-32 is {zlib.crc32(payload):#010x}, the "
        f"manifest records {crc32:#010x}.")
  return payload


def read_shard(info: CacheInfo, index: int, *, verify: bool = True) -> tuple[np.ndarray,
                                                                             np.ndarray]:
  """One shard's ``(ids, logprobs)``: int32 ``[tokens, k]`` and the storage dtype ``[tokens, k]``.

  The shard's size is checked, and with ``verify`` (default) its CRC-32 too, before any of it is
  used; ids out of range and NaN or ``+inf`` log-probabilities are always reported as corruption.
  """
  shard = info.shards[index]
  path = _shard_path(info.directory, shard.file)
  payload = _read_file(path, "shard", shard.num_bytes, shard.crc32, verify=verify)
  ids_dtype = np.dtype(info.id_dtype).newbyteorder("<")
  id_bytes = shard.num_tokens * info.k * ids_dtype.itemsize
  ids = np.frombuffer(payload, ids_dtype, count=shard.num_tokens * info.k)
  logprobs = np.frombuffer(payload, _logprob_dtype(info.logprob_dtype), offset=id_bytes)
  ids = ids.reshape(shard.num_tokens, info.k).astype(np.int32)
  if ids.size and ids.max() >= info.vocab_size:
    raise TeacherCacheError(f"shard {path!r} is corrupted: an id is >= {info.vocab_size}.")
  if np.isnan(logprobs).any() or np.isposinf(logprobs).any():
    raise TeacherCacheError(
        f"shard {path!r} is corrupted: it holds NaN or +inf log-probabilities.")
  return ids, logprobs.reshape(shard.num_tokens, info.k)


def read_hidden_shard(info: HiddenStateCacheInfo, index: int, *,
                      verify: bool = True) -> np.ndarray:
  """One shard's hidden states ``[tokens, hidden_size]`` in the stored dtype, after the checks
  of :func:`read_shard`; a NaN or infinite value is reported as corruption."""
  shard = info.shards[index]
  path = _shard_path(info.directory, shard.file)
  payload = _read_file(path, "shard", shard.num_bytes, shard.crc32, verify=verify)
  hidden = np.frombuffer(payload, _FLOAT_DTYPES[info.hidden_dtype]).reshape(
      shard.num_tokens, info.hidden_size)
  if not np.isfinite(hidden.astype(np.float32)).all():
    raise TeacherCacheError(f"shard {path!r} is corrupted: it holds NaN or infinite values.")
  return hidden


def read_teacher_head(directory: str | os.PathLike, *, verify: bool = True) -> TeacherHead:
  """The teacher's output layer stored in a hidden-state cache, checked before it is returned.

  The head file's size and (with ``verify``, the default) CRC-32 are checked against the
  manifest; a NaN or infinite kernel entry, or a NaN or ``+inf`` bias entry, is corruption.

  Returns:
    A :class:`TeacherHead`: ``kernel`` ``[hidden_size, vocab_size]`` and ``bias``
    ``[vocab_size]`` or None (NumPy, in their stored dtypes), ``logit_scale`` and ``softcap``
    (numbers or None), for the teacher side of :func:`kdjax.fused_linear_distill_loss`.

  Raises:
    TeacherCacheError: as :func:`open_hidden_state_cache`, or a corrupted head.
  """
  info = open_hidden_state_cache(directory)
  head = info.head
  path = _head_path(info.directory, head.file)
  payload = _read_file(path, "head", head.num_bytes, head.crc32, verify=verify)
  kernel_dtype = _FLOAT_DTYPES[head.kernel_dtype]
  count = info.hidden_size * info.vocab_size
  kernel = np.frombuffer(payload, kernel_dtype, count=count).reshape(info.hidden_size,
                                                                    info.vocab_size)
  if not np.isfinite(kernel.astype(np.float32)).all():
    raise TeacherCacheError(f"head {path!r} is corrupted: its kernel holds NaN or inf.")
  bias = None
  if head.bias_dtype is not None:
    bias = np.frombuffer(payload, _FLOAT_DTYPES[head.bias_dtype],
                         offset=count * kernel_dtype.itemsize)
    wide = bias.astype(np.float32)
    if np.isnan(wide).any() or np.isposinf(wide).any():
      raise TeacherCacheError(f"head {path!r} is corrupted: its bias holds NaN or +inf.")
  return TeacherHead(kernel, bias, head.logit_scale, head.softcap)


def _check_read(info: CacheInfo | HiddenStateCacheInfo, batch_shape: tuple[int, ...],
                start_token: int, drop_remainder: bool) -> None:
  """The checks of a read (see :func:`read_teacher_cache`), before the first batch."""
  if not 0 <= start_token <= info.num_tokens:
    raise ValueError(
        f"start_token must be in [0, num_tokens={info.num_tokens}], got {start_token}.")
  written = info.batch_shape
  if written is not None:
    if len(batch_shape) != len(written) or batch_shape[1:] != written[1:]:
      rows = "(n,)" if len(written) == 1 else f"(n, {', '.join(map(str, written[1:]))})"
      raise TeacherCacheError(
          f"{info.directory!r} was written in batches of token shape {written}, but "
          f"batch_shape={batch_shape} was asked: its rows would not line up with the written "
          f"ones. Read with batch_shape={written}, or {rows} for n rows per batch.")
    row_tokens = math.prod(written[1:])
    if start_token % row_tokens:
      raise TeacherCacheError(
          f"start_token={start_token} is inside a row of {info.directory!r}, which was written "
          f"in batches of token shape {written} ({row_tokens} tokens per row): pass a multiple "
          f"of {row_tokens}.")
  batch_tokens = math.prod(batch_shape)
  left = info.num_tokens - start_token
  if left < batch_tokens and (drop_remainder or not left):
    raise TeacherCacheError(
        f"batch_shape={batch_shape} takes {batch_tokens} tokens per batch, but "
        f"{info.directory!r} holds {left} tokens from start_token={start_token} "
        f"(num_tokens={info.num_tokens}): the read would yield no batch. Pass a smaller "
        "batch_shape" + (", or drop_remainder=False for a shorter batch." if left else "."))
  remainder = left % batch_tokens
  if remainder and not drop_remainder and remainder % math.prod(batch_shape[1:]):
    raise ValueError(
        f"the last {remainder} cached tokens do not fill whole rows of batch_shape[1:] = "
        f"{batch_shape[1:]}; pass drop_remainder=True to drop them.")


def _check_start_token(start_token: Any) -> int:
  if not _is_integer(start_token):
    raise TypeError(
        f"start_token must be an integer (the number of cached tokens to skip), got "
        f"{_short(start_token)} of type {type(start_token).__name__}.")
  return int(start_token)


def read_teacher_cache(
    directory: str | os.PathLike,
    *,
    batch_shape: tuple[int, ...],
    start_token: int = 0,
    drop_remainder: bool = True,
    verify: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(ids, logprobs)`` batches aligned with token batches of shape ``batch_shape``.

  Batch ``i`` holds the cached tokens ``start_token + i * prod(batch_shape)`` onwards, reshaped
  to ``batch_shape + (k,)``: iterate the token dataset with the same batch shape and order it had
  when the cache was written, and ``zip`` the two. Shards are read one at a time (and checked:
  see :func:`read_shard`); batches may span shard boundaries.

  The cache records the token shape of the batches it was written with
  (:attr:`CacheInfo.batch_shape`). ``batch_shape`` must have the same rows: the same number of
  axes and the same axes after the first (for a cache written in ``(4, 8)`` batches,
  ``(4, 8)``, ``(2, 8)`` or ``(16, 8)``, never ``(4, 7)`` or ``(32,)``), and ``start_token``
  must be a whole number of rows, so that every row read is a row written. Caches written
  before the shape was recorded are read with any ``batch_shape``.

  The arguments and the manifest are checked when this is called, before the first batch.

  Args:
    directory: the cache directory.
    batch_shape: token shape of one batch, for example ``(batch, seq)``: a tuple (or list) of
      positive integers.
    start_token: first token to yield (to resume a run; a multiple of ``prod(batch_shape)``
      keeps the alignment with the batches of the run).
    drop_remainder: drop a final batch with fewer tokens. Otherwise it is yielded with a shorter
      first axis when it holds whole rows of ``batch_shape[1:]``, and an error is raised if not.
    verify: check each shard's CRC-32 before using it.

  Yields:
    ``ids`` int32 and ``logprobs`` (float16 or bfloat16, as stored) of shape
    ``batch_shape + (k,)``; pass them to :func:`kdjax.sparse_distill_loss` as they are.

  Raises:
    TypeError: ``batch_shape`` or ``start_token`` is not made of integers (``bool`` included).
    ValueError: ``batch_shape`` has an axis < 1, or ``start_token`` is outside the cache.
    TeacherCacheError: a missing, truncated or corrupted manifest or shard; a ``batch_shape``
      whose rows are not those of the written batches, or a ``start_token`` inside a row; a
      read that would yield no batch at all (a batch larger than the tokens left); or a
      hidden-state cache (see :func:`read_hidden_state_cache`).
  """
  batch_shape = _check_batch_shape(batch_shape)
  start_token = _check_start_token(start_token)
  info = open_teacher_cache(directory)
  _check_read(info, batch_shape, start_token, drop_remainder)
  batches = _batches(info, batch_shape, start_token, (info.k,),
                     lambda index: read_shard(info, index, verify=verify),
                     drop_remainder=drop_remainder)
  return ((ids, logprobs) for ids, logprobs in batches)


def read_hidden_state_cache(
    directory: str | os.PathLike,
    *,
    batch_shape: tuple[int, ...],
    start_token: int = 0,
    drop_remainder: bool = True,
    verify: bool = True,
) -> Iterator[np.ndarray]:
  """Yields teacher hidden-state batches aligned with token batches of shape ``batch_shape``.

  The reader of :func:`write_hidden_state_cache`'s caches, with every argument, check and rule
  of :func:`read_teacher_cache`: the rows asked for must be the rows written
  (:attr:`HiddenStateCacheInfo.batch_shape`), ``start_token`` a whole number of rows, and the
  read must yield at least one batch; each shard's size and CRC-32 are checked before any of it
  is returned. The teacher's output layer is read once with :func:`read_teacher_head`.

  Yields:
    Hidden states ``batch_shape + (hidden_size,)`` in the stored dtype; pass them as
    ``teacher_hidden`` to :func:`kdjax.fused_linear_distill_loss` (or its siblings), with the
    head's kernel, bias, logit scale and softcap.

  Raises:
    TypeError, ValueError, TeacherCacheError: as :func:`read_teacher_cache`; a top-k cache is a
      :class:`TeacherCacheError` too.

  Example:
    >>> import tempfile, numpy as np
    >>> from kdjax._src.cache import read_hidden_state_cache, write_hidden_state_cache
    >>> hidden = np.arange(48, dtype=np.float32).reshape(3, 2, 8)  # [batch, seq, hidden]
    >>> path = tempfile.mkdtemp()
    >>> _ = write_hidden_state_cache(path, [hidden[:2], hidden[2:]],
    ...                              teacher_kernel=np.ones((8, 10), np.float32))
    >>> [batch.shape for batch in read_hidden_state_cache(path, batch_shape=(1, 2))]
    [(1, 2, 8), (1, 2, 8), (1, 2, 8)]
  """
  batch_shape = _check_batch_shape(batch_shape)
  start_token = _check_start_token(start_token)
  info = open_hidden_state_cache(directory)
  _check_read(info, batch_shape, start_token, drop_remainder)
  batches = _batches(info, batch_shape, start_token, (info.hidden_size,),
                     lambda index: (read_hidden_shard(info, index, verify=verify),),
                     drop_remainder=drop_remainder)
  return (hidden for (hidden,) in batches)


def _is_integer(value: Any) -> bool:
  """A Python or NumPy integer, not a bool (``True`` is not a count)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_batch_shape(batch_shape: Any) -> tuple[int, ...]:
  if not isinstance(batch_shape, (tuple, list)):
    raise TypeError(
        f"batch_shape must be a tuple of positive integers such as (batch, seq), got "
        f"{_short(batch_shape)} of type {type(batch_shape).__name__} (for one axis: "
        f"({_short(batch_shape)},)).")
  for axis, size in enumerate(batch_shape):
    if not _is_integer(size):
      raise TypeError(
          f"batch_shape must be a tuple of positive integers, got {_short(batch_shape)}: axis "
          f"{axis} is {_short(size)} of type {type(size).__name__}.")
  shape = tuple(int(size) for size in batch_shape)
  if not shape or any(size < 1 for size in shape):
    raise ValueError(f"batch_shape must be a non-empty tuple of positive ints, got {shape}.")
  return shape


def _batches(info: CacheInfo | HiddenStateCacheInfo, batch_shape: tuple[int, ...],
             start_token: int, entry_shape: tuple[int, ...], read, *,
             drop_remainder: bool) -> Iterator[tuple[np.ndarray, ...]]:
  """The batches of a checked read: ``read(shard index)`` gives the shard's arrays, each
  ``[tokens, *entry_shape]``; each batch holds them reshaped to ``batch_shape + entry_shape``."""
  batch_tokens = math.prod(batch_shape)
  buffered: list[list[np.ndarray]] = []
  count = 0
  shard_start = 0
  for index, shard in enumerate(info.shards):
    shard_end = shard_start + shard.num_tokens
    if shard_end <= start_token:
      shard_start = shard_end
      continue
    arrays = read(index)
    skip = max(0, start_token - shard_start)
    if not buffered:
      buffered = [[] for _ in arrays]
    for parts, array in zip(buffered, arrays, strict=True):
      parts.append(array[skip:])
    count += shard.num_tokens - skip
    shard_start = shard_end
    if count < batch_tokens:
      continue
    joined = [np.concatenate(parts) for parts in buffered]
    full = count // batch_tokens * batch_tokens
    for offset in range(0, full, batch_tokens):
      yield tuple(array[offset:offset + batch_tokens].reshape(batch_shape + entry_shape)
                  for array in joined)
    buffered = [[array[full:]] for array in joined]
    count -= full
  if count and not drop_remainder:  # Whole rows (checked by _check_read).
    shape = (count // math.prod(batch_shape[1:]),) + batch_shape[1:] + entry_shape
    yield tuple(np.concatenate(parts).reshape(shape) for parts in buffered)
