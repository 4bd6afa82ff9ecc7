"""One public entry per op. Each picks its backend per call (see `dispatch`); `reference` holds the torch twins.

Layers call these and never look at devices or backends themselves. `last_backend()` tells which backend the
latest call of an op ran on, for debugging and layer status.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import autograd, dispatch, multi_adapter, reference
from .dispatch import available_backends, get_backend, set_backend, use_backend

dispatch.register("lora_linear", "torch", reference.lora_linear)
dispatch.register("lora_add", "torch", reference.lora_add)
dispatch.register("lora_add_masked", "torch", reference.lora_add_masked)
# `autograd` imports Triton only when a kernel runs, so `import peftfast` works without it.
dispatch.register(
    "lora_linear",
    "triton",
    autograd.lora_linear_triton,
    can_serve=autograd.can_run_lora_linear,
    signature=autograd.lora_linear_signature,
)

_last_backend: dict[str, str] = {}


def last_backend(op: str) -> str | None:
    return _last_backend.get(op)


def _record(op: str, backend: str) -> None:
    # Not while torch.compile traces: a graph would guard on this dict's contents and recompile whenever an eager
    # call elsewhere changes them.
    if not torch.compiler.is_compiling():
        _last_backend[op] = backend


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

    Shapes: x [..., d_in]; weight [d_out, d_in]; bias [d_out] or None; A[i] [r_i, d_in]; B[i] [d_out, r_i];
    B_bias[i] [d_out] or None. Returns [..., d_out] in the dtype of `x @ W.T`.
    """
    backend, implementation = dispatch.resolve("lora_linear", x, weight, bias, lora_A, lora_B, lora_B_bias)
    _record("lora_linear", backend)
    return implementation(x, weight, bias, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)


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
    """Semantics: result + sum_i scaling[i] * (dropout(x, p[i]) @ A[i].T @ B[i].T + B_bias[i]), for any base layer.

    Shapes: result [..., d_out]; x [..., d_in]; adapters as in `lora_linear`. Returns result's dtype.
    """
    backend, implementation = dispatch.resolve("lora_add", result, x, lora_A, lora_B)
    _record("lora_add", backend)
    return implementation(result, x, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)


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
    """Semantics: result[t] + (sum_i scaling[i] * (dropout(x[t], p[i]) @ A[i].T @ B[i].T + B_bias[i]) if
    token_mask[t] else 0), for every token t (aLoRA: the adapters act from each row's invocation sequence on).

    Shapes: result [..., d_out]; x [..., d_in]; token_mask result.shape[:-1] bool; adapters as in `lora_linear`.
    Returns result's dtype. No host sync and no data-dependent shape, whatever the mask holds.
    """
    backend, implementation = dispatch.resolve("lora_add_masked", result, x, lora_A, lora_B, token_mask)
    _record("lora_add_masked", backend)
    return implementation(result, x, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training, token_mask)


dispatch.register("lora_multi_adapter", "torch", reference.lora_multi_adapter)
dispatch.register(
    "lora_multi_adapter",
    "triton",
    multi_adapter.lora_multi_adapter_triton,
    can_serve=multi_adapter.can_run,
    signature=multi_adapter.signature,
)


def multi_adapter_bank_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype `lora_multi_adapter` wants packed adapter weights in for activations `x`: x's half-precision dtype
    where the triton kernels will serve on a GPU (they multiply in it, so half-precision copies give the same products
    from half the bytes); None elsewhere (keep the adapters' dtype, HF PEFT's for the LoRA branch)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16) or get_backend() not in ("auto", "triton"):
        return None
    return x.dtype if autograd.triton_available() else None


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
    (y[i] untouched when s = -1). In place; returns y. Inference only (no autograd).

    Shapes: y [M, d_out]; x [M, d_in]; adapters packed row-wise without padding: lora_A [R_total, d_in], lora_B_t
    [R_total, d_out] (B transposed), slot s owning rows slot_spans[s] = (row_s, r_s) int32 [n_slots, 2]; lora_B_bias
    [n_slots, d_out] or None; scaling [n_slots] fp32; group_slot [n_groups] int32 (-1: no adapter in this layer);
    token_order [M] int32, tokens grouped by adapter group; tiles [n_tiles, 3] int32 (group, start, end) positions
    in token_order, at most block_m long, group -1 = idle; r_max = max_s r_s. See `peftfast.utils.mixed_batch`.
    """
    backend, implementation = dispatch.resolve("lora_multi_adapter", y, x, lora_A, lora_B_t, lora_B_bias, scaling)
    _record("lora_multi_adapter", backend)
    return implementation(
        y, x, lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, group_slot, token_order, tiles, block_m, r_max
    )


__all__ = [
    "available_backends",
    "get_backend",
    "last_backend",
    "lora_add",
    "lora_add_masked",
    "lora_linear",
    "lora_multi_adapter",
    "multi_adapter_bank_dtype",
    "reference",
    "set_backend",
    "use_backend",
]


# 4-bit (bitsandbytes NF4/FP4) weights. `nf4` imports Triton only when a kernel runs.
from . import nf4 as _nf4  # noqa: E402

dispatch.register("nf4_dequantize", "torch", reference.nf4_dequantize)
dispatch.register("nf4_dequantize", "triton", _nf4.nf4_dequantize_triton, can_serve=_nf4.can_run_nf4_dequantize)
dispatch.register("lora_linear_4bit", "torch", reference.lora_linear_4bit)
dispatch.register(
    "lora_linear_4bit",
    "triton",
    _nf4.lora_linear_4bit_triton,
    can_serve=_nf4.can_run_lora_linear_4bit,
    signature=_nf4.lora_linear_4bit_signature,
)


def nf4_dequantize(weight: torch.Tensor, quant_state: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Semantics: W = bitsandbytes.functional.dequantize_4bit(weight, quant_state).to(dtype), bit for bit (see
    `reference.nf4_dequantize` for the storage read). A weight in bitsandbytes' CPU-packed inference layout is
    dequantized by bitsandbytes itself (backend "bitsandbytes").

    Shapes: weight the packed `Params4bit` data [(N*K + 1) // 2, 1] (uint8, or its bytes as quant_storage);
    quant_state a bitsandbytes `QuantState` with shape (N, K). Returns W [N, K] in `dtype` (default quant_state.dtype).
    """
    if _nf4.is_cpu_packed(quant_state):
        _record("nf4_dequantize", "bitsandbytes")
        dense = _nf4.dequantize_with_bitsandbytes(weight, quant_state)
        return dense.to(dtype) if dtype is not None else dense
    stored = _nf4.read_quant_state(weight, quant_state)
    backend, implementation = dispatch.resolve("nf4_dequantize", stored.packed, stored.absmax)
    _record("nf4_dequantize", backend)
    return implementation(*stored, dtype=dtype or quant_state.dtype)


def lora_linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    quant_state: object,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    lora_B_bias: Sequence[torch.Tensor | None],
    scaling: Sequence[float],
    dropout_p: Sequence[float],
    training: bool,
) -> torch.Tensor:
    """Semantics: base = (x.to(c) @ dequantize_4bit(weight, quant_state).to(c).T + bias.to(c)).to(x.dtype), with
    c = compute_dtype (bitsandbytes' Linear4bit); y = base + sum_i scaling[i] * (dropout(x, p[i]) @ A[i].T @ B[i].T
    + B_bias[i]) (HF PEFT's LoRA term).

    Shapes: x [..., K]; weight and quant_state as in `nf4_dequantize` (W [N, K], not CPU-packed); bias [N] or None;
    A[i] [r_i, K]; B[i] [N, r_i]; B_bias[i] [N] or None. Returns [..., N] in x's dtype.
    """
    stored = _nf4.read_quant_state(weight, quant_state)
    backend, implementation = dispatch.resolve(
        "lora_linear_4bit", x, stored, bias, compute_dtype, lora_A, lora_B, lora_B_bias
    )
    _record("lora_linear_4bit", backend)
    return implementation(x, stored, bias, compute_dtype, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)


__all__ += ["lora_linear_4bit", "nf4_dequantize"]


# Trainable tokens: embedding rows replaced by trained ones without building the merged table.
dispatch.register("embedding_with_replaced_rows", "torch", reference.embedding_with_replaced_rows)
dispatch.register("linear_with_replaced_rows", "torch", reference.linear_with_replaced_rows)


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

    Shapes: ids [...] int; weight W [V, d]; token_indices [k] int64; token_slots [V] int64 (token_slots[
    token_indices[j]] = j, -1 elsewhere); rows [k, d]. Returns [..., d] in W's dtype.
    """
    backend, implementation = dispatch.resolve("embedding_with_replaced_rows", ids, weight, rows)
    _record("embedding_with_replaced_rows", backend)
    return implementation(
        ids, weight, token_indices, token_slots, rows, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
    )


def linear_with_replaced_rows(
    x: torch.Tensor, weight: torch.Tensor, token_indices: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Semantics: y = x @ W2.T with W2 = W except W2[token_indices[j]] = rows[j] (rows cast to W's dtype), no bias.

    Shapes: x [..., d]; weight W [V, d]; token_indices [k] int64; rows [k, d]. Returns [..., V].
    """
    backend, implementation = dispatch.resolve("linear_with_replaced_rows", x, weight, rows)
    _record("linear_with_replaced_rows", backend)
    return implementation(x, weight, token_indices, rows)


__all__ += ["embedding_with_replaced_rows", "linear_with_replaced_rows"]


# LoRA on mixture-of-experts weights. `moe_lora` imports Triton only when a kernel runs.
from . import moe_lora as _moe_lora  # noqa: E402

dispatch.register("moe_lora_linear", "torch", _moe_lora.moe_lora_linear_torch)
dispatch.register(
    "moe_lora_linear", "triton", _moe_lora.moe_lora_linear_triton, can_serve=_moe_lora.can_run_moe_lora_linear
)


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
    """Semantics: y[g] = x[g] @ W_e.T + bias[e] + sum_i scaling[i] * x[g] @ A_i[e].T @ B_i[e].T for the rows
    g = offsets[e-1]:offsets[e] of each expert e, W_e = weight[e], or weight[e].T when `transposed`.

    Shapes: x [S, in], rows sorted by expert; weight [E, out, in] ([E, in, out] when transposed); bias [E, out] or
    None; offsets [E] int32, cumulative row counts (grouped_mm's `offs`), offsets[E-1] = S; A_i [E, r_i, in];
    B_i [E, out, r_i] (any strides). Returns [S, out] in the dtype of x @ W_e.T; the low-rank terms run in the adapter
    weights' dtype. Nothing of size E x in x out is formed.
    """
    backend, implementation = dispatch.resolve("moe_lora_linear", x, weight, bias, offsets, lora_A, lora_B)
    _record("moe_lora_linear", backend)
    return implementation(x, weight, bias, offsets, lora_A, lora_B, scaling, transposed)


__all__ += ["moe_lora_linear"]


# DoRA. `dora` imports Triton only when a kernel runs.
from . import dora as _dora  # noqa: E402

dispatch.register("dora_weight_norm", "torch", reference.dora_weight_norm)
dispatch.register("dora_weight_norm", "triton", _dora.dora_weight_norm_triton, can_serve=_dora.can_run_dora_weight_norm)
dispatch.register("dora_linear", "torch", reference.dora_linear)
dispatch.register("dora_linear", "triton", _dora.dora_linear_triton, can_serve=_dora.can_run_dora_linear)
dispatch.register("dora_scale", "torch", reference.dora_scale)


def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: norm[j] = ||W[j] + s * (B @ A)[j]|| = sqrt(max(0, ||W[j]||^2 + 2 s B[j].(A W[j]^T) + s^2 B[j] (A A^T)
    B[j]^T)), without forming W + s B A; weight_sq[j] = ||W[j]||^2 (computed in the same pass when None). No gradient
    flows. Every term in fp32; see `reference.dora_weight_norm` for where the factored form loses precision.

    Shapes: weight [d_out, d_in]; lora_A [r, d_in]; lora_B [d_out, r]; weight_sq [d_out] fp32 or None. Returns
    (norm, weight_sq), both [d_out] fp32.
    """
    backend, implementation = dispatch.resolve("dora_weight_norm", weight, lora_A, lora_B, scaling, weight_sq)
    _record("dora_weight_norm", backend)
    return implementation(weight, lora_A, lora_B, scaling, weight_sq)


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
    """Semantics: g = magnitude / weight_norm (a constant norm); y = g * (x W^T + s x A^T B^T) + b without dropout
    (p = 0 or not training), y = x W^T + b + (g - 1) * x_d W^T + g * s x_d A^T B^T with x_d = dropout(x, p).
    weight_norm None: the norms of `dora_weight_norm(W, A, B, s, weight_sq)`, computed in the same call.

    Shapes: x [..., d_in]; weight [d_out, d_in]; bias [d_out] or None; lora_A [r, d_in]; lora_B [d_out, r];
    magnitude [d_out]; weight_norm [d_out] fp32 or None; weight_sq [d_out] fp32 (||W_j||^2) or None. Returns
    [..., d_out] in the dtype of x @ W.T.
    """
    backend, implementation = dispatch.resolve("dora_linear", x, weight, bias, lora_A, lora_B, magnitude, weight_norm)
    _record("dora_linear", backend)
    return implementation(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, training, weight_sq
    )


def dora_scale(
    result: torch.Tensor,
    lora_out: torch.Tensor | None,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    bias: torch.Tensor | None = None,
    base_dropped: torch.Tensor | None = None,
    channel_dim: int = -1,
) -> torch.Tensor:
    """Semantics: g = magnitude / weight_norm along channel_dim; y = g * (result - b) + b + g * lora_out, or with
    base_dropped (the bias-free base output on the dropped-out input) y = result + (g - 1) * base_dropped +
    g * lora_out: HF PEFT's DoRA update of any base layer's output.

    Shapes: result, lora_out, base_dropped [..., C, ...] (C at channel_dim); magnitude C elements; weight_norm [C];
    bias [C] or None. Returns result's dtype.
    """
    backend, implementation = dispatch.resolve("dora_scale", result)
    _record("dora_scale", backend)
    return implementation(result, lora_out, magnitude, weight_norm, bias, base_dropped, channel_dim)


__all__ += ["dora_linear", "dora_scale", "dora_weight_norm"]
