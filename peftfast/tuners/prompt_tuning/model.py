"""`PromptEmbedding`: the trainable virtual token embeddings of prompt tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..tuners_utils import BasePromptEncoder
from .config import PromptTuningConfig, PromptTuningInit


def _text_token_ids(config: PromptTuningConfig, count: int) -> list[int]:
    """The token ids of `prompt_tuning_init_text`, cut to `count` or repeated until there are `count`."""
    from transformers import AutoTokenizer

    tokenizer_kwargs = dict(config.tokenizer_kwargs or {})
    # A config file must not be able to run code from a tokenizer repository.
    tokenizer_kwargs.pop("trust_remote_code", None)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **tokenizer_kwargs)
    token_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not token_ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens.")
    return (token_ids * math.ceil(count / len(token_ids)))[:count]


class PromptEmbedding(BasePromptEncoder):
    """Virtual token ids `[batch, n]` -> their embeddings `[batch, n, token_dim]`, one trainable row per token
    (`num_virtual_tokens * num_transformer_submodules` rows), initialised as `config.prompt_tuning_init` says from
    `word_embeddings` (the model's input embeddings)."""

    uses_word_embeddings = True

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total_virtual_tokens, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (total_virtual_tokens,))
        else:
            token_ids = torch.tensor(_text_token_ids(config, total_virtual_tokens))
        vocab_size = word_embeddings.weight.shape[0]
        if int(token_ids.max()) >= vocab_size:
            raise ValueError(
                f"The tokenizer {config.tokenizer_name_or_path!r} gives token id {int(token_ids.max())}, beyond the "
                f"model's vocabulary of {vocab_size}; use the model's own tokenizer."
            )
        with torch.no_grad():
            rows = word_embeddings(token_ids.to(word_embeddings.weight.device)).detach().clone()
        self.embedding.weight = nn.Parameter(rows.to(torch.float32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
