# ruff: noqa: E501 -- canned compiler output keeps its long lines.
"""The compile reports' parsers (benchmarks/compile_gpu.py, compile_tpu.py) on canned compiler
output: no toolchain needed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import compile_gpu  # noqa: E402
import compile_tpu  # noqa: E402

_PTXAS_LOG = """ptxas info    : Compiling entry function 'kdjax_forward_kl' for 'sm_90a'
ptxas info    : Function properties for kdjax_forward_kl
    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 58 registers, used 1 barriers
"""


def test_ptxas_report_reads_registers_and_spills():
  report = compile_gpu.ptxas_report(_PTXAS_LOG)
  assert report == {"kdjax_forward_kl": dict(regs=58, spill_stores=16, spill_loads=12, stack=8)}


def test_thunks_read_grid_threads_and_shared_memory():
  text = ("003: kCustomKernel [prev=002 (1) | next=004 (1)] kdjax_forward_kl grid: [16384, 1, 1] "
          "threads: [256, 1, 1]  shared_memory: 32 bytes")
  assert compile_gpu.thunks(text) == {"kdjax_forward_kl": dict(grid=16384, threads=256, shared=32)}


def _sass(lines):
  return "\n".join(f"        /*{address:04x}*/  {text} ;  /* 0x0 */" for address, text in lines)


# A persistent kernel: an outer loop over rows (0x0040-0x0200) holding two vocabulary walks, a
# ragged tile after them; the trap branch to itself at the end is not a loop.
_PERSISTENT = _sass([
    (0x0000, "S2R R0, SR_CTAID.X"),
    (0x0010, "LDG.E R1, desc[UR6][R2.64]"),
    (0x0040, "IMAD R4, R0, 0x4, RZ"),
    (0x0050, "LDG.E.128 R8, desc[UR6][R4.64]"),
    (0x0060, "LDG.E.128 R12, desc[UR6][R6.64]"),
    (0x0070, "MUFU.EX2 R9, R9"),
    (0x0080, "@P0 BRA 0x50"),
    (0x0090, "LDG.E.128 R8, desc[UR6][R4.64]"),
    (0x00a0, "MUFU.EX2 R9, R9"),
    (0x00b0, "STG.E.128 desc[UR6][R4.64], R8"),
    (0x00c0, "@!P1 BRA 0x90"),
    (0x00d0, "LDG.E.128 R8, desc[UR6][R4.64]"),
    (0x00e0, "STG.E.128 desc[UR6][R4.64], R8"),
    (0x00f0, "SHFL.BFLY PT, R3, R2, 0x1, 0x1f"),
    (0x0200, "@P2 BRA 0x40"),
    (0x0210, "EXIT"),
    (0x0220, "BRA 0x220"),
])


def test_sass_loops_nested_innermost_are_the_walks():
  sass = compile_gpu.analyse_sass(_PERSISTENT)
  assert sass["persistent"]
  assert [(w["instr"], w["ldg128"], w["stg128"], w["mufu"]) for w in sass["walks"]] == [
      (4, 2, 0, 1), (4, 1, 1, 1)]
  assert (sass["outer"]["instr"], sass["outer"]["shfl"]) == (5, 1)
  assert sass["outside"]["instr"] == 4  # prologue, EXIT and the trap


def test_row_cost_counts_trips_and_the_ragged_tile():
  sass = compile_gpu.analyse_sass(_PERSISTENT)
  # 10 full tiles of 2048 and 1280 entries more: the ragged tile is 2048 wide, masked, and its
  # loads and stores move 1280 / 2048 of it.
  cost = compile_gpu.row_cost(sass, vocab=10 * 2048 + 1280, tile=2048, threads=256)
  assert cost["trips"] == 10
  assert cost["reads"] == 3 * 16 * 256 * 10 + 16 * 256 * 1280 // 2048
  assert cost["writes"] == 16 * 256 * 10 + 16 * 256 * 1280 // 2048
  assert cost["warp_instructions"] == (8 * 10 + 5) * 8


def test_row_cost_one_row_per_program_counts_the_code_outside_loops():
  flat = _sass([(0x00, "LDG.E.128 R8, desc[UR6][R4.64]"), (0x10, "@P0 BRA 0x0"),
                (0x20, "LDG.E.128 R8, desc[UR6][R4.64]"), (0x30, "EXIT")])
  sass = compile_gpu.analyse_sass(flat)
  assert not sass["persistent"]
  cost = compile_gpu.row_cost(sass, vocab=4096, tile=2048, threads=128)
  assert cost["reads"] == 2 * 16 * 128  # no remainder: the ragged code moves nothing
  assert cost["warp_instructions"] == (2 * 2 + 2) * 4


def test_a_loop_that_only_stores_is_the_zero_gradient_not_counted():
  # A walk that reads, then two alternatives: the zero gradient of a token of weight 0 (stores
  # only) and the gradient's walk (reads and stores); a counted token takes the latter.
  code = _sass([(0x00, "LDG.E.128 R8, desc[UR6][R4.64]"), (0x10, "@P0 BRA 0x0"),
                (0x20, "STG.E.128 desc[UR6][R4.64], RZ"), (0x30, "STG.E.128 desc[UR6][R6.64], RZ"),
                (0x40, "@P1 BRA 0x20"),
                (0x50, "LDG.E.128 R8, desc[UR6][R4.64]"), (0x60, "STG.E.128 desc[UR6][R4.64], R8"),
                (0x70, "@P2 BRA 0x50"), (0x80, "EXIT")])
  sass = compile_gpu.analyse_sass(code)
  assert [w["instr"] for w in sass["walks"]] == [2, 3, 3]
  assert [w["instr"] for w in compile_gpu.counted_walks(sass)] == [2, 3]
  cost = compile_gpu.row_cost(sass, vocab=4096, tile=2048, threads=128)
  assert cost["reads"] == 2 * (16 + 16) * 128 and cost["writes"] == 2 * 16 * 128
  assert cost["warp_instructions"] == (2 * (2 + 3) + 1) * 4


@pytest.mark.parametrize("regs, threads, shared, ctas", [
    (58, 256, 32, 4), (76, 256, 32, 3), (114, 256, 32, 2), (32, 1024, 0, 2),
    (16, 128, 100_000, 2)])
def test_occupancy_follows_the_sm90_limits(regs, threads, shared, ctas):
  assert compile_gpu.occupancy(regs, threads, shared) == ctas


def test_largest_temporaries_of_the_memory_report():
  report = """Total bytes: 7566653896 (7.05GiB)
  cumulative_size;       size;       offset; used_by_n_values; shapes_list
  ------------------------------------------------------------
    1.96GiB( 50%);    1.96GiB;            0;                6; f32[64,16,1], 5×f32[4096,128256]
    2.45GiB( 62%);  501.00MiB;   2101346304;                3; bf16[1024,4096], f32[1024,128256]
    2.45GiB(100%);       72B;   4213274880;                5; 5×s32[]

  cumulative_size;       size;       offset; used_by_n_values; shapes_list
    9.00GiB(100%);    9.00GiB;            0;                1; bf16[4096,128256]
"""
  top = compile_gpu.largest_temporaries(report, count=2)
  assert [size for size, _ in top] == [int(1.96 * 2**30), 501 * 2**20]
  assert top[0][1].endswith("5×f32[4096,128256]")


_HLO = """HloModule jit_loss

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %a = f32[8]{0} fusion(%x), kind=kLoop, backend_config={"estimated_cycles":"100"}
  ROOT %t = (s32[], f32[8]) tuple(%i, %a)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (x: bf16[16,128256]) -> f32[] {
  %k = (f32[16,1]{1,0}, bf16[16,128256]{1,0}) custom-call(%x, %y), custom_call_target="tpu_custom_call", operand_layout_constraints={bf16[16,128256]{1,0}, bf16[16,128256]{1,0}}, backend_config={"scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"33013760"}],"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"24657920"}]}
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  ROOT %r = f32[] fusion(%w), kind=kLoop, backend_config={"estimated_cycles":"7"}
}
"""


def test_tpu_kernel_calls_read_vmem_and_hbm_bytes():
  (kernel,) = compile_tpu.kernel_calls(_HLO)
  assert kernel["name"] == "k"
  assert (kernel["vmem_reserved"], kernel["vmem_used"]) == (33013760, 24657920)
  assert kernel["read_bytes"] == 2 * 16 * 128256 * 2
  assert kernel["write_bytes"] == 16 * 4 + 16 * 128256 * 2


def test_tpu_program_cycles_count_while_bodies_by_trip_count():
  cycles = compile_tpu.program_cycles(_HLO, {"k": 1000})
  assert cycles["cycles"] == 1000 + 8 * 100 + 7
  assert cycles["loops"] == [dict(op="w", trips=8, cycles_per_trip=100)]


def test_tpu_bundle_cycles_nest_loops_by_depth():
  # A grid loop of 3 steps (its exit test at its end) holding a tile loop of 250 trips: 2
  # bundles and an empty one, which carries no depth mark and stays in the loop it follows.
  bundles = """
   0x0   :  { %s0 = smov 0 }
   0x1 LB: > { %s1 = sadd.s32 1, %s0 }
   0x2 LB: >> { %v0 = vld [vmem:[%s2]] }
   0x3   : >> { %p0 = scmp.ge.s32.totalorder %s3, 250 /* loop exit test */ }
   0x4   :  {}
   0x5   : > { %p1 = scmp.ge.s32.totalorder %s4, 3 /* loop exit test */ }
   0x6   :  { %s5 = smov 1 }
"""
  assert compile_tpu.bundle_cycles(bundles) == 1 + 3 * (1 + 250 * 3 + 1) + 1


def test_tpu_static_profile_runs_with_twice_the_cores_vmem():
  # Under the static profile libtpu counts the kernel's VMEM used on top of its reservation.
  flags = compile_tpu.profile_flags("llo", "prof", vmem_capacity=128 * 2**20)
  assert flags.split() == ["--xla_jf_dump_static_llo_profile_to=prof",
                           "--xla_tpu_override_vmem_size_kib=262144"]
  assert compile_tpu.profile_flags("bundles", "jf").split() == [
      "--xla_jf_dump_to=jf", "--xla_jf_dump_llo_text=true"]
  with pytest.raises(ValueError, match="unknown profile method"):
    compile_tpu.profile_flags("perf", "x")


def test_tpu_linear_fit_over_the_grids_the_programs_report():
  # A megacore v5p: 2 and 4 blocks per core are grids of 4 and 8 blocks.
  assert compile_tpu.linear_fit({4: 120_000, 8: 220_000}) == (20_000, 25_000)


def test_tpu_grid_and_rows_of_the_mosaic_call():
  result = dict(blocks=[dict(grid=[4], rows=32)])
  assert (compile_tpu._grid(result), compile_tpu._rows(result)) == (4, 32)
  assert compile_tpu._grid(dict(blocks=[dict(grid=[4], rows=32), dict(grid=[2], rows=32)])) is None


def test_tpu_kernel_estimate_extrapolates_to_the_kernels_own_grid():
  case = compile_tpu.all_cases()["kd_loss"]
  result = dict(rows=64, grid=256, kernel_profile=dict(fixed=1000.0, per_block=100.0))
  assert compile_tpu.kernel_estimate(case, "v5e", result)["cycles"] == 1000 + 256 * 100
  del result["grid"]  # From the rows per block: 16384 tokens in blocks of 64.
  assert compile_tpu.kernel_estimate(case, "v5e", result)["cycles"] == 1000 + 256 * 100
  result["rows"] = 32
  assert compile_tpu.kernel_estimate(case, "v5e", result)["cycles"] == 1000 + 512 * 100


def test_tpu_first_error_keeps_the_vmem_figures():
  error = ("JaxRuntimeError: RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
           "memory in memory space vmem. Used 200.12M of 128.00M vmem. Exceeded vmem capacity "
           "by 72.12M.\n\nProgram vmem requirement 200.12M:")
  assert compile_tpu._first_error(dict(error=error)) == (
      "Ran out of memory in memory space vmem. Used 200.12M of 128.00M vmem.")
