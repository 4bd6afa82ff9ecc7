"""LoRA on `nn.Parameter`s (`LoraConfig.target_parameters`): HF PEFT's `lora.ParamWrapper`, same names and files.

Each wrapper adapts one parameter of the module it wraps; several parameters of one module nest wrappers (the last
parameter targeted outermost, as HF PEFT nests them, which fixes the state_dict keys: `experts.lora_A...` for the
outer one, `experts.base_layer.lora_A...` for the next). For a parameter of E stacked experts ([E, out, in], or
[E, in, out] when the module is `is_transposed`) an adapter is `lora_A` = Linear(in, r * E) and `lora_B` =
Linear(r * E, out): expert e's factors are `lora_A.weight[e * r : (e + 1) * r]` and `lora_B.weight[:, e::E]` (HF PEFT's
layout), and its delta is `scaling * B_e @ A_e`. A 2-D parameter [out, in] is the one-expert case.

Forward: when the wrapped module is a transformers experts module (`moe_experts.experts_contract`), the whole chain
of wrappers runs as one grouped forward in which each expert's low-rank term is applied to the rows routed to it
(`ops.moe_lora_linear`); nothing of size E x in x out is built. Any other parameter gets HF PEFT's formulation: the
module runs with W + delta in place of W (`torch.func.functional_call`), the delta materialised on every call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .layer import LoraLayer
from .moe_experts import Factors, experts_contract, lora_experts_forward, routing_arguments

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on the parameter `parameter_name` of `base_layer` (a module, or another `ParamWrapper` of it).

    As in HF PEFT: reading the parameter directly (`module.gate_up_proj`) gives the base weight, without LoRA; dropout,
    `lora_bias` and `fan_in_fan_out` are refused; mixed-adapter batches are not supported; every adapter that uses
    `target_parameters` on a model must target the same parameters.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        parameter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        target_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.parameter_name = parameter_name
        self._target_name = target_name or parameter_name
        if fan_in_fan_out:
            raise ValueError(f"{self._what()} does not work with fan_in_fan_out=True (as in HF PEFT).")
        if kwargs.get("is_target_conv_1d_layer"):
            raise ValueError(f"{self._what()} does not work with a transformers Conv1D target (as in HF PEFT).")
        param = self.get_param()
        if param.dim() == 3:
            self.num_experts, self.in_features, self.out_features = param.shape
            # [E, out, in] unless the module says its experts are stored transposed ([E, in, out]).
            self._did_swap_in_out_features = not getattr(self.get_base_layer(), "is_transposed", False)
            if self._did_swap_in_out_features:
                self.in_features, self.out_features = self.out_features, self.in_features
        elif param.dim() == 2:
            self.num_experts, self.in_features, self.out_features = 1, param.shape[1], param.shape[0]
            self._did_swap_in_out_features = False
        else:
            raise ValueError(
                f"{self._what()}: the parameter has shape {tuple(param.shape)}; only 2-D [out, in] and 3-D "
                "[experts, ...] parameters can be targeted (as in HF PEFT)."
            )
        self.fan_in_fan_out = False
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
            **kwargs,
        )

    def _what(self) -> str:
        return f"LoRA on the parameter {self._target_name!r} (target_parameters)"

    def get_param(self) -> torch.Tensor:
        """The targeted parameter (the base weight, without LoRA)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def _adapter_reference_weight(self) -> torch.Tensor | None:
        return self.get_param()

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
        **kwargs: Any,
    ) -> None:
        # Dropout would act on the input x of lora_B(lora_A(dropout(x))), but a parameter's LoRA is a weight delta:
        # there is no x to drop out from (HF PEFT refuses it for the same reason).
        if lora_dropout:
            raise ValueError(f"{self._what()} does not work with lora_dropout != 0 (as in HF PEFT); set it to 0.")
        if lora_bias:
            raise ValueError(f"{self._what()} does not work with lora_bias=True (as in HF PEFT).")
        if kwargs.get("use_dora"):
            raise ValueError(f"{self._what()} does not work with use_dora=True (as in HF PEFT).")
        self._set_hyperparameters(adapter_name, r, lora_alpha, use_rslora, 0.0)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        self.lora_bias[adapter_name] = False
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_base(adapter_name, autocast_adapter_dtype, fresh=True)
        self.set_adapter(self.active_adapters)

    def expert_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copies) of `adapter`'s weights as per-expert factors: A [E, r, in] and B [E, out, r]."""
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        experts = self.num_experts
        return weight_A.view(experts, -1, self.in_features), weight_B.view(self.out_features, -1, experts).permute(
            2, 0, 1
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`adapter`'s delta in the parameter's own layout and dtype: scaling * B_e @ A_e for each expert e
        ([E, out, in], or [E, in, out] when transposed; [out, in] for a 2-D parameter)."""
        param = self.get_param()
        lora_A, lora_B = self.expert_factors(adapter)
        if param.device.type == "cpu" and lora_A.dtype in (torch.float16, torch.bfloat16):
            # CPU matmuls in fp16/bf16 are slow and imprecise: build the delta in fp32, then cast.
            lora_A, lora_B = lora_A.float(), lora_B.float()
        delta = torch.bmm(lora_B, lora_A) * self.scaling[adapter]
        if self.num_experts == 1:
            delta = delta[0]
        elif not self._did_swap_in_out_features:
            delta = delta.transpose(1, 2)
        return delta.to(param.device, param.dtype if param.dtype in _FLOAT_DTYPES else delta.dtype)

    # Merging: the parameter's data += delta, tracked in merged_adapters.
    @torch.no_grad()
    def _check_safe_merge(self, adapter_names: list[str] | None, layer_name: str) -> None:
        weight = self.get_param().data
        for adapter in self._adapters_to_merge(adapter_names, warn=False):
            weight = weight + self.get_delta_weight(adapter)
            if not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter!r} into {self._what()} of layer "
                    f"{layer_name!r}; nothing was merged. The adapter weights are probably broken."
                )

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas (the active ones when `adapter_names` is None) into the parameter. With
        `safe_merge`, each merged value is checked for NaN/inf first and the parameter left as it was on a bad one."""
        param = self.get_param()
        for adapter in self._adapters_to_merge(adapter_names):
            delta = self.get_delta_weight(adapter)
            if safe_merge:
                merged = param.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs or infs detected while merging adapter {adapter!r} into {self._what()}; the weights "
                        "were left unmerged. The adapter weights are probably broken."
                    )
                param.data = merged
            else:
                param.data += delta
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged deltas again, last merged first."""
        param = self.get_param()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                param.data -= self.get_delta_weight(adapter)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The wrapped module with every wrapper of the chain removed, each merged first when `merge`."""
        if merge:
            for wrapper in self._chain():
                wrapper.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def _chain(self) -> list[ParamWrapper]:
        """This wrapper and the ParamWrappers nested inside it, outermost first."""
        chain: list[ParamWrapper] = [self]
        while isinstance(chain[-1].base_layer, ParamWrapper):
            chain.append(chain[-1].base_layer)
        return chain

    def _applied_adapters(self) -> list[str]:
        """The adapters whose terms this wrapper adds now: none when disabled (a merged one is unmerged first, as
        every LoRA layer does) or merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        if self.merged:
            return []
        return [name for name in self.active_adapters if name in self.lora_A]

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"{self._what()} does not support mixed-adapter batches (adapter_names=...), as in HF PEFT."
            )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        module = self.get_base_layer()
        contract = experts_contract(module)
        routing = routing_arguments(contract, module, (x, *args), kwargs) if contract is not None else None
        factors: dict[str, Factors] = {}
        dense: dict[str, torch.Tensor] = {}
        grouped, materialised = [], []
        for wrapper in self._chain():
            adapters = wrapper._applied_adapters()
            if not adapters:
                continue
            if routing is not None and wrapper.parameter_name in contract.weight_names:
                pairs = [wrapper.expert_factors(name) for name in adapters]
                scalings = [wrapper.scaling[name] for name in adapters]
                factors[wrapper.parameter_name] = ([A for A, _ in pairs], [B for _, B in pairs], scalings)
                grouped.append(wrapper)
            else:
                dense[wrapper.parameter_name] = wrapper.get_param() + sum(
                    wrapper.get_delta_weight(name) for name in adapters
                )
                materialised.append(wrapper)
        if factors:
            result = lora_experts_forward(module, contract, *routing, dense, factors)
        elif dense:
            result = functional_call(module, dense, (x, *args), kwargs, strict=False)
        else:
            return module(x, *args, **kwargs)
        for wrapper in grouped:
            wrapper._record_backend("moe_lora_linear")
        for wrapper in materialised:
            # HF PEFT's formulation: plain torch ops.
            wrapper.__dict__["last_backend"] = "torch"
        return result

    def __repr__(self) -> str:
        rep = nn.Module.__repr__(self)
        head, paren, rest = rep.partition("(")
        return f"lora.{head}{paren}\n  parameter_name={self.parameter_name!r},{rest}"
