"""Per-row adapter selection for mixed-adapter batches (`model(..., adapter_names=[...])`), as data.

`MixedBatch` holds one call's choice: the adapter of each batch row as a name (for code that loops over adapters in
Python) and as an int32 index tensor into a fixed list of adapters (the model's), -1 for "__base__". The tensor is
made before the model runs, once per call and device, so a compiled forward reads it as an input: a new
`adapter_names` assignment of the same batch size is new data for the same graph, never a recompile.

From that tensor, `token_layout` builds what the multi-adapter op (`peftfast.ops.lora_multi_adapter`) takes: the
tokens sorted by adapter and cut into tiles of one adapter each. Every shape in it follows from shapes alone (tokens,
tile height, number of adapters), never from which adapters the batch uses, so the same code runs eagerly, traced by
torch.compile without a graph break, and inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

BASE = "__base__"
# Tile heights: 16 is the smallest a GPU dot takes, so a decode token alone in its tile wastes the least; rows of 64+
# tokens (prefill) fill 64-token tiles, the BLOCK_M of the single-adapter shrink kernel (`kernels/lora_linear.py`).
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64


class TokenLayout(NamedTuple):
    """Tokens grouped by adapter for the multi-adapter op.

    token_order [M] int32: token indices, adapter after adapter (in the order of the adapter list), "__base__" last;
    tiles [n_tiles, 3] int32: (group, start, end) positions in token_order, at most block_m long, inside one group,
        where group is the index of the adapter in the adapter list; "__base__" tokens get no tile; unused tiles are
        (-1, 0, 0). n_tiles = ceil(M / block_m) + min(M, number of adapters), a bound from shapes only;
    block_m: the tile height.
    """

    token_order: torch.Tensor
    tiles: torch.Tensor
    block_m: int


def block_m_for(tokens_per_row: int) -> int:
    """The tile height for rows of `tokens_per_row` tokens."""
    return PREFILL_BLOCK_M if tokens_per_row >= PREFILL_BLOCK_M else DECODE_BLOCK_M


def token_layout(row_adapter: torch.Tensor, tokens_per_row: int, num_adapters: int) -> TokenLayout:
    """The layout of `row_adapter.shape[0]` rows of `tokens_per_row` tokens each (row-major), row i using adapter
    `row_adapter[i]` (an index below `num_adapters`, or -1 for none). Static shapes, no host sync."""
    rows = row_adapter.shape[0]
    total = rows * tokens_per_row
    block_m = block_m_for(tokens_per_row)
    n_tiles = -(-total // block_m) + min(total, num_adapters)
    device = row_adapter.device
    token_adapter = row_adapter.long()[:, None].expand(rows, tokens_per_row).reshape(total)
    # "__base__" tokens sort after every adapter's (key num_adapters) and get no tile.
    key = torch.where(token_adapter < 0, num_adapters, token_adapter)
    token_order = torch.argsort(key, stable=True).to(torch.int32)
    if num_adapters == 0 or n_tiles == 0:
        tiles = torch.tensor([-1, 0, 0], dtype=torch.int32, device=device).repeat(n_tiles, 1)
        return TokenLayout(token_order, tiles, block_m)
    counts = torch.zeros(num_adapters + 1, dtype=torch.long, device=device)
    counts = counts.scatter_add(0, key, torch.ones_like(key))[:num_adapters]
    ends = counts.cumsum(0)
    starts = ends - counts
    tiles_per_adapter = (counts + block_m - 1) // block_m
    tile_ends = tiles_per_adapter.cumsum(0)
    tile = torch.arange(n_tiles, device=device)
    # Tile t belongs to the first adapter whose tiles end after t; past the last one it is idle.
    adapter = torch.searchsorted(tile_ends, tile, right=True)
    live = adapter < num_adapters
    adapter = adapter.clamp(max=num_adapters - 1)
    start = starts[adapter] + (tile - (tile_ends[adapter] - tiles_per_adapter[adapter])) * block_m
    end = torch.minimum(start + block_m, ends[adapter])
    zero = torch.zeros_like(start)
    tiles = torch.stack(
        (torch.where(live, adapter, -1), torch.where(live, start, zero), torch.where(live, end, zero)), dim=1
    )
    return TokenLayout(token_order, tiles.to(torch.int32), block_m)


class AdapterRowGroups(list):
    """The adapter name of each batch row ("__base__": no adapter), grouped by name.

    It is a `list` of the names, so code that only reads `adapter_names` sees the list it expects; `groups` maps each
    distinct name (in order of first appearance) to its row positions, and `rows(name, device)` gives those positions
    as an index tensor, built once per (name, device). Layers that loop over adapters in Python use it.
    """

    def __init__(self, adapter_names: Iterable[str]) -> None:
        super().__init__(adapter_names)
        self.groups: dict[str, list[int]] = {}
        for position, name in enumerate(self):
            self.groups.setdefault(name, []).append(position)
        self._index_tensors: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def of(cls, adapter_names: Iterable[str]) -> AdapterRowGroups:
        """`adapter_names` itself when it already is an `AdapterRowGroups` (or the groups of a `MixedBatch`), else a
        new one built from it."""
        if isinstance(adapter_names, MixedBatch):
            return adapter_names.groups
        return adapter_names if isinstance(adapter_names, cls) else cls(adapter_names)

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        """Positions of the rows that use adapter `name`, as an int64 tensor on `device`."""
        key = (name, torch.device(device))
        index = self._index_tensors.get(key)
        if index is None:
            index = torch.tensor(self.groups[name], dtype=torch.long, device=device)
            self._index_tensors[key] = index
        return index


class MixedBatch:
    """One call's adapter per batch row, by name and as data (see the module docstring).

    `adapters` fixes the index space: row i uses `adapters[row_adapter[i]]`, or no adapter where the index is -1
    ("__base__", or a name not in `adapters`). `devices` are those the row tensor is made on at once (the devices of
    the model's adapter layers), so that a compiled region only reads it.
    """

    def __init__(
        self, adapter_names: Sequence[str], adapters: Sequence[str], devices: Iterable[torch.device] = ()
    ) -> None:
        self.names = list(adapter_names)
        self.adapters = tuple(adapters)
        self.groups = AdapterRowGroups(self.names)
        index = {name: position for position, name in enumerate(self.adapters)}
        self._row_adapter = [index.get(name, -1) for name in self.names]
        self.used = frozenset(name for name in self.groups.groups if name in index)
        self._rows: dict[torch.device, torch.Tensor] = {}
        self._layouts: dict[tuple[int, torch.device], TokenLayout] = {}
        for device in devices:
            self.row_adapter(device)

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def of(cls, adapter_names: Sequence[str] | MixedBatch, adapters: Sequence[str]) -> MixedBatch:
        """`adapter_names` itself when it is a `MixedBatch`, else one over `adapters`."""
        return adapter_names if isinstance(adapter_names, cls) else cls(adapter_names, adapters)

    def row_adapter(self, device: torch.device) -> torch.Tensor:
        """int32 [rows]: the index in `adapters` of each row's adapter, -1 for none."""
        rows = self._rows.get(device)
        if rows is None:
            rows = torch.tensor(self._row_adapter, dtype=torch.int32, device=device)
            if not torch.compiler.is_compiling():
                self._rows[device] = rows
        return rows

    def rows_of(self, name: str, device: torch.device) -> torch.Tensor:
        """bool [rows]: which rows use adapter `name` (one of `adapters`), as data."""
        return self.row_adapter(device) == self.adapters.index(name)

    def layout(self, tokens_per_row: int, device: torch.device) -> TokenLayout:
        """The token layout for rows of `tokens_per_row` tokens: built once per (tokens_per_row, device) when eager,
        so that prefill and each decode step of one `generate` call share it across layers; traced where compiled."""
        if torch.compiler.is_compiling():
            return token_layout(self.row_adapter(device), tokens_per_row, len(self.adapters))
        key = (tokens_per_row, device)
        layout = self._layouts.get(key)
        if layout is None:
            layout = token_layout(self.row_adapter(device), tokens_per_row, len(self.adapters))
            self._layouts[key] = layout
        return layout


class MixedBatchSource:
    """Where the LoRA layers of one model find the mixed batch of the call in progress (`batch`, None between
    calls). Layers hold a reference to it, so a call sets one attribute instead of registering a hook per layer."""

    def __init__(self) -> None:
        self.batch: MixedBatch | None = None
