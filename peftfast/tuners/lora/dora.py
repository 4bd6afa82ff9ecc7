"""DoRA (`use_dora=True`, weight-decomposed LoRA): the magnitude modules, the cache of weight norms, and the merge math.

A DoRA adapter rescales each output row j of the adapted weight to a trained length: W'_j = m_j (W_j + s (B A)_j) /
||W_j + s (B A)_j||, with the norm treated as a constant (no gradient; DoRA paper section 4.3, as HF PEFT). Layers
compute it as g = m / norm applied to the LoRA layer's output (`peftfast.ops.dora_linear`, `ops.dora_scale`).

HF PEFT's layout, kept so adapter files are interchangeable: `lora_magnitude_vector` is a ModuleDict holding, per
adapter, a small module whose one parameter `weight` is m (state-dict key `<layer>.lora_magnitude_vector.<adapter>
.weight`; on disk `<layer>.lora_magnitude_vector`, without adapter name or `.weight`), of shape [out_features] for
Linear, [embedding_dim] for Embedding and [1, out_channels, 1, ...] for convolutions. It is initialised to the norm,
so a new DoRA adapter starts as the LoRA adapter it wraps.

Norms are computed by `ops.dora_weight_norm` from ||W_j||^2 and the rank-r terms, never from W + s B A. What is
cached (per layer, not saved): ||W_j||^2 while the base weight is frozen, and a whole norm while the adapter's A and B
are frozen too (inference). A cache entry is used only for the very tensors it was computed from (same object, storage
address and autograd version counter, which every in-place update through autograd, `copy_` or `load_state_dict`
bumps); nothing is cached from a tensor that requires grad, because fused optimizers (`AdamW(fused=True)`) update
parameters without bumping their version. Writes through `.data` bypass version counters: peftfast's own (merge,
unmerge, re-quantization) clear the cache; call `layer.dora_cache().clear()` after writing a base weight that way.
Inside a torch.compile'd region the cache is neither read nor written: the graph computes the norms on every call
(one rank-r product per layer), so it has no graph break on the cache keys and never replays a stale norm.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ... import ops


class DoraLinearLayer(nn.Module):
    """The magnitude of one DoRA adapter on a Linear (or transformers Conv1D) layer: `weight` [out_features]."""

    def __init__(self, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out

    def factor_view(self, factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`factor` [out] shaped to scale the rows of the base layer's `weight` (its columns when it is (in, out))."""
        return factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)

    def magnitude_shape(self, out_features: int) -> tuple[int, ...]:
        return (out_features,)

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


class DoraEmbeddingLayer(DoraLinearLayer):
    """The magnitude of one DoRA adapter on an Embedding: `weight` [embedding_dim] (norms over the vocabulary)."""

    def factor_view(self, factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)


class _DoraConvNdLayer(DoraLinearLayer):
    """The magnitude of one DoRA adapter on a convolution: `weight` [1, out_channels, 1, ...] (HF PEFT's shape)."""

    _kernel_dim = 4

    def factor_view(self, factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return factor.view(-1, *([1] * (weight.dim() - 1)))

    def magnitude_shape(self, out_features: int) -> tuple[int, ...]:
        return (1, out_features) + (1,) * (self._kernel_dim - 2)


class DoraConv1dLayer(_DoraConvNdLayer):
    _kernel_dim = 3


class DoraConv2dLayer(_DoraConvNdLayer):
    _kernel_dim = 4


class DoraConv3dLayer(_DoraConvNdLayer):
    _kernel_dim = 5


def _key(tensor: torch.Tensor) -> tuple:
    # A weak reference, not id(): a new tensor may get the id (and storage address) of one that was freed.
    return (weakref.ref(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device)


# Whether DoraCache keeps norms at all (on by default: entries are exact and an [out] vector each). HF PEFT's
# `helpers.DoraCaching` switches it; HF PEFT itself caches only inside that context.
CACHING = True


def _bypassed() -> bool:
    # Traced by torch.compile, a cache lookup would be decided once at trace time and its norm baked into the graph
    # as a constant that no guard ties to the weights' contents (data_ptr and _version aren't guarded either): a
    # compiled graph recomputes the norms on every call instead, so it can never use a stale one.
    return not CACHING or torch.compiler.is_compiling()


def _matches(key: tuple | None, tensor: torch.Tensor) -> bool:
    return key is not None and key[0]() is tensor and key[1:] == _key(tensor)[1:]


class DoraCache:
    """The weight norms one LoRA layer's DoRA adapters reuse (see the module docstring for when an entry is used)."""

    def __init__(self) -> None:
        self._base_key: tuple | None = None
        self._base_sq: torch.Tensor | None = None
        self._norms: dict[str, tuple[tuple, float, torch.Tensor]] = {}
        # The norm each merged DoRA adapter was merged with: unmerging needs exactly it (the merged weight's own norm
        # is another number).
        self.merge_norms: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget every cached norm (not the merge norms, which belong to the merged weights)."""
        self._base_key = self._base_sq = None
        self._norms.clear()

    def _cached(self, layer: Any, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(norm, ||W_j||^2) of `adapter` where the cache holds them for these very tensors, else None each."""
        base_weight = layer.get_base_layer().weight
        if _bypassed() or base_weight.requires_grad or not _matches(self._base_key, base_weight):
            return None, None
        lora_A, lora_B = layer._dora_factors(adapter)
        cached = self._norms.get(adapter)
        if cached is not None and not (lora_A.requires_grad or lora_B.requires_grad):
            (_, key_A, key_B), scaling, norm = cached
            if scaling == layer.scaling[adapter] and _matches(key_A, lora_A) and _matches(key_B, lora_B):
                return norm, self._base_sq
        return None, self._base_sq

    def weight_norm(self, layer: Any, adapter: str) -> torch.Tensor:
        """||W_j + s (B A)_j|| of `adapter` on `layer`, fp32 [out], from the cache where it is valid."""
        norm, weight_sq = self._cached(layer, adapter)
        if norm is not None:
            return norm
        norm, weight_sq = layer._dora_weight_norm_terms(adapter, weight_sq)
        base_weight = layer.get_base_layer().weight
        if not _bypassed() and not base_weight.requires_grad:
            self._base_key, self._base_sq = _key(base_weight), weight_sq
            lora_A, lora_B = layer._dora_factors(adapter)
            if not (lora_A.requires_grad or lora_B.requires_grad):
                keys = (self._base_key, _key(lora_A), _key(lora_B))
                self._norms[adapter] = (keys, layer.scaling[adapter], norm)
        return norm

    def norm_or_weight_sq(self, layer: Any, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For an op that can take the norm's rank-r terms from its own pass over W (`ops.dora_linear`): the norm
        where it is cached, else ||W_j||^2 where that is (the op computes the norm), else the norm computed now."""
        norm, weight_sq = self._cached(layer, adapter)
        if norm is not None or weight_sq is not None:
            return norm, None if norm is not None else weight_sq
        return self.weight_norm(layer, adapter), None


def _offload_device(layer: Any, tensors: tuple[torch.Tensor, ...]) -> torch.device | None:
    """HF PEFT's `ephemeral_gpu_offload`: where adapters are on the CPU, compute the initial norm on a GPU (the result
    goes back to the CPU). None: compute where the tensors are (also when no GPU is there)."""
    if not getattr(layer, "ephemeral_gpu_offload", False) or not any(t.device.type == "cpu" for t in tensors):
        return None
    on_gpu = [t.device for t in tensors if t.device.type in ("cuda", "xpu")]
    if on_gpu:
        return on_gpu[0]
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    return None


def weight_norm_on(
    device: torch.device | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_sq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.dora_weight_norm`, run on `device` when one is given (the results come back to lora_B's device)."""
    if device is None:
        return ops.dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq)
    moved_sq = weight_sq.to(device) if weight_sq is not None else None
    norm, weight_sq = ops.dora_weight_norm(weight.to(device), lora_A.to(device), lora_B.to(device), scaling, moved_sq)
    return norm.to(lora_B.device), weight_sq.to(lora_B.device)


def add_magnitude(layer: Any, adapter: str, module: DoraLinearLayer) -> None:
    """Give `adapter` on `layer` its magnitude module, initialised to the norms of W + s B A (on the meta device while
    the adapter's weights are, to be loaded into)."""
    lora_A, lora_B = layer._dora_factors(adapter)
    shape = module.magnitude_shape(layer.out_features)
    if "meta" in (lora_A.device.type, lora_B.device.type, layer.get_base_layer().weight.device.type):
        magnitude = torch.empty(shape, device="meta", dtype=lora_B.dtype)
    else:
        device = _offload_device(layer, (lora_A, lora_B))
        if device is None:
            # Through the cache: ||W_j||^2 computed here serves the adapter's first forward too.
            norm = layer.dora_cache().weight_norm(layer, adapter)
        else:
            norm = layer._dora_weight_norm_terms(adapter, None, device=device)[0]
        magnitude = norm.to(lora_B.dtype).reshape(shape)
    module.weight = nn.Parameter(magnitude, requires_grad=True)
    layer.lora_magnitude_vector[adapter] = module


def merged_weight(
    layer: Any, adapter: str, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """HF PEFT's DoRA merge: (m / norm) * (W + delta), the factor along the output dimension; in weight's dtype."""
    module = layer.lora_magnitude_vector[adapter]
    factor = module.weight.detach().reshape(-1) / norm
    return (module.factor_view(factor, weight) * (weight + delta)).to(weight.dtype)


def unmerged_weight(
    layer: Any, adapter: str, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """HF PEFT's DoRA unmerge: W / (m / norm) - delta, with the norm the merge used; in weight's dtype."""
    module = layer.lora_magnitude_vector[adapter]
    factor = module.weight.detach().reshape(-1) / norm
    return (weight / module.factor_view(factor, weight) - delta).to(weight.dtype)


def merge_norms(layer: Any, adapters: list[str]) -> dict[str, torch.Tensor]:
    """The norm each DoRA adapter in `adapters` merges with, from the base weight without merged adapters (as
    forward sees it, HF PEFT's rule): adapters merged already are taken out for this and put back."""
    dora_adapters = [name for name in adapters if name in layer.lora_magnitude_vector]
    if not dora_adapters:
        return {}
    merged = list(layer.merged_adapters)
    if merged:
        layer.unmerge()
    try:
        with torch.no_grad():
            return {name: layer._dora_weight_norm_terms(name, None)[0] for name in dora_adapters}
    finally:
        if merged:
            layer.merge(adapter_names=merged)
