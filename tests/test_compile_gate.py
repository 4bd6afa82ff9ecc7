"""The compile gate (`peftfast.compile_gate`): the kernels compiled for A100 (sm_80) and H100 (sm_90) on this CPU
machine, every config their launchers can pick for a representative subset of launches, each checked for shared
memory within the block limit, no register spills and tensor-core instructions wherever a 16-bit `tl.dot` is.

The subset runs in the default suite (two worker processes); the whole grid (750 kernels, about 10 minutes on
2 cores) runs with PEFTFAST_GATE_FULL=1 or as `peftfast gate --full`.
"""

import os

import pytest

from peftfast import compile_gate

pytest.importorskip("triton")

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_dual_matmul_kernel' for 'sm_90a'
ptxas info    : Function properties for _dual_matmul_kernel
    0 bytes stack frame, 1564 bytes spill stores, 1564 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_ptxas_log_gives_registers_and_spills():
    assert compile_gate.parse_ptxas_log(LOG) == (255, 1564)
    assert compile_gate.parse_ptxas_log(LOG.replace("1564 bytes spill stores", "0 bytes spill stores")) == (255, 0)
    assert compile_gate.parse_ptxas_log("no counts here") is None


def _row(**overrides):
    fields = dict(kernel="_k", target="sm_80", variant="", config="BLOCK_M=64 warps=4 stages=3", scenario="s")
    fields.update(regs=100, spills=0, smem=1000, has_dot=True, tensor_cores=True, needs_tensor_cores=True)
    fields.update(overrides)
    return compile_gate.CompiledConfig(**fields)


def test_every_way_a_kernel_fails_the_gate_is_reported():
    target = compile_gate.TARGETS["sm_80"]
    ok = _row()
    ok.check(target)
    assert ok.problems == []
    bad = _row(spills=16, smem=target.max_shared_mem + 1, tensor_cores=False)
    bad.check(target)
    assert bad.problems == [
        f"shared memory {target.max_shared_mem + 1} B > {target.max_shared_mem} B",
        "spills 16 B of registers",
        "tl.dot without tensor-core instructions",
    ]
    broken = _row(error="PTXASError: boom")
    broken.check(target)
    assert broken.problems == ["failed: PTXASError: boom"]
    # fp32 (IEEE) dots don't use tensor cores by design: only 16-bit dots must.
    fp32 = _row(tensor_cores=False, needs_tensor_cores=False)
    fp32.check(target)
    assert fp32.problems == []
    # A config the launcher compiled only to prune it never runs: reported, not failed.
    pruned = _row(spills=56, launched=False)
    pruned.check(target)
    assert pruned.problems == [] and pruned.pruned_for == ["spills 56 B of registers"]
    table = compile_gate.format_table([ok, bad, pruned])
    assert "FAIL: shared memory" in table and "pruned: spills 56 B" in table and table.count(" ok") >= 1


def test_scenarios_cover_every_kernel_and_the_subset_every_kernel_too():
    names = compile_gate.scenario_names(subset=False)
    assert len(names) == len(set(names))
    subset = compile_gate.scenario_names(subset=True)
    families = (
        "lora_shrink",
        "lora_grad_dy",
        "lora_grad_a",
        "dual_matmul",
        "nf4_dequantize",
        "nf4_lora_matmul",
        "sgmv",
    )
    for family in families:
        assert any(name.startswith(family) for name in subset), family


@pytest.fixture(scope="module")
def subset_rows():
    return compile_gate.run(subset=True, jobs=2)


def test_the_representative_subset_passes_the_gate_on_both_targets(subset_rows):
    failing = [row for row in subset_rows if row.problems]
    assert not failing, compile_gate.format_table(failing)
    for target in compile_gate.TARGETS:
        kernels = {row.kernel for row in subset_rows if row.target == target}
        assert kernels >= {
            "_lora_shrink_kernel",
            "_lora_grad_dy_kernel",
            "_lora_grad_a_kernel",
            "_dual_matmul_kernel",
            "_nf4_dequantize_kernel",
            "_nf4_lora_matmul_kernel",
            "_sgmv_shrink_kernel",
            "_sgmv_expand_kernel",
            "_dora_forward_kernel",
            "_dora_grad_x_kernel",
            "_weight_times_adapter_kernel",
            "_column_dot_kernel",
            "_grouped_matmul_kernel",
            "_grouped_outer_kernel",
        }, target
    assert all(row.regs is not None and row.smem is not None for row in subset_rows)
    assert all(row.tensor_cores for row in subset_rows if row.needs_tensor_cores)


def test_the_dual_gemm_keeps_large_tiles_with_dropout_on_h100(subset_rows):
    """The dX kernel with dropout: the 128x256-class tiles survive pruning on sm_90 and compile clean (they spilled
    before the LoRA product moved ahead of the main loop and the mask left Philox)."""
    dual = [r for r in subset_rows if r.kernel == "_dual_matmul_kernel" and r.target == "sm_90" and r.launched]
    assert all("MASK_SECOND=True" in row.variant for row in dual)
    tiles = {" ".join(row.config.split()[:2]) for row in dual}
    assert {"BLOCK_M=128 BLOCK_N=256", "BLOCK_M=256 BLOCK_N=128", "BLOCK_M=128 BLOCK_N=128"} <= tiles


def test_rank_128_with_fp32_adapters_fits_an_a100(subset_rows):
    """HF PEFT keeps adapters in fp32; at rank 128 these kernels asked for 180 KB of shared memory (A100: 163 KB)."""
    for kernel in ("_lora_shrink_kernel", "_lora_grad_dy_kernel"):
        [row] = [r for r in subset_rows if r.kernel == kernel and r.target == "sm_80" and "BLOCK_R=128" in r.config]
        assert row.smem <= compile_gate.TARGETS["sm_80"].max_shared_mem and not row.problems


@pytest.mark.compile_gate_full
def test_the_whole_grid_passes_the_gate():
    rows = compile_gate.run(subset=False)
    failing = [row for row in rows if row.problems]
    assert not failing, compile_gate.format_table(failing)


def test_the_gate_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        compile_gate.compile_target(compile_gate.TARGETS["sm_90"], None, subset=True)
    assert os.environ["TRITON_INTERPRET"] == "1"
