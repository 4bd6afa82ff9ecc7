"""Replace an adapter's weights in place, so that a compiled model keeps its graphs.

HF PEFT 0.21.2's API (`peft.utils.hotswap`), same names, arguments and errors:
- `prepare_model_for_compiled_hotswap(model, target_rank=...)`, before compiling: scalings become tensors (a new
  value is then new data, not a new constant) and LoRA weights are zero-padded to `target_rank` (same output; every
  adapter swapped in later fits the same shapes);
- `hotswap_adapter(model, folder, adapter_name)` / `hotswap_adapter_from_state_dict(...)`: copy the new weights into
  the existing tensors and scalings (layers the new adapter lacks get zeros);
- `check_hotswap_configs_compatible(config0, config1)`: the config fields a swap can't change.
Where PEFT and this module differ, this module is right where PEFT is not: `rank_pattern` / `alpha_pattern` keys are
matched against module names (PEFT matches them against parameter names, so a pattern naming a module never applies
to a swapped-in adapter), an adapter's own tensors are found by their place in the model (PEFT takes every key
containing "lora_" and the adapter's name as a substring), and quantized LoRA layers are padded too.

Beyond PEFT, `AdapterSlots`: a fixed number of adapter slots of one maximum rank, reserved before compiling a
mixed-adapter serving model. Loading an adapter writes it into a free slot; requests name adapters by their own names
and `slots.rows(...)` turns those into the slot names that `adapter_names=` takes. The model's adapter set, shapes
and (tensor) scalings never change, so neither does its compiled graph (see `peftfast.utils.mixed_batch`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .mixed_batch import BASE
from .peft_types import PeftType

# The config fields that shape an adapter's output beyond its weights and scaling: a swap must keep them.
CONFIG_KEYS_TO_CHECK = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"]}


def _lora_layer_classes() -> tuple[type, type, type]:
    from ..tuners.lora.layer import Conv2d, Linear, LoraLayer

    return LoraLayer, Linear, Conv2d


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module itself under a `torch.compile` wrapper (whose state_dict keys start with `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def _lora_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    from .other import named_modules_outside_adapters

    lora_layer, _, _ = _lora_layer_classes()
    return ((name, module) for name, module in named_modules_outside_adapters(model) if isinstance(module, lora_layer))


def _update_scaling(lora_module: nn.Module, adapter_name: str, scaling: float) -> None:
    """Set `adapter_name`'s scaling on `lora_module`: in place when it is a tensor (prepared for compiled hotswap)."""
    current = lora_module.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        with torch.no_grad():
            current.fill_(scaling)
    elif isinstance(current, (float, int)):
        lora_module.scaling[adapter_name] = scaling
    else:
        raise TypeError(
            f"Can't set the scaling of adapter {adapter_name!r}: expected a float or a tensor, found "
            f"{type(current).__name__}."
        )


def _convert_scalings_to_tensor(model: nn.Module) -> bool:
    """Make every LoRA scaling a 0-d tensor on its layer's device; whether any LoRA layer was found."""
    found = False
    for _, module in _lora_layers(model):
        found = True
        for name, value in module.scaling.items():
            if isinstance(value, torch.Tensor):
                continue
            if not isinstance(value, (float, int)):
                raise TypeError(f"Scaling of adapter {name!r} is a {type(value).__name__}; expected a float.")
            module.scaling[name] = torch.tensor(float(value), device=module.get_base_layer().weight.device)
    return found


def _zero_padded(weight: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    padded = weight.new_zeros(shape)
    padded[tuple(slice(0, size) for size in weight.shape)] = weight
    return padded


def _copy_rank_blocks(destination: torch.Tensor, source: torch.Tensor, groups: int) -> None:
    """Copy a grouped conv's lora_A rows group by group: group g's rank rows start at g * (rank // groups) in both."""
    step_in, step_out = source.shape[0] // groups, destination.shape[0] // groups
    for group in range(groups):
        destination[group * step_out : group * step_out + step_in] = source[group * step_in : (group + 1) * step_in]


def _check_rank_fits(rank: int, target_rank: int) -> None:
    if rank > target_rank:
        raise ValueError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger ({rank}). "
            "This is not possible."
        )


def _padded_linear(module: nn.Linear, target_rank: int, is_lora_A: bool) -> nn.Linear:
    weight = module.weight
    rank = weight.shape[0] if is_lora_A else weight.shape[1]
    if rank == target_rank:
        return module
    _check_rank_fits(rank, target_rank)
    shape = (target_rank, weight.shape[1]) if is_lora_A else (weight.shape[0], target_rank)
    new = nn.Linear(shape[1], shape[0], bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(_zero_padded(weight.detach(), shape))
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.requires_grad_(weight.requires_grad)
    return new.train(module.training)


def _padded_conv2d(module: nn.Conv2d, target_rank: int, is_lora_A: bool, base_groups: int) -> nn.Conv2d:
    weight = module.weight
    out_channels, in_channels, *kernel = weight.shape
    rank = out_channels if is_lora_A else in_channels * module.groups
    if rank == target_rank:
        return module
    _check_rank_fits(rank, target_rank)
    if is_lora_A:
        padded = weight.new_zeros(target_rank, in_channels, *kernel)
        if base_groups == 1:
            padded[:out_channels] = weight.detach()
        else:
            _copy_rank_blocks(padded, weight.detach(), base_groups)
        channels = (in_channels, target_rank)
    else:
        if target_rank % module.groups != 0:
            raise ValueError(
                f"Trying to pad a Conv2d LoRA B with groups={module.groups} to target rank {target_rank}, but the "
                f"target rank is not divisible by {module.groups}. Please choose a target rank that is divisible by "
                "groups."
            )
        padded = _zero_padded(weight.detach(), (out_channels, target_rank // module.groups, *kernel))
        channels = (target_rank, out_channels)
    new = nn.Conv2d(
        *channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        bias=module.bias is not None,
        groups=module.groups,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(padded)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.requires_grad_(weight.requires_grad)
    return new.train(module.training)


def _pad_lora_weights(model: nn.Module, target_rank: int) -> bool:
    """Zero-pad every adapter of every Linear / Conv2d LoRA layer to `target_rank` (the output is unchanged); whether
    any such layer was found. Layers are checked before any is changed."""
    _, linear, conv2d = _lora_layer_classes()
    layers = [module for _, module in _lora_layers(model) if isinstance(module, (linear, conv2d))]
    replacements = []
    for module in layers:
        if isinstance(module, conv2d):
            groups = module.get_base_layer().groups
            if target_rank % groups != 0:
                raise ValueError(
                    f"Trying to pad a Conv2d LoRA adapter with groups={groups} to target rank {target_rank}, but the "
                    f"target rank is not divisible by {groups}. Please choose a target rank that is divisible by "
                    f"{groups}."
                )

            def pad(child, is_lora_A, groups=groups):
                return _padded_conv2d(child, target_rank, is_lora_A, groups)
        else:

            def pad(child, is_lora_A):
                return _padded_linear(child, target_rank, is_lora_A)

        for holder, is_lora_A in ((module.lora_A, True), (module.lora_B, False)):
            replacements.extend((holder, name, pad(child, is_lora_A)) for name, child in holder.items())
    for holder, name, new in replacements:
        if holder[name] is not new:
            holder[name] = new
    return bool(layers)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: Any = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model with its first LoRA adapter loaded, before `torch.compile`, so that `hotswap_adapter` can later
    swap in adapters of other ranks (up to `target_rank`) and alphas without a recompile: scalings become tensors and
    the weights are zero-padded to `target_rank` (None: ranks unchanged). `config` (a LoraConfig or a dict of them)
    gets `r` and its `rank_pattern` values set to `target_rank`. On a model compiled already, `check_compiled` says
    whether to raise, warn or go on. Changes the model in place."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(
            f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' instead."
        )
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. This will "
                "likely result in re-compilation, hurting performance. Call the function before compiling the model.",
                stacklevel=2,
            )
    model = _unwrapped(model)
    padded = _pad_lora_weights(model, target_rank) if target_rank is not None else False
    converted = _convert_scalings_to_tensor(model)
    if not (converted or padded):
        raise ValueError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after loading "
            "the first adapter and before loading the second adapter."
        )
    if not config or target_rank is None:
        return
    for lora_config in config.values() if isinstance(config, dict) else [config]:
        lora_config.r = target_rank
        for key in lora_config.rank_pattern:
            lora_config.rank_pattern[key] = target_rank


def check_hotswap_configs_compatible(config0: Any, config1: Any) -> None:
    """ValueError unless `config1`'s adapter can be swapped in for `config0`'s: the same method (LoRA only) and the
    same `CONFIG_KEYS_TO_CHECK` fields."""
    type0 = PeftType(getattr(config0.peft_type, "value", config0.peft_type))
    type1 = PeftType(getattr(config1.peft_type, "value", config1.peft_type))
    if type0 != type1:
        raise ValueError(f"Incompatible PEFT types found: {type0.value} and {type1.value}")
    if type0 not in CONFIG_KEYS_TO_CHECK:
        supported = ", ".join(peft_type.value for peft_type in CONFIG_KEYS_TO_CHECK)
        raise ValueError(f"Hotswapping only supports {supported} but {type0.value} was passed.")
    fields0, fields1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in CONFIG_KEYS_TO_CHECK[type0]:
        value0, value1 = fields0.get(key, missing), fields1.get(key, missing)
        if value0 != value1:
            raise ValueError(f"Configs are incompatible: for {key}, {value0} != {value1}")


def _scaling_of(config: Any, module_name: str) -> float:
    """An adapter's scaling on the module `module_name` (relative to the base model), as LoraModel computes it."""
    from ..tuners.lora.model import get_pattern_key

    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name), config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, nn.Module, torch.Tensor]]:
    """Every tensor of `adapter_name` in its LoRA layers, by state_dict key: (layer name, layer, tensor)."""
    tensors = {}
    for layer_name, layer in _lora_layers(model):
        for holder_name in layer.adapter_layer_names:
            holder = getattr(layer, holder_name)
            if adapter_name not in holder:
                continue
            entry = holder[adapter_name]
            if isinstance(entry, torch.Tensor):
                tensors[f"{layer_name}.{holder_name}.{adapter_name}"] = (layer_name, layer, entry)
            else:
                for param_name, param in entry.named_parameters():
                    tensors[f"{layer_name}.{holder_name}.{adapter_name}.{param_name}"] = (layer_name, layer, param)
    return tensors


def _base_module_name(layer_name: str) -> str:
    # From a PeftModel: "base_model.model.<name in the base model>"; from a LoraModel: "model.<name>".
    for prefix in ("base_model.model.", "model."):
        if layer_name.startswith(prefix):
            return layer_name[len(prefix) :]
    return layer_name


def _copy_into(key: str, layer: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Write `new` into `old`: same shape copied; smaller zero-padded into it (rank rows of A, rank columns of B);
    larger (only possible where nothing was padded) put in place of it."""
    _, _, conv2d = _lora_layer_classes()
    new = new.to(old.device)
    if old.shape == new.shape:
        old.data.copy_(new)
        return
    if all(o >= n for o, n in zip(old.shape, new.shape)):
        if old.dim() not in (2, 4):
            raise NotImplementedError(
                f"Trying to hotswap an adapter whose weight has {old.dim()} dimensions, but only Conv2d and Linear "
                "are supported"
            )
        old.data.zero_()
        if old.shape[0] > new.shape[0]:
            groups = layer.get_base_layer().groups if isinstance(layer, conv2d) and ".lora_A." in key else 1
            if groups > 1:
                _copy_rank_blocks(old.data, new, groups)
            else:
                old.data[: new.shape[0]].copy_(new)
        elif old.shape[1] > new.shape[1]:
            old.data[:, : new.shape[1]].copy_(new)
        else:
            raise ValueError(
                f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs {tuple(new.shape)}. Please "
                "ensure that all ranks are padded to the largest rank among all LoRA adapters by using "
                "peftfast.utils.hotswap.prepare_model_for_compiled_hotswap."
            )
        return
    try:
        torch.utils.swap_tensors(old, new.clone())
    except RuntimeError:
        # swap_tensors refuses tensors with weak references; rebinding the data still serves an eager model.
        old.data = new


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: Any,
    parameter_prefix: str = "lora_",
) -> None:
    """Swap `adapter_name`'s weights for those in `state_dict` (keys with the adapter name in them, relative to
    `model`, as `hotswap_adapter` builds them) and its scalings for `config`'s. The new adapter must target no
    module the old one doesn't (RuntimeError naming the keys); tensors of the old adapter that the new one lacks are
    zeroed. Nothing is changed when a check fails."""
    model = _unwrapped(model)
    merged = [name for name, layer in _lora_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights (e.g. "
            f"{merged[0]!r}). Please unmerge the adapter first by calling `peft_model.unmerge_adapter()`; unmerging "
            "after a swap of merged weights would otherwise corrupt them."
        )
    own = _adapter_tensors(model, adapter_name)
    unexpected = [key for key in state_dict if key not in own]
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: {', '.join(unexpected)}.")
    for key, new in state_dict.items():
        old = own[key][2]
        if old.dim() != new.dim():
            raise ValueError(
                f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs {tuple(new.shape)}."
            )
    with torch.no_grad():
        for key in own.keys() - state_dict.keys():
            own[key][2].data.zero_()
        for key, new in state_dict.items():
            layer_name, layer, old = own[key]
            _update_scaling(layer, adapter_name, _scaling_of(config, _base_module_name(layer_name)))
            _copy_into(key, layer, old, new)


def _with_adapter_name(state_dict: dict[str, torch.Tensor], adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """On-disk keys (`...q_proj.lora_A.weight`) with the adapter name put in (`...q_proj.lora_A.<name>.weight`)."""
    from .save_and_load import _to_model_key

    return {_to_model_key(key, adapter_name, prefix, []): value for key, value in state_dict.items()}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Swap the weights of the loaded adapter `adapter_name` for those of the adapter folder `model_name_or_path`;
    the name stays. The configs must be compatible (`check_hotswap_configs_compatible`), the new adapter must target
    no module the old one doesn't. With the model prepared by `prepare_model_for_compiled_hotswap` (ranks padded,
    scalings tensors) a compiled model runs the new adapter without recompiling. `torch_device`: where the new
    weights are read to (default: the GPU if there is one); `subfolder` and other keywords go to the config."""
    from ..config import PeftConfig
    from ..registry import parameter_prefix
    from .save_and_load import load_peft_weights

    subfolder = kwargs.get("subfolder")
    config = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    peft_config = getattr(_unwrapped(model), "peft_config", {})
    if adapter_name not in peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; available adapters: {list(peft_config)}.")
    check_hotswap_configs_compatible(peft_config[adapter_name], config)
    state_dict = load_peft_weights(model_name_or_path, device=torch_device or _default_device(), subfolder=subfolder)
    prefix = parameter_prefix(config)
    hotswap_adapter_from_state_dict(
        model, _with_adapter_name(state_dict, adapter_name, prefix), adapter_name, config, parameter_prefix=prefix
    )


class AdapterSlots:
    """`capacity` adapter slots of rank `max_rank` on the modules a LoRA model targets, for a compiled mixed-adapter
    server: `load` writes an adapter into a free slot, `unload` empties one, `rows` maps request names to slot names.

    Build it on the PeftModel before compiling it; the slots are adapters named `<prefix>0`, `<prefix>1`, ... with
    zero weights and tensor scalings (frozen, inference mode). Any LoRA adapter of rank <= `max_rank` whose layers are
    among the slots' and whose config has no DoRA, modules_to_save or (unless `lora_bias`) lora_B bias fits a slot.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        max_rank: int,
        target_modules: Sequence[str] | str | None = None,
        lora_bias: bool = False,
        prefix: str = "slot",
    ) -> None:
        from ..tuners.lora.config import LoraConfig

        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive number of slots, got {capacity!r}.")
        if not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive rank, got {max_rank!r}.")
        if hasattr(model, "_orig_mod"):
            raise ValueError("Reserve adapter slots before compiling the model: adding them changes its graph.")
        if target_modules is None:
            target_modules = list(getattr(model, "targeted_module_names", []))
            if not target_modules:
                raise ValueError("The model targets no module yet; pass target_modules for the slots.")
        self.model = model
        self.max_rank = max_rank
        self.lora_bias = lora_bias
        self.slot_names = tuple(f"{prefix}{index}" for index in range(capacity))
        taken = [name for name in self.slot_names if name in model.peft_config]
        if taken:
            raise ValueError(f"The model has adapters named {taken} already; pick another slot prefix.")
        for name in self.slot_names:
            config = LoraConfig(
                r=max_rank, lora_alpha=max_rank, target_modules=target_modules, lora_bias=lora_bias, inference_mode=True
            )
            model.add_adapter(name, config)
        self._layers = {}
        for layer_name, layer in _lora_layers(model):
            if self.slot_names[0] in layer.lora_A:
                self._layers[_base_module_name(layer_name)] = layer
        with torch.no_grad():
            for layer in self._layers.values():
                for name in self.slot_names:
                    for weight in self._slot_tensors(layer, name):
                        weight.zero_()
                    layer.scaling[name] = torch.zeros((), device=layer.lora_A[name].weight.device)
        self.loaded: dict[str, str] = {}

    @staticmethod
    def _slot_tensors(layer: nn.Module, slot: str) -> list[torch.Tensor]:
        B = layer.lora_B[slot]
        return [layer.lora_A[slot].weight, B.weight] + ([B.bias] if B.bias is not None else [])

    def rows(self, adapter_names: Iterable[str]) -> list[str]:
        """The slot name of each request's adapter (by the name it was loaded under), "__base__" kept: what to pass
        as `adapter_names=`."""
        names = list(adapter_names)
        unknown = sorted({name for name in names if name != BASE and name not in self.loaded})
        if unknown:
            raise ValueError(f"Adapters {unknown} are not loaded into a slot; loaded: {sorted(self.loaded)}.")
        return [name if name == BASE else self.loaded[name] for name in names]

    def load(
        self,
        adapter: str | os.PathLike | dict[str, torch.Tensor],
        name: str,
        config: Any = None,
        torch_device: str | None = None,
    ) -> str:
        """Write an adapter (a folder saved by `save_pretrained`, or its on-disk state dict with `config`) into a
        slot, under `name` (again: into the slot it has); returns the slot's name. Everything is checked before any
        slot is written: a refused adapter leaves every slot as it was."""
        from ..config import PeftConfig
        from .names import check_adapter_name
        from .save_and_load import load_peft_weights

        check_adapter_name(name, "name")
        if isinstance(adapter, dict):
            if config is None:
                raise ValueError("Loading an adapter from a state dict needs its config (config=LoraConfig(...)).")
            state_dict = adapter
        else:
            config = config or PeftConfig.from_pretrained(adapter)
            state_dict = load_peft_weights(adapter, device=torch_device or "cpu")
        writes = self._plan(state_dict, config, name)
        slot = self.loaded.get(name) or next((s for s in self.slot_names if s not in self.loaded.values()), None)
        if slot is None:
            raise ValueError(
                f"All {len(self.slot_names)} adapter slots are taken ({sorted(self.loaded)}); unload one first."
            )
        with torch.no_grad():
            for module_name, layer in self._layers.items():
                for weight in self._slot_tensors(layer, slot):
                    weight.zero_()
                found = writes.get(module_name)
                if found is None:
                    layer.scaling[slot].fill_(0.0)
                    continue
                for tensor_name, value in found.items():
                    target = getattr(layer, f"lora_{tensor_name[0]}")[slot]
                    if tensor_name == "A.weight":
                        target.weight[: value.shape[0]] = value
                    elif tensor_name == "B.weight":
                        target.weight[:, : value.shape[1]] = value
                    else:
                        target.bias.copy_(value)
                layer.scaling[slot].fill_(_scaling_of(config, module_name))
        self.loaded[name] = slot
        return slot

    def unload(self, name: str) -> None:
        """Empty the slot of the adapter loaded as `name` (zero weights: its rows would now run the base model)."""
        slot = self.loaded.pop(name, None)
        if slot is None:
            raise ValueError(f"No adapter {name!r} is loaded into a slot; loaded: {sorted(self.loaded)}.")
        with torch.no_grad():
            for layer in self._layers.values():
                for weight in self._slot_tensors(layer, slot):
                    weight.zero_()
                layer.scaling[slot].fill_(0.0)

    def _plan(self, state_dict: dict[str, torch.Tensor], config: Any, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors to write per module, checked: ValueError naming the adapter and what doesn't fit."""
        peft_type = getattr(config, "peft_type", None)
        if getattr(peft_type, "value", peft_type) != PeftType.LORA.value:
            raise ValueError(f"Adapter {name!r} is a {peft_type} adapter; adapter slots hold LoRA adapters.")
        for field_name in ("use_dora", "modules_to_save", "trainable_token_indices"):
            if getattr(config, field_name, None):
                raise ValueError(f"Adapter {name!r} sets {field_name}, which an adapter slot can't hold.")
        writes: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            head, _, tail = key.rpartition("lora_")
            module_name = _base_module_name(head.removesuffix("."))
            layer = self._layers.get(module_name)
            if layer is None or tail not in ("A.weight", "B.weight", "B.bias"):
                raise ValueError(
                    f"Adapter {name!r} has {key!r}, which no adapter slot holds (the slots hold lora_A/lora_B of "
                    f"{sorted(self._layers)[:4]}{' ...' if len(self._layers) > 4 else ''})."
                )
            if tail == "B.bias" and not self.lora_bias:
                raise ValueError(
                    f"Adapter {name!r} has a lora_B bias ({key!r}); reserve the slots with lora_bias=True."
                )
            slot_weight = getattr(layer, f"lora_{tail[0]}")[self.slot_names[0]].weight
            rank_dim = 0 if tail == "A.weight" else 1
            fits = value.dim() == 1 or (
                value.dim() == 2
                and value.shape[rank_dim] <= self.max_rank
                and value.shape[1 - rank_dim] == slot_weight.shape[1 - rank_dim]
            )
            if not fits or not value.dtype.is_floating_point or not torch.isfinite(value).all():
                raise ValueError(
                    f"Adapter {name!r} has {key!r} of shape {tuple(value.shape)} ({value.dtype}), which doesn't fit a "
                    f"slot of rank {self.max_rank} (weight {tuple(slot_weight.shape)}), or holds NaN/inf."
                )
            writes.setdefault(module_name, {})[tail] = value.to(slot_weight.device, slot_weight.dtype)
        for module_name, tensors in writes.items():
            A, B = tensors.get("A.weight"), tensors.get("B.weight")
            if A is None or B is None or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"Adapter {name!r} has no matching lora_A/lora_B pair for {module_name!r} (ranks "
                    f"{None if A is None else A.shape[0]} and {None if B is None else B.shape[1]})."
                )
        return writes


__all__ = [
    "CONFIG_KEYS_TO_CHECK",
    "AdapterSlots",
    "check_hotswap_configs_compatible",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "prepare_model_for_compiled_hotswap",
]
