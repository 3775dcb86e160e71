"""Tests for kdjax/_src/vocab.py: align_vocab."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax._src.vocab import align_vocab


def test_cuts_to_smaller_vocab_and_keeps_dtypes():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 3, 10)).astype(np.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 3, 12)), jnp.bfloat16)
  s, t = align_vocab(student, teacher)
  assert s.shape == t.shape == (2, 3, 10)
  assert s.dtype == jnp.float32 and t.dtype == jnp.bfloat16
  np.testing.assert_array_equal(s, student)
  np.testing.assert_array_equal(
      np.asarray(t, np.float32), np.asarray(teacher, np.float32)[..., :10])
  # Symmetric: a larger student is cut as well.
  s, t = align_vocab(teacher, student)
  assert s.shape == t.shape == (2, 3, 10)


def test_explicit_vocab_size():
  s, t = align_vocab(jnp.arange(12.0).reshape(2, 6), jnp.arange(14.0).reshape(2, 7), vocab_size=4)
  np.testing.assert_array_equal(s, [[0, 1, 2, 3], [6, 7, 8, 9]])
  np.testing.assert_array_equal(t, [[0, 1, 2, 3], [7, 8, 9, 10]])


def test_padding_rows_change_nothing_when_masked():
  # Teacher padded with -inf rows (as a padded output layer masked at inference): aligning gives
  # the same loss as a teacher that never had them, and the losses accept the result.
  rng = np.random.default_rng(1)
  student = rng.normal(size=(4, 9)).astype(np.float32)
  teacher = rng.normal(size=(4, 9)).astype(np.float32)
  padded = np.concatenate([teacher, np.full((4, 3), -np.inf, np.float32)], axis=-1)
  with pytest.raises(ValueError, match=r"kdjax.align_vocab\(logits, teacher_logits\)"):
    kdjax.distill_loss(student, padded)
  with pytest.raises(ValueError, match=r"kdjax.align_vocab\(logits, teacher_logits\)"):
    kdjax.kd_loss(student, padded, np.zeros(4, np.int32))
  aligned = align_vocab(student, padded)
  np.testing.assert_allclose(
      kdjax.distill_loss(*aligned), kdjax.distill_loss(student, teacher), rtol=1e-6)


def test_gradient_flows_through_the_slice():
  rng = np.random.default_rng(2)
  student = rng.normal(size=(3, 8)).astype(np.float32)
  teacher = rng.normal(size=(3, 6)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda x: kdjax.distill_loss(*align_vocab(x, teacher))))(student)
  want = jax.grad(lambda x: kdjax.distill_loss(x, teacher))(student[:, :6])
  np.testing.assert_allclose(grad[:, :6], want, rtol=1e-6)
  np.testing.assert_array_equal(grad[:, 6:], 0.0)


def test_errors():
  with pytest.raises(ValueError, match="would grow a vocabulary"):
    align_vocab(jnp.zeros((2, 6)), jnp.zeros((2, 8)), vocab_size=7)
  for bad in (0, -3, 2.5, True, "6"):
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
      align_vocab(jnp.zeros((2, 6)), jnp.zeros((2, 8)), vocab_size=bad)
  with pytest.raises(ValueError, match="same leading"):
    align_vocab(jnp.zeros((2, 6)), jnp.zeros((3, 8)))
  with pytest.raises(TypeError, match="teacher_logits must be a floating-point array"):
    align_vocab(jnp.zeros((2, 6)), jnp.zeros((2, 8), jnp.int32))
