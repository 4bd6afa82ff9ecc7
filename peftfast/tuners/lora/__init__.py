from ...registry import register_peft_method
from .config import EvaConfig, LoftQConfig, LoraConfig, LoraGAConfig, LoraRuntimeConfig
from .conversion import convert_to_lora, save_as_lora
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .loraga import preprocess_loraga
from .mha import MultiheadAttention
from .model import LoraModel
from .param_wrapper import ParamWrapper

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "EvaConfig",
    "Linear",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "MultiheadAttention",
    "ParamWrapper",
    "convert_to_lora",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_loraga",
    "save_as_lora",
]

register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_")
