"""The method registry, `get_peft_model` and `inject_adapter_in_model`.

An adapter method is a config class, a model class and a parameter-name prefix, registered with one
`register_peft_method` call (each method's package under `peftfast.tuners` makes it); every other part of peftfast
looks methods up here. The model class is a `BaseTuner` (methods that put layers into the model, like LoRA) or, for
prompt-learning configs, a `BasePromptEncoder` (the prompt's encoder; the model is left as it is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .config import PeftConfig, PromptLearningConfig

if TYPE_CHECKING:
    from .peft_model import PeftModel
    from .tuners.tuners_utils import BasePromptEncoder, BaseTuner

PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type[PeftConfig]] = {}
PEFT_TYPE_TO_TUNER_MAPPING: dict[str, type[BaseTuner] | type[BasePromptEncoder]] = {}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[str, str] = {}


def register_peft_method(
    *,
    name: str,
    config_cls: type[PeftConfig],
    model_cls: type[BaseTuner] | type[BasePromptEncoder],
    prefix: str | None = None,
) -> None:
    """Register an adapter method: after this, `get_peft_model`, `PeftModel.from_pretrained`, saving, loading,
    status and adapter management work for it.

    `name` is the method's name ("lora"); its upper-case form is the `peft_type` written to adapter_config.json and
    must equal `config_cls._peft_type`. `prefix` starts the name of every adapter attribute in the model's layers
    (default: name + "_") and must equal `model_cls.prefix` for a tuner. `model_cls` is a `BaseTuner` subclass, or
    a `BasePromptEncoder` subclass when `config_cls` is a `PromptLearningConfig`.
    """
    from .tuners.tuners_utils import BasePromptEncoder, BaseTuner

    peft_type = name.upper()
    prefix = prefix if prefix is not None else f"{name.lower()}_"
    config_type = getattr(getattr(config_cls, "_peft_type", None), "value", getattr(config_cls, "_peft_type", None))
    if config_type != peft_type:
        raise ValueError(
            f"{config_cls.__name__}._peft_type is {config_type!r}; set it to {peft_type!r} to register "
            f"the method {name!r}."
        )
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is not config_cls:
        raise KeyError(f"An adapter method named {name!r} is already registered.")
    if issubclass(config_cls, PromptLearningConfig):
        if not (isinstance(model_cls, type) and issubclass(model_cls, BasePromptEncoder)):
            raise TypeError(
                f"{config_cls.__name__} is a prompt-learning config, so model_cls must subclass "
                f"peftfast.tuners.tuners_utils.BasePromptEncoder; got {model_cls!r}."
            )
    else:
        if not (isinstance(model_cls, type) and issubclass(model_cls, BaseTuner)):
            raise TypeError(
                f"model_cls of the method {name!r} must subclass peftfast.tuners.tuners_utils.BaseTuner; got "
                f"{model_cls!r}."
            )
        if model_cls.prefix != prefix:
            raise ValueError(
                f"{model_cls.__name__}.prefix is {model_cls.prefix!r} but the method is registered with "
                f"prefix {prefix!r}; make them equal."
            )
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix


def _tuner_class(peft_config: PeftConfig) -> type[BaseTuner] | type[BasePromptEncoder]:
    """The registered model class of `peft_config`'s method: a tuner, or a prompt encoder for prompt learning."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"Expected a peftfast PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    key = getattr(peft_config.peft_type, "value", peft_config.peft_type)
    if key not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(
            f"Adapter method {key!r} is not supported by peftfast; supported: {sorted(PEFT_TYPE_TO_TUNER_MAPPING)}."
        )
    return PEFT_TYPE_TO_TUNER_MAPPING[key]


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` in the `PeftModel` class of `peft_config.task_type`, with a new adapter named `adapter_name`."""
    from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel

    if mixed:
        raise NotImplementedError("Mixed adapter types (PeftMixedModel) are not implemented in peftfast.")
    _tuner_class(peft_config)
    model_config = getattr(model, "config", None)
    name_or_path = getattr(model_config, "name_or_path", None) if model_config is not None else None
    if name_or_path and peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
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
    """Put adapter layers into `model` in place, without a `PeftModel` wrapper; returns the same model."""
    tuner_cls = _tuner_class(peft_config)
    if peft_config.is_prompt_learning:
        raise ValueError(
            f"inject_adapter_in_model puts adapter layers into a model, but {type(peft_config).__name__} is a "
            "prompt-learning method, which has none; use get_peft_model instead."
        )
    tuner = tuner_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model
