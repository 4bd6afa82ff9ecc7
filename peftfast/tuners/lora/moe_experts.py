"""The forward of transformers' mixture-of-experts modules with LoRA on their 3-D expert weights, without building
any E x in x out tensor.

transformers (5.x) keeps the experts of Mixtral, Qwen2/3-MoE, gpt-oss, OLMoE, DeepSeek-V3, ... as stacked 3-D
parameters (`gate_up_proj` [E, 2I, H] or, `is_transposed`, [E, H, 2I]; `down_proj`) in a class decorated with
`transformers.integrations.moe.use_experts_implementation`. The decorator gives every such class one contract:
`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`, the attributes `num_experts`, `has_gate`,
`has_bias`, `is_transposed`, `has_post_expert_norm`, `_is_expert_parallel`, and `_apply_gate` / `act_fn`; each of its
interchangeable implementations (eager loop, batched_mm, grouped_mm, ...) computes the same function from them. This
module is one more implementation of that function, grouped like transformers' `grouped_mm` one (rows sorted by
expert), whose projections go through `peftfast.ops.moe_lora_linear`: the expert weight applied to the rows routed to
each expert, plus each expert's own low-rank term on those rows only.

HF PEFT instead parametrizes the weight as W + delta, so every forward builds (and backward differentiates) the whole
E x in x out delta. For an experts module outside this contract (`experts_contract` returns None: no decorator, expert
parallelism, ...) there is no call to attach the low-rank term to, and `ParamWrapper` falls back to that formulation.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ... import ops

# The factors of one projection's active adapters: lists of A [E, r, in], B [E, out, r] and the scalings.
Factors = tuple[list[torch.Tensor], list[torch.Tensor], list[float]]


@dataclass(frozen=True)
class ExpertsContract:
    """What `lora_experts_forward` reads from a transformers experts module."""

    up_name: str  # "gate_up_proj" (gated) or "up_proj"
    down_name: str
    forward_signature: inspect.Signature

    @property
    def weight_names(self) -> tuple[str, str]:
        return self.up_name, self.down_name


def experts_contract(module: nn.Module) -> ExpertsContract | None:
    """The contract of a `use_experts_implementation` experts module whose experts `lora_experts_forward` can run,
    or None (not such a module, expert-parallel, or weights that aren't float 3-D stacks of matching shapes)."""
    needed = ("num_experts", "has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")
    if not all(hasattr(module, name) for name in needed) or module._is_expert_parallel:
        return None
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    gate = getattr(module, "_apply_gate", None) if module.has_gate else getattr(module, "act_fn", None)
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    if gate is None or not all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in (up, down)):
        return None
    if not all(w.dtype in (torch.float32, torch.float16, torch.bfloat16) for w in (up, down)):
        return None
    if up.shape[0] != module.num_experts or down.shape[0] != module.num_experts:
        return None
    signature = _forward_signature(type(module))
    if signature is None or len(signature.parameters) < 4:
        return None
    return ExpertsContract(up_name=up_name, down_name="down_proj", forward_signature=signature)


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature | None:
    # The decorator wraps forward (functools.wraps); the signature to bind a call against is the model's own.
    forward = getattr(cls.forward, "__wrapped__", cls.forward)
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def routing_arguments(
    contract: ExpertsContract, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(hidden_states, top_k_index, top_k_weights) of a call to the module's forward, or None when the call doesn't
    bind to exactly those three (then it isn't the contract's call)."""
    if kwargs or len(args) != 3:
        try:
            values = list(contract.forward_signature.bind(module, *args, **kwargs).arguments.values())[1:]
        except TypeError:
            return None
    else:
        # How transformers' MoE blocks call their experts: all positional, no binding needed.
        values = list(args)
    if len(values) != 3 or not all(isinstance(value, torch.Tensor) for value in values):
        return None
    hidden_states, top_k_index, top_k_weights = values
    if hidden_states.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
        return None
    return hidden_states, top_k_index, top_k_weights


def _projection(
    module: nn.Module,
    name: str,
    x: torch.Tensor,
    offsets: torch.Tensor,
    weights: dict[str, torch.Tensor],
    factors: dict[str, Factors],
) -> torch.Tensor:
    weight = weights[name] if name in weights else getattr(module, name)
    bias = None
    if module.has_bias:
        bias_name = f"{name}_bias"
        bias = weights[bias_name] if bias_name in weights else getattr(module, bias_name)
    lora_A, lora_B, scaling = factors.get(name, ([], [], []))
    return ops.moe_lora_linear(
        x.to(weight.dtype), weight, bias, offsets, lora_A, lora_B, scaling, transposed=module.is_transposed
    )


def lora_experts_forward(
    module: nn.Module,
    contract: ExpertsContract,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: dict[str, torch.Tensor],
    factors: dict[str, Factors],
) -> torch.Tensor:
    """The experts module's output with `factors` (LoRA on its up/down weights) and `weights` (replacements for any of
    its parameters, e.g. a bias plus its dense LoRA delta), computed as transformers' grouped implementation does:
    rows (token, expert choice) sorted by expert, each projection grouped per expert, the routing weights applied,
    the k choices of each token summed in the output dtype of the projections."""
    num_tokens = hidden_states.shape[0]
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    perm = torch.argsort(expert_ids, stable=True)
    # Each expert's end in the sorted rows, of static shape [E] (bincount's shape depends on the data: a graph break).
    experts = torch.arange(module.num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
    offsets = torch.searchsorted(expert_ids[perm], experts, right=True).to(torch.int32)
    rows = hidden_states[perm // top_k]
    hidden = _projection(module, contract.up_name, rows, offsets, weights, factors)
    hidden = module._apply_gate(hidden) if module.has_gate else module.act_fn(hidden)
    out = _projection(module, contract.down_name, hidden, offsets, weights, factors)
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return out[inverse].view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
