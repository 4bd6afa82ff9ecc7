"""Plain-PyTorch semantics of every op: the oracle kernels are tested against, and the fallback where none runs.

Dtype rule (HF PEFT's, with `autocast_adapter_dtype`): the base output keeps its dtype; the LoRA branch runs in the
adapter weights' dtype (the input is cast to it), is added to the base output, and the sum is cast back to the
base output's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
    """Semantics: for each adapter i, result += scaling[i] * (dropout(x, p[i]) @ A[i].T @ B[i].T + B_bias[i]).

    Shapes: result [..., d_out], x [..., d_in], A[i] [r_i, d_in], B[i] [d_out, r_i], B_bias[i] [d_out] or None.
    """
    result_dtype = result.dtype
    for A, B, B_bias, s, p in zip(lora_A, lora_B, lora_B_bias, scaling, dropout_p):
        x = x.to(A.dtype)
        dropped = F.dropout(x, p=p, training=training) if p > 0 else x
        result = result + F.linear(F.linear(dropped, A), B, B_bias) * s
    return result.to(result_dtype)


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

    Shapes: x [..., d_in], weight [d_out, d_in], bias [d_out] or None; adapters as in `lora_add`.
    """
    return lora_add(F.linear(x, weight, bias), x, lora_A, lora_B, lora_B_bias, scaling, dropout_p, training)
