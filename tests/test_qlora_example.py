"""examples/qlora_finetune.py runs end to end with tiny settings: 4-bit base (bitsandbytes NF4 layers under
peftfast's LoRA layers) and full-precision base, the loss goes down, and the saved adapter reloads."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import peftfast

pytest.importorskip("bitsandbytes")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qlora_finetune.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("qlora_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_lora_on_every_linear_layer_of_the_4bit_base(example):
    base = example.build_model(None, "tiny", None, 32, torch.device("cpu"), four_bit=True)
    model = example.lora_model(base, rank=4, gradient_checkpointing=True)
    layers = [module for module in model.modules() if isinstance(module, peftfast.tuners.lora.LoraLayer)]
    # 2 decoder layers x 7 projections; the output head stays out.
    assert len(layers) == 14
    assert all(type(layer).__name__ == "Linear4bit" for layer in layers)
    assert all(type(layer.get_base_layer()).__module__.startswith("bitsandbytes") for layer in layers)
    assert model.get_base_model().model.gradient_checkpointing


@pytest.mark.parametrize("four_bit", [True, False], ids=["4bit", "full-precision"])
def test_example_trains_and_saves_the_adapter(example, tmp_path, four_bit):
    argv = ["--size", "tiny", "--steps", "12", "--seq-len", "32", "--batch-size", "4", "--lr", "5e-3", "--quiet"]
    argv += ["--output", str(tmp_path)] + ([] if four_bit else ["--no-4bit"])
    result = example.run(example.build_parser().parse_args(argv))
    assert result.four_bit is four_bit
    assert all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == 12
    assert sum(result.losses[-3:]) < sum(result.losses[:3]), result.losses
    assert result.tokens_per_second > 0 and result.peak_memory_mb > 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["task_type"] == "CAUSAL_LM"
    base = example.build_model(None, "tiny", None, 32, torch.device("cpu"), four_bit=four_bit)
    reloaded = peftfast.PeftModel.from_pretrained(base, str(tmp_path))
    assert len(reloaded.targeted_module_names) == 14
