"""The adapter bank of a LoRA Linear layer: its adapters' A and B packed into two tensors for the multi-adapter op
(`peftfast.ops.lora_multi_adapter`), packed afresh from the live weights on every mixed-batch call.

Layout: adapters packed row-wise with no padding, `lora_A` [sum_i r_i, d_in] and `lora_B_t` [sum_i r_i, d_out]
(B transposed, so a slot's rows are contiguous along d_out and a [rank, BLOCK_N] tile is a coalesced load), slot i
owning rows `slot_spans[i] = (first row, r_i)`; per-slot scaling (fp32) and lora_B bias ([n_slots, d_out], zero for
adapters without one).

Why neither padding to r_max nor grouping by rank. Per layer of d_in = d_out = 4096 with fp32 adapter weights
(HF PEFT's autocast default) one rank row of A and B is 32 KiB:
- padding every adapter to r_max = 64 stores 32 adapters in 64 MiB whatever their ranks; a mix of 16 x r8, 12 x r16
  and 4 x r64 needs 18 MiB (3.6x less), a mix of 8 each of r1/r8/r16/r64 22 MiB (2.9x less). The bytes a decode step
  reads are the same either way (loads past an adapter's rank are masked and fetch nothing), so padding only wastes
  memory, up to 64x for rank-1 adapters beside a rank-64 one;
- grouping by rank stores exactly sum_i r_i rows too but needs a shrink and an expand launch per distinct rank: with 4
  ranks, 8 launches per layer instead of 2, ~1300 more launches on a decode step of Llama-7B (224 LoRA layers);
- packing row-wise with per-slot offsets stores exactly sum_i r_i rows and serves every rank in one launch pair; the
  only padding left is the kernel's block shape (rank rounded up to a power of two >= 16 in registers, masked), which
  costs tensor-core work on a memory-bound op, not bytes.

Never stale. An earlier bank kept the packed copy between calls and checked a key of each adapter (tensor identity,
storage address, autograd version counter) before use. Writes through `.data` (`lora_A[a].weight.data.mul_(3)`, a
pattern of HF PEFT's own code) bump no version counter, so that bank silently served the old weights; no check
cheaper than reading the weights can catch them. So nothing is cached that a write can change: each call packs the
weights it reads, and only metadata derived from names, ranks and scalings (slot spans, the slot of each adapter,
the scaling vector) is cached. The price is one copy of the packed adapters per layer and call: eagerly only of the
adapters the batch uses (one adapter: no copy at all), under torch.compile of all the layer's adapters (which ones a
batch uses is data there), inside the graph, so a CUDA graph re-reads the live weights on every replay and
hotswapped weights are served at once. `bench/bench_multi_adapter.py` times the packing beside the whole layer.

Dtype. The triton kernels multiply in the activations' dtype on a GPU, so there `ops.multi_adapter_bank_dtype` asks
for a bf16/fp16 pack: the same products from half the bytes. Elsewhere the pack keeps the adapters' dtype, in which
HF PEFT runs the LoRA branch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch import nn

from ...utils.mixed_batch import MixedBatch

# Metadata tensors kept per layer: a few adapter sets (a serving loop alternates between some) and no more, so that
# churning through adapter sets never grows memory.
_CACHE_ENTRIES = 8


class PackedAdapters(NamedTuple):
    """A layer's adapters in the multi-adapter op's format (see the module docstring)."""

    lora_A: torch.Tensor
    lora_B_t: torch.Tensor
    lora_B_bias: torch.Tensor | None
    scaling: torch.Tensor
    slot_spans: torch.Tensor
    r_max: int


class LoraAdapterBank:
    """Packs the adapters of one LoRA Linear layer for a mixed-batch call (see the module docstring)."""

    def __init__(self) -> None:
        self._cache: dict[Hashable, Any] = {}

    def _cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        # Traced code builds its constants in the graph; only eager calls fill the cache.
        if torch.compiler.is_compiling():
            return build()
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= _CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]
            value = self._cache[key] = build()
        return value

    @staticmethod
    def slot_names(layer: nn.Module, batch: MixedBatch) -> tuple[str, ...]:
        """The adapters of `layer` to pack for `batch`: eagerly those the batch uses, when traced all of them (which
        adapters a batch uses is data in a compiled graph). aLoRA adapters are not packed: their rows get their term
        masked to the tokens after the invocation (`ops.lora_add_masked`)."""
        use_alora = getattr(layer, "use_alora", {})
        traced = torch.compiler.is_compiling()
        return tuple(name for name in layer.lora_A if (traced or name in batch.used) and not use_alora.get(name, False))

    def pack(
        self, layer: nn.Module, names: tuple[str, ...], dtype: torch.dtype | None, device: torch.device
    ) -> PackedAdapters:
        """The live weights of adapters `names` of `layer`, packed in `dtype` (None: the adapters' common dtype)."""
        weights_A = [layer.lora_A[name].weight for name in names]
        modules_B = [layer.lora_B[name] for name in names]
        ranks = tuple(A.shape[0] for A in weights_A)
        if len(names) == 1 and (dtype is None or weights_A[0].dtype == dtype == modules_B[0].weight.dtype):
            # One adapter is read in place: B.T is a strided view, which the op takes.
            lora_A, lora_B_t = weights_A[0], modules_B[0].weight.T
        else:
            lora_A = torch.cat(weights_A)
            lora_B_t = torch.cat([B.weight.T for B in modules_B])
            dtype = dtype or torch.promote_types(lora_A.dtype, lora_B_t.dtype)
            lora_A, lora_B_t = lora_A.to(dtype), lora_B_t.to(dtype)
        biases = [B.bias for B in modules_B]
        lora_B_bias = None
        if any(bias is not None for bias in biases):
            zeros = lora_B_t.new_zeros(lora_B_t.shape[1])
            lora_B_bias = torch.stack([zeros if bias is None else bias.to(lora_B_t.dtype) for bias in biases])
        scaling = self._scaling(layer, names, device)
        slot_spans = self._cached(("spans", ranks, device), lambda: _slot_spans(ranks, device))
        return PackedAdapters(lora_A, lora_B_t, lora_B_bias, scaling, slot_spans, max(ranks))

    def _scaling(self, layer: nn.Module, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        values = tuple(layer.scaling[name] for name in names)
        if any(isinstance(value, torch.Tensor) for value in values):
            # Tensor scalings (prepared for compiled hotswap) change in place: read them on every call.
            return torch.stack([torch.as_tensor(value, dtype=torch.float32, device=device) for value in values])
        return self._cached(("scaling", values, device), lambda: torch.tensor(values, device=device))

    def group_slot(self, names: tuple[str, ...], adapters: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """int32 [len(adapters)]: the slot (position in `names`) of each adapter of the call's index space, -1 where
        this layer packs none."""
        slot_of = {name: slot for slot, name in enumerate(names)}

        def build() -> torch.Tensor:
            return torch.tensor([slot_of.get(name, -1) for name in adapters], dtype=torch.int32, device=device)

        return self._cached(("group_slot", names, adapters, device), build)


def _slot_spans(ranks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    spans, row = [], 0
    for rank in ranks:
        spans.append((row, rank))
        row += rank
    return torch.tensor(spans, dtype=torch.int32, device=device).reshape(-1, 2)
