from ...registry import register_peft_method
from .config import PrefixTuningConfig
from .model import PrefixEncoder

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]

register_peft_method(name="prefix_tuning", config_cls=PrefixTuningConfig, model_cls=PrefixEncoder)
