"""Per-row adapter selection for mixed-adapter batches (`model(..., adapter_names=[...])`).

The forward hook of `LoraModel` wraps the user's list in an `AdapterRowGroups` once per call and hands that same
object to every adapter layer, so the grouping of rows by adapter (and the index tensors, per device) is computed once
per forward call instead of once per layer. A layer called directly with a plain list builds its own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AdapterRowGroups(list):
    """The adapter name of each batch row ("__base__": no adapter), grouped by name.

    It is a `list` of the names, so code that only reads `adapter_names` sees the list it expects; `groups` maps each
    distinct name (in order of first appearance) to its row positions, and `rows(name, device)` gives those positions
    as an index tensor, built once per (name, device).
    """

    def __init__(self, adapter_names: Iterable[str]) -> None:
        super().__init__(adapter_names)
        self.groups: dict[str, list[int]] = {}
        for position, name in enumerate(self):
            self.groups.setdefault(name, []).append(position)
        self._index_tensors: dict[tuple[str, torch.device], torch.Tensor] = {}

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
