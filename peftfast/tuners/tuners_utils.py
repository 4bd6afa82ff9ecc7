"""What every adapter method shares: finding target modules, replacing them, and per-layer adapter bookkeeping."""

from __future__ import annotations

import collections
import copy
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..config import PeftConfig
from ..registry import PROMPT_ENCODER_ROLE, TUNER_ROLE
from ..utils.constants import (
    EMBEDDING_LAYER_NAMES,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SEQ_CLS_HEAD_NAMES,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from ..utils.error import NoMatchingPeftModuleError
from ..utils.names import adapter_name_list, check_adapter_name, check_known_adapters
from ..utils.other import (
    AdapterState,
    AuxiliaryTrainingWrapper,
    TrainableTokensWrapper,
    check_token_indices,
    get_submodules,
    init_empty_weights,
    input_embeddings_name,
    module_names_tied_with_embedding,
    modules_outside_adapters,
    modules_outside_wrappers,
    named_modules_outside_adapters,
    set_additional_trainable_modules,
    trainable_token_targets,
    weights_are_tied,
)
from ..utils.peft_types import TaskType
from ..utils.rollback import ModuleTreeRollback
from ..utils.warning import PeftWarning
from ._buffer_dict import BufferDict

_NO_WEIGHT_TYING_MESSAGE = (
    "The model's output layer is tied to its input embeddings (tie_word_embeddings=True) and a tied layer is part of "
    "the adapter, but this method can't tie their adapters, so the two are trained apart. This can lead to "
    "complications, for example when merging the adapter or converting the model to other formats."
)


def _nothing_to_restore() -> None:
    return None


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


def _ends_with_entry(key: str, entries: set[str] | frozenset[str]) -> bool:
    """Whether `key` ends in "." + one of `entries`: some part of it after a dot is an entry (one set lookup per
    dot, instead of one `endswith` per entry: all-linear on a 64-layer model lists 448 entries)."""
    dot = key.find(".")
    while dot != -1:
        if key[dot + 1 :] in entries:
            return True
        dot = key.find(".", dot + 1)
    return False


class _TargetMatcher:
    """`check_target_module_exists` for one config and many keys: the name lists are made sets once."""

    def __init__(self, config: PeftConfig) -> None:
        self.config = config
        exclude = getattr(config, "exclude_modules", None)
        self.exclude = exclude if isinstance(exclude, str) or not exclude else frozenset(exclude)
        modules_to_save = getattr(config, "modules_to_save", None) or ()
        self.modules_to_save = [re.compile(rf"(^|.*\.){re.escape(name)}($|\..*)") for name in modules_to_save]
        targets = config.target_modules
        self.targets = targets if isinstance(targets, str) else frozenset(targets)

    def __call__(self, key: str) -> bool | _ExcludedModule:
        config, exclude = self.config, self.exclude
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, key):
                    return _ExcludedModule()
            elif key in exclude or _ends_with_entry(key, exclude):
                return _ExcludedModule()
        if any(pattern.match(key) for pattern in self.modules_to_save):
            return _ExcludedModule()
        targets = self.targets
        if isinstance(targets, str):
            return match_target_against_key(targets, key)
        if key in targets:
            return True
        found = _ends_with_entry(key, targets)
        layer_indexes = getattr(config, "layers_to_transform", None)
        uses_layer_indexes = layer_indexes is not None and (
            not isinstance(layer_indexes, list) or len(layer_indexes) > 0
        )
        if found and uses_layer_indexes:
            index = _layer_index(key, getattr(config, "layers_pattern", None))
            if index is None:
                return False
            return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
        return found


def check_target_module_exists(config: PeftConfig, key: str) -> bool | _ExcludedModule:
    """Whether the module named `key` is a target of `config`, with HF PEFT's matching rules.

    A string `target_modules` is a regex that must match the whole name; a collection matches a name equal to an
    entry or ending in "." + entry, optionally limited to `layers_to_transform`.
    """
    return _TargetMatcher(config)(key)


def _check_layers_to_transform(config: PeftConfig, keys: list[str], matched: list[str]) -> None:
    """Say which `layers_to_transform` indices name no layer of the model: a ValueError when that leaves nothing to
    adapt, a warning when other layers were found."""
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or config.target_modules is None or isinstance(config.target_modules, str):
        return
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    if not wanted:
        return
    targets = config.target_modules
    layers_pattern = getattr(config, "layers_pattern", None)
    # The layers holding a module that target_modules names, whatever layers_to_transform says.
    present = {
        _layer_index(key, layers_pattern)
        for key in keys
        if key in targets or any(key.endswith(f".{name}") for name in targets)
    }
    if not present:
        return
    indexed = sorted(index for index in present if index is not None)
    missing = sorted(set(wanted) - set(indexed))
    if not missing:
        return
    pattern = f" under layers_pattern={layers_pattern!r}" if layers_pattern else ""
    if indexed:
        found = f"the modules target_modules names are in layers {indexed}{pattern}"
    else:
        found = f"no module target_modules names has a layer index in its name (like '...layers.3.q_proj'){pattern}"
    message = f"layers_to_transform={wanted} names layers {missing} that the model does not have: {found}."
    if not matched:
        raise ValueError(message + " Nothing was adapted; pick layer indices from that list.")
    warnings.warn(message + f" Only layers {sorted(set(wanted) & set(indexed))} get the adapter.", stacklevel=4)


def _warn_unmatched_patterns(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Warn about `rank_pattern` / `alpha_pattern` keys that match no module carrying the adapter (as HF PEFT does;
    the same `(.*\\.)?(KEY)$` matching that picks a module's rank)."""
    if not (getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None)):
        return
    # A layer on a parameter (target_parameters) is matched by the parameter's key, "<module>.<parameter>".
    targeted = [
        f"{_without_base_layers(name)}.{module.parameter_name}" if hasattr(module, "parameter_name") else name
        for name, module in named_modules_outside_adapters(model)
        if isinstance(module, BaseTunerLayer) and adapter_name in module._get_available_adapters()
    ]
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name, None) or {}
        unmatched = sorted(key for key in patterns if not any(re.match(rf"(.*\.)?({key})$", name) for name in targeted))
        if unmatched:
            warnings.warn(
                f"{field_name} keys {unmatched} of adapter {adapter_name!r} match no module it targets and are "
                f"ignored; the modules it targets are {targeted[:8]}{' ...' if len(targeted) > 8 else ''}.",
                RuntimeWarning,
                stacklevel=4,
            )


def _without_base_layers(name: str) -> str:
    """The name a module had before adapter layers wrapped it: "mlp.experts.base_layer.base_layer" -> "mlp.experts"."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _is_adapter_internal(name: str, tuner_layers: set[str]) -> bool:
    """Whether module `name` is an adapter layer's own state: inside it, other than along its `base_layer` chain."""
    parts = name.split(".")
    for depth in range(len(parts)):
        if ".".join(parts[:depth]) in tuner_layers and parts[depth] != "base_layer":
            return True
    return False


def parameter_targets(model: nn.Module, config: PeftConfig) -> list[tuple[str, str, str]]:
    """(module name, parameter name, parameter key) of each `nn.Parameter` that `config.target_parameters` selects,
    with HF PEFT's matching: the key "<module>.<parameter>" (module names as before any adapter wrapped them) equals an
    entry or ends in "." + entry. Modules come in `named_modules` order, a module's parameters in registration order
    (HF PEFT's order, which decides how the wrappers of several parameters of one module nest). Adapter weights and
    what auxiliary wrappers hold (modules_to_save copies, trainable tokens) are never targets."""
    targets = sorted(set(getattr(config, "target_parameters", None) or ()))
    if not targets:
        return []
    modules = modules_outside_wrappers(model)
    tuner_layers = {name for name, module in modules if isinstance(module, BaseTunerLayer)}
    found: list[tuple[str, str, str]] = []
    for name, module in modules:
        if _is_adapter_internal(name, tuner_layers):
            continue
        unwrapped = _without_base_layers(name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{unwrapped}.{param_name}" if unwrapped else param_name
            if key in targets or any(key.endswith(f".{target}") for target in targets):
                if not unwrapped:
                    raise ValueError(
                        f"target_parameters selects {param_name!r}, a parameter of the top-level module; only "
                        "parameters of submodules can be targeted (as in HF PEFT)."
                    )
                found.append((unwrapped, param_name, key))
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


def _extend_unique(names: list[str], new: list[str]) -> None:
    """Append the names of `new` not in `names` yet, in order, each once (a set: a list's `in` made this quadratic in
    the number of targets)."""
    known = set(names)
    for name in new:
        if name not in known:
            known.add(name)
            names.append(name)


def _parameter_ids(holder: nn.Module | torch.Tensor) -> set[int]:
    """The ids of `holder.parameters()` (a tensor: its own), collected from the modules' dicts (`parameters()` costs
    microseconds per call, paid for every holder of every layer)."""
    if not isinstance(holder, nn.Module):
        return {id(holder)}
    ids: set[int] = set()
    stack = [holder]
    while stack:
        module = stack.pop()
        ids.update(id(param) for param in module._parameters.values() if param is not None)
        stack.extend(child for child in module._modules.values() if child is not None)
    return ids


def set_entry_requires_grad(item: nn.Module | torch.Tensor, requires_grad: bool) -> None:
    """`item.requires_grad_(requires_grad)` for one adapter entry (a module or a parameter). A leaf module's own
    parameters are set directly, and only where the flag changes: `nn.Module.requires_grad_` walks `parameters()`,
    microseconds per entry, paid for every layer of every injection and `set_adapter`."""
    if isinstance(item, nn.Module) and not item._modules and type(item).requires_grad_ is nn.Module.requires_grad_:
        for param in item._parameters.values():
            if param is not None and param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
        return
    item.requires_grad_(requires_grad)


class BaseTunerLayer(AdapterState):
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

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter with any state on this layer, sorted (HF PEFT's order, used to pick a new active one)."""
        names: set[str] = set()
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if hasattr(holder, "keys"):
                names.update(holder.keys())
        return sorted(names)

    def _get_available_adapters(self) -> set[str]:
        """The adapters that have weights on this layer."""
        names: set[str] = set()
        for holder in self._adapter_holders():
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
                names.update(holder.keys())
        return names

    def _adapter_holders(self) -> Iterable[nn.Module | nn.ParameterDict]:
        # Registered submodules are read from `_modules` (getattr goes through nn.Module.__getattr__, ~0.6 us each,
        # paid for every holder of every layer at each injection, cast and set_adapter).
        modules = self.__dict__.get("_modules", {})
        return [modules[name] if name in modules else getattr(self, name) for name in self.adapter_layer_names]

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
                set_entry_requires_grad(item, name in adapter_names and not inference_mode)
        self._active_adapter = adapter_names if len(adapter_names) != 1 else adapter_names[0]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether this layer's adapter can be converted to LoRA: its effect is a delta weight added to the base
        weight. False unless a layer type says so."""
        return False

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name` from this layer. If it was active, the other active adapters stay active; if none
        is left, the first remaining adapter (sorted by name) becomes active, as in HF PEFT."""
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr)
            if adapter_name in holder:
                del holder[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = [name for name in self.active_adapters if name != adapter_name]
            if not remaining:
                remaining = self._all_available_adapter_names()[:1]
            if remaining:
                self.set_adapter(remaining)
            else:
                self._active_adapter = []

    def _get_embed_scale(self) -> torch.Tensor | None:
        """The factor the base embedding's own forward multiplies its lookup by (`embed_scale`, e.g. transformers'
        Gemma/Gemma2/Gemma3 scaled word embeddings), which an adapter's term added to that output must carry too;
        None without one. HF PEFT's rule: a Python number becomes a tensor of the weight's dtype; a tensor of more
        than one element is not applied (a PeftWarning says so)."""
        base_layer = self.get_base_layer()
        scale = getattr(base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        if isinstance(scale, torch.Tensor):
            if scale.numel() == 1:
                return scale
            warnings.warn(
                f"The embedding's embed_scale has shape {tuple(scale.shape)}, not a scalar: it is not applied to the "
                "adapter's term (as in HF PEFT).",
                PeftWarning,
                stacklevel=3,
            )
        return None


class BasePromptEncoder(nn.Module):
    """Base of the prompt-learning encoders (`PromptEmbedding`, `PrefixEncoder`, `PromptEncoder`).

    A prompt-learning method leaves the base model untouched: its whole state is this module, held by the
    `PeftModel` in `prompt_encoder[adapter_name]`. It maps virtual token ids `[batch, n]` to `[batch, n, width]`
    and has an `embedding` (`nn.Embedding`) whose rows the encoder output is computed from.

    Class attributes say how `PeftModel` uses the output:
    - `kv_prefix` False: the output is prompt embeddings, prepended to the input embeddings (width = token_dim);
      True: it is a key/value prefix for every layer, fed as `past_key_values` (width = 2 * num_layers * token_dim).
    - `uses_word_embeddings`: the constructor takes the model's word embeddings (to initialise from them).

    Adapter files hold the encoder's output for the virtual tokens, as `prompt_embeddings` (HF PEFT's format); a
    model loaded for inference keeps just that table in `embedding` and skips the encoder.
    """

    _registry_role = PROMPT_ENCODER_ROLE
    kv_prefix: bool = False
    uses_word_embeddings: bool = False
    embedding: nn.Embedding

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load a saved `prompt_embeddings` table into `embedding` (an inference-mode encoder: the table is used as
        the output as is)."""
        if prompt_embeddings.shape != self.embedding.weight.shape:
            raise ValueError(
                f"The saved prompt_embeddings have shape {tuple(prompt_embeddings.shape)} but this "
                f"{type(self).__name__} expects {tuple(self.embedding.weight.shape)}; the adapter was saved for "
                "another model or another num_virtual_tokens."
            )
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings.to(self.embedding.weight.device, self.embedding.weight.dtype))


class BaseTuner(nn.Module):
    """Wraps a model and injects one method's adapter layers into the modules its config targets.

    Subclasses implement `_create_and_replace` (may override `_mark_only_adapters_as_trainable`), and set `prefix`
    (the start of every adapter parameter name, e.g. "lora_") and `tuner_layer_cls`. Adapter management (set, delete,
    enable/disable, merge, unload) works on any `BaseTunerLayer`.
    """

    _registry_role = TUNER_ROLE
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
        check_adapter_name(adapter_name)
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        # A model that holds adapters already shares its peft_config dict with this tuner: undo the entry on failure.
        # Recorded once, for this tuner and the model: inject_adapter's own record is then skipped.
        with ModuleTreeRollback.guarding(self):
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
            if model_type not in self.default_target_modules and getattr(config, "target_parameters", None):
                return config
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
        # Only methods whose config has a `bias` option (LoRA) can train base biases.
        if len(self.peft_config) > 1 and getattr(config, "bias", "none") != "none":
            active = [
                name
                for name, cfg in self.peft_config.items()
                if cfg is not config and getattr(cfg, "bias", "none") != "none"
            ]
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
        """Freeze everything but adapter weights and what auxiliary wrappers train (found by structure, not by name;
        their requires_grad is left to set_adapter)."""
        # Every parameter outside adapters' entries belongs to a module of the walk (a ParameterDict holder's own
        # parameters are adapter weights, hence the id set).
        walked = modules_outside_adapters(model)
        adapter_params: set[int] = set()
        for module in walked:
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                for holder in module._adapter_holders():
                    adapter_params.update(_parameter_ids(holder))
        for module in walked:
            for param in module._parameters.values():
                if param is not None and param.requires_grad and id(param) not in adapter_params:
                    param.requires_grad_(False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Put `adapter_name`'s weights on their base layers' devices and dtypes, except that with
        `autocast_adapter_dtype` the weights of an fp16/bf16 layer are kept in fp32 (HF PEFT's rule)."""
        for module in modules_outside_adapters(self.model):
            if isinstance(module, BaseTunerLayer) and hasattr(module, "_move_adapter_to_base"):
                module._move_adapter_to_base(adapter_name, autocast_adapter_dtype)

    def _prepare_model(self, config: PeftConfig, model: nn.Module) -> Callable[[], None]:
        """Change the model's structure before the adapter goes in (e.g. LoRA's layer_replication); returns what
        undoes its changes outside the module tree (which the injection's rollback restores itself), run if the
        injection fails."""
        return _nothing_to_restore

    def _add_modules_to_save_to_tie(self, config: PeftConfig, tied_names: list[str]) -> None:
        warnings.warn(_NO_WEIGHT_TYING_MESSAGE, stacklevel=4)

    def _add_targets_to_tie(self, config: PeftConfig, tied_names: list[str]) -> None:
        warnings.warn(_NO_WEIGHT_TYING_MESSAGE, stacklevel=4)

    def _check_tied_modules(self, model: nn.Module, config: PeftConfig) -> None:
        """HF PEFT's `ensure_weight_tying`: when the input embeddings are in `modules_to_save` or `target_modules` of
        a model whose output layer is tied to them, the method may tie the output layer's adapter to theirs (it
        updates `config`: `modules_to_tie` / `target_modules_to_tie`). Without `ensure_weight_tying`, warn that the
        two will be trained apart."""
        modules_to_save = set(getattr(config, "modules_to_save", None) or [])
        embedding_to_save = any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in modules_to_save)
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, str):
            embedding_in_target = any(match_target_against_key(targets, name) for name in EMBEDDING_LAYER_NAMES)
        else:
            embedding_in_target = any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in targets or [])
        tied_names = module_names_tied_with_embedding(model)
        if getattr(config, "ensure_weight_tying", False):
            if not tied_names:
                warnings.warn(
                    "ensure_weight_tying=True, but the model has no layers tied to its embeddings.", stacklevel=4
                )
            elif embedding_to_save:
                self._add_modules_to_save_to_tie(config, tied_names)
            elif embedding_in_target:
                self._add_targets_to_tie(config, tied_names)
            else:
                warnings.warn(
                    "ensure_weight_tying=True, but neither modules_to_save nor target_modules names a tied layer.",
                    stacklevel=4,
                )
        elif (embedding_to_save or embedding_in_target) and tied_names:
            fix = (
                "set ensure_weight_tying=True to train them as one"
                if hasattr(config, "ensure_weight_tying")
                else "this method can't tie their adapters"
            )
            warnings.warn(
                f"The model's output layer is tied to its input embeddings (tie_word_embeddings=True) and a tied layer "
                f"is part of the adapter, so the two are trained apart: {fix}. This can lead to complications, for "
                "example when merging the adapter or converting the model to other formats.",
                stacklevel=4,
            )

    def _check_tied_module_exists(self, config: PeftConfig, key: str) -> bool:
        """Whether `key` is an output layer whose adapter is tied to the input embeddings' (ensure_weight_tying)."""
        tied = getattr(config, "target_modules_to_tie", None) or []
        return key in tied or any(key.endswith(f".{name}") for name in tied)

    def _check_trainable_token_indices(self, model: nn.Module, config: PeftConfig) -> None:
        """Check `config.trainable_token_indices` against the model before anything changes, with HF PEFT's refusals:
        a name matching no module, a module also in modules_to_save or also adapted, indices out of range, and tied
        layers given different indices under ensure_weight_tying."""
        indices = getattr(config, "trainable_token_indices", None)
        if indices is None:
            return
        targets, skipped, apply_tying = trainable_token_targets(model, config)
        modules_to_save = getattr(config, "modules_to_save", None) or []
        modules = [(key, module) for key, module in modules_outside_wrappers(model) if key]
        wrapped = []
        for name, token_indices in targets.items():
            if name in skipped:
                continue
            if name in modules_to_save:
                raise ValueError(
                    f"The embedding layer {name!r} is both in modules_to_save (trained fully) and in "
                    f"trainable_token_indices (a few rows trained); list it in one of them, not both."
                )
            matched = [(key, module) for key, module in modules if key == name or key.endswith(f".{name}")]
            if not matched:
                raise ValueError(
                    f"trainable_token_indices names {name!r}, which matches no module of the model; name the "
                    "embedding layer (e.g. 'embed_tokens'), or pass a list of indices for the input embeddings."
                )
            for key, module in matched:
                self._check_token_target(config, key, module, token_indices)
            wrapped.extend(key for key, _ in matched)
        if apply_tying and input_embeddings_name(model) in wrapped:
            for key in module_names_tied_with_embedding(model):
                module = model.get_submodule(key)
                # An adapter layer on the tied output layer stays: its base layer gets the tied rows (HF PEFT's
                # nesting), so only what it wraps must be a layer whose rows can be read.
                while isinstance(module, BaseTunerLayer):
                    module = module.base_layer
                if isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, TrainableTokensWrapper):
                    raise TypeError(
                        f"trainable_token_indices can't tie {key!r} to the input embeddings: it is a "
                        f"{module._error_message_name()} copy. Leave it out of modules_to_save."
                    )
                if not isinstance(module, (nn.Embedding, nn.Linear, TrainableTokensWrapper)):
                    raise TypeError(
                        f"trainable_token_indices can't tie {key!r} to the input embeddings: it is a "
                        f"{type(module).__name__}, not an nn.Linear."
                    )

    def _check_token_target(self, config: PeftConfig, key: str, module: nn.Module, indices: list[int] | None) -> None:
        adapted = bool(check_target_module_exists(config, key)) or self._check_tied_module_exists(config, key)
        if isinstance(module, TrainableTokensWrapper):
            module = module.original_module
        elif adapted or isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise TypeError(
                f"trainable_token_indices can't train rows of {key!r}: the module is adapted already (a target of "
                "this config, an adapter layer or a modules_to_save copy). Leave it out of target_modules / "
                "modules_to_save, or out of trainable_token_indices."
            )
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise TypeError(
                f"trainable_token_indices train rows of an nn.Embedding (or of the output layer tied to it), but "
                f"{key!r} is a {type(module).__name__}."
            )
        if indices is not None:
            check_token_indices(indices, module.weight.shape[0], f"trainable_token_indices for {key!r}")

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        """Replace every module that `self.peft_config[adapter_name]` targets by an adapter layer, and wrap its
        `modules_to_save`.

        On an error (a bad adapter name, no module matched, a bad shape, an unsupported layer type, a
        `modules_to_save` name matching nothing) the model and this tuner are left as they were: module tree, the
        adapters of every layer and wrapper, and every `requires_grad` flag.
        """
        check_adapter_name(adapter_name)
        rollback = ModuleTreeRollback(self, model)
        # What the model preparation changed outside the module tree (a config field), undone with it.
        undo: list[Callable[[], None]] = []
        try:
            self._inject_adapter(model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, undo=undo)
        except Exception:
            rollback.restore()
            for step in undo:
                step()
            raise
        _warn_unmatched_patterns(model, self.peft_config[adapter_name], adapter_name)

    def _inject_adapter(
        self, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool, undo: list[Callable[[], None]]
    ) -> None:
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        self._check_tied_modules(model, config)
        config = self._prepare_adapter_config(config, model)
        self._check_trainable_token_indices(model, config)
        undo.append(self._prepare_model(config, model))
        # The walk skips other adapters' entries, so injecting the N-th adapter costs what injecting the first does.
        walked = modules_outside_wrappers(model)
        key_list = [key for key, _ in walked]
        matched: list[str] = []
        excluded: list[str] = []
        tied: list[str] = []
        replacements = []
        matches = _TargetMatcher(config)
        for key in key_list:
            if not key:
                continue
            result = matches(key)
            if self._check_tied_module_exists(config, key):
                # An output layer tied to the input embeddings: adapted after them, tied to their adapter.
                tied.append(key)
            elif isinstance(result, _ExcludedModule):
                excluded.append(key)
            elif result:
                matched.append(key)
        _check_layers_to_transform(config, key_list, matched)
        parameters = parameter_targets(model, config)
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        if not matched and not parameters:
            sample = [key for key in key_list if key][:8]
            detail = f" ({len(excluded)} matching module(s) were excluded)" if excluded else ""
            if getattr(config, "target_parameters", None):
                sample = [name for name, _ in model.named_parameters()][:8]
                raise NoMatchingPeftModuleError(
                    f"Neither target_modules {targets} nor target_parameters {config.target_parameters} matched "
                    f"anything in the base model{detail}. Parameter names look like: {sample}. Check "
                    "target_parameters (parameter names or name suffixes, e.g. 'experts.gate_up_proj')."
                )
            raise NoMatchingPeftModuleError(
                f"Target modules {targets} not found in the base model{detail}. Module names look like: {sample}. "
                "Check target_modules (names, name suffixes, or a regex matching the full name)."
            )
        matched.extend(tied)
        if getattr(config, "target_parameters", None) and not parameters:
            warnings.warn(
                f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                RuntimeWarning,
                stacklevel=4,
            )
        elif targets and not matched:
            warnings.warn(f"target_modules={targets} were set but no module was matched.", RuntimeWarning, stacklevel=4)
        # Parents and targets looked up in the walk (get_submodule per key walks the path from the root twice); every
        # matched key is a name of the walk, and nothing has been replaced yet.
        by_name = dict(walked)
        for key in matched:
            parent_name, _, target_name = key.rpartition(".")
            replacements.append((key, by_name[parent_name], by_name[key], target_name))
        tuner_layers = [module for _, module in walked if isinstance(module, BaseTunerLayer)]
        # As HF PEFT: adding an adapter next to others leaves the trainability of every parameter already there as it
        # was (other adapters' weights are not touched at all); only the first injection freezes the base model.
        previous_requires_grad = []
        if tuner_layers:
            # Parameters outside adapters' entries, read directly (module.parameters() costs microseconds per call),
            # and what auxiliary wrappers hold (their set_adapter touches every copy).
            params = {}
            for module in modules_outside_adapters(model):
                params.update((id(p), p) for p in module._parameters.values() if p is not None)
                if isinstance(module, AuxiliaryTrainingWrapper):
                    params.update((id(p), p) for p in module.parameters())
            previous_requires_grad = [(param, param.requires_grad) for param in params.values()]
        with init_empty_weights() if low_cpu_mem_usage else nullcontext():
            for key, parent, target, target_name in replacements:
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            for module_name, param_name, key in parameters:
                # The module at that path now, wrapped by the previous parameter's ParamWrapper if any.
                parent, target, target_name = get_submodules(model, module_name)
                self._create_and_replace(
                    config, adapter_name, target, target_name, parent, current_key=key, parameter_name=param_name
                )
        _extend_unique(self.targeted_module_names, matched)
        _extend_unique(self.targeted_parameter_names, [key for _, _, key in parameters])
        wrapped_before = not tuner_layers and any(isinstance(module, AuxiliaryTrainingWrapper) for _, module in walked)
        if parameters or wrapped_before or any(module.merged for module in tuner_layers):
            # A layer created for this adapter starts with it active: make every layer follow the tuner's active
            # adapters (a new adapter is inactive unless it is the first one; merged layers get unmerged, as in HF
            # PEFT) and freeze whatever is not active.
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
            self._mark_only_adapters_as_trainable(model)
        else:
            # Only the layers this injection made or changed can differ from the tuner's active adapters (on the
            # first injection they are all the adapter layers there are): no walk of the whole model to find them.
            self._activate_injected(replacements, model, adapter_name, config.inference_mode)
            if not tuner_layers:
                # The first injection freezes the base model.
                self._mark_only_adapters_as_trainable(model)
        set_additional_trainable_modules(
            model, config, adapter_name, activate_adapter=adapter_name in self.active_adapters
        )
        for param, requires_grad in previous_requires_grad:
            param.requires_grad_(requires_grad)

    def _activate_injected(self, replacements: list, model: nn.Module, adapter_name: str, inference_mode: bool) -> None:
        """What `set_adapter(self.active_adapters)` does after an injection, done only where the injection changed
        something: layers created for the new adapter follow the tuner's active adapters, and the new adapter's
        weights train if it is active (and not `inference_mode`)."""
        active = self.active_adapters
        trainable = adapter_name in active and not inference_mode
        for _, parent, target, target_name in replacements:
            # What is now at the target's place (read from its parent: a nested target's path from the root may run
            # through a layer that wrapped its parent).
            layer = parent._modules.get(target_name)
            if not isinstance(layer, BaseTunerLayer):
                continue
            if layer is not target:
                layer.set_adapter(active, inference_mode=inference_mode)
                continue
            for holder in layer._adapter_holders():
                if adapter_name in holder:
                    set_entry_requires_grad(holder[adapter_name], trainable)

    def _tuner_layers(self) -> Iterable[BaseTunerLayer]:
        """Every adapter layer, those inside auxiliary wrappers too (they merge like the others)."""
        return (module for module in modules_outside_adapters(self.model) if isinstance(module, BaseTunerLayer))

    def _adapter_modules(self) -> list[BaseTunerLayer | AuxiliaryTrainingWrapper]:
        """The adapter layers and auxiliary wrappers whose adapters the tuner manages; a layer inside a wrapper is the
        wrapper's to manage (it activates at most one adapter there)."""
        return [
            module
            for _, module in modules_outside_wrappers(self.model)
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        ]

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = adapter_name_list(adapter_name, "adapter_name")
        missing = [name for name in names if name not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter {missing} not found; available adapters: {list(self.peft_config)}.")
        for module in self._adapter_modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                warnings.warn("Adapters are merged; unmerge them before switching, or results mix.", stacklevel=2)
                module.unmerge()
            module.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names if len(names) != 1 else names[0]

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters (and what auxiliary wrappers train for them) on or off, active or
        not."""
        for module in self._adapter_modules():
            module.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer and from the config.

        A merged adapter can't be deleted (its delta is in the base weights): unmerge first. If it was active, the
        other active adapters stay active; if none is left, the first remaining adapter by name becomes active (as in
        HF PEFT), with a warning.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        still_merged = [module for module in self._tuner_layers() if adapter_name in module.merged_adapters]
        if still_merged:
            raise ValueError(
                f"Can't delete adapter {adapter_name!r} while it is merged into the base weights; call "
                "unmerge_adapter() first."
            )
        del self.peft_config[adapter_name]
        was_active = adapter_name in self.active_adapters
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if was_active and not remaining and self.peft_config:
            remaining = sorted(self.peft_config)[:1]
            warnings.warn(
                f"Adapter {adapter_name!r} was active and is now deleted; {remaining[0]!r} is the active adapter.",
                stacklevel=2,
            )
        for module in self._adapter_modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(adapter_name)
                if was_active:
                    # Every layer follows one model-wide choice (a layer alone would pick among its own adapters, and
                    # layers could disagree). Like HF PEFT, the new active adapters are made trainable.
                    module.set_adapter(remaining)
            else:
                module.delete_adapter(adapter_name, remaining)
        self.active_adapter = remaining if len(remaining) != 1 else remaining[0]

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self._adapter_modules():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        """Turn every adapter layer back on (the active adapters train again)."""
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        """Turn every adapter layer off: the output is the base model's (merged adapters get unmerged first)."""
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Adapter {name!r} trains biases (bias={bias!r}); with the adapters disabled those biases still "
                    "apply, so the output is not the base model's.",
                    stacklevel=2,
                )
        self._set_adapter_layers(False)

    @contextmanager
    def _disabled_adapters(self):
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def _check_safe_merge(self, adapter_names: list[str] | None) -> None:
        # Every layer is checked before any is merged, so a broken adapter leaves the whole model untouched.
        for name, module in self.model.named_modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "_check_safe_merge"):
                module._check_safe_merge(adapter_names, name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' deltas (the active adapters when `adapter_names` is None) into the base weights; the
        adapter weights are kept, so `unmerge_adapter` can undo it. With `safe_merge`, a NaN/inf in any merged
        weight raises a ValueError before any weight is changed."""
        self._check_adapters_to_merge(adapter_names)
        self._check_merge_allowed()
        if safe_merge:
            self._check_safe_merge(adapter_names)
        for module in self._tuner_layers():
            module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def _check_adapters_to_merge(self, adapter_names: list[str] | None) -> None:
        # A name no layer has would otherwise merge nothing without a word.
        if adapter_names is None:
            return
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got the string {adapter_names!r}.")
        check_known_adapters(adapter_name_list(adapter_names), self.peft_config)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter's delta from the base weights again."""
        for module in self._tuner_layers():
            module.unmerge()

    def _tied_target_modules(self) -> list[str]:
        """The adapted modules that may be tied to others (by name, as HF PEFT guesses them)."""
        if not weights_are_tied(self.model):
            return []
        return [name for name in self.targeted_module_names if name.split(".")[-1] in EMBEDDING_LAYER_NAMES]

    def _check_merge_allowed(self) -> None:
        """Raise if this model's adapters can't be merged; warn about merging into embeddings tied to the output
        layer (HF PEFT's warning: the merge changes both, or unties them)."""
        nested = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), AuxiliaryTrainingWrapper)
        ]
        if nested:
            # HF PEFT merges such a layer's delta into a temporary copy of the weight, i.e. loses it.
            raise ValueError(
                f"Can't merge the adapter layers {nested}: their base layers carry trainable tokens tied to the input "
                "embeddings, whose weight they share. Use the model unmerged, or train without LoRA on those layers."
            )
        tied = self._tied_target_modules()
        if tied:
            warnings.warn(
                f"The model's output layer is tied to its input embeddings (tie_word_embeddings=True) and the adapted "
                f"modules {tied} are among them; merging can lead to complications. To merge, load the model with "
                "tie_word_embeddings=False (the output layer a copy of the embeddings) first.",
                stacklevel=3,
            )

    def _unload_and_optionally_merge(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        if merge:
            self._check_adapters_to_merge(adapter_names)
            self._check_merge_allowed()
        if merge and safe_merge:
            self._check_safe_merge(adapter_names)
        keys = [key for key, _ in self.model.named_modules()]
        for key in keys:
            try:
                parent, target, target_name = get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, BaseTunerLayer) and hasattr(target, "unload_and_optionally_merge_module"):
                # Adapter layers that nest (ParamWrapper) unload their whole chain.
                unloaded = target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
                setattr(parent, target_name, unloaded)
            elif isinstance(target, BaseTunerLayer):
                if merge:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                base = target.get_base_layer()
                if isinstance(base, AuxiliaryTrainingWrapper):
                    # A wrapper nested in an adapter layer (the tied rows of an output layer that has a LoRA).
                    base = base.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
                setattr(parent, target_name, base)
            elif isinstance(target, AuxiliaryTrainingWrapper):
                setattr(
                    parent, target_name, target.unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
                )
        # No adapter is left in the model, so neither is its config (as HF PEFT: wrapping it again starts clean).
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        if merge and weights_are_tied(self.model):
            self._note_untied_embeddings()
        return self.model

    def _note_untied_embeddings(self) -> None:
        # A merge that wrote into only one of two tied weights (e.g. a modules_to_save copy) unties them: say so in
        # the config, as HF PEFT does, so that saving the model does not tie them back.
        try:
            output, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return
        output_weight, input_weight = getattr(output, "weight", None), getattr(embeddings, "weight", None)
        if (
            output_weight is not None
            and input_weight is not None
            and output_weight.data_ptr() != input_weight.data_ptr()
        ):
            self.model.config.tie_word_embeddings = False
            warnings.warn(
                "Input and output embeddings are no longer tied after merging; set tie_word_embeddings=False in the "
                "model config.",
                stacklevel=4,
            )

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters (the active ones when `adapter_names` is None) into the base weights and return the
        base model with no adapter modules left: adapter layers become their base layers again, a modules_to_save
        wrapper becomes the active adapter's copy (the original module when none is active) and trainable tokens are
        written into their embedding. Use the returned
        model. With `safe_merge`, a NaN/inf in any merged weight raises before anything is changed."""
        return self._unload_and_optionally_merge(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model with every adapter module removed, merging nothing (adapters merged earlier stay
        in the weights: unmerge first to get the original base model back)."""
        return self._unload_and_optionally_merge(merge=False)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer of the model can be converted to LoRA (see `convert_to_lora`)."""
        return all(module.supports_lora_conversion() for module in self._tuner_layers())


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


@dataclass
class TunerLayerStatus:
    """State of one adapter layer (or modules_to_save wrapper), as HF PEFT reports it.

    `requires_grad` maps each adapter to True/False, or "irregular" when its weights on this layer disagree;
    `devices` maps each adapter to the device types its weights are on.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """State of all adapter layers of a model, as HF PEFT reports it; "irregular" where the layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"]


def _peft_model_tuner(model: nn.Module) -> BaseTuner | None:
    """The tuner of a `PeftModel` (its `base_model` submodule), None for any other module. A transformers model has a
    `base_model` too, but never a tuner; a prompt-learning `PeftModel` (it has `_is_prompt_learning`) has none."""
    tuner = model._modules.get("base_model")
    if isinstance(tuner, BaseTuner):
        return tuner
    if model.__dict__.get("_is_prompt_learning", False):
        # As HF PEFT: a prompt-learning method puts no layers into the model, so there is no layer to report.
        raise TypeError(
            f"Layer and model status are for methods with adapter layers; this PeftModel's {model.peft_type} "
            "adapters have none (their state is model.prompt_encoder)."
        )
    return None


def _agreement(values: Iterable[bool | str]) -> bool | Literal["irregular"]:
    values = list(values)
    if all(value is True for value in values):
        return True
    if all(value is False for value in values):
        return False
    return "irregular"


def _quantization_backend_name(module: nn.Module) -> str | None:
    backend = getattr(module, "quantization_backend", None)
    if backend is None or isinstance(backend, str):
        return backend
    return getattr(backend, "backend_name", type(backend).__name__)


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and modules_to_save wrapper in `model` (a trainable tokens wrapper is
    reported through the token layer it holds, as in HF PEFT).

    `model` is a `PeftModel` (names are then relative to its tuner, e.g. "model.model.layers.0.self_attn.q_proj",
    as in HF PEFT) or any module holding peftfast adapter layers. Raises ValueError when there are none.
    """
    tuner = _peft_model_tuner(model)
    root = tuner if tuner is not None else model
    statuses: list[TunerLayerStatus] = []
    for name, module in root.named_modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        if isinstance(module, TrainableTokensWrapper):
            continue
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, list[str]] = collections.defaultdict(list)
        for attr in module.adapter_layer_names + module.other_param_names:
            holder = getattr(module, attr)
            if isinstance(holder, nn.ModuleDict):
                items = {key: list(sub.parameters()) for key, sub in holder.items()}
            elif isinstance(holder, (nn.ParameterDict, BufferDict)):
                items = {key: [param] for key, param in holder.items()}
            else:
                continue
            for key, params in items.items():
                devices[key].extend(param.device.type for param in params)
                if attr in module.adapter_layer_names:
                    grads[key].extend(param.requires_grad for param in params)
        statuses.append(
            TunerLayerStatus(
                name=name,
                module_type=repr(module).partition("(")[0],
                enabled=not module.disable_adapters,
                active_adapters=list(module.active_adapters),
                merged_adapters=list(module.merged_adapters),
                requires_grad={key: _agreement(values) for key, values in grads.items()},
                available_adapters=sorted(module._get_available_adapters()),
                devices={key: sorted(set(values)) for key, values in devices.items()},
                quantization_backend=_quantization_backend_name(module),
            )
        )
    if not statuses:
        raise ValueError(
            f"No adapter layers found in this {type(model).__name__}: it is not a PeftModel and holds no peftfast "
            "adapter layers."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of all adapter layers of `model` (a `PeftModel` or any module holding peftfast adapter layers),
    summarised as HF PEFT does: a field the layers disagree on reads "irregular"."""
    tuner = _peft_model_tuner(model)
    if tuner is not None:
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(tuner).__name__
        peft_types = {name: getattr(cfg.peft_type, "value", cfg.peft_type) for name, cfg in tuner.peft_config.items()}
    else:
        try:
            from transformers import PreTrainedModel
        except ImportError:
            PreTrainedModel = ()
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_model_type = "None"
        peft_types = {}
    trainable_params, total_params = count_parameters(model)
    layers = get_layer_status(model)

    enabled_values = {status.enabled for status in layers}
    enabled = enabled_values.pop() if len(enabled_values) == 1 else "irregular"

    active_values = {tuple(status.active_adapters) for status in layers}
    active_adapters = list(active_values.pop()) if len(active_values) == 1 else "irregular"

    # An adapter merged on some layer must be merged on every layer that has it, else the merge state is irregular.
    merged_anywhere = set().union(*(status.merged_adapters for status in layers))
    merged_adapters: list[str] | Literal["irregular"] = sorted(merged_anywhere)
    for status in layers:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged_anywhere:
            merged_adapters = "irregular"
            break

    grads: dict[str, list[bool | str]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            grads[key].append(value)
        for key, values in status.devices.items():
            devices[key].update(values)

    backends = {status.quantization_backend for status in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable_params,
        total_params=total_params,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active_adapters,
        merged_adapters=merged_adapters,
        requires_grad={key: _agreement(values) for key, values in grads.items()},
        available_adapters=sorted(set().union(*(status.available_adapters for status in layers))),
        devices={key: sorted(values) for key, values in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )


def clone_module(module: nn.Module, share_weights: bool = False) -> nn.Module:
    """A deep copy of `module`; with `share_weights`, every parameter of the copy is the original's own (the copy's
    buffers are its own either way)."""
    clone = copy.deepcopy(module)
    if share_weights:
        for name, submodule in module.named_modules():
            target = clone.get_submodule(name)
            for param_name, param in submodule.named_parameters(recurse=False):
                target.register_parameter(param_name, param)
    return clone


def replicate_layers(model: nn.Module, layer_map: list[tuple[int, int]] | list[list[int]]) -> Callable[[], None]:
    """Rebuild a transformer's stack of layers from `[start, end)` ranges of the current one, the new layers sharing
    the weights of the layers they repeat (HF PEFT's `layer_replication`): `[[0, 4], [2, 5]]` turns layers
    `[0, 1, 2, 3, 4]` into `[0, 1, 2, 3, 2, 3, 4]`. The stack is found as HF PEFT finds it: `model(.model)*` then
    `.layers` (Llama-like), `.bert.encoder.layer` / `.encoder.layer` (BERT-like) or `.h` (Falcon-like); each layer's
    `layer_idx` becomes its new position and `config.num_hidden_layers` the new count. Returns what puts the old stack
    back."""
    while hasattr(model, "model"):
        model = model.model
    # Some BERT models nest the encoder under `bert`.
    if hasattr(model, "bert"):
        model = model.bert
    if hasattr(model, "layers"):
        holder, attribute = model, "layers"
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        holder, attribute = model.encoder, "layer"
    elif hasattr(model, "h"):
        holder, attribute = model, "h"
    else:
        holder, attribute = None, None
    layers = getattr(holder, attribute, None) if holder is not None else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            "layer_replication could not find the model's stack of layers: it looks for an nn.ModuleList at "
            "model(.model)*.layers (Llama-like), .encoder.layer (BERT-like) or .h (Falcon-like)."
        )
    for start, end in layer_map:
        if not 0 <= start <= end <= len(layers):
            raise ValueError(
                f"layer_replication range [{start}, {end}) is outside the model's {len(layers)} layers; each range "
                f"is [start, end) with 0 <= start <= end <= {len(layers)}."
            )
    new_layers = []
    for start, end in layer_map:
        for index in range(start, end):
            layer = clone_module(layers[index], share_weights=True)
            # transformers' attention layers index the key/value cache by their layer_idx.
            for submodule in layer.modules():
                if hasattr(submodule, "layer_idx"):
                    submodule.layer_idx = len(new_layers)
            new_layers.append(layer)
    config = getattr(model, "config", None)
    old_count = getattr(config, "num_hidden_layers", None)
    setattr(holder, attribute, nn.ModuleList(new_layers))
    if old_count is not None:
        config.num_hidden_layers = len(new_layers)

    def restore() -> None:
        setattr(holder, attribute, layers)
        if old_count is not None:
            config.num_hidden_layers = old_count

    return restore
