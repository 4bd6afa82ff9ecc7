"""`LoraModel`: injects LoRA layers into a model and manages them (merge, unload, delete, mixed batches)."""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from ...utils import merge_utils, weight_journal
from ...utils.mixed_batch import MixedBatch, MixedBatchSource
from ...utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, input_embeddings_name
from ...utils.warning import PeftWarning
from ..tuners_utils import BaseTuner, BaseTunerLayer, named_modules_outside_adapters, replicate_layers
from . import alora
from . import init as lora_init
from .bnb import dispatch_bnb_4bit, dispatch_bnb_8bit
from .config import LoraConfig, changes_base_weights
from .layer import Linear, LoraLayer, dispatch_custom, dispatch_default, reads_mixed_batch_source
from .mha import MultiheadAttention, dispatch_multihead_attention
from .moe_targets import convert_v4_moe_targets
from .param_wrapper import ParamWrapper


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """The first pattern that matches `key_to_match` as `(.*\\.)?(pattern)$`, else the key itself."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key_to_match):
            return pattern
    return key_to_match


def _has_alora_adapter(module: nn.Module) -> bool:
    return isinstance(module, Linear) and any(module.use_alora.get(name) for name in module.lora_A)


def _first_adapter_weight(layer: LoraLayer) -> list[torch.Tensor]:
    for holder in (layer.lora_A, layer.lora_embedding_A):
        for item in holder.values():
            return [item if isinstance(item, torch.Tensor) else item.weight]
    return []


def _drop_names_matching(names: list[str] | set[str], keys: list[str]) -> None:
    """For each module key, remove from `names` (in place) the first name that matches it as a dotted-path suffix."""
    for key in keys:
        for name in names:
            if re.match(rf"(^|.*\.){name}($|\..*)", key):
                names.remove(name)
                break


def _check_variants(config: LoraConfig, target: nn.Module, key: str) -> None:
    """HF PEFT's refusals of LoRA variants, checked before the model is changed: aLoRA adapts Linear layers only,
    and combines with no other variant."""
    variants = alora.variant_fields(config)
    if "alora_invocation_tokens" not in variants:
        return
    if len(variants) > 1:
        raise ValueError(
            f"Invalid or unsupported variant combination: {variants}: aLoRA (alora_invocation_tokens) combines with "
            "no other LoRA variant (as in HF PEFT)."
        )
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, (nn.Embedding, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
        raise alora.unsupported_target_error(key, base)


def _check_dora_supported(config: LoraConfig, adapter_name: str, layer: nn.Module, current_key: str) -> None:
    """As HF PEFT: a layer type without a DoRA variant (a user's custom LoRA layer, ...) refuses use_dora=True rather
    than train plain LoRA under a DoRA config."""
    if config.use_dora and adapter_name not in getattr(layer, "lora_magnitude_vector", {}):
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        raise ValueError(
            f"Target module {current_key!r} ({type(layer).__name__} over a {type(base).__name__}) does not support "
            "DoRA; set use_dora=False, or leave this module out of target_modules."
        )


class _MixedBatchInstalled:
    """Makes `batch` the call's mixed batch in `source` until `remove()` puts the previous one back."""

    def __init__(self, source: MixedBatchSource, batch: MixedBatch) -> None:
        self.source, self.previous = source, source.batch
        source.batch = batch

    def remove(self) -> None:
        self.source.batch = self.previous


def _adapter_names_pre_forward_hook(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class LoraModel(BaseTuner):
    """Creates LoRA layers in the modules that `LoraConfig.target_modules` selects."""

    prefix = "lora_"
    tuner_layer_cls = LoraLayer

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | dict[str, LoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        self._autocast_adapter_dtype = autocast_adapter_dtype
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)

    def _create_and_replace(
        self,
        config: LoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        *,
        parameter_name: str | None = None,
    ) -> None:
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        kwargs = {
            "r": config.rank_pattern.get(r_key, config.r),
            "lora_alpha": config.alpha_pattern.get(alpha_key, config.lora_alpha),
            "lora_dropout": config.lora_dropout,
            "fan_in_fan_out": config.fan_in_fan_out,
            "init_lora_weights": config.init_lora_weights,
            "use_rslora": config.use_rslora,
            "lora_bias": config.lora_bias,
            "autocast_adapter_dtype": getattr(self, "_autocast_adapter_dtype", True),
            "use_dora": config.use_dora,
            "ephemeral_gpu_offload": config.runtime_config.ephemeral_gpu_offload,
            "loftq_config": config.loftq_config,
            "lora_ga_config": config.lora_ga_config,
        }
        if parameter_name is not None:
            variants = alora.variant_fields(config)
            if variants:
                raise ValueError(
                    f"LoRA on the parameter {current_key!r} (target_parameters) does not work with LoRA variants, "
                    f"but the config turns on {list(variants)} (as in HF PEFT)."
                )
            self._create_and_replace_parameter(
                adapter_name, target, target_name, parent, current_key, parameter_name, kwargs
            )
            return
        _check_variants(config, target, current_key)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if config.lora_bias and not isinstance(base, nn.Embedding) and getattr(base, "bias", None) is None:
            warnings.warn(
                f"lora_bias=True but the targeted {type(base).__name__} {current_key!r} has no bias, so this adapter "
                "can't be merged into it.",
                PeftWarning,
                stacklevel=5,
            )
        if config.alora_invocation_tokens:
            kwargs["use_alora"] = True
        with lora_init.naming(current_key):
            if isinstance(target, LoraLayer):
                layer_kwargs = {k: v for k, v in kwargs.items() if k not in ("fan_in_fan_out", "ephemeral_gpu_offload")}
                target.update_layer(adapter_name, **layer_kwargs)
                _check_dora_supported(config, adapter_name, target, current_key)
                if self._check_tied_module_exists(config, current_key):
                    self._tie_to_embedding_adapter(target, adapter_name, config, current_key)
                return
            new_module = self._create_new_module(config, adapter_name, target, current_key, **kwargs)
        _check_dora_supported(config, adapter_name, new_module, current_key)
        if self._check_tied_module_exists(config, current_key):
            self._tie_to_embedding_adapter(new_module, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _tie_to_embedding_adapter(self, layer: nn.Module, adapter_name: str, config: LoraConfig, key: str) -> None:
        """ensure_weight_tying: make the LoRA of the output layer `layer` the input embeddings' one, transposed
        (A = B_emb.T, B = A_emb.T, as HF PEFT ties them): separate parameters over the same memory, so both layers
        always hold the same factors. The initial values are the output layer's (HF PEFT initialises through the
        tie), except with init_lora_weights=False, where they are the embeddings'."""
        embeddings = self.model.get_input_embeddings()
        if not isinstance(embeddings, LoraLayer) or adapter_name not in embeddings.lora_embedding_A:
            raise ValueError(
                f"ensure_weight_tying: the LoRA of {key!r} is to be tied to the input embeddings' LoRA, but the input "
                f"embeddings carry no LoRA of adapter {adapter_name!r}."
            )
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            raise ValueError(
                f"ensure_weight_tying: {key!r} is tied to the input embeddings but is no LoRA Linear layer."
            )
        embedding_A, embedding_B = embeddings.lora_embedding_A[adapter_name], embeddings.lora_embedding_B[adapter_name]
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if lora_A.weight.shape != embedding_B.T.shape or lora_B.weight.shape != embedding_A.T.shape:
            raise ValueError(
                f"ensure_weight_tying: the LoRA of {key!r} (A {tuple(lora_A.weight.shape)}, B "
                f"{tuple(lora_B.weight.shape)}) can't be tied to the input embeddings' (A {tuple(embedding_A.shape)}, "
                f"B {tuple(embedding_B.shape)}); give both the same rank."
            )
        if config.init_lora_weights is not False:
            with torch.no_grad():
                embedding_B.copy_(lora_A.weight.T)
                embedding_A.copy_(lora_B.weight.T)
        lora_A.weight = nn.Parameter(embedding_B.detach().T, requires_grad=lora_A.weight.requires_grad)
        lora_B.weight = nn.Parameter(embedding_A.detach().T, requires_grad=lora_B.weight.requires_grad)

    def _prepare_model(self, config: LoraConfig, model: nn.Module) -> Callable[[], None]:
        """`layer_replication`: stack the decoder layers as the config asks before LoRA goes in (every copy gets a
        LoRA of its own, the base weights are shared)."""
        if config.layer_replication:
            return replicate_layers(model, config.layer_replication)
        return super()._prepare_model(config, model)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        replicated = [name for name, config in self.peft_config.items() if getattr(config, "layer_replication", None)]
        if replicated:
            # HF PEFT means to refuse this too (its check looks the option up on the dict of configs, so it never
            # fires, and merging then adds every copy's delta into the one weight they share).
            raise ValueError(
                f"Can't merge LoRA layers when base model layers are replicated (layer_replication of adapter(s) "
                f"{replicated}): the copies share their base weights, so each copy's delta would land in all of "
                "them. Use the model unmerged."
            )

    def _add_modules_to_save_to_tie(self, config: LoraConfig, tied_names: list[str]) -> None:
        """ensure_weight_tying with the embeddings in modules_to_save: the input embeddings get the copy (added to
        modules_to_save if only the output layer was listed) and the tied output layers, taken out of
        modules_to_save, share its weight (`config.modules_to_tie`)."""
        config.modules_to_tie = set(tied_names)
        modules_to_save = list(config.modules_to_save or [])
        embeddings = input_embeddings_name(self.model)
        if embeddings not in modules_to_save:
            modules_to_save.append(embeddings)
        _drop_names_matching(modules_to_save, tied_names)
        config.modules_to_save = modules_to_save

    def _add_targets_to_tie(self, config: LoraConfig, tied_names: list[str]) -> None:
        """ensure_weight_tying with the embeddings in target_modules: the input embeddings get the LoRA (added to
        target_modules if only the output layer was listed) and the tied output layers a LoRA tied to theirs
        (`config.target_modules_to_tie`)."""
        config.target_modules_to_tie = set(tied_names)
        embeddings = input_embeddings_name(self.model)
        targets = config.target_modules
        if isinstance(targets, str):
            config.target_modules = rf"(?:{targets}|^{re.escape(embeddings)}$)"
            return
        targets = set(targets or [])
        targets.add(embeddings)
        _drop_names_matching(targets, tied_names)
        config.target_modules = targets

    def _create_and_replace_parameter(
        self,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str,
        kwargs: dict[str, Any],
    ) -> None:
        """Put `adapter_name` on the parameter `parameter_name` of `target` (the module now at that path, possibly
        already wrapped): into the ParamWrapper of that parameter if there is one (a further adapter), else into a
        new ParamWrapper around `target` (HF PEFT's nesting: the parameter targeted last is outermost)."""
        module = target
        while isinstance(module, ParamWrapper):
            if module.parameter_name == parameter_name:
                module.update_layer(adapter_name, **{k: v for k, v in kwargs.items() if k != "fan_in_fan_out"})
                return
            module = module.base_layer
        if isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"Can't put LoRA on the parameter {current_key!r} (target_parameters): its module is a "
                f"{type(module).__name__} adapter layer already, from target_modules. Target the module or its "
                "parameter, not both."
            )
        new_module = ParamWrapper(
            target, adapter_name, parameter_name=parameter_name, target_name=current_key, **kwargs
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        # Before anything looks at the targets, as HF PEFT: on transformers v5 MoE models, v4 expert layer names
        # become target_parameters.
        convert_v4_moe_targets(config, self.model)
        super()._check_new_adapter_config(config)
        # Which parameter a ParamWrapper adapts is its place in the nesting, which is part of the state_dict keys:
        # adapters that targeted different parameters would nest differently (HF PEFT has the same rule).
        if not config.target_parameters:
            return
        wanted = set(config.target_parameters)
        for name, other in self.peft_config.items():
            if other is not config and other.target_parameters and set(other.target_parameters) != wanted:
                raise ValueError(
                    "All adapters that use target_parameters must target the same parameters (as in HF PEFT), but "
                    f"the new adapter has {sorted(wanted)} and adapter {name!r} has {sorted(other.target_parameters)}."
                )

    @staticmethod
    def _create_new_module(
        config: LoraConfig, adapter_name: str, target: nn.Module, current_key: str, **kwargs: Any
    ) -> nn.Module:
        # User-registered layer types go first, so they can also take over the types peftfast knows (HF PEFT's order).
        new_module = dispatch_custom(target, adapter_name, config, **kwargs)
        # bitsandbytes layers subclass nn.Linear: their dispatchers go before the default one.
        for dispatcher in (dispatch_bnb_8bit, dispatch_bnb_4bit, dispatch_multihead_attention, dispatch_default):
            if new_module is None:
                new_module = dispatcher(target, adapter_name, config, **kwargs)
        if new_module is None:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            type_name = f"{type(base).__module__}.{type(base).__name__}"
            raise ValueError(
                f"Target module {current_key!r} is a {type_name}, which LoRA does not support. Supported: "
                "torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d/2d/3d, transformers.pytorch_utils.Conv1D, "
                "torch.nn.MultiheadAttention. "
                "Leave it out of target_modules, or write a LoRA layer for it and register it with "
                f"config._register_custom_module({{{type_name}: YourLoraLayer}}) (again before each load: the "
                "mapping is not saved)."
            )
        return new_module

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        # PiSSA, OLoRA, LoftQ, CorDA and LoRA-GA rewrite base weights layer by layer: a failure part-way undoes that
        # too, not only the module replacements.
        with weight_journal.reversible():
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )

    def subtract_mutated_init(
        self, output_state_dict: dict[str, torch.Tensor], adapter_name: str, kwargs: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Turn the trained factors of an adapter whose initialisation moved part of the base weight into it
        (PiSSA, OLoRA, CorDA, LoRA-GA: W = W_res + s B0 A0) into a plain LoRA on the original W, given the initial
        factors as adapter `adapter_name`: training made W_res + s B A = W + s (B A - B0 A0), and
        B A - B0 A0 = [B | -B0] @ [A ; A0], a LoRA of twice the rank (HF PEFT's conversion, same keys).

        `output_state_dict` is the trained adapter's state dict as saved (HF PEFT's keys); returns the converted one.
        """
        from ...utils.save_and_load import get_peft_model_state_dict

        state_dict = (kwargs or {}).get("state_dict")
        initial = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=adapter_name)
        converted = {}
        for key, value in output_state_dict.items():
            # The trained adapter's keys are relative to the PeftModel ("base_model.model...."), the initial
            # adapter's to this tuner ("model....").
            initial_key = key.split(".", 1)[1] if key.startswith("base_model.") else key
            if "lora_A" in key:
                converted[key] = torch.cat([value, initial[initial_key].to(value.dtype)], dim=0)
            elif "lora_B" in key:
                converted[key] = torch.cat([value, -initial[initial_key].to(value.dtype)], dim=1)
        return converted

    @classmethod
    def _convert_state_dict_for_initial_model(
        cls,
        peft_model: nn.Module,
        peft_config: LoraConfig,
        path_initial_model_for_weight_conversion: str | os.PathLike,
        output_state_dict: dict[str, torch.Tensor],
        kwargs: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """Load the initial adapter saved at `path_initial_model_for_weight_conversion` next to the trained one,
        with init_lora_weights=True so that loading it changes no base weight (HF PEFT rewrites that folder's
        config for this; here it is only read), convert with `subtract_mutated_init`, and take it out again: the
        model is left as it was, train/eval mode included."""
        from ...config import PeftConfig
        from ...utils.rollback import ModuleTreeRollback
        from ...utils.save_and_load import load_peft_weights

        if peft_config.use_rslora and (peft_config.rank_pattern or peft_config.alpha_pattern):
            raise ValueError(
                "path_initial_model_for_weight_conversion can't convert an adapter that uses use_rslora together "
                "with rank_pattern or alpha_pattern: doubling the rank changes rsLoRA's scaling per layer."
            )
        if not str(peft_config.init_lora_weights).lower().startswith(("pissa", "corda", "olora", "lora_ga", "true")):
            warnings.warn(
                "path_initial_model_for_weight_conversion only converts PiSSA/CorDA/OLoRA/LoRA-GA adapters to LoRA; "
                f"this adapter has init_lora_weights={peft_config.init_lora_weights!r}.",
                stacklevel=4,
            )
        path = os.fspath(path_initial_model_for_weight_conversion)
        initial_config = copy.deepcopy(PeftConfig.from_pretrained(path))
        if getattr(initial_config, "peft_type", None) != peft_config.peft_type:
            raise ValueError(f"The initial adapter in {path!r} is not a LoRA adapter.")
        initial_config.init_lora_weights = True
        initial_config.inference_mode = True
        weights = load_peft_weights(path)
        initial_name = "initial_for_conversion"
        while initial_name in peft_model.peft_config:
            initial_name += "_"
        rollback = ModuleTreeRollback(peft_model)
        try:
            peft_model.add_adapter(initial_name, initial_config)
            peft_model._load_weights(weights, initial_name, False, False, path)
            return peft_model.base_model.subtract_mutated_init(output_state_dict, initial_name, kwargs)
        finally:
            rollback.restore()

    @staticmethod
    def _replace_module(parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        # LoRA's `bias` option trains base-model biases too.
        for adapter_name in self.active_adapters:
            bias = self.peft_config[adapter_name].bias
            if bias == "none":
                continue
            if bias == "all":
                for name, param in model.named_parameters():
                    if name.endswith(".bias"):
                        param.requires_grad_(True)
            elif bias == "lora_only":
                for module in model.modules():
                    if isinstance(module, LoraLayer) and getattr(module.get_base_layer(), "bias", None) is not None:
                        module.get_base_layer().bias.requires_grad_(True)

    def _mixed_batch_source(self) -> MixedBatchSource:
        source = self.__dict__.get("_mixed_batch_source_object")
        if source is None:
            source = self.__dict__["_mixed_batch_source_object"] = MixedBatchSource()
        return source

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Hand `adapter_names` (one per batch row) to every LoRA layer and modules_to_save wrapper, and
        `alora_offsets` (one per row, see `alora`) to every layer with an aLoRA adapter, for the duration of one call.
        Both are turned into one shared object here (rows grouped by adapter; offsets as a device tensor, token masks
        built once per call), which every layer reuses."""
        adapter_names = kwargs.pop("adapter_names", None)
        alora_offsets = kwargs.pop("alora_offsets", None)
        if adapter_names is None and alora_offsets is None:
            yield
            return
        handles = []
        failed = False
        try:
            if alora_offsets is not None:
                handles.extend(self._install_alora_offsets(alora_offsets, kwargs))
            if adapter_names is not None:
                handles.extend(self._install_adapter_names(adapter_names, kwargs))
            yield
        except BaseException:
            failed = True
            raise
        finally:
            alora.remove_handles(handles, failed=failed)

    def _install_alora_offsets(self, offsets: Any, kwargs: dict[str, Any]) -> list[Any]:
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            raise ValueError("Beam search not yet supported for aLoRA (as in HF PEFT); use num_beams=1.")
        device = next((p.device for p in self.model.parameters() if p.device.type != "meta"), None)
        offsets = alora.AloraOffsets.of(offsets, device=device)
        repeats = kwargs.get("num_return_sequences")
        if isinstance(repeats, int) and repeats > 1:
            # generate repeats each input row num_return_sequences times.
            offsets = offsets.repeat_rows(repeats)
        return alora.install_offsets(self.model, offsets, _has_alora_adapter)

    def _mixed_batch_source(self) -> MixedBatchSource:
        source = self.__dict__.get("_mixed_batch_source_object")
        if source is None:
            source = self.__dict__["_mixed_batch_source_object"] = MixedBatchSource()
        return source

    def _install_adapter_names(self, adapter_names: Any, kwargs: dict[str, Any]) -> list[Any]:
        """The names become a `MixedBatch` once, here, with the rows' adapter indices already on the layers' devices:
        peftfast's LoRA layers read it from the model's mixed-batch source (no hook, and data rather than Python values
        inside a compiled forward); other adapter layers and wrappers get the names as their `adapter_names` keyword
        through a hook. Returns what to `remove()` after the call."""
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per batch row; got {adapter_names!r}.")
        if self.training:
            raise ValueError("Mixed-adapter batches (adapter_names=...) are for inference; call model.eval() first.")
        known = set(self.peft_config) | {"__base__"}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) {unknown} in adapter_names; available: "
                f"{list(self.peft_config)} and '__base__'."
            )
        readers, others = [], []
        for _, module in named_modules_outside_adapters(self.model):
            if reads_mixed_batch_source(module):
                readers.append(module)
            elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                others.append(module)
        if any(isinstance(module, BaseTunerLayer) and module.merged for module in readers + others):
            raise ValueError(
                "Mixed-adapter batches (adapter_names=...) can't run with merged adapters; "
                "call unmerge_adapter() first."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # Beam search repeats each input row num_beams times.
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        devices = {weights[0].device for weights in map(_first_adapter_weight, readers) if weights}
        batch = MixedBatch(adapter_names, adapters=tuple(self.peft_config), devices=devices)
        source = self._mixed_batch_source()
        for module in readers:
            if module._mixed_batch_source is not source:
                module._mixed_batch_source = source
        handles: list[Any] = [_MixedBatchInstalled(source, batch)]
        for module in others:
            hook = partial(_adapter_names_pre_forward_hook, adapter_names=batch.groups)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def alora_offsets_for_call(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The aLoRA offsets of a causal LM `forward`/`generate` call with these arguments (see
        `alora.offsets_for_call`): from `input_ids` (keyword, or the first positional argument), per row of
        `adapter_names` when given; None when no adapter of the call is an aLoRA adapter."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        return alora.offsets_for_call(
            self.peft_config,
            self.active_adapters,
            input_ids,
            adapter_names=kwargs.get("adapter_names"),
            has_inputs_embeds=kwargs.get("inputs_embeds") is not None,
        )

    def _refuse_alora_merge(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        # Checked for the whole model first, so that a refused merge leaves every layer as it was.
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        activated = [name for name in names if getattr(self.peft_config.get(name), "alora_invocation_tokens", None)]
        if activated:
            raise NotImplementedError(
                f"aLoRA does not support {'safe ' if safe_merge else ''}merging (adapter(s) {activated}): an aLoRA "
                "adapter acts on some tokens only, which no merged weight can do (as in HF PEFT)."
            )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._refuse_alora_merge(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _tuner_layers(self) -> Iterator[BaseTunerLayer]:
        # The out_proj layer of a LoRA MultiheadAttention is merged and unmerged by that attention layer.
        owned = {
            id(module.base_layer.out_proj) for module in self.model.modules() if isinstance(module, MultiheadAttention)
        }
        return (module for module in super()._tuner_layers() if id(module) not in owned)

    def _unload_and_optionally_merge(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        if merge:
            self._refuse_alora_merge(adapter_names, safe_merge)
        attentions = [
            module.get_base_layer() for module in self.model.modules() if isinstance(module, MultiheadAttention)
        ]
        model = super()._unload_and_optionally_merge(merge=merge, safe_merge=safe_merge, adapter_names=adapter_names)
        # The attention layers are back, each still with its out_proj's LoRA layer: put the plain out_proj back too.
        for attention in attentions:
            if isinstance(attention.out_proj, BaseTunerLayer):
                attention.out_proj = attention.out_proj.get_base_layer()
        return model

    def _check_add_weighted_adapter(
        self, adapters: list[str], weights: list[float], combination_type: str, svd_rank: int | None
    ) -> tuple[str, int, set[str] | str]:
        """Validate `add_weighted_adapter`'s arguments; return the effective combination type, the new rank and the
        new adapter's target_modules."""
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} do not exist; available: {list(self.peft_config)}.")
        on_parameters = [name for name in adapters if self.peft_config[name].target_parameters]
        if on_parameters:
            raise ValueError(
                f"add_weighted_adapter can't combine adapters that use target_parameters ({on_parameters}), as in HF "
                "PEFT."
            )
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one adapter to combine.")
        if len(weights) != len(adapters):
            raise ValueError(f"Got {len(weights)} weights for the {len(adapters)} adapters {adapters}; pass one each.")
        for module_name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                owners = [name for name in adapters if name in module.modules_to_save]
                if len(owners) > 1:
                    raise ValueError(
                        f"Adapters {owners} each have their own copy of {module_name!r} (modules_to_save); whole "
                        "modules can't be combined. Combine adapters of which at most one saves that module."
                    )
        # With one adapter, only a linear combination makes sense (it is just a rescaling).
        combination_type = "linear" if len(adapters) == 1 else combination_type
        # The largest rank any layer has: the new adapter's factors must hold every layer's.
        ranks = [max([cfg.r, *cfg.rank_pattern.values()]) for cfg in (self.peft_config[name] for name in adapters)]
        if combination_type in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
            if len(set(ranks)) != 1:
                raise ValueError(
                    f"combination_type={combination_type!r} needs adapters of one rank, got ranks {ranks} for "
                    f"{adapters}; use 'cat' or 'svd' to combine adapters of different ranks."
                )
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type in _SVD_COMBINATIONS:
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"Invalid combination_type {combination_type!r}; expected one of {sorted(_COMBINATIONS)}.")
        targets = [self.peft_config[name].target_modules for name in adapters]
        if all(isinstance(target, str) for target in targets):
            new_targets: set[str] | str = "|".join(f"({target})" for target in targets)
        elif not any(isinstance(target, str) for target in targets):
            new_targets = set().union(*targets)
        else:
            raise ValueError(
                f"The target_modules of {adapters} mix a regex (string) with lists of names; combine adapters whose "
                "target_modules are all regexes or all lists."
            )
        return combination_type, new_rank, new_targets

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: Literal[
            "svd",
            "linear",
            "cat",
            "ties",
            "ties_svd",
            "dare_ties",
            "dare_linear",
            "dare_ties_svd",
            "dare_linear_svd",
            "magnitude_prune",
            "magnitude_prune_svd",
        ] = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: Literal["total", "frequency"] = "total",
    ) -> None:
        """Add a new, inactive adapter `adapter_name` that combines `adapters` with `weights` (negative subtracts).

        - "cat": concatenates the factors; exact (delta = sum_i weight_i * delta_i); rank = sum of the ranks.
        - "svd" (and "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"): combines the full
          delta weights, then keeps the top `svd_rank` singular directions (default: the largest rank);
          `svd_clamp` clamps the factors to that quantile, `svd_full_matrices`/`svd_driver` go to torch.linalg.svd.
        - "linear" (and "ties", "dare_linear", "dare_ties", "magnitude_prune"): combines the A factors and the B
          factors separately (each scaled by sqrt(|weight * scaling|)); needs equal ranks; an approximation.
          `density` and `majority_sign_method` parametrise the TIES/DARE/pruning variants.

        The new adapter has r = lora_alpha = its rank (scaling 1, the old scalings are folded in), the target
        modules of all `adapters`, and the other settings of the first one. If `adapter_name` exists already,
        nothing happens (as in HF PEFT).
        """
        if adapter_name in self.peft_config:
            warnings.warn(f"Adapter {adapter_name!r} exists already; add_weighted_adapter did nothing.", stacklevel=2)
            return
        combination_type, new_rank, new_targets = self._check_add_weighted_adapter(
            adapters, weights, combination_type, svd_rank
        )
        # rsLoRA is turned off so that the new adapter's scaling is exactly 1: the factors already hold the scalings.
        first = self.peft_config[adapters[0]]
        # The combined factors are computed below; an initialisation that rewrites base weights (PiSSA, LoftQ, ...)
        # must not run again on the model's current weights (HF PEFT runs it and so changes the base a second time).
        init = True if first.init_lora_weights == "loftq" or changes_base_weights(first.init_lora_weights) else None
        self.peft_config[adapter_name] = replace(
            first,
            r=new_rank,
            lora_alpha=new_rank,
            use_rslora=False,
            target_modules=new_targets,
            alpha_pattern={},
            rank_pattern={},
            **({} if init is None else {"init_lora_weights": init, "loftq_config": {}}),
        )
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        self.set_requires_grad(adapter_name, requires_grad=False)

        for key, target in self.model.named_modules():
            if self.prefix in key or not isinstance(target, LoraLayer):
                continue
            if adapter_name in target.lora_A:
                new_A, new_B = target.lora_A[adapter_name].weight, target.lora_B[adapter_name].weight
            elif adapter_name in target.lora_embedding_A:
                new_A, new_B = target.lora_embedding_A[adapter_name], target.lora_embedding_B[adapter_name]
            else:
                continue
            present = [(name, weight) for name, weight in zip(adapters, weights) if name in target.scaling]
            if not present:
                raise ValueError(f"Layer {key!r} has adapter {adapter_name!r} but none of {adapters}.")
            with torch.no_grad():
                if combination_type == "cat":
                    # Stacking the factors sums the deltas exactly; a layer whose adapters have smaller ranks (from a
                    # rank_pattern) leaves the rest of the new factors zero.
                    factors = [(_lora_factors(target, name), weight * target.scaling[name]) for name, weight in present]
                    cat_A = torch.cat([A * scale for (A, _), scale in factors], dim=0)
                    cat_B = torch.cat([B for (_, B), _ in factors], dim=1)
                    new_A.zero_()
                    new_B.zero_()
                    new_A[: cat_A.shape[0]] = cat_A
                    new_B[:, : cat_B.shape[1]] = cat_B
                elif combination_type in _SVD_COMBINATIONS:
                    new_A.data, new_B.data = _svd_combination(
                        target,
                        present,
                        combination_type,
                        new_rank,
                        new_A.shape,
                        new_B.shape,
                        density,
                        majority_sign_method,
                        svd_clamp,
                        svd_full_matrices,
                        svd_driver,
                    )
                else:
                    new_A.data, new_B.data = _factor_combination(
                        target, present, combination_type, density, majority_sign_method
                    )


_FACTOR_COMBINATIONS = {
    "linear": merge_utils.task_arithmetic,
    "ties": merge_utils.ties,
    "dare_linear": merge_utils.dare_linear,
    "dare_ties": merge_utils.dare_ties,
    "magnitude_prune": merge_utils.magnitude_prune,
}
_SVD_COMBINATIONS = {
    "svd": merge_utils.task_arithmetic,
    "ties_svd": merge_utils.ties,
    "dare_linear_svd": merge_utils.dare_linear,
    "dare_ties_svd": merge_utils.dare_ties,
    "magnitude_prune_svd": merge_utils.magnitude_prune,
}
_COMBINATIONS = {"cat", *_FACTOR_COMBINATIONS, *_SVD_COMBINATIONS}


def _lora_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of `adapter` on `layer`: A is [r, in] (embeddings: [r, num_embeddings]), B is [out, r]."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
    return layer.lora_embedding_A[adapter].detach(), layer.lora_embedding_B[adapter].detach()


def _combine(
    function: Any,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: str,
) -> torch.Tensor:
    if function is merge_utils.task_arithmetic:
        return function(tensors, weights)
    if function in (merge_utils.ties, merge_utils.dare_ties):
        return function(tensors, weights, density, majority_sign_method)
    return function(tensors, weights, density)


def _factor_combination(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the A factors and the B factors separately; each gets sqrt(|weight * scaling|), A also the sign."""
    factors = [_lora_factors(layer, name) for name, _ in present]
    scaled = [weight * layer.scaling[name] for name, weight in present]
    dtype, device = factors[0][0].dtype, factors[0][0].device
    weights_A = torch.tensor([math.copysign(math.sqrt(abs(value)), value) for value in scaled], device=device)
    weights_B = torch.tensor([math.sqrt(abs(value)) for value in scaled], device=device)
    function = _FACTOR_COMBINATIONS[combination_type]
    new_A = _combine(function, [A for A, _ in factors], weights_A, density, majority_sign_method)
    new_B = _combine(function, [B for _, B in factors], weights_B, density, majority_sign_method)
    return new_A.to(dtype), new_B.to(dtype)


def _svd_combination(
    layer: LoraLayer,
    present: list[tuple[str, float]],
    combination_type: str,
    new_rank: int,
    shape_A: torch.Size,
    shape_B: torch.Size,
    density: float | None,
    majority_sign_method: str,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the delta weights (scalings included), then factor the result by a truncated SVD."""
    deltas = [layer.get_delta_weight(name).detach() for name, _ in present]
    weights = torch.tensor([weight for _, weight in present], device=deltas[0].device)
    delta = _combine(_SVD_COMBINATIONS[combination_type], deltas, weights, density, majority_sign_method)
    is_embedding = any(name in layer.lora_embedding_A for name, _ in present)
    if delta.dim() > 2:
        # A convolution: factor [out, in * kernel] and reshape the factors back into conv kernels.
        delta = delta.flatten(start_dim=1)
    elif getattr(layer, "fan_in_fan_out", False) or is_embedding:
        # Those deltas are stored transposed ([in, out]); factor the [out, in] matrix B @ A.
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    if len(shape_A) > 2:
        U, Vh = U.reshape(shape_B), Vh.reshape(shape_A)
    return Vh, U
