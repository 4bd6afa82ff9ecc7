"""`PeftModel` and its task wrappers: the object users train, save, load and switch adapters on."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .mapping import PEFT_TYPE_TO_TUNER_MAPPING, _tuner_class
from .tuners.tuners_utils import (
    BaseTunerLayer,
    TunerLayerStatus,
    TunerModelStatus,
    count_parameters,
    get_layer_status,
    get_model_status,
)
from .utils.constants import SAFETENSORS_WEIGHTS_NAME, SEQ_CLS_HEAD_NAMES, TOKEN_CLS_HEAD_NAMES, WEIGHTS_NAME
from .utils.other import ModulesToSaveWrapper
from .utils.peft_types import TaskType
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .version import __version__

_MODEL_CARD = """---
library_name: peft
tags:
- lora
- peftfast
---

# Adapter

A LoRA adapter saved by peftfast {version} in HF PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`); it loads with `peft` or `peftfast`.
"""


class PeftModel(nn.Module):
    """A base model with adapters; same surface as `peft.PeftModel`.

    Args:
        model: the base model (a transformers `PreTrainedModel` or any `nn.Module`).
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name.
        autocast_adapter_dtype: keep fp16/bf16 adapter weights in fp32 (HF PEFT's default).
        low_cpu_mem_usage: create the adapter weights on the meta device (to be loaded into).
    """

    special_peft_forward_args = {"adapter_names"}

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.peft_type = peft_config.peft_type
        self._adapters_disabled = False
        tuner_cls = _tuner_class(peft_config)
        kwargs = {"low_cpu_mem_usage": low_cpu_mem_usage}
        if "autocast_adapter_dtype" in tuner_cls.__init__.__code__.co_varnames:
            kwargs["autocast_adapter_dtype"] = autocast_adapter_dtype
        self.base_model = tuner_cls(model, {adapter_name: peft_config}, adapter_name, **kwargs)
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # Attributes not found here are looked up on the tuner, then the base model (merge_and_unload, config, ...).
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules_to_save names of all adapters (None when there are none), as in HF PEFT."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or [])
        return names or None

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def targeted_module_names(self) -> list[str]:
        return self.base_model.targeted_module_names

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, as HF PEFT counts them."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def _forward_context(self, *args: Any, **kwargs: Any):
        enable = getattr(self.base_model, "_enable_peft_forward_hooks", None)
        return enable(*args, **kwargs) if enable is not None else nullcontext()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._forward_context(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._forward_context(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block: every adapter layer and modules_to_save copy is off (merged
        adapters get unmerged). On exit the adapters are turned back on, unless they were all off before."""
        status = self.get_model_status()
        if status.enabled == "irregular":
            warnings.warn(
                "Some adapter layers are enabled and others disabled; after the disable_adapter block all of them "
                "will be enabled.",
                stacklevel=3,
            )
        was_disabled = self._adapters_disabled
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled = True
            yield
        finally:
            if status.enabled is not False:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    def backend_summary(self) -> dict[str, str | None]:
        """Which backend each LoRA layer's latest forward ran on ("torch", "triton", ...; None if not run yet)."""
        return {name: module.last_backend for name, module in self.named_modules() if hasattr(module, "last_backend")}

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of each adapter layer (see `peftfast.tuners.tuners_utils.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The status of the model's adapters (see `peftfast.tuners.tuners_utils.get_model_status`)."""
        return get_model_status(self)

    def _check_adapter_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}.")

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter, inactive and frozen (activate it with `set_adapter`); the trainability of everything
        already in the model stays as it was. `low_cpu_mem_usage` leaves its weights on the meta device, to be
        loaded into; `autocast_adapter_dtype` keeps them in fp32 on an fp16/bf16 base."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name or delete it first.")
        model_type = getattr(self.peft_type, "value", self.peft_type)
        new_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        if new_type != model_type:
            raise ValueError(
                f"Can't add a {new_type} adapter to a model with {model_type} adapters; one model holds "
                "adapters of one method."
            )
        self.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(self.get_base_model(), adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        cast = getattr(self.base_model, "_cast_adapter_dtype", None)
        if cast is not None:
            cast(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter (or, beyond HF PEFT's PeftModel, a list of adapters whose deltas add up). Active
        adapters become trainable unless `inference_mode`; the others are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_adapter_name(name)
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged). If it was active, the first remaining adapter by name becomes
        active."""
        self._check_adapter_name(adapter_name)
        self.base_model.delete_adapter(adapter_name)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as HF PEFT does: `adapter_config.json` + `adapter_model.safetensors`, the default
        adapter in `save_directory` and any other in `save_directory/<name>`."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory} is a file.")
        if selected_adapters is None:
            selected_adapters = list(self.peft_config)
        unknown = [name for name in selected_adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} are not adapters of this model; available: {list(self.peft_config)}."
            )
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            with open(os.path.join(save_directory, "README.md"), "w") as handle:
                handle.write(_MODEL_CARD.format(version=__version__))
        for adapter_name in selected_adapters:
            config = self.peft_config[adapter_name]
            state_dict = get_peft_model_state_dict(
                self,
                state_dict=kwargs.get("state_dict"),
                adapter_name=adapter_name,
                save_embedding_layers=save_embedding_layers,
            )
            output_dir = os.path.join(save_directory, adapter_name) if adapter_name != "default" else save_directory
            if not is_main_process:
                continue
            os.makedirs(output_dir, exist_ok=True)
            # safetensors refuses tensors that share memory (tied weights): store independent copies.
            state_dict = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(state_dict, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
            else:
                torch.save(state_dict, os.path.join(output_dir, WEIGHTS_NAME))
            saved_config = copy.deepcopy(config)
            if saved_config.base_model_name_or_path is None:
                base_config = getattr(self.get_base_model(), "config", None)
                saved_config.base_model_name_or_path = getattr(base_config, "name_or_path", None) or None
            saved_config.inference_mode = True
            saved_config.save_pretrained(output_dir, auto_mapping_dict=self._auto_mapping(config))

    def _auto_mapping(self, config: PeftConfig) -> dict[str, str] | None:
        # As HF PEFT: without a task type the base model's class is recorded, whatever library it comes from.
        if config.task_type is not None:
            return None
        base = self.get_base_model()
        return {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter folder saved by HF PEFT or peftfast onto `model`. Frozen unless `is_trainable`."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        elif not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a PeftConfig, got {type(config).__name__}.")
        _tuner_class(config)
        config.inference_mode = not is_trainable
        task_type = getattr(config.task_type, "value", config.task_type)
        if cls is PeftModel and task_type in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
        weights = load_peft_weights(model_id, subfolder=kwargs.get("subfolder"))
        peft_model = cls(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        try:
            peft_model._load_weights(weights, adapter_name, is_trainable, low_cpu_mem_usage, model_id)
        except Exception:
            # Not unload(): that would leave modules_to_save copies (holding the file's weights) in the model.
            _remove_adapter_modules(model, keep=set())
            peft_model.base_model.unload()
            raise
        # Weights assigned from the file (low_cpu_mem_usage) carry the file's dtype: apply the dtype policy again.
        peft_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        return peft_model

    def _load_weights(
        self,
        weights: dict[str, torch.Tensor],
        adapter_name: str,
        is_trainable: bool,
        low_cpu_mem_usage: bool,
        model_id: Any,
    ) -> Any:
        device = next((p.device for p in self.get_base_model().parameters() if p.device.type != "meta"), None)
        if device is not None:
            weights = {k: v.to(device) for k, v in weights.items()}
        result = set_peft_model_state_dict(
            self, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
        )
        if result.missing_keys:
            raise ValueError(
                f"The adapter in {os.fspath(model_id)!r} lacks weights the config asks for, e.g. "
                f"{result.missing_keys[:4]}; the config and the weights file don't belong together."
            )
        if not is_trainable:
            for name, param in self.named_parameters():
                if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                    param.requires_grad_(False)
            self.eval()
        return result

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load another adapter folder under `adapter_name` (left inactive; use `set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name.")
        config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config.inference_mode = not is_trainable
        weights = load_peft_weights(model_id, device=torch_device, subfolder=kwargs.get("subfolder"))
        base = self.get_base_model()
        had_adapter_modules = {name for name, module in base.named_modules() if _is_adapter_module(module)}
        targeted_module_names = list(self.targeted_module_names)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            result = self._load_weights(weights, adapter_name, is_trainable, low_cpu_mem_usage, model_id)
        except Exception:
            # Leave the model as it was: no trace of the new adapter, not even layers that only it had wrapped.
            self.delete_adapter(adapter_name)
            _remove_adapter_modules(base, keep=had_adapter_modules)
            self.targeted_module_names[:] = targeted_module_names
            raise
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        # The new adapter stays inactive; like HF PEFT, it only trains if asked to.
        if is_trainable:
            self.set_requires_grad(adapter_name)
        return result

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of the given adapters' weights on or off, whether they are active or not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_adapter_name(name)
        for module in self.modules():
            if isinstance(module, BaseTunerLayer):
                for holder in module._adapter_holders():
                    for name in names:
                        if name in holder:
                            holder[name].requires_grad_(requires_grad)
            elif isinstance(module, ModulesToSaveWrapper):
                for name in names:
                    if name in module.modules_to_save:
                        module.modules_to_save[name].requires_grad_(requires_grad)


def _is_adapter_module(module: nn.Module) -> bool:
    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def _remove_adapter_modules(model: nn.Module, keep: set[str]) -> None:
    """Put back the original module of every adapter layer and modules_to_save wrapper in `model` whose name is not
    in `keep`: undoes the injection of an adapter whose loading failed."""
    for name, module in list(model.named_modules()):
        if name in keep or not _is_adapter_module(module):
            continue
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.get_base_layer()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, original)


class PeftModelForCausalLM(PeftModel):
    """PeftModel for decoder-only language models (`generate` passes `adapter_names` through)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for encoder-decoder models."""


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for models that return hidden states."""


class _HeadTrainingModel(PeftModel):
    head_names: list[str] = []

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        self._add_heads_to_modules_to_save(model, peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, **kwargs: Any) -> None:
        self._add_heads_to_modules_to_save(self.get_base_model(), peft_config)
        super().add_adapter(adapter_name, peft_config, **kwargs)

    def _add_heads_to_modules_to_save(self, model: nn.Module, peft_config: PeftConfig) -> None:
        # The head goes into modules_to_save before injection so LoRA layers are never put inside it. As HF PEFT,
        # every head name is listed once the model has one of them.
        if not hasattr(peft_config, "modules_to_save"):
            return
        has_head = any(
            key == name or key.endswith(f".{name}") for key, _ in model.named_modules() for name in self.head_names
        )
        listed = peft_config.modules_to_save or []
        extra = [name for name in self.head_names if name not in listed] if has_head else []
        peft_config.modules_to_save = list(listed) + extra


class PeftModelForSequenceClassification(_HeadTrainingModel):
    """PeftModel for sequence classification; the classifier head (`classifier`/`score`) is trained and saved."""

    head_names = SEQ_CLS_HEAD_NAMES


class PeftModelForTokenClassification(_HeadTrainingModel):
    """PeftModel for token classification; the classifier head (`classifier`/`score`) is trained and saved."""

    head_names = TOKEN_CLS_HEAD_NAMES


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "BaseTunerLayer",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]
