"""Setup work stays flat: the N-th `load_adapter` does what the first did, and `get_peft_model` does a bounded amount
of work per adapter layer and walks the module tree a fixed number of times, whatever the depth of the model.

Work is counted, not timed: the Python and C function calls one call makes (sys.setprofile), which no other process
on the machine can change. Anything that walks every adapter's modules, copies every adapter's state or builds the
whole state dict on each load adds calls per adapter already loaded, so after 40 adapters it shows as thousands of
extra calls. bench/bench_setup.py times the same things against HF PEFT.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from models import tiny_llama

from peftfast import LoraConfig, PeftModel, get_peft_model
from peftfast.tuners.lora.layer import _new_linear
from peftfast.utils.other import init_empty_weights
from peftfast.utils.rollback import ModuleTreeRollback

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


class _CountingChildren(dict):
    """A module's `_modules` dict that counts how often its children are listed: once per walk of the tree through
    that module (torch's named_modules / children and peftfast's walks all list them)."""

    listings = 0

    def items(self):
        _CountingChildren.listings += 1
        return super().items()

    def values(self):
        _CountingChildren.listings += 1
        return super().values()


@pytest.mark.parametrize("targets, walks", [(None, 4), ("all-linear", 7)])
def test_get_peft_model_walks_the_module_tree_as_often_for_any_depth(targets, walks):
    # Each walk of the whole model passes the decoder layers' list once. The count is the same for 4 and 16 layers
    # (nothing walks the tree once per target), and pinned: the rollback record, the matching, freezing and casting
    # (and, for all-linear, finding the linear layers and the output layer), no more.
    counts = {}
    for layers in (4, 16):
        model = tiny_llama(num_hidden_layers=layers)
        decoder_layers = model.model.layers
        decoder_layers.__dict__["_modules"] = _CountingChildren(decoder_layers._modules)
        _CountingChildren.listings = 0
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
        counts[layers] = _CountingChildren.listings
        assert len(peft_model.targeted_module_names) == layers * (2 if targets is None else 7)
    assert counts[4] == counts[16] <= walks, counts


def test_get_peft_model_work_per_adapter_layer_is_flat_and_bounded():
    # Python and C calls of get_peft_model with LoRA on all 7 linear layers of each decoder layer: the same increment
    # from 4 to 8 layers as from 8 to 16 (nothing grows with the number of targets already made), and at most 1000
    # calls per adapter layer (on main before this was cut: 1650; now ~890: constructors without nn.Linear's and
    # nn.Module.__setattr__'s generic paths, holders and entries read from their dicts, one walk fewer).
    config = {"r": 4, "target_modules": "all-linear"}
    get_peft_model(tiny_llama(num_hidden_layers=1), LoraConfig(**config))
    calls = {}
    for layers in (4, 8, 16):
        model = tiny_llama(num_hidden_layers=layers)
        calls[layers] = _calls(lambda model=model: get_peft_model(model, LoraConfig(**config)))
    low, high = calls[8] - calls[4], (calls[16] - calls[8]) / 2
    assert abs(high - low) <= 0.02 * low, calls
    per_adapter_layer = high / (4 * 7)
    assert per_adapter_layer <= 1000, per_adapter_layer


def test_new_linear_is_nn_linear_with_the_same_draws():
    for in_features, out_features, bias in [(13, 4, False), (4, 13, True), (1, 1, True), (64, 16, False)]:
        torch.manual_seed(3)
        theirs = torch.nn.Linear(in_features, out_features, bias=bias)
        after_theirs = torch.rand(4)
        torch.manual_seed(3)
        ours = _new_linear(in_features, out_features, bias)
        after_ours = torch.rand(4)
        assert type(ours) is torch.nn.Linear and repr(ours) == repr(theirs)
        assert vars(ours).keys() == vars(theirs).keys()
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for name, param in theirs.named_parameters():
            assert torch.equal(getattr(ours, name), param) and getattr(ours, name).requires_grad
        # The generator advanced as far: what is drawn next is the same.
        assert torch.equal(after_ours, after_theirs)


def test_new_linear_leaves_construction_to_torch_where_a_hook_watches_it(monkeypatch):
    seen = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: seen.append(name)
    )
    try:
        layer = _new_linear(5, 3, True)
    finally:
        handle.remove()
    assert seen == ["weight", "bias"] and layer.weight.shape == (3, 5)
    with init_empty_weights():
        assert _new_linear(5, 3, False).weight.device.type == "meta"
    # An initialiser swapped out (transformers' no_init_weights does that) is the one that runs.
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda tensor, **kwargs: tensor.data.fill_(7.0))
    assert torch.equal(_new_linear(5, 3, False).weight, torch.full((3, 5), 7.0))


def test_rollback_empties_again_what_was_empty_and_refills_the_rest():
    model = tiny_llama(num_hidden_layers=1)
    layer = model.model.layers[0].mlp
    children, hooks, buffers = layer._modules, layer.gate_proj._forward_hooks, layer.gate_proj._buffers
    before = dict(children)
    rollback = ModuleTreeRollback(model)
    layer.gate_proj.register_forward_hook(lambda *args: None)
    layer.gate_proj.register_buffer("extra", torch.zeros(1))
    layer.extra_child = torch.nn.Identity()
    del layer.up_proj
    rollback.restore()
    assert layer._modules is children and dict(children) == before
    assert layer.gate_proj._forward_hooks is hooks and not hooks
    assert layer.gate_proj._buffers is buffers and "extra" not in buffers


@pytest.mark.parametrize("inference_mode", [False, True])
def test_first_injection_trains_what_hf_peft_trains(inference_mode):
    import peft

    trainable = {}
    for lib in (peft, importlib.import_module("peftfast")):
        config = lib.LoraConfig(r=4, modules_to_save=["lm_head"], inference_mode=inference_mode)
        model = lib.get_peft_model(tiny_llama(num_hidden_layers=2), config)
        trainable[lib.__name__] = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable["peftfast"] == trainable["peft"]
    assert bool(trainable["peftfast"]) is not inference_mode
