"""The adapter method registry: which config class, model class and parameter-name prefix each `peft_type` has.

An adapter method is registered with one `register_peft_method` call (each method's package under
`peftfast.tuners` makes it); every other part of peftfast looks methods up here. This module imports nothing from
peftfast, so configs, tuners, saving and loading, status and `PeftModel` can all use it without import cycles. It
recognises the classes it is given by their `_registry_role` class attribute (set once on `PeftConfig`,
`PromptLearningConfig`, `BaseTuner` and `BasePromptEncoder`), not by importing them.
"""

from __future__ import annotations

from typing import Any

PEFT_TYPE_TO_CONFIG_MAPPING: dict[str, type] = {}
PEFT_TYPE_TO_TUNER_MAPPING: dict[str, type] = {}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[str, str] = {}

# Values of `_registry_role`.
CONFIG_ROLE = "config"
PROMPT_LEARNING_CONFIG_ROLE = "prompt_learning_config"
TUNER_ROLE = "tuner"
PROMPT_ENCODER_ROLE = "prompt_encoder"


def _role(cls: Any) -> str | None:
    return getattr(cls, "_registry_role", None) if isinstance(cls, type) else None


def peft_type_name(peft_type: Any) -> Any:
    """The string form of a `PeftType` (or of a plain string): the key of the tables above."""
    return getattr(peft_type, "value", peft_type)


def register_peft_method(*, name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> None:
    """Register an adapter method: after this, `get_peft_model`, `PeftModel.from_pretrained`, saving, loading,
    status and adapter management work for it.

    `name` is the method's name ("lora"); its upper-case form is the `peft_type` written to adapter_config.json and
    must equal `config_cls._peft_type`. `prefix` starts the name of every adapter attribute in the model's layers
    (default: name + "_") and must equal `model_cls.prefix` for a tuner. `model_cls` is a `BaseTuner` subclass, or
    a `BasePromptEncoder` subclass when `config_cls` is a `PromptLearningConfig`.
    """
    peft_type = name.upper()
    prefix = prefix if prefix is not None else f"{name.lower()}_"
    config_type = peft_type_name(getattr(config_cls, "_peft_type", None))
    if config_type != peft_type:
        raise ValueError(
            f"{config_cls.__name__}._peft_type is {config_type!r}; set it to {peft_type!r} to register "
            f"the method {name!r}."
        )
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING and PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is not config_cls:
        raise KeyError(f"An adapter method named {name!r} is already registered.")
    config_role = _role(config_cls)
    if config_role not in (CONFIG_ROLE, PROMPT_LEARNING_CONFIG_ROLE):
        raise TypeError(f"config_cls of the method {name!r} must subclass peftfast.PeftConfig; got {config_cls!r}.")
    if config_role == PROMPT_LEARNING_CONFIG_ROLE:
        if _role(model_cls) != PROMPT_ENCODER_ROLE:
            raise TypeError(
                f"{config_cls.__name__} is a prompt-learning config, so model_cls must subclass "
                f"peftfast.tuners.tuners_utils.BasePromptEncoder; got {model_cls!r}."
            )
    else:
        if _role(model_cls) != TUNER_ROLE:
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


def config_class(peft_type: Any) -> type:
    """The registered config class of `peft_type` (a `PeftType` or its string)."""
    if peft_type is None:
        raise ValueError("The config has no peft_type, so its adapter method is unknown.")
    key = peft_type_name(peft_type)
    if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"peft_type {key!r} is not supported by peftfast; supported: {sorted(PEFT_TYPE_TO_CONFIG_MAPPING)}."
        )
    return PEFT_TYPE_TO_CONFIG_MAPPING[key]


def model_class(peft_config: Any) -> type:
    """The registered model class of `peft_config`'s method: a tuner, or a prompt encoder for prompt learning."""
    if _role(type(peft_config)) not in (CONFIG_ROLE, PROMPT_LEARNING_CONFIG_ROLE):
        raise TypeError(f"Expected a peftfast PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}.")
    key = peft_type_name(peft_config.peft_type)
    if key not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(
            f"Adapter method {key!r} is not supported by peftfast; supported: {sorted(PEFT_TYPE_TO_TUNER_MAPPING)}."
        )
    return PEFT_TYPE_TO_TUNER_MAPPING[key]


def parameter_prefix(peft_config: Any) -> str:
    """The prefix of the adapter attributes of `peft_config`'s method ("lora_", ...)."""
    return PEFT_TYPE_TO_PREFIX_MAPPING[peft_type_name(peft_config.peft_type)]
