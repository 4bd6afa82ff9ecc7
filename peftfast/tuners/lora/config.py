"""`LoraConfig`: HF PEFT's field set, so `adapter_config.json` files are read and written by both libraries."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Literal

from torch import nn

from ...config import PeftConfig
from ...utils.peft_types import PeftType
from .init_config import CordaConfig, EvaConfig, LoftQConfig, LoraGAConfig, subconfig

__all__ = ["CordaConfig", "EvaConfig", "LoftQConfig", "LoraConfig", "LoraGAConfig"]

# Fields HF PEFT has for LoRA variants peftfast does not implement, with the value meaning "off". A config that
# turns one on is refused with a clear error rather than silently trained as plain LoRA.
_UNSUPPORTED_WHEN_SET = {
    "use_qalora": False,
    "velora_config": None,
    "monteclora_config": None,
    "megatron_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}


@dataclass
class LoraRuntimeConfig:
    """Options that apply while a model runs and are never saved with an adapter (HF PEFT's `LoraRuntimeConfig`).

    Args:
        ephemeral_gpu_offload: where adapter weights are kept on the CPU, run the heavy one-off computations on a GPU
            and bring the results back (today: DoRA's initial weight norms). Without a GPU they run on the CPU.
    """

    ephemeral_gpu_offload: bool = field(default=False)


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter: `y = base(x) + scaling * B(A(dropout(x)))`, `scaling = lora_alpha / r`.

    Args mirror `peft.LoraConfig`: `r`, `lora_alpha`, `lora_dropout`, `target_modules` (list of name suffixes, a
    regex matched against the full module name, or "all-linear"), `exclude_modules`, `bias` ("none", "all",
    "lora_only"), `use_rslora` (scaling `lora_alpha / sqrt(r)`), `modules_to_save`, `init_lora_weights`,
    `layers_to_transform`, `layers_pattern`, `rank_pattern`, `alpha_pattern`, `fan_in_fan_out`,
    `lora_bias`, `trainable_token_indices` (a list of rows of the input embeddings to train, or a dict of such
    lists per embedding module name), `layer_replication` (`[start, end)` ranges of decoder layers to stack into a
    deeper model whose repeated layers share base weights, each with its own LoRA), `ensure_weight_tying` (an output
    layer tied to the input embeddings gets the embeddings' modules_to_save copy / LoRA / trainable rows),
    `alora_invocation_tokens` (aLoRA: the token ids of the invocation sequence; the adapter acts on each row from its
    last occurrence on, see `peftfast.tuners.lora.alora`), `target_parameters` (names or name suffixes of
    `nn.Parameter`s, e.g. the 3-D expert weights `["experts.gate_up_proj", "experts.down_proj"]` of transformers' MoE
    models; as in HF PEFT, with `target_modules=None` the model type's default target modules still apply, except on
    the MoE models whose targets HF PEFT rewrites (`moe_targets`); `target_modules=[]` targets parameters only),
    `use_dora` (DoRA: a trained magnitude per output row, see `peftfast.tuners.lora.dora`) and `runtime_config` (a
    `LoraRuntimeConfig`, not saved).

    `init_lora_weights`: True (A kaiming-uniform, B zero), False (both random), "gaussian", "orthogonal", or one
    that starts from the base weight: "pissa" / "pissa_niter_[n]" (its top singular directions, exact or by a
    randomized SVD with n iterations), "olora" (its QR), "loftq" (with `loftq_config=LoftQConfig(...)`: the
    quantization error), "corda" (`corda_config`, after `preprocess_corda`), "lora_ga" (`lora_ga_config`, after
    `preprocess_loraga`), "eva" (`eva_config`, then `initialize_lora_eva_weights`). PiSSA, OLoRA, CorDA and LoRA-GA
    move `scaling * B @ A` out of the base weight, LoftQ replaces it by its quantized value.
    """

    _peft_type = PeftType.LORA

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: list[str] | set[str] | str | None = field(default=None)
    exclude_modules: list[str] | set[str] | str | None = field(default=None)
    lora_alpha: int | float = field(default=8)
    lora_dropout: float = field(default=0.0)
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True when the base weight is (in, out)."})
    bias: Literal["none", "all", "lora_only"] = field(default="none")
    use_rslora: bool = field(default=False)
    modules_to_save: list[str] | None = field(default=None)
    init_lora_weights: (
        bool
        | Literal["gaussian", "eva", "olora", "pissa", "pissa_niter_[number of iters]", "corda", "loftq"]
        | Literal["orthogonal", "lora_ga"]
    ) = field(default=True)
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    rank_pattern: dict[str, int] | None = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] | None = field(default_factory=dict)
    megatron_config: dict | None = field(default=None)
    megatron_core: str | None = field(default="megatron.core")
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(default=None)
    loftq_config: LoftQConfig | dict = field(default_factory=dict)
    eva_config: EvaConfig | None = field(default=None)
    corda_config: CordaConfig | None = field(default=None)
    lora_ga_config: LoraGAConfig | None = field(default=None)
    use_dora: bool = field(default=False)
    velora_config: Any = field(default=None)
    alora_invocation_tokens: list[int] | None = field(default=None)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16)
    monteclora_config: Any = field(default=None)
    layer_replication: list[tuple[int, int]] | None = field(default=None)
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = field(default=False, metadata={"help": "Give lora_B a bias."})
    target_parameters: list[str] | None = field(default=None)
    use_bdlora: Any = field(default=None)
    arrow_config: Any = field(default=None)
    kasa_config: Any = field(default=None)
    ensure_weight_tying: bool = field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if self.use_dora:
            self._check_dora_combinations()
        for name, off in _UNSUPPORTED_WHEN_SET.items():
            value = getattr(self, name)
            if value != off and not (off is None and value in ({}, [])):
                raise NotImplementedError(
                    f"LoraConfig({name}={value!r}) selects a LoRA variant that peftfast does not implement yet; "
                    f"leave {name} at {off!r}, or use HF PEFT for this adapter."
                )
        _check_lora_fields(self)
        _check_alora_invocation_tokens(self)
        if isinstance(self.target_parameters, str):
            raise TypeError(
                "target_parameters must be a list of parameter names (or None), not the string "
                f"{self.target_parameters!r}."
            )
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        self._check_initialisation()
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True needs init_lora_weights=True or False (as in HF PEFT), got {self.init_lora_weights!r}."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform only works when target_modules is a list of names, not a regex.")
        if isinstance(self.target_modules, str) and self.layers_pattern:
            raise ValueError("layers_pattern only works when target_modules is a list of names, not a regex.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform; set both.")
        _check_trainable_token_indices(self.trainable_token_indices)
        _check_layer_replication(self.layer_replication)
        if self.ensure_weight_tying:
            # Filled in by the tuner from the model (not dataclass fields: never saved): the output layers whose
            # modules_to_save copy, or LoRA layer, is tied to the input embeddings'.
            self.modules_to_tie: set[str] | None = None
            self.target_modules_to_tie: set[str] | None = None
        # Not a dataclass field: never written to adapter_config.json, so it is registered again before each load.
        self._custom_modules: dict[type[nn.Module], type[nn.Module]] | None = None

    def _check_dora_combinations(self) -> None:
        """HF PEFT's config-time refusals of what DoRA can't be combined with (other variants are refused where the
        layers are made, as in HF PEFT: `LoraModel`)."""
        if self.megatron_config:
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        if self.lora_bias:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")

    def _check_initialisation(self) -> None:
        """HF PEFT's rules for `init_lora_weights` and the sub-configs that go with it: a sub-config the chosen
        initialisation doesn't use is dropped (loftq_config) or ignored, with a warning; EVA and CorDA fall back to
        their default sub-config."""
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() == "mica":
            raise NotImplementedError(
                "LoraConfig(init_lora_weights='mica') selects MiCA, which peftfast does not implement yet; use "
                "another init_lora_weights, or HF PEFT for this adapter."
            )
        if not _is_known_initialisation(init):
            raise ValueError(
                f"init_lora_weights={init!r} is not an initialisation LoRA knows; use True, False, 'gaussian', "
                "'pissa', 'pissa_niter_[number of iterations]', 'olora', 'orthogonal', 'loftq', 'eva', 'corda' or "
                "'lora_ga'."
            )
        self.eva_config = subconfig(self.eva_config, EvaConfig, "eva_config")
        self.corda_config = subconfig(self.corda_config, CordaConfig, "corda_config")
        self.lora_ga_config = subconfig(self.lora_ga_config, LoraGAConfig, "lora_ga_config")
        # One chain, as in HF PEFT: a stray loftq_config is reported before anything about EVA or CorDA.
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError("loftq_config must be set when init_lora_weights='loftq', e.g. LoftQConfig().")
            if is_dataclass(self.loftq_config):
                self.loftq_config = asdict(self.loftq_config)
            _check_loftq_config(self.loftq_config)
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn(
                "loftq_config is ignored (and dropped) because init_lora_weights is not 'loftq'.", stacklevel=3
            )
        elif init == "eva" and self.eva_config is None:
            warnings.warn("init_lora_weights='eva' without eva_config: using EvaConfig().", stacklevel=3)
            self.eva_config = EvaConfig()
        elif init != "eva" and self.eva_config is not None:
            warnings.warn("eva_config is ignored because init_lora_weights is not 'eva'.", stacklevel=3)
        elif init == "corda" and self.corda_config is None:
            warnings.warn(
                "init_lora_weights='corda' without corda_config: using the default CordaConfig().", stacklevel=3
            )
            self.corda_config = CordaConfig()
        elif init != "corda" and self.corda_config is not None:
            warnings.warn("corda_config is ignored because init_lora_weights is not 'corda'.", stacklevel=3)
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and changes_base_weights(init):
            warnings.warn(
                f"init_lora_weights={init!r} changes the base weights, and with use_rslora plus rank_pattern or "
                "alpha_pattern the trained adapter can't be converted to a plain LoRA "
                "(save_pretrained(path_initial_model_for_weight_conversion=...) will refuse).",
                stacklevel=3,
            )

    def _register_custom_module(self, mapping: dict[type[nn.Module], type[nn.Module]]) -> None:
        """Use the user's LoRA layer class `mapping[base_type]` for every target that is a `base_type` (HF PEFT's
        experimental API). It takes precedence over peftfast's layers (so it can replace e.g. the nn.Linear one) and
        is called as `layer_cls(target, adapter_name, config=config, r=..., lora_alpha=..., ...)`; subclass
        `peftfast.tuners.lora.layer.LoraLayer` so that saving, loading and adapter management find its `lora_A` /
        `lora_B` weights. Merging works where the class implements `merge`/`unmerge`."""
        for base_type, layer_cls in mapping.items():
            if not (isinstance(base_type, type) and issubclass(base_type, nn.Module)):
                raise TypeError(f"_register_custom_module keys must be nn.Module classes, got {base_type!r}.")
            if not (isinstance(layer_cls, type) and issubclass(layer_cls, nn.Module)):
                raise TypeError(
                    f"_register_custom_module maps {base_type.__name__} to {layer_cls!r}, which is not an nn.Module "
                    "class; map it to your LoRA layer class."
                )
        if self._custom_modules is None:
            self._custom_modules = {}
        self._custom_modules.update(mapping)

    def to_dict(self) -> dict[str, Any]:
        result = super().to_dict()
        result["peft_type"] = PeftType.LORA.value
        # Runtime options belong to the session, never to adapter_config.json (as HF PEFT).
        result.pop("runtime_config", None)
        return result


def _check_regex(field_name: str, pattern: str, template: str = "{}") -> None:
    try:
        # The pattern alone first, so that the error's position is one in the user's pattern.
        re.compile(pattern)
        re.compile(template.format(pattern))
    except re.error as error:
        raise ValueError(
            f"LoraConfig.{field_name} {pattern!r} is not a valid regular expression ({error}); module names are "
            "matched against it as a regex."
        ) from error


def _check_names(field_name: str, value: Any, regex_if_str: bool) -> None:
    """A module-name field: None, a regex string (when `regex_if_str`), or a collection of names."""
    if value is None:
        return
    if isinstance(value, str):
        if not regex_if_str:
            raise TypeError(f"LoraConfig.{field_name} must be a list of module names, got the string {value!r}.")
        _check_regex(field_name, value)
        return
    if not isinstance(value, Collection) or not all(isinstance(name, str) for name in value):
        kind = "a regex string or a list of module names" if regex_if_str else "a list of module names"
        raise TypeError(f"LoraConfig.{field_name} must be {kind}, got {value!r}.")


def _check_alpha(field_name: str, alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"LoraConfig.{field_name} must be a finite number, got {alpha!r}.")
    if alpha < 0:
        # A negative alpha is legal (the update is subtracted) and HF PEFT loads it, but it is rarely meant.
        warnings.warn(
            f"LoraConfig.{field_name}={alpha!r} is negative: the adapter's update is subtracted from the base "
            "output (scaling = lora_alpha / r < 0).",
            UserWarning,
            stacklevel=5,
        )


def _check_lora_fields(config: LoraConfig) -> None:
    """Types, regexes and alphas of a LoraConfig: refused here with the field's name rather than deep in matching."""
    _check_names("target_modules", config.target_modules, regex_if_str=True)
    _check_names("exclude_modules", config.exclude_modules, regex_if_str=True)
    _check_names("modules_to_save", config.modules_to_save, regex_if_str=False)
    layers = config.layers_to_transform
    if layers is not None:
        indices = [layers] if not isinstance(layers, Sequence) or isinstance(layers, str) else list(layers)
        if not all(isinstance(index, int) and not isinstance(index, bool) for index in indices):
            raise TypeError(f"LoraConfig.layers_to_transform must be a layer index or a list of them, got {layers!r}.")
        if any(index < 0 for index in indices):
            raise ValueError(f"LoraConfig.layers_to_transform holds a negative layer index: {layers!r}.")
    layers_pattern = config.layers_pattern
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        _check_names("layers_pattern", patterns, regex_if_str=True)
        for pattern in patterns:
            _check_regex("layers_pattern", pattern)
    _check_alpha("lora_alpha", config.lora_alpha)
    for field_name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(getattr(config, field_name), dict):
            raise TypeError(
                f"LoraConfig.{field_name} must be a dict of regex -> value, got {getattr(config, field_name)!r}."
            )
        for pattern in getattr(config, field_name):
            _check_regex(f"{field_name} key", pattern, template=r"(.*\.)?({})$")
    for pattern, alpha in config.alpha_pattern.items():
        _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)


def _check_trainable_token_indices(value: Any) -> None:
    if value is None:
        return
    lists = value.items() if isinstance(value, dict) else [("trainable_token_indices", value)]
    for name, indices in lists:
        if not isinstance(name, str):
            raise ValueError(f"trainable_token_indices keys must be module names, got {name!r}.")
        if (
            not isinstance(indices, (list, tuple))
            or not indices
            or any(isinstance(index, bool) or not isinstance(index, int) for index in indices)
        ):
            where = "" if name == "trainable_token_indices" else f"[{name!r}]"
            raise ValueError(
                f"trainable_token_indices{where} must be a non-empty list of token indices (integers), got "
                f"{indices!r}; pass a list for the input embeddings or a dict of lists per embedding module."
            )


def _check_layer_replication(value: Any) -> None:
    if value is None:
        return
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or any(isinstance(bound, bool) or not isinstance(bound, int) for bound in pair)
            or not 0 <= pair[0] <= pair[1]
        ):
            raise ValueError(
                f"layer_replication must be a list of [start, end) layer ranges (integers, 0 <= start <= end), got "
                f"{value!r}."
            )


def _check_alora_invocation_tokens(config: LoraConfig) -> None:
    tokens = config.alora_invocation_tokens
    if tokens is None:
        return
    if not isinstance(tokens, (list, tuple)) or not all(
        isinstance(token, int) and not isinstance(token, bool) for token in tokens
    ):
        raise TypeError(
            f"LoraConfig.alora_invocation_tokens must be a list of token ids (ints), got {tokens!r}; tokenize the "
            "invocation string first, e.g. tokenizer.encode(text, add_special_tokens=False)."
        )
    if tokens and config.task_type != "CAUSAL_LM":
        warnings.warn("aLoRA is currently only supported for CAUSAL_LM task (as in HF PEFT).", stacklevel=4)


def _is_known_initialisation(init: Any) -> bool:
    if isinstance(init, bool):
        return True
    if not isinstance(init, str):
        return False
    if init.lower() in ("gaussian", "olora") or init in ("pissa", "orthogonal", "loftq", "eva", "corda", "lora_ga"):
        return True
    prefix, _, niter = init.partition("_niter_")
    return prefix == "pissa" and niter.isdigit()


def changes_base_weights(init: Any) -> bool:
    """Whether initialisation `init` moves part of the base weight into the adapter (W = W_res + scaling * B @ A),
    so that a trained adapter only works on W_res, unless converted (`path_initial_model_for_weight_conversion`)."""
    return isinstance(init, str) and (
        init.startswith("pissa") or init.lower() == "olora" or init in ("corda", "lora_ga")
    )


def _check_loftq_config(loftq_config: dict) -> None:
    bits, iterations = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if bits not in (4, 8):
        raise ValueError(f"loftq_config['loftq_bits'] must be 4 (NF4) or 8 (int8), got {bits!r}.")
    if not isinstance(iterations, int) or iterations <= 0:
        raise ValueError(f"loftq_config['loftq_iter'] must be a positive integer, got {iterations!r}.")
