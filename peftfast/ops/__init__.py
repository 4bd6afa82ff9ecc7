"""One public entry per op. Each picks its backend per call (see `dispatch`); `reference` holds the torch twins.

Layers call these and never look at devices or backends themselves. `last_backend()` tells which backend the
latest call of an op ran on, for debugging and layer status.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import autograd, dispatch, reference
from .dispatch import available_backends, get_backend, set_backend, use_backend

dispatch.register("lora_linear", "torch", reference.lora_linear)
dispatch.register("lora_add", "torch", reference.lora_add)
# `autograd` imports Triton only when a kernel runs, so `import peftfast` works without it.
dispatch.register("lora_linear", "triton", autograd.lora_linear_triton, can_serve=autograd.can_run_lora_linear)

_last_backend: dict[str, str] = {}


def last_backend(op: str) -> str | None:
    return _last_backend.get(op)


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
    _last_backend["lora_linear"] = backend
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
    _last_backend["lora_add"] = backend
    return implementation(result, x, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)


__all__ = [
    "available_backends",
    "get_backend",
    "last_backend",
    "lora_add",
    "lora_linear",
    "reference",
    "set_backend",
    "use_backend",
]
