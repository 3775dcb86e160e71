"""The kernels' recipe (``recipe.lanes``): per-lane statistics and online values.

``recipe.lanes`` is what the Pallas kernels run on their tiles; here the kernels run it in
Pallas interpret mode, both variants, with tiles smaller than the vocabulary (Triton's masked
ragged tile; Mosaic's last tile overlapping the one before it, or aligned), every divergence,
with and without the hard-label cross entropy. Values are compared with the float64 formulas
of ``tests/reference.py``, gradients with ``implementation="reference"`` (JAX autodiff of the
readable definition). The ``online`` entries of ``DIVERGENCES`` -- the folds that let a kernel
take two walks instead of three -- are checked against the same float64 formulas.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax._src import checks, dense, pallas, recipe
from kdjax._src import config as config_lib
from kdjax._src import divergences as div
from kdjax._src import reference as reference_impl
from tests import reference

IGNORE = -100
HYPERPARAMETERS = dict(beta=0.3, alpha=0.2)


def _inputs(seed, tokens, vocab):
  """float32 logits with every pattern the conventions name, one token per row:

  0-3 ordinary; 4 no student mass; 5 no teacher mass; 6 teacher entries of -inf; 7 student
  entries of -inf; 8 a NaN student entry; 9 a +inf teacher entry; 10 logits near 1e8 (a
  teacher whose offsets from its max are exact only relative to the max); 11 its maximum in
  the last, ragged tile; 12 identical student and teacher (every KL exactly 0). The last 3
  entries of the vocabulary are padding (-inf on both sides).
  """
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(tokens, vocab)).astype(np.float32) * 3
  teacher = rng.normal(size=(tokens, vocab)).astype(np.float32) * 3
  student[4] = -np.inf
  teacher[5] = -np.inf
  teacher[6, 10:60] = -np.inf
  student[7, 100:130] = -np.inf
  student[8, 17] = np.nan
  teacher[9, 33] = np.inf
  teacher[10] = 1e8 + 8 * np.round(teacher[10])
  student[11, vocab - 5] = 40.0
  teacher[11, vocab - 4] = 30.0
  student[12] = teacher[12]
  student[:, vocab - 3:] = -np.inf
  teacher[:, vocab - 3:] = -np.inf
  labels = rng.integers(0, vocab - 3, tokens).astype(np.int32)
  labels[[4, 13]] = IGNORE  # token 4's cross entropy would be infinite
  return student, teacher, labels


# Tiles of 128 entries in 4 chunks of 32 lanes (Triton) at vocabulary 300 leave a ragged 44,
# read with a mask; Mosaic's 256-wide tiles of 2 chunks of 128 lanes leave 44 at vocabulary 300
# (an overlapping last tile) and an aligned 128 at vocabulary 384.
def _two_sum(a, b):
  """``a + b`` and its rounding error, exactly (Knuth: additions only)."""
  total = a + b
  b_part = total - a
  return total, (a - (total - b_part)) + (b - b_part)


def _split(x):
  """``x`` as a sum of two float32 halves of 12 significant bits (their products are exact)."""
  high = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
  return high, x - high


def _fma(a, b, c):
  """``a * b + c`` rounded (about) once, as a GPU's FFMA: the product as four exact partial
  products, summed with ``c`` in two floats."""
  a, b, c = (jnp.asarray(v, jnp.float32) for v in (a, b, c))
  (a_high, a_low), (b_high, b_low) = _split(a), _split(b)
  high, low = _two_sum(a_high * b_high, c)
  for part in (a_high * b_low, a_low * b_high, a_low * b_low):
    high, error = _two_sum(high, part)
    low = low + error
  finite = jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(c)
  return jnp.where(finite, high + low, a * b + c)


def _reciprocal(x):
  return 1.0 / x


KERNELS = {
    "gpu-300": (pallas.Variant("triton", 128, interpret=True, lanes=32), 300),
    # The GPU's arithmetic: maxima held as m c, entries y = fma(x, c, -m c); a reciprocal
    # (a mixture's ratio read as e_t / m where its log is not needed).
    "gpu-fma-300": (pallas.Variant("triton", 128, interpret=True, lanes=32,
                                   arith=recipe.Arith(jnp.exp2, _fma, reciprocal=_reciprocal)),
                    300),
    "tpu-300": (pallas.Variant("mosaic", 256, interpret=True, rows=8), 300),
    "tpu-384": (pallas.Variant("mosaic", 256, interpret=True, rows=8), 384),
}


def _read_by(divergence):
  """The hyperparameters of HYPERPARAMETERS that ``divergence`` reads."""
  return {name: value for name, value in HYPERPARAMETERS.items()
          if name in div.DIVERGENCES[divergence].hyperparameters}


def _kernel_rows(kernel, divergence, *, temperature, cross_entropy, kd_coef=0.6):
  variant, vocab = KERNELS[kernel]
  student, teacher, labels = _inputs(zlib.crc32(f"{kernel} {divergence}".encode()), 16, vocab)
  hp = checks.hyperparameters(divergence, temperature=temperature,
                              kd_coef=kd_coef if cross_entropy else None,
                              **_read_by(divergence))
  config, traced = config_lib.build(hp, divergence=divergence, temperature_squared=True,
                                    cross_entropy=cross_entropy)
  loop = pallas.loop(variant, dense.blocked(dense.teacher_logits_block))
  others = (jnp.asarray(teacher), *((jnp.asarray(labels),) if cross_entropy else ()))

  def value(x):
    rows = dense.per_token(loop, config, traced, x, *others)
    return jnp.sum(rows.value), rows

  def oracle(x):
    rows = reference_impl.per_token(config, traced, x, *others)
    return jnp.sum(rows.value), rows

  x = jnp.asarray(student)
  (_, rows), grad = jax.value_and_grad(value, has_aux=True)(x)
  (_, want_rows), want_grad = jax.value_and_grad(oracle, has_aux=True)(x)
  return (student, teacher, labels), rows, grad, want_rows, want_grad


def _float64_values(divergence, student, teacher, labels, *, temperature, cross_entropy,
                    kd_coef=0.6):
  """Per-token float64 values, T**2 scaled, NaN where an input is NaN or +inf."""
  values = reference.per_token(divergence, student, teacher, temperature=temperature,
                               **HYPERPARAMETERS) * temperature**2
  if cross_entropy:
    log_q = reference.log_softmax(student)
    safe = np.clip(labels, 0, student.shape[-1] - 1)
    ce = -np.take_along_axis(log_q, safe[:, None], -1)[:, 0]
    values = kd_coef * values + (1 - kd_coef) * ce
  bad = np.any(np.isnan(student) | np.isnan(teacher) | (student == np.inf)
               | (teacher == np.inf), axis=-1)
  return np.where(bad, np.nan, values)


def _assert_grads_close(grad, want_grad, values, rows):
  """Row by row: a gradient entry is a difference of the row's terms, so its float32 error
  is relative to the token's value (a peaked row's terms reach tens)."""
  for row in np.flatnonzero(rows):
    np.testing.assert_allclose(grad[row], want_grad[row], rtol=2e-4,
                               atol=1e-6 * (1.0 + abs(values[row])), err_msg=f"token {row}")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("divergence", sorted(kdjax.DIVERGENCES))
def test_kernels_match_float64(kernel, divergence):
  """Per-token values against float64, gradients against the reference, T = 0.7."""
  inputs, rows, grad, _, want_grad = _kernel_rows(
      kernel, divergence, temperature=0.7, cross_entropy=False)
  want = _float64_values(divergence, *inputs, temperature=0.7, cross_entropy=False)
  got = np.asarray(rows.value, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=2e-5, atol=2e-5)
  if div.DIVERGENCES[divergence].online(HYPERPARAMETERS) and divergence != "soft_cross_entropy":
    assert got[12] == 0.0  # equal distributions: the folded KL is exactly 0
  assert np.all(got[[4, 5]] == 0.0)
  grad, want_grad = np.asarray(grad), np.asarray(want_grad)
  assert np.all(np.isnan(grad[~ok]))  # a NaN or +inf logit: NaN value and gradient
  if divergence == "total_variation":
    # |p - q| has no derivative at p = q: token 12 (p = q everywhere) and token 10 (a teacher
    # one-hot to float32 precision, where sign(p - q) at entries of ~1e-10 is rounding).
    ok[[10, 12]] = False
  _assert_grads_close(grad, want_grad, want, ok)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "soft_cross_entropy",
                                        "generalized_jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, "traced"])
def test_kernels_with_cross_entropy_match_float64(kernel, divergence, temperature):
  """The hard-label cross entropy folded in the first walk (its label's entry, a third
  log-sum-exp at temperature 1 when T may differ from 1)."""
  t = jnp.float32(2.0) if temperature == "traced" else temperature
  inputs, rows, grad, _, want_grad = _kernel_rows(
      kernel, divergence, temperature=t, cross_entropy=True)
  student, teacher, labels = inputs
  want = _float64_values(divergence, *inputs, temperature=float(t), cross_entropy=True)
  got = np.asarray(rows.value, np.float64)
  counted = labels != IGNORE
  np.testing.assert_array_equal(np.isnan(got[counted]), np.isnan(want[counted]))
  ok = counted & ~np.isnan(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=2e-5, atol=2e-5)
  _assert_grads_close(np.asarray(grad), np.asarray(want_grad), want, ok)


def _online_value(online, log_p, log_q):
  """The fold's definition in float64: sum over both-mass entries of w (a log p + b log q)."""
  both = np.isfinite(log_p) & np.isfinite(log_q)
  weight = np.exp(log_p if online.weight == "teacher" else log_q)
  terms = np.where(both, weight * (online.teacher * np.where(both, log_p, 0.0)
                                   + online.student * np.where(both, log_q, 0.0)), 0.0)
  return terms.sum(-1), np.where(both, weight, 0.0).sum(-1)


@pytest.mark.parametrize("divergence,hp", [
    ("forward_kl", {}), ("reverse_kl", {}), ("soft_cross_entropy", {}),
    ("generalized_jsd", {"beta": 0.0}), ("generalized_jsd", {"beta": 1.0})])
def test_online_folds_are_the_divergences(divergence, hp):
  """Each ``online`` entry of DIVERGENCES states the divergence's value (and the sum of its
  derivatives with respect to log q) -- checked here against the float64 definition, with
  entries of -inf on either side."""
  online = div.DIVERGENCES[divergence].online(hp)
  assert online is not None
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 6, 50)) * 3
  teacher[1, :10] = -np.inf
  student[2, 5:20] = -np.inf
  log_q, log_p = reference.log_softmax(student), reference.log_softmax(teacher)
  value, mass = _online_value(online, log_p, log_q)
  np.testing.assert_allclose(value, reference.per_token(divergence, student, teacher, **hp),
                             rtol=1e-12, atol=1e-12)
  # The derivative's sum from the spec's terms, in float64.
  with jax.enable_x64(True):
    terms = div.DIVERGENCES[divergence].terms(
        div.dist(jnp.asarray(log_p)), div.dist(jnp.asarray(log_q)), hp)
    dlog_q = np.asarray(jnp.sum(terms.dlog_q, axis=-1))
  np.testing.assert_allclose(dlog_q, online.dvalue * value + online.dmass * mass,
                             rtol=1e-12, atol=1e-12)


def test_folds_only_where_the_value_needs_no_final_normaliser():
  online = {name: spec.online(dict(beta=0.5, alpha=0.1))
            for name, spec in div.DIVERGENCES.items()}
  assert {name for name, fold in online.items() if fold is not None} == {
      "forward_kl", "reverse_kl", "soft_cross_entropy"}
  assert div.DIVERGENCES["generalized_jsd"].online({"beta": jnp.float32(0.0)}) is None


MIXTURES = [("generalized_jsd", "beta"), ("skew_forward_kl", "alpha"),
            ("skew_reverse_kl", "alpha")]


def _mixture_float64(mixture, log_p, log_q):
  """A MixtureValue's definition in float64: the value ``teacher KL(p || m) + student KL(q ||
  m)`` and each entry's derivative with respect to ``log q``."""
  p, q = np.exp(log_p), np.exp(log_q)
  m = mixture.mix_teacher * p + mixture.mix_student * q
  safe_m = np.where(m > 0, m, 1.0)

  def kl_terms(x, log_x):
    return np.where(x > 0, x * (np.where(x > 0, log_x, 0.0) - np.log(safe_m)), 0.0)

  value = mixture.teacher * kl_terms(p, log_p) + mixture.student * kl_terms(q, log_q)
  log_ratio = np.where(q > 0, np.where(q > 0, log_q, 0.0) - np.log(safe_m), 0.0)
  dlog_q = q * (mixture.student * (log_ratio + 1.0)
                - mixture.mix_student * (mixture.teacher * p + mixture.student * q) / safe_m)
  return value.sum(-1), dlog_q


@pytest.mark.parametrize("divergence,name", MIXTURES)
@pytest.mark.parametrize("weight", [1e-3, 0.3, 0.999])
def test_mixture_forms_are_the_divergences(divergence, name, weight):
  """Each ``mixture`` entry of DIVERGENCES states the divergence's value and the derivative of
  its terms with respect to log q -- checked against the float64 definition (tests/reference.py)
  and the spec's own terms, with entries of -inf on either side."""
  hp = {name: weight}
  mixture = div.DIVERGENCES[divergence].mixture(hp)
  assert mixture is not None
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 6, 50)) * 3
  teacher[1, :10] = -np.inf
  student[2, 5:20] = -np.inf
  teacher[3, 30:40] = student[3, 30:40] = -np.inf
  log_q, log_p = reference.log_softmax(student), reference.log_softmax(teacher)
  value, dlog_q = _mixture_float64(mixture, log_p, log_q)
  np.testing.assert_allclose(value, reference.per_token(divergence, student, teacher, **hp),
                             rtol=1e-12, atol=1e-14)
  with jax.enable_x64(True):
    terms = div.DIVERGENCES[divergence].terms(
        div.dist(jnp.asarray(log_p)), div.dist(jnp.asarray(log_q)), hp)
    np.testing.assert_allclose(dlog_q, np.asarray(terms.dlog_q), rtol=1e-10, atol=1e-14)


def test_mixture_forms_only_for_a_static_interior_weight():
  """Endpoints (a KL, or 0) and traced weights take the divergence's terms instead."""
  forms = {name: spec.mixture(dict(beta=0.5, alpha=0.1))
           for name, spec in div.DIVERGENCES.items()}
  assert {name for name, form in forms.items() if form is not None} == {
      "generalized_jsd", "skew_forward_kl", "skew_reverse_kl"}
  assert forms["generalized_jsd"].own_weights and not forms["skew_forward_kl"].own_weights
  for divergence, name in MIXTURES:
    for weight in (0.0, 1.0, 0, 1, jnp.float32(0.5)):
      assert div.DIVERGENCES[divergence].mixture({name: weight}) is None


@pytest.mark.parametrize("kernel", ["gpu-fma-300", "tpu-300"])
@pytest.mark.parametrize("divergence,name", MIXTURES)
@pytest.mark.parametrize("weight", [1e-3, 0.999])
def test_mixture_kernels_near_the_endpoints_match_float64(kernel, divergence, name, weight):
  """The kernels' mixture form with a weight near 0 or 1 (a mixture nearly one side), on
  nearly equal distributions (values of 1e-7 and less) and on ordinary ones."""
  variant, vocab = KERNELS[kernel]
  rng = np.random.default_rng(zlib.crc32(f"{kernel} {divergence} {weight}".encode()))
  student = rng.normal(size=(8, vocab)).astype(np.float32) * 3
  teacher = rng.normal(size=(8, vocab)).astype(np.float32) * 3
  teacher[:4] = student[:4] + 1e-3 * rng.normal(size=(4, vocab)).astype(np.float32)
  student[5, :40] = -np.inf
  teacher[6, 50:90] = -np.inf
  hp = checks.hyperparameters(divergence, temperature=1.0, **{name: weight})
  config, traced = config_lib.build(hp, divergence=divergence, temperature_squared=True,
                                    cross_entropy=False)
  loop = pallas.loop(variant, dense.blocked(dense.teacher_logits_block))

  def total(engine, x):
    rows = dense.per_token(engine, config, traced, x, jnp.asarray(teacher))
    return jnp.sum(rows.value), rows

  def oracle(x):
    rows = reference_impl.per_token(config, traced, x, jnp.asarray(teacher))
    return jnp.sum(rows.value), rows

  x = jnp.asarray(student)
  (_, rows), grad = jax.value_and_grad(lambda x: total(loop, x), has_aux=True)(x)
  _, want_grad = jax.value_and_grad(oracle, has_aux=True)(x)
  want = reference.per_token(divergence, student, teacher, **{name: weight})
  got = np.asarray(rows.value, np.float64)
  # Nearly equal rows: about float32's rounding of the terms' sum (entropies of a few nats),
  # as the reference's own float32 evaluation.
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  _assert_grads_close(np.asarray(grad), np.asarray(want_grad), want, np.ones(8, bool))


@pytest.mark.parametrize("implementation", ["reference", "blocked", "pallas"])
@pytest.mark.parametrize("traced", [False, True])
def test_kd_coef_zero_and_one_drop_the_other_term_exactly(implementation, traced):
  # A counted label on a -inf student logit: its cross entropy is +inf, and kd_coef = 1 must
  # not turn 0 * inf into NaN; kd_coef = 0 gives the cross entropy alone (+inf here).
  logits = np.array([[0.0, 1.0, -np.inf, 2.0], [1.0, 0.0, -np.inf, 0.0]], np.float32)
  teacher = np.array([[0.5, 0.0, 1.0, 2.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
  labels = np.array([2, 0])
  forward_kl = reference.per_token("forward_kl", logits, teacher)
  cross_entropy = reference.cross_entropy(logits.astype(np.float64), labels)
  # The fused head with one-hot hidden states: the logits are the kernels' rows plus the bias,
  # -inf on the entry both rows mask.
  hidden = np.eye(4, dtype=np.float32)[:2]
  bias = np.array([0.0, 0.0, -np.inf, 0.0], np.float32)
  student_kernel = np.concatenate([np.where(np.isinf(logits), 0.0, logits), np.zeros((2, 4))])
  teacher_kernel = np.concatenate([teacher, np.zeros((2, 4))])

  def dense(kd_coef, logits):
    return kdjax.distill_with_cross_entropy(logits, teacher, labels, kd_coef=kd_coef,
                                            implementation=implementation)

  def fused(kd_coef, kernel):
    return kdjax.fused_linear_distill_with_cross_entropy(
        hidden, kernel, hidden, teacher_kernel, labels, kd_coef=kd_coef, student_bias=bias,
        implementation=None if implementation == "pallas" else implementation)

  for kd_coef, expected in ((1.0, forward_kl.mean()), (0.0, cross_entropy.mean())):
    assert np.isfinite(expected) == (kd_coef == 1.0)
    coef = jnp.float32(kd_coef) if traced else kd_coef
    for loss, argument in ((dense, logits), (fused, student_kernel.astype(np.float32))):
      run = jax.value_and_grad(loss, argnums=1)
      value, grad = (jax.jit(run) if traced else run)(coef, argument)
      np.testing.assert_allclose(value, expected, rtol=1e-5)
      if kd_coef == 1.0:
        assert np.isfinite(grad).all()

