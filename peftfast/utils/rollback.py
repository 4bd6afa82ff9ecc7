"""Undo for operations that change a model's structure (adding, injecting, loading an adapter) and may fail part-way.

`ModuleTreeRollback(*models)` records, for every module in their trees, its attributes (children, parameters, buffers,
the per-adapter dicts and lists of adapter layers, config dicts, flags) as shallow copies, and every parameter's
`requires_grad`. `restore()` puts all of it back: modules and parameters added since are dropped, the ones replaced
are put back, attributes added since are removed, and every container that was there is refilled in place (objects
that hold a reference to it keep seeing the right one). Tensor values are not recorded: an operation validates its
inputs before it writes into existing tensors.

`with ModuleTreeRollback.guarding(*models):` restores them if the block raises; records made inside the block for the
same trees (an operation calling another that records for itself) are skipped, since the outer one restores it all.

The modules inside the adapters' entries of adapter layers (`lora_A[name]`'s Linear, ...) are not walked: the
operations recorded add or replace whole entries (which the containers' copies restore) and leave the insides of the
other adapters' entries alone, and skipping them keeps the record's cost flat in the number of adapters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .other import modules_outside_adapters

# Containers whose contents are copied (and restored in place), rather than only the reference to them.
_CONTAINERS = (dict, list, set)
# Per thread: ids of the modules that an enclosing `guarding` block has recorded.
_guarded = threading.local()


class ModuleTreeRollback:
    """A record of the state of `models` and every module below them; `restore()` returns them to it."""

    def __init__(self, *models: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, dict[str, Any], dict[int, Any]]] = []
        self._empty_containers: list[dict | list | set] = []
        self._requires_grad: list = []
        guarded = getattr(_guarded, "ids", None)
        if guarded is not None and all(id(model) in guarded for model in models):
            # An enclosing `guarding` block restores these trees (a superset of what this record would restore).
            return
        walked = (module for model in models for module in modules_outside_adapters(model))
        modules = list({id(module): module for module in walked}.values())
        empty = self._empty_containers
        for module in modules:
            attributes = vars(module).copy()
            contents = {}
            for value in attributes.values():
                if isinstance(value, _CONTAINERS):
                    # Most of a module's containers (its hook dicts) are empty: those are emptied again on restore,
                    # not copied (half the cost of the record).
                    if value:
                        contents[id(value)] = value.copy()
                    else:
                        empty.append(value)
            self._modules.append((module, attributes, contents))
        # A module's own parameters, read directly (module.parameters() costs microseconds per call).
        params = {id(p): p for module in modules for p in module._parameters.values() if p is not None}
        self._requires_grad = [(param, param.requires_grad) for param in params.values()]

    @classmethod
    @contextmanager
    def guarding(cls, *models: nn.Module) -> Iterator[ModuleTreeRollback]:
        """Record `models`; if the block raises an Exception, restore them and re-raise."""
        rollback = cls(*models)
        previous = getattr(_guarded, "ids", None)
        _guarded.ids = (previous or set()) | {id(module) for module, _, _ in rollback._modules}
        try:
            yield rollback
        except Exception:
            rollback.restore()
            raise
        finally:
            _guarded.ids = previous

    def restore(self) -> None:
        for module, attributes, contents in self._modules:
            state = vars(module)
            for name in [name for name in state if name not in attributes]:
                del state[name]
            for name, value in attributes.items():
                state[name] = value
                if id(value) in contents:
                    _refill(value, contents[id(value)])
        for container in self._empty_containers:
            container.clear()
        for param, requires_grad in self._requires_grad:
            param.requires_grad_(requires_grad)


def _refill(container: dict | list | set, contents: Any) -> None:
    container.clear()
    if isinstance(container, list):
        container.extend(contents)
    else:
        container.update(contents)
