"""Converting an adapter to LoRA (`convert_to_lora`, `save_as_lora`): HF PEFT 0.21.2's entry points.

An adapter whose layers add a delta weight to their base weights (`supports_lora_conversion()`) is approximated,
layer by layer, by the best rank-k factorisation of that delta (truncated SVD): `delta ~= B @ A` with
`B = U[:, :k] * S[:k]` and `A = Vh[:k]`, so the LoRA scaling is 1 (r = lora_alpha). With peftfast's own methods
this re-ranks a LoRA adapter (smaller files, or one rank for all layers).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ...utils.constants import SAFETENSORS_WEIGHTS_NAME
from ...utils.other import ModulesToSaveWrapper
from ...utils.peft_types import PeftType
from ..tuners_utils import BaseTunerLayer
from .config import LoraConfig

# Module names under a PeftModel start with this; the config's target names don't.
_PEFT_MODEL_PREFIX = "base_model.model."


def _rank_for_energy(singular_values: torch.Tensor, threshold: float) -> int:
    """The smallest k whose top-k singular values hold at least `threshold` of the total energy (sum of squares)."""
    energy = torch.cumsum(singular_values**2, dim=0)
    return int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1


def _is_transposed_linear(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"


@torch.no_grad()
def _layer_to_lora(
    layer: BaseTunerLayer, name: str, rank: int | float, adapter_name: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(lora_A [k, in], lora_B [out, k], k) approximating `layer`'s delta weight for `adapter_name`."""
    base = layer.get_base_layer()
    if not (isinstance(base, nn.Linear) or _is_transposed_linear(base)):
        raise TypeError(
            f"convert_to_lora converts adapters on linear layers (torch Linear, transformers Conv1D); {name!r} adapts "
            f"a {type(base).__name__}. Leave it out of the adapter to convert it."
        )
    delta = layer.get_delta_weight(adapter_name)
    dtype = delta.dtype
    # SVD has no half-precision kernels.
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    effective_rank = rank if isinstance(rank, int) else _rank_for_energy(S, rank)
    if effective_rank > S.shape[0]:
        raise ValueError(
            f"The chosen rank {effective_rank} is larger than the weight shape of {name!r} allows "
            f"({S.shape[0]}); choose a lower rank."
        )
    lora_B = (U[:, :effective_rank] * S[:effective_rank]).to(dtype)
    lora_A = Vh[:effective_rank].to(dtype)
    if _is_transposed_linear(base):
        # Conv1D's delta is [in, out]: factor B @ A of it is A.T @ B.T of the [out, in] matrix LoRA stores.
        return lora_B.T.contiguous(), lora_A.T.contiguous(), effective_rank
    return lora_A.contiguous(), lora_B.contiguous(), effective_rank


def _check_convertible(model: nn.Module, rank: int | float, adapter_name: str) -> None:
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(
            f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {rank}."
        )
    if rank == 0:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    unsupported = sorted({repr(type(module)) for module in layers if not module.supports_lora_conversion(adapter_name)})
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}.")
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")


def _new_config(peft_config: Any, rank: int | float) -> LoraConfig:
    """The LoraConfig of the converted adapter: rank and alpha equal (scaling 1); the targets of `peft_config`, if
    any, extended per layer below."""
    fixed_rank = rank if isinstance(rank, int) else 1
    kwargs: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set()}
    if peft_config is None:
        return LoraConfig(r=fixed_rank, lora_alpha=fixed_rank, target_modules=set(), **kwargs)
    targets = copy.copy(peft_config.target_modules)
    kwargs["target_modules"] = set(targets) if isinstance(targets, (list, tuple)) else targets
    kwargs["base_model_name_or_path"] = peft_config.base_model_name_or_path
    if hasattr(peft_config, "layers_pattern"):
        kwargs["layers_pattern"] = peft_config.layers_pattern
        kwargs["layers_to_transform"] = peft_config.layers_to_transform
    return LoraConfig(r=fixed_rank, lora_alpha=fixed_rank, **kwargs)


def convert_to_lora(
    model: nn.Module,
    rank: int | float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Approximate adapter `adapter_name` of `model` (a `PeftModel`, or a model with adapter layers) by a LoRA
    adapter; returns its config and its tensors keyed as in `adapter_model.safetensors`.

    `rank`: an int is the rank of every layer; a float in (0, 1] is an energy threshold: each layer gets the smallest
    rank whose singular values hold that fraction of the sum of squared singular values (recorded in `rank_pattern`
    and `alpha_pattern`). The scaling of the result is 1 (`r == lora_alpha`). `modules_to_save` copies are carried
    over. `compile_kwargs`: compile the per-layer conversion with `torch.compile(**compile_kwargs)`.

    Raises TypeError when a layer can't be converted (or none can), ValueError for a bad rank or a config with
    trainable biases (`bias != "none"`, `lora_bias`), which a LoRA delta can't hold.
    """
    _check_convertible(model, rank, adapter_name)
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    if peft_config is not None and getattr(peft_config.peft_type, "value", peft_config.peft_type) == PeftType.LORA:
        warnings.warn(
            "Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need for that.",
            stacklevel=2,
        )
    bias, lora_bias = getattr(peft_config, "bias", "none"), getattr(peft_config, "lora_bias", False)
    if bias != "none" or lora_bias:
        raise ValueError(
            f"Adapter {adapter_name!r} trains biases (bias={bias!r}, lora_bias={lora_bias}), which a LoRA delta weight "
            "can't hold; converting it is not supported."
        )
    lora_config = _new_config(peft_config, rank)
    convert: Callable[..., tuple[torch.Tensor, torch.Tensor, int]] = (
        torch.compile(_layer_to_lora, **compile_kwargs) if compile_kwargs is not None else _layer_to_lora
    )
    modules = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    state_dict: dict[str, torch.Tensor] = {}
    for name, module in tqdm(modules, disable=not progressbar, desc="Converting to LoRA"):
        lora_A, lora_B, effective_rank = convert(module, name, rank, adapter_name)
        target = name.removeprefix(_PEFT_MODEL_PREFIX)
        if effective_rank != rank or isinstance(lora_config.target_modules, str):
            # A rank of its own, or targets given as one regex that a name can't be added to.
            lora_config.rank_pattern[target] = effective_rank
            lora_config.alpha_pattern[target] = effective_rank
        else:
            lora_config.target_modules.add(target)
        state_dict[f"{name}.lora_A.weight"] = lora_A
        state_dict[f"{name}.lora_B.weight"] = lora_B
    if peft_config is not None and getattr(peft_config, "modules_to_save", None):
        lora_config.modules_to_save = copy.copy(peft_config.modules_to_save)
        for name, module in model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for key, value in module.modules_to_save[adapter_name].state_dict().items():
                    state_dict[f"{name}.{key}"] = value
    return lora_config, state_dict


def save_as_lora(
    path: str | os.PathLike,
    model: nn.Module,
    rank: int | float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> None:
    """`convert_to_lora`, then write the result to the folder `path` (created if needed) as an adapter folder
    (`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads."""
    lora_config, state_dict = convert_to_lora(
        model, rank=rank, adapter_name=adapter_name, progressbar=progressbar, compile_kwargs=compile_kwargs
    )
    os.makedirs(path, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    save_file(tensors, os.path.join(path, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    lora_config.save_pretrained(path)
