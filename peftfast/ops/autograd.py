"""Autograd over the Triton kernels, registered as torch custom ops (with shape-only fakes for torch.compile).

`peftfast::lora_linear_fwd` returns y and the scaled rank-r intermediates S (fp32, saved for backward);
`peftfast::lora_linear_bwd` returns dX, dA_i, dB_i. Dropout masks are re-drawn in backward from the same seeds,
which are data: an int64 tensor with one seed per adapter (so compiled graphs don't break on them, and no kernel is
specialised on a seed's value).

Each op runs one of these plans (the `plan` argument):
- "fused": the fused kernels, y = [x | S] @ [W | B]^T in one `dual_matmul`, dX likewise (what backend "triton" runs);
- "composed": cuBLAS for the base GEMM (F.linear, torch.mm) and the LoRA term from the small kernels, accumulated
  into its output in place;
- "auto": whichever of the two `autotune.choose` timed faster for this shape class on this GPU, and torch (the same
  math, in plain torch ops) for a shape class whose kernels fail to compile or launch here (see `autotune`). The
  plan "auto" settles on is remembered per shape class (`settled_plan`) until the autotune state changes.

The boundary `lora_linear_triton` crosses depends on the call, for host time (eager small-batch decode on a GPU is
bound by it): traced by torch.compile, the custom ops (their fakes trace the shapes); eager with something requiring
grad, `_LoraLinearFunction` (a plain autograd.Function over the same `forward` and `backward`: the custom op's
dispatch and autograd wrapping cost more than the launches at small shapes); eager with nothing requiring grad,
`forward` itself. All three compute the same thing with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import autotune, reference

_FP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GPU_DTYPES = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_kernel_device(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can take `tensor`'s device: a GPU, or the CPU under TRITON_INTERPRET=1."""
    return tensor.is_cuda or (tensor.device.type == "cpu" and _interpreting())


_kernel_module = None


def _kernels():
    """peftfast.kernels.lora_linear, imported at first use (`import peftfast` works without Triton) and kept: an
    import statement in a function costs ~1 us a call."""
    global _kernel_module
    if _kernel_module is None:
        from ..kernels import lora_linear

        _kernel_module = lora_linear
    return _kernel_module


def _dot_dtype(x: torch.Tensor) -> torch.dtype:
    # The interpreter's bf16/fp16 arithmetic is unreliable (bf16 is held as raw uint16): multiply in fp32 there.
    return torch.float32 if x.device.type == "cpu" else x.dtype


def new_seeds(count: int, device: torch.device) -> torch.Tensor:
    """One dropout seed per adapter, drawn from torch's generator (so torch.manual_seed makes runs repeatable)."""
    return torch.randint(0, 2**31 - 1, (count,), device=device, dtype=torch.int64)


def _seed(seeds: torch.Tensor | None, index: int, p: float) -> torch.Tensor | None:
    return seeds[index : index + 1] if p > 0 else None


def shape_class(op: str, x: torch.Tensor, out_features: int, ranks: Sequence[int], dropout_p: Sequence[float]) -> str:
    """The key plans are raced and failures recorded under: rows bucketed to powers of two, the exact features,
    total rank, dtypes and whether dropout is on."""
    dropout = any(p > 0 for p in dropout_p)
    return _format_class(op, autotune.size_class(x.shape[0]), x.shape[1], out_features, sum(ranks), x.dtype, dropout)


_CLASS_KEYS: dict[tuple, str] = {}


def class_key(op: str, x: torch.Tensor, out_features: int, lora_A, dropout_p) -> str:
    """`shape_class` of these arguments, its string built once per distinct set of fields (a pure function of them)."""
    fields = (op, *_class_fields(x, out_features, lora_A, dropout_p)[:-1])
    key = _CLASS_KEYS.get(fields)
    if key is None:
        if len(_CLASS_KEYS) >= 4096:
            _CLASS_KEYS.clear()
        key = _CLASS_KEYS[fields] = _format_class(*fields)
    return key


def _format_class(op: str, m: int, k: int, n: int, rank: int, dtype: torch.dtype, dropout: bool) -> str:
    return f"{op}|M{m}|K{k}|N{n}|R{rank}|{str(dtype).removeprefix('torch.')}|drop{int(dropout)}"


# --------------------------------------------------------------------------------------------------------- forward


def _shrink_all(x, lora_A, scaling, dropout_p, seeds) -> torch.Tensor:
    kernels = _kernels()
    if len(lora_A) == 1:
        p = dropout_p[0]
        return kernels.lora_shrink(x, lora_A[0], scaling[0], p, _seed(seeds, 0, p), dot_dtype=_dot_dtype(x))
    shrunk = torch.empty(x.shape[0], sum(A.shape[0] for A in lora_A), device=x.device, dtype=torch.float32)
    start = 0
    for index, (A, s, p) in enumerate(zip(lora_A, scaling, dropout_p)):
        stop = start + A.shape[0]
        kernels.lora_shrink(x, A, s, p, _seed(seeds, index, p), out=shrunk[:, start:stop], dot_dtype=_dot_dtype(x))
        start = stop
    return shrunk


def _cat_B(lora_B: Sequence[torch.Tensor]) -> torch.Tensor:
    return lora_B[0] if len(lora_B) == 1 else torch.cat(list(lora_B), dim=1)


def expand_fused(x, weight_t, bias, shrunk, B_cat) -> torch.Tensor:
    """y = x W^T + b + S B^T in one kernel (the LoRA product as extra K columns of the base GEMM)."""
    kernels = _kernels()
    return kernels.dual_matmul(x, weight_t, shrunk, B_cat.T, bias, out_dtype=x.dtype, dot_dtype=_dot_dtype(x))


def expand_composed(x, weight, bias, shrunk, B_cat) -> torch.Tensor:
    """y = F.linear(x, W, b) (cuBLAS), then y += S B^T in place (addmm_, in x's dtype as the fused kernel's dot)."""
    y = F.linear(x, weight, bias)
    return y.addmm_(shrunk.to(y.dtype), B_cat.T.to(y.dtype))


def _forward_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward in plain torch (the fallback): the same S, masks drawn from the same seeds."""
    parts = []
    for index, (A, s, p) in enumerate(zip(lora_A, scaling, dropout_p)):
        parts.append(F.linear(_dropped(x, p, _seed(seeds, index, p)), A.float()) * s)
    shrunk = torch.cat(parts, dim=1) if parts else x.new_empty(x.shape[0], 0, dtype=torch.float32)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float()) + shrunk @ _cat_B(lora_B).float().T
    return y.to(x.dtype), shrunk


def dropout_keep_mask(M: int, K: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The kernels' dropout mask for `seed`: drawn by their mask kernel, or by its torch twin (the same bits) where
    that kernel fails to compile or launch, so that the torch fall-backs never depend on a kernel."""
    try:
        return _kernels().dropout_keep_mask(M, K, p, seed)
    except Exception as error:
        if not autotune.is_kernel_failure(error):
            raise
        return reference.dropout_keep_mask(M, K, p, seed)


def _dropped(x: torch.Tensor, p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """dropout(x) in fp32 with the kernels' mask for `seed`."""
    if p <= 0:
        return x.float()
    keep = dropout_keep_mask(x.shape[0], x.shape[1], p, seed)
    return torch.where(keep, x.float() / (1.0 - p), 0.0)


# (direction, shape class fields, device, autotune state) -> the plan "auto" settled on; see `settled_plan`.
_SETTLED: dict[tuple, str] = {}


def _class_fields(x, out_features, lora_A, dropout_p) -> tuple:
    # The fields of `shape_class`, without building its string.
    rank = 0
    for A in lora_A:
        rank += A.shape[0]
    dropout = False
    for p in dropout_p:
        dropout = dropout or p > 0
    return autotune.size_class(x.shape[0]), x.shape[1], out_features, rank, x.dtype, dropout, x.device


def settled_plan(direction: str, fields: tuple) -> str | None:
    """The plan `auto` runs for this shape class once it is settled: the race's cached winner ("fused" or
    "composed"), or "torch" where the kernels failed here; None while unsettled (the race, or a failure, is still to
    come, or autotuning is off and nothing is cached). Keyed on `autotune.state()`, so any change there (a winner
    stored, a failure recorded, the switch or the cache reset) is seen at once."""
    return _SETTLED.get((direction, fields, autotune.state()))


def _settle(direction: str, fields: tuple, op: str, key: str, device: torch.device) -> None:
    cache = autotune.plan_cache(device)
    plan = "torch" if cache.failure("lora_linear", key) is not None else cache.winner(op, key)
    if plan is None and not autotune.enabled():
        # With autotuning off `choose` answers its default for every call of this class (nothing is raced).
        plan = autotune.DEFAULT_PLAN
    if plan is not None:
        if len(_SETTLED) >= 4096:
            _SETTLED.clear()
        _SETTLED[(direction, fields, autotune.state())] = plan


def _run_settled(plan, x, kernels, fallback, fields):
    """`kernels()` for a settled kernel plan, and the fallback of `run_with_fallback` should it fail after all."""
    if plan == "torch":
        return fallback()
    try:
        return kernels()
    except Exception as error:
        if not autotune.is_kernel_failure(error):
            raise
        autotune.record_failure("lora_linear", _class_key(fields), error, x.device)
        return fallback()


def _class_key(fields: tuple) -> str:
    return _format_class("lora_linear", *fields[:-1])


def forward(plan, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, S) for `plan` ("fused", "composed" or "auto"); see the module docstring."""
    if plan == "fused" and len(lora_A) == 1:
        p = dropout_p[0]
        return _kernels().lora_linear_forward(
            x, weight, bias, lora_A[0], lora_B[0], scaling[0], p, _seed(seeds, 0, p), dot_dtype=_dot_dtype(x)
        )
    if plan != "auto":
        shrunk = _shrink_all(x, lora_A, scaling, dropout_p, seeds)
        expand = expand_fused if plan == "fused" else expand_composed
        return expand(x, weight.T if plan == "fused" else weight, bias, shrunk, _cat_B(lora_B)), shrunk
    fields = _class_fields(x, weight.shape[0], lora_A, dropout_p)
    settled = settled_plan("forward", fields)
    if settled is not None:
        return _run_settled(
            settled,
            x,
            lambda: forward(settled, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds),
            lambda: _forward_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds),
            fields,
        )
    key = _class_key(fields)

    def kernels() -> tuple[torch.Tensor, torch.Tensor]:
        shrunk = _shrink_all(x, lora_A, scaling, dropout_p, seeds)
        B_cat = _cat_B(lora_B)
        candidates = {
            "fused": lambda: expand_fused(x, weight.T, bias, shrunk, B_cat),
            "composed": lambda: expand_composed(x, weight, bias, shrunk, B_cat),
        }
        chosen = autotune.choose("lora_linear forward", key, candidates, x.device)
        return candidates[chosen](), shrunk

    result = autotune.run_with_fallback(
        "lora_linear",
        key,
        x.device,
        kernels,
        lambda: _forward_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds),
    )
    _settle("forward", fields, "lora_linear forward", key, x.device)
    return result


@torch.library.custom_op("peftfast::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scaling: list[float],
    dropout_p: list[float],
    seeds: torch.Tensor | None,
    plan: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(plan, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds, plan):
    rank = sum(A.shape[0] for A in lora_A)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], rank, dtype=torch.float32)


# -------------------------------------------------------------------------------------------------------- backward


def _grad_x_fused(grad_out, weight, spans, dtype) -> torch.Tensor:
    """dX = dY W + sum_i mask_i * (s_i dS_i A_i) / (1 - p_i): one dual GEMM, adapters without dropout sharing its
    LoRA product; each further adapter with dropout is accumulated with its own mask."""
    kernels = _kernels()
    dot_dtype = _dot_dtype(grad_out)
    plain = [span for span in spans if span[2] == 0.0]
    masked = [span for span in spans if span[2] > 0.0]
    if plain:
        second_a = torch.cat([span[0] for span in plain], dim=1) if len(plain) > 1 else plain[0][0]
        second_b = torch.cat([span[1] for span in plain], dim=0) if len(plain) > 1 else plain[0][1]
        grad_x = kernels.dual_matmul(grad_out, weight, second_a, second_b, out_dtype=dtype, dot_dtype=dot_dtype)
    else:
        first = masked.pop(0)
        grad_x = kernels.dual_matmul(
            grad_out,
            weight,
            first[0],
            first[1],
            out_dtype=dtype,
            dropout_p=first[2],
            seed=first[3],
            dot_dtype=dot_dtype,
        )
    _accumulate_masked(grad_x, masked)
    return grad_x


def _grad_x_composed(grad_out, weight, spans, dtype) -> torch.Tensor:
    """dX = torch.mm(dY, W) (cuBLAS), then the LoRA terms accumulated into it in place: addmm_ for adapters without
    dropout, the masked-product kernel for the others."""
    grad_x = torch.mm(grad_out, weight).to(dtype)
    plain = [span for span in spans if span[2] == 0.0]
    if plain:
        grad_s = torch.cat([span[0] for span in plain], dim=1) if len(plain) > 1 else plain[0][0]
        A_cat = torch.cat([span[1] for span in plain], dim=0) if len(plain) > 1 else plain[0][1]
        grad_x.addmm_(grad_s.to(dtype), A_cat.to(dtype))
    _accumulate_masked(grad_x, [span for span in spans if span[2] > 0.0])
    return grad_x


def _accumulate_masked(grad_x, masked) -> None:
    kernels = _kernels()
    for grad_s_i, A, p, seed in masked:
        kernels.dual_matmul(
            None, None, grad_s_i, A, out=grad_x, dropout_p=p, seed=seed, accumulate=True, dot_dtype=_dot_dtype(grad_x)
        )


def _backward_kernels(grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad, plan):
    kernels = _kernels()
    dot_dtype = _dot_dtype(x)
    if plan == "fused" and len(lora_A) == 1:
        p = dropout_p[0]
        grad_x, grad_a, grad_b = kernels.lora_linear_backward(
            grad_out,
            x,
            weight,
            lora_A[0],
            lora_B[0],
            shrunk,
            scaling[0],
            p,
            _seed(seeds, 0, p),
            needs_input_grad,
            dot_dtype=dot_dtype,
        )
        grad_x = grad_x if grad_x is not None else x.new_empty(0)
        return grad_x, [grad_a.to(lora_A[0].dtype)], [grad_b.to(lora_B[0].dtype)]
    grad_s, grad_b_cat = kernels.lora_grad_dy(grad_out, _cat_B(lora_B), shrunk, dot_dtype=dot_dtype)
    grad_A, grad_B, spans = [], [], []
    single = len(lora_A) == 1
    start = 0
    for index, (A, B, s, p) in enumerate(zip(lora_A, lora_B, scaling, dropout_p)):
        stop = start + A.shape[0]
        seed = _seed(seeds, index, p)
        # S_i was scaled by s_i, so the gradient reaching the unscaled x A_i^T is s_i * dS_i (scaled in place: dS is
        # this function's own buffer, and the adapters' columns don't overlap).
        grad_s_i = (grad_s if single else grad_s[:, start:stop]).mul_(s)
        grad_A.append(kernels.lora_grad_a(grad_s_i, x, p, seed, dot_dtype=dot_dtype).to(A.dtype))
        # Custom-op outputs may not alias one another: copy each adapter's columns out of the shared dB (N x r, cheap).
        grad_B.append(grad_b_cat.to(B.dtype) if single else grad_b_cat[:, start:stop].to(B.dtype, copy=True))
        spans.append((grad_s_i, A, p, seed))
        start = stop
    if not needs_input_grad:
        return x.new_empty(0), grad_A, grad_B
    if plan == "auto":
        key = shape_class("lora_linear", x, weight.shape[0], [A.shape[0] for A in lora_A], dropout_p)
        candidates = {
            "fused": lambda: _grad_x_fused(grad_out, weight, spans, x.dtype),
            "composed": lambda: _grad_x_composed(grad_out, weight, spans, x.dtype),
        }
        plan = autotune.choose("lora_linear backward", key, candidates, x.device)
    grad_x = (_grad_x_fused if plan == "fused" else _grad_x_composed)(grad_out, weight, spans, x.dtype)
    return grad_x, grad_A, grad_B


def _backward_torch(grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad):
    """The backward in plain torch (the fallback), fp32 math, masks from the same seeds."""
    grad_y = grad_out.float()
    grad_s = grad_y @ _cat_B(lora_B).float()
    grad_b_cat = grad_y.T @ shrunk
    grad_x = grad_y @ weight.float() if needs_input_grad else None
    grad_A, grad_B = [], []
    start = 0
    for index, (A, B, s, p) in enumerate(zip(lora_A, lora_B, scaling, dropout_p)):
        stop = start + A.shape[0]
        seed = _seed(seeds, index, p)
        grad_s_i = grad_s[:, start:stop] * s
        grad_A.append((grad_s_i.T @ _dropped(x, p, seed)).to(A.dtype))
        grad_B.append(grad_b_cat[:, start:stop].to(B.dtype, copy=True))
        if grad_x is not None:
            through = grad_s_i @ A.float()
            if p > 0:
                keep = dropout_keep_mask(x.shape[0], x.shape[1], p, seed)
                through = torch.where(keep, through / (1.0 - p), 0.0)
            grad_x = grad_x + through
        start = stop
    return (grad_x.to(x.dtype) if grad_x is not None else x.new_empty(0)), grad_A, grad_B


def backward(plan, grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad):
    """(dX, [dA_i], [dB_i]) for `plan`; see the module docstring."""
    args = (grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad)
    if plan != "auto":
        return _backward_kernels(*args, plan)
    fields = _class_fields(x, weight.shape[0], lora_A, dropout_p)
    settled = settled_plan("backward", fields)
    if settled is not None:
        return _run_settled(
            settled, x, lambda: _backward_kernels(*args, settled), lambda: _backward_torch(*args), fields
        )
    key = _class_key(fields)
    result = autotune.run_with_fallback(
        "lora_linear", key, x.device, lambda: _backward_kernels(*args, plan), lambda: _backward_torch(*args)
    )
    _settle("backward", fields, "lora_linear backward", key, x.device)
    return result


def backward_eager(grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad, plan):
    """`lora_linear_bwd` without the custom op's dispatch (same arguments, same code), for eager callers."""
    return backward(plan, grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad)


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
    seeds: torch.Tensor | None,
    needs_input_grad: bool,
    plan: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    return backward(plan, grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad)


@lora_linear_bwd.register_fake
def _(grad_out, x, weight, lora_A, lora_B, shrunk, scaling, dropout_p, seeds, needs_input_grad, plan):
    grad_x = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, [A.new_empty(A.shape) for A in lora_A], [B.new_empty(B.shape) for B in lora_B]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds, plan = inputs
    ctx.save_for_backward(x, weight, output[1], seeds, *lora_A, *lora_B)
    ctx.num_adapters = len(lora_A)
    ctx.scaling, ctx.dropout_p, ctx.plan = list(scaling), list(dropout_p), plan
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, grad_shrunk):
    x, weight, shrunk, seeds, *adapters = ctx.saved_tensors
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
        seeds,
        ctx.needs_input_grad[0],
        ctx.plan,
    )
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return (grad_x if ctx.needs_input_grad[0] else None, None, grad_bias, grad_A, grad_B, None, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from ..kernels import lora_linear  # noqa: F401
    except ImportError:
        return False
    return True


def serves_activation_dtype(x: torch.Tensor) -> bool:
    """The kernels take fp16/bf16 activations on a GPU (their dots run on tensor cores); fp32 ones only under the
    interpreter. On a GPU, fp32 dots are IEEE fp32 on FMA units, whose operand tiles spilled registers in the compile
    gate, and cuBLAS's SGEMM (the torch backend) is the better plan for them anyway."""
    return x.dtype in _GPU_DTYPES or (x.dtype == torch.float32 and x.device.type == "cpu")


def can_run_lora_linear(x, weight, bias, lora_A, lora_B, lora_B_bias=None, *args, **kwargs) -> bool:
    """Whether the Triton kernels serve this call: GPU tensors with fp16/bf16 activations (or CPU tensors, fp32 too,
    under TRITON_INTERPRET=1), a frozen base weight of the activations' dtype, adapters in fp32 or that dtype, no
    lora_B bias."""
    on_device = on_kernel_device(x)
    if not on_device or not lora_A or not serves_activation_dtype(x) or weight.dtype != x.dtype:
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


def lora_linear_signature(x, weight, bias, lora_A, lora_B, lora_B_bias=None, *args, **kwargs) -> tuple:
    """Everything of a `lora_linear` call that `can_run_lora_linear` reads (devices, dtypes, the base weight's
    requires_grad, the adapter count, B biases, whether x fits int32 offsets): the key its resolution is cached on."""
    signature = [x.device, x.dtype, x.numel() < 2**31, weight.device, weight.dtype, weight.requires_grad, len(lora_A)]
    signature.append(None if bias is None else bias.device)
    for A in lora_A:
        signature += (A.device, A.dtype)
    for B in lora_B:
        signature += (B.device, B.dtype)
    if lora_B_bias:
        signature.append(any(b is not None for b in lora_B_bias))
    return tuple(signature)


def requested_plan() -> str:
    """ "fused" when backend "triton" was asked for by name (it runs what was asked), else "auto"."""
    from .dispatch import get_backend

    return "fused" if get_backend() == "triton" else "auto"


class _LoraLinearFunction(torch.autograd.Function):
    """The eager autograd boundary: `forward` and `backward` as the custom ops run them, without their dispatch.

    apply(x, weight, bias, settings, *lora_A, *lora_B) -> y, settings = (plan, scaling, dropout_p, seeds,
    n_adapters): the adapters are separate arguments so that autograd sees them, everything else is one argument
    (autograd.Function's per-argument bookkeeping costs ~0.5 us an argument)."""

    @staticmethod
    def forward(ctx, x, weight, bias, settings, *adapters):
        plan, scaling, dropout_p, seeds, n = settings
        y, shrunk = forward(plan, x, weight, bias, adapters[:n], adapters[n:], scaling, dropout_p, seeds)
        ctx.save_for_backward(x, weight, shrunk, seeds, *adapters)
        ctx.settings = settings
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, shrunk, seeds, *adapters = ctx.saved_tensors
        plan, scaling, dropout_p, _, n = ctx.settings
        needs = ctx.needs_input_grad
        grad_out = grad_y.contiguous()
        grad_x, grad_A, grad_B = backward(
            plan, grad_out, x, weight, adapters[:n], adapters[n:], shrunk, scaling, dropout_p, seeds, needs[0]
        )
        grad_bias = grad_y.sum(0) if ctx.has_bias and needs[2] else None
        return (grad_x if needs[0] else None, None, grad_bias, None, *grad_A, *grad_B)


def _requires_grad(x, bias, lora_A, lora_B) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (bias is not None and bias.requires_grad):
        return True
    for tensor in lora_A:
        if tensor.requires_grad:
            return True
    for tensor in lora_B:
        if tensor.requires_grad:
            return True
    return False


def lora_linear_triton(x, weight, bias, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training):
    """The Triton `lora_linear`: same semantics and arguments as `reference.lora_linear`."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    ps = [float(p) if training else 0.0 for p in dropout_p]
    seeds = new_seeds(len(ps), x.device) if training and any(p > 0 for p in ps) else None
    scaling = [float(s) for s in scaling]
    plan = requested_plan()
    if torch.compiler.is_compiling():
        y, _ = lora_linear_fwd(x2d, weight, bias, list(lora_A), list(lora_B), scaling, ps, seeds, plan)
    elif _requires_grad(x2d, bias, lora_A, lora_B):
        settings = (plan, scaling, ps, seeds, len(lora_A))
        y = _LoraLinearFunction.apply(x2d, weight, bias, settings, *lora_A, *lora_B)
    else:
        y, _ = forward(plan, x2d, weight, bias, lora_A, lora_B, scaling, ps, seeds)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
