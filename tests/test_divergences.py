"""Per-token divergences against float64 NumPy, PyTorch (TRL's JSD) and their properties."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import kdjax
from tests import reference

ALL = kdjax.DIVERGENCES
PER_TOKEN_FN = {name: getattr(kdjax, name) for name in ALL}
HYPER = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2},
         "skew_reverse_kl": {"alpha": 0.2}}


def _call(name, logits, teacher, **kw):
  return PER_TOKEN_FN[name](logits, teacher, **HYPER.get(name, {}), **kw)


def _ref(name, logits, teacher, **kw):
  return reference.per_token(name, logits, teacher, **HYPER.get(name, {}), **kw)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("neg_inf", [0.0, 0.2])
def test_value_matches_float64_numpy(name, temperature, neg_inf):
  rng = np.random.default_rng(hash((name, temperature, neg_inf)) % 2**32)
  logits = reference.random_logits(rng, (3, 5, 17), neg_inf_fraction=neg_inf)
  teacher = reference.random_logits(rng, (3, 5, 17), neg_inf_fraction=neg_inf)
  logits[0, 0] = -np.inf  # An empty student row.
  teacher[0, 1] = -np.inf  # An empty teacher row.
  got = _call(name, logits, teacher, temperature=temperature)
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, _ref(name, logits, teacher, temperature=temperature), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("neg_inf", [0.0, 0.25])
def test_gradient_matches_float64_numerical(name, neg_inf):
  rng = np.random.default_rng(7)
  logits = reference.random_logits(rng, (4, 9), neg_inf_fraction=neg_inf)
  teacher = reference.random_logits(rng, (4, 9), neg_inf_fraction=neg_inf)
  weights = rng.random(4)
  got = jax.grad(lambda x: jnp.sum(_call(name, x, teacher, temperature=1.5) * weights))(logits)
  want = reference.numerical_grad(
      lambda x: np.sum(_ref(name, x, teacher, temperature=1.5) * weights), logits)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(got)[np.isneginf(logits)] == 0)


@pytest.mark.parametrize("name", ALL)
def test_check_grads_jit_and_token_blocks(name):
  rng = np.random.default_rng(3)
  logits = jnp.asarray(reference.random_logits(rng, (13, 6)))
  teacher = jnp.asarray(reference.random_logits(rng, (13, 6)))
  fn = jax.jit(lambda x: jnp.sum(_call(name, x, teacher, token_block=4) ** 2))
  check_grads(fn, (logits,), order=1, modes=["rev"], atol=5e-3, rtol=5e-3, eps=1e-3)
  # Blocks that do not divide the token count give the same values as one block.
  np.testing.assert_allclose(
      _call(name, logits, teacher, token_block=4), _call(name, logits, teacher), rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_vmap_and_bf16(name):
  rng = np.random.default_rng(11)
  logits = reference.random_logits(rng, (2, 3, 8), neg_inf_fraction=0.1)
  teacher = reference.random_logits(rng, (2, 3, 8), neg_inf_fraction=0.1)
  batched = jax.vmap(lambda a, b: _call(name, a, b))(logits, teacher)
  np.testing.assert_allclose(batched, _call(name, logits, teacher), rtol=1e-6, atol=1e-7)
  grads = jax.vmap(jax.grad(lambda a, b: jnp.sum(_call(name, a, b))))(logits, teacher)
  np.testing.assert_allclose(
      grads, jax.grad(lambda a: jnp.sum(_call(name, a, teacher)))(logits), rtol=1e-5, atol=1e-7)
  lo, te = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  got = _call(name, lo, te)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, _ref(name, np.asarray(lo, np.float32), np.asarray(te, np.float32)),
      rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda a: jnp.sum(_call(name, a, te)))(lo)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
  """TRL's GKDTrainer.generalized_jsd_loss formula (reduction="none", summed over vocab)."""
  student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
  teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
  if beta == 0:
    jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
  elif beta == 1:
    jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
  else:
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta_t),
                     teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none",
                          log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none",
                          log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
  return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl_pytorch(beta, temperature):
  rng = np.random.default_rng(5)
  logits = reference.random_logits(rng, (6, 31))
  teacher = reference.random_logits(rng, (6, 31))
  t_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  want = _trl_generalized_jsd(t_logits, torch.tensor(teacher, dtype=torch.float64), beta,
                              temperature)
  want.sum().backward()
  fn = functools.partial(kdjax.generalized_jsd, beta=beta, temperature=temperature)
  np.testing.assert_allclose(fn(logits, teacher), want.detach().numpy(), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(fn(x, teacher)))(logits)
  np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-4, atol=1e-6)
  # A traced beta (a schedule under jit) selects the same endpoints and interior.
  traced = jax.jit(lambda b: kdjax.generalized_jsd(logits, teacher, beta=b,
                                                   temperature=temperature))
  np.testing.assert_allclose(traced(jnp.float32(beta)), want.detach().numpy(),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_at_zero_is_plain_kl_and_traced_alpha(name):
  rng = np.random.default_rng(9)
  logits = reference.random_logits(rng, (5, 12), neg_inf_fraction=0.1)
  teacher = reference.random_logits(rng, (5, 12), neg_inf_fraction=0.1)
  plain = kdjax.forward_kl if name == "skew_forward_kl" else kdjax.reverse_kl
  fn = PER_TOKEN_FN[name]
  np.testing.assert_allclose(fn(logits, teacher, alpha=0.0), plain(logits, teacher),
                             rtol=1e-6, atol=1e-7)
  traced = jax.jit(lambda a: fn(logits, teacher, alpha=a))(jnp.float32(0.3))
  np.testing.assert_allclose(traced, fn(logits, teacher, alpha=0.3), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Mathematical properties (hypothesis).
# --------------------------------------------------------------------------------------------

_rows = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.floats(-20, 20, width=32))


@given(_rows, st.sampled_from(ALL), st.floats(0.25, 4.0))
def test_zero_at_equality_and_invariant_to_row_constant(logits, name, temperature):
  values = _call(name, logits, logits, temperature=temperature)
  np.testing.assert_allclose(
      values if name != "soft_cross_entropy" else 0.0, 0.0, atol=2e-5)
  shift = np.linspace(-30, 30, logits.shape[0], dtype=np.float32)[:, None]
  teacher = logits[::-1, ::-1].copy()
  np.testing.assert_allclose(
      _call(name, logits + shift, teacher - shift, temperature=temperature),
      _call(name, logits, teacher, temperature=temperature), rtol=1e-4, atol=1e-4)


@given(_rows, st.sampled_from(ALL))
def test_bounds(logits, name):
  teacher = np.roll(logits, 1, axis=-1) * 1.7
  values = np.asarray(_call(name, logits, teacher))
  assert np.all(values >= -1e-5)
  if name == "total_variation":
    assert np.all(values <= 1 + 1e-6)
  if name == "generalized_jsd":  # beta = 0.3 here; check the symmetric case too.
    jsd = np.asarray(kdjax.generalized_jsd(logits, teacher, beta=0.5))
    assert np.all(jsd <= np.log(2) + 1e-5)


@given(_rows, st.floats(0.5, 3.0))
def test_soft_cross_entropy_is_forward_kl_plus_teacher_entropy(logits, temperature):
  teacher = logits[:, ::-1] * 0.5 + 1.0
  log_p = reference.log_softmax(teacher / temperature)
  entropy = -np.sum(np.exp(log_p) * log_p, -1)
  np.testing.assert_allclose(
      kdjax.soft_cross_entropy(logits, teacher, temperature=temperature),
      np.asarray(kdjax.forward_kl(logits, teacher, temperature=temperature)) + entropy,
      rtol=1e-5, atol=1e-4)


def test_extreme_logits_are_finite():
  logits = np.array([[1e30, 0.0, -1e30, -np.inf], [-np.inf] * 4, [3e4, -3e4, 0.0, 1.0]],
                    np.float32)
  teacher = np.array([[0.0, 1e30, -np.inf, 5.0], [0.0, 1.0, 2.0, 3.0], [-np.inf] * 4],
                     np.float32)
  for name in ALL:
    values = _call(name, logits, teacher)
    grads = jax.grad(lambda x, name=name: jnp.sum(_call(name, x, teacher)))(logits)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads)), name
    assert float(values[1]) == 0.0  # An all -inf student row is empty.


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 1.5}, "beta must be in"),
    ({"beta": -0.1}, "beta must be in"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"temperature": -1.0}, "temperature must be"),
])
def test_bad_hyperparameters(kwargs, match):
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=match):
    kdjax.generalized_jsd(x, x, **kwargs)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_bad_alpha(name):
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="alpha must be in"):
    PER_TOKEN_FN[name](x, x, alpha=1.01)


def test_unknown_divergence():
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="divergence must be one of"):
    kdjax.distill_loss(x, x, divergence="kl")
