"""How a model takes its key/value cache, found from the model itself.

transformers 5.24 renamed the cache argument of decoder forwards (and the key `prepare_inputs_for_generation`
returns) from `past_key_values` to `cache`. Everything in peftfast that hands a cache to a model or reads one goes
through here and looks at the model's signature or the keyword arguments at hand, never at a version number, so both
spellings work side by side (a custom model may use either on any transformers release).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

# The newest spelling first: a model whose forward takes both gets the one transformers uses now.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=256)
def _cache_parameter(function: Callable[..., Any]) -> str | None:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARGUMENT_NAMES if name in parameters), None)


def cache_argument(model: Any) -> str | None:
    """The keyword `model.forward` takes its cache by ("cache" or "past_key_values"), or None if it takes neither."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return None
    # The bound method is a new object on every access; its function is stable, so the signature is read once.
    return _cache_parameter(getattr(forward, "__func__", forward))


def cache_key(kwargs: Mapping[str, Any], model: Any) -> str:
    """The key under which `kwargs` (a forward's or `prepare_inputs_for_generation`'s) holds the cache: the one
    already there, else the model's own spelling, else the newest."""
    present = next((name for name in CACHE_ARGUMENT_NAMES if name in kwargs), None)
    return present or cache_argument(model) or CACHE_ARGUMENT_NAMES[0]


def get_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache in `kwargs` under either spelling, or None."""
    for name in CACHE_ARGUMENT_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None
