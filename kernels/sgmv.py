"""Multi-adapter LoRA kernels (SGMV style): every token runs with its own adapter, in two launches per layer.

`lora_shrink_sgmv`: t = x A_s^T and `lora_expand_sgmv`: y += s_s (t B_s^T + bias_s), where s is the adapter slot of
the token's group. The adapters of a layer are packed row-wise without padding (`A` [R_total, d_in] and `B_t`
[R_total, d_out], slot i owning rows `slot_spans[i, 0] : + slot_spans[i, 1]`); only the block shape pads the rank,
to a power of two >= 16, with masked loads (see `peftfast.tuners.lora.bank` for why).

Tokens come grouped by adapter: `token_order` lists token indices group after group, and `tiles` [n_tiles, 3] holds
(group, start, end) positions in `token_order`, each tile at most BLOCK_M long and inside one group, so a program's
tile shares one adapter: a long prefill segment is many full tiles, a decode token is one tile of one row. Group -1
marks an idle tile; `group_slot` [n_groups] maps a group to this layer's slot (-1: no adapter here, rows untouched).
The grid is (n_tiles, ...) with n_tiles fixed by the caller from shapes (tokens, block size, number of adapters the
model holds), never from the batch's adapter mix, so a decode step can be captured in a CUDA graph; idle programs
return at once.

`dot_dtype` is the dtype the dots multiply in: the activation dtype on GPU, fp32 under the interpreter (whose bf16
arithmetic is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .lora_linear import _TORCH_TO_TL, MIN_DOT, _on_interpreter, _precision


def _rank_block(r_max: int) -> int:
    # GPU dots need every dim >= 16; ranks above 64 loop over blocks of 64 (registers stay within a BLOCK_M x 64
    # fp32 accumulator, as in `lora_linear`'s dual_matmul).
    return min(max(MIN_DOT, next_power_of_2(max(r_max, 1))), 64)


def _check_layout(name: str, x: torch.Tensor, token_order: torch.Tensor, tiles: torch.Tensor) -> None:
    if token_order.shape != (x.shape[0],):
        raise ValueError(f"{name}: token_order has shape {tuple(token_order.shape)}, expected ({x.shape[0]},).")
    if tiles.dim() != 2 or tiles.shape[1] != 3:
        raise ValueError(f"{name}: tiles must be [n_tiles, 3] (group, start, end), got {tuple(tiles.shape)}.")


@triton.jit
def _tile_header(tiles_ptr, group_slot_ptr, slot_spans_ptr, token_order_ptr, BLOCK_M: tl.constexpr):
    """The tile this program serves: its slot (-1: nothing to do), positions, mask, token ids, first row and rank."""
    tile = tl.program_id(0)
    group = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    slot = tl.load(group_slot_ptr + group, mask=group >= 0, other=-1)
    positions = start + tl.arange(0, BLOCK_M)
    mask_m = positions < end
    tokens = tl.load(token_order_ptr + positions, mask=mask_m, other=0).to(tl.int64)
    first_row = tl.load(slot_spans_ptr + slot * 2, mask=slot >= 0, other=0)
    rank = tl.load(slot_spans_ptr + slot * 2 + 1, mask=slot >= 0, other=0)
    return slot, positions, mask_m, tokens, first_row, rank


@triton.jit
def _sgmv_shrink_kernel(
    # pointers
    x_ptr,
    a_ptr,
    out_ptr,
    token_order_ptr,
    tiles_ptr,
    group_slot_ptr,
    slot_spans_ptr,
    # sizes
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_om,
    stride_or,
    # meta-parameters
    SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    slot, positions, mask_m, tokens, first_row, rank = _tile_header(
        tiles_ptr, group_slot_ptr, slot_spans_ptr, token_order_ptr, BLOCK_M
    )
    if slot < 0:
        return
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(1) * BLOCK_R >= rank:
        return
    mask_r = offs_r < rank
    rows = (first_row + offs_r).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + rows[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc += tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), input_precision=PRECISION)
    out_ptrs = out_ptr + positions[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    out_mask = mask_m[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _sgmv_expand_kernel(
    # pointers
    t_ptr,
    bt_ptr,
    bias_ptr,
    scaling_ptr,
    y_ptr,
    token_order_ptr,
    tiles_ptr,
    group_slot_ptr,
    slot_spans_ptr,
    # sizes
    N,
    # strides
    stride_tm,
    stride_tr,
    stride_br,
    stride_bn,
    stride_bias_slot,
    stride_bias_n,
    stride_ym,
    stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    slot, positions, mask_m, tokens, first_row, rank = _tile_header(
        tiles_ptr, group_slot_ptr, slot_spans_ptr, token_order_ptr, BLOCK_M
    )
    if slot < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        t = tl.load(
            t_ptr + positions[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        b = tl.load(
            bt_ptr + (first_row + offs_r)[:, None].to(tl.int64) * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc += tl.dot(t.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + slot * stride_bias_slot + offs_n * stride_bias_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    acc = acc * tl.load(scaling_ptr + slot)
    y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _shrink_split_k(n_tiles: int, K: int, block_k: int) -> int:
    """K-splits per tile for small batches: a decode step has few tiles, and one program per tile would leave most
    SMs idle while each streams a whole A (r x d_in). Aim for ~128 programs (an H100 has 132 SMs), each keeping at
    least 4 K-blocks so the atomic adds stay a small share of the work. Not yet tuned on a GPU."""
    wanted = max(1, 128 // max(n_tiles, 1))
    most = max(1, K // (4 * block_k))
    return min(next_power_of_2(wanted), next_power_of_2(most + 1) // 2)


def lora_shrink_sgmv(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    slot_spans: torch.Tensor,
    group_slot: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    block_m: int,
    r_max: int,
    *,
    split_k: int | None = None,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: t[p, :r_s] = x[token_order[p]] @ A[row_s : row_s + r_s].T for every position p of a tile whose group
    has slot s >= 0 in this layer; every other entry of t is 0. fp32.

    Shapes: x [M, d_in]; lora_A [R_total, d_in]; slot_spans [n_slots, 2] int32 (row_s, r_s); group_slot [n_groups]
    int32; token_order [M] int32; tiles [n_tiles, 3] int32 (group, start, end), end - start <= block_m.
    Returns t [M, r_max] in token_order's order.
    """
    M, K = x.shape
    _check_layout("lora_shrink_sgmv", x, token_order, tiles)
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_shrink_sgmv: x has {K} features but lora_A has shape {tuple(lora_A.shape)}.")
    out = torch.zeros(M, r_max, device=x.device, dtype=torch.float32)
    if M == 0 or r_max == 0 or tiles.shape[0] == 0:
        return out
    block_r = _rank_block(r_max)
    # GPU: BLOCK_K 128 as the single-adapter `lora_shrink` uses (a tile row of x and A is 256 B in bf16); the
    # interpreter runs every program in Python, so it gets small blocks. Neither is tuned for SGMV on a GPU yet.
    block_k = 32 if _on_interpreter(x) else 128
    if split_k is None:
        split_k = 1 if _on_interpreter(x) else _shrink_split_k(tiles.shape[0], K, block_k)
    grid = (tiles.shape[0], cdiv(r_max, block_r), split_k)
    _sgmv_shrink_kernel[grid](
        x,
        lora_A,
        out,
        token_order,
        tiles,
        group_slot,
        slot_spans,
        K,
        x.stride(0),
        x.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        out.stride(0),
        out.stride(1),
        SPLIT_K=split_k,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype or x.dtype],
        PRECISION=_precision(dot_dtype or x.dtype),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
    )
    return out


def lora_expand_sgmv(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    lora_B_t: torch.Tensor,
    lora_B_bias: torch.Tensor | None,
    scaling: torch.Tensor,
    slot_spans: torch.Tensor,
    group_slot: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    block_m: int,
    *,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: y[token_order[p]] += (t[p, :r_s] @ B_t[row_s : row_s + r_s] + bias[s]) * scaling[s] for every
    position p of a tile whose group has slot s >= 0; other rows of y are untouched. In place, fp32 accumulation.

    Shapes: y [M, d_out]; shrunk t [M, r_max] fp32 in token_order's order; lora_B_t [R_total, d_out]; lora_B_bias
    [n_slots, d_out] or None; scaling [n_slots] fp32; the rest as in `lora_shrink_sgmv`. Returns y.
    """
    M, N = y.shape
    _check_layout("lora_expand_sgmv", y, token_order, tiles)
    if lora_B_t.shape[1] != N or shrunk.shape[0] != M:
        raise ValueError(
            f"lora_expand_sgmv: y {tuple(y.shape)}, t {tuple(shrunk.shape)} and B_t {tuple(lora_B_t.shape)} don't fit."
        )
    if M == 0 or N == 0 or shrunk.shape[1] == 0 or tiles.shape[0] == 0:
        return y
    # GPU: 64 output columns per program gives d_out / 64 programs per tile (64 for d_out = 4096), enough to spread
    # a decode step's few tiles over an H100's 132 SMs. Not tuned on a GPU yet.
    block_n = 32 if _on_interpreter(y) else 64
    bias = lora_B_bias if lora_B_bias is not None else scaling
    bias_strides = (lora_B_bias.stride(0), lora_B_bias.stride(1)) if lora_B_bias is not None else (0, 0)
    _sgmv_expand_kernel[(tiles.shape[0], cdiv(N, block_n))](
        shrunk,
        lora_B_t,
        bias,
        scaling,
        y,
        token_order,
        tiles,
        group_slot,
        slot_spans,
        N,
        shrunk.stride(0),
        shrunk.stride(1),
        lora_B_t.stride(0),
        lora_B_t.stride(1),
        *bias_strides,
        y.stride(0),
        y.stride(1),
        HAS_BIAS=lora_B_bias is not None,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype or y.dtype],
        PRECISION=_precision(dot_dtype or y.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=_rank_block(shrunk.shape[1]),
    )
    return y


def lora_multi_adapter(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B_t: torch.Tensor,
    lora_B_bias: torch.Tensor | None,
    scaling: torch.Tensor,
    slot_spans: torch.Tensor,
    group_slot: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    block_m: int,
    r_max: int,
    *,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: y[i] += (x[i] @ A[s].T @ B[s].T + B_bias[s]) * scaling[s], s = group_slot[group of token i]
    (untouched when s = -1), as `lora_shrink_sgmv` then `lora_expand_sgmv`. In place; returns y.

    `r_max` is the largest rank in slot_spans, passed from the host so that no launch waits on a device read.
    `dot_dtype` defaults to x's dtype on GPU and fp32 under the interpreter.
    """
    if dot_dtype is None:
        dot_dtype = torch.float32 if _on_interpreter(x) else x.dtype
    shrunk = lora_shrink_sgmv(
        x, lora_A, slot_spans, group_slot, token_order, tiles, block_m, r_max, dot_dtype=dot_dtype
    )
    return lora_expand_sgmv(
        y,
        shrunk,
        lora_B_t,
        lora_B_bias,
        scaling,
        slot_spans,
        group_slot,
        token_order,
        tiles,
        block_m,
        dot_dtype=dot_dtype,
    )
