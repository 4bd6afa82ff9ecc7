"""Hotswapping adapters: HF PEFT's `peft.utils.hotswap` API at `peftfast.utils.hotswap` (the same results and the same
refusals as PEFT's, on adapter folders saved by PEFT), swaps into compiled models without a recompile, and adapter
slots that take new adapters into a compiled mixed-adapter model without a recompile (counted)."""

from __future__ import annotations

import peft
import peft.utils.hotswap as peft_hotswap
import pytest
import torch
import torch._dynamo
from models import tiny_llama
from tolerances import assert_close
from torch._dynamo.testing import CompileCounterWithBackend

import peftfast
import peftfast.utils.hotswap as fast_hotswap

LIBS = {"peft": (peft, peft_hotswap), "peftfast": (peftfast, fast_hotswap)}
# Adapters as HF PEFT saves them: different ranks and alphas, "small" on fewer modules, "wide" on more.
ADAPTERS = {
    "first": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "second": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "small": dict(r=2, lora_alpha=2, target_modules=["q_proj"]),
    "wide": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"]),
    "dropout": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def _llama():
    return tiny_llama(num_hidden_layers=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    for index, (name, settings) in enumerate(ADAPTERS.items()):
        torch.manual_seed(index)
        model = peft.get_peft_model(_llama(), peft.LoraConfig(init_lora_weights=False, **settings))
        model.save_pretrained(root / name)
    return root


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(batch: int = 3):
    return torch.randint(1, 101, (batch, 6), generator=torch.Generator().manual_seed(4))


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=_ids(), **kwargs).logits


def _loaded(lib, folder):
    return lib.PeftModel.from_pretrained(_llama(), folder).eval()


@pytest.mark.parametrize("prepare", [False, True], ids=["plain", "prepared"])
@pytest.mark.parametrize("new", ["second", "small"])
def test_swapped_model_gives_the_new_adapters_outputs_as_peft(folders, prepare, new):
    """Same rank and alpha or not (prepared: ranks padded, scalings tensors), more modules or fewer: after the swap
    the model equals the new adapter loaded directly, in both libraries."""
    if not prepare and new == "second":
        pytest.skip("a larger rank without padding: PEFT replaces the tensors; covered below")
    outputs = {}
    for lib_name, (lib, hotswap) in LIBS.items():
        model = _loaded(lib, folders / "first")
        if prepare:
            hotswap.prepare_model_for_compiled_hotswap(model, target_rank=8)
        hotswap.hotswap_adapter(model, folders / new, adapter_name="default", torch_device="cpu")
        outputs[lib_name] = _logits(model)
        assert_close(outputs[lib_name], _logits(_loaded(lib, folders / new)))
    assert_close(outputs["peftfast"], outputs["peft"])
    assert not torch.allclose(outputs["peftfast"], _logits(_loaded(peftfast, folders / "first")), atol=1e-4)


def test_larger_rank_without_padding_replaces_the_tensors(folders):
    model = _loaded(peftfast, folders / "first")
    fast_hotswap.hotswap_adapter(model, folders / "second", adapter_name="default", torch_device="cpu")
    assert_close(_logits(model), _logits(_loaded(peftfast, folders / "second")))


def test_prepare_pads_ranks_converts_scalings_and_updates_configs(folders):
    results = {}
    for lib_name, (lib, hotswap) in LIBS.items():
        model = _loaded(lib, folders / "first")
        before = _logits(model)
        hotswap.prepare_model_for_compiled_hotswap(model, target_rank=16, config=model.peft_config)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        results[lib_name] = (
            tuple(layer.lora_A["default"].weight.shape),
            tuple(layer.lora_B["default"].weight.shape),
            isinstance(layer.scaling["default"], torch.Tensor),
            model.peft_config["default"].r,
        )
        assert_close(_logits(model), before)
    assert results["peftfast"] == results["peft"] == ((16, 32), (32, 16), True, 16)


@pytest.mark.parametrize(
    "case, error",
    [
        ("unexpected_keys", RuntimeError),
        ("incompatible_config", ValueError),
        ("merged", ValueError),
        ("compiled", ValueError),
        ("rank_above_target", ValueError),
        ("no_lora_layers", ValueError),
        ("bad_check_compiled", ValueError),
    ],
)
def test_refusals_match_peft(folders, case, error):
    for lib_name, (lib, hotswap) in LIBS.items():
        model = _loaded(lib, folders / "first")
        before = _logits(model)
        with pytest.raises(error):
            if case == "unexpected_keys":
                hotswap.hotswap_adapter(model, folders / "wide", adapter_name="default", torch_device="cpu")
            elif case == "incompatible_config":
                hotswap.hotswap_adapter(model, folders / "dropout", adapter_name="default", torch_device="cpu")
            elif case == "merged":
                model.merge_adapter()
                before = _logits(model)
                hotswap.hotswap_adapter(model, folders / "second", adapter_name="default", torch_device="cpu")
            elif case == "compiled":
                hotswap.prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=8)
            elif case == "rank_above_target":
                hotswap.prepare_model_for_compiled_hotswap(model, target_rank=2)
            elif case == "no_lora_layers":
                hotswap.prepare_model_for_compiled_hotswap(_llama(), target_rank=8)
            else:
                hotswap.prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=8, check_compiled="maybe")
        if case in ("unexpected_keys", "incompatible_config", "merged"):
            # Checked before anything is written (peftfast; PEFT too in these cases).
            assert_close(_logits(model), before), lib_name


def test_config_compatibility_check_matches_peft():
    for lib, hotswap in LIBS.values():
        base = lib.LoraConfig(r=4, target_modules=["q_proj"])
        hotswap.check_hotswap_configs_compatible(base, lib.LoraConfig(r=16, lora_alpha=3, target_modules=["v_proj"]))
        for field, value in (("use_rslora", True), ("lora_dropout", 0.5), ("alpha_pattern", {"q_proj": 2})):
            other = lib.LoraConfig(r=4, target_modules=["q_proj"], **{field: value})
            with pytest.raises(ValueError, match=f"for {field}"):
                hotswap.check_hotswap_configs_compatible(base, other)


def test_hotswap_into_a_compiled_prepared_model_does_not_recompile(folders):
    model = _loaded(peftfast, folders / "first")
    fast_hotswap.prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    assert_close(_logits(compiled), _logits(_loaded(peftfast, folders / "first")))
    for new in ("second", "small", "first"):
        fast_hotswap.hotswap_adapter(compiled, folders / new, adapter_name="default", torch_device="cpu")
        assert_close(_logits(compiled), _logits(_loaded(peftfast, folders / new)))
    assert counter.frame_count == 1


def _reference(folders, names):
    """The adapters loaded the ordinary way, under their own names."""
    model = peftfast.PeftModel.from_pretrained(_llama(), folders / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders / name, adapter_name=name)
    return model.eval()


def test_adapter_slots_serve_new_adapters_in_a_compiled_mixed_batch_without_recompiling(folders):
    model = peftfast.PeftModel.from_pretrained(_llama(), folders / "first", adapter_name="resident").eval()
    slots = fast_hotswap.AdapterSlots(model, capacity=2, max_rank=8, target_modules=["q_proj", "v_proj", "down_proj"])
    reference = _reference(folders, ["first", "second", "small"])
    counter = CompileCounterWithBackend("eager")
    inner = torch.compile(model.base_model.model, backend=counter, fullgraph=True)

    def mixed(names):
        with torch.no_grad(), model.base_model._enable_peft_forward_hooks(adapter_names=names):
            return inner(input_ids=_ids()).logits

    assert_close(mixed(slots.rows(["__base__"] * 3)), _logits(_llama()))
    slots.load(folders / "second", name="second")
    slots.load(folders / "small", name="small")
    rows = ["small", "__base__", "second"]
    assert_close(mixed(slots.rows(rows)), _logits(reference, adapter_names=rows), kind="kernel")
    # Replacing one (unload, load another into the freed slot) and reloading under a name already loaded.
    slots.unload("small")
    slots.load(folders / "first", name="first")
    slots.load(folders / "first", name="second")
    rows = ["first", "second", "__base__"]
    assert_close(
        mixed(slots.rows(rows)), _logits(reference, adapter_names=["first", "first", "__base__"]), kind="kernel"
    )
    assert counter.frame_count == 1


def test_adapter_slots_refuse_what_does_not_fit_and_change_nothing(folders, tmp_path):
    model = peftfast.PeftModel.from_pretrained(_llama(), folders / "first").eval()
    slots = fast_hotswap.AdapterSlots(model, capacity=1, max_rank=4, target_modules=["q_proj", "v_proj", "down_proj"])
    slots.load(folders / "small", name="small")
    expected = _logits(model, adapter_names=slots.rows(["small"] * 3))
    with pytest.raises(ValueError, match="doesn't fit a slot of rank 4"):
        slots.load(folders / "second", name="second")
    with pytest.raises(ValueError, match="up_proj.*which no adapter slot holds"):
        slots.load(folders / "wide", name="wide")
    with pytest.raises(ValueError, match="All 1 adapter slots are taken"):
        slots.load(folders / "first", name="other")
    with pytest.raises(ValueError, match=r"\['nope'\] are not loaded"):
        slots.rows(["nope"])
    assert_close(_logits(model, adapter_names=slots.rows(["small"] * 3)), expected)
    slots.unload("small")
    assert_close(_logits(model, adapter_names=["slot0"] * 3), _logits(_llama()))
