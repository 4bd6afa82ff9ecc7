"""Adapter names, checked in one place: what a new name may be, and how names given to an API call are read.

A name is a key of the layers' `ModuleDict`s, part of every state_dict key and, for any adapter but "default", the
name of the folder `save_pretrained` writes it to. So it is held to what is safe in all three: no path separator,
no ".", not empty, and not the name mixed-adapter batches use for "no adapter".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Mixed-adapter batches (`adapter_names=[...]`) name the base model alone with this, as HF PEFT does.
BASE_ADAPTER_NAME = "__base__"

ADAPTER_NAME_RULE = (
    "an adapter name is 1 to 255 ASCII letters, digits, '_' or '-' (it becomes a folder name when saved), "
    f"and not {BASE_ADAPTER_NAME!r}"
)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")


def check_adapter_name(name: object, argument: str = "adapter_name") -> str:
    """Return `name` if it may name a new adapter; TypeError for a non-string, ValueError for a bad string."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {type(name).__name__} {name!r}; {ADAPTER_NAME_RULE}.")
    if name == BASE_ADAPTER_NAME:
        raise ValueError(
            f"{argument}={name!r} is reserved: mixed-adapter batches use it for rows that run the base model "
            f"alone; {ADAPTER_NAME_RULE}."
        )
    if not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"Invalid {argument} {name!r}: {ADAPTER_NAME_RULE}.")
    return name


def adapter_name_list(names: object, argument: str = "adapter_names") -> list[str]:
    """`names` (one name, or a list or tuple of names) as a list; TypeError for anything else."""
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names):
        return list(names)
    raise TypeError(f"{argument} must be an adapter name or a list of adapter names, got {names!r}.")


def check_known_adapters(names: Iterable[str], available: Iterable[str], argument: str = "adapter_names") -> None:
    """ValueError naming every one of `names` that is not in `available`."""
    available = list(available)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"{argument}: adapter(s) {unknown} not found; available adapters: {available}.")
