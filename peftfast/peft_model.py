"""`PeftModel` and its task wrappers: the object users train, save, load and switch adapters on."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .registry import PEFT_TYPE_TO_TUNER_MAPPING, model_class
from .tuners.tuners_utils import (
    BasePromptEncoder,
    BaseTunerLayer,
    TunerLayerStatus,
    TunerModelStatus,
    count_parameters,
    get_layer_status,
    get_model_status,
)
from .utils import weight_journal
from .utils.cache import CACHE_ARGUMENT_NAMES, cache_argument, cache_key, get_cache
from .utils.constants import (
    CONFIG_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    SEQ_CLS_HEAD_NAMES,
    TOKEN_CLS_HEAD_NAMES,
    WEIGHTS_NAME,
)
from .utils.hub import PushToHubMixin, split_hub_kwargs
from .utils.names import adapter_name_list, check_adapter_name
from .utils.other import (
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    named_modules_outside_adapters,
    set_trainable_modules,
)
from .utils.peft_types import TaskType
from .utils.rollback import ModuleTreeRollback
from .utils.save_and_load import (
    _apply_adapter_load,
    _plan_adapter_load,
    get_peft_model_state_dict,
    load_peft_weights,
    path_inside,
)
from .version import __version__

_MODEL_CARD = """---
{base_model}library_name: peft
tags:
{tags}
---

# Adapter

A {peft_type} adapter saved by peftfast {version} in HF PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`); it loads with `peft` or `peftfast`.
"""


class PeftModel(PushToHubMixin, nn.Module):
    """A base model with adapters; same surface as `peft.PeftModel`.

    For a tuner method (LoRA, ...) `base_model` is the tuner, which holds the model with adapter layers put in. For a
    prompt-learning method `base_model` is the model itself, left as it is (only `modules_to_save` get wrapped);
    the prompt's encoders are `prompt_encoder[adapter_name]`, their virtual token ids `prompt_tokens[adapter_name]`,
    and the task classes prepend the prompt in `forward` and `generate`.

    Args:
        model: the base model (a transformers `PreTrainedModel` or any `nn.Module`).
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name.
        autocast_adapter_dtype: keep fp16/bf16 adapter weights in fp32 (HF PEFT's default).
        low_cpu_mem_usage: create the adapter weights on the meta device (to be loaded into).
    """

    special_peft_forward_args = {"adapter_names", "alora_offsets"}

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.peft_type = peft_config.peft_type
        self._adapters_disabled = False
        tuner_cls = model_class(peft_config)
        self._is_prompt_learning = peft_config.is_prompt_learning
        if self._is_prompt_learning:
            _check_no_adapter_layers(model, peft_config)
            self._peft_config: dict[str, PeftConfig] = {}
            self._prompt_active_adapter: str | list[str] = adapter_name
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens: dict[str, torch.Tensor] = {}
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
            self._show_base_forward_signature()
            return
        kwargs = {"low_cpu_mem_usage": low_cpu_mem_usage}
        if "autocast_adapter_dtype" in tuner_cls.__init__.__code__.co_varnames:
            kwargs["autocast_adapter_dtype"] = autocast_adapter_dtype
        self.base_model = tuner_cls(model, {adapter_name: peft_config}, adapter_name, **kwargs)
        # As HF PEFT: a method whose layers don't take the dtype choice themselves (trainable tokens) gets it here.
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1
        self._show_base_forward_signature()

    def _show_base_forward_signature(self) -> None:
        # transformers' Trainer keeps only the dataset columns that model.forward names, and looks through HF PEFT's
        # PeftModel to the base model, but not through this class: so `forward` shows the base model's signature.
        base_forward = getattr(self.get_base_model(), "forward", None)
        if base_forward is not None:
            self.forward = functools.update_wrapper(
                functools.partial(type(self).forward, self), base_forward, assigned=("__doc__",), updated=()
            )

    # Attributes not found here are looked up on the tuner, then the base model (merge_and_unload, config, ...).
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules_to_save names of all adapters (None when there are none), as in HF PEFT."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or [])
        return names or None

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        if self._is_prompt_learning:
            return self._peft_config
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        if self._is_prompt_learning:
            return self._prompt_active_adapter
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        if self._is_prompt_learning:
            active = self._prompt_active_adapter
            return [active] if isinstance(active, str) else list(active)
        return self.base_model.active_adapters

    @property
    def has_active_enabled_adapter(self) -> bool:
        """False inside `disable_adapter()`, as in HF PEFT; also True, outside it, when no adapter is active (HF PEFT's
        rule, kept so code written against it behaves the same)."""
        if self._is_prompt_learning:
            return not self._adapters_disabled
        return not self._adapters_disabled or not self.active_adapters

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapters can be converted to LoRA (`peftfast.tuners.lora.convert_to_lora`): every adapter
        layer adds a delta weight to its base weight. Never for prompt learning."""
        if self._is_prompt_learning:
            return False
        return self.base_model.supports_lora_conversion(adapter_name)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def targeted_module_names(self) -> list[str]:
        # A prompt-learning method targets no module of the model.
        return [] if self._is_prompt_learning else self.base_model.targeted_module_names

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._is_prompt_learning else self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, as HF PEFT counts them."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def _forward_context(self, *args: Any, **kwargs: Any):
        enable = getattr(self.base_model, "_enable_peft_forward_hooks", None)
        return enable(*args, **kwargs) if enable is not None else nullcontext()

    def _prompt_is_on(self) -> bool:
        return self._is_prompt_learning and not self._adapters_disabled and bool(self.active_adapters)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._prompt_is_on():
            return self._prompt_learning_forward(*args, **kwargs)
        with self._forward_context(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self._prompt_is_on():
            return self._prompt_learning_generate(*args, **kwargs)
        with self._forward_context(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    # Prompt learning. The model's inputs get `num_virtual_tokens` more positions in front: prompt embeddings
    # prepended to the input embeddings, or (prefix tuning, `encoder.kv_prefix`) keys and values already in the cache.

    # Whether `labels` has one entry per input token (causal LM), so that it gets -100 for the virtual tokens.
    _labels_per_token = False

    def _active_prompt_encoder(self) -> BasePromptEncoder:
        return self.prompt_encoder[self.active_adapter]

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        """Build adapter `adapter_name`'s prompt encoder and virtual token ids, completing its config from the model's
        (layers, hidden size, heads), and freeze the base model."""
        config = self.peft_config[adapter_name]
        encoder_cls = model_class(config)
        base = self.base_model
        own_copies = {id(p) for m in base.modules() if isinstance(m, ModulesToSaveWrapper) for p in m.parameters()}
        for param in base.parameters():
            if id(param) not in own_copies:
                param.requires_grad_(False)
        self.transformer_backbone_name, backbone = _transformer_backbone(base)
        # Registered here as in HF PEFT, so state_dict keys match (parameters are shared, not counted twice).
        self.word_embeddings = _word_embeddings(base, backbone)
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
        _prepare_prompt_learning_config(config, getattr(base, "config", None), kv_prefix=encoder_cls.kv_prefix)
        if encoder_cls.kv_prefix and any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
            raise ValueError(
                f"{config.peft_type} feeds its prefix through the key/value cache, which gradient checkpointing "
                "turns off; disable gradient checkpointing on the model first."
            )
        encoder = encoder_cls(config, self.word_embeddings) if encoder_cls.uses_word_embeddings else encoder_cls(config)
        device = next((p.device for p in base.parameters() if p.device.type != "meta"), None)
        if device is not None:
            encoder = encoder.to(device)
        if config.inference_mode:
            encoder.requires_grad_(False)
        self.prompt_encoder[adapter_name] = encoder
        self.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens * config.num_transformer_submodules)
        if config.modules_to_save:
            set_trainable_modules(
                base,
                adapter_name,
                config.modules_to_save,
                inference_mode=config.inference_mode,
                activate_adapter=adapter_name in self.active_adapters,
            )

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What adapter files hold for a prompt-learning adapter (`prompt_embeddings`): the encoder's output for its
        virtual tokens, `[num_virtual_tokens * num_transformer_submodules, width]` (prefix tuning: `[num_virtual_tokens,
        2 * num_layers * token_dim]`), detached, on the CPU."""
        self._check_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        if not config.is_prompt_learning:
            raise ValueError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not a prompt-learning one.")
        encoder = self.prompt_encoder[adapter_name]
        tokens = self.prompt_tokens[adapter_name].to(encoder.embedding.weight.device)
        if encoder.kv_prefix:
            tokens = tokens[: config.num_virtual_tokens]
        with torch.no_grad():
            return encoder(tokens[None])[0].detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> Any:
        """The active adapter's prompt for a batch of `batch_size` rows: prompt embeddings `[batch, virtual tokens,
        token_dim]`, or for prefix tuning a transformers Cache holding `num_virtual_tokens` keys and values per layer
        (an `EncoderDecoderCache` with an empty cross-attention part for encoder-decoder models)."""
        if task_ids is not None:
            raise ValueError("task_ids are only used by multitask prompt tuning, which peftfast does not implement.")
        config = self.active_peft_config
        encoder = self._active_prompt_encoder()
        tokens = self.prompt_tokens[self.active_adapter].to(encoder.embedding.weight.device)
        if not encoder.kv_prefix:
            # One row through the encoder, then expanded: every row of the batch gets the same prompt.
            prompts = encoder.embedding.weight if config.inference_mode else encoder(tokens[None])[0]
            return prompts.repeat(batch_size, 1, 1)
        table = (
            encoder.embedding.weight if config.inference_mode else encoder(tokens[None, : config.num_virtual_tokens])[0]
        )
        dtype = getattr(self.base_model, "dtype", None)
        if dtype is not None:
            table = table.to(dtype)
        head_dim = config.token_dim // config.num_attention_heads
        past = table.repeat(batch_size, 1, 1).view(
            batch_size, config.num_virtual_tokens, config.num_layers * 2, config.num_attention_heads, head_dim
        )
        if config.num_transformer_submodules == 2:
            past = torch.cat([past, past], dim=2)
        # Per layer: [2 (or 4: self- and cross-attention) x keys/values, batch, heads, virtual tokens, head_dim].
        per_layer = past.permute(2, 0, 3, 1, 4).split(config.num_transformer_submodules * 2)
        from transformers import DynamicCache, EncoderDecoderCache

        if config.num_transformer_submodules == 1:
            return DynamicCache(per_layer)
        cache = EncoderDecoderCache(per_layer)
        # As HF PEFT: only the decoder's self-attention gets the prefix; the cross-attention cache is computed from
        # the encoder's output as usual.
        cache.cross_attention_cache = DynamicCache()
        for layer in cache.is_updated:
            cache.is_updated[layer] = False
        return cache

    def _prompt_learning_kwargs(self, kwargs: dict[str, Any], drop_token_type_ids: bool, warn: bool = True) -> None:
        """Adjust position ids and token type ids to the prompt, in place: prefix tuning shifts position ids past the
        virtual tokens; prepended prompts drop them (the model numbers the longer sequence itself)."""
        config = self.active_peft_config
        if kwargs.get("position_ids") is not None:
            if self._active_prompt_encoder().kv_prefix:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                if warn:
                    warnings.warn(
                        "position_ids are not used with prompt learning (as in HF PEFT); ignored.", stacklevel=4
                    )
                kwargs["position_ids"] = None
        if drop_token_type_ids and kwargs.get("token_type_ids") is not None:
            if warn:
                warnings.warn(
                    "token_type_ids are not used with prompt learning (as in HF PEFT); ignored.", stacklevel=4
                )
            kwargs["token_type_ids"] = None

    def _prompt_learning_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Forward of a decoder-only or encoder-only model with the prompt in front: the attention mask gets ones for
        the virtual tokens, per-token labels get -100 there."""
        config = self.active_peft_config
        encoder = self._active_prompt_encoder()
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        batch_size = _batch_size(input_ids, inputs_embeds)
        virtual = config.num_virtual_tokens
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask.new_ones(batch_size, virtual), attention_mask), dim=1)
        self._prompt_learning_kwargs(kwargs, drop_token_type_ids=self._labels_per_token)
        if labels is not None:
            kwargs["labels"] = labels
        if encoder.kv_prefix:
            kwargs[self._prefix_cache_argument(kwargs)] = self.get_prompt(batch_size)
            return self.base_model(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
            )
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if labels is not None and self._labels_per_token:
            kwargs["labels"] = torch.cat((labels.new_full((batch_size, virtual), -100), labels), dim=1)
        if kwargs.get("token_type_ids") is not None:
            token_type_ids = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((token_type_ids.new_zeros(batch_size, virtual), token_type_ids), dim=1)
        prompts = self.get_prompt(batch_size).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def _prefix_cache_argument(self, kwargs: dict[str, Any]) -> str:
        """The keyword the base model takes the prefix cache by (`cache`, or `past_key_values` before transformers
        5.24), after dropping a cache the caller passed under either spelling: the prefix replaces it, as in HF
        PEFT."""
        name = cache_argument(self.base_model)
        if name is None:
            raise ValueError(
                f"{type(self.base_model).__name__}.forward takes no key/value cache (neither `cache` nor "
                "`past_key_values`), which prefix tuning feeds its prefix through; use prompt tuning or P-tuning for "
                "this model."
            )
        for spelling in CACHE_ARGUMENT_NAMES:
            kwargs.pop(spelling, None)
        return name

    def _prompt_learning_generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"generate with a prompt-learning adapter needs a task-specific PeftModel (task_type CAUSAL_LM or "
            f"SEQ_2_SEQ_LM), not {type(self).__name__}."
        )

    @contextmanager
    def _patched_prepare_inputs_for_generation(self) -> Iterator[None]:
        """Route the base model's `prepare_inputs_for_generation` through `self._prepare_inputs_for_generation` for
        the duration of one `generate` call."""
        base = self.base_model
        original = base.prepare_inputs_for_generation
        own = base.__dict__.get("prepare_inputs_for_generation")

        def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return self._prepare_inputs_for_generation(original, *args, **kwargs)

        base.prepare_inputs_for_generation = prepare
        try:
            yield
        finally:
            if own is None:
                del base.prepare_inputs_for_generation
            else:
                base.prepare_inputs_for_generation = own

    def _prepare_inputs_for_generation(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return original(*args, **kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block: every adapter layer and modules_to_save copy is off (merged
        adapters get unmerged; a prompt is not prepended). On exit the adapters are turned back on, unless they were
        all off before."""
        if self._is_prompt_learning:
            with self._disable_prompt_adapter():
                yield
            return
        status = self.get_model_status()
        if status.enabled == "irregular":
            warnings.warn(
                "Some adapter layers are enabled and others disabled; after the disable_adapter block all of them "
                "will be enabled.",
                stacklevel=3,
            )
        was_disabled = self._adapters_disabled
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled = True
            yield
        finally:
            if status.enabled is not False:
                self.base_model.enable_adapter_layers()
            self._adapters_disabled = was_disabled

    @contextmanager
    def _disable_prompt_adapter(self) -> Iterator[None]:
        wrappers = [m for m in self.base_model.modules() if isinstance(m, ModulesToSaveWrapper)]
        was_disabled = self._adapters_disabled
        enabled = [not wrapper.disable_adapters for wrapper in wrappers]
        try:
            for wrapper in wrappers:
                wrapper.enable_adapters(False)
            self._adapters_disabled = True
            yield
        finally:
            for wrapper, was_enabled in zip(wrappers, enabled):
                if was_enabled:
                    wrapper.enable_adapters(True)
            self._adapters_disabled = was_disabled

    def backend_summary(self) -> dict[str, str | None]:
        """Which backend each LoRA layer's latest forward ran on ("torch", "triton", ...; None if not run yet)."""
        return {name: module.last_backend for name, module in self.named_modules() if hasattr(module, "last_backend")}

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of each adapter layer (see `peftfast.tuners.tuners_utils.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The status of the model's adapters (see `peftfast.tuners.tuners_utils.get_model_status`)."""
        return get_model_status(self)

    def _check_adapter_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}.")

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter, inactive and frozen (activate it with `set_adapter`); the trainability of everything
        already in the model stays as it was. `low_cpu_mem_usage` leaves its weights on the meta device, to be
        loaded into; `autocast_adapter_dtype` keeps them in fp32 on an fp16/bf16 base."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name or delete it first.")
        model_type = getattr(self.peft_type, "value", self.peft_type)
        new_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        if new_type != model_type:
            raise ValueError(
                f"Can't add a {new_type} adapter to a model with {model_type} adapters; one model holds "
                "adapters of one method (as in HF PEFT), so e.g. a prompt-learning method and LoRA can't be mixed."
            )
        if self._is_prompt_learning:
            rollback = ModuleTreeRollback(self)
            self.peft_config[adapter_name] = peft_config
            try:
                self._setup_prompt_encoder(adapter_name)
            except Exception:
                rollback.restore()
                raise
            return
        self.peft_config[adapter_name] = peft_config
        try:
            self.base_model.inject_adapter(self.get_base_model(), adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool) -> None:
        cast = getattr(self.base_model, "_cast_adapter_dtype", None)
        if cast is not None:
            cast(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter (or, beyond HF PEFT's PeftModel, a list of adapters whose deltas add up). Active
        adapters become trainable unless `inference_mode`; the others are frozen."""
        names = adapter_name_list(adapter_name, "adapter_name")
        for name in names:
            self._check_adapter_name(name)
        if self._is_prompt_learning:
            if len(names) != 1:
                raise ValueError(f"A prompt-learning model has one active adapter at a time, got {names}.")
            self._prompt_active_adapter = names[0]
            for module in self.base_model.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    module.set_adapter(names, inference_mode=inference_mode)
            return
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged). If it was active, the first remaining adapter by name becomes
        active."""
        self._check_adapter_name(adapter_name)
        if not self._is_prompt_learning:
            self.base_model.delete_adapter(adapter_name)
            return
        del self.peft_config[adapter_name]
        del self.prompt_encoder[adapter_name]
        del self.prompt_tokens[adapter_name]
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if adapter_name in self.active_adapters and not remaining and self.peft_config:
            remaining = sorted(self.peft_config)[:1]
            warnings.warn(
                f"Adapter {adapter_name!r} was active and is now deleted; {remaining[0]!r} is the active adapter.",
                stacklevel=2,
            )
        for module in self.base_model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(adapter_name, remaining)
        self._prompt_active_adapter = remaining[0] if len(remaining) == 1 else remaining

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as HF PEFT does: `adapter_config.json` + `adapter_model.safetensors`, the default
        adapter in `save_directory` and any other in `save_directory/<name>`, and a README.md model card.

        Every path is checked before anything is written: each must resolve (symlinks followed) inside
        `save_directory`, so nothing is ever written outside it; a path that would leave it raises a ValueError and
        leaves the folder as it was.

        `path_initial_model_for_weight_conversion`: the folder where a PiSSA/OLoRA/CorDA/LoRA-GA adapter was saved
        right after its initialisation. The adapter is then saved converted to a plain LoRA of twice the rank that
        applies to the original base weights (HF PEFT's conversion). Not possible with use_rslora plus
        rank_pattern/alpha_pattern. Unlike HF PEFT, that folder is only read (HF PEFT rewrites its config with
        init_lora_weights=True)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory} is a file.")
        converter = None
        if path_initial_model_for_weight_conversion is not None:
            converter = getattr(type(self.base_model), "_convert_state_dict_for_initial_model", None)
            if self._is_prompt_learning or converter is None:
                raise ValueError(
                    "path_initial_model_for_weight_conversion converts LoRA adapters only; this model has "
                    f"{getattr(self.peft_type, 'value', self.peft_type)} adapters."
                )
        if selected_adapters is None:
            selected_adapters = list(self.peft_config)
        selected_adapters = adapter_name_list(selected_adapters, "selected_adapters")
        unknown = [name for name in selected_adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} are not adapters of this model; available: {list(self.peft_config)}."
            )
        for adapter_name in selected_adapters:
            # A name becomes a folder name: checked again here, whatever way it got into peft_config.
            check_adapter_name(adapter_name, "adapter name")
        weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        card_path = path_inside(save_directory, "README.md")
        outputs = []
        for adapter_name in selected_adapters:
            folder = path_inside(save_directory, adapter_name if adapter_name != "default" else ".")
            for file_name in (weights_name, CONFIG_NAME):
                path_inside(folder, file_name)
            state_dict = get_peft_model_state_dict(
                self,
                state_dict=kwargs.get("state_dict"),
                adapter_name=adapter_name,
                save_embedding_layers=save_embedding_layers,
            )
            if converter is not None and is_main_process:
                state_dict = converter(
                    self, self.peft_config[adapter_name], path_initial_model_for_weight_conversion, state_dict, kwargs
                )
            outputs.append((adapter_name, folder, state_dict))
        card = self._model_card(selected_adapters)
        if not is_main_process:
            return
        os.makedirs(os.path.dirname(card_path), exist_ok=True)
        with open(card_path, "w") as handle:
            handle.write(card)
        for adapter_name, folder, state_dict in outputs:
            config = self.peft_config[adapter_name]
            os.makedirs(folder, exist_ok=True)
            # safetensors refuses tensors that share memory (tied weights): store independent copies.
            state_dict = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
            weights_path = path_inside(folder, weights_name)
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(state_dict, weights_path, metadata={"format": "pt"})
            else:
                torch.save(state_dict, weights_path)
            saved_config = copy.deepcopy(config)
            if saved_config.base_model_name_or_path is None:
                base_config = getattr(self.get_base_model(), "config", None)
                saved_config.base_model_name_or_path = getattr(base_config, "name_or_path", None) or None
            saved_config.inference_mode = True
            if converter is not None:
                _double_rank(saved_config)
            saved_config.save_pretrained(folder, auto_mapping_dict=self._auto_mapping(config))

    def _model_card(self, adapter_names: list[str]) -> str:
        """The README.md `save_pretrained` writes: HF PEFT's front matter (`library_name: peft`, `base_model`, from
        which the Hub builds its model tree, when the base model's name is known, and its tags), then a short text."""
        peft_type = str(getattr(self.peft_type, "value", self.peft_type))
        names = [self.peft_config[name].base_model_name_or_path for name in adapter_names]
        base_config = getattr(self.get_base_model(), "config", None)
        names.append(getattr(base_config, "name_or_path", None))
        base_model = next((name for name in names if name), None)
        tags = ([f"base_model:adapter:{base_model}"] if base_model else []) + [peft_type.lower()]
        if base_config is not None and type(base_config).__module__.startswith("transformers"):
            tags.append("transformers")
        tags.append("peftfast")
        return _MODEL_CARD.format(
            base_model=f"base_model: {_yaml_string(base_model)}\n" if base_model else "",
            tags="\n".join(f"- {_yaml_string(tag)}" for tag in tags),
            peft_type=peft_type,
            version=__version__,
        )

    def _auto_mapping(self, config: PeftConfig) -> dict[str, str] | None:
        # As HF PEFT: without a task type the base model's class is recorded, whatever library it comes from.
        if config.task_type is not None:
            return None
        base = self.get_base_model()
        return {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter saved by HF PEFT or peftfast onto `model`. Frozen unless `is_trainable`. If loading fails
        (a bad config or file, a shape mismatch, missing weights), `model` is left as it was: module tree, every
        `requires_grad` flag and train/eval mode.

        `model_id` is a local folder or a Hugging Face Hub repo id, read through huggingface_hub's cache (kwargs
        such as `subfolder`, `revision`, `cache_dir`, `token`, `local_files_only` go to `hf_hub_download`). With
        `low_cpu_mem_usage` the adapter is created on the meta device and the file's tensors are assigned to it.
        `ephemeral_gpu_offload` sets the config's runtime option (`LoraRuntimeConfig`), as in HF PEFT.
        """
        check_adapter_name(adapter_name)
        hub_kwargs, _ = split_hub_kwargs(kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        elif not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a PeftConfig, got {type(config).__name__}.")
        _set_ephemeral_gpu_offload(config, ephemeral_gpu_offload)
        model_class(config)
        _check_prompt_learning_not_trainable(config, is_trainable)
        config.inference_mode = not is_trainable
        task_type = getattr(config.task_type, "value", config.task_type)
        if cls is PeftModel and task_type in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
        weights = load_peft_weights(model_id, **hub_kwargs)
        # Initialisations such as PiSSA change base weight values when the adapter is added: undone on failure too.
        with weight_journal.reversible(), ModuleTreeRollback.guarding(model):
            peft_model = cls(
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
            peft_model._load_weights(weights, adapter_name, is_trainable, low_cpu_mem_usage, model_id)
        # Weights assigned from the file (low_cpu_mem_usage) carry the file's dtype: apply the dtype policy again.
        peft_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        return peft_model

    def _load_weights(
        self,
        weights: dict[str, torch.Tensor],
        adapter_name: str,
        is_trainable: bool,
        low_cpu_mem_usage: bool,
        model_id: Any,
    ) -> Any:
        device = next((p.device for p in self.get_base_model().parameters() if p.device.type != "meta"), None)
        if device is not None:
            weights = {k: v.to(device) for k, v in weights.items()}
        # Everything is checked before the first tensor is written, so an adapter that exists already is either
        # replaced whole or left as it was.
        plan = _plan_adapter_load(self, weights, adapter_name, ignore_mismatched_sizes=False)
        if plan.missing_keys:
            raise ValueError(
                f"The adapter in {os.fspath(model_id)!r} lacks weights the config asks for, e.g. "
                f"{plan.missing_keys[:4]}; the config and the weights file don't belong together. Nothing was loaded."
            )
        result = _apply_adapter_load(self, plan, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        if not is_trainable:
            # An adapter's weights are the entries under its name in the per-adapter dicts of its layers, wrappers
            # and prompt encoders; found by structure, because a module may share the adapter's name ("lin0").
            walked = [module for _, module in named_modules_outside_adapters(self)]
            entries = [
                module[adapter_name]
                for module in walked
                if isinstance(module, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in module
            ]
            for entry in entries:
                entry.requires_grad_(False)
            if any(module.training for module in walked):
                self.eval()
            else:
                # Everything else is in eval mode already: only the new adapter's modules are not (as HF PEFT, the
                # model ends up in eval mode, at a cost that doesn't grow with the adapters loaded).
                for entry in entries:
                    if isinstance(entry, nn.Module):
                        entry.eval()
        return result

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load another adapter (a local folder or a Hub repo id, as in `from_pretrained`) under `adapter_name`, left
        inactive (use `set_adapter`). Under the name of an existing adapter, as in HF PEFT, the folder's weights
        replace that adapter's (this is how transformers' Trainer resumes from a checkpoint). A load that fails
        leaves the model as it was."""
        check_adapter_name(adapter_name)
        hub_kwargs, _ = split_hub_kwargs(kwargs)
        if adapter_name in self.peft_config:
            weights = load_peft_weights(model_id, device=torch_device, **hub_kwargs)
            return self._load_weights(weights, adapter_name, is_trainable, False, model_id)
        config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        _set_ephemeral_gpu_offload(config, ephemeral_gpu_offload)
        _check_prompt_learning_not_trainable(config, is_trainable)
        config.inference_mode = not is_trainable
        weights = load_peft_weights(model_id, device=torch_device, **hub_kwargs)
        _warn_if_base_weights_change(config, self.peft_config)
        # On a failure no trace of the new adapter is left, not even layers that only it had wrapped; initialisations
        # such as PiSSA change base weight values when the adapter is added: undone too.
        with weight_journal.reversible(), ModuleTreeRollback.guarding(self):
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
            result = self._load_weights(weights, adapter_name, is_trainable, low_cpu_mem_usage, model_id)
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        # The new adapter stays inactive; like HF PEFT, it only trains if asked to.
        if is_trainable:
            self.set_requires_grad(adapter_name)
        return result

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of the given adapters' weights on or off, whether they are active or not."""
        names = adapter_name_list(adapter_names)
        for name in names:
            self._check_adapter_name(name)
        if self._is_prompt_learning:
            for name in names:
                self.prompt_encoder[name].requires_grad_(requires_grad)
        for _, module in named_modules_outside_adapters(self):
            if isinstance(module, BaseTunerLayer):
                for holder in module._adapter_holders():
                    for name in names:
                        if name in holder:
                            holder[name].requires_grad_(requires_grad)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                module.set_requires_grad(names, requires_grad=requires_grad)


def _warn_if_base_weights_change(new_config: PeftConfig, configs: dict[str, PeftConfig]) -> None:
    """HF PEFT's warning when an adapter that changes the base weights is loaded next to others."""
    if not configs:
        return
    inits = {getattr(config, "init_lora_weights", None) for config in [new_config, *configs.values()]}
    for init, method in (("pissa", "PiSSA"), ("corda", "CorDA"), ("olora", "OLoRA")):
        if init in inits:
            warnings.warn(
                f"A {method} adapter moved part of the base weights into itself, so every other adapter of this model "
                "sees changed base weights. To combine it with others, save it converted to a plain LoRA "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=<folder of the initial adapter>)).",
                stacklevel=3,
            )
            return


def _double_rank(config: PeftConfig) -> None:
    """The config of a converted adapter (`[B | -B0] @ [A ; A0]`): twice the rank, the same scaling."""
    config.init_lora_weights = True
    config.r *= 2
    # alpha / r stays the same; with rsLoRA alpha / sqrt(r) does.
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    config.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}


def _yaml_string(text: str) -> str:
    """`text` as a YAML scalar: bare when it is a plain name (`org/model-1.5`), else JSON-quoted (JSON strings are
    YAML)."""
    return text if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:-]*", text) else json.dumps(text)


def _set_ephemeral_gpu_offload(config: PeftConfig, ephemeral_gpu_offload: bool) -> None:
    runtime_config = getattr(config, "runtime_config", None)
    if runtime_config is not None:
        runtime_config.ephemeral_gpu_offload = ephemeral_gpu_offload
    elif ephemeral_gpu_offload:
        warnings.warn(f"{type(config).__name__} has no ephemeral GPU offloading; ignoring it.", stacklevel=3)


def _check_prompt_learning_not_trainable(config: PeftConfig, is_trainable: bool) -> None:
    if config.is_prompt_learning and is_trainable:
        # The file holds the encoder's output, not the encoder: there is nothing to go on training (HF PEFT's rule).
        raise ValueError(
            f"A {config.peft_type} adapter can't be loaded as trainable (is_trainable=True): adapter files hold the "
            "prompt the encoder computed, not the encoder. Load it for inference, or train a new adapter."
        )


def _check_no_adapter_layers(model: nn.Module, config: PeftConfig) -> None:
    """A prompt-learning method can't go on a model that already holds another method's adapter layers."""
    layer = next((name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)), None)
    if layer is not None:
        raise ValueError(
            f"The model already holds adapter layers (e.g. {layer!r}, a {type(model.get_submodule(layer)).__name__}); "
            f"a {config.peft_type} prompt can't be added to it, as one model holds adapters of one method (as in HF "
            "PEFT). Merge or unload those adapters first (merge_and_unload() / unload())."
        )


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("Pass input_ids or inputs_embeds: the prompt is prepended to them.")


def _transformer_backbone(model: nn.Module) -> tuple[str | None, nn.Module]:
    """(name, module) of the first child that is a transformers model (the backbone under a task head); the model
    itself (name None) when there is none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None, model
    for name, module in model.named_children():
        if isinstance(module, PreTrainedModel):
            return name, module
    return None, model


def _word_embeddings(model: nn.Module, backbone: nn.Module) -> nn.Module:
    """The model's input word embeddings: `get_input_embeddings()`, else (as HF PEFT) the backbone's first parameter
    with one row per vocabulary entry."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_input_embeddings):
        try:
            embeddings = get_input_embeddings()
        except NotImplementedError:
            embeddings = None
        if embeddings is not None:
            return embeddings
    model_config = getattr(model, "config", None)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab_size = getattr(text_config, "vocab_size", None)
    for name, param in backbone.named_parameters():
        if vocab_size is not None and param.shape[0] == vocab_size and name.endswith(".weight"):
            return backbone.get_submodule(name.removesuffix(".weight"))
    raise ValueError(
        f"Can't find the word embeddings of this {type(model).__name__}: it has no get_input_embeddings() and no "
        "parameter with one row per vocabulary entry; prompt learning prepends to those embeddings."
    )


def _model_config_value(model_config: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((model_config[name] for name in names if model_config.get(name) is not None), None)


def _prepare_prompt_learning_config(config: PeftConfig, model_config: Any, kv_prefix: bool) -> None:
    """Fill the unset sizes of a prompt-learning config from the model config, by HF PEFT's rules: num_layers,
    token_dim, num_attention_heads; for a key/value prefix on a grouped-query model, heads and token_dim become the
    key/value heads and their width; encoder_hidden_size defaults to token_dim."""
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    if model_config is not None and getattr(model_config, "num_hidden_layers", None) is not None:
        values["num_hidden_layers"] = model_config.num_hidden_layers
    wanted = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    for field_name, names in wanted.items():
        if getattr(config, field_name) is None:
            value = _model_config_value(values, names)
            if value is None:
                raise ValueError(
                    f"Can't read {field_name} of {type(config).__name__} from the model config (none of {list(names)} "
                    f"is set); pass {field_name}= in the config."
                )
            setattr(config, field_name, value)
    if kv_prefix and values.get("num_key_value_heads") is not None:
        head_dim = values.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * values["num_key_value_heads"]
        config.num_attention_heads = values["num_key_value_heads"]
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


class PeftModelForCausalLM(PeftModel):
    """PeftModel for decoder-only language models (`generate` passes `adapter_names` through). With a prompt, the
    labels get -100 for the virtual tokens, and `generate` prepends the prompt at the first step."""

    _labels_per_token = True

    def _forward_context(self, *args: Any, **kwargs: Any):
        # aLoRA, as in HF PEFT for causal LMs only: find where each row's invocation sequence starts, once per call.
        find_offsets = getattr(self.base_model, "alora_offsets_for_call", None)
        if find_offsets is not None and kwargs.get("alora_offsets") is None:
            offsets = find_offsets(*args, **kwargs)
            if offsets is not None:
                kwargs["alora_offsets"] = offsets
        return super()._forward_context(*args, **kwargs)

    def _prompt_learning_generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._patched_prepare_inputs_for_generation():
            return self.base_model.generate(*args, **kwargs)

    def _prepare_inputs_for_generation(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        config = self.active_peft_config
        kv_prefix = self._active_prompt_encoder().kv_prefix
        model_kwargs = original(*args, **kwargs)
        cache_position = model_kwargs.get("cache_position")
        is_prefill = cache_position is not None and int(cache_position[0]) == 0
        cache = get_cache(model_kwargs)
        input_ids = model_kwargs.get("input_ids")
        # The cache holds the virtual tokens too, so it may be longer than input_ids: only the new token is fed.
        if cache is not None and input_ids is not None and cache.get_seq_length() >= input_ids.shape[1]:
            model_kwargs["input_ids"] = input_ids = input_ids[:, -1:]
        attention_mask = model_kwargs.get("attention_mask")
        if isinstance(attention_mask, dict):
            if len(attention_mask) != 1:
                raise ValueError(
                    f"Got {len(attention_mask)} attention masks from the model's prepare_inputs_for_generation; "
                    "prompt learning handles one."
                )
            attention_mask = next(iter(attention_mask.values()))
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise NotImplementedError(
                    "Prompt learning generates with 2D attention masks (a dynamic cache); this model prepared a "
                    f"{attention_mask.dim()}D mask. Use the default (dynamic) cache implementation."
                )
            ones = attention_mask.new_ones(attention_mask.shape[0], config.num_virtual_tokens)
            model_kwargs["attention_mask"] = torch.cat((ones, attention_mask), dim=1)
        self._prompt_learning_kwargs(model_kwargs, drop_token_type_ids=True, warn=False)
        needs_prompt = cache is None or cache.get_seq_length() == 0
        if needs_prompt and kv_prefix:
            model_kwargs[cache_key(model_kwargs, self.base_model)] = self.get_prompt(batch_size=input_ids.shape[0])
        elif needs_prompt:
            inputs_embeds = self.word_embeddings(input_ids)
            prompts = self.get_prompt(batch_size=input_ids.shape[0]).to(inputs_embeds.dtype)
            model_kwargs["inputs_embeds"] = torch.cat((prompts, inputs_embeds), dim=1)
            model_kwargs["input_ids"] = None
        if kv_prefix and is_prefill:
            # The cache starts with the virtual tokens: the input's positions come after them.
            model_kwargs["cache_position"] = cache_position + config.num_virtual_tokens
        elif not kv_prefix:
            # With prepended embeddings the model derives the positions from the longer input.
            model_kwargs.pop("cache_position", None)
        return model_kwargs


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for encoder-decoder models. A prepended prompt goes in front of the encoder's input; a prefix
    (prefix tuning) into the decoder's self-attention, whose attention mask is extended to match."""

    def _prompt_learning_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        config = self.active_peft_config
        virtual = config.num_virtual_tokens
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        batch_size = _batch_size(input_ids, inputs_embeds)
        self._prompt_learning_kwargs(kwargs, drop_token_type_ids=True)
        for name, value in (("labels", labels), ("decoder_input_ids", decoder_input_ids)):
            if value is not None:
                kwargs[name] = value
        if decoder_inputs_embeds is not None:
            kwargs["decoder_inputs_embeds"] = decoder_inputs_embeds
        if self._active_prompt_encoder().kv_prefix:
            if decoder_attention_mask is not None:
                ones = decoder_attention_mask.new_ones(batch_size, virtual)
                decoder_attention_mask = torch.cat((ones, decoder_attention_mask), dim=1)
            kwargs[self._prefix_cache_argument(kwargs)] = self.get_prompt(batch_size)
            return self.base_model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_attention_mask=decoder_attention_mask,
                **kwargs,
            )
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask.new_ones(batch_size, virtual), attention_mask), dim=1)
        prompts = self.get_prompt(batch_size).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat((prompts[:, :virtual], inputs_embeds), dim=1)
        return self.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            decoder_attention_mask=decoder_attention_mask,
            **kwargs,
        )

    def _prompt_learning_generate(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("With a prompt-learning adapter, pass generate's inputs by keyword (input_ids=...).")
        if "input_ids" not in kwargs:
            raise ValueError(
                "generate with a prompt-learning adapter needs input_ids (the prompt is prepended to them)."
            )
        config = self.active_peft_config
        self._prompt_learning_kwargs(kwargs, drop_token_type_ids=True)
        if self._active_prompt_encoder().kv_prefix:
            with self._patched_prepare_inputs_for_generation():
                return self.base_model.generate(**kwargs)
        if kwargs.pop("encoder_outputs", None) is not None:
            warnings.warn("encoder_outputs are ignored: the encoder runs again with the prompt.", stacklevel=3)
        inputs_embeds = self.word_embeddings(kwargs.pop("input_ids"))
        batch_size = inputs_embeds.shape[0]
        prompts = self.get_prompt(batch_size).to(inputs_embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts[:, : config.num_virtual_tokens], inputs_embeds), dim=1)
        if kwargs.get("attention_mask") is not None:
            attention_mask = kwargs["attention_mask"]
            ones = attention_mask.new_ones(batch_size, config.num_virtual_tokens)
            kwargs["attention_mask"] = torch.cat((ones, attention_mask), dim=1)
        return self.base_model.generate(**kwargs)

    def _prepare_inputs_for_generation(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_kwargs = original(*args, **kwargs)
        cache = get_cache(model_kwargs)
        is_first = kwargs.get("is_first_iteration")
        if is_first is None:
            is_first = cache is None or cache.get_seq_length() == 0
        if is_first:
            key = cache_key(model_kwargs, self.base_model)
            model_kwargs[key] = self.get_prompt(model_kwargs["decoder_input_ids"].shape[0])
        return model_kwargs


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for models that return hidden states."""


class _HeadTrainingModel(PeftModel):
    head_names: list[str] = []

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any) -> None:
        self._add_heads_to_modules_to_save(model, peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, **kwargs: Any) -> None:
        self._add_heads_to_modules_to_save(self.get_base_model(), peft_config)
        super().add_adapter(adapter_name, peft_config, **kwargs)

    def _add_heads_to_modules_to_save(self, model: nn.Module, peft_config: PeftConfig) -> None:
        # The head goes into modules_to_save before injection so LoRA layers are never put inside it. As HF PEFT,
        # every head name is listed once the model has one of them.
        if not hasattr(peft_config, "modules_to_save"):
            return
        has_head = any(
            key == name or key.endswith(f".{name}") for key, _ in model.named_modules() for name in self.head_names
        )
        listed = peft_config.modules_to_save or []
        extra = [name for name in self.head_names if name not in listed] if has_head else []
        peft_config.modules_to_save = list(listed) + extra


class PeftModelForSequenceClassification(_HeadTrainingModel):
    """PeftModel for sequence classification; the classifier head (`classifier`/`score`) is trained and saved."""

    head_names = SEQ_CLS_HEAD_NAMES


class PeftModelForTokenClassification(_HeadTrainingModel):
    """PeftModel for token classification; the classifier head (`classifier`/`score`) is trained and saved."""

    head_names = TOKEN_CLS_HEAD_NAMES


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "BaseTunerLayer",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]
