"""Setup work stays flat in the number of adapters loaded: the N-th `load_adapter` does what the first did.

Work is counted, not timed: the Python and C function calls one call makes (sys.setprofile), which no other process
on the machine can change. Anything that walks every adapter's modules, copies every adapter's state or builds the
whole state dict on each load adds calls per adapter already loaded, so after 40 adapters it shows as thousands of
extra calls. bench/bench_setup.py times the same thing against HF PEFT.
"""

from __future__ import annotations

import sys

import torch
from models import tiny_llama

from peftfast import LoraConfig, PeftModel, get_peft_model

ADAPTERS = 40


def _calls(fn) -> int:
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return calls


def test_nth_load_adapter_makes_as_many_calls_as_the_second(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["lm_head"])
    get_peft_model(tiny_llama(num_hidden_layers=2), config).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(num_hidden_layers=2), tmp_path)
    # The first load_adapter fills caches (regexes, imports); the second is the baseline.
    model.load_adapter(tmp_path, adapter_name="warm_up")
    early = _calls(lambda: model.load_adapter(tmp_path, adapter_name="early"))
    for index in range(ADAPTERS):
        model.load_adapter(tmp_path, adapter_name=f"a{index}")
    late = _calls(lambda: model.load_adapter(tmp_path, adapter_name="late"))
    # A walk over every adapter's modules would add ~400 calls per adapter loaded (14 LoRA layers here: +35% after 40
    # adapters). What does grow is the modules_to_save wrapper: its set_adapter (HF PEFT's) freezes every adapter's
    # copy of lm_head, and their flags are kept to be restored, ~35 calls per adapter (+3% here).
    assert late <= early * 1.05, (early, late)
    # And the adapters were really loaded, into every layer (the count above is not of a load that did nothing).
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert {"early", "late", f"a{ADAPTERS - 1}"} <= set(layer.lora_A)
    torch.testing.assert_close(layer.lora_A["late"].weight, layer.lora_A["default"].weight)
