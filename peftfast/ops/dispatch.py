"""Backend choice for every op, in one place.

A backend is "torch" (the reference, always present) or a kernel backend ("triton", later "cuda"). The choice is,
in order: a `use_backend(...)` context, `set_backend(...)`, the environment variable PEFTFAST_BACKEND, then "auto".
"auto" takes the first kernel backend that can serve the call when its tensors are on a GPU, and torch otherwise; a
backend chosen by name that cannot serve a call raises instead of falling back in silence. (Under TRITON_INTERPRET=1
the "triton" backend, chosen by name, runs on CPU tensors: that is how CI tests the kernels.)

Host time per call counts (small-batch decode is bound by it), so a resolution is made once per requested backend and
call signature and reused: an op registered with a `signature` (a function of the call's arguments returning what its
backends' `can_serve` predicates look at: devices, dtypes, whether weights train, ...) has its resolutions cached on
(requested backend, signature); the cache is dropped whenever the op's implementations change.
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
# op name -> the function of a call's arguments that decides which backends can serve it (see the module docstring)
_SIGNATURES: dict[str, Callable[..., Any]] = {}
# op name -> (the implementations table the entries were resolved from, {(requested, signature): (name, impl)})
_RESOLVED: dict[str, tuple[dict[str, Any], dict[tuple[str, Any], tuple[str, Callable[..., Any]]]]] = {}
# Distinct signatures kept per op: far more than any model's layers and shapes produce, and a bound on memory.
_MAX_RESOLVED = 4096
_state = threading.local()
_global_backend: str | None = None


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


def register(
    op: str,
    backend: str,
    implementation: Callable[..., Any],
    can_serve: Callable[..., bool] = _always,
    signature: Callable[..., Any] | None = None,
) -> None:
    """Make `implementation` the `backend` version of `op`; `can_serve(*args)` says whether it applies to a call.
    `signature(*args)` (hashable), when given, is everything of a call that `can_serve` of any of the op's backends
    reads: resolutions are then cached on it."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS[1:]}.")
    _IMPLEMENTATIONS.setdefault(op, {})[backend] = (implementation, can_serve)
    if signature is not None:
        _SIGNATURES[op] = signature
    _RESOLVED.pop(op, None)


def _validate(backend: str) -> str:
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"Unknown peftfast backend {backend!r}; expected one of {BACKENDS}.")
    return backend


def set_backend(backend: str | None) -> None:
    """Set the process-wide backend ("auto", "torch", "triton", "cuda"); None returns to the environment/auto."""
    global _global_backend
    _global_backend = None if backend is None else _validate(backend)


# os.environ.get costs ~0.5 us (the key is encoded through the Mapping machinery), paid by every op call; where
# CPython keeps the environment in a plain dict (os.environ._data, updated by every os.environ write, monkeypatch's
# included), the same lookup costs ~20 ns.
_ENVIRON_DATA: dict[Any, Any] | None = getattr(os.environ, "_data", None)
if not hasattr(os.environ, "encodekey"):
    _ENVIRON_DATA = None
_ENCODED_KEYS: dict[str, Any] = {}
_BACKEND_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None else None
_VALIDATED: dict[Any, str] = {}


def environment_is_set(name: str) -> Any:
    """A cheap stand-in for `os.environ.get(name)` where only "unset or empty" versus a value that compares equal
    for equal settings matters: the raw stored value (bytes on POSIX), or None. Read `os.environ[name]` for the text."""
    if _ENVIRON_DATA is None:
        return os.environ.get(name)
    key = _ENCODED_KEYS.get(name)
    if key is None:
        key = _ENCODED_KEYS[name] = os.environ.encodekey(name)
    return _ENVIRON_DATA.get(key)


def _backend_from_environment() -> str:
    raw = _ENVIRON_DATA.get(_BACKEND_KEY) if _ENVIRON_DATA is not None else os.environ.get(ENV_VAR)
    if not raw:
        return "auto"
    backend = _VALIDATED.get(raw)
    if backend is None:
        # Validated once per distinct value; a bad value raises on every call.
        backend = _VALIDATED[raw] = _validate(os.environ[ENV_VAR])
    return backend


def get_backend() -> str:
    """The backend requested now (before per-call fallback): context, then setter, then PEFTFAST_BACKEND, then auto."""
    context = getattr(_state, "stack", None)
    if context:
        return context[-1]
    if _global_backend is not None:
        return _global_backend
    return _backend_from_environment()


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
    if requested == "auto" and not args[0].is_cuda:
        return "torch", implementations["torch"][0]
    signature = _SIGNATURES.get(op)
    if signature is None:
        return resolve_uncached(op, requested, *args, **kwargs)
    entry = _RESOLVED.get(op)
    if entry is None or entry[0] is not implementations or len(entry[1]) >= _MAX_RESOLVED:
        entry = _RESOLVED[op] = (implementations, {})
    key = (requested, signature(*args, **kwargs))
    resolved = entry[1].get(key)
    if resolved is None:
        resolved = entry[1][key] = resolve_uncached(op, requested, *args, **kwargs)
    return resolved


def resolve_uncached(op: str, requested: str, *args: Any, **kwargs: Any) -> tuple[str, Callable[..., Any]]:
    """`resolve` for backend `requested`, asking the backends' predicates (what the cache in `resolve` saves)."""
    implementations = _IMPLEMENTATIONS[op]
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
