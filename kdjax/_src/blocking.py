"""Token blocking: run a function over blocks of rows so temporaries stay ``O(block * vocab)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Rows per block are chosen so one float32 block holds about this many elements (2 MiB): big
# enough to amortise the loop, small enough that the handful of block temporaries stays cached
# and far below the 0.1x-of-the-logits memory budget for realistic sizes.
DEFAULT_BLOCK_ELEMENTS = 1 << 19


def default_token_block(num_tokens: int, vocab_size: int) -> int:
  return max(1, min(num_tokens, DEFAULT_BLOCK_ELEMENTS // max(vocab_size, 1)))


def map_token_blocks(
    fn: Callable[..., tuple[Array, ...]],
    inputs: Sequence[Array],
    outputs: Sequence[Array],
    *,
    block: int,
) -> tuple[Array, ...]:
  """Writes ``fn(*row_blocks(inputs))`` into row blocks of ``outputs``.

  Every array in ``inputs`` and ``outputs`` has the token axis first, of the same length ``n``.
  ``fn`` maps a block of ``block`` rows of each input to a block of rows of each output. When
  ``block`` does not divide ``n`` the last block starts at ``n - block`` and overlaps the one
  before it; overlapping rows are recomputed with identical results, which avoids padding (a
  copy of the inputs) and ragged shapes. ``outputs`` give the shapes and dtypes, and are
  overwritten in place by XLA.
  """
  num_tokens = inputs[0].shape[0]
  block = max(1, min(block, num_tokens))
  if num_tokens == 0:
    return tuple(outputs)
  if block == num_tokens:
    return tuple(
        jnp.asarray(o).astype(out.dtype) for o, out in zip(fn(*inputs), outputs))

  num_blocks = -(-num_tokens // block)

  def body(i, outs):
    start = jnp.minimum(i * block, num_tokens - block)
    blocks = [lax.dynamic_slice_in_dim(x, start, block, axis=0) for x in inputs]
    return tuple(
        lax.dynamic_update_slice_in_dim(o, b.astype(o.dtype), start, axis=0)
        for o, b in zip(outs, fn(*blocks)))

  return lax.fori_loop(0, num_blocks, body, tuple(outputs))
