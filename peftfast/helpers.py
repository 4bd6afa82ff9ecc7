"""Helpers that user code and integrating libraries (diffusers, ...) import from `peft.helpers`, with HF PEFT
0.21.2's semantics: signatures for `help()`/IDEs, adapter-folder detection, temporary LoRA rescaling, and turning off
the input dtype cast of adapter layers."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from .config import PeftConfig
from .peft_model import PeftModel
from .tuners.lora import LoraLayer, dora
from .tuners.tuners_utils import BaseTunerLayer

__all__ = [
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "rescale_adapter_scale",
    "update_forward_signature",
    "update_generate_signature",
    "update_signature",
]

_SIGNATURE_ATTRIBUTES = ("__doc__", "__name__", "__annotations__")


def _shows_only(method: Callable, *allowed: tuple[str, ...]) -> bool:
    return tuple(inspect.signature(method).parameters) in allowed


def _method_with_signature_of(model: PeftModel, name: str, source: Callable) -> types.MethodType:
    """`type(model).<name>` bound to `model`, on a copy of the function that shows `source`'s signature and doc (the
    class's own function is left alone, so other models keep their signatures)."""
    function = getattr(type(model), name)
    copy = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    functools.update_wrapper(copy, source, assigned=_SIGNATURE_ATTRIBUTES, updated=())
    return types.MethodType(copy, model)


def update_forward_signature(model: PeftModel) -> None:
    """Give `model.forward` the signature and docstring of the base model's class `forward` (for `help()` and
    IDEs), when it shows only `(*args, **kwargs)`; the call itself is unchanged."""
    if _shows_only(model.forward, ("args", "kwargs")):
        model.forward = _method_with_signature_of(model, "forward", type(model.get_base_model()).forward)


def update_generate_signature(model: PeftModel) -> None:
    """Give `model.generate` the signature and docstring of the base model's class `generate`, when it shows only
    `(*args, **kwargs)` or `(**kwargs)`; models without `generate` are left alone."""
    if not hasattr(model, "generate"):
        return
    if _shows_only(model.generate, ("args", "kwargs"), ("kwargs",)):
        model.generate = _method_with_signature_of(model, "generate", type(model.get_base_model()).generate)


def update_signature(model: PeftModel, method: str = "all") -> None:
    """`update_forward_signature` (method "forward"), `update_generate_signature` ("generate") or both ("all")."""
    if method == "forward":
        update_forward_signature(model)
    elif method == "generate":
        update_generate_signature(model)
    elif method == "all":
        update_forward_signature(model)
        update_generate_signature(model)
    else:
        raise ValueError(f"method {method!r} is not supported; choose one of ['forward', 'generate', 'all'].")


def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether `model_name_or_path` (a local folder or a Hub repo id) holds an adapter config that loads."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:
        # Broad on purpose (HF PEFT's rule): any failure, including new kinds of Hub errors, means "not an adapter".
        return False
    return True


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float | int) -> Iterator[None]:
    """Multiply the scaling of every adapter of every LoRA layer in `model` by `multiplier` inside the block, and
    restore the scalings on exit (for LoRA, a multiplier in [0, 1] is WiSE-FT between base and adapted model).

    Raises TypeError for a non-number multiplier and ValueError when `model` has no LoRA layer.
    """
    if not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    original_scaling = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            original_scaling[module] = module.scaling.copy()
            module.scaling = {name: value * multiplier for name, value in module.scaling.items()}
    if not original_scaling:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in original_scaling.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Inside the block, adapter layers don't cast their input to the adapter weights' dtype (for callers, such as
    diffusers' layerwise casting hooks, that manage dtypes themselves); `active=False` makes the block a no-op."""
    if not active:
        yield
        return
    original_values = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            original_values[name] = getattr(module, "cast_input_dtype_enabled", True)
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and name in original_values:
                module.cast_input_dtype_enabled = original_values[name]


class DoraCaching:
    """HF PEFT's switch for caching DoRA weight norms, as a context manager (`with DoraCaching(): ...`) or a call
    (`DoraCaching()(enabled=False)`, lasting until the next call).

    HF PEFT caches only inside this context. peftfast caches by default: an entry is one `[out]` vector per layer,
    and it is used only for the very tensors it was computed from (see `peftfast.tuners.lora.dora`), so results are
    the same either way. `enabled=False` turns the cache off (every forward computes the norms again); inside a
    torch.compile'd forward the norms are always computed again."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.prev_value: bool | None = None

    def __enter__(self) -> None:
        self.prev_value = dora.CACHING
        dora.CACHING = self.enabled

    def __exit__(self, *exc_info: object) -> None:
        dora.CACHING = self.prev_value
        self.prev_value = None

    def __call__(self, enabled: bool = True) -> None:
        dora.CACHING = enabled
