from ...registry import register_peft_method
from .config import LoraConfig, LoraRuntimeConfig
from .conversion import convert_to_lora, save_as_lora
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .mha import MultiheadAttention
from .model import LoraModel
from .param_wrapper import ParamWrapper

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraRuntimeConfig",
    "MultiheadAttention",
    "ParamWrapper",
    "convert_to_lora",
    "save_as_lora",
]

register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_")
