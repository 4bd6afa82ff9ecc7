"""HF PEFT's import path for LoftQ (`peft.utils.loftq_utils`); the code lives in `peftfast.tuners.lora`."""

from ..tuners.lora.init import loftq_init
from ..tuners.lora.loftq import replace_lora_weights_loftq

__all__ = ["loftq_init", "replace_lora_weights_loftq"]
