"""`PromptEncoderConfig`: HF PEFT's field set for P-tuning (virtual token embeddings computed by an MLP or LSTM)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ...config import PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning: the prompt embeddings are an encoder's output over trainable virtual token
    embeddings, prepended to the input embeddings.

    Args:
        encoder_reparameterization_type: "MLP" (three linear layers with ReLUs) or "LSTM" (a bidirectional LSTM of
            `encoder_num_layers` layers, then a two-layer MLP).
        encoder_hidden_size: the encoder's hidden size (default: token_dim).
        encoder_num_layers: LSTM layers (the MLP always has 3 linear layers, as in HF PEFT).
        encoder_dropout: dropout between LSTM layers.
    """

    _peft_type = PeftType.P_TUNING

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = field(
        default=PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = field(default=None)
    encoder_num_layers: int = field(default=2)
    encoder_dropout: float = field(default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        valid = [item.value for item in PromptEncoderReparameterizationType]
        if self.encoder_reparameterization_type not in valid:
            raise ValueError(
                f"encoder_reparameterization_type must be one of {valid}, got {self.encoder_reparameterization_type!r}."
            )
