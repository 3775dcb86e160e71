"""kdjax.integrations.tunix against Tunix's LogitStrategy and float64 NumPy; the Tunix example.

Tests that need Tunix skip where it is not installed (CI runs them in an environment of their
own, .ci/tunix); the others check what a user without Tunix sees, and that kdjax never imports
the integration.
"""

import doctest
import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from tests import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_TUNIX = importlib.util.find_spec("tunix") is not None
needs_tunix = pytest.mark.skipif(not HAS_TUNIX, reason='needs Tunix: pip install "kdjax[tunix]"')
without_tunix = pytest.mark.skipif(HAS_TUNIX, reason="checks what a user without Tunix sees")
IGNORE = -100
VOCAB = 11


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------


def _kl(student_logits, teacher_logits, temperature):
  """Per-token KL(softmax(t / T) || softmax(s / T)), float64, 0 log 0 = 0."""
  log_q = reference.log_softmax(np.asarray(student_logits, np.float64) / temperature)
  log_p = reference.log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
  with np.errstate(invalid="ignore"):
    terms = np.where(np.isfinite(log_p), np.exp(log_p) * (log_p - log_q), 0.0)
  return terms.sum(-1)


def _cross_entropy(student_logits, labels):
  log_q = reference.log_softmax(np.asarray(student_logits, np.float64))
  safe = np.where(labels == IGNORE, 0, labels)
  return -np.take_along_axis(log_q, safe[..., None], -1)[..., 0]


def _combined(student_logits, teacher_logits, labels, *, kd_coef, temperature, squared):
  """``(1 - kd_coef) CE + kd_coef T^2[squared] KL`` averaged over the counted tokens."""
  counted = labels != IGNORE
  kl = _kl(student_logits, teacher_logits, temperature) * (temperature**2 if squared else 1.0)
  ce = _cross_entropy(student_logits, labels)
  value = (1 - kd_coef) * ce + kd_coef * kl
  return value[counted].mean(), ce[counted].mean(), kl[counted].mean()


def _batch(seed, *, batch=3, seq=6, padding=(0, 0, 0)):
  """Random logits ``[batch, seq, VOCAB]`` for both models, tokens, and the mask of real tokens
  (``padding[b]`` trailing positions of sequence ``b`` are padding, id 0)."""
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(batch, seq, VOCAB)).astype(np.float32)
  teacher = (2.0 * rng.normal(size=(batch, seq, VOCAB))).astype(np.float32)
  tokens = rng.integers(1, VOCAB, size=(batch, seq))
  mask = np.arange(seq) < (seq - np.asarray(padding))[:, None]
  return student, teacher, np.where(mask, tokens, 0).astype(np.int32), mask


# ----------------------------------------------------------------------------------------------
# Without Tunix (and everywhere)
# ----------------------------------------------------------------------------------------------


def test_kdjax_never_imports_the_integrations():
  code = ("import sys, kdjax; print(sorted(m for m in sys.modules "
          "if m.startswith(('kdjax.integrations', 'tunix'))))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=True)
  assert result.stdout.strip() == "[]", result.stdout


def test_the_extra_and_the_ci_job_name_one_tunix_release():
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  (requirement,) = extras["optional-dependencies"]["tunix"]
  floor = re.fullmatch(r"google-tunix>=([\d.]+)", requirement.replace(" ", "")).group(1)
  job = (ROOT / ".ci" / "tunix").read_text()
  assert f"google-tunix=={floor}" in job and '".[tunix]"' in job
  assert "tests/test_tunix.py" in job and "tests/test_docs.py" in job and "needs_tunix" in job
  steps = re.findall(r"^step (\S+);", (ROOT / ".ci" / "run").read_text(), flags=re.M)
  assert "bash .ci/tunix" in (ROOT / ".ci" / "run").read_text()
  assert steps.index("tunix") < steps.index("docs"), steps


@without_tunix
def test_without_tunix_the_integration_says_how_to_install_it():
  with pytest.raises(ModuleNotFoundError, match=re.escape('pip install "kdjax[tunix]"')):
    importlib.import_module("kdjax.integrations.tunix")


@without_tunix
def test_without_tunix_the_example_exits_2_in_one_line():
  result = subprocess.run([sys.executable, str(ROOT / "examples" / "tunix_distill.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.count("\n") == 1 and 'pip install "kdjax[tunix]"' in result.stderr
  assert result.stdout == ""


# ----------------------------------------------------------------------------------------------
# With Tunix: against LogitStrategy and float64
# ----------------------------------------------------------------------------------------------


def _strategies(**kwargs):
  from tunix.distillation import strategies

  from kdjax.integrations import tunix as kdjax_tunix

  tunix_kwargs = {"temperature": kwargs.get("temperature", 1.0),
                  "alpha": kwargs.pop("alpha", 0.5), "distill_top_k": kwargs.pop("top_k", 0)}
  forward = kdjax_tunix.logits_forward
  logit = strategies.LogitStrategy(forward, forward, lambda **_: None, **tunix_kwargs)
  ours = kdjax_tunix.DistillStrategy(forward, forward, **kwargs)
  return logit, ours


def _one_hot_labels(tokens, mask):
  """LogitStrategy's labels, as Tunix's examples build them (for logits[:, :-1])."""
  one_hot = jax.nn.one_hot(tokens[:, 1:], VOCAB)
  return one_hot * jnp.asarray(mask[:, 1:, None], one_hot.dtype)


@needs_tunix
def test_module_docstring_examples():
  module = importlib.import_module("kdjax.integrations.tunix")
  failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert tried > 0 and failures == 0


@needs_tunix
@pytest.mark.parametrize("temperature, kd_coef", [(1.0, 0.5), (2.0, 0.3)])
def test_equals_logit_strategy_without_padding(temperature, kd_coef):
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(int(10 * (temperature + kd_coef)))
  labels = kdjax_tunix.next_token_labels(tokens, mask)
  logit, ours = _strategies(temperature=temperature, alpha=kd_coef, kd_coef=kd_coef,
                            temperature_squared=True)

  def tunix_loss(s):
    return logit.compute_loss(s[:, :-1], teacher[:, :-1], _one_hot_labels(tokens, mask))

  def our_loss(s):
    return ours.compute_loss(s, teacher, labels)

  (want, want_metrics), want_grad = jax.value_and_grad(tunix_loss, has_aux=True)(student)
  (got, got_metrics), got_grad = jax.jit(jax.value_and_grad(our_loss, has_aux=True))(student)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for key in ("distill/soft_loss", "distill/hard_loss"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)
  loss, ce, kl = _combined(student, teacher, np.asarray(labels), kd_coef=kd_coef,
                           temperature=temperature, squared=True)
  np.testing.assert_allclose(got, loss, rtol=1e-5)
  np.testing.assert_allclose(got_metrics["distill/hard_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(got_metrics["distill/soft_loss"], kl, rtol=1e-5)


@needs_tunix
def test_temperature_squared_is_tunix_temperature_scaling():
  """Tunix multiplies its KL term by T**2 always; kdjax only with temperature_squared=True."""
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(3)
  labels = kdjax_tunix.next_token_labels(tokens, mask)
  logit, plain = _strategies(temperature=4.0, kd_coef=1.0, alpha=1.0)
  (tunix_value, _), (plain_value, _) = (
      logit.compute_loss(student[:, :-1], teacher[:, :-1], _one_hot_labels(tokens, mask)),
      plain.compute_loss(student, teacher, labels))
  np.testing.assert_allclose(tunix_value, 16.0 * plain_value, rtol=1e-5)


@needs_tunix
def test_padding_is_averaged_by_tunix_and_ignored_by_kdjax():
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(4, padding=(0, 2, 4))
  labels = np.asarray(kdjax_tunix.next_token_labels(tokens, mask))
  logit, ours = _strategies(temperature=2.0, alpha=0.5, kd_coef=0.5, temperature_squared=True)
  tunix_loss, tunix_metrics = logit.compute_loss(
      student[:, :-1], teacher[:, :-1], _one_hot_labels(tokens, mask))
  loss, metrics = ours.compute_loss(student, teacher, jnp.asarray(labels))
  # kdjax: the mean over the counted tokens.
  want, ce, kl = _combined(student, teacher, labels, kd_coef=0.5, temperature=2.0, squared=True)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Tunix: jnp.mean over every predicting position (padding included); at a padded position
  # the cross entropy is 0 (its one-hot label is zeroed) and the KL is that of the padding.
  positions = student[:, :-1].shape[:-1]
  all_kl = 4.0 * _kl(student[:, :-1], teacher[:, :-1], 2.0)
  np.testing.assert_allclose(tunix_metrics["distill/soft_loss"], all_kl.mean(), rtol=1e-5)
  counted = labels != IGNORE
  np.testing.assert_allclose(tunix_metrics["distill/hard_loss"],
                             ce * counted.sum() / np.prod(positions), rtol=1e-5)
  # The map's normalizer= row: kdjax gives Tunix's hard loss with that divisor.
  hard = kdjax.distill_with_cross_entropy(student, teacher, labels, kd_coef=0.0,
                                          normalizer=np.prod(positions))
  np.testing.assert_allclose(hard, tunix_metrics["distill/hard_loss"], rtol=1e-5)
  assert abs(float(tunix_loss) - float(loss)) > 0.05


@needs_tunix
def test_distill_top_k_is_sparse_renormalize():
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(5)
  labels = kdjax_tunix.next_token_labels(tokens, mask)
  logit, _ = _strategies(temperature=2.0, alpha=1.0, top_k=4)
  _, metrics = logit.compute_loss(student[:, :-1], teacher[:, :-1],
                                  _one_hot_labels(tokens, mask))
  ids, logprobs = kdjax.topk_teacher(teacher, 4, temperature=2.0)
  sparse = kdjax.sparse_distill_loss(student, ids, logprobs, labels, tail="renormalize",
                                     temperature=2.0, temperature_squared=True)
  np.testing.assert_allclose(sparse, metrics["distill/soft_loss"], rtol=1e-5)
  # float64: both renormalised over the teacher's top 4 ids, at T = 2, times T**2.
  top = np.argsort(-teacher, axis=-1, kind="stable")[..., :4]
  kl = 4.0 * _kl(np.take_along_axis(student, top, -1), np.take_along_axis(teacher, top, -1), 2.0)
  np.testing.assert_allclose(sparse, kl[np.asarray(labels) != IGNORE].mean(), rtol=1e-5)


@needs_tunix
def test_next_token_labels_count_what_tunix_counts():
  from kdjax.integrations import tunix as kdjax_tunix

  tokens = np.array([[7, 3, 4, 5, 0, 0], [7, 8, 9, 1, 2, 3]], np.int32)
  # Tunix's input_mask: the tokens to learn (here a one-token prompt and padding excluded).
  mask = np.array([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  labels = np.asarray(kdjax_tunix.next_token_labels(tokens, mask))
  np.testing.assert_array_equal(labels, [[3, 4, 5, IGNORE, IGNORE, IGNORE],
                                         [8, 9, 1, 2, 3, IGNORE]])
  counted_one_hot = np.where((labels != IGNORE)[..., None],
                             np.eye(VOCAB)[np.where(labels == IGNORE, 0, labels)], 0.0)
  np.testing.assert_array_equal(counted_one_hot[:, :-1], _one_hot_labels(tokens, mask))
  # The pitfall: the mask applied after the shift counts the last real token's prediction,
  # whose label is the padding id 0, and drops the first target.
  wrong = np.asarray(kdjax.shift_labels(tokens))
  assert wrong[0, 3] == 0 and mask[0, 3]
  assert (mask & (wrong != IGNORE)).sum() != (labels != IGNORE).sum()


@needs_tunix
def test_eval_loss_is_the_cross_entropy():
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(6, padding=(1, 0, 3))
  labels = np.asarray(kdjax_tunix.next_token_labels(tokens, mask))
  _, ours = _strategies(kd_coef=0.9, temperature=3.0)
  value, metrics = ours.compute_eval_loss(student, jnp.asarray(labels))
  assert metrics == {}
  np.testing.assert_allclose(value, _cross_entropy(student, labels)[labels != IGNORE].mean(),
                             rtol=1e-5)


@needs_tunix
def test_masked_vocabulary_entries_nan_in_tunix_finite_in_kdjax():
  """-inf logits in both models (a padded vocabulary): LogitStrategy's KL takes 0 * inf."""
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(7)
  student[..., -2:] = -np.inf
  teacher[..., -2:] = -np.inf
  tokens = np.where(tokens >= VOCAB - 2, 1, tokens)  # no label on a masked entry
  labels = kdjax_tunix.next_token_labels(tokens, mask)
  logit, ours = _strategies(temperature=1.0, alpha=0.5, kd_coef=0.5, temperature_squared=True)
  tunix_loss, _ = logit.compute_loss(student[:, :-1], teacher[:, :-1],
                                     _one_hot_labels(tokens, mask))
  loss, _ = ours.compute_loss(student, teacher, labels)
  grad = jax.grad(lambda s: ours.compute_loss(s, teacher, labels)[0])(student)
  assert np.isnan(tunix_loss)
  want, _, _ = _combined(student[..., :-2], teacher[..., :-2], np.asarray(labels), kd_coef=0.5,
                         temperature=1.0, squared=True)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert np.isfinite(grad).all() and not grad[..., -2:].any()


@needs_tunix
def test_bfloat16_logits():
  from kdjax.integrations import tunix as kdjax_tunix

  student, teacher, tokens, mask = _batch(8, padding=(2, 0, 1))
  student16, teacher16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  labels = kdjax_tunix.next_token_labels(tokens, mask)
  _, ours = _strategies(kd_coef=0.5, temperature=2.0)
  loss, _ = ours.compute_loss(student16, teacher16, labels)
  grad = jax.grad(lambda s: ours.compute_loss(s, teacher16, labels)[0])(student16)
  want, _, _ = _combined(np.asarray(student16, np.float64), np.asarray(teacher16, np.float64),
                         np.asarray(labels), kd_coef=0.5, temperature=2.0, squared=False)
  assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(loss, want, rtol=1e-5)


@needs_tunix
def test_misuse_is_refused_naming_the_argument():
  from kdjax.integrations import tunix as kdjax_tunix

  forward = kdjax_tunix.logits_forward
  for kwargs, name in (({"kd_coef": 1.5}, "kd_coef"), ({"temperature": 0.0}, "temperature"),
                       ({"divergence": "kl"}, "divergence"), ({"reduction": "none"}, "reduction"),
                       ({"softcap": -1.0}, "softcap"), ({"beta": 0.3}, "beta")):
    with pytest.raises(ValueError, match=name):
      kdjax_tunix.DistillStrategy(forward, forward, **kwargs)
  student, teacher, tokens, mask = _batch(9)
  labels = kdjax_tunix.next_token_labels(tokens, mask)
  _, ours = _strategies()
  with pytest.raises(ValueError, match=re.escape("logits[:, :-1]")):
    ours.compute_loss(student[:, :-1], teacher[:, :-1], labels)
  head = kdjax_tunix.Head(jnp.zeros((3, 6, 4)), jnp.zeros((4, VOCAB)))
  with pytest.raises(TypeError, match="both return logits or both a Head"):
    ours.compute_loss(head, teacher, labels)
  with pytest.raises(ValueError, match="input_mask"):
    kdjax_tunix.next_token_labels(tokens, mask[:, :-1])


  class NoHiddenStates:  # as Tunix's Llama 3: no output_hidden_states
    def __call__(self, tokens, positions, cache, attention_mask):
      raise AssertionError("not called")

  with pytest.raises(TypeError, match="NoHiddenStates.__call__ takes no output_hidden_states"):
    kdjax_tunix.head_forward(NoHiddenStates(), tokens, None, None)


# ----------------------------------------------------------------------------------------------
# With Tunix: its Qwen3, the trainer, the docs' table
# ----------------------------------------------------------------------------------------------


def _example():
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    return importlib.import_module("tunix_distill")
  finally:
    sys.path.remove(str(ROOT / "examples"))


@pytest.fixture(scope="module")
def example_models():
  """The example's ``(teacher, student)``, built once (a Qwen3 takes seconds to initialise);
  the tests that use them do not change them."""
  return _example().make_models()


@needs_tunix
def test_fused_head_of_qwen3_equals_its_logits(example_models):
  """Tied teacher (embedding transposed), untied student (lm_head): values and gradients."""
  from flax import nnx

  from kdjax.integrations import tunix as kdjax_tunix

  example = _example()
  teacher, student = example_models
  inputs = example.model_inputs(example.make_batch(np.random.default_rng(2), batch=2))
  labels = kdjax_tunix.next_token_labels(inputs["input_tokens"], inputs["input_mask"])
  strategy = kdjax_tunix.DistillStrategy(
      kdjax_tunix.head_forward, kdjax_tunix.head_forward, kd_coef=0.5, temperature=2.0)
  head_forward = nnx.jit(kdjax_tunix.head_forward)
  logits_forward = nnx.jit(kdjax_tunix.logits_forward)
  for model in (teacher, student):
    head = head_forward(model, **inputs)
    np.testing.assert_allclose(head.hidden @ head.kernel, logits_forward(model, **inputs),
                               rtol=1e-5, atol=1e-5)
  teacher_head = head_forward(teacher, **inputs)
  teacher_logits = logits_forward(teacher, **inputs)

  def fused(model):
    return strategy.compute_loss(kdjax_tunix.head_forward(model, **inputs), teacher_head,
                                 labels)[0]

  def dense(model):
    return strategy.compute_loss(kdjax_tunix.logits_forward(model, **inputs), teacher_logits,
                                 labels)[0]

  fused_value, fused_grads = nnx.jit(nnx.value_and_grad(fused))(student)
  dense_value, dense_grads = nnx.jit(nnx.value_and_grad(dense))(student)
  np.testing.assert_allclose(fused_value, dense_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               fused_grads, dense_grads)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(fused_grads))


@needs_tunix
def test_head_forward_compiles_without_the_logits(example_models):
  """Under jit the model's own logits, unused, are dropped: no [batch, seq, vocab] array."""
  from flax import nnx

  from kdjax.integrations import tunix as kdjax_tunix

  example = _example()
  _, student = example_models  # untied; no other activation is [2, 16, 128]
  inputs = example.model_inputs(example.make_batch(np.random.default_rng(3), batch=2))
  graphdef, state = nnx.split(student)
  logits_shape = f"f32[2,{example.SEQ},{example.VOCAB}]"
  for forward, has_logits in ((kdjax_tunix.logits_forward, True),
                              (kdjax_tunix.head_forward, False)):
    program = jax.jit(lambda state, inputs, forward=forward: forward(
        nnx.merge(graphdef, state), **inputs)).lower(state, inputs).compile().as_text()
    assert (logits_shape in program) == has_logits, forward.__name__


@needs_tunix
def test_example_trains_with_tunix_trainer_and_the_fused_head():
  result = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "tunix_distill.py"), "--fused", "--steps", "12"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  losses = [float(line.split()[-1]) for line in result.stdout.splitlines()
            if line.startswith("step")]
  assert len(losses) == 12, result.stdout
  assert result.stdout.strip().endswith("(falling)"), result.stdout


def _docs_table():
  rows = {}
  for line in (ROOT / "docs" / "tunix.md").read_text().splitlines():
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    if len(cells) >= 4 and re.fullmatch(r"-?\d+\.\d{4}", cells[1]):
      rows[cells[0].strip("`")] = (float(cells[1]), float(cells[2]))
  return rows


@needs_tunix
def test_the_docs_comparison_table_is_what_the_example_computes(example_models):
  example = _example()
  computed = example.comparison(example_models)
  documented = _docs_table()
  assert [case for case, _, _ in computed] == list(documented), documented
  for case, theirs, ours in computed:
    np.testing.assert_allclose(documented[case], (theirs, ours), atol=1.5e-4, err_msg=case)
  values = {case: (theirs, ours) for case, theirs, ours in computed}
  # Equal where the definitions agree; the differences the page explains.
  for case in ("unpadded, T=1: loss", "unpadded, T=2, temperature_squared=True: loss",
               "unpadded, distill_top_k=8 vs sparse tail=renormalize: soft"):
    np.testing.assert_allclose(*values[case], rtol=1e-5, err_msg=case)
  x = example.make_batch(np.random.default_rng(1), batch=4)
  counted = int(np.asarray(x.input_mask)[:, 1:].sum())
  positions = 4 * (example.SEQ - 1)
  theirs, ours = values["padded, T=1: hard"]
  np.testing.assert_allclose(theirs, ours * counted / positions, rtol=1e-5)
