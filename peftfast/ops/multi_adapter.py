"""The SGMV kernels as a torch custom op (`peftfast::lora_multi_adapter`), with a fake for torch.compile.

The op writes into `y` in place and returns nothing; `peftfast.ops.lora_multi_adapter` returns `y`. Traced by
torch.compile, the launches become one node of the graph, run as they are (the interpreter on CPU, the kernels on a
GPU); the fake tells the compiler that only `y` changes, so a mixed-batch forward compiles without a graph break.
"""

from __future__ import annotations

import torch

from . import autograd, autotune, reference


def can_run(y, x, lora_A, lora_B_t, lora_B_bias, scaling, *args, **kwargs) -> bool:
    """Whether the SGMV kernels serve this call: GPU tensors (or CPU ones under TRITON_INTERPRET=1) on one device,
    float adapter weights and activations (fp16/bf16 on a GPU, see `autograd.serves_activation_dtype`), int32 token
    offsets."""
    on_device = x.is_cuda or (x.device.type == "cpu" and autograd._interpreting())
    tensors = [y, x, lora_A, lora_B_t, scaling] + ([lora_B_bias] if lora_B_bias is not None else [])
    if not on_device or any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in autograd._FP_DTYPES for t in (y, x, lora_A, lora_B_t)):
        return False
    if not autograd.serves_activation_dtype(x):
        return False
    return max(x.numel(), y.numel()) < 2**31 and autograd.triton_available()


@torch.library.custom_op("peftfast::lora_multi_adapter", mutates_args=("y",))
def _lora_multi_adapter_op(
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
) -> None:
    # Imported here so that `import peftfast` works without Triton.
    from ..kernels import sgmv

    sgmv.lora_multi_adapter(
        y, x, lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, group_slot, token_order, tiles, block_m, r_max
    )


@_lora_multi_adapter_op.register_fake
def _(y, x, lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, group_slot, token_order, tiles, block_m, r_max):
    return None


def lora_multi_adapter_triton(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, *args) -> torch.Tensor:
    """The triton `lora_multi_adapter`: same semantics and arguments as `reference.lora_multi_adapter`."""

    def kernels() -> torch.Tensor:
        _lora_multi_adapter_op(y, x, lora_A, *args)
        return y

    # Named backend "triton", or traced by torch.compile (a failure can't be caught once the graph runs): the kernels.
    if autograd.requested_plan() == "fused" or torch.compiler.is_compiling():
        return kernels()
    # `auto`: a kernel that fails here falls back to torch for this shape class (see `autotune`).
    key = f"lora_multi_adapter|M{autotune.size_class(x.shape[0])}|K{x.shape[1]}|N{y.shape[1]}|R{args[-1]}|{x.dtype}"
    return autotune.run_with_fallback(
        "lora_multi_adapter", key, x.device, kernels, lambda: reference.lora_multi_adapter(y, x, lora_A, *args)
    )
