"""`PromptTuningConfig`: HF PEFT's field set for prompt tuning (soft prompt embeddings prepended to the input)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptTuningInit(str, enum.Enum):
    """How the virtual token embeddings start: the embeddings of a text's tokens, of random vocabulary tokens, or
    random vectors."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning: `num_virtual_tokens` trainable embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: "RANDOM" (random vectors), "SAMPLE_VOCAB" (the model's embeddings of random tokens) or
            "TEXT" (the model's embeddings of `prompt_tuning_init_text`, cut or repeated to the number of virtual
            tokens).
        prompt_tuning_init_text: the text for "TEXT".
        tokenizer_name_or_path: the tokenizer (a local folder) that turns that text into token ids.
        tokenizer_kwargs: extra arguments of `AutoTokenizer.from_pretrained` (never `trust_remote_code`).
    """

    _peft_type = PeftType.PROMPT_TUNING

    prompt_tuning_init: PromptTuningInit | str = field(default=PromptTuningInit.RANDOM)
    prompt_tuning_init_text: str | None = field(default=None)
    tokenizer_name_or_path: str | None = field(default=None)
    tokenizer_kwargs: dict | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        valid = [item.value for item in PromptTuningInit]
        if self.prompt_tuning_init not in valid:
            raise ValueError(f"prompt_tuning_init must be one of {valid}, got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer of the model).")
            if self.prompt_tuning_init_text is None:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text to start from).")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'.")
