"""Compile kdjax's GPU kernels for an H100 or H200 (sm_90a) on a machine without a GPU.

How: XLA's deviceless ahead-of-time compilation. The jax CUDA plugin builds a compile-only
topology from a ``GpuTargetConfig`` (``topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1x1x1")``), and ``jit(f).trace(...).lower().compile()`` runs XLA's
whole GPU pipeline: a Pallas kernel is a ``__gpu$xla.gpu.triton`` custom call that XLA compiles
with its Triton, LLVM's NVPTX backend and ptxas. What the report reads back is the compilers'
own output:

* registers, spills and stack: ptxas's ``-v`` report (``--xla_gpu_ptx_compiler_extra_flags``);
* grid, threads and dynamic shared memory: XLA's thunk sequence; warps and stages: the custom
  call's backend config; CTAs per SM: the sm_90 limits on registers, threads and shared memory;
* the SASS: the kernel's dumped PTX assembled again with the same ptxas, disassembled with
  cuobjdump. Its loops are found from the backward branches; the innermost loops are the walks
  over the vocabulary, one tile an iteration, ``vocab // GPU_TILE`` iterations a row. A loop that
  holds loops (a persistent grid's loop over rows) contributes its own code once a row; code
  outside every loop once a program (once a row on a grid of one row per program). The ragged
  last tile is the vector loads and stores outside the innermost loops, of which only the
  entries inside the vocabulary move;
* HBM bytes per row with no L2 reuse: the loads and stores of that code, against the bound of
  one read of each logits row and one write of the gradient (``3 * vocab * itemsize`` bytes);
  issue-bound time: warp instructions per row over the SMs' issue rate; HBM time at the chip's
  bandwidth; the L2 footprint of the rows resident at once;
* the number of Triton calls in the compiled program, so that a loss that silently ran another
  engine shows 0 and fails.

Usage (``.ci/compile_gpu`` installs the toolchain and runs ``--ci``)::

  python benchmarks/compile_gpu.py [--target h100|h200|all] [--cases a,b|--ci] [--out DIR]
      [--json FILE]

Exit status 1 when a case fails to compile, a kdjax kernel spills registers, or a case that
should run a kernel runs none. Each case is compiled in a worker subprocess (``--worker``), so
that ptxas's log, written by XLA's C++ logging, is captured per case.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

_HERE = os.path.abspath(__file__)

# GpuTargetConfigProto text. The compute capability drives code generation; the rest is what
# XLA's cost models read.
_TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2_bytes}
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 9
}}
device_description_str: "{name}"
"""


class Chip(NamedTuple):
  name: str
  bandwidth: int  # HBM bytes/s
  memory: int  # HBM bytes
  sms: int = 132
  l2_bytes: int = 50 << 20
  clock_ghz: float = 1.98  # boost clock


TARGETS = {
    "h100": Chip("NVIDIA H100 80GB HBM3", 3_352_320_000_000, 84_929_347_584),
    "h200": Chip("NVIDIA H200", 4_800_000_000_000, 150_754_820_096),
}

# sm_90 per-SM limits, for CTAs per SM.
SM_REGISTERS = 65536
SM_THREADS = 2048
SM_CTAS = 32
SM_SHARED = 233472
CTA_RESERVED_SHARED = 1024
ISSUE_PER_CLOCK = 4  # warp instructions an SM issues per cycle (one per scheduler)
# Warp MUFU instructions (exp2, log2, reciprocal) an SM completes per cycle: 16 results a clock
# (the CUDA programming guide's throughput table, compute capability 9.0), 1/8 of the FFMA rate.
MUFU_PER_CLOCK = 0.5

LLM = (16384, 128256, "bfloat16")
SMALL_F32 = (8192, 32000, "float32")
FUSED = (8192, 4096, 128256)


@dataclasses.dataclass(frozen=True)
class Case:
  """One compiled program: ``jit(value_and_grad(loss))`` at a shape."""

  name: str
  loss: str  # a divergence, "kd_loss", "combined" or "fused_head"
  shape: tuple  # dense: (tokens, vocab, dtype); fused: (tokens, hidden, vocab)
  traced_temperature: bool = False
  expects_kernel: bool = True  # a Triton call must be in the compiled program

  @property
  def fused(self) -> bool:
    return self.loss == "fused_head"


def all_cases() -> dict[str, Case]:
  import kdjax
  cases = []
  for suffix, shape in (("", LLM), ("_f32", SMALL_F32)):
    cases += [Case(d + suffix, d, shape) for d in kdjax.DIVERGENCES]
    cases += [Case("kd_loss" + suffix, "kd_loss", shape),
              Case("combined" + suffix, "combined", shape),
              Case("combined_traced_T" + suffix, "combined", shape, traced_temperature=True)]
  # The fused head runs no Pallas kernel today (XLA fusions and GEMMs).
  cases.append(Case("fused_head", "fused_head", FUSED, expects_kernel=False))
  return {case.name: case for case in cases}


def ci_plan(cases: dict[str, Case]) -> list[tuple[str, list[str]]]:
  """The CI subset: every bf16 dense case, one float32 case and the fused head for an H100; one
  case for an H200 (same sm_90a code, its own bandwidth)."""
  h100 = [name for name, case in cases.items() if case.shape == LLM]
  return [("h100", [*h100, "forward_kl_f32", "fused_head"]), ("h200", ["kd_loss"])]


# ----------------------------------------------------------------------------------------------
# Worker: one compilation, in its own process.
# ----------------------------------------------------------------------------------------------


def _loss_fn(case: Case):
  import jax.numpy as jnp

  import kdjax

  def temperature():  # Made inside the traced function: a traced value, not a constant.
    return jnp.float32(2.0) if case.traced_temperature else 2.0

  if case.loss == "fused_head":
    return kdjax.fused_linear_distill_loss
  if case.loss == "kd_loss":
    return lambda x, t, y: kdjax.kd_loss(x, t, y, implementation="pallas")
  if case.loss == "combined":
    return lambda x, t, y: kdjax.distill_with_cross_entropy(
        x, t, y, divergence="generalized_jsd", temperature=temperature(),
        implementation="pallas")
  return lambda x, t, y: kdjax.distill_loss(
      x, t, y, divergence=case.loss, implementation="pallas")


def worker(case: Case, target: str, out_json: str) -> None:
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  chip = TARGETS[target]
  topology = topologies.get_topology_desc(
      platform="cuda", target_config=_TARGET_CONFIG.format(**chip._asdict()), topology="1x1x1")
  sharding = NamedSharding(topologies.make_mesh(topology, (1,), ("x",)), P())

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  if case.fused:
    tokens, hidden, vocab = case.shape
    args = [spec((tokens, hidden), jnp.bfloat16), spec((hidden, vocab), jnp.bfloat16)] * 2
    args.append(spec((tokens,), jnp.int32))
    fn = jax.jit(jax.value_and_grad(_loss_fn(case), argnums=(0, 1)))
  else:
    tokens, vocab, dtype = case.shape
    args = [spec((tokens, vocab), jnp.dtype(dtype))] * 2 + [spec((tokens,), jnp.int32)]
    fn = jax.jit(jax.value_and_grad(_loss_fn(case)), donate_argnums=0)
  result: dict[str, Any] = dict(case=case.name, compiled=False)
  try:
    compiled = fn.trace(*args).lower().compile()
  except Exception as e:  # noqa: BLE001 -- the compiler's error is the result.
    result["error"] = f"{type(e).__name__}: {e}"[:4000]
  else:
    hlo = compiled.as_text()
    target = 'custom_call_target="__gpu$xla.gpu.triton"'
    calls = [line for line in hlo.splitlines() if target in line]
    names = [re.search(r'name = "([^"]+)"', line) for line in calls]
    launch = [re.search(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", line)
              for line in calls]
    memory = compiled.memory_analysis()
    result.update(
        compiled=True, triton_calls=len(calls),
        kernels=[m.group(1) if m else "?" for m in names],
        stages_warps=[[int(m.group(1)), int(m.group(2))] if m else None for m in launch],
        temp_bytes=memory.temp_size_in_bytes, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes)
  with open(out_json, "w") as f:
    json.dump(result, f)


# ----------------------------------------------------------------------------------------------
# Reading the compilers' output.
# ----------------------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(
    r"Compiling entry function '([^']+)' for '(sm_\w+)'\n.*?Function properties for \S+\n"
    r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r".*?Used (\d+) registers", re.S)
_THUNK = re.compile(r"\]\s+(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]"
                    r"\s+shared_memory: (\d+) bytes")
_PTXAS_USED = re.compile(r"Using ptxas\(path=([^,]+), version=([\d.]+)\)")


def ptxas_report(log: str) -> dict[str, dict]:
  """Per entry function: registers, spill stores and loads, stack frame bytes."""
  return {m.group(1): dict(regs=int(m.group(6)), spill_stores=int(m.group(4)),
                           spill_loads=int(m.group(5)), stack=int(m.group(3)))
          for m in _PTXAS_ENTRY.finditer(log)}


def thunks(text: str) -> dict[str, dict]:
  """Per kernel of XLA's thunk sequence: grid, threads per block, dynamic shared memory."""
  out = {}
  for m in _THUNK.finditer(text):
    g = [int(x) for x in m.groups()[1:]]
    out[m.group(1)] = dict(grid=g[0] * g[1] * g[2], threads=g[3] * g[4] * g[5], shared=g[6])
  return out


def largest_temporaries(report: str, count: int = 3) -> list[tuple[int, str]]:
  """The largest buffers of XLA's memory-usage report (its first table: the temporaries)."""
  out = []
  for line in report.split("\n\n")[0].splitlines():
    m = re.match(r"\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(B|KiB|MiB|GiB);\s*\d+;\s*\d+;\s*(.*)", line)
    if m:
      scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
      out.append((int(float(m.group(1)) * scale), m.group(3).strip()))
  return sorted(out, key=lambda x: -x[0])[:count]


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _access_bytes(op: str) -> int:
  """Bytes a thread moves with a global load or store opcode (LDG.E.128: 16; LDG.E: 4)."""
  for part in op.split(".")[1:]:
    if part in _WIDTH:
      return _WIDTH[part]
  return 4


class Instruction(NamedTuple):
  address: int
  op: str  # the opcode with its modifiers, predicate stripped: "LDG.E.128"
  text: str


def parse_sass(sass: str) -> list[Instruction]:
  out = []
  for line in sass.splitlines():
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
    if m:
      text = m.group(2)
      op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
      out.append(Instruction(int(m.group(1), 16), op, text))
  return out


def find_loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
  """``(first, last)`` addresses of each loop: a backward branch to ``first`` closes it (several
  backward branches to one head are one loop). Not a loop: the final branch to itself."""
  ends: dict[int, int] = {}
  for ins in instructions:
    if not ins.op.startswith(("BRA", "JMP")):
      continue
    m = re.search(r"0x([0-9a-f]+)\s*$", ins.text)
    target = int(m.group(1), 16) if m else None
    if target is not None and target < ins.address:
      ends[target] = max(ends.get(target, 0), ins.address)
  return sorted(ends.items())


def _mix(body: list[Instruction]) -> dict[str, int]:
  ops = collections.Counter(ins.op.split(".")[0] for ins in body)
  loads = [ins.op for ins in body if ins.op.startswith("LDG")]
  stores = [ins.op for ins in body if ins.op.startswith("STG")]
  return dict(
      instr=len(body),
      ldg128=sum(".128" in op for op in loads), stg128=sum(".128" in op for op in stores),
      load_bytes=sum(map(_access_bytes, loads)), store_bytes=sum(map(_access_bytes, stores)),
      # Loads and stores of at least 64 bits: tiles of logits or gradient, not per-row scalars.
      wide_load_bytes=sum(_access_bytes(op) for op in loads if _access_bytes(op) >= 8),
      wide_store_bytes=sum(_access_bytes(op) for op in stores if _access_bytes(op) >= 8),
      mufu=ops["MUFU"], bar=ops["BAR"], shfl=ops["SHFL"],
      async_copies=ops["LDGSTS"] + ops["UBLKCP"] + ops["UTMALDG"] + ops["LDGDEPBAR"])


def analyse_sass(sass: str) -> dict[str, Any]:
  """The kernel's loops: the innermost ones (vocabulary walks, in program order) with their
  instruction mix; the code of loops that hold loops (once a row); the code outside every loop."""
  instructions = parse_sass(sass)
  loops = find_loops(instructions)

  def inside(ins, loop):
    return loop[0] <= ins.address <= loop[1]

  def contains(outer, inner):
    return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]

  innermost = [lp for lp in loops if not any(contains(lp, other) for other in loops)]
  outer = [lp for lp in loops if lp not in innermost]
  walks = [_mix([i for i in instructions if inside(i, lp)]) for lp in innermost]
  in_walk = {i.address for i in instructions if any(inside(i, lp) for lp in innermost)}
  in_outer = [i for i in instructions
              if i.address not in in_walk and any(inside(i, lp) for lp in outer)]
  rest = [i for i in instructions if i.address not in in_walk and i not in in_outer]
  return dict(total=len(instructions), walks=walks, persistent=bool(outer), outer=_mix(in_outer),
              outside=_mix(rest))


def occupancy(regs: int, threads: int, shared: int) -> int:
  """CTAs resident per SM: registers are allocated per warp in units of 256, 8 per thread."""
  warps = -(-threads // 32)
  regs_per_warp = -(-(-(-regs // 8) * 8 * 32) // 256) * 256
  by_regs = SM_REGISTERS // (regs_per_warp * warps) if regs else SM_CTAS
  return min(by_regs, SM_THREADS // threads, SM_SHARED // (shared + CTA_RESERVED_SHARED), SM_CTAS)


def counted_walks(sass: dict) -> list[dict]:
  """The walks a counted token takes: a loop that stores without loading is the zero gradient
  of a token of weight 0, taken instead of the gradient's walk."""
  return [w for w in sass["walks"] if w["load_bytes"] or not w["store_bytes"]]


def row_cost(sass: dict, *, vocab: int, tile: int, threads: int) -> dict[str, float]:
  """Per row: HBM bytes read and written (no L2 reuse) and warp instructions.

  Innermost loops run ``vocab // tile`` times. The ragged last tile is the code after them: a
  masked tile of the next power of two entries (at most ``tile``), whose vector loads and stores
  move only the entries inside the vocabulary. On a grid of one row per program, code outside
  the loops runs once a row; under a persistent loop over rows, that loop's own code runs once a
  row and the code outside it once a program (not counted here).
  """
  trips = vocab // tile
  remainder = vocab - trips * tile
  ragged = sass["outer"] if sass["persistent"] else sass["outside"]
  valid = remainder / min(tile, 1 << max(remainder - 1, 0).bit_length()) if remainder else 0.0
  walks = counted_walks(sass)
  reads = sum(w["load_bytes"] for w in walks) * threads * trips
  writes = sum(w["store_bytes"] for w in walks) * threads * trips
  reads += ragged["wide_load_bytes"] * threads * valid
  writes += ragged["wide_store_bytes"] * threads * valid
  instructions = sum(w["instr"] for w in walks) * trips + ragged["instr"]
  mufu = sum(w["mufu"] for w in walks) * trips + ragged["mufu"]
  return dict(reads=int(reads), writes=int(writes), trips=trips,
              warp_instructions=instructions * threads // 32, warp_mufu=mufu * threads // 32)


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------


def _gpu_tile() -> int:
  """kdjax's vocabulary tile for the GPU kernels (``GPU_TILE``; 2048 where it has none)."""
  try:
    from kdjax._src import pallas
  except ImportError:
    return 2048
  return int(getattr(pallas, "GPU_TILE", 2048))


def _case_tile(tile: int, vocab: int, dtype: str) -> int:
  """The tile the kernel takes at this vocabulary and dtype (float32 logits: half)."""
  try:
    from kdjax._src import pallas
    return int(pallas.gpu_tile(vocab, (dtype, dtype), tile))
  except (ImportError, AttributeError):
    return tile


def _sass_tool(name: str) -> str:
  for directory in (os.environ.get("KDJAX_SASS_TOOLS"), *os.environ["PATH"].split(os.pathsep)):
    if directory and os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f"{name}: set KDJAX_SASS_TOOLS to the directory of cuobjdump/nvdisasm")


def disassemble(ptx_path: str, ptxas: str) -> str:
  """The PTX assembled as XLA assembles it (same ptxas, -arch=sm_90a) and disassembled."""
  cuobjdump = _sass_tool("cuobjdump")
  env = dict(os.environ, PATH=os.path.dirname(_sass_tool("nvdisasm")) + os.pathsep
             + os.environ["PATH"])
  with tempfile.TemporaryDirectory() as tmp:
    cubin = os.path.join(tmp, "kernel.cubin")
    subprocess.run([ptxas, ptx_path, "-o", cubin, "-arch=sm_90a"], check=True,
                   capture_output=True)
    return subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True,
                          text=True, env=env).stdout


def _read(path: str) -> str:
  with open(path, errors="replace") as f:
    return f.read()


def run_case(case: Case, target: str, dump: str, tile: int) -> dict[str, Any]:
  shutil.rmtree(dump, ignore_errors=True)
  os.makedirs(dump)
  out_json = os.path.join(dump, "result.json")
  env = dict(os.environ, JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", TF_CPP_MIN_LOG_LEVEL="0",
             TF_CPP_VMODULE="subprocess_compilation=3,assemble_compilation_provider=3",
             XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
                       "--xla_gpu_ptx_compiler_extra_flags=-v")
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, _HERE, "--worker", case.name, "--target", target,
                         "--json", out_json], env=env, capture_output=True, text=True)
  log = proc.stdout + proc.stderr
  with open(os.path.join(dump, "compile.log"), "w") as f:
    f.write(log)
  if not os.path.exists(out_json):
    # The exception's own line first (the table shows the first line), then the log's tail.
    last = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
    return dict(case=case.name, compiled=False,
                error=f"worker exited with {proc.returncode}: {last[0]}\n{log[-2000:]}")
  with open(out_json) as f:
    result = json.load(f)
  result["seconds"] = round(time.perf_counter() - start, 1)
  if not result["compiled"]:
    return result
  result["ptxas"] = ptxas_report(log)
  used = _PTXAS_USED.search(log)
  result["ptxas_used"] = f"{used.group(1)} {used.group(2)}" if used else None
  files = sorted(os.listdir(dump))
  result["thunks"] = {}
  for name in files:
    if name.endswith("thunk_sequence.txt"):
      result["thunks"].update(thunks(_read(os.path.join(dump, name))))
  reports = [n for n in files if n.endswith("memory-usage-report.txt")]
  if reports:
    result["largest_temporaries"] = largest_temporaries(_read(os.path.join(dump, reports[0])))
  result["sass"] = {}
  for kernel in dict.fromkeys(result["kernels"]):
    ptx = [n for n in files if n.endswith(".ptx")
           and re.search(rf"\.entry {re.escape(kernel)}\b", _read(os.path.join(dump, n)))]
    if ptx and used:
      sass = disassemble(os.path.join(dump, ptx[0]), used.group(1))
      with open(os.path.join(dump, f"{kernel}.sass"), "w") as f:
        f.write(sass)
      result["sass"][kernel] = analyse_sass(sass)
  if not case.fused:
    result["rows"] = [_kernel_row(case, target, result, k, tile) for k in result["sass"]]
  return result


def _kernel_row(case: Case, target: str, result: dict, kernel: str, tile: int) -> dict:
  """The numbers of one kernel of a dense case."""
  tokens, vocab, dtype = case.shape
  itemsize = 4 if dtype == "float32" else 2
  chip = TARGETS[target]
  ptxas, launch, sass = result["ptxas"][kernel], result["thunks"][kernel], result["sass"][kernel]
  threads = launch["threads"]
  ctas = occupancy(ptxas["regs"], threads, launch["shared"])
  tile = _case_tile(tile, vocab, dtype)
  cost = row_cost(sass, vocab=vocab, tile=tile, threads=threads)
  programs = launch["grid"]
  per_program = sass["outside"]["instr"] * threads // 32 if sass["persistent"] else 0
  issue_clocks = (tokens * cost["warp_instructions"] + programs * per_program) / (
      chip.sms * ISSUE_PER_CLOCK)
  mufu_clocks = tokens * cost["warp_mufu"] / (chip.sms * MUFU_PER_CLOCK)
  resident = min(ctas * chip.sms, programs)
  bound = 3 * vocab * itemsize
  return dict(
      kernel=kernel, **ptxas, grid=programs, threads=threads, shared=launch["shared"],
      ctas_per_sm=ctas, occupancy=ctas * threads / SM_THREADS, **cost, bound_bytes=bound,
      bytes_vs_bound=(cost["reads"] + cost["writes"]) / bound,
      issue_ms=issue_clocks / (chip.clock_ghz * 1e9) * 1e3,
      mufu_ms=mufu_clocks / (chip.clock_ghz * 1e9) * 1e3,
      hbm_ms=tokens * (cost["reads"] + cost["writes"]) / chip.bandwidth * 1e3,
      bound_ms=tokens * bound / chip.bandwidth * 1e3, resident_rows=resident,
      l2_footprint=resident * 2 * vocab * itemsize)


def failures(case: Case, result: dict) -> list[str]:
  """Why a case fails CI: not compiled, a kdjax kernel spills, or no kernel where one should run."""
  if not result.get("compiled"):
    return ["did not compile"]
  out = []
  for kernel in dict.fromkeys(result["kernels"]):
    p = result["ptxas"].get(kernel)
    if p is None:
      out.append(f"{kernel}: no ptxas report")
    elif p["spill_stores"] or p["spill_loads"]:
      out.append(f"{kernel} spills {p['spill_stores']}/{p['spill_loads']} B")
  if case.expects_kernel and not result["triton_calls"]:
    out.append("no Triton call in the compiled program (another engine ran)")
  return out


def _shape_text(case: Case) -> str:
  if case.fused:
    return "x".join(map(str, case.shape)) + " bf16"
  tokens, vocab, dtype = case.shape
  return f"[{tokens}, {vocab}] {'bf16' if dtype == 'bfloat16' else 'f32'}"


def print_report(target: str, tile: int, cases: dict[str, Case], results: dict) -> None:
  chip = TARGETS[target]
  used = sorted({r["ptxas_used"] for r in results.values() if r.get("ptxas_used")})
  print(f"\n# {chip.name} (sm_90a): compiled, not measured (XLA deviceless AOT)\n")
  print(f"ptxas: {', '.join(used) or '?'}; vocabulary tile {tile} (float32 logits: "
        f"{tile // 2}); {chip.sms} SMs, {chip.l2_bytes >> 20} MiB L2, "
        f"{chip.bandwidth / 1e12:.2f} TB/s.\n")
  print("| case | shape | compiled | Triton calls | kernel | regs | spills st/ld B | stack B "
        "| CTAs/SM (occupancy) | grid | warps | HBM read / write per row | vs 3·V·itemsize |")
  print("|" + "---|" * 13)
  for name, r in results.items():
    case = cases[name]
    if case.fused:
      continue
    head = f"| {name} | {_shape_text(case)} |"
    if not r.get("compiled"):
      error = (r.get("error") or "?").strip().splitlines()
      print(f"{head} no: {error[0][:200] if error else '?'} |" + " |" * 10)
      continue
    if not r.get("rows"):
      print(f"{head} yes | {r['triton_calls']} | none |" + " |" * 8)
      continue
    for row in r["rows"]:
      print(f"{head} yes | {r['triton_calls']} | {row['kernel']} | {row['regs']} "
            f"| {row['spill_stores']}/{row['spill_loads']} | {row['stack']} "
            f"| {row['ctas_per_sm']} ({row['occupancy']:.0%}) | {row['grid']} "
            f"| {row['threads'] // 32} | {row['reads'] / 1e6:.3f} / {row['writes'] / 1e6:.3f} MB "
            f"| {row['bytes_vs_bound']:.2f}x |")

  print(f"\n## SASS per tile per warp ({tile} entries, float32: {tile // 2}), and times at "
        "[tokens, vocab]\n")
  print("| case | SASS instr. | walks (innermost loops): instr / LDG.128 / STG.128 / MUFU / BAR "
        "/ SHFL / async | persistent | resident rows (L2 footprint) | issue-bound ms "
        "| MUFU-bound ms | HBM ms, no reuse | HBM ms, bound |")
  print("|" + "---|" * 9)
  for name, r in results.items():
    for row in r.get("rows") or []:
      sass = r["sass"][row["kernel"]]
      counted = counted_walks(sass)
      walks = "; ".join(f"{'' if w in counted else '(zero) '}{w['instr']}/{w['ldg128']}"
                        f"/{w['stg128']}/{w['mufu']}/{w['bar']}/{w['shfl']}/{w['async_copies']}"
                        for w in sass["walks"])
      print(f"| {name} | {sass['total']} | {walks} | {'yes' if sass['persistent'] else 'no'} "
            f"| {row['resident_rows']} ({row['l2_footprint'] / 2**20:.0f} MiB vs "
            f"{chip.l2_bytes >> 20} MiB) | {row['issue_ms']:.1f} | {row['mufu_ms']:.1f} "
            f"| {row['hbm_ms']:.1f} "
            f"| {row['bound_ms']:.1f} |")
  print(f"\nissue-bound: warp instructions per row x rows / ({chip.sms} SMs x {ISSUE_PER_CLOCK} "
        f"a clock x {chip.clock_ghz} GHz), no stalls; MUFU-bound: the MUFU instructions alone "
        f"(exponentials, logarithms, reciprocals) at {MUFU_PER_CLOCK} a clock per SM, the "
        f"special-function units' rate; HBM: the bytes counted above at "
        f"{chip.bandwidth / 1e12:.2f} TB/s; bound: 3·V·itemsize bytes a row. (zero): a token "
        f"of weight 0 writes its zero gradient in this walk instead of the gradient's; not "
        f"counted.")

  for name, r in results.items():
    case = cases[name]
    if not case.fused or not r.get("compiled"):
      continue
    spills = {k: v for k, v in r["ptxas"].items() if v["spill_stores"] or v["spill_loads"]}
    regs = {k: v["regs"] for k, v in r["ptxas"].items()}
    print(f"\n## {name}: fused_linear_distill_loss {_shape_text(case)}, grad wrt hidden and "
          "kernel\n")
    top = max(regs, key=regs.get) if regs else "?"
    print(f"temporaries {r['temp_bytes'] / 2**30:.2f} GiB; {len(regs)} kernels, most registers "
          f"{regs.get(top, '?')} ({top}); spills: {spills or 'none'}; Triton calls "
          f"{r['triton_calls']}.\n")
    print("| largest temporaries | shapes |\n|---|---|")
    for size, shapes in r.get("largest_temporaries", []):
      print(f"| {size / 2**20:,.0f} MiB | {shapes} |")
    gemms = sorted((k, v) for k, v in r["thunks"].items() if "gemm" in k or "dot" in k)
    if gemms:
      print("\n| GEMM kernel | grid | threads | shared B | regs |\n|---|---|---|---|---|")
      for k, t in gemms:
        print(f"| {k} | {t['grid']} | {t['threads']} | {t['shared']} | {regs.get(k, '?')} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--target", choices=[*TARGETS, "all"], default="h100")
  parser.add_argument("--cases", help="comma-separated case names (default: all)")
  parser.add_argument("--ci", action="store_true",
                      help="the CI subset: H100 every bf16 dense case, forward_kl_f32 and the "
                           "fused head; H200 kd_loss")
  parser.add_argument("--list", action="store_true", help="print the case names and exit")
  parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "kdjax-compile-gpu"),
                      help="dumps (HLO, PTX, SASS, logs) go to OUT/<target>/<case>/")
  parser.add_argument("--json", help="results file (default: OUT/results.json)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  cases = all_cases()
  if args.worker:
    worker(cases[args.worker], args.target, args.json)
    return 0
  if args.list:
    print("\n".join(cases))
    return 0
  if args.ci:
    plan = ci_plan(cases)
  else:
    names = args.cases.split(",") if args.cases else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
      parser.error(f"unknown cases {unknown}; --list prints the names")
    plan = [(t, names) for t in (TARGETS if args.target == "all" else [args.target])]
  import jax
  import jaxlib
  tile = _gpu_tile()
  print(f"kdjax GPU kernels compiled without a GPU: jax {jax.__version__}, jaxlib "
        f"{jaxlib.__version__}; dumps under {args.out}")
  everything, failed = {}, []
  for target, names in plan:
    results = {}
    for name in names:
      results[name] = run_case(cases[name], target, os.path.join(args.out, target, name), tile)
      why = failures(cases[name], results[name])
      failed += [f"{target} {name}: {w}" for w in why]
      print(f"  {target} {name}: {'; '.join(why) or 'ok'} ({results[name].get('seconds', '?')} s)",
            file=sys.stderr, flush=True)
    print_report(target, tile, cases, results)
    everything[target] = results
  path = args.json or os.path.join(args.out, "results.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(tile=tile, results=everything, failures=failed), f, indent=1)
  if failed:
    print("\nFAILED:\n" + "\n".join(f"  {f}" for f in failed))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
