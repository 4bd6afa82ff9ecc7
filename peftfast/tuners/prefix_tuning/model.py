"""`PrefixEncoder`: the trainable key/value prefix of prefix tuning."""

from __future__ import annotations

import torch
from torch import nn

from ..tuners_utils import BasePromptEncoder
from .config import PrefixTuningConfig


class PrefixEncoder(BasePromptEncoder):
    """Virtual token ids `[batch, n]` -> the flattened key/value prefix `[batch, n, 2 * num_layers * token_dim]`.

    Without `prefix_projection` the prefix is an `nn.Embedding` trained directly; with it, `embedding` holds
    `token_dim`-wide rows and `transform` (Linear, Tanh, Linear) maps them to the prefix. A model built for inference
    (`inference_mode`) holds only the prefix table, as saved.
    """

    kv_prefix = True

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        token_dim, num_layers = config.token_dim, config.num_layers
        prefix_width = num_layers * 2 * token_dim
        # The saved file holds the prefix itself, so an inference model needs no projection.
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, prefix_width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, prefix_width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)

    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        if self.prefix_projection:
            raise ValueError(
                "Saved prefix-tuning weights hold the projected prefix, which can't be loaded into a trainable "
                "encoder with prefix_projection=True (the projection can't be inverted); load the adapter for "
                "inference (is_trainable=False)."
            )
        super().load_prompt_embeddings(prompt_embeddings)
