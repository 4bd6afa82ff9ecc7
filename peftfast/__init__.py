"""peftfast: HF PEFT's API (LoRA and friends) with hot paths on fused kernels.

Change `from peft import ...` to `from peftfast import ...`; adapter folders move between the two libraries.
"""

from .config import PeftConfig
from .mapping import get_peft_model, inject_adapter_in_model, register_peft_method
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .tuners import LoraConfig, LoraModel
from .tuners.tuners_utils import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .utils import (
    PeftType,
    TaskType,
    cast_mixed_precision_params,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from .version import __version__

__all__ = [
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "__version__",
    "cast_mixed_precision_params",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "register_peft_method",
    "set_peft_model_state_dict",
]
