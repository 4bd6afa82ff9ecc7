"""LoRA's `layer_replication` against HF PEFT: a deeper model from repeated decoder layers that share their base
weights, each copy with its own LoRA; same outputs, gradients, files and generation, both directions."""

from __future__ import annotations

import peft
import pytest
import torch
from models import MLP, tiny_llama
from safetensors.torch import load_file
from tolerances import assert_close

import peftfast

LIBS = {"peft": peft, "peftfast": peftfast}
REPLICATION = [[0, 2], [1, 3]]  # layers [0, 1, 2] -> [0, 1, 1, 2]


def _config(lib, **extra):
    return lib.LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        layer_replication=[list(pair) for pair in REPLICATION],
        init_lora_weights=False,
        **extra,
    )


def _model(lib_name: str, seed: int = 1, **extra):
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=3)
    torch.manual_seed(seed)
    lib = LIBS[lib_name]
    return lib.get_peft_model(base, _config(lib, **extra)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_replicated_layers_share_base_weights_and_match_peft():
    ids = _ids()
    models = {name: _model(name) for name in LIBS}
    layers = models["peftfast"].base_model.model.model.layers
    assert len(layers) == 4 and models["peftfast"].base_model.model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    first, copy = layers[1], layers[2]
    assert first.self_attn.q_proj.base_layer.weight is copy.self_attn.q_proj.base_layer.weight
    assert first.mlp.up_proj.weight is copy.mlp.up_proj.weight
    assert first.self_attn.q_proj.lora_A["default"].weight is not copy.self_attn.q_proj.lora_A["default"].weight
    assert not torch.equal(
        first.self_attn.q_proj.lora_A["default"].weight, copy.self_attn.q_proj.lora_A["default"].weight
    )
    fast_names = sorted(n for n, p in models["peftfast"].named_parameters() if p.requires_grad)
    assert fast_names == sorted(n for n, p in models["peft"].named_parameters() if p.requires_grad)
    assert_close(_logits(models["peftfast"], ids), _logits(models["peft"], ids))

    # One training step: the same gradients on every copy's LoRA.
    grads = {}
    for name, model in models.items():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads["peftfast"]) == sorted(grads["peft"])
    for key, expected in grads["peft"].items():
        assert_close(grads["peftfast"][key], expected, kind="kernel")


def test_generation_with_a_cache_matches_peft():
    ids = _ids()
    outputs = {}
    for name in LIBS:
        model = _model(name)
        outputs[name] = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert torch.equal(outputs["peftfast"], outputs["peft"])


@pytest.mark.parametrize("direction", ["p2f", "f2p"])
def test_files_are_the_same_and_load_both_ways(tmp_path, direction):
    ids = _ids()
    source_name, target_name = ("peft", "peftfast") if direction == "p2f" else ("peftfast", "peft")
    source = _model(source_name, seed=4)
    source.save_pretrained(tmp_path / "source")
    _model(target_name, seed=4).save_pretrained(tmp_path / "other")
    files = {folder: load_file(tmp_path / folder / "adapter_model.safetensors") for folder in ("source", "other")}
    assert sorted(files["source"]) == sorted(files["other"])
    assert any(".layers.3." in key for key in files["source"])
    for key, value in files["source"].items():
        torch.testing.assert_close(files["other"][key], value, rtol=0, atol=0)

    torch.manual_seed(0)
    loaded = LIBS[target_name].PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path / "source")
    assert len(loaded.base_model.model.model.layers) == 4
    assert loaded.peft_config["default"].layer_replication == REPLICATION
    assert_close(_logits(loaded, ids), _logits(source, ids))


def test_merging_is_refused_and_unload_keeps_the_replicated_stack():
    ids = _ids()
    model = _model("peftfast")
    expected = _logits(model, ids)
    weights = {name: param.clone() for name, param in model.named_parameters()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="replicated"):
            merge()
    assert all(torch.equal(param, weights[name]) for name, param in model.named_parameters())
    assert_close(_logits(model, ids), expected)
    with model.disable_adapter(), torch.no_grad():
        # Without a cache: the hand-built stack repeats a layer object, and with it its cache index.
        disabled = model(input_ids=ids, use_cache=False).logits
        assert_close(disabled, _replicated_base()(input_ids=ids, use_cache=False).logits)
    unloaded = model.unload()
    assert len(unloaded.model.layers) == 4 and not any("lora" in name for name, _ in unloaded.named_parameters())


def _replicated_base():
    """The base model with its layers stacked as REPLICATION says, by hand."""
    model = tiny_llama(num_hidden_layers=3)
    old = model.model.layers
    model.model.layers = torch.nn.ModuleList([old[0], old[1], old[1], old[2]])
    model.config.num_hidden_layers = 4
    return model


@pytest.mark.parametrize(
    "model_fn, config, match",
    [
        (lambda: tiny_llama(num_hidden_layers=3), dict(layer_replication=[[0, 4]]), "outside the model's 3 layers"),
        (
            lambda: tiny_llama(num_hidden_layers=3),
            dict(layer_replication=[[0, 2]], target_modules=["nope"]),
            "not found",
        ),
        (MLP, dict(layer_replication=[[0, 1]], target_modules=["lin0"]), "could not find the model's stack"),
    ],
)
def test_bad_replication_raises_and_leaves_the_model_unchanged(model_fn, config, match):
    model = model_fn()
    before = {name: id(module) for name, module in model.named_modules()}
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    with pytest.raises(ValueError, match=match):
        peftfast.get_peft_model(model, peftfast.LoraConfig(**{"target_modules": ["q_proj"], **config}))
    assert {name: id(module) for name, module in model.named_modules()} == before
    assert getattr(getattr(model, "config", None), "num_hidden_layers", None) == layers


@pytest.mark.parametrize("value", [[[0]], [[2, 1]], [(0, 1.5)], "0-2"])
def test_bad_layer_replication_values_are_refused(value):
    with pytest.raises(ValueError, match="layer_replication"):
        peftfast.LoraConfig(layer_replication=value)


def test_bert_layers_replicate_like_peft():
    from transformers import BertConfig, BertModel

    def base():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
        )
        return BertModel(config).eval()

    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name, lib in LIBS.items():
        model = base()
        torch.manual_seed(1)
        config = lib.LoraConfig(
            target_modules=["query", "value"], layer_replication=[[0, 2], [0, 1]], init_lora_weights=False
        )
        peft_model = lib.get_peft_model(model, config).eval()
        assert len(peft_model.base_model.model.encoder.layer) == 3
        with torch.no_grad():
            outputs[name] = peft_model(input_ids=ids).last_hidden_state
    assert_close(outputs["peftfast"], outputs["peft"])
