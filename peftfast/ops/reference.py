"""Plain-PyTorch semantics of every op: the oracle kernels are tested against, and the fallback where none runs.

Dtype rule (HF PEFT's, with `autocast_adapter_dtype`): the base output keeps its dtype; the LoRA branch runs in the
adapter weights' dtype (the input is cast to it), is added to the base output, and the sum is cast back to the
base output's dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def lora_add(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_B_bias: Sequence[torch.Tensor | None],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool,
) -> torch.Tensor:
    """Semantics: for each adapter i, result += scaling[i] * (dropout(x, p[i]) @ A[i].T @ B[i].T + B_bias[i]).

    Shapes: result [..., d_out], x [..., d_in], A[i] [r_i, d_in], B[i] [d_out, r_i], B_bias[i] [d_out] or None.
    """
    result_dtype, out_shape = result.dtype, result.shape
    # In two dimensions, the second matmul, its scaling and the sum are one addmm where the dtypes allow: one GEMM
    # with the sum in its epilogue instead of three ops and a [tokens, d_out] temporary (fewer autograd nodes too).
    flat = result.dim() != 2
    total = result.reshape(-1, out_shape[-1]) if flat else result
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    for A, B, B_bias, s, p in zip(lora_A, lora_B, lora_B_bias, scaling, dropout_p):
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        after_A = F.linear(F.dropout(x, p=p, training=training) if p > 0 else x, A)
        if B_bias is None:
            total = _add_scaled_product(total, after_A, B, s)
        else:
            total = total + F.linear(after_A, B, B_bias) * s
    if flat:
        total = total.reshape(out_shape)
    return total if total.dtype == result_dtype else total.to(result_dtype)


def _add_scaled_product(total: torch.Tensor, after_A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """total + (after_A @ B.T) * s, 2-D: one addmm where the dtypes allow (and s is a number), else the product
    scaled and added, in the dtype the sum promotes to."""
    sum_dtype = total.dtype if total.dtype == B.dtype else torch.promote_types(total.dtype, B.dtype)
    if after_A.dtype == B.dtype == sum_dtype and not isinstance(s, torch.Tensor):
        return torch.addmm(total if total.dtype == sum_dtype else total.to(sum_dtype), after_A, B.t(), alpha=s)
    return total + F.linear(after_A, B) * s


def lora_add_masked(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_B_bias: Sequence[torch.Tensor | None],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool,
    token_mask: torch.Tensor,
) -> torch.Tensor:
    """Semantics: for each adapter i, result[t] += scaling[i] * (dropout(x[t], p[i]) @ A[i].T @ B[i].T + B_bias[i])
    where token_mask[t], nothing elsewhere.

    Shapes: result [..., d_out], x [..., d_in], token_mask result.shape[:-1] bool; adapters as in `lora_add`.
    Every token goes through the adapter, with its rank-r intermediate `x @ A.T` zeroed where the mask is off (a
    `where` over [tokens, r], not over the output): no data-dependent shape, no host sync, the cost of plain LoRA. A
    masked-out token's output is exactly result's and sends no gradient through the adapter.
    """
    result_dtype, out_shape = result.dtype, result.shape
    # Two-dimensional, summed as `lora_add` sums (so that a mask that is on everywhere gives its result exactly).
    flat = result.dim() != 2
    total = result.reshape(-1, out_shape[-1]) if flat else result
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    keep = token_mask.reshape(-1, 1)
    for A, B, B_bias, s, p in zip(lora_A, lora_B, lora_B_bias, scaling, dropout_p):
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        dropped = F.dropout(x, p=p, training=training) if p > 0 else x
        after_A = torch.where(keep, F.linear(dropped, A), 0.0)
        if B_bias is None:
            total = _add_scaled_product(total, after_A, B, s)
        else:
            total = total + (F.linear(after_A, B) + torch.where(keep, B_bias, 0.0)) * s
    if flat:
        total = total.reshape(out_shape)
    return total if total.dtype == result_dtype else total.to(result_dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_B_bias: Sequence[torch.Tensor | None],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool,
) -> torch.Tensor:
    """Semantics: y = x @ W.T + b + sum_i scaling[i] * (dropout(x, p[i]) @ A[i].T @ B[i].T + B_bias[i]).

    Shapes: x [..., d_in], weight [d_out, d_in], bias [d_out] or None; adapters as in `lora_add`.
    """
    return lora_add(F.linear(x, weight, bias), x, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)


# Elements of an fp16/bf16 weight upcast to fp32 at a time by `dora_weight_norm` (8 MiB of fp32): enough rows for a
# full-speed GEMM against the rank-r adapter, never a copy of the whole weight.
_UPCAST_BLOCK_ELEMENTS = 1 << 21


def _fp32_row_blocks(weight: torch.Tensor):
    """(first row, block) over `weight` in fp32: the weight itself when it is fp32, else upcast copies of row blocks."""
    if weight.dtype == torch.float32:
        yield 0, weight
        return
    rows = max(1, _UPCAST_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start : start + rows].float()


def dora_norm_from_terms(
    weight_sq: torch.Tensor, weight_times_A: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Semantics: sqrt(max(0, weight_sq + 2 s * sum_r B[:, r] * AW[:, r] + s^2 * rowsum((B @ (A @ A.T)) * B))), fp32.

    Shapes: weight_sq [d_out]; weight_times_A AW = W @ A.T [d_out, r] fp32; lora_A [r, d_in]; lora_B [d_out, r].
    """
    A, B = lora_A.float(), lora_B.float()
    cross = (B * weight_times_A).sum(dim=1)
    quad = ((B @ (A @ A.T)) * B).sum(dim=1)
    # Cancellation can push the sum of the three terms a little below 0 where the update nearly cancels the row.
    return (weight_sq + (2 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: norm[j] = ||W[j] + s * (B @ A)[j]|| = sqrt(max(0, ||W[j]||^2 + 2 s B[j].(A W[j]^T) + s^2 B[j] (A A^T)
    B[j]^T)), DoRA's row norm, computed without forming W + s B A (one r x d_in by d_in x d_out product);
    weight_sq[j] = ||W[j]||^2, computed in the same pass when None is given. No gradient flows (DoRA's norm is a
    constant).

    Shapes: weight [d_out, d_in] (any strides and float dtype); lora_A [r, d_in]; lora_B [d_out, r]; weight_sq [d_out]
    fp32 or None. Returns (norm, weight_sq), both [d_out] fp32.

    Numerics: every term is computed in fp32 (an fp16/bf16 weight is upcast in blocks of rows, never as a whole).
    The factored form loses precision where the update cancels most of a row: its relative error is about
    eps_fp32 * ||W[j]||^2 / (2 norm[j]^2), against eps * ||W[j]|| / norm[j] for the norm of the materialised
    W + s B A (HF PEFT's way), so the two agree to fp32 rounding unless norm[j] << ||W[j]||; a row the update cancels
    exactly gets about sqrt(eps_fp32) * ||W[j]|| instead of ~eps * ||W[j]||, and never NaN (the sum is clamped at 0).
    With an fp16/bf16 weight and fp16/bf16 adapters HF PEFT forms the sum in that dtype; this is more accurate.
    """
    d_out, d_in = weight.shape
    if lora_A.shape[1] != d_in or lora_B.shape != (d_out, lora_A.shape[0]):
        raise ValueError(
            f"dora_weight_norm: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)} don't fit together."
        )
    A = lora_A.float()
    weight_times_A = torch.empty(d_out, A.shape[0], device=weight.device, dtype=torch.float32)
    squares = torch.empty(d_out, device=weight.device, dtype=torch.float32) if weight_sq is None else None
    for start, block in _fp32_row_blocks(weight):
        rows = slice(start, start + block.shape[0])
        torch.matmul(block, A.T, out=weight_times_A[rows])
        if squares is not None:
            squares[rows] = torch.linalg.vector_norm(block, dim=1).square()
    weight_sq = squares if weight_sq is None else weight_sq.float()
    return dora_norm_from_terms(weight_sq, weight_times_A, lora_A, lora_B, scaling), weight_sq


# The norm's A W^T comes out of the base GEMM as r more rows of [x; A] W^T (W read once for both) while copying x
# costs less than reading W again, T < d_out: on a shared 2-core CPU at d = 2048, T = 128, reading W a second time
# for a separate A W^T took 22 ms, the r extra rows of the GEMM next to nothing (bench/bench_dora.py measures the step).
def _fuse_norm(weight: torch.Tensor, rows: int, stacking_anyway: bool) -> bool:
    # fp32 only: an fp16/bf16 GEMM would round A W^T to that dtype, and the norm's terms must stay fp32.
    return weight.dtype == torch.float32 and (stacking_anyway or rows < weight.shape[0])


class _DoraLinear(torch.autograd.Function):
    """`dora_linear`'s forward and backward written out (the torch twin of the fused kernels). Against autograd over
    the plain composition it makes half the passes over T x d_out tensors: one buffer z per product, the rank-r term
    accumulated into it in place (addmm), the rescale and bias in one addcmul; one GEMM over [x; x_d; A] forward and
    over [dY; (g - 1) dY] backward, so W is read once each way. On a CPU those passes and reads of W are what DoRA
    costs beyond LoRA.

    Inputs: x [T, K] (base dtype), weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r], magnitude [N],
    weight_norm [N] or None (then computed here from weight_sq [N]), scaling, keep None or [T, K] (the dropout mask
    over 1 - p, adapter dtype).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, weight_sq, scaling, keep):
        rows = x.shape[0]
        promoted = torch.promote_types(weight.dtype, lora_A.dtype)
        dropped = x.to(lora_A.dtype)
        if keep is not None:
            dropped = dropped * keep
        shrunk = F.linear(dropped, lora_A)
        blocks = [x] if keep is None else [x, dropped.to(x.dtype)]
        fuse_norm = weight_norm is None and _fuse_norm(weight, rows, keep is not None)
        if fuse_norm:
            blocks.append(lora_A.to(weight.dtype))
        product = F.linear(torch.cat(blocks), weight) if len(blocks) > 1 else F.linear(x, weight)
        if fuse_norm:
            weight_norm = dora_norm_from_terms(weight_sq, product[-lora_A.shape[0] :].T, lora_A, lora_B, scaling)
        elif weight_norm is None:
            weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq)[0]
        g = magnitude.reshape(-1) / weight_norm.to(magnitude.dtype)
        if keep is None:
            z = product[:rows].to(promoted)
            y = None
        else:
            plain, z = product[:rows], product[rows : 2 * rows].to(promoted)
            # In place when the dtypes allow: y and z are then two blocks of one buffer.
            y = plain.sub_(z) if plain.dtype == promoted else plain.to(promoted) - z
        z.addmm_(shrunk.to(promoted), lora_B.to(promoted).T, alpha=scaling)
        if y is None:
            y = z * g if bias is None else torch.addcmul(bias.to(promoted), z, g)
        else:
            y.addcmul_(z, g)
            if bias is not None:
                y.add_(bias)
        ctx.save_for_backward(x, dropped, shrunk, z, g, weight_norm, weight, lora_A, lora_B, keep)
        ctx.scaling = scaling
        ctx.magnitude_shape, ctx.magnitude_dtype = magnitude.shape, magnitude.dtype
        return y.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, dropped, shrunk, z, g, weight_norm, weight, lora_A, lora_B, keep = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_A, needs_B, needs_magnitude = ctx.needs_input_grad[:6]
        scaling, promoted = ctx.scaling, z.dtype
        grad = grad_y.to(promoted)
        grad_z = grad * g
        grad_magnitude = None
        if needs_magnitude:
            grad_g = (grad * z).sum(0)
            grad_magnitude = (grad_g / weight_norm).to(ctx.magnitude_dtype).reshape(ctx.magnitude_shape)
        grad_shrunk = grad_z @ lora_B.to(promoted)
        grad_A = (grad_shrunk.T @ dropped.to(promoted)).mul_(scaling).to(lora_A.dtype) if needs_A else None
        grad_B = (grad_z.T @ shrunk.to(promoted)).mul_(scaling).to(lora_B.dtype) if needs_B else None
        grad_bias = grad_y.sum(0) if needs_bias else None
        grad_x = grad_weight = None
        adapter_grad_x = grad_shrunk @ lora_A.to(promoted) if needs_x else None
        if keep is None:
            grad_z = grad_z.to(weight.dtype)
            if needs_x:
                grad_x = grad_z @ weight
                if grad_x.dtype == promoted:
                    grad_x.add_(adapter_grad_x, alpha=scaling)
                else:
                    grad_x = grad_x + (adapter_grad_x * scaling).to(grad_x.dtype)
            if needs_weight:
                grad_weight = grad_z.T @ x
        else:
            rows = x.shape[0]
            # The gradients of x W^T and of x_d W^T, (g - 1) * dY, stacked: one GEMM with W for both.
            stacked = torch.empty(2 * rows, weight.shape[0], device=weight.device, dtype=weight.dtype)
            stacked[:rows] = grad_y
            stacked[rows:] = grad * (g - 1)
            if needs_x:
                both = stacked @ weight
                through_dropout = both[rows:].to(promoted).add_(adapter_grad_x, alpha=scaling).mul_(keep)
                grad_x = both[:rows] + through_dropout.to(both.dtype)
            if needs_weight:
                grad_weight = stacked.T @ torch.cat([x, dropped.to(x.dtype)])
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, grad_magnitude, None, None, None, None


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    training: bool,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics (one DoRA adapter on a dense layer, as HF PEFT): g = magnitude / weight_norm, the norm a constant;
    without dropout (p = 0 or not training): y = g * (x W^T + s x A^T B^T) + b; with x_d = dropout(x, p):
    y = x W^T + b + (g - 1) * x_d W^T + g * s x_d A^T B^T. weight_norm None: the norms are those of
    `dora_weight_norm(W, A, B, s, weight_sq)`, their A W^T taken from the base GEMM itself where that saves reading W
    again. With dropout, x W^T and x_d W^T are one GEMM over [x; x_d], so W is read once.

    Shapes: x [..., d_in]; weight [d_out, d_in]; bias [d_out] or None; lora_A [r, d_in]; lora_B [d_out, r];
    magnitude [d_out]; weight_norm [d_out] fp32 or None; weight_sq [d_out] fp32 (||W_j||^2; needed when weight_norm
    is None). Returns [..., d_out] in the dtype of x @ W.T; the adapter branch runs in the adapter weights' dtype.
    """
    if weight_norm is None and weight_sq is None:
        raise ValueError("dora_linear needs weight_norm, or weight_sq (||W_j||^2) to compute the norms from.")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    keep = None
    if dropout_p > 0 and training:
        # The mask F.dropout draws for x (same random stream), as a tensor: mask / (1 - p).
        keep = F.dropout(torch.ones_like(x2d, dtype=lora_A.dtype), p=dropout_p, training=True)
    weight_norm = None if weight_norm is None else weight_norm.detach()
    y = _DoraLinear.apply(x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm, weight_sq, scaling, keep)
    return y.reshape(*lead, weight.shape[0])


def dora_scale(
    result: torch.Tensor,
    lora_out: torch.Tensor | None,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    bias: torch.Tensor | None = None,
    base_dropped: torch.Tensor | None = None,
    channel_dim: int = -1,
) -> torch.Tensor:
    """Semantics: g = magnitude / weight_norm (a constant norm) along `channel_dim`; without base_dropped:
    y = g * (result - b) + b + g * lora_out; with it: y = result + (g - 1) * base_dropped + g * lora_out (lora_out
    None counts as 0). This is HF PEFT's DoRA update of any base layer's output `result`, given the adapter's term
    lora_out = s * B(A(x_d)) and, under dropout, the bias-free base output on the dropped-out input.

    Shapes: result, lora_out, base_dropped [..., C, ...] (C at channel_dim); magnitude C elements (conv magnitudes
    are [1, C, 1, ...]); weight_norm [C]; bias [C] or None. Returns result's dtype.
    """
    shape = [1] * result.dim()
    shape[channel_dim] = -1
    g = (magnitude.reshape(-1) / weight_norm.detach().to(magnitude.dtype)).view(shape)
    if base_dropped is not None:
        y = result + (g - 1) * base_dropped
        if lora_out is not None:
            y = y + g * lora_out
        return y.to(result.dtype)
    inner = result if bias is None else result - bias.view(shape)
    if lora_out is not None:
        inner = inner + lora_out
    y = g * inner
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(result.dtype)


class Nf4Weight(NamedTuple):
    """A bitsandbytes 4-bit weight W [N, K] as stored (see `nf4_dequantize`); the nested fields are None when the
    absmax is plain fp32."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    absmax_code: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: float = 0.0
    absmax_blocksize: int = 256


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    absmax_code: torch.Tensor | None = None,
    absmax_scale: torch.Tensor | None = None,
    absmax_offset: float = 0.0,
    absmax_blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Semantics (bitsandbytes' 4-bit storage, flat index i over W row-major):
    q[i] = packed_byte[i // 2] >> 4 if i is even else packed_byte[i // 2] & 15;
    scale[b] = absmax[b], or when nested: absmax_code[absmax[b]] * absmax_scale[b // absmax_blocksize] + absmax_offset;
    W[i] = dtype(code[q[i]] * scale[i // blocksize]), every product in fp32.

    Shapes: packed any shape holding ceil(numel/2) bytes (uint8, or those bytes viewed as another dtype); absmax
    [ceil(numel / blocksize)] fp32, or uint8 codes when nested; code [16] fp32; absmax_code [256] fp32; absmax_scale
    [ceil(len(absmax) / absmax_blocksize)] fp32. Returns W of `shape` in `dtype`.
    """
    numel = math.prod(shape)
    packed = packed.contiguous().view(-1).view(torch.uint8)
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:numel].long()
    if absmax_code is not None:
        groups = torch.arange(absmax.numel(), device=absmax.device) // absmax_blocksize
        # Two roundings, as bitsandbytes does (one kernel multiplies, then a separate add): never a fused multiply-add.
        scales = absmax_code.float()[absmax.long()] * absmax_scale.float()[groups]
        scales = scales + torch.as_tensor(absmax_offset, dtype=torch.float32, device=scales.device)
    else:
        scales = absmax.float()
    blocks = torch.arange(numel, device=packed.device) // blocksize
    return (code.float()[codes] * scales[blocks]).to(dtype).reshape(tuple(shape))


def lora_linear_4bit(
    x: torch.Tensor,
    weight: Nf4Weight,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_B_bias: Sequence[torch.Tensor | None],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool,
) -> torch.Tensor:
    """Semantics (bitsandbytes' Linear4bit, then HF PEFT's LoRA term), c = compute_dtype:
    base = (x.to(c) @ nf4_dequantize(*weight, dtype=c).T + bias.to(c)).to(x.dtype); y = lora_add(base, x, adapters).

    Shapes: x [..., K]; weight W [N, K] (see `Nf4Weight`); bias [N] or None; adapters as in `lora_add`.
    Returns [..., N] in x's dtype.
    """
    dense = nf4_dequantize(*weight, dtype=compute_dtype)
    bias = bias.to(compute_dtype) if bias is not None else None
    base = F.linear(x.to(compute_dtype), dense, bias).to(x.dtype)
    return lora_add(base, x, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)


class _Tiles(NamedTuple):
    """Each tile of a token layout, worked out with static shapes: the slot it runs (-1: none), the token and the
    position (in token_order) of each of its block_m rows, which of those rows are real, and the adapter rows (in
    the packed weights) of its rank dimension, with which of those are real."""

    slot: torch.Tensor  # [n_tiles] int64, clamped to >= 0 (see `live`)
    tokens: torch.Tensor  # [n_tiles, block_m] int64, clamped into [0, M)
    positions: torch.Tensor  # [n_tiles, block_m] int64
    live: torch.Tensor  # [n_tiles, block_m] bool
    rank_rows: torch.Tensor  # [n_tiles, r_max] int64, clamped into [0, R_total)
    in_rank: torch.Tensor  # [n_tiles, r_max] bool


def _tiles(
    slot_spans: torch.Tensor,
    group_slot: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    block_m: int,
    r_max: int,
    total_rows: int,
) -> _Tiles:
    group, start, end = tiles.long().unbind(1)
    if group_slot.numel() == 0:
        slot = torch.full_like(group, -1)
    else:
        slot = torch.where(group >= 0, group_slot.long()[group.clamp(min=0)], -1)
    active = slot >= 0
    slot = slot.clamp(min=0)
    positions = start[:, None] + torch.arange(block_m, device=tiles.device)
    live = active[:, None] & (positions < end[:, None])
    tokens = token_order.long()[positions.clamp(max=max(token_order.shape[0] - 1, 0))]
    first_row, rank = slot_spans.long()[slot].unbind(-1) if slot_spans.numel() else (slot, torch.zeros_like(slot))
    offsets = torch.arange(r_max, device=tiles.device)
    in_rank = active[:, None] & (offsets < rank[:, None])
    rank_rows = (first_row[:, None] + offsets).clamp(max=max(total_rows - 1, 0))
    return _Tiles(slot, tokens, positions, live, rank_rows, in_rank)


def _tile_inputs(x: torch.Tensor, lora_A: torch.Tensor, parts: _Tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tile's rows of x [n_tiles, block_m, d_in] and its adapter's A [n_tiles, r_max, d_in], zero where not
    real, in A's dtype."""
    x_tiles = x[parts.tokens].to(lora_A.dtype) * parts.live[..., None]
    A_tiles = lora_A[parts.rank_rows] * parts.in_rank[..., None]
    return x_tiles, A_tiles


def _add_tile_outputs(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    lora_B_t: torch.Tensor,
    lora_B_bias: torch.Tensor | None,
    scaling: torch.Tensor,
    parts: _Tiles,
) -> torch.Tensor:
    """y[token] += (t @ B_t[rows of the tile's slot] + B_bias[slot]) * scaling[slot] for every real row of every
    tile, t [n_tiles, block_m, r_max] zero outside the slot's rank; HF PEFT's mixed-batch rule for the sum (the term
    cast to y's dtype, then added). Rows that are not real add an exact 0."""
    B_tiles = lora_B_t[parts.rank_rows] * parts.in_rank[..., None]
    delta = torch.bmm(shrunk.to(lora_B_t.dtype), B_tiles)
    if lora_B_bias is not None:
        delta = delta + lora_B_bias[parts.slot][:, None, :]
    delta = delta * scaling[parts.slot][:, None, None] * parts.live[..., None]
    return y.index_add_(0, parts.tokens.flatten(), delta.flatten(0, 1).to(y.dtype))


def _adapter_group_spans(tiles: torch.Tensor, group_slot: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, start, end) in token_order of each group that has a slot here (a group's tiles are consecutive)."""
    spans: dict[int, list[int]] = {}
    for group, start, end in tiles.tolist():
        if group >= 0 and end > start:
            span = spans.setdefault(group, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    slots = group_slot.tolist()
    return [(slots[group], start, end) for group, (start, end) in spans.items() if slots[group] >= 0]


def _multi_adapter_by_group(
    y, x, lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, group_slot, token_order, tiles, block_m, r_max
) -> torch.Tensor:
    spans = slot_spans.tolist()
    for slot, start, end in _adapter_group_spans(tiles, group_slot):
        row, rank = spans[slot]
        tokens = token_order[start:end].long()
        bias = lora_B_bias[slot] if lora_B_bias is not None else None
        after_A = F.linear(x[tokens].to(lora_A.dtype), lora_A[row : row + rank])
        delta = F.linear(after_A, lora_B_t[row : row + rank].T, bias) * scaling[slot]
        y.index_add_(0, tokens, delta.to(y.dtype))
    return y


def lora_shrink_sgmv(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    slot_spans: torch.Tensor,
    group_slot: torch.Tensor,
    token_order: torch.Tensor,
    tiles: torch.Tensor,
    block_m: int,
    r_max: int,
) -> torch.Tensor:
    """Semantics: t[p, :r_s] = x[token_order[p]] @ A[row_s : row_s + r_s].T for every position p of a tile whose group
    has slot s >= 0 (s = group_slot[group]); every other entry of t is 0. fp32.

    Shapes: x [M, d_in]; lora_A [R_total, d_in] (slot s owns rows row_s : row_s + r_s); slot_spans [n_slots, 2] int32
    (row_s, r_s); group_slot [n_groups] int32; token_order [M] int32 (tokens grouped by adapter); tiles [n_tiles, 3]
    int32 (group, start, end) positions in token_order, group -1 = idle, end - start <= block_m.
    Returns t [M, r_max] in token_order's order.
    """
    M = x.shape[0]
    out = torch.zeros(M + 1, r_max, device=x.device, dtype=torch.float32)
    if M == 0 or r_max == 0:
        return out[:M]
    parts = _tiles(slot_spans, group_slot, token_order, tiles, block_m, r_max, lora_A.shape[0])
    x_tiles, A_tiles = _tile_inputs(x, lora_A, parts)
    shrunk = torch.bmm(x_tiles, A_tiles.transpose(1, 2)).float()
    # Rows that are not real go to a spare last row: every real position is written once, so the result is exact.
    rows = torch.where(parts.live, parts.positions, M).flatten()
    return out.index_put_((rows,), shrunk.flatten(0, 1))[:M]


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
) -> torch.Tensor:
    """Semantics: y[token_order[p]] += (t[p, :r_s] @ B_t[row_s : row_s + r_s] + B_bias[s]) * scaling[s] for every
    position p of a tile whose group has slot s >= 0; other rows of y are untouched. In place; returns y.

    Shapes: y [M, d_out]; shrunk t [M, r_max] fp32 in token_order's order; lora_B_t [R_total, d_out] (B transposed);
    lora_B_bias [n_slots, d_out] or None; scaling [n_slots] fp32; the rest as in `lora_shrink_sgmv`.
    """
    M, r_max = shrunk.shape
    if M == 0 or r_max == 0:
        return y
    parts = _tiles(slot_spans, group_slot, token_order, tiles, block_m, r_max, lora_B_t.shape[0])
    shrunk_tiles = shrunk[parts.positions.clamp(max=M - 1)] * parts.live[..., None]
    return _add_tile_outputs(y, shrunk_tiles, lora_B_t, lora_B_bias, scaling, parts)


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
) -> torch.Tensor:
    """Semantics: y[i] += (x[i] @ A[s].T @ B[s].T + B_bias[s]) * scaling[s], s = group_slot[group of token i]
    (y[i] untouched when s = -1): HF PEFT's mixed-batch LoRA term, in the adapter weights' dtype. In place; returns y.

    Shapes: y [M, d_out]; x [M, d_in]; packed adapters and token layout as in `lora_shrink_sgmv`/`lora_expand_sgmv`
    (A[s] = lora_A[row_s : row_s + r_s], B[s] = lora_B_t[row_s : row_s + r_s].T); r_max = max_s r_s.

    Two formulations of the same sum. Traced by torch.compile, and on a GPU: tile by tile as the SGMV kernels are
    (gathers and batched matmuls of shapes fixed by the layout: no data-dependent shape, no host sync, capturable in a
    CUDA graph). Eagerly on a CPU: one gather, two matmuls and a scatter-add per adapter group, the group spans read
    on the host as HF PEFT's loop does; there the static form's padding (every tile of the bound computed, used or
    not) costs several times what a host read does (bench/bench_multi_adapter.py, CPU mode).
    """
    if x.shape[0] == 0 or r_max == 0:
        return y
    args = (y, x, lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, group_slot, token_order, tiles, block_m, r_max)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _multi_adapter_by_group(*args)
    return _multi_adapter_by_tile(*args)


def _multi_adapter_by_tile(
    y, x, lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, group_slot, token_order, tiles, block_m, r_max
) -> torch.Tensor:
    parts = _tiles(slot_spans, group_slot, token_order, tiles, block_m, r_max, lora_A.shape[0])
    x_tiles, A_tiles = _tile_inputs(x, lora_A, parts)
    return _add_tile_outputs(y, torch.bmm(x_tiles, A_tiles.transpose(1, 2)), lora_B_t, lora_B_bias, scaling, parts)


def embedding_with_replaced_rows(
    ids: torch.Tensor,
    weight: torch.Tensor,
    token_indices: torch.Tensor,
    token_slots: torch.Tensor,
    rows: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """Semantics: F.embedding(ids, W2, ...) with W2 = W except W2[token_indices[j]] = rows[j] (rows cast to W's dtype).

    Shapes: ids [...] int; weight W [V, d]; token_indices [k] int64; token_slots [V] int64, token_slots[
    token_indices[j]] = j and -1 for every other row; rows [k, d]. Returns [..., d] in W's dtype. Gradients reach
    `rows` (and W's other rows) exactly as through W2; W2 itself is never built unless `max_norm`,
    `scale_grad_by_freq` or `sparse` ask for the whole table.
    """
    rows = rows.to(weight.dtype)
    if max_norm is not None or scale_grad_by_freq or sparse:
        # These act on the table as a whole (renormalising the looked-up rows in place, scaling each row's gradient by
        # its count in the batch): look up in the merged table, as HF PEFT does on every call.
        merged = weight.index_copy(0, token_indices, rows)
        return F.embedding(ids, merged, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    result = F.embedding(ids, weight, padding_idx)
    slots = token_slots[ids]
    replaced = slots >= 0
    looked_up = F.embedding(slots.clamp(min=0), rows)
    if padding_idx is not None:
        # A lookup of padding_idx passes no gradient to its row, whichever table the row comes from.
        looked_up = torch.where((ids == padding_idx).unsqueeze(-1), looked_up.detach(), looked_up)
    return torch.where(replaced.unsqueeze(-1), looked_up, result)


def linear_with_replaced_rows(
    x: torch.Tensor, weight: torch.Tensor, token_indices: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Semantics: y = x @ W2.T with W2 = W except W2[token_indices[j]] = rows[j] (rows cast to W's dtype), no bias.

    Shapes: x [..., d]; weight W [V, d]; token_indices [k] int64; rows [k, d]. Returns [..., V]. W2 is never built:
    the k replaced output columns are computed apart and written over the base product.
    """
    result = F.linear(x, weight)
    # In place on a fresh product that autograd does not keep: an out-of-place copy would cost a [..., V] tensor.
    return result.index_copy_(-1, token_indices, F.linear(x, rows.to(weight.dtype)))


def group_sizes(offsets: torch.Tensor, num_rows: int) -> list[int]:
    """Rows per group from cumulative group ends `offsets` [E] (`torch.nn.functional.grouped_mm`'s `offs`), checked
    to be non-decreasing and to end at `num_rows`. One device-to-host copy."""
    ends = offsets.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    if any(size < 0 for size in sizes) or (ends[-1] if ends else 0) != num_rows:
        raise ValueError(
            f"Group offsets {ends} must be non-decreasing cumulative row counts ending at the {num_rows} rows of x."
        )
    return sizes


class _MoeLoraLinear(torch.autograd.Function):
    """`moe_lora_linear` with one GEMM (plus one per adapter) per expert on its own rows, written into preallocated
    outputs, and a backward that does the same for dX, dA, dB (and dW, dbias when they require grad): no
    per-expert autograd nodes, concatenations or gradient copies, which cost as much as the low-rank GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, transposed, scaling, *factors):
        num_adapters = len(scaling)
        # Contiguous per-expert factors: HF PEFT's B layout interleaves the experts' columns (expert e owns columns
        # e, e + E, ...), and a BLAS call on such a strided slice copies it on every use; one copy of B here is less.
        lora_A = [A.contiguous() for A in factors[:num_adapters]]
        lora_B = [B.contiguous() for B in factors[num_adapters:]]
        out_features = weight.shape[2] if transposed else weight.shape[1]
        y = x.new_empty(x.shape[0], out_features, dtype=torch.promote_types(x.dtype, weight.dtype))
        shrunk = [x.new_empty(x.shape[0], A.shape[1], dtype=A.dtype) for A in lora_A]
        for e, (start, end) in enumerate(_group_spans(sizes)):
            if start == end:
                continue
            x_e, y_e = x[start:end], y[start:end]
            w_e = weight[e] if transposed else weight[e].T
            if bias is None:
                torch.mm(x_e, w_e, out=y_e)
            else:
                torch.addmm(bias[e], x_e, w_e, out=y_e)
            # The low-rank terms in the adapters' dtype, added to the base output in that dtype, then cast back once.
            acc = y_e
            for A, B, t, s in zip(lora_A, lora_B, shrunk, scaling):
                torch.mm(x_e.to(A.dtype), A[e].T, out=t[start:end])
                acc = acc.to(t.dtype) if acc.dtype != t.dtype else acc
                acc.addmm_(t[start:end], B[e].T, alpha=s)
            if acc is not y_e:
                y_e.copy_(acc)
        ctx.save_for_backward(x, weight, *lora_A, *lora_B, *shrunk)
        ctx.sizes, ctx.transposed, ctx.scaling, ctx.has_bias = sizes, transposed, scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *saved = ctx.saved_tensors
        n = len(ctx.scaling)
        lora_A, lora_B, shrunk = saved[:n], saved[n : 2 * n], saved[2 * n :]
        needs_x, needs_w, needs_bias = ctx.needs_input_grad[:3]
        needs_factors = ctx.needs_input_grad[6:]
        grad_y = grad_y.contiguous()
        # The groups cover every row of x; only the per-expert gradients of experts without rows stay zero.
        grad_x = torch.empty_like(x) if needs_x else None
        grad_w = torch.empty_like(weight) if needs_w else None
        grad_bias = grad_y.new_empty(weight.shape[0], grad_y.shape[1]) if needs_bias else None
        grad_A = [torch.empty_like(A) for A in lora_A]
        grad_B = [torch.empty_like(B) for B in lora_B]
        for e, (start, end) in enumerate(_group_spans(ctx.sizes)):
            if start == end:
                for grad in (grad_w, grad_bias, *grad_A, *grad_B):
                    if grad is not None:
                        grad[e].zero_()
                continue
            dy_e, x_e = grad_y[start:end], x[start:end]
            if needs_x:
                torch.mm(dy_e, weight[e].T if ctx.transposed else weight[e], out=grad_x[start:end])
            if needs_w:
                if ctx.transposed:
                    torch.mm(x_e.T, dy_e, out=grad_w[e])
                else:
                    torch.mm(dy_e.T, x_e, out=grad_w[e])
            if needs_bias:
                torch.sum(dy_e, dim=0, out=grad_bias[e])
            for A, B, t, s, dA, dB in zip(lora_A, lora_B, shrunk, ctx.scaling, grad_A, grad_B):
                dy_l = dy_e.to(A.dtype)
                # beta=0 ignores the (uninitialised) input: these are s * (product), written once.
                grad_t = torch.addmm(t[start:end], dy_l, B[e], beta=0, alpha=s)
                torch.addmm(dB[e], dy_l.T, t[start:end], beta=0, alpha=s, out=dB[e])
                torch.mm(grad_t.T, x_e.to(A.dtype), out=dA[e])
                if needs_x and grad_x.dtype == grad_t.dtype:
                    grad_x[start:end].addmm_(grad_t, A[e])
                elif needs_x:
                    grad_x[start:end] += (grad_t @ A[e]).to(grad_x.dtype)
        grads_factors = [g if needed else None for g, needed in zip([*grad_A, *grad_B], needs_factors)]
        return grad_x, grad_w, grad_bias, None, None, None, *grads_factors


def _group_spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(sizes))
    return list(zip([0, *ends[:-1]], ends))


def moe_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scaling: Sequence[float],
    transposed: bool,
) -> torch.Tensor:
    """Semantics: for each group (expert) e, with rows g = offsets[e-1]:offsets[e] (from 0 for e = 0):
    y[g] = x[g] @ W_e.T + bias[e] + sum_i scaling[i] * x[g] @ A_i[e].T @ B_i[e].T, W_e = weight[e] ([out, in]), or
    weight[e].T when `transposed` (weight [E, in, out]). The low-rank terms run in the adapter weights' dtype.

    Shapes: x [S, in], rows sorted by group; weight [E, out, in] ([E, in, out] when transposed); bias [E, out] or None;
    offsets [E] int, cumulative ends, offsets[E-1] = S; A_i [E, r_i, in]; B_i [E, out, r_i]. Returns [S, out] in the
    dtype of x @ W_e.T.

    One GEMM pair per expert on its own rows: nothing of size E x in x out is built.
    """
    sizes = group_sizes(offsets, x.shape[0])
    if len(lora_A) != len(lora_B) or len(lora_A) != len(scaling):
        raise ValueError(f"Got {len(lora_A)} A, {len(lora_B)} B factors and {len(scaling)} scalings; pass one each.")
    return _MoeLoraLinear.apply(x, weight, bias, sizes, transposed, tuple(scaling), *lora_A, *lora_B)


_U32 = 0xFFFFFFFF


def _mul_u32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2^32 for h in [0, 2^32), in int64 without overflow: the constant in 16-bit halves."""
    low, high = constant & 0xFFFF, constant >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & _U32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul_u32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul_u32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keep_mask(M: int, K: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Semantics: keep[m, k] = rand(seed, m * K + k) >= p, bit for bit the mask of the kernels' dropout hash
    (`kernels.lora_linear._keep`: a Weyl step, then murmur3's finalizer, its top 24 bits as a uniform in [0, 1)).

    Shapes: seed a 1-element int64 tensor; returns a bool tensor [M, K] on its device. uint32 arithmetic is done in
    int64, masked to 32 bits."""
    seed = seed.reshape(()).to(torch.int64)
    low, high = seed & _U32, (seed >> 32) & _U32
    key = _mix32(low ^ _mix32((high + 0x9E3779B9) & _U32))
    offsets = torch.arange(M * K, device=seed.device, dtype=torch.int64)
    hashed = _mix32((_mul_u32(offsets, 0x9E3779B1) + key) & _U32)
    uniform = (hashed >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return (uniform >= torch.tensor(p, dtype=torch.float32)).reshape(M, K)
