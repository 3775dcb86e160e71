"""Extreme inputs: exact log-softmax, NaN, huge and tiny temperatures, sums, rounding, bad input.

Every expected value comes from an independent float64 formula (tests/reference.py) or from
mathematics (a uniform student, equal distributions, log 2).
"""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kdjax
from tests import reference

ALL = kdjax.DIVERGENCES
HYPER = {"generalized_jsd": {"beta": 0.5}, "skew_forward_kl": {"alpha": 0.2},
         "skew_reverse_kl": {"alpha": 0.2}}
IMPLEMENTATIONS = ("blocked", "reference")


# ----------------------------------------------------------------------------------------------
# The log-softmax: shifted in raw-logit space, and log(sum) never lost next to a large max.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_equal_logits_keep_log_sum(implementation):
  # A uniform student over 4 entries: its cross entropy with any teacher is log 4.
  value = kdjax.kd_loss(jnp.full((1, 4), 1e8), jnp.array([[0.0, 1, 2, 3]]), jnp.array([0]),
                        implementation=implementation)
  np.testing.assert_allclose(value, np.log(4.0), rtol=1e-6)
  # q = (1/2, 1/2, 0), p = (1/2, 0, 1/2): JSD(beta=1/2) = log(2) / 2, never above log 2.
  jsd = kdjax.distill_loss(jnp.array([[1e8, 1e8, 0]]), jnp.array([[1e8, 0, 1e8]]),
                           divergence="generalized_jsd", implementation=implementation)
  np.testing.assert_allclose(jsd, np.log(2.0) / 2, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("temperature", [0.7, 0.3, 3.3])
def test_python_temperature_that_is_not_a_power_of_two(implementation, temperature):
  # p = q = (1, 0): every divergence is exactly 0, whatever the magnitude of the logits.
  logits, teacher = jnp.array([[-2075.0332, -jnp.inf]]), jnp.array([[1888.387, -jnp.inf]])
  for name in ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation"):
    value = kdjax.distill_loss(logits, teacher, divergence=name, temperature=temperature,
                               implementation=implementation)
    assert float(value) == 0.0, (name, float(value))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("traced", [False, True])
def test_logits_near_1e30_with_temperature_0_7(implementation, traced):
  logits = np.array([[1e30, -1e30, 3e29, 2e29], [5e29, 5e29, -1e30, 0.0]], np.float32)
  teacher = np.array([[-1e30, 1e30, 2e29, 1e29], [5e29, 4e29, 0.0, -1e30]], np.float32)
  temperature = jnp.float32(0.7) if traced else 0.7
  fn = functools.partial(kdjax.distill_loss, teacher_logits=teacher, temperature=temperature,
                         reduction="sum", implementation=implementation)
  value, grad = jax.value_and_grad(fn)(logits)
  want = reference.per_token("forward_kl", logits, teacher, temperature=0.7).sum()
  np.testing.assert_allclose(value, want, rtol=1e-6)
  # d KL(p || q) / d logits = (q - p) / T, in float64.
  q = np.exp(reference.log_softmax(logits / 0.7))
  p = np.exp(reference.log_softmax(teacher / 0.7))
  np.testing.assert_allclose(grad, (q - p) / 0.7, rtol=1e-6, atol=1e-7)


def test_largest_entry_has_log_probability_zero():
  # topk_teacher returns log-probabilities: a dominant entry's is exactly 0 at any temperature.
  logits = jnp.array([[1888.387, -2075.0332, 3.0]])
  for temperature in (0.7, 0.3, 1.0, 3.3):
    _, logprobs = kdjax.topk_teacher(logits, 1, temperature=temperature)
    assert float(logprobs[0, 0]) == 0.0, temperature


# ----------------------------------------------------------------------------------------------
# NaN in, NaN out; bad hyperparameters and shapes are errors that name the argument.
# ----------------------------------------------------------------------------------------------


def _fused_args(student_hidden):
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((3, 7)).astype(np.float32)
  teacher_hidden = rng.standard_normal(student_hidden.shape).astype(np.float32)
  return student_hidden, kernel, teacher_hidden, kernel


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ALL)
def test_nan_logit_gives_nan_value_and_gradient(implementation, name):
  logits = np.array([[1.0, np.nan, 0.0], [0.5, 0.2, 0.1]], np.float32)
  teacher = np.array([[0.0, 1.0, 2.0], [0.1, 0.2, 0.3]], np.float32)
  kwargs = dict(divergence=name, implementation=implementation, **HYPER.get(name, {}))
  value, grad = jax.value_and_grad(lambda x: kdjax.distill_loss(x, teacher, **kwargs))(logits)
  assert np.isnan(value)
  per_token = kdjax.distill_loss(logits, teacher, reduction="none", **kwargs)
  assert np.isnan(per_token[0]) and np.isfinite(per_token[1])
  # A NaN teacher logit is as wrong as a student one.
  assert np.isnan(kdjax.distill_loss(teacher, logits, **kwargs))
  if implementation == "blocked":  # autodiff of the reference gives what it gives
    assert np.all(np.isnan(grad[0]))


def test_nan_gives_nan_in_every_path():
  logits = np.array([[1.0, np.nan, 0.0, 2.0]], np.float32)
  ids, logprobs = kdjax.topk_teacher(np.zeros((1, 4), np.float32), 2)
  for tail in kdjax.TAILS:
    assert np.isnan(kdjax.sparse_distill_loss(logits, ids, logprobs, tail=tail)), tail
  hidden = np.array([[1.0, np.nan, 0.0]], np.float32)
  for vocab_block in (None, 3):
    assert np.isnan(kdjax.fused_linear_distill_loss(*_fused_args(hidden),
                                                    vocab_block=vocab_block))
  assert np.isnan(kdjax.distill_with_cross_entropy(logits, logits * 0, np.array([1])))


@pytest.mark.parametrize("temperature", [1e-50, 1e39, 2e-39, float("nan"), float("inf"), 0.0])
def test_temperature_outside_float32_is_an_error(temperature):
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="temperature"):
    kdjax.distill_loss(x, x, temperature=temperature)
  with pytest.raises(ValueError, match="temperature"):
    kdjax.topk_teacher(x, 1, temperature=temperature)


def test_temperature_range_limits_are_accepted():
  x = jnp.array([[0.0, 1.0, 2.0]])
  for temperature in (1e-3, 1e3, 1e-30, 1e30):
    value = kdjax.distill_loss(x, x[:, ::-1], temperature=temperature)
    assert np.isfinite(value), temperature


def test_empty_vocabulary_is_an_error_naming_the_array():
  empty = np.zeros((2, 0), np.float32)
  for call, name in [
      (lambda: kdjax.distill_loss(empty, empty), "logits"),
      (lambda: kdjax.kd_loss(empty, empty, np.zeros(2, np.int32)), "logits"),
      (lambda: kdjax.forward_kl(empty, empty), "logits"),
      (lambda: kdjax.topk_teacher(empty, 1), "teacher_logits"),
      (lambda: kdjax.sparse_distill_loss(empty, np.zeros((2, 1), np.int32),
                                         np.zeros((2, 1), np.float32)), "logits"),
      (lambda: kdjax.fused_linear_distill_loss(
          np.zeros((2, 3)), np.zeros((3, 0)), np.zeros((2, 3)), np.zeros((3, 0))),
       "student_kernel"),
  ]:
    with pytest.raises(ValueError, match=f"{name} has an empty vocabulary"):
      call()


@pytest.mark.parametrize("normalizer", [-2, -1e-30, float("nan"), float("inf"), -float("inf")])
def test_python_normalizer_must_be_nonnegative_and_finite(normalizer):
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="normalizer must be a finite number >= 0"):
    kdjax.distill_loss(x, x, normalizer=normalizer)
  with pytest.raises(ValueError, match="normalizer must be a finite number >= 0"):
    kdjax.sparse_distill_loss(x, np.zeros((2, 1), np.int32), np.zeros((2, 1)),
                              normalizer=normalizer)


@pytest.mark.parametrize("normalizer", [0, 0.0, -0.0])
def test_python_normalizer_zero_must_divide_no_counted_token(normalizer):
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="normalizer must be > 0 when any token is counted"):
    kdjax.distill_loss(x, x, normalizer=normalizer)
  with pytest.raises(ValueError, match="normalizer must be > 0 when any token is counted"):
    kdjax.sparse_distill_loss(x, np.zeros((2, 1), np.int32), np.zeros((2, 1)),
                              normalizer=normalizer)
  assert kdjax.distill_loss(x, x, np.array([-100, -100]), normalizer=normalizer) == 0


def test_normalizer_divides_the_sum():
  rng = np.random.default_rng(0)
  logits, teacher = (reference.random_logits(rng, (5, 7)) for _ in range(2))
  total = reference.per_token("forward_kl", logits, teacher).sum()
  np.testing.assert_allclose(kdjax.distill_loss(logits, teacher, normalizer=3), total / 3,
                             rtol=1e-6)


# Hyperparameters given as arrays: checked where their value is known, NaN where it is not.
_RNG = np.random.default_rng(7)
_S, _T = (jnp.asarray(reference.random_logits(_RNG, (2, 4, 12))) for _ in range(2))
_Y = jnp.asarray([[1, 2, -100, 3], [0, -100, 5, 11]], jnp.int32)  # Two ignored tokens.
_H, _H_TEACHER = (jnp.asarray(_RNG.standard_normal((2, 4, 6)), jnp.float32) for _ in range(2))
_W = jnp.asarray(_RNG.standard_normal((6, 12)), jnp.float32)
_IDS, _LOGPROBS = kdjax.topk_teacher(_T, 3)

# (loss of the student logits or hidden states and one hyperparameter, the argument it names,
# an out-of-range value, an in-range value): every public family and every range check.
_HYPERPARAMETER_CASES = {
    "distill_loss temperature": (
        lambda x, v: kdjax.distill_loss(x, _T, _Y, temperature=v), "temperature", -1.0, 2.0),
    "distill_loss tiny temperature": (
        lambda x, v: kdjax.distill_loss(x, _T, _Y, temperature=v), "temperature", 1e-39, 2.0),
    "generalized_jsd beta": (
        lambda x, v: kdjax.distill_loss(x, _T, _Y, divergence="generalized_jsd", beta=v),
        "beta", 3.0, 0.3),
    "skew_forward_kl alpha": (
        lambda x, v: kdjax.distill_loss(x, _T, _Y, divergence="skew_forward_kl", alpha=v),
        "alpha", 1.5, 0.2),
    "normalizer": (
        lambda x, v: kdjax.distill_loss(x, _T, _Y, normalizer=v), "normalizer", -2.0, 6.0),
    "distill_with_cross_entropy kd_coef": (
        lambda x, v: kdjax.distill_with_cross_entropy(x, _T, _Y, kd_coef=v), "kd_coef", 2.0, 0.5),
    "per-token reverse_kl temperature": (
        lambda x, v: jnp.sum(kdjax.reverse_kl(x, _T, temperature=v)), "temperature", -3.0, 0.5),
    "sparse_distill_loss temperature": (
        lambda x, v: kdjax.sparse_distill_loss(x, _IDS, _LOGPROBS, _Y, temperature=v),
        "temperature", -1.0, 1.0),
    "uld_loss teacher_temperature": (
        lambda x, v: kdjax.uld_loss(x, _T, _Y, teacher_temperature=v), "teacher_temperature",
        0.0, 2.0),
    "fused softcap": (
        lambda h, v: kdjax.fused_linear_distill_loss(h, _W, _H_TEACHER, _W, _Y, softcap=v),
        "softcap", -5.0, 5.0),
    "fused kd_coef": (
        lambda h, v: kdjax.fused_linear_distill_with_cross_entropy(h, _W, _H_TEACHER, _W, _Y,
                                                                 kd_coef=v),
        "kd_coef", -0.5, 0.5),
}


@pytest.mark.parametrize("case", list(_HYPERPARAMETER_CASES))
def test_out_of_range_hyperparameter_array_is_an_error_when_its_value_is_known(case):
  loss, argument, bad, good = _HYPERPARAMETER_CASES[case]
  x = _H if "fused" in case else _S
  for value in (jnp.float32(bad), np.asarray(bad, np.float32), jnp.asarray([bad])[0]):
    with pytest.raises(ValueError, match=f"^{argument} must be"):
      loss(x, value)
  assert np.isfinite(loss(x, jnp.float32(good)))


@pytest.mark.parametrize("case", list(_HYPERPARAMETER_CASES))
def test_out_of_range_traced_hyperparameter_gives_nan(case):
  """Traced (a schedule inside jit): the value is NaN and so is the gradient of every counted
  token; ignored tokens still get exactly 0 (but for a NaN normalizer, which divides every
  token's weight, and a NaN softcap, which enters every token's logits); an in-range value is
  unaffected."""
  loss, _, bad, good = _HYPERPARAMETER_CASES[case]
  x = _H if "fused" in case else _S
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  value, grad = value_and_grad(x, bad)
  assert np.isnan(value), case
  counted = np.asarray(_Y != -100)
  assert np.isnan(np.asarray(grad)[counted]).all(axis=-1).any(), case
  if not any(word in case for word in ("per-token", "normalizer", "softcap")):
    assert (np.asarray(grad)[~counted] == 0).all(), case
  good_value, good_grad = value_and_grad(x, good)
  want_value, want_grad = jax.value_and_grad(loss)(x, good)  # A Python number: static.
  np.testing.assert_allclose(good_value, want_value, rtol=1e-5)
  np.testing.assert_allclose(good_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_out_of_range_hyperparameter_in_a_vmapped_schedule_is_nan_only_where_it_is():
  temperatures = jnp.array([1.0, -1.0, 2.0])
  values = jax.vmap(lambda t: kdjax.distill_loss(_S, _T, _Y, temperature=t))(temperatures)
  assert np.isnan(values[1]) and np.isfinite(values[np.array([0, 2])]).all()
  np.testing.assert_allclose(values[2], kdjax.distill_loss(_S, _T, _Y, temperature=2.0),
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sums and rounding.
# ----------------------------------------------------------------------------------------------


def test_sum_over_many_tokens_is_accurate():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((1024, 8192)).astype(np.float32)
  teacher = rng.standard_normal((1024, 8192)).astype(np.float32)
  want = reference.per_token("total_variation", logits, teacher).sum()
  got = kdjax.distill_loss(logits, teacher, divergence="total_variation", reduction="sum")
  # Each per-token value is within about 2e-7 of float64, with no bias: the sum must be as
  # good. A sequential float32 sum of the 1024 values is off by 2e-7 to 1e-6.
  assert abs(float(got) - want) / want < 5e-8, abs(float(got) - want) / want


def test_sum_over_many_blocks_is_accurate():
  # 4096 one-token blocks: the blocked engine adds the values up in its loop, compensated, as
  # accurately as a pairwise sum (a float32 running sum of them is off by 2.1e-7), with and
  # without the gradient's loop.
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((4096, 16)).astype(np.float32)
  teacher = rng.standard_normal((4096, 16)).astype(np.float32)
  want = reference.per_token("forward_kl", logits, teacher).sum()

  def loss(x):
    return kdjax.distill_loss(x, teacher, reduction="sum", token_block=1)

  for got in (loss(logits), jax.value_and_grad(loss)(logits)[0]):
    assert abs(float(got) - want) / want < 5e-8, abs(float(got) - want) / want


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_16_bit_gradient_is_rounded_once(dtype, reduction):
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((96, 300)) * 3, dtype)
  teacher = jnp.asarray(rng.standard_normal((96, 300)) * 3, dtype)
  labels = np.where(rng.random(96) < 0.2, -100, 1).astype(np.int32)

  def grad(x):
    return jax.grad(lambda x: kdjax.distill_loss(x, teacher, labels, reduction=reduction,
                                                 divergence="reverse_kl"))(x)

  low = np.asarray(grad(logits).astype(jnp.float32))
  # The float32 gradient of the same (exactly representable) inputs, rounded once.
  once = np.asarray(grad(logits.astype(jnp.float32)).astype(dtype).astype(jnp.float32))
  assert np.mean(low == once) > 0.999, np.mean(low == once)
  ulp = np.asarray(jnp.finfo(dtype).eps, np.float32) * np.maximum(np.abs(once), 1e-30)
  assert np.all(np.abs(low - once) <= ulp)


# ----------------------------------------------------------------------------------------------
# Labels, ignored tokens and masks (data safety).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_out_of_range_traced_labels_give_nan(implementation):
  """Traced labels (known only when the program runs; known ones are a ValueError at the
  call): a counted one outside the vocabulary makes the loss NaN."""
  rng = np.random.default_rng(2)
  logits, teacher = (reference.random_logits(rng, (2, 16)) for _ in range(2))
  value_and_grad = jax.jit(jax.value_and_grad(lambda x, y: kdjax.distill_with_cross_entropy(
      x, teacher, y, kd_coef=0.0, implementation=implementation)))
  distill = jax.jit(lambda y, reduction: kdjax.distill_loss(
      logits, teacher, y, reduction=reduction, implementation=implementation),
      static_argnames="reduction")
  for labels in ([99, -7], [3, -1], [16, 2]):
    labels = np.array(labels, np.int32)
    value, grad = value_and_grad(logits, labels)
    assert np.isnan(value)
    if implementation == "blocked":
      assert np.all(np.isnan(grad[labels < 0 if labels[0] >= 0 else 0]))
    # The labels also mask distill_loss: a -1 padding label is not a silent token.
    assert np.isnan(distill(labels, "mean"))
    assert np.isnan(distill(labels, "none")).any()
  ok = np.array([15, -100], np.int32)
  assert np.isfinite(value_and_grad(logits, ok)[0])


def test_out_of_range_traced_labels_give_nan_in_the_other_paths():
  logits = np.zeros((2, 4), np.float32)
  labels = np.array([4, -100], np.int32)
  ids, logprobs = kdjax.topk_teacher(logits, 2)
  sparse = jax.jit(lambda y: kdjax.sparse_distill_loss(logits, ids, logprobs, y))
  assert np.isnan(sparse(labels))
  hidden = np.ones((2, 3), np.float32)
  kernel = np.ones((3, 4), np.float32)
  assert np.isnan(jax.jit(lambda y: kdjax.fused_linear_distill_loss(
      hidden, kernel, hidden, kernel, y))(labels))
  # Valid ids for a 4-entry vocabulary are 0..3; a label at the edge is fine.
  assert np.isfinite(sparse(np.array([3, -100])))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ignored_tokens_contribute_exactly_zero_whatever_they_hold(implementation):
  logits = np.array([[0.3, 1.0, -1.0], [np.nan, np.inf, 1.0], [0.0, 2.0, 1.0]], np.float32)
  teacher = np.array([[1.0, 0.0, 0.5], [np.nan, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
  labels = np.array([1, -100, 7], np.int32)  # the last is ignored through where
  where = np.array([1, 1, 0], np.int32)  # an integer mask, as tokenizers return
  for name in ALL:
    for reduction in ("mean", "sum", "sequence_mean", "none"):
      fn = functools.partial(kdjax.distill_loss, teacher_logits=teacher, labels=labels,
                             where=where, divergence=name, reduction=reduction,
                             implementation=implementation, **HYPER.get(name, {}))
      value, grad = jax.value_and_grad(lambda x, fn=fn: jnp.sum(fn(x)))(logits)
      want = reference.per_token(name, logits[:1], teacher[:1], **HYPER.get(name, {}))[0]
      np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-7)
      assert np.all(np.asarray(grad)[1:] == 0), (name, reduction)
      assert np.all(np.isfinite(grad))


def test_ignored_tokens_contribute_exactly_zero_in_the_other_paths():
  logits = np.array([[0.3, 1.0, -1.0, 0.0], [np.nan, 1.0, 2.0, 0.0]], np.float32)
  labels = np.array([1, -100], np.int32)
  bad_ids = np.array([[0, 1], [9, -3]], np.int32)  # invalid, but on an ignored token
  logprobs = np.log(np.array([[0.5, 0.25], [0.5, 0.25]], np.float32))
  for implementation in IMPLEMENTATIONS:
    for tail in kdjax.TAILS:
      value, grad = jax.value_and_grad(lambda x, t=tail, i=implementation: (
          kdjax.sparse_distill_loss(x, bad_ids, logprobs, labels, tail=t,
                                    implementation=i)))(logits)
      assert np.isfinite(value) and np.all(grad[1] == 0) and np.all(np.isfinite(grad))
    hidden = np.array([[0.5, -1.0, 2.0], [np.nan, 1.0, 1.0]], np.float32)
    for vocab_block in (None, 3):
      grads = jax.grad(lambda h, w, v=vocab_block, i=implementation: (
          kdjax.fused_linear_distill_loss(h, w, h * 0 + 1, w, labels, vocab_block=v,
                                          implementation=i)), argnums=(0, 1))(
          hidden, np.ones((3, 7), np.float32) / 3)
      assert np.all(grads[0][1] == 0) and all(np.all(np.isfinite(g)) for g in grads)


def test_integer_where_equals_boolean_where():
  rng = np.random.default_rng(3)
  logits, teacher = (reference.random_logits(rng, (2, 5, 9)) for _ in range(2))
  mask = rng.random((2, 5)) < 0.6
  for ints in (mask.astype(np.int32), mask.astype(np.int8) * 3, mask.astype(np.uint8)):
    np.testing.assert_array_equal(kdjax.distill_loss(logits, teacher, where=ints),
                                  kdjax.distill_loss(logits, teacher, where=mask))
  with pytest.raises(TypeError, match="where must be a boolean or integer mask"):
    kdjax.distill_loss(logits, teacher, where=mask.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Properties over extreme inputs (hypothesis), against the float64 formula.
# ----------------------------------------------------------------------------------------------

_EXTREME = st.one_of(
    st.floats(-1e30, 1e30).map(np.float32),
    st.sampled_from([0.0, 1e30, -1e30, 88.0, -88.0, 1.0]).map(np.float32))


def _rows(vocab):
  return hnp.arrays(np.float32, (3, vocab), elements=_EXTREME)


@jax.jit
def _all_traced(logits, teacher, temperature):
  return {name: getattr(kdjax, name)(logits, teacher, temperature=temperature,
                                     **HYPER.get(name, {})) for name in ALL}


def _check_properties(values, logits, teacher, temperature):
  for name, got in values.items():
    got = np.asarray(got)
    assert np.all(np.isfinite(got)), (name, got)
    want = reference.per_token(name, logits, teacher, temperature=temperature,
                               **HYPER.get(name, {}))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, np.max(np.abs(want))),
                               err_msg=name)
    if name in ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl",
                "generalized_jsd", "total_variation"):
      assert np.all(got >= -1e-6 * max(1.0, np.max(np.abs(want)))), name
    if name == "generalized_jsd":
      assert np.all(got <= np.log(2) * (1 + 1e-6)), got
    if name == "total_variation":
      assert np.all(got <= 1 + 1e-6), got


@given(st.sampled_from([1, 2, 6]).flatmap(lambda v: st.tuples(_rows(v), _rows(v))),
       st.floats(1e-3, 1e3), st.booleans())
@settings(max_examples=40)
def test_extreme_logits_properties_traced_temperature(rows, temperature, ties):
  logits, teacher = rows
  if ties:  # repeated maxima in both rows
    logits[:, -1] = logits.max(axis=-1)
    teacher[:, 0] = teacher.max(axis=-1)
  temperature = float(np.float32(temperature))
  values = _all_traced(logits, teacher, jnp.float32(temperature))
  _check_properties(values, logits, teacher, temperature)


@given(_rows(4), _rows(4), st.sampled_from([1e-3, 0.7, 1.0, 3.3, 1e3]))
@settings(max_examples=10)
def test_extreme_logits_properties_static_temperature(logits, teacher, temperature):
  values = {name: getattr(kdjax, name)(logits, teacher, temperature=temperature,
                                       **HYPER.get(name, {})) for name in ALL}
  _check_properties(values, logits, teacher, temperature)
