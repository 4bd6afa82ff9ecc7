"""Probes for optional packages and hardware, with HF PEFT's names and answers (`peft.import_utils`).

Importing this module imports none of the packages it asks about: a probe looks for the package (and, where HF
PEFT does, imports it to check a feature) when first called, and caches the answer. The transformers version flags
(`is_transformers_ge_v5`, ...) are module attributes as in HF PEFT, computed on first access from the installed
version; they are False when transformers is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from functools import lru_cache

import packaging.version
import torch

# Module attribute -> the transformers version it is true from (HF PEFT's thresholds); `>=` unless noted.
_TRANSFORMERS_FLAGS = {
    "is_transformers_ge_v5": "5.0.0.dev0",
    "is_transformers_ge_v5_1_0": "5.1.0",
    "is_transformers_ge_v5_4_0": "5.4.0",
    "is_transformers_ge_v5_6_0": "5.6.0.dev0",
    "is_transformers_ge_v5_13_0": "5.13.0.dev0",
    "is_transformers_ge_v5_17_0": "5.17.0",
}
# True below this version.
_TRANSFORMERS_LE_4_53 = "4.54.0.dev0"


def _installed_version(package: str) -> packaging.version.Version | None:
    try:
        return packaging.version.parse(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_transformers_dtensor_tp() -> bool:
    try:
        from transformers.distributed.tensor_parallel import apply_tensor_parallelism  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name: str) -> bool:
    if name not in _TRANSFORMERS_FLAGS and name not in ("is_transformers_le_4_53", "is_transformers_dtensor_tp"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    version = _installed_version("transformers")
    if version is None:
        value = False
    elif name == "is_transformers_le_4_53":
        value = version < packaging.version.parse(_TRANSFORMERS_LE_4_53)
    elif name == "is_transformers_dtensor_tp":
        value = _has_transformers_dtensor_tp()
    else:
        value = version >= packaging.version.parse(_TRANSFORMERS_FLAGS[name])
    globals()[name] = value
    return value


@lru_cache
def is_bnb_available() -> bool:
    return _has_module("bitsandbytes")


@lru_cache
def is_bnb_4bit_available() -> bool:
    if not is_bnb_available():
        return False
    import bitsandbytes as bnb

    return hasattr(bnb.nn, "Linear4bit")


@lru_cache
def is_optimum_available() -> bool:
    return _has_module("optimum")


@lru_cache
def is_gptqmodel_available() -> bool:
    """Whether gptqmodel >= 7.0.0 is installed (with optimum >= 1.24.0); an older one raises ImportError, as in HF
    PEFT, rather than being silently ignored."""
    if not _has_module("gptqmodel"):
        return False
    minimum_gptqmodel, minimum_optimum = packaging.version.parse("7.0.0"), packaging.version.parse("1.24.0")
    gptqmodel_version = _installed_version("gptqmodel")
    if gptqmodel_version is None or gptqmodel_version < minimum_gptqmodel:
        raise ImportError(
            f"Found an incompatible version of gptqmodel ({gptqmodel_version}); version {minimum_gptqmodel} or "
            "higher is supported."
        )
    if not is_optimum_available():
        raise ImportError(f"gptqmodel needs optimum {minimum_optimum} or higher to be installed.")
    optimum_version = _installed_version("optimum")
    if optimum_version is not None and optimum_version < minimum_optimum:
        raise ImportError(f"gptqmodel needs optimum {minimum_optimum} or higher; found {optimum_version}.")
    return True


@lru_cache
def is_torch_tpu_available(check_device: bool = True) -> bool:
    """Whether torch_xla is installed and, with `check_device`, a TPU (XLA device) can be opened."""
    if not _has_module("torch_xla"):
        return False
    if not check_device:
        return True
    try:
        import torch_xla.core.xla_model as xm

        xm.xla_device()
    except RuntimeError:
        return False
    return True


@lru_cache
def is_aqlm_available() -> bool:
    return _has_module("aqlm")


@lru_cache
def is_eetq_available() -> bool:
    return _has_module("eetq")


@lru_cache
def is_hqq_available() -> bool:
    return _has_module("hqq")


@lru_cache
def is_inc_available() -> bool:
    return _has_module("neural_compressor")


@lru_cache
def is_torchao_available() -> bool:
    """Whether torchao >= 0.16.0 is installed; an older one raises ImportError, as in HF PEFT."""
    if not _has_module("torchao"):
        return False
    minimum = packaging.version.parse("0.16.0")
    version = _installed_version("torchao")
    if version is None:
        return False
    if version < minimum:
        raise ImportError(
            f"Found an incompatible version of torchao ({version}); version {minimum} or higher is needed."
        )
    return True


@lru_cache
def is_torchao_ge_v0_18_0() -> bool:
    return is_torchao_available() and _installed_version("torchao") >= packaging.version.parse("0.18.0")


@lru_cache
def is_xpu_available(check_device: bool = False) -> bool:
    """Whether an Intel XPU is usable (never on macOS); with `check_device`, whether one can be counted."""
    if platform.system() == "Darwin":
        return False
    if check_device:
        try:
            torch.xpu.device_count()
            return torch.xpu.is_available()
        except RuntimeError:
            return False
    return hasattr(torch, "xpu") and torch.xpu.is_available()


@lru_cache
def is_diffusers_available() -> bool:
    return _has_module("diffusers")


@lru_cache
def is_te_available() -> bool:
    return _has_module("transformer_engine")


@lru_cache
def is_te_pytorch_available() -> bool:
    if not is_te_available():
        return False
    import transformer_engine

    return hasattr(transformer_engine, "pytorch")
