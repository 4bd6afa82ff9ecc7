"""`TrainableTokensLayer`: a few rows of an embedding (or of the output layer tied to it) trained, the rest frozen.

Attribute and state_dict names are HF PEFT's: `trainable_tokens_delta.<adapter>` holds the trained rows (a parameter
`[k, d]`), `trainable_tokens_original.<adapter>` the rows they replace (a buffer kept out of the state_dict) and
`token_indices[adapter]` which rows those are. Despite its name, the "delta" holds the new rows themselves, not a
difference: the forward looks them up in place of the base rows (so a resized, re-initialised vocabulary never adds
a trained delta to random rows). A layer tied to another (`tied_adapter`: the output layer of a model whose output
weights are its input embeddings) holds no state of its own: it shares the other layer's dicts, so both see the
same rows.

The forward never builds the merged table (HF PEFT copies the whole `[V, d]` embedding on every call): it looks the
base rows up and puts the trained rows over them (`peftfast.ops.embedding_with_replaced_rows`), or, for an output
layer, computes the k replaced logits apart (`peftfast.ops.linear_with_replaced_rows`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ... import ops
from ...utils.mixed_batch import BASE, AdapterRowGroups
from ...utils.other import TrainableTokensWrapper, check_token_indices, embedding_options
from .._buffer_dict import BufferDict
from ..tuners_utils import BaseTunerLayer


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    """Trains the rows `token_indices[adapter]` of an `nn.Embedding` (or of an `nn.Linear` output layer tied to one).

    Args:
        base_layer: the `nn.Embedding` or `nn.Linear` whose rows are trained.
        adapter_name: the first adapter's name (active from the start).
        config: unused; accepted for HF PEFT's signature (`update_layer` takes the config).
        tied_adapter: the `TrainableTokensLayer` of the layer this one is tied to; this layer then shares its state.
    """

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any = None,
        tied_adapter: TrainableTokensLayer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(
                f"Trainable tokens train rows of an nn.Embedding (or of an nn.Linear output layer tied to one), not of "
                f"a {type(base_layer).__name__}; target the model's embedding layer."
            )
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # In a list, so that the tied layer is no submodule of this one (its state would be saved twice).
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict({})
            self.token_indices: dict[str, list[int]] = {}
            # (active adapters, device) -> (token index tensor, row -> slot table): built once per adapter set and
            # device, shared with tied layers, dropped whenever the token indices change.
            self._replacements: dict[tuple[tuple[str, ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
            self._replacements = tied_adapter._replacements
        if isinstance(base_layer, nn.Embedding):
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @property
    def tied_adapter(self) -> TrainableTokensLayer | None:
        return self._tied_adapter[0] if self._tied_adapter else None

    def update_layer(
        self,
        adapter_name: str,
        config: Any = None,
        tied_adapter: TrainableTokensLayer | None = None,
        token_indices: list[int] | None = None,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        """Add `adapter_name`, training the rows `config.token_indices` (or `token_indices`): they start as copies of
        the base rows (`init_weights`, a no-op until trained) or random. A tied layer follows its tie and adds
        nothing."""
        if tied_adapter is not None or self.tied_adapter is not None:
            return
        if config is not None:
            token_indices, init_weights = config.token_indices, config.init_weights
        indices = list(token_indices or [])
        weight = self.get_base_layer().weight
        check_token_indices(indices, weight.shape[0], f"adapter {adapter_name!r}")
        originals = weight.detach()[indices]
        if init_weights:
            values = originals.clone()
        else:
            values = torch.randn((len(indices), weight.shape[1]), dtype=weight.dtype, device=weight.device)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals.clone()
        self._replacements.clear()
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_base(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        """Put `adapter_name`'s rows on the base weight's device and dtype, except that under `autocast_adapter_dtype`
        an fp16/bf16 base gets fp32 rows (HF PEFT's rule). Rows still on the meta device are left there."""
        if self.tied_adapter is not None or adapter_name not in self.trainable_tokens_delta:
            return
        weight = self.get_base_layer().weight
        if weight.device.type == "meta":
            return
        half = weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if autocast_adapter_dtype and half else weight.dtype
        delta = self.trainable_tokens_delta[adapter_name]
        if delta.device.type != "meta":
            self.trainable_tokens_delta[adapter_name] = nn.Parameter(
                delta.detach().to(device=weight.device, dtype=dtype), delta.requires_grad
            )
        original = self.trainable_tokens_original[adapter_name]
        self.trainable_tokens_original[adapter_name] = original.to(device=weight.device, dtype=dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        self._replacements.clear()
        super().delete_adapter(adapter_name)

    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """Adapters whose token indices overlap can't be active or merged together: which rows would win is
        undefined. Merged adapters count too, since an active one could overwrite their rows."""
        names = list(dict.fromkeys(self.merged_adapters + list(adapter_names)))
        seen: dict[int, str] = {}
        for name in names:
            for index in self.token_indices.get(name, []):
                owner = seen.setdefault(index, name)
                if owner != name:
                    raise ValueError(
                        f"Token indices of adapter {name!r} overlap those of adapter {owner!r} (e.g. token {index}); "
                        "only adapters with disjoint token indices can be active or merged together."
                    )

    def _replacement(self, adapters: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices [k], slot of each base row [V] (-1: not replaced)) of `adapters`, on `device`."""
        key = (adapters, device)
        found = self._replacements.get(key)
        if found is None:
            self._check_overlapping_tokens(list(adapters))
            indices = [index for name in adapters for index in self.token_indices[name]]
            # A python dict settles repeated indices deterministically (the last one wins, as in an index_copy).
            slot_of = {index: slot for slot, index in enumerate(indices)}
            slots = torch.full((self.get_base_layer().weight.shape[0],), -1, dtype=torch.long)
            slots[list(slot_of)] = torch.tensor(list(slot_of.values()), dtype=torch.long)
            found = (torch.tensor(indices, dtype=torch.long, device=device), slots.to(device))
            self._replacements[key] = found
        return found

    def _present(self, adapter_names: list[str]) -> list[str]:
        return [name for name in adapter_names if name in self.trainable_tokens_delta]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the trained rows of the adapters (the active ones when `adapter_names` is None) into the base weight;
        `unmerge` writes the original rows back. With `safe_merge`, a NaN/inf raises before anything is written."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got the string {adapter_names!r}.")
        names = self._present(self.active_adapters if adapter_names is None else list(adapter_names))
        already = [name for name in names if name in self.merged_adapters]
        names = [name for name in names if name not in self.merged_adapters]
        if already:
            warnings.warn(f"Adapters {already} are merged already; merging only {names}.", stacklevel=2)
        if not names:
            return
        self._check_overlapping_tokens(names)
        base = self.get_base_layer()
        merged = base.weight.data
        for name in names:
            rows = self.trainable_tokens_delta[name].detach().to(merged)
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=merged.device)
            merged = merged.index_copy(0, index, rows)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {name!r}; nothing was merged. Its trainable tokens "
                    "are probably broken."
                )
        # A new tensor under the same Parameter: a weight tied to this one (the output layer) sees the merge too.
        base.weight.data = merged
        self.merged_adapters.extend(names)

    def _check_safe_merge(self, adapter_names: list[str] | None, layer_name: str) -> None:
        for name in self._present(self.active_adapters if adapter_names is None else list(adapter_names)):
            if not torch.isfinite(self.trainable_tokens_delta[name]).all():
                raise ValueError(
                    f"NaNs or infs detected in the trainable tokens of adapter {name!r} in layer {layer_name!r}; "
                    "nothing was merged."
                )

    def unmerge(self) -> None:
        """Write the original rows back, last merged adapter first."""
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.trainable_tokens_original:
                continue
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            weight.data.index_copy_(0, index, self.trainable_tokens_original[name].to(weight))

    def get_merged_weights(self, active_adapters: list[str]) -> torch.Tensor:
        """The base weight with the trained rows of `active_adapters` written in (a new tensor, with gradients to the
        trained rows): what `weight` reads through a `TrainableTokensWrapper`."""
        weight = self.get_base_layer().weight
        for name in self._present(active_adapters):
            index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight

    def forward_adapters(self, x: torch.Tensor, active_adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output with the trained rows of `active_adapters` (the base output if none of them is here)."""
        present = self._present(active_adapters)
        if self.disable_adapters or not present:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        index, slots = self._replacement(tuple(present), base.weight.device)
        rows = [self.trainable_tokens_delta[name] for name in present]
        rows = rows[0] if len(rows) == 1 else torch.cat([row.to(rows[0].dtype) for row in rows])
        if isinstance(base, nn.Embedding):
            result = ops.embedding_with_replaced_rows(x, base.weight, index, slots, rows, **embedding_options(base))
            # The lookup above bypasses the embedding's own forward, and with it any scale that forward applies.
            scale = self._get_embed_scale()
            return result if scale is None else result * scale.to(result.dtype)
        # An output layer tied to the embedding. As HF PEFT, its bias (tied heads have none) is not applied.
        return ops.linear_with_replaced_rows(x, base.weight, index, rows)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each row of the batch gets its own adapter's rows ("__base__", or an adapter this layer lacks: none)."""
        if len(x) != len(adapter_names):
            raise ValueError(
                f"Got {len(adapter_names)} adapter_names for a batch of {len(x)} rows; pass one name per row."
            )
        if self.merged:
            raise ValueError("Mixed-adapter batches (adapter_names=...) can't run with merged adapters; unmerge first.")
        groups = AdapterRowGroups.of(adapter_names)
        result = None
        for name in groups.groups:
            rows = groups.rows(name, x.device)
            output = self.forward_adapters(x[rows], [] if name == BASE else [name], *args, **kwargs)
            if result is None:
                result = output.new_empty((len(x), *output.shape[1:]))
            result[rows] = output
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return self.forward_adapters(x, self.active_adapters, *args, **kwargs)


TrainableTokensWrapper.token_layer_cls = TrainableTokensLayer
