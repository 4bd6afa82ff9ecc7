"""The Triton `moe_lora_linear`: the grouped base product in torch, the experts' LoRA terms on the grouped kernels of
`kernels/moe_lora.py`, with autograd, as torch custom ops (shape-only fakes for torch.compile).

`peftfast::moe_lora_add_fwd` returns y = base + sum_i s_i * (x A_i[e]^T) B_i[e]^T and the rank-r intermediates
t_i = x A_i[e]^T (fp32, saved for backward); `peftfast::moe_lora_add_bwd` returns the x-gradient of the LoRA terms,
dA_i and dB_i, from dY:
    dt_i = s_i * dY B_i[e]      dB_i[e] = s_i * dY[g]^T t_i[g]      dA_i[e] = dt_i[g]^T x[g]      dx += dt_i A_i[e]
The gradient of `base` is dY itself; the base product (and its own gradients) is plain torch autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import autograd, reference


def _block_m(x: torch.Tensor) -> int:
    from ..kernels import moe_lora as kernels

    return kernels.tile_rows(x.dtype, interpreting=x.device.type == "cpu")


@torch.library.custom_op("peftfast::moe_lora_add_fwd", mutates_args=())
def moe_lora_add_fwd(
    base: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scaling: list[float],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from ..kernels import moe_lora as kernels

    block_m = _block_m(x)
    tiles = kernels.group_tiles(offsets, x.shape[0], block_m)
    dot_dtype = autograd._dot_dtype(x)
    # The tiles cover every row (offsets end at S), so the first expand writes all of `out` from `base`; later
    # adapters add into it in place.
    out = torch.empty_like(base)
    shrunk = []
    for index, (A, B, s) in enumerate(zip(lora_A, lora_B, scaling)):
        t = kernels.grouped_matmul(x, A.transpose(1, 2), tiles, block_m, dot_dtype=dot_dtype)
        previous = base if index == 0 else out
        kernels.grouped_matmul(
            t, B.transpose(1, 2), tiles, block_m, scale=s, base=previous, out=out, dot_dtype=dot_dtype
        )
        shrunk.append(t)
    return out, shrunk


@moe_lora_add_fwd.register_fake
def _(base, x, offsets, lora_A, lora_B, scaling):
    return torch.empty_like(base), [x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32) for A in lora_A]


@torch.library.custom_op("peftfast::moe_lora_add_bwd", mutates_args=())
def moe_lora_add_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    shrunk: list[torch.Tensor],
    scaling: list[float],
    needs_input_grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    from ..kernels import moe_lora as kernels

    block_m = _block_m(x)
    tiles = kernels.group_tiles(offsets, x.shape[0], block_m)
    dot_dtype = autograd._dot_dtype(x)
    grad_x = torch.zeros_like(x) if needs_input_grad else x.new_empty(0)
    grad_A, grad_B = [], []
    for A, B, t, s in zip(lora_A, lora_B, shrunk, scaling):
        grad_t = kernels.grouped_matmul(grad_out, B, tiles, block_m, scale=s, dot_dtype=dot_dtype)
        # empty_like keeps the strides of A and B (views of HF PEFT's [E*r, in] / [out, r*E] weights), so the
        # gradients land in the weights' own layout.
        grad_B.append(
            kernels.grouped_outer(grad_out, t, offsets, scale=s, out=torch.empty_like(B), dot_dtype=dot_dtype)
        )
        grad_A.append(kernels.grouped_outer(grad_t, x, offsets, out=torch.empty_like(A), dot_dtype=dot_dtype))
        if needs_input_grad:
            kernels.grouped_matmul(grad_t, A, tiles, block_m, base=grad_x, out=grad_x, dot_dtype=dot_dtype)
    return grad_x, grad_A, grad_B


@moe_lora_add_bwd.register_fake
def _(grad_out, x, offsets, lora_A, lora_B, shrunk, scaling, needs_input_grad):
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    return grad_x, [torch.empty_like(A) for A in lora_A], [torch.empty_like(B) for B in lora_B]


def _setup_context(ctx, inputs, output) -> None:
    base, x, offsets, lora_A, lora_B, scaling = inputs
    ctx.save_for_backward(x, offsets, *lora_A, *lora_B, *output[1])
    ctx.num_adapters = len(lora_A)
    ctx.scaling = list(scaling)


def _backward(ctx, grad_out, grad_shrunk):
    x, offsets, *saved = ctx.saved_tensors
    n = ctx.num_adapters
    lora_A, lora_B, shrunk = saved[:n], saved[n : 2 * n], saved[2 * n :]
    grad_x, grad_A, grad_B = moe_lora_add_bwd(
        grad_out.contiguous(), x, offsets, lora_A, lora_B, shrunk, ctx.scaling, ctx.needs_input_grad[1]
    )
    return grad_out, grad_x if ctx.needs_input_grad[1] else None, None, grad_A, grad_B, None


moe_lora_add_fwd.register_autograd(_backward, setup_context=_setup_context)


def can_run_moe_lora_linear(x, weight, bias, offsets, lora_A, lora_B, *args, **kwargs) -> bool:
    """Whether the Triton kernels serve this call: GPU tensors (or CPU ones under TRITON_INTERPRET=1) on one device,
    float activations, adapters in fp32 or the activation dtype, int32 offsets."""
    on_device = x.is_cuda or (x.device.type == "cpu" and autograd._interpreting())
    if not on_device or not lora_A or x.dtype not in autograd._FP_DTYPES or offsets.dtype != torch.int32:
        return False
    tensors = [weight, offsets, *lora_A, *lora_B] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in (torch.float32, x.dtype) for t in (*lora_A, *lora_B)):
        return False
    return x.numel() < 2**31 and autograd.triton_available()


def _grouped_base(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """x[g] @ W_e.T + bias[e] per group: torch's grouped GEMM where it runs (bf16 on a GPU: one launch, no host
    sync), else one GEMM per expert (the reference)."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None or not x.is_cuda or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return reference.moe_lora_linear(x, weight, bias, offsets, [], [], [], transposed)
    y = grouped_mm(x, weight if transposed else weight.transpose(1, 2), offs=offsets)
    if bias is not None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        experts = torch.repeat_interleave(torch.arange(len(offsets), device=x.device), counts, output_size=x.shape[0])
        y = y + bias[experts]
    return y


def moe_lora_linear_triton(x, weight, bias, offsets, lora_A, lora_B, scaling, transposed):
    """The Triton `moe_lora_linear`: same semantics and arguments as `reference.moe_lora_linear`."""
    base = _grouped_base(x, weight, bias, offsets, transposed)
    if x.shape[0] == 0:
        return base
    y, _ = moe_lora_add_fwd(base, x, offsets, list(lora_A), list(lora_B), [float(s) for s in scaling])
    return y
