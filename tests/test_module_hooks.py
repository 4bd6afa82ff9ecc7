"""Hooks around the modules a LoRA layer holds run as in HF PEFT: the fused paths read weights instead of calling the
modules, so they must step aside whenever something (accelerate's offload, a user's forward hook, a global module
hook) wraps those calls."""

from __future__ import annotations

import peft
import pytest
import torch
from models import tiny_llama
from tolerances import assert_close

import peftfast

accelerate = pytest.importorskip("accelerate")

LIBS = {"peft": peft, "peftfast": peftfast}
IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(lib, seed: int = 1):
    torch.manual_seed(seed)
    config = lib.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    model = lib.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", lib.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("mixed", [False, True], ids=["active-adapter", "mixed-batch"])
def test_accelerate_cpu_offload_gives_the_outputs_of_the_model_in_memory_and_of_hf_peft(mixed):
    extra = {"adapter_names": ["default", "other"]} if mixed else {}
    results = {}
    for name, lib in LIBS.items():
        model = _model(lib)
        with torch.no_grad():
            in_memory = model(IDS, **extra).logits
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.device.type == "meta"
        with torch.no_grad():
            offloaded = model(IDS, **extra).logits
        assert torch.isfinite(offloaded).all()
        assert torch.equal(offloaded, in_memory), name
        results[name] = offloaded
    assert_close(results["peftfast"], results["peft"])


def test_a_forward_hook_on_lora_A_runs_and_changes_the_output_as_in_hf_peft():
    results = {}
    for name, lib in LIBS.items():
        model = _model(lib)
        layer = model.base_model.model.model.layers[1].mlp.down_proj
        calls = []

        def doubled(module, inputs, output, calls=calls):
            calls.append(tuple(output.shape))
            return output * 2

        handle = layer.lora_A["default"].register_forward_hook(doubled)
        with torch.no_grad():
            hooked = model(IDS).logits
        handle.remove()
        with torch.no_grad():
            plain = model(IDS).logits
        assert len(calls) == 1
        assert not torch.equal(hooked, plain)
        results[name] = (hooked, plain)
    for ours, theirs in zip(results["peftfast"], results["peft"]):
        assert_close(ours, theirs)


def test_a_global_module_hook_sees_the_lora_modules_called_as_in_hf_peft():
    counts = {}
    for name, lib in LIBS.items():
        model = _model(lib)
        seen: dict[str, int] = {}

        def count(module, inputs, output, seen=seen):
            kind = type(module).__name__
            seen[kind] = seen.get(kind, 0) + 1

        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            with torch.no_grad():
                model(IDS)
        finally:
            handle.remove()
        counts[name] = {kind: seen[kind] for kind in ("Linear", "Identity")}
    # Per adapted layer: the base Linear, lora_A, lora_B and the dropout (Identity at p=0) of the active adapter.
    assert counts["peftfast"] == counts["peft"]
    assert counts["peftfast"]["Identity"] == 2 * len(TARGETS)
