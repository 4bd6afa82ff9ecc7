"""Adapter state dicts in HF PEFT's on-disk key format, and reading adapter files safely.

In memory the adapter name is part of each key (`...q_proj.lora_A.default.weight`); on disk it is not
(`base_model.model....q_proj.lora_A.weight`). What auxiliary wrappers train is keyed as each wrapper says
(`adapter_state_dict` / `adapter_state_dict_load_map`): `modules_to_save` copies under the wrapped module's own path,
trainable tokens as `<embedding>.token_adapter.trainable_tokens_delta`. Files are read with safetensors; a legacy
`.bin` only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..registry import parameter_prefix
from .constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .hub import hub_file, split_hub_kwargs
from .other import AuxiliaryTrainingWrapper, named_modules_outside_adapters
from .peft_types import PeftType


def _wrappers(model: nn.Module) -> list[tuple[str, AuxiliaryTrainingWrapper]]:
    return [
        (name, module)
        for name, module in named_modules_outside_adapters(model)
        if isinstance(module, AuxiliaryTrainingWrapper)
    ]


def _wrapper_load_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """On-disk key -> state_dict key of everything the auxiliary wrappers hold for `adapter_name`."""
    return {
        f"{name}.{file_key}": f"{name}.{model_key}"
        for name, wrapper in _wrappers(model)
        for file_key, model_key in wrapper.adapter_state_dict_load_map(adapter_name).items()
    }


def _embedding_is_targeted(model: nn.Module, config: Any) -> bool:
    """HF PEFT's rule: a regex `target_modules` (not "all-linear") targets the embeddings when it matches a module
    named like one of EMBEDDING_LAYER_NAMES; a list does when it contains one of those names."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return any(
            re.fullmatch(targets, key)
            for key, _ in base.named_modules()
            if any(re.match(rf"(.*\.)?{name}$", key) for name in EMBEDDING_LAYER_NAMES)
        )
    return bool(targets) and not isinstance(targets, str) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocab_was_resized(model: nn.Module, config: Any) -> bool:
    """Whether the model's vocabulary differs from that of the base model it was loaded from (HF PEFT's test for
    `save_embedding_layers="auto"`). Only a local base model folder can be checked: peftfast reads no hub."""
    model_config = getattr(model, "config", None)
    vocab_size = getattr(model_config, "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not vocab_size or not model_id:
        return False
    if not os.path.isfile(os.path.join(model_id, "config.json")):
        warnings.warn(
            f"Could not find a config file in {model_id!r}; assuming the vocabulary was not resized, so the embedding "
            "layers are not saved (pass save_embedding_layers=True to save them).",
            stacklevel=3,
        )
        return False
    return vocab_size != type(model_config).from_pretrained(model_id).vocab_size


def _embedding_layers(model: nn.Module) -> list[nn.Module]:
    try:
        return [model.get_input_embeddings(), model.get_output_embeddings()]
    except (AttributeError, NotImplementedError):
        return []


def _embedding_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, embedding_is_targeted: bool
) -> dict[str, torch.Tensor]:
    """The full input/output embedding weights, under the keys HF PEFT writes: an embedding that carries a LoRA layer
    is saved as `<name>.base_layer.weight` when the embeddings are targeted, any other as `<name>.weight`."""
    other_adapters = [name for name in model.peft_config if name != adapter_name]
    result: dict[str, torch.Tensor] = {}
    for layer in _embedding_layers(model):
        if layer is None:
            continue
        base_layer = getattr(layer, "base_layer", None)
        has_embedding_base = isinstance(base_layer, (nn.Linear, nn.Embedding))
        if embedding_is_targeted and not has_embedding_base:
            continue
        wanted = base_layer if embedding_is_targeted else layer
        module_name = next((name for name, module in model.named_modules() if module is wanted), None)
        if module_name is None:
            continue
        for key, value in state_dict.items():
            if key.startswith(f"{module_name}.") and not any(
                f".{other}." in key or key.endswith(f".{other}") for other in other_adapters
            ):
                result[key] = value
    return result


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as HF PEFT writes them to `adapter_model.safetensors`.

    `model` is a PeftModel (or any module with `peft_config`); keys are relative to it.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = model.peft_config[adapter_name]
    if state_dict is None:
        state_dict = model.state_dict()
    prefix = parameter_prefix(config)
    own_adapter = _adapter_key_pattern(prefix, adapter_name)
    if config.is_prompt_learning:
        # As HF PEFT: the prompt is saved as the encoder's output for the virtual tokens, not as encoder weights.
        to_return = {"prompt_embeddings": model.get_prompt_embedding_to_save(adapter_name)}
    else:
        to_return = {k: v for k, v in state_dict.items() if own_adapter.search(k)}
    bias = getattr(config, "bias", "none")
    if bias == "all":
        to_return.update((k, v) for k, v in state_dict.items() if prefix not in k and k.endswith(".bias"))
    elif bias == "lora_only":
        # The bias of a targeted layer lives on its base layer: `<layer>.base_layer.bias`.
        for key in list(to_return):
            bias_key = key.split(prefix)[0] + "base_layer.bias"
            if bias_key in state_dict:
                to_return[bias_key] = state_dict[bias_key]

    for name, wrapper in _wrappers(model):
        own = f"{name}."
        wrapper_state = {key[len(own) :]: value for key, value in state_dict.items() if key.startswith(own)}
        to_return.update(
            (f"{own}{key}", value) for key, value in wrapper.adapter_state_dict(adapter_name, wrapper_state).items()
        )

    # Embeddings, as HF PEFT: with "auto" their full weights are saved when target_modules names them (unless
    # trainable_token_indices keeps the file small) or when the vocabulary was resized after loading the base model.
    embedding_is_targeted = _embedding_is_targeted(model, config)
    if save_embedding_layers == "auto":
        using_trainable_tokens = (
            getattr(config, "trainable_token_indices", None) is not None
            or getattr(config.peft_type, "value", config.peft_type) == PeftType.TRAINABLE_TOKENS.value
        )
        if embedding_is_targeted and not using_trainable_tokens:
            warnings.warn(
                "Embedding layers are in target_modules: saving their full weights with the adapter "
                "(save_embedding_layers=True).",
                stacklevel=2,
            )
            save_embedding_layers = True
        else:
            save_embedding_layers = _vocab_was_resized(model, config)
            if save_embedding_layers:
                warnings.warn(
                    "The vocabulary was resized: saving the full embedding weights with the adapter "
                    "(save_embedding_layers=True).",
                    stacklevel=2,
                )
    if save_embedding_layers and _embedding_layers(model):
        to_return.update(_embedding_state_dict(model, state_dict, adapter_name, embedding_is_targeted))
    elif save_embedding_layers:
        warnings.warn(
            f"save_embedding_layers=True, but the {type(model).__name__} has no get_input_embeddings(): only "
            "transformers models have known embedding layers, so none were saved.",
            stacklevel=2,
        )

    return {_disk_key(key, own_adapter): value for key, value in to_return.items()}


def _adapter_key_pattern(prefix: str, adapter_name: str) -> re.Pattern:
    """Matches the `<holder>.<adapter_name>` part of the in-memory keys of an adapter's tensors, where the holder is
    an adapter attribute (`lora_A.<name>.weight`, `lora_embedding_A.<name>`), so that a module that happens to share
    the adapter's name (an adapter "lin0" beside a layer "lin0") is never taken for it. Group 1 is the holder part."""
    return re.compile(rf"((?:^|\.){re.escape(prefix)}[^.]*)\.{re.escape(adapter_name)}(?=\.|$)")


# Adapter modules whose one parameter is stored on disk under the module's own key, without ".weight" (HF PEFT keeps
# DoRA's magnitude keys as they were when the magnitude was a bare parameter).
_BARE_WEIGHT_MODULES = ("lora_magnitude_vector",)


def _disk_key(key: str, own_adapter: re.Pattern) -> str:
    """The on-disk key of an in-memory one: the adapter name dropped from an adapter tensor's key (and the
    `.weight` of a bare-weight module's)."""
    disk_key = own_adapter.sub(r"\1", key, count=1)
    if disk_key != key and any(disk_key.endswith(f".{name}.weight") for name in _BARE_WEIGHT_MODULES):
        disk_key = disk_key.removesuffix(".weight")
    return disk_key


def _to_model_key(key: str, adapter_name: str, prefix: str, wrapper_keys: dict[str, str]) -> str:
    """Map an on-disk key back to the in-memory key for `adapter_name`."""
    if key in wrapper_keys:
        return wrapper_keys[key]
    if prefix not in key:
        return key
    # The last occurrence: a module path may itself contain the prefix ("lora_layers.0.q.lora_A.weight").
    head, _, tail = key.rpartition(prefix)
    parameter_holder, dot, rest = tail.partition(".")
    if not dot and f"{prefix}{parameter_holder}" in _BARE_WEIGHT_MODULES:
        return f"{head}{prefix}{parameter_holder}.{adapter_name}.weight"
    if not dot:
        # lora_embedding_A / lora_embedding_B are parameters, not modules: no `.weight` suffix on disk.
        return f"{head}{prefix}{parameter_holder}.{adapter_name}"
    return f"{head}{prefix}{parameter_holder}.{adapter_name}.{rest}"


# A LoRA weight of one expert's own layer, as transformers v4 MoE models had them (Mixtral: experts.3.w1, Qwen-MoE:
# experts.3.gate_proj).
_V4_EXPERT_KEY = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.lora_")


class _ModelTensors:
    """The model's tensors by state_dict key, as far as loading one adapter needs them: `key in` and `[key]` ->
    (tensor, is_parameter). `own` are the adapter's own tensors (in its entries of adapter layers). Without `whole`,
    nothing walks other adapters' entries or builds the model's whole state dict, so loading the N-th adapter costs
    what loading the first does; a key outside the adapter (a base bias, a modules_to_save copy) is looked up by its
    path. `whole` (prompt learning, whose state lives outside adapter layers) uses the whole state dict."""

    def __init__(self, model: nn.Module, adapter_name: str, prefix: str, whole: bool) -> None:
        self._model = model
        self._whole: dict[str, tuple[torch.Tensor, bool]] | None = None
        if whole:
            parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
            self._whole = {key: (value, key in parameters) for key, value in model.state_dict().items()}
            own_adapter = _adapter_key_pattern(prefix, adapter_name)
            self.own = {key: value for key, value in self._whole.items() if own_adapter.search(key)}
            return
        self.own = {}
        for path, module in named_modules_outside_adapters(model):
            cls = type(module)
            for attr in (*getattr(cls, "adapter_layer_names", ()), *getattr(cls, "other_param_names", ())):
                holder = module._modules.get(attr) if attr.startswith(prefix) else None
                if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in holder:
                    continue
                entry_key = f"{path}.{attr}.{adapter_name}" if path else f"{attr}.{adapter_name}"
                entry = holder[adapter_name]
                if isinstance(entry, torch.Tensor):
                    self.own[entry_key] = (entry, True)
                    continue
                parameters = {name for name, _ in entry.named_parameters()}
                for name, value in entry.state_dict().items():
                    self.own[f"{entry_key}.{name}"] = (value, name in parameters)

    def _lookup(self, key: str) -> tuple[torch.Tensor, bool] | None:
        if self._whole is not None:
            return self._whole.get(key)
        found = self.own.get(key)
        if found is not None:
            return found
        path, _, leaf = key.rpartition(".")
        try:
            module = self._model.get_submodule(path) if path else self._model
        except AttributeError:
            return None
        param = module._parameters.get(leaf)
        if param is not None:
            return param, True
        buffer = module._buffers.get(leaf)
        if buffer is not None and leaf not in module._non_persistent_buffers_set:
            return buffer, False
        return None

    def __contains__(self, key: str) -> bool:
        return self._lookup(key) is not None

    def __getitem__(self, key: str) -> tuple[torch.Tensor, bool]:
        found = self._lookup(key)
        if found is None:
            raise KeyError(key)
        return found


@dataclass
class _AdapterLoad:
    """What loading a file's tensors into an adapter will write, worked out and checked before anything is."""

    tensors: dict[str, torch.Tensor]  # in-memory key -> tensor
    missing_keys: list[str]  # the adapter's tensors in the model that the file lacks
    unexpected_keys: dict[str, str]  # the file's keys that name no tensor of the model -> their in-memory form
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # skipped under ignore_mismatched_sizes
    prompt_embeddings: torch.Tensor | None


def _plan_adapter_load(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str, ignore_mismatched_sizes: bool
) -> _AdapterLoad:
    """Map on-disk keys to the model's and check every tensor (shape, dtype kind, finite values) before any is
    loaded, so that a bad file leaves the model as it was; the errors name the key."""
    config = model.peft_config[adapter_name]
    prefix = parameter_prefix(config)
    wrapper_keys = _wrapper_load_keys(model, adapter_name)
    model_state = _ModelTensors(model, adapter_name, prefix, whole=config.is_prompt_learning)
    file_state = dict(peft_model_state_dict)
    prompt_embeddings = None
    if config.is_prompt_learning:
        prompt_embeddings = file_state.pop("prompt_embeddings", None)
        expected = model.prompt_encoder[adapter_name].embedding.weight.shape
        if prompt_embeddings is not None and prompt_embeddings.shape != expected:
            raise ValueError(
                f"The saved prompt_embeddings have shape {tuple(prompt_embeddings.shape)} but adapter "
                f"{adapter_name!r} expects {tuple(expected)}; the adapter was saved for another model or config. "
                "Nothing was loaded."
            )
        if prompt_embeddings is not None:
            weight = model.prompt_encoder[adapter_name].embedding.weight
            _check_loadable("prompt_embeddings", prompt_embeddings, weight.dtype, is_parameter=True)
    tensors: dict[str, torch.Tensor] = {}
    unexpected: dict[str, str] = {}
    mismatched = []
    for key, value in file_state.items():
        model_key = _to_model_key(key, adapter_name, prefix, wrapper_keys)
        if model_key not in model_state:
            base_key = model_key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            if base_key in model_state:
                model_key = base_key
        if model_key not in model_state:
            unexpected[key] = model_key
            continue
        target, is_parameter = model_state[model_key]
        if target.shape != value.shape:
            if not ignore_mismatched_sizes:
                raise ValueError(
                    f"Adapter weight {model_key!r} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(target.shape)} in the model; the adapter was trained for a different model or config. "
                    "Nothing was loaded."
                )
            mismatched.append((model_key, tuple(value.shape), tuple(target.shape)))
            continue
        _check_loadable(model_key, value, target.dtype, is_parameter=is_parameter)
        tensors[model_key] = value
    per_expert = [key for key in unexpected.values() if _V4_EXPERT_KEY.search(key)]
    if per_expert:
        # HF PEFT converts these with transformers' checkpoint conversion (the two halves of gate_up_proj joined per
        # expert); peftfast does not.
        raise NotImplementedError(
            f"The adapter has weights for per-expert layers such as {per_expert[0]!r}: it was trained on a "
            "transformers v4 MoE model, whose experts transformers v5 fused into 3-D parameters. Converting such "
            "adapter weights is not implemented in peftfast; load it with HF PEFT, or train the adapter with "
            "target_parameters on the v5 model. Nothing was loaded."
        )
    expected = dict.fromkeys(model_state.own)
    expected.update((key, None) for key in wrapper_keys.values() if key in model_state)
    missing = [key for key in expected if key not in tensors]
    if config.is_prompt_learning and prompt_embeddings is None:
        # The prompt lives in the PeftModel's prompt encoder, not in the model's state dict.
        missing.append("prompt_embeddings")
    return _AdapterLoad(tensors, missing, unexpected, mismatched, prompt_embeddings)


def _check_loadable(key: str, value: torch.Tensor, target_dtype: torch.dtype, is_parameter: bool) -> None:
    if value.dtype.is_floating_point != target_dtype.is_floating_point:
        raise ValueError(
            f"Adapter weight {key!r} is {value.dtype} in the file but {target_dtype} in the model; loading would "
            "convert its values, so the file is not an adapter for this model (or is corrupt). Nothing was loaded."
        )
    if is_parameter and value.dtype.is_floating_point:
        bad = int(value.numel() - torch.isfinite(value).sum())
        if bad:
            raise ValueError(
                f"Adapter weight {key!r} holds {bad} NaN/inf value(s) out of {value.numel()}; the adapter is "
                "broken (e.g. saved from a diverged training run). Nothing was loaded."
            )


def _apply_adapter_load(
    model: nn.Module, plan: _AdapterLoad, adapter_name: str, low_cpu_mem_usage: bool = False
) -> Any:
    """Write a checked `_AdapterLoad` into the model; warns about the file's keys that were not loaded."""
    # Each tensor is loaded by the module that holds it (what model.load_state_dict does per module, without walking
    # every other adapter's modules on the way).
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in plan.tensors.items():
        owner, _, leaf = key.rpartition(".")
        by_owner.setdefault(owner, {})[leaf] = value
    for owner, tensors in by_owner.items():
        module = model.get_submodule(owner) if owner else model
        module.load_state_dict(tensors, strict=False, assign=low_cpu_mem_usage)
    if low_cpu_mem_usage:
        # The assigned tensors have the file's device and dtype: move them to their base layers (fp32 is kept on
        # fp16/bf16 bases; a PeftModel then applies its autocast_adapter_dtype choice).
        for _, module in named_modules_outside_adapters(model):
            if hasattr(module, "_move_adapter_to_base"):
                module._move_adapter_to_base(adapter_name, autocast_adapter_dtype=True)
    result = _IncompatibleKeys([], [])
    result.missing_keys[:] = plan.missing_keys
    result.unexpected_keys[:] = plan.unexpected_keys.values()
    if plan.prompt_embeddings is not None:
        model.prompt_encoder[adapter_name].load_prompt_embeddings(plan.prompt_embeddings)
    if plan.unexpected_keys:
        shown = sorted(plan.unexpected_keys)[:8]
        warnings.warn(
            f"{len(plan.unexpected_keys)} tensor(s) of the adapter file match nothing in the model and were not "
            f"loaded into adapter {adapter_name!r}: {shown}{' ...' if len(plan.unexpected_keys) > 8 else ''}. The "
            "file may belong to another model or come from a newer library.",
            stacklevel=3,
        )
    if plan.mismatched:
        warnings.warn(
            "Skipped adapter weights of mismatched shape: "
            + ", ".join(
                f"{key} (file {file_shape}, model {model_shape})" for key, file_shape, model_shape in plan.mismatched
            ),
            stacklevel=3,
        )
    return result


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> Any:
    """Load on-disk adapter tensors into `adapter_name`. Every tensor is checked before any is written (shape, an
    integer tensor where the model has a float one, NaN/inf in a weight), so a bad file leaves the model unchanged;
    the error names the key. Keys that match nothing in the model are reported with a warning. Returns the
    `load_state_dict` result: `missing_keys` are the adapter's tensors the file lacks, `unexpected_keys` the file's
    keys that were not loaded."""
    plan = _plan_adapter_load(model, peft_model_state_dict, adapter_name, ignore_mismatched_sizes)
    return _apply_adapter_load(model, plan, adapter_name, low_cpu_mem_usage)


def path_inside(folder: str | os.PathLike, *parts: str) -> str:
    """The real path (symlinks resolved) of `folder/parts...`, which must lie inside the real path of `folder`:
    a ValueError when an absolute part, a ".." or a symlink in the way leads outside. Every file `save_pretrained`
    writes goes to such a path."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        wanted = os.path.join(os.fspath(folder), *parts)
        raise ValueError(
            f"Refusing to write {wanted!r}: it resolves to {path!r}, outside the folder {root!r} (through an "
            "absolute path, a '..' or a symlink). Nothing was written."
        )
    return path


def load_peft_weights(
    model_id: str | os.PathLike, device: str | torch.device | None = None, **hf_hub_download_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors from a local folder, or from a Hugging Face Hub repo id through huggingface_hub's
    cache (kwargs such as `subfolder`, `revision`, `cache_dir`, `token`, `local_files_only` go to
    `hf_hub_download`): safetensors first, else a legacy `.bin` without pickles. On the CPU unless `device`."""
    subfolder = hf_hub_download_kwargs.get("subfolder")
    folder = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    device = device or "cpu"
    safetensors_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    bin_file = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(safetensors_file):
        return _read_safetensors(safetensors_file, device)
    if os.path.isfile(bin_file):
        return _read_bin(bin_file, device)
    if os.path.isdir(model_id):
        raise ValueError(
            f"No adapter weights in {folder!r}: expected {SAFETENSORS_WEIGHTS_NAME} (or a legacy {WEIGHTS_NAME})."
        )
    hub_kwargs, _ = split_hub_kwargs(hf_hub_download_kwargs)
    try:
        safetensors_file = _hub_weights(model_id, SAFETENSORS_WEIGHTS_NAME, hub_kwargs)
        bin_file = None if safetensors_file is not None else _hub_weights(model_id, WEIGHTS_NAME, hub_kwargs)
    except Exception as error:
        raise ValueError(
            f"No adapter weights in {folder!r}: it is no local folder, and the Hugging Face Hub gave none for that id "
            f"({type(error).__name__}: {error})."
        ) from error
    if safetensors_file is not None:
        return _read_safetensors(safetensors_file, device)
    if bin_file is not None:
        return _read_bin(bin_file, device)
    raise ValueError(
        f"The Hugging Face Hub repo {os.fspath(model_id)!r}{f' (subfolder {subfolder!r})' if subfolder else ''} has "
        f"no adapter weights: expected {SAFETENSORS_WEIGHTS_NAME} (or a legacy {WEIGHTS_NAME})."
    )


def _hub_weights(model_id: str | os.PathLike, filename: str, hub_kwargs: dict[str, Any]) -> str | None:
    """A weights file of a Hub repo, None when the repo (or, offline, the cached snapshot) has none."""
    try:
        return hub_file(model_id, filename, **hub_kwargs)
    except FileNotFoundError:
        # Offline and not in the cache: the other file name may be.
        if filename == WEIGHTS_NAME:
            raise
        return None


def _read_safetensors(path: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except Exception as error:
        raise ValueError(f"Can't read adapter weights from {path}: {error}") from error


def _read_bin(path: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Can't read adapter weights from {path} (only plain tensors are accepted, never pickled objects): {error}"
        ) from error


# ------------------------------------------------------------------------------------------- base model state dict


def _is_adapter_layer(module: nn.Module) -> bool:
    # A tuner layer (BaseTunerLayer) holds the module it adapts as its `base_layer` child; told apart by structure so
    # that this module needs nothing from the tuners.
    return "base_layer" in module._modules and hasattr(module, "adapter_layer_names")


def _is_training_wrapper(module: nn.Module) -> bool:
    return isinstance(module, AuxiliaryTrainingWrapper)


def _adapter_key_prefixes(root: nn.Module) -> set[str]:
    """State-dict key prefixes (relative to `root`) of everything the adapters added: every child, parameter and
    buffer of an adapter layer but its `base_layer`, and of a training wrapper but its `original_module` (an adapter
    layer inside a wrapper, which wraps the original module, is walked into rather than dropped)."""
    prefixes: set[str] = set()
    for module_name, module in root.named_modules():
        if _is_adapter_layer(module):
            kept = {"base_layer"}
        elif _is_training_wrapper(module):
            kept = {"original_module"} | {name for name, child in module.named_children() if _is_adapter_layer(child)}
        else:
            continue
        names = [name for name, _ in module.named_children()]
        names += [name for name, _ in module.named_parameters(recurse=False)]
        names += [name for name, _ in module.named_buffers(recurse=False)]
        prefixes.update(f"{module_name}.{name}" if module_name else name for name in names if name not in kept)
    return prefixes


def _is_under(key: str, prefixes: set[str]) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def _original_key(root: nn.Module, key: str) -> str:
    """`key` of `root`'s state dict as the model had it before any adapter was put in: the `base_layer` step of an
    adapter layer, the `original_module` step of a training wrapper and an adapter layer inside a wrapper are
    dropped. Decided module by module (a module of the model may itself be named `base_layer`)."""
    parts: list[str] = []
    current: nn.Module | None = root
    for part in key.split("."):
        child = current._modules.get(part) if current is not None else None
        if child is None:
            parts.append(part)
            current = None
            continue
        skipped = (
            (part == "base_layer" and _is_adapter_layer(current))
            or (part == "original_module" and _is_training_wrapper(current))
            or (_is_adapter_layer(child) and _is_training_wrapper(current))
        )
        if not skipped:
            parts.append(part)
        current = child
    return ".".join(parts)


def _base_model_root(model: nn.Module) -> nn.Module:
    if not hasattr(model, "get_base_model") or not hasattr(model, "peft_config"):
        raise TypeError(f"Expected a PeftModel, got a {type(model).__name__}.")
    return model.get_base_model()


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `model`'s base model (`model` a `PeftModel`) under the keys the model had before adapters
    were put in, without any adapter tensor (HF PEFT's `get_base_model_state_dict`). For prompt-learning adapters,
    which change no module, it is the base model's state dict as is."""
    root = _base_model_root(model)
    if getattr(model, "_is_prompt_learning", False):
        return dict(root.state_dict())
    prefixes = _adapter_key_prefixes(root)
    return {_original_key(root, key): value for key, value in root.state_dict().items() if not _is_under(key, prefixes)}


class _IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load `state_dict`, keyed as the base model was before adapters were put in (what `get_base_model_state_dict`
    returns), into `model`'s base model (`model` a `PeftModel`); adapter weights are not touched.

    Returns (missing_keys, unexpected_keys) in those original keys. With `strict`, any of either raises a
    RuntimeError listing them, before anything is loaded.
    """
    root = _base_model_root(model)
    if getattr(model, "_is_prompt_learning", False):
        return root.load_state_dict(state_dict, strict=strict)
    prefixes = _adapter_key_prefixes(root)
    model_key = {_original_key(root, key): key for key in root.state_dict() if not _is_under(key, prefixes)}
    unexpected_keys = [key for key in state_dict if key not in model_key]
    missing_keys = [key for key in model_key if key not in state_dict]
    if strict and (missing_keys or unexpected_keys):
        errors = []
        if missing_keys:
            errors.append(f"Missing key(s) in state_dict: {missing_keys}")
        if unexpected_keys:
            errors.append(f"Unexpected key(s) in state_dict: {unexpected_keys}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    root.load_state_dict({model_key[key]: value for key, value in state_dict.items() if key in model_key}, strict=False)
    return _IncompatibleKeys(missing_keys=missing_keys, unexpected_keys=unexpected_keys)
