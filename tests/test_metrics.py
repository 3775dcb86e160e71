"""Tests for the metrics forms of the losses (kdjax/_src/metrics.py and the ``*_with_metrics``
functions of losses.py, fused.py and sparse.py).

References: entropies and top-1 agreement written here in float64 NumPy from their definitions
(``0 log 0 = 0``, ties to the lowest id, no agreement on a row without mass), the divergences
of ``tests/reference.py``, and the plain losses for "the same value and gradient".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import kdjax
from kdjax._src import config as config_lib
from kdjax._src import pallas, recipe
from tests import reference

VOCAB = 13
TEMPERATURE = 2.0


def _np_log_softmax(x, temperature):
  return reference.log_softmax(np.asarray(x, np.float64) / temperature)


def _np_entropy(log_p):
  p = np.exp(log_p)
  with np.errstate(invalid="ignore"):
    return -np.sum(np.where(p > 0, p * log_p, 0.0), axis=-1)


def _np_top1(student, teacher):
  student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  has_mass = np.any(student > -np.inf, -1) & np.any(teacher > -np.inf, -1)
  return np.where(has_mass, np.argmax(student, -1) == np.argmax(teacher, -1), 0.0)


def _np_metrics(student, teacher, *, temperature, divergence="forward_kl"):
  """Per-token float64 divergence, student entropy, teacher entropy, top-1 agreement."""
  return dict(
      divergence=reference.per_token(divergence, student, teacher, temperature=temperature),
      student_entropy=_np_entropy(_np_log_softmax(student, temperature)),
      teacher_entropy=_np_entropy(_np_log_softmax(teacher, temperature)),
      top1_agreement=_np_top1(student, teacher))


NAMES = ("divergence", "student_entropy", "teacher_entropy", "top1_agreement")


def _check(metrics, expected, mask, weights=None, *, rtol=1e-5, atol=1e-6):
  """``metrics`` (mean reduction) against the float64 per-token ``expected``."""
  weights = np.ones(mask.shape) if weights is None else np.asarray(weights, np.float64)
  for name in NAMES:
    per_token = np.where(mask, expected[name], 0.0)
    np.testing.assert_allclose(getattr(metrics.per_token, name), per_token, rtol=rtol,
                               atol=atol, err_msg=name)
    mean = np.sum(weights * per_token) / max(mask.sum(), 1)
    np.testing.assert_allclose(getattr(metrics, name), mean, rtol=rtol, atol=atol,
                               err_msg=name)
  np.testing.assert_array_equal(metrics.per_token.counted, mask)
  assert float(metrics.token_count) == mask.sum()


def _logits(seed=0, shape=(2, 5)):
  """Student and teacher logits ``shape + (VOCAB,)`` with -inf entries, a row of -inf on each
  side, and ties for the top-1 id."""
  rng = np.random.default_rng(seed)
  student = rng.normal(size=shape + (VOCAB,)) * 2
  teacher = rng.normal(size=shape + (VOCAB,)) * 2
  student[0, 0, [1, 4]] = -np.inf
  teacher[0, 1, [0, 4, 7]] = -np.inf
  teacher[0, 2] = -np.inf  # a teacher row without mass
  student[1, 0] = -np.inf  # a student row without mass
  # Ties: the student's largest logit at ids 3 and 8; the teacher's at 3, then at 8.
  student[1, 1] = student[1, 2] = np.where(np.arange(VOCAB) % 5 == 3, 9.0, 0.0)
  teacher[1, 1] = np.where(np.arange(VOCAB) == 3, 5.0, 0.0)
  teacher[1, 2] = np.where(np.arange(VOCAB) == 8, 5.0, 0.0)
  return student.astype(np.float32), teacher.astype(np.float32)


def test_ties_and_empty_rows_of_the_reference_are_what_the_tests_assume():
  student, teacher = _logits()
  top1 = _np_top1(student, teacher)
  assert top1[1, 1] == 1 and top1[1, 2] == 0  # the lowest of the tied ids
  assert top1[0, 2] == 0 and top1[1, 0] == 0  # no mass on one side: no agreement
  assert _np_entropy(_np_log_softmax(teacher, 1.0))[0, 2] == 0


@pytest.mark.parametrize("implementation", ["blocked", "reference"])
def test_dense_metrics_match_numpy(implementation):
  student, teacher = _logits()
  labels = np.arange(10).reshape(2, 5) % VOCAB
  labels[0, 3] = labels[1, 4] = -100
  mask = labels != -100
  weights = np.linspace(0.5, 2.0, 10).reshape(2, 5)
  kwargs = dict(temperature=TEMPERATURE, token_weights=weights, token_block=3,
                implementation=implementation)
  loss, metrics = kdjax.distill_loss_with_metrics(student, teacher, labels, **kwargs)
  _check(metrics, _np_metrics(student, teacher, temperature=TEMPERATURE), mask, weights)
  assert metrics.cross_entropy is None and metrics.per_token.cross_entropy is None
  # The loss is the plain function's, bit for bit.
  assert float(loss) == float(kdjax.distill_loss(student, teacher, labels, **kwargs))


def test_nan_logit_makes_its_side_and_the_agreement_nan():
  student, teacher = _logits()
  student[0, 1, 2] = np.nan
  teacher[1, 3, 0] = np.inf
  _, metrics = kdjax.distill_loss_with_metrics(student, teacher)
  tokens = metrics.per_token
  assert np.isnan(tokens.student_entropy[0, 1]) and np.isfinite(tokens.teacher_entropy[0, 1])
  assert np.isnan(tokens.teacher_entropy[1, 3]) and np.isfinite(tokens.student_entropy[1, 3])
  assert np.isnan(tokens.top1_agreement[0, 1]) and np.isnan(tokens.top1_agreement[1, 3])
  assert np.isfinite(tokens.top1_agreement[0, 0])


def test_reductions_and_the_sum_and_count_form():
  student, teacher = _logits(1)
  where = np.ones((2, 5), bool)
  where[0, 4] = where[1, :] = False
  where[1, 2] = True
  expected = _np_metrics(student, teacher, temperature=1.0)
  total, metrics = kdjax.distill_loss_with_metrics(student, teacher, where=where,
                                                   reduction="sum")
  assert (float(total), float(metrics.token_count)) == tuple(
      float(x) for x in kdjax.distill_loss_sum_and_count(student, teacher, where=where))
  for name in NAMES:
    np.testing.assert_allclose(getattr(metrics, name),
                               reference.reduce(expected[name], where, "sum"), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  _, per_token = kdjax.distill_loss_with_metrics(student, teacher, where=where,
                                                 reduction="none")
  _, sequences = kdjax.distill_loss_with_metrics(student, teacher, where=where,
                                                 reduction="sequence_mean")
  for name in NAMES:
    np.testing.assert_allclose(getattr(per_token, name), np.where(where, expected[name], 0.0),
                               rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(getattr(sequences, name),
                               reference.reduce(expected[name], where, "sequence_mean"),
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_combined_objective_metrics_are_its_components():
  student, teacher = _logits(2)
  labels = np.arange(10).reshape(2, 5) % VOCAB
  labels[1, 0] = labels[0, 1] = -100  # [1, 0]: the student row without mass
  mask = labels != -100
  kwargs = dict(kd_coef=0.3, divergence="generalized_jsd", beta=0.4, temperature=TEMPERATURE)
  loss, metrics = kdjax.distill_with_cross_entropy_with_metrics(student, teacher, labels,
                                                                **kwargs)
  plain, (cross_entropy, distill) = kdjax.distill_with_cross_entropy(
      student, teacher, labels, return_components=True, **kwargs)
  assert float(loss) == float(plain)
  assert float(metrics.cross_entropy) == float(cross_entropy)
  assert float(metrics.divergence) == float(distill)
  expected = _np_metrics(student, teacher, temperature=TEMPERATURE)
  expected["divergence"] = reference.per_token("generalized_jsd", student, teacher,
                                               temperature=TEMPERATURE, beta=0.4)
  _check(metrics, expected, mask)
  log_q = _np_log_softmax(student, 1.0)
  hard = -np.take_along_axis(log_q, np.where(mask, labels, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(metrics.per_token.cross_entropy, np.where(mask, hard, 0.0),
                             rtol=1e-5)
  total, summed = kdjax.distill_with_cross_entropy_with_metrics(student, teacher, labels,
                                                                reduction="sum", **kwargs)
  assert (float(total), float(summed.token_count)) == tuple(
      float(x) for x in kdjax.distill_with_cross_entropy_sum_and_count(
          student, teacher, labels, **kwargs))


def _fused_inputs(seed=0, vocab=37):
  rng = np.random.default_rng(seed)
  inputs = dict(student_hidden=rng.normal(size=(2, 5, 8)),
                student_kernel=rng.normal(size=(8, vocab)) * 0.7,
                teacher_hidden=rng.normal(size=(2, 5, 12)),
                teacher_kernel=rng.normal(size=(12, vocab)) * 0.7)
  inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
  bias = np.zeros(vocab, np.float32)
  bias[[5, 30]] = -np.inf  # padded entries of the teacher's vocabulary
  return inputs, bias


@pytest.mark.parametrize("vocab_block", [None, 16])  # 16: tiles of 16, 16 and 5 entries
def test_fused_metrics_match_numpy(vocab_block):
  inputs, teacher_bias = _fused_inputs()
  labels = np.arange(10).reshape(2, 5)
  labels[0, 2] = -100
  mask = labels != -100
  student = (inputs["student_hidden"].astype(np.float64)
             @ inputs["student_kernel"].astype(np.float64))
  softcap = 3.0
  teacher = inputs["teacher_hidden"].astype(np.float64) @ inputs["teacher_kernel"]
  teacher = softcap * np.tanh(teacher / softcap) + teacher_bias
  kwargs = dict(teacher_bias=teacher_bias, softcap=(None, softcap), temperature=TEMPERATURE,
                token_block=4, vocab_block=vocab_block)
  loss, metrics = kdjax.fused_linear_distill_loss_with_metrics(*inputs.values(), labels,
                                                               **kwargs)
  _check(metrics, _np_metrics(student, teacher, temperature=TEMPERATURE), mask,
         rtol=2e-5, atol=2e-6)
  assert float(loss) == float(kdjax.fused_linear_distill_loss(*inputs.values(), labels,
                                                              **kwargs))
  if vocab_block is None:
    return
  _, with_ce = kdjax.fused_linear_distill_with_cross_entropy_with_metrics(
      *inputs.values(), labels, kd_coef=0.5, **kwargs)
  hard = -np.take_along_axis(_np_log_softmax(student, 1.0), np.where(mask, labels, 0)[..., None],
                             -1)[..., 0]
  np.testing.assert_allclose(with_ce.per_token.cross_entropy, np.where(mask, hard, 0.0),
                             rtol=2e-5)


def test_fused_top1_ties_across_vocabulary_tiles():
  """Logits equal to the biases (zero kernels): the student's largest at ids 3 and 20, in two
  tiles of 16; the teacher's at 3, then at 20."""
  vocab = 37
  hidden, kernel = jnp.ones((2, 4)), jnp.zeros((4, vocab))
  student_bias = jnp.zeros(vocab).at[jnp.array([3, 20])].set(4.0)
  teacher_bias = jnp.zeros((vocab,))
  top = []
  for teacher_id in (3, 20):
    _, metrics = kdjax.fused_linear_distill_loss_with_metrics(
        hidden[:1], kernel, hidden[:1], kernel, student_bias=student_bias,
        teacher_bias=teacher_bias.at[teacher_id].set(4.0), vocab_block=16)
    top.append(float(metrics.top1_agreement))
  assert top == [1.0, 0.0]


@pytest.mark.parametrize("tail", ["bucket", "zero", "renormalize"])
def test_sparse_metrics_match_numpy(tail):
  rng = np.random.default_rng(3)
  student = (rng.normal(size=(6, VOCAB)) * 2).astype(np.float32)
  student[1, [2, 6]] = -np.inf
  teacher = rng.normal(size=(6, VOCAB)) * 2
  teacher[4, 2] = teacher[4, 9] = teacher[4].max() + 1  # a teacher tie: ids 2 and 9
  ids, logprobs = kdjax.topk_teacher(teacher.astype(np.float32), 4, temperature=TEMPERATURE)
  ids, logprobs = np.array(ids), np.array(logprobs)
  ids[4, :2] = ids[4, [1, 0]]  # the tie stored with the higher id first
  logprobs[2, 3] = -np.inf  # an entry without teacher mass
  logprobs[5] = -np.inf  # a teacher without mass
  labels = np.array([0, 1, 2, -100, 4, 5])
  mask = labels != -100
  loss, metrics = kdjax.sparse_distill_loss_with_metrics(
      student, ids, logprobs, labels, tail=tail, temperature=TEMPERATURE, token_block=4)
  assert float(loss) == float(kdjax.sparse_distill_loss(
      student, ids, logprobs, labels, tail=tail, temperature=TEMPERATURE, token_block=4))
  log_p = logprobs.astype(np.float64)
  if tail == "renormalize":
    log_p = reference.log_softmax(log_p)
  elif tail == "bucket":
    with np.errstate(divide="ignore"):
      rest = np.log(np.maximum(1 - np.exp(log_p).sum(-1, keepdims=True), 0.0))
    log_p = np.concatenate([log_p, np.where(np.all(log_p == -np.inf, -1, keepdims=True),
                                            -np.inf, rest)], -1)
  teacher_top = np.where(logprobs == logprobs.max(-1, keepdims=True), ids, VOCAB).min(-1)
  has_mass = np.any(logprobs > -np.inf, -1)
  expected = dict(
      student_entropy=_np_entropy(_np_log_softmax(student, TEMPERATURE)),
      teacher_entropy=_np_entropy(log_p),
      top1_agreement=np.where(has_mass, np.argmax(student, -1) == teacher_top, 0.0))
  assert teacher_top[4] == 2 and expected["top1_agreement"][5] == 0
  for name, values in expected.items():
    np.testing.assert_allclose(getattr(metrics.per_token, name), np.where(mask, values, 0.0),
                               rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(metrics.per_token.divergence, kdjax.sparse_distill_loss(
      student, ids, logprobs, labels, tail=tail, temperature=TEMPERATURE, reduction="none"))
  _, oracle = kdjax.sparse_distill_loss_with_metrics(
      student, ids, logprobs, labels, tail=tail, temperature=TEMPERATURE,
      implementation="reference")
  for name, values in expected.items():
    np.testing.assert_allclose(getattr(oracle.per_token, name), np.where(mask, values, 0.0),
                               rtol=1e-5, atol=1e-6, err_msg=name)


def _losses():
  """(plain loss, with-metrics loss, args) for each path, the first argument differentiated."""
  student, teacher = _logits(4)
  labels = np.arange(10).reshape(2, 5) % VOCAB
  labels[0, 0] = -100
  inputs, bias = _fused_inputs(1)
  ids, logprobs = kdjax.topk_teacher(teacher, 3)
  fused_args = (inputs["student_hidden"], inputs["student_kernel"], inputs["teacher_hidden"],
                inputs["teacher_kernel"], labels)
  return {
      "dense": (kdjax.distill_with_cross_entropy, kdjax.distill_with_cross_entropy_with_metrics,
                (student, teacher, labels), dict(temperature=TEMPERATURE)),
      "fused": (kdjax.fused_linear_distill_loss, kdjax.fused_linear_distill_loss_with_metrics,
                fused_args, dict(teacher_bias=bias, vocab_block=16)),
      "sparse": (kdjax.sparse_distill_loss, kdjax.sparse_distill_loss_with_metrics,
                 (student, ids, logprobs, labels), {}),
  }


@pytest.mark.parametrize("path, reduction", [
    ("dense", "mean"), ("dense", "none"), ("fused", "mean"), ("fused", "none"),
    ("sparse", "mean")])
def test_gradient_unchanged_and_metrics_carry_none(path, reduction):
  """The gradient of the loss plus every metric is the plain loss's gradient, bit for bit:
  the loss's is unchanged and the metrics add none (``reduction="none"``: the per-token
  backward)."""
  plain, with_metrics, args, kwargs = _losses()[path]
  kwargs = dict(kwargs, reduction=reduction)
  if path == "fused" and reduction == "none":  # the backward recomputes the logits: whole rows
    kwargs["vocab_block"] = None
  cotangent = np.linspace(-1.0, 1.0, 10).reshape(2, 5)

  def scalar(loss):
    return jnp.sum(loss * cotangent) if reduction == "none" else loss

  def loss_and_metrics(x):
    loss, metrics = with_metrics(x, *args[1:], **kwargs)
    return scalar(loss) + sum(jnp.sum(m) for m in jax.tree.leaves(metrics)
                              if m.dtype != jnp.bool_)

  expected = jax.grad(lambda x: scalar(plain(x, *args[1:], **kwargs)))(args[0])
  assert np.any(expected != 0)
  np.testing.assert_array_equal(jax.grad(loss_and_metrics)(args[0]), expected)


def test_bf16_jit_and_vmap():
  student, teacher = _logits(5)
  student, teacher = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  f = jax.jit(functools.partial(kdjax.distill_loss_with_metrics, temperature=TEMPERATURE))
  _, metrics = f(student, teacher)
  assert metrics.student_entropy.dtype == jnp.float32
  expected = _np_metrics(np.asarray(student, np.float64), np.asarray(teacher, np.float64),
                         temperature=TEMPERATURE)
  _check(metrics, expected, np.ones((2, 5), bool))
  batched_loss, batched = jax.vmap(f)(student, teacher)
  for i in range(2):
    loss_i, metrics_i = f(student[i], teacher[i])
    np.testing.assert_allclose(batched_loss[i], loss_i, rtol=1e-6)
    for name in NAMES:
      np.testing.assert_allclose(getattr(batched, name)[i], getattr(metrics_i, name),
                                 rtol=1e-6, atol=1e-7, err_msg=name)


def test_pallas_metrics_run_the_blocked_engine(monkeypatch):
  """``implementation="pallas"``: the loss runs the kernel; its metrics form the blocked engine
  (a kernel call here would raise)."""
  student, teacher = _logits(6)
  student, teacher = student[:, :4], teacher[:, :4]  # shapes no other test compiles

  def no_kernel(*args, **kwargs):
    raise AssertionError("a kernel ran")

  monkeypatch.setattr(pallas, "_call", no_kernel)
  with pytest.raises(AssertionError, match="a kernel ran"):  # the patch reaches the kernels
    kdjax.distill_loss(student, teacher, implementation="pallas")
  loss, metrics = kdjax.distill_loss_with_metrics(student, teacher, implementation="pallas")
  blocked, blocked_metrics = kdjax.distill_loss_with_metrics(student, teacher,
                                                             implementation="blocked")
  assert float(loss) == float(blocked)
  assert float(metrics.student_entropy) == float(blocked_metrics.student_entropy)


def test_top1_over_a_vocabulary_split_over_a_mesh():
  """The recipe's top-1 id over vocabulary slices (``VocabReduce`` over a mesh axis): the
  lowest id of a tie across slices, as over the whole row."""
  devices = np.array(jax.devices()[:2])
  mesh = Mesh(devices, ("vocab",))
  config = config_lib.Config(static_hp=(("temperature", 1.0),), metrics=True,
                             axis_name="vocab")
  hp = config.hyperparameters_with({})
  rng = np.random.default_rng(7)
  student, teacher = (rng.normal(size=(4, 2 * VOCAB)).astype(np.float32) for _ in range(2))
  student[0, :] = 0.0
  student[0, [5, 20]] = 3.0  # a tie across the two slices of 13 entries
  teacher[0, :] = 0.0
  teacher[0, 5] = 1.0

  def sharded(x, t):
    rows, _ = recipe.block(config, hp, x, t, reduce=recipe.VocabReduce("vocab"),
                           with_grad=False)
    return rows

  rows = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P(None, "vocab"),) * 2,
                               out_specs=P()))(student, teacher)
  whole, _ = jax.jit(functools.partial(recipe.block, config._replace(axis_name=None), hp,
                                       with_grad=False))(student, teacher)
  np.testing.assert_array_equal(rows.top1_agreement, whole.top1_agreement)
  np.testing.assert_array_equal(rows.top1_agreement, _np_top1(student, teacher))
  np.testing.assert_allclose(rows.student_entropy, whole.student_entropy, rtol=1e-6)


def test_arguments_are_checked_as_in_the_plain_losses():
  student, teacher = _logits()
  with pytest.raises(ValueError, match="temperature"):
    kdjax.distill_loss_with_metrics(student, teacher, temperature=-1.0)
  with pytest.raises(ValueError, match="reduction"):
    kdjax.sparse_distill_loss_with_metrics(student, np.zeros((2, 5, 1), np.int32),
                                           np.zeros((2, 5, 1)), reduction="avg")
  with pytest.raises(ValueError, match="labels"):
    kdjax.fused_linear_distill_with_cross_entropy_with_metrics(
        np.ones((3, 4)), np.ones((4, 10)), np.ones((3, 4)), np.ones((4, 10)),
        np.array([1, 10, -100]))
