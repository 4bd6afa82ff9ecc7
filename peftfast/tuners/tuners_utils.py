"""What every adapter method shares: finding target modules, replacing them, and per-layer adapter bookkeeping."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..utils.constants import (
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SEQ_CLS_HEAD_NAMES,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from ..utils.other import ModulesToSaveWrapper, get_submodules, set_trainable_modules
from ..utils.peft_types import TaskType


class _ExcludedModule:
    """Marks a module that `exclude_modules` or `modules_to_save` keep an adapter off (falsy, unlike a match)."""

    def __bool__(self) -> bool:
        return False


def match_target_against_key(target_pattern: str, key: str) -> bool:
    return re.fullmatch(target_pattern, key) is not None


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    # Take the first numbered segment after the pattern so that nested indices (MoE experts) are not taken for the
    # layer index.
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def check_target_module_exists(config: PeftConfig, key: str) -> bool | _ExcludedModule:
    """Whether the module named `key` is a target of `config`, with HF PEFT's matching rules.

    A string `target_modules` is a regex that must match the whole name; a collection matches a name equal to an
    entry or ending in "." + entry, optionally limited to `layers_to_transform`.
    """
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _ExcludedModule()
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return _ExcludedModule()
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in modules_to_save):
        return _ExcludedModule()

    targets = config.target_modules
    if isinstance(targets, str):
        return match_target_against_key(targets, key)
    if key in targets:
        return True
    found = any(key.endswith(f".{name}") for name in targets)
    layer_indexes = getattr(config, "layers_to_transform", None)
    uses_layer_indexes = layer_indexes is not None and (not isinstance(layer_indexes, list) or len(layer_indexes) > 0)
    if found and uses_layer_indexes:
        index = _layer_index(key, getattr(config, "layers_pattern", None))
        if index is None:
            return False
        return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return found


def _linear_module_names(model: nn.Module, config: PeftConfig) -> set[str]:
    """Names of every Linear / transformers Conv1D layer except the output head ("all-linear")."""
    linear_types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types = (nn.Linear, Conv1D)
    except ImportError:
        pass
    names = set()
    for name, module in model.named_modules():
        is_linear_adapter = isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__
        if isinstance(module, linear_types) or is_linear_adapter:
            names.add(name)
    excluded = set()
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings) and hasattr(model, "config"):
        output_embeddings = get_output_embeddings()
        if output_embeddings is not None:
            excluded.update(name for name, module in model.named_modules() if module is output_embeddings)
        elif config.task_type == TaskType.SEQ_CLS:
            for head_name in SEQ_CLS_HEAD_NAMES:
                head = getattr(model, head_name, None)
                if head is not None:
                    excluded.update(name for name, module in model.named_modules() if module is head)
                    break
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            excluded.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return names - excluded


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)


class BaseTunerLayer:
    """Per-layer adapter bookkeeping shared by every method's layers (mixed into an `nn.Module`).

    Subclasses set `adapter_layer_names` (attributes holding trainable per-adapter modules or parameters) and
    `other_param_names` (per-adapter plain values), and hold the wrapped module as `base_layer`.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    _disable_adapters: bool = False
    _active_adapter: str | list[str] = "default"
    merged_adapters: list[str]

    def get_base_layer(self) -> nn.Module:
        base_layer = self
        while hasattr(base_layer, "base_layer"):
            base_layer = base_layer.base_layer
        return base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def _all_available_adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if hasattr(holder, "keys"):
                names.extend(name for name in holder.keys() if name not in names)
        return names

    def _adapter_holders(self) -> Iterable[nn.Module | nn.ParameterDict]:
        return (getattr(self, name) for name in self.adapter_layer_names)

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters of this layer on (active ones trainable again) or off (all frozen)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for holder in self._adapter_holders():
                holder.requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_names` active; active adapters train (unless `inference_mode`), the others are frozen."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for holder in self._adapter_holders():
            for name, item in holder.items():
                item.requires_grad_(name in adapter_names and not inference_mode)
        self._active_adapter = adapter_names if len(adapter_names) != 1 else adapter_names[0]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name` from this layer; if it was active, the first remaining adapter becomes active."""
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if adapter_name in holder:
                del holder[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [name for name in self.active_adapters if name != adapter_name]
            if not remaining:
                others = self._all_available_adapter_names()
                remaining = others[:1]
            if remaining:
                self.set_adapter(remaining)
            else:
                self._active_adapter = []


class BaseTuner(nn.Module):
    """Wraps a model and injects one method's adapter layers into the modules its config targets.

    Subclasses implement `_create_and_replace` and `_mark_only_adapters_as_trainable`, and set `prefix` (the
    start of every adapter parameter name, e.g. "lora_") and `tuner_layer_cls`.
    """

    prefix: str = ""
    tuner_layer_cls: type[BaseTunerLayer] = BaseTunerLayer
    default_target_modules: dict[str, list[str] | str] = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | dict[str, PeftConfig],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        if not hasattr(self, "peft_config"):
            self.peft_config = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        else:
            if isinstance(peft_config, dict):
                self.peft_config.update(peft_config)
            else:
                self.peft_config[adapter_name] = peft_config
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward(*args, **kwargs)

    def _prepare_adapter_config(self, config: PeftConfig, model: nn.Module) -> PeftConfig:
        if getattr(config, "target_modules", None) is None:
            model_type = _model_type(model)
            if model_type not in self.default_target_modules:
                raise ValueError(
                    "target_modules is not set and peftfast has no default targets for "
                    f"{'this model' if model_type is None else 'model_type ' + repr(model_type)}; "
                    "pass target_modules (a list of module names, a regex, or 'all-linear')."
                )
            default = self.default_target_modules[model_type]
            config.target_modules = set(default) if isinstance(default, list) else default
        if isinstance(config.target_modules, str) and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            config.target_modules = _linear_module_names(model, config)
        return config

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        if len(self.peft_config) > 1 and config.bias != "none":
            active = [name for name, cfg in self.peft_config.items() if cfg is not config and cfg.bias != "none"]
            if active:
                raise ValueError(
                    f"{type(self).__name__} supports only one adapter with bias != 'none' (already: {active}); "
                    "set bias='none' on the new adapter."
                )

    def _create_and_replace(
        self,
        config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        raise NotImplementedError

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        raise NotImplementedError

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        """Replace every module that `self.peft_config[adapter_name]` targets by an adapter layer.

        On an error (no module matched, a bad shape, an unsupported layer type) the model is left as it was.
        """
        config = self._prepare_adapter_config(self.peft_config[adapter_name], model)
        self._check_new_adapter_config(config)
        key_list = [key for key, _ in model.named_modules()]
        matched: list[str] = []
        excluded: list[str] = []
        replacements = []
        for key in key_list:
            if not key or any(part == "modules_to_save" or part == "original_module" for part in key.split(".")):
                continue
            result = check_target_module_exists(config, key)
            if isinstance(result, _ExcludedModule):
                excluded.append(key)
            elif result:
                matched.append(key)
        if not matched:
            sample = [key for key in key_list if key][:8]
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            detail = f" ({len(excluded)} matching module(s) were excluded)" if excluded else ""
            raise ValueError(
                f"Target modules {targets} not found in the base model{detail}. Module names look like: {sample}. "
                "Check target_modules (names, name suffixes, or a regex matching the full name)."
            )
        # Remember every original module so that a failure part-way puts the model back as it was.
        for key in matched:
            parent, target, target_name = get_submodules(model, key)
            replacements.append((key, parent, target, target_name))
        try:
            for key, parent, target, target_name in replacements:
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
        except Exception:
            for _, parent, target, name in replacements:
                current = getattr(parent, name)
                if isinstance(target, BaseTunerLayer):
                    if adapter_name in target._all_available_adapter_names():
                        target.delete_adapter(adapter_name)
                elif current is not target:
                    setattr(parent, name, target)
            raise
        self.targeted_module_names.extend(key for key in matched if key not in self.targeted_module_names)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for name, param in model.named_parameters():
                if adapter_name in name:
                    param.requires_grad_(False)
        if getattr(config, "modules_to_save", None):
            set_trainable_modules(model, adapter_name, config.modules_to_save, inference_mode=config.inference_mode)

    def _tuner_layers(self) -> Iterable[BaseTunerLayer]:
        return (module for module in self.model.modules() if isinstance(module, BaseTunerLayer))

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [name for name in names if name not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {missing} not found; available adapters: {list(self.peft_config)}.")
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                if module.merged:
                    warnings.warn("Adapters are merged; unmerge them before switching, or results mix.", stacklevel=2)
                    module.unmerge()
                module.set_adapter(names, inference_mode=inference_mode)
            elif isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names if len(names) != 1 else names[0]

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    @contextmanager
    def _disabled_adapters(self):
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for module in self._tuner_layers():
            module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for module in self._tuner_layers():
            module.unmerge()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)


def _parameter_count(param: torch.Tensor) -> int:
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):
        count = param.ds_numel
    if type(param).__name__ == "Params4bit":
        # bitsandbytes packs two 4-bit values per byte of quant_storage: count the weights, not the bytes.
        itemsize = param.element_size() if hasattr(param, "element_size") else 1
        count = count * 2 * itemsize
    return count


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit bitsandbytes weights as HF PEFT does."""
    trainable = total = 0
    for _, param in module.named_parameters():
        count = _parameter_count(param)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total
