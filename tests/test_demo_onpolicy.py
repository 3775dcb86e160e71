"""The demo's on-policy student (``examples/_lm.py``): the sampler, the mask of generated
positions, the objective on them, the schedule of on-policy batches, and the train step."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _cli  # noqa: E402
import _lm  # noqa: E402

apply = jax.jit(_lm.apply, static_argnums=0)


def _model(seed=0, vocab=256, dim=16, max_len=12):
  return _lm.build(_lm.ModelConfig(layers=1, dim=dim, heads=1, max_len=max_len, vocab=vocab),
                   seed)


def _prompts(batch=3, prompt_len=5, vocab=256, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len)).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------


def test_sampler_shape_ids_prompt_and_determinism():
  graphdef, params = _model()
  prompts = _prompts()
  key = jax.random.key(3)
  samples = _lm.sample_continuation(graphdef, params, prompts, key, length=7, temperature=1.0)
  assert samples.shape == (3, 12) and samples.dtype == jnp.int32
  samples = np.asarray(samples)
  assert samples.min() >= 0 and samples.max() < 256
  np.testing.assert_array_equal(samples[:, :5], prompts)
  again = _lm.sample_continuation(graphdef, params, prompts, key, length=7, temperature=1.0)
  np.testing.assert_array_equal(samples, again)
  other = _lm.sample_continuation(graphdef, params, prompts, jax.random.key(4), length=7,
                                  temperature=1.0)
  assert not np.array_equal(samples[:, 5:], np.asarray(other)[:, 5:])


def test_sampler_at_low_temperature_is_greedy_decoding_with_full_recompute():
  # Reference: a host loop that reruns the model on each prefix and takes the argmax.
  graphdef, params = _model(seed=1)
  prompts = _prompts(seed=1)
  samples = np.asarray(_lm.sample_continuation(
      graphdef, params, prompts, jax.random.key(0), length=7, temperature=1e-4))
  # Fixed-size windows (one compilation); positions past t do not affect the logits at t.
  tokens = np.concatenate([prompts, np.zeros((3, 7), np.int32)], axis=1)
  for position in range(5, 12):
    logits = np.asarray(apply(graphdef, params, tokens))
    tokens[:, position] = logits[:, position - 1].argmax(-1)
  np.testing.assert_array_equal(samples, tokens)


def test_sampler_at_the_smallest_accepted_temperature_is_greedy_decoding():
  # The smallest temperature the demo's flags accept is about 1 / float32 max: dividing logits
  # by it overflows (and its float32 value is subnormal, flushed to 0 on CPU). The sampler must
  # still pick the argmax, as a host loop of greedy decoding does.
  smallest = 3e-39
  assert _cli.temperature(repr(smallest)) == smallest
  graphdef, params = _model(seed=4)
  # A sharper head as well: logits of tens, which 1 / 1e-37 takes past float32 max.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 40 * x if "head" in jax.tree_util.keystr(path) else x, params)
  prompts = _prompts(seed=4)
  tokens = np.concatenate([prompts, np.zeros((3, 7), np.int32)], axis=1)
  for position in range(5, 12):
    logits = np.asarray(apply(graphdef, params, tokens))
    assert np.abs(logits[:, position - 1]).max() > 10
    tokens[:, position] = logits[:, position - 1].argmax(-1)
  for temperature in (smallest, 1e-37, 1e-30):
    samples = np.asarray(_lm.sample_continuation(
        graphdef, params, prompts, jax.random.key(0), length=7, temperature=temperature))
    np.testing.assert_array_equal(samples, tokens, err_msg=f"temperature {temperature}")


def test_sampler_draws_from_the_softmax_at_the_temperature():
  graphdef, params = _model(seed=2, vocab=8)
  # A sharper head, so that temperature 1 and 2 give clearly different distributions.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: 3 * x if "head" in jax.tree_util.keystr(path) else x, params)
  prompt = _prompts(batch=1, prompt_len=4, vocab=8, seed=2)
  draws = 20_000
  samples = np.asarray(_lm.sample_continuation(
      graphdef, params, np.repeat(prompt, draws, axis=0), jax.random.key(1), length=1,
      temperature=2.0))[:, -1]
  frequencies = np.bincount(samples, minlength=8) / draws
  logits = np.asarray(apply(graphdef, params, prompt), np.float64)[0, -1]

  def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()

  at_two, at_one = softmax(logits / 2.0), softmax(logits)
  assert 0.5 * np.abs(at_two - at_one).sum() > 0.1  # the test can tell them apart
  # Standard error of a frequency is at most 0.0036 at 20,000 draws.
  np.testing.assert_allclose(frequencies, at_two, atol=0.015)


def test_sampler_compiles_once_per_shape():
  graphdef, params = _model(seed=3)
  before = _lm.sample_continuation._cache_size()
  for seed in range(3):
    _lm.sample_continuation(graphdef, params, _prompts(seed=seed), jax.random.key(seed),
                            length=6, temperature=0.7 + seed)
  assert _lm.sample_continuation._cache_size() == before + 1


# ----------------------------------------------------------------------------------------------
# The mask, the objective and the schedule.
# ----------------------------------------------------------------------------------------------


def test_continuation_mask_covers_exactly_the_generated_positions():
  graphdef, params = _model()
  prompt_len, length = 5, 7
  samples = np.asarray(_lm.sample_continuation(
      graphdef, params, _prompts(prompt_len=prompt_len), jax.random.key(0), length=length,
      temperature=1.0))
  mask = _lm.continuation_mask(samples.shape[1], prompt_len)
  assert mask.shape == (12,) and mask.dtype == bool and mask.sum() == length
  # Position t is counted exactly when the token it predicts, t + 1, was generated.
  predicted = np.arange(12) + 1
  np.testing.assert_array_equal(mask, (predicted >= prompt_len) & (predicted < 12))
  np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(prompt_len - 1, 11))


def _reference_divergence(logits, teacher_logits, *, divergence, beta, temperature):
  """float64 NumPy per-token reverse KL or TRL's generalized JSD."""

  def log_softmax(x):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(teacher_logits), log_softmax(logits)
  p, q = np.exp(log_p), np.exp(log_q)
  if divergence == "reverse_kl":
    return (q * (log_q - log_p)).sum(-1)
  log_m = np.log(beta * p + (1 - beta) * q)
  return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


@pytest.mark.parametrize("divergence, beta", [("generalized_jsd", 0.5), ("generalized_jsd", 0.9),
                                              ("reverse_kl", 0.5)])
def test_on_policy_objective_is_the_divergence_on_generated_positions_only(divergence, beta):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 9, 13)).astype(np.float32)
  teacher_logits = (2 * rng.normal(size=(2, 9, 13))).astype(np.float32)
  prompt_len, hp = 4, dict(divergence=divergence, beta=beta, temperature=1.5)

  def objective(x):
    return _lm.on_policy_objective(x, teacher_logits, prompt_len, **hp)

  value, grad = jax.jit(jax.value_and_grad(objective))(logits)
  per_token = _reference_divergence(logits, teacher_logits, **hp)
  want = per_token[:, prompt_len - 1:-1].mean()  # the generated positions, 3 .. 7
  np.testing.assert_allclose(value, want, rtol=1e-5)
  grad = np.asarray(grad)
  assert np.all(grad[:, :prompt_len - 1] == 0) and np.all(grad[:, -1] == 0)
  assert np.all(np.abs(grad[:, prompt_len - 1:-1]).sum(-1) > 0)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.3, 0.5, 2 / 3, 1.0])
def test_schedule_spreads_the_on_policy_batches_evenly(fraction):
  steps = 60
  chosen = [step for step in range(steps) if _lm.is_on_policy_step(step, fraction)]
  assert len(chosen) == round(steps * fraction)
  if 0 < fraction < 1:
    gaps = np.diff(chosen)
    assert gaps.max() - gaps.min() <= 1
  assert [s for s in range(8) if _lm.is_on_policy_step(s, 0.5)] == [1, 3, 5, 7]


def test_sampling_keys_depend_only_on_seed_step_and_stream():
  def same(a, b):
    return np.array_equal(jax.random.key_data(a), jax.random.key_data(b))

  assert same(_lm.sampling_key(0, 5), _lm.sampling_key(0, 5))
  assert not same(_lm.sampling_key(0, 5), _lm.sampling_key(0, 6))
  assert not same(_lm.sampling_key(0, 5), _lm.sampling_key(1, 5))
  assert not same(_lm.sampling_key(0, 5), _lm.sampling_key(0, 5, stream="eval"))


# ----------------------------------------------------------------------------------------------
# The train step and the evaluation.
# ----------------------------------------------------------------------------------------------


def test_on_policy_step_trains_on_the_students_own_samples():
  graphdef, params = _model(seed=0)
  teacher = _model(seed=1)  # same architecture: one compilation of apply for both
  optimizer = optax.sgd(0.1)
  hp = dict(divergence="generalized_jsd", beta=0.5, temperature=1.0)
  step = _lm.make_on_policy_step(graphdef, optimizer, teacher, sample_length=4,
                                 sample_temperature=0.8, **hp)
  tokens = _prompts(batch=2, prompt_len=12, seed=4)
  key = jax.random.key(7)
  new_params, _, loss, logs = step(params, optimizer.init(params), tokens, key)
  # The same loss by hand: the student continues the first 8 tokens with the same key, the
  # teacher scores that, and the objective counts the 4 generated positions.
  samples = _lm.sample_continuation(graphdef, params, tokens[:, :8], key, length=4,
                                    temperature=0.8)
  want = jax.jit(lambda student_logits, teacher_logits: _lm.on_policy_objective(
      student_logits, teacher_logits, 8, **hp))(apply(graphdef, params, samples),
                                                apply(*teacher, samples))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(
      logs["ce"], jax.jit(_lm.cross_entropy)(apply(graphdef, params, tokens), tokens),
      rtol=1e-6)
  # The objective's metrics, on the generated positions: its divergence is the loss.
  assert set(logs) == {"ce", "kd", "student_entropy", "teacher_entropy", "top1_agreement"}
  np.testing.assert_allclose(logs["kd"], loss, rtol=1e-6)
  assert 0 <= logs["top1_agreement"] <= 1 and logs["student_entropy"] > 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_params, params)
  assert any(jax.tree.leaves(changed))
  # Deterministic given the key.
  again, _, _, _ = step(params, optimizer.init(params), tokens, key)
  jax.tree.map(np.testing.assert_array_equal, again, new_params)


def test_sample_score_is_the_teachers_mean_log_likelihood_of_the_generated_bytes():
  graphdef, params = _model(seed=0)
  teacher = _model(seed=1)  # same architecture: one compilation of apply for both
  batches = [_prompts(batch=3, prompt_len=12, seed=5), _prompts(batch=3, prompt_len=12, seed=6)]
  score = _lm.make_sample_score(teacher, batches, sample_length=4, temperature=1.0, seed=2)
  per_sequence = []
  for index, batch in enumerate(batches):
    samples = np.asarray(_lm.sample_continuation(
        graphdef, params, batch[:, :8], _lm.sampling_key(2, index, stream="eval"), length=4,
        temperature=1.0))
    logits = np.asarray(apply(*teacher, samples), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    # The positions 7 .. 10 predict the generated bytes 8 .. 11.
    for row in range(len(batch)):
      per_sequence.append(np.mean([log_p[row, t, samples[row, t + 1]] for t in range(7, 11)]))
  mean, standard_error = score(graphdef, params)
  np.testing.assert_allclose(mean, np.mean(per_sequence), rtol=1e-5)
  np.testing.assert_allclose(standard_error, np.std(per_sequence, ddof=1) / np.sqrt(6),
                             rtol=1e-4)
