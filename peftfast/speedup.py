"""`accelerate` / `deaccelerate`: run the LoRA layers of a model built with HF PEFT on peftfast's ops, in place.

A model whose LoRA layers HF PEFT made (a `peft.PeftModel`, a transformers model with adapters attached through
its PEFT integration, the modules of a diffusers pipeline after `load_lora_weights`) keeps its modules, weights,
adapters and state_dict; only the forward of each LoRA layer peftfast can run exactly is replaced, at the instance,
by one that calls `peftfast.ops.lora_linear` (plain LoRA) or `peftfast.ops.dora_linear` (DoRA) with that layer's own
weights. `deaccelerate` removes the replacement.

peft is never imported here: a model can only hold HF PEFT layers if the user has imported peft already.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

# Instance attribute holding what a taken-over layer needs to be given back: its presence marks the layer.
_STATE_ATTR = "_peftfast_acceleration"


@dataclass
class AccelerationReport:
    """What `accelerate` did: `accelerated` lists the LoRA layers now running on peftfast's ops (module names;
    a pipeline's modules are prefixed with their component name), `skipped` maps every other HF PEFT adapter layer
    to the reason it was left as it was."""

    accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"peftfast runs {len(self.accelerated)} LoRA layer(s); {len(self.skipped)} left to HF PEFT"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _AcceleratedLayer:
    """Per-layer state of a taken-over layer: its original forward (to fall back on and to restore) and the backend
    its latest peftfast forward ran on."""

    original_forward: Any
    last_backend: str | None = None


def _peft_lora_classes() -> tuple[type, type] | None:
    """(peft's BaseTunerLayer, peft's LoRA Linear), or None when peft has not been imported (so no model holds its
    layers)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer, Linear


@functools.cache
def _peft_dora_classes() -> tuple[type, type | None]:
    """(peft's DoRA magnitude module for Linear layers, its DoRA variant class, None in peft versions from before
    LoRA variants). Only called where a layer has DoRA adapters, so peft is imported."""
    from peft.tuners.lora.dora import DoraLinearLayer

    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:
        return DoraLinearLayer, None
    return DoraLinearLayer, DoraLinearVariant


def _module_roots(model: Any) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) of everything in `model` that can hold layers: the model itself, or each torch module
    among a pipeline's `components` (diffusers)."""
    if isinstance(model, nn.Module):
        return [("", model)]
    components = getattr(model, "components", None)
    if isinstance(components, dict):
        return [(f"{name}.", module) for name, module in components.items() if isinstance(module, nn.Module)]
    raise TypeError(
        f"accelerate takes a torch module (a peft PeftModel, a transformers model) or a pipeline with `components` "
        f"(diffusers); got a {type(model).__name__}."
    )


def _named_layers(model: Any) -> Iterator[tuple[str, nn.Module]]:
    for prefix, root in _module_roots(model):
        for name, module in root.named_modules():
            yield prefix + name, module


def _refusal(layer: nn.Module, lora_linear_cls: type) -> str | None:
    """Why peftfast can't run this HF PEFT layer's forward exactly (None if it can)."""
    if type(layer) is not lora_linear_cls:
        return f"{type(layer).__module__}.{type(layer).__name__} is not HF PEFT's plain LoRA Linear layer"
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return f"its base layer is a {type(base).__module__}.{type(base).__name__}, not a torch.nn.Linear"
    if base._forward_hooks or base._forward_pre_hooks:
        return "its base layer has forward hooks"
    if "forward" in layer.__dict__:
        return "its forward is already replaced on the instance (e.g. by an accelerate hook)"
    return _adapter_refusal(layer)


def _is_dora(layer: nn.Module, name: str) -> bool:
    return bool(getattr(layer, "use_dora", {}).get(name, False))


def _adapter_refusal(layer: nn.Module) -> str | None:
    """Why the adapters of a LoRA Linear layer can't run on peftfast's ops (None if they can). Checked at `accelerate`
    and again on every forward, since adapters can be added or changed afterwards."""
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)"
    variants = getattr(layer, "lora_variant", {})
    for name in layer.lora_A:
        variant = variants.get(name)
        if _is_dora(layer, name):
            reason = _dora_refusal(layer, name, variant)
            if reason is not None:
                return reason
        elif variant is not None:
            return (
                f"adapter {name!r} is a LoRA variant ({type(variant).__name__}); peftfast.accelerate takes over plain "
                "LoRA and DoRA adapters only"
            )
        dropout = layer.lora_dropout[name]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return f"adapter {name!r} has a dropout module of type {type(dropout).__name__}"
    return None


def _dora_refusal(layer: nn.Module, name: str, variant: Any) -> str | None:
    """Why a DoRA adapter's forward can't run on `ops.dora_linear` / `ops.dora_scale` exactly (None if it can)."""
    magnitude_cls, variant_cls = _peft_dora_classes()
    if variant is not None and type(variant) is not variant_cls:
        return f"adapter {name!r} is a DoRA adapter of a variant class unknown to peftfast ({type(variant).__name__})"
    magnitude = layer.lora_magnitude_vector[name]
    if type(magnitude) is not magnitude_cls:
        return f"adapter {name!r} has a DoRA magnitude module of type {type(magnitude).__name__}, unknown to peftfast"
    if layer.fan_in_fan_out:
        # HF PEFT's DoRA then takes its norms of the transposed weight of an nn.Linear (or fails on its shape).
        return f"adapter {name!r} is a DoRA adapter and the layer has fan_in_fan_out=True"
    if layer.lora_B[name].bias is not None:
        return f"adapter {name!r} is a DoRA adapter with a lora_B bias"
    return None


def _lora_terms(layer: nn.Module, names: list[str]) -> tuple[list, list, list, list, list]:
    """(A weights, B weights, B biases, scalings, dropout rates) of the named adapters, as the ops take them."""
    lora_A, lora_B, biases, scalings, rates = [], [], [], [], []
    for name in names:
        lora_A.append(layer.lora_A[name].weight)
        lora_B.append(layer.lora_B[name].weight)
        biases.append(layer.lora_B[name].bias)
        scalings.append(layer.scaling[name])
        rates.append(getattr(layer.lora_dropout[name], "p", 0.0))
    return lora_A, lora_B, biases, scalings, rates


def _dora_norm(layer: nn.Module, name: str) -> torch.Tensor:
    """||W_j + s (B A)_j|| of a DoRA adapter, fp32 [out], computed afresh on every call: HF PEFT's merge and user code
    write the base weight through `.data`, which no version counter sees, so no cache of it could be trusted here."""
    weight = layer.base_layer.weight
    return ops.dora_weight_norm(weight, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])[0]


def _dora_update(layer: nn.Module, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """HF PEFT's DoRA update of `result` (the output so far) by adapter `name`: g = m / norm rescales the bias-free
    part; under dropout in training the base product is taken again on the dropped-out input."""
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
    magnitude = layer.lora_magnitude_vector[name].weight
    norm = _dora_norm(layer, name)
    base = layer.base_layer
    x = x.to(lora_A.weight.dtype)
    if layer.training and not isinstance(dropout, nn.Identity):
        dropped = dropout(x)
        base_dropped = F.linear(dropped, base.weight.to(dropped.dtype))
        return ops.dora_scale(result, lora_B(lora_A(dropped)) * scaling, magnitude, norm, base_dropped=base_dropped)
    return ops.dora_scale(result, lora_B(lora_A(x)) * scaling, magnitude, norm, base.bias)


def _forward_with_dora(layer: nn.Module, x: torch.Tensor, active: list[str]) -> tuple[torch.Tensor, str]:
    """The output of a layer whose active adapters include a DoRA one, and the op that ran: `ops.dora_linear` (the
    rescaling fused into the base GEMM) for one DoRA adapter; for several active adapters HF PEFT's order, the base
    output then each adapter's update of it in turn, kept in the promoted dtype until the end as HF PEFT keeps it."""
    base = layer.base_layer
    if len(active) == 1:
        name = active[0]
        dropout = layer.lora_dropout[name]
        result = ops.dora_linear(
            x,
            base.weight,
            base.bias,
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            layer.lora_magnitude_vector[name].weight,
            _dora_norm(layer, name),
            layer.scaling[name],
            getattr(dropout, "p", 0.0),
            layer.training,
        )
        return result, "dora_linear"
    result = F.linear(x, base.weight, base.bias)
    result_dtype = result.dtype
    result = result.to(torch.promote_types(result_dtype, layer.lora_A[active[0]].weight.dtype))
    for name in active:
        if _is_dora(layer, name):
            result = _dora_update(layer, result, x, name)
        else:
            result = ops.lora_add(result, x, *_lora_terms(layer, [name]), training=layer.training)
    return result.to(result_dtype), "dora_scale"


def _accelerated_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """HF PEFT's LoRA Linear forward computed by `ops.lora_linear` (DoRA adapters: `ops.dora_linear`, or
    `ops.dora_scale` over several adapters); anything else (disabled or merged adapters, mixed-adapter batches, extra
    arguments, a changed adapter) runs the layer's own forward."""
    state: _AcceleratedLayer = self.__dict__[_STATE_ATTR]
    active = [name for name in self.active_adapters if name in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or not active or _adapter_refusal(self) is not None:
        state.last_backend = None
        return state.original_forward(x, *args, **kwargs)
    if any(_is_dora(self, name) for name in active):
        result, op = _forward_with_dora(self, x, active)
        state.last_backend = ops.last_backend(op)
        return result
    base = self.base_layer
    terms = _lora_terms(self, active)
    result = ops.lora_linear(x, base.weight, base.bias, *terms, training=self.training)
    state.last_backend = ops.last_backend("lora_linear")
    return result


def accelerate(model: Any) -> AccelerationReport:
    """Run the LoRA layers HF PEFT made in `model` on peftfast's ops (backend chosen as for any op: see
    `peftfast.ops`), in place and reversibly (`deaccelerate`).

    `model` is a torch module (a `peft.PeftModel`, a transformers model with PEFT adapters, any module holding
    HF PEFT layers) or a pipeline whose `components` hold such modules (diffusers). Taken over: HF PEFT's LoRA
    `Linear` layers on a plain `torch.nn.Linear` whose adapters are plain LoRA (dropout, rsLoRA, `lora_bias`,
    several active adapters included) or DoRA (`use_dora=True`, its norms computed without materialising
    W + s B A). Their outputs and gradients are those of HF PEFT's forward up to float rounding; modules, parameters
    and state_dict keys do not change. Any other HF PEFT adapter layer (embeddings, convolutions, quantized bases,
    LoRA variants other than DoRA, other methods) is left as it was and reported in `skipped`. Layers taken over
    already stay so and are listed again. peftfast's own layers are not touched.
    """
    report = AccelerationReport()
    classes = _peft_lora_classes()
    if classes is None:
        _module_roots(model)
        return report
    base_tuner_layer, lora_linear_cls = classes
    for name, module in _named_layers(model):
        if not isinstance(module, base_tuner_layer):
            continue
        if _STATE_ATTR in module.__dict__:
            report.accelerated.append(name)
            continue
        reason = _refusal(module, lora_linear_cls)
        if reason is not None:
            report.skipped[name] = reason
            continue
        module.__dict__[_STATE_ATTR] = _AcceleratedLayer(original_forward=module.forward)
        # An instance attribute shadows the class's forward for this module only; nn.Module.__call__ looks it up.
        module.__dict__["forward"] = types.MethodType(_accelerated_forward, module)
        report.accelerated.append(name)
    return report


def deaccelerate(model: Any) -> list[str]:
    """Give every layer of `model` that `accelerate` took over its own forward back; returns their names."""
    restored = []
    for name, module in _named_layers(model):
        if module.__dict__.pop(_STATE_ATTR, None) is not None:
            del module.__dict__["forward"]
            restored.append(name)
    return restored


def accelerated_backends(model: Any) -> dict[str, str | None]:
    """The backend ("torch", "triton", ...) each taken-over layer's latest forward ran on; None for a layer that has
    not run since it was taken over, or whose latest forward fell back to HF PEFT's own."""
    return {
        name: module.__dict__[_STATE_ATTR].last_backend
        for name, module in _named_layers(model)
        if _STATE_ATTR in module.__dict__
    }


@contextmanager
def accelerated(model: Any) -> Iterator[AccelerationReport]:
    """`accelerate(model)` for the duration of the block; on exit the layers it took over are given back (layers
    that were taken over before the block stay so)."""
    before = {name for name, module in _named_layers(model) if _STATE_ATTR in module.__dict__}
    report = accelerate(model)
    try:
        yield report
    finally:
        for name, module in _named_layers(model):
            if name not in before and module.__dict__.pop(_STATE_ATTR, None) is not None:
                del module.__dict__["forward"]
