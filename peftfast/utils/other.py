"""Module-tree helpers and `ModulesToSaveWrapper` (whole modules trained and saved next to the adapter)."""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .mixed_batch import AdapterRowGroups


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name) of the module named `key` in `model`."""
    parent_name, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_name)
    return parent, model.get_submodule(key), target_name


# HF PEFT's name (`peft.utils._get_submodules`), which diffusers imports.
_get_submodules = get_submodules


def infer_device() -> str:
    """The device type to put work on, in HF PEFT's order of preference: "cuda", "mps", "mlu", "xpu", "npu", else
    "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    for device_type in ("mlu", "xpu", "npu"):
        backend = getattr(torch, device_type, None)
        if backend is not None and backend.is_available():
            return device_type
    return "cpu"


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and one trainable copy per adapter; forward runs the active adapter's copy.

    State dict keys: `<name>.original_module.*` and `<name>.modules_to_save.<adapter>.*`; adapter files store the
    copy under the module's own path, `<name>.*`, as HF PEFT does. Buffers are copied and saved too, so a
    BatchNorm's running statistics belong to each adapter.
    """

    # Read by the layer/model status functions, as for adapter layers.
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module_to_save: nn.Module, adapter_name: str, activate_adapter: bool = True) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: str | list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)
        self.set_adapter(adapter_name if activate_adapter else [])

    @property
    def merged_adapters(self) -> list[str]:
        # A whole-module copy is never merged into anything.
        return []

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save.keys())

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_modules"):
                raise
            modules = self.__dict__["_modules"]
            if self.disable_adapters or not self.active_adapters:
                return getattr(modules["original_module"], name)
            return getattr(modules["modules_to_save"][self.active_adapters[0]], name)

    @property
    def weight(self) -> torch.Tensor:
        return self._current_module().weight

    def _current_module(self) -> nn.Module:
        if self.disable_adapters or not self.active_adapters or self.active_adapters[0] not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for `adapter_name` (kept if it exists)."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)
        return self._current_module()(*args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Each row goes through its adapter's copy (the original module for "__base__" or an adapter without one)."""
        if len(x) != len(adapter_names):
            raise ValueError(
                f"Got {len(adapter_names)} adapter_names for a batch of {len(x)} rows; pass one name per row."
            )
        groups = AdapterRowGroups.of(adapter_names)
        result = None
        for name in groups.groups:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            rows = groups.rows(name, x.device)
            output = module(x[rows], *args, **kwargs)
            if result is None:
                result = output.new_empty((len(x), *output.shape[1:]))
            result[rows] = output
        return result

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self._disable_adapters = False
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    self.modules_to_save[name].requires_grad_(True)
        else:
            self._disable_adapters = True
            self.modules_to_save.requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter's copy (only one copy of a module can be active at a time)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = [name for name in names if name in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"Only one adapter's copy of a modules_to_save module can be active, got {present}.")
        self.modules_to_save.requires_grad_(False)
        if not present:
            self._active_adapter = []
            return
        self.modules_to_save[present[0]].requires_grad_(not inference_mode)
        self._active_adapter = present[0]

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the named adapters' copies on or off, whether they are active or not."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, module in self.modules_to_save.items():
            if name in names:
                module.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        if adapter_name not in self.modules_to_save:
            return
        del self.modules_to_save[adapter_name]
        if adapter_name in self.active_adapters:
            self.set_adapter([name for name in (new_active_adapters or []) if name in self.modules_to_save][:1])


def _modules_to_save_matches(key: str, names: list[str]) -> bool:
    return any(key == name or key.endswith(f".{name}") for name in names)


def set_trainable_modules(
    model: nn.Module,
    adapter_name: str,
    module_names: list[str],
    inference_mode: bool = False,
    activate_adapter: bool = True,
) -> None:
    """Wrap every module named in `module_names` (name or name suffix) in a `ModulesToSaveWrapper`, or give an
    existing wrapper a copy for `adapter_name`. A new wrapper uses the copy only if `activate_adapter` (an adapter
    added next to the active one stays inactive: the original module keeps running)."""
    keys = [key for key, _ in model.named_modules()]
    found = False
    for key in keys:
        if re.search(r"(^|\.)(modules_to_save|original_module)(\.|$)", key):
            continue
        if not _modules_to_save_matches(key, module_names):
            continue
        parent, target, target_name = get_submodules(model, key)
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(target.active_adapters, inference_mode=inference_mode)
        else:
            wrapper = ModulesToSaveWrapper(target, adapter_name, activate_adapter=activate_adapter)
            wrapper.set_adapter(wrapper.active_adapters, inference_mode=inference_mode)
            setattr(parent, target_name, wrapper)
        found = True
    if not found:
        raise ValueError(f"modules_to_save {module_names} match no module of the model.")


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of `model` to `dtype` (float16 or bfloat16) and the trainable ones to float32.

    For mixed-precision training: the frozen base model takes half the memory, while the weights being trained (and
    their optimizer updates) stay in full precision. Changes the parameters in place.
    """
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)


@contextmanager
def init_empty_weights() -> Iterator[None]:
    """Inside the block, parameters registered on any module are put on the meta device (they hold no memory and
    are meant to be loaded into with `load_state_dict(..., assign=True)`); buffers are created as usual."""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a quantized transformers model ready for (Q)LoRA training, as HF PEFT does: freeze every parameter, upcast
    the fp16/bf16 ones that are not 4-bit weights to fp32 (unless the model is GPTQ/AQLM/EETQ/HQQ/torchao quantized),
    and, for a model loaded in 8 or 4 bits (or those quantizations), turn on gradient checkpointing with
    `gradient_checkpointing_kwargs`; with reentrant checkpointing (the default) the input embeddings' output is made
    to require grad, so gradients reach the adapters through the checkpointed blocks. `auto_clear_cache` empties
    the CUDA cache after the upcast. Returns the model, changed in place."""
    method = getattr(model, "quantization_method", None)
    other_quantization = method in ("gptq", "aqlm", "eetq", "hqq", "torchao") or getattr(model, "hqq_quantized", False)
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    gradient_checkpointing_kwargs = gradient_checkpointing_kwargs or {}

    for param in model.parameters():
        param.requires_grad = False
    if not other_quantization:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    if (loaded_in_kbit or other_quantization) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:

                def make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        parameters = inspect.signature(model.gradient_checkpointing_enable).parameters
        if "gradient_checkpointing_kwargs" in parameters:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            if gradient_checkpointing_kwargs:
                warnings.warn(
                    "This transformers version's gradient_checkpointing_enable takes no gradient_checkpointing_kwargs; "
                    "they are ignored. Upgrade transformers to use them.",
                    FutureWarning,
                    stacklevel=2,
                )
            model.gradient_checkpointing_enable()
    return model
