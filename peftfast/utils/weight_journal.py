"""An undo record of the changes adapter initialisations make to the base model.

PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ rewrite base weights while an adapter is being built, and CorDA/LoRA-GA
consume fields that their preprocessing left on the base layers. If building the adapter fails part-way (a later
layer is refused, the adapter file doesn't fit), `reversible()` puts every rewritten weight back and keeps those
fields, so the model is exactly as it was; on success the fields are removed.

Outside a `reversible()` block the changes are simply made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_journal: ContextVar[list[tuple[str, Callable[[], None]]] | None] = ContextVar("peftfast_weight_journal", default=None)


@contextmanager
def reversible() -> Iterator[None]:
    """Undo the recorded changes if the block raises; otherwise keep them (and, in the outermost block, drop the
    fields marked with `remove_attribute_on_success`). Blocks nest: an inner block that succeeds hands its record
    to the enclosing one, which can still undo it."""
    outer = _journal.get()
    entries: list[tuple[str, Callable[[], None]]] = []
    token = _journal.set(entries)
    try:
        yield
    except BaseException:
        for kind, action in reversed(entries):
            if kind == "undo":
                action()
        raise
    finally:
        _journal.reset(token)
    if outer is not None:
        outer.extend(entries)
        return
    for kind, action in entries:
        if kind == "on_success":
            action()


def replace_data(param: torch.Tensor, new: torch.Tensor) -> None:
    """`param.data = new`, undone by putting the old data (the same storage, not a copy) back."""
    entries = _journal.get()
    if entries is not None:
        old = param.data
        entries.append(("undo", lambda: setattr(param, "data", old)))
    param.data = new


def replace_parameter(module: nn.Module, name: str, assign: Callable[[], None]) -> None:
    """Run `assign()`, which replaces `module.<name>` by a new parameter object; undone by putting the old object
    back (and the module's copy of a bitsandbytes quant_state, which goes with the weight)."""
    entries = _journal.get()
    if entries is not None:
        old = module._parameters[name]
        had_quant_state = "quant_state" in module.__dict__
        old_quant_state = module.__dict__.get("quant_state")

        def undo() -> None:
            module._parameters[name] = old
            if had_quant_state:
                module.__dict__["quant_state"] = old_quant_state
            else:
                module.__dict__.pop("quant_state", None)

        entries.append(("undo", undo))
    assign()


def remove_attribute_on_success(obj: object, name: str) -> None:
    """Delete `obj.<name>` once the outermost `reversible()` block has succeeded (at once outside of one)."""

    def remove() -> None:
        if hasattr(obj, name):
            delattr(obj, name)

    entries = _journal.get()
    if entries is None:
        remove()
    else:
        entries.append(("on_success", remove))
