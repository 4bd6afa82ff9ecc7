"""`LoraModel`: injects LoRA layers into a model and manages them (merge, unload, delete, mixed batches)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import nn

from ...utils.other import ModulesToSaveWrapper, get_submodules
from ..tuners_utils import BaseTuner, BaseTunerLayer
from .config import LoraConfig
from .layer import LoraLayer, dispatch_default


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The first pattern that matches `key_to_match` as `(.*\\.)?(pattern)$`, else the key itself."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key_to_match):
            return pattern
    return key_to_match


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class LoraModel(BaseTuner):
    """Creates LoRA layers in the modules that `LoraConfig.target_modules` selects."""

    prefix = "lora_"
    tuner_layer_cls = LoraLayer

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | dict[str, LoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        self._autocast_adapter_dtype = autocast_adapter_dtype
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)

    def _create_and_replace(
        self,
        config: LoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        kwargs = {
            "r": config.rank_pattern.get(r_key, config.r),
            "lora_alpha": config.alpha_pattern.get(alpha_key, config.lora_alpha),
            "lora_dropout": config.lora_dropout,
            "fan_in_fan_out": config.fan_in_fan_out,
            "init_lora_weights": config.init_lora_weights,
            "use_rslora": config.use_rslora,
            "lora_bias": config.lora_bias,
            "autocast_adapter_dtype": getattr(self, "_autocast_adapter_dtype", True),
        }
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, **{k: v for k, v in kwargs.items() if k != "fan_in_fan_out"})
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        config: LoraConfig, adapter_name: str, target: nn.Module, current_key: str, **kwargs: Any
    ) -> nn.Module:
        new_module = dispatch_default(target, adapter_name, config, **kwargs)
        if new_module is None:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            raise ValueError(
                f"Target module {current_key!r} is a {type(base).__module__}.{type(base).__name__}, which LoRA does "
                "not support. Supported: torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, "
                "transformers.pytorch_utils.Conv1D. Leave it out of target_modules."
            )
        return new_module

    @staticmethod
    def _replace_module(parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad_(False)
        for adapter_name in self.active_adapters:
            bias = self.peft_config[adapter_name].bias
            if bias == "none":
                continue
            if bias == "all":
                for name, param in model.named_parameters():
                    if "bias" in name:
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for module in model.modules():
                    if isinstance(module, LoraLayer) and getattr(module.get_base_layer(), "bias", None) is not None:
                        module.get_base_layer().bias.requires_grad_(True)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Hand `adapter_names` (one per batch row) to every LoRA layer for the duration of one call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Mixed-adapter batches (adapter_names=...) are for inference; call model.eval() first.")
        known = set(self.peft_config) | {"__base__"}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) {unknown} in adapter_names; available: "
                f"{list(self.peft_config)} and '__base__'."
            )
        if any(isinstance(m, LoraLayer) and m.merged for m in self.model.modules()):
            raise ValueError(
                "Mixed-adapter batches (adapter_names=...) can't run with merged adapters; "
                "call unmerge_adapter() first."
            )
        num_beams = kwargs.get("num_beams")
        if num_beams is not None and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer and from the config; the first remaining adapter becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        del self.peft_config[adapter_name]
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(adapter_name)
                if remaining:
                    present = [name for name in remaining if name in module._all_available_adapter_names()]
                    module.set_adapter(present or remaining)
            elif isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(adapter_name, remaining)
        self.active_adapter = remaining if len(remaining) != 1 else remaining[0]

    def _unload_and_optionally_merge(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        keys = [key for key, _ in self.model.named_modules()]
        for key in keys:
            try:
                parent, target, target_name = get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, BaseTunerLayer):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                setattr(parent, target_name, target.get_base_layer())
            elif isinstance(target, ModulesToSaveWrapper):
                chosen = target.modules_to_save[target.active_adapters[0]] if target.active_adapters else None
                setattr(parent, target_name, chosen if chosen is not None else target.original_module)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the base model with no LoRA modules left."""
        return self._unload_and_optionally_merge(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model with every LoRA module removed and nothing merged."""
        return self._unload_and_optionally_merge(merge=False)
