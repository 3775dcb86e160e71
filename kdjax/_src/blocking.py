"""Token blocking: run a function over blocks of rows so temporaries stay ``O(block * vocab)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Rows per block are chosen so one float32 block holds about this many elements (1 MiB): big
# enough to amortise the loop, small enough that the handful of block temporaries stays in
# cache and far below the 0.1x-of-the-logits memory budget for realistic sizes. Measured on a
# 2-core CPU at vocab 32000: 8 rows beat 4, 16 and 32 (benchmarks/bench_kd_loss.py).
DEFAULT_BLOCK_ELEMENTS = 1 << 18


# At least this many rows per block (when there are that many tokens), so a block can still be
# split across the devices of a data-parallel mesh axis under GSPMD (see map_token_blocks).
MIN_DEFAULT_BLOCK = 8


def default_token_block(num_tokens: int, vocab_size: int) -> int:
  target = max(MIN_DEFAULT_BLOCK, DEFAULT_BLOCK_ELEMENTS // max(vocab_size, 1))
  target = max(1, min(num_tokens, target))
  # Prefer a divisor of num_tokens close to the target: map_token_blocks then uses strided
  # blocks, which keep a sharded token axis sharded.
  for block in range(target, (target + 1) // 2 - 1, -1):
    if num_tokens % block == 0:
      return block
  return target


def map_token_blocks(
    fn: Callable[..., tuple[Array, ...]],
    inputs: Sequence[Array],
    outputs: Sequence[Array],
    *,
    block: int,
    overwrite: Mapping[int, int] | None = None,
) -> tuple[Array, ...]:
  """Writes ``fn(*row_blocks(inputs))`` into row blocks of ``outputs``.

  Every array in ``inputs`` and ``outputs`` has the token axis first, of the same length ``n``.
  ``fn`` maps a block of ``block`` rows of each input to a block of rows of each output; rows
  are independent. When ``block`` divides ``n``, block ``i`` holds the strided rows
  ``i, i + n // block, ...``: the token axis becomes the leading axis of a
  ``[block, n // block, ...]`` view and the loop runs over the second, so under GSPMD a token
  axis sharded over devices stays sharded (contiguous blocks would make the partitioner gather
  it). Otherwise the blocks are contiguous and the ``n % block`` rows left over form one last,
  smaller block (no padding copy of the inputs). ``outputs`` give the shapes and dtypes, and are
  overwritten in place by XLA.

  ``overwrite`` maps an input's index to the index of an output of the same shape and dtype
  whose buffer it becomes: that input is the output's initial value, and each block of it is
  read from the loop carry just before the block's results overwrite it. When the input is
  dead afterwards -- the logits of a train step, whose gradient is written over them -- XLA
  reuses its buffer: no fresh ``[tokens, vocab]`` buffer to fault in and zero-fill. When it is
  not (an argument of the jitted function, say), XLA copies it first, which costs about what
  the zero-fill would have.

  On XLA:CPU, 16-bit float arrays cross the loop boundary as their bits (``uint16``): its
  compiler cannot slice a bfloat16 array in place and would otherwise upcast the whole loop
  operand to float32 before the loop -- a ``[tokens, vocab]`` float32 temporary. The bits cost
  one 16-bit copy of each such input instead (half of that). Other backends slice in place.
  """
  overwrite = dict(overwrite or {})
  for i, o in overwrite.items():
    if (inputs[i].shape, inputs[i].dtype) != (outputs[o].shape, outputs[o].dtype):
      raise ValueError(f"input {i} cannot overwrite output {o}: shapes or dtypes differ.")
  sources = {o: i for i, o in overwrite.items()}
  outputs = [inputs[sources[j]] if j in sources else o for j, o in enumerate(outputs)]
  if not any(x.dtype in _SIXTEEN_BIT_FLOATS for x in (*inputs, *outputs)):
    return _map_blocks(fn, inputs, outputs, block=block, overwrite=overwrite)
  in_dtypes = [x.dtype for x in inputs]
  out_dtypes = [o.dtype for o in outputs]

  def bits_fn(*blocks):
    results = fn(*(_from_bits(b, d) for b, d in zip(blocks, in_dtypes, strict=True)))
    return tuple(
        _to_bits(jnp.asarray(r).astype(d)) for r, d in zip(results, out_dtypes, strict=True))

  def through_bits(*arrays):
    results = _map_blocks(
        bits_fn, [_to_bits(x) for x in arrays[:len(inputs)]],
        [_to_bits(o) for o in arrays[len(inputs):]], block=block, overwrite=overwrite)
    return tuple(_from_bits(r, d) for r, d in zip(results, out_dtypes, strict=True))

  def direct(*arrays):
    return _map_blocks(
        fn, arrays[:len(inputs)], arrays[len(inputs):], block=block, overwrite=overwrite)

  return lax.platform_dependent(*inputs, *outputs, cpu=through_bits, default=direct)


def scale_rows(x: Array, row_scale: Array) -> Array:
  """``x * row_scale[:, None]`` in ``x``'s dtype, written over ``x`` when it is dead afterwards.

  A plain elementwise multiply gets a fresh output buffer when ``x`` comes out of a blocked
  loop (XLA sees a reshaped operand and does not reuse it); going through the same blocks does.
  """
  (scaled,) = map_token_blocks(
      lambda rows, scale: ((rows.astype(jnp.float32) * scale[:, None]).astype(rows.dtype),),
      (x, row_scale.astype(jnp.float32)), (x,), overwrite={0: 0},
      block=default_token_block(x.shape[0], x.shape[-1]))
  return scaled


_SIXTEEN_BIT_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _to_bits(x: Array) -> Array:
  if x.dtype in _SIXTEEN_BIT_FLOATS:
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _from_bits(x: Array, dtype) -> Array:
  if jnp.dtype(dtype) in _SIXTEEN_BIT_FLOATS:
    return lax.bitcast_convert_type(x, dtype)
  return x


def _map_blocks(fn, inputs, outputs, *, block, overwrite):
  num_tokens = inputs[0].shape[0]
  block = max(1, min(block, num_tokens))
  if num_tokens == 0:
    return tuple(outputs)
  if block == num_tokens:
    return tuple(
        jnp.asarray(o).astype(out.dtype) for o, out in zip(fn(*inputs), outputs, strict=True))

  num_blocks = num_tokens // block
  if num_tokens % block == 0:
    def strided(x):
      return x.reshape((block, num_blocks) + x.shape[1:])

    def read(x, i):
      return lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)

    def write(o, b, i):
      return lax.dynamic_update_index_in_dim(o, b.astype(o.dtype), i, axis=1)

    outputs = _shard_like_inputs(outputs, inputs)
    outputs = _vary_like_blocks(outputs, fn, [read(strided(x), 0) for x in inputs])
    outs, _ = _block_loop(fn, [strided(x) for x in inputs], [strided(o) for o in outputs],
                          num_blocks, read, write, overwrite)
    return tuple(o.reshape((num_tokens,) + o.shape[2:]) for o in outs)

  # Contiguous blocks, and the remainder rows as one last, smaller block.
  remainder = num_tokens - num_blocks * block

  def read(x, i):
    return lax.dynamic_slice_in_dim(x, i * block, block, axis=0)

  def write(o, b, i):
    return lax.dynamic_update_slice_in_dim(o, b.astype(o.dtype), i * block, axis=0)

  outputs = _vary_like_blocks(outputs, fn, [x[:block] for x in inputs])
  # A remainder of an overwritten input is read before the loop overwrites anything.
  tail = {k: inputs[k][num_tokens - remainder:] for k in overwrite}
  outs, tail = _block_loop(fn, inputs, outputs, num_blocks, read, write, overwrite, tail)
  blocks = [tail[k] if k in overwrite else x[num_tokens - remainder:]
            for k, x in enumerate(inputs)]
  return tuple(
      lax.dynamic_update_slice_in_dim(o, b.astype(o.dtype), num_tokens - remainder, axis=0)
      for o, b in zip(outs, fn(*blocks), strict=True))


def _block_loop(fn, inputs, outputs, num_blocks, read, write, overwrite, extra=None):
  """``outputs[j] = write(outputs[j], fn(*blocks_i)[j], i)`` for each block ``i``.

  An input that overwrites an output is read from that output's carry, one block ahead: the
  loop carries the next block, read right after the current block was written. XLA then sees
  exactly one read of the carried buffer per iteration, ordered after the in-place write, and
  never has to copy the buffer to keep a read valid. ``extra`` is carried through unchanged.
  """
  def body(i, carry):
    outs, ahead, extra = carry
    blocks = [ahead[k] if k in overwrite else read(x, i) for k, x in enumerate(inputs)]
    outs = tuple(write(o, b, i) for o, b in zip(outs, fn(*blocks), strict=True))
    following = jnp.minimum(i + 1, num_blocks - 1)  # The last read is not used.
    ahead = {k: read(outs[o], following) for k, o in overwrite.items()}
    return outs, ahead, extra

  ahead = {k: read(inputs[k], 0) for k in overwrite}
  outs, _, extra = lax.fori_loop(0, num_blocks, body, (tuple(outputs), ahead, extra))
  return outs, extra


def _varying_axes(aval) -> frozenset:
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def _vary_like_blocks(outputs: Sequence[Array], fn, blocks: Sequence[Array]) -> list[Array]:
  """Inside ``shard_map``, marks the fresh ``outputs`` as varying like ``fn``'s block results.

  A loop carry must keep its type, and under ``shard_map`` the type records the mesh axes a
  value varies over: zeros are replicated, a block computed from a vocabulary shard varies.
  ``pcast`` to varying only changes that record (no communication). Elsewhere nothing varies
  and this does nothing.
  """
  if not any(_varying_axes(jax.typeof(x)) for x in blocks):
    return list(outputs)
  block_types = jax.eval_shape(fn, *blocks)
  result = []
  for out, block_type in zip(outputs, block_types, strict=True):
    missing = tuple(sorted(_varying_axes(block_type) - _varying_axes(jax.typeof(out)), key=str))
    result.append(lax.pcast(out, missing, to="varying") if missing else out)
  return result


def _shard_like_inputs(outputs: Sequence[Array], inputs: Sequence[Array]) -> list[Array]:
  """On a mesh with explicit axes, gives the fresh ``outputs`` the inputs' token sharding.

  Explicit sharding types require a block written into an output to be sharded like it. Every
  output is sharded along the token axis like ``inputs[0]``; one shaped like a rank >= 2 input
  also takes that input's other axes (a gradient like its logits). Elsewhere this does nothing.
  """
  sharding = getattr(jax.typeof(inputs[0]), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not any(
      t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return list(outputs)
  token_spec = tuple(sharding.spec)[:1] or (None,)
  result = []
  for out in outputs:
    like = next((x for x in inputs if x.ndim > 1 and x.shape == out.shape), None)
    rest = tuple(jax.typeof(like).sharding.spec)[1:] if like is not None else ()
    spec = token_spec + rest + (None,) * (out.ndim - 1 - len(rest))
    result.append(jax.sharding.reshard(
        out, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))))
  return result
