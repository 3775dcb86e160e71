"""Reductions over tokens, and per-token weights (token_weights=) on every loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax._src import reductions
from tests import reference

IMPLEMENTATIONS = ("blocked", "reference")


def _data(seed=0, shape=(3, 6, 11)):
  rng = np.random.default_rng(seed)
  logits = reference.random_logits(rng, shape, neg_inf_fraction=0.1)
  teacher = reference.random_logits(rng, shape, neg_inf_fraction=0.1)
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  labels = np.where(rng.random(shape[:-1]) < 0.3, -100, labels)
  labels.reshape(-1)[:2] = 1  # some counted tokens
  # Importance weights, a clipped ratio, a reward of either sign, and zeros.
  weights = rng.choice([0.0, 0.5, 1.0, 2.5, -1.5], shape[:-1]).astype(np.float32)
  return logits, teacher, labels, weights


def _want(per_token, mask, weights, reduction, normalizer=None):
  """float64: the reductions of the docs, with each counted value times its weight."""
  weighted = np.where(mask, per_token * weights, 0.0)
  if reduction == "none":
    return weighted
  if reduction == "sum":
    return weighted.sum()
  if reduction == "mean":
    count = mask.sum() if normalizer is None else normalizer
    return weighted.sum() / count
  means = [w[m].sum() / m.sum() for w, m in zip(weighted.reshape(-1, mask.shape[-1]),
                                                mask.reshape(-1, mask.shape[-1]), strict=True)
           if m.any()]
  return np.mean(means)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "sequence_mean", "none"])
def test_distill_loss_token_weights_against_float64(implementation, reduction):
  logits, teacher, labels, weights = _data()
  mask = labels != -100
  per_token = reference.per_token("reverse_kl", logits, teacher, temperature=1.5)

  def loss(x):
    return kdjax.distill_loss(x, teacher, labels, divergence="reverse_kl", temperature=1.5,
                              reduction=reduction, token_weights=weights,
                              implementation=implementation)

  np.testing.assert_allclose(loss(logits), _want(per_token, mask, weights, reduction),
                             rtol=2e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(loss(x)))(logits)
  want_grad = reference.numerical_grad(lambda x: np.sum(_want(
      reference.per_token("reverse_kl", x, teacher, temperature=1.5), mask, weights,
      reduction)), logits)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)
  # A token of weight 0 (or not counted) contributes exactly nothing to the gradient.
  assert np.all(np.asarray(grad)[(weights == 0) | ~mask] == 0)


def test_normalizer_and_token_weights():
  logits, teacher, labels, weights = _data(1)
  mask = labels != -100
  per_token = reference.per_token("forward_kl", logits, teacher)
  np.testing.assert_allclose(
      kdjax.distill_loss(logits, teacher, labels, token_weights=weights, normalizer=40.0),
      _want(per_token, mask, weights, "mean", normalizer=40.0), rtol=2e-5)


def test_no_gradient_flows_to_token_weights():
  logits, teacher, labels, weights = _data(2)
  for implementation in IMPLEMENTATIONS:
    grad = jax.grad(lambda w, i=implementation: kdjax.distill_loss(
        logits, teacher, labels, token_weights=w, implementation=i))(weights)
    assert np.all(np.asarray(grad) == 0)


def test_every_loss_takes_token_weights():
  logits, teacher, labels, weights = _data(3)
  mask = labels != -100
  ones = np.ones_like(weights)
  # kd_loss and the combined objective: weighted like distill_loss.
  kd = reference.per_token("soft_cross_entropy", logits, teacher)
  np.testing.assert_allclose(kdjax.kd_loss(logits, teacher, labels, token_weights=weights),
                             _want(kd, mask, weights, "mean"), rtol=2e-5)
  safe_labels = np.where(
      np.isneginf(np.take_along_axis(logits, np.maximum(labels, 0)[..., None], -1)[..., 0]),
      -100, labels)
  safe_mask = safe_labels != -100
  ce = reference.cross_entropy(logits, safe_labels)
  forward = reference.per_token("forward_kl", logits, teacher)
  loss, (got_ce, got_kd) = kdjax.distill_with_cross_entropy(
      logits, teacher, safe_labels, kd_coef=0.25, token_weights=weights, return_components=True)
  np.testing.assert_allclose(
      loss, _want(0.75 * ce + 0.25 * forward, safe_mask, weights, "mean"), rtol=2e-5)
  np.testing.assert_allclose(got_ce, _want(ce, safe_mask, weights, "mean"), rtol=2e-5)
  np.testing.assert_allclose(got_kd, _want(forward, safe_mask, weights, "mean"), rtol=2e-5)
  # (sum, count): the sum is weighted, the count is not.
  total, count = kdjax.distill_loss_sum_and_count(logits, teacher, labels, token_weights=weights)
  np.testing.assert_allclose(total, _want(forward, mask, weights, "sum"), rtol=2e-5, atol=1e-6)
  assert float(count) == mask.sum()
  # A sparse teacher with every id is the dense forward KL.
  ids, logprobs = kdjax.topk_teacher(teacher, teacher.shape[-1])
  np.testing.assert_allclose(
      kdjax.sparse_distill_loss(logits, ids, logprobs, labels, tail="bucket",
                                token_weights=weights),
      _want(forward, mask, weights, "mean"), rtol=2e-5, atol=1e-6)
  # The fused head equals distill_loss on the logits it computes.
  rng = np.random.default_rng(4)
  h_s, h_t = rng.standard_normal((3, 6, 5)), rng.standard_normal((3, 6, 7))
  w_s, w_t = rng.standard_normal((5, 11)), rng.standard_normal((7, 11))
  for vocab_block in (None, 4):
    np.testing.assert_allclose(
        kdjax.fused_linear_distill_loss(h_s, w_s, h_t, w_t, labels, token_weights=weights,
                                        vocab_block=vocab_block),
        _want(reference.per_token("forward_kl", h_s @ w_s, h_t @ w_t), mask, weights, "mean"),
        rtol=2e-5, atol=1e-6)
  # Weights of one are no weights.
  np.testing.assert_array_equal(kdjax.distill_loss(logits, teacher, labels, token_weights=ones),
                                kdjax.distill_loss(logits, teacher, labels))


def test_vocab_parallel_token_weights():
  logits, teacher, labels, weights = _data(5, shape=(4, 8))
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  fn = jax.jit(jax.shard_map(
      lambda s, t, y, w: kdjax.vocab_parallel_distill_loss(
          s, t, y, token_weights=w, axis_name="model", data_axis_name="data"),
      mesh=mesh, in_specs=(jax.P("data", "model"),) * 2 + (jax.P("data"),) * 2,
      out_specs=jax.P()))
  want = _want(reference.per_token("forward_kl", logits, teacher), labels != -100, weights,
               "mean")
  np.testing.assert_allclose(fn(logits, teacher, labels, weights), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("bad, error, match", [
    (np.ones((3, 5), np.float32), ValueError, "token_weights must have shape"),
    (np.ones((3, 6), np.int32), TypeError, "token_weights must be a floating-point array"),
])
def test_bad_token_weights(bad, error, match):
  logits, teacher, _, _ = _data(6)
  with pytest.raises(error, match=match):
    kdjax.distill_loss(logits, teacher, token_weights=bad)


def test_pairwise_sum_is_accurate_and_exact_on_small_sizes():
  rng = np.random.default_rng(7)
  for n in (0, 1, 2, 3, 7, 960, 1000, 1024, 4097):
    x = rng.random(n).astype(np.float32) * 3 + 1
    want = x.astype(np.float64).sum()
    got = float(jax.jit(reductions.pairwise_sum)(x))
    assert abs(got - want) <= 8 * np.finfo(np.float32).eps * max(want, 1), (n, got, want)


def test_weighted_total_ignores_anything_at_zero_weight():
  values = jnp.array([1.0, jnp.nan, jnp.inf, 2.0])
  weights = jnp.array([0.5, 0.0, 0.0, 2.0])
  assert float(reductions.weighted_total(values, weights)) == 4.5
  fn = functools.partial(reductions.weighted_total, weights=weights)
  np.testing.assert_array_equal(jax.grad(fn)(values), [0.5, 0.0, 0.0, 2.0])


# ----------------------------------------------------------------------------------------------
# A normalizer of 0: the global count of an all-padding step.
# ----------------------------------------------------------------------------------------------

_LOGITS = np.random.default_rng(8).standard_normal((2, 3, 10)).astype(np.float32)
_TEACHER = np.random.default_rng(9).standard_normal((2, 3, 10)).astype(np.float32)
_HIDDEN = np.random.default_rng(10).standard_normal((2, 3, 4)).astype(np.float32)
_KERNEL = np.random.default_rng(11).standard_normal((4, 10)).astype(np.float32)
_IGNORED = np.full((2, 3), -100, np.int32)
_COUNTED = np.array([[1, 2, -100], [3, -100, -100]], np.int32)

# Every path (dense, combined, fused, sparse, vocabulary-parallel), as a function of the student
# logits (or hidden states), the labels and the keyword arguments of the reduction.
_NORMALIZED = {
    "distill_loss": (_LOGITS, lambda x, y, **kw: kdjax.distill_loss(x, _TEACHER, y, **kw)),
    "distill_with_cross_entropy": (_LOGITS, lambda x, y, **kw: kdjax.distill_with_cross_entropy(
        x, _TEACHER, y, kd_coef=0.5, **kw)),
    "fused_linear_distill_loss": (_HIDDEN, lambda h, y, **kw: kdjax.fused_linear_distill_loss(
        h, _KERNEL, h, _KERNEL + 1, y, **kw)),
    "sparse_distill_loss": (_LOGITS, lambda x, y, **kw: kdjax.sparse_distill_loss(
        x, *kdjax.topk_teacher(_TEACHER, 4), y, **kw)),
    "vocab_parallel_distill_loss": (_LOGITS, lambda x, y, **kw: jax.shard_map(
        lambda s, t, labels: kdjax.vocab_parallel_distill_loss(
            s, t, labels, axis_name="model", **kw),
        mesh=jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,)),
        in_specs=(jax.P(None, None, "model"),) * 2 + (jax.P(),), out_specs=jax.P())(
            x, _TEACHER, y)),
}


@pytest.mark.parametrize("path", list(_NORMALIZED))
def test_normalizer_zero_with_no_counted_token_gives_zero(path):
  """As the default mean does: a value of 0 and zero gradients (not NaN), whether the
  normalizer is a number, an array or traced; the tokens uncounted by labels or by where."""
  x, loss = _NORMALIZED[path]
  # (shard_map runs op by op outside jit: the vocabulary-parallel loss is only jitted.)
  eager = () if path.startswith("vocab_parallel") else (0, 0.0, jnp.float32(0))
  for kwargs in (dict(y=_IGNORED), dict(y=_COUNTED, where=np.zeros((2, 3), bool))):
    normalized = functools.partial(loss, **kwargs)
    for normalizer in eager:
      value, grad = jax.value_and_grad(lambda x, n, f=normalized: f(x, normalizer=n))(
          x, normalizer)
      assert value == 0 and np.all(np.asarray(grad) == 0), (kwargs, normalizer)
    value, grad = jax.jit(jax.value_and_grad(lambda x, n, f=normalized: f(x, normalizer=n)))(
        x, jnp.float32(0))
    assert value == 0 and np.all(np.asarray(grad) == 0), kwargs
    assert jax.jit(normalized)(x) == 0  # The default mean.


def test_normalizer_zero_with_a_counted_token_and_invalid_normalizers():
  """0 divides no counted token: a ValueError when the labels are known, NaN when traced; a
  negative normalizer stays an error, a NaN one NaN, even with no counted token."""
  _, loss = _NORMALIZED["distill_loss"]
  for normalizer in (0, jnp.float32(0.0)):
    with pytest.raises(ValueError, match=(
        r"^normalizer must be > 0 when any token is counted, got 0 with 3 counted token")):
      loss(_LOGITS, _COUNTED, normalizer=normalizer)
  with pytest.raises(ValueError, match=r"got 0 with 6 counted token"):
    loss(_LOGITS, None, normalizer=0.0)
  traced = jax.jit(jax.value_and_grad(lambda x, y, n: loss(x, y, normalizer=n)))
  value, grad = traced(_LOGITS, _COUNTED, jnp.float32(0))
  assert np.isnan(value) and np.isnan(np.asarray(grad)[_COUNTED != -100]).all()
  for bad in (-1.0, np.nan):
    value, grad = traced(_LOGITS, _IGNORED, jnp.float32(bad))
    assert np.isnan(value), bad
  with pytest.raises(ValueError, match=r"^normalizer must be a finite number >= 0"):
    loss(_LOGITS, _IGNORED, normalizer=-1.0)
  # A positive one divides the sum, the counted tokens' float64 sum here.
  per_token = reference.per_token("forward_kl", _LOGITS, _TEACHER)
  np.testing.assert_allclose(loss(_LOGITS, _COUNTED, normalizer=jnp.float32(5.0)),
                             per_token[_COUNTED != -100].sum() / 5, rtol=1e-5)


@pytest.mark.parametrize("counted_per_device", [(0, 0, 0, 0), (0, 3, 1, 0)])
def test_sharding_recipe_normalizer_is_the_psum_of_the_count(counted_per_device):
  """docs/sharding.md's recipe as written: each device's share is
  ``distill_loss(..., normalizer=psum(count))``, the loss the psum of the shares. An
  all-padding step (psum of the count = 0) gives 0 with zero gradients, as the default mean
  does; otherwise the global mean and its gradient."""
  devices, per_device, vocab = 4, 3, 16
  rng = np.random.default_rng(12)
  logits = rng.standard_normal((devices * per_device, vocab)).astype(np.float32)
  teacher = rng.standard_normal((devices * per_device, vocab)).astype(np.float32)
  labels = np.full((devices, per_device), -100, np.int32)
  for device, counted in enumerate(counted_per_device):
    labels[device, :counted] = rng.integers(0, vocab, counted)
  labels = labels.reshape(-1)
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def local_share(logits, teacher, labels):
    _, count = kdjax.distill_loss_sum_and_count(logits, teacher, labels)
    share = kdjax.distill_loss(logits, teacher, labels,
                               normalizer=jax.lax.psum(count, "data"))
    return jax.lax.psum(share, "data")

  loss = jax.shard_map(local_share, mesh=mesh, in_specs=(jax.P("data"),) * 3,
                       out_specs=jax.P())
  value, grad = jax.jit(jax.value_and_grad(loss))(logits, teacher, labels)
  counted = labels != -100
  per_token = reference.per_token("forward_kl", logits, teacher)
  want = per_token[counted].mean() if counted.any() else 0.0
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=0)
  want_grad = reference.numerical_grad(
      lambda x: reference.reduce(reference.per_token("forward_kl", x, teacher), counted, "mean"),
      logits)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  assert np.isfinite(np.asarray(grad)).all() and np.all(np.asarray(grad)[~counted] == 0)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation: token-weighted (sum, count) against optax.MultiSteps.
# ----------------------------------------------------------------------------------------------


def _micro_batches(counts, *, seed=13, tokens=6, width=4, vocab=10):
  rng = np.random.default_rng(seed)
  batches = []
  for counted in counts:
    hidden = rng.standard_normal((tokens, width)).astype(np.float32)
    teacher = rng.standard_normal((tokens, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, tokens).astype(np.int32)
    labels[counted:] = -100
    batches.append((hidden, teacher, labels))
  return batches


def _objective_float64(kernel, batches):
  """float64: the per-token (CE + forward KL) / 2 of a linear student ``hidden @ kernel``."""
  values, counted = [], []
  for hidden, teacher, labels in batches:
    logits = np.asarray(hidden, np.float64) @ kernel
    values.append(0.5 * reference.cross_entropy(logits, labels)
                  + 0.5 * reference.per_token("forward_kl", logits, teacher))
    counted.append(labels != -100)
  return values, counted


@pytest.mark.parametrize("counts", [(6, 1), (3, 3)])
def test_gradient_accumulation_token_weighted_against_optax_multisteps(counts):
  """Accumulating the gradients of each micro-batch's sum and its count, divided once, is the
  gradient of the mean over every counted token; optax.MultiSteps averages the micro-batches'
  gradients of their means. They differ when the counts differ and agree when equal."""
  optax = pytest.importorskip("optax")
  batches = _micro_batches(counts)
  kernel = np.random.default_rng(14).standard_normal((4, 10)).astype(np.float32) / 2

  def share(params, batch, fn):
    hidden, teacher, labels = batch
    return fn(hidden @ params, teacher, labels, kd_coef=0.5)

  grad_sum, count = np.zeros_like(kernel), 0.0
  for batch in batches:
    (_, micro_count), micro_grad = jax.value_and_grad(
        share, has_aux=True)(kernel, batch, kdjax.distill_with_cross_entropy_sum_and_count)
    grad_sum, count = grad_sum + micro_grad, count + micro_count
  token_weighted = grad_sum / count

  optimizer = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=len(batches))
  state = optimizer.init(jnp.asarray(kernel))
  for batch in batches:
    micro_grad = jax.grad(share)(kernel, batch, kdjax.distill_with_cross_entropy)
    updates, state = optimizer.update(micro_grad, state, jnp.asarray(kernel))
  multi_steps = -np.asarray(updates)  # sgd(1.0) applies minus the gradient it is given.

  def global_mean(k):
    values, counted = _objective_float64(k, batches)
    return np.concatenate(values)[np.concatenate(counted)].mean()

  def mean_of_means(k):
    values, counted = _objective_float64(k, batches)
    return np.mean([v[c].mean() for v, c in zip(values, counted, strict=True)])

  want_token_weighted = reference.numerical_grad(global_mean, kernel)
  want_multi_steps = reference.numerical_grad(mean_of_means, kernel)
  np.testing.assert_allclose(token_weighted, want_token_weighted, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(multi_steps, want_multi_steps, rtol=1e-4, atol=1e-6)
  difference = np.abs(token_weighted - multi_steps).max()
  if counts[0] == counts[1]:
    assert difference < 1e-6
  else:
    assert difference > 0.05 and np.abs(want_token_weighted - want_multi_steps).max() > 0.05
