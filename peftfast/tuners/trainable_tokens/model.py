"""`TrainableTokensModel`: puts `TrainableTokensLayer`s on the embeddings a `TrainableTokensConfig` targets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import nn

from ...utils.mixed_batch import BASE, AdapterRowGroups
from ...utils.other import get_submodules, input_embeddings_name, module_names_tied_with_embedding, weights_are_tied
from ..tuners_utils import BaseTuner
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class TrainableTokensModel(BaseTuner):
    """Trains chosen rows of a model's embeddings. An output layer tied to a targeted input embedding gets a tied
    layer, so the logits of the trained tokens use the trained rows too."""

    prefix = "trainable_tokens_"
    tuner_layer_cls = TrainableTokensLayer

    def _prepare_adapter_config(self, config: TrainableTokensConfig, model: nn.Module) -> TrainableTokensConfig:
        if config.target_modules is None:
            config.target_modules = input_embeddings_name(model, "embed_tokens")
        return config

    def _check_tied_modules(self, model: nn.Module, config: TrainableTokensConfig) -> None:
        # Nothing to warn about: this method ties the output layer to the input embeddings itself.
        return

    def _tied_target_modules(self) -> list[str]:
        # The tie is this method's own: merging writes the rows into the one weight both layers share.
        return []

    def _create_and_replace(
        self,
        config: TrainableTokensConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        tied_adapter: TrainableTokensLayer | None = None,
    ) -> None:
        if isinstance(target, TrainableTokensLayer):
            target.update_layer(adapter_name, config=config, tied_adapter=tied_adapter)
            return
        new_module = TrainableTokensLayer(target, adapter_name, tied_adapter=tied_adapter)
        new_module.update_layer(adapter_name, config=config, tied_adapter=tied_adapter)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _inject_adapter(
        self, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool, undo: list[Callable[[], None]]
    ) -> None:
        super()._inject_adapter(model, adapter_name, low_cpu_mem_usage, undo)
        self._tie_to_input_embeddings(model, adapter_name)

    def _tie_to_input_embeddings(self, model: nn.Module, adapter_name: str) -> None:
        """Give every layer whose weight is the input embeddings' (the output layer of a tied model) a layer tied to
        the input embeddings' `TrainableTokensLayer`: one layer owns the rows, the tied ones read them."""
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embeddings, TrainableTokensLayer) or not weights_are_tied(model):
            return
        for name in module_names_tied_with_embedding(model):
            parent, target, target_name = get_submodules(model, name)
            if isinstance(target, TrainableTokensLayer) and target.tied_adapter is embeddings:
                continue
            base = target.get_base_layer() if isinstance(target, TrainableTokensLayer) else target
            # A layer the config targeted itself is replaced: its rows must be the input embeddings' rows.
            tied = TrainableTokensLayer(base, adapter_name, tied_adapter=embeddings)
            # It follows the input embeddings' state; the trainability of the shared rows is theirs already.
            tied._active_adapter = embeddings._active_adapter
            tied._disable_adapters = embeddings.disable_adapters
            setattr(parent, target_name, tied)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Hand `adapter_names` (one per batch row, "__base__" for none) to every layer for one call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per batch row; got {adapter_names!r}.")
        if self.training:
            raise ValueError("Mixed-adapter batches (adapter_names=...) are for inference; call model.eval() first.")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE})
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) {unknown} in adapter_names; available: {list(self.peft_config)} and '{BASE}'."
            )
        hook = partial(_adapter_names_pre_forward_hook, adapter_names=AdapterRowGroups(adapter_names))
        handles = [
            module.register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, TrainableTokensLayer)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
