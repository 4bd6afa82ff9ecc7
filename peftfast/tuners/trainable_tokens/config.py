"""`TrainableTokensConfig`: HF PEFT's field set, so `adapter_config.json` files move between both libraries."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from ...utils.peft_types import PeftType


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Configuration of trainable tokens: only the rows `token_indices` of an embedding train (new or re-trained
    tokens), the rest of it stays frozen; adapter files hold just those rows.

    Args mirror `peft.TrainableTokensConfig`: `token_indices` (the rows, e.g. the ids of tokens added to the
    tokenizer), `target_modules` (names or a regex of the embedding layers; default: the model's input embeddings,
    else "embed_tokens"), `init_weights` (True: the rows start as the current ones, so the adapter is a no-op until
    trained; False: random). An output layer tied to a targeted input embedding sees the same trained rows.
    """

    _peft_type = PeftType.TRAINABLE_TOKENS

    token_indices: list[int] = field(default_factory=list, metadata={"help": "Rows of the embedding to train."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Embedding layers to train rows of; default: the input embeddings."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Start from the current rows (False: random)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)) or any(
            isinstance(index, bool) or not isinstance(index, int) for index in indices
        ):
            raise ValueError(f"TrainableTokensConfig.token_indices must be a list of integers, got {indices!r}.")
        self.token_indices = list(indices)
