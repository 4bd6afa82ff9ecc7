"""Fused LoRA linear kernels: `y = x W^T + b + sum_i s_i * dropout_i(x) A_i^T B_i^T` and its backward.

Split at the rank-r intermediate S_i = s_i * dropout_i(x) A_i^T (`lora_shrink`). The forward folds S B^T into the
base GEMM as extra K columns (`dual_matmul`), so the T x d_out output is written once. Backward: one pass over dY
gives dS = dY B and dB = dY^T S (`lora_grad_dy`); dX = dY W + mask * (dS A) / (1 - p) is one `dual_matmul`; dA is
`lora_grad_a`. Dropout masks come from a seed and each element's flat index into x [T, d_in], so forward and
backward draw the same mask without storing it.

Every launcher takes 2-D row-major-agnostic tensors (any strides) and returns new tensors; shapes are checked.
`dot_dtype` is the dtype the tensor cores multiply in (the activation dtype on GPU; fp32 under the interpreter,
whose bf16 arithmetic is wrong).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# GPU tensor-core dots need every dimension >= 16: the rank dimension is padded to a power of two >= 16 in the
# block shape (loads past the real rank are masked to zero).
MIN_DOT = 16


def _precision(dot_dtype: torch.dtype) -> str:
    # fp32 dots would run as TF32 on GPUs by default; torch's fp32 matmuls don't, and the results must match them.
    return "ieee" if dot_dtype == torch.float32 else "tf32"


@triton.jit
def _mix32(h):
    # murmur3's 32-bit finalizer: a bijection of uint32 in which every input bit flips every output bit with
    # probability ~1/2.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _seed_key(seed_ptr):
    """The per-call key of the dropout hash, from the int64 seed tensor (both halves of it)."""
    seed = tl.load(seed_ptr)
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(low ^ _mix32(high + 0x9E3779B9))


@triton.jit
def _keep(key, offsets, p):
    """keep[i] = u(key, offsets[i]) >= p, u uniform on [0, 1) in steps of 2^-24: the dropout mask of every kernel.

    A counter-based hash (a Weyl step then `_mix32`), not tl.rand: Philox keeps four 32-bit words per element live
    while it runs, and over a whole 128x256 output tile that alone spilled the dX kernel on sm_80 and sm_90; this
    keeps one. Distinct offsets give distinct hashes for a key (both steps are bijections)."""
    return _keep_hashed(offsets.to(tl.uint32) * 0x9E3779B1 + key, p)


@triton.jit
def _keep_hashed(weyl, p):
    return (_mix32(weyl) >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


@triton.jit
def _keep_rows_cols(key, rows, cols, width, p):
    """`_keep(key, rows[:, None] * width + cols[None, :], p)` with the Weyl step split into a row and a column term
    (equal mod 2^32), so the [rows, cols] tile needs no per-element index: fewer live registers beside a big
    accumulator."""
    row_term = rows.to(tl.uint32) * width.to(tl.uint32) * 0x9E3779B1 + key
    col_term = cols.to(tl.uint32) * 0x9E3779B1
    return _keep_hashed(row_term[:, None] + col_term[None, :], p)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's [BLOCK_M, BLOCK_N] output tile in grouped launch order: GROUP_M row tiles
    of one column of tiles run close together, so the column-side operand tiles they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


@triton.jit
def _accumulate_matmul(
    acc,
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr = None,
):
    """acc + A[offs_m, :K] @ B[:K, offs_n], K in BLOCK_K steps, both tiles loaded in their own dtype and cast to
    DOT_DTYPE in registers (masked loads read zeros past M, N and K). NUM_STAGES pipelines the loop (None: the
    launch's num_stages)."""
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)
    return acc


def _rank_block(r: int) -> int:
    return max(MIN_DOT, next_power_of_2(r))


def device_properties(tensor: torch.Tensor) -> dict[str, int]:
    """The limits of the GPU `tensor` lives on (max_shared_mem per block, multiprocessor_count, ...), as Triton's
    active driver reports them: the real GPU's, or the compile gate's stand-in target for `meta` tensors."""
    driver = triton.runtime.driver.active
    index = tensor.device.index if tensor.device.type == "cuda" and tensor.device.index is not None else None
    return _device_properties(driver, driver.get_current_device() if index is None else index)


_PROPERTIES: dict[tuple[int, int], dict[str, int]] = {}


def _device_properties(driver: object, index: int) -> dict[str, int]:
    key = (id(driver), index)
    if key not in _PROPERTIES:
        _PROPERTIES[key] = driver.utils.get_device_properties(index)
    return _PROPERTIES[key]


def _pipelined_bytes(stages: int, *tiles: tuple[int, int]) -> int:
    """Shared memory a software-pipelined loop asks for: `stages` buffers of each (elements, bytes per element) tile."""
    return stages * sum(elements * size for elements, size in tiles)


def _adapter_tile(block_r: int, warps: int) -> int:
    """The other side of a [tile, BLOCK_R] adapter-sized tile: 1024 elements a warp, between 16 and 128."""
    return max(MIN_DOT, min(128, 1024 * warps // block_r))


def _warps_for_rank(block_r: int) -> int:
    # Rank 64 and up: 8 warps share the [64, BLOCK_R] accumulator and operand tiles (on 4 warps lora_grad_dy spilled
    # at rank 128 and lora_shrink with dropout at rank 64, on sm_80).
    return 8 if block_r >= 64 else 4


def _fitting_stages(properties: dict[str, int], *tiles: tuple[int, int], most: int = 3) -> int:
    """The most pipeline stages (up to `most`, at least 1) whose buffers of `tiles` fit the device's shared memory."""
    stages = most
    while stages > 1 and _pipelined_bytes(stages, *tiles) > properties["max_shared_mem"]:
        stages -= 1
    return stages


def _rank_kernel_tiles(
    ref: torch.Tensor, rank: int, buffers: Callable[[int, int, int], tuple[tuple[int, int], ...]]
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, the feature tile beside BLOCK_R, BLOCK_R, warps, stages) of a kernel whose tiles are [BLOCK_M,
    BLOCK_R] and [feature tile, BLOCK_R]: one small config on the interpreter; on a GPU the warps the rank wants, the
    feature tile those warps hold (`_adapter_tile`), and as many stages of `buffers(BLOCK_M, feature tile, BLOCK_R)`
    (elements, bytes per element) as the shared memory holds."""
    block_r = _rank_block(rank)
    if _on_interpreter(ref):
        return 32, 32, block_r, 4, 1
    block_m, warps = 64, _warps_for_rank(block_r)
    block_f = _adapter_tile(block_r, warps)
    stages = _fitting_stages(device_properties(ref), *buffers(block_m, block_f, block_r))
    return block_m, block_f, block_r, warps, stages


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). The 128x256 tile (8 warps, 128 fp32 accumulator registers a thread) is
# the shape cuBLAS uses for large bf16 GEMMs on H100; 128x128 and the 64-wide tiles serve narrow outputs and fewer
# tokens. Every one compiles for sm_80 and sm_90 without spills, the dropout variant included (see the compile gate);
# on a GPU with less shared memory `_prune_dual_matmul_configs` drops those that don't fit.
DUAL_MATMUL_TILES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
]


def dual_matmul_configs() -> list[triton.Config]:
    """Autotune space for `dual_matmul` (block sizes, warps, stages), before pruning for the GPU at hand."""
    return [
        triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
            num_warps=warps,
            num_stages=stages,
        )
        for block_m, block_n, block_k, warps, stages in DUAL_MATMUL_TILES
    ]


def dual_matmul_shared_bytes(config: triton.Config, first_size: int, second_size: int, block_r: int) -> int:
    """Shared memory estimate of one `dual_matmul` config: the main loop's pipelined A and B tiles, or the LoRA loop's
    single buffers if larger (it runs first, unpipelined, and its shared memory is reused after it)."""
    block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    main = _pipelined_bytes(config.num_stages, (block_m * block_k, first_size), (block_k * block_n, first_size))
    lora = _pipelined_bytes(1, (block_m * block_r, second_size), (block_r * block_n, second_size))
    return max(main, lora)


def _prune_dual_matmul_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs whose shared memory (estimated) fits the device, then those that compile clean on it (see
    `keep_clean_configs`)."""
    out = named_args["out_ptr"]
    limit = device_properties(out)["max_shared_mem"]
    first = named_args["a1_ptr"].element_size() if kwargs.get("HAS_FIRST", True) else 0
    second = max(named_args["a2_ptr"].element_size(), named_args["b2_ptr"].element_size())
    if not kwargs.get("HAS_FIRST", True):
        # Only the LoRA term, added into `out`: bound by reading and writing out, so big tiles buy nothing, and
        # more than 64 output elements a thread spilled (128x256 with the dropout mask, 128x128 on 4 warps).
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]
    fitting = [c for c in configs if dual_matmul_shared_bytes(c, first, second, kwargs["BLOCK_R"]) <= limit]
    fitting = fitting or [min(configs, key=lambda c: dual_matmul_shared_bytes(c, first, second, kwargs["BLOCK_R"]))]
    return keep_clean_configs(_dual_matmul_kernel, fitting, named_args, kwargs)


def keep_clean_configs(kernel, configs: list[triton.Config], named_args: dict, kwargs: dict) -> list[triton.Config]:
    """The configs that, compiled for the GPU at hand, load (shared memory and threads within its limits) and don't
    spill registers; if none is clean, the one that spills least (a config that can't load at all is dropped).

    What spills depends on the GPU and the Triton version (triton 3.6 spilled a few bytes in 128x256 tiles on sm_80
    where 3.9 did not), so the check is made here, not only in the compile gate. It costs no extra compile: Triton
    caches each kernel, and the autotuner would compile every config to time it anyway."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    failures: tuple[type[BaseException], ...] = (CompilationError, OutOfResources)
    try:
        from triton.runtime.errors import PTXASError

        failures += (PTXASError,)
    except ImportError:
        pass
    # The autotuner hands its launch arguments on (grid, warmup) beside the kernel's meta-parameters.
    meta = {name: value for name, value in kwargs.items() if name not in ("grid", "warmup")}
    clean, spilling = [], []
    for config in configs:
        try:
            compiled = kernel.warmup(*named_args.values(), grid=(1,), **meta, **config.all_kwargs())
            # Loading the binary checks the device's limits and reads the spill count.
            _ = compiled.run
        except failures:
            continue
        (spilling if compiled.n_spills else clean).append((compiled.n_spills, config))
    if clean:
        return [config for _, config in clean]
    if spilling:
        return [min(spilling, key=lambda item: item[0])[1]]
    return configs[:1]


@triton.jit(do_not_specialize=["seed_ptr"])
def _dual_matmul_kernel(
    # pointers
    a1_ptr,
    b1_ptr,
    a2_ptr,
    b2_ptr,
    bias_ptr,
    out_ptr,
    # sizes
    M,
    N,
    K1,
    K2,
    # strides
    stride_a1m,
    stride_a1k,
    stride_b1k,
    stride_b1n,
    stride_a2m,
    stride_a2k,
    stride_b2k,
    stride_b2n,
    stride_om,
    stride_on,
    # dropout of the second product's output (the seed is data: a 1-element int64 tensor)
    seed_ptr,
    p,
    keep_scale,
    # meta-parameters
    HAS_FIRST: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MASK_SECOND: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: programs that share B tiles run close together, so B stays in L2.
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # One fp32 accumulator. The LoRA product (and its dropout mask) is computed first, so the main loop carries only
    # the accumulator: a second accumulator beside it, or tl.rand's temporaries after it, made the 128x256 tile and
    # every dropout tile spill on sm_90.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_SECOND:
        # Rank-sized: one or two iterations, nothing to overlap, so no pipeline buffers (num_stages=1).
        acc = _accumulate_matmul(
            acc,
            a2_ptr,
            b2_ptr,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            K2,
            stride_a2m,
            stride_a2k,
            stride_b2k,
            stride_b2n,
            BLOCK_R,
            DOT_DTYPE,
            PRECISION,
            NUM_STAGES=1,
        )
        if MASK_SECOND:
            keep = _keep_rows_cols(_seed_key(seed_ptr), offs_m, offs_n, N, p)
            acc = tl.where(keep, acc * keep_scale, 0.0)

    if HAS_FIRST:
        acc = _accumulate_matmul(
            acc,
            a1_ptr,
            b1_ptr,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            K1,
            stride_a1m,
            stride_a1k,
            stride_b1k,
            stride_b1n,
            BLOCK_K,
            DOT_DTYPE,
            PRECISION,
        )

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Keyed on the code path as well as the sizes: the dropout and accumulate variants prune to other configs (and the
# fastest config of one need not be the fastest of another). restore_value: autotuning runs the kernel several times,
# which would add into `out` again and again when ACCUMULATE is set.
_dual_matmul_tuned = triton.autotune(
    configs=dual_matmul_configs(),
    key=["M", "N", "K1", "K2", "HAS_FIRST", "HAS_BIAS", "MASK_SECOND", "ACCUMULATE", "DOT_DTYPE"],
    restore_value=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune_dual_matmul_configs},
)(_dual_matmul_kernel)


def _on_interpreter(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


# Launch plans: what a launcher derives from its tensors' shapes, strides and dtypes (the checks, block sizes, stages,
# grid, integer arguments and meta-parameters), built once per distinct combination and target and reused, so that a
# call of a known shape costs a key and a dict lookup besides the launch (host time bounds small-batch decode). The
# launches call `kernel.run(..., grid=grid, warmup=False)`, what the lambda `kernel[grid]` returns would call: ~0.6 us
# a launch less.
_LAUNCH_PLANS: dict[tuple, tuple] = {}
# Far more than the shapes of any model (a few per layer kind); a bound on memory for shape-varying workloads.
_MAX_LAUNCH_PLANS = 4096


def remember_launch(key: tuple, plan: tuple) -> tuple:
    """Store `plan` under `key` (tests spy on this to count how often plans are built)."""
    if len(_LAUNCH_PLANS) >= _MAX_LAUNCH_PLANS:
        _LAUNCH_PLANS.clear()
    _LAUNCH_PLANS[key] = plan
    return plan


def _layout(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else (tensor.shape, tensor.stride(), tensor.dtype)


def _target(tensor: torch.Tensor) -> tuple | None:
    """Besides shapes, what a launch plan depends on: the interpreter (None), or the limits of the GPU the launch
    goes to (the compile gate's stand-in drivers report different ones for the same `meta` device)."""
    if _on_interpreter(tensor):
        return None
    properties = device_properties(tensor)
    return tensor.device, properties["max_shared_mem"], properties["multiprocessor_count"]


def _check_seed(name: str, dropout_p: float, seed: torch.Tensor | None) -> None:
    if dropout_p > 0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        got = None if seed is None else f"{seed.dtype} of shape {tuple(seed.shape)}"
        raise ValueError(f"{name}: dropout needs the seed as a 1-element int64 tensor, got {got}.")


def dual_matmul(
    a1: torch.Tensor | None,
    b1: torch.Tensor | None,
    a2: torch.Tensor | None,
    b2: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    accumulate: bool = False,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: out (+)= a1 @ b1 + keep(seed, p) * (a2 @ b2) / (1 - p) + bias, in fp32 accumulation.

    Shapes: a1 [M, K1], b1 [K1, N], a2 [M, K2], b2 [K2, N], bias [N]; seed a 1-element int64 tensor (needed when
    dropout_p > 0); the dropout mask is drawn per output element from the seed and its flat index m * N + n.
    """
    if a1 is None and a2 is None:
        raise ValueError("dual_matmul needs at least one product.")
    _check_seed("dual_matmul", dropout_p, seed)
    ref = a1 if a1 is not None else a2
    if out is None:
        N = (b1 if b1 is not None else b2).shape[1]
        out = torch.empty(ref.shape[0], N, device=ref.device, dtype=out_dtype or ref.dtype)
    key = (
        "dual_matmul",
        _layout(a1),
        _layout(b1),
        _layout(a2),
        _layout(b2),
        None if bias is None else bias.shape,
        out.shape,
        out.stride(),
        out.dtype,
        dropout_p > 0,
        accumulate,
        dot_dtype,
        _target(ref),
    )
    plan = _LAUNCH_PLANS.get(key)
    if plan is None:
        plan = remember_launch(key, _dual_matmul_plan(a1, b1, a2, b2, bias, out, dropout_p > 0, accumulate, dot_dtype))
    if not plan:
        return out
    kernel, grid, sizes, meta = plan
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    kernel.run(
        a1 if a1 is not None else out,
        b1 if b1 is not None else out,
        a2 if a2 is not None else out,
        b2 if b2 is not None else out,
        bias if bias is not None else out,
        out,
        *sizes,
        seed if seed is not None else out,
        dropout_p,
        keep_scale,
        grid=grid,
        warmup=False,
        **meta,
    )
    return out


def _dual_matmul_plan(a1, b1, a2, b2, bias, out, dropout, accumulate, dot_dtype) -> tuple:
    """(kernel, grid, integer arguments, meta-parameters) of a `dual_matmul` launch, after checking the shapes; ()
    when there is nothing to compute. Absent operands are stood in for by `out` (never read)."""
    ref = a1 if a1 is not None else a2
    M = ref.shape[0]
    N = (b1 if b1 is not None else b2).shape[1]
    K1 = a1.shape[1] if a1 is not None else 0
    K2 = a2.shape[1] if a2 is not None else 0
    if a1 is not None and (b1.shape[0] != K1 or a1.shape[0] != M):
        raise ValueError(f"dual_matmul: a1 {tuple(a1.shape)} and b1 {tuple(b1.shape)} don't chain.")
    if a2 is not None and (b2.shape[0] != K2 or a2.shape[0] != M or b2.shape[1] != N):
        raise ValueError(f"dual_matmul: a2 {tuple(a2.shape)} and b2 {tuple(b2.shape)} don't fit an [{M}, {N}] output.")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"dual_matmul: bias has shape {tuple(bias.shape)}, expected ({N},).")
    if out.shape != (M, N):
        raise ValueError(f"dual_matmul: out has shape {tuple(out.shape)}, expected ({M}, {N}).")
    if M == 0 or N == 0:
        return ()
    a1_, b1_ = (a1, b1) if a1 is not None else (out, out)
    a2_, b2_ = (a2, b2) if a2 is not None else (out, out)
    meta = dict(
        HAS_FIRST=a1 is not None and K1 > 0,
        HAS_SECOND=a2 is not None and K2 > 0,
        HAS_BIAS=bias is not None,
        MASK_SECOND=dropout,
        ACCUMULATE=accumulate,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype or ref.dtype],
        PRECISION=_precision(dot_dtype or ref.dtype),
        # Rank blocks of 16 (the smallest tensor-core dot): the LoRA operands are fp32 for HF PEFT's default adapters
        # and are cast in registers; 64-wide blocks of them spilled the 128x128 and larger tiles at rank >= 64.
        BLOCK_R=MIN_DOT,
    )
    sizes = (
        M,
        N,
        K1,
        K2,
        a1_.stride(0),
        a1_.stride(1),
        b1_.stride(0),
        b1_.stride(1),
        a2_.stride(0),
        a2_.stride(1),
        b2_.stride(0),
        b2_.stride(1),
        out.stride(0),
        out.stride(1),
    )
    if _on_interpreter(ref):
        # The interpreter is slow and autotuning would multiply that: one small config.
        meta.update(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
        return _dual_matmul_kernel, (cdiv(M, 32) * cdiv(N, 32),), sizes, meta

    def grid(config):
        return (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)

    return _dual_matmul_tuned, grid, sizes, meta


@triton.jit(do_not_specialize=["seed_ptr"])
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_om,
    stride_or,
    seed_ptr,
    p,
    scale,
    APPLY_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if APPLY_DROPOUT:
        seed = _seed_key(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if APPLY_DROPOUT:
            keep = _keep(seed, offs_m[:, None] * K + offs_k[None, :], p)
            x = tl.where(keep, x.to(tl.float32) / (1.0 - p), 0.0)
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc += tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), input_precision=PRECISION)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
        acc * scale,
        mask=mask_m[:, None] & mask_r[None, :],
    )


def lora_shrink(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: S = scale * dropout(x, p; seed) @ A.T, in fp32.

    Shapes: x [M, K], A [R, K], out [M, R] fp32 (may be a column slice of a wider buffer); seed a 1-element int64
    tensor (needed when dropout_p > 0).
    """
    _check_seed("lora_shrink", dropout_p, seed)
    if out is None:
        out = torch.empty(x.shape[0], lora_A.shape[0], device=x.device, dtype=torch.float32)
    key = ("lora_shrink", _layout(x), _layout(lora_A), out.stride(), dropout_p > 0, dot_dtype, _target(x))
    plan = _LAUNCH_PLANS.get(key)
    if plan is None:
        plan = remember_launch(key, _lora_shrink_plan(x, lora_A, out, dropout_p > 0, dot_dtype))
    if plan:
        grid, sizes, meta = plan
        _lora_shrink_kernel.run(
            x, lora_A, out, *sizes, seed if seed is not None else out, dropout_p, scale, grid=grid, warmup=False, **meta
        )
    return out


def _lora_shrink_plan(x, lora_A, out, dropout, dot_dtype) -> tuple:
    """(grid, integer arguments, meta-parameters) of a `lora_shrink` launch, after checking the shapes; () for M = 0."""
    M, K = x.shape
    R = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_shrink: x has {K} features but lora_A has shape {tuple(lora_A.shape)}.")
    if M == 0:
        return ()
    # The A tile [BLOCK_K, BLOCK_R] is loaded in its own dtype (fp32 for HF PEFT's default adapters) and cast in
    # registers: at most 1024 elements a warp keeps it, the accumulator and the cast clear of spills on sm_80, and
    # three stages of it within an A100's shared memory at rank 128 (180 KB with BLOCK_K = 128 did not).
    block_m, block_k, block_r, warps, stages = _rank_kernel_tiles(
        x, R, lambda m, k, r: ((m * k, x.element_size()), (k * r, lora_A.element_size()))
    )
    sizes = (M, K, R, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), out.stride(0), out.stride(1))
    meta = dict(
        APPLY_DROPOUT=dropout,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype or x.dtype],
        PRECISION=_precision(dot_dtype or x.dtype),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        num_warps=warps,
        num_stages=stages,
    )
    return (cdiv(M, block_m),), sizes, meta


@triton.jit
def _lora_grad_dy_kernel(
    dy_ptr,
    b_ptr,
    s_ptr,
    ds_ptr,
    db_ptr,
    M,
    N,
    R,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    stride_dsm,
    stride_dsr,
    stride_dbn,
    stride_dbr,
    ds_scale,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One pass over a [BLOCK_M, N] stripe of dY: dS for these rows (times ds_scale), and this stripe's share of dB
    # (atomically).
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    s = tl.load(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        ds += tl.dot(dy, b, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), s, input_precision=PRECISION)
        tl.atomic_add(
            db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
            db,
            mask=mask_n[:, None] & mask_r[None, :],
        )
    tl.store(
        ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
        ds * ds_scale,
        mask=mask_m[:, None] & mask_r[None, :],
    )


def lora_grad_dy(
    grad_out: torch.Tensor,
    lora_B: torch.Tensor,
    shrunk: torch.Tensor,
    dot_dtype: torch.dtype | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: dS = scale * dY @ B, dB = dY.T @ S, from one read of dY; both fp32.

    Shapes: dY [M, N], B [N, R], S [M, R]. Returns dS [M, R], dB [N, R].
    """
    key = ("lora_grad_dy", _layout(grad_out), _layout(lora_B), _layout(shrunk), dot_dtype, _target(grad_out))
    plan = _LAUNCH_PLANS.get(key)
    if plan is None:
        plan = remember_launch(key, _lora_grad_dy_plan(grad_out, lora_B, shrunk, dot_dtype))
    M, N = grad_out.shape
    R = lora_B.shape[1]
    grad_s = torch.empty(M, R, device=grad_out.device, dtype=torch.float32)
    grad_b = torch.zeros(N, R, device=grad_out.device, dtype=torch.float32)
    if plan:
        grid, sizes, meta = plan
        _lora_grad_dy_kernel.run(
            grad_out, lora_B, shrunk, grad_s, grad_b, *sizes, scale, grid=grid, warmup=False, **meta
        )
    return grad_s, grad_b


def _lora_grad_dy_plan(grad_out, lora_B, shrunk, dot_dtype) -> tuple:
    """(grid, integer arguments, meta-parameters) of a `lora_grad_dy` launch (outputs contiguous), after checking the
    shapes; () for M = 0."""
    M, N = grad_out.shape
    R = lora_B.shape[1]
    if lora_B.shape[0] != N or shrunk.shape != (M, R):
        raise ValueError(
            f"lora_grad_dy: dY {tuple(grad_out.shape)}, B {tuple(lora_B.shape)} and S "
            f"{tuple(shrunk.shape)} don't fit together."
        )
    if M == 0:
        return ()
    # As in `lora_shrink`: the B tile [BLOCK_N, BLOCK_R] (fp32 adapters) and the dB partial of the same shape stay
    # within 1024 elements a warp, so ranks 64 and 128 neither spill nor overflow an A100's shared memory.
    block_m, block_n, block_r, warps, stages = _rank_kernel_tiles(
        grad_out, R, lambda m, n, r: ((m * n, grad_out.element_size()), (n * r, lora_B.element_size()))
    )
    sizes = (
        M,
        N,
        R,
        grad_out.stride(0),
        grad_out.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        shrunk.stride(0),
        shrunk.stride(1),
        R,  # dS [M, R] and dB [N, R] are allocated contiguous
        1,
        R,
        1,
    )
    meta = dict(
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype or grad_out.dtype],
        PRECISION=_precision(dot_dtype or grad_out.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        num_warps=warps,
        num_stages=stages,
    )
    return (cdiv(M, block_m),), sizes, meta


@triton.jit(do_not_specialize=["seed_ptr"])
def _lora_grad_a_kernel(
    ds_ptr,
    x_ptr,
    da_ptr,
    M,
    K,
    R,
    stride_dsm,
    stride_dsr,
    stride_xm,
    stride_xk,
    stride_dar,
    stride_dak,
    seed_ptr,
    p,
    APPLY_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROWS_PER_SPLIT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Program (k block, split) sums its ROWS_PER_SPLIT rows of dS.T @ x; splits add up atomically.
    pid_k = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if APPLY_DROPOUT:
        seed = _seed_key(seed_ptr)
    row_start = pid_split * ROWS_PER_SPLIT
    for m0 in range(row_start, min(row_start + ROWS_PER_SPLIT, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        ds = tl.load(
            ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if APPLY_DROPOUT:
            keep = _keep(seed, offs_m[:, None] * K + offs_k[None, :], p)
            x = tl.where(keep, x.to(tl.float32) / (1.0 - p), 0.0)
        acc += tl.dot(tl.trans(ds.to(DOT_DTYPE)), x.to(DOT_DTYPE), input_precision=PRECISION)
    out_ptrs = da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    if SPLIT:
        tl.atomic_add(out_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])
    else:
        tl.store(out_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])


def lora_grad_a(
    grad_s: torch.Tensor,
    x: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    dot_dtype: torch.dtype | None = None,
    max_splits: int | None = None,
) -> torch.Tensor:
    """Semantics: dA = dS.T @ dropout(x, p; seed), in fp32 (the same mask as `lora_shrink` with that seed).

    Shapes: dS [M, R], x [M, K], seed a 1-element int64 tensor (needed when dropout_p > 0). Returns dA [R, K].
    `max_splits` caps how many programs share the token loop (their partial sums are added atomically); on the
    interpreter the default is one.
    """
    _check_seed("lora_grad_a", dropout_p, seed)
    key = ("lora_grad_a", _layout(grad_s), _layout(x), dropout_p > 0, dot_dtype, max_splits, _target(x))
    plan = _LAUNCH_PLANS.get(key)
    if plan is None:
        plan = remember_launch(key, _lora_grad_a_plan(grad_s, x, dropout_p > 0, dot_dtype, max_splits))
    # A single program per k block stores its whole tile, so dA needs no zero fill (a kernel launch on a GPU) then;
    # split token loops add their partial sums atomically into zeros, and no rows (M = 0) leave dA zero.
    allocate = torch.empty if plan and not plan[2]["SPLIT"] else torch.zeros
    grad_a = allocate(grad_s.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
    if plan:
        grid, sizes, meta = plan
        _lora_grad_a_kernel.run(
            grad_s, x, grad_a, *sizes, seed if seed is not None else grad_a, dropout_p, grid=grid, warmup=False, **meta
        )
    return grad_a


def _lora_grad_a_plan(grad_s, x, dropout, dot_dtype, max_splits) -> tuple:
    """(grid, integer arguments, meta-parameters) of a `lora_grad_a` launch (dA contiguous), after checking the
    shapes; () for M = 0."""
    M, K = x.shape
    R = grad_s.shape[1]
    if grad_s.shape[0] != M:
        raise ValueError(f"lora_grad_a: dS has {grad_s.shape[0]} rows but x has {M}.")
    if M == 0:
        return ()
    # The [BLOCK_R, BLOCK_K] fp32 accumulator stays within 1024 elements a warp (32 registers a thread).
    block_m, block_k, block_r, warps, stages = _rank_kernel_tiles(
        x, R, lambda m, k, r: ((m * r, grad_s.element_size()), (m * k, x.element_size()))
    )
    k_blocks = cdiv(K, block_k)
    # d_in / BLOCK_K programs alone under-fill a GPU (32 for d_in=4096 on 132 SMs): split the token loop.
    splits, rows_per_split = row_splits(x, M, block_m, k_blocks, most=max_splits)
    sizes = (M, K, R, grad_s.stride(0), grad_s.stride(1), x.stride(0), x.stride(1), K, 1)
    meta = dict(
        APPLY_DROPOUT=dropout,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype or x.dtype],
        PRECISION=_precision(dot_dtype or x.dtype),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        ROWS_PER_SPLIT=rows_per_split,
        SPLIT=splits > 1,
        num_warps=warps,
        num_stages=stages,
    )
    return (k_blocks, splits), sizes, meta


def lora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    dot_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: S = scale * dropout(x, p; seed) @ A.T in fp32, y = x @ W.T + bias + S @ B.T in x's dtype: one
    adapter's `lora_shrink` then `dual_matmul`, launched from launch plans looked up under one key.

    Shapes: x [M, K], weight [N, K], bias [N] or None, lora_A [R, K], lora_B [N, R]. Returns (y [M, N], S [M, R]).
    """
    _check_seed("lora_linear_forward", dropout_p, seed)
    shrunk = torch.empty(x.shape[0], lora_A.shape[0], device=x.device, dtype=torch.float32)
    y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    key = (
        "lora_linear_forward",
        _layout(x),
        _layout(weight),
        None if bias is None else bias.shape,
        _layout(lora_A),
        _layout(lora_B),
        dropout_p > 0,
        dot_dtype,
        _target(x),
    )
    plans = _LAUNCH_PLANS.get(key)
    if plans is None:
        shrink = _lora_shrink_plan(x, lora_A, shrunk, dropout_p > 0, dot_dtype)
        expand = _dual_matmul_plan(x, weight.T, shrunk, lora_B.T, bias, y, False, False, dot_dtype)
        plans = remember_launch(key, (shrink, expand))
    shrink, expand = plans
    if shrink:
        grid, sizes, meta = shrink
        _lora_shrink_kernel.run(
            x,
            lora_A,
            shrunk,
            *sizes,
            shrunk if seed is None else seed,
            dropout_p,
            scale,
            grid=grid,
            warmup=False,
            **meta,
        )
    if expand:
        # W.T and B.T share W's and B's storage: their pointers are W's and B's, their strides are in the plan.
        kernel, grid, sizes, meta = expand
        kernel.run(
            x,
            weight,
            shrunk,
            lora_B,
            y if bias is None else bias,
            y,
            *sizes,
            y,
            0.0,
            1.0,
            grid=grid,
            warmup=False,
            **meta,
        )
    return y, shrunk


def lora_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    shrunk: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    needs_grad_x: bool = True,
    dot_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Semantics: dT = scale * dY @ B, dA = dT.T @ dropout(x, p; seed), dB = dY.T @ S (both fp32), dX = dY @ W +
    keep(seed, p) * (dT @ A) / (1 - p) in x's dtype (None unless needs_grad_x): one adapter's `lora_grad_dy`,
    `lora_grad_a` and `dual_matmul`, launched from launch plans looked up under one key.

    Shapes: dY [M, N], x [M, K], weight [N, K], lora_A [R, K], lora_B [N, R], S [M, R] fp32. Returns (dX, dA, dB).
    """
    _check_seed("lora_linear_backward", dropout_p, seed)
    M, N = grad_out.shape
    R, K = lora_A.shape
    key = (
        "lora_linear_backward",
        _layout(grad_out),
        _layout(x),
        _layout(weight),
        _layout(lora_A),
        _layout(lora_B),
        _layout(shrunk),
        dropout_p > 0,
        needs_grad_x,
        dot_dtype,
        _target(x),
    )
    plans = _LAUNCH_PLANS.get(key)
    grad_s = torch.empty(M, R, device=x.device, dtype=torch.float32)
    grad_b = torch.zeros(N, R, device=x.device, dtype=torch.float32)
    if plans is None:
        through_b = _lora_grad_dy_plan(grad_out, lora_B, shrunk, dot_dtype)
        to_a = _lora_grad_a_plan(grad_s, x, dropout_p > 0, dot_dtype, None)
        to_x = None
        if needs_grad_x:
            example = torch.empty(M, K, device=x.device, dtype=x.dtype)
            to_x = _dual_matmul_plan(grad_out, weight, grad_s, lora_A, None, example, dropout_p > 0, False, dot_dtype)
        plans = remember_launch(key, (through_b, to_a, to_x))
    through_b, to_a, to_x = plans
    if through_b:
        grid, sizes, meta = through_b
        # S was scaled by `scale`, so the gradient reaching the unscaled x A^T is scale * dS: scaled as it is stored.
        _lora_grad_dy_kernel.run(
            grad_out, lora_B, shrunk, grad_s, grad_b, *sizes, scale, grid=grid, warmup=False, **meta
        )
    grad_a = (torch.empty if to_a and not to_a[2]["SPLIT"] else torch.zeros)(R, K, device=x.device, dtype=torch.float32)
    if to_a:
        grid, sizes, meta = to_a
        _lora_grad_a_kernel.run(
            grad_s, x, grad_a, *sizes, grad_a if seed is None else seed, dropout_p, grid=grid, warmup=False, **meta
        )
    if not needs_grad_x:
        return None, grad_a, grad_b
    grad_x = torch.empty(M, K, device=x.device, dtype=x.dtype)
    if to_x:
        kernel, grid, sizes, meta = to_x
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
        kernel.run(
            grad_out,
            weight,
            grad_s,
            lora_A,
            grad_x,
            grad_x,
            *sizes,
            grad_x if seed is None else seed,
            dropout_p,
            keep_scale,
            grid=grid,
            warmup=False,
            **meta,
        )
    return grad_x, grad_a, grad_b


def _sm_count(tensor: torch.Tensor) -> int:
    return device_properties(tensor)["multiprocessor_count"]


def row_splits(
    ref: torch.Tensor, M: int, block_m: int, column_blocks: int, splits: int | None = None, most: int | None = None
) -> tuple[int, int]:
    """(splits, rows per split) of a kernel whose programs (column block, split) each sum a run of BLOCK_M-row
    blocks, adding their partial sums atomically when there are several. `splits` defaults to one on the interpreter,
    else about two programs per SM over the `column_blocks` (unmeasured tuning, no GPU yet); capped by `most`, at
    least one and at most one a row block, then trimmed so that no split is empty."""
    m_blocks = cdiv(M, block_m)
    if splits is None:
        splits = 1 if _on_interpreter(ref) else 2 * _sm_count(ref) // column_blocks
    if most is not None:
        splits = min(splits, most)
    rows = cdiv(m_blocks, max(1, min(splits, m_blocks))) * block_m
    return cdiv(M, rows), rows


@triton.jit(do_not_specialize=["seed_ptr"])
def _dropout_keep_mask_kernel(out_ptr, numel, seed_ptr, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _keep(_seed_key(seed_ptr), offs, p), mask=offs < numel)


def dropout_keep_mask(M: int, K: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Semantics: keep[m, k] = rand(seed, m * K + k) >= p, the mask the kernels apply to x [M, K] for `seed`.

    Shapes: seed a 1-element int64 tensor; returns a bool tensor [M, K] on its device (the reference and the torch
    fallback use it to apply the very same mask).
    """
    _check_seed("dropout_keep_mask", 1.0, seed)
    keep = torch.empty(M, K, device=seed.device, dtype=torch.bool)
    if M * K:
        _dropout_keep_mask_kernel[(cdiv(M * K, 1024),)](keep, M * K, seed, p, BLOCK=1024)
    return keep
