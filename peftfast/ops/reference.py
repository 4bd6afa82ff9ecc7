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
    result_dtype = result.dtype
    for A, B, B_bias, s, p in zip(lora_A, lora_B, lora_B_bias, scaling, dropout_p):
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        dropped = F.dropout(x, p=p, training=training) if p > 0 else x
        result = result + F.linear(F.linear(dropped, A), B, B_bias) * s
    return result if result.dtype == result_dtype else result.to(result_dtype)


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
    result_dtype = result.dtype
    keep = token_mask.unsqueeze(-1)
    for A, B, B_bias, s, p in zip(lora_A, lora_B, lora_B_bias, scaling, dropout_p):
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        dropped = F.dropout(x, p=p, training=training) if p > 0 else x
        delta = F.linear(torch.where(keep, F.linear(dropped, A), 0.0), B)
        if B_bias is not None:
            delta = delta + torch.where(keep, B_bias, 0.0)
        result = result + delta * s
    return result if result.dtype == result_dtype else result.to(result_dtype)


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


def _tile_groups(tiles: torch.Tensor, group_slot: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, start, end) of each group served in this layer; a group's tiles are consecutive in token order."""
    spans: dict[int, list[int]] = {}
    for group, start, end in tiles.tolist():
        if group >= 0 and end > start:
            span = spans.setdefault(group, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    slots = group_slot.tolist()
    return [(slots[group], start, end) for group, (start, end) in spans.items() if slots[group] >= 0]


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
    out = torch.zeros(x.shape[0], r_max, device=x.device, dtype=torch.float32)
    spans = slot_spans.tolist()
    for slot, start, end in _tile_groups(tiles, group_slot):
        row, rank = spans[slot]
        tokens = token_order[start:end].long()
        out[start:end, :rank] = F.linear(x[tokens].to(lora_A.dtype), lora_A[row : row + rank]).float()
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
) -> torch.Tensor:
    """Semantics: y[token_order[p]] += (t[p, :r_s] @ B_t[row_s : row_s + r_s] + B_bias[s]) * scaling[s] for every
    position p of a tile whose group has slot s >= 0; other rows of y are untouched. In place; returns y.

    Shapes: y [M, d_out]; shrunk t [M, r_max] fp32 in token_order's order; lora_B_t [R_total, d_out] (B transposed);
    lora_B_bias [n_slots, d_out] or None; scaling [n_slots] fp32; the rest as in `lora_shrink_sgmv`.
    """
    spans = slot_spans.tolist()
    for slot, start, end in _tile_groups(tiles, group_slot):
        row, rank = spans[slot]
        tokens = token_order[start:end].long()
        bias = lora_B_bias[slot] if lora_B_bias is not None else None
        delta = F.linear(shrunk[start:end, :rank].to(lora_B_t.dtype), lora_B_t[row : row + rank].T, bias)
        y[tokens] = (y[tokens] + delta * scaling[slot].item()).to(y.dtype)
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
) -> torch.Tensor:
    """Semantics: y[i] += (x[i] @ A[s].T @ B[s].T + B_bias[s]) * scaling[s], s = group_slot[group of token i]
    (y[i] untouched when s = -1): HF PEFT's mixed-batch LoRA term, in the adapter weights' dtype. In place; returns y.

    Shapes: y [M, d_out]; x [M, d_in]; packed adapters and token layout as in `lora_shrink_sgmv`/`lora_expand_sgmv`
    (A[s] = lora_A[row_s : row_s + r_s], B[s] = lora_B_t[row_s : row_s + r_s].T); r_max = max_s r_s.
    """
    spans = slot_spans.tolist()
    for slot, start, end in _tile_groups(tiles, group_slot):
        row, rank = spans[slot]
        tokens = token_order[start:end].long()
        bias = lora_B_bias[slot] if lora_B_bias is not None else None
        after_A = F.linear(x[tokens].to(lora_A.dtype), lora_A[row : row + rank])
        delta = F.linear(after_A, lora_B_t[row : row + rank].T, bias) * scaling[slot].item()
        y[tokens] = (y[tokens] + delta).to(y.dtype)
    return y


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
