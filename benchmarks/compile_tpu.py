"""Compile kdjax's TPU kernels for TPU v5e, v5p and v6e on a machine without a TPU.

How: XLA's deviceless ahead-of-time compilation through libtpu. ``topologies.get_topology_desc(
topology_name="v5e:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1))`` is a compile-only
chip; ``jit(f).trace(...).lower().compile()`` under ``jax.set_mesh`` of it runs libtpu's whole
compiler (a Pallas kernel is a ``tpu_custom_call`` whose Mosaic code libtpu lowers to LLO and
bundles), while JAX itself runs on CPU (``JAX_PLATFORMS=cpu``, ``TPU_SKIP_MDS_QUERY=1``). What
the report reads back, per case and chip, is the compiler's own output:

* compiled, or the compiler's error (a VMEM overflow reads ``Ran out of memory in memory space
  vmem``);
* rows per block: the kernel's block shape in the traced program;
* VMEM: what the kernel uses and what XLA reserved for it (``used_scoped_memory_configs`` and
  ``scoped_memory_configs`` of the custom call), against the core's capacity;
* HBM bytes the kernel moves: its operands read and results written, each block once, against
  the bound of one read of both logits and one write of the gradient, ``6 * N * V`` bytes in
  bf16;
* cycles: libtpu's static LLO profile (``--xla_jf_dump_static_llo_profile_to``), the compiler's
  estimate of each operation. For a kernel it costs memory in proportion to the grid (more than
  17 GB for the full grid), so it is taken on grids of 2 and 4 blocks per TensorCore of the same
  kernel (a megacore v5p splits the grid over its 2 cores: 4 and 8 blocks; one block per core
  would not be double-buffered, other code) and extrapolated linearly over the grids the
  compiled programs report, ``fixed + blocks * per_block``. Under the profile libtpu counts the
  program's VMEM as the kernel's scoped VMEM used plus the HLO temporaries placed above its whole
  reservation, which exceeds the core for a kernel that uses more than half of it (64 rows on
  v5e and v6e: 94 + 106 MiB of 128); the profiled compilations therefore run with the VMEM size
  overridden to twice the core's (``--xla_tpu_override_vmem_size_kib``), which leaves the
  kernel's final bundles byte for byte as they are. Where the compiler still refuses the small
  programs under the profile, the kernel's final bundles (``--xla_jf_dump_to``) are counted
  instead: issue-only cycles, a lower bound. An XLA program
  (the fused head, its four matmuls alone) is estimated by XLA's cost model, each operation's
  ``estimated_cycles`` counted as often as its loops run (its whole-program profile needs more
  memory than a CI machine has). Times are cycles at the assumed clock; the fraction of the
  bound is the bound's time over the estimate.

Usage (``.ci/compile_tpu`` installs the toolchain and runs ``--ci``)::

  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python benchmarks/compile_tpu.py
      [--targets v5e,v5p,v6e] [--cases a,b|--ci] [--no-profile] [--out DIR] [--json FILE]

Exit status 1 when a case fails to compile (a VMEM overflow included), or a case that should
run a kernel runs none. Each compilation runs in a worker subprocess (``--worker``), with its own
libtpu flags and memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

_HERE = os.path.abspath(__file__)


class Chip(NamedTuple):
  topology: str
  bandwidth: float  # HBM bytes/s
  clock: float  # TensorCore Hz, assumed: peak bf16 FLOP/s over the MXUs' MACs per cycle
  bf16_flops: float  # peak bf16 FLOP/s


TARGETS = {
    "v5e": Chip("v5e:1x1", 819e9, 1.50e9, 197e12),
    "v5p": Chip("v5p:1x1x1", 2765e9, 1.75e9, 459e12),
    "v6e": Chip("v6e:1x1", 1640e9, 1.75e9, 918e12),
}

LLM = (16384, 128256, "bfloat16")
FUSED = (8192, 4096, 128256)
PROFILE_BLOCKS = (2, 4)  # per TensorCore


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  loss: str  # a divergence, "kd_loss", "combined", "fused_head" or "fused_matmuls"
  shape: tuple  # dense: (tokens, vocab, dtype); fused: (tokens, hidden, vocab)
  traced_temperature: bool = False

  @property
  def dense(self) -> bool:
    return not self.loss.startswith("fused")

  @property
  def expects_kernel(self) -> bool:
    return self.dense  # The fused head runs XLA fusions today.


def all_cases() -> dict[str, Case]:
  import kdjax
  cases = [Case("kd_loss", "kd_loss", LLM)]
  cases += [Case(d, d, LLM) for d in kdjax.DIVERGENCES]
  cases += [Case("combined_traced_T", "combined", LLM, traced_temperature=True),
            Case("fused_head", "fused_head", FUSED)]
  return {case.name: case for case in cases}


DEFAULT_CASES = ("kd_loss", "forward_kl", "reverse_kl", "generalized_jsd", "combined_traced_T",
                 "fused_head")
# The CI subset: three losses on every chip, profiled on v5e only; the fused head on v5e.
CI_PLAN = (("v5e", ("kd_loss", "generalized_jsd", "combined_traced_T", "fused_head"), True),
           ("v5p", ("kd_loss", "generalized_jsd", "combined_traced_T"), False),
           ("v6e", ("kd_loss", "generalized_jsd", "combined_traced_T"), False))
_MATMULS = Case("fused_matmuls", "fused_matmuls", FUSED)

# ----------------------------------------------------------------------------------------------
# Worker: one compilation, in its own process.
# ----------------------------------------------------------------------------------------------


def _program(case: Case, tokens: int, spec):
  """The jitted function and its argument specs."""
  import jax
  import jax.numpy as jnp

  import kdjax
  if case.loss == "fused_head":
    _, hidden, vocab = case.shape
    args = [spec((tokens, hidden), jnp.bfloat16), spec((hidden, vocab), jnp.bfloat16)] * 2
    fn = jax.value_and_grad(kdjax.fused_linear_distill_loss, argnums=(0, 1))
    return jax.jit(fn), [*args, spec((tokens,), jnp.int32)]
  if case.loss == "fused_matmuls":
    # The fused head's four matmuls alone: both heads' logits and the student's two gradients.
    _, hidden, vocab = case.shape

    def matmuls(hidden_s, kernel_s, hidden_t, kernel_t, grad_logits):
      return (hidden_s @ kernel_s, hidden_t @ kernel_t, grad_logits @ kernel_s.T,
              hidden_s.T @ grad_logits)

    args = [spec((tokens, hidden), jnp.bfloat16), spec((hidden, vocab), jnp.bfloat16)] * 2
    return jax.jit(matmuls), [*args, spec((tokens, vocab), jnp.bfloat16)]
  _, vocab, dtype = case.shape

  def temperature():  # Made inside the traced function: a traced value, not a constant.
    return jnp.float32(2.0) if case.traced_temperature else 2.0

  if case.loss == "kd_loss":
    def loss(x, t, y):
      return kdjax.kd_loss(x, t, y, implementation="pallas")
  elif case.loss == "combined":
    def loss(x, t, y):
      return kdjax.distill_with_cross_entropy(
          x, t, y, divergence="generalized_jsd", temperature=temperature(),
          implementation="pallas")
  else:
    def loss(x, t, y):
      return kdjax.distill_loss(x, t, y, divergence=case.loss, implementation="pallas")
  args = [spec((tokens, vocab), jnp.dtype(dtype))] * 2 + [spec((tokens,), jnp.int32)]
  return jax.jit(jax.value_and_grad(loss), donate_argnums=0), args


def mosaic_blocks(lowered) -> list[dict]:
  """The grid and rows per block of each TPU kernel in a lowered program, read from its Mosaic
  module (``iteration_bounds``, and the first operand's ``window_bounds``)."""
  import base64

  from jax._src.lib.mlir import ir
  module = lowered.compiler_ir("stablehlo")
  bodies = []

  def visit(op) -> None:
    if op.name == "stablehlo.custom_call" and ir.StringAttr(
        op.attributes["call_target_name"]).value == "tpu_custom_call":
      config = json.loads(ir.StringAttr(op.attributes["backend_config"]).value)
      bodies.append(base64.b64decode(config["custom_call_config"]["body"]))
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner.operation)

  visit(module.operation)
  out = []
  with module.context as context:
    context.allow_unregistered_dialects = True  # the Mosaic dialect
    for body in bodies:
      text = str(ir.Module.parse(body))
      grid = re.search(r"iteration_bounds = array<i64: ([\d, ]*)>", text)
      window = re.search(r"window_bounds = array<i64: ([\d, ]*)>", text)
      out.append(dict(grid=[int(x) for x in grid.group(1).split(",")] if grid else None,
                      rows=int(window.group(1).split(",")[0]) if window else None))
  return out


def worker(case: Case, target: str, tokens: int, profile_dir: str | None, out_json: str) -> None:
  import jax
  from jax.experimental import topologies
  from jax.experimental.pallas import tpu as pltpu
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  topology = topologies.get_topology_desc(
      topology_name=TARGETS[target].topology, platform="tpu", chips_per_host_bounds=(1, 1, 1))
  mesh = topologies.make_mesh(topology, (1,), ("x",))
  sharding = NamedSharding(mesh, P())

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  device = topology.devices[0]
  result: dict[str, Any] = dict(case=case.name, target=target, tokens=tokens, compiled=False,
                                device_kind=device.device_kind,
                                cores=getattr(device, "num_cores", None) or 1)
  with jax.set_mesh(mesh):  # Pallas and kdjax read the chip (its VMEM) from the mesh.
    result["vmem_capacity"] = pltpu.get_tpu_info().vmem_capacity_bytes
    fn, args = _program(case, tokens, spec)
    try:
      lowered = fn.trace(*args).lower()
      result["blocks"] = mosaic_blocks(lowered)
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- the compiler's error is the result.
      result["error"] = f"{type(e).__name__}: {e}"[:20000]
      with open(out_json, "w") as f:
        json.dump(result, f)
      return
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  result.update(compiled=True, kernels=kernel_calls(hlo), temp_bytes=memory.temp_size_in_bytes,
                argument_bytes=memory.argument_size_in_bytes)
  profile = read_profile(profile_dir) if profile_dir else {}
  result["profile"] = profile
  result["program_cycles"] = program_cycles(hlo, profile)
  with open(out_json, "w") as f:
    json.dump(result, f)


# ----------------------------------------------------------------------------------------------
# Reading the compiler's output.
# ----------------------------------------------------------------------------------------------

_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
             "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
  """Bytes of the HLO array shapes in ``text`` (layouts ignored)."""
  return sum(math.prod(int(d) for d in m.group(2).split(",") if d) * _ITEMSIZE[m.group(1)]
             for m in _SHAPE.finditer(text))


def _braced(text: str, opening: str) -> str:
  """What lies inside the braces that ``opening`` (ending in "{") opens."""
  start = text.find(opening)
  if start < 0:
    return ""
  depth = 1
  for i in range(start + len(opening), len(text)):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[start + len(opening):i]
  return ""


def kernel_calls(hlo: str) -> list[dict]:
  """The compiled program's kernels (``tpu_custom_call``): name, VMEM reserved and used, HBM
  bytes of the operands and results."""
  out = []
  for line in hlo.splitlines():
    if 'custom_call_target="tpu_custom_call"' not in line:
      continue
    head = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?) custom-call\(", line)
    reserved = re.search(r'"scoped_memory_configs":\[\{[^}]*"size":"(\d+)"', line)
    used = re.search(r'"used_scoped_memory_configs":\[\{[^}]*"size":"(\d+)"', line)
    operands = re.sub(r"\{[^}]*\}", "", _braced(line, "operand_layout_constraints={"))
    results = re.sub(r"\{[^}]*\}", "", head.group(2)) if head else ""
    out.append(dict(name=head.group(1) if head else "?",
                    vmem_reserved=int(reserved.group(1)) if reserved else None,
                    vmem_used=int(used.group(1)) if used else None,
                    read_bytes=shape_bytes(operands), write_bytes=shape_bytes(results)))
  return out


def read_profile(directory: str) -> dict[str, int]:
  """libtpu's static LLO profile: estimated cycles per HLO operation."""
  out = {}
  for path in glob.glob(os.path.join(directory, "*_static_llo_profile.textproto")):
    with open(path) as f:
      for m in re.finditer(r'hlo_op_name: "([^"]+)"\s+estimated_cycles: (\d+)', f.read()):
        out[m.group(1)] = int(m.group(2))
  return out


def program_cycles(hlo: str, profile: dict[str, int]) -> dict[str, Any]:
  """The program's estimated cycles: each operation of the entry computation, of while bodies
  times their trip counts, and of the costlier branch of a conditional."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    header = re.match(r"(ENTRY )?%(\S+) \(.*\) -> .*\{\s*$", line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif current is not None and re.match(r"\s*(ROOT )?%\S+ = ", line):
      computations[current].append(line)
  loops: list[dict] = []

  def cycles(name: str, depth: int) -> int:
    total = 0
    for line in computations.get(name, []):
      op = re.match(r"\s*(?:ROOT )?%(\S+) = ", line).group(1)
      loop = re.search(r"\bwhile\(.*?condition=%([^,\s]+), body=%([^,\s]+)", line)
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      call = re.search(r"\bcall\(.*?to_apply=%([^,\s]+)", line)
      if loop and depth < 8:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        if trips:
          count = int(trips.group(1))
        else:
          bound = re.search(r"constant\((\d+)\)", "\n".join(computations.get(loop.group(1), [])))
          count = int(bound.group(1)) if bound else 1
        body = cycles(loop.group(2), depth + 1)
        loops.append(dict(op=op, trips=count, cycles_per_trip=body))
        total += count * body
      elif branches and depth < 8:
        total += max(cycles(b.strip().lstrip("%"), depth + 1)
                     for b in branches.group(1).split(","))
      elif call and depth < 8:
        total += cycles(call.group(1), depth + 1)
      else:
        # The static profile's estimate, else XLA's cost model (the op's backend config).
        estimate = re.search(r'"estimated_cycles":"(\d+)"', line)
        total += profile.get(op, int(estimate.group(1)) if estimate else 0)
    return total

  return dict(cycles=cycles(entry, 0) if entry else 0, loops=loops)


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------


def profile_flags(method: str, directory: str, vmem_capacity: int | None = None) -> str:
  """libtpu's flags for a profiled compilation: "llo", the static profile of every operation
  into ``directory``, with the VMEM size overridden to twice ``vmem_capacity`` (the profile
  counts the kernel's VMEM used on top of its whole reservation); "bundles", the final bundles
  as text."""
  if method == "llo":
    flags = f"--xla_jf_dump_static_llo_profile_to={directory}"
    if vmem_capacity:
      flags += f" --xla_tpu_override_vmem_size_kib={2 * vmem_capacity // 1024}"
    return flags
  if method == "bundles":
    return f"--xla_jf_dump_to={directory} --xla_jf_dump_llo_text=true"
  raise ValueError(f"unknown profile method {method!r}")


def run_worker(case: Case, target: str, tokens: int, dump: str, profile: str | None = None,
               vmem_capacity: int | None = None) -> dict[str, Any]:
  """One compilation in a subprocess. ``profile``: "llo" (libtpu's static profile of every
  operation, read back into the result; ``vmem_capacity``: the core's, see
  :func:`profile_flags`) or "bundles" (the kernels' final bundles dumped under
  ``dump/bundles_<tokens>``)."""
  os.makedirs(dump, exist_ok=True)
  out_json = os.path.join(dump, f"result_{tokens}.json")
  # JAX on CPU; libtpu compiles only: no metadata server, no lock on a chip.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TF_CPP_MIN_LOG_LEVEL="1",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  command = [sys.executable, _HERE, "--worker", case.name, "--targets", target, "--tokens",
             str(tokens), "--json", out_json]
  if os.path.exists(out_json):  # Not a result of an earlier run.
    os.remove(out_json)
  if profile:
    profile_dir = os.path.join(dump, f"{'profile' if profile == 'llo' else 'bundles'}_{tokens}")
    if profile == "llo":
      command += ["--profile-dir", profile_dir]
    shutil.rmtree(profile_dir, ignore_errors=True)
    os.makedirs(profile_dir)
    flags = profile_flags(profile, profile_dir, vmem_capacity)
    env["LIBTPU_INIT_ARGS"] = (env.get("LIBTPU_INIT_ARGS", "") + " " + flags).strip()
  start = time.perf_counter()
  proc = subprocess.run(command, env=env, capture_output=True, text=True)
  log = proc.stdout + proc.stderr
  with open(os.path.join(dump, f"compile_{tokens}.log"), "w") as f:
    f.write(log)
  if not os.path.exists(out_json):
    # The exception's own line first (the table shows the first line), then the log's tail.
    last = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
    return dict(case=case.name, compiled=False,
                error=f"worker exited with {proc.returncode}: {last[0]}\n{log[-2000:]}")
  with open(out_json) as f:
    result = json.load(f)
  result["seconds"] = round(time.perf_counter() - start, 1)
  return result


def _rows(result: dict) -> int | None:
  """Rows per block of the kernel the program runs (its Mosaic call; one expected)."""
  rows = {b["rows"] for b in result.get("blocks", [])}
  return rows.pop() if len(rows) == 1 else None


def _grid(result: dict) -> int | None:
  """Blocks in the grid of the kernel the program runs (its Mosaic call; one expected)."""
  grids = {math.prod(b["grid"]) if b.get("grid") else None for b in result.get("blocks", [])}
  return grids.pop() if len(grids) == 1 else None


def linear_fit(points: dict[int, float]) -> tuple[float, float]:
  """``(fixed, per_block)`` of the line through the cycles of the smallest and the largest
  grid, ``points`` keyed by the grid's blocks."""
  small, large = min(points), max(points)
  per_block = (points[large] - points[small]) / (large - small)
  return points[small] - small * per_block, per_block


_BUNDLE = re.compile(r"\s*0x[0-9a-f]+\s+(LB:|PF:|:)?\s*(>*)\s*\{")
_EXIT_TEST = re.compile(r"scmp\.ge\.s32\.totalorder [^;]*?(\d+) /\* loop exit test")


def bundle_cycles(text: str) -> int:
  """Issue-only cycles of a kernel's final bundles (one bundle a cycle, no stalls). A loop starts
  at a bundle marked ``LB:`` and holds the bundles after it that are as deep or deeper (the
  dump's ``>`` marks), up to the next loop head at its depth; it runs as many times as the
  constant of its own exit test."""
  bundles: list[tuple[int, bool, str]] = []
  for line in text.splitlines():
    m = _BUNDLE.match(line)
    if m:
      # An empty bundle carries no depth mark: it stays in the loop around it.
      empty = line[m.end():].lstrip().startswith("}")
      level = bundles[-1][0] if empty and bundles else len(m.group(2))
      bundles.append((level, m.group(1) == "LB:", line))

  def loop(i: int) -> tuple[int, int, list[int]]:
    """Cycles of the loop whose head is bundle ``i``, the index after it, and the exit tests
    it holds for its enclosing loops (a bundle may test several loops' exits)."""
    level = bundles[i][0]
    own, tests, inherited, j = 1, _EXIT_TEST.findall(bundles[i][2]), [], i + 1
    while j < len(bundles) and bundles[j][0] >= level and not (
        bundles[j][1] and bundles[j][0] == level):
      if bundles[j][1]:
        inner, j, passed = loop(j)
        own, inherited = own + inner, inherited + passed
      else:
        tests += _EXIT_TEST.findall(bundles[j][2])
        own, j = own + 1, j + 1
    tests = [int(t) for t in tests] + inherited
    return (tests[0] if tests else 1) * own, j, tests[1:]

  total, i = 0, 0
  while i < len(bundles):
    if bundles[i][1]:
      cycles, i, _ = loop(i)
      total += cycles
    else:
      total, i = total + 1, i + 1
  return total


def _final_bundles(directory: str, kernel: str) -> str | None:
  paths = [p for p in glob.glob(os.path.join(directory, f"*-{kernel}-*-final_bundles.txt"))
           if "schedule-analysis" not in p]
  if not paths:
    return None
  with open(paths[0]) as f:
    return f.read()


def profile_kernel(case: Case, target: str, rows: int, dump: str, cores: int = 1,
                   vmem_capacity: int | None = None) -> dict[str, Any]:
  """libtpu's estimate of the kernel on grids of 2 and 4 blocks per TensorCore of ``rows`` rows
  each, and its linear fit over the grids the compiled programs report. Where the compiler
  refuses the small programs under the static profile, the kernel's final bundles are counted
  instead (issue-only cycles, a lower bound)."""
  notes = []
  for method in ("llo", "bundles"):
    points, rows_seen, refused = {}, set(), None
    for blocks in (b * cores for b in PROFILE_BLOCKS):
      r = run_worker(case, target, blocks * rows, dump, profile=method,
                     vmem_capacity=vmem_capacity)
      if not r.get("compiled"):
        refused = _first_error(r)
        break
      rows_seen.add(_rows(r))
      grid = _grid(r) or blocks
      if method == "llo":
        kernels = r.get("kernels") or []
        points[grid] = r.get("profile", {}).get(kernels[0]["name"]) if kernels else None
      else:
        points[grid] = _bundle_point(r, dump, blocks * rows)
    if refused is None:
      break
    notes.append(f"{method} at {blocks} blocks: {refused}")
  result: dict[str, Any] = dict(points=points, method=method, notes=notes)
  if refused is not None or None in points.values():
    return dict(result, error=f"no estimate of the kernel ({'; '.join(notes) or method})")
  if rows_seen != {rows}:
    return dict(result, error=f"rows per block differ on the small grids: {rows_seen}")
  if len(points) < 2:
    return dict(result, error=f"no estimate: the small programs' grids are alike {points}")
  fixed, per_block = linear_fit(points)
  if per_block <= 0:  # Not the same kernel code on both grids, or a misread dump.
    return dict(result, error=f"no estimate: {method} cycles do not grow with the grid {points}")
  return dict(result, per_block=per_block, fixed=fixed)


def _bundle_point(result: dict, dump: str, tokens: int) -> int | None:
  kernels = result.get("kernels") or []
  if not kernels:
    return None
  text = _final_bundles(os.path.join(dump, f"bundles_{tokens}"), kernels[0]["name"])
  return bundle_cycles(text) if text else None


def _first_error(result: dict) -> str:
  """The compiler's VMEM verdict where there is one, else the error's first line."""
  error = result.get("error") or "?"
  vmem = re.search(r"Ran out of memory in memory space vmem\.(?: Used [\d.]+\w* of [\d.]+\w* "
                   r"vmem\.)?", error)
  return (vmem.group(0) if vmem else error.strip().splitlines()[0])[:300]


def run_case(case: Case, target: str, dump: str, profile: bool) -> dict[str, Any]:
  shutil.rmtree(dump, ignore_errors=True)
  if not case.dense:  # No kernel grid: the XLA program is profiled whole.
    # The whole program's static profile needs more memory than a CI machine has: XLA's cost
    # model of each operation instead, for the head and its matmuls alike.
    result = run_worker(case, target, case.shape[0], dump)
    if profile and result.get("compiled"):
      result["matmuls"] = run_worker(_MATMULS, target, case.shape[0],
                                     os.path.join(dump, "matmuls"))
    return result
  result = run_worker(case, target, case.shape[0], dump)
  rows = _rows(result)
  result["rows"], result["grid"] = rows, _grid(result)
  if profile and result.get("compiled") and result.get("kernels") and rows:
    result["kernel_profile"] = profile_kernel(case, target, rows, dump,
                                              cores=result.get("cores") or 1,
                                              vmem_capacity=result.get("vmem_capacity"))
  return result


def failures(case: Case, result: dict) -> list[str]:
  """Why a case fails CI: it did not compile (a VMEM overflow included), or no kernel runs where
  one should, or a kernel uses more VMEM than the core has."""
  if not result.get("compiled"):
    error = result.get("error", "")
    if "memory space vmem" in error:
      return ["VMEM overflow: " + re.search(r"Ran out of memory[^\n.]*", error).group(0)
              if re.search(r"Ran out of memory[^\n.]*", error) else "VMEM overflow"]
    return ["did not compile"]
  out = []
  if case.expects_kernel and not result.get("kernels"):
    out.append("no kernel in the compiled program (another engine ran)")
  for k in result.get("kernels", []):
    if k["vmem_used"] and k["vmem_used"] > result["vmem_capacity"]:
      out.append(f"{k['name']} uses {k['vmem_used']} B of VMEM, more than the core's "
                 f"{result['vmem_capacity']}")
  return out


def kernel_estimate(case: Case, target: str, result: dict) -> dict[str, float] | None:
  profile = result.get("kernel_profile") or {}
  if "per_block" not in profile:
    return None
  tokens, vocab, dtype = case.shape
  chip = TARGETS[target]
  # The full program's grid as its kernel reports it; else the kernel's rows per block.
  blocks = result.get("grid") or -(-tokens // result["rows"])
  cycles = profile["fixed"] + blocks * profile["per_block"]
  bound_ms = 3 * tokens * vocab * (2 if dtype == "bfloat16" else 4) / chip.bandwidth * 1e3
  estimate_ms = cycles / chip.clock * 1e3
  return dict(cycles=cycles, ms=estimate_ms, bound_ms=bound_ms, fraction=bound_ms / estimate_ms)


def _mib(x: int | None) -> str:
  return "?" if x is None else f"{x / 2**20:.1f}"


def print_report(cases: dict[str, Case], results: dict[str, dict]) -> None:
  print("\n| chip | case | compiled | rows/block | VMEM used / reserved / capacity MiB "
        "| kernel HBM read + write GB (vs 6·N·V) | cycles/block (blocks: cycles) | est. ms "
        "| bound ms | fraction of bound |")
  print("|" + "---|" * 10)
  for key, r in results.items():
    target, name = key.split("/")
    case = cases[name]
    if not case.dense:
      continue
    head = f"| {target} | {name} |"
    if not r.get("compiled"):
      print(f"{head} no: {_first_error(r)} |" + " |" * 7)
      continue
    if not r.get("kernels"):
      print(f"{head} yes, no kernel |" + " |" * 7)
      continue
    k = r["kernels"][0]
    tokens, vocab, dtype = case.shape
    bound_bytes = 3 * tokens * vocab * (2 if dtype == "bfloat16" else 4)
    moved = k["read_bytes"] + k["write_bytes"]
    est = kernel_estimate(case, target, r)
    profile = r.get("kernel_profile") or {}
    if est:
      points = ", ".join(f"{k}: {v:,}" for k, v in profile["points"].items())
      mark = "*" if profile["method"] == "bundles" else ""
      cycles = f"{profile['per_block']:,.0f}{mark} ({points})"
      timing = f"{est['ms']:.1f} | {est['bound_ms']:.1f} | {est['fraction']:.2f}"
    else:
      cycles = profile.get("error", "not profiled")
      timing = "? | ? | ?"
    print(f"{head} yes | {r.get('rows')} | {_mib(k['vmem_used'])} / {_mib(k['vmem_reserved'])} "
          f"/ {_mib(r['vmem_capacity'])} | {k['read_bytes'] / 1e9:.2f} + "
          f"{k['write_bytes'] / 1e9:.2f} ({moved / bound_bytes:.3f}x) | {cycles} | {timing} |")
  print("\ncycles: libtpu's static LLO profile of the kernel on grids of 2 and 4 blocks per "
        "TensorCore (v5p: 2 cores; VMEM size overridden to twice the core's, the kernel's "
        "bundles unchanged) or, where the compiler refuses those programs under the profile, "
        "the kernel's final bundles counted (issue-only: a lower bound, marked *), extrapolated "
        "linearly to the full grid; "
        "est. ms at the assumed clock (v5e 1.5, v5p and v6e 1.75 GHz); bound: 6·N·V bytes at "
        "the chip's HBM bandwidth (v5e 819, v5p 2765, v6e 1640 GB/s). Compiled and estimated, "
        "not measured.")

  fused = [(key, r) for key, r in results.items() if not cases[key.split("/")[1]].dense]
  if not fused:
    return
  print("\n| chip | fused head | compiled | kernels | temporaries GiB | est. ms | its 4 matmuls "
        "alone, est. ms | ratio | matmuls at peak bf16 ms |")
  print("|" + "---|" * 9)
  for key, r in fused:
    target, name = key.split("/")
    chip = TARGETS[target]
    tokens, hidden, vocab = cases[name].shape
    peak_ms = 4 * 2 * tokens * hidden * vocab / chip.bf16_flops * 1e3
    if not r.get("compiled"):
      print(f"| {target} | {name} | no: {_first_error(r)} |" + " |" * 6)
      continue
    ms = r["program_cycles"]["cycles"] / chip.clock * 1e3 if "program_cycles" in r else None
    m = r.get("matmuls") or {}
    mm_ms = m["program_cycles"]["cycles"] / chip.clock * 1e3 if "program_cycles" in m else None
    ratio = f"{ms / mm_ms:.2f}x" if ms and mm_ms else "?"
    print(f"| {target} | {name} | yes | {len(r.get('kernels', []))} "
          f"| {r['temp_bytes'] / 2**30:.2f} | {'?' if ms is None else f'{ms:.0f}'} "
          f"| {'?' if mm_ms is None else f'{mm_ms:.0f}'} | {ratio} | {peak_ms:.0f} |")
  print("\nest.: XLA's TPU cost model (each operation's estimated_cycles in the compiled "
        "program), each operation counted as often as its loops run; the matmuls: student and "
        "teacher logits and the student's two gradients, compiled alone and estimated the same "
        "way.")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated chips")
  parser.add_argument("--cases", help=f"comma-separated case names (default: "
                                      f"{','.join(DEFAULT_CASES)})")
  parser.add_argument("--ci", action="store_true",
                      help="the CI subset: kd_loss, generalized_jsd, combined_traced_T on every "
                           "chip, profiled on v5e, and the fused head on v5e")
  parser.add_argument("--no-profile", action="store_true", help="compile only, no estimates")
  parser.add_argument("--list", action="store_true", help="print the case names and exit")
  parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "kdjax-compile-tpu"),
                      help="logs and profiles go to OUT/<chip>/<case>/")
  parser.add_argument("--json", help="results file (default: OUT/results.json)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--profile-dir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cases = {**all_cases(), _MATMULS.name: _MATMULS}
  if args.worker:
    worker(cases[args.worker], args.targets, args.tokens, args.profile_dir, args.json)
    return 0
  if args.list:
    print("\n".join(n for n in cases if n != _MATMULS.name))
    return 0
  if args.ci:
    plan = list(CI_PLAN)
  else:
    names = args.cases.split(",") if args.cases else list(DEFAULT_CASES)
    targets = args.targets.split(",")
    unknown = [n for n in names if n not in cases] + [t for t in targets if t not in TARGETS]
    if unknown:
      parser.error(f"unknown cases or chips {unknown}; --list prints the case names")
    plan = [(t, names, not args.no_profile) for t in targets]
  import jax
  import jaxlib
  import libtpu
  print(f"kdjax TPU kernels compiled without a TPU: jax {jax.__version__}, jaxlib "
        f"{jaxlib.__version__}, libtpu {getattr(libtpu, '__version__', '?')}; logs under "
        f"{args.out}")
  results, failed = {}, []
  for target, names, profile in plan:
    for name in names:
      r = run_case(cases[name], target, os.path.join(args.out, target, name), profile)
      results[f"{target}/{name}"] = r
      why = failures(cases[name], r)
      failed += [f"{target} {name}: {w}" for w in why]
      print(f"  {target} {name}: {'; '.join(why) or 'ok'} ({r.get('seconds', '?')} s)",
            file=sys.stderr, flush=True)
  print_report(cases, results)
  path = args.json or os.path.join(args.out, "results.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(results=results, failures=failed), f, indent=1)
  if failed:
    print("\nFAILED:\n" + "\n".join(f"  {f}" for f in failed))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
