from .lora import LoraConfig, LoraModel
from .tuners_utils import BaseTuner, BaseTunerLayer

__all__ = ["BaseTuner", "BaseTunerLayer", "LoraConfig", "LoraModel"]
