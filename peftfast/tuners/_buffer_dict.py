"""`BufferDict`: a dict of tensors registered as buffers of one module (HF PEFT's `peft.tuners._buffer_dict`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


class BufferDict(nn.Module):
    """Buffers indexed like a dict (per-adapter tensors that are not trained: indices, frozen originals, ...).

    Every entry is a registered buffer, so `.to()`, `state_dict()` (when `persistent`) and `named_buffers()` see
    it. Order: insertion order; `update` with an `OrderedDict`, a `BufferDict` or a sequence of pairs keeps theirs,
    with another mapping (a plain dict) adds its keys sorted, as HF PEFT does.

    Args:
        buffers: a mapping or an iterable of (name, tensor) pairs to start with.
        persistent: whether the buffers are part of the module's `state_dict` (default False, as in HF PEFT).
    """

    def __init__(
        self,
        buffers: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
        persistent: bool = False,
    ) -> None:
        super().__init__()
        self.persistent = persistent
        if buffers is not None:
            self.update(buffers)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def clear(self) -> None:
        """Remove every buffer."""
        for key in list(self._buffers):
            del self[key]

    def pop(self, key: str) -> torch.Tensor:
        """Remove buffer `key` and return it."""
        buffer = self[key]
        del self[key]
        return buffer

    def keys(self) -> Iterable[str]:
        return self._buffers.keys()

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._buffers.items()

    def values(self) -> Iterable[torch.Tensor]:
        return self._buffers.values()

    def update(self, buffers: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Add (or overwrite) the entries of a mapping or of an iterable of (name, tensor) pairs."""
        if isinstance(buffers, (OrderedDict, BufferDict)):
            pairs: Iterable[Any] = list(buffers.items())
        elif isinstance(buffers, Mapping):
            pairs = sorted(buffers.items())
        elif isinstance(buffers, Iterable):
            pairs = list(buffers)
        else:
            raise TypeError(
                "BufferDict.update takes a mapping or an iterable of (name, tensor) pairs, got "
                f"{type(buffers).__name__}."
            )
        for index, pair in enumerate(pairs):
            if not isinstance(pair, Iterable) or isinstance(pair, (str, torch.Tensor)):
                raise TypeError(
                    f"BufferDict.update: element #{index} is a {type(pair).__name__}, not a (name, tensor) pair."
                )
            pair = tuple(pair)
            if len(pair) != 2:
                raise ValueError(
                    f"BufferDict.update: element #{index} has length {len(pair)}; a (name, tensor) pair has 2."
                )
            self[pair[0]] = pair[1]

    def extra_repr(self) -> str:
        lines = []
        for key, buffer in self._buffers.items():
            size = "x".join(str(size) for size in buffer.size())
            device = "" if buffer.device.type == "cpu" else f" ({buffer.device.type.upper()} {buffer.get_device()})"
            lines.append(f"  ({key}): Buffer containing: [{torch.typename(buffer)} of size {size}{device}]")
        return "\n".join(lines)

    def __call__(self, input: Any) -> Any:
        raise RuntimeError("BufferDict holds buffers; it can't be called.")
