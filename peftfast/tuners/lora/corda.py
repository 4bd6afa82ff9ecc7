"""CorDA: LoRA factors from the context of the weight, its input covariance (https://arxiv.org/abs/2406.05223).

`preprocess_corda(model, lora_config, run_model)` hooks the target layers, runs the model on calibration data,
and leaves on each layer `eigens` (S_WC, U_WC, V_WC): the SVD `W C = U S V'^T` of the weight times the (damped)
input covariance C, with `V = C^-1 V'` and only the r components that `corda_method` keeps ("ipm": the largest,
"kpm": the smallest). `get_peft_model` with `init_lora_weights="corda"` then builds the adapter from them and
keeps `W - scaling * B @ A` in the base (`peftfast.tuners.lora.init`).

As HF PEFT, and with its file formats for `cache_file` / `covariance_file` (read with `weights_only=True`). Faster
where it can be: "ipm" keeps only the top r singular triplets (`top_singular_triplets`) instead of a full SVD.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .config import LoraConfig
from .init import is_conv1d, preprocessing_targets, top_singular_triplets
from .model import get_pattern_key


@dataclass
class CordaEigens:
    """What `preprocess_corda` leaves on a layer: `S_WC [r]`, `U_WC [out, r]`, `V_WC [in, r]`."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _model_device(model: nn.Module) -> torch.device:
    model = getattr(model, "module", model)
    return next(iter(model.parameters())).device


def _load_tensors(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location=device, weights_only=True)


def _usable(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    torch.save(tensors, path)


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Compute CorDA's decomposition for every target layer of `model` and store it on the layer (`eigens`).

    Args:
        model: the model the adapter will be added to (before `get_peft_model`).
        lora_config: its LoraConfig, with `init_lora_weights="corda"` and `corda_config`.
        run_model: runs `model` (or `hooked_model`) on the calibration data; may be None when
            `corda_config.cache_file` or `covariance_file` exists.
        hooked_model: another model to collect the input covariances from (rarely needed).
    """
    corda_config = lora_config.corda_config
    if corda_config is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (CordaConfig(...)).")
    if _usable(corda_config.cache_file):
        cache = _load_tensors(corda_config.cache_file, _model_device(model))
        for name, module in preprocessing_targets(model, lora_config):
            missing = [k for k in ("S_WC", "U_WC", "V_WC") if f"{name}.eigens.{k}" not in cache]
            if missing:
                raise ValueError(f"The CorDA cache {corda_config.cache_file!r} has no entry for {name!r}.")
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")))
        return
    method = corda_config.corda_method
    if method not in ("ipm", "kpm"):
        raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {method!r}.")
    covariances = _input_covariances(model, lora_config, run_model, hooked_model)
    layers = list(preprocessing_targets(model, lora_config))
    progress = tqdm(layers, desc="CorDA decompositions") if corda_config.verbose else layers
    for name, module in progress:
        rank = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), name), lora_config.r)
        module.eigens = decompose_layer(module, covariances[name], rank, method)
        if not corda_config.prune_temporary_fields:
            module.covariance_matrix = covariances[name]
    if corda_config.cache_file is not None:
        cache = {}
        for name, module in layers:
            for key in ("S_WC", "U_WC", "V_WC"):
                cache[f"{name}.eigens.{key}"] = getattr(module.eigens, key)
        _save_tensors(cache, corda_config.cache_file)


def _input_covariances(
    model: nn.Module,
    config: LoraConfig,
    run_model: Callable[[], None] | None,
    hooked_model: nn.Module | None,
) -> dict[str, torch.Tensor]:
    """Per target layer, the mean over forward calls of `X^T X` with X a call's input scaled by 1/|max(X)|."""
    corda_config = config.corda_config
    if _usable(corda_config.covariance_file):
        stored = _load_tensors(corda_config.covariance_file, _model_device(model))
        return {name: stored[name] for name, _ in preprocessing_targets(model, config)}
    if run_model is None:
        raise ValueError("preprocess_corda needs run_model when neither cache_file nor covariance_file exists yet.")
    hooked_model = model if hooked_model is None else hooked_model
    hooked_model.eval()
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if not corda_config.use_float16_for_covariance:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError(f"CorDA found NaN or inf in the (scaled) input of {name!r}; check the calibration data.")
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + 1

    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: accumulate(name, m, i, o))
        for name, module in preprocessing_targets(hooked_model, config)
    ]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    covariances = {}
    for name, _ in preprocessing_targets(model, config):
        if name not in sums:
            raise ValueError(f"run_model never ran the layer {name!r}, so CorDA has no input covariance for it.")
        covariance = sums[name] / counts[name]
        if not torch.isfinite(covariance).all():
            raise ValueError(f"CorDA's input covariance of {name!r} holds NaN or inf values.")
        covariances[name] = covariance
    if corda_config.covariance_file is not None:
        _save_tensors(covariances, corda_config.covariance_file)
    return covariances


@torch.no_grad()
def decompose_layer(linear: nn.Module, covariance: torch.Tensor, rank: int, method: str) -> CordaEigens:
    """CorDA's r components of a layer from its input covariance C: W C = U S V'^T, V = C^-1 V' ("ipm": largest S)."""
    weight = linear.weight.detach().float()
    if is_conv1d(linear):
        weight = weight.T
    covariance = covariance.float()
    identity = torch.eye(covariance.shape[0], device=covariance.device)
    # As PEFT: damp the diagonal (starting at 1% of its mean, doubling) until the inverse is accurate.
    damp = 0.01
    while True:
        damped = covariance + identity * (torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, identity).item() < 0.05:
            break
        damp *= 2
    product = weight @ damped
    if method == "ipm":
        U, S, Vh = top_singular_triplets(product, rank)
    else:
        U, S, Vh = torch.linalg.svd(product, full_matrices=False)
        U, S, Vh = U[:, -rank:], S[-rank:], Vh[-rank:]
    V = (Vh @ inverse).T
    device = linear.weight.device
    return CordaEigens(S_WC=S.clone(), U_WC=U.contiguous().to(device), V_WC=V.contiguous().to(device))
