"""The Pallas kernels (``implementation="pallas"``) against the reference, on CPU.

Values and gradients come from the kernels in Pallas interpret mode (what ``"pallas"`` runs on
CPU: the GPU kernel, and the TPU kernel called directly) and are compared with
``implementation="reference"``, the readable whole-array definition differentiated by JAX. The
GPU and TPU programs are checked by lowering for ``cuda`` and ``tpu`` at LLM sizes: lowering
allocates nothing, and the lowered program must contain the kernel.
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import kdjax
from kdjax._src import checks, dense, pallas, reductions, reference
from kdjax._src import config as config_lib
from kdjax._src import divergences as div

IGNORE = -100
# Two full GPU tiles and a ragged one; the last 7 entries are padding (-inf on both sides).
VOCAB = 2 * pallas.GPU_TILE + 300
PADDING = 7


def _inputs(seed, shape, dtype, *, cross_entropy=True):
  """Logits with every -inf pattern, labels with ignored tokens, and an ignored NaN row.

  Token 1 has no student mass, token 2 no teacher mass; token 3 has teacher entries of
  -inf, token 4 student entries of -inf; the vocabulary ends in padding. Token 5 is ignored
  and holds NaN. Labels never point at a -inf student entry; with ``cross_entropy`` token 1
  is ignored (its cross entropy would be infinite).
  """
  rng = np.random.default_rng(seed)
  vocab = shape[-1]
  student = rng.normal(size=shape).astype(np.float32) * 3
  teacher = rng.normal(size=shape).astype(np.float32) * 3
  flat_student = student.reshape(-1, vocab)
  flat_teacher = teacher.reshape(-1, vocab)
  flat_student[1] = -np.inf
  flat_teacher[2] = -np.inf
  flat_teacher[3, 10:60] = -np.inf
  flat_student[4, 100:130] = -np.inf
  flat_student[5] = np.nan
  flat_student[:, vocab - PADDING:] = -np.inf
  flat_teacher[:, vocab - PADDING:] = -np.inf
  labels = rng.integers(200, vocab - PADDING, shape[:-1]).astype(np.int32)
  flat_labels = labels.reshape(-1)
  flat_labels[[1, 5, 7] if cross_entropy else [5, 7]] = IGNORE
  return (jnp.asarray(student, dtype), jnp.asarray(teacher, dtype), jnp.asarray(labels))


def _hyperparameters(divergence):
  """Traced beta for the JSD (its endpoints are selected at run time), static alpha; only
  those ``divergence`` reads."""
  given = dict(beta=jnp.float32(0.3), alpha=0.2)
  return {name: given[name] for name in div.DIVERGENCES[divergence].hyperparameters}


def _assert_close(got, want, *, rtol, atol=1e-6):
  """Close to ``rtol``, or to ``atol`` times the largest finite entry: a gradient entry is a
  difference of the row's terms, so its float32 error is relative to the row's scale."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  finite = np.abs(want[np.isfinite(want)])
  scale = finite.max() if finite.size else 1.0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("divergence", kdjax.DIVERGENCES)
def test_distill_loss_matches_reference(divergence):
  """float32, traced temperature, T**2, the mean over unignored tokens: the weighted sum."""
  logits, teacher, labels = _inputs(1, (2, 5, VOCAB), jnp.float32, cross_entropy=False)

  def loss(x, implementation):
    return kdjax.distill_loss(
        x, teacher, labels, divergence=divergence, temperature=jnp.float32(1.7),
        temperature_squared=True, implementation=implementation,
        **_hyperparameters(divergence))

  value, grad = jax.value_and_grad(loss)(logits, "pallas")
  want_value, want_grad = jax.value_and_grad(loss)(logits, "reference")
  assert grad.dtype == logits.dtype
  _assert_close(value, want_value, rtol=2e-5)
  _assert_close(grad, want_grad, rtol=2e-4)
  assert np.all(np.asarray(grad).reshape(-1, VOCAB)[[1, 2, 5, 7]] == 0)


@pytest.mark.parametrize("divergence", kdjax.DIVERGENCES)
def test_cross_entropy_bf16_per_token_matches_reference(divergence):
  """bfloat16, static temperature, the combined cross entropy, per-token values (the per-token
  engine, with an arbitrary cotangent); a counted NaN token is NaN in both."""
  logits, teacher, labels = _inputs(2, (9, VOCAB), jnp.bfloat16)
  logits = logits.at[6, 50].set(jnp.nan)
  cotangent = jnp.asarray(np.random.default_rng(3).normal(size=labels.shape), jnp.float32)

  def per_token(implementation):
    fn = lambda x: kdjax.distill_with_cross_entropy(  # noqa: E731
        x, teacher, labels, kd_coef=jnp.float32(0.25), divergence=divergence,
        temperature=2.0, reduction="none", implementation=implementation,
        **_hyperparameters(divergence))
    values, vjp = jax.vjp(fn, logits)
    return values, vjp(cotangent)[0]

  values, grad = per_token("pallas")
  want_values, want_grad = per_token("reference")
  assert grad.dtype == jnp.bfloat16
  assert np.isnan(values[6]) and np.all(np.isnan(np.asarray(grad[6], np.float32)))
  _assert_close(values, want_values, rtol=2e-5)
  # Both round the same float32 gradient to bfloat16: at most one bfloat16 step apart.
  _assert_close(grad, want_grad, rtol=1e-2, atol=1e-3)


def test_cross_entropy_at_temperature_one_and_kd_loss():
  """Static T = 1 (the cross entropy reuses the student's statistics), and kd_loss."""
  logits, teacher, labels = _inputs(4, (2, 4, VOCAB), jnp.float32)
  for loss in (
      lambda x, impl: kdjax.distill_with_cross_entropy(
          x, teacher, labels, kd_coef=0.7, divergence="reverse_kl", reduction="sum",
          implementation=impl),
      lambda x, impl: kdjax.kd_loss(x, teacher, labels, implementation=impl)):
    value, grad = jax.value_and_grad(loss)(logits, "pallas")
    want_value, want_grad = jax.value_and_grad(loss)(logits, "reference")
    _assert_close(value, want_value, rtol=2e-5)
    _assert_close(grad, want_grad, rtol=2e-4)


# The kernels called directly: both variants in interpret mode, with small tiles (many tiles
# and a ragged one at a small vocabulary) and, for the TPU kernel, 8-row blocks (ragged too).
VARIANTS = {
    "gpu": pallas.Variant("triton", 128, interpret=True),
    "tpu": pallas.Variant("mosaic", 128, interpret=True, rows=8),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("divergence", ["generalized_jsd", "total_variation"])
def test_kernel_variants_match_reference(variant, divergence):
  logits, teacher, labels = _inputs(5, (13, 300), jnp.float32)
  mask = labels != IGNORE
  weights = reductions.reduction_weights(mask, reduction="mean")
  hp = checks.hyperparameters(divergence, temperature=jnp.float32(0.8), kd_coef=jnp.float32(0.6),
                              **_hyperparameters(divergence))
  config, traced = config_lib.build(hp, divergence=divergence, temperature_squared=True,
                                    cross_entropy=True)
  loop = pallas.loop(VARIANTS[variant], dense.blocked(dense.teacher_logits_block))

  def kernel(x):
    return dense.weighted_sum(loop, config, traced, x, weights, teacher, labels)[0]

  def oracle(x):
    rows = reference.per_token(config, traced, x, teacher, labels, counted=mask)
    return reductions.weighted_total(rows.value, weights)

  value, grad = jax.value_and_grad(kernel)(logits)
  want_value, want_grad = jax.value_and_grad(oracle)(logits)
  _assert_close(value, want_value, rtol=2e-5)
  _assert_close(grad, want_grad, rtol=2e-4)


def test_kernel_per_device_inside_shard_map():
  """Data parallel: each device runs the kernel on its tokens. (Interpret mode's masked loads
  do not type-check under shard_map's varying-axes check: that check is off here.)"""
  logits, teacher, labels = _inputs(7, (16, 300), jnp.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def local(student, teacher, labels):
    total, count = kdjax.distill_loss_sum_and_count(
        student, teacher, labels, divergence="skew_forward_kl", implementation="pallas")
    return total[None], count[None]

  def loss(student):
    totals, counts = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=(P("data"), P("data")),
        check_vma=False)(student, teacher, labels)
    return jnp.sum(totals) / jnp.sum(counts)

  value, grad = jax.jit(jax.value_and_grad(loss))(logits)
  want_value, want_grad = jax.value_and_grad(lambda x: kdjax.distill_loss(
      x, teacher, labels, divergence="skew_forward_kl", implementation="reference"))(logits)
  _assert_close(value, want_value, rtol=2e-5)
  _assert_close(grad, want_grad, rtol=2e-4)


def test_pallas_only_for_dense_losses():
  logits = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match="pallas"):
    kdjax.sparse_distill_loss(logits, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2)),
                              implementation="pallas")
  with pytest.raises(ValueError, match="pallas"):
    kdjax.fused_linear_distill_loss(jnp.zeros((2, 3)), jnp.zeros((3, 8)), jnp.zeros((2, 3)),
                                    jnp.zeros((3, 8)), implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    kdjax.kd_loss(logits, logits, jnp.zeros((2,), jnp.int32), implementation="triton")


# ----------------------------------------------------------------------------------------------
# Lowering for GPUs and TPUs.
# ----------------------------------------------------------------------------------------------

TOKENS, LLM_VOCAB = 16384, 128256
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


# The chips lowering rules read (jax 0.12 requires an abstract GPU device to lower for cuda).
ABSTRACT_DEVICES = {"tpu": ("TPU v5 lite", 1), "cuda": ("NVIDIA H100 80GB HBM3", 132)}


def _mesh(platform, devices=1, *, shape=None, names=("data",), axis_type=None):
  """An abstract mesh of ``devices`` along "data" (or of ``shape`` along ``names``), with the
  chip, which lowering rules read."""
  kind, cores = ABSTRACT_DEVICES[platform]
  try:
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores,
                                         platform="tpu" if platform == "tpu" else "gpu")
  except TypeError:  # jax 0.10.0 (the declared floor): no platform; the device kind says it.
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores)
  shape = shape or (devices,)
  if axis_type is None:
    axis_type = jax.sharding.AxisType.Explicit if devices > 1 else jax.sharding.AxisType.Auto
  return jax.sharding.AbstractMesh(shape, names, axis_types=(axis_type,) * len(shape),
                                   abstract_device=device)


def _for(platform):
  if platform not in KERNEL_CALL:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(_mesh(platform))


def _lowered(fn, platform, *shapes):
  with _for(platform):
    return jax.jit(jax.value_and_grad(fn)).trace(*shapes).lower(
        lowering_platforms=(platform,)).as_text()


def _logits_shapes(dtype=jnp.bfloat16, vocab=LLM_VOCAB):
  return (jax.ShapeDtypeStruct((TOKENS, vocab), dtype),) * 2 + (
      jax.ShapeDtypeStruct((TOKENS,), jnp.int32),)


DENSE_LOSSES = {
    "kd_loss": lambda x, t, y, implementation=None: kdjax.kd_loss(
        x, t, y, implementation=implementation),
    **{divergence: lambda x, t, y, d=divergence, implementation=None: kdjax.distill_loss(
        x, t, y, divergence=d, implementation=implementation)
       for divergence in kdjax.DIVERGENCES},
    "combined_traced_temperature": lambda x, t, y, implementation=None: (
        kdjax.distill_with_cross_entropy(x, t, y, divergence="generalized_jsd",
                                         temperature=jnp.float32(2.0),
                                         implementation=implementation)),
    "per_token": lambda x, t, y, implementation=None: jnp.sum(kdjax.forward_kl(
        x, t, implementation=implementation)),
}


@pytest.mark.parametrize("platform", sorted(KERNEL_CALL))
@pytest.mark.parametrize("loss", sorted(DENSE_LOSSES))
def test_default_lowers_to_one_kernel(platform, loss):
  """The default on GPUs and TPUs: one kernel call computes value and gradient, no loop."""
  text = _lowered(DENSE_LOSSES[loss], platform, *_logits_shapes())
  assert text.count(KERNEL_CALL[platform]) == 1
  assert "stablehlo.while" not in text


@pytest.mark.parametrize("platform", sorted(KERNEL_CALL))
def test_lowers_per_device_inside_shard_map(platform):
  """Data parallel over 8 devices: each runs the kernel on its tokens."""
  mesh = _mesh(platform, devices=8)

  def local(student, teacher, labels):
    total, count = kdjax.distill_loss_sum_and_count(student, teacher, labels)
    total, count = jax.lax.psum((total, count), "data")
    return total / jnp.maximum(count, 1.0)

  loss = jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P())
  sharding = jax.sharding.NamedSharding(mesh, P("data"))
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in _logits_shapes()]
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.value_and_grad(loss)).trace(*shapes).lower(
        lowering_platforms=(platform,)).as_text()
  assert text.count(KERNEL_CALL[platform]) == 1
  assert "stablehlo.while" not in text


GSPMD_MESHES = {"8 on data": ((8,), ("data",)), "2 data x 4 model": ((2, 4), ("data", "model"))}
COLLECTIVES = ("all_gather", "all_to_all", "all_reduce", "reduce_scatter", "collective_permute")


def _gspmd_lowered(loss, platform, mesh, specs, implementation=None):
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype,
                                 sharding=jax.sharding.NamedSharding(mesh, spec))
            for s, spec in zip(_logits_shapes(), specs, strict=True)]
  fn = functools.partial(DENSE_LOSSES[loss], implementation=implementation)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(jax.value_and_grad(fn)).trace(*shapes).lower(
        lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("mesh_name", sorted(GSPMD_MESHES))
@pytest.mark.parametrize("platform", sorted(KERNEL_CALL))
@pytest.mark.parametrize("loss", ["kd_loss", "combined_traced_temperature", "per_token"])
def test_gspmd_lowers_to_the_kernel_per_device(loss, platform, mesh_name, axis_type):
  """jax.jit with token-sharded arguments (the vocabulary replicated), on 8 devices: the kernel
  runs per device inside one manual computation; no loop, and no collective that moves the
  tokens (XLA adds the loss's scalar all-reduce when it partitions the program). Auto axes with
  two axes of several devices leave the tokens' sharding unknown: the blocked engine runs."""
  shape, names = GSPMD_MESHES[mesh_name]
  mesh = _mesh(platform, shape=shape, names=names,
               axis_type=getattr(jax.sharding.AxisType, axis_type))
  text = _gspmd_lowered(loss, platform, mesh, (P("data"),) * 3)
  assert not [op for op in COLLECTIVES if f"stablehlo.{op}" in text]
  if axis_type == "Auto" and len(shape) > 1:
    assert KERNEL_CALL[platform] not in text and "stablehlo.while" in text
    return
  assert text.count(KERNEL_CALL[platform]) == 1
  assert text.count("sdy.manual_computation") == 1
  assert "stablehlo.while" not in text


@pytest.mark.parametrize("platform", sorted(KERNEL_CALL))
def test_a_vocabulary_sharded_mesh_has_no_kernel(platform):
  """Explicit axes with the vocabulary over "model": the default runs the blocked engine,
  which GSPMD partitions over both axes; implementation="pallas" says why it cannot run."""
  mesh = _mesh(platform, shape=(2, 4), names=("data", "model"),
               axis_type=jax.sharding.AxisType.Explicit)
  specs = (P("data", "model"), P("data", "model"), P("data"))
  text = _gspmd_lowered("kd_loss", platform, mesh, specs)
  assert KERNEL_CALL[platform] not in text and "stablehlo.while" in text
  with pytest.raises(ValueError, match=r"vocabulary \(logits' last axis\) is sharded over mesh "
                                       r"axes \('model',\)"):
    _gspmd_lowered("kd_loss", platform, mesh, specs, implementation="pallas")


SHARDINGS = {"no mesh": None, "tokens": P("data"), "vocabulary": P(None, "data")}


@pytest.mark.parametrize(("sharded", "axis_type"), [
    ("no mesh", None), ("tokens", "Explicit"), ("tokens", "Auto"), ("vocabulary", "Explicit"),
    ("vocabulary", "Auto")])
def test_which_engine_the_default_runs_per_sharding(sharded, axis_type):
  """The default under jax.jit, lowered for cuda, by how both logits are sharded on 8 devices
  (what docs/accelerators.md and docs/sharding.md say): with no mesh, one kernel call; tokens
  sharded, the kernel per device in one manual computation; the vocabulary sharded, on Explicit
  axes the blocked engine (a loop, no kernel), and on Auto axes -- where the arrays' types do
  not say how they are sharded -- the kernel with the tokens split over the mesh's one axis
  of several devices, as if they were sharded there."""
  tokens, vocab = 2048, 32000
  if SHARDINGS[sharded] is None:
    mesh, shapes = _mesh("cuda"), _logits_shapes(vocab=vocab)
  else:
    mesh = _mesh("cuda", shape=(8,), axis_type=getattr(jax.sharding.AxisType, axis_type))
    specs = (SHARDINGS[sharded],) * 2 + (P(SHARDINGS[sharded][0]),)
    shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype,
                                   sharding=jax.sharding.NamedSharding(mesh, spec))
              for s, spec in zip(_logits_shapes(vocab=vocab), specs, strict=True)]
  shapes = [jax.ShapeDtypeStruct((tokens,) + s.shape[1:], s.dtype, sharding=s.sharding)
            for s in shapes]
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.value_and_grad(DENSE_LOSSES["kd_loss"])).trace(*shapes).lower(
        lowering_platforms=("cuda",)).as_text()
  kernel = not (sharded == "vocabulary" and axis_type == "Explicit")
  assert text.count(KERNEL_CALL["cuda"]) == int(kernel)
  assert ("stablehlo.while" in text) == (not kernel)
  assert text.count("sdy.manual_computation") == int(kernel and sharded != "no mesh")


def test_auto_axes_move_vocabulary_sharded_logits_to_the_kernel():
  """On Auto axes the kernel runs per device even where the logits arrive sharded over the
  vocabulary: the partitioner moves them to the tokens' split (all-to-alls of the logits), and
  the value and the gradient are the single-device ones. On Explicit axes the same arguments
  keep the blocked engine, which moves only per-token statistics. Compiled on 8 CPU devices
  with the kernel interpreted (implementation="pallas"), the split the default takes on GPUs."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (conftest forces 8 CPU devices)")
  logits, teacher, labels = _inputs(9, (64, 512), jnp.float32)
  want_value, want_grad = jax.value_and_grad(lambda x: kdjax.kd_loss(
      x, teacher, labels, implementation="reference"))(logits)
  collectives = {}
  for axis_type, implementation in (("Auto", "pallas"), ("Explicit", None)):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    vocabulary = jax.sharding.NamedSharding(mesh, P(None, "data"))
    args = [jax.device_put(x, s) for x, s in (
        (logits, vocabulary), (teacher, vocabulary),
        (labels, jax.sharding.NamedSharding(mesh, P())))]
    compiled = jax.jit(jax.value_and_grad(lambda x, t, y, i=implementation: kdjax.kd_loss(
        x, t, y, implementation=i))).lower(*args).compile()
    value, grad = compiled(*args)
    _assert_close(value, want_value, rtol=2e-5)
    _assert_close(grad, want_grad, rtol=2e-4)
    text = compiled.as_text()
    collectives[axis_type] = {op for op in ("all-to-all", "all-gather") if f" {op}(" in text
                              or f" {op}-start(" in text}
  assert collectives == {"Auto": {"all-to-all"}, "Explicit": set()}


def test_pallas_refuses_where_no_kernel_applies():
  """implementation="pallas" never runs another engine; the default falls back to it."""
  mixed = jax.sharding.AbstractMesh(
      (2, 4), ("data", "model"),
      axis_types=(jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto))
  uneven = jax.sharding.AbstractMesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  cases = [(mixed, TOKENS, "mixes Explicit axes"),
           (uneven, TOKENS - 4, "16380 tokens do not split evenly over the 8 devices")]
  for mesh, tokens, message in cases:
    shapes = [jax.ShapeDtypeStruct((tokens,) + s.shape[1:], s.dtype,
                                   sharding=jax.sharding.NamedSharding(mesh, P()))
              for s in _logits_shapes()]
    for implementation, platform in ((None, "cuda"), ("pallas", "cuda"), ("pallas", "cpu")):
      fn = functools.partial(DENSE_LOSSES["kd_loss"], implementation=implementation)
      with jax.sharding.use_abstract_mesh(mesh):
        lowered = lambda fn=fn, platform=platform, shapes=shapes: jax.jit(  # noqa: E731
            jax.value_and_grad(fn)).trace(*shapes).lower(lowering_platforms=(platform,))
        if implementation is None:
          assert KERNEL_CALL["cuda"] not in lowered().as_text()
        else:
          with pytest.raises(ValueError, match=message):
            lowered()
  float64 = [jax.ShapeDtypeStruct(s.shape[:1] + (512,), jnp.float64) for s in _logits_shapes()[:2]]
  with jax.enable_x64(True), pytest.raises(ValueError, match="float32, bfloat16 or float16"):
    jax.jit(lambda x, t: kdjax.distill_loss(x, t, implementation="pallas")).trace(
        *float64).lower(lowering_platforms=("cuda",))


def test_tpu_falls_back_when_blocks_exceed_vmem():
  """float32 rows of 524288 entries: 8-row blocks would take 96 MiB of VMEM, more than the
  budget of a 128 MiB v5e. The blocked engine runs, in accelerator-sized blocks."""
  shapes = _logits_shapes(jnp.float32, vocab=524288)
  text = _lowered(DENSE_LOSSES["forward_kl"], "tpu", *shapes)
  assert "tpu_custom_call" not in text and "stablehlo.while" in text
  with pytest.raises(ValueError, match="do not fit the core's VMEM"):
    _lowered(functools.partial(DENSE_LOSSES["forward_kl"], implementation="pallas"), "tpu",
             *shapes)


@pytest.mark.parametrize("platform", sorted(KERNEL_CALL))
def test_fused_head_lowers(platform):
  tokens, hidden = 8192, 4096
  shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
            for s in ((tokens, hidden), (hidden, LLM_VOCAB)) * 2]
  labels = jax.ShapeDtypeStruct((tokens,), jnp.int32)

  def loss(student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels):
    return kdjax.fused_linear_distill_loss(
        student_hidden, student_kernel, teacher_hidden, teacher_kernel, labels)

  with _for(platform):
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*shapes, labels).lower(
        lowering_platforms=(platform,)).as_text()
  assert "stablehlo.while" in text


def _compiled(fn, *args):
  text = jax.jit(jax.value_and_grad(fn)).lower(*args).compile().as_text()
  text = re.sub(r", metadata=\{[^}]*\}|, stack_frame_id=\d+", "", text.split("ENTRY", 1)[1])
  # The entry computation's name carries a counter of the names XLA made while compiling.
  return re.sub(r"^ %main\.\d+ ", " %main ", text)


def test_cpu_default_is_the_blocked_program():
  """On CPU the default compiles to exactly the blocked engine's program: no kernel."""
  logits, teacher, labels = _inputs(6, (64, 1000), jnp.bfloat16)
  programs = {
      implementation: _compiled(lambda x, i=implementation: kdjax.kd_loss(
          x, teacher, labels, implementation=i), logits)
      for implementation in (None, "blocked")}
  assert programs[None] == programs["blocked"]
  assert "custom-call" not in programs[None]


def test_lowering_for_cpu_traces_no_kernel(monkeypatch):
  """The default's kernels are traced only when the program is lowered for GPUs or TPUs: with
  Pallas unusable, the CPU program still traces, lowers and runs; lowering for cuda fails."""
  logits, teacher, labels = _inputs(8, (24, 1000), jnp.float32)  # shapes no other test lowers

  def no_kernels(*args, **kwargs):
    raise AssertionError("a kernel was traced")

  monkeypatch.setattr(pallas.pl, "pallas_call", no_kernels)

  def loss(x):
    return kdjax.distill_with_cross_entropy(x, teacher, labels, divergence="generalized_jsd")

  traced = jax.jit(jax.value_and_grad(loss)).trace(logits)
  value, grad = traced.lower().compile()(logits)
  want_value, want_grad = jax.value_and_grad(lambda x: kdjax.distill_with_cross_entropy(
      x, teacher, labels, divergence="generalized_jsd", implementation="reference"))(logits)
  _assert_close(value, want_value, rtol=2e-5)
  _assert_close(grad, want_grad, rtol=2e-4)
  with pytest.raises(AssertionError, match="a kernel was traced"):
    traced.lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("vmem_mib,rows,stash", [(128, 64, True), (64, 32, False)])
def test_tpu_blocks_stash_a_mixture_only_where_it_costs_no_rows(monkeypatch, vmem_mib, rows,
                                                                  stash):
  """A mixture divergence's TPU kernel keeps a group's gradient in VMEM between its last two
  walks where that leaves the block its rows (v5e, v6e: 128 MiB), not where it would halve them
  (v5p: 64 MiB); the KL family never stashes (its gradient walk is its second)."""
  monkeypatch.setattr(pallas, "_tpu_vmem_capacity", lambda: vmem_mib << 20)
  dtypes = (jnp.bfloat16, jnp.bfloat16)

  def config(divergence, **hp):
    return config_lib.build(checks.hyperparameters(divergence, temperature=1.0, **hp),
                            divergence=divergence)[0]

  assert pallas._tpu_plan(config("generalized_jsd"), 128256, dtypes) == (rows, stash)
  assert pallas._tpu_plan(config("skew_reverse_kl"), 128256, dtypes) == (rows, stash)
  assert pallas._tpu_plan(config("forward_kl"), 128256, dtypes) == (rows, False)
  assert pallas._tpu_plan(config("generalized_jsd", beta=1.0), 128256, dtypes) == (rows, False)
  assert pallas._tpu_plan(config("total_variation"), 128256, dtypes) == (rows, False)
