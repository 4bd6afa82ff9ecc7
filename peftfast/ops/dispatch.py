"""Backend choice for every op, in one place.

A backend is "torch" (the reference, always present) or a kernel backend ("triton", later "cuda"). The choice is,
in order: a `use_backend(...)` context, `set_backend(...)`, the environment variable PEFTFAST_BACKEND, then "auto".
"auto" takes the first kernel backend that can serve the call when its tensors are on a GPU, and torch otherwise; a
backend chosen by name that cannot serve a call raises instead of falling back in silence. (Under TRITON_INTERPRET=1
the "triton" backend, chosen by name, runs on CPU tensors: that is how CI tests the kernels.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "PEFTFAST_BACKEND"

# op name -> backend name -> (implementation, predicate telling whether it can serve these arguments)
_IMPLEMENTATIONS: dict[str, dict[str, tuple[Callable[..., Any], Callable[..., bool]]]] = {}
_state = threading.local()
_global_backend: str | None = None


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


def register(
    op: str, backend: str, implementation: Callable[..., Any], can_serve: Callable[..., bool] = _always
) -> None:
    """Make `implementation` the `backend` version of `op`; `can_serve(*args)` says whether it applies to a call."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS[1:]}.")
    _IMPLEMENTATIONS.setdefault(op, {})[backend] = (implementation, can_serve)


def _validate(backend: str) -> str:
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"Unknown peftfast backend {backend!r}; expected one of {BACKENDS}.")
    return backend


def set_backend(backend: str | None) -> None:
    """Set the process-wide backend ("auto", "torch", "triton", "cuda"); None returns to the environment/auto."""
    global _global_backend
    _global_backend = None if backend is None else _validate(backend)


def get_backend() -> str:
    """The backend requested now (before per-call fallback): context, then setter, then PEFTFAST_BACKEND, then auto."""
    context = getattr(_state, "stack", None)
    if context:
        return context[-1]
    if _global_backend is not None:
        return _global_backend
    from_env = os.environ.get(ENV_VAR)
    return _validate(from_env) if from_env else "auto"


@contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the ops inside the block on `backend` (thread-local)."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(_validate(backend))
    try:
        yield
    finally:
        stack.pop()


def available_backends(op: str) -> list[str]:
    return list(_IMPLEMENTATIONS.get(op, {}))


def resolve(op: str, *args: Any, **kwargs: Any) -> tuple[str, Callable[..., Any]]:
    """The backend name and implementation that run `op` on these arguments (the first is the op's main input
    tensor, whose device decides "auto")."""
    implementations = _IMPLEMENTATIONS[op]
    requested = get_backend()
    if requested == "auto":
        if not args[0].is_cuda:
            return "torch", implementations["torch"][0]
        for name in ("cuda", "triton"):
            entry = implementations.get(name)
            if entry is not None and entry[1](*args, **kwargs):
                return name, entry[0]
        return "torch", implementations["torch"][0]
    entry = implementations.get(requested)
    if entry is None:
        raise RuntimeError(
            f"peftfast backend {requested!r} was requested but has no implementation of {op!r} "
            f"(available: {available_backends(op)}). Use backend 'auto' or 'torch', or unset {ENV_VAR}."
        )
    if not entry[1](*args, **kwargs):
        raise RuntimeError(
            f"peftfast backend {requested!r} cannot run {op!r} on these inputs (device, dtype or shape); "
            "use backend 'auto' to fall back to torch."
        )
    return requested, entry[0]
