"""LoftQ on a model that is already quantized with bitsandbytes 4-bit (https://arxiv.org/abs/2310.08659).

`replace_lora_weights_loftq` is HF PEFT's path for such a model: it reads the full-precision weights from a
safetensors file and refits each 4-bit LoRA layer's factors to `W - dequant(Q)` of its stored quantized weight. LoftQ
on a full-precision layer (`init_lora_weights="loftq"`) is `peftfast.tuners.lora.init.loftq_init`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import nn

from .bnb import Linear4bit
from .init import low_rank_fit


class _SafetensorsWeights:
    """Full-precision tensors of a model, read one at a time from its (possibly sharded) safetensors file(s)."""

    def __init__(self, peft_model: nn.Module, model_path: str | None) -> None:
        if model_path is None:
            raise ValueError(
                "replace_lora_weights_loftq needs model_path: the folder (or model.safetensors file) of the "
                "full-precision model (peftfast doesn't look models up in the hub cache)."
            )
        model_path = os.fspath(model_path)
        file_path = model_path if model_path.endswith(".safetensors") else os.path.join(model_path, "model.safetensors")
        self.base_model_prefix = getattr(peft_model.get_base_model(), "base_model_prefix", None)
        if os.path.isfile(file_path):
            self.files = None
            self.file_path = file_path
            return
        index_path = os.path.join(os.path.dirname(file_path), "model.safetensors.index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"Neither {file_path} nor a sharded {index_path} exists: replace_lora_weights_loftq reads the "
                "full-precision weights from safetensors files only."
            )
        with open(index_path) as handle:
            weight_map = json.load(handle)["weight_map"]
        folder = os.path.dirname(index_path)
        self.files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}

    def get_tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [name]
        if self.base_model_prefix and name.startswith(self.base_model_prefix + "."):
            candidates.append(name[len(self.base_model_prefix) + 1 :])
        for candidate in candidates:
            file_path = self.file_path if self.files is None else self.files.get(candidate)
            if file_path is None:
                continue
            with safe_open(file_path, framework="pt", device="cpu") as handle:
                if candidate in handle.keys():
                    return handle.get_tensor(candidate)
        raise KeyError(f"The full-precision weight {name!r} is not in the safetensors file(s) given as model_path.")


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Set the LoRA factors of every bitsandbytes 4-bit LoRA layer of `peft_model` to LoftQ's (one iteration): the
    rank-r fit of `W - dequant(Q)`, W read from the full-precision safetensors file(s) at `model_path`, Q the
    layer's stored quantized weight (left as it is).

    `callback(peft_model, module_name) -> bool`, if given, runs after each layer; False puts that layer's previous
    factors back (e.g. keep a replacement only when it brings the logits closer to the full-precision model's).
    """
    prefix = "base_model.model."
    layers = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit) or adapter_name not in module.lora_A:
            continue
        if not name.startswith(prefix):
            raise TypeError(
                f"replace_lora_weights_loftq needs a PeftModel; {type(peft_model).__name__} holds the LoRA layer "
                f"{name!r} outside base_model.model."
            )
        layers.append((name[len(prefix) :], module))
    if not layers:
        raise ValueError(
            f"replace_lora_weights_loftq found no bitsandbytes 4-bit LoRA layer with adapter {adapter_name!r} in the "
            "model; it is for models quantized with bitsandbytes (load_in_4bit)."
        )
    weights = _SafetensorsWeights(peft_model, model_path)
    for name, module in layers:
        target = weights.get_tensor(name + ".weight").to(module.get_base_layer().weight.device, torch.float32)
        lora_B, lora_A = low_rank_fit(target - module._dequantized_weight().to(torch.float32), module.r[adapter_name])
        previous = (module.lora_A[adapter_name].weight.data, module.lora_B[adapter_name].weight.data)
        module.lora_A[adapter_name].weight.data = lora_A.to(previous[0].dtype)
        module.lora_B[adapter_name].weight.data = lora_B.to(previous[1].dtype)
        if callback is not None and not callback(peft_model, name):
            module.lora_A[adapter_name].weight.data, module.lora_B[adapter_name].weight.data = previous
