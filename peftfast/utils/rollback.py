"""Undo for operations that change a model's structure (adding, injecting, loading an adapter) and may fail part-way.

`ModuleTreeRollback(*models)` records, for every module in their trees, its attributes (children, parameters, buffers,
the per-adapter dicts and lists of adapter layers, config dicts, flags) as shallow copies, and every parameter's
`requires_grad`. `restore()` puts all of it back: modules and parameters added since are dropped, the ones replaced
are put back, attributes added since are removed, and every container that was there is refilled in place (objects
that hold a reference to it keep seeing the right one). Tensor values are not recorded: an operation validates its
inputs before it writes into existing tensors.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Containers whose contents are copied (and restored in place), rather than only the reference to them.
_CONTAINERS = (dict, list, set)


class ModuleTreeRollback:
    """A record of the state of `models` and every module below them; `restore()` returns them to it."""

    def __init__(self, *models: nn.Module) -> None:
        modules = list({id(module): module for model in models for module in model.modules()}.values())
        self._modules: list[tuple[nn.Module, dict[str, Any], dict[int, Any]]] = []
        for module in modules:
            attributes = dict(vars(module))
            contents = {id(value): value.copy() for value in attributes.values() if isinstance(value, _CONTAINERS)}
            self._modules.append((module, attributes, contents))
        params = {id(param): param for module in modules for param in module.parameters(recurse=False)}
        self._requires_grad = [(param, param.requires_grad) for param in params.values()]

    def restore(self) -> None:
        for module, attributes, contents in self._modules:
            state = vars(module)
            for name in [name for name in state if name not in attributes]:
                del state[name]
            for name, value in attributes.items():
                state[name] = value
                if id(value) in contents:
                    _refill(value, contents[id(value)])
        for param, requires_grad in self._requires_grad:
            param.requires_grad_(requires_grad)


def _refill(container: dict | list | set, contents: Any) -> None:
    container.clear()
    if isinstance(container, list):
        container.extend(contents)
    else:
        container.update(contents)
