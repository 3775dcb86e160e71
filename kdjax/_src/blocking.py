"""Token blocks: the loop every engine runs over rows, and the one policy that sizes the blocks.

Engines never write their own loop over tokens: :func:`map_token_blocks` runs a function over
blocks of rows so temporaries stay ``O(block * vocab)``, writes per-row results in place
(optionally over an input, so a gradient can take the logits' buffer), accumulates per-block
sums (a kernel gradient, say), and adds up per-row values (a weighted loss) with compensation.
:func:`token_block` picks the block size for an engine's :class:`BlockPolicy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
T = TypeVar("T")


class BlockPolicy(NamedTuple):
  """How an engine sizes its token blocks by default."""

  elements: int  # about this many elements per [block, vocab] float32 array.
  max_rows: int | None = None  # at most this many rows, when set.
  min_rows: int = 8  # at least this many rows, when there are that many tokens.
  multiple: int = 1  # rows rounded down to a multiple of this.
  prefer_divisor: bool = True  # a divisor of the token count near the target (strided blocks).


# Materialised logits: about 1 MiB of float32 per block -- big enough to amortise the loop, small
# enough that the block's handful of temporaries stays in cache. Measured on a 2-core CPU at
# vocab 32000: 8 rows beat 4, 16 and 32 (benchmarks/bench_kd_loss.py). At least 8 rows, so a
# block can still be split over the devices of a data-parallel mesh axis under GSPMD.
DENSE = BlockPolicy(elements=1 << 18)

# The fused linear head re-reads the kernels, and accumulates the float32 kernel gradient, once
# per token block, so its blocks are larger than the materialised engine's; the float32
# [block, vocab] temporaries of a block (two logits, their exponentials, the gradient; two more
# for the generalized JSD, one for the hard-label cross entropy) set its memory. Measured with
# benchmarks/bench_fused.py (CPU, float32, d=512): at 2048 x 32000, 128-token blocks take the time
# of 192-token blocks with two thirds of the temporaries (the combined CE + JSD objective: 125
# MiB instead of 188, below the 156 MiB of autodiff over 128-token scan chunks, and 1.1x the
# materialised time); at 2048 x 128000, 1.08x the materialised time where 192 took 1.00-1.06x
# and 96 took 1.2-1.3x, with 313 MiB instead of 469. 128 tokens up to vocab 196608, 96 at
# vocab 262144.
FUSED = BlockPolicy(elements=128 * 196608, max_rows=128, multiple=8, prefer_divisor=False)

# GPUs and TPUs run each block's operations as a few kernels over the whole block, so a block
# must hold enough data to fill the device: 64 MiB per [block, vocab] float32 array (128 rows at
# vocab 128256; at 8 rows a block's kernels would each touch 4 MiB and launch overhead would
# dominate). The block's float32 temporaries then take a few hundred MiB.
ACCELERATOR = BlockPolicy(elements=1 << 24)

# The fused head on GPUs and TPUs: each block re-reads both kernels and reads and writes the
# float32 kernel-gradient accumulator ([d, vocab]), which costs about as much as the block's
# gradient matmul when the block has about 1000 tokens, so blocks hold 512 MiB per [block,
# vocab] float32 array (1024 tokens at vocab 128256), a multiple of 128 tokens for the matrix
# units. The five [block, vocab] float32 temporaries then take about 2.5 GiB.
FUSED_ACCELERATOR = BlockPolicy(elements=1 << 27, multiple=128, prefer_divisor=False)


def token_block(num_tokens: int, vocab_size: int, policy: BlockPolicy = DENSE, *,
                groups: int = 1) -> int:
  """The default number of rows per block of ``num_tokens`` rows of ``vocab_size`` entries.

  ``groups`` (:func:`mesh_devices`): the rows are split over up to this many devices under
  GSPMD; a block is then a multiple of it that divides ``num_tokens`` where one exists, so that
  strided blocks (``map_token_blocks``) give every device the same share of each block.
  """
  target = policy.elements // max(vocab_size, 1)
  if policy.max_rows is not None:
    target = min(target, policy.max_rows)
  target = max(policy.min_rows, target // policy.multiple * policy.multiple)
  if groups > 1 and num_tokens % groups == 0:
    # The multiple of groups dividing num_tokens nearest the target (the smaller on a tie).
    per_group = num_tokens // groups
    divisors = {d for m in range(1, math.isqrt(per_group) + 1) if per_group % m == 0
                for d in (m, per_group // m)}
    return groups * min(divisors, key=lambda d: (abs(groups * d - target), d))
  target = max(1, min(num_tokens, target))
  if policy.prefer_divisor:
    # map_token_blocks then uses strided blocks, which keep a sharded token axis sharded.
    for block in range(target, (target + 1) // 2 - 1, -1):
      if num_tokens % block == 0:
        return block
  return target


def mesh_devices(*arrays: Array) -> int:
  """How many devices GSPMD may split ``arrays`` over: the devices of the mesh their shardings
  (or the current mesh) live on, outside ``shard_map``'s manual axes; 1 without a mesh.

  Under ``jax.jit`` the type of an argument placed with a ``NamedSharding`` carries its mesh even
  when the axes are ``Auto`` (the partition spec is then unknown at trace time): the count is an
  upper bound on the devices sharing the token axis, and a multiple of their number.
  """
  meshes = [getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None) for x in arrays]
  meshes.append(jax.sharding.get_abstract_mesh())
  devices = 1
  for mesh in meshes:
    if mesh is None or not getattr(mesh, "shape", None):
      continue
    manual = set(getattr(mesh, "manual_axes", ()))
    devices = max(devices, math.prod(
        size for name, size in mesh.shape.items() if name not in manual))
  return devices


def explicit_sharding(x: Array):
  """``x``'s sharding when its mesh has ``Explicit`` axes (operations whose output sharding is
  ambiguous, such as a contraction over a sharded axis, must then name one); else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
  return sharding if jax.sharding.AxisType.Explicit in axis_types else None


def per_platform(run: Callable[[int], T], num_tokens: int, vocab_size: int, *, cpu: BlockPolicy,
                 accelerator: BlockPolicy, block: int | None = None, groups: int = 1) -> T:
  """``run(rows per block)`` with the token block of the platform the program is lowered for.

  ``block`` when given; else ``cpu``'s block on CPU and ``accelerator``'s elsewhere (both for
  ``groups`` devices, see :func:`token_block`), chosen with ``lax.platform_dependent``: lowering
  for a platform compiles only its branch. When both policies give the same block, ``run`` is
  traced once.
  """
  if block is not None:
    return run(block)
  cpu_block = token_block(num_tokens, vocab_size, cpu, groups=groups)
  accelerator_block = token_block(num_tokens, vocab_size, accelerator, groups=groups)
  if cpu_block == accelerator_block:
    return run(cpu_block)
  return lax.platform_dependent(cpu=lambda: run(cpu_block),
                                default=lambda: run(accelerator_block))


def map_token_blocks(
    fn: Callable[..., tuple[Array, ...]],
    inputs: Sequence[Array],
    outputs: Sequence[Array],
    *,
    block: int,
    overwrite: Mapping[int, int] | None = None,
    sums: Sequence[Array] = (),
    totals: int = 0,
    strided: bool = True,
    weights: int | None = None,
    platform: str | None = None,
) -> tuple[Array, ...]:
  """Writes ``fn(*row_blocks(inputs))`` into row blocks of ``outputs``; adds up its ``sums``.

  Every array in ``inputs`` and ``outputs`` has the token axis first, of the same length ``n``.
  ``fn`` maps a block of ``block`` rows of each input to a block of rows of each output, followed
  by one increment per array of ``sums`` (accumulators of any shape, for example a kernel
  gradient), then by ``totals`` float32 arrays of one value per row (``[rows]``, a weighted loss
  per token, say) that are summed over all rows instead of written; rows are independent.
  Returns ``(*outputs, *sums, *lanes)``: for each total, ``[block]`` float32 partial sums, lane
  ``r`` the sum of row ``r`` of every block (with one block, the rows' values), to be added up
  by the caller (``reductions.pairwise_sum``). The lanes are accumulated across blocks with
  compensation (Neumaier's variant of Kahan summation), so their rounding error does not grow
  with the number of blocks; a total thus costs XLA:CPU one kernel in the loop and one after it,
  where writing ``[n]`` values and summing them after the loop costs a kernel for the initial
  value, for the writes and for each level of the sum.

  When ``strided`` and ``block`` divides ``n``, block ``i`` holds the strided rows
  ``i, i + n // block, ...``: the token axis becomes the leading axis of a
  ``[block, n // block, ...]`` view and the loop runs over the second, so under GSPMD a token
  axis sharded over devices stays sharded (contiguous blocks would make the partitioner gather
  it). Otherwise the blocks are contiguous, and the ``n % block`` rows left over are either a
  last block that overlaps the one before it -- when nothing is overwritten and there are no
  ``sums`` or ``totals``, or ``weights`` names the input that weights each row's increments and
  totals, which is then 0 for the rows computed before -- or one last, smaller block. The
  overlap recomputes a few rows; the smaller block is compiled separately, and XLA does not
  share its temporaries with the loop's. No padding copy of the inputs either way. ``outputs``
  give the shapes and dtypes, and are overwritten in place by XLA.

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
  ``platform="cpu"``: the program is known to be lowered for CPU, so only the CPU way is traced
  (None: both, ``lax.platform_dependent`` picking one when the program is lowered).
  """
  overwrite = dict(overwrite or {})
  for i, o in overwrite.items():
    if (inputs[i].shape, inputs[i].dtype) != (outputs[o].shape, outputs[o].dtype):
      raise ValueError(f"input {i} cannot overwrite output {o}: shapes or dtypes differ.")
  sources = {o: i for i, o in overwrite.items()}
  outputs = [inputs[sources[j]] if j in sources else o for j, o in enumerate(outputs)]
  loop = dict(block=block, overwrite=overwrite, strided=strided, num_outputs=len(outputs),
              weights=weights, totals=totals)
  if not any(x.dtype in _SIXTEEN_BIT_FLOATS for x in (*inputs, *outputs)):
    return _map_blocks(fn, inputs, outputs, sums, **loop)
  in_dtypes = [x.dtype for x in inputs]
  out_dtypes = [o.dtype for o in outputs]

  def bits_fn(*blocks):
    results = fn(*(_from_bits(b, d) for b, d in zip(blocks, in_dtypes, strict=True)))
    rows, increments = results[:len(outputs)], results[len(outputs):]
    return (*(_to_bits(jnp.asarray(r).astype(d)) for r, d in zip(rows, out_dtypes, strict=True)),
            *increments)

  def through_bits(*arrays):
    ins, outs, acc = _split(arrays, len(inputs), len(outputs))
    results = _map_blocks(bits_fn, [_to_bits(x) for x in ins], [_to_bits(o) for o in outs], acc,
                          **loop)
    return (*(_from_bits(r, d) for r, d in zip(results, out_dtypes, strict=False)),
            *results[len(outputs):])

  def direct(*arrays):
    return _map_blocks(fn, *_split(arrays, len(inputs), len(outputs)), **loop)

  if platform == "cpu":
    return through_bits(*inputs, *outputs, *sums)
  return lax.platform_dependent(*inputs, *outputs, *sums, cpu=through_bits, default=direct)


def _split(arrays, num_inputs, num_outputs):
  return (arrays[:num_inputs], arrays[num_inputs:num_inputs + num_outputs],
          arrays[num_inputs + num_outputs:])


def scale_rows(x: Array, row_scale: Array) -> Array:
  """``x * row_scale[:, None]`` in ``x``'s dtype, written over ``x`` when it is dead afterwards.

  A row whose scale is 0 becomes exactly 0, even where ``x`` is not finite (an ignored token).
  On CPU a plain elementwise multiply gets a fresh output buffer when ``x`` comes out of a
  blocked loop (XLA sees a reshaped operand and does not reuse it); going through the same
  blocks does. On GPUs and TPUs it is one elementwise operation over the whole array.
  """
  def scale(rows, factor):
    scaled = rows.astype(jnp.float32) * factor[:, None]
    return (jnp.where(factor[:, None] != 0, scaled, 0.0).astype(rows.dtype),)

  def run(block):
    (scaled,) = map_token_blocks(
        scale, (x, row_scale.astype(jnp.float32)), (x,), overwrite={0: 0}, block=block)
    return scaled

  cpu_block = token_block(x.shape[0], x.shape[-1])
  if cpu_block >= x.shape[0]:
    return run(cpu_block)
  return lax.platform_dependent(cpu=lambda: run(cpu_block), default=lambda: run(x.shape[0]))


_SIXTEEN_BIT_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _to_bits(x: Array) -> Array:
  if x.dtype in _SIXTEEN_BIT_FLOATS:
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _from_bits(x: Array, dtype) -> Array:
  if jnp.dtype(dtype) in _SIXTEEN_BIT_FLOATS:
    return lax.bitcast_convert_type(x, dtype)
  return x


def _map_blocks(fn, inputs, outputs, sums, *, block, overwrite, strided, num_outputs, weights,
                totals):
  num_tokens = inputs[0].shape[0]
  block = max(1, min(block, num_tokens))
  num_sums = len(sums)
  if num_tokens == 0:
    return (*outputs, *sums, *(jnp.zeros((0,), jnp.float32),) * totals)

  def split(results):  # rows, increments, per-row values to total
    return (results[:num_outputs], results[num_outputs:num_outputs + num_sums],
            results[num_outputs + num_sums:])

  if block == num_tokens:
    rows, increments, values = split(fn(*inputs))
    return (*(jnp.asarray(r).astype(o.dtype) for o, r in zip(outputs, rows, strict=True)),
            *(a + i for a, i in zip(sums, increments, strict=True)),
            *(jnp.asarray(v, jnp.float32) for v in values))

  def apply(blocks, outs, acc, write):
    rows, increments, values = split(fn(*blocks))
    return (tuple(write(o, r) for o, r in zip(outs, rows, strict=True)),
            (*(a + i for a, i in zip(acc[:num_sums], increments, strict=True)),
             *(_add_compensated(a, v) for a, v in zip(acc[num_sums:], values, strict=True))))

  def results(outs, acc):
    return (*outs, *acc[:num_sums], *(_lane_totals(a) for a in acc[num_sums:]))

  # Each lane's sum and compensation, from 0 and -0.0: a constant of more than one value stays a
  # constant in XLA's program, where zeros would become a kernel of their own (a broadcast).
  lanes = [jnp.asarray(np.array([[0.0] * block, [-0.0] * block], np.float32))] * totals
  num_blocks = num_tokens // block
  if strided and num_tokens % block == 0:
    def strided_view(x):
      return x.reshape((block, num_blocks) + x.shape[1:])

    # Not lax.dynamic_index_in_dim: a nested jit, traced and lowered as a function per call.
    def read(x, i, k=None):
      del k
      return lax.squeeze(lax.dynamic_slice_in_dim(x, i, 1, axis=1), (1,))

    def write(o, b, i):
      return lax.dynamic_update_slice_in_dim(o, lax.expand_dims(b.astype(o.dtype), (1,)), i,
                                             axis=1)

    outputs = _shard_like_inputs(outputs, inputs)
    outputs, sums, lanes = _vary_like_blocks(outputs, sums, lanes, fn,
                                             [read(strided_view(x), 0) for x in inputs])
    outs, acc, _ = _block_loop(apply, [strided_view(x) for x in inputs],
                               [strided_view(o) for o in outputs], (*sums, *lanes), num_blocks,
                               read, write, overwrite)
    outs = [o.reshape((num_tokens,) + o.shape[2:]) for o in outs]
    return results(outs, acc)

  remainder = num_tokens - num_blocks * block
  outputs, sums, lanes = _vary_like_blocks(outputs, sums, lanes, fn, [x[:block] for x in inputs])
  if remainder and not overwrite and (not (sums or lanes) or weights is not None):
    # Contiguous blocks, the last one overlapping the one before it.
    def start(i):
      return jnp.minimum(i * block, num_tokens - block)

    def fresh(rows, i):  # the rows no block before this one computed
      return start(i) + lax.broadcasted_iota(jnp.int32, rows.shape, 0) >= i * block

    def read(x, i, k=None):
      rows = lax.dynamic_slice_in_dim(x, start(i), block, axis=0)
      if k is None or k != weights:
        return rows
      return jnp.where(fresh(rows, i), rows, jnp.zeros((), rows.dtype))

    def write(o, b, i):
      before = lax.dynamic_slice_in_dim(o, start(i), block, axis=0)
      b = jnp.where(fresh(before, i), b.astype(o.dtype), before)
      return lax.dynamic_update_slice_in_dim(o, b, start(i), axis=0)

    outs, acc, _ = _block_loop(apply, inputs, outputs, (*sums, *lanes), num_blocks + 1, read,
                               write, overwrite)
    return results(outs, acc)

  # Contiguous blocks, and the remainder rows as one last, smaller block.
  def read(x, i, k=None):
    del k
    return lax.dynamic_slice_in_dim(x, i * block, block, axis=0)

  def write(o, b, i):
    return lax.dynamic_update_slice_in_dim(o, b.astype(o.dtype), i * block, axis=0)

  # A remainder of an overwritten input is read before the loop overwrites anything.
  tail = {k: inputs[k][num_tokens - remainder:] for k in overwrite}
  outs, acc, tail = _block_loop(apply, inputs, outputs, (*sums, *lanes), num_blocks, read, write,
                                overwrite, tail)
  if remainder:
    blocks = [tail[k] if k in overwrite else x[num_tokens - remainder:]
              for k, x in enumerate(inputs)]
    outs, acc = apply(blocks, outs, acc, lambda o, r: lax.dynamic_update_slice_in_dim(
        o, r.astype(o.dtype), num_tokens - remainder, axis=0))
  return results(outs, acc)


def _add_compensated(acc: Array, values: Array) -> Array:
  """``acc`` (``[2, lanes]``: each lane's sum and compensation) after adding ``values`` to the
  lanes (Neumaier): the compensation gathers what each addition to the sum rounds away. A last,
  smaller block adds to its first lanes. (``lax``, not ``jnp``: once per loop, but each ``jnp``
  call would be traced and lowered as a function of its own.)"""
  values = lax.convert_element_type(values, jnp.float32)
  if values.shape[0] < acc.shape[1]:
    values = lax.pad(values, np.float32(0), ((0, acc.shape[1] - values.shape[0], 0),))
  total, compensation = (lax.index_in_dim(acc, i, keepdims=False) for i in (0, 1))
  new = lax.add(total, values)
  lost = lax.select(lax.ge(lax.abs(total), lax.abs(values)),
                    lax.add(lax.sub(total, new), values), lax.add(lax.sub(values, new), total))
  return lax.concatenate([lax.expand_dims(new, (0,)),
                          lax.expand_dims(lax.add(compensation, lost), (0,))], 0)


def _lane_totals(acc: Array) -> Array:
  """Each lane's compensated sum; an infinite or NaN sum as it is (its compensation is NaN)."""
  total, compensation = (lax.index_in_dim(acc, i, keepdims=False) for i in (0, 1))
  return lax.select(lax.is_finite(total), lax.add(total, compensation), total)


def _block_loop(apply, inputs, outputs, acc, num_blocks, read, write, overwrite, extra=None):
  """``outputs[j] = write(outputs[j], fn(*blocks_i)[j], i)`` and ``acc = apply(..)`` (the
  accumulators) for each block ``i``.

  An input that overwrites an output is read from that output's carry, one block ahead: the
  loop carries the next block, read right after the current block was written. XLA then sees
  exactly one read of the carried buffer per iteration, ordered after the in-place write, and
  never has to copy the buffer to keep a read valid. ``extra`` is carried through unchanged.
  """
  def body(i, carry):
    outs, acc, ahead, extra = carry
    blocks = [ahead[k] if k in overwrite else read(x, i, k) for k, x in enumerate(inputs)]
    outs, acc = apply(blocks, outs, acc, lambda o, r: write(o, r, i))
    following = jnp.minimum(i + 1, num_blocks - 1)  # The last read is not used.
    ahead = {k: read(outs[o], following) for k, o in overwrite.items()}
    return outs, acc, ahead, extra

  ahead = {k: read(inputs[k], 0) for k in overwrite}
  outs, acc, _, extra = lax.fori_loop(
      0, num_blocks, body, (tuple(outputs), tuple(acc), ahead, extra))
  return outs, acc, extra


def varying_axes(aval) -> frozenset:
  """The ``shard_map`` mesh axes a value of type ``aval`` varies over (empty elsewhere)."""
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def varying_zeros(shape, *like: Array | None) -> Array:
  """float32 zeros that vary over the same ``shard_map`` axes as the arrays ``like`` (the initial
  value of a loop carry that the loop body computes from them); plain zeros elsewhere."""
  out = jnp.zeros(shape, jnp.float32)
  for ref in like:
    if ref is not None:
      out = out + jnp.zeros_like(ref, dtype=jnp.float32, shape=())
  return out


def _vary_like_blocks(outputs: Sequence[Array], sums: Sequence[Array], lanes: Sequence[Array],
                      fn, blocks: Sequence[Array]
                      ) -> tuple[list[Array], list[Array], list[Array]]:
  """Gives fresh ``outputs``, ``sums`` and ``lanes`` (the totals' ``[2, block]`` accumulators)
  the types of ``fn``'s results, where types say more than shape and dtype.

  A loop carry must keep its type. Under ``shard_map`` the type records the mesh axes a value
  varies over: zeros are replicated, a block computed from a vocabulary shard (an input, or an
  array ``fn`` closes over, such as a kernel slice) varies; ``pcast`` to varying only changes
  that record (no communication). With explicit sharding types, the ``sums`` take the sharding
  of ``fn``'s increments (a per-device kernel gradient, say), and the ``lanes`` that of its
  per-row values along their second axis. Elsewhere this does nothing.
  """
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  explicit = (sums or lanes) and any(explicit_sharding(x) is not None for x in blocks)
  if not manual and not explicit:
    return list(outputs), list(sums), list(lanes)
  types = jax.eval_shape(fn, *blocks)
  result = []
  for j, (out, block_type) in enumerate(zip((*outputs, *sums, *lanes), types, strict=True)):
    if manual:
      missing = tuple(sorted(varying_axes(block_type) - varying_axes(jax.typeof(out)), key=str))
      out = lax.pcast(out, missing, to="varying") if missing else out
    if explicit and len(outputs) <= j < len(outputs) + len(sums):
      out = jax.sharding.reshard(out, block_type.sharding)
    elif explicit and j >= len(outputs) + len(sums) and block_type.sharding is not None:
      out = jax.sharding.reshard(out, jax.sharding.NamedSharding(
          block_type.sharding.mesh, jax.sharding.PartitionSpec(None, *block_type.sharding.spec)))
    result.append(out)
  num_carried = len(outputs) + len(sums)
  return result[:len(outputs)], result[len(outputs):num_carried], result[num_carried:]


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
  token_spec = tuple(sharding.spec)[:1] or (None,)  # type: ignore[union-attr]  # mesh is not None, so sharding is not
  result = []
  for out in outputs:
    like = next((x for x in inputs if x.ndim > 1 and x.shape == out.shape), None)
    rest = tuple(jax.typeof(like).sharding.spec)[1:] if like is not None else ()
    spec = token_spec + rest + (None,) * (out.ndim - 1 - len(rest))
    result.append(jax.sharding.reshard(
        out, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))))
  return result
