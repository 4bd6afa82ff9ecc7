"""peftfast and HF PEFT are interchangeable: adapter folders written by either load in the other with the same
outputs, both write the same files, and the models they build look the same from outside."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from models import MLP, ConvNet, EmbeddingModel, tiny_gpt2, tiny_llama, tiny_llama_classifier
from safetensors.torch import load_file
from tolerances import assert_close

import peftfast

LIBS = {"peft": peft, "peftfast": peftfast}
DIRECTIONS = {"p2f": ("peft", "peftfast"), "f2p": ("peftfast", "peft")}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _token_inputs(vocab: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, vocab, (2, 7), generator=_gen())}


def _mlp_with_bias_named_layer() -> MLP:
    """An MLP with a layer whose name contains "bias": only real biases (`*.bias`) are saved with bias="all"."""
    model = MLP()
    model.bias_gate = torch.nn.Linear(3, 3)
    return model


def _mlp_inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(4, 11, generator=_gen())}


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, torch.Tensor]]]] = {
    "mlp": (MLP, _mlp_inputs),
    "mlp_bias_gate": (_mlp_with_bias_named_layer, _mlp_inputs),
    "conv": (
        ConvNet,
        lambda: {"x": torch.randn(2, 3, 8, generator=_gen()), "volume": torch.randn(2, 2, 3, 5, 5, generator=_gen())},
    ),
    "emb": (EmbeddingModel, lambda: {"ids": torch.randint(0, 37, (3, 5), generator=_gen())}),
    "llama": (tiny_llama, lambda: _token_inputs(101)),
    "llama_cls": (tiny_llama_classifier, lambda: _token_inputs(101)),
    "gpt2": (tiny_gpt2, lambda: _token_inputs(97)),
}


@dataclass
class Case:
    model: str
    config: dict[str, Any] = field(default_factory=dict)

    def base(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return MODELS[self.model][0]().eval()

    def inputs(self) -> dict[str, torch.Tensor]:
        return MODELS[self.model][1]()

    def lora_config(self, lib_name: str, **overrides: Any):
        """The case's config with init_lora_weights=False, so that the adapter changes outputs from the start."""
        return LIBS[lib_name].LoraConfig(**{"init_lora_weights": False, **self.config, **overrides})

    def peft_model(self, lib_name: str, seed: int = 1):
        base = self.base()
        torch.manual_seed(seed)
        return LIBS[lib_name].get_peft_model(base, self.lora_config(lib_name)).eval()


LINEAR_3 = ["lin0", "lin1", "lin2"]
CASES = {
    "mlp": Case("mlp", {"target_modules": ["lin0", "lin1"]}),
    "mlp-regex": Case("mlp", {"target_modules": r".*lin[02]"}),
    "mlp-all-linear": Case("mlp", {"target_modules": "all-linear"}),
    "mlp-patterns": Case(
        "mlp", {"target_modules": LINEAR_3, "r": 4, "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin2": 3}}
    ),
    "mlp-rslora": Case("mlp", {"target_modules": LINEAR_3, "r": 4, "lora_alpha": 6, "use_rslora": True}),
    "mlp-bias-all": Case("mlp", {"target_modules": ["lin0", "lin1"], "bias": "all"}),
    "mlp-bias-all-names": Case("mlp_bias_gate", {"target_modules": ["lin0"], "bias": "all"}),
    "mlp-bias-lora_only": Case("mlp", {"target_modules": ["lin0", "lin1"], "bias": "lora_only"}),
    "mlp-lora-bias": Case("mlp", {"target_modules": LINEAR_3, "lora_bias": True}),
    "mlp-dropout": Case("mlp", {"target_modules": LINEAR_3, "lora_dropout": 0.3}),
    "mlp-save-head": Case("mlp", {"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin2"]}),
    "conv": Case("conv", {"target_modules": ["conv1d", "conv2d", "conv2d_1x1", "conv3d"], "r": 2}),
    "emb": Case("emb", {"target_modules": ["emb", "lin"], "r": 3}),
    "llama": Case("llama", {"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}),
    "llama-all-linear": Case("llama", {"target_modules": "all-linear", "task_type": "CAUSAL_LM"}),
    "llama-layers": Case(
        "llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}
    ),
    "llama-default": Case("llama", {"task_type": "CAUSAL_LM"}),
    "llama-exclude": Case("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj", "up_proj"]}),
    "llama-embed": Case("llama", {"target_modules": ["embed_tokens", "q_proj"], "task_type": "CAUSAL_LM"}),
    "llama-cls": Case("llama_cls", {"target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}),
    "gpt2": Case("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "gpt2-all-linear": Case("gpt2", {"target_modules": "all-linear"}),
    "gpt2-default": Case("gpt2", {"task_type": "CAUSAL_LM"}),
}


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return getattr(output, "logits", output)


def _assert_adapter_matters(output: torch.Tensor, case: Case, inputs: dict[str, torch.Tensor]) -> None:
    """Outputs with the adapter must differ from the base model's, or comparing them after a load proves nothing."""
    assert not torch.allclose(output, _forward(case.base(), inputs), atol=1e-3), "the adapter must change outputs"


def _perturb_saved_base_weights(model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Change the non-LoRA weights the adapter file stores (biases, modules_to_save copies) so that they matter."""
    bias = config.get("bias", "none")
    generator = _gen()
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved_bias = name.endswith("bias") and (bias == "all" or (bias == "lora_only" and "base_layer" in name))
            if "lora_" not in name and (saved_bias or ".modules_to_save." in name):
                param.add_(torch.randn(param.shape, generator=generator))


def _files(folder) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
    )


def _config_json(folder) -> dict[str, Any]:
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        return json.load(handle)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The saved config without the writer's version; sets (saved as lists in any order) compared as sets."""
    result = {key: value for key, value in config.items() if key != "peft_version"}
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(result.get(key), list):
            result[key] = sorted(result[key])
    return result


def _assert_same_adapter_folders(peft_dir, fast_dir) -> None:
    """Same files; in every adapter folder the same weight names and shapes, and the same config but the version."""
    assert _files(fast_dir) == _files(peft_dir)
    for config_file in _files(peft_dir):
        if os.path.basename(config_file) != "adapter_config.json":
            continue
        folder = os.path.dirname(config_file)
        peft_weights = load_file(os.path.join(peft_dir, folder, "adapter_model.safetensors"))
        fast_weights = load_file(os.path.join(fast_dir, folder, "adapter_model.safetensors"))
        assert {k: v.shape for k, v in fast_weights.items()} == {k: v.shape for k, v in peft_weights.items()}
        peft_config, fast_config = (
            _config_json(os.path.join(peft_dir, folder)),
            _config_json(os.path.join(fast_dir, folder)),
        )
        assert _comparable(fast_config) == _comparable(peft_config)
        assert fast_config["peft_version"].startswith("peftfast==")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_id", CASES)
def test_adapter_loads_in_other_library(tmp_path, case_id, direction):
    case = CASES[case_id]
    source_lib, target_lib = DIRECTIONS[direction]
    inputs = case.inputs()
    source = case.peft_model(source_lib)
    _perturb_saved_base_weights(source, case.config)
    expected = _forward(source, inputs)
    _assert_adapter_matters(expected, case, inputs)
    source.save_pretrained(tmp_path)

    loaded = LIBS[target_lib].PeftModel.from_pretrained(case.base(), tmp_path)
    assert_close(_forward(loaded, inputs), expected)
    assert not loaded.training
    assert not any(param.requires_grad for name, param in loaded.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("case_id", CASES)
def test_both_libraries_write_the_same_files(tmp_path, case_id):
    case = CASES[case_id]
    for lib_name in LIBS:
        case.peft_model(lib_name).save_pretrained(tmp_path / lib_name)
    _assert_same_adapter_folders(tmp_path / "peft", tmp_path / "peftfast")


@pytest.mark.parametrize(
    "case_id",
    [
        "mlp",
        "mlp-bias-all-names",
        "mlp-save-head",
        "conv",
        "emb",
        "llama-all-linear",
        "llama-layers",
        "llama-cls",
        "gpt2-default",
    ],
)
def test_models_look_the_same(capsys, case_id):
    case = CASES[case_id]
    models = {lib_name: case.peft_model(lib_name) for lib_name in LIBS}
    printed = {}
    for lib_name, model in models.items():
        model.print_trainable_parameters()
        printed[lib_name] = capsys.readouterr().out
    assert printed["peftfast"] == printed["peft"]
    assert printed["peft"].startswith("trainable params: ")
    fast, reference = models["peftfast"], models["peft"]
    assert fast.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert fast.targeted_module_names == reference.targeted_module_names
    assert sorted(fast.state_dict()) == sorted(reference.state_dict())
    trainable = {
        lib_name: sorted(n for n, p in model.named_parameters() if p.requires_grad)
        for lib_name, model in models.items()
    }
    assert trainable["peftfast"] == trainable["peft"]
    for name in reference.targeted_module_names:
        first_lines = {
            lib_name: repr(model.get_base_model().get_submodule(name)).splitlines()[0]
            for lib_name, model in models.items()
        }
        assert first_lines["peftfast"] == first_lines["peft"]
        assert first_lines["peftfast"].startswith("lora.")


def test_lora_linear_repr():
    model = CASES["mlp"].peft_model("peftfast")
    assert repr(model.get_base_model().lin0).startswith("lora.Linear(")


@pytest.mark.parametrize(("case_id", "head"), [("llama-all-linear", "lm_head"), ("gpt2-all-linear", "lm_head")])
def test_all_linear_resolves_like_peft_and_leaves_out_the_head(case_id, head):
    models = {name: CASES[case_id].peft_model(name) for name in LIBS}
    resolved = {name: set(model.peft_config["default"].target_modules) for name, model in models.items()}
    assert resolved["peftfast"] == resolved["peft"]
    assert head not in resolved["peftfast"]
    assert not any(name.split(".")[-1] == head for name in models["peftfast"].targeted_module_names)


def test_all_linear_on_a_plain_module_takes_every_linear():
    models = {name: CASES["mlp-all-linear"].peft_model(name) for name in LIBS}
    assert set(models["peftfast"].peft_config["default"].target_modules) == {"lin0", "lin1", "lin2"}
    assert set(models["peft"].peft_config["default"].target_modules) == {"lin0", "lin1", "lin2"}


MULTI_ADAPTER_CASES = ["mlp-save-head", "conv", "llama", "llama-cls"]


def _two_adapter_model(case: Case, lib_name: str):
    """The case's adapter as "default" plus a second one, "other", of another rank; "default" active."""
    model = case.peft_model(lib_name)
    torch.manual_seed(2)
    model.add_adapter("other", case.lora_config(lib_name, r=3, lora_alpha=5))
    _perturb_saved_base_weights(model, case.config)
    return model


def _outputs_per_adapter(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    outputs = {}
    for adapter_name in ("other", "default"):
        model.set_adapter(adapter_name)
        outputs[adapter_name] = _forward(model, inputs)
    return outputs


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_id", MULTI_ADAPTER_CASES)
def test_multiple_adapters_load_in_other_library(tmp_path, case_id, direction):
    case = CASES[case_id]
    source_lib, target_lib = DIRECTIONS[direction]
    inputs = case.inputs()
    source = _two_adapter_model(case, source_lib)
    expected = _outputs_per_adapter(source, inputs)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    source.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()

    loaded = LIBS[target_lib].PeftModel.from_pretrained(case.base(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert loaded.active_adapter == "default"
    assert_close(_forward(loaded, inputs), expected["default"])
    for adapter_name, output in _outputs_per_adapter(loaded, inputs).items():
        assert_close(output, expected[adapter_name])


@pytest.mark.parametrize("case_id", MULTI_ADAPTER_CASES)
def test_multiple_adapters_write_the_same_files(tmp_path, case_id):
    models = {lib_name: _two_adapter_model(CASES[case_id], lib_name) for lib_name in LIBS}
    for lib_name, model in models.items():
        model.save_pretrained(tmp_path / lib_name)
    _assert_same_adapter_folders(tmp_path / "peft", tmp_path / "peftfast")
    fast, reference = models["peftfast"], models["peft"]
    assert sorted(fast.state_dict()) == sorted(reference.state_dict())
    assert fast.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == [
        n for n, p in reference.named_parameters() if p.requires_grad
    ]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_selected_adapters(tmp_path, direction):
    case = CASES["mlp-save-head"]
    source_lib, target_lib = DIRECTIONS[direction]
    inputs = case.inputs()
    for lib_name in LIBS:
        _two_adapter_model(case, lib_name).save_pretrained(tmp_path / lib_name, selected_adapters=["other"])
    _assert_same_adapter_folders(tmp_path / "peft", tmp_path / "peftfast")
    assert not (tmp_path / source_lib / "adapter_config.json").exists()

    source = _two_adapter_model(case, source_lib)
    source.set_adapter("other")
    expected = _forward(source, inputs)
    _assert_adapter_matters(expected, case, inputs)
    loaded = LIBS[target_lib].PeftModel.from_pretrained(case.base(), tmp_path / source_lib, "other", subfolder="other")
    assert_close(_forward(loaded, inputs), expected)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case_id", ["mlp-save-head", "llama"])
def test_legacy_bin_file(tmp_path, case_id, direction):
    case = CASES[case_id]
    source_lib, target_lib = DIRECTIONS[direction]
    inputs = case.inputs()
    source = case.peft_model(source_lib)
    _perturb_saved_base_weights(source, case.config)
    source.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    expected = _forward(source, inputs)
    _assert_adapter_matters(expected, case, inputs)
    loaded = LIBS[target_lib].PeftModel.from_pretrained(case.base(), tmp_path)
    assert_close(_forward(loaded, inputs), expected)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_greedy_generate_matches(tmp_path, direction):
    case = CASES["llama-all-linear"]
    source_lib, target_lib = DIRECTIONS[direction]
    input_ids = case.inputs()["input_ids"]
    generate = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    source = case.peft_model(source_lib)
    expected = source.generate(input_ids=input_ids, **generate)
    with source.disable_adapter():
        assert not torch.equal(source.generate(input_ids=input_ids, **generate), expected)
    source.save_pretrained(tmp_path)
    loaded = LIBS[target_lib].PeftModel.from_pretrained(case.base(), tmp_path)
    assert torch.equal(loaded.generate(input_ids=input_ids, **generate), expected)


def _train(model, inputs: dict[str, torch.Tensor], steps: int = 3) -> dict[str, torch.Tensor]:
    """A few SGD steps on a fixed batch; returns the trainable parameters afterwards (each must have moved)."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    initial = {name: param.detach().clone() for name, param in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    model.train()
    for _ in range(steps):
        output = model(**inputs)
        loss = getattr(output, "logits", output).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not [name for name, param in trainable.items() if torch.equal(param, initial[name])]
    return {name: param.detach().clone() for name, param in trainable.items()}


@pytest.mark.parametrize("case_id", ["mlp-save-head", "mlp-bias-lora_only", "conv", "emb", "llama-all-linear"])
def test_training_matches(tmp_path, case_id):
    case = CASES[case_id]
    inputs = case.inputs()
    case.peft_model("peft").save_pretrained(tmp_path)
    trained = {}
    for lib_name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(case.base(), tmp_path, is_trainable=True)
        trained[lib_name] = _train(model, inputs)
    assert sorted(trained["peftfast"]) == sorted(trained["peft"])
    assert any("lora_A" in name for name in trained["peft"])
    for name, param in trained["peft"].items():
        assert_close(trained["peftfast"][name], param)
