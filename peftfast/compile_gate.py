"""The compile gate: every config the kernel launchers can pick, compiled for A100 (sm_80) and H100 (sm_90) on a
machine without a GPU, and checked for what makes a kernel fail or crawl on the real one.

How: the real launchers of `peftfast.kernels` run on `meta` tensors (they have dtype, shape, strides and a data
pointer, and aren't CPU tensors, so the launchers pick their GPU block sizes and Triton specialises alignment and
divisibility exactly as on a GPU) under `CompileOnlyDriver`, a stand-in for Triton's CUDA driver that reports the
target and its limits, compiles, and never launches. Its benchmarker compiles every config an autotuner keeps after
pruning, so each row is a kernel a launcher can really run; configs the launchers compile only to prune them (see
`kernels.lora_linear.keep_clean_configs`) are listed as pruned. Per compiled kernel the gate reads registers and
spills from ptxas's own log, shared memory from the kernel's metadata and tensor-core instructions (`mma`, `wgmma`)
from its PTX, and checks:

- it compiles, and its shared memory fits the target's per-block limit;
- no register spills;
- every `tl.dot` on 16-bit inputs runs on tensor cores (fp32 dots are IEEE fp32 on purpose, see `kernels`).

Each target compiles in worker processes of its own (Triton picks its target per process and device, and
TRITON_INTERPRET, which the test suite sets, must be off), with a fresh Triton cache so that ptxas really runs.

    peftfast gate                  # the representative subset, both targets, the table and a verdict
    peftfast gate --full           # every scenario (750 kernels, about 10 minutes on 2 cores)
    python bench/compile_gate.py   # the same
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    """A GPU the gate compiles for: compute capability and the limits a block must fit in."""

    name: str
    gpu: str
    capability: int
    max_shared_mem: int  # bytes a block may use (the opt-in maximum)
    multiprocessor_count: int
    max_num_regs: int = 65536  # registers per block (and per SM)
    max_regs_per_thread: int = 255


TARGETS = {
    "sm_80": Target("sm_80", "A100", 80, 166_912, 108),
    "sm_90": Target("sm_90", "H100", 90, 232_448, 132),
}


@dataclass
class CompiledConfig:
    """One compiled kernel (or one that failed to compile) for one target."""

    kernel: str
    target: str
    variant: str  # the constexprs that select code paths and dtypes, and the sizes Triton specialised
    config: str  # block sizes, warps, stages
    scenario: str  # the first launcher call that compiled it
    regs: int | None = None
    spills: int | None = None  # bytes of spill stores
    smem: int | None = None
    has_dot: bool = False
    tensor_cores: bool = False
    needs_tensor_cores: bool = False
    error: str | None = None
    # False for a config the launcher compiled only to prune it (it never runs): shown, but not held to the gate.
    launched: bool = True
    problems: list[str] = field(default_factory=list)
    pruned_for: list[str] = field(default_factory=list)

    def check(self, target: Target) -> None:
        """Fill `problems` with every way this kernel fails the gate on `target` (`pruned_for` instead, for a config
        that is never launched)."""
        found = []
        if self.error is not None:
            found.append(f"failed: {self.error}")
        else:
            if self.smem is not None and self.smem > target.max_shared_mem:
                found.append(f"shared memory {self.smem} B > {target.max_shared_mem} B")
            if self.spills is None:
                found.append("no ptxas log (registers and spills unknown)")
            elif self.spills > 0:
                found.append(f"spills {self.spills} B of registers")
            if self.needs_tensor_cores and not self.tensor_cores:
                found.append("tl.dot without tensor-core instructions")
        self.problems, self.pruned_for = (found, []) if self.launched else ([], found or ["not picked"])


# ---------------------------------------------------------------------------------------------- compile-only driver


class _DeviceUtils:
    """The part of Triton's CUDA driver utilities that compiling and launching consult."""

    def __init__(self, target: Target, ptxas_stats: dict[bytes, tuple[int, int]]) -> None:
        self.target = target
        self.ptxas_stats = ptxas_stats

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {
            "max_shared_mem": self.target.max_shared_mem,
            "max_num_regs": self.target.max_num_regs,
            "multiprocessor_count": self.target.multiprocessor_count,
            "warpSize": 32,
            "sm_clock_rate": 1_755_000,
            "mem_clock_rate": 2_619_000,
            "mem_bus_width": 5120,
        }

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        # (module, function, registers, spills, max threads per block), as the CUDA driver reports them.
        regs, spills = self.ptxas_stats.get(kernel, (0, 0))
        return 0, 0, regs, spills, 1024

    def unload_module(self, module: int) -> None:
        return None


class _NoLaunch:
    """Stands in for Triton's CUDA launcher: built for each compiled kernel, called for each launch, does nothing but
    note which kernels were launched (the others were only compiled, by a launcher pruning its configs)."""

    launched: set[str] = set()

    def __init__(self, src: object, metadata: object) -> None:
        self.hash = metadata.hash

    def __call__(self, *args: object, **kwargs: object) -> None:
        _NoLaunch.launched.add(self.hash)


def _compile_only_benchmarker(kernel_call: Callable[[], None], quantiles: Sequence[float] = (), **kwargs) -> list:
    # Autotuning "times" each config by compiling it (and not launching); equal times keep the first config.
    kernel_call()
    return [1.0] * max(1, len(quantiles or ()))


def compile_only_driver(target: Target, ptxas_stats: dict[bytes, tuple[int, int]]):
    """A Triton driver for `target` that compiles and never launches (see the module docstring)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        def __init__(self) -> None:
            self.utils = _DeviceUtils(target, ptxas_stats)
            self.launcher_cls = _NoLaunch
            self.device = target.capability

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("the compile-only driver builds no launcher")

        def get_current_target(self):
            return GPUTarget("cuda", target.capability, 32)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("meta")

        def get_current_device(self) -> int:
            return self.device

        def set_current_device(self, device: int) -> None:
            self.device = device

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
            return divmod(target.capability, 10)

        def get_benchmarker(self):
            return _compile_only_benchmarker

    return CompileOnlyDriver()


# ------------------------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    """One launcher call on meta tensors; `subset` marks the representative calls of the default test suite."""

    name: str
    run: Callable[[], object]
    subset: bool = False


# Where the scenarios' tensors live: "meta" for the gate; "cuda" (zero-filled: every index a valid one, every tile
# idle) to launch the same calls on a real GPU and read its registers (`measure_on_gpu`).
_SCENARIO_DEVICE = "meta"


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    if _SCENARIO_DEVICE == "meta":
        return torch.empty(*shape, device="meta", dtype=dtype)
    return torch.zeros(*shape, device=_SCENARIO_DEVICE, dtype=dtype)


def _seed() -> torch.Tensor:
    return _meta(1, dtype=torch.int64)


def scenarios() -> list[Scenario]:
    """Realistic launcher calls (d = 4096, T = 8192 for training, M = 1..64 for decode, ranks 8..128, bf16/fp16,
    adapters in fp32 as HF PEFT keeps them or in the activation dtype), covering every code path of every kernel."""
    from .kernels import lora_linear, nf4, sgmv

    found: list[Scenario] = []

    def add(name: str, run: Callable[[], object], subset: bool = False) -> None:
        found.append(Scenario(name, run, subset))

    T, D, N_WIDE = 8192, 4096, 14336
    for dtype in (torch.bfloat16, torch.float16):
        d = str(dtype).removeprefix("torch.")
        main = dtype == torch.bfloat16
        for adapter in (torch.float32, dtype):
            a = str(adapter).removeprefix("torch.")
            for rank in (8, 16, 64, 128):
                for p in (0.0, 0.1):
                    pick = main and p == 0.1 and rank == 128 and adapter == torch.float32
                    add(
                        f"lora_shrink {d} A:{a} r={rank} p={p}",
                        lambda dtype=dtype, adapter=adapter, rank=rank, p=p: lora_linear.lora_shrink(
                            _meta(T, D, dtype=dtype), _meta(rank, D, dtype=adapter), 2.0, p, _seed(), dot_dtype=dtype
                        ),
                        pick,
                    )
                add(
                    f"lora_grad_dy {d} B:{a} r={rank}",
                    lambda dtype=dtype, adapter=adapter, rank=rank: lora_linear.lora_grad_dy(
                        _meta(T, D, dtype=dtype),
                        _meta(D, rank, dtype=adapter),
                        _meta(T, rank, dtype=torch.float32),
                        dot_dtype=dtype,
                    ),
                    main and rank == 128 and adapter == torch.float32,
                )
        for rank in (8, 16, 64, 128):
            for p in (0.0, 0.1):
                add(
                    f"lora_grad_a {d} r={rank} p={p}",
                    lambda dtype=dtype, rank=rank, p=p: lora_linear.lora_grad_a(
                        _meta(T, rank, dtype=torch.float32), _meta(T, D, dtype=dtype), p, _seed(), dot_dtype=dtype
                    ),
                    main and rank == 16 and p == 0.1,
                )
        for rank in (16, 128):
            for bias in (False, True):
                add(
                    f"dual_matmul fwd {d} r={rank} bias={bias}",
                    lambda dtype=dtype, rank=rank, bias=bias: lora_linear.dual_matmul(
                        _meta(T, D, dtype=dtype),
                        _meta(N_WIDE, D, dtype=dtype).T,
                        _meta(T, rank, dtype=torch.float32),
                        _meta(N_WIDE, rank, dtype=torch.float32).T,
                        _meta(N_WIDE, dtype=dtype) if bias else None,
                        out_dtype=dtype,
                        dot_dtype=dtype,
                    ),
                )
            for p in (0.0, 0.1):
                add(
                    f"dual_matmul dX {d} r={rank} p={p}",
                    lambda dtype=dtype, rank=rank, p=p: lora_linear.dual_matmul(
                        _meta(T, N_WIDE, dtype=dtype),
                        _meta(N_WIDE, D, dtype=dtype),
                        _meta(T, rank, dtype=torch.float32),
                        _meta(rank, D, dtype=torch.float32),
                        out_dtype=dtype,
                        dropout_p=p,
                        seed=_seed(),
                        dot_dtype=dtype,
                    ),
                    main and rank == 16 and p == 0.1,
                )
                add(
                    f"dual_matmul dX accumulate {d} r={rank} p={p}",
                    lambda dtype=dtype, rank=rank, p=p: lora_linear.dual_matmul(
                        None,
                        None,
                        _meta(T, rank, dtype=torch.float32),
                        _meta(rank, D, dtype=torch.float32),
                        out=_meta(T, D, dtype=dtype),
                        dropout_p=p,
                        seed=_seed(),
                        accumulate=True,
                        dot_dtype=dtype,
                    ),
                )
        if main:
            add("lora_shrink seed alignment", _seed_not_specialized, True)
        add(
            f"dropout_keep_mask {d}",
            lambda: lora_linear.dropout_keep_mask(T, D, 0.1, _seed()),
        )
        for nested in (True, False):
            storage = _nf4_storage(D, N_WIDE, nested)
            add(
                f"nf4_dequantize {d} nested={nested}",
                lambda storage=storage, dtype=dtype: nf4.nf4_dequantize(*storage, dtype=dtype),
                main and nested,
            )
            for rows in (1, 16, 64):
                for rank in (0, 16, 64):
                    add(
                        f"nf4_lora_matmul {d} nested={nested} M={rows} r={rank}",
                        lambda storage=storage, dtype=dtype, rows=rows, rank=rank: nf4.nf4_lora_matmul(
                            _meta(rows, D, dtype=dtype),
                            *storage,
                            shrunk=_meta(rows, rank, dtype=torch.float32) if rank else None,
                            lora_B=_meta(N_WIDE, rank, dtype=torch.float32) if rank else None,
                            dot_dtype=dtype,
                        ),
                        main and nested and rank == 16 and rows == 1,
                    )
            # K = 4000 is not a multiple of the blocksize: blocks straddle rows (the per-element path).
            odd = _nf4_storage(4000, D, nested)
            for rows in (1, 64):
                add(
                    f"nf4_lora_matmul {d} nested={nested} M={rows} r=16 K=4000",
                    lambda odd=odd, dtype=dtype, rows=rows: nf4.nf4_lora_matmul(
                        _meta(rows, 4000, dtype=dtype),
                        *odd,
                        shrunk=_meta(rows, 16, dtype=torch.float32),
                        lora_B=_meta(D, 16, dtype=torch.float32),
                        dot_dtype=dtype,
                    ),
                    main and nested and rows == 64,
                )
        for tokens, block_m in ((8, 16), (T, 64)):
            for r_max in (16, 64, 128):
                add(
                    f"sgmv {d} tokens={tokens} block_m={block_m} r_max={r_max}",
                    lambda dtype=dtype, tokens=tokens, block_m=block_m, r_max=r_max: _sgmv(
                        sgmv, tokens, D, D, block_m, r_max, dtype
                    ),
                    main and r_max == 128 and block_m == 64,
                )
    # DoRA (kernels/dora.py) and MoE experts (kernels/moe_lora.py): DoRA serves fp32 activations on a GPU too.
    from .kernels import dora, moe_lora

    # DoRA rank 16; experts: E of them over S routed rows, LoRA shrink (K = hidden H, N = rank) and expand (K = rank).
    R, E, S, H = 16, 8, 4096, 2048
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        d = str(dtype).removeprefix("torch.")
        main = dtype == torch.bfloat16
        for p in (0.0, 0.1):
            add(
                f"dora_forward {d} p={p}",
                lambda dtype=dtype, p=p: dora.dora_forward(
                    _meta(T, D, dtype=dtype),
                    _meta(D, D, dtype=dtype),
                    None,
                    _meta(T, R, dtype=torch.float32),
                    _meta(D, R, dtype=torch.float32),
                    _meta(D, dtype=torch.float32),
                    p,
                    _seed(),
                    dot_dtype=dtype,
                ),
                main and p > 0,
            )
            add(
                f"dora_grad_x {d} p={p}",
                lambda dtype=dtype, p=p: dora.dora_grad_x(
                    _meta(T, D, dtype=dtype),
                    _meta(D, D, dtype=dtype),
                    _meta(D, dtype=torch.float32),
                    _meta(T, R, dtype=torch.float32),
                    _meta(R, D, dtype=torch.float32),
                    p,
                    _seed(),
                    dot_dtype=dtype,
                ),
                main and p > 0,
            )
        add(
            f"dora weight_times_adapter {d}",
            lambda dtype=dtype: dora.weight_times_adapter(_meta(D, D, dtype=dtype), _meta(R, D, dtype=torch.float32)),
            main,
        )
        add(
            f"dora column_dot {d}",
            lambda dtype=dtype: dora.column_dot(_meta(T, D, dtype=dtype), _meta(T, D, dtype=dtype)),
            main,
        )
        block_m = moe_lora.tile_rows(dtype, False)
        tiles = _meta(_cdiv(S, block_m) + E, 3, dtype=torch.int32)
        for k, n in ((H, R), (R, H)):
            add(
                f"moe grouped_matmul {d} K={k} N={n}",
                lambda dtype=dtype, k=k, n=n, tiles=tiles, block_m=block_m: moe_lora.grouped_matmul(
                    _meta(S, k, dtype=dtype), _meta(E, k, n, dtype=dtype), tiles, block_m, dot_dtype=dtype
                ),
                main and k == H,
            )
        add(
            f"moe grouped_outer {d}",
            lambda dtype=dtype: moe_lora.grouped_outer(
                _meta(S, H, dtype=dtype), _meta(S, R, dtype=dtype), _meta(E, dtype=torch.int32), dot_dtype=dtype
            ),
            main,
        )
    return found


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _seed_not_specialized() -> None:
    """Dropout seeds are data that Triton must not specialise on: a seed tensor at a pointer that is not 16-byte
    aligned (the second adapter's slice of the seeds) reuses the kernel compiled for an aligned one."""
    import triton

    from .kernels import lora_linear

    kernel = lora_linear._lora_shrink_kernel
    seeds = _meta(2, dtype=torch.int64)
    x, A = _meta(8192, 4096), _meta(16, 4096, dtype=torch.float32)
    lora_linear.lora_shrink(x, A, 2.0, 0.1, seeds[0:1], dot_dtype=torch.bfloat16)
    device = triton.runtime.driver.active.get_current_device()
    compiled = len(kernel.device_caches[device][0])
    lora_linear.lora_shrink(x, A, 2.0, 0.1, seeds[1:2], dot_dtype=torch.bfloat16)
    if len(kernel.device_caches[device][0]) != compiled:
        raise AssertionError("a seed at another pointer alignment compiled a second lora_shrink kernel")


def _nf4_storage(d_in: int, d_out: int, nested: bool) -> tuple:
    numel = d_in * d_out
    packed = _meta(numel // 2, 1, dtype=torch.uint8)
    code = _meta(16, dtype=torch.float32)
    blocks = numel // 64
    if not nested:
        return packed, _meta(blocks, dtype=torch.float32), code, 64, (d_out, d_in)
    absmax = _meta(blocks, dtype=torch.uint8)
    return (
        packed,
        absmax,
        code,
        64,
        (d_out, d_in),
        _meta(256, dtype=torch.float32),
        _meta((blocks + 255) // 256, dtype=torch.float32),
        _meta(1, dtype=torch.float32),
        256,
    )


def _sgmv(sgmv, tokens: int, d_in: int, d_out: int, block_m: int, r_max: int, dtype: torch.dtype) -> None:
    n_slots, n_tiles = 4, (tokens + block_m - 1) // block_m + 4
    x, y = _meta(tokens, d_in, dtype=dtype), _meta(tokens, d_out, dtype=dtype)
    i32 = dict(dtype=torch.int32)
    sgmv.lora_multi_adapter(
        y,
        x,
        _meta(n_slots * r_max, d_in, dtype=dtype),
        _meta(n_slots * r_max, d_out, dtype=dtype),
        None,
        _meta(n_slots, dtype=torch.float32),
        _meta(n_slots, 2, **i32),
        _meta(n_slots, **i32),
        _meta(tokens, **i32),
        _meta(n_tiles, 3, **i32),
        block_m,
        r_max,
        dot_dtype=dtype,
    )


# ------------------------------------------------------------------------------------------------- one target


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")
# Constexprs that shape the tiles; every other constexpr selects a code path or a dtype.
_TILE_PARAMS = ("BLOCK", "GROUP", "SPLIT", "ROWS_PER")


def parse_ptxas_log(log: str) -> tuple[int, int] | None:
    """(registers, bytes of spill stores) from ptxas's verbose log of one kernel, or None if the log has no count."""
    used = _PTXAS_USED.search(log)
    if used is None:
        return None
    spills = _PTXAS_SPILLS.search(log)
    return int(used.group(1)), int(spills.group(1)) if spills else 0


def _describe(named: dict, num_warps: int, num_stages: int) -> tuple[str, str]:
    """(variant, config) strings of a compiled kernel from its constexprs by name: the tile shape, warps and stages
    make the config; every other constexpr (code paths, dtypes, sizes and strides Triton specialised to 1) the
    variant. PRECISION follows from DOT_DTYPE and is left out."""
    tiles = [f"{name}={value}" for name, value in named.items() if name.startswith(_TILE_PARAMS)]
    variant = [f"{name}={value}" for name, value in named.items() if not name.startswith(_TILE_PARAMS)]
    variant = [item for item in variant if not item.startswith("PRECISION=")]
    return " ".join(variant), " ".join(tiles + [f"warps={num_warps}", f"stages={num_stages}"])


def _constexpr_names(fn, constants: dict) -> dict:
    """Constexpr values keyed by parameter name (Triton keys them by argument position)."""
    names = [param.name for param in fn.params] if hasattr(fn, "params") else fn.arg_names
    named = {}
    for path, value in constants.items():
        index = path[0] if isinstance(path, tuple) else path
        if isinstance(index, int) and index < len(names):
            named[names[index]] = value
        else:
            named[str(path)] = value
    return named


def compile_target(target: Target, names: Sequence[str] | None, subset: bool) -> list[CompiledConfig]:
    """Run the scenarios (by name, or the subset, or all) for `target` in this process; one row per compiled kernel.

    Needs a process without TRITON_INTERPRET whose Triton cache is empty and whose ptxas log is dumped
    (TRITON_DUMP_PTXAS_LOG=1): `run` starts such workers."""
    import triton
    from triton import knobs

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("The compile gate needs a process without TRITON_INTERPRET=1 (use compile_gate.run).")
    ptxas_stats: dict[bytes, tuple[int, int]] = {}
    triton.runtime.driver.set_active(compile_only_driver(target, ptxas_stats))
    rows: list[CompiledConfig] = []
    hashes: list[str] = []  # rows[i]'s kernel
    failed: list[CompiledConfig] = []  # launcher calls that raised
    log = io.StringIO()
    state = {"scenario": "", "position": 0}

    def after_compile(*, key, fn, compile, **kwargs) -> None:
        jit = fn.jit_function
        kernel = jit.device_caches[target.capability][0][key]
        text = log.getvalue()
        stats = parse_ptxas_log(text[state["position"] :])
        state["position"] = len(text)
        named = _constexpr_names(jit, compile["constants"])
        variant, config = _describe(named, compile["num_warps"], compile["num_stages"])
        if stats is not None:
            ptxas_stats[kernel.kernel] = stats
        ttir, ptx = kernel.asm.get("ttir", ""), kernel.asm.get("ptx", "")
        has_dot = "tt.dot" in ttir
        dot_dtype = str(named.get("DOT_DTYPE", ""))
        hashes.append(kernel.hash)
        rows.append(
            CompiledConfig(
                kernel=jit.fn.__name__,
                target=target.name,
                variant=variant,
                config=config,
                scenario=state["scenario"],
                regs=stats[0] if stats else None,
                spills=stats[1] if stats else None,
                smem=kernel.metadata.shared,
                has_dot=has_dot,
                tensor_cores=bool(re.search(r"\b(wgmma|mma)\.", ptx)),
                needs_tensor_cores=has_dot and ("16" in dot_dtype),
            )
        )

    knobs.runtime.jit_post_compile_hook = after_compile
    chosen = [s for s in scenarios() if (s.name in names if names else (s.subset or not subset))]
    for scenario in chosen:
        state["scenario"] = scenario.name
        with contextlib.redirect_stdout(log):
            try:
                scenario.run()
            except Exception as error:  # a kernel that fails to compile is a result, not a crash of the gate
                failed.append(
                    CompiledConfig(
                        kernel=scenario.name.split()[0],
                        target=target.name,
                        variant="",
                        config="",
                        scenario=scenario.name,
                        error=f"{type(error).__name__}: {_first_line(error)}",
                    )
                )
        state["position"] = len(log.getvalue())
    knobs.runtime.jit_post_compile_hook = None
    for row, kernel_hash in zip(rows, hashes):
        row.launched = kernel_hash in _NoLaunch.launched
    for row in rows + failed:
        row.check(target)
    return rows + failed


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


# ------------------------------------------------------------------------------------------- workers and report


def scenario_names(subset: bool) -> list[str]:
    return [s.name for s in scenarios() if s.subset or not subset]


def _worker_env(cache_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1", PYTHONUNBUFFERED="1")
    return env


def run(
    targets: Sequence[str] = tuple(TARGETS),
    subset: bool = True,
    jobs: int | None = None,
    names: Sequence[str] | None = None,
    timeout: float = 3600.0,
) -> list[CompiledConfig]:
    """Compile the scenarios (the subset, all of them, or those named) for each target in `jobs` worker processes
    (default: one per CPU core, at most 8) and return every row, checked."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"Unknown targets {sorted(unknown)}; expected some of {list(TARGETS)}.")
    chosen = list(names) if names else scenario_names(subset)
    jobs = max(1, jobs or min(8, os.cpu_count() or 1))
    # Scenarios are dealt round-robin so each worker gets a mix of cheap and expensive kernels.
    work = [(target, chosen[i::jobs]) for target in targets for i in range(jobs) if chosen[i::jobs]]
    with tempfile.TemporaryDirectory(prefix="peftfast-gate-") as scratch:

        def one(index: int) -> list[CompiledConfig]:
            target, part = work[index]
            out = os.path.join(scratch, f"rows-{index}.json")
            spec = os.path.join(scratch, f"spec-{index}.json")
            with open(spec, "w") as file:
                json.dump({"target": target, "names": part}, file)
            done = subprocess.run(
                [sys.executable, "-m", "peftfast.compile_gate", "--worker", spec, "--out", out],
                env=_worker_env(os.path.join(scratch, f"cache-{index}")),
                # Not the caller's folder: in a checkout, its peftfast/ (without kernels/) would shadow the install.
                cwd=scratch,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(
                    f"compile gate worker for {target} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
                )
            with open(out) as file:
                return [CompiledConfig(**row) for row in json.load(file)]

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            parts = list(pool.map(one, range(len(work))))
    return [row for part in parts for row in part]


def _verdict(row: CompiledConfig) -> str:
    if row.problems:
        return "FAIL: " + "; ".join(row.problems)
    if not row.launched:
        return "pruned: " + "; ".join(row.pruned_for)
    return "ok"


def format_table(rows: Sequence[CompiledConfig]) -> str:
    """kernel, target, variant, config, regs, spills, smem, tc, verdict: one line per compiled kernel."""
    header = ["kernel", "target", "variant", "config", "regs", "spills", "smem", "tc", "ok"]
    lines = [header]
    for row in sorted(rows, key=lambda r: (r.kernel, r.target, r.variant, r.config)):
        tc = "yes" if row.tensor_cores else ("no" if row.has_dot else "-")
        lines.append(
            [
                row.kernel.strip("_").removesuffix("_kernel"),
                row.target,
                row.variant,
                row.config,
                "-" if row.regs is None else str(row.regs),
                "-" if row.spills is None else str(row.spills),
                "-" if row.smem is None else str(row.smem),
                tc,
                _verdict(row),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = []
    for line in lines:
        text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def format_summary(rows: Sequence[CompiledConfig]) -> str:
    """Per kernel and target, over the configs a launcher can run: how many, failing, most registers, spilling, most
    spill bytes, most shared memory; and how many more it compiled only to prune them."""
    groups: dict[tuple[str, str], list[CompiledConfig]] = {}
    for row in rows:
        groups.setdefault((row.kernel.strip("_").removesuffix("_kernel"), row.target), []).append(row)
    lines = ["kernel                 target  configs  failing  max regs  spilling  max spill B  max smem B  pruned"]
    for (kernel, target), group in sorted(groups.items()):
        kept = [r for r in group if r.launched]
        regs = [r.regs for r in kept if r.regs is not None]
        spills = [r.spills for r in kept if r.spills]
        smem = [r.smem for r in kept if r.smem is not None]
        lines.append(
            f"{kernel:<22} {target:<7} {len(kept):>7}  {sum(bool(r.problems) for r in kept):>7}  "
            f"{max(regs, default=0):>8}  {len(spills):>8}  {max(spills, default=0):>11}  {max(smem, default=0):>10}"
            f"  {len(group) - len(kept):>6}"
        )
    return "\n".join(lines)


def _compiled_kernels() -> list[tuple[object, object]]:
    """(JIT function, compiled kernel) for every kernel of `peftfast.kernels` compiled in this process."""
    import triton

    from .kernels import dora, lora_linear, moe_lora, nf4, sgmv

    found = []
    for module in (lora_linear, nf4, sgmv, dora, moe_lora):
        for value in vars(module).values():
            if isinstance(value, triton.runtime.JITFunction) and value.__module__ == module.__name__:
                for cache in value.device_caches.values():
                    found += [(value, kernel) for kernel in cache[0].values()]
    return found


def measure_on_gpu(path: str) -> list[dict[str, object]]:
    """Launch the subset's calls on this CUDA GPU (zero-filled tensors), read every compiled kernel's registers,
    spills and shared memory as the driver reports them, put them beside the gate's prediction for sm_90, write the
    CSV at `path` and return its rows. Tells whether the gate's stand-in sees what the GPU does."""
    global _SCENARIO_DEVICE
    if not torch.cuda.is_available():
        raise RuntimeError("measure_on_gpu needs a CUDA GPU.")
    _SCENARIO_DEVICE = "cuda"
    errors = []
    for scenario in scenarios():
        if scenario.subset:
            try:
                scenario.run()
            except Exception as error:
                errors.append(f"{scenario.name}: {type(error).__name__}: {_first_line(error)}")
    torch.cuda.synchronize()
    measured = {}
    for jit, kernel in _compiled_kernels():
        named = _constexpr_names(jit, kernel.src.constants)
        variant, config = _describe(named, kernel.metadata.num_warps, kernel.metadata.num_stages)
        if getattr(kernel, "n_regs", None) is not None:
            measured[(jit.fn.__name__, variant, config)] = (kernel.n_regs, kernel.n_spills, kernel.metadata.shared)
    predicted = {(r.kernel, r.variant, r.config): r for r in run(["sm_90"], subset=True)}
    rows = []
    for key in sorted(set(measured) | set(predicted)):
        gpu, gate = measured.get(key), predicted.get(key)
        rows.append(
            {
                "kernel": key[0],
                "variant": key[1],
                "config": key[2],
                "gpu_regs": gpu[0] if gpu else "",
                "gpu_spills": gpu[1] if gpu else "",
                "gpu_smem": gpu[2] if gpu else "",
                "gate_regs": gate.regs if gate else "",
                "gate_spills": gate.spills if gate else "",
                "gate_smem": gate.smem if gate else "",
            }
        )
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    for error in errors:
        print(f"launch failed: {error}")
    same = sum(1 for r in rows if r["gpu_regs"] != "" and r["gpu_regs"] == r["gate_regs"])
    both = sum(1 for r in rows if r["gpu_regs"] != "" and r["gate_regs"] != "")
    print(f"{len(rows)} kernels; registers equal to the gate's in {same} of the {both} seen by both; written to {path}")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `peftfast gate` and bench/compile_gate.py."""
    parser.add_argument("--full", action="store_true", help="every scenario, not only the representative subset")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core, at most 8)")
    parser.add_argument("--scenario", nargs="+", default=None, help="only these scenarios (names as --list prints)")
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    parser.add_argument("--json", type=str, default=None, help="also write every row to this JSON file")
    parser.add_argument("--summary", action="store_true", help="print the per-kernel summary, not every config")
    parser.add_argument(
        "--on-gpu", metavar="CSV", default=None, help="on a CUDA GPU: compare its registers with the gate's (CSV)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the gate as the options ask, print the table (or summary) and a verdict; 1 if any config fails."""
    if args.on_gpu:
        measure_on_gpu(args.on_gpu)
        return 0
    if args.list:
        for scenario in scenarios():
            print(("subset  " if scenario.subset else "        ") + scenario.name)
        return 0
    start = time.perf_counter()
    rows = run(args.targets, subset=not args.full, jobs=args.jobs, names=args.scenario)
    print(format_summary(rows) if args.summary else format_table(rows))
    failing = [row for row in rows if row.problems]
    if args.json:
        with open(args.json, "w") as file:
            json.dump([asdict(row) for row in rows], file, indent=1)
    print(
        f"compile gate: {len(rows)} kernels compiled for {', '.join(args.targets)}, {len(failing)} failing "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 1 if failing else 0


def _worker(spec_path: str, out_path: str) -> int:
    with open(spec_path) as file:
        spec = json.load(file)
    rows = compile_target(TARGETS[spec["target"]], spec["names"], subset=False)
    with open(out_path, "w") as file:
        json.dump([asdict(row) for row in rows], file)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast.compile_gate", description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.out)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
