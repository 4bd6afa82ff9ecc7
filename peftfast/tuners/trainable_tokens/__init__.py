from ...registry import register_peft_method
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer
from .model import TrainableTokensModel

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel"]

register_peft_method(
    name="trainable_tokens",
    config_cls=TrainableTokensConfig,
    model_cls=TrainableTokensModel,
    prefix="trainable_tokens_",
)
