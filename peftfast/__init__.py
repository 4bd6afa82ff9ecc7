"""peftfast: HF PEFT's API (LoRA and friends) with hot paths on fused kernels.

Change `from peft import ...` to `from peftfast import ...`; adapter folders move between the two libraries.
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PromptLearningConfig
from .integrations import transformers as _integrations_transformers
from .mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
    register_peft_method,
)
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .speedup import AccelerationReport, accelerate, accelerated, deaccelerate
from .tuners import (
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
    LoraModel,
    LoraRuntimeConfig,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TrainableTokensConfig,
    TrainableTokensModel,
    convert_to_lora,
    get_eva_state_dict,
    initialize_lora_eva_weights,
    preprocess_loraga,
    save_as_lora,
)
from .tuners.tuners_utils import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .utils import (
    NoMatchingPeftModuleError,
    PeftError,
    PeftType,
    PeftWarning,
    TaskType,
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .utils.loftq_utils import replace_lora_weights_loftq
from .utils.quiet import silence_bitsandbytes_kernel_probe
from .version import __version__

__all__ = [
    "AccelerationReport",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "NoMatchingPeftModuleError",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftConfig",
    "PeftError",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "TunerLayerStatus",
    "TunerModelStatus",
    "__version__",
    "accelerate",
    "accelerated",
    "cast_mixed_precision_params",
    "convert_to_lora",
    "deaccelerate",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "preprocess_loraga",
    "register_peft_method",
    "replace_lora_weights_loftq",
    "save_as_lora",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]

# transformers' Trainer recognises PEFT models by HF PEFT's classes: teach it peftfast's, now or once it is imported.
_integrations_transformers.patch_trainer_if_imported()

# Before anything imports bitsandbytes (HF peft, transformers' quantizers, our 4-bit layers): `import peftfast` itself
# never does.
silence_bitsandbytes_kernel_probe()
