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


def _for_lowering(args, platform):
  """``args`` as they lower for ``platform``: for cuda, shapes sharded on the mesh with an
  abstract H100 (jax 0.12 lowers for cuda only with an abstract GPU device; jax 0.10 assumed
  compute capability 9.0, the same program)."""
  if platform != "cuda":
    return args
  try:
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
  except TypeError:  # jax 0.10.0 (the declared floor): no platform; the device kind says it.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132)
  mesh = args[0].sharding.mesh.abstract_mesh.update(abstract_device=device)
  return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(
      mesh, a.sharding.spec)) for a in args]


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
    lowered = _value_and_grads(name).trace(*_for_lowering(args, platform)).lower(
        lowering_platforms=(platform,))
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


# ----------------------------------------------------------------------------------------------
# Every public loss on Explicit axes (jax.make_mesh's default in recent JAX), in one subprocess.
# ----------------------------------------------------------------------------------------------

#: Public names that are not losses (nor topk_teacher): nothing to run on a mesh.
NOT_LOSSES = {"DIVERGENCES", "DistillMetrics", "IMPLEMENTATIONS", "TAILS", "TeacherCacheError",
              "TokenMetrics", "align_tokenizations", "align_tokenizations_batch", "align_vocab",
              "open_hidden_state_cache", "open_teacher_cache", "read_hidden_state_cache",
              "read_teacher_cache", "read_teacher_head", "shift_labels",
              "write_hidden_state_cache", "write_teacher_cache"}
PER_TOKEN = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl",
             "soft_cross_entropy", "total_variation")
MATERIALISED = ("distill_loss", "distill_loss_sum_and_count", "distill_with_cross_entropy",
                "distill_with_cross_entropy_sum_and_count", "kd_loss", "uld_loss")
FUSED_LOSSES = ("fused_linear_distill_loss", "fused_linear_distill_loss_sum_and_count",
                "fused_linear_distill_with_cross_entropy",
                "fused_linear_distill_with_cross_entropy_sum_and_count")
SPARSE = ("sparse_distill_loss", "sparse_distill_loss_sum_and_count")
FEATURES = ("hidden_state_loss", "hidden_state_loss_sum_and_count")
WITH_METRICS = ("distill_loss_with_metrics", "distill_with_cross_entropy_with_metrics",
                "fused_linear_distill_loss_with_metrics",
                "fused_linear_distill_with_cross_entropy_with_metrics",
                "sparse_distill_loss_with_metrics")
OTHERS = ("topk_teacher", "sample_teacher", "vocab_parallel_distill_loss",
          "vocab_parallel_fused_linear_distill_loss")


def test_every_public_loss_has_an_explicit_axes_case():
  covered = set(PER_TOKEN + MATERIALISED + FUSED_LOSSES + SPARSE + FEATURES + WITH_METRICS
                + OTHERS)
  missing = set(kdjax.__all__) - NOT_LOSSES - covered
  assert not missing, f"add these to the Explicit-axes cases: {sorted(missing)}"


_EXPLICIT_AXES = r'''
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import kdjax
import tests.test_gspmd as t

T, D, V, K = 64, 8, 48, 8  # 48 columns: 4 vocabulary shards of 12, 6 tiles of 8.
keys = jax.random.split(jax.random.key(1), 6)
h = jax.random.normal(keys[0], (T, D))
w = jax.random.normal(keys[1], (D, V)) / 2
th = jax.random.normal(keys[2], (T, D))
tw = jax.random.normal(keys[3], (D, V)) / 2
y = jnp.where(jax.random.uniform(keys[5], (T,)) < 0.2, -100,
              jax.random.randint(keys[4], (T,), 0, V))
ids, lp = kdjax.topk_teacher(th @ tw, K)
bias = jnp.linspace(-1.0, 1.0, V)
ARGS = (h, w, th, tw, y, ids, lp, bias)
FLOAT = (0, 1, 7)  # differentiated: hidden states, kernel, bias


def scalar(out):  # a loss, a per-token array or a (sum, count) pair, as one differentiable number
  if isinstance(out, tuple):
    return out[0] + 0.5 * out[1]
  return jnp.sum(out * jnp.linspace(0.5, 1.5, out.size).reshape(out.shape))


def materialised(name, **kw):
  fn = getattr(kdjax, name)
  if name in t.PER_TOKEN:
    return lambda h, w, th, tw, y, ids, lp, b: fn(h @ w + b, th @ tw, **kw)
  return lambda h, w, th, tw, y, ids, lp, b: fn(h @ w + b, th @ tw, y, **kw)


def fused(name, **kw):
  fn = getattr(kdjax, name)
  return lambda h, w, th, tw, y, ids, lp, b: fn(h, w, th, tw, y, student_bias=b, **kw)


def sparse(name, **kw):
  fn = getattr(kdjax, name)
  return lambda h, w, th, tw, y, ids, lp, b: fn(h @ w + b, ids, lp, y, **kw)


def topk(h, w, th, tw, y, ids, lp, b):
  out_ids, out_lp = kdjax.topk_teacher(h @ w + b, K, temperature=1.5)
  return out_lp + out_ids.astype(jnp.float32) * 1e-3  # ids and log-probabilities compared


def sampled(h, w, th, tw, y, ids, lp, b):
  out_ids, out_lp = kdjax.sample_teacher(jax.random.key(3), h @ w + b, num_samples=K)
  return jnp.where(jnp.isinf(out_lp), 0.0, out_lp) + out_ids.astype(jnp.float32) * 1e-3


def features(name):
  fn = getattr(kdjax, name)
  return lambda h, w, th, tw, y, ids, lp, b: fn(h, th, projection=w[:, :D], where=y != -100)


def with_metrics(name):  # the loss and its metrics, reduced, as one number
  inner = (fused if name.startswith("fused") else sparse if name.startswith("sparse")
           else materialised)(name)
  def fn(*args):
    loss, metrics = inner(*args)
    return loss + 0.1 * (metrics.divergence + metrics.student_entropy + metrics.teacher_entropy
                         + metrics.top1_agreement)
  return fn


def vocab_parallel(mesh, fused_head):
  model = "model" if "model" in mesh.axis_names else None
  specs = (P("data"), P(None, model), P("data"), P(None, model), P("data"), P("data"),
           P("data"), P(model))
  def local(h, w, th, tw, y, ids, lp, b):
    if fused_head:
      return kdjax.vocab_parallel_fused_linear_distill_loss(
          h, w, th, tw, y, student_bias=b, axis_name=model, data_axis_name="data",
          divergence="reverse_kl", vocab_block=8)
    return kdjax.vocab_parallel_distill_loss(
        h @ w + b, th @ tw, y, axis_name=model, data_axis_name="data",
        divergence="generalized_jsd")
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())


CASES = {name: materialised(name) for name in t.PER_TOKEN + t.MATERIALISED if hasattr(kdjax, name)}
CASES["uld_loss"] = materialised("uld_loss", teacher_temperature=2.0)
CASES["uld_loss top_k"] = materialised("uld_loss", top_k=5)
CASES["distill_loss none"] = materialised("distill_loss", reduction="none", divergence="reverse_kl")
for name in t.FUSED_LOSSES:
  CASES[name] = fused(name, softcap=4.0)
  CASES[name + " vocab_block=8"] = fused(name, vocab_block=8, temperature=2.0)
CASES["fused_linear_distill_loss vocab_block=8 none"] = fused(
    "fused_linear_distill_loss", vocab_block=8, reduction="none")
for name in t.SPARSE:
  CASES[name] = sparse(name, divergence="reverse_kl")
CASES["sparse_distill_loss renormalize none"] = sparse(
    "sparse_distill_loss", tail="renormalize", reduction="none")
CASES["topk_teacher"] = topk
CASES["sample_teacher"] = sampled
for name in ("hidden_state_loss", "hidden_state_loss_sum_and_count"):
  CASES[name] = features(name)
for name in t.WITH_METRICS:
  CASES[name] = with_metrics(name)

# What the shard_map losses compute, on one device.
ONE_DEVICE = {
    "vocab_parallel_distill_loss": materialised("distill_loss", divergence="generalized_jsd"),
    "vocab_parallel_fused_linear_distill_loss": fused(
        "fused_linear_distill_loss", divergence="reverse_kl", vocab_block=8)}

MESHES = {"data (8,)": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)),
          "data, model (2, 4)": jax.make_mesh((2, 4), ("data", "model"),
                                              axis_types=(AxisType.Explicit,) * 2)}
failures, wanted = [], {}
for label, mesh in MESHES.items():
  model = "model" if "model" in mesh.axis_names else None
  shardings = [NamedSharding(mesh, s) for s in (
      P("data"), P(None, model), P("data"), P(None, model), P("data"), P("data"), P("data"),
      P(model))]
  if model is None:  # tokens only: the cases that failed there before
    cases = {name: CASES[name] for name in (
        "sparse_distill_loss", "sparse_distill_loss_sum_and_count",
        "fused_linear_distill_loss vocab_block=8", "topk_teacher", "uld_loss", "distill_loss")}
  else:  # tokens and vocabulary: every public loss
    cases = dict(CASES)
  cases["vocab_parallel_distill_loss"] = vocab_parallel(mesh, False)
  cases["vocab_parallel_fused_linear_distill_loss"] = vocab_parallel(mesh, True)
  for replicated in (False, True):  # the teacher's ids and log-probabilities
    args = [jax.device_put(x, s) for x, s in zip(ARGS, shardings)]
    if replicated:
      args[5:7] = [jax.device_put(x, NamedSharding(mesh, P())) for x in ARGS[5:7]]
      names = [name for name in cases if name.startswith("sparse")]
    else:
      names = list(cases)
    for name in names:
      fn = cases[name]
      step = jax.jit(jax.value_and_grad(lambda *a: scalar(fn(*a)), argnums=FLOAT))
      if name not in wanted:
        wanted[name] = jax.jit(jax.value_and_grad(
            lambda *a: scalar(ONE_DEVICE.get(name, fn)(*a)), argnums=FLOAT))(*ARGS)
      want_value, want_grads = wanted[name]
      case = (label, name, "replicated teacher" if replicated else "")
      try:
        with jax.set_mesh(mesh):
          compiled = step.lower(*args).compile()
          value, grads = compiled(*args)
        errors = [t._rel_err(value, want_value)] + [
            t._rel_err(g, w) for g, w in zip(grads, want_grads)]
        if max(errors) > t.RTOL:
          failures.append((case, errors))
        for g, x in zip(grads, (args[i] for i in FLOAT)):
          if g.sharding.spec != jax.typeof(x).sharding.spec:
            failures.append((case, "gradient sharded as", g.sharding.spec))
        # ULD's sort, and sample_teacher's draws and merge of repeated ids, need each row whole
        # on one device (and XLA:CPU's partitioner gathers the
        # rows of lax.top_k, for its top_k, even on Auto axes). topk_teacher gathers only each
        # vocabulary slice's k candidates of this device's rows.
        allowed = {(T // mesh.shape["data"], K * mesh.shape.get("model", 1))}
        if not name.startswith(("uld_loss", "sample_teacher")):
          for op, shapes in t._collectives(compiled.as_text()):
            if op in ("all-gather", "all-to-all") and any(
                (T in s or T // mesh.shape["data"] in s) and not (
                    name == "topk_teacher" and s in allowed) for s in shapes):
              failures.append((case, op, shapes))
      except Exception as e:
        failures.append((case, type(e).__name__, str(e).splitlines()[0][:200]))
# With no mesh set: the arrays' types carry it.
mesh = MESHES["data, model (2, 4)"]
args = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(ARGS, (
    P("data"), P(None, "model"), P("data"), P(None, "model"), P("data"), P("data"), P("data"),
    P("model")))]
for name in ("sparse_distill_loss", "fused_linear_distill_loss vocab_block=8", "topk_teacher",
             "uld_loss"):
  step = jax.jit(lambda *a, fn=CASES[name]: scalar(fn(*a)))
  try:
    error = t._rel_err(step(*args), step(*ARGS))
    if error > t.RTOL:
      failures.append(((name, "no mesh set"), error))
  except Exception as e:
    failures.append(((name, "no mesh set"), type(e).__name__, str(e).splitlines()[0][:200]))
# topk_teacher's merge of the vocabulary slices' candidates: ties go to the lower id, an all -inf
# row gives -inf, a row with fewer finite entries than k -inf after them.
special = (th @ tw).at[3].set(-jnp.inf).at[5, :45].set(-jnp.inf).at[7].set(1.0)
want_ids, want_lp = kdjax.topk_teacher(special, K, temperature=1.5)
with jax.set_mesh(mesh):
  got_ids, got_lp = jax.jit(lambda x: kdjax.topk_teacher(x, K, temperature=1.5))(
      jax.device_put(special, NamedSharding(mesh, P("data", "model"))))
got_ids, got_lp = np.asarray(got_ids), np.asarray(got_lp)
if not (np.array_equal(got_ids, want_ids) and np.allclose(got_lp, want_lp, rtol=1e-6)
        and np.array_equal(got_ids[7], np.arange(K)) and np.all(np.isinf(got_lp[3]))):
  failures.append((("topk_teacher", "ties and -inf rows"), got_ids[[3, 5, 7]], got_lp[[3, 5]]))
for failure in failures:
  print("FAILED", failure)
print("ok" if not failures else f"{len(failures)} failures")
'''


def test_every_public_loss_on_explicit_axes_equals_one_device():
  """On Explicit axes with the tokens over "data" and the vocabulary over "model" on (2, 4)
  (kernels, biases and so logits sharded along it), every public loss and topk_teacher give
  the one-device value and gradients, each gradient sharded like its input: the sparse losses
  also with the teacher's ids and log-probabilities replicated, the fused heads with whole rows
  and with vocabulary tiles; the feature losses, the metrics forms and sample_teacher too.
  No collective gathers the tokens (ULD's sort and sample_teacher gather rows;
  topk_teacher only each vocabulary slice's k candidates). On (8,), tokens only, the losses
  that failed there and the shard_map losses. One subprocess runs every case."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _EXPLICIT_AXES], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
      result.stdout[-4000:] + result.stderr[-3000:])
