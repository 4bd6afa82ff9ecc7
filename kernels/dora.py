"""DoRA kernels: the per-row weight norm without W + s B A, the rescaled output fused into the base GEMM, and the
backward passes that differ from plain LoRA's.

DoRA (one adapter, g = magnitude / ||W + s B A|| per output row, the norm a constant):
    without dropout  y = g * (x W^T + S B^T) + b                      S = s * x A^T
    with dropout     y = x W^T + b + (g - 1) * x_d W^T + g * S B^T    S = s * x_d A^T, x_d = dropout(x)
`weight_times_adapter` gives W A^T (and ||W_j||^2) for the norm, in fp32, reading W once. `dora_forward` is the
base GEMM with DoRA's epilogue; under dropout the same W tile multiplies x and x_d (the mask drawn in registers from
the seed, as `lora_shrink` draws it), so W is read once for both products. It also writes z = (x or x_d) W^T + S B^T,
the only T x d_out tensor the backward needs: dg = sum_t dY * z. `dora_grad_x` is dX = (g * dY) W + dS A, or with
dropout dY W + mask * ((g - 1) * dY W + dS A) / (1 - p), again with one read of W. S, dS, dA and dB come from the
plain LoRA kernels (`kernels.lora_linear`), with g folded into B.

Launchers take 2-D tensors of any strides and return new tensors; `dot_dtype` is the dtype the tensor cores multiply
in (the activations' on a GPU, fp32 under the interpreter, whose bf16 arithmetic is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import cdiv
from .lora_linear import (
    _TORCH_TO_TL,
    MIN_DOT,
    _accumulate_matmul,
    _check_seed,
    _grouped_tile,
    _keep,
    _on_interpreter,
    _precision,
    _rank_block,
    _seed_key,
    keep_clean_configs,
    row_splits,
)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel, dropout (two fp32 accumulators) and dot dtype
# (16-bit: tensor cores; fp32: IEEE dots on the FMA units, far more registers per tile). Every entry compiles for
# sm_80 and sm_90 with no register spill (ptxas -v, triton 3.9, rank blocks of 16, for bf16/fp16/fp32); the larger
# tiles tried spill (e.g. forward 128x128x64 with 8 warps: 4 bytes on sm_80, 16 on sm_90; with dropout 11708 bytes
# on sm_80), and so does 128x128x32 with rank blocks of 32 (4 bytes on sm_80). Speed is untuned: no GPU has run
# these yet.
_FORWARD_SHAPES = {
    (False, False): [(128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4)],
    (True, False): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 4)],
    (False, True): [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    (True, True): [(32, 32, 32, 4, 2)],
}
# For dX, BLOCK_N is the reduction block (over d_out) and BLOCK_K the output's columns.
_GRAD_X_SHAPES = {
    (False, False): [(128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4)],
    (True, False): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 4)],
    (False, True): [(32, 64, 32, 4, 2), (64, 32, 32, 4, 2), (32, 32, 32, 4, 2)],
    (True, True): [(32, 32, 16, 4, 2)],
}
# The rank dimension is walked in blocks of 16, the smallest dot a GPU takes: larger rank blocks spill (see above).
MAX_RANK_BLOCK = 16


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for m, n, k, warps, stages in shapes
    ]


def forward_configs(dropout: bool, fp32: bool) -> list[triton.Config]:
    """Autotune space of `dora_forward` for dropout on/off and fp32 (else 16-bit) dots."""
    return _configs(_FORWARD_SHAPES[dropout, fp32])


def grad_x_configs(dropout: bool, fp32: bool) -> list[triton.Config]:
    """Autotune space of `dora_grad_x` for dropout on/off and fp32 (else 16-bit) dots."""
    return _configs(_GRAD_X_SHAPES[dropout, fp32])


def _rank_tile(r: int) -> int:
    return _rank_block(min(r, MAX_RANK_BLOCK)) if r else MIN_DOT


# ----------------------------------------------------------------------------------------------------------- norm


@triton.jit
def _weight_times_adapter_kernel(
    # pointers
    w_ptr,
    a_ptr,
    aw_ptr,
    sq_ptr,
    # sizes
    N,
    K,
    R,
    # strides
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_awn,
    stride_awr,
    # meta-parameters
    WITH_SQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (n block, r block): AW[n, r] over the whole of K; the r-block-0 programs also sum W^2 per row.
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(tl.float32)
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        ).to(tl.float32)
        # IEEE fp32: the norm's terms are differences of large numbers, TF32's 10-bit mantissa would show.
        acc += tl.dot(w, a, input_precision="ieee")
        if WITH_SQ:
            sq += tl.sum(w * w, axis=1)
    tl.store(
        aw_ptr + offs_n[:, None] * stride_awn + offs_r[None, :] * stride_awr,
        acc,
        mask=mask_n[:, None] & mask_r[None, :],
    )
    if WITH_SQ:
        if pid_r == 0:
            tl.store(sq_ptr + offs_n, sq, mask=mask_n)


def weight_times_adapter(
    weight: torch.Tensor, lora_A: torch.Tensor, with_sq: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantics: AW = W @ A.T and sq[j] = sum_k W[j, k]^2, both in IEEE fp32, from one read of W.

    Shapes: weight [N, K] (any float dtype, any strides), lora_A [R, K]. Returns AW [N, R] and sq [N] (None unless
    `with_sq`), fp32.
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"weight_times_adapter: weight has {K} columns but lora_A has shape {tuple(lora_A.shape)}.")
    weight_times_A = torch.empty(N, R, device=weight.device, dtype=torch.float32)
    sq = torch.empty(N, device=weight.device, dtype=torch.float32) if with_sq else None
    if N == 0:
        return weight_times_A, sq
    # 32 rows a program: 128 programs for d_out = 4096, about one wave on an H100 (unmeasured; no GPU yet). Rank
    # blocks of 32 (16 for an fp32 weight) keep the fp32 tiles spill-free on sm_80 and sm_90 with 4 warps, 3 stages.
    block_n = 32
    block_k = 32 if _on_interpreter(weight) else 64
    block_r = min(16 if weight.dtype == torch.float32 else 32, _rank_block(R))
    grid = (cdiv(N, block_n), cdiv(R, block_r))
    _weight_times_adapter_kernel[grid](
        weight,
        lora_A,
        weight_times_A,
        sq if sq is not None else weight_times_A,
        N,
        K,
        R,
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        weight_times_A.stride(0),
        weight_times_A.stride(1),
        WITH_SQ=with_sq,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
        num_warps=4,
        num_stages=3,
    )
    return weight_times_A, sq


# -------------------------------------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["seed_ptr"])
def _dora_forward_kernel(
    # pointers
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    g_ptr,
    bias_ptr,
    y_ptr,
    z_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_zm,
    stride_zn,
    # dropout of x, drawn as lora_shrink draws it (the seed is data: a 1-element int64 tensor)
    seed_ptr,
    p,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    STORE_Z: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: programs that share W tiles run close together, so W stays in L2.
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_dropped = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        seed = _seed_key(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        acc += tl.dot(x.to(DOT_DTYPE), w, input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, offs_m[:, None] * K + offs_k[None, :], p)
            dropped = tl.where(keep, x.to(tl.float32) / (1.0 - p), 0.0)
            acc_dropped += tl.dot(dropped.to(DOT_DTYPE), w, input_precision=PRECISION)
    if DROPOUT:
        # y = (x W^T - x_d W^T) + b + g * z with z = x_d W^T + S B^T: two accumulators live, never three.
        acc = acc - acc_dropped
        z = acc_dropped
    else:
        z = acc
    z = _accumulate_matmul(
        z,
        s_ptr,
        b_ptr,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        R,
        stride_sm,
        stride_sr,
        stride_br,
        stride_bn,
        BLOCK_R,
        DOT_DTYPE,
        PRECISION,
    )
    out_mask = mask_m[:, None] & mask_n[None, :]
    # z first: once it is stored, y can take its registers.
    if STORE_Z:
        tl.store(
            z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, z.to(z_ptr.dtype.element_ty), out_mask
        )
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if DROPOUT:
        y = acc + g * z
    else:
        y = g * z
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), out_mask)


def _keep_clean(kernel):
    # Configs that spill or can't load on the GPU at hand are dropped before timing (see keep_clean_configs).
    return {
        "early_config_prune": lambda configs, named_args, **kwargs: keep_clean_configs(
            kernel, configs, named_args, kwargs
        )
    }


_dora_forward_tuned = {
    (dropout, fp32): triton.autotune(
        configs=forward_configs(dropout, fp32),
        key=["M", "N", "K", "R", "HAS_BIAS", "STORE_Z", "DOT_DTYPE"],
        prune_configs_by=_keep_clean(_dora_forward_kernel),
    )(_dora_forward_kernel)
    for dropout in (False, True)
    for fp32 in (False, True)
}


def _check_vector(name: str, tensor: torch.Tensor | None, n: int) -> None:
    if tensor is not None and tensor.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected ({n},).")


def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    shrunk: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    store_z: bool = True,
    dot_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: without dropout z = x W^T + S B^T, y = g * z + b; with dropout (x_d = dropout(x, p; seed), the mask
    of `lora_shrink` with that seed) z = x_d W^T + S B^T, y = x W^T - x_d W^T + g * z + b. fp32 accumulation.

    Shapes: x [M, K]; weight W [N, K]; bias [N] or None; shrunk S [M, R] (s * dropout(x) A^T, fp32); lora_B [N, R];
    g [N] fp32; seed a 1-element int64 tensor (needed when dropout_p > 0). Returns y [M, N] in x's dtype and z [M, N]
    in x's dtype (empty unless `store_z`).
    """
    _check_seed("dora_forward", dropout_p, seed)
    M, K = x.shape
    N = weight.shape[0]
    R = shrunk.shape[1]
    if weight.shape[1] != K or shrunk.shape[0] != M or lora_B.shape != (N, R):
        raise ValueError(
            f"dora_forward: x {tuple(x.shape)}, weight {tuple(weight.shape)}, S {tuple(shrunk.shape)} and "
            f"lora_B {tuple(lora_B.shape)} don't fit together."
        )
    _check_vector("dora_forward: g", g, N)
    _check_vector("dora_forward: bias", bias, N)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = torch.empty(M, N, device=x.device, dtype=x.dtype) if store_z else x.new_empty(0)
    if M == 0 or N == 0:
        return y, z
    dot_dtype = dot_dtype or x.dtype
    z_ = z if store_z else y
    args = (
        x,
        weight,
        shrunk,
        lora_B,
        g,
        bias if bias is not None else g,
        y,
        z_,
        M,
        N,
        K,
        R,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        shrunk.stride(0),
        shrunk.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        y.stride(0),
        y.stride(1),
        z_.stride(0),
        z_.stride(1),
        seed if seed is not None else g,
        dropout_p,
    )
    common = dict(
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0,
        STORE_Z=store_z,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype],
        PRECISION=_precision(dot_dtype),
        BLOCK_R=_rank_tile(R),
    )
    tuned = _dora_forward_tuned[dropout_p > 0, dot_dtype == torch.float32]
    _launch_grouped(_dora_forward_kernel, tuned, x, M, N, "BLOCK_N", args, common)
    return y, z


def _launch_grouped(kernel, tuned, ref: torch.Tensor, rows: int, cols: int, col_block: str, args, common) -> None:
    """Launches a kernel of grouped [BLOCK_M, `col_block`] output tiles over [rows, cols]: its autotuned variant
    `tuned` on a GPU; on the interpreter, which is slow and autotuning would multiply that, one small config."""
    if _on_interpreter(ref):
        kernel[(cdiv(rows, 32) * cdiv(cols, 32),)](*args, **common, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
        return

    def grid(meta):
        return (cdiv(rows, meta["BLOCK_M"]) * cdiv(cols, meta[col_block]),)

    tuned[grid](*args, **common)


# ------------------------------------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["seed_ptr"])
def _dora_grad_x_kernel(
    # pointers
    dy_ptr,
    w_ptr,
    g_ptr,
    ds_ptr,
    a_ptr,
    dx_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_dsm,
    stride_dsr,
    stride_ar,
    stride_ak,
    stride_dxm,
    stride_dxk,
    # dropout of x, drawn as lora_shrink draws it (the seed is data: a 1-element int64 tensor)
    seed_ptr,
    p,
    # meta-parameters
    DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Output tile dX[m, k]; the reduction runs over N (the rows of W).
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_dropped = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        if DROPOUT:
            acc += tl.dot(dy.to(DOT_DTYPE), w, input_precision=PRECISION)
            acc_dropped += tl.dot((dy * (g - 1.0)).to(DOT_DTYPE), w, input_precision=PRECISION)
        else:
            acc += tl.dot((dy * g).to(DOT_DTYPE), w, input_precision=PRECISION)
    # dS A joins the dropped sum under dropout (the mask and 1 / (1 - p) apply to both), else the only one.
    adapted = _accumulate_matmul(
        acc_dropped if DROPOUT else acc,
        ds_ptr,
        a_ptr,
        offs_m,
        offs_k,
        mask_m,
        mask_k,
        R,
        stride_dsm,
        stride_dsr,
        stride_ar,
        stride_ak,
        BLOCK_R,
        DOT_DTYPE,
        PRECISION,
    )
    if DROPOUT:
        keep = _keep(_seed_key(seed_ptr), offs_m[:, None] * K + offs_k[None, :], p)
        acc += tl.where(keep, adapted / (1.0 - p), 0.0)
    else:
        acc = adapted
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )


_dora_grad_x_tuned = {
    (dropout, fp32): triton.autotune(
        configs=grad_x_configs(dropout, fp32),
        key=["M", "N", "K", "R", "DOT_DTYPE"],
        prune_configs_by=_keep_clean(_dora_grad_x_kernel),
    )(_dora_grad_x_kernel)
    for dropout in (False, True)
    for fp32 in (False, True)
}


def dora_grad_x(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    grad_s: torch.Tensor,
    lora_A: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: without dropout dX = (g * dY) W + dS A; with dropout dX = dY W + keep * ((g - 1) * dY W + dS A) /
    (1 - p), keep the mask of `lora_shrink` with `seed`. fp32 accumulation.

    Shapes: grad_y dY [M, N]; weight W [N, K]; g [N] fp32; grad_s dS [M, R] (the gradient of s * x_d A^T times s,
    fp32); lora_A [R, K]; seed a 1-element int64 tensor (needed when dropout_p > 0). Returns dX [M, K] in `out_dtype`
    (default dY's dtype).
    """
    _check_seed("dora_grad_x", dropout_p, seed)
    M, N = grad_y.shape
    K = weight.shape[1]
    R = grad_s.shape[1]
    if weight.shape[0] != N or grad_s.shape[0] != M or lora_A.shape != (R, K):
        raise ValueError(
            f"dora_grad_x: dY {tuple(grad_y.shape)}, weight {tuple(weight.shape)}, dS {tuple(grad_s.shape)} and "
            f"lora_A {tuple(lora_A.shape)} don't fit together."
        )
    _check_vector("dora_grad_x: g", g, N)
    grad_x = torch.empty(M, K, device=grad_y.device, dtype=out_dtype or grad_y.dtype)
    if M == 0 or K == 0:
        return grad_x
    dot_dtype = dot_dtype or grad_y.dtype
    args = (
        grad_y,
        weight,
        g,
        grad_s,
        lora_A,
        grad_x,
        M,
        N,
        K,
        R,
        grad_y.stride(0),
        grad_y.stride(1),
        weight.stride(0),
        weight.stride(1),
        grad_s.stride(0),
        grad_s.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        grad_x.stride(0),
        grad_x.stride(1),
        seed if seed is not None else g,
        dropout_p,
    )
    common = dict(
        DROPOUT=dropout_p > 0,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype],
        PRECISION=_precision(dot_dtype),
        BLOCK_R=_rank_tile(R),
    )
    tuned = _dora_grad_x_tuned[dropout_p > 0, dot_dtype == torch.float32]
    _launch_grouped(_dora_grad_x_kernel, tuned, grad_y, M, K, "BLOCK_K", args, common)
    return grad_x


@triton.jit
def _column_dot_kernel(
    dy_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_zm,
    stride_zn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS_PER_SPLIT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Program (n block, split) sums its ROWS_PER_SPLIT rows; splits add up atomically.
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_split * ROWS_PER_SPLIT
    for m0 in range(row_start, min(row_start + ROWS_PER_SPLIT, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=mask, other=0.0)
        acc += tl.sum(dy.to(tl.float32) * z.to(tl.float32), axis=0)
    if SPLIT:
        tl.atomic_add(out_ptr + offs_n, acc, mask=mask_n)
    else:
        tl.store(out_ptr + offs_n, acc, mask=mask_n)


def column_dot(grad_y: torch.Tensor, z: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """Semantics: out[n] = sum_m dY[m, n] * z[m, n] in fp32 (DoRA's dg, the magnitude's gradient times the norm).

    Shapes: grad_y [M, N], z [M, N]. Returns [N] fp32. The row loop is split over `splits` programs per column block
    whose partial sums are added atomically (default: one on the interpreter, about two programs per SM on a GPU).
    """
    if grad_y.shape != z.shape:
        raise ValueError(f"column_dot: dY {tuple(grad_y.shape)} and z {tuple(z.shape)} differ.")
    M, N = grad_y.shape
    out = torch.zeros(N, device=grad_y.device, dtype=torch.float32)
    if M == 0 or N == 0:
        return out
    # 32 x 64 tiles, 4 warps: spill-free on sm_80 and sm_90 for every dtype (32 x 128 spills 100 bytes for fp16 on
    # sm_90).
    block_m = 32
    block_n = 32 if _on_interpreter(grad_y) else 64
    n_blocks = cdiv(N, block_n)
    splits, rows_per_split = row_splits(grad_y, M, block_m, n_blocks, splits)
    _column_dot_kernel[(n_blocks, splits)](
        grad_y,
        z,
        out,
        M,
        N,
        grad_y.stride(0),
        grad_y.stride(1),
        z.stride(0),
        z.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ROWS_PER_SPLIT=rows_per_split,
        SPLIT=splits > 1,
        num_warps=4,
        num_stages=3,
    )
    return out
