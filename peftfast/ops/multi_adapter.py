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
    on_device = autograd.on_kernel_device(x)
    tensors = [y, x, lora_A, lora_B_t, scaling] + ([lora_B_bias] if lora_B_bias is not None else [])
    if not on_device or any(t.device != x.device for t in tensors):
        return False
    if any(t.dtype not in autograd._FP_DTYPES for t in (y, x, lora_A, lora_B_t)):
        return False
    if not autograd.serves_activation_dtype(x):
        return False
    return max(x.numel(), y.numel()) < 2**31 and autograd.triton_available()


def signature(y, x, lora_A, lora_B_t, lora_B_bias, scaling, *args, **kwargs) -> tuple:
    """Everything of a call that `can_run` reads (devices, dtypes, whether the sizes fit int32 offsets): the key its
    backend resolution is cached on (see `dispatch.register`)."""
    return (
        y.device,
        y.dtype,
        x.device,
        x.dtype,
        lora_A.device,
        lora_A.dtype,
        lora_B_t.device,
        lora_B_t.dtype,
        None if lora_B_bias is None else lora_B_bias.device,
        scaling.device,
        max(x.numel(), y.numel()) < 2**31,
    )


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


_sgmv_module = None


def _sgmv():
    # Imported at first use (`import peftfast` works without Triton) and kept (an import statement costs ~1 us a call).
    global _sgmv_module
    if _sgmv_module is None:
        from ..kernels import sgmv

        _sgmv_module = sgmv
    return _sgmv_module


# (shape class fields) -> (autotune state, whether the kernels serve it): `auto`'s answer for a shape class, valid
# until the autotune state changes (a failure recorded anywhere, a reset).
_SETTLED: dict[tuple, tuple[tuple, bool]] = {}


def lora_multi_adapter_triton(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, *args) -> torch.Tensor:
    """The triton `lora_multi_adapter`: same semantics and arguments as `reference.lora_multi_adapter`."""
    traced = torch.compiler.is_compiling()
    # Eager with nothing requiring grad (decode), the launches are called directly: the custom op's dispatch costs
    # more than they do at decode sizes. Traced, or where autograd watches y, the custom op (it has a fake, and
    # refuses to be differentiated instead of dropping the LoRA term from the gradient).
    direct = not traced and not (torch.is_grad_enabled() and (y.requires_grad or x.requires_grad))

    def kernels() -> torch.Tensor:
        if direct:
            _sgmv().lora_multi_adapter(y, x, lora_A, *args)
        else:
            _lora_multi_adapter_op(y, x, lora_A, *args)
        return y

    # Named backend "triton", or traced by torch.compile (a failure can't be caught once the graph runs): the kernels.
    if traced or autograd.requested_plan() == "fused":
        return kernels()
    # `auto`: a kernel that fails here falls back to torch for this shape class (see `autotune`).
    fields = (autotune.size_class(x.shape[0]), x.shape[1], y.shape[1], args[-1], x.dtype, x.device)
    state = autotune.state()
    settled = _SETTLED.get(fields)
    if settled is not None and settled[0] == state and settled[1]:
        try:
            return kernels()
        except Exception as error:
            if not autotune.is_kernel_failure(error):
                raise
            autotune.record_failure("lora_multi_adapter", _class_key(fields), error, x.device)
            return reference.lora_multi_adapter(y, x, lora_A, *args)
    key = _class_key(fields)
    result = autotune.run_with_fallback(
        "lora_multi_adapter", key, x.device, kernels, lambda: reference.lora_multi_adapter(y, x, lora_A, *args)
    )
    if len(_SETTLED) >= 4096:
        _SETTLED.clear()
    _SETTLED[fields] = (autotune.state(), autotune.plan_cache(x.device).failure("lora_multi_adapter", key) is None)
    return result


def _class_key(fields: tuple) -> str:
    m, k, n, r_max, dtype, _ = fields
    return f"lora_multi_adapter|M{m}|K{k}|N{n}|R{r_max}|{dtype}"
