"""implementation=: every implementation against the readable reference, and the reference
against the independent float64 formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax._src import implementations
from kdjax._src.config import Config
from tests import reference

ALL = kdjax.DIVERGENCES
REDUCTIONS = ("mean", "sum", "sequence_mean", "none")
HYPER = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2},
         "skew_reverse_kl": {"alpha": 0.2}}


def _data(seed=0, shape=(3, 5, 23), dtype=np.float32):
  rng = np.random.default_rng(seed)
  logits = reference.random_logits(rng, shape, neg_inf_fraction=0.1).astype(dtype)
  teacher = reference.random_logits(rng, shape, neg_inf_fraction=0.1).astype(dtype)
  logits[0, 0] = -np.inf  # an empty student row
  teacher[0, 1] = -np.inf  # an empty teacher row
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  labels = np.where(rng.random(shape[:-1]) < 0.3, -100, labels)
  labels[1, :] = -100  # a sequence with no counted token
  return logits, teacher, labels


def _all_reductions(loss, implementation, **kwargs):
  """Every reduction's value and its gradient (a random cotangent for "none"), one jit."""
  cotangent = np.random.default_rng(9).standard_normal((3, 5)).astype(np.float32)

  @jax.jit
  def run(logits, teacher, labels):
    out = {}
    for reduction in REDUCTIONS:
      def fn(x, reduction=reduction):
        value = loss(x, teacher, labels, reduction=reduction, implementation=implementation,
                     **kwargs)
        return jnp.sum(value * cotangent) if reduction == "none" else value, value
      (_, value), grad = jax.value_and_grad(fn, has_aux=True)(logits)
      out[reduction] = (value, grad)
    return out
  return run


@pytest.mark.parametrize("implementation", ["blocked", None])
@pytest.mark.parametrize("name", ALL)
def test_every_divergence_and_reduction_matches_reference(implementation, name):
  logits, teacher, labels = _data()
  kwargs = dict(divergence=name, temperature=1.7, **HYPER.get(name, {}))
  got = _all_reductions(kdjax.distill_loss, implementation, **kwargs)(logits, teacher, labels)
  want = _all_reductions(kdjax.distill_loss, "reference", **kwargs)(logits, teacher, labels)
  for reduction in REDUCTIONS:
    for a, b in zip(got[reduction], want[reduction], strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7, err_msg=reduction)
    assert np.all(np.asarray(got[reduction][1])[np.isneginf(logits)] == 0)


@pytest.mark.parametrize("implementation", ["blocked", None])
def test_combined_objective_matches_reference(implementation):
  logits, teacher, labels = _data(1)
  kwargs = dict(divergence="reverse_kl", kd_coef=0.3, temperature=2.0, temperature_squared=True)
  got = _all_reductions(kdjax.distill_with_cross_entropy, implementation, **kwargs)
  want = _all_reductions(kdjax.distill_with_cross_entropy, "reference", **kwargs)
  labels = np.where(labels >= 0, labels, -100)
  # Labels whose student logit is -inf would give an infinite cross entropy: keep them finite.
  labels = np.where(np.isneginf(np.take_along_axis(logits, np.maximum(labels, 0)[..., None],
                                                   -1)[..., 0]), -100, labels)
  got, want = got(logits, teacher, labels), want(logits, teacher, labels)
  for reduction in REDUCTIONS:
    for a, b in zip(got[reduction], want[reduction], strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7, err_msg=reduction)


@pytest.mark.parametrize("implementation", ["blocked", None])
def test_sparse_matches_reference(implementation):
  logits, teacher, labels = _data(2)
  ids, logprobs = kdjax.topk_teacher(teacher, 5, temperature=1.5)
  for tail in kdjax.TAILS:
    def run(impl, tail=tail):
      return jax.value_and_grad(lambda x: kdjax.sparse_distill_loss(
          x, ids, logprobs, labels, tail=tail, temperature=1.5, implementation=impl))(logits)
    for a, b in zip(run(implementation), run("reference"), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7, err_msg=tail)


@pytest.mark.parametrize("vocab_block", [None, 7])
def test_fused_matches_reference(vocab_block):
  rng = np.random.default_rng(3)
  h_s, h_t = rng.standard_normal((2, 9, 6)), rng.standard_normal((2, 9, 10))
  w_s, w_t = rng.standard_normal((6, 23)) / 2, rng.standard_normal((10, 23)) / 2
  b_s = rng.standard_normal(23)
  labels = np.where(rng.random((2, 9)) < 0.3, -100, 1)
  for reduction in REDUCTIONS:
    def run(impl, reduction=reduction):
      def loss(hidden, kernel, bias):
        value = kdjax.fused_linear_distill_loss(
            hidden, kernel, h_t, w_t, labels, student_bias=bias, divergence="generalized_jsd",
            temperature=1.5, softcap=(4.0, None), logit_scale=(None, 0.8), reduction=reduction,
            vocab_block=vocab_block, token_block=4, implementation=impl)
        return jnp.sum(value * np.arange(1, 10)) if reduction == "none" else value
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(h_s, w_s, b_s)
    (value, grads), (want, want_grads) = run("blocked"), run("reference")
    np.testing.assert_allclose(value, want, rtol=2e-5, err_msg=reduction)
    for got, want_grad in zip(grads, want_grads, strict=True):
      np.testing.assert_allclose(got, want_grad, rtol=2e-5, atol=1e-6, err_msg=reduction)


def test_reference_in_float64_matches_the_float64_formula():
  logits, teacher, labels = _data(4, dtype=np.float64)
  mask = labels != -100
  with jax.enable_x64(True):
    for name in ALL:
      kwargs = dict(divergence=name, temperature=0.7, **HYPER.get(name, {}))
      values = kdjax.distill_loss(logits, teacher, labels, reduction="none",
                                  implementation="reference", **kwargs)
      assert values.dtype == jnp.float64
      want = reference.per_token(name, logits, teacher, temperature=0.7, **HYPER.get(name, {}))
      np.testing.assert_allclose(values, np.where(mask, want, 0.0), rtol=1e-12, atol=1e-14)
      total = kdjax.distill_loss(logits, teacher, labels, reduction="sum",
                                 implementation="reference", **kwargs)
      np.testing.assert_allclose(total, np.sum(np.where(mask, want, 0.0)), rtol=1e-12)


def test_bf16_every_implementation_agrees():
  logits, teacher, labels = _data(5)
  lo, te = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  results = {}
  for implementation in ("blocked", "reference"):
    value, grad = jax.value_and_grad(lambda x, i=implementation: kdjax.distill_loss(
        x, te, labels, divergence="generalized_jsd", implementation=i))(lo)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    results[implementation] = (value, np.asarray(grad, np.float32))
  np.testing.assert_allclose(results["blocked"][0], results["reference"][0], rtol=1e-5)
  # Both are the float32 gradient rounded to bfloat16 once: within one bfloat16 ulp.
  np.testing.assert_allclose(results["blocked"][1], results["reference"][1], rtol=2 ** -7,
                             atol=1e-7)


def _second_order_data():
  # Finite logits: a second derivative through -inf entries is NaN in the reference too.
  rng = np.random.default_rng(10)
  logits = rng.standard_normal((2, 3, 11)).astype(np.float32) * 2
  teacher = rng.standard_normal((2, 3, 11)).astype(np.float32) * 2
  labels = np.array([[1, -100, 4], [0, 7, -100]], np.int32)
  return logits, teacher, labels


@pytest.mark.parametrize("implementation", ["blocked", None, "pallas"])
def test_vmap_over_implementations(implementation):
  logits, teacher, labels = _data(6)
  batched = jax.vmap(lambda a, b: kdjax.reverse_kl(
      a, b, implementation=implementation))(logits, teacher)
  np.testing.assert_allclose(batched, reference.per_token("reverse_kl", logits, teacher),
                             rtol=2e-5, atol=1e-6)
  # A teacher shared by the batch, a temperature per batch entry, and the gradient.
  logits, teacher, labels = _second_order_data()
  temperatures = jnp.asarray([0.5, 2.0])

  def loss(x, temperature, implementation):
    return kdjax.distill_with_cross_entropy(
        x, teacher[0], labels[0], kd_coef=0.5, divergence="generalized_jsd",
        temperature=temperature, implementation=implementation)

  got = jax.vmap(jax.value_and_grad(functools.partial(loss, implementation=implementation)))(
      logits, temperatures)
  want = [jax.value_and_grad(loss)(x, t, "reference") for x, t in zip(
      logits, temperatures, strict=True)]
  for a, b in zip(got, zip(*want, strict=True), strict=True):
    np.testing.assert_allclose(a, np.stack(b), rtol=2e-5, atol=2e-7)


SECOND_ORDER = {
    "distill_loss": lambda x, t, y, i: kdjax.distill_loss(
        x, t, y, divergence="generalized_jsd", temperature=jnp.float32(1.5), beta=0.3,
        implementation=i),
    "combined": lambda x, t, y, i: kdjax.distill_with_cross_entropy(
        x, t, y, kd_coef=0.4, divergence="reverse_kl", temperature=2.0,
        temperature_squared=True, implementation=i),
    "per_token": lambda x, t, y, i: jnp.sum(
        kdjax.skew_forward_kl(x, t, alpha=0.2, implementation=i) * np.arange(1.0, 4.0)),
}


@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_hessian_of_the_default_matches_reference(name):
  """jax.hessian (forward over reverse mode): the default differentiates the blocked engine."""
  logits, teacher, labels = _second_order_data()
  loss = SECOND_ORDER[name]
  got = jax.jit(jax.hessian(lambda x: loss(x, teacher, labels, None)))(logits)
  want = jax.hessian(lambda x: loss(x, teacher, labels, "reference"))(logits)
  assert got.shape == logits.shape * 2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["distill_loss", "per_token"])
def test_gradient_of_gradient_of_the_default_matches_reference(name):
  """Reverse over reverse mode, through the gradient's squared norm."""
  logits, teacher, labels = _second_order_data()
  loss = SECOND_ORDER[name]

  def penalty(x, implementation):
    return jnp.sum(jax.grad(loss)(x, teacher, labels, implementation) ** 2)

  got = jax.jit(jax.grad(penalty), static_argnums=1)(logits, None)
  want = jax.grad(penalty)(logits, "reference")
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_forward_mode_through_the_reference():
  """jax.jvp and jax.jacfwd need the reference; its directional derivative is the default's
  gradient times the tangent, and the other implementations refuse forward mode."""
  logits, teacher, labels = _second_order_data()
  tangent = np.random.default_rng(11).standard_normal(logits.shape).astype(np.float32)
  loss = SECOND_ORDER["distill_loss"]
  _, directional = jax.jvp(lambda x: loss(x, teacher, labels, "reference"), (logits,),
                           (tangent,))
  gradient = jax.grad(loss)(logits, teacher, labels, None)
  np.testing.assert_allclose(directional, np.sum(gradient * tangent), rtol=1e-5)
  jacobian = jax.jacfwd(lambda x: kdjax.forward_kl(x, teacher, implementation="reference"))(
      logits)
  assert jacobian.shape == logits.shape[:-1] + logits.shape
  for implementation in ("blocked", None):
    with pytest.raises(TypeError, match="forward-mode"):
      jax.jvp(lambda x, i=implementation: loss(x, teacher, labels, i), (logits,), (tangent,))
  with pytest.raises(ValueError, match="'pallas' has no forward-mode derivative"):
    jax.hessian(lambda x: loss(x, teacher, labels, "pallas"))(logits)


def test_default_choice():
  config = Config()
  for num_logits in (1, 8 * 128, 1 << 30):  # the blocked engine wins at every size measured
    assert implementations.choose(config, num_logits) == "blocked"
  assert implementations.choose(config._replace(implementation="reference"), 1) == "reference"


@pytest.mark.parametrize("bad", ["xla", "Blocked", 1])
def test_unknown_implementation(bad):
  x = np.zeros((2, 3), np.float32)
  for call in (lambda: kdjax.distill_loss(x, x, implementation=bad),
               lambda: kdjax.kd_loss(x, x, np.zeros(2, np.int32), implementation=bad),
               lambda: kdjax.forward_kl(x, x, implementation=bad),
               lambda: kdjax.sparse_distill_loss(x, np.zeros((2, 1), np.int32),
                                                 np.zeros((2, 1)), implementation=bad),
               lambda: kdjax.fused_linear_distill_loss(x, np.zeros((3, 4)), x,
                                                       np.zeros((3, 4)), implementation=bad)):
    with pytest.raises(ValueError, match="implementation must be one of"):
      call()


def test_kernels_are_offered_only_where_they_exist():
  x = np.zeros((2, 3), np.float32)
  for call in (lambda: kdjax.sparse_distill_loss(x, np.zeros((2, 1), np.int32),
                                                 np.zeros((2, 1)), implementation="pallas"),
               lambda: kdjax.fused_linear_distill_loss(x, np.zeros((3, 4)), x,
                                                       np.zeros((3, 4)), implementation="pallas")):
    with pytest.raises(ValueError, match="implementation='pallas' has kernels for the dense"):
      call()


def test_reference_is_not_offered_for_a_split_vocabulary():
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  fn = jax.shard_map(lambda s, t: kdjax.vocab_parallel_distill_loss(
      s, t, axis_name="model", implementation="reference"), mesh=mesh,
      in_specs=(jax.P(None, "model"),) * 2, out_specs=jax.P())
  with pytest.raises(ValueError, match="reference.*axis_name"):
    fn(jnp.zeros((2, 4)), jnp.zeros((2, 4)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowering_for_cpu_traces_the_block_recipe_once(monkeypatch, dtype):
  """A default program lowered for CPU traces the recipe once: the CPU block size and, for
  16-bit logits, the CPU way through the loop, not the accelerators' as well. The program is the
  one implementation="blocked" compiles to on CPU, and computes the reference's value."""
  from kdjax._src import dense

  calls = []
  block = dense.recipe.block
  monkeypatch.setattr(dense.recipe, "block", lambda *a, **k: calls.append(1) or block(*a, **k))
  # 1024 x 32000: 8-row blocks on CPU, 512 on accelerators.
  shapes = (jax.ShapeDtypeStruct((1024, 32000), dtype),) * 2 + (
      jax.ShapeDtypeStruct((1024,), jnp.int32),)

  def step(implementation):
    return jax.jit(jax.value_and_grad(lambda x, t, y: kdjax.kd_loss(
        x, t, y, implementation=implementation)))

  traced = step(None).trace(*shapes)
  assert not calls  # the default's loop is traced when the program is lowered
  traced.lower(lowering_platforms=("cpu",))
  assert len(calls) == 1

  logits, teacher, labels = _data(3, (2, 4, 64))
  logits, teacher = jnp.asarray(logits, dtype), jnp.asarray(teacher, dtype)
  want_value = reference.reduce(reference.per_token(
      "soft_cross_entropy", np.asarray(logits, np.float64), np.asarray(teacher, np.float64)),
      labels != -100, "mean")
  value, grad = step(None)(logits, teacher, labels)
  np.testing.assert_allclose(value, want_value, rtol=1e-5 if dtype == jnp.float32 else 1e-2)
  blocked_value, blocked_grad = step("blocked")(logits, teacher, labels)
  assert value == blocked_value
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(blocked_grad, np.float32))
