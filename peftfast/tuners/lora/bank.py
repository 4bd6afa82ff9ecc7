"""The adapter bank of a LoRA Linear layer: every loaded adapter's A and B packed into two tensors for the
multi-adapter kernels (`peftfast.ops.lora_multi_adapter`), kept in step with the layer's adapters.

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
  ranks, 8 launches per layer instead of 2, ~1300 more launches on a decode step of Llama-7B (224 LoRA layers); a
  decode step's LoRA work in one layer (reading 32 x r16 adapters: 16 MiB fp32 or 8 MiB bf16, ~3-5 us at H100
  bandwidth) is of the order of one launch, so the extra launches would roughly double it (estimated, not timed);
- packing row-wise with per-slot offsets stores exactly sum_i r_i rows and serves every rank in one launch pair; the
  only padding left is the kernel's block shape (rank rounded up to a power of two >= 16 in registers, masked), which
  costs tensor-core work on a memory-bound op, not bytes.
(Bytes computed, not timed: no GPU was lent to this work; bench/bench_multi_adapter.py measures the kernels.)

Staleness. The bank copies weights, so it checks, before each use, a cheap key of every adapter a call uses: the
tensors' identity, storage address and autograd version counter (bumped by every in-place update: optimizer steps,
`load_state_dict`, `copy_` under no_grad), shape, dtype, device, and the scaling. A changed key re-copies that
adapter's rows; a changed adapter set (add/delete) or rank rebuilds the bank. Writes through `.data` bypass version
counters: call `invalidate()` after those. The copy costs memory: the adapters of a layer are held twice once a
mixed batch has run (half again in bf16 on a GPU).

Dtype. The triton kernels multiply in the activations' dtype on a GPU, so there `ops.multi_adapter_bank_dtype` asks
for a bf16/fp16 bank: the same products from half the bytes (fp32 adapters for 32 tokens x 32 adapters of r16 at
4096 x 4096 add 16 MiB to the 32 MiB bf16 base weight; bf16 copies add 8 MiB). Elsewhere the bank keeps the
adapters' dtype, in which HF PEFT runs the LoRA branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _tensor_key(tensor: torch.Tensor | None) -> tuple:
    if tensor is None:
        return ()
    return (id(tensor), tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype, tensor.device)


class LoraAdapterBank:
    """Packed A/B/bias/scaling of every adapter of one LoRA Linear layer (see the module docstring)."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.slot_of: dict[str, int] = {}
        self.lora_A: torch.Tensor | None = None
        self.lora_B_t: torch.Tensor | None = None
        self.lora_B_bias: torch.Tensor | None = None
        self.scaling: torch.Tensor | None = None
        self.slot_spans: torch.Tensor | None = None
        self.r_max = 0
        self.dtype: torch.dtype | None = None
        self.rebuilds = 0
        self._rows: list[tuple[int, int]] = []
        self._has_bias: list[bool] = []
        self._keys: dict[str, tuple] = {}
        self._group_slot: tuple[Any, torch.Tensor] | None = None

    def invalidate(self) -> None:
        """Forget the packed weights; the next use rebuilds them (needed only after writes through `.data`)."""
        self.names = ()

    @staticmethod
    def _weights(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lora_B = layer.lora_B[name]
        return layer.lora_A[name].weight, lora_B.weight, lora_B.bias

    def _key(self, layer: nn.Module, name: str) -> tuple:
        A, B, bias = self._weights(layer, name)
        return (*_tensor_key(A), *_tensor_key(B), *_tensor_key(bias), layer.scaling[name])

    def refresh(self, layer: nn.Module, used: Iterable[str], dtype: torch.dtype | None = None) -> None:
        """Bring the bank in step with `layer` for a call that uses the adapters `used` (all in `layer.lora_A`),
        packed in `dtype` (None: the adapters' common dtype)."""
        names = tuple(layer.lora_A)
        if names != self.names or dtype != self.dtype:
            self._rebuild(layer, names, dtype)
            return
        for name in used:
            key = self._key(layer, name)
            if key == self._keys[name]:
                continue
            A, B, bias = self._weights(layer, name)
            slot = self.slot_of[name]
            row, rank = self._rows[slot]
            same_layout = A.shape[0] == rank and A.device == self.lora_A.device
            if not same_layout or (bias is not None) != self._has_bias[slot]:
                self._rebuild(layer, names, dtype)
                return
            with torch.no_grad():
                self.lora_A[row : row + rank] = A
                self.lora_B_t[row : row + rank] = B.T
                if bias is not None:
                    self.lora_B_bias[slot] = bias
                self.scaling[slot] = layer.scaling[name]
            self._keys[name] = key

    def _rebuild(self, layer: nn.Module, names: tuple[str, ...], requested: torch.dtype | None) -> None:
        weights = [self._weights(layer, name) for name in names]
        device = weights[0][0].device
        # One dtype for the packed weights: the requested one, else the adapters' common one (fp32 under HF PEFT's
        # autocast default).
        dtype = weights[0][0].dtype
        for A, B, _ in weights:
            dtype = torch.promote_types(torch.promote_types(dtype, A.dtype), B.dtype)
        dtype = requested or dtype
        ranks = [A.shape[0] for A, _, _ in weights]
        self._rows = []
        row = 0
        for rank in ranks:
            self._rows.append((row, rank))
            row += rank
        with torch.no_grad():
            self.lora_A = torch.cat([A.to(device, dtype) for A, _, _ in weights])
            self.lora_B_t = torch.cat([B.to(device, dtype).T for _, B, _ in weights]).contiguous()
            self._has_bias = [bias is not None for _, _, bias in weights]
            if any(self._has_bias):
                zeros = torch.zeros(weights[0][1].shape[0], device=device, dtype=dtype)
                self.lora_B_bias = torch.stack(
                    [zeros if bias is None else bias.to(device, dtype) for _, _, bias in weights]
                )
            else:
                self.lora_B_bias = None
        self.scaling = torch.tensor([layer.scaling[name] for name in names], dtype=torch.float32, device=device)
        self.slot_spans = torch.tensor(self._rows, dtype=torch.int32, device=device).reshape(-1, 2)
        self.r_max = max(ranks, default=0)
        self.slot_of = {name: slot for slot, name in enumerate(names)}
        self._keys = {name: self._key(layer, name) for name in names}
        self._group_slot = None
        self.names = names
        self.dtype = requested
        self.rebuilds += 1

    def group_slot(
        self, group_names: tuple[str, ...], device: torch.device, skip: tuple[str, ...] = ()
    ) -> torch.Tensor:
        """This layer's slot of each group of a call (-1: "__base__", an adapter this layer lacks, or one in `skip`),
        int32.

        Cached for the last group list: every decode step of a `generate` call asks for the same one.
        """
        key = (group_names, torch.device(device), self.rebuilds, skip)
        if self._group_slot is None or self._group_slot[0] != key:
            slots = [-1 if name in skip else self.slot_of.get(name, -1) for name in group_names]
            self._group_slot = (key, torch.tensor(slots, dtype=torch.int32, device=device))
        return self._group_slot[1]
