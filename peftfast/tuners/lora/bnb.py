"""LoRA on bitsandbytes layers: `Linear4bit` (NF4/FP4, QLoRA) and `Linear8bitLt`, with HF PEFT's class names.

bitsandbytes stays optional: this module imports it only when a bitsandbytes layer is targeted, merged or
unmerged. The 4-bit forward goes through `peftfast.ops.lora_linear_4bit`, which reads the weight in bitsandbytes'
own storage; a weight bitsandbytes has repacked for CPU inference, or a base layer with hooks, runs the base layer
itself and adds the LoRA term with `peftfast.ops.lora_add`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ... import ops
from ..tuners_utils import BaseTunerLayer
from . import dora
from .layer import Linear, adapter_dtype


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            "This model has bitsandbytes-quantized layers (Linear4bit / Linear8bitLt) but bitsandbytes can't be "
            f"imported ({error}). Install it with `pip install bitsandbytes` (or `pip install peftfast[quant]`)."
        ) from error
    return bitsandbytes


def _is_bitsandbytes_layer(module: nn.Module, class_name: str) -> bool:
    # By name, so that telling whether a layer is a bitsandbytes one never needs bitsandbytes importable.
    return any(cls.__name__ == class_name and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__)


class _QuantizedLinear(Linear):
    """What the bitsandbytes LoRA layers share: the dense `Linear`'s adapters, merged into a weight that has to be
    dequantized, changed and quantized again."""

    _kind = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        # The packed weight has no (in, out) orientation to flip.
        kwargs["fan_in_fan_out"] = False
        super().__init__(base_layer, adapter_name, **kwargs)

    def _dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_weight(self, dense: torch.Tensor) -> None:
        raise NotImplementedError

    def _dora_dense_weight(self) -> torch.Tensor:
        return self._dequantized_weight()

    def _merged_weight(
        self, adapter: str, weight: torch.Tensor, sign: int, dora_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The dense weight with `adapter` merged in (sign 1) or taken out (sign -1); a DoRA adapter needs the norm
        it merges (merged) with."""
        delta = self.get_delta_weight(adapter)
        if dora_norm is not None:
            rescale = dora.merged_weight if sign > 0 else dora.unmerged_weight
            return rescale(self, adapter, weight.to(delta.dtype), delta, dora_norm)
        return weight.to(delta.dtype) + sign * delta

    def _bias_delta(self, adapter: str) -> torch.Tensor | None:
        if not self.lora_bias.get(adapter) or self.lora_B[adapter].bias is None:
            return None
        base_layer = self.get_base_layer()
        if base_layer.bias is None:
            raise RuntimeError(
                f"Can't merge adapter {adapter!r}: it has lora_bias=True but the {type(base_layer).__name__} it "
                "adapts has no bias to merge it into."
            )
        return (self.lora_B[adapter].bias * self.scaling[adapter]).to(base_layer.bias.dtype)

    def _check_safe_merge(self, adapter_names: list[str] | None, layer_name: str) -> None:
        weight = None
        adapters = self._adapters_to_merge(adapter_names, warn=False)
        self._refuse_alora_merge(adapters, safe_merge=True)
        dora_norms = dora.merge_norms(self, adapters)
        for adapter in adapters:
            dense = self._dequantized_weight() if weight is None else weight
            weight = self._merged_weight(adapter, dense, 1, dora_norms.get(adapter))
            if not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter!r} into layer {layer_name!r}; nothing was "
                    "merged. The adapter weights are probably broken."
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize the base weight, add each adapter's delta, quantize it again (HF PEFT's merge into a quantized
        layer: the result is rounded to the quantized format, so outputs change slightly)."""
        base_layer = self.get_base_layer()
        adapters = self._adapters_to_merge(adapter_names)
        self._refuse_alora_merge(adapters, safe_merge)
        dora_norms = dora.merge_norms(self, adapters)
        for adapter in adapters:
            warnings.warn(
                f"Merging a LoRA adapter into a {self._kind} layer re-quantizes its weight: outputs may differ from "
                "the unmerged model's because of rounding.",
                stacklevel=2,
            )
            weight = self._merged_weight(adapter, self._dequantized_weight(), 1, dora_norms.get(adapter))
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter!r} into {type(base_layer).__name__}; "
                    "the weights were left unmerged. The adapter weights are probably broken."
                )
            delta_bias = self._bias_delta(adapter)
            self._set_weight(weight)
            if delta_bias is not None:
                base_layer.bias.data += delta_bias
            if adapter in dora_norms:
                self.dora_cache().merge_norms[adapter] = dora_norms[adapter]
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged deltas again (dequantize, subtract, re-quantize), last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.scaling:
                continue
            warnings.warn(
                f"Unmerging a LoRA adapter from a {self._kind} layer re-quantizes its weight: outputs may differ "
                "from before the merge because of rounding.",
                stacklevel=2,
            )
            delta_bias = self._bias_delta(adapter)
            dora_norm = self.dora_cache().merge_norms.pop(adapter, None)
            self._set_weight(self._merged_weight(adapter, self._dequantized_weight(), -1, dora_norm))
            if delta_bias is not None:
                base_layer.bias.data -= delta_bias


class Linear4bit(_QuantizedLinear):
    """LoRA on a bitsandbytes `Linear4bit`: `y = base4bit(x) + scaling * B(A(dropout(x)))`."""

    _kind = "4-bit"

    def _move_adapter_to_base(self, adapter_name: str, autocast_adapter_dtype: bool, fresh: bool = False) -> None:
        # The packed weight's dtype is its storage's (uint8 or bf16), not a compute dtype: adapters follow the
        # layer's compute_dtype instead (HF PEFT's rule), upcast to fp32 under autocast_adapter_dtype; a fresh
        # adapter is rounded through compute_dtype first, as in the dense layers.
        base_layer = self.get_base_layer()
        compute_dtype = getattr(base_layer, "compute_dtype", None)
        wanted = None if compute_dtype is None else adapter_dtype(compute_dtype, autocast_adapter_dtype)
        device = base_layer.weight.device
        if device.type == "meta":
            return
        rounded = fresh and wanted is not None and wanted != compute_dtype
        for holder in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if adapter_name in holder and all(p.device.type != "meta" for p in holder[adapter_name].parameters()):
                if rounded:
                    holder[adapter_name].to(dtype=compute_dtype)
                holder[adapter_name].to(device=device, dtype=wanted)

    def _quant_state(self) -> Any:
        base_layer = self.get_base_layer()
        quant_state = getattr(base_layer.weight, "quant_state", None)
        # Some wrappers (FSDP) drop the Parameter's attribute; bitsandbytes keeps a copy on the module.
        return quant_state if quant_state is not None else getattr(base_layer, "quant_state", None)

    def _dequantized_weight(self) -> torch.Tensor:
        return ops.nf4_dequantize(self.get_base_layer().weight.data, self._quant_state())

    def _set_weight(self, dense: torch.Tensor) -> None:
        bnb = _bitsandbytes()
        base_layer = self.get_base_layer()
        old = base_layer.weight
        # Quantized anew where the old weight lives, in its format (bitsandbytes quantizes on `.to(device)`).
        base_layer.weight = bnb.nn.Params4bit(
            dense.to("cpu"),
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
            module=getattr(old, "module", None),
        ).to(old.device)
        self.dora_cache().clear()

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        base_layer = self.base_layer
        # bitsandbytes settles the compute dtype on the first forward (fp32/bf16 inputs choose their own dtype):
        # make the same, lasting, choice so the base layer computes in the same dtype when it runs by itself.
        if not getattr(base_layer, "compute_type_is_set", True):
            base_layer.set_compute_type(x)
            base_layer.compute_type_is_set = True
        return base_layer.compute_dtype or x.dtype

    def _reads_weight_directly(self, args: tuple, kwargs: dict) -> bool:
        base_layer = self.base_layer
        if args or kwargs or base_layer._forward_hooks or base_layer._forward_pre_hooks:
            return False
        if not _is_bitsandbytes_layer(base_layer, "Linear4bit") or self._quant_state() is None:
            return False
        return not getattr(self._quant_state(), "packing_format_for_cpu", False)

    def _forward_with_adapters(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        uses_dora = any(name in self.lora_magnitude_vector for name in active)
        if uses_dora or not self._reads_weight_directly(args, kwargs):
            return super()._forward_with_adapters(x, active, *args, **kwargs)
        base_layer = self.base_layer
        result = ops.lora_linear_4bit(
            x,
            base_layer.weight,
            self._quant_state(),
            base_layer.bias,
            self._compute_dtype(x),
            *self._lora_weights(active),
            training=self.training,
        )
        self._record_backend("lora_linear_4bit")
        return result


class Linear8bitLt(_QuantizedLinear):
    """LoRA on a bitsandbytes `Linear8bitLt`: `y = base8bit(x) + scaling * B(A(dropout(x)))` (plain torch)."""

    _kind = "8-bit"

    def _dequantized_weight(self) -> torch.Tensor:
        bnb = _bitsandbytes()
        base_layer = self.get_base_layer()
        weight = base_layer.weight
        # After a forward, bitsandbytes moves the row scales from the weight to the layer's state.
        scales = base_layer.state.SCB if base_layer.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales)

    def _set_weight(self, dense: torch.Tensor) -> None:
        bnb = _bitsandbytes()
        base_layer = self.get_base_layer()
        old = base_layer.weight
        base_layer.weight = bnb.nn.Int8Params(
            dense.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base_layer.state.reset_grads()
        # The state's scales belong to the old weight; the new one carries its own.
        base_layer.state.SCB = None
        self.dora_cache().clear()


def _base_of(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, lora_config: Any, **kwargs: Any) -> nn.Module | None:
    """The LoRA layer for a bitsandbytes `Linear4bit`, or None for any other layer."""
    if not _is_bitsandbytes_layer(_base_of(target), "Linear4bit"):
        return None
    _bitsandbytes()
    return Linear4bit(target, adapter_name, **kwargs)


def dispatch_bnb_8bit(target: nn.Module, adapter_name: str, lora_config: Any, **kwargs: Any) -> nn.Module | None:
    """The LoRA layer for a bitsandbytes `Linear8bitLt`, or None for any other layer."""
    if not _is_bitsandbytes_layer(_base_of(target), "Linear8bitLt"):
        return None
    _bitsandbytes()
    return Linear8bitLt(target, adapter_name, **kwargs)
