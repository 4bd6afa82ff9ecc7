from ..registry import register_peft_method
from .constants import (
    CONFIG_NAME,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SAFETENSORS_WEIGHTS_NAME,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    UPCAST_DTYPES,
    WEIGHTS_NAME,
)
from .error import NoMatchingPeftModuleError, PeftError
from .other import (
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    TrainableTokensWrapper,
    _get_submodules,
    cast_mixed_precision_params,
    get_submodules,
    infer_device,
    prepare_model_for_kbit_training,
)
from .peft_types import PeftType, TaskType
from .save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .warning import PeftWarning

__all__ = [
    "AuxiliaryTrainingWrapper",
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TaskType",
    "TrainableTokensWrapper",
    "UPCAST_DTYPES",
    "WEIGHTS_NAME",
    "_get_submodules",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "get_submodules",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "register_peft_method",
    "replace_lora_weights_loftq",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]


def __getattr__(name: str):
    # Lazily: LoftQ lives with the LoRA tuner, which itself imports this package.
    if name == "replace_lora_weights_loftq":
        from .loftq_utils import replace_lora_weights_loftq

        return replace_lora_weights_loftq
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
