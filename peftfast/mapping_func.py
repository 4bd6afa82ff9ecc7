"""HF PEFT's other import path of `get_peft_model` (`peft.mapping_func`); it lives in `peftfast.mapping`."""

from .mapping import get_peft_model

__all__ = ["get_peft_model"]
