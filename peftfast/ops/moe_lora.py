"""The Triton `moe_lora_linear`: the grouped base product in torch, the experts' LoRA terms on the grouped kernels of
`kernels/moe_lora.py`, with autograd, as torch custom ops (shape-only fakes for torch.compile).

`peftfast::moe_lora_add_fwd` returns y = base + sum_i s_i * (x A_i[e]^T) B_i[e]^T and the rank-r intermediates
t_i = x A_i[e]^T (fp32, saved for backward); `peftfast::moe_lora_add_bwd` returns the x-gradient of the LoRA terms,
dA_i and dB_i, from dY:
    dt_i = s_i * dY B_i[e]      dB_i[e] = s_i * dY[g]^T t_i[g]      dA_i[e] = dt_i[g]^T x[g]      dx += dt_i A_i[e]
The gradient of `base` is dY itself; the base product (and its own gradients) is plain torch autograd.

Both ops take a `plan`, as `lora_linear`'s do (see `autograd`): "fused" runs the grouped kernels (backend "triton"
asked for by name: errors raise); "composed" the torch composition (one GEMM pair per expert on its own rows, fp32,
as `reference.moe_lora_linear`; what the torch backend runs under torch.compile); "auto" races the two, once per
shape class and GPU (`autotune.choose`), and falls back to the composition, with one warning, for a shape class
whose kernels fail to compile or launch. Both plans give the same outputs (the same t_i), so a forward on one and its
backward on the other agree; the plan is chosen when the op runs, not when torch.compile traces it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import autograd, autotune, reference


def _block_m(x: torch.Tensor) -> int:
    from ..kernels import moe_lora as kernels

    return kernels.tile_rows(x.dtype, interpreting=x.device.type == "cpu")


def _shape_class(x: torch.Tensor, base: torch.Tensor, lora_A: list[torch.Tensor]) -> str:
    """The key the plans are raced and failures recorded under: rows bucketed to powers of two, the exact features,
    experts and total rank, the dtypes."""
    ranks = sum(A.shape[1] for A in lora_A)
    dtypes = "/".join(str(t.dtype).removeprefix("torch.") for t in (x, *lora_A[:1]))
    return (
        f"moe_lora_linear|M{autotune.size_class(x.shape[0])}|K{x.shape[1]}|N{base.shape[1]}|"
        f"E{lora_A[0].shape[0] if lora_A else 0}|R{ranks}|{dtypes}"
    )


def _add_class(base, x, offsets, lora_A, lora_B, scaling):
    key = _shape_class(x, base, lora_A)
    return key, key, x.device


def _add_grads_class(grad_out, x, offsets, lora_A, lora_B, shrunk, scaling, needs_input_grad):
    key = _shape_class(x, grad_out, lora_A)
    return key, key, x.device


def _expert_spans(offsets: torch.Tensor, num_rows: int) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(reference.group_sizes(offsets, num_rows)))
    return list(zip([0, *ends[:-1]], ends))


def _add_kernels(base, x, offsets, lora_A, lora_B, scaling):
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


def _add_composed(base, x, offsets, lora_A, lora_B, scaling):
    """The kernels' outputs from torch: one GEMM pair per expert and adapter on the expert's rows, in fp32."""
    spans = _expert_spans(offsets, x.shape[0])
    out = base.to(torch.float32, copy=True)
    shrunk = []
    for A, B, s in zip(lora_A, lora_B, scaling):
        t = x.new_zeros(x.shape[0], A.shape[1], dtype=torch.float32)
        for e, (start, end) in enumerate(spans):
            if start < end:
                torch.mm(x[start:end].float(), A[e].float().T, out=t[start:end])
                out[start:end].addmm_(t[start:end], B[e].float().T, alpha=s)
        shrunk.append(t)
    return out.to(base.dtype), shrunk


@torch.library.custom_op("peftfast::moe_lora_add_fwd", mutates_args=())
def moe_lora_add_fwd(
    base: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scaling: list[float],
    plan: str,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    args = (base, x, offsets, lora_A, lora_B, scaling)
    return autotune.run_plan(
        plan, "moe_lora_linear", "moe_lora_linear forward", _add_class, _add_kernels, _add_composed, args
    )


@moe_lora_add_fwd.register_fake
def _(base, x, offsets, lora_A, lora_B, scaling, plan):
    return torch.empty_like(base), [x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32) for A in lora_A]


def _add_grads_kernels(grad_out, x, offsets, lora_A, lora_B, shrunk, scaling, needs_input_grad):
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


def _add_grads_composed(grad_out, x, offsets, lora_A, lora_B, shrunk, scaling, needs_input_grad):
    """The kernels' gradients from torch, per expert on its rows in fp32 (an expert without rows gets zeros)."""
    spans = _expert_spans(offsets, x.shape[0])
    grad_x = x.new_zeros(x.shape, dtype=torch.float32) if needs_input_grad else None
    grad_A, grad_B = [], []
    for A, B, t, s in zip(lora_A, lora_B, shrunk, scaling):
        # zeros_like keeps the strides of A and B, as the kernels' gradients do.
        dA, dB = torch.zeros_like(A), torch.zeros_like(B)
        for e, (start, end) in enumerate(spans):
            if start == end:
                continue
            dy, x_e = grad_out[start:end].float(), x[start:end].float()
            grad_t = (dy @ B[e].float()) * s
            dB[e].copy_((dy.T @ t[start:end]) * s)
            dA[e].copy_(grad_t.T @ x_e)
            if grad_x is not None:
                grad_x[start:end].addmm_(grad_t, A[e].float())
        grad_A.append(dA)
        grad_B.append(dB)
    return (grad_x.to(x.dtype) if grad_x is not None else x.new_empty(0)), grad_A, grad_B


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
    plan: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    args = (grad_out, x, offsets, lora_A, lora_B, shrunk, scaling, needs_input_grad)
    return autotune.run_plan(
        plan,
        "moe_lora_linear",
        "moe_lora_linear backward",
        _add_grads_class,
        _add_grads_kernels,
        _add_grads_composed,
        args,
    )


@moe_lora_add_bwd.register_fake
def _(grad_out, x, offsets, lora_A, lora_B, shrunk, scaling, needs_input_grad, plan):
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    return grad_x, [torch.empty_like(A) for A in lora_A], [torch.empty_like(B) for B in lora_B]


def _setup_context(ctx, inputs, output) -> None:
    base, x, offsets, lora_A, lora_B, scaling, plan = inputs
    ctx.save_for_backward(x, offsets, *lora_A, *lora_B, *output[1])
    ctx.num_adapters = len(lora_A)
    ctx.scaling, ctx.plan = list(scaling), plan


def _backward(ctx, grad_out, grad_shrunk):
    x, offsets, *saved = ctx.saved_tensors
    n = ctx.num_adapters
    lora_A, lora_B, shrunk = saved[:n], saved[n : 2 * n], saved[2 * n :]
    grad_x, grad_A, grad_B = moe_lora_add_bwd(
        grad_out.contiguous(), x, offsets, lora_A, lora_B, shrunk, ctx.scaling, ctx.needs_input_grad[1], ctx.plan
    )
    return grad_out, grad_x if ctx.needs_input_grad[1] else None, None, grad_A, grad_B, None, None


moe_lora_add_fwd.register_autograd(_backward, setup_context=_setup_context)


def can_run_moe_lora_linear(x, weight, bias, offsets, lora_A, lora_B, *args, **kwargs) -> bool:
    """Whether the Triton kernels serve this call: GPU tensors (or CPU ones under TRITON_INTERPRET=1) on one device,
    float activations, adapters in fp32 or the activation dtype, int32 offsets."""
    on_device = autograd.on_kernel_device(x)
    if not on_device or not lora_A or x.dtype not in autograd._FP_DTYPES or offsets.dtype != torch.int32:
        return False
    tensors = [weight, offsets, *lora_A, *lora_B] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in (torch.float32, x.dtype) for t in (*lora_A, *lora_B)):
        return False
    return x.numel() < 2**31 and autograd.triton_available()


# The base product per expert as custom ops, for torch.compile: one GEMM per expert needs the rows per expert on the
# host (`reference.group_sizes`), which a traced graph cannot hold; inside a custom op that runs when the graph runs.
@torch.library.custom_op("peftfast::moe_grouped_linear_fwd", mutates_args=())
def moe_grouped_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    return reference.moe_lora_linear(x, weight, bias, offsets, [], [], [], transposed)


@moe_grouped_linear_fwd.register_fake
def _(x, weight, bias, offsets, transposed):
    out_features = weight.shape[2] if transposed else weight.shape[1]
    return x.new_empty(x.shape[0], out_features, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("peftfast::moe_grouped_linear_bwd", mutates_args=())
def moe_grouped_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    transposed: bool,
    needs_x: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dW, dbias) of y[g] = x[g] @ W_e.T + bias[e], each empty unless needed; zeros for experts without rows."""
    grad_x = x.new_zeros(x.shape) if needs_x else x.new_empty(0)
    grad_w = torch.zeros_like(weight) if needs_weight else weight.new_empty(0)
    grad_b = grad_y.new_zeros(weight.shape[0], grad_y.shape[1]) if needs_bias else grad_y.new_empty(0)
    for e, (start, end) in enumerate(_expert_spans(offsets, x.shape[0])):
        if start == end:
            continue
        dy, x_e = grad_y[start:end], x[start:end].to(grad_y.dtype)
        w_e = weight[e].to(grad_y.dtype)
        if needs_x:
            grad_x[start:end] = dy @ (w_e.T if transposed else w_e)
        if needs_weight:
            grad_w[e] = x_e.T @ dy if transposed else dy.T @ x_e
        if needs_bias:
            grad_b[e] = dy.sum(0)
    return grad_x, grad_w, grad_b


@moe_grouped_linear_bwd.register_fake
def _(grad_y, x, weight, offsets, transposed, needs_x, needs_weight, needs_bias):
    grad_x = torch.empty_like(x) if needs_x else x.new_empty(0)
    grad_w = torch.empty_like(weight) if needs_weight else weight.new_empty(0)
    grad_b = grad_y.new_empty(weight.shape[0], grad_y.shape[1]) if needs_bias else grad_y.new_empty(0)
    return grad_x, grad_w, grad_b


def _grouped_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offsets, transposed = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.transposed, ctx.has_bias = transposed, bias is not None


def _grouped_linear_backward(ctx, grad_y):
    x, weight, offsets = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x, grad_w, grad_b = moe_grouped_linear_bwd(
        grad_y.contiguous(), x, weight, offsets, ctx.transposed, needs_x, needs_weight, needs_bias and ctx.has_bias
    )
    return grad_x if needs_x else None, grad_w if needs_weight else None, grad_b if needs_bias else None, None, None


moe_grouped_linear_fwd.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup_context)


def _grouped_linear(x, weight, bias, offsets, transposed) -> torch.Tensor:
    """x[g] @ W_e.T + bias[e] per expert, one GEMM per expert: the reference, or its custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return moe_grouped_linear_fwd(x, weight, bias, offsets, transposed)
    return reference.moe_lora_linear(x, weight, bias, offsets, [], [], [], transposed)


def moe_lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offsets: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scaling: list[float],
    transposed: bool,
) -> torch.Tensor:
    """The torch `moe_lora_linear`: `reference.moe_lora_linear`, or, traced by torch.compile, the same math as custom
    ops (the grouped base product, then the LoRA terms on the "composed" plan, fp32), so the graph doesn't break at
    the host copy of the rows per expert."""
    if not torch.compiler.is_compiling():
        return reference.moe_lora_linear(x, weight, bias, offsets, lora_A, lora_B, scaling, transposed)
    if len(lora_A) != len(lora_B) or len(lora_A) != len(scaling):
        raise ValueError(f"Got {len(lora_A)} A, {len(lora_B)} B factors and {len(scaling)} scalings; pass one each.")
    base = moe_grouped_linear_fwd(x, weight, bias, offsets, transposed)
    if not lora_A:
        return base
    scaling = [float(s) for s in scaling]
    return moe_lora_add_fwd(base, x, offsets, list(lora_A), list(lora_B), scaling, "composed")[0]


def _grouped_base(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """x[g] @ W_e.T + bias[e] per group: torch's grouped GEMM where it runs (bf16 on a GPU: one launch, no host
    sync), else one GEMM per expert (`_grouped_linear`)."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None or not x.is_cuda or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return _grouped_linear(x, weight, bias, offsets, transposed)
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
    scaling = [float(s) for s in scaling]
    y, _ = moe_lora_add_fwd(base, x, offsets, list(lora_A), list(lora_B), scaling, autograd.requested_plan())
    return y
