from ...registry import register_peft_method
from . import layer
from .config import EvaConfig, LoftQConfig, LoraConfig, LoraGAConfig, LoraRuntimeConfig
from .conversion import convert_to_lora, save_as_lora
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from .loraga import preprocess_loraga
from .mha import MultiheadAttention
from .model import LoraModel
from .param_wrapper import ParamWrapper

# HF PEFT defines these two in lora/layer.py, where user code imports them from. Here they live in modules of their
# own that import layer.py, so layer.py can't import them back (a cycle): the package puts them there instead.
# Importing `peftfast.tuners.lora.layer` runs this file first, so `from peftfast.tuners.lora.layer import ParamWrapper`
# always finds them.
layer.MultiheadAttention = MultiheadAttention
layer.ParamWrapper = ParamWrapper

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
