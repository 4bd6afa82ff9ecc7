"""Activated LoRA (aLoRA, `LoraConfig(alora_invocation_tokens=[...])`), HF PEFT's semantics.

An aLoRA adapter acts on a row only from the last occurrence of its invocation sequence on: every token before it is
computed by the base model alone, so the KV cache of a prefix computed by the base model (or by any other aLoRA
adapter) is the cache the adapter would have built itself, and can be reused across adapters.

The per-row "offset" is how many tokens, counted from the end of the row, the adapter acts on: `L - start` of the
last invocation in a row of L tokens, 0 when the row has none (the base model then runs the whole row). In HF PEFT's
format the offsets are a list with one int or None per row (`alora_offsets=[...]`, which a user may also pass).

Cost: the offsets are found on the device once per `forward`/`generate` call (no host sync), and turned into a
token mask once per call and tokens-per-row (prefill, then decode steps of one token) by `AloraOffsets`, the one
object every aLoRA layer of the call shares (inside a compiled graph, by the graph's own ops: no cache to guard on).
Each layer then computes its adapter term for all tokens and selects it with `where` (`ops.lora_add_masked`): static
shapes, no host sync, traceable. HF PEFT instead builds the mask in every layer from a Python list and gathers the
selected tokens by boolean indexing, a device-to-host sync per layer. The offsets reach the layers through one
attribute per layer (`AloraOffsetsSource`), not through hooks registered per call.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

BASE = "__base__"


class AloraOffsets:
    """The aLoRA offsets of one call (row i: the adapter acts on its last `offsets[i]` tokens), shared by every aLoRA
    layer of the call; `token_mask` builds each mask once per (tokens per row, device)."""

    def __init__(self, offsets: torch.Tensor) -> None:
        self.offsets = offsets
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def of(cls, offsets: Any, device: torch.device | None = None) -> AloraOffsets:
        """`offsets` itself when it already is an `AloraOffsets`; else from HF PEFT's list (an int or None per row)
        or an int tensor [rows]."""
        if isinstance(offsets, cls):
            return offsets
        if isinstance(offsets, torch.Tensor):
            if offsets.dim() != 1 or offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
                raise ValueError(f"alora_offsets must be an int tensor of one offset per row, got {offsets!r}.")
            return cls(offsets.long())
        if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
            raise TypeError(f"alora_offsets must be a list with one int (or None) per row, got {offsets!r}.")
        if any(
            not (offset is None or (isinstance(offset, int) and not isinstance(offset, bool))) for offset in offsets
        ):
            raise TypeError(f"alora_offsets must hold one int (or None) per row, got {list(offsets)!r}.")
        values = [0 if offset is None else offset for offset in offsets]
        return cls(torch.tensor(values, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return self.offsets.shape[0]

    def repeat_rows(self, times: int) -> AloraOffsets:
        """The offsets with each row repeated `times` times in place (generate's `num_return_sequences`)."""
        return AloraOffsets(self.offsets.repeat_interleave(times))

    def _build_mask(self, tokens: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(tokens, device=device)
        return positions >= tokens - self.offsets.to(device).clamp(max=tokens).unsqueeze(1)

    def token_mask(self, tokens: int, device: torch.device) -> torch.Tensor:
        """mask[i, t] = t >= tokens - offsets[i]: the last offsets[i] of the row's `tokens` tokens, bool
        [rows, tokens] on `device`."""
        if torch.compiler.is_compiling():
            # Traced, a lookup would make the graph guard on the cache's keys: a graph traced at a decode step whose
            # mask wasn't cached yet recompiles at the next one. In a graph the mask is a few fused ops anyway.
            return self._build_mask(tokens, device)
        key = (tokens, torch.device(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = self._build_mask(tokens, device)
        return mask


def token_mask_for(offsets: Any, tokens_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The aLoRA mask of a layer's output tokens `tokens_shape` ((rows,) or (rows, tokens)) from the call's offsets
    (an `AloraOffsets`, or anything `AloraOffsets.of` takes); all False without offsets (a call that found none: the
    adapter is off, but its weights still get a zero gradient, as in HF PEFT)."""
    if len(tokens_shape) not in (1, 2):
        raise ValueError(
            f"aLoRA layers take inputs of shape (rows, features) or (rows, tokens, features), got "
            f"{len(tokens_shape) + 1} dimensions."
        )
    rows = tokens_shape[0]
    tokens = tokens_shape[1] if len(tokens_shape) == 2 else 1
    if offsets is None:
        return torch.zeros(tuple(tokens_shape), dtype=torch.bool, device=device)
    offsets = AloraOffsets.of(offsets)
    if len(offsets) != rows:
        raise ValueError(
            f"Got aLoRA offsets for {len(offsets)} rows but the layer's input has {rows} rows; pass one offset per "
            "row of the batch (alora_offsets=[...])."
        )
    return offsets.token_mask(tokens, device).reshape(tokens_shape)


def invocation_offsets(input_ids: torch.Tensor, invocation_tokens: Sequence[int]) -> torch.Tensor:
    """Semantics: offsets[i] = L - s_i, with s_i the start of the last occurrence of `invocation_tokens` in
    input_ids[i] (L tokens), 0 where it doesn't occur. On input_ids' device, without a host sync.

    Shapes: input_ids [rows, L] ints. Returns offsets [rows] int64.
    """
    rows, length = input_ids.shape
    size = len(invocation_tokens)
    if size == 0 or length < size:
        return torch.zeros(rows, dtype=torch.long, device=input_ids.device)
    pattern = torch.tensor(list(invocation_tokens), dtype=input_ids.dtype, device=input_ids.device)
    found = (input_ids.unfold(1, size, 1) == pattern).all(dim=-1)
    starts = torch.arange(length - size + 1, device=input_ids.device)
    last = torch.where(found, starts, -1).amax(dim=-1)
    return torch.where(last >= 0, length - last, 0)


def _invocation_tokens(peft_config: dict[str, Any], name: str) -> list[int] | None:
    return getattr(peft_config.get(name), "alora_invocation_tokens", None) or None


def offsets_for_call(
    peft_config: dict[str, Any],
    active_adapters: Sequence[str],
    input_ids: torch.Tensor | None,
    adapter_names: Sequence[str] | None = None,
    has_inputs_embeds: bool = False,
) -> torch.Tensor | None:
    """HF PEFT's aLoRA offsets of a causal LM call: for each row, from the invocation sequence of its adapter
    (`adapter_names[i]`, else the active one); None when no adapter of the call is an aLoRA. Without `input_ids`
    (inputs_embeds only) nothing can be searched: a warning, and the aLoRA adapters are off for this call."""
    names = list(adapter_names) if adapter_names is not None else []
    if adapter_names is None:
        # With several active adapters the first aLoRA one decides (HF PEFT has a single active adapter here).
        active = next((name for name in active_adapters if _invocation_tokens(peft_config, name)), None)
        if active is None:
            return None
    elif not any(_invocation_tokens(peft_config, name) for name in set(names) if name != BASE):
        return None
    if input_ids is None:
        if has_inputs_embeds:
            warnings.warn(
                "aLoRA adapters need input_ids to find their invocation sequence; with inputs_embeds alone they are "
                "off for this call (as in HF PEFT).",
                stacklevel=_caller_stacklevel(),
            )
        return None
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if adapter_names is None:
        return invocation_offsets(input_ids, _invocation_tokens(peft_config, active))
    offsets = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        rows_of.setdefault(name, []).append(row)
    for name, rows in rows_of.items():
        tokens = _invocation_tokens(peft_config, name) if name != BASE else None
        if tokens is None:
            continue
        index = torch.tensor(rows, device=input_ids.device)
        offsets[index] = invocation_offsets(input_ids[index], tokens)
    return offsets


def _caller_stacklevel() -> int:
    """`warnings.warn`'s stacklevel, for its caller, of the first frame outside peftfast and torch.nn: the user's
    forward or generate call, however many frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("peftfast", "torch.nn")):
        frame, level = frame.f_back, level + 1
    return level


class AloraOffsetsSource:
    """Where one aLoRA layer finds the offsets of the call in progress (`offsets`, None between calls). A call sets
    one attribute per layer instead of registering a hook on it: a hook registered inside a torch.compile'd forward is
    a graph break, an attribute set there is data of the graph. Each layer gets its source when its first aLoRA
    adapter is added (`Linear.update_layer`), outside any compiled region, so a graph never guards on its creation."""

    def __init__(self) -> None:
        self.offsets: AloraOffsets | None = None


class _OffsetsInstalled:
    """Makes `offsets` the call's offsets in `source` until `remove()` puts the previous ones back."""

    def __init__(self, source: AloraOffsetsSource, offsets: AloraOffsets) -> None:
        self.source, self.previous = source, source.offsets
        source.offsets = offsets

    def remove(self) -> None:
        self.source.offsets = self.previous


def _offsets_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, offsets: AloraOffsets):
    kwargs["alora_offsets"] = offsets
    return args, kwargs


class _RecomputeOffsets:
    """One call's offsets for the aLoRA layers of one gradient-checkpointed block (a transformers
    GradientCheckpointingLayer in training). The block runs its forward again during backward, after the call has
    returned and its hooks are gone: when the block runs, its aLoRA layers get hooks of their own, which stay until
    the block's backward is done (the hooks are listed in the block's `_alora_recompute_hooks`)."""

    def __init__(self, block: nn.Module, layers: list[nn.Module], offsets: AloraOffsets) -> None:
        if block.__dict__.get("_alora_recompute_hooks"):
            raise ValueError(
                "With gradient checkpointing, each training forward of a model with aLoRA adapters must be followed "
                "by its backward before the next forward (the recomputation in backward needs that call's aLoRA "
                "offsets). Call backward first, run forwards that need no gradient under torch.no_grad() or in "
                "eval mode, or disable gradient checkpointing."
            )
        self.block, self.layers, self.offsets, self.ran = block, layers, offsets, False
        # Registered before the call: a module collects its backward hooks before running its forward pre-hooks.
        block.__dict__["_alora_recompute_hooks"] = [block.register_full_backward_hook(_recomputed_block_done)]
        self._pre_hook = block.register_forward_pre_hook(self._arm)

    def _arm(self, block: nn.Module, args: tuple) -> None:
        self.ran = True
        hook = partial(_offsets_pre_forward_hook, offsets=self.offsets)
        armed = block.__dict__["_alora_recompute_hooks"]
        armed.extend(layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self.layers)

    def remove(self, failed: bool = False) -> None:
        """End of the call; a block that didn't run, or a call that failed, leaves no backward to wait for."""
        self._pre_hook.remove()
        if failed or not self.ran:
            _recomputed_block_done(self.block, None, None)


def _recomputed_block_done(block: nn.Module, grad_input: Any, grad_output: Any) -> None:
    armed = block.__dict__.get("_alora_recompute_hooks", [])
    while armed:
        armed.pop().remove()


def _is_checkpointed_block(module: nn.Module) -> bool:
    # A transformers GradientCheckpointingLayer with checkpointing on (by class name: transformers needn't be
    # importable). Models have a `gradient_checkpointing` flag too, but only these layers are recomputed.
    is_block = any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)
    return is_block and getattr(module, "gradient_checkpointing", False) is True


def install_offsets(model: nn.Module, offsets: AloraOffsets, is_alora_layer) -> list[Any]:
    """Hand `offsets` to every aLoRA layer of `model` for one call, through its `AloraOffsetsSource`; return
    the handles to `remove()` after it. The layers of a gradient-checkpointed block also get them as a keyword until
    that block's backward (its recomputation runs after the call, when the source holds no offsets)."""
    handles: list[Any] = []
    try:
        if torch.is_grad_enabled():
            for block in model.modules():
                if block.training and _is_checkpointed_block(block):
                    layers = [module for module in block.modules() if is_alora_layer(module)]
                    if layers:
                        handles.append(_RecomputeOffsets(block, layers, offsets))
        for module in model.modules():
            if is_alora_layer(module):
                handles.append(_OffsetsInstalled(module._alora_source, offsets))
    except Exception:
        remove_handles(handles, failed=True)
        raise
    return handles


def remove_handles(handles: Iterable[Any], failed: bool = False) -> None:
    """Remove the hooks of one call (`install_offsets`'s and plain hook handles); `failed`: the call raised."""
    for handle in handles:
        if isinstance(handle, _RecomputeOffsets):
            handle.remove(failed=failed)
        else:
            handle.remove()


def unsupported_target_error(key: str, base_layer: nn.Module) -> ValueError:
    return ValueError(
        f"Invalid or unsupported variant combination: ('alora_invocation_tokens',) for module {key!r}: aLoRA adapts "
        f"Linear layers only, and this is a {type(base_layer).__name__} (as in HF PEFT). Leave it out of "
        "target_modules, or use plain LoRA (alora_invocation_tokens=None) for it."
    )


def variant_fields(config: Any, fields: Iterable[str] = ("alora_invocation_tokens", "use_dora")) -> tuple[str, ...]:
    """The LoRA variant fields `config` turns on, sorted (HF PEFT's key for a variant combination)."""
    return tuple(sorted(name for name in fields if getattr(config, name, None)))
