from .constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .other import (
    ModulesToSaveWrapper,
    cast_mixed_precision_params,
    get_submodules,
    prepare_model_for_kbit_training,
)
from .peft_types import PeftType, TaskType
from .save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "TaskType",
    "cast_mixed_precision_params",
    "get_peft_model_state_dict",
    "get_submodules",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
