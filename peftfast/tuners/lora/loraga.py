"""LoRA-GA: LoRA factors aligned with the full fine-tuning gradient (https://arxiv.org/abs/2407.05000).

`preprocess_loraga(model, lora_config, train_step)` runs the user's `train_step` (forward and backward passes)
with gradients on the target weights only, and leaves on each target layer the mean weight gradient per backward
pass (`_peft_loraga_grad`); `get_peft_model` with `init_lora_weights="lora_ga"` then builds the factors from its
SVD (`peftfast.tuners.lora.init`). As HF PEFT, including its `cache_file` format (read with `weights_only=True`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..tuners_utils import _model_type
from .config import LoraConfig
from .init import preprocessing_targets


@torch.no_grad()
def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None],
    cache_file: str | None = None,
) -> None:
    """Estimate each target layer's weight gradient over `train_step()` and store it on the layer.

    Args:
        model: the model the adapter will be added to (before `get_peft_model`).
        lora_config: its LoraConfig, with `init_lora_weights="lora_ga"` and `lora_ga_config`. If its
            `target_modules` is None it is set to the model type's default targets (as HF PEFT does).
        train_step: runs forward and backward passes on some training batches; gradients add up over all of them
            and are divided by the number of backward passes through each layer.
        cache_file: if it exists, the gradients are read from it instead; otherwise they are written to it.
    """
    if lora_config.lora_ga_config is None:
        raise ValueError(
            "preprocess_loraga needs lora_config.lora_ga_config: create the LoraConfig with "
            "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
        )
    if lora_config.target_modules is None:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(_model_type(model))
        if default is None:
            raise ValueError("lora_config.target_modules is not set and the model has no default targets; set it.")
        lora_config.target_modules = set(default)
    layers = list(preprocessing_targets(model, lora_config))
    for name, module in layers:
        if hasattr(module, "quant_state") or hasattr(module.weight, "quant_state"):
            raise ValueError(
                f"LoRA-GA needs full-precision gradients, but the target {name!r} is quantized; preprocess the "
                "full-precision model."
            )
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        device = next(iter(getattr(model, "module", model).parameters())).device
        cache = torch.load(cache_file, map_location=device, weights_only=True)
        for name, module in layers:
            key = f"{name}._peft_loraga_grad"
            if key not in cache:
                raise ValueError(f"The LoRA-GA cache {cache_file!r} has no gradient for {name!r}.")
            module._peft_loraga_grad = cache[key]
        return
    if not layers:
        raise ValueError(
            "LoRA-GA found no nn.Linear or Conv1D layer among the target_modules; it initialises only those."
        )
    _estimate_gradients(model, layers, train_step)
    if cache_file is not None:
        folder = os.path.dirname(cache_file)
        if folder:
            os.makedirs(folder, exist_ok=True)
        torch.save({f"{name}._peft_loraga_grad": module._peft_loraga_grad for name, module in layers}, cache_file)


def _estimate_gradients(model: nn.Module, layers: list[tuple[str, nn.Module]], train_step: Callable[[], None]) -> None:
    """Gradients on the target weights only (everything else frozen for the duration), summed over `train_step`
    and divided by the number of backward passes that reached each weight."""
    was_training = model.training
    model.train()
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    counts = dict.fromkeys((name for name, _ in layers), 0)
    handles = []
    try:
        for param in requires_grad:
            param.requires_grad_(False)
        for name, module in layers:
            module.weight.requires_grad_(True)
            module.weight.grad = None

            def count(grad: torch.Tensor, name: str = name) -> torch.Tensor:
                counts[name] += 1
                return grad

            handles.append(module.weight.register_hook(count))
        with torch.enable_grad():
            train_step()
        for name, module in layers:
            if counts[name] > 0 and module.weight.grad is not None:
                module._peft_loraga_grad = module.weight.grad.detach() / counts[name]
    finally:
        for handle in handles:
            handle.remove()
        for _, module in layers:
            module.weight.grad = None
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        model.train(was_training)
