"""Every public class and function HF PEFT 0.21.2 defines in `peft.tuners.lora.{layer,model,bnb,dora,config}` is
importable from the same path under `peftfast`, or is listed here with the feature peftfast lacks."""

from __future__ import annotations

import importlib
import subprocess
import sys

import peft.tuners.lora
import pytest

import peftfast.tuners.lora

MODULES = ("layer", "model", "bnb", "dora", "config")

# Name -> the HF PEFT feature it belongs to, which peftfast does not have.
ABSENT = {
    "layer.LoraEmbeddingATPHolder": "tensor-parallel embeddings (transformers' DTensor TP plans)",
    "layer.LoraVariant": "HF PEFT's plug-in interface for LoRA variants (peftfast's variants are built in)",
    "model.add_lora_tp_hooks_dtensor": "tensor-parallel LoRA (transformers' DTensor TP plans)",
    "model.get_tp_plan_and_mesh": "tensor-parallel LoRA (transformers' DTensor TP plans)",
    "dora.cache_decorator": "HF PEFT's opt-in DoRA cache (ENABLE_DORA_CACHING); peftfast's norm cache is always on",
    "config.ArrowConfig": "the Arrow LoRA variant",
    "config.BdLoraConfig": "the block-diagonal LoRA variant (use_bdlora)",
    "config.KasaConfig": "the KaSA LoRA variant",
    "config.MontecloraConfig": "the MonteCLoRA LoRA variant",
    "config.VeloraConfig": "the VeLoRA LoRA variant",
}


def _peft_definitions(module: str) -> list[str]:
    """The public classes and functions `peft.tuners.lora.<module>` defines itself (not those it imports)."""
    namespace = importlib.import_module(f"peft.tuners.lora.{module}")
    return sorted(
        name
        for name, value in vars(namespace).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == namespace.__name__
    )


@pytest.mark.parametrize("module", MODULES)
def test_peft_names_exist_at_the_same_path(module):
    ours = importlib.import_module(f"peftfast.tuners.lora.{module}")
    defined = _peft_definitions(module)
    assert defined, f"peft.tuners.lora.{module} defines nothing: the comparison would pass vacuously"
    missing = [name for name in defined if not hasattr(ours, name) and f"{module}.{name}" not in ABSENT]
    assert missing == [], f"peftfast.tuners.lora.{module} lacks {missing}"
    # A name listed as absent that peftfast has after all, or that HF PEFT no longer defines, is a stale entry.
    listed = [key.split(".", 1)[1] for key in ABSENT if key.startswith(f"{module}.")]
    assert [name for name in listed if hasattr(ours, name) or name not in defined] == []


def test_classes_defined_elsewhere_are_the_same_objects_at_peft_paths():
    from peftfast.tuners.lora import layer, mha, param_wrapper

    assert layer.ParamWrapper is param_wrapper.ParamWrapper is peftfast.tuners.lora.ParamWrapper
    assert layer.MultiheadAttention is mha.MultiheadAttention is peftfast.tuners.lora.MultiheadAttention
    assert peft.tuners.lora.layer.ParamWrapper.__name__ == layer.ParamWrapper.__name__


def test_layer_path_imports_in_a_fresh_interpreter():
    """Imported first, before anything else of peftfast, the way a ported script does it."""
    code = (
        "from peftfast.tuners.lora.layer import MultiheadAttention, ParamWrapper\n"
        "from peftfast.tuners.lora.param_wrapper import ParamWrapper as Defined\n"
        "assert ParamWrapper is Defined, ParamWrapper\n"
        "print(MultiheadAttention.__module__, ParamWrapper.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["peftfast.tuners.lora.mha", "peftfast.tuners.lora.param_wrapper"]
