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
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "UPCAST_DTYPES",
    "WEIGHTS_NAME",
    "AuxiliaryTrainingWrapper",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PeftError",
    "PeftType",
    "PeftWarning",
    "TaskType",
    "TrainableTokensWrapper",
    "_get_submodules",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "get_submodules",
    "infer_device",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "register_peft_method",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
