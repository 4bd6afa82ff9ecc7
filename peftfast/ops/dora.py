"""The Triton implementations behind `peftfast.ops.dora_weight_norm` and `peftfast.ops.dora_linear`, their autograd
(torch custom ops with shape-only fakes) and the predicates telling the dispatcher when they serve a call.

Training step of one DoRA adapter (see `kernels/dora.py`): forward = `lora_shrink` (S = s * x_d A^T) + `dora_forward`
(base GEMM with DoRA's epilogue, writes y and z); backward = `lora_grad_dy` on g-scaled B (dS, dB), `lora_grad_a`
(dA), `dora_grad_x` (dX, one read of W even under dropout) and `column_dot` (dg = sum_t dY * z). The norm enters as
g = magnitude / norm, computed outside the custom ops, so autograd carries dg to the magnitude and nothing to the
norm, as in HF PEFT.

Each custom op takes a `plan`, as `lora_linear`'s do (see `autograd`): "fused" runs the kernels (backend "triton"
asked for by name: what was asked, and errors raise); "composed" the composition of cuBLAS and torch (the same math
as plain torch ops: F.linear for the base GEMM, the rescale and the rank-r terms in fp32); "auto" races the two, once
per shape class and GPU (`autotune.choose`), and falls back to the composition, with one warning, for a shape class
whose kernels fail to compile or launch (`autotune.run_with_fallback`). The plans of one op give the same outputs
(y, S, z; the same dropout masks from the same seed), so a forward run on one plan and its backward on the other
agree. The choice is made when the op runs, not when torch.compile traces it: compiled graphs keep it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import autograd, autotune, reference
from .reference import dora_norm_from_terms


def _kernels():
    # Imported on first use, so that `import peftfast` works without Triton.
    from ..kernels import dora, lora_linear

    return dora, lora_linear


def can_run_dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | None = None,
    weight_sq: torch.Tensor | None = None,
) -> bool:
    """Whether the Triton norm serves this call: GPU tensors (or CPU ones under TRITON_INTERPRET=1) on one device,
    float weight and adapters."""
    on_device = autograd.on_kernel_device(weight)
    tensors = [weight, lora_A, lora_B] + ([weight_sq] if weight_sq is not None else [])
    if not on_device or any(t.device != weight.device for t in tensors):
        return False
    if any(t.dtype not in autograd._FP_DTYPES for t in (weight, lora_A, lora_B)):
        return False
    return weight.numel() < 2**31 and autograd.triton_available()


def _weight_norm_kernels(weight, lora_A, lora_B, scaling, weight_sq) -> tuple[torch.Tensor, torch.Tensor]:
    kernels, _ = _kernels()
    weight_times_A, squares = kernels.weight_times_adapter(weight, lora_A, with_sq=weight_sq is None)
    if squares is None:
        return dora_norm_from_terms(weight_sq, weight_times_A, lora_A, lora_B, scaling), weight_sq.new_empty(0)
    return dora_norm_from_terms(squares, weight_times_A, lora_A, lora_B, scaling), squares


def _weight_norm_torch(weight, lora_A, lora_B, scaling, weight_sq) -> tuple[torch.Tensor, torch.Tensor]:
    norm, squares = reference.dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq)
    return norm, (squares if weight_sq is None else weight_sq.new_empty(0))


@torch.library.custom_op("peftfast::dora_weight_norm", mutates_args=())
def dora_weight_norm_op(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None,
    plan: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm, ||W_j||^2) as `reference.dora_weight_norm`, the second empty when `weight_sq` is given (a custom op's
    output may not be one of its inputs)."""
    args = (weight, lora_A, lora_B, scaling, None if weight_sq is None else weight_sq.float())
    return autotune.run_plan(
        plan, "dora_weight_norm", "dora_weight_norm", _norm_class, _weight_norm_kernels, _weight_norm_torch, args
    )


def _norm_class(weight, lora_A, lora_B, scaling, weight_sq):
    key = f"dora_weight_norm|N{weight.shape[0]}|K{weight.shape[1]}|R{lora_A.shape[0]}|{_dtypes(weight, lora_A)}"
    return key, key, weight.device


@dora_weight_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling, weight_sq, plan):
    squares = weight.new_empty(weight.shape[0] if weight_sq is None else 0, dtype=torch.float32)
    return weight.new_empty(weight.shape[0], dtype=torch.float32), squares


def dora_weight_norm_triton(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton `dora_weight_norm`: same semantics and arguments as `reference.dora_weight_norm` (under `auto`,
    raced against it and falling back to it, see the module docstring)."""
    if lora_A.shape[1] != weight.shape[1] or lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(
            f"dora_weight_norm: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)} don't fit together."
        )
    with torch.no_grad():
        norm, squares = dora_weight_norm_op(
            weight, lora_A, lora_B, float(scaling), weight_sq, autograd.requested_plan()
        )
    return norm, (squares if weight_sq is None else weight_sq.float())


def _dtypes(*tensors: torch.Tensor) -> str:
    return "/".join(str(t.dtype).removeprefix("torch.") for t in tensors)


def _shape_class(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout_p: float) -> str:
    """The key DoRA's plans are raced and failures recorded under (see `autograd.shape_class`)."""
    return autograd.shape_class("dora_linear", x, weight.shape[0], [lora_A.shape[0]], [dropout_p]) + (
        f"|{_dtypes(lora_A)}"
    )


# --------------------------------------------------------------------------------------------------------- forward


def _forward_kernels(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, store_z):
    kernels, lora_kernels = _kernels()
    dot_dtype = autograd._dot_dtype(x)
    shrunk = lora_kernels.lora_shrink(x, lora_A, scaling, dropout_p, seed, dot_dtype=dot_dtype)
    y, z = kernels.dora_forward(x, weight, bias, shrunk, lora_B, g, dropout_p, seed, store_z, dot_dtype=dot_dtype)
    return y, shrunk, z


def _forward_composed(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, store_z):
    """The kernels' outputs from cuBLAS and torch: S = s * x_d A^T in fp32, z = x_d W^T + S B^T (x_d = x without
    dropout), y = g * z + b, or under dropout y = x W^T - x_d W^T + g * z + b; the masks of the same seed."""
    dropped = autograd._dropped(x, dropout_p, seed)
    shrunk = F.linear(dropped, lora_A.float()) * scaling
    low_rank = shrunk @ lora_B.float().T
    if dropout_p > 0:
        # One GEMM over [x; x_d]: W read once for both products.
        both = F.linear(torch.cat([x, dropped.to(x.dtype)]), weight).float()
        base, base_dropped = both[: x.shape[0]], both[x.shape[0] :]
        z = base_dropped + low_rank
        y = base - base_dropped + g * z
    else:
        z = F.linear(x, weight).float() + low_rank
        y = g * z
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), shrunk, z.to(x.dtype) if store_z else x.new_empty(0)


def _forward_class(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, store_z):
    key = _shape_class(x, weight, lora_A, dropout_p)
    # Raced apart: a training forward also writes z (T x d_out), an inference one doesn't.
    return key, f"{key}|z{int(store_z)}", x.device


@torch.library.custom_op("peftfast::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    store_z: bool,
    plan: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, store_z)
    return autotune.run_plan(
        plan, "dora_linear", "dora_linear forward", _forward_class, _forward_kernels, _forward_composed, args
    )


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, store_z, plan):
    M, N = x.shape[0], weight.shape[0]
    z = x.new_empty(M, N) if store_z else x.new_empty(0)
    return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0], dtype=torch.float32), z


# -------------------------------------------------------------------------------------------------------- backward


def _backward_kernels(grad_y, x, weight, lora_A, lora_B, g, shrunk, z, scaling, dropout_p, seed, needs_x, needs_g):
    kernels, lora_kernels = _kernels()
    dot_dtype = autograd._dot_dtype(x)
    # dY reaches the adapter scaled by g: (g * dY) B = dY (g * B), and (g * dY)^T S = g * (dY^T S).
    scaled_B = lora_B.float() * g[:, None]
    grad_s, grad_b = lora_kernels.lora_grad_dy(grad_y, scaled_B, shrunk, dot_dtype=dot_dtype)
    grad_b = (grad_b * g[:, None]).to(lora_B.dtype)
    # S was scaled by s, so the gradient reaching x_d A^T is s * dS.
    grad_s = grad_s * scaling
    grad_a = lora_kernels.lora_grad_a(grad_s, x, dropout_p, seed, dot_dtype=dot_dtype).to(lora_A.dtype)
    grad_x = x.new_empty(0)
    if needs_x:
        grad_x = kernels.dora_grad_x(grad_y, weight, g, grad_s, lora_A, dropout_p, seed, x.dtype, dot_dtype)
    grad_g = kernels.column_dot(grad_y, z) if needs_g else g.new_empty(0)
    return grad_x, grad_a, grad_b, grad_g


def _backward_composed(grad_y, x, weight, lora_A, lora_B, g, shrunk, z, scaling, dropout_p, seed, needs_x, needs_g):
    """The kernels' gradients from cuBLAS and torch: dB = g * dY^T S, dS = s * (g * dY) B, dA = dS^T x_d,
    dX = (g * dY) W + dS A, or under dropout dX = dY W + keep * ((g - 1) * dY W + dS A) / (1 - p); dg = sum_t dY * z."""
    dy = grad_y.float()
    grad_z = dy * g
    grad_b = (grad_z.T @ shrunk).to(lora_B.dtype)
    grad_s = (grad_z @ lora_B.float()) * scaling
    grad_a = (grad_s.T @ autograd._dropped(x, dropout_p, seed)).to(lora_A.dtype)
    grad_x = x.new_empty(0)
    if needs_x:
        through_adapter = grad_s @ lora_A.float()
        if dropout_p > 0:
            stacked = torch.cat([grad_y.to(weight.dtype), (dy * (g - 1)).to(weight.dtype)])
            both = (stacked @ weight).float()
            plain, dropped = both[: grad_y.shape[0]], both[grad_y.shape[0] :]
            keep = autograd.dropout_keep_mask(x.shape[0], x.shape[1], dropout_p, seed)
            grad_x = plain + torch.where(keep, (dropped + through_adapter) / (1.0 - dropout_p), 0.0)
        else:
            grad_x = (grad_z.to(weight.dtype) @ weight).float() + through_adapter
        grad_x = grad_x.to(x.dtype)
    grad_g = (dy * z.float()).sum(0) if needs_g else g.new_empty(0)
    return grad_x, grad_a, grad_b, grad_g


def _backward_class(grad_y, x, weight, lora_A, lora_B, g, shrunk, z, scaling, dropout_p, *_):
    key = _shape_class(x, weight, lora_A, dropout_p)
    return key, key, x.device


@torch.library.custom_op("peftfast::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    g: torch.Tensor,
    shrunk: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    needs_input_grad: bool,
    needs_g_grad: bool,
    plan: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_y, x, weight, lora_A, lora_B, g, shrunk, z, scaling, dropout_p, seed, needs_input_grad, needs_g_grad)
    return autotune.run_plan(
        plan, "dora_linear", "dora_linear backward", _backward_class, _backward_kernels, _backward_composed, args
    )


@dora_linear_bwd.register_fake
def _(
    grad_y,
    x,
    weight,
    lora_A,
    lora_B,
    g,
    shrunk,
    z,
    scaling,
    dropout_p,
    seed,
    needs_input_grad,
    needs_g_grad,
    plan,
):
    grad_x = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    grad_g = g.new_empty(g.shape, dtype=torch.float32) if needs_g_grad else g.new_empty(0)
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), grad_g


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, g, scaling, dropout_p, seed, store_z, plan = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, g, output[1], output[2], seed)
    ctx.scaling, ctx.dropout_p, ctx.plan = scaling, dropout_p, plan
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_shrunk, grad_z):
    x, weight, lora_A, lora_B, g, shrunk, z, seed = ctx.saved_tensors
    needs_g_grad = ctx.needs_input_grad[5]
    if needs_g_grad and z.numel() == 0 and grad_y.numel() != 0:
        raise RuntimeError("dora_linear: the magnitude needs a gradient but the forward ran without keeping z.")
    grad_x, grad_a, grad_b, grad_g = dora_linear_bwd(
        grad_y.contiguous(),
        x,
        weight,
        lora_A,
        lora_B,
        g,
        shrunk,
        z,
        ctx.scaling,
        ctx.dropout_p,
        seed,
        ctx.needs_input_grad[0],
        needs_g_grad,
        ctx.plan,
    )
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        None,
        grad_bias,
        grad_a if ctx.needs_input_grad[3] else None,
        grad_b if ctx.needs_input_grad[4] else None,
        grad_g if needs_g_grad else None,
        None,
        None,
        None,
        None,
        None,
    )


dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def can_run_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor | None,
    *args: object,
    **kwargs: object,
) -> bool:
    """Whether the Triton kernels serve this call: GPU tensors (or CPU ones under TRITON_INTERPRET=1) on one device,
    float activations with a frozen base weight of their dtype, adapters and magnitude in fp32 or that dtype."""
    on_device = autograd.on_kernel_device(x)
    if not on_device or x.dtype not in autograd._FP_DTYPES or weight.dtype != x.dtype or weight.requires_grad:
        return False
    tensors = [weight, lora_A, lora_B, magnitude] + [t for t in (bias, weight_norm) if t is not None]
    if any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in (torch.float32, x.dtype) for t in (lora_A, lora_B, magnitude)):
        return False
    # Dropout masks index x as int32 flat offsets.
    return x.numel() < 2**31 and autograd.triton_available()


def dora_linear_triton(
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
    """The Triton `dora_linear`: same semantics and arguments as `reference.dora_linear`. A missing norm comes from
    the norm kernel, a second read of W: from H100 figures (3 TB/s, 790 TFLOP/s), for a 4096 x 4096 bf16 weight ~11
    us next to ~87 us for the forward GEMM of 2048 tokens (unmeasured: no GPU yet). Taking A W^T inside the GEMM (W's
    tiles are loaded there anyway) would save it; left until it can be timed."""
    if weight_norm is None and weight_sq is None:
        raise ValueError("dora_linear needs weight_norm, or weight_sq (||W_j||^2) to compute the norms from.")
    if weight_norm is None:
        weight_norm = dora_weight_norm_triton(weight, lora_A, lora_B, scaling, weight_sq)[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    p = float(dropout_p) if training else 0.0
    # The seed stays data (a tensor), as in `autograd.lora_linear_triton`: no .item(), no graph break.
    seed = autograd.new_seeds(1, x.device) if p > 0 else None
    g = (magnitude.reshape(-1) / weight_norm.detach().to(magnitude.dtype)).float()
    store_z = torch.is_grad_enabled() and g.requires_grad
    plan = autograd.requested_plan()
    y, _, _ = dora_linear_fwd(x2d, weight, bias, lora_A, lora_B, g, float(scaling), p, seed, store_z, plan)
    return y.reshape(*lead, weight.shape[0])
