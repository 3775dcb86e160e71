"""Every loss under plain jax.jit with the tokens sharded over a data axis (GSPMD).

Values and gradients equal the single-device run; the compiled programs gather nothing of the
global token count; the fused head sums its kernel gradient over the devices once; per-device
temporaries shrink with the data axis.
"""

import contextlib
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kdjax
from tests.test_sharded import _collectives

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
TOKENS, D, VOCAB = 512, 24, 200  # 24 and 200 are no per-device token or block count.
RTOL = 1e-5

if jax.device_count() < 8:
  pytest.skip("needs 8 devices (conftest forces 8 CPU devices)", allow_module_level=True)


def _data():
  keys = jax.random.split(jax.random.key(0), 6)
  hidden = jax.random.normal(keys[0], (TOKENS, D))
  teacher_hidden = jax.random.normal(keys[1], (TOKENS, D))
  kernel = jax.random.normal(keys[2], (D, VOCAB)) / 3
  teacher_kernel = jax.random.normal(keys[3], (D, VOCAB)) / 3
  labels = jax.random.randint(keys[4], (TOKENS,), 0, VOCAB)
  labels = jnp.where(jax.random.uniform(keys[5], (TOKENS,)) < 0.2, -100, labels)
  return hidden, kernel, teacher_hidden, teacher_kernel, labels


_HIDDEN, _KERNEL, _TEACHER_HIDDEN, _TEACHER_KERNEL, _LABELS = _data()
_TOPK = kdjax.topk_teacher(_TEACHER_HIDDEN @ _TEACHER_KERNEL, 16)


def _materialised(loss):
  def fn(hidden, kernel, teacher_hidden, teacher_kernel, labels):
    return loss(hidden @ kernel, teacher_hidden @ teacher_kernel, labels)
  return fn


def _sparse(hidden, kernel, teacher_hidden, teacher_kernel, labels):
  # A cache's top-k teacher arrives from outside the program, sharded like the tokens.
  ids, logprobs = _TOPK
  del teacher_hidden, teacher_kernel
  return kdjax.sparse_distill_loss(hidden @ kernel, ids, logprobs, labels, tail="bucket",
                                   divergence="reverse_kl")


LOSSES = {
    "distill_loss": _materialised(functools.partial(
        kdjax.distill_loss, divergence="generalized_jsd", temperature=1.5)),
    "distill_with_cross_entropy": _materialised(functools.partial(
        kdjax.distill_with_cross_entropy, kd_coef=0.4)),
    "fused_linear_distill_loss": functools.partial(
        kdjax.fused_linear_distill_loss, divergence="reverse_kl", softcap=5.0),
    "fused_linear_distill_with_cross_entropy": functools.partial(
        kdjax.fused_linear_distill_with_cross_entropy, kd_coef=0.6, temperature=2.0),
    "sparse_distill_loss": _sparse,
}
FUSED = ("fused_linear_distill_loss", "fused_linear_distill_with_cross_entropy")


def _value_and_grads(name):
  return jax.jit(jax.value_and_grad(LOSSES[name], argnums=(0, 1)))


@functools.cache
def _single_device(name):
  fn = _value_and_grads(name)
  args = _data()
  return fn(*args), fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _sharded_args(mesh):
  tokens, kernel = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "model"))
  return [jax.device_put(x, s) for x, s in zip(
      _data(), (tokens, kernel, tokens, kernel, tokens), strict=True)]


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)


def _check_program(hlo_text, name, mesh_shape):
  kernel_grad = (D, VOCAB // mesh_shape[1])
  reduced = []
  for op, shapes in _collectives(hlo_text):
    assert op != "all-to-all", (op, shapes)
    if op == "all-gather":  # only parameters (a vocabulary-sharded kernel) may be gathered
      assert all(TOKENS not in shape and TOKENS // mesh_shape[0] not in shape
                 for shape in shapes), (op, shapes)
    if op == "all-reduce":
      reduced += [tuple(shape) for shape in shapes]
  if name in FUSED:  # the kernel gradient is summed over the data axis once, or not at all
    assert reduced.count(kernel_grad) <= 1, reduced
    if mesh_shape[0] > 1:
      assert reduced.count(kernel_grad) == 1, reduced


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_data_parallel_equals_single_device_and_gathers_no_tokens(name, mesh_shape):
  (want_value, want_grads), _ = _single_device(name)
  args = _sharded_args(jax.make_mesh(mesh_shape, ("data", "model"),
                                     axis_types=(AxisType.Auto,) * 2))
  compiled = _value_and_grads(name).lower(*args).compile()
  value, grads = compiled(*args)
  assert _rel_err(value, want_value) <= RTOL, name
  for grad, want in zip(grads, want_grads, strict=True):
    assert _rel_err(grad, want) <= RTOL, name
  _check_program(compiled.as_text(), name, mesh_shape)


@pytest.mark.parametrize("name", list(LOSSES))
def test_per_device_temporaries_shrink_with_the_data_axis(name):
  _, single = _single_device(name)
  args = _sharded_args(jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2))
  sharded = _value_and_grads(name).lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert sharded <= 0.25 * single, (name, sharded / single)


@pytest.mark.parametrize("name", FUSED + ("distill_with_cross_entropy",))
def test_explicit_axes_and_a_current_mesh(name):
  (want_value, want_grads), _ = _single_device(name)
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    args = _sharded_args(mesh)
    with jax.set_mesh(mesh):
      compiled = _value_and_grads(name).lower(*args).compile()
      value, grads = compiled(*args)
    assert _rel_err(value, want_value) <= RTOL, (name, axis_type)
    for grad, want in zip(grads, want_grads, strict=True):
      assert _rel_err(grad, want) <= RTOL, (name, axis_type)
    _check_program(compiled.as_text(), name, (4, 2))


_WIDE_DATA_AXIS = """
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import tests.test_gspmd as t
mesh = jax.make_mesh((16, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
for name in ("distill_loss", "fused_linear_distill_loss"):
  fn = t._value_and_grads(name)
  (want, want_grads) = fn(*t._data())
  args = t._sharded_args(mesh)
  compiled = fn.lower(*args).compile()
  value, grads = compiled(*args)
  assert t._rel_err(value, want) <= t.RTOL, name
  for grad, w in zip(grads, want_grads):
    assert t._rel_err(grad, w) <= t.RTOL, name
  t._check_program(compiled.as_text(), name, (16, 1))
print("ok")
"""


def test_a_data_axis_wider_than_eight():
  """16 devices on the data axis: blocks are multiples of 16 rows, not the 8 of one device."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _WIDE_DATA_AXIS], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_blocks_are_multiples_of_the_mesh():
  from kdjax._src import blocking

  for devices in (1, 2, 8, 16, 64):
    for policy in (blocking.DENSE, blocking.FUSED, blocking.ACCELERATOR):
      block = blocking.token_block(4096, 32000, policy, groups=devices)
      assert block % devices == 0 and 4096 % block == 0, (devices, policy, block)
  assert blocking.token_block(4096, 32000, blocking.DENSE, groups=1) == 8


@pytest.mark.parametrize("name", ["distill_with_cross_entropy", "fused_linear_distill_loss"])
def test_accelerator_programs_on_a_mesh(name):
  """Lowered for GPUs and TPUs on a data-sharded mesh, the dense loss runs one Pallas call per
  device, and the fused head (no kernel) the blocked engine; that engine with the accelerators'
  block sizes -- what the dense losses run where no kernel applies, a vocabulary-sharded mesh --
  partitioned here, gathers no tokens and still sums the kernel gradient once."""
  from kdjax._src import blocking

  mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  args = _sharded_args(mesh)
  for platform, kernel_call in (("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")):
    lowered = _value_and_grads(name).trace(*args).lower(lowering_platforms=(platform,))
    assert lowered.as_text().count(kernel_call) == (0 if name in FUSED else 1), platform
  policy = blocking.FUSED_ACCELERATOR if name in FUSED else blocking.ACCELERATOR
  block = blocking.token_block(TOKENS, VOCAB, policy, groups=8)
  loss = functools.partial(LOSSES[name], token_block=block) if name in FUSED else (
      _materialised(functools.partial(kdjax.distill_with_cross_entropy, kd_coef=0.4,
                                      token_block=block)))
  (want, want_grads), _ = _single_device(name)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  value, grads = compiled(*args)
  assert _rel_err(value, want) <= RTOL
  for grad, w in zip(grads, want_grads, strict=True):
    assert _rel_err(grad, w) <= RTOL
  _check_program(compiled.as_text(), name, (8, 1))


KERNEL_MESHES = [((8, 1), AxisType.Auto), ((1, 8), AxisType.Auto), ((8, 1), AxisType.Explicit),
                 ((2, 4), AxisType.Explicit)]


def _kernel_loss(implementation):
  return _materialised(functools.partial(
      kdjax.distill_with_cross_entropy, kd_coef=0.4, divergence="generalized_jsd",
      temperature=jnp.float32(1.5), implementation=implementation))


@pytest.mark.parametrize(("mesh_shape", "axis_type"), KERNEL_MESHES)
def test_kernel_per_device_equals_single_device(mesh_shape, axis_type):
  """implementation="pallas" (on CPU the kernel interpreted) under plain jax.jit with the tokens
  sharded over "data" and the head replicated, and with the mesh set: each device runs the
  kernel on its own tokens -- with Auto axes over the one axis of 8 devices, with Explicit ones
  over "data" -- and the value and the gradients of hidden states and head equal the
  single-device reference; the compiled program gathers no tokens."""
  mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(axis_type,) * 2)
  tokens, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  args = [jax.device_put(x, s) for x, s in zip(
      _data(), (tokens, replicated, tokens, replicated, tokens), strict=True)]
  fn = jax.jit(jax.value_and_grad(_kernel_loss("pallas"), argnums=(0, 1)))
  want_value, want_grads = jax.jit(jax.value_and_grad(_kernel_loss("reference"),
                                                      argnums=(0, 1)))(*_data())
  for current_mesh in (False, True):
    with jax.set_mesh(mesh) if current_mesh else contextlib.nullcontext():
      compiled = fn.lower(*args).compile()
      value, grads = compiled(*args)
    assert _rel_err(value, want_value) <= RTOL, current_mesh
    for grad, want in zip(grads, want_grads, strict=True):
      assert _rel_err(grad, want) <= RTOL, current_mesh
    _check_program(compiled.as_text(), "distill_with_cross_entropy", mesh_shape)
    assert "all-to-all" not in compiled.as_text()


def test_auto_axes_of_several_devices_keep_the_blocked_engine():
  """Auto axes (2, 4): how the tokens are sharded is not known at trace time, and a wrong guess
  would make the partitioner gather tokens: the default runs the blocked engine (and equals the
  reference, gathering no tokens); implementation="pallas" says why it cannot run."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  tokens, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  args = [jax.device_put(x, s) for x, s in zip(
      _data(), (tokens, replicated, tokens, replicated, tokens), strict=True)]
  with pytest.raises(ValueError, match=r"Auto axes \('data', 'model'\) leave the tokens'"):
    jax.jit(jax.value_and_grad(_kernel_loss("pallas"))).lower(*args)
  compiled = jax.jit(jax.value_and_grad(_kernel_loss(None), argnums=(0, 1))).lower(
      *args).compile()
  value, grads = compiled(*args)
  want_value, want_grads = jax.value_and_grad(_kernel_loss("reference"), argnums=(0, 1))(
      *_data())
  assert _rel_err(value, want_value) <= RTOL
  for grad, want in zip(grads, want_grads, strict=True):
    assert _rel_err(grad, want) <= RTOL
  _check_program(compiled.as_text(), "distill_with_cross_entropy", (2, 4))
