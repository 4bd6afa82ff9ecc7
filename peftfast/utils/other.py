"""Module-tree helpers and the auxiliary training wrappers: `ModulesToSaveWrapper` (whole modules trained and saved
next to the adapter) and `TrainableTokensWrapper` (a few rows of an embedding), both `AuxiliaryTrainingWrapper`s."""

from __future__ import annotations

import copy
import inspect
import operator
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .mixed_batch import AdapterRowGroups


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name) of the module named `key` in `model`."""
    parent_name, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_name)
    return parent, model.get_submodule(key), target_name


# HF PEFT's name (`peft.utils._get_submodules`), which diffusers imports.
_get_submodules = get_submodules


def named_modules_outside_adapters(
    model: nn.Module, prefix: str = "", into_wrappers: bool = True
) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` (same order, each module once) without walking into what belongs to one adapter: the
    entries of an adapter layer's per-adapter containers (`lora_A`, `lora_dropout`, ...: the attributes its class
    names in `adapter_layer_names` / `other_param_names`) and a modules_to_save wrapper's copies. The containers
    themselves are yielded. The cost does not grow with the number of adapters loaded, which keeps adding the N-th
    adapter as cheap as adding the first. Without `into_wrappers`, nothing inside an `AuxiliaryTrainingWrapper` is
    walked either (the wrapper itself is yielded)."""
    seen: set[int] = set()
    # Pre-order with an explicit stack (children pushed in reverse): the order of named_modules, without a chain of
    # generators as deep as the model.
    stack: list[tuple[str, nn.Module, bool]] = [(prefix, model, True)]
    while stack:
        name, module, walk_children = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        children = module._modules
        if not children or not walk_children:
            continue
        if not into_wrappers and isinstance(module, AuxiliaryTrainingWrapper):
            continue
        cls = type(module)
        owned = (*getattr(cls, "adapter_layer_names", ()), *getattr(cls, "other_param_names", ()))
        dotted = f"{name}." if name else ""
        stack.extend(
            (dotted + child_name, child, child_name not in owned)
            for child_name, child in reversed(children.items())
            if child is not None
        )


def modules_outside_adapters(model: nn.Module, into_wrappers: bool = True) -> list[nn.Module]:
    """The modules of `named_modules_outside_adapters(model, into_wrappers=into_wrappers)`, in its order, without
    their names: the walk for what needs no names (freezing, casting, rollback records), which runs after every
    injection, costs half as much without building them."""
    seen: set[int] = set()
    walked: list[nn.Module] = []
    stack: list[tuple[nn.Module, bool]] = [(model, True)]
    while stack:
        module, walk_children = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        walked.append(module)
        children = module._modules
        if not children or not walk_children:
            continue
        if not into_wrappers and isinstance(module, AuxiliaryTrainingWrapper):
            continue
        cls = type(module)
        owned = (*getattr(cls, "adapter_layer_names", ()), *getattr(cls, "other_param_names", ()))
        stack.extend(
            (child, child_name not in owned) for child_name, child in reversed(children.items()) if child is not None
        )
    return walked


def infer_device() -> str:
    """The device type to put work on, in HF PEFT's order of preference: "cuda", "mps", "mlu", "xpu", "npu", else
    "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    for device_type in ("mlu", "xpu", "npu"):
        backend = getattr(torch, device_type, None)
        if backend is not None and backend.is_available():
            return device_type
    return "cpu"


def input_embeddings_name(model: nn.Module, default: str | None = None) -> str | None:
    """The name of `model.get_input_embeddings()` in `model` (`default` when the model has none)."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_input_embeddings):
        return default
    try:
        embeddings = get_input_embeddings()
    except NotImplementedError:
        return default
    return next((name for name, module in model.named_modules() if module is embeddings), default)


def weights_are_tied(model: nn.Module) -> bool:
    """Whether the model's config asks for its output layer to share the input embeddings' weight."""
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return bool(config.get("tie_word_embeddings", False))
    return bool(getattr(config, "tie_word_embeddings", False))


# Segments adapter wrappers put into the name of a wrapped module's parameters.
_WRAPPER_SEGMENTS = re.compile(r"\.(base_layer|original_module|token_adapter)(?=\.)")


def module_names_tied_with_embedding(model: nn.Module) -> list[str]:
    """Names (relative to the base model, as before any adapter wrapped them) of the modules whose weight is tied to
    the input embeddings' (e.g. ["lm_head"]), by HF PEFT's rule: the model's `_tied_weights_keys` name them and they
    hold the same parameter; none when `tie_word_embeddings` is False. A `PeftModel` or tuner is looked through."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if hasattr(model, "tuner_layer_cls"):
        model = model.model
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    tied_keys = getattr(model, "_tied_weights_keys", None)
    if not tied_keys:
        return []
    if not isinstance(tied_keys, dict):
        return sorted({key.rpartition(".")[0] for key in tied_keys})
    if not hasattr(model, "get_input_embeddings"):
        raise ValueError(
            f"{type(model).__name__} declares _tied_weights_keys as a dict but has no get_input_embeddings(), so the "
            "weights tied to its input embeddings can't be found."
        )
    targets: set[str] = set()
    for module_name, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if isinstance(keys, dict):
            targets.update(f"{module_name}.{key}" if module_name else key for key in keys)
    embedding_params = {id(param) for param in model.get_input_embeddings().parameters()}
    names = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        original = _WRAPPER_SEGMENTS.sub("", name)
        if id(param) in embedding_params and original in targets:
            names.add(original.rpartition(".")[0])
    return sorted(names)


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether `module` is an adapter layer (a tuner's `BaseTunerLayer`), told by structure: it holds the module it
    adapts as its `base_layer` child and names its adapter attributes (this module sits below the tuners)."""
    return "base_layer" in module._modules and hasattr(module, "adapter_layer_names")


def check_token_indices(indices: Any, num_rows: int, owner: str) -> None:
    """Raise a ValueError naming `owner` unless `indices` is a non-empty list of row indices in [0, num_rows)."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError(f"The token indices of {owner} must be a non-empty list of integers, got {indices!r}.")
    not_ints = [index for index in indices if isinstance(index, bool) or not isinstance(index, int)]
    if not_ints:
        raise ValueError(f"The token indices of {owner} must be integers, got {not_ints[:5]}.")
    out_of_range = [index for index in indices if not 0 <= index < num_rows]
    if out_of_range:
        raise ValueError(
            f"Token indices {out_of_range[:5]} of {owner} are out of range for an embedding of {num_rows} rows."
        )


def modules_outside_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` without the modules inside an `AuxiliaryTrainingWrapper` (its original module, its
    per-adapter copies or token layer) or inside the adapters' entries of adapter layers (see
    `named_modules_outside_adapters`): what adapter matching and management see."""
    return list(named_modules_outside_adapters(model, into_wrappers=False))


def embedding_options(embedding: nn.Embedding) -> dict[str, Any]:
    """The lookup options of `embedding` as `F.embedding`'s keywords, for code that looks up in another weight."""
    return {
        "padding_idx": embedding.padding_idx,
        "max_norm": embedding.max_norm,
        "norm_type": embedding.norm_type,
        "scale_grad_by_freq": embedding.scale_grad_by_freq,
        "sparse": embedding.sparse,
    }


class AdapterState:
    """What adapter layers (`BaseTunerLayer`) and `AuxiliaryTrainingWrapper` share: the active-adapter properties,
    read from their `_active_adapter` (a name or a list of names) and `_disable_adapters`, and `set_requires_grad`
    over the per-adapter dicts of their `_adapter_holders()`."""

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' weights on or off, whether they are active or not."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for holder in self._adapter_holders():
            for name, item in holder.items():
                if name in names:
                    item.requires_grad_(requires_grad)


class AuxiliaryTrainingWrapper(nn.Module, AdapterState):
    """A module trained and saved next to an adapter method's layers but outside of them (HF PEFT's base of
    `ModulesToSaveWrapper` and `TrainableTokensWrapper`).

    It keeps the original module and what each adapter trains of it; forward runs the active adapter's version, and
    the original module when adapters are disabled or no adapter of this wrapper is active. At most one adapter is
    active per wrapper. Subclasses implement `init_modules`, `update`, the `_forward_*` methods, `set_adapter`,
    `delete_adapter`, `adapter_state_dict` (the adapter's tensors, keyed as in adapter files, relative to the
    wrapper), `adapter_state_dict_load_map` (file key -> state_dict key) and `unload_and_optionally_merge_module`.
    `adapter_layer_names` name (dotted paths allowed) the per-adapter dicts of trainable weights; the wrapped module
    is `original_module`.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module_to_save: nn.Module, adapter_name: str, activate_adapter: bool = True, **kwargs: Any):
        """Extra `kwargs` go to `init_modules` and `update`. The adapter is active unless `activate_adapter` is False
        (an adapter added next to the active one: the original module keeps running)."""
        super().__init__()
        self._active_adapter: str | list[str] = []
        self._disable_adapters = False
        self.check_module(module_to_save)
        self.init_modules(module_to_save, adapter_name, **kwargs)
        self.update(adapter_name, **kwargs)
        self.set_adapter(adapter_name if activate_adapter else [])

    def init_modules(self, module_to_save: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Create the wrapper's submodules (before the first `update`)."""
        raise NotImplementedError

    def update(self, adapter_name: str, **kwargs: Any) -> None:
        """Add what `adapter_name` trains of the wrapped module (kept if it exists)."""
        raise NotImplementedError

    def _error_message_name(self) -> str:
        """How the user asked for this wrapper, for error messages (e.g. "modules_to_save")."""
        return "training wrapper"

    def check_module(self, module: nn.Module) -> None:
        """Refuse modules a wrapper can't stand in for: containers without a forward, and adapter layers or
        wrappers (training a copy of an adapter layer, or wrapping twice, makes no sense)."""
        forbidden = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList, AuxiliaryTrainingWrapper)
        if isinstance(module, forbidden) or is_adapter_layer(module):
            raise TypeError(f"{self._error_message_name()} cannot be applied to modules of type {type(module)}.")

    @property
    def merged_adapters(self) -> list[str]:
        return []

    def _get_available_adapters(self) -> set[str]:
        raise NotImplementedError

    def _has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._get_available_adapters()

    def _hasattr_wrapped(self, name: str) -> bool:
        """Whether attribute `name`, not found on the wrapper, comes from the active adapter's version."""
        return False

    def _getattr_wrapped(self, name: str) -> Any:
        raise AttributeError(name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_modules", "original_module", "modules_to_save", "token_adapter"):
                raise
        if self.disable_adapters or not self.active_adapters:
            return getattr(self.original_module, name)
        if self._hasattr_wrapped(name):
            return self._getattr_wrapped(name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def _forward_wrapped(self, *args: Any, **kwargs: Any) -> Any:
        """The forward with the active adapter."""
        raise NotImplementedError

    def _forward_wrapped_mixed_batch(self, x: torch.Tensor, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """The forward of some rows with adapter `adapter_name` (one this wrapper has)."""
        raise NotImplementedError

    def _forward_wrapped_passthrough(self, *args: Any, **kwargs: Any) -> Any:
        """The forward without any adapter."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self._forward_wrapped_passthrough(*args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)
        active = self.active_adapters
        if not active or not self._has_adapter(active[0]):
            return self._forward_wrapped_passthrough(*args, **kwargs)
        return self._forward_wrapped(*args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> Any:
        """Each row goes through its adapter's version (the original module for "__base__" or an adapter this
        wrapper lacks)."""
        if len(x) != len(adapter_names):
            raise ValueError(
                f"Got {len(adapter_names)} adapter_names for a batch of {len(x)} rows; pass one name per row."
            )
        groups = AdapterRowGroups.of(adapter_names)
        available = self._get_available_adapters()
        result = None
        for name in groups.groups:
            rows = groups.rows(name, x.device)
            if name in available:
                output = self._forward_wrapped_mixed_batch(x[rows], name, *args, **kwargs)
            else:
                output = self._forward_wrapped_passthrough(x[rows], *args, **kwargs)
            if result is None:
                result = output.new_empty((len(x), *output.shape[1:]))
            result[rows] = output
        return result

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def _adapter_to_activate(self, adapter_names: str | Sequence[str]) -> str | None:
        """The one adapter of `adapter_names` this wrapper has (None if none); several is an error."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = [name for name in names if name in self._get_available_adapters()]
        if len(present) > 1:
            raise ValueError(
                f"Only one adapter's {self._error_message_name()} can be active on a module at a time, got {present}."
            )
        return present[0] if present else None

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate the one of `adapter_names` this wrapper has (none: the original module runs); it trains unless
        `inference_mode`."""
        raise NotImplementedError

    def _adapter_holders(self) -> list[nn.Module]:
        return [operator.attrgetter(name)(self) for name in self.adapter_layer_names]

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        """Remove `adapter_name`; if it was active, activate the first of `new_active_adapters` this wrapper has."""
        raise NotImplementedError

    def adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`adapter_name`'s tensors as adapter files hold them, keyed relative to the wrapper, taken from
        `state_dict` (the wrapper's own state_dict entries, keyed relative to it)."""
        raise NotImplementedError

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """For each tensor of `adapter_name` in adapter files, its key in the wrapper's state_dict (both relative to
        the wrapper). Every key listed is expected in a file."""
        raise NotImplementedError

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The module that replaces this wrapper when the adapters are unloaded (merged first if `merge`)."""
        raise NotImplementedError


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Keeps the original module frozen and one trainable copy per adapter; forward runs the active adapter's copy.

    State dict keys: `<name>.original_module.*` and `<name>.modules_to_save.<adapter>.*`; adapter files store the
    copy under the module's own path, `<name>.*`, as HF PEFT does. Buffers are copied and saved too, so a
    BatchNorm's running statistics belong to each adapter. With `tied_module` (ensure_weight_tying: the output layer
    of a model tied to its input embeddings), an adapter's copy is a bias-free `nn.Linear` whose weight is the
    weight of `tied_module` (the input embeddings' copy): both train as one.
    """

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)

    def __init__(
        self,
        module_to_save: nn.Module,
        adapter_name: str,
        activate_adapter: bool = True,
        tied_module: nn.Module | None = None,
    ) -> None:
        super().__init__(module_to_save, adapter_name, activate_adapter=activate_adapter, tied_module=tied_module)

    def init_modules(self, module_to_save: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})

    def _error_message_name(self) -> str:
        return "modules_to_save"

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save.keys())

    def _has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.modules_to_save

    @property
    def weight(self) -> torch.Tensor:
        return self._current_module().weight

    def _current_module(self) -> nn.Module:
        if self.disable_adapters or not self.active_adapters or self.active_adapters[0] not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def _hasattr_wrapped(self, name: str) -> bool:
        return self.active_adapters[0] in self.modules_to_save

    def _getattr_wrapped(self, name: str) -> Any:
        return getattr(self.modules_to_save[self.active_adapters[0]], name)

    def update(self, adapter_name: str, tied_module: nn.Module | None = None, **kwargs: Any) -> None:
        """Add a trainable copy of the original module for `adapter_name` (kept if it exists)."""
        if adapter_name not in self.modules_to_save:
            if tied_module is not None:
                # HF PEFT's shape: a Linear built from the weight's shape, then given the tied weight itself.
                copy_ = nn.Linear(*tied_module.weight.shape, bias=False)
                copy_.weight = tied_module.weight
            else:
                copy_ = copy.deepcopy(self.original_module)
            self.modules_to_save[adapter_name] = copy_
        self.original_module.requires_grad_(False)

    def _forward_wrapped(self, *args: Any, **kwargs: Any) -> Any:
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)

    def _forward_wrapped_mixed_batch(self, x: torch.Tensor, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        return self.modules_to_save[adapter_name](x, *args, **kwargs)

    def _forward_wrapped_passthrough(self, *args: Any, **kwargs: Any) -> Any:
        return self.original_module(*args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if enabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    self.modules_to_save[name].requires_grad_(True)
        else:
            self.modules_to_save.requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter's copy (only one copy of a module can be active at a time)."""
        name = self._adapter_to_activate(adapter_names)
        self.modules_to_save.requires_grad_(False)
        if name is None:
            self._active_adapter = []
            return
        self.modules_to_save[name].requires_grad_(not inference_mode)
        self._active_adapter = name

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        if adapter_name in self.active_adapters:
            self.set_adapter([name for name in (new_active_adapters or []) if name in self.modules_to_save][:1])

    def adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = f"modules_to_save.{adapter_name}."
        return {key[len(own) :]: value for key, value in state_dict.items() if key.startswith(own)}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.modules_to_save:
            return {}
        return {key: f"modules_to_save.{adapter_name}.{key}" for key in self.modules_to_save[adapter_name].state_dict()}

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The active adapter's copy (the original module when none is active)."""
        if not self.active_adapters or self.active_adapters[0] not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]


class TrainableTokensWrapper(AuxiliaryTrainingWrapper):
    """Trains a few rows of an embedding (`LoraConfig(trainable_token_indices=...)`) through a `TrainableTokensLayer`
    held as `token_adapter`; the original module is its `base_layer`. With `tied_adapter` (the output layer of a
    model tied to its input embeddings) the token layer shares the rows of `tied_adapter`, another wrapper's token
    layer, and nothing of it is saved: the rows are saved once, with the input embeddings.

    State dict keys: `<name>.token_adapter.base_layer.weight` and `<name>.token_adapter.trainable_tokens_delta.
    <adapter>`; adapter files hold `<name>.token_adapter.trainable_tokens_delta`, as HF PEFT's.
    """

    adapter_layer_names: tuple[str, ...] = ("token_adapter.trainable_tokens_delta",)
    other_param_names: tuple[str, ...] = ("token_adapter.token_indices", "token_adapter.trainable_tokens_original")
    # `peftfast.tuners.trainable_tokens.TrainableTokensLayer`, set when that package is imported (with peftfast):
    # the tuners sit above this module, which can't import them.
    token_layer_cls: type[nn.Module]

    def __init__(
        self,
        module_to_save: nn.Module,
        adapter_name: str,
        token_indices: list[int],
        tied_adapter: nn.Module | None = None,
        activate_adapter: bool = True,
    ) -> None:
        super().__init__(
            module_to_save,
            adapter_name,
            activate_adapter=activate_adapter,
            token_indices=token_indices,
            tied_adapter=tied_adapter,
        )

    def init_modules(
        self, module_to_save: nn.Module, adapter_name: str, tied_adapter: nn.Module | None = None, **kwargs: Any
    ) -> None:
        self.token_adapter = self.token_layer_cls(module_to_save, adapter_name, tied_adapter=tied_adapter)

    @property
    def original_module(self) -> nn.Module:
        # A property, not a submodule: the embedding is in the state_dict once, as the token layer's base layer.
        return self.token_adapter.base_layer

    def _error_message_name(self) -> str:
        return "trainable_token_indices"

    def _get_available_adapters(self) -> set[str]:
        return set(self.token_adapter.trainable_tokens_delta.keys())

    def _has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.token_adapter.trainable_tokens_delta

    def _hasattr_wrapped(self, name: str) -> bool:
        return name == "weight"

    def _getattr_wrapped(self, name: str) -> Any:
        # Code that reads `embeddings.weight` (its dtype, or the rows) sees the trained rows, as in HF PEFT.
        return self.token_adapter.get_merged_weights(self.token_adapter.active_adapters)

    def update(
        self,
        adapter_name: str,
        token_indices: list[int] | None = None,
        tied_adapter: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if adapter_name not in self.token_adapter.trainable_tokens_delta:
            self.token_adapter.update_layer(adapter_name, token_indices=token_indices, tied_adapter=tied_adapter)

    def _forward_wrapped(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.token_adapter(x)

    def _forward_wrapped_mixed_batch(self, x: torch.Tensor, adapter_name: str, *args: Any, **kwargs: Any):
        return self.token_adapter.forward_adapters(x, [adapter_name])

    def _forward_wrapped_passthrough(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The token layer knows how to run without adapters (and to unmerge first if it was merged).
        return self.token_adapter(x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        return self.token_adapter._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.token_adapter.enable_adapters(enabled)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        name = self._adapter_to_activate(adapter_names)
        self._active_adapter = [] if name is None else name
        self.token_adapter.set_adapter([] if name is None else [name], inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        was_active = adapter_name in self.active_adapters
        self.token_adapter.delete_adapter(adapter_name)
        if was_active or adapter_name in self.token_adapter.active_adapters:
            self.set_adapter([name for name in (new_active_adapters or []) if name in self._get_available_adapters()])

    def adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A tied layer's rows are the input embeddings' wrapper's: saved (and loaded) there, once.
        key = f"token_adapter.trainable_tokens_delta.{adapter_name}"
        if self.token_adapter.tied_adapter is not None or key not in state_dict:
            return {}
        return {"token_adapter.trainable_tokens_delta": state_dict[key]}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        if self.token_adapter.tied_adapter is not None or adapter_name not in self._get_available_adapters():
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The embedding itself, with the trained rows written in if `merge`."""
        if merge:
            self.token_adapter.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.token_adapter.get_base_layer()


def _modules_to_save_matches(key: str, names: list[str]) -> bool:
    return any(key == name or key.endswith(f".{name}") for name in names)


def set_trainable_modules(
    model: nn.Module,
    adapter_name: str,
    module_names: list[str],
    inference_mode: bool = False,
    activate_adapter: bool = True,
    wrapper_cls: type[AuxiliaryTrainingWrapper] = ModulesToSaveWrapper,
    **wrapper_kwargs: Any,
) -> None:
    """Wrap every module named in `module_names` (name or name suffix) in a `wrapper_cls` (a `ModulesToSaveWrapper`
    by default; `wrapper_kwargs` go to it), or add `adapter_name` to an existing wrapper. A new wrapper uses the
    adapter only if `activate_adapter` (an adapter added next to the active one stays inactive: the original module
    keeps running). Raises a ValueError if no module matches."""
    found = False
    for key, target in modules_outside_wrappers(model):
        if not key or not _modules_to_save_matches(key, module_names):
            continue
        parent, target, target_name = get_submodules(model, key)
        if isinstance(target, wrapper_cls):
            target.update(adapter_name, **wrapper_kwargs)
            target.set_adapter(target.active_adapters, inference_mode=inference_mode)
        else:
            wrapper = wrapper_cls(target, adapter_name, activate_adapter=activate_adapter, **wrapper_kwargs)
            wrapper.set_adapter(wrapper.active_adapters, inference_mode=inference_mode)
            setattr(parent, target_name, wrapper)
        found = True
    if not found:
        kind = "trainable_token_indices" if wrapper_cls is TrainableTokensWrapper else "modules_to_save"
        raise ValueError(f"{kind} {module_names} match no module of the model.")


def trainable_token_targets(model: nn.Module, config: Any) -> tuple[dict[str, list[int]], set[str], bool]:
    """What `config.trainable_token_indices` asks of `model`, by HF PEFT's rules: (module name -> token indices of
    the modules to wrap, the names left to weight tying, whether the tied output layer gets the input embeddings'
    rows). A list names the input embeddings (else "embed_tokens"). Several tied layers listed with the same indices
    are tied; with different ones each trains its own rows, unless `ensure_weight_tying`, which then raises."""
    indices = config.trainable_token_indices
    if isinstance(indices, dict):
        targets = {name: list(value) for name, value in indices.items()}
    else:
        targets = {input_embeddings_name(model, "embed_tokens"): list(indices)}
    tied = weights_are_tied(model)
    ensure = getattr(config, "ensure_weight_tying", False)
    mismatch, skipped = False, set()
    if len(targets) > 1 and tied:
        tied_names = set(module_names_tied_with_embedding(model))
        embedding_name = input_embeddings_name(model, "")
        tied_keys = [
            name
            for name in targets
            if embedding_name.endswith(name)
            or any(tied_name.endswith(name) or name in tied_name.split(".") for tied_name in tied_names)
        ]
        if len(tied_keys) >= 2:
            first = targets[tied_keys[0]]
            mismatch = any(targets[name] != first for name in tied_keys[1:])
            if mismatch and ensure:
                listed = ", ".join(f"{name}: {targets[name]}" for name in tied_keys)
                raise ValueError(
                    "Cannot ensure weight tying when different token indices are specified for tied layers. "
                    f"Conflicting layers: {listed}. Use the same indices for all tied layers or set "
                    "ensure_weight_tying=False."
                )
            if not mismatch:
                skipped = set(tied_keys) & tied_names
    return targets, skipped, tied and (ensure or not mismatch)


def set_additional_trainable_modules(
    model: nn.Module, config: Any, adapter_name: str, activate_adapter: bool = True
) -> None:
    """Wrap what `config` trains besides its adapter layers: `modules_to_save` (whole copies), the output layer
    tied to them (`modules_to_tie`, set by ensure_weight_tying) and `trainable_token_indices` (a few embedding rows,
    with the output layer of a tied model reading the same rows). Expects a config checked by the tuner."""
    inference_mode = getattr(config, "inference_mode", False)
    if getattr(config, "modules_to_save", None):
        set_trainable_modules(model, adapter_name, config.modules_to_save, inference_mode, activate_adapter)
    modules_to_tie = getattr(config, "modules_to_tie", None)
    if modules_to_tie:
        tied_module = model.get_input_embeddings().modules_to_save[adapter_name]
        set_trainable_modules(
            model, adapter_name, sorted(modules_to_tie), inference_mode, activate_adapter, tied_module=tied_module
        )
    if getattr(config, "trainable_token_indices", None) is None:
        return
    targets, skipped, apply_tying = trainable_token_targets(model, config)
    for name, indices in targets.items():
        if name not in skipped:
            set_trainable_modules(
                model,
                adapter_name,
                [name],
                inference_mode,
                activate_adapter,
                wrapper_cls=TrainableTokensWrapper,
                token_indices=indices,
            )
    if getattr(config, "ensure_weight_tying", False) and not weights_are_tied(model):
        warnings.warn(
            "ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False); the "
            "trainable_token_indices are not tied.",
            stacklevel=3,
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if apply_tying and isinstance(embeddings, TrainableTokensWrapper):
        tied_names = []
        for name in module_names_tied_with_embedding(model):
            # An output layer with an adapter layer of its own keeps it: the tied rows go into its base layer, as
            # HF PEFT nests them.
            module = model.get_submodule(name)
            while is_adapter_layer(module):
                name, module = f"{name}.base_layer", module.base_layer
            tied_names.append(name)
        if tied_names:
            set_trainable_modules(
                model,
                adapter_name,
                tied_names,
                inference_mode,
                activate_adapter,
                wrapper_cls=TrainableTokensWrapper,
                token_indices=embeddings.token_adapter.token_indices[adapter_name],
                tied_adapter=embeddings.token_adapter,
            )


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of `model` to `dtype` (float16 or bfloat16) and the trainable ones to float32.

    For mixed-precision training: the frozen base model takes half the memory, while the weights being trained (and
    their optimizer updates) stay in full precision. Changes the parameters in place.
    """
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)


@contextmanager
def init_empty_weights() -> Iterator[None]:
    """Inside the block, parameters registered on any module are put on the meta device (they hold no memory and
    are meant to be loaded into with `load_state_dict(..., assign=True)`); buffers are created as usual."""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a quantized transformers model ready for (Q)LoRA training, as HF PEFT does: freeze every parameter, upcast
    the fp16/bf16 ones that are not 4-bit weights to fp32 (unless the model is GPTQ/AQLM/EETQ/HQQ/torchao quantized),
    and, for a model loaded in 8 or 4 bits (or those quantizations), turn on gradient checkpointing with
    `gradient_checkpointing_kwargs`; with reentrant checkpointing (the default) the input embeddings' output is made
    to require grad, so gradients reach the adapters through the checkpointed blocks. `auto_clear_cache` empties
    the CUDA cache after the upcast. Returns the model, changed in place."""
    method = getattr(model, "quantization_method", None)
    other_quantization = method in ("gptq", "aqlm", "eetq", "hqq", "torchao") or getattr(model, "hqq_quantized", False)
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    gradient_checkpointing_kwargs = gradient_checkpointing_kwargs or {}

    for param in model.parameters():
        param.requires_grad = False
    if not other_quantization:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    if (loaded_in_kbit or other_quantization) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:

                def make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        parameters = inspect.signature(model.gradient_checkpointing_enable).parameters
        if "gradient_checkpointing_kwargs" in parameters:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            if gradient_checkpointing_kwargs:
                warnings.warn(
                    "This transformers version's gradient_checkpointing_enable takes no gradient_checkpointing_kwargs; "
                    "they are ignored. Upgrade transformers to use them.",
                    FutureWarning,
                    stacklevel=2,
                )
            model.gradient_checkpointing_enable()
    return model
