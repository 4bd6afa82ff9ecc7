"""The 4-bit (bitsandbytes NF4/FP4) ops behind `peftfast.ops.nf4_dequantize` and `peftfast.ops.lora_linear_4bit`:
reading a `QuantState` into tensors, the Triton implementations and their autograd.

Training path (`lora_linear_4bit` on Triton): forward dequantizes the weight once into a reused buffer and runs the
fused dense LoRA kernels; backward dequantizes it again into the buffer for dX = dY W + dS A. Nothing of the dense
weight outlives a call, and a layer is dequantized at most twice per training step. Batches of at most
`SMALL_M` rows (decode) skip the buffer: one kernel reads the 4-bit weight once and adds the LoRA term in its epilogue.

That is backend "triton" asked for by name. Under "auto" the forward races the fused 4-bit kernel (decode sizes),
dequantize + fused dense kernel and dequantize + cuBLAS + LoRA kernels, once per shape class and GPU (see
`autotune`), and a kernel failure falls back to torch's dequantize + F.linear for that shape.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch

from . import autograd, autotune, reference
from .reference import Nf4Weight

# Rows up to which the fused 4-bit kernel is used. A [M, K] x [K, N] product against a 4-bit weight does 4 * M FLOP per
# weight byte read: 256 at M = 64, about the H100's ridge (~790 TFLOP/s over ~3 TB/s). Below it the product is bound
# by reading the weight and reading 4 bits beats dequantizing; above it tensor-core GEMMs on a dense copy win.
# Derived from those numbers, not measured yet.
SMALL_M = 64


def is_cpu_packed(quant_state: Any) -> bool:
    """Whether bitsandbytes repacked this weight into its CPU-only inference layout (`packing_format_for_cpu`: nibbles
    interleaved over 32-row blocks, absmax transposed and rounded to bf16), which peftfast does not read."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def read_quant_state(packed: torch.Tensor, quant_state: Any) -> Nf4Weight:
    """The weight as `peftfast.ops.reference.Nf4Weight`, read from a bitsandbytes `Params4bit` (or its data) and its
    `QuantState` exactly as stored; nothing is copied or repacked."""
    if quant_state is None:
        raise ValueError("This 4-bit weight has no quant_state; move the layer to its device (.to/.cuda) first.")
    if is_cpu_packed(quant_state):
        raise ValueError(
            "This 4-bit weight is in bitsandbytes' CPU-packed layout (packing_format_for_cpu), which peftfast's 4-bit "
            "ops don't read; dequantize it with peftfast.ops.nf4_dequantize (it falls back to bitsandbytes)."
        )
    if quant_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"Unsupported 4-bit quant_type {quant_state.quant_type!r}; expected 'nf4' or 'fp4'.")
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"A 4-bit linear weight must be 2-D [out, in]; this QuantState has shape {shape}.")
    packed = packed.data if isinstance(packed, torch.nn.Parameter) else packed
    if not quant_state.nested:
        return Nf4Weight(packed, quant_state.absmax, quant_state.code, quant_state.blocksize, shape)
    state2 = quant_state.state2
    return Nf4Weight(
        packed,
        quant_state.absmax,
        quant_state.code,
        quant_state.blocksize,
        shape,
        absmax_code=state2.code,
        absmax_scale=state2.absmax,
        absmax_offset=quant_state.offset,
        absmax_blocksize=state2.blocksize,
    )


def dequantize_with_bitsandbytes(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """bitsandbytes' own dequantize, for the CPU-packed layout: undone on copies first (the user's weight and
    QuantState are left as they are). That layout keeps absmax in bf16, so the result is not the original weight's
    exact dequantization."""
    import bitsandbytes.functional as bnb_functional

    unpack = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:
        raise ValueError(
            "This 4-bit weight is in bitsandbytes' CPU-packed layout and this bitsandbytes version offers no way "
            "to unpack it; run the layer in training mode (bitsandbytes only repacks for CPU inference)."
        )
    data, state = unpack(packed.detach().clone(), copy.copy(quant_state))
    return bnb_functional.dequantize_4bit(data, state)


def _storage_tensors(weight: Nf4Weight) -> list[torch.Tensor]:
    tensors = [weight.packed, weight.absmax, weight.code]
    if weight.absmax_code is not None:
        tensors += [weight.absmax_code, weight.absmax_scale]
    return tensors


def can_run_nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    """The Triton dequantize serves GPU tensors (CPU ones under TRITON_INTERPRET=1) of fewer than 2**31 elements."""
    return autograd.on_kernel_device(packed) and absmax.device == packed.device and autograd.triton_available()


def nf4_dequantize_triton(*weight_fields: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Triton `nf4_dequantize`: same semantics and arguments as `reference.nf4_dequantize` (in `auto`, torch's
    where the kernel fails to compile or launch, see `autotune`)."""
    from ..kernels import nf4 as kernels

    def kernel() -> torch.Tensor:
        return kernels.nf4_dequantize(*weight_fields, dtype=dtype)

    if autograd.requested_plan() == "fused":
        return kernel()
    packed, shape = weight_fields[0], weight_fields[4]
    key = f"nf4_dequantize|{tuple(shape)}|{dtype}|nested{int(weight_fields[5] is not None)}"
    fallback = lambda: reference.nf4_dequantize(*weight_fields, dtype=dtype)  # noqa: E731
    return autotune.run_with_fallback("nf4_dequantize", key, packed.device, kernel, fallback)


_buffers = threading.local()


def _dequantize_into_buffer(weight: Nf4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W dequantized into this thread's scratch buffer for (device, dtype), grown to the largest layer seen.

    The result is only valid until the next call: callers use it at once and never keep it (autograd saves the 4-bit
    weight, not this). Per thread, because backward runs on autograd's own threads."""
    from ..kernels import nf4 as kernels

    numel = weight.shape[0] * weight.shape[1]
    store = getattr(_buffers, "by_key", None)
    if store is None:
        store = _buffers.by_key = {}
    key = (weight.packed.device, dtype)
    buffer = store.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = store[key] = torch.empty(numel, device=weight.packed.device, dtype=dtype)
    return kernels.nf4_dequantize(*weight, dtype=dtype, out=buffer[:numel].view(weight.shape))


def _forward_plans(x, weight, bias, shrunk, B_cat, dot_dtype) -> dict:
    """The ways to compute y = x W^T + bias + S B^T from the 4-bit W: the fused 4-bit kernel (decode sizes only:
    its block of rows is at most `SMALL_M`), or W dequantized into the buffer, then the fused dense kernel or cuBLAS
    plus the LoRA term in place."""
    from ..kernels import nf4 as kernels

    plans = {}
    if x.shape[0] <= SMALL_M:
        plans["fused_4bit"] = lambda: kernels.nf4_lora_matmul(
            x, *weight, shrunk=shrunk, lora_B=B_cat, bias=bias, dot_dtype=dot_dtype
        )
    plans["dequantize_fused"] = lambda: autograd.expand_fused(
        x, _dequantize_into_buffer(weight, x.dtype).T, bias, shrunk, B_cat
    )
    plans["dequantize_composed"] = lambda: autograd.expand_composed(
        x, _dequantize_into_buffer(weight, x.dtype), bias, shrunk, B_cat
    )
    return plans


def _forward(x, bias, weight, scaling, dropout_p, seeds, plan, lora_A, lora_B) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) on the kernels: "fused" is the fused 4-bit kernel for decode sizes and dequantize + fused dense kernel
    above; "auto" races the plans of `_forward_plans` (see `autotune`)."""
    shrunk = autograd._shrink_all(x, lora_A, scaling, dropout_p, seeds)
    B_cat = autograd._cat_B(lora_B)
    plans = _forward_plans(x, weight, bias, shrunk, B_cat, autograd._dot_dtype(x))
    if plan == "auto":
        key = autograd.class_key("lora_linear_4bit", x, weight.shape[0], lora_A, dropout_p)
        chosen = autotune.choose("lora_linear_4bit forward", key, plans, x.device, default="dequantize_composed")
    elif plan == "composed":
        chosen = "dequantize_composed"
    else:
        chosen = "fused_4bit" if "fused_4bit" in plans else "dequantize_fused"
    return plans[chosen](), shrunk


def _forward_with_fallback(x, bias, weight, scaling, dropout_p, seeds, plan, lora_A, lora_B):
    """(y, S, fell_back): `_forward`, except that under "auto" a shape class known to fail, or a kernel failure now,
    runs the torch forward (the failure recorded)."""
    args = (x, bias, weight, scaling, dropout_p, seeds, plan, lora_A, lora_B)
    if plan != "auto":
        return *_forward(*args), False
    key = autograd.class_key("lora_linear_4bit", x, weight.shape[0], lora_A, dropout_p)
    if autotune.failed("lora_linear_4bit", key, x.device):
        return *_forward_torch(*args), True
    try:
        return *_forward(*args), False
    except Exception as error:
        if not autotune.is_kernel_failure(error):
            raise
        autotune.record_failure("lora_linear_4bit", key, error, x.device)
        return *_forward_torch(*args), True


def _backward(grad_y, x, weight, fell_back, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_x, plan):
    """(dX, [dA_i], [dB_i]) with W dequantized again: torch's dequantize and backward where the forward fell back,
    else the kernels' backward on the scratch buffer."""
    if fell_back:
        W = reference.nf4_dequantize(*weight, dtype=x.dtype)
        return autograd._backward_torch(grad_y, x, W, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_x)
    W = _dequantize_into_buffer(weight, x.dtype)
    return autograd.backward_eager(
        grad_y.contiguous(), x, W, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_x, plan
    )


class _LoraLinear4bit(torch.autograd.Function):
    """y = x W^T + bias + sum_i S_i B_i^T, S_i = s_i * dropout_i(x) A_i^T, W read from its 4-bit storage: the eager
    boundary (traced, the custom ops below take its place)."""

    @staticmethod
    def forward(ctx, x, bias, weight, scaling, dropout_p, seeds, plan, *adapters):
        num = len(adapters) // 2
        lora_A, lora_B = list(adapters[:num]), list(adapters[num:])
        y, shrunk, ctx.fell_back = _forward_with_fallback(
            x, bias, weight, scaling, dropout_p, seeds, plan, lora_A, lora_B
        )
        ctx.save_for_backward(x, shrunk, seeds, *lora_A, *lora_B)
        ctx.weight, ctx.num, ctx.has_bias, ctx.plan = weight, num, bias is not None, plan
        ctx.scaling, ctx.dropout_p = list(scaling), list(dropout_p)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, shrunk, seeds, *adapters = ctx.saved_tensors
        lora_A, lora_B = list(adapters[: ctx.num]), list(adapters[ctx.num :])
        grad_x, grad_A, grad_B = _backward(
            grad_y,
            x,
            ctx.weight,
            ctx.fell_back,
            lora_A,
            lora_B,
            shrunk,
            ctx.scaling,
            ctx.dropout_p,
            seeds,
            ctx.needs_input_grad[0],
            ctx.plan,
        )
        grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (grad_x if ctx.needs_input_grad[0] else None, grad_bias, None, None, None, None, None, *grad_A, *grad_B)


# Traced by torch.compile, the 4-bit path is two custom ops (the launchers read data pointers, which dynamo can't
# trace): the weight travels as its tensors and sizes, the offset of a nested absmax as a tensor.


def _op_weight(weight: Nf4Weight) -> tuple:
    offset = weight.absmax_offset
    if weight.absmax_code is not None and not isinstance(offset, torch.Tensor):
        offset = torch.tensor([offset], dtype=torch.float32, device=weight.packed.device)
    elif weight.absmax_code is None:
        offset = None
    fields = (weight.packed, weight.absmax, weight.code, weight.absmax_code, weight.absmax_scale, offset)
    return (*fields, weight.blocksize, list(weight.shape), weight.absmax_blocksize)


def _weight_of(packed, absmax, code, absmax_code, absmax_scale, absmax_offset, blocksize, shape, absmax_blocksize):
    offset = 0.0 if absmax_offset is None else absmax_offset
    return Nf4Weight(packed, absmax, code, blocksize, tuple(shape), absmax_code, absmax_scale, offset, absmax_blocksize)


@torch.library.custom_op("peftfast::lora_linear_4bit_fwd", mutates_args=())
def lora_linear_4bit_fwd(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    absmax_blocksize: int,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    plan: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _weight_of(
        packed, absmax, code, absmax_code, absmax_scale, absmax_offset, blocksize, shape, absmax_blocksize
    )
    y, shrunk, _ = _forward_with_fallback(x, bias, weight, scaling, dropout_p, seeds, plan, lora_A, lora_B)
    return y, shrunk


@lora_linear_4bit_fwd.register_fake
def _(x, bias, packed, absmax, code, absmax_code, absmax_scale, absmax_offset, blocksize, shape, absmax_blocksize,
      lora_A, lora_B, scaling, dropout_p, seeds, plan):  # fmt: skip
    rank = sum(A.shape[0] for A in lora_A)
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], rank, dtype=torch.float32)


@torch.library.custom_op("peftfast::lora_linear_4bit_bwd", mutates_args=())
def lora_linear_4bit_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    absmax_blocksize: int,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    shrunk: torch.Tensor,
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    needs_input_grad: bool,
    plan: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    weight = _weight_of(
        packed, absmax, code, absmax_code, absmax_scale, absmax_offset, blocksize, shape, absmax_blocksize
    )
    # The forward ran on torch exactly when its shape class is recorded as failing (it fell back, or was known to).
    key = autograd.class_key("lora_linear_4bit", x, shape[0], lora_A, dropout_p)
    fell_back = plan == "auto" and autotune.failed("lora_linear_4bit", key, x.device)
    grad_x, grad_A, grad_B = _backward(
        grad_y, x, weight, fell_back, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad, plan
    )
    return (grad_x if needs_input_grad else x.new_empty(0)), list(grad_A), list(grad_B)


@lora_linear_4bit_bwd.register_fake
def _(grad_y, x, packed, absmax, code, absmax_code, absmax_scale, absmax_offset, blocksize, shape, absmax_blocksize,
      lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad, plan):  # fmt: skip
    grad_x = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, [A.new_empty(A.shape) for A in lora_A], [B.new_empty(B.shape) for B in lora_B]


def _setup_context(ctx, inputs, output) -> None:
    x, bias, *weight_fields = inputs[:11]
    lora_A, lora_B, scaling, dropout_p, seeds, plan = inputs[11:]
    tensors, sizes = weight_fields[:6], weight_fields[6:]
    ctx.save_for_backward(x, output[1], seeds, *tensors, *lora_A, *lora_B)
    ctx.sizes, ctx.num, ctx.has_bias = sizes, len(lora_A), bias is not None
    ctx.scaling, ctx.dropout_p, ctx.plan = list(scaling), list(dropout_p), plan


def _op_backward(ctx, grad_y, grad_shrunk):
    x, shrunk, seeds, *rest = ctx.saved_tensors
    tensors, adapters = rest[:6], rest[6:]
    lora_A, lora_B = list(adapters[: ctx.num]), list(adapters[ctx.num :])
    grad_x, grad_A, grad_B = lora_linear_4bit_bwd(
        grad_y.contiguous(),
        x,
        *tensors,
        *ctx.sizes,
        lora_A,
        lora_B,
        shrunk,
        ctx.scaling,
        ctx.dropout_p,
        seeds,
        ctx.needs_input_grad[0],
        ctx.plan,
    )
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
    grads_x = grad_x if ctx.needs_input_grad[0] else None
    return (grads_x, grad_bias, *([None] * 9), grad_A, grad_B, None, None, None, None)


lora_linear_4bit_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def _forward_torch(x, bias, weight, scaling, dropout_p, seeds, plan, lora_A, lora_B):
    """The forward in plain torch (the fallback): torch's dequantize, the same S and masks."""
    dense = reference.nf4_dequantize(*weight, dtype=x.dtype)
    return autograd._forward_torch(x, dense, bias, lora_A, lora_B, scaling, dropout_p, seeds)


def can_run_lora_linear_4bit(
    x: torch.Tensor,
    weight: Nf4Weight,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    lora_B_bias: list[torch.Tensor | None],
    *args: Any,
    **kwargs: Any,
) -> bool:
    """Whether the Triton 4-bit path serves this call: GPU tensors with an fp16/bf16 compute dtype (CPU ones, fp32
    too, under TRITON_INTERPRET=1), at least one adapter in fp32 or the compute dtype, no lora_B bias."""
    if not autograd.on_kernel_device(x) or not lora_A or compute_dtype not in autograd._FP_DTYPES:
        return False
    if x.is_cuda and compute_dtype not in autograd._GPU_DTYPES:
        return False
    if any(b is not None for b in lora_B_bias):
        return False
    tensors = [*_storage_tensors(weight), *lora_A, *lora_B] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in (torch.float32, compute_dtype) for t in (*lora_A, *lora_B)):
        return False
    numel = weight.shape[0] * weight.shape[1]
    return numel < 2**31 and x.numel() < 2**31 and autograd.triton_available()


def lora_linear_4bit_signature(x, weight, bias, compute_dtype, lora_A, lora_B, lora_B_bias, *args, **kwargs) -> tuple:
    """Everything of a call that `can_run_lora_linear_4bit` reads (devices, dtypes, sizes against int32 offsets, B
    biases): the key its backend resolution is cached on (see `dispatch.register`)."""
    signature = [x.device, x.dtype, x.numel() < 2**31, compute_dtype, weight.shape[0] * weight.shape[1] < 2**31]
    signature += [tensor.device for tensor in _storage_tensors(weight)]
    signature.append(None if bias is None else bias.device)
    signature.append(len(lora_A))
    for tensor in (*lora_A, *lora_B):
        signature += (tensor.device, tensor.dtype)
    signature.append(any(b is not None for b in lora_B_bias))
    return tuple(signature)


def lora_linear_4bit_triton(
    x, weight, bias, compute_dtype, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training
) -> torch.Tensor:
    """The Triton `lora_linear_4bit`: same semantics and arguments as `reference.lora_linear_4bit`, except that the
    LoRA branch reads x in the compute dtype (the base GEMM's operand), not in the adapter dtype."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    ps = [float(p) if training else 0.0 for p in dropout_p]
    seeds = autograd.new_seeds(len(ps), x.device) if any(p > 0 for p in ps) else None
    bias = bias.to(compute_dtype) if bias is not None else None
    plan = autograd.requested_plan()
    scaling = [float(s) for s in scaling]
    if torch.compiler.is_compiling():
        op_weight = _op_weight(weight)
        y, _ = lora_linear_4bit_fwd(x2d, bias, *op_weight, list(lora_A), list(lora_B), scaling, ps, seeds, plan)
    else:
        y = _LoraLinear4bit.apply(x2d, bias, weight, scaling, ps, seeds, plan, *lora_A, *lora_B)
    return y.reshape(*lead, weight.shape[0]).to(x.dtype)
