"""Sub-configurations of the data- and weight-driven LoRA initialisations, with HF PEFT's fields and checks.

`LoftQConfig`, `EvaConfig`, `CordaConfig` and `LoraGAConfig` are nested in a `LoraConfig` (`loftq_config=...`,
`eva_config=...`, ...) and written into `adapter_config.json` as plain dicts; `subconfig` turns such a dict back into
its class when a config is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

_Config = TypeVar("_Config")


@dataclass
class LoftQConfig:
    """LoftQ (`init_lora_weights="loftq"`): quantize the base weight with `loftq_bits` (4: NF4, 8: int8) and fit the
    LoRA factors to the quantization error over `loftq_iter` alternating rounds."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})


@dataclass
class EvaConfig:
    """EVA (`init_lora_weights="eva"`, then `initialize_lora_eva_weights`): A from the top right-singular vectors of
    each layer's inputs, found by incremental PCA over a dataloader.

    Args:
        rho: ranks may be redistributed across layers up to `r * rho` per layer (>= 1; 1 keeps every rank).
        tau: a component has converged when its cosine similarity to the previous step's is at least `tau`.
        use_label_mask: leave out tokens whose label is `label_mask_value`.
        label_mask_value: the label of tokens to leave out.
        whiten: divide each component by the square root of its singular value.
        adjust_scaling_factors: scale `lora_alpha` with a layer's new rank, so every layer keeps its scaling.
    """

    rho: float = field(default=2.0, metadata={"help": "Rho value for EVA redistribution"})
    tau: float = field(default=0.99, metadata={"help": "Cosine similarity threshold for early stopping"})
    use_label_mask: bool = field(default=True, metadata={"help": "Use label mask for EVA initialization"})
    label_mask_value: int = field(default=-100, metadata={"help": "Label of the tokens to leave out"})
    whiten: bool = field(default=False, metadata={"help": "Apply whitening to singular vectors"})
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "Adjust LoRA scaling factors after the rank redistribution"}
    )

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, got {self.rho!r}.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must be between 0.0 and 1.0, got {self.tau!r}.")


@dataclass
class CordaConfig:
    """CorDA (`init_lora_weights="corda"`, after `preprocess_corda`): the LoRA factors come from the SVD of the base
    weight times the covariance of its inputs over a calibration set.

    Args:
        cache_file: file for the per-layer SVD results (reused instead of recomputed when it exists).
        covariance_file: file for the per-layer input covariances (reused when it exists).
        corda_method: "ipm" (instruction-previewed: the largest components) or "kpm" (knowledge-preserved: the
            smallest).
        verbose: show progress while decomposing.
        use_float16_for_covariance: accumulate the covariances in fp16 (half the memory, less precise).
        prune_temporary_fields: drop the per-layer covariances once decomposed.
    """

    cache_file: str | None = field(default=None, metadata={"help": "File to store the SVD cache."})
    covariance_file: str | None = field(default=None, metadata={"help": "File to store the covariance matrices."})
    corda_method: Literal["ipm", "kpm"] = field(default="ipm", metadata={"help": "'ipm' or 'kpm'."})
    verbose: bool = field(default=False, metadata={"help": "Print the progress of CorDA initialization."})
    use_float16_for_covariance: bool = field(default=False, metadata={"help": "fp16 covariance matrices."})
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Drop the temporary per-layer fields."})


@dataclass
class LoraGAConfig:
    """LoRA-GA (`init_lora_weights="lora_ga"`, after `preprocess_loraga`): the factors come from the SVD of the
    weight's gradient estimated over a few training steps, and the base weight keeps `W - scaling * B @ A`.

    Args:
        direction: which of the top 2r gradient singular vectors go to A and to B: "ArBr" (alternating),
            "A2rBr" (A the second r, B the first r), "ArB2r" (A the first r, B the second r) or "random".
        scale: "stable" (B times out_features**0.25 / sqrt(stable_gamma)), "weight_svd" (to the weight's top
            singular value), "gd_scale" (both divided by the scaling) or "unit" (as they are).
        stable_gamma: gamma of the "stable" scale.
    """

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(
        default="ArB2r", metadata={"help": "Component distribution strategy from gradient SVD"}
    )
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(
        default="stable", metadata={"help": "Scaling strategy for initialization"}
    )
    stable_gamma: int = field(default=16, metadata={"help": "Gamma parameter for stable scaling"})


def subconfig(value: Any, config_cls: type[_Config], field_name: str) -> _Config | None:
    """`value` as a `config_cls`: None stays None, a dict (as read from adapter_config.json) becomes the class."""
    if value is None or isinstance(value, config_cls):
        return value
    if isinstance(value, dict):
        accepted = {f.name for f in dataclasses.fields(config_cls) if f.init}
        return config_cls(**{k: v for k, v in value.items() if k in accepted})
    raise TypeError(
        f"LoraConfig.{field_name} must be a {config_cls.__name__}, a dict of its fields, or None; got "
        f"{type(value).__name__}."
    )
