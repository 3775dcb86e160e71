"""Tests for kdjax/_src/sampling.py: sampled (importance-sampling) sparse teachers.

The references are float64 NumPy softmaxes written from the definitions. The unbiasedness tests
are z-tests over many seeded draws, one per coordinate, with a Bonferroni-corrected threshold:
under the null (the estimator's mean is the reference) a run fails with probability at most
``FALSE_FAILURE`` (the normal approximation of a mean of 4000 bounded draws), and the seeds are
fixed, so the outcome is deterministic. A biased estimator of the same storage (top-k) fails
the same test.
"""

import statistics

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kdjax
from kdjax._src.sampling import sample_teacher
from kdjax._src.sparse import sparse_distill_loss, sparse_teacher_problem, topk_teacher

FALSE_FAILURE = 1e-4  # the probability that a correct estimator fails one z-test run
FLOAT32_SLACK = 1e-6  # float32 rounding of a deterministic coordinate against float64
NUM_DRAWS = 4000


def np_softmax(x):
  x = np.asarray(x, np.float64)
  shift = np.max(x, axis=-1, keepdims=True)
  exps = np.exp(x - np.where(np.isfinite(shift), shift, 0.0))
  return exps / exps.sum(-1, keepdims=True)


def z_threshold(num_tests, false_failure=FALSE_FAILURE):
  """Two-sided z threshold: each of ``num_tests`` coordinates at ``false_failure / num_tests``."""
  return statistics.NormalDist().inv_cdf(1 - false_failure / (2 * num_tests))


def z_test_failures(samples, expected, *, standard_error=None):
  """The coordinates whose mean over the draws (axis 0) is off ``expected`` beyond the
  Bonferroni threshold: ``|mean - expected| > z * se + FLOAT32_SLACK``."""
  samples = np.asarray(samples, np.float64).reshape(len(samples), -1)
  expected = np.asarray(expected, np.float64).reshape(-1)
  if standard_error is None:
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
  off = np.abs(samples.mean(axis=0) - expected)
  return np.flatnonzero(off > z_threshold(expected.size) * standard_error + FLOAT32_SLACK)


def _problem(seed=0, tokens=3, vocab=10):
  rng = np.random.default_rng(seed)
  teacher = (rng.normal(size=(tokens, vocab)) * 1.5).astype(np.float32)
  teacher[:, -1] = -np.inf  # a padded vocabulary entry: no mass, never drawn
  student = rng.normal(size=(tokens, vocab)).astype(np.float32)
  return teacher, student


def _draws(teacher, num_samples, temperature, num_draws=NUM_DRAWS, seed=1234, **kwargs):
  keys = jax.random.split(jax.random.key(seed), num_draws)
  return jax.jit(jax.vmap(lambda key: sample_teacher(
      key, teacher, num_samples=num_samples, temperature=temperature, **kwargs)))(keys)


def _gradients(student, ids, logprobs, temperature, tail="zero"):
  """Per draw: d/d logits of the summed sparse forward KL, ``[draws, tokens, vocab]``."""
  grad = jax.grad(lambda x, i, lp: sparse_distill_loss(
      x, i, lp, tail=tail, temperature=temperature, reduction="sum"))
  return np.asarray(jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))(student, ids, logprobs))


def _dense_reference(teacher, student, temperature):
  """float64 gradient of the summed forward KL, ``(q - p) / T``, and the soft cross entropy."""
  p, q = np_softmax(teacher / temperature), np_softmax(student / temperature)
  with np.errstate(divide="ignore"):
    log_q = np.log(q)
  cross_entropy = -np.sum(np.where(p > 0, p * log_q, 0.0), axis=-1)
  return (q - p) / temperature, cross_entropy


# ----------------------------------------------------------------------------------------------
# Unbiasedness, and a biased estimator of the same storage that fails the same test
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled():
  teacher, student = _problem()
  temperature, num_samples = 1.5, 4
  ids, logprobs = _draws(teacher, num_samples, temperature)
  grads = _gradients(student, ids, logprobs, temperature)
  cross_entropy = np.asarray(jax.jit(jax.vmap(lambda i, lp: sparse_distill_loss(
      student, i, lp, divergence="soft_cross_entropy", tail="bucket", temperature=temperature,
      reduction="none")))(ids, logprobs))
  return dict(teacher=teacher, student=student, temperature=temperature,
              num_samples=num_samples, ids=ids, logprobs=logprobs, grads=grads,
              cross_entropy=cross_entropy)


def test_mean_gradient_and_cross_entropy_equal_the_dense_ones(sampled):
  grad_ref, ce_ref = _dense_reference(sampled["teacher"], sampled["student"],
                                      sampled["temperature"])
  samples = np.concatenate([sampled["grads"].reshape(NUM_DRAWS, -1),
                            sampled["cross_entropy"]], axis=1)
  expected = np.concatenate([grad_ref.reshape(-1), ce_ref])
  assert z_test_failures(samples, expected).size == 0
  # The estimates do vary between draws: the test is not passing on constants.
  assert sampled["grads"].std(axis=0).max() > 0.05


def test_forward_kl_value_is_biased_upwards_by_the_missing_entropy(sampled):
  # Documented: the forward KL's value adds sum w log w, whose mean exceeds sum p log p.
  p = np_softmax(sampled["teacher"] / sampled["temperature"])
  w = np.exp(np.asarray(sampled["logprobs"], np.float64))
  with np.errstate(divide="ignore", invalid="ignore"):
    neg_entropy = np.sum(np.where(w > 0, w * np.log(w), 0.0), axis=-1)
    true_neg_entropy = np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
  assert np.all(neg_entropy.mean(axis=0) > true_neg_entropy + 0.1)


@pytest.mark.parametrize("tail", ["zero", "bucket"])
def test_top_k_of_the_same_storage_fails_the_same_test(sampled, tail):
  teacher, student, temperature = sampled["teacher"], sampled["student"], sampled["temperature"]
  grad_ref, _ = _dense_reference(teacher, student, temperature)
  ids, logprobs = topk_teacher(teacher, sampled["num_samples"], temperature=temperature)
  top_k = _gradients(student, ids[None], logprobs[None], temperature, tail=tail)
  # Judged with the sampled estimator's own standard errors: top-k is off beyond them.
  standard_error = sampled["grads"].std(axis=0, ddof=1).reshape(-1) / np.sqrt(NUM_DRAWS)
  assert z_test_failures(top_k, grad_ref, standard_error=standard_error).size > 0


def test_the_z_test_rejects_a_sampled_teacher_of_the_wrong_temperature(sampled):
  grad_ref, _ = _dense_reference(sampled["teacher"], sampled["student"],
                                 2 * sampled["temperature"])
  assert z_test_failures(sampled["grads"], grad_ref).size > 0


def test_another_proposal_draws_from_it_and_weights_by_p_over_r():
  teacher, _ = _problem(seed=3, tokens=2, vocab=8)
  temperature, proposal, num_samples, num_draws = 1.0, 3.0, 8, 2000
  ids, logprobs = _draws(teacher, num_samples, temperature, num_draws=num_draws,
                         proposal_temperature=proposal)
  ids, w = np.asarray(ids), np.exp(np.asarray(logprobs, np.float64))
  p, r = np_softmax(teacher / temperature), np_softmax(teacher / proposal)
  # w_v is proportional to c_v p_v / r_v: c_v = N (w r / p) / sum(w r / p) are whole counts.
  p_at, r_at = np.take_along_axis(p[None], ids, -1), np.take_along_axis(r[None], ids, -1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(w > 0, w * r_at / p_at, 0.0)
  counts = num_samples * ratio / ratio.sum(-1, keepdims=True)
  np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
  np.testing.assert_allclose(counts.sum(-1), num_samples, atol=1e-4)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  # The counts of each vocabulary entry have mean N r_v: the draws come from the proposal.
  dense_counts = np.zeros((num_draws,) + teacher.shape)
  np.put_along_axis(dense_counts, ids, np.round(counts), axis=-1)
  assert z_test_failures(dense_counts[..., :-1], num_samples * r[..., :-1]).size == 0
  assert np.all(dense_counts[..., -1] == 0)
  # And not from the teacher, whose expected counts the test rejects.
  assert z_test_failures(dense_counts[..., :-1], num_samples * p[..., :-1]).size > 0


# ----------------------------------------------------------------------------------------------
# What the rows look like: frequencies, distinct ids, padding, -inf logits, the cache's checks
# ----------------------------------------------------------------------------------------------


def test_weights_are_draw_frequencies_at_distinct_ids(sampled):
  ids, w = np.asarray(sampled["ids"]), np.exp(np.asarray(sampled["logprobs"], np.float64))
  num_samples = sampled["num_samples"]
  counts = w * num_samples
  np.testing.assert_allclose(counts, np.round(counts), atol=1e-5)
  np.testing.assert_array_equal(np.round(counts).sum(-1), num_samples)
  sorted_ids = np.sort(ids, axis=-1)
  assert np.all(sorted_ids[..., 1:] != sorted_ids[..., :-1])  # distinct per token
  logprobs = np.asarray(sampled["logprobs"])
  assert np.all(logprobs[..., :-1] >= logprobs[..., 1:])  # descending
  # The padding slots (repeated draws) hold the smallest ids not drawn.
  for row_ids, row_w in zip(ids.reshape(-1, num_samples)[:50], w.reshape(-1, num_samples)[:50],
                            strict=True):
    drawn = set(row_ids[row_w > 0].tolist())
    padding = row_ids[row_w == 0].tolist()
    assert padding == [i for i in range(num_samples) if i not in drawn][:len(padding)]


def test_minus_inf_logits_are_never_drawn():
  rng = np.random.default_rng(5)
  teacher = np.full((4, 50), -np.inf, np.float32)
  for row in range(3):
    allowed = rng.choice(50, 5, replace=False)
    teacher[row, allowed] = rng.normal(size=5) * 4  # 5 entries with mass per token
  # Row 3 is all -inf: an empty teacher.
  for proposal in (None, 0.5):  # a colder proposal: tail entries underflow, none is -inf
    ids, logprobs = _draws(teacher, 16, 1.0, num_draws=300, proposal_temperature=proposal)
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    drawn = np.isfinite(logprobs)
    assert np.all(np.isfinite(np.take_along_axis(teacher[None], ids, -1))[drawn])
    assert not drawn[:, 3].any() and np.all(logprobs[:, 3] == -np.inf)
    assert np.all((ids >= 0) & (ids < 50))
    sorted_ids = np.sort(ids, axis=-1)
    assert np.all(sorted_ids[..., 1:] != sorted_ids[..., :-1])
    np.testing.assert_allclose(np.exp(logprobs[:, :3].astype(np.float64)).sum(-1), 1.0,
                               atol=1e-5)


def test_nan_logits_give_nan_which_the_cache_refuses(tmp_path):
  teacher = np.zeros((2, 6), np.float32)
  teacher[1, 2] = np.nan
  ids, logprobs = sample_teacher(jax.random.key(0), teacher, num_samples=3)
  assert np.all(np.isnan(logprobs[1])) and not np.isnan(logprobs[0]).any()
  with pytest.raises(ValueError, match="logprobs must be finite or -inf"):
    kdjax.write_teacher_cache(tmp_path, [(ids, logprobs)], vocab_size=6, temperature=1.0)


@pytest.mark.parametrize("logprob_dtype, storage", [
    ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_rows_pass_the_cache_checks_and_read_back(tmp_path, logprob_dtype, storage):
  rng = np.random.default_rng(6)
  teacher = (rng.normal(size=(2, 5, 40)) * 3).astype(np.float32)
  teacher[..., 30:] = -np.inf
  batches = [sample_teacher(jax.random.key(i), teacher, num_samples=12, temperature=2.0,
                            proposal_temperature=None if i else 4.0) for i in range(3)]
  for ids, logprobs in batches:
    assert sparse_teacher_problem(np.asarray(ids), np.asarray(logprobs)) is None
  kdjax.write_teacher_cache(tmp_path, batches, vocab_size=40, temperature=2.0,
                            logprob_dtype=logprob_dtype)
  read = list(kdjax.read_teacher_cache(tmp_path, batch_shape=(2, 5)))
  assert len(read) == 3
  for (ids, logprobs), (got_ids, got_logprobs) in zip(batches, read, strict=True):
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_logprobs, np.asarray(logprobs).astype(storage))
    # What is read back is a concrete teacher the loss checks and accepts.
    kdjax.sparse_distill_loss(jnp.zeros((2, 5, 40)), got_ids, got_logprobs, tail="zero",
                              temperature=2.0)


# ----------------------------------------------------------------------------------------------
# Keys, jit, vmap, blocks, dtypes and arguments
# ----------------------------------------------------------------------------------------------


def test_same_key_same_teacher_under_jit_vmap_and_any_token_block():
  teacher, _ = _problem(seed=7, tokens=7, vocab=20)
  key = jax.random.key(3)
  eager = sample_teacher(key, teacher, num_samples=6, temperature=1.3)
  jitted = jax.jit(sample_teacher, static_argnames="num_samples")(
      key, teacher, num_samples=6, temperature=jnp.float32(1.3))
  blocked = sample_teacher(key, teacher, num_samples=6, temperature=1.3, token_block=3)
  for a, b in zip(eager, blocked, strict=True):  # 7 tokens: blocks of 3, 3 and 1
    np.testing.assert_array_equal(a, b)
  for a, b in zip(eager, jitted, strict=True):
    np.testing.assert_array_equal(a, b)
  # A raw uint32 key is the same key.
  raw = sample_teacher(jax.random.key_data(key), teacher, num_samples=6, temperature=1.3)
  np.testing.assert_array_equal(raw[0], eager[0])
  keys = jax.random.split(key, 3)
  batched = jax.vmap(lambda k: sample_teacher(k, teacher, num_samples=6, temperature=1.3))(keys)
  for i in range(3):
    single = sample_teacher(keys[i], teacher, num_samples=6, temperature=1.3)
    np.testing.assert_array_equal(batched[0][i], single[0])
    np.testing.assert_array_equal(batched[1][i], single[1])
  other = sample_teacher(jax.random.key(4), teacher, num_samples=6, temperature=1.3)
  assert not np.array_equal(other[0], eager[0])
  # vmap over teachers with one key, and a leading batch shape.
  stacked = jax.vmap(lambda t: sample_teacher(key, t, num_samples=6))(np.stack([teacher] * 2))
  np.testing.assert_array_equal(stacked[0][0], stacked[0][1])
  assert stacked[0].shape == stacked[1].shape == (2, 7, 6)
  assert stacked[0].dtype == jnp.int32 and stacked[1].dtype == jnp.float32


def test_bfloat16_logits_and_no_gradient():
  teacher, _ = _problem(seed=8)
  bf16 = jnp.asarray(teacher, jnp.bfloat16)
  ids, logprobs = sample_teacher(jax.random.key(0), bf16, num_samples=5)
  reference = sample_teacher(jax.random.key(0), np.asarray(bf16, np.float32), num_samples=5)
  np.testing.assert_array_equal(ids, reference[0])
  np.testing.assert_array_equal(logprobs, reference[1])
  grad = jax.grad(lambda t: jnp.sum(jnp.where(
      jnp.isfinite(sample_teacher(jax.random.key(0), t, num_samples=5)[1]), 1.0, 0.0)))(
          jnp.asarray(teacher))
  np.testing.assert_array_equal(grad, np.zeros_like(teacher))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_samples=0), ValueError, "num_samples must be a positive integer"),
    (dict(num_samples=2.0), ValueError, "num_samples must be a positive integer"),
    (dict(num_samples=11), ValueError, r"num_samples must be <= the vocabulary size "
     r"teacher_logits.shape\[-1\] = 10"),
    (dict(num_samples=3, temperature=0.0), ValueError, "temperature must be a finite number"),
    (dict(num_samples=3, proposal_temperature=-1.0), ValueError,
     "proposal_temperature must be a finite number"),
    (dict(num_samples=3, proposal_temperature=float("nan")), ValueError,
     "proposal_temperature must be"),
    (dict(num_samples=3, proposal_temperature="2"), TypeError, "proposal_temperature must be"),
    (dict(num_samples=3, token_block=0), ValueError, "token_block must be a positive integer"),
])
def test_bad_arguments_name_themselves(kwargs, error, pattern):
  with pytest.raises(error, match=pattern):
    sample_teacher(jax.random.key(0), np.zeros((2, 10), np.float32), **kwargs)


def test_bad_keys_and_logits_name_themselves():
  logits = np.zeros((2, 10), np.float32)
  with pytest.raises(TypeError, match=r"key must be a JAX PRNG key .* got 0\. For a seed, pass "
                     r"jax.random.key\(0\)"):
    sample_teacher(0, logits, num_samples=3)
  with pytest.raises(TypeError, match="key must be a JAX PRNG key.*dtype float32"):
    sample_teacher(np.zeros(2, np.float32), logits, num_samples=3)
  with pytest.raises(ValueError, match=r"key must be a single PRNG key .* shape \(2,\)"):
    sample_teacher(jax.random.split(jax.random.key(0)), logits, num_samples=3)
  with pytest.raises(TypeError, match="teacher_logits must be a floating-point array"):
    sample_teacher(jax.random.key(0), np.zeros((2, 10), np.int32), num_samples=3)
  with pytest.raises(ValueError, match="teacher_logits has an empty vocabulary"):
    sample_teacher(jax.random.key(0), np.zeros((2, 0), np.float32), num_samples=3)
  with pytest.raises(TypeError, match="num_samples must be a static argument"):
    jax.jit(lambda n: sample_teacher(jax.random.key(0), logits, num_samples=n))(3)
  assert kdjax.sample_teacher is sample_teacher
