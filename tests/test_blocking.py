"""Token blocking: every block layout, in-place overwriting, compensated totals, and its memory in
a train step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax._src import blocking


def _row_fn(rows, scale):
  """A row-wise function with a row reduction, like the losses' blocks."""
  x = rows.astype(jnp.float32)
  total = jnp.sum(x, axis=-1)
  return total, (x * scale[:, None] - total[:, None]).astype(rows.dtype)


def _want(rows, scale):
  x = np.asarray(rows, np.float64)
  total = x.sum(-1)
  return total, x * np.asarray(scale)[:, None] - total[:, None]


# (tokens, block): divides (strided blocks), does not (contiguous blocks and a remainder),
# one block, one row per block.
LAYOUTS = [(12, 4), (13, 4), (13, 13), (5, 1), (7, 100)]


@pytest.mark.parametrize("tokens,block", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("overwrite", [False, True])
def test_map_token_blocks_matches_numpy(tokens, block, dtype, overwrite):
  rng = np.random.default_rng(tokens * block)
  rows = jnp.asarray(rng.standard_normal((tokens, 6)), dtype)
  scale = jnp.asarray(rng.standard_normal(tokens), jnp.float32)
  outputs = (jnp.zeros((tokens,), jnp.float32), rows if overwrite else jnp.zeros_like(rows))
  total, out = jax.jit(lambda r, s: blocking.map_token_blocks(
      _row_fn, (r, s), outputs, block=block, overwrite={0: 1} if overwrite else None))(
          rows, scale)
  want_total, want_out = _want(rows, scale)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  assert out.dtype == dtype
  np.testing.assert_allclose(total, want_total, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens,block", LAYOUTS)
@pytest.mark.parametrize("strided", [True, False])
def test_sums_and_weights_match_numpy(tokens, block, strided):
  """Accumulated sums (a kernel gradient, say) with per-row weights: an overlapping last block
  must neither count a row twice nor overwrite the rows it repeats."""
  rng = np.random.default_rng(tokens + block)
  rows = jnp.asarray(rng.standard_normal((tokens, 6)), jnp.float32)
  weights = jnp.asarray(rng.random(tokens) + 0.5, jnp.float32)

  def fn(r, w):
    return r * w[:, None], jnp.sum(r * w[:, None], axis=0), jnp.sum(w)

  out, total, weight_sum = jax.jit(lambda r, w: blocking.map_token_blocks(
      fn, (r, w), (jnp.zeros_like(r),), sums=(jnp.zeros(6), jnp.zeros(())), block=block,
      strided=strided, weights=1))(rows, weights)
  x, w = np.asarray(rows, np.float64), np.asarray(weights, np.float64)
  np.testing.assert_allclose(out, x * w[:, None], rtol=1e-6)
  np.testing.assert_allclose(total, (x * w[:, None]).sum(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(weight_sum, w.sum(), rtol=1e-6)


@pytest.mark.parametrize("tokens,block", LAYOUTS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_totals_match_numpy(tokens, block, overwrite):
  """Per-row values summed in the loop, in every block layout (with ``overwrite``, the last
  rows as a smaller block; without, an overlapping last block whose repeated rows get weight
  0)."""
  rng = np.random.default_rng(3 * tokens + block)
  rows = jnp.asarray(rng.standard_normal((tokens, 6)), jnp.float32)
  weights = jnp.asarray(rng.random(tokens) + 0.5, jnp.float32)
  teacher = jnp.asarray(rng.standard_normal((tokens, 6)), jnp.float32)

  def fn(r, w, t):
    return -r, jnp.sum(r * t, axis=-1) * w

  def run(r, w, t):
    return blocking.map_token_blocks(
        fn, (r, w, t), (r if overwrite else jnp.zeros_like(r),), totals=1, block=block,
        overwrite={0: 0} if overwrite else None, weights=1)

  out, lanes = jax.jit(run)(rows, weights, teacher)
  x, w, t = (np.asarray(a, np.float64) for a in (rows, weights, teacher))
  np.testing.assert_allclose(out, -x, rtol=1e-7)
  assert lanes.shape == (min(block, tokens),) and lanes.dtype == jnp.float32
  np.testing.assert_allclose(np.sum(np.asarray(lanes, np.float64)), np.sum((x * t).sum(-1) * w),
                             rtol=1e-6)


def test_totals_are_compensated_across_blocks():
  """4096 one-row blocks: 1, then 4095 values each below half of 1's float32 spacing, which a
  float32 running sum drops one by one; the compensated lanes keep them. An infinite or NaN
  value is the total as it is."""
  values = np.full(4096, 2e-8, np.float32)
  values[0] = 1.0

  def total(v):
    (lanes,) = blocking.map_token_blocks(lambda b: (b,), (v,), (), totals=1, block=1)
    return lanes[0]

  got = float(jax.jit(total)(jnp.asarray(values)))
  want = np.sum(values.astype(np.float64))
  assert abs(got - want) <= np.spacing(np.float32(want)), (got, want)
  assert float(jax.jit(total)(jnp.asarray(np.float32(1.0) + 0 * values))) == 4096.0
  for bad in (np.inf, -np.inf, np.nan):
    with_bad = values.copy()
    with_bad[7] = bad
    np.testing.assert_equal(float(jax.jit(total)(jnp.asarray(with_bad))), bad)


def test_overwrite_needs_matching_output():
  rows = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="input 0 cannot overwrite output 0"):
    blocking.map_token_blocks(lambda r: (r,), (rows,), (jnp.zeros((4, 2)),), block=2,
                              overwrite={0: 0})


def test_overwrite_leaves_a_live_input_intact():
  # The caller still needs the logits after the call: XLA must copy, never clobber them.
  rows = jnp.arange(24.0).reshape(8, 3)

  def fn(r):
    (out,) = blocking.map_token_blocks(lambda b: (-b,), (r,), (r,), block=2, overwrite={0: 0})
    return out, r

  out, kept = jax.jit(fn)(rows)
  np.testing.assert_array_equal(out, -np.arange(24.0).reshape(8, 3))
  np.testing.assert_array_equal(kept, np.arange(24.0).reshape(8, 3))


def test_scale_rows():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((9, 5)), jnp.bfloat16)
  s = jnp.asarray(rng.standard_normal(9), jnp.float32)
  got = jax.jit(blocking.scale_rows)(x, s)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(x, np.float32) * np.asarray(s)[:, None], rtol=1e-2)


TOKENS, VOCAB, WIDTH = 2048, 32000, 64


def _train_step_losses():
  return {
      "kd_loss": lambda w, h, t, y: kdjax.kd_loss(h @ w, t, y),
      "per_token": lambda w, h, t, y: jnp.mean(
          kdjax.distill_loss(h @ w, t, y, divergence="reverse_kl", reduction="none")),
      "with_cross_entropy": lambda w, h, t, y: kdjax.distill_with_cross_entropy(
          h @ w, t, y, kd_coef=0.5),
      "sparse": lambda w, h, t, y: kdjax.sparse_distill_loss(
          h @ w, t[:, :8].astype(jnp.int32), t[:, :8], y, tail="bucket"),
  }


@pytest.mark.parametrize("name", list(_train_step_losses()))
def test_train_step_writes_the_gradient_over_the_logits(name):
  # Logits computed inside the step are dead after the loss: their gradient takes their buffer,
  # so the step holds one [tokens, vocab] array, not two (logits + a fresh gradient).
  fn = _train_step_losses()[name]
  w = jax.ShapeDtypeStruct((WIDTH, VOCAB), jnp.float32)
  h = jax.ShapeDtypeStruct((TOKENS, WIDTH), jnp.float32)
  t = jax.ShapeDtypeStruct((TOKENS, VOCAB), jnp.float32)
  y = jax.ShapeDtypeStruct((TOKENS,), jnp.int32)
  compiled = jax.jit(jax.value_and_grad(fn)).lower(w, h, t, y).compile()
  logits_bytes = TOKENS * VOCAB * 4
  assert compiled.memory_analysis().temp_size_in_bytes <= 1.05 * logits_bytes


def test_accelerator_blocks_are_sized_by_bytes():
  """About 64 MiB of float32 per dense block and 512 MiB per fused block on GPUs and TPUs,
  against 1 MiB (8 rows) on CPU."""
  assert blocking.token_block(16384, 128256) == 8
  assert blocking.token_block(16384, 128256, blocking.ACCELERATOR) == 128
  assert blocking.token_block(8192, 32000, blocking.ACCELERATOR) == 512
  assert blocking.token_block(8192, 128256, blocking.FUSED_ACCELERATOR) == 1024


@pytest.mark.parametrize("platform,block", [("cpu", 8), ("cuda", 128), ("tpu", 128)])
def test_per_platform_block_is_chosen_when_lowering(platform, block):
  def rows_per_block(x):
    return blocking.per_platform(lambda rows: x * rows, 16384, 128256, cpu=blocking.DENSE,
                                 accelerator=blocking.ACCELERATOR)

  text = jax.jit(rows_per_block).trace(jax.ShapeDtypeStruct((), jnp.int32)).lower(
      lowering_platforms=(platform,)).as_text()
  constants = set(re.findall(r"constant dense<(\d+)>", text))
  assert str(block) in constants and not {"8", "128"} - {str(block)} & constants
