"""Pallas kernels for the dense divergences (``implementation="pallas"``).

A kernel computes what the blocked engine's block function ``dense.teacher_logits_block``
computes -- per-token values and the gradient of ``sum(weights * value)`` with respect to the
student logits -- for every row of materialised student and teacher logits, in one call. Each
program of its grid takes a block of rows and walks their vocabulary tile by tile with
:func:`recipe.lanes`, so a row never has to fit in registers or VMEM at once:

1. per-lane statistics of both logits (a lane's max moves once per tile, one ``exp`` an entry)
   and, when the divergence's value folds online (its ``DIVERGENCES`` entry), the value's sums
   -- combined across the lanes once, at the end of the walk;
2. only where the value needs the final normalisers, a second walk sums the divergence's terms
   per lane: a mixture's KL terms in base 2 where its ``DIVERGENCES`` entry has a ``mixture``
   form, :func:`recipe.terms` otherwise;
3. :func:`recipe.finish`: the per-token values and the gradient's row coefficients;
4. with the gradient, a last walk writes it tile by tile (:func:`recipe.student_grad`), rounded
   once to the logits' dtype, over the logits' buffer (``input_output_aliases``: in a train
   step, where the logits are dead after the loss, no second ``[tokens, vocab]`` buffer).

Every step is a function of the block recipe called on a tile, so the kernels follow the
conventions of every other path. The engine around them -- the ``custom_vjp`` and its two entry
points -- is ``dense.py``'s: a kernel is a ``dense.Loop`` (:func:`loop`).

Variants (:class:`Variant`):

* :data:`TRITON` (GPU, Pallas' Triton backend): one row per program, tiles of :data:`GPU_TILE`
  entries read as chunks of :data:`GPU_LANES` (Triton's arrays have power-of-two sizes). The
  last, ragged tile is read with a mask -- entries past the vocabulary read as ``-inf``, which
  every term counts as 0 -- and written with one. Two walks read the row twice, three walks
  three times: the re-reads cost HBM bandwidth unless the row is still in L2.
* :data:`MOSAIC` (TPU): blocks of as many rows as VMEM holds (:func:`_tpu_rows`), read once
  from HBM by the pipeline and walked :data:`TPU_GROUP` rows at a time, tiles of
  :data:`TPU_TILE` lanes in chunks of :data:`TPU_LANES`; a vocabulary of which not even
  :data:`TPU_GROUP` rows fit is not supported (the blocked engine runs instead).
* :data:`INTERPRET`: the Triton variant in Pallas interpret mode, plain XLA operations on any
  backend: what ``implementation="pallas"`` runs on CPU. A testing aid -- as exact as the
  kernel, much slower than the blocked engine. Either variant runs interpreted with
  ``Variant(..., interpret=True)``.

The compilers' own reports on these kernels (registers, spills, instructions per tile, bytes
moved, VMEM, cycle estimates) come from ``benchmarks/compile_gpu.py`` and
``benchmarks/compile_tpu.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from kdjax._src import blocking, recipe
from kdjax._src.config import Config
from kdjax._src.divergences import DIVERGENCES

Array = jax.Array

# GPU: vocabulary entries per tile (of 16-bit logits; float32 ones take half) and per chunk
# (powers of two) and Triton's launch parameters. 4096-entry tiles in 8 chunks of 512 (2 entries
# per thread a chunk with 8 warps): the compiled kd_loss kernel at [16384, 128256] bfloat16 takes
# 64 registers (4 programs per SM) and 555 instructions per tile and warp over its two walks,
# 0.58x the HBM bound's time at issue; 2048-entry tiles take 1.09x those instructions per entry
# (the per-lane rescales amortised over half the entries); chunks of 1024 about as many with 77
# registers (3 programs per SM) (benchmarks/compile_gpu.py). The device sweep is
# benchmarks/bench_accelerator.py's.
GPU_TILE = 4096
GPU_LANES = 512
GPU_WARPS = 8
GPU_STAGES = 2

# TPU: a block holds as many rows as the core's VMEM takes with the double-buffered blocks of
# the three [rows, vocab] arrays (two logits, the gradient), less TPU_VMEM_RESERVE for the
# tiles' temporaries, a multiple of TPU_GROUP rows and at most TPU_MAX_ROWS: 64 rows of a
# 128256-entry bfloat16 vocabulary on a 128 MiB v5e or v6e, 32 on a 64 MiB v5p. The kernel walks
# a block TPU_GROUP rows at a time, tiles of TPU_TILE lanes, keeping its statistics per lane in
# [TPU_GROUP, TPU_LANES] float32 arrays (2 of the 64 vector registers each), reduced across
# lanes once per walk; TPU_UNROLL tiles per loop iteration, which the scheduler overlaps. By
# libtpu's static estimate of kd_loss on v5e (benchmarks/compile_tpu.py), 1024-lane tiles
# unrolled 5 times take 0.90x the cycles of 512-lane ones and 0.71x of 2048-lane ones unrolled
# twice.
TPU_TILE = 1024
TPU_LANES = 128
TPU_GROUP = 16
TPU_MAX_ROWS = 256
TPU_VMEM_RESERVE = 12 << 20
TPU_UNROLL = 5
# VMEM per core assumed when the program is traced without a TPU to ask (lowering elsewhere).
TPU_DEFAULT_VMEM = 64 << 20

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Variant(NamedTuple):
  """How a kernel runs (hashable)."""

  backend: str  # "triton" (GPU) or "mosaic" (TPU).
  tile: int  # vocabulary entries per tile (a power of two for "triton").
  interpret: bool = False  # Pallas interpret mode: XLA operations on any backend.
  rows: int | None = None  # "mosaic": rows per block (None: as many as VMEM takes).
  lanes: int | None = None  # per-lane statistics' width (None: GPU_LANES or TPU_LANES).
  arith: recipe.Arith | None = None  # exp2 and multiply-add (None: the backend's own).


TRITON = Variant("triton", GPU_TILE)
MOSAIC = Variant("mosaic", TPU_TILE)
INTERPRET = TRITON._replace(interpret=True)


def _tpu_vmem_capacity() -> int:
  try:
    return pltpu.get_tpu_info().vmem_capacity_bytes
  except ValueError:  # Not traced for a TPU (or an abstract one): no chip to ask.
    return TPU_DEFAULT_VMEM


def stashes(config: Config) -> bool:
  """Whether the TPU kernel of ``config`` keeps a group's gradient in VMEM between its last two
  walks (``recipe.Stash``): a mixture divergence (``divergences.MixtureValue``), whose last
  walk then reads the student's logits alone and takes one ``exp2`` an entry."""
  spec = DIVERGENCES[config.divergence]
  hp = {**{name: None for name in spec.hyperparameters}, **dict(config.static_hp)}
  return spec.online(hp) is None and spec.mixture(hp) is not None


def _tpu_plan(config: Config, vocab: int, dtypes) -> tuple[int | None, bool]:
  """Rows per TPU block (None: not even TPU_GROUP rows fit) and whether the kernel stashes:
  only where the stash leaves the block as many rows (the estimate on a v5p, whose 64 MiB
  would halve them, is slower than without; on v5e and v6e it costs none)."""
  rows = _tpu_rows(vocab, dtypes)
  if rows is None or not stashes(config):
    return rows, False
  return rows, _tpu_rows(vocab, dtypes, TPU_GROUP * vocab * 4) == rows


def _tpu_rows(vocab: int, dtypes, stash_bytes: int = 0) -> int | None:
  """Rows per TPU block: as many as fit VMEM with the stash, a multiple of TPU_GROUP (which is a
  multiple of the packed sublanes of 16-bit logits); None when not even TPU_GROUP rows fit."""
  itemsizes = [jnp.dtype(d).itemsize for d in dtypes]
  row_bytes = 2 * vocab * (sum(itemsizes) + itemsizes[0])  # Two logits and the gradient.
  budget = _tpu_vmem_capacity() - TPU_VMEM_RESERVE - stash_bytes
  rows = min(budget // row_bytes, TPU_MAX_ROWS) // TPU_GROUP * TPU_GROUP
  return rows or None


def supports(variant: Variant, config: Config, logits: Array, teacher_logits: Array) -> bool:
  """Whether ``variant`` computes the loss of ``config`` on these ``[tokens, vocab]`` logits.

  The kernels need a whole row's vocabulary on one device and arrays that are this device's own
  (no vocabulary mesh axis, no mesh that XLA would partition the call over: under ``jax.jit``
  on a mesh the kernels run inside a ``shard_map`` over the tokens, where each device's inputs
  pass this test), and 32- or 16-bit floats; on TPU the blocks must fit VMEM.
  """
  num_tokens, vocab = logits.shape
  if (config.axis_name is not None or vocab == 0 or num_tokens == 0
      or blocking.mesh_devices(logits, teacher_logits) > 1
      or blocking.explicit_sharding(logits) is not None  # refs typed with a mesh, even of 1
      or logits.dtype not in _DTYPES or teacher_logits.dtype not in _DTYPES):
    return False
  if variant.backend == "mosaic" and not variant.interpret and variant.rows is None:
    return _tpu_rows(vocab, (logits.dtype, teacher_logits.dtype)) is not None
  return True


# ----------------------------------------------------------------------------------------------
# Tiles: how a program walks its rows' vocabulary.
# ----------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
  start: Array | int  # the vocabulary id of the tile's first entry.
  width: int  # entries read: chunks of ``lanes``.
  ragged: bool = False  # reaches past the vocabulary: read and written with a mask.
  counted_from: int | None = None  # entries below this id are an earlier tile's (None: none).


class _Tiles(NamedTuple):
  """The vocabulary walk of one program: full tiles in a loop, then a static remainder; each
  tile read and written as chunks of ``lanes`` entries, as the per-lane statistics take them.

  Triton reads the remainder as a full tile with a mask (entries past the vocabulary read as
  ``-inf``, which every term counts as 0). Mosaic reads it unmasked; when it is not a multiple
  of ``lanes``, as the last whole lanes of the row, the entries an earlier tile holds not
  counted again (their gradient is written twice, the same).
  """

  rows: int
  vocab: int
  tile: int
  lanes: int
  masked: bool
  unroll: int = 1  # tiles per loop iteration (Mosaic does not pipeline across iterations).
  widen: Callable[[Array], Array] | None = None  # 16-bit entries to float32 (None: astype).

  def fold(self, body: Callable[[_Tile, Any], Any], carry):
    """``carry = body(tile, carry)`` over the tiles of the vocabulary, in order."""
    num_full = self.vocab // self.tile

    def steps(first: int, count: int, unroll: int, carry):
      """Tiles first .. first + count - 1, ``unroll`` in each loop iteration (unrolled by
      hand: Mosaic's loop lowering takes no partial unroll)."""
      def step(k, carry):
        for j in range(unroll):
          start = pl.multiple_of((first + k * unroll + j) * self.tile, self.tile)
          carry = body(_Tile(start, self.tile), carry)
        return carry
      return lax.fori_loop(0, count // unroll, step, carry) if count >= unroll else carry

    if num_full:
      unroll = min(self.unroll, num_full)
      carry = steps(0, num_full, unroll, carry)
      done = num_full // unroll * unroll
      carry = steps(done, num_full - done, 1, carry)
    start = num_full * self.tile
    remainder = self.vocab - start
    if not remainder:
      return carry
    if self.masked:
      # A traced start: the tile reaches past the vocabulary, which a static slice rejects.
      return body(_Tile(jnp.int32(start), self.tile, ragged=True), carry)
    if remainder % self.lanes == 0:
      return body(_Tile(start, remainder), carry)
    width = -(-remainder // self.lanes) * self.lanes
    return body(_Tile(self.vocab - width, width, counted_from=start), carry)

  def _chunks(self, tile: _Tile):
    for j in range(tile.width // self.lanes):
      start = tile.start + j * self.lanes
      valid = None
      if tile.ragged:
        valid = start + lax.broadcasted_iota(jnp.int32, (self.rows, self.lanes), 1) < self.vocab
      yield pl.ds(start, self.lanes), valid

  def read(self, ref, tile: _Tile) -> tuple[Array, ...]:
    """float32 ``[rows, lanes]`` chunks; entries past the vocabulary are ``-inf``."""
    chunks = []
    for columns, valid in self._chunks(tile):
      view = ref.at[:, columns]
      chunk = view[...] if valid is None else plt.load(
          view, mask=valid, other=jnp.array(-jnp.inf, ref.dtype))
      widen = self.widen if self.widen is not None and chunk.dtype == jnp.bfloat16 else None
      chunks.append(chunk.astype(jnp.float32) if widen is None else widen(chunk))
    return tuple(chunks)

  def write(self, ref, tile: _Tile, chunks: tuple[Array, ...]) -> None:
    for (columns, valid), x in zip(self._chunks(tile), chunks, strict=True):
      view = ref.at[:, columns]
      if valid is None:
        view[...] = x.astype(ref.dtype)
      else:
        plt.store(view, x.astype(ref.dtype), mask=valid)


# ----------------------------------------------------------------------------------------------
# The kernel body: the block recipe on tiles.
# ----------------------------------------------------------------------------------------------


class _Layout(NamedTuple):
  """How a backend lays out one program's rows."""

  rows: int  # rows per program.
  column: bool  # per-row arrays are [tokens, 1] (Mosaic: a block's last two dimensions).
  tiles: _Tiles  # the walk of one group of rows.
  group: int  # rows walked together (Mosaic: a block's rows, group by group).
  arith: recipe.Arith = recipe.JNP_ARITH  # the entries' exp2 and multiply-add.

  def row_array(self, x: Array) -> Array:
    return x.reshape(-1, 1) if self.column else x

  def row_spec(self) -> pl.BlockSpec:
    if self.column:
      return pl.BlockSpec((self.rows, 1), lambda i: (i, 0))
    return pl.BlockSpec((self.rows,), lambda i: (i,))

  def read_rows(self, ref) -> Array:
    return ref[...][:, 0] if self.column else ref[...]

  def write_rows(self, ref, x: Array) -> None:
    ref[...] = x[:, None] if self.column else x


class _Refs(NamedTuple):
  logits: Any
  teacher: Any
  labels: Any  # [rows] int32 (cross entropy only), else None.
  label_logits: Any  # [rows] float32: the student's logit at the label (cross entropy only).
  weights: Any  # [rows] float32 (weighted sums only), else None.
  hyperparameters: Any  # [k] float32: the traced hyperparameters by sorted name, else None.
  rows: tuple  # value, divergence, cross_entropy: [rows] float32.
  grad: Any  # [rows, vocab] in the logits' dtype (with the gradient only), else None.
  stash: Any = None  # [group, vocab] float32 VMEM (recipe.Stash), else None.


def _body(config: Config, names: tuple[str, ...], layout: _Layout, refs: _Refs) -> None:
  """One program: :func:`recipe.lanes` on its rows, group by group, the gradient written tile
  by tile."""
  tiles = layout.tiles
  traced = {name: refs.hyperparameters[j] for j, name in enumerate(names)}
  hp = config.hyperparameters_with(traced)

  def group(refs: _Refs) -> None:
    def read(tile):
      return tiles.read(refs.logits, tile), tiles.read(refs.teacher, tile), None

    def write_grad(tile, context, grads, carry):
      del context
      tiles.write(refs.grad, tile, grads)
      return carry

    stash = None
    if refs.stash is not None and refs.grad is not None:
      stash = recipe.Stash(lambda tile, chunks: tiles.write(refs.stash, tile, chunks),
                           lambda tile: tiles.read(refs.stash, tile))
    rows, _ = recipe.lanes(
        config, hp, tiles.fold, read,
        zeros=jnp.zeros((tiles.rows, tiles.lanes), jnp.float32), lane_width=tiles.lanes,
        vocab_width=tiles.vocab,
        labels=layout.read_rows(refs.labels) if config.cross_entropy else None,
        label_logits=(layout.read_rows(refs.label_logits) if config.cross_entropy else None),
        weights=None if refs.weights is None else layout.read_rows(refs.weights),
        emit=None if refs.grad is None else write_grad, emit_init=0, arith=layout.arith,
        stash=stash)
    for ref, row in zip(refs.rows, rows, strict=True):
      layout.write_rows(ref, row)

  num_groups = layout.rows // layout.group
  if num_groups == 1:
    group(refs)
    return

  def group_step(g, carry):
    first = pl.multiple_of(g * layout.group, layout.group)

    def at(ref):
      return None if ref is None else ref.at[pl.ds(first, layout.group)]

    group(_Refs(at(refs.logits), at(refs.teacher), at(refs.labels), at(refs.label_logits),
                at(refs.weights),
                refs.hyperparameters, tuple(at(ref) for ref in refs.rows), at(refs.grad),
                refs.stash))
    return carry

  lax.fori_loop(0, num_groups, group_step, 0)


# ----------------------------------------------------------------------------------------------
# The pallas_call, and the kernel as the engine's loop.
# ----------------------------------------------------------------------------------------------


def _gpu_asm(instruction: str, *args) -> Array:
  """One PTX float32 instruction per entry (the arguments broadcast to one shape)."""
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
  operands = [jnp.broadcast_to(jnp.asarray(a, jnp.float32), shape) for a in args]
  names = ", ".join(f"${j}" for j in range(len(args) + 1))
  [result] = plt.elementwise_inline_asm(
      f"{instruction} {names};", args=operands, constraints=",".join(["=f"] + ["f"] * len(args)),
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
  return result


def _gpu_widen(x: Array) -> Array:
  """bfloat16 to float32 as one integer instruction an entry: the pair of entries a 32-bit
  register holds shifted or masked into place (the compiler takes two for the upper one)."""
  [result] = plt.elementwise_inline_asm(
      "shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;", args=[x], constraints="=r,=r,r",
      pack=2, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return result


def _gpu_exp2(x: Array) -> Array:
  """``exp2`` as one ``MUFU.EX2``: PTX's ``ex2.approx.ftz`` (libdevice's ``exp2f`` adds three
  instructions to return denormal results, below 1e-38, which no divergence can tell from 0)."""
  return _gpu_asm("ex2.approx.ftz.f32", x)


def _gpu_fma(a, b, c) -> Array:
  """``a * b + c`` as one ``FFMA``, rounded once: the kernel's code reaches the assembler with
  every multiplication and addition rounded on its own (``mul.rn``, ``add.rn``), which it may
  not fuse."""
  return _gpu_asm("fma.rn.f32", a, b, c)


def _gpu_log(x: Array) -> Array:
  """``log`` of positive numbers as one ``MUFU.LG2`` (PTX's ``lg2.approx.ftz``, relative error
  about 2**-22, against libdevice's ``logf``, about twenty instructions), times ln 2. A
  subnormal argument, which ``ftz`` would read as 0, is taken as the smallest normal float
  (its log is off by at most ln 2**23 on a term weighted by less than 1e-38)."""
  tiny = float(jnp.finfo(jnp.float32).tiny)
  return _gpu_asm("lg2.approx.ftz.f32", jnp.maximum(x, tiny)) * 0.6931471805599453


def _gpu_log2(x: Array) -> Array:
  """``log2`` of positive normal numbers as one ``MUFU.LG2``."""
  return _gpu_asm("lg2.approx.ftz.f32", x)


def _gpu_reciprocal(x: Array) -> Array:
  """``1 / x`` of positive normal numbers as one ``MUFU.RCP`` (PTX's ``rcp.approx.ftz``, about
  1 ulp, against the IEEE division's Newton steps and special cases)."""
  return _gpu_asm("rcp.approx.ftz.f32", x)


_GPU_ARITH = recipe.Arith(_gpu_exp2, _gpu_fma, _gpu_log, _gpu_log2, _gpu_reciprocal)


def gpu_tile(vocab: int, dtypes, tile: int = GPU_TILE, lanes: int = GPU_LANES) -> int:
  """The GPU kernel's tile for this vocabulary: ``tile`` entries of 16-bit logits, half as many
  of float32 ones (the same registers), at least one chunk of ``lanes``, at most the
  vocabulary's next power of two."""
  wide = max(jnp.dtype(d).itemsize for d in dtypes) > 2
  return min(max(tile // 2, lanes) if wide else tile, pl.next_power_of_2(vocab))


def _layout_and_params(variant: Variant, config: Config, num_tokens: int, vocab: int, dtypes):
  """The layout, the scalars' block spec, the compiler parameters and the scratch shapes."""
  if variant.backend == "triton":
    params: plt.CompilerParams | pltpu.CompilerParams = plt.CompilerParams(
        num_warps=GPU_WARPS, num_stages=GPU_STAGES)
    lanes = variant.lanes or GPU_LANES
    tile = gpu_tile(vocab, dtypes, variant.tile, lanes)
    lanes = min(lanes, tile)
    arith = variant.arith or (recipe.JNP_ARITH if variant.interpret else _GPU_ARITH)
    widen = None if variant.interpret else _gpu_widen
    return (_Layout(1, False, _Tiles(1, vocab, tile, lanes, masked=True, widen=widen), 1,
                    arith),
            pl.BlockSpec(), params, ())
  if variant.backend != "mosaic":
    raise ValueError(f"unknown kernel backend {variant.backend!r}.")
  planned, stash = _tpu_plan(config, vocab, dtypes)
  if variant.rows:  # Given rows (tests): the stash wherever it applies.
    planned, stash = variant.rows, stashes(config)
  rows = planned or TPU_GROUP
  group = min(TPU_GROUP, rows)
  if num_tokens <= group:  # One block of the whole array.
    rows = group = num_tokens
  else:  # A partial last block rather than more rows than the tokens need.
    rows = min(rows, -(-num_tokens // group) * group)
  itemsizes = [jnp.dtype(d).itemsize for d in dtypes]
  blocks = 2 * rows * vocab * (sum(itemsizes) + itemsizes[0])
  stash_bytes = group * vocab * 4 if stash else 0
  vmem_limit = min(_tpu_vmem_capacity(), blocks + stash_bytes + TPU_VMEM_RESERVE)
  lanes = min(variant.lanes or TPU_LANES, vocab)
  tile = max(lanes, min(variant.tile, vocab) // lanes * lanes)
  params = pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit)
  return (_Layout(rows, True, _Tiles(group, vocab, tile, lanes, masked=False,
                                     unroll=TPU_UNROLL), group,
                  variant.arith or recipe.JNP_ARITH),
          pl.BlockSpec(memory_space=pltpu.SMEM), params,
          (pltpu.VMEM((group, vocab), jnp.float32),) if stash else ())


def _vary_alike(inputs: list[Array]):
  """Inside ``shard_map``: the inputs marked as varying over the same mesh axes (``pcast``
  changes only the type), and the outputs' manual axis type. Elsewhere: unchanged, None."""
  varying = frozenset().union(*(blocking.varying_axes(jax.typeof(x)) for x in inputs))
  if not varying:
    return inputs, None
  inputs = [
      lax.pcast(x, tuple(sorted(missing, key=str)), to="varying")
      if (missing := varying - blocking.varying_axes(jax.typeof(x))) else x for x in inputs]
  return inputs, jax.sharding.ManualAxisType(varying=varying)


def _call(variant: Variant, config: Config, traced: Mapping[str, Array], logits: Array,
          teacher_logits: Array, labels: Array | None, weights: Array | None, *,
          with_grad: bool) -> tuple[Array, ...]:
  """``(value, divergence, cross_entropy[, grad])`` of ``[tokens, vocab]`` logits."""
  num_tokens, vocab = logits.shape
  layout, scalar_spec, params, scratch_shapes = _layout_and_params(
      variant, config, num_tokens, vocab, (logits.dtype, teacher_logits.dtype))
  if not with_grad:
    scratch_shapes = ()
  block_spec = pl.BlockSpec((layout.rows, vocab), lambda i: (i, 0))
  names = tuple(sorted(traced))
  inputs, in_specs = [logits, teacher_logits], [block_spec, block_spec]
  if config.cross_entropy:
    # Every id outside [0, vocab) means "not a vocabulary id": clip before narrowing to int32.
    labels = jnp.clip(labels, -1, vocab).astype(jnp.int32)
    inputs.append(layout.row_array(labels))
    # The label's logit, gathered here (one entry a row) rather than matched entry by entry in
    # a walk; a label outside the vocabulary reads any entry: its token is NaN.
    label_logits = jnp.take_along_axis(logits, jnp.clip(labels, 0, vocab - 1)[:, None], axis=1)
    inputs.append(layout.row_array(label_logits[:, 0].astype(jnp.float32)))
    in_specs += [layout.row_spec()] * 2
  if weights is not None:
    inputs.append(layout.row_array(weights.astype(jnp.float32)))
    in_specs.append(layout.row_spec())
  if names:
    inputs.append(jnp.stack([jnp.asarray(traced[name], jnp.float32) for name in names]))
    in_specs.append(scalar_spec)
  inputs, manual = _vary_alike(inputs)
  num_rows = len(recipe.Rows._fields)
  row_shape = (num_tokens, 1) if layout.column else (num_tokens,)
  out_shape = [jax.ShapeDtypeStruct(row_shape, jnp.float32, manual_axis_type=manual)] * num_rows
  out_specs = [layout.row_spec()] * num_rows
  aliases = {}
  if with_grad:  # Written over the logits.
    out_shape.append(
        jax.ShapeDtypeStruct(logits.shape, logits.dtype, manual_axis_type=manual))
    out_specs.append(block_spec)
    aliases = {0: num_rows}

  def kernel(*all_refs):
    ins, outs = list(all_refs[:len(inputs)]), all_refs[len(inputs):]
    logits_ref, teacher_ref = ins.pop(0), ins.pop(0)
    labels_ref = ins.pop(0) if config.cross_entropy else None
    label_logits_ref = ins.pop(0) if config.cross_entropy else None
    weights_ref = ins.pop(0) if weights is not None else None
    hp_ref = ins.pop(0) if names else None
    num_outs = num_rows + bool(with_grad)
    refs = _Refs(logits_ref, teacher_ref, labels_ref, label_logits_ref, weights_ref, hp_ref,
                 tuple(outs[:num_rows]), outs[num_rows] if with_grad else None,
                 outs[num_outs] if scratch_shapes else None)
    _body(config, names, layout, refs)

  results = pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(pl.cdiv(num_tokens, layout.rows),),
      in_specs=in_specs, out_specs=tuple(out_specs), input_output_aliases=aliases,
      scratch_shapes=scratch_shapes, compiler_params=params, interpret=variant.interpret,
      name=f"kdjax_{config.divergence}")(*inputs)
  return (*(r.reshape(num_tokens) for r in results[:num_rows]), *results[num_rows:])


def loop(variant: Variant, fallback: Callable[..., tuple[Array, ...]]):
  """The kernel ``variant`` as a ``dense.Loop`` of dense teachers; ``fallback`` (a loop) runs
  where the kernel does not apply (:func:`supports`).

  The loop's ``others`` are ``(teacher_logits[, labels])`` as ``dense.teacher_logits_block``
  takes them; it returns ``(value, divergence, cross_entropy[, grad])``. One object per
  arguments, so ``lax.platform_dependent`` joins the platforms that run the same loop.
  """
  return _loop(variant, fallback)


@functools.cache
def _loop(variant: Variant, fallback):
  return functools.partial(_run, variant, fallback)


def _run(variant: Variant, fallback, config: Config, traced: Mapping[str, Array], logits: Array,
         weights: Array | None, others, *, with_grad: bool) -> tuple[Array, ...]:
  teacher_logits, *labels = others
  if not supports(variant, config, logits, teacher_logits):
    return fallback(config, traced, logits, weights, others, with_grad=with_grad)
  return _call(variant, config, traced, logits, teacher_logits, labels[0] if labels else None,
               weights, with_grad=with_grad)
