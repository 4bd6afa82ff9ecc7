"""Adapters at runtime, checked against HF PEFT: the same sequence of operations on both libraries, starting from
the same saved adapters, gives the same outputs, trainability, status figures and files.

Adapters are created once with HF PEFT (init_lora_weights=False, so each changes the output) and loaded in both.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from models import MLP, ConvNet, EmbeddingModel, tiny_llama, tiny_llama_classifier
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn
from transformers import LlamaForCausalLM

import peftfast
from peftfast.tuners.tuners_utils import BaseTunerLayer
from peftfast.utils.other import ModulesToSaveWrapper

LIBS = {"peft": peft, "peftfast": peftfast}

# Three LoRA adapters of tiny_llama with different ranks, alphas, scalings and target modules; "red" and "blue" share a
# rank so that they can be combined linearly.
LLAMA_ADAPTERS = {
    "red": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "green": dict(r=6, lora_alpha=3, target_modules=["k_proj", "up_proj", "v_proj"], use_rslora=True),
    "blue": dict(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], lora_dropout=0.1),
}


def _seeded(model_cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A constructor that always builds the same model (tiny_llama seeds itself; the small test models don't)."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return model_cls().eval()

    return make


def _ids(batch: int = 3, length: int = 7, seed: int = 5) -> torch.Tensor:
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def _save_with_peft(folder: Path, model: nn.Module, configs: dict[str, dict[str, Any]], seed: int = 1) -> None:
    """Save random adapters (each changes the output) with HF PEFT, one subfolder per adapter name."""
    torch.manual_seed(seed)
    names = list(configs)
    model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **configs[names[0]]), names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **configs[name]))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".modules_to_save." in param_name:
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama_adapters")
    _save_with_peft(folder, tiny_llama(), LLAMA_ADAPTERS)
    return folder


def _load(lib, folder: Path, names: list[str], make_model: Callable[[], nn.Module] = tiny_llama, **kwargs):
    """The same base model in `lib`, with `names` loaded from `folder/<name>` (the first one active)."""
    model = lib.PeftModel.from_pretrained(make_model(), folder / names[0], adapter_name=names[0], **kwargs)
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name, **kwargs)
    return model


def _logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _requires_grad(model: nn.Module) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


def _status(model: nn.Module) -> tuple[list[dict], dict]:
    return (
        [dataclasses.asdict(status) for status in model.get_layer_status()],
        dataclasses.asdict(model.get_model_status()),
    )


def test_switching_multiple_active_and_disabling_match_peft(llama_dir):
    ids = _ids()

    def run(lib):
        model = _load(lib, llama_dir, ["red", "green", "blue"])
        record = {"red": _logits(model, ids), "grad_loaded": _requires_grad(model)}
        model.set_adapter("green")
        record["green"] = _logits(model, ids)
        record["grad_green"] = _requires_grad(model)
        record["active_green"] = model.active_adapters
        model.base_model.set_adapter(["red", "blue"])
        record["red+blue"] = _logits(model, ids)
        record["grad_red+blue"] = _requires_grad(model)
        record["status_red+blue"] = _status(model)
        with model.disable_adapter():
            record["disabled"] = _logits(model, ids)
            record["status_disabled"] = _status(model)
            record["grad_disabled"] = _requires_grad(model)
        record["reenabled"] = _logits(model, ids)
        model.base_model.disable_adapter_layers()
        record["layers_off"] = _logits(model, ids)
        model.base_model.enable_adapter_layers()
        record["layers_on"] = _logits(model, ids)
        record["grad_end"] = _requires_grad(model)
        return record

    ours, theirs = run(peftfast), run(peft)
    base = _logits(tiny_llama(), ids)
    for key in ["red", "green", "red+blue", "disabled", "reenabled", "layers_off", "layers_on"]:
        assert_close(ours[key], theirs[key])
    for key in [
        "grad_loaded",
        "grad_green",
        "grad_red+blue",
        "grad_disabled",
        "grad_end",
        "active_green",
        "status_red+blue",
    ]:
        assert ours[key] == theirs[key], key
    assert ours["status_disabled"] == theirs["status_disabled"]
    # The adapters do something, and differently: the checks above could fail.
    assert not torch.allclose(ours["red"], base, atol=1e-3)
    assert not torch.allclose(ours["red"], ours["green"], atol=1e-3)
    assert_close(ours["disabled"], base)
    assert_close(ours["red+blue"], ours["reenabled"])
    assert ours["grad_loaded"] != ours["grad_green"]


def test_add_adapter_keeps_trainability_and_leaves_new_adapter_inactive():
    def run(lib):
        torch.manual_seed(3)
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=3, target_modules=["q_proj"]), "first")
        ids = _ids()
        before = _logits(model, ids)
        model.add_adapter("second", lib.LoraConfig(r=5, target_modules=["k_proj", "o_proj"], init_lora_weights=False))
        record = {"grad_added": _requires_grad(model), "same_output": torch.equal(before, _logits(model, ids))}
        model.set_adapter("second")
        record["grad_switched"] = _requires_grad(model)
        record["status"] = _status(model)
        model.set_adapter("first")
        model.set_requires_grad("second", True)
        record["grad_both"] = _requires_grad(model)
        return record

    ours, theirs = run(peftfast), run(peft)
    assert ours["same_output"] and theirs["same_output"]
    assert ours == theirs


def test_merge_unmerge_and_merge_and_unload_match_peft(llama_dir):
    ids = _ids()

    def run(lib):
        model = _load(lib, llama_dir, ["red", "green"])
        model.base_model.set_adapter(["red", "green"])
        record = {"unmerged": _logits(model, ids)}
        base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        model.merge_adapter()
        record["merged"] = _logits(model, ids)
        record["status_merged"] = _status(model)
        model.unmerge_adapter()
        record["restored"] = all(
            torch.allclose(p, base_weights[n], atol=1e-6) for n, p in model.named_parameters() if "base_layer" in n
        )
        model.merge_adapter(adapter_names=["green"])
        record["merged_green_only"] = _logits(model, ids)
        record["status_green_only"] = _status(model)
        model.unmerge_adapter()
        merged = model.merge_and_unload(adapter_names=["red"])
        record["unloaded_red"] = _logits(merged, ids)
        record["plain"] = not any(isinstance(m, (peft.tuners.lora.LoraLayer, BaseTunerLayer)) for m in merged.modules())
        record["config_left"] = hasattr(merged, "peft_config")
        return record

    ours, theirs = run(peftfast), run(peft)
    for key in ["unmerged", "merged", "merged_green_only", "unloaded_red"]:
        assert_close(ours[key], theirs[key])
    assert ours["status_merged"] == theirs["status_merged"]
    assert ours["status_green_only"] == theirs["status_green_only"]
    assert ours["status_merged"][1]["merged_adapters"] == ["green", "red"]
    assert ours["restored"] and ours["plain"] and not ours["config_left"]
    assert (ours["plain"], ours["config_left"]) == (theirs["plain"], theirs["config_left"])
    # Merged equals unmerged within fp rounding; merging one adapter differs from merging both.
    assert_close(ours["merged"], ours["unmerged"], kind="kernel")
    assert not torch.allclose(ours["merged_green_only"], ours["merged"], atol=1e-3)


def test_unload_matches_peft(llama_dir):
    """unload() removes every adapter module without merging; what was merged before stays in the weights."""
    ids = _ids()

    def run(lib):
        plain = _load(lib, llama_dir, ["red", "green"]).unload()
        model = _load(lib, llama_dir, ["red", "green"])
        model.merge_adapter()
        merged = _logits(model, ids)
        kept = model.unload()
        adapter_types = (BaseTunerLayer, ModulesToSaveWrapper, peft.tuners.lora.LoraLayer)
        assert not any(isinstance(m, adapter_types) for m in [*plain.modules(), *kept.modules()])
        return _logits(plain, ids), merged, _logits(kept, ids)

    ours, theirs = run(peftfast), run(peft)
    for mine, reference in zip(ours, theirs):
        assert_close(mine, reference)
    assert_close(ours[0], _logits(tiny_llama(), ids))
    assert_close(ours[2], ours[1])


@pytest.mark.parametrize(
    "combination, adapters, weights, extra",
    [
        ("linear", ["red", "blue"], [0.7, -0.4], {}),
        ("cat", ["red", "green", "blue"], [1.0, 0.5, -2.0], {}),
        ("svd", ["red", "green"], [0.8, 1.3], {}),
        ("svd", ["red", "green", "blue"], [1.0, 1.0, 1.0], {"svd_rank": 3, "svd_clamp": 0.95}),
        ("ties", ["red", "blue"], [1.0, 0.5], {"density": 0.6}),
        ("magnitude_prune_svd", ["red", "green"], [1.0, 0.5], {"density": 0.5, "svd_full_matrices": False}),
        ("dare_linear", ["red", "blue"], [1.0, 0.5], {"density": 0.7}),
    ],
    ids=["linear", "cat", "svd", "svd-rank3-clamp", "ties", "magnitude_prune_svd", "dare_linear"],
)
def test_add_weighted_adapter_matches_peft(llama_dir, combination, adapters, weights, extra):
    ids = _ids()

    def run(lib):
        model = _load(lib, llama_dir, ["red", "green", "blue"])
        torch.manual_seed(7)  # the "dare" variants drop entries at random
        model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination, **extra)
        model.set_adapter("mix")
        config = model.peft_config["mix"]
        return _logits(model, ids), (config.r, config.lora_alpha, sorted(config.target_modules)), _requires_grad(model)

    (ours, ours_config, ours_grad), (theirs, theirs_config, theirs_grad) = run(peftfast), run(peft)
    assert_close(ours, theirs, kind="kernel")
    assert ours_config == theirs_config
    assert ours_grad == theirs_grad
    assert not torch.allclose(ours, _logits(tiny_llama(), ids), atol=1e-3)


def test_cat_combination_is_exact(llama_dir):
    """The "cat" combination adds the weighted deltas exactly: the output of the adapters with those weights.

    "green" uses rsLoRA and comes first, so its settings are the new adapter's: HF PEFT would then scale the combined
    adapter by sqrt(r) (a bug peftfast leaves out), so this is not compared with HF PEFT.
    """
    ids = _ids()
    model = _load(peftfast, llama_dir, ["red", "green"])
    model.add_weighted_adapter(["green", "red"], [-0.5, 2.0], "mix", combination_type="cat")
    assert model.base_model.model.model.layers[0].self_attn.v_proj.scaling["mix"] == 1.0
    model.set_adapter("mix")
    combined = _logits(model, ids)
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for name, weight in (("red", 2.0), ("green", -0.5)):
                if name in layer.scaling:
                    layer.scaling[name] *= weight
    model.base_model.set_adapter(["red", "green"])
    assert_close(combined, _logits(model, ids), kind="kernel")


def test_add_weighted_adapter_on_embeddings_and_errors(tmp_path):
    configs = {
        "x": dict(r=3, lora_alpha=5, target_modules=["emb", "lin"]),
        "y": dict(r=5, lora_alpha=2, target_modules=["emb"]),
    }
    _save_with_peft(tmp_path, _seeded(EmbeddingModel)(), configs)
    ids = torch.randint(0, 37, (4, 6), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for lib_name, lib in LIBS.items():
        model = _load(lib, tmp_path, ["x", "y"], make_model=_seeded(EmbeddingModel))
        model.add_weighted_adapter(["x", "y"], [1.5, -1.0], "svd_mix", combination_type="svd", svd_rank=4)
        model.add_weighted_adapter(["x", "y"], [1.5, -1.0], "cat_mix", combination_type="cat")
        with torch.no_grad():
            model.set_adapter("svd_mix")
            svd_out = model(ids)
            model.set_adapter("cat_mix")
            outputs[lib_name] = (svd_out, model(ids))
    assert_close(outputs["peftfast"][0], outputs["peft"][0], kind="kernel")
    assert_close(outputs["peftfast"][1], outputs["peft"][1], kind="kernel")

    model = _load(peftfast, tmp_path, ["x", "y"], make_model=_seeded(EmbeddingModel))
    with pytest.raises(ValueError, match=r"one rank.*\[3, 5\]"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "bad", combination_type="linear")
    with pytest.raises(ValueError, match=r"\['nope'\] do not exist"):
        model.add_weighted_adapter(["x", "nope"], [1.0, 1.0], "bad")
    with pytest.raises(ValueError, match="Invalid combination_type 'median'"):
        model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "bad", combination_type="median")
    with pytest.raises(ValueError, match="1 weights for the 2 adapters"):
        model.add_weighted_adapter(["x", "y"], [1.0], "bad", combination_type="cat")
    assert "bad" not in model.peft_config


def test_mixed_batch_forward_matches_peft_and_single_rows(llama_dir):
    ids = _ids(batch=5)
    names = ["red", "__base__", "green", "red", "blue"]
    outputs = {}
    for lib_name, lib in LIBS.items():
        model = _load(lib, llama_dir, ["red", "green", "blue"])
        outputs[lib_name] = _logits(model, ids, adapter_names=names)
    assert_close(outputs["peftfast"], outputs["peft"])

    model = _load(peftfast, llama_dir, ["red", "green", "blue"])
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = _logits(model, ids[row : row + 1])
        else:
            model.set_adapter(name)
            alone = _logits(model, ids[row : row + 1])
        assert_close(outputs["peftfast"][row : row + 1], alone, kind="kernel")
    base = _logits(tiny_llama(), ids)
    assert_close(outputs["peftfast"][1], base[1])
    assert not torch.allclose(outputs["peftfast"][0], base[0], atol=1e-3)


def test_mixed_batch_generate_matches_peft_and_single_rows(llama_dir):
    ids = _ids(batch=4, length=5, seed=11)
    names = ["green", "red", "__base__", "blue"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = {}
    for lib_name, lib in LIBS.items():
        model = _load(lib, llama_dir, ["red", "green", "blue"])
        generated[lib_name] = model.generate(input_ids=ids, adapter_names=names, **settings)
    assert torch.equal(generated["peftfast"], generated["peft"])

    model = _load(peftfast, llama_dir, ["red", "green", "blue"])
    base_rows = model.generate(input_ids=ids, adapter_names=["__base__"] * 4, **settings)
    for row, name in enumerate(names):
        model.set_adapter(name if name != "__base__" else "red")
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[row : row + 1], **settings)
        else:
            alone = model.generate(input_ids=ids[row : row + 1], **settings)
        assert torch.equal(generated["peftfast"][row : row + 1], alone)
    # The adapters change what is generated, so the comparison above can fail.
    assert not torch.equal(generated["peftfast"], base_rows)

    beams = {}
    for lib_name, lib in LIBS.items():
        model = _load(lib, llama_dir, ["red", "green", "blue"])
        beams[lib_name] = model.generate(input_ids=ids[:2], adapter_names=["green", "blue"], num_beams=2, **settings)
    assert torch.equal(beams["peftfast"], beams["peft"])


def test_mixed_batch_groups_rows_once_per_call(llama_dir):
    """Every layer gets the same mixed batch object (the grouping and the row tensor are made once per call)."""
    from peftfast.utils.mixed_batch import MixedBatch

    model = _load(peftfast, llama_dir, ["red", "green"])
    seen = []

    def recording(forward):
        def wrapped(x, *args, adapter_names, **kwargs):
            seen.append(adapter_names)
            return forward(x, *args, adapter_names=adapter_names, **kwargs)

        return wrapped

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._mixed_batch_forward = recording(module._mixed_batch_forward)
    _logits(model, _ids(), adapter_names=["green", "red", "green"])
    assert seen and all(isinstance(item, MixedBatch) and item is seen[0] for item in seen)
    assert seen[0].groups.groups == {"green": [0, 2], "red": [1]}


def test_mixed_batch_errors(llama_dir):
    model = _load(peftfast, llama_dir, ["red", "green"])
    with pytest.raises(ValueError, match=r"2 adapter_names for a batch of 3 rows"):
        _logits(model, _ids(), adapter_names=["red", "green"])
    with pytest.raises(ValueError, match=r"Unknown adapter name\(s\) \['zz'\]"):
        _logits(model, _ids(), adapter_names=["red", "zz", "green"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        _logits(model, _ids(), adapter_names=["red", "red", "green"])
    model.unmerge_adapter()
    model.train()
    with pytest.raises(ValueError, match="inference"):
        _logits(model, _ids(), adapter_names=["red", "red", "green"])
    model.eval()
    with pytest.raises(TypeError, match="list of adapter names"):
        _logits(model, _ids(), adapter_names="red")
    # HF PEFT refuses the same calls.
    theirs = _load(peft, llama_dir, ["red", "green"])
    for names in (["red", "green"], ["red", "zz", "green"]):
        with pytest.raises(ValueError):
            _logits(theirs, _ids(), adapter_names=names)


def test_delete_adapter_matches_peft(tmp_path):
    # Adapters on the same layers, so that every layer has every adapter (see the next test for the other case).
    configs = {
        name: dict(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
        for name, rank in [("blue", 2), ("green", 3), ("red", 4)]
    }
    _save_with_peft(tmp_path, tiny_llama(), configs)
    ids = _ids()

    def run(lib):
        model = _load(lib, tmp_path, ["red", "green", "blue"])
        model.set_adapter("green")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.delete_adapter("green")  # active: the first remaining adapter by name, "blue", takes over
        record = {"active": model.active_adapters, "out": _logits(model, ids), "status": _status(model)}
        record["grad"] = _requires_grad(model)
        model.delete_adapter("red")  # not active: nothing else changes
        record["after_red"] = (model.active_adapters, list(model.peft_config), _status(model), _requires_grad(model))
        model.merge_adapter()
        with pytest.raises(ValueError, match="merged"):
            model.delete_adapter("blue")
        return record

    ours, theirs = run(peftfast), run(peft)
    assert ours["active"] == theirs["active"] == ["blue"]
    assert_close(ours["out"], theirs["out"])
    for key in ["status", "grad", "after_red"]:
        assert ours[key] == theirs[key], key
    assert not any(".green." in name for name in ours["grad"])


def test_deleting_the_active_adapter_picks_one_adapter_for_every_layer(llama_dir):
    """Unlike HF PEFT, where each layer picks among its own adapters (so layers can end up with different active
    adapters), the new active adapter is chosen once for the whole model."""
    ids = _ids()
    model = _load(peftfast, llama_dir, ["blue", "green", "red"])
    model.set_adapter("green")
    with pytest.warns(UserWarning, match="'green' was active.*'blue'"):
        model.delete_adapter("green")
    status = model.get_model_status()
    assert status.active_adapters == ["blue"] and status.available_adapters == ["blue", "red"]
    reference = _load(peftfast, llama_dir, ["blue", "red"])
    assert_close(_logits(model, ids), _logits(reference, ids))


def test_status_functions_match_peft(llama_dir):
    def run(lib):
        model = _load(lib, llama_dir, ["red", "green"])
        record = {"loaded": _status(model)}
        model.merge_adapter(adapter_names=["red"])
        record["merged_red"] = _status(model)
        model.unmerge_adapter()
        # Irregular states: one layer disabled, one layer merged, one layer with other active adapters.
        attention = model.base_model.model.model.layers[0].self_attn
        attention.q_proj.enable_adapters(False)
        attention.v_proj.merge(adapter_names=["red"])
        attention.k_proj.set_adapter(["green"])
        record["irregular"] = _status(model)
        record["module_level"] = dataclasses.asdict(lib.get_model_status(model))
        return record

    ours, theirs = run(peftfast), run(peft)
    assert ours == theirs
    model = ours["irregular"][1]
    assert model["enabled"] == model["active_adapters"] == model["merged_adapters"] == "irregular"
    assert ours["loaded"][1]["trainable_params"] == 0 and ours["loaded"][1]["num_adapter_layers"] == 8


def test_status_on_a_plain_module_with_injected_adapters():
    def run(lib):
        torch.manual_seed(0)
        model = lib.inject_adapter_in_model(lib.LoraConfig(r=2, target_modules=["lin0", "lin2"]), MLP())
        return [dataclasses.asdict(s) for s in lib.get_layer_status(model)], dataclasses.asdict(
            lib.get_model_status(model)
        )

    ours, theirs = run(peftfast), run(peft)
    assert ours == theirs
    assert ours[1]["base_model_type"] == "other" and ours[1]["num_adapter_layers"] == 2
    with pytest.raises(ValueError, match="No adapter layers"):
        peftfast.get_layer_status(MLP())


class _NormNet(nn.Module):
    """A classifier head behind a BatchNorm: both go into modules_to_save, the running statistics with them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(9, 13)
        self.bn = nn.BatchNorm1d(13)
        self.head = nn.Linear(13, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(torch.relu(self.lin0(x))))


def test_modules_to_save_switch_with_the_adapter_and_save_batchnorm_stats(tmp_path):
    x = torch.randn(8, 9, generator=torch.Generator().manual_seed(3))
    configs = {
        "one": dict(r=2, target_modules=["lin0"], modules_to_save=["bn", "head"]),
        "two": dict(r=3, target_modules=["lin0"], modules_to_save=["bn", "head"]),
        "bare": dict(r=2, target_modules=["lin0"]),
    }

    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(_NormNet(), lib.LoraConfig(**configs["one"]), "one")
        model.add_adapter("two", lib.LoraConfig(**configs["two"]))
        model.add_adapter("bare", lib.LoraConfig(**configs["bare"]))
        record = {"grad_one": _requires_grad(model)}
        model.train()
        model(x)  # updates the running statistics of "one"'s BatchNorm copy only
        model.set_adapter("two")
        record["grad_two"] = _requires_grad(model)
        model(x * 2 + 1)
        model.eval()
        with torch.no_grad():
            record["out_two"] = model(x)
            model.set_adapter("one")
            record["out_one"] = model(x)
            model.set_adapter("bare")
            record["out_bare"] = model(x)
            if lib is peftfast:
                record["mixed"] = model(x[:3], adapter_names=["two", "__base__", "one"])
                with model.disable_adapter():
                    record["base"] = model(x[:3])
        record["status"] = _status(model)
        model.save_pretrained(tmp_path / lib.__name__)
        files = {}
        for name in ["one", "two", "bare"]:
            files[name] = load_file(tmp_path / lib.__name__ / name / "adapter_model.safetensors")
        record["files"] = files
        return record

    ours, theirs = run(peftfast), run(peft)
    for key in ["out_one", "out_two", "out_bare"]:
        assert_close(ours[key], theirs[key])
    for key in ["grad_one", "grad_two", "status"]:
        assert ours[key] == theirs[key], key
    for name in ["one", "two", "bare"]:
        assert sorted(ours["files"][name]) == sorted(theirs["files"][name])
        for key, value in ours["files"][name].items():
            if value.is_floating_point():
                assert_close(value, theirs["files"][name][key])
            else:
                assert torch.equal(value, theirs["files"][name][key]), key
    assert "base_model.model.bn.running_mean" in ours["files"]["one"]
    assert not torch.equal(ours["files"]["one"]["base_model.model.bn.running_mean"], torch.zeros(13))
    assert not torch.allclose(ours["out_one"], ours["out_two"], atol=1e-3)
    expected = torch.stack([ours["out_two"][0], ours["base"][1], ours["out_one"][2]])
    assert_close(ours["mixed"], expected)

    # The saved copies come back in the other library, running statistics included.
    for source, target in [("peftfast", peft), ("peft", peftfast)]:
        torch.manual_seed(0)
        loaded = target.PeftModel.from_pretrained(_NormNet(), tmp_path / source / "two", adapter_name="two")
        with torch.no_grad():
            assert_close(loaded(x), ours["out_two"])


def test_sequence_classification_heads_match_peft(tmp_path):
    ids = _ids(batch=2, length=6)

    def run(lib):
        torch.manual_seed(4)
        config = lib.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"], init_lora_weights=False)
        model = lib.get_peft_model(tiny_llama_classifier(), config, "first")
        model.add_adapter(
            "second", lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["v_proj"], init_lora_weights=False)
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".modules_to_save." in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
        record = {"grad": _requires_grad(model), "modules_to_save": sorted(model.modules_to_save)}
        with torch.no_grad():
            record["first"] = model(input_ids=ids).logits
            model.set_adapter("second")
            record["second"] = model(input_ids=ids).logits
            model.eval()  # a new PeftModel is in training mode, where mixed batches are refused
            record["mixed"] = model(input_ids=ids, adapter_names=["first", "second"]).logits
        record["status"] = _status(model)
        model.save_pretrained(tmp_path / lib.__name__)
        record["keys"] = sorted(load_file(tmp_path / lib.__name__ / "second" / "adapter_model.safetensors"))
        saved = json.loads((tmp_path / lib.__name__ / "second" / "adapter_config.json").read_text())
        record["saved_modules_to_save"] = sorted(set(saved["modules_to_save"]))
        return record

    ours, theirs = run(peftfast), run(peft)
    assert_close(ours["first"], theirs["first"])
    assert_close(ours["second"], theirs["second"])
    assert_close(ours["mixed"], theirs["mixed"])
    assert_close(ours["mixed"], torch.cat([ours["first"][:1], ours["second"][1:]]))
    for key in ["grad", "modules_to_save", "status", "keys", "saved_modules_to_save"]:
        assert ours[key] == theirs[key], key
    assert "base_model.model.score.weight" in ours["keys"]
    assert not torch.allclose(ours["first"], ours["second"], atol=1e-3)


def test_safe_merge_refuses_nan_and_leaves_weights_untouched(llama_dir):
    for lib in (peftfast, peft):
        model = _load(lib, llama_dir, ["red", "green"])
        model.base_model.set_adapter(["red", "green"])
        # A broken value in a late layer: every layer is checked before any is merged.
        layer = model.base_model.model.model.layers[1].self_attn.v_proj
        with torch.no_grad():
            layer.lora_B["green"].weight[0, 0] = float("nan")
        snapshot = {name: value.clone() for name, value in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"NaN.*'green'|green seems to be broken"):
            model.merge_adapter(safe_merge=True)
        if lib is peftfast:
            assert all(
                torch.equal(snapshot[k], v) or k.endswith("lora_B.green.weight") for k, v in model.state_dict().items()
            )
            assert model.get_model_status().merged_adapters == []
            with pytest.raises(ValueError, match=r"NaNs or infs.*'green'.*layers\.1\.self_attn\.v_proj"):
                model.merge_and_unload(safe_merge=True)
            assert any(isinstance(m, BaseTunerLayer) for m in model.modules())
            model.merge_adapter(adapter_names=["red"], safe_merge=True)  # the healthy adapter merges
            assert model.get_model_status().merged_adapters == ["red"]


def _resizable_llama_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "targets, save_embedding_layers",
    [
        (["embed_tokens", "q_proj"], "auto"),
        (["embed_tokens", "lm_head", "q_proj"], "auto"),
        (["q_proj"], "auto"),
        (["q_proj"], True),
        (["embed_tokens", "q_proj"], False),
        (".*(embed_tokens|q_proj)", "auto"),
    ],
    ids=["emb-auto", "emb-head-auto", "q-auto", "q-true", "emb-false", "regex-auto"],
)
def test_embedding_saving_rules_match_peft(tmp_path, targets, save_embedding_layers):
    def run(lib):
        torch.manual_seed(2)
        model = lib.get_peft_model(
            tiny_llama(tie_word_embeddings=False), lib.LoraConfig(r=3, target_modules=targets, init_lora_weights=False)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / lib.__name__, save_embedding_layers=save_embedding_layers)
        return load_file(tmp_path / lib.__name__ / "adapter_model.safetensors")

    ours, theirs = run(peftfast), run(peft)
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert_close(value, theirs[key])
    saves_embeddings = any("embed_tokens" in key and "lora" not in key for key in ours)
    assert saves_embeddings == (
        save_embedding_layers is True or ("embed" in str(targets) and bool(save_embedding_layers))
    )


def test_resized_vocabulary_saves_embeddings_like_peft(tmp_path):
    base_folder = _resizable_llama_dir(tmp_path)

    def run(lib):
        model = LlamaForCausalLM.from_pretrained(base_folder)
        torch.manual_seed(9)  # the new embedding rows are drawn at random
        model.resize_token_embeddings(113)
        torch.manual_seed(2)
        peft_model = lib.get_peft_model(model, lib.LoraConfig(r=3, target_modules=["q_proj"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(tmp_path / lib.__name__)
        return load_file(tmp_path / lib.__name__ / "adapter_model.safetensors")

    ours, theirs = run(peftfast), run(peft)
    assert sorted(ours) == sorted(theirs)
    assert ours["base_model.model.model.embed_tokens.weight"].shape == (113, 32)
    for key, value in ours.items():
        assert_close(value, theirs[key])
    # Loading the adapter in the other library brings the resized embedding with it.
    model = tiny_llama()
    model.resize_token_embeddings(113)
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "peftfast")
    assert torch.equal(loaded.get_input_embeddings().weight, ours["base_model.model.model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_half_precision_base_matches_peft(llama_dir, dtype, autocast):
    ids = _ids()

    def run(lib):
        model = _load(
            lib, llama_dir, ["red", "green"], make_model=lambda: tiny_llama().to(dtype), autocast_adapter_dtype=autocast
        )
        model.base_model.set_adapter(["red", "green"])
        dtypes = {name: param.dtype for name, param in model.named_parameters() if "lora_" in name}
        return _logits(model, ids), dtypes

    (ours, ours_dtypes), (theirs, theirs_dtypes) = run(peftfast), run(peft)
    assert ours_dtypes == theirs_dtypes
    assert set(ours_dtypes.values()) == {torch.float32 if autocast else dtype}
    assert ours.dtype == theirs.dtype == dtype
    assert_close(ours.float(), theirs.float(), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_fresh_adapters_on_a_half_precision_base_equal_peft_for_the_same_seed(dtype, autocast, init):
    # HF PEFT initialises in fp32, casts to the base dtype, then upcasts under autocast_adapter_dtype: the fp32
    # adapter holds base-dtype values, and peftfast's must be the same numbers, not a closer fp32 draw.
    def run(lib):
        torch.manual_seed(0)
        base = tiny_llama().to(dtype)
        torch.manual_seed(1)
        config = lib.LoraConfig(r=3, target_modules=["q_proj", "down_proj", "embed_tokens"], init_lora_weights=init)
        model = lib.get_peft_model(base, config, autocast_adapter_dtype=autocast)
        model.add_adapter("second", lib.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=init))
        return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}

    ours, theirs = run(peftfast), run(peft)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, name
        assert torch.equal(ours[name], value), name
    assert {value.dtype for name, value in ours.items() if ".default" in name} == {torch.float32 if autocast else dtype}


def test_add_adapter_autocast_choice_matches_peft():
    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_llama().to(torch.bfloat16), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.add_adapter("kept", lib.LoraConfig(r=2, target_modules=["v_proj"]), autocast_adapter_dtype=False)
        return {name: param.dtype for name, param in model.named_parameters() if "lora_" in name}

    ours, theirs = run(peftfast), run(peft)
    assert ours == theirs
    assert {dtype for name, dtype in ours.items() if ".kept." in name} == {torch.bfloat16}


def test_cast_mixed_precision_params_matches_peft():
    def run(lib):
        torch.manual_seed(0)
        model = lib.get_peft_model(
            tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
        )
        lib.cast_mixed_precision_params(model, torch.bfloat16)
        return {name: (param.dtype, param.requires_grad) for name, param in model.named_parameters()}

    ours, theirs = run(peftfast), run(peft)
    assert ours == theirs
    assert {dtype for dtype, trainable in ours.values() if trainable} == {torch.float32}
    assert {dtype for dtype, trainable in ours.values() if not trainable} == {torch.bfloat16}


def test_low_cpu_mem_usage_creates_meta_weights_and_loads_into_them(llama_dir):
    ids = _ids()
    # New adapters on the meta device: nothing allocated until loaded (as HF PEFT).
    for lib in (peftfast, peft):
        config = lib.LoraConfig(r=2, target_modules=["q_proj"])
        model = lib.get_peft_model(tiny_llama(), config, low_cpu_mem_usage=True)
        model.add_adapter("more", lib.LoraConfig(r=2, target_modules=["v_proj"]), low_cpu_mem_usage=True)
        assert {p.device.type for n, p in model.named_parameters() if "lora_" in n} == {"meta"}
        assert {p.device.type for n, p in model.named_parameters() if "lora_" not in n} == {"cpu"}

    outputs = {}
    for lib_name, lib in LIBS.items():
        loaded = _load(lib, llama_dir, ["red", "green"], low_cpu_mem_usage=True)
        loaded.base_model.set_adapter(["red", "green"])
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        outputs[lib_name] = _logits(loaded, ids)
    assert_close(outputs["peftfast"], outputs["peft"])
    regular = _load(peftfast, llama_dir, ["red", "green"])
    regular.base_model.set_adapter(["red", "green"])
    assert_close(outputs["peftfast"], _logits(regular, ids))


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_low_cpu_mem_usage_on_a_half_precision_base_matches_peft(llama_dir, autocast):
    ids = _ids()
    results = {}
    for lib_name, lib in LIBS.items():
        model = _load(
            lib,
            llama_dir,
            ["red", "green"],
            make_model=lambda: tiny_llama().to(torch.float16),
            low_cpu_mem_usage=True,
            autocast_adapter_dtype=autocast,
        )
        model.base_model.set_adapter(["red", "green"])
        dtypes = {name: param.dtype for name, param in model.named_parameters() if "lora_" in name}
        results[lib_name] = (_logits(model, ids).float(), dtypes)
    assert results["peftfast"][1] == results["peft"][1]
    assert set(results["peftfast"][1].values()) == {torch.float32 if autocast else torch.float16}
    # HF PEFT rounds the loaded fp32 weights through fp16 before upcasting them; peftfast keeps them as saved.
    assert_close(results["peftfast"][0], results["peft"][0], dtype=torch.float16)


def test_disable_adapter_context_and_trainable_loading_match_peft(llama_dir):
    ids = _ids()

    def run(lib):
        model = _load(lib, llama_dir, ["red", "green"], is_trainable=True)
        record = {"grad_trainable": _requires_grad(model)}
        model.base_model.disable_adapter_layers()
        with model.disable_adapter():
            record["inside"] = _logits(model, ids)
        # The adapters were off before the block, so they stay off after it.
        record["after"] = _logits(model, ids)
        record["status_after"] = _status(model)
        model.base_model.enable_adapter_layers()
        record["enabled"] = _logits(model, ids)
        model.load_adapter(llama_dir / "blue", adapter_name="blue", is_trainable=True)
        record["grad_blue"] = _requires_grad(model)
        return record

    ours, theirs = run(peftfast), run(peft)
    for key in ["inside", "after", "enabled"]:
        assert_close(ours[key], theirs[key])
    for key in ["grad_trainable", "status_after", "grad_blue"]:
        assert ours[key] == theirs[key], key
    assert_close(ours["after"], _logits(tiny_llama(), ids))
    assert not torch.allclose(ours["enabled"], ours["after"], atol=1e-3)


def test_merge_argument_errors(llama_dir):
    model = _load(peftfast, llama_dir, ["red", "green"])
    with pytest.raises(TypeError, match="list of adapter names.*'red'"):
        model.merge_adapter(adapter_names="red")
    model.merge_adapter(adapter_names=["red"])
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter(adapter_names=["red"])
    assert model.get_model_status().merged_adapters == ["red"]


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_add_weighted_adapter_on_convolutions_matches_peft(tmp_path, combination):
    make = _seeded(ConvNet)
    configs = {
        "x": dict(r=2, lora_alpha=3, target_modules=["conv2d", "conv2d_1x1"]),
        "y": dict(r=3, lora_alpha=2, target_modules=["conv2d", "conv2d_1x1", "head"]),
    }
    _save_with_peft(tmp_path, make(), configs)
    gen = torch.Generator().manual_seed(4)
    inputs = (torch.randn(2, 3, 8, generator=gen), torch.randn(2, 2, 3, 5, 5, generator=gen))
    outputs = {}
    for lib_name, lib in LIBS.items():
        model = _load(lib, tmp_path, ["x", "y"], make_model=make)
        model.add_weighted_adapter(["x", "y"], [0.5, -1.5], "mix", combination_type=combination)
        model.set_adapter("mix")
        with torch.no_grad():
            outputs[lib_name] = model(*inputs)
    assert_close(outputs["peftfast"], outputs["peft"], kind="kernel")
    with torch.no_grad():
        assert not torch.allclose(outputs["peftfast"], make()(*inputs), atol=1e-3)
