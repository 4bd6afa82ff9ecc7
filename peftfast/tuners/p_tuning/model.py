"""`PromptEncoder`: the virtual token embeddings and their MLP or LSTM encoder (P-tuning)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..tuners_utils import BasePromptEncoder
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(BasePromptEncoder):
    """Virtual token ids `[batch, n]` -> prompt embeddings `[batch, n, token_dim]`: `mlp_head(embedding(ids))`, or
    `mlp_head(lstm_head(embedding(ids)))` for the LSTM type. Attribute names are HF PEFT's (`embedding`, `lstm_head`,
    `mlp_head`). A model built for inference (`inference_mode`) holds only the output table, as saved, in
    `embedding`."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = self.output_size = config.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        self.has_encoder = not config.inference_mode
        if not self.has_encoder:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.input_size,
                hidden_size=self.hidden_size,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.hidden_size * 2, self.hidden_size * 2),
                nn.ReLU(),
                nn.Linear(self.hidden_size * 2, self.output_size),
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    f"encoder_num_layers={config.encoder_num_layers} is ignored by the MLP prompt encoder, which "
                    "always has 3 linear layers (as in HF PEFT).",
                    stacklevel=2,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.input_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.output_size),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeddings = self.embedding(indices)
        if not self.has_encoder:
            return embeddings
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeddings = self.lstm_head(embeddings)[0]
        return self.mlp_head(embeddings)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        if self.has_encoder:
            raise ValueError(
                "Saved P-tuning weights hold the encoder's output, which can't be loaded into a trainable encoder "
                "(its MLP/LSTM weights are not saved); load the adapter for inference (is_trainable=False)."
            )
        super().load_prompt_embeddings(prompt_embeddings)
