"""Adapter lifecycle behaviours of issue 14, each run the same way on HF PEFT and on peftfast and compared:
deleting adapters (nothing of them left; refusals change nothing), the disable_adapter context (nested, irregular),
low_cpu_mem_usage at every entry point, and the adapter dtype on every layer type."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import peft
import pytest
import torch
from models import MLP, ConvNet, EmbeddingModel, tiny_gpt2, tiny_llama
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast.integrations import transformers as integration

LIBS = {"peft": peft, "peftfast": peftfast}


def _x(rows: int = 6) -> torch.Tensor:
    return torch.randn(rows, 11, generator=torch.Generator().manual_seed(3))


def _two_adapter_mlp(lib) -> nn.Module:
    torch.manual_seed(0)
    base = MLP()
    torch.manual_seed(1)
    # Both adapters save lin2: HF PEFT's mixed batch fails on a modules_to_save copy only some adapters have.
    config = lib.LoraConfig(
        target_modules=["lin0", "lin1"],
        init_lora_weights=False,
        lora_bias=True,
        use_rslora=True,
        modules_to_save=["lin2"],
    )
    model = lib.get_peft_model(base, config, adapter_name="keep")
    model.add_adapter(
        "drop",
        lib.LoraConfig(target_modules=["lin1"], init_lora_weights=False, lora_dropout=0.1, modules_to_save=["lin2"]),
    )
    return model.eval()


def _mentions(model: nn.Module, name: str) -> list[str]:
    """Every place in `model`'s layers that still names adapter `name`: keys of per-adapter dicts and module/
    parameter dicts, entries of lists, plain attributes, and one level into helper objects (a layer's adapter bank)."""
    found = []

    def look(owner: str, value, depth: int) -> None:
        if isinstance(value, (str, bytes)):
            if value == name:
                found.append(owner)
        elif isinstance(value, dict) or hasattr(value, "keys") and not isinstance(value, torch.Tensor):
            if name in list(value.keys()):
                found.append(owner)
        elif isinstance(value, (list, tuple, set, frozenset)):
            if name in value:
                found.append(owner)
        elif depth == 0 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type)):
            for attribute, inner in vars(value).items():
                look(f"{owner}.{attribute}", inner, 1)

    for module_name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if attribute in ("_modules", "_parameters", "_buffers"):
                value = {key: None for key in value}
            look(f"{module_name}.{attribute}", value, 0)
    return found


def test_delete_adapter_leaves_nothing_of_it_as_in_peft():
    x = _x()
    records = {}
    for lib_name, lib in LIBS.items():
        model = _two_adapter_mlp(lib)
        with torch.no_grad():
            model(x, adapter_names=["keep", "drop", "__base__"] * 2)  # builds peftfast's packed adapter bank
            model.delete_adapter("drop")
            output = model(x)
        assert _mentions(model, "drop") == [], lib_name
        records[lib_name] = output, [dataclasses.asdict(status) for status in model.get_layer_status()]
    assert_close(records["peftfast"][0], records["peft"][0])
    assert records["peftfast"][1] == records["peft"][1]


def _snapshot(model: nn.Module) -> tuple:
    return (
        {key: value.clone() for key, value in model.state_dict().items()},
        list(model.peft_config),
        list(model.active_adapters),
        [dataclasses.asdict(status) for status in model.get_layer_status()],
    )


def _assert_same(snapshot: tuple, model: nn.Module) -> None:
    state, configs, active, status = snapshot
    now = _snapshot(model)
    assert list(now[0]) == list(state) and all(torch.equal(now[0][key], state[key]) for key in state)
    assert now[1:] == (configs, active, status)


def test_deleting_an_unknown_or_merged_adapter_raises_as_in_peft_and_changes_nothing():
    for lib in LIBS.values():
        model = _two_adapter_mlp(lib)
        model.merge_adapter(adapter_names=["keep"])
        before = _snapshot(model)
        with pytest.raises(ValueError, match="nope"):
            model.delete_adapter("nope")
        _assert_same(before, model)
        with pytest.raises(ValueError, match="merged"):
            model.delete_adapter("keep")
        _assert_same(before, model)


def test_transformers_delete_adapter_of_several_refuses_only_the_merged_one():
    # HF PEFT's functional delete (behind transformers' delete_adapter) deletes a merged adapter, leaving its delta
    # in the base weights with nothing to unmerge it; peftfast refuses, names only the merged one, deletes nothing.
    model = tiny_llama()
    integration.add_adapter(model, peftfast.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    integration.add_adapter(model, peftfast.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "b")
    for module in model.modules():
        if isinstance(module, peftfast.tuners.tuners_utils.BaseTunerLayer):
            module.merge(adapter_names=["a"])
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['a'\] while they are merged") as error:
        integration.delete_adapter(model, ["b", "a"])
    assert "'b'" not in str(error.value)
    assert list(model.peft_config) == ["a", "b"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())

    # Unmerged, deleting several matches HF PEFT through transformers' method.
    def remaining(lib_model) -> list[str]:
        return sorted(name for name, _ in lib_model.named_parameters() if "lora_" in name)

    theirs = tiny_llama()
    theirs.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    theirs.add_adapter(peft.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="b")
    theirs.add_adapter(peft.LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="c")
    ours = tiny_llama()
    for name, target in (("a", "q_proj"), ("b", "v_proj"), ("c", "k_proj")):
        integration.add_adapter(ours, peftfast.LoraConfig(r=2, target_modules=[target]), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.delete_adapter(["a", "c"])
        integration.delete_adapter(ours, ["a", "c"])
    assert remaining(ours) == remaining(theirs) and list(ours.peft_config) == list(theirs.peft_config) == ["b"]


# ------------------------------------------------------------------------------------------------ disable_adapter


def test_disable_adapter_is_reentrant_as_in_peft():
    x = _x()
    records = {}
    for lib_name, lib in LIBS.items():
        model = _two_adapter_mlp(lib)
        record = []

        def note(label: str, model=model, record=record) -> None:
            with torch.no_grad():
                record.append((label, model(x), model.has_active_enabled_adapter, model.get_model_status().enabled))

        note("outside")
        with model.disable_adapter():
            note("outer")
            with model.disable_adapter():
                note("inner")
            note("outer again")
        note("after")
        records[lib_name] = record
    for ours, theirs in zip(records["peftfast"], records["peft"], strict=True):
        assert ours[0] == theirs[0] and ours[2:] == theirs[2:], ours[0]
        assert_close(ours[1], theirs[1])
    labels = {label: (output, active) for label, output, active, _ in records["peftfast"]}
    assert labels["inner"][1] is labels["outer again"][1] is False and labels["after"][1] is True
    assert_close(labels["outer again"][0], labels["inner"][0])
    assert not torch.allclose(labels["after"][0], labels["inner"][0], atol=1e-3)


def test_disable_adapter_in_an_irregular_state_warns_and_enables_all_as_in_peft():
    x = _x()
    records = {}
    for lib_name, lib in LIBS.items():
        model = _two_adapter_mlp(lib)
        model.base_model.model.lin0.enable_adapters(False)
        assert model.get_model_status().enabled == "irregular"
        with pytest.warns(UserWarning, match="enabled") as caught:
            with model.disable_adapter(), torch.no_grad():
                inside = model(x)
        with torch.no_grad():
            records[lib_name] = inside, model(x), model.get_model_status().enabled, len(caught)
    ours, theirs = records["peftfast"], records["peft"]
    assert_close(ours[0], theirs[0])
    assert_close(ours[1], theirs[1])
    assert ours[2] is theirs[2] is True


def test_prompt_learning_disable_adapter_is_reentrant_as_in_peft():
    ids = torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    records = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_llama(), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        record = []
        with torch.no_grad():
            record.append((model(input_ids=ids).logits, model.has_active_enabled_adapter))
            with model.disable_adapter():
                with model.disable_adapter():
                    record.append((model(input_ids=ids).logits, model.has_active_enabled_adapter))
                record.append((model(input_ids=ids).logits, model.has_active_enabled_adapter))
            record.append((model(input_ids=ids).logits, model.has_active_enabled_adapter))
        records[lib_name] = record
    for (ours, our_flag), (theirs, their_flag) in zip(records["peftfast"], records["peft"], strict=True):
        assert our_flag == their_flag
        assert_close(ours, theirs)
    assert [flag for _, flag in records["peftfast"]] == [True, False, False, True]


# ------------------------------------------------------------------------------------------------ low_cpu_mem_usage


def _placement(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (param.device.type, param.dtype, param.requires_grad)
        for name, param in model.named_parameters()
        if "lora_" in name or ".modules_to_save." in name
    }


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["lm_head"])
    # Adapter names that are no substring of other keys: HF PEFT's load_adapter reports as missing every key that
    # contains the name ("b" would match "base_model").
    model = peft.get_peft_model(tiny_llama(), config, adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["v_proj", "q_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def test_low_cpu_mem_usage_contract_matches_peft_at_every_entry_point(saved_adapters):
    ids = torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    records = {}
    for lib_name, lib in LIBS.items():
        record = records[lib_name] = {}
        config = lib.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
        model = lib.get_peft_model(tiny_llama(), config, low_cpu_mem_usage=True)
        record["get_peft_model"] = _placement(model)
        model.add_adapter("x", lib.LoraConfig(r=2, target_modules=["k_proj"]), low_cpu_mem_usage=True)
        record["add_adapter"] = _placement(model)

        injected = lib.inject_adapter_in_model(config, tiny_llama(), low_cpu_mem_usage=True)
        record["inject_adapter_in_model"] = _placement(injected)
        weights = {
            key.removeprefix("base_model.model."): value
            for key, value in lib.load_peft_weights(str(saved_adapters / "first")).items()
        }
        result = lib.set_peft_model_state_dict(injected, weights, low_cpu_mem_usage=True)
        record["injected_and_loaded"] = _placement(injected)
        # HF PEFT returns load_state_dict's missing keys, base model's included; peftfast only the adapter's own.
        adapter_missing = [key for key in result.missing_keys if "lora_" in key or ".modules_to_save." in key]
        record["injected_result"] = sorted(adapter_missing), sorted(result.unexpected_keys)
        with torch.no_grad():
            record["injected_logits"] = injected(input_ids=ids).logits

        for trainable in (False, True):
            loaded = lib.PeftModel.from_pretrained(
                tiny_llama(), saved_adapters / "first", "first", low_cpu_mem_usage=True, is_trainable=trainable
            )
            record[f"from_pretrained trainable={trainable}"] = _placement(loaded), loaded.training
            load_result = loaded.load_adapter(
                saved_adapters / "second", "second", low_cpu_mem_usage=True, is_trainable=trainable
            )
            record[f"load_adapter trainable={trainable}"] = _placement(loaded), loaded.training
            record[f"load_adapter result trainable={trainable}"] = (
                load_result.missing_keys,
                load_result.unexpected_keys,
            )
            loaded.base_model.set_adapter(["first", "second"])
            with torch.no_grad():
                record[f"logits trainable={trainable}"] = loaded(input_ids=ids).logits
    ours, theirs = records["peftfast"], records["peft"]
    for key in theirs:
        if "logits" in key:
            assert_close(ours[key], theirs[key])
        else:
            assert ours[key] == theirs[key], key
    # Created on meta, materialised by loading: nothing is left on meta.
    assert {device for device, _, _ in ours["get_peft_model"].values()} == {"meta", "cpu"}
    assert {device for device, _, _ in ours["injected_and_loaded"].values()} == {"cpu"}


# -------------------------------------------------------------------------------------------------- adapter dtype


def _quantized(bits: int) -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    if bits == 4:
        layer = bnb.nn.Linear4bit(32, 16, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data, requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(dense.bias.data, requires_grad=False)
    return nn.Sequential(layer.to("cpu"))


LAYER_TYPES = {
    # name: (model builder, targets, whether the builder's weights follow the requested dtype)
    "linear": (MLP, ["lin0", "lin1"], True),
    "embedding": (EmbeddingModel, ["emb", "lin"], True),
    "conv1d/2d/3d": (ConvNet, ["conv1d", "conv2d", "conv3d"], True),
    "transformers-conv1d": (tiny_gpt2, ["c_attn", "c_proj"], True),
    "bnb-4bit": (lambda: _quantized(4), ["0"], False),
    "bnb-8bit": (lambda: _quantized(8), ["0"], False),
}


@pytest.mark.parametrize("layer_type", sorted(LAYER_TYPES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_adapter_dtype_on_every_layer_type_matches_peft(layer_type, dtype):
    build, targets, follows_dtype = LAYER_TYPES[layer_type]
    if dtype == torch.float8_e4m3fn and not follows_dtype:
        pytest.skip("quantized layers have their own storage dtype")
    for autocast in (True, False):
        dtypes = {}
        for lib_name, lib in LIBS.items():
            torch.manual_seed(0)
            base = build().to(dtype) if follows_dtype else build()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lib.get_peft_model(
                    base, lib.LoraConfig(target_modules=targets), autocast_adapter_dtype=autocast
                )
                model.add_adapter(
                    "two", lib.LoraConfig(target_modules=targets[:1]), autocast_adapter_dtype=not autocast
                )
            dtypes[lib_name] = {name: param.dtype for name, param in model.named_parameters() if "lora_" in name}
        assert dtypes["peftfast"] == dtypes["peft"], autocast
