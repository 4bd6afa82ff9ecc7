"""Per-row adapter selection for mixed-adapter batches (`model(..., adapter_names=[...])`).

The forward hook of `LoraModel` wraps the user's list in an `AdapterRowGroups` once per call and hands that same
object to every adapter layer, so the grouping of rows by adapter (and the index tensors, per device) is computed once
per forward call instead of once per layer. A layer called directly with a plain list builds its own.

For the multi-adapter kernels (`peftfast.ops.lora_multi_adapter`) it also builds, once per call and tokens-per-row,
the token layout: tokens sorted by adapter group and cut into tiles of one group each. The number of tiles is a bound
computed from shapes only (tokens, tile size, number of adapters the model holds), so the kernels' grid never depends
on which adapters the batch uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

BASE = "__base__"
# Tile heights: 16 is the smallest a GPU dot takes, so a decode token alone in its tile wastes the least; rows of 64+
# tokens (prefill) fill 64-token tiles, the BLOCK_M of the single-adapter shrink kernel (`kernels/lora_linear.py`).
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64


class TokenLayout(NamedTuple):
    """Tokens grouped by adapter for the multi-adapter kernels.

    token_order [M] int32: token indices, group after group (groups in order of first appearance);
    tiles [n_tiles, 3] int32: (group, start, end) positions in token_order, at most block_m long, inside one group;
        "__base__" rows get no tile; unused tiles are (-1, 0, 0);
    block_m: the tile height the kernels must use.
    """

    token_order: torch.Tensor
    tiles: torch.Tensor
    block_m: int


class AdapterRowGroups(list):
    """The adapter name of each batch row ("__base__": no adapter), grouped by name.

    It is a `list` of the names, so code that only reads `adapter_names` sees the list it expects; `groups` maps each
    distinct name (in order of first appearance) to its row positions, and `rows(name, device)` gives those positions
    as an index tensor, built once per (name, device).
    """

    def __init__(self, adapter_names: Iterable[str], num_adapters: int | None = None) -> None:
        """`num_adapters`: how many adapters the model holds (the bound on distinct adapters in a batch, which sizes
        the kernels' grid); None: the number of distinct adapters in this batch."""
        super().__init__(adapter_names)
        self.groups: dict[str, list[int]] = {}
        for position, name in enumerate(self):
            self.groups.setdefault(name, []).append(position)
        self.names = tuple(self.groups)
        present = sum(name != BASE for name in self.groups)
        self.num_adapters = present if num_adapters is None else max(num_adapters, present)
        self._index_tensors: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._layouts: dict[tuple[int, torch.device], TokenLayout] = {}

    @classmethod
    def of(cls, adapter_names: Iterable[str]) -> AdapterRowGroups:
        """`adapter_names` itself when it already is an `AdapterRowGroups`, else a new one built from it."""
        return adapter_names if isinstance(adapter_names, cls) else cls(adapter_names)

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        """Positions of the rows that use adapter `name`, as an int64 tensor on `device`."""
        key = (name, torch.device(device))
        index = self._index_tensors.get(key)
        if index is None:
            index = torch.tensor(self.groups[name], dtype=torch.long, device=device)
            self._index_tensors[key] = index
        return index

    def token_layout(self, tokens_per_row: int, device: torch.device) -> TokenLayout:
        """The layout of the batch's rows * tokens_per_row tokens (row-major), built once per (tokens_per_row,
        device): prefill and each decode step of one `generate` call share this object."""
        key = (tokens_per_row, torch.device(device))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._build_layout(tokens_per_row, device)
            self._layouts[key] = layout
        return layout

    def _build_layout(self, tokens_per_row: int, device: torch.device) -> TokenLayout:
        block_m = PREFILL_BLOCK_M if tokens_per_row >= PREFILL_BLOCK_M else DECODE_BLOCK_M
        offsets = torch.arange(tokens_per_row)
        order, tiles, start = [], [], 0
        for group, (name, rows) in enumerate(self.groups.items()):
            order.append((torch.tensor(rows)[:, None] * tokens_per_row + offsets).flatten())
            end = start + len(rows) * tokens_per_row
            if name != BASE:
                tiles.extend((group, first, min(first + block_m, end)) for first in range(start, end, block_m))
            start = end
        total = start
        # Each group adds at most one partial tile: sum_g ceil(n_g / b) <= ceil(M / b) + (groups - 1).
        bound = -(-total // block_m) + min(total, self.num_adapters)
        tiles.extend([(-1, 0, 0)] * (bound - len(tiles)))
        token_order = torch.cat(order).to(torch.int32) if order else torch.zeros(0, dtype=torch.int32)
        return TokenLayout(
            token_order.to(device), torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(device), block_m
        )
