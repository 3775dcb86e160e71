"""Sharded losses: GSPMD, shard_map (vocabulary- and data-parallel), pmap and multi-process.

Every sharded value and gradient is compared with the single-device run (and values with the
float64 NumPy reference); compiled programs are checked for what they communicate.
"""

import os
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kdjax
from kdjax._src import fused, sharded
from tests import reference

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
# 24 tokens and a vocabulary of 72: no per-device token count (24, 12, 6, 3) or block size
# equals a per-device vocabulary size (72, 36, 18, 9), so HLO shapes tell them apart.
BATCH, SEQ, VOCAB = 8, 3, 72
VOCAB_SPEC, TOKEN_SPEC = P("data", None, "model"), P("data", None)
RTOL = 1e-5
HYPER = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2},
         "skew_reverse_kl": {"alpha": 0.2}}

if jax.device_count() < 8:  # conftest forces 8 CPU devices; anything else is a setup error.
  pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8",
              allow_module_level=True)


def _mesh(shape, axis_type=AxisType.Auto):
  return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)


def _data(seed=0, *, dtype=np.float32):
  """Logits with -inf entries, an all -inf student row, ignored tokens and uneven counts."""
  rng = np.random.default_rng(seed)
  logits = reference.random_logits(rng, (BATCH, SEQ, VOCAB), neg_inf_fraction=0.05)
  teacher = reference.random_logits(rng, (BATCH, SEQ, VOCAB), neg_inf_fraction=0.05)
  logits[2, 1] = -np.inf
  labels = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  labels[0] = -100  # the first data shard of (8, 1) has no valid token at all.
  labels[1, 1:] = -100
  labels[5, 0] = -100
  return logits.astype(dtype), teacher.astype(dtype), labels


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)


def _collectives(hlo_text, *, with_groups=False):
  """``[(op, [shape, ...])]`` for every collective in a compiled HLO module that communicates.

  A collective whose replica groups are all single devices moves nothing and is left out.
  ``with_groups`` adds the replica groups (device id tuples; None in the iota format).
  """
  found = []
  for line in hlo_text.splitlines():
    match = re.search(
        r"=\s*(.*?)\s(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
        r"(?:-start)?\(", line)
    if not match:
      continue
    shapes = [tuple(int(d) for d in dims.split(",") if d)
              for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", match.group(1))]
    groups = re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line)
    groups = groups and [tuple(int(d) for d in g.split(",") if d)
                         for g in re.findall(r"\{([\d,]*)\}", groups.group(1))]
    groups = groups or _mesh_groups(line)
    if groups and all(len(group) <= 1 for group in groups):
      continue
    found.append((match.group(2), shapes, groups) if with_groups else (match.group(2), shapes))
  return found


def _mesh_groups(line):
  """The device id groups of the mesh form of replica groups (jax >= 0.12), as in
  ``replica_groups=mesh['data'=2,'model'=4] {'model'}``: one group per coordinate of the axes not
  named, spanning the named ones, devices numbered in mesh order. None for any other form."""
  match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if not match:
    return None
  sizes = {name: int(size) for name, size in re.findall(r"'(\w+)'=(\d+)", match.group(1))}
  spanned = [list(sizes).index(name) for name in re.findall(r"'(\w+)'", match.group(2))]
  ids = np.arange(np.prod(list(sizes.values()), dtype=int)).reshape(tuple(sizes.values()))
  ids = np.moveaxis(ids, spanned, range(ids.ndim - len(spanned), ids.ndim))
  group_size = int(np.prod([ids.shape[i] for i in range(ids.ndim - len(spanned), ids.ndim)]))
  return [tuple(int(d) for d in group) for group in ids.reshape(-1, group_size)]


def _assert_only_statistics_move(hlo_text, mesh_shape):
  """No gather/all-to-all, and no all-reduce of anything with a vocabulary dimension."""
  vocab_sizes = {VOCAB, VOCAB // mesh_shape[1]}
  collectives = _collectives(hlo_text)
  for op, shapes in collectives:
    assert op == "all-reduce", (op, shapes)
    for shape in shapes:
      assert not vocab_sizes & set(shape), f"all-reduce of a vocabulary-sized array {shape}"
      assert len(shape) <= 1, f"all-reduce of a matrix {shape}"
  if mesh_shape[1] > 1:  # the vocabulary statistics must have crossed devices.
    assert any(shape for _, shapes in collectives for shape in shapes), collectives
  return collectives


# ----------------------------------------------------------------------------------------------
# GSPMD: the public losses under jit on NamedSharding inputs.
# ----------------------------------------------------------------------------------------------


def _assert_data_parallel(hlo_text, *, num_tokens, params=()):
  """No all-gather or all-to-all of anything with the global token count; each parameter shape
  in ``params`` (a kernel gradient) is all-reduced at most once."""
  reduced = []
  for op, shapes in _collectives(hlo_text):
    assert op in ("all-reduce", "collective-permute", "all-gather"), (op, shapes)
    if op == "all-gather":
      assert all(num_tokens not in shape for shape in shapes), (op, shapes)
    reduced += [tuple(shape) for shape in shapes] if op == "all-reduce" else []
  for shape in params:
    assert reduced.count(tuple(shape)) <= 1, (shape, reduced)


def _gspmd_losses(logits, teacher, labels):
  distill = kdjax.distill_loss(
      logits, teacher, labels, divergence="generalized_jsd", beta=0.3, temperature=2.0,
      token_block=8)
  return distill, kdjax.kd_loss(logits, teacher, labels)


def _value_and_grads(fn):
  def run(logits, teacher, labels):
    (a, b), vjp = jax.vjp(lambda x: fn(x, teacher, labels), logits)
    (grad_a,), (grad_b,) = vjp((1.0, 0.0)), vjp((0.0, 1.0))
    return a, b, grad_a, grad_b
  return jax.jit(run)


@pytest.fixture(scope="module")
def single_device():
  logits, teacher, labels = _data()
  outputs = [np.asarray(x) for x in _value_and_grads(_gspmd_losses)(logits, teacher, labels)]
  return (logits, teacher, labels), outputs


def test_single_device_baseline_matches_float64_numpy(single_device):
  (logits, teacher, labels), (distill, kd, *_) = single_device
  mask = labels != -100
  expected = reference.reduce(reference.per_token(
      "generalized_jsd", logits, teacher, beta=0.3, temperature=2.0), mask, "mean")
  np.testing.assert_allclose(distill, expected, rtol=1e-5)
  expected_kd = reference.reduce(
      reference.per_token("soft_cross_entropy", logits, teacher), mask, "mean")
  np.testing.assert_allclose(kd, expected_kd, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_gspmd_matches_single_device_and_never_gathers(single_device, mesh_shape):
  (logits, teacher, labels), expected = single_device
  mesh = _mesh(mesh_shape)
  vocab_sharding = NamedSharding(mesh, VOCAB_SPEC)
  args = (jax.device_put(logits, vocab_sharding), jax.device_put(teacher, vocab_sharding),
          jax.device_put(labels, NamedSharding(mesh, TOKEN_SPEC)))
  compiled = _value_and_grads(_gspmd_losses).lower(*args).compile()
  outputs = compiled(*args)
  for actual, want in zip(outputs, expected, strict=True):
    assert _rel_err(actual, want) <= RTOL
  for grad in outputs[2:]:  # gradients come back sharded like the logits.
    assert grad.sharding.is_equivalent_to(vocab_sharding, grad.ndim)
  _assert_only_statistics_move(compiled.as_text(), mesh_shape)


def test_gspmd_on_an_explicit_mesh(single_device):
  """jax.make_mesh's default axis type (Explicit) works too, blocked loop included."""
  (logits, teacher, labels), expected = single_device
  mesh = _mesh((2, 4), AxisType.Explicit)
  vocab_sharding = NamedSharding(mesh, VOCAB_SPEC)
  args = (jax.device_put(logits, vocab_sharding), jax.device_put(teacher, vocab_sharding),
          jax.device_put(labels, NamedSharding(mesh, TOKEN_SPEC)))
  with jax.set_mesh(mesh):
    outputs = _value_and_grads(_gspmd_losses)(*args)
  for actual, want in zip(outputs, expected, strict=True):
    assert _rel_err(actual, want) <= RTOL


# ----------------------------------------------------------------------------------------------
# shard_map: vocab_parallel_distill_loss.
# ----------------------------------------------------------------------------------------------


def _shard_map_value_and_grad(mesh, **kwargs):
  loss = jax.shard_map(
      lambda s, t, y: sharded.vocab_parallel_distill_loss(
          s, t, y, axis_name="model", data_axis_name="data", **kwargs),
      mesh=mesh, in_specs=(VOCAB_SPEC, VOCAB_SPEC, TOKEN_SPEC), out_specs=P())
  return jax.jit(jax.value_and_grad(loss))


CASES = [  # (divergence, reduction, temperature_squared, token_block)
    ("forward_kl", "mean", False, 3),
    ("generalized_jsd", "sum", True, None),
    ("skew_reverse_kl", "sequence_mean", False, 3),
    ("total_variation", "mean", False, None),
]


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_vocab_parallel_matches_single_device(mesh_shape):
  logits, teacher, labels = _data(1)
  mesh = _mesh(mesh_shape)
  index = MESHES.index(mesh_shape)  # two of the cases per mesh keeps compilations few.
  for divergence, reduction, temperature_squared, token_block in (
      CASES[index], CASES[(index + 1) % len(CASES)]):
    kwargs = dict(divergence=divergence, reduction=reduction, temperature=1.5,
                  temperature_squared=temperature_squared, **HYPER.get(divergence, {}))
    value, grad = _shard_map_value_and_grad(mesh, token_block=token_block, **kwargs)(
        logits, teacher, labels)
    want_value, want_grad = jax.value_and_grad(kdjax.distill_loss)(
        logits, teacher, labels, **kwargs)
    assert _rel_err(value, want_value) <= RTOL, divergence
    assert _rel_err(grad, want_grad) <= RTOL, divergence
    per_token = reference.per_token(divergence, logits, teacher, temperature=1.5,
                                    **HYPER.get(divergence, {}))
    per_token = per_token * (1.5**2 if temperature_squared else 1.0)
    expected = reference.reduce(per_token, labels != -100, reduction)
    np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=divergence)
    assert np.all(np.isfinite(grad))


def test_vocab_parallel_gradient_matches_float64_formula():
  """Forward KL's gradient is ``w_i (q - p) / T`` on finite logits: an independent check."""
  rng = np.random.default_rng(3)
  logits = reference.random_logits(rng, (BATCH, SEQ, VOCAB))
  teacher = reference.random_logits(rng, (BATCH, SEQ, VOCAB))
  labels = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  labels[:3] = -100
  temperature = 2.0
  _, grad = _shard_map_value_and_grad(_mesh((2, 4)), temperature=temperature)(
      logits, teacher, labels)
  mask = labels != -100
  q = np.exp(reference.log_softmax(logits / temperature))
  p = np.exp(reference.log_softmax(teacher / temperature))
  expected = (q - p) / temperature * (mask / mask.sum())[..., None]
  assert _rel_err(grad, expected) <= RTOL


def test_vocab_parallel_bf16_and_traced_temperature():
  logits, teacher, labels = _data(2)
  logits16, teacher16 = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  temperature = jnp.asarray(1.7)  # a scheduled temperature: traced, not baked in.
  mesh = _mesh((2, 4))
  loss = jax.shard_map(
      lambda s, t, y, temp: sharded.vocab_parallel_distill_loss(
          s, t, y, axis_name="model", data_axis_name="data", divergence="reverse_kl",
          temperature=temp),
      mesh=mesh, in_specs=(VOCAB_SPEC, VOCAB_SPEC, TOKEN_SPEC, P()), out_specs=P())
  value, grad = jax.jit(jax.value_and_grad(loss))(logits16, teacher16, labels, temperature)
  assert grad.dtype == jnp.bfloat16
  want_value, want_grad = jax.value_and_grad(kdjax.distill_loss)(
      logits16, teacher16, labels, divergence="reverse_kl", temperature=temperature)
  assert _rel_err(value, want_value) <= RTOL
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32),
                             rtol=1e-2, atol=1e-4)
  expected = reference.reduce(reference.per_token(
      "reverse_kl", np.asarray(logits16, np.float32), np.asarray(teacher16, np.float32),
      temperature=1.7), labels != -100, "mean")
  np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_vocab_parallel_hlo_moves_only_statistics(mesh_shape):
  logits, teacher, labels = _data()
  compiled = _shard_map_value_and_grad(
      _mesh(mesh_shape), divergence="skew_forward_kl", alpha=0.2, token_block=3).lower(
          logits, teacher, labels).compile()
  collectives = _assert_only_statistics_move(compiled.as_text(), mesh_shape)
  tokens_per_device = BATCH * SEQ // mesh_shape[0]
  # Per-token statistics ([block] or [tokens] vectors) and scalars, nothing else.
  assert all(s == () or s[0] <= tokens_per_device for _, shapes in collectives for s in shapes)


def test_vocab_parallel_per_token_values_and_all_ignored_batch():
  logits, teacher, labels = _data(4)
  mesh = _mesh((2, 4))
  per_token = jax.jit(jax.shard_map(
      lambda s, t, y: sharded.vocab_parallel_distill_loss(
          s, t, y, axis_name="model", data_axis_name="data", reduction="none"),
      mesh=mesh, in_specs=(VOCAB_SPEC, VOCAB_SPEC, TOKEN_SPEC), out_specs=TOKEN_SPEC))
  expected = reference.reduce(
      reference.per_token("forward_kl", logits, teacher), labels != -100, "none")
  np.testing.assert_allclose(per_token(logits, teacher, labels), expected, rtol=1e-5,
                             atol=1e-7)
  ignored = np.full_like(labels, -100)
  value, grad = _shard_map_value_and_grad(mesh)(logits, teacher, ignored)
  assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_data_parallel_mean_uses_the_global_count():
  """Shards hold 0, 1, ... valid tokens: the mean is over all valid tokens, not of means."""
  logits, teacher, labels = _data(5)
  labels = labels.copy()
  for row in range(BATCH):  # data shard `row` of the (8, 1) mesh keeps `row % 4` tokens.
    labels[row, row % 4:] = -100
  mask = labels != -100
  per_token = reference.per_token("forward_kl", logits, teacher)
  expected = reference.reduce(per_token, mask, "mean")
  mean_of_means = np.mean([per_token[r][mask[r]].mean() for r in range(BATCH) if mask[r].any()])
  assert abs(mean_of_means - expected) > 1e-3 * abs(expected)  # the test can tell them apart.
  mesh = _mesh((8, 1))
  value, grad = _shard_map_value_and_grad(mesh)(logits, teacher, labels)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  want_grad = jax.grad(kdjax.distill_loss)(logits, teacher, labels)
  assert _rel_err(grad, want_grad) <= RTOL
  # A user-given normalizer is the divisor as is (e.g. the count over accumulation steps).
  value, _ = _shard_map_value_and_grad(mesh, normalizer=100.0)(logits, teacher, labels)
  np.testing.assert_allclose(value, per_token[mask].sum() / 100.0, rtol=1e-5)
  # Differentiated inside shard_map (each device its own slice), on a (4, 2) mesh.
  def local(s, t, y):
    return jax.value_and_grad(lambda s: sharded.vocab_parallel_distill_loss(
        s, t, y, axis_name="model", data_axis_name="data"))(s)
  value, grad = jax.jit(jax.shard_map(
      local, mesh=_mesh((4, 2)), in_specs=(VOCAB_SPEC, VOCAB_SPEC, TOKEN_SPEC),
      out_specs=(P(), VOCAB_SPEC)))(logits, teacher, labels)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert _rel_err(grad, want_grad) <= RTOL


def test_data_parallel_sum_and_count_pattern_with_distill_loss_sum_and_count():
  """The documented pattern for data-parallel code: psum (sum, count), divide once."""
  logits, teacher, labels = _data(6)

  def local(s, t, y):
    total, count = kdjax.distill_loss_sum_and_count(s, t, y, divergence="reverse_kl")
    total, count = jax.lax.psum((total, count), "data")
    return total / jnp.maximum(count, 1.0)

  loss = jax.shard_map(local, mesh=_mesh((8, 1)), in_specs=(TOKEN_SPEC + (None,),) * 2
                       + (TOKEN_SPEC,), out_specs=P())
  value, grad = jax.jit(jax.value_and_grad(loss))(logits, teacher, labels)
  want_value, want_grad = jax.value_and_grad(kdjax.distill_loss)(
      logits, teacher, labels, divergence="reverse_kl")
  assert _rel_err(value, want_value) <= RTOL
  assert _rel_err(grad, want_grad) <= RTOL


# ----------------------------------------------------------------------------------------------
# pmap: the batch split over devices with the older API.
# ----------------------------------------------------------------------------------------------


def test_pmap_matches_single_device():
  logits, teacher, labels = _data(7)
  split = lambda x: x.reshape((8, BATCH // 8) + x.shape[1:])  # noqa: E731

  def sum_count_step(s, t, y):
    # The documented pmap pattern: differentiate this device's share (its sum over the global
    # count), then psum the value. (Under pmap the transpose of psum is psum: differentiating
    # a psum-ed loss would scale every gradient by the number of devices.)
    def share(s):
      total, count = kdjax.distill_loss_sum_and_count(s, t, y, divergence="generalized_jsd")
      return total / jnp.maximum(jax.lax.psum(count, "batch"), 1.0)
    value, grad = jax.value_and_grad(share)(s)
    return jax.lax.psum(value, "batch"), grad

  def library_loss(s, t, y):
    return sharded.vocab_parallel_distill_loss(
        s, t, y, axis_name=None, data_axis_name="batch", divergence="generalized_jsd")

  want_value, want_grad = jax.value_and_grad(kdjax.distill_loss)(
      logits, teacher, labels, divergence="generalized_jsd")
  for step in (sum_count_step, jax.value_and_grad(library_loss)):
    value, grad = jax.pmap(step, axis_name="batch")(split(logits), split(teacher), split(labels))
    # Each device's gradient is the global loss's gradient for its own rows.
    assert _rel_err(value, np.full(8, want_value)) <= RTOL
    assert _rel_err(grad.reshape(logits.shape), want_grad) <= RTOL


# ----------------------------------------------------------------------------------------------
# The fused linear head: kernels split along the vocabulary.
# ----------------------------------------------------------------------------------------------

D_STUDENT, D_TEACHER = 16, 40  # neither is a vocabulary size.
FUSED_KWARGS = dict(divergence="generalized_jsd", beta=0.3, temperature=1.5)


@pytest.fixture(scope="module")
def fused_data():
  rng = np.random.default_rng(8)
  student_hidden = rng.normal(size=(BATCH, SEQ, D_STUDENT)).astype(np.float32)
  student_kernel = (rng.normal(size=(D_STUDENT, VOCAB)) / 4).astype(np.float32)
  teacher_hidden = rng.normal(size=(BATCH, SEQ, D_TEACHER)).astype(np.float32)
  teacher_kernel = (rng.normal(size=(D_TEACHER, VOCAB)) / 4).astype(np.float32)
  student_bias = rng.normal(size=(VOCAB,)).astype(np.float32)
  labels = _data()[2]
  inputs = (student_hidden, student_kernel, teacher_hidden, teacher_kernel, student_bias, labels)

  def loss(hs, ws, ht, wt, bs, y):
    return fused.fused_linear_distill_loss(hs, ws, ht, wt, y, student_bias=bs, token_block=8,
                                           **FUSED_KWARGS)

  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 4))(*inputs)
  logits = student_hidden @ student_kernel + student_bias  # the baseline vs float64 NumPy.
  expected = reference.reduce(reference.per_token(
      "generalized_jsd", logits, teacher_hidden @ teacher_kernel, beta=0.3, temperature=1.5),
      labels != -100, "mean")
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  return inputs, loss, value, grads


FUSED_SPECS = (P("data"), P(None, "model"), P("data"), P(None, "model"), P("model"), P("data"))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_fused_gspmd_matches_single_device(fused_data, mesh_shape):
  inputs, loss, want_value, want_grads = fused_data
  mesh = _mesh(mesh_shape)
  args = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(
      inputs, FUSED_SPECS, strict=True)]
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 4))).lower(*args).compile()
  value, grads = compiled(*args)
  assert _rel_err(value, want_value) <= RTOL
  for grad, want in zip(grads, want_grads, strict=True):
    assert _rel_err(grad, want) <= RTOL
  # Per-token statistics and the hidden states' gradient cross the model axis; the kernel and
  # bias gradients are summed over the data axis once, as in plain data parallelism.
  _assert_data_parallel(compiled.as_text(), num_tokens=BATCH * SEQ,
                        params=[(D_STUDENT, VOCAB // mesh_shape[1]), (VOCAB // mesh_shape[1],)])


def _fused_shard_map(mesh, **kwargs):
  def local(hs, ws, ht, wt, bs, y):
    return sharded.vocab_parallel_fused_linear_distill_loss(
        hs, ws, ht, wt, y, student_bias=bs, axis_name="model", data_axis_name="data",
        **FUSED_KWARGS, **kwargs)
  loss = jax.shard_map(local, mesh=mesh, in_specs=FUSED_SPECS, out_specs=P())
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 4)))


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_vocab_parallel_fused_matches_single_device(fused_data, mesh_shape):
  inputs, _, want_value, want_grads = fused_data
  compiled = _fused_shard_map(_mesh(mesh_shape), token_block=3).lower(*inputs).compile()
  value, grads = compiled(*inputs)
  assert _rel_err(value, want_value) <= RTOL
  for grad, want in zip(grads, want_grads, strict=True):
    assert _rel_err(grad, want) <= RTOL
  # Along the vocabulary axis: per-token statistics and the [tokens, d_student] hidden-state
  # gradient. Vocabulary-sized arrays are reduced only over the data axis: the kernel's and
  # bias's gradients (they are replicated over it), the usual data-parallel gradient sum.
  mesh = _mesh(mesh_shape)
  model_coordinate = {int(d.id): m for (_, m), d in np.ndenumerate(mesh.devices)}
  vocab_sizes = {VOCAB, VOCAB // mesh_shape[1]}
  collectives = _collectives(compiled.as_text(), with_groups=True)
  assert {op for op, _, _ in collectives} == {"all-reduce"}, collectives
  for _, shapes, groups in collectives:
    if any(vocab_sizes & set(shape) for shape in shapes):
      assert groups and all(len({model_coordinate[d] for d in g}) == 1 for g in groups), (
          shapes, groups)
  tokens = BATCH * SEQ // mesh_shape[0]
  assert any((tokens, D_STUDENT) in shapes for _, shapes, _ in collectives), collectives


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
  logits, teacher, labels = _data()
  with pytest.raises(ValueError, match=r"axis_name='model' is not a mesh axis .*shard_map"):
    sharded.vocab_parallel_distill_loss(logits, teacher, labels, axis_name="model")
  mesh = _mesh((2, 4))

  def call(**kwargs):
    fn = jax.shard_map(
        lambda s, t, y: sharded.vocab_parallel_distill_loss(s, t, y, **kwargs),
        mesh=mesh, in_specs=(VOCAB_SPEC, VOCAB_SPEC, TOKEN_SPEC), out_specs=P())
    return jax.jit(fn)(logits, teacher, labels)

  with pytest.raises(ValueError, match="data_axis_name='batch' is not a mesh axis"):
    call(axis_name="model", data_axis_name="batch")
  with pytest.raises(ValueError, match="must be different mesh axes"):
    call(axis_name="model", data_axis_name="model")
  with pytest.raises(ValueError, match="reduction must be one of"):
    call(axis_name="model", data_axis_name="data", reduction="avg")
  with pytest.raises(ValueError, match="temperature must be"):
    call(axis_name="model", data_axis_name="data", temperature=0.0)
  with pytest.raises(ValueError, match="logits and teacher_logits have different vocabulary"):
    sharded.vocab_parallel_distill_loss(logits, teacher[..., :-1], axis_name=None)
  with pytest.raises(ValueError, match=r"labels must have shape logits.shape\[:-1\]"):
    sharded.vocab_parallel_distill_loss(logits, teacher, labels[:, :1], axis_name=None)
  with pytest.raises(TypeError, match="logits must be a floating-point array"):
    sharded.vocab_parallel_distill_loss(labels[..., None], teacher, axis_name=None)
  hidden, kernel = np.ones((4, 8), np.float32), np.ones((8, 32), np.float32)
  with pytest.raises(ValueError, match="axis_name='model' is not a mesh axis"):
    sharded.vocab_parallel_fused_linear_distill_loss(
        hidden, kernel, hidden, kernel, axis_name="model")
  with pytest.raises(ValueError, match="It looks transposed"):
    sharded.vocab_parallel_fused_linear_distill_loss(
        hidden, kernel.T, hidden, kernel, axis_name=None)
  with pytest.raises(ValueError, match="must hold the same vocabulary slice"):
    sharded.vocab_parallel_fused_linear_distill_loss(
        hidden, kernel, hidden, kernel[:, :16], axis_name=None)


def test_known_labels_are_checked_against_the_whole_vocabulary(fused_data):
  """Labels closed over as NumPy inside shard_map are known: checked against the 72 ids of the
  8 slices together (a label past one slice's 9 is valid), label 72 is a ValueError naming its
  position."""
  logits, teacher, labels = _data(3)
  inputs = fused_data[0][:5]
  mesh = _mesh((1, 8))
  last, past = labels.copy(), labels.copy()
  last[2, 1] = VOCAB - 1
  past[2, 1], past[4, 0] = VOCAB, VOCAB + 1

  def dense(y):
    return jax.jit(jax.shard_map(
        lambda s, t: sharded.vocab_parallel_distill_loss(
            s, t, y, axis_name="model", data_axis_name="data"),
        mesh=mesh, in_specs=(VOCAB_SPEC, VOCAB_SPEC), out_specs=P()))(logits, teacher)

  def fused_head(y):
    return jax.jit(jax.shard_map(
        lambda hs, ws, ht, wt, bs: sharded.vocab_parallel_fused_linear_distill_loss(
            hs, ws, ht, wt, y, student_bias=bs, axis_name="model", data_axis_name="data",
            **FUSED_KWARGS),
        mesh=mesh, in_specs=FUSED_SPECS[:5], out_specs=P()))(*inputs)

  for loss, source in ((dense, "logits"), (fused_head, "student_kernel")):
    assert np.isfinite(loss(last))
    with pytest.raises(ValueError, match=(
        rf"^labels must be vocabulary ids in \[0, 72\) \({source}.shape\[-1\] = 72\) or "
        r"ignore_index=-100, got labels\[2, 1\] = 72 \(the first of 2 counted")):
      loss(past)


# ----------------------------------------------------------------------------------------------
# Two processes on localhost.
# ----------------------------------------------------------------------------------------------


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  sys.path.insert(0, os.path.dirname(__file__))
  import _multiprocess_worker as worker  # noqa: PLC0415

  output = tmp_path / "results.npz"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
  address = f"127.0.0.1:{_free_port()}"
  log_paths = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i, log_path in enumerate(log_paths):
      with open(log_path, "wb") as log:
        procs.append(subprocess.Popen(
            [sys.executable, worker.__file__, address, str(i), str(output)],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 90
    # Stop early when one process fails: its peer would wait for it until the timeout.
    while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
           and not any(p.poll() for p in procs)):
      time.sleep(0.1)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  for proc, log_path in zip(procs, log_paths, strict=True):
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]
  results = np.load(output)
  logits, teacher, labels = worker.make_data()
  want_value, want_grad = jax.value_and_grad(kdjax.distill_loss)(
      logits, teacher, labels, **worker.KWARGS)
  for name in ("gspmd", "shard_map"):
    assert _rel_err(results[f"{name}_value"], want_value) <= RTOL, name
    assert _rel_err(results[f"{name}_grad"], want_grad) <= RTOL, name
