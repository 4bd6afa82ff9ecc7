"""`get_peft_model` and `inject_adapter_in_model`; the method registry's tables, at HF PEFT's import path.

The registry itself (`register_peft_method` and the tables) lives in `peftfast.registry`, below every other module;
it is re-exported here because HF PEFT users import the tables from `peft.mapping`.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .config import PeftConfig
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .registry import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    config_class,
    model_class,
    register_peft_method,
)

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
    "register_peft_method",
]


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config of the method `config_dict["peft_type"]` built from `config_dict`."""
    return config_class(config_dict.get("peft_type"))(**config_dict)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` in the `PeftModel` class of `peft_config.task_type`, with a new adapter named `adapter_name`.

    With `low_cpu_mem_usage` the new adapter's weights are created on the meta device (nothing allocated), to be
    loaded into (`set_peft_model_state_dict(..., low_cpu_mem_usage=True)`); don't train such a model before loading.
    """
    if mixed:
        raise NotImplementedError("Mixed adapter types (PeftMixedModel) are not implemented in peftfast.")
    model_class(peft_config)
    model_config = getattr(model, "config", None)
    name_or_path = getattr(model_config, "name_or_path", None) if model_config is not None else None
    if name_or_path and peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if getattr(peft_config, "init_lora_weights", None) == "eva" and not low_cpu_mem_usage:
        warnings.warn(
            "init_lora_weights='eva' with low_cpu_mem_usage=False; low_cpu_mem_usage=True leaves the LoRA weights "
            "unallocated until initialize_lora_eva_weights sets them, leaving more memory for its batches.",
            stacklevel=2,
        )
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    model_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type, PeftModel)
    return model_cls(
        model,
        peft_config,
        adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Put adapter layers into `model` in place, without a `PeftModel` wrapper; returns the same model.

    With `low_cpu_mem_usage` the adapter weights are created on the meta device, to be loaded into.
    """
    tuner_cls = model_class(peft_config)
    if peft_config.is_prompt_learning:
        raise ValueError(
            f"inject_adapter_in_model puts adapter layers into a model, but {type(peft_config).__name__} is a "
            "prompt-learning method, which has none; use get_peft_model instead."
        )
    tuner = tuner_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model
