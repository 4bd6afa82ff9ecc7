"""HF PEFT's rewrite of LoRA targets for the MoE models whose experts transformers v5 fused into 3-D parameters.

In transformers v4, Mixtral's experts were `nn.Linear` layers `experts.<i>.w1/w2/w3` and Qwen2-MoE-style ones
`experts.<i>.gate_proj/up_proj/down_proj`; v5 stacks them into `experts.gate_up_proj` (w1 and w3, or gate_proj and
up_proj, concatenated) and `experts.down_proj`, and the router `gate` became a module holding `gate.weight`. HF PEFT
(0.21.2, on transformers >= 5) rewrites a config that names the v4 layers before injecting, so that the same config
trains the same weights: such names move from `target_modules` to `target_parameters`, and the rank and alpha of
`gate_up_proj` double when both of its halves were targeted (two rank-r adapters side by side). `target_modules=None`
becomes an empty set on these models (no default targets). This module does the same, so a config means the same
model in both libraries.

The model types are transformers' own list of architectures converted from v4 checkpoints
(`transformers.conversion_mapping`), plus Mixtral, as HF PEFT takes them.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..tuners_utils import _linear_module_names, check_target_module_exists

# v4 layer name -> v5 name, per conversion pattern (the base architecture transformers converts a model type like).
_V4_TO_V5 = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
# v5 parameter -> the v4 layers fused into it.
_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def _conversion_pattern(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:
        return None
    if get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)


def _resolve_string_targets(config: Any, model: nn.Module, v4_to_v5: dict[str, str]) -> set[str]:
    """The leaf names a regex or "all-linear" `target_modules` means on this model, v4 expert names included."""
    if config.target_modules.lower() == "all-linear":
        # v4's experts and router were Linear layers, so "all-linear" named them too.
        return {name.rsplit(".", 1)[-1] for name in _linear_module_names(model, config)} | v4_to_v5.keys()
    keys = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
    matched = {key.rsplit(".", 1)[-1] for key in keys if check_target_module_exists(config, key)}
    # A regex naming v4 experts matches no v5 key: try it on the v4 name inside each fused parameter's module.
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old_name, new_name in v4_to_v5.items():
        if old_name not in matched and any(
            check_target_module_exists(config, f"{container}.{old_name}") for container in containers.get(new_name, ())
        ):
            matched.add(old_name)
    return matched


def convert_v4_moe_targets(config: Any, model: nn.Module) -> None:
    """Rewrite `config` in place as HF PEFT does on transformers v5 MoE models (see the module docstring); other
    models are left alone. Raises if only one half of a fused parameter is targeted."""
    pattern = _conversion_pattern(model)
    if pattern is None:
        return
    v4_to_v5, fused = _V4_TO_V5[pattern], _FUSED[pattern]
    if isinstance(config.target_modules, str):
        resolved = _resolve_string_targets(config, model, v4_to_v5)
        if not resolved:
            return
        config.target_modules = resolved
    parameters = set(config.target_parameters or ())
    modules = set()
    halves: dict[str, set[str]] = {name: set() for name in fused}
    for target in config.target_modules or ():
        old_name = next((old for old in v4_to_v5 if target == old or target.endswith(f".{old}")), None)
        if old_name is None:
            modules.add(target)
            continue
        parameters.add(v4_to_v5[old_name])
        if v4_to_v5[old_name] in fused:
            halves[v4_to_v5[old_name]].add(old_name)
    for new_name, parts in fused.items():
        present = halves[new_name]
        if 0 < len(present) < len(parts):
            raise ValueError(
                f"target_modules names {sorted(present)} but not {sorted(set(parts) - present)}: on this model they "
                f"are one fused parameter, {new_name!r}, so target all of {sorted(parts)} or none (as in HF PEFT)."
            )
        if len(present) == len(parts):
            # Each v4 layer had its own rank-r adapter; side by side in the fused parameter that is rank len(parts)
            # * r, with alpha scaled alike so that alpha / r stays.
            key = rf".*\.{re.escape(new_name)}"
            config.rank_pattern[key] = config.r * len(parts)
            config.alpha_pattern[key] = config.lora_alpha * len(parts)
    config.target_parameters = parameters
    config.target_modules = modules
