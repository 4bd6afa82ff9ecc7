"""`AutoPeftModel*`: load the base model an adapter was trained on, then the adapter, from the adapter folder alone.

As HF PEFT's classes of the same names: the base model is `base_model_name_or_path` of `adapter_config.json`, built by
the transformers Auto class of the task (or, for an adapter without a task type, the class recorded in
`auto_mapping`), and the adapter is loaded with the task's `PeftModel` class. peftfast reads adapters from local
folders only; the base model is loaded by transformers as given (a local folder, or a hub id where it can download).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

from .config import PeftConfig
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# Libraries `auto_mapping` may name for an adapter without a task type (HF PEFT guards this import the same way: the
# adapter folder decides what gets imported).
DEFAULT_IMPORT_ALLOWLIST = ("transformers", "diffusers", "timm")
_TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _BaseAutoPeftModel:
    # Name of the transformers Auto class that builds the base model; None: read it from the adapter's auto_mapping.
    _target_class_name: ClassVar[str | None] = None
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_folder).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named in the adapter folder's config, then the adapter onto it (frozen unless
        `is_trainable`). `kwargs` go to the base model's `from_pretrained` (`torch_dtype`, `device_map`,
        `quantization_config`, ...). If the folder holds a tokenizer with more tokens than the base model's
        embeddings, the embeddings are resized to it first (the adapter then carries the new rows)."""
        adapter_path = os.fspath(pretrained_model_name_or_path)
        peft_config = config if config is not None else PeftConfig.from_pretrained(adapter_path)
        base_model_path = peft_config.base_model_name_or_path
        if not base_model_path:
            raise ValueError(
                f"The adapter config in {adapter_path!r} has no base_model_name_or_path, so the base model is unknown; "
                "load the base model yourself and use PeftModel.from_pretrained(base_model, adapter_folder)."
            )
        target_class = cls._base_model_class(peft_config, import_allowlist or DEFAULT_IMPORT_ALLOWLIST)
        base_revision = getattr(peft_config, "revision", None)
        if base_revision is not None:
            kwargs.setdefault("revision", base_revision)
        base_model = target_class.from_pretrained(base_model_path, **kwargs)
        _resize_to_adapter_tokenizer(base_model, adapter_path)
        return cls._target_peft_class.from_pretrained(
            base_model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable, config=peft_config
        )

    @classmethod
    def _base_model_class(cls, peft_config: PeftConfig, import_allowlist: list[str] | tuple[str, ...]) -> Any:
        task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
        if cls._target_class_name is None and task_type is not None:
            raise ValueError(
                f"The adapter has task_type {task_type!r}: load it with the class of that task (e.g. "
                "AutoPeftModelForCausalLM for 'CAUSAL_LM'), not AutoPeftModel."
            )
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
            if expected is not None and expected is not cls._target_peft_class:
                raise ValueError(
                    f"The adapter has task_type {task_type!r}, which loads with {expected.__name__}, but "
                    f"{cls.__name__} loads {cls._target_peft_class.__name__}; use the Auto class of that task."
                )
        if cls._target_class_name is not None:
            import transformers

            return getattr(transformers, cls._target_class_name)
        auto_mapping = getattr(peft_config, "auto_mapping", None) or {}
        if "base_model_class" not in auto_mapping or "parent_library" not in auto_mapping:
            raise ValueError(
                "The adapter has no task_type and no auto_mapping, so its base model class is unknown; load the base "
                "model yourself and use PeftModel.from_pretrained(base_model, adapter_folder)."
            )
        library = auto_mapping["parent_library"]
        if library.split(".")[0] not in import_allowlist:
            raise ValueError(
                f"The adapter's auto_mapping wants to import {library!r}, which is not in the import allowlist "
                f"{list(import_allowlist)}; if that library is safe, pass import_allowlist=[..., {library!r}]."
            )
        return getattr(importlib.import_module(library), auto_mapping["base_model_class"])


def _resize_to_adapter_tokenizer(base_model: Any, adapter_path: str) -> None:
    if not os.path.isfile(os.path.join(adapter_path, _TOKENIZER_CONFIG_NAME)):
        return
    if not hasattr(base_model, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_path)
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """For adapters without a task type: the base model class comes from the adapter config's `auto_mapping`."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class_name = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class_name = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction


__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]
