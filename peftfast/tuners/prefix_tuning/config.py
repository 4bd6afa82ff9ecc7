"""`PrefixTuningConfig`: HF PEFT's field set for prefix tuning (trainable keys and values prepended in every layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning: every attention layer sees `num_virtual_tokens` extra trainable keys and
    values before the input's (fed to the model as `past_key_values`).

    Args:
        prefix_projection: compute the prefix from small virtual token embeddings through a two-layer MLP
            (`token_dim -> encoder_hidden_size -> 2 * num_layers * token_dim`) instead of training it directly.
        encoder_hidden_size: the MLP's hidden size (default: token_dim).
        init_weights: None (random) or "zero" (the prefix starts as all zeros).
    """

    _peft_type = PeftType.PREFIX_TUNING

    init_weights: Literal["zero"] | None = field(default=None)
    encoder_hidden_size: int | None = field(default=None)
    prefix_projection: bool = field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
