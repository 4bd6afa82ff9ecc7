"""LoRA layers: `Linear` (also transformers' Conv1D), `Embedding`, `Conv1d/2d/3d`.

Attribute and state_dict names are HF PEFT's (`lora_A.<adapter>.weight`, `lora_embedding_A.<adapter>`, ...), so
adapter files are interchangeable. The LoRA arithmetic of linear layers goes through `peftfast.ops`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from ... import ops
from ...utils.constants import UPCAST_DTYPES
from ...utils.mixed_batch import AdapterRowGroups, MixedBatch, MixedBatchSource
from ...utils.other import embedding_options
from ..tuners_utils import BaseTunerLayer, set_entry_requires_grad
from . import dora
from . import init as lora_init
from .alora import AloraOffsets, AloraOffsetsSource, token_mask_for
from .bank import LoraAdapterBank

# Base-layer dtypes whose adapters `autocast_adapter_dtype` keeps in float32 (HF PEFT's rule).
_UPCAST_TO_FP32 = frozenset(
    {torch.float16, torch.bfloat16} | {getattr(torch, name) for name in UPCAST_DTYPES if hasattr(torch, name)}
)


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The dtype of the adapter weights of a layer computing in `base_dtype`: float32 under `autocast_adapter_dtype`
    when `base_dtype` is float16, bfloat16 or a float8 type, else `base_dtype`."""
    return torch.float32 if autocast_adapter_dtype and base_dtype in _UPCAST_TO_FP32 else base_dtype


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _features(base_layer: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    if isinstance(base_layer, nn.modules.conv._ConvNd):
        return base_layer.in_channels, base_layer.out_channels
    if type(base_layer).__name__ == "Conv1D":
        # transformers' Conv1D stores its weight as (in_features, out_features).
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
        return base_layer.in_features, base_layer.out_features
    # Another layer type (an LSTM, ...) has a user's LoRA layer (LoraConfig._register_custom_module), which knows
    # its sizes itself.
    return None, None


class LoraLayer(BaseTunerLayer):
    """Per-adapter LoRA state of one layer: ranks, alphas, scalings, dropouts, the A/B weights and, for DoRA adapters,
    the magnitude vectors (`lora_magnitude_vector`, see `peftfast.tuners.lora.dora`)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "lora_dropout",
        "use_rslora",
        "lora_bias",
        "use_alora",
        "use_dora",
    )

    def __init__(self, base_layer: nn.Module, ephemeral_gpu_offload: bool = False, **kwargs: Any) -> None:
        children = {
            "base_layer": base_layer,
            "lora_dropout": nn.ModuleDict(),
            "lora_A": nn.ModuleDict(),
            "lora_B": nn.ModuleDict(),
            "lora_embedding_A": nn.ParameterDict(),
            "lora_embedding_B": nn.ParameterDict(),
            "lora_magnitude_vector": nn.ModuleDict(),
        }
        in_features, out_features = _features(base_layer)
        plain = {
            "r": {},
            "lora_alpha": {},
            "scaling": {},
            "use_rslora": {},
            "lora_bias": {},
            # aLoRA adapters (alora_invocation_tokens set): they act only where the call's aLoRA offsets say.
            "use_alora": {},
            "use_dora": {},
            # HF PEFT's runtime option: compute DoRA's initial norms on a GPU while the adapter weights are on the CPU.
            "ephemeral_gpu_offload": ephemeral_gpu_offload,
            "_disable_adapters": False,
            "merged_adapters": [],
            # False inside `peftfast.helpers.disable_input_dtype_casting`: the LoRA branch then takes x in its own
            # dtype.
            "cast_input_dtype_enabled": True,
            # Backend ("torch", "triton", ...) the latest forward of this layer's LoRA term ran on; None before any.
            "last_backend": None,
            "kwargs": kwargs,
            "in_features": in_features,
            "out_features": out_features,
        }
        set_new_attributes(self, children, plain)

    def dora_cache(self) -> dora.DoraCache:
        """The weight norms this layer's DoRA adapters reuse (created on first use, not saved)."""
        cache = self.__dict__.get("_dora_cache")
        if cache is None:
            cache = self.__dict__["_dora_cache"] = dora.DoraCache()
        return cache

    def _set_dora(self, adapter_name: str, use_dora: bool, module: dora.DoraLinearLayer | None) -> None:
        """Give `adapter_name` its DoRA magnitude `module` (initialised to the weight norms), or drop a stale one
        (`module` is None where `use_dora` is False: a plain LoRA adapter doesn't pay for building one)."""
        self.use_dora[adapter_name] = use_dora
        self.dora_cache().clear()
        if use_dora:
            dora.add_magnitude(self, adapter_name, module)
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]

    def _dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The A [r, d_in] and B [d_out, r] whose product DoRA's norm is taken of."""
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight

    def _dora_weight_norm_terms(
        self, adapter: str, weight_sq: torch.Tensor | None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms, ||W_j||^2) of `adapter`, fp32 [out], computed on `device` when one is given (see
        `ops.dora_weight_norm`); `weight_sq` is ||W_j||^2 when already known."""
        raise NotImplementedError

    def _dora_weight_norm(self, adapter: str) -> torch.Tensor:
        return self.dora_cache().weight_norm(self, adapter)

    def _record_backend(self, op: str) -> None:
        # Plain attribute write: nn.Module.__setattr__ costs microseconds on every forward. Not while torch.compile
        # traces: `ops.last_backend` isn't recorded there (see `ops._record`).
        if not torch.compiler.is_compiling():
            self.__dict__["last_backend"] = ops.last_backend(op)

    def _check_rank(self, r: int) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r}.")

    def _set_scaling(self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r

    def _set_dropout(self, adapter_name: str, lora_dropout: float) -> None:
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()

    def _set_hyperparameters(
        self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool, lora_dropout: float
    ) -> None:
        """The first step of every `update_layer`: check the rank, then record scaling and dropout."""
        self._check_rank(r)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self._set_dropout(adapter_name, lora_dropout)

    def reset_lora_parameters(
        self,
        adapter_name: str,
        init_lora_weights: bool | str,
        loftq_config: dict | None = None,
        lora_ga_config: Any = None,
    ) -> None:
        """HF PEFT's initialisations: True = A kaiming-uniform, B zero (embeddings: A zero, B normal);
        "gaussian" = A ~ N(0, 1/r); False = leave both random (the adapter changes the output at once); the other
        strings ("pissa", "olora", "loftq", ...) are in `peftfast.tuners.lora.init`, LoftQ and LoRA-GA with their
        sub-configs."""
        if init_lora_weights is False:
            return
        if isinstance(init_lora_weights, str) and init_lora_weights.lower() != "gaussian":
            lora_init.initialise(
                self, adapter_name, init_lora_weights, loftq_config=loftq_config, lora_ga_config=lora_ga_config
            )
            return
        if adapter_name in self.lora_A:
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / self.r[adapter_name])
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if self.lora_bias[adapter_name]:
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _adapter_reference_weight(self) -> torch.Tensor | None:
        """The base weight whose device and dtype the adapter weights follow."""
        for weight_name in ("weight", "qweight", "in_proj_weight"):
            base_weight = getattr(self.get_base_layer(), weight_name, None)
            if base_weight is not None:
                return base_weight
        return None

    def _move_adapter_to_base(self, adapter_name: str, autocast_adapter_dtype: bool, fresh: bool = False) -> None:
        """Put an adapter on the base weight's device and dtype, except that under `autocast_adapter_dtype` an
        fp16/bf16 base gets fp32 adapter weights (HF PEFT's default, for stable training). Adapter weights still on
        the meta device (`low_cpu_mem_usage`, not loaded yet) are left there.

        `fresh`: the adapter was just initialised. HF PEFT casts a new adapter to the base dtype and upcasts it
        later, so its fp32 weights hold base-dtype values; rounding the same way gives the same adapter for the same
        seed. Loaded weights are kept as saved."""
        base_weight = self._adapter_reference_weight()
        if base_weight is None or base_weight.device.type == "meta":
            return
        device, dtype = base_weight.device, base_weight.dtype
        if dtype.is_floating_point or dtype.is_complex:
            wanted = adapter_dtype(dtype, autocast_adapter_dtype)
        else:
            wanted = None
        rounded = fresh and wanted is not None and wanted != dtype
        for holder in self._adapter_holders():
            if adapter_name not in holder:
                continue
            item = holder[adapter_name]
            params, buffers = _tensors_of(item)
            in_place = _in_place(params, device, wanted) and _in_place(buffers, device, wanted)
            if _on_meta(params) or (in_place and not rounded):
                # Not loaded yet, or already in place (a second pass, e.g. the PeftModel's after the tuner's, or a
                # reload).
                continue
            if isinstance(item, nn.Parameter):
                # A ParameterDict wraps a plain tensor in a new, trainable Parameter: keep requires_grad as it was.
                value = item.detach().to(dtype=dtype) if rounded else item.detach()
                holder[adapter_name] = nn.Parameter(value.to(device=device, dtype=wanted), item.requires_grad)
            else:
                if rounded:
                    item.to(dtype=dtype)
                item.to(device=device, dtype=wanted)

    def _activate_added_adapter(self, adapter_name: str) -> None:
        """After `update_layer` added `adapter_name`: its weights train if it is active on this layer. The other
        adapters are left alone (HF PEFT re-applies `set_adapter` to all of them, which its tuner then undoes), so
        adding an adapter costs the same however many the layer holds."""
        trainable = adapter_name in self.active_adapters
        for holder in self._adapter_holders():
            if adapter_name in holder:
                set_entry_requires_grad(holder[adapter_name], trainable)

    def _initial_scaling(self, adapter: str) -> float:
        rank = math.sqrt(self.r[adapter]) if self.use_rslora.get(adapter, False) else self.r[adapter]
        return self.lora_alpha[adapter] / rank

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set an adapter's scaling to `scale` times its configured one (`lora_alpha / r`, or `/ sqrt(r)` with
        rsLoRA)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by `scale`."""
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the scaling of every active adapter by `scale`; with None, restore the configured scaling."""
        for adapter in self.active_adapters:
            if adapter not in self.scaling:
                continue
            if scale is None:
                self.scaling[adapter] = self._initial_scaling(adapter)
            else:
                self.scaling[adapter] /= scale

    def _present_active_adapters(self) -> list[str]:
        # Per call of every forward: the dicts are read directly (nn.Module attribute lookups cost ~0.5 us each).
        modules = self._modules
        lora_A = modules["lora_A"]._modules
        holders = lora_A if lora_A else modules["lora_embedding_A"]
        active = self._active_adapter
        if isinstance(active, str):
            return [active] if active in holders else []
        return [name for name in active if name in holders]

    # Set by `LoraModel` on the layers it manages: the mixed batch of the call in progress is read from there.
    _mixed_batch_source: MixedBatchSource | None = None
    # Where a layer with an aLoRA adapter finds the call's aLoRA offsets (unless passed), see `alora.install_offsets`.
    _alora_source: AloraOffsetsSource | None = None

    def _take_mixed_batch(self, x: torch.Tensor, kwargs: dict[str, Any]) -> MixedBatch | list[str] | None:
        """The call's per-row adapters (popped from `kwargs`, else from the model's mixed-batch source), checked
        against the batch; None when the call is not a mixed batch."""
        adapter_names = kwargs.pop("adapter_names", None) if kwargs else None
        if adapter_names is None:
            source = self._mixed_batch_source
            adapter_names = None if source is None else source.batch
            if adapter_names is None:
                return None
        if x.shape[0] != len(adapter_names):
            raise ValueError(
                f"Got {len(adapter_names)} adapter_names for a batch of {x.shape[0]} rows; pass one name per row."
            )
        if self.merged:
            raise ValueError("Mixed-adapter batches (adapter_names=...) can't run with merged adapters; unmerge first.")
        return adapter_names

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    # Merging: W += delta for each adapter, tracked in merged_adapters so unmerge can undo it.
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def _adapters_to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got the string {adapter_names!r}.")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if self.merged:
            names = [name for name in names if name not in self.merged_adapters]
            if warn and names:
                warnings.warn(f"Already merged {self.merged_adapters}; now also merging {names}.", stacklevel=3)
            elif warn:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
        return [name for name in names if name in self._get_available_adapters()]

    def _refuse_alora_merge(self, adapters: list[str], safe_merge: bool) -> None:
        activated = [name for name in adapters if self.use_alora.get(name)]
        if activated:
            raise NotImplementedError(
                f"aLoRA does not support {'safe ' if safe_merge else ''}merging (adapter(s) {activated}): an aLoRA "
                "adapter acts on some tokens only, which no merged weight can do (as in HF PEFT)."
            )

    def _merge_deltas(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What merging `adapter` adds to the base weight and bias, in their dtypes (bias: None if nothing)."""
        base_layer = self.get_base_layer()
        weight, bias = base_layer.weight, getattr(base_layer, "bias", None)
        delta_bias = None
        if self.lora_bias.get(adapter) and self.lora_B[adapter].bias is not None:
            if bias is None:
                raise RuntimeError(
                    f"Can't merge adapter {adapter!r}: it has lora_bias=True but the {type(base_layer).__name__} it "
                    "adapts has no bias to merge it into."
                )
            delta_bias = (self.lora_B[adapter].bias * self.scaling[adapter]).to(bias.dtype)
        return self.get_delta_weight(adapter).to(weight.dtype), delta_bias

    def _merged(
        self, adapter: str, weight: torch.Tensor, dora_norms: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`weight` with `adapter` merged in (a new tensor), and what merging adds to the bias (None: nothing)."""
        if adapter in dora_norms:
            # A DoRA adapter has no lora_B bias: use_dora refuses lora_bias, as in HF PEFT.
            delta = self.get_delta_weight(adapter)
            return dora.merged_weight(self, adapter, weight, delta, dora_norms[adapter]), None
        delta_weight, delta_bias = self._merge_deltas(adapter)
        return weight + delta_weight, delta_bias

    def _check_safe_merge(self, adapter_names: list[str] | None, layer_name: str) -> None:
        """Raise a ValueError naming the adapter and `layer_name` if merging `adapter_names` here would put a NaN or
        inf into the weights. Nothing is changed: a tuner runs this over every layer before merging any."""
        adapters = self._adapters_to_merge(adapter_names, warn=False)
        self._refuse_alora_merge(adapters, safe_merge=True)
        dora_norms = dora.merge_norms(self, adapters)
        base_layer = self.get_base_layer()
        weight, bias = base_layer.weight.data, getattr(base_layer, "bias", None)
        bias = None if bias is None else bias.data
        for adapter in adapters:
            weight, delta_bias = self._merged(adapter, weight, dora_norms)
            bias = bias if delta_bias is None else bias + delta_bias
            if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter!r} into layer {layer_name!r}; nothing was "
                    "merged. The adapter weights are probably broken."
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' delta weights (the active ones when `adapter_names` is None) into the base weight.

        With `safe_merge`, each merged weight is computed on a copy and checked for NaN/inf first; on a bad value
        a ValueError names the adapter and the weights of this layer are left as they were before that adapter.
        A DoRA adapter merges as in HF PEFT: W <- (m / norm) * (W + s B A), the norm that of the unmerged weight.
        """
        base_layer = self.get_base_layer()
        adapters = self._adapters_to_merge(adapter_names)
        self._refuse_alora_merge(adapters, safe_merge)
        dora_norms = dora.merge_norms(self, adapters)
        for adapter in adapters:
            if safe_merge or adapter in dora_norms:
                weight, delta_bias = self._merged(adapter, base_layer.weight.data, dora_norms)
                bias = None if delta_bias is None else base_layer.bias.data + delta_bias
                if safe_merge and (
                    not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all())
                ):
                    raise ValueError(
                        f"NaNs or infs detected while merging adapter {adapter!r} into {type(base_layer).__name__}; "
                        "the weights were left unmerged. The adapter weights are probably broken."
                    )
                base_layer.weight.data = weight
                if bias is not None:
                    base_layer.bias.data = bias
            else:
                delta_weight, delta_bias = self._merge_deltas(adapter)
                base_layer.weight.data += delta_weight
                if delta_bias is not None:
                    base_layer.bias.data += delta_bias
            if adapter in dora_norms:
                self.dora_cache().merge_norms[adapter] = dora_norms[adapter]
            self.merged_adapters.append(adapter)
        if adapters:
            # The weight changed through `.data`, which no version counter sees.
            self.dora_cache().clear()

    def unmerge(self) -> None:
        """Subtract merged delta weights again, last merged first (a DoRA adapter: W <- W / (m / norm) - s B A)."""
        if not self.merged:
            return
        base_layer = self.get_base_layer()
        cache = self.dora_cache()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.scaling:
                continue
            cache.clear()
            if adapter in cache.merge_norms:
                delta = self.get_delta_weight(adapter)
                norm = cache.merge_norms.pop(adapter)
                base_layer.weight.data = dora.unmerged_weight(self, adapter, base_layer.weight.data, delta, norm)
            else:
                base_layer.weight.data -= self.get_delta_weight(adapter).to(base_layer.weight.dtype)
            if self.lora_bias.get(adapter) and self.lora_B[adapter].bias is not None:
                base_layer.bias.data -= self.lora_B[adapter].bias.to(base_layer.bias.dtype) * self.scaling[adapter]

    def _lora_weights(self, adapters: list[str]):
        """(A weights, B weights, B biases, scalings, dropout rates) of `adapters`, as the ops take them."""
        # This runs on every forward, where nn.Module attribute lookups (~0.5 us each) are a visible share of a
        # small layer's time: the modules' dicts are read directly.
        modules = self._modules
        lora_A, lora_B = modules["lora_A"]._modules, modules["lora_B"]._modules
        dropout, scaling = modules["lora_dropout"]._modules, self.scaling
        weights_A, weights_B, biases_B, scalings, rates = [], [], [], [], []
        for name in adapters:
            B = lora_B[name]
            weights_A.append(_parameter(lora_A[name], "weight"))
            weights_B.append(_parameter(B, "weight"))
            biases_B.append(_parameter(B, "bias"))
            scalings.append(scaling[name])
            rate = dropout[name]
            rates.append(0.0 if type(rate) is nn.Identity else getattr(rate, "p", 0.0))
        return weights_A, weights_B, biases_B, scalings, rates

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: Any, **kwargs: Any):
        """Each row of the batch runs with its own adapter ("__base__", or an adapter this layer lacks: none)."""
        result = self.base_layer(x, *args, **kwargs)
        groups = AdapterRowGroups.of(adapter_names)
        for name in groups.groups:
            if name == "__base__" or name not in self.scaling:
                continue
            rows = groups.rows(name, x.device)
            result[rows] = self._adapter_output(result[rows], x[rows], name).to(result.dtype)
        return result

    def _forward_without_mixed_batch(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the active adapters' terms (adapters off or merged: the base output)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for adapter in self._present_active_adapters():
            result = self._adapter_output(result, x, adapter)
        return result.to(result_dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = self._take_mixed_batch(x, kwargs)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        return self._forward_without_mixed_batch(x, *args, **kwargs)

    def _adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        raise NotImplementedError


def delta_on_cpu_in_fp32(
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    dtype: torch.dtype,
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`product(weight_A, weight_B)`, a layer's delta weight; for fp16/bf16 `dtype` on the CPU computed from fp32
    copies and cast back to `dtype` (half-precision matmuls on CPU are slow and not always available)."""
    upcast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:
        return product(weight_A.float(), weight_B.float()).to(dtype)
    return product(weight_A, weight_B)


def _initialisation_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sub-configs LoftQ and LoRA-GA initialisations read, from a layer's constructor/update_layer kwargs."""
    return {name: kwargs[name] for name in ("loftq_config", "lora_ga_config") if name in kwargs}


def _tensors_of(item: nn.Module | nn.Parameter) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters, buffers) of one adapter entry; a leaf module's read from its dicts (module.parameters() costs
    microseconds, paid for every layer of every injection)."""
    if isinstance(item, nn.Parameter):
        return [item], []
    if not item._modules:
        params = [p for p in item._parameters.values() if p is not None]
        return params, [b for b in item._buffers.values() if b is not None]
    return list(item.parameters()), list(item.buffers())


# What `_new_linear` checks it may bypass: torch's own constructor, initialisation and registration (e.g.
# transformers' no_init_weights swaps nn.init's functions), with no hooks on them.
_TORCH_LINEAR_INIT = nn.Linear.__init__
_TORCH_LINEAR_RESET = nn.Linear.reset_parameters
_TORCH_INITS = (nn.init.kaiming_uniform_, nn.init.uniform_)
_TORCH_REGISTER_PARAMETER = nn.Module.register_parameter
_module_globals = nn.modules.module


def set_new_attributes(module: nn.Module, children: dict[str, nn.Module], plain: dict[str, Any]) -> None:
    """`setattr(module, name, value)` for the submodules and plain values of a module under construction, past
    nn.Module.__setattr__ (a microsecond an attribute, some 20 per layer of every injection), which only checks for
    a parameter, buffer or submodule of the same name, and none is registered yet. Global module-registration hooks,
    where someone installed some, still see the submodules; object.__setattr__ still honours a subclass's property."""
    if _module_globals._global_module_registration_hooks:
        for name, child in children.items():
            setattr(module, name, child)
    else:
        module._modules.update(children)
    for name, value in plain.items():
        object.__setattr__(module, name, value)


def _kaiming_uniform_bound(fan_in: int) -> float:
    """The bound of `nn.init.kaiming_uniform_(w, a=math.sqrt(5))` for `fan_in`, computed as torch computes it (so the
    draws are bit-identical)."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _new_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """`nn.Linear(in_features, out_features, bias)`, with the same parameters and the same random draws (in the same
    order) from the default generator, built without the per-call overhead of the generic constructor and of
    `nn.init` (half the cost of an adapter entry). Where something could hook into the construction (a patched
    constructor, initialiser or `register_parameter`, e.g. an empty-weights context, or global registration hooks) or
    a size is 0, torch's constructor runs."""
    if (
        nn.Linear.__init__ is not _TORCH_LINEAR_INIT
        or nn.Linear.reset_parameters is not _TORCH_LINEAR_RESET
        or (nn.init.kaiming_uniform_, nn.init.uniform_) != _TORCH_INITS
        or nn.Module.register_parameter is not _TORCH_REGISTER_PARAMETER
        or _module_globals._global_parameter_registration_hooks
        or _module_globals._global_module_registration_hooks
        or in_features <= 0
        or out_features <= 0
    ):
        return nn.Linear(in_features, out_features, bias=bias)
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    set_new_attributes(layer, {}, {"in_features": in_features, "out_features": out_features})
    bound = _kaiming_uniform_bound(in_features)
    parameters = layer._parameters
    parameters["weight"] = nn.Parameter(torch.empty((out_features, in_features)).uniform_(-bound, bound))
    bias_bound = 1 / math.sqrt(in_features)
    parameters["bias"] = nn.Parameter(torch.empty(out_features).uniform_(-bias_bound, bias_bound)) if bias else None
    return layer


def _on_meta(tensors: list[torch.Tensor]) -> bool:
    for tensor in tensors:
        if tensor.device.type == "meta":
            return True
    return False


def _in_place(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether `tensors` are on `device` and, where floating point, of `dtype` (any dtype when it is None)."""
    for tensor in tensors:
        if tensor.device != device or dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
            return False
    return True


def _row_mask(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """A [rows] bool mask shaped to broadcast over a [rows, ...] tensor of `dim` dimensions."""
    return rows.reshape(-1, *([1] * (dim - 1)))


def _parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    """`getattr(module, name)` for a registered parameter (possibly None), read from `_parameters` directly; anything
    else (a parametrized or plain attribute) through getattr."""
    parameters = module._parameters
    return parameters[name] if name in parameters else getattr(module, name)


def _runs_plain(module: nn.Module) -> bool:
    """Nothing runs around `module`'s forward: no forward (pre-)hooks and no forward replaced on the instance (how
    accelerate's offload and device-map hooks attach, bringing the weights in for the call). Only then may a fused
    path read its weights instead of calling it."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _is_plain_linear(module: nn.Module) -> bool:
    """A bare nn.Linear with no hooks: its GEMM can be fused with the LoRA term."""
    return type(module) is nn.Linear and _runs_plain(module)


def _plain_dense_weight(module: nn.Module) -> torch.Tensor | None:
    """W [out, in] of a base layer whose forward is exactly x W^T + b with no hooks: a bare nn.Linear, or transformers'
    Conv1D (x @ weight + bias, its weight stored (in, out)); None for any other."""
    if _is_plain_linear(module):
        return module.weight
    is_conv1d = type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
    if is_conv1d and _runs_plain(module):
        return module.weight.T
    return None


class Linear(nn.Module, LoraLayer):
    """LoRA on a dense layer: `y = base(x) + scaling * B(A(dropout(x)))`."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_alora: bool = False,
        use_dora: bool = False,
        ephemeral_gpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, ephemeral_gpu_offload=ephemeral_gpu_offload, **kwargs)
        set_new_attributes(
            self,
            {},
            {
                "fan_in_fan_out": fan_in_fan_out,
                "is_target_conv_1d_layer": is_target_conv_1d_layer,
                "_active_adapter": adapter_name,
            },
        )
        self.update_layer(
            adapter_name,
            r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            lora_bias=lora_bias,
            autocast_adapter_dtype=autocast_adapter_dtype,
            use_alora=use_alora,
            use_dora=use_dora,
            **_initialisation_options(kwargs),
        )

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_alora: bool = False,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_hyperparameters(adapter_name, r, lora_alpha, use_rslora, lora_dropout)
        self.lora_A[adapter_name] = _new_linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = _new_linear(r, self.out_features, bias=lora_bias)
        self.lora_bias[adapter_name] = lora_bias
        self.use_alora[adapter_name] = use_alora
        if use_alora and self._alora_source is None:
            self._alora_source = AloraOffsetsSource()
        self.reset_lora_parameters(adapter_name, init_lora_weights, **_initialisation_options(kwargs))
        self._move_adapter_to_base(adapter_name, autocast_adapter_dtype, fresh=True)
        magnitude = dora.DoraLinearLayer(fan_in_fan_out=self.fan_in_fan_out) if use_dora else None
        self._set_dora(adapter_name, use_dora, magnitude)
        self._activate_added_adapter(adapter_name)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling = self.scaling[adapter]
        return delta_on_cpu_in_fp32(
            weight_A, weight_B, weight_B.dtype, lambda A, B: transpose(B @ A, self.fan_in_fan_out) * scaling
        )

    def _adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        if adapter in self.lora_magnitude_vector:
            return self._dora_output(result, x, adapter)
        return ops.lora_add(result, x, *self._lora_weights([adapter]), training=self.training)

    def _dora_dense_weight(self) -> torch.Tensor:
        """The base weight as a dense [out, in] tensor (a view here; quantized layers dequantize)."""
        return transpose(self.get_base_layer().weight, self.fan_in_fan_out)

    def _dora_weight_norm_terms(
        self, adapter: str, weight_sq: torch.Tensor | None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A, lora_B = self._dora_factors(adapter)
        weight = self._dora_dense_weight()
        return dora.weight_norm_on(device, weight, lora_A, lora_B, self.scaling[adapter], weight_sq)

    def _dora_output(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """HF PEFT's DoRA update of the output `result` of any dense-like base layer (quantized ones too)."""
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        dropout = self.lora_dropout[adapter]
        magnitude = self.lora_magnitude_vector[adapter].weight
        norm = self._dora_weight_norm(adapter)
        if self.cast_input_dtype_enabled:
            x = x.to(lora_A.weight.dtype)
        if self.training and not isinstance(dropout, nn.Identity):
            # HF PEFT's rule: under dropout the base product is taken again, on the dropped-out input.
            dropped = dropout(x)
            weight = self._dora_dense_weight()
            base_dropped = F.linear(dropped.to(weight.dtype), weight)
            lora_out = lora_B(lora_A(dropped)) * self.scaling[adapter]
            result = ops.dora_scale(result, lora_out, magnitude, norm, base_dropped=base_dropped)
        else:
            lora_out = lora_B(lora_A(x)) * self.scaling[adapter]
            result = ops.dora_scale(result, lora_out, magnitude, norm, self.get_base_layer().bias)
        self._record_backend("dora_scale")
        return result

    def adapter_bank(self) -> LoraAdapterBank:
        """What packs this layer's adapters for mixed-adapter batches (made on first use, not saved)."""
        bank = self.__dict__.get("_adapter_bank")
        if bank is None:
            bank = self.__dict__["_adapter_bank"] = LoraAdapterBank()
        return bank

    def _mixed_batch_forward(
        self,
        x: torch.Tensor,
        *args: Any,
        adapter_names: Any,
        alora_offsets: AloraOffsets | None = None,
        **kwargs: Any,
    ):
        """Each row runs with its own adapter, all of them in one `ops.lora_multi_adapter` call over the adapters
        packed from their live weights (SGMV kernels on the triton backend). The rows' adapters and the token layout
        are data (a `MixedBatch`), so a compiled graph serves every assignment of adapters to rows. The rows of an
        aLoRA adapter get its term from `ops.lora_add_masked` instead, on the tokens their offsets select; a DoRA
        adapter's rows are rescaled after. Eagerly those rows are gathered (the batch's names are known on the host);
        traced, every row is computed and the adapter's rows selected by a mask, so the graph stays the same."""
        if not self._adapters_run_plain(list(self.lora_A)):
            return self._mixed_batch_through_modules(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        batch = MixedBatch.of(adapter_names, tuple(self.lora_A))
        if x.numel() == 0:
            return result
        traced = torch.compiler.is_compiling()
        groups = batch.groups
        use_alora = self.use_alora
        activated = [name for name in self.lora_A if use_alora.get(name) and (traced or name in batch.used)]
        if activated:
            mask = token_mask_for(alora_offsets, result.shape[:-1], x.device)
            for name in activated:
                weights = self._lora_weights([name])
                if traced:
                    rows = _row_mask(batch.rows_of(name, x.device), mask.dim())
                    result = ops.lora_add_masked(result, x, *weights, training=self.training, token_mask=mask & rows)
                    continue
                rows = groups.rows(name, x.device)
                result[rows] = ops.lora_add_masked(
                    result[rows], x[rows], *weights, training=self.training, token_mask=mask[rows]
                )
            self._record_backend("lora_add_masked")
        bank = self.adapter_bank()
        names = bank.slot_names(self, batch)
        if not names:
            return result
        packed = bank.pack(self, names, ops.multi_adapter_bank_dtype(x), x.device)
        x2d = x.reshape(-1, x.shape[-1])
        y2d = result.reshape(-1, result.shape[-1])
        layout = batch.layout(x2d.shape[0] // len(batch), x.device)
        y2d = ops.lora_multi_adapter(
            y2d,
            x2d,
            packed.lora_A,
            packed.lora_B_t,
            packed.lora_B_bias,
            packed.scaling,
            packed.slot_spans,
            bank.group_slot(names, batch.adapters, x.device),
            layout.token_order,
            layout.tiles,
            layout.block_m,
            packed.r_max,
        )
        self._record_backend("lora_multi_adapter")
        result = y2d.reshape(result.shape)
        # A DoRA adapter's rows now hold W x + b + s B A x: rescaling them by g = m / norm around b gives its output.
        dora_adapters = self._modules["lora_magnitude_vector"]._modules
        bias = self.get_base_layer().bias
        for name in names:
            if name not in dora_adapters or not (traced or name in batch.used):
                continue
            magnitude, norm = dora_adapters[name].weight, self._dora_weight_norm(name)
            if traced:
                rows = _row_mask(batch.rows_of(name, x.device), result.dim())
                result = torch.where(rows, ops.dora_scale(result, None, magnitude, norm, bias), result)
                continue
            rows = groups.rows(name, x.device)
            result[rows] = ops.dora_scale(result[rows], None, magnitude, norm, bias)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Per call of every LoRA layer: what the common case (no keyword arguments, no mixed batch, no aLoRA adapter)
        # doesn't need is skipped with one test each.
        if kwargs or self._mixed_batch_source is not None:
            adapter_names = self._take_mixed_batch(x, kwargs)
        else:
            adapter_names = None
        alora_offsets = kwargs.pop("alora_offsets", None) if kwargs else None
        if alora_offsets is None and self._alora_source is not None:
            alora_offsets = self._alora_source.offsets
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(
                x, *args, adapter_names=adapter_names, alora_offsets=alora_offsets, **kwargs
            )
        active = self._present_active_adapters()
        if self.merged_adapters or not active:
            return self._modules["base_layer"](x, *args, **kwargs)
        use_alora = self.use_alora
        activated = [name for name in active if use_alora.get(name)] if True in use_alora.values() else None
        plain = [name for name in active if name not in activated] if activated else active
        if not plain:
            result = self.base_layer(x, *args, **kwargs)
        elif self.cast_input_dtype_enabled and self._adapters_run_plain(plain):
            result = self._forward_with_adapters(x, plain, *args, **kwargs)
        else:
            result = self._forward_through_modules(x, plain, *args, **kwargs)
        if not activated:
            return result
        # HF PEFT's aLoRA term casts x to the adapter's dtype whatever cast_input_dtype_enabled says.
        mask = token_mask_for(alora_offsets, result.shape[:-1], x.device)
        result = ops.lora_add_masked(result, x, *self._lora_weights(activated), training=self.training, token_mask=mask)
        self._record_backend("lora_add_masked")
        return result

    def _adapters_run_plain(self, active: list[str]) -> bool:
        """No hook runs around the `active` adapters' lora_A, lora_B and dropout modules (nor any global module
        hook), so the fused ops may read their weights instead of calling them."""
        # Per call of every LoRA layer: plain loops, no generator or helper call per module.
        if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return False
        modules = self._modules
        for holder in (modules["lora_A"]._modules, modules["lora_B"]._modules, modules["lora_dropout"]._modules):
            for name in active:
                module = holder[name]
                if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                    return False
        return True

    def _forward_through_modules(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """HF PEFT's composition, calling lora_A and lora_B as modules, so that hooks on them run: with input casting
        off, hooks (diffusers' layerwise casting) manage the dtypes on the uncast x; accelerate's offload hooks bring
        the weights in for the call."""
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            if name in self.lora_magnitude_vector:
                result = self._dora_output(result, x, name)
            else:
                result = result + self._term_through_modules(x, name)
        return result.to(result_dtype)

    def _term_through_modules(self, x: torch.Tensor, name: str) -> torch.Tensor:
        lora_A = self.lora_A[name]
        inputs = x.to(lora_A.weight.dtype) if self.cast_input_dtype_enabled else x
        return self.lora_B[name](lora_A(self.lora_dropout[name](inputs))) * self.scaling[name]

    def _mixed_batch_through_modules(self, x: torch.Tensor, *args: Any, adapter_names: Any, **kwargs: Any):
        """A mixed batch when hooks run around the adapter modules (accelerate's offload): each adapter's rows
        through its modules, as HF PEFT computes them."""
        result = self.base_layer(x, *args, **kwargs)
        groups = AdapterRowGroups.of(adapter_names)
        for name in groups.groups:
            if name == "__base__" or name not in self.lora_A:
                continue
            if name in self.lora_magnitude_vector or self.use_alora.get(name):
                raise NotImplementedError(
                    f"Adapter {name!r} is a DoRA or aLoRA adapter in a mixed batch while hooks run around its "
                    "lora_A/lora_B modules (accelerate's offload, for one): peftfast computes these terms from the "
                    "weights, which the hooks only bring in for a module call. Run without offloading this layer."
                )
            rows = groups.rows(name, x.device)
            result[rows] = (result[rows] + self._term_through_modules(x[rows], name)).to(result.dtype)
        return result

    def _forward_with_adapters(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the `active` adapters' terms: fused with the base GEMM for a bare nn.Linear, added to
        whatever the base layer returns otherwise. Quantized subclasses override this."""
        dora_adapters = self._modules["lora_magnitude_vector"]._modules
        if dora_adapters and any(name in dora_adapters for name in active):
            return self._forward_with_dora(x, active, *args, **kwargs)
        weights = self._lora_weights(active)
        base_layer = self._modules["base_layer"]
        if _is_plain_linear(base_layer) and not args and not kwargs:
            weight, bias = _parameter(base_layer, "weight"), _parameter(base_layer, "bias")
            result = ops.lora_linear(x, weight, bias, *weights, training=self.training)
            self._record_backend("lora_linear")
            return result
        result = ops.lora_add(base_layer(x, *args, **kwargs), x, *weights, training=self.training)
        self._record_backend("lora_add")
        return result

    def _forward_with_dora(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One DoRA adapter on a bare nn.Linear or transformers Conv1D: everything in `ops.dora_linear` (the rescaling
        fused into the base GEMM). Otherwise HF PEFT's order: the base output, then each active adapter's update
        applied to it in turn."""
        weight = _plain_dense_weight(self.base_layer) if len(active) == 1 and not args and not kwargs else None
        if weight is not None:
            adapter = active[0]
            dropout = self.lora_dropout[adapter]
            # A trainable adapter's norm changes every step: the op takes its rank-r terms from its own GEMM.
            norm, weight_sq = self.dora_cache().norm_or_weight_sq(self, adapter)
            result = ops.dora_linear(
                x,
                weight,
                self.base_layer.bias,
                self.lora_A[adapter].weight,
                self.lora_B[adapter].weight,
                self.lora_magnitude_vector[adapter].weight,
                norm,
                self.scaling[adapter],
                getattr(dropout, "p", 0.0),
                self.training,
                weight_sq,
            )
            self._record_backend("dora_linear")
            return result
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in active:
            result = self._adapter_output(result, x, adapter)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class _EmbeddingOrConv(nn.Module, LoraLayer):
    """What Embedding and the convolutions share: HF PEFT's constructor (check the target, then the first adapter's
    `update_layer`), LoraLayer's forward over their `_adapter_output`, and the repr."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_dora: bool = False,
        ephemeral_gpu_offload: bool = False,
        **kwargs: Any,
    ) -> None:
        self._check_target(base_layer, lora_bias)
        super().__init__()
        LoraLayer.__init__(self, base_layer, ephemeral_gpu_offload=ephemeral_gpu_offload)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name,
            r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            lora_bias=lora_bias,
            autocast_adapter_dtype=autocast_adapter_dtype,
            use_dora=use_dora,
            **_initialisation_options(kwargs),
        )

    def _check_target(self, base_layer: nn.Module, lora_bias: bool) -> None:
        """Refuse a base layer or option this layer type cannot take, before anything is built."""

    forward = LoraLayer.forward

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Embedding(_EmbeddingOrConv):
    """LoRA on an embedding: `y = E[ids] + scaling * A.T[ids] @ B.T`."""

    def _check_target(self, base_layer: nn.Module, lora_bias: bool) -> None:
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for Embedding layers (as in HF PEFT).")

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        self._set_hyperparameters(adapter_name, r, lora_alpha, use_rslora, lora_dropout)
        weight = self.get_base_layer().weight
        self.lora_embedding_A[adapter_name] = nn.Parameter(
            weight.new_empty(r, self.in_features, dtype=torch.float32, device="cpu").normal_()
        )
        self.lora_embedding_B[adapter_name] = nn.Parameter(
            weight.new_empty(self.out_features, r, dtype=torch.float32, device="cpu").normal_()
        )
        self.lora_bias[adapter_name] = lora_bias
        self.reset_lora_parameters(adapter_name, init_lora_weights, **_initialisation_options(kwargs))
        self._move_adapter_to_base(adapter_name, autocast_adapter_dtype, fresh=True)
        self._set_dora(adapter_name, use_dora, dora.DoraEmbeddingLayer(fan_in_fan_out=True) if use_dora else None)
        self._activate_added_adapter(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]

    def _dora_weight_norm_terms(
        self, adapter: str, weight_sq: torch.Tensor | None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The norms run over the vocabulary, one per embedding dimension: the "weight" is E^T [dim, num_embeddings].
        lora_A, lora_B = self._dora_factors(adapter)
        weight = self.get_base_layer().weight.T
        return dora.weight_norm_on(device, weight, lora_A, lora_B, self.scaling[adapter], weight_sq)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        scaling = self.scaling[adapter]
        return delta_on_cpu_in_fp32(weight_A, weight_B, weight_A.dtype, lambda A, B: (B @ A).T * scaling)

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, weight, **embedding_options(self.get_base_layer()))

    def _adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        after_A = self._embed(x, self.lora_embedding_A[adapter].T)
        lora_out = (after_A @ self.lora_embedding_B[adapter].T) * self.scaling[adapter]
        # `result` carries the scale a scaled embedding (Gemma's) applies in its forward: the adapter's term must too.
        # DoRA's norm stays that of the unscaled W + s B A (HF PEFT's rule), so the scale enters the term only.
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            lora_out = lora_out * embed_scale.to(lora_out.dtype)
        if adapter in self.lora_magnitude_vector:
            magnitude = self.lora_magnitude_vector[adapter].weight
            return ops.dora_scale(result, lora_out, magnitude, self._dora_weight_norm(adapter))
        return result + lora_out


class _ConvNd(_EmbeddingOrConv):
    """LoRA on a convolution: A is a conv with the base kernel, stride and padding into r channels; B a 1x1 conv."""

    _kernel_dim: int = 4

    def _check_target(self, base_layer: nn.Module, lora_bias: bool) -> None:
        if base_layer.weight.dim() != self._kernel_dim:
            raise ValueError(
                f"{type(self).__name__} expects a {self._kernel_dim - 2}d convolution, got a weight of "
                f"shape {tuple(base_layer.weight.shape)}."
            )

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> None:
        self._check_rank(r)
        base = self.get_base_layer()
        if r % base.groups != 0:
            raise ValueError(
                f"LoRA rank {r} must be divisible by groups={base.groups} of the {type(base).__name__} it targets."
            )
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self._set_dropout(adapter_name, lora_dropout)
        conv_type = type(base)
        ones = (1,) * (self._kernel_dim - 2)
        self.lora_A[adapter_name] = conv_type(
            self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False
        )
        self.lora_B[adapter_name] = conv_type(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)
        self.lora_bias[adapter_name] = lora_bias
        self.reset_lora_parameters(adapter_name, init_lora_weights, **_initialisation_options(kwargs))
        self._move_adapter_to_base(adapter_name, autocast_adapter_dtype, fresh=True)
        self._set_dora(adapter_name, use_dora, _DORA_CONV_LAYERS[self._kernel_dim]() if use_dora else None)
        self._activate_added_adapter(adapter_name)

    def _conv(self, input: torch.Tensor, weight: torch.Tensor, **options: Any) -> torch.Tensor:
        return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[self._kernel_dim](input, weight, **options)

    def _dora_weight_norm_terms(
        self, adapter: str, weight_sq: torch.Tensor | None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row norms of the flattened kernels [out, in/groups * k...]. HF PEFT's B A for DoRA is the [out/groups,
        in * k...] product of B viewed [-1, r] and A viewed [r, -1], reshaped to the weight's shape; with groups > 1
        row j = q * groups + c of that is B'[q] times the c-th column block of A', so each column block c gives the
        norms of rows c, c + groups, ... (with groups = 1, simply B A)."""
        lora_A, lora_B = self._dora_factors(adapter)
        r = lora_A.shape[0]
        weight = self.get_base_layer().weight.flatten(1)
        groups = self.get_base_layer().groups
        flat_A, flat_B = lora_A.reshape(r, -1), lora_B.reshape(-1, r)
        scaling = self.scaling[adapter]
        if groups == 1:
            return dora.weight_norm_on(device, weight, flat_A, flat_B, scaling, weight_sq)
        width = weight.shape[1]
        norm = torch.empty(weight.shape[0], device=lora_B.device, dtype=torch.float32)
        squares = torch.empty_like(norm)
        for c in range(groups):
            block_sq = None if weight_sq is None else weight_sq[c::groups]
            block_A = flat_A[:, c * width : (c + 1) * width]
            norm[c::groups], squares[c::groups] = dora.weight_norm_on(
                device, weight[c::groups], block_A, flat_B, scaling, block_sq
            )
        return norm, squares

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.get_base_layer().groups > 1:
            raise NotImplementedError("Merging LoRA into a convolution with groups > 1 is not supported.")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return delta_on_cpu_in_fp32(weight_A, weight_B, weight_A.dtype, lambda A, B: self._delta(A, B, adapter))

    def _delta(self, weight_A: torch.Tensor, weight_B: torch.Tensor, adapter: str) -> torch.Tensor:
        if all(size == 1 for size in self.get_base_layer().weight.shape[2:]):
            spatial = weight_A.shape[2:]
            delta = (weight_B.flatten(1) @ weight_A.flatten(1)).reshape(weight_B.shape[0], weight_A.shape[1], *spatial)
        else:
            # Composing the 1x1 conv B after conv A is the conv of A's kernels by B's channel mixing.
            delta = self._conv(weight_A.transpose(0, 1), weight_B).transpose(0, 1)
        return delta * self.scaling[adapter]

    def _adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        lora_A, lora_B, dropout = self.lora_A[adapter], self.lora_B[adapter], self.lora_dropout[adapter]
        if self.cast_input_dtype_enabled:
            x = x.to(lora_A.weight.dtype)
        if adapter not in self.lora_magnitude_vector:
            return result + lora_B(lora_A(dropout(x))) * self.scaling[adapter]
        base = self.get_base_layer()
        magnitude = self.lora_magnitude_vector[adapter].weight
        norm = self._dora_weight_norm(adapter)
        if self.training and not isinstance(dropout, nn.Identity):
            # As HF PEFT: the base convolution again on the dropped-out input (its padding_mode is not applied).
            dropped = dropout(x)
            options = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
            base_dropped = self._conv(dropped.to(base.weight.dtype), base.weight, **options)
            lora_out = lora_B(lora_A(dropped)) * self.scaling[adapter]
            return ops.dora_scale(result, lora_out, magnitude, norm, base_dropped=base_dropped, channel_dim=1)
        lora_out = lora_B(lora_A(x)) * self.scaling[adapter]
        return ops.dora_scale(result, lora_out, magnitude, norm, base.bias, channel_dim=1)


class Conv1d(_ConvNd):
    _kernel_dim = 3


class Conv2d(_ConvNd):
    _kernel_dim = 4


class Conv3d(_ConvNd):
    _kernel_dim = 5


_DORA_CONV_LAYERS = {3: dora.DoraConv1dLayer, 4: dora.DoraConv2dLayer, 5: dora.DoraConv3dLayer}


def reads_mixed_batch_source(module: nn.Module) -> bool:
    """Whether `module`'s forward takes a mixed batch from its `_mixed_batch_source` (a peftfast LoRA layer whose
    forward is not overridden); other layers get theirs as the `adapter_names` keyword."""
    return isinstance(module, LoraLayer) and type(module).forward in (LoraLayer.forward, Linear.forward)


def dispatch_default(target: nn.Module, adapter_name: str, lora_config: Any, **kwargs: Any) -> nn.Module | None:
    """The LoRA layer for a plain torch / transformers base layer, or None when this dispatcher doesn't know it."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Embedding):
        embedding_kwargs = {k: v for k, v in kwargs.items() if k != "fan_in_fan_out"}
        return Embedding(target, adapter_name, **embedding_kwargs)
    conv_types = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
    if type(base) in conv_types:
        conv_kwargs = {k: v for k, v in kwargs.items() if k != "fan_in_fan_out"}
        return conv_types[type(base)](target, adapter_name, **conv_kwargs)
    if isinstance(base, nn.Linear):
        if kwargs.get("fan_in_fan_out"):
            warnings.warn(
                "fan_in_fan_out=True but the target is an nn.Linear (weight is (out, in)); using False.", stacklevel=2
            )
            kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = False
        return Linear(target, adapter_name, **kwargs)
    if type(base).__name__ == "Conv1D":
        if not kwargs.get("fan_in_fan_out"):
            warnings.warn(
                "The target is a transformers Conv1D (weight is (in, out)); setting fan_in_fan_out=True.", stacklevel=2
            )
            kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = True
        return Linear(target, adapter_name, is_target_conv_1d_layer=True, **kwargs)
    return None


def dispatch_custom(target: nn.Module, adapter_name: str, lora_config: Any, **kwargs: Any) -> nn.Module | None:
    """The user's LoRA layer registered for the target's base layer type with `LoraConfig._register_custom_module`
    (first match in registration order, as in HF PEFT), or None. It is called as
    `layer_cls(target, adapter_name, config=lora_config, **kwargs)`."""
    custom_modules = getattr(lora_config, "_custom_modules", None)
    if not custom_modules:
        return None
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    for base_type, layer_cls in custom_modules.items():
        if isinstance(base, base_type):
            return layer_cls(target, adapter_name, config=lora_config, **kwargs)
    return None


# HF PEFT also defines `MultiheadAttention` and `ParamWrapper` in this module. peftfast's live in mha.py and
# param_wrapper.py, which import this module; the package's __init__ puts them into this namespace, so that
# `from peftfast.tuners.lora.layer import ParamWrapper` works as PEFT users write it.
