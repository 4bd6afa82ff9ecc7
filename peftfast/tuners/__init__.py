"""The adapter methods; importing a method's package registers it (see `peftfast.mapping.register_peft_method`)."""

from .lora import (
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    LoraModel,
    LoraRuntimeConfig,
    convert_to_lora,
    get_eva_state_dict,
    initialize_lora_eva_weights,
    preprocess_loraga,
    save_as_lora,
)
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .trainable_tokens import TrainableTokensConfig, TrainableTokensModel
from .tuners_utils import BasePromptEncoder, BaseTuner, BaseTunerLayer

__all__ = [
    "BasePromptEncoder",
    "BaseTuner",
    "BaseTunerLayer",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "convert_to_lora",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_loraga",
    "save_as_lora",
]
