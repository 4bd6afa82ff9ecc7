"""transformers integration, without HF PEFT installed.

1. `transformers.Trainer` trains a peftfast `PeftModel` as it trains a HF PEFT one: checkpoints hold only the adapter
   (`adapter_config.json` + `adapter_model.safetensors`, no base weights), `resume_from_checkpoint` loads them back,
   and quantized base models are accepted. Trainer recognises PEFT models by `isinstance` against HF PEFT's classes,
   so `patch_trainer()` extends that check (and the adapter-only save) to peftfast's `PeftModel`. `import peftfast`
   runs it, at once if `transformers.trainer` is loaded, else when it first is (an import hook that waits for it).
2. The adapter methods transformers puts on every `PreTrainedModel` (`add_adapter`, `load_adapter`, `set_adapter`,
   `disable_adapters`, `enable_adapters`, `active_adapters`, `delete_adapter`, `get_adapter_state_dict`), running
   on peftfast: as functions taking the model first, as `PeftAdapterMixin` to put in front of a model class, or on
   one model object with `enable_adapter_methods(model)`. The adapters go into the model in place, as with
   transformers' own methods; `save_pretrained` of a model with the mixin then writes only the active adapter.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import os
import sys
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..mapping import inject_adapter_in_model
from ..tuners.tuners_utils import BaseTunerLayer
from ..utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from ..utils.other import ModulesToSaveWrapper
from ..utils.rollback import ModuleTreeRollback
from ..utils.save_and_load import get_peft_model_state_dict, load_peft_weights, path_inside, set_peft_model_state_dict

# HF PEFT's adapter files key every tensor relative to a PeftModel: `base_model.model.<module path>...`.
_FILE_KEY_PREFIX = "base_model.model."

# -------------------------------------------------------------------------------------------------------- Trainer

# transformers modules that bind `_is_peft_model` at import and call it on the Trainer's model.
_MODULES_WITH_IS_PEFT_MODEL = (
    "transformers.trainer_utils",
    "transformers.trainer",
    "transformers.integrations.neftune",
)


def _is_peftfast_model(model: Any) -> bool:
    from ..peft_model import PeftModel

    return isinstance(model, PeftModel)


def _extend_is_peft_model(original: Any) -> Any:
    def is_peft_model(model: Any) -> bool:
        return _is_peftfast_model(model) or original(model)

    is_peft_model.__wrapped__ = original
    is_peft_model._peftfast = True
    return is_peft_model


def _save_adapter_checkpoint(original: Any) -> Any:
    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_peftfast_model(model):
            return original(self, output_dir, state_dict)
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        # As for HF PEFT models: the adapter files only, in HF PEFT's format.
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    _save.__wrapped__ = original
    _save._peftfast = True
    return _save


def patch_trainer() -> None:
    """Make `transformers.Trainer` treat a peftfast `PeftModel` as a PEFT model: save adapter-only checkpoints,
    load them on `resume_from_checkpoint` and `load_best_model_at_end`, accept quantized bases. Idempotent; imports
    `transformers.trainer`. Other models are handled exactly as before."""
    trainer_module = importlib.import_module("transformers.trainer")
    for module_name in _MODULES_WITH_IS_PEFT_MODEL:
        module = sys.modules.get(module_name)
        original = getattr(module, "_is_peft_model", None)
        if original is not None and not getattr(original, "_peftfast", False):
            module._is_peft_model = _extend_is_peft_model(original)
    trainer_cls = trainer_module.Trainer
    if not getattr(trainer_cls._save, "_peftfast", False):
        trainer_cls._save = _save_adapter_checkpoint(trainer_cls._save)


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """Runs `patch_trainer()` right after `transformers.trainer` is first imported, wherever that happens
    (transformers imports its submodules lazily, on first attribute access)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "transformers.trainer":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        # Everything else (get_source for tracebacks, get_code, ...) is the real loader's.
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        patch_trainer()


def patch_trainer_if_imported() -> None:
    """`patch_trainer()` now if `transformers.trainer` is imported already, else as soon as it is."""
    if "transformers.trainer" in sys.modules:
        patch_trainer()
    elif not any(isinstance(finder, _PatchTrainerOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchTrainerOnImport())


# ------------------------------------------------------------------------------------------------ adapter methods


def _adapter_configs(model: nn.Module) -> dict[str, PeftConfig]:
    """The peftfast adapters put into `model` in place ({} if none); refuses a model holding HF PEFT's."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return {}
    foreign = [name for name, config in configs.items() if not isinstance(config, PeftConfig)]
    if foreign:
        raise ValueError(
            f"This {type(model).__name__} holds adapters {foreign} made by HF PEFT, not by peftfast; manage them with "
            "transformers' own methods (or speed them up with peftfast.accelerate)."
        )
    return configs


def _require_adapters(model: nn.Module) -> dict[str, PeftConfig]:
    configs = _adapter_configs(model)
    if not configs:
        raise ValueError(
            f"This {type(model).__name__} has no peftfast adapter; add one with add_adapter or load_adapter first."
        )
    return configs


def _adapter_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))]


def add_adapter(model: nn.Module, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
    """transformers' `model.add_adapter`: put a new adapter (default name "default") into `model` in place and make
    it the active one, trainable; the base weights are frozen."""
    adapter_name = adapter_name or "default"
    if not isinstance(adapter_config, PeftConfig):
        raise TypeError(
            f"adapter_config must be a peftfast PeftConfig (e.g. peftfast.LoraConfig), got {type(adapter_config)}."
        )
    if adapter_config.is_prompt_learning:
        raise ValueError(
            f"{type(adapter_config).__name__} is a prompt-learning method, which puts no layers into the model; use "
            "peftfast.get_peft_model for it."
        )
    if adapter_name in _adapter_configs(model):
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
    # As transformers: the adapter records where the base model came from.
    adapter_config.base_model_name_or_path = model.__dict__.get("name_or_path", None)
    inject_adapter_in_model(adapter_config, model, adapter_name)
    set_adapter(model, adapter_name)


def load_adapter(
    model: nn.Module,
    peft_model_id: str | os.PathLike | None = None,
    adapter_name: str | None = None,
    is_trainable: bool = False,
    adapter_state_dict: dict[str, torch.Tensor] | None = None,
    peft_config: PeftConfig | None = None,
    torch_device: str | torch.device | None = None,
) -> Any:
    """transformers' `model.load_adapter`: put the adapter saved in the local folder `peft_model_id` (by HF PEFT,
    transformers or peftfast) into `model` under `adapter_name` (default "default") and make it active. Frozen and
    the model in eval mode unless `is_trainable`. `adapter_state_dict` (HF PEFT's on-disk keys) with `peft_config`
    loads without a folder. Returns the load result (missing and unexpected keys)."""
    adapter_name = adapter_name or "default"
    if adapter_name in _adapter_configs(model):
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
    if peft_config is None:
        if peft_model_id is None:
            raise ValueError("Pass peft_model_id (an adapter folder), or peft_config together with adapter_state_dict.")
        peft_config = PeftConfig.from_pretrained(peft_model_id)
    if adapter_state_dict is None:
        if peft_model_id is None:
            raise ValueError("Pass peft_model_id (an adapter folder) or adapter_state_dict to load weights from.")
        adapter_state_dict = load_peft_weights(peft_model_id, device=torch_device)
    peft_config.inference_mode = not is_trainable
    weights = {key.removeprefix(_FILE_KEY_PREFIX): value for key, value in adapter_state_dict.items()}
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    if torch_device is None and device is not None:
        weights = {key: value.to(device) for key, value in weights.items()}
    # A failed load leaves no trace: not the layers it put in, nor the base model frozen by the first adapter.
    rollback = ModuleTreeRollback(model)
    try:
        inject_adapter_in_model(peft_config, model, adapter_name)
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        if result.missing_keys:
            raise ValueError(
                f"The adapter in {os.fspath(peft_model_id or 'adapter_state_dict')!r} lacks weights its config asks "
                f"for, e.g. {result.missing_keys[:4]}; the config and the weights don't belong together."
            )
    except Exception:
        rollback.restore()
        raise
    set_adapter(model, adapter_name)
    if not is_trainable:
        model.eval()
        for module in _adapter_modules(model):
            module.set_requires_grad(adapter_name, requires_grad=False)
    return result


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """transformers' `model.set_adapter`: make `adapter_name` (or a list of names, whose outputs add up) the active
    adapter(s) of every layer; active adapters train, the others are frozen."""
    configs = _require_adapters(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    missing = [name for name in names if name not in configs]
    if missing:
        raise ValueError(f"Adapter(s) {missing} not found; the model has {list(configs)}.")
    for module in _adapter_modules(model):
        module.set_adapter(adapter_name)


def disable_adapters(model: nn.Module) -> None:
    """transformers' `model.disable_adapters`: the model computes as its base model alone until `enable_adapters`."""
    _require_adapters(model)
    for module in _adapter_modules(model):
        module.enable_adapters(False)


def enable_adapters(model: nn.Module) -> None:
    """transformers' `model.enable_adapters`: undo `disable_adapters` (the active adapters run and train again)."""
    _require_adapters(model)
    for module in _adapter_modules(model):
        module.enable_adapters(True)


def active_adapters(model: nn.Module) -> list[str]:
    """transformers' `model.active_adapters()`: the names of the active adapters."""
    _require_adapters(model)
    layer = next(module for module in model.modules() if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)))
    return list(layer.active_adapters)


def delete_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """transformers' `model.delete_adapter`: remove adapters (their layers keep wrapping the base layers; with no
    adapter left they compute the base layer alone)."""
    configs = _require_adapters(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [name for name in names if name not in configs]
    if missing:
        raise ValueError(f"Adapter(s) {missing} can't be deleted: not found; the model has {list(configs)}.")
    merged = sorted({name for module in _adapter_modules(model) for name in module.merged_adapters} & set(names))
    if merged:
        # Checked before any is deleted: a merged adapter's delta is in the base weights and needs its weights to
        # be unmerged, so deleting it would leave the model unrepairable.
        raise ValueError(
            f"Can't delete adapter(s) {merged} while they are merged; unmerge them first. Nothing was deleted."
        )
    for name in names:
        remaining = [other for other in active_adapters(model) if other != name]
        for module in _adapter_modules(model):
            if isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(name, remaining)
            else:
                module.delete_adapter(name)
        del configs[name]
    if not configs:
        del model.peft_config


def get_adapter_state_dict(
    model: nn.Module, adapter_name: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """transformers' `model.get_adapter_state_dict`: the tensors of one adapter (default: the first active one),
    keyed as HF PEFT writes them but relative to `model` (without the `base_model.model.` prefix)."""
    configs = _require_adapters(model)
    adapter_name = adapter_name or active_adapters(model)[0]
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} not found; the model has {list(configs)}.")
    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
) -> None:
    """What transformers' `save_pretrained` writes for a model with adapters: one adapter (default: the active one;
    several active ones must be named) as `adapter_config.json` + `adapter_model.safetensors` in HF PEFT's format,
    loadable by `PeftModel.from_pretrained` (HF PEFT or peftfast) and by `load_adapter`."""
    configs = _require_adapters(model)
    if adapter_name is None:
        active = active_adapters(model)
        if len(active) != 1:
            raise ValueError(f"Adapters {active} are active; name the one to save (adapter_name=...).")
        adapter_name = active[0]
    tensors = get_adapter_state_dict(model, adapter_name, state_dict=state_dict)
    if not is_main_process:
        return
    # Both paths are checked before anything is written: a symlink can't take either write outside the folder.
    weights_path = path_inside(save_directory, SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
    path_inside(save_directory, CONFIG_NAME)
    os.makedirs(save_directory, exist_ok=True)
    tensors = {_FILE_KEY_PREFIX + key: value.detach().contiguous().clone() for key, value in tensors.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, weights_path, metadata={"format": "pt"})
    else:
        torch.save(tensors, weights_path)
    config = copy.deepcopy(configs[adapter_name])
    config.inference_mode = True
    config.save_pretrained(save_directory)


class PeftAdapterMixin:
    """transformers' adapter methods on peftfast: put it in front of a transformers model class
    (`class MyLlama(PeftAdapterMixin, LlamaForCausalLM)`) or apply it to one model with `enable_adapter_methods`.
    `save_pretrained` writes only the active adapter while the model has one, the full model otherwise."""

    def add_adapter(self, adapter_config: PeftConfig, adapter_name: str | None = None) -> None:
        add_adapter(self, adapter_config, adapter_name)

    def load_adapter(self, peft_model_id: str | os.PathLike | None = None, adapter_name: str | None = None, **kwargs):
        return load_adapter(self, peft_model_id, adapter_name, **kwargs)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        set_adapter(self, adapter_name)

    def disable_adapters(self) -> None:
        disable_adapters(self)

    def enable_adapters(self) -> None:
        enable_adapters(self)

    def active_adapters(self) -> list[str]:
        return active_adapters(self)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        delete_adapter(self, adapter_names)

    def get_adapter_state_dict(
        self, adapter_name: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return get_adapter_state_dict(self, adapter_name, state_dict)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if not _adapter_configs(self):
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_adapter(
            self,
            save_directory,
            state_dict=kwargs.get("state_dict"),
            safe_serialization=kwargs.get("safe_serialization", True),
            is_main_process=kwargs.get("is_main_process", True),
        )


_MIXED_CLASSES: dict[type, type] = {}


def enable_adapter_methods(model: nn.Module) -> nn.Module:
    """Give this one model object `PeftAdapterMixin`'s methods (its class becomes a subclass of its class with the
    mixin in front, of the same name); returns the model."""
    cls = type(model)
    if issubclass(cls, PeftAdapterMixin):
        return model
    if cls not in _MIXED_CLASSES:
        _MIXED_CLASSES[cls] = type(cls.__name__, (PeftAdapterMixin, cls), {"__module__": cls.__module__})
    model.__class__ = _MIXED_CLASSES[cls]
    return model


__all__ = [
    "PeftAdapterMixin",
    "active_adapters",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "enable_adapter_methods",
    "enable_adapters",
    "get_adapter_state_dict",
    "load_adapter",
    "patch_trainer",
    "patch_trainer_if_imported",
    "save_adapter",
    "set_adapter",
]
