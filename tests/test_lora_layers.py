"""LoRA layers against independent math: odd shapes, ranks above a dimension, empty batches, dtypes, merging."""

import copy

import pytest
import torch
from models import MLP, ConvNet, EmbeddingModel, tiny_gpt2
from tolerances import assert_close
from torch import nn

from peftfast import LoraConfig, get_peft_model
from peftfast.tuners.lora import Linear


def _lora_mlp(r=4, **config):
    return get_peft_model(
        MLP(), LoraConfig(r=r, target_modules=["lin0", "lin1", "lin2"], init_lora_weights=False, **config)
    ).eval()


@pytest.mark.parametrize("r", [1, 7, 64], ids=["r1", "r7", "r64-above-dims"])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (0,)], ids=["2d", "3d", "empty-batch"])
def test_linear_equals_base_plus_scaled_product(r, lead):
    model = _lora_mlp(r=r, lora_alpha=3)
    layer = model.base_model.model.lin1
    x = torch.randn(*lead, 23)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (3 / r) * (x @ A.T @ B.T)
    assert_close(layer(x), expected)


def test_rslora_scaling_and_rank_pattern():
    model = _lora_mlp(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"lin1": 9}, alpha_pattern={"lin2": 2})
    layers = model.base_model.model
    assert layers.lin0.scaling["default"] == pytest.approx(8 / 2)
    assert layers.lin1.r["default"] == 9 and layers.lin1.scaling["default"] == pytest.approx(8 / 3)
    assert layers.lin2.scaling["default"] == pytest.approx(2 / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_half_precision_base(dtype, autocast):
    base = MLP().to(dtype)
    model = get_peft_model(
        base, LoraConfig(target_modules=["lin1"], init_lora_weights=False), autocast_adapter_dtype=autocast
    ).eval()
    layer = model.base_model.model.lin1
    assert layer.lora_A["default"].weight.dtype == (torch.float32 if autocast else dtype)
    x = torch.randn(4, 23).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = layer.base_layer(x).float() + x.float() @ A.T @ B.T
    assert_close(out.float(), expected, dtype=dtype)


def test_only_adapters_get_gradients():
    model = _lora_mlp()
    model.train()
    model(torch.randn(3, 11)).sum().backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_dropout_only_in_training():
    model = _lora_mlp(lora_dropout=0.5)
    x = torch.randn(64, 11)
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_disabled_adapter_gives_base_output():
    base = MLP()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["lin1"], init_lora_weights=False)).eval()
    x = torch.randn(3, 11)
    assert not torch.allclose(model(x), base(x))
    with model.disable_adapter():
        assert_close(model(x), base(x))
    assert not torch.allclose(model(x), base(x))


def _inputs_for(model_name):
    if model_name == "mlp":
        return MLP(), ["lin0", "lin1", "lin2"], (torch.randn(4, 11),)
    if model_name == "conv":
        return (
            ConvNet(),
            ["conv1d", "conv2d", "conv2d_1x1", "conv3d"],
            (torch.randn(2, 3, 7), torch.randn(2, 2, 3, 5, 6)),
        )
    if model_name == "embedding":
        return EmbeddingModel(), ["emb"], (torch.randint(0, 37, (3, 8)),)
    return tiny_gpt2(), ["c_attn", "c_proj"], (torch.randint(0, 97, (2, 7)),)


@pytest.mark.parametrize("model_name", ["mlp", "conv", "embedding", "gpt2-conv1d"])
def test_merge_equals_unmerged_and_unmerge_restores(model_name):
    base, targets, inputs = _inputs_for(model_name)
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(*inputs)
    unmerged = unmerged.logits if hasattr(unmerged, "logits") else unmerged
    model.merge_adapter()
    merged = model(*inputs)
    merged = merged.logits if hasattr(merged, "logits") else merged
    assert_close(merged, unmerged, kind="kernel")
    model.unmerge_adapter()
    for key, value in model.state_dict().items():
        assert_close(value, before[key], kind="kernel")


def test_merge_and_unload_leaves_no_lora_modules():
    model = _lora_mlp()
    x = torch.randn(3, 11)
    expected = model(x)
    plain = model.merge_and_unload()
    assert not any("lora" in name for name, _ in plain.named_modules())
    assert type(plain.lin1) is nn.Linear
    assert_close(plain(x), expected, kind="kernel")


def test_no_active_adapter_in_a_layer_runs_base():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin1"], init_lora_weights=False)).eval()
    model.add_adapter("other", LoraConfig(target_modules=["lin2"], init_lora_weights=False))
    model.set_adapter("other")
    layer = model.base_model.model.lin1
    assert isinstance(layer, Linear) and layer.active_adapters == ["other"]
    x = torch.randn(2, 23)
    assert_close(layer(x), layer.base_layer(x))
