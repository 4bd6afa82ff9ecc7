"""Autograd over the Triton kernels, registered as torch custom ops (with shape-only fakes for torch.compile).

`peftfast::lora_linear_fwd` returns y and the scaled rank-r intermediates S (fp32, saved for backward);
`peftfast::lora_linear_bwd` returns dX, dA_i, dB_i. Dropout masks are re-drawn in backward from the same seed.
"""

from __future__ import annotations

import torch

_FP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_dtype(x: torch.Tensor) -> torch.dtype:
    # The interpreter's bf16/fp16 arithmetic is unreliable (bf16 is held as raw uint16): multiply in fp32 there.
    return torch.float32 if x.device.type == "cpu" else x.dtype


def _adapter_seed(seed: int, index: int) -> int:
    return seed + 1_000_003 * index


@torch.library.custom_op("peftfast::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import lora_linear as kernels

    M = x.shape[0]
    ranks = [A.shape[0] for A in lora_A]
    shrunk = torch.empty(M, sum(ranks), device=x.device, dtype=torch.float32)
    start = 0
    for index, (A, s, p) in enumerate(zip(lora_A, scaling, dropout_p)):
        kernels.lora_shrink(
            x, A, s, p, _adapter_seed(seed, index), out=shrunk[:, start : start + A.shape[0]], dot_dtype=_dot_dtype(x)
        )
        start += A.shape[0]
    B_cat = lora_B[0] if len(lora_B) == 1 else torch.cat(lora_B, dim=1)
    y = kernels.dual_matmul(x, weight.T, shrunk, B_cat.T, bias, out_dtype=x.dtype, dot_dtype=_dot_dtype(x))
    return y, shrunk


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    rank = sum(A.shape[0] for A in lora_A)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], rank, dtype=torch.float32)


@torch.library.custom_op("peftfast::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    shrunk: torch.Tensor,
    scaling: list[float],
    dropout_p: list[float],
    seed: int,
    needs_input_grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    from ..kernels import lora_linear as kernels

    dot_dtype = _dot_dtype(x)
    B_cat = lora_B[0] if len(lora_B) == 1 else torch.cat(lora_B, dim=1)
    grad_s, grad_b_cat = kernels.lora_grad_dy(grad_out, B_cat, shrunk, dot_dtype=dot_dtype)
    grad_A, grad_B, spans = [], [], []
    start = 0
    for index, (A, B, s, p) in enumerate(zip(lora_A, lora_B, scaling, dropout_p)):
        stop = start + A.shape[0]
        # S_i was scaled by s_i, so the gradient reaching the unscaled x A_i^T is s_i * dS_i.
        grad_s_i = grad_s[:, start:stop] * s
        grad_A.append(kernels.lora_grad_a(grad_s_i, x, p, _adapter_seed(seed, index), dot_dtype=dot_dtype).to(A.dtype))
        # Custom-op outputs may not alias one another: copy each adapter's columns out (N x r, cheap).
        grad_B.append(grad_b_cat[:, start:stop].to(B.dtype, copy=True))
        spans.append((grad_s_i, A, p, _adapter_seed(seed, index)))
        start = stop
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    # dX = dY W + sum_i mask_i * (s_i dS_i A_i) / (1 - p_i). Adapters without dropout share one product; each one
    # with dropout needs its own mask, applied to its product in the same kernel or accumulated after.
    plain = [span for span in spans if span[2] == 0.0]
    masked = [span for span in spans if span[2] > 0.0]
    if plain:
        second_a = torch.cat([span[0] for span in plain], dim=1) if len(plain) > 1 else plain[0][0]
        second_b = torch.cat([span[1] for span in plain], dim=0) if len(plain) > 1 else plain[0][1]
        grad_x = kernels.dual_matmul(grad_out, weight, second_a, second_b, out_dtype=x.dtype, dot_dtype=dot_dtype)
    else:
        first = masked.pop(0)
        grad_x = kernels.dual_matmul(
            grad_out,
            weight,
            first[0],
            first[1],
            out_dtype=x.dtype,
            dropout_p=first[2],
            seed=first[3],
            dot_dtype=dot_dtype,
        )
    for grad_s_i, A, p, adapter_seed in masked:
        kernels.dual_matmul(
            None, None, grad_s_i, A, out=grad_x, dropout_p=p, seed=adapter_seed, accumulate=True, dot_dtype=dot_dtype
        )
    return grad_x, grad_A, grad_B


@lora_linear_bwd.register_fake
def _(grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seed, needs_input_grad):
    grad_x = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, [A.new_empty(A.shape) for A in lora_A], [B.new_empty(B.shape) for B in lora_B]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, output[1], *lora_A, *lora_B)
    ctx.num_adapters = len(lora_A)
    ctx.scaling, ctx.dropout_p, ctx.seed = list(scaling), list(dropout_p), seed
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_shrunk):
    x, weight, shrunk, *adapters = ctx.saved_tensors
    lora_A, lora_B = adapters[: ctx.num_adapters], adapters[ctx.num_adapters :]
    grad_x, grad_A, grad_B = lora_linear_bwd(
        grad_y.contiguous(),
        x,
        weight,
        lora_A,
        lora_B,
        shrunk,
        ctx.scaling,
        ctx.dropout_p,
        ctx.seed,
        ctx.needs_input_grad[0],
    )
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (grad_x if ctx.needs_input_grad[0] else None, None, grad_bias, grad_A, grad_B, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from ..kernels import lora_linear  # noqa: F401
    except ImportError:
        return False
    return True


def can_run_lora_linear(x, weight, bias, lora_A, lora_B, lora_B_bias=None, *args, **kwargs) -> bool:
    """Whether the Triton kernels serve this call: GPU tensors (or CPU tensors under TRITON_INTERPRET=1), float
    activations with a frozen base weight of the same dtype, adapters in fp32 or that dtype, no lora_B bias."""
    on_device = x.is_cuda or (x.device.type == "cpu" and _interpreting())
    if not on_device or not lora_A or x.dtype not in _FP_DTYPES or weight.dtype != x.dtype:
        return False
    if weight.requires_grad or any(b is not None for b in (lora_B_bias or [])):
        return False
    tensors = [weight, *lora_A, *lora_B] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in (torch.float32, x.dtype) for t in (*lora_A, *lora_B)):
        return False
    # Dropout masks index x as int32 flat offsets.
    return x.numel() < 2**31 and triton_available()


def lora_linear_triton(x, weight, bias, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training):
    """The Triton `lora_linear`: same semantics and arguments as `reference.lora_linear`."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    ps = [float(p) if training else 0.0 for p in dropout_p]
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if any(p > 0 for p in ps) else 0
    y, _ = lora_linear_fwd(x2d, weight, bias, list(lora_A), list(lora_B), [float(s) for s in scaling], ps, seed)
    return y.reshape(*lead, weight.shape[0])
