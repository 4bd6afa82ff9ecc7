"""Grouped low-rank kernels for LoRA on mixture-of-experts weights: each expert's LoRA update on its own rows only.

The rows (token-expert pairs) come sorted by expert, group e owning rows `offsets[e-1]:offsets[e]` (the `offs` of
`torch.nn.functional.grouped_mm`). The LoRA term of one projection, `y[g] += s * x[g] @ A[e].T @ B[e].T`, and its
backward are four grouped products, all served by two kernels:

- `grouped_matmul`: out[g] = base[g] + scale * inp[g] @ M[e] for every group, M a stack [E, K, N] of per-expert
  matrices with any strides (A[e].T for the shrink x A^T, B[e].T for the expand, B[e] for dS = dY B, A[e] for
  dX = dS A). Programs own a tile of at most BLOCK_M rows of one group (the SGMV kernels' tiling, see `sgmv.py`) and
  BLOCK_N output columns;
- `grouped_outer`: out[e] = scale * inp_a[g].T @ inp_b[g], the per-expert reductions over rows that give dA and dB.
  Program (e, m, n) loops over the rows of group e.

Nothing of size E x in x out is ever formed. The tile table is built on the device from `offsets` (`group_tiles`),
with a length fixed by shapes (rows, experts, block size), so no launch waits for the host to read the routing.
Rank dimensions are padded to a power of two >= 16 in the block shape (GPU dots need every dim >= 16), loads past
the real rank masked to zero. `dot_dtype` is the dtype the dots multiply in: the activation dtype on GPU, fp32 under
the interpreter (whose bf16 arithmetic is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .lora_linear import _TORCH_TO_TL, MIN_DOT, _accumulate_matmul, _on_interpreter, _precision


def rank_block(rank: int) -> int:
    """Block size along a rank dimension: a power of two >= 16, at most 64 (longer ranks loop or take more
    programs, keeping a BLOCK_M x 64 fp32 accumulator as `lora_linear`'s kernels do)."""
    return min(max(MIN_DOT, next_power_of_2(max(rank, 1))), 64)


def group_tiles(offsets: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """The tile table [cdiv(num_rows, block_m) + E, 3] int32 of (group, start, end) row ranges, each inside one group
    and at most `block_m` long; unused entries are (-1, 0, 0). Built with device ops from `offsets` [E] (cumulative
    group ends): a group of n rows needs cdiv(n, block_m) <= n / block_m + 1 tiles, hence the length."""
    num_groups = offsets.shape[0]
    device = offsets.device
    ends = offsets.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles_per_group = (ends - starts + block_m - 1) // block_m
    last_tile = torch.cumsum(tiles_per_group, 0)
    n_tiles = cdiv(num_rows, block_m) + num_groups
    tile = torch.arange(n_tiles, device=device)
    group = torch.searchsorted(last_tile, tile, right=True)
    busy = group < num_groups
    group = group.clamp(max=num_groups - 1)
    start = starts[group] + (tile - (last_tile[group] - tiles_per_group[group])) * block_m
    end = torch.minimum(start + block_m, ends[group])
    table = torch.stack([group, start, end], dim=1)
    return torch.where(busy[:, None], table, torch.tensor([-1, 0, 0], device=device)).to(torch.int32)


@triton.jit
def _grouped_matmul_kernel(
    # pointers
    inp_ptr,
    mat_ptr,
    base_ptr,
    out_ptr,
    tiles_ptr,
    # sizes
    K,
    N,
    # strides
    stride_im,
    stride_ik,
    stride_me,
    stride_mk,
    stride_mn,
    stride_bm,
    stride_bn,
    stride_om,
    stride_on,
    # scalars
    scale,
    # meta-parameters
    HAS_BASE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.load(tiles_ptr + tile * 3)
    if group < 0:
        return
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    # 64-bit offsets only once per tile (to its first row and its expert); inside a tile int32 offsets suffice, and
    # per-element int64 offsets would double the registers the address tiles take.
    inp_ptr += start.to(tl.int64) * stride_im
    base_ptr += start.to(tl.int64) * stride_bm
    out_ptr += start.to(tl.int64) * stride_om
    mat_ptr += group.to(tl.int64) * stride_me
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < end - start
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_matmul(
        acc,
        inp_ptr,
        mat_ptr,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        K,
        stride_im,
        stride_ik,
        stride_mk,
        stride_mn,
        BLOCK_K,
        DOT_DTYPE,
        PRECISION,
    )
    acc = acc * scale
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BASE:
        base = tl.load(base_ptr + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
        acc += base.to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_outer_kernel(
    # pointers
    a_ptr,
    b_ptr,
    offsets_ptr,
    out_ptr,
    # sizes
    M,
    N,
    # strides
    stride_as,
    stride_am,
    stride_bs,
    stride_bn,
    stride_oe,
    stride_om,
    stride_on,
    # scalars
    scale,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    group = tl.program_id(0)
    # int64 bounds make the loop's row index int64, so offsets to a block's first row can't overflow.
    end = tl.load(offsets_ptr + group).to(tl.int64)
    start = tl.load(offsets_ptr + group - 1, mask=group > 0, other=0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        # As in `_grouped_matmul_kernel`: one 64-bit offset to the block's first row, int32 inside it.
        a_rows = a_ptr + s0 * stride_as
        b_rows = b_ptr + s0 * stride_bs
        mask_s = offs_s < (end - s0).to(tl.int32)
        a_t = tl.load(
            a_rows + offs_s[None, :] * stride_as + offs_m[:, None] * stride_am,
            mask=mask_m[:, None] & mask_s[None, :],
            other=0.0,
        )
        b = tl.load(
            b_rows + offs_s[:, None] * stride_bs + offs_n[None, :] * stride_bn,
            mask=mask_s[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc += tl.dot(a_t.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)
    out_ptrs = out_ptr + group.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def tile_rows(dtype: torch.dtype, interpreting: bool) -> int:
    """Rows per tile for activations of `dtype`: 64 for 16-bit dots on a GPU, 32 for fp32 ones (FMA, not tensor
    cores: a 64-row fp32 tile spills registers on sm_80), 16 under the interpreter (which runs every program in
    Python)."""
    if interpreting:
        return 16
    return 32 if dtype == torch.float32 else 64


def _feature_or_rank_block(size: int, ref: torch.Tensor, dot_dtype: torch.dtype, most: int = 64) -> int:
    """Block along one dimension: a rank-sized one (<= 64) is a single padded block; a feature-sized one takes 64
    (16-bit dots) or 32 (fp32 dots) per program, 32 under the interpreter. With `tile_rows`, every config compiles
    for sm_80 and sm_90 without spills (ptxas -v, triton 3.9: at most 255 registers, 96 KiB of shared memory).
    Not yet tuned for speed on a GPU."""
    fp32 = dot_dtype == torch.float32
    if size <= 64:
        return min(rank_block(size), most)
    if _on_interpreter(ref) or fp32:
        return min(32, most)
    return min(64, most)


def _check_tiles(tiles: torch.Tensor) -> None:
    if tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.dtype != torch.int32:
        raise ValueError(
            f"tiles must be int32 [n_tiles, 3] (group, start, end), got {tuple(tiles.shape)} {tiles.dtype}."
        )


def grouped_matmul(
    inp: torch.Tensor,
    mat: torch.Tensor,
    tiles: torch.Tensor,
    block_m: int,
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: out[p] = base[p] + scale * inp[p] @ mat[e] for every row p of a tile of group e (base = 0 when
    None); rows in no tile are left as they are. fp32 accumulation. `base` may be `out` itself (accumulate in place).

    Shapes: inp [S, K]; mat [E, K, N] (any strides); tiles [n, 3] int32 from `group_tiles(offsets, S, block_m)`;
    base and out [S, N]. Returns out (new, of `out_dtype`, when not given).
    """
    _check_tiles(tiles)
    S, K = inp.shape
    if mat.dim() != 3 or mat.shape[1] != K:
        raise ValueError(f"grouped_matmul: inp {tuple(inp.shape)} and mat {tuple(mat.shape)} don't chain.")
    N = mat.shape[2]
    if out is None:
        out = torch.zeros(S, N, device=inp.device, dtype=out_dtype)
    for name, tensor in (("out", out), ("base", base)):
        if tensor is not None and tensor.shape != (S, N):
            raise ValueError(f"grouped_matmul: {name} has shape {tuple(tensor.shape)}, expected ({S}, {N}).")
    if S == 0 or N == 0 or tiles.shape[0] == 0:
        return out
    dot_dtype = dot_dtype or (torch.float32 if _on_interpreter(inp) else inp.dtype)
    block_n = _feature_or_rank_block(N, inp, dot_dtype)
    block_k = _feature_or_rank_block(K, inp, dot_dtype, most=32 if dot_dtype == torch.float32 else 64)
    base_ = base if base is not None else out
    _grouped_matmul_kernel[(tiles.shape[0], cdiv(N, block_n))](
        inp,
        mat,
        base_,
        out,
        tiles,
        K,
        N,
        inp.stride(0),
        inp.stride(1),
        mat.stride(0),
        mat.stride(1),
        mat.stride(2),
        base_.stride(0),
        base_.stride(1),
        out.stride(0),
        out.stride(1),
        scale,
        HAS_BASE=base is not None,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype],
        PRECISION=_precision(dot_dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out


def grouped_outer(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: out[e] = scale * a[g].T @ b[g] over the rows g = offsets[e-1]:offsets[e] of group e (zero for an
    empty group), fp32 accumulation.

    Shapes: a [S, M]; b [S, N]; offsets [E] int32 cumulative group ends; out [E, M, N] (any strides; fp32 when new).
    Returns out.
    """
    S, M = a.shape
    if b.dim() != 2 or b.shape[0] != S:
        raise ValueError(f"grouped_outer: a {tuple(a.shape)} and b {tuple(b.shape)} need the same rows.")
    N = b.shape[1]
    E = offsets.shape[0]
    if out is None:
        out = torch.empty(E, M, N, device=a.device, dtype=torch.float32)
    elif out.shape != (E, M, N):
        raise ValueError(f"grouped_outer: out has shape {tuple(out.shape)}, expected ({E}, {M}, {N}).")
    if E == 0 or M == 0 or N == 0:
        return out
    dot_dtype = dot_dtype or (torch.float32 if _on_interpreter(a) else a.dtype)
    block_m = _feature_or_rank_block(M, a, dot_dtype)
    block_n = _feature_or_rank_block(N, a, dot_dtype)
    # Rows stream in blocks of 32 (the smallest dot size that keeps the loop short): with 64 x 64 output blocks in
    # 16-bit that is 206 registers on sm_80, no spills.
    block_s = 32
    _grouped_outer_kernel[(E, cdiv(M, block_m), cdiv(N, block_n))](
        a,
        b,
        offsets,
        out,
        M,
        N,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        scale,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype],
        PRECISION=_precision(dot_dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_S=block_s,
        num_warps=4,
    )
    return out
