"""LoRA on nn.MultiheadAttention against HF PEFT 0.21.2: outputs and gradients for every way the attention is
called (batch_first both ways, unbatched, self-/cross-attention, need_weights, masks, is_causal, bias_k/v,
add_zero_attn), fp32 and bf16, adapter files both ways, merging, several adapters, and the refusals.

HF PEFT's semantics, which the fp64 oracle below spells out: the in_proj delta `s * B @ A` is added to in_proj_weight,
the out_proj delta twice (huggingface/peft#3774), neither lora_dropout nor in_proj's lora_B bias is applied.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast.tuners.lora import MultiheadAttention

LIBS = {"peft": peft, "peftfast": peftfast}
EMBED, HEADS = 12, 3
# HF PEFT warns on every forward of its MultiheadAttention layer (its merge/unmerge cycle) and on lora_bias.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Attention(nn.Module):
    """One attention, called as `attn(query, key, value, **kwargs)` (key and value default to the query)."""

    def __init__(self, batch_first: bool = True, **options) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, **options)

    def forward(self, query, key=None, value=None, **kwargs):
        key = query if key is None else key
        value = key if value is None else value
        return self.attn(query, key, value, **kwargs)


def _base(dtype=torch.float32, **options) -> Attention:
    torch.manual_seed(0)
    return Attention(**options).to(dtype).eval()


def _peft_model(lib_name: str, seed: int = 1, options=None, dtype=torch.float32, **config):
    base = _base(dtype, **(options or {}))
    torch.manual_seed(seed)
    lib = LIBS[lib_name]
    settings = dict(target_modules=["attn"], r=4, lora_alpha=6, init_lora_weights=False) | config
    return lib.get_peft_model(base, lib.LoraConfig(**settings))


def _oracle(model, dtype=torch.float64) -> nn.MultiheadAttention:
    """A plain nn.MultiheadAttention with HF PEFT's effective weights (in fp64 by default)."""
    layer = model.base_model.model.attn
    attention = layer.get_base_layer()
    reference = nn.MultiheadAttention(
        EMBED,
        HEADS,
        batch_first=attention.batch_first,
        bias=attention.in_proj_bias is not None,
        add_bias_kv=attention.bias_k is not None,
        add_zero_attn=attention.add_zero_attn,
        dropout=attention.dropout,
    )
    reference.load_state_dict(
        {
            k.replace("out_proj.base_layer.", "out_proj."): v
            for k, v in attention.state_dict().items()
            if "lora_" not in k
        }
    )
    reference = reference.to(dtype).eval()
    with torch.no_grad():
        for adapter in layer.active_adapters:
            out = attention.out_proj
            delta_in = (
                layer.scaling[adapter] * layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
            )
            delta_out = out.scaling[adapter] * out.lora_B[adapter].weight.double() @ out.lora_A[adapter].weight.double()
            reference.in_proj_weight += delta_in.to(dtype)
            reference.out_proj.weight += 2 * delta_out.to(dtype)
            if out.lora_B[adapter].bias is not None:
                reference.out_proj.bias += (out.scaling[adapter] * out.lora_B[adapter].bias).to(dtype)
    return reference


def _inputs(batch_first: bool, batched: bool = True, dtype=torch.float32):
    generator = torch.Generator().manual_seed(7)
    shape = lambda length: ((3, length, EMBED) if batch_first else (length, 3, EMBED)) if batched else (length, EMBED)  # noqa: E731
    return {
        "query": torch.randn(shape(5), generator=generator).to(dtype),
        "other": torch.randn(shape(7), generator=generator).to(dtype),
    }


CALLS = {
    "self": lambda t: dict(query=t["query"]),
    "self-no-weights": lambda t: dict(query=t["query"], need_weights=False),
    "cross-shared-kv": lambda t: dict(query=t["query"], key=t["other"]),
    "cross-separate": lambda t: dict(query=t["query"], key=t["other"], value=t["other"] * 0.5),
    "per-head-weights": lambda t: dict(query=t["query"], average_attn_weights=False),
    "bool-mask": lambda t: dict(query=t["query"], attn_mask=torch.eye(5, dtype=torch.bool).roll(1, 0)),
    "float-mask-no-weights": lambda t: dict(
        query=t["query"], attn_mask=torch.randn(5, 5, generator=torch.Generator().manual_seed(3)), need_weights=False
    ),
    "3d-mask": lambda t: dict(
        query=t["query"], attn_mask=torch.randn(3 * HEADS, 5, 5, generator=torch.Generator().manual_seed(4))
    ),
    "causal": lambda t: dict(
        query=t["query"],
        attn_mask=nn.Transformer.generate_square_subsequent_mask(5),
        is_causal=True,
        need_weights=False,
    ),
    "padding": lambda t: dict(
        query=t["query"],
        key=t["other"],
        key_padding_mask=torch.tensor([[0] * 5 + [1] * 2, [0] * 7, [0] * 6 + [1]]).bool(),
    ),
    "padding-and-mask": lambda t: dict(
        query=t["query"],
        key_padding_mask=torch.tensor([[0, 0, 0, 1, 1], [0] * 5, [0, 0, 0, 0, 1]]).bool(),
        attn_mask=torch.eye(5, dtype=torch.bool).roll(2, 0),
        need_weights=False,
    ),
}


def _call(model, arguments, dtype=None):
    convert = dtype is not None
    arguments = {
        k: v.to(dtype) if convert and torch.is_tensor(v) and v.is_floating_point() else v for k, v in arguments.items()
    }
    query = arguments.pop("query")
    key = arguments.pop("key", query)
    return model(query, key, arguments.pop("value", key), **arguments)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("call", list(CALLS))
def test_outputs_match_peft_and_the_merged_weight_oracle(call, batch_first):
    models = {name: _peft_model(name, options=dict(batch_first=batch_first)).eval() for name in LIBS}
    arguments = CALLS[call](_inputs(batch_first))
    outputs = {name: _call(model, dict(arguments)) for name, model in models.items()}
    with torch.no_grad():
        expected = _call(_oracle(models["peft"]), dict(arguments), dtype=torch.float64)
    base = _call(_base(batch_first=batch_first), dict(arguments))
    assert not torch.allclose(outputs["peftfast"][0], base[0], atol=1e-3), "the adapter must change the output"
    for output, weights in outputs.values():
        assert_close(output.double(), expected[0], dtype=torch.float32)
        assert (weights is None) == (expected[1] is None)
        if weights is not None:
            assert_close(weights.double(), expected[1], dtype=torch.float32)
    assert_close(outputs["peftfast"][0], outputs["peft"][0])


@pytest.mark.parametrize(
    "options",
    [dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)],
    ids=["no-bias", "bias-kv", "zero-attn", "bias-kv-zero-attn"],
)
def test_attention_options_match_peft(options):
    models = {name: _peft_model(name, options=options).eval() for name in LIBS}
    arguments = CALLS["padding"](_inputs(True))
    for need_weights in (True, False):
        ours = _call(models["peftfast"], dict(arguments, need_weights=need_weights))
        theirs = _call(models["peft"], dict(arguments, need_weights=need_weights))
        assert_close(ours[0], theirs[0])
        if need_weights:
            assert_close(ours[1], theirs[1])


def test_unbatched_input_matches_peft():
    models = {name: _peft_model(name).eval() for name in LIBS}
    inputs = _inputs(True, batched=False)
    for call in ("self", "cross-separate"):
        ours, theirs = (_call(models[name], CALLS[call](inputs)) for name in ("peftfast", "peft"))
        assert ours[0].shape == (5, EMBED) and ours[1].shape == (5, 5 if call == "self" else 7)
        assert_close(ours[0], theirs[0])
        assert_close(ours[1], theirs[1])


def test_bf16_within_twice_torchs_own_error():
    """A bf16 base with fp32 adapters (autocast_adapter_dtype): against the fp64 oracle, peftfast's error is at most
    about twice what HF PEFT's bf16 merged-weight attention makes."""
    models = {name: _peft_model(name, dtype=torch.bfloat16).eval() for name in LIBS}
    layer = models["peftfast"].base_model.model.attn
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.in_proj_weight.dtype == torch.bfloat16
    arguments = CALLS["cross-shared-kv"](_inputs(True, dtype=torch.bfloat16))
    with torch.no_grad():
        expected = _call(_oracle(models["peft"]), dict(arguments), dtype=torch.float64)[0]
        errors = {
            name: (_call(model, dict(arguments))[0].double() - expected).abs().max() for name, model in models.items()
        }
    assert _call(models["peftfast"], dict(arguments))[0].dtype == torch.bfloat16
    assert errors["peftfast"] <= 2 * errors["peft"] + 1e-2


def test_gradients_match_peft():
    models = {name: _peft_model(name).train() for name in LIBS}
    inputs = _inputs(True)
    grads = {}
    for name, model in models.items():
        query = inputs["query"].clone().requires_grad_(True)
        key = inputs["other"].clone().requires_grad_(True)
        output, _ = model(query, key, need_weights=False)
        output.pow(2).sum().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad} | {
            "query": query.grad,
            "key": key.grad,
        }
    assert sorted(grads["peftfast"]) == sorted(grads["peft"])
    assert len(grads["peft"]) == 6
    for name, grad in grads["peft"].items():
        torch.testing.assert_close(grads["peftfast"][name], grad, atol=1e-5, rtol=1e-5)


def test_dropout_is_not_applied_and_attention_dropout_draws_like_peft():
    """HF PEFT applies no lora_dropout to MultiheadAttention; the attention's own dropout draws the same numbers."""
    models = {name: _peft_model(name, options=dict(dropout=0.3), lora_dropout=0.5).train() for name in LIBS}
    query = _inputs(True)["query"]
    outputs = {}
    for name, model in models.items():
        torch.manual_seed(11)
        outputs[name] = model(query, need_weights=False)[0]
    assert_close(outputs["peftfast"], outputs["peft"])
    models["peftfast"].base_model.model.attn.get_base_layer().dropout = 0.0
    first, second = (models["peftfast"](query)[0] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("direction", ["p2f", "f2p"])
def test_adapter_files_load_in_the_other_library(tmp_path, direction):
    source_lib, target_lib = ("peft", "peftfast") if direction == "p2f" else ("peftfast", "peft")
    for name in LIBS:
        _peft_model(name, lora_bias=True).save_pretrained(tmp_path / name)
    files = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in LIBS}
    assert {k: v.shape for k, v in files["peftfast"].items()} == {k: v.shape for k, v in files["peft"].items()}
    assert sorted(files["peft"]) == [
        "base_model.model.attn.base_layer.out_proj.lora_A.weight",
        "base_model.model.attn.base_layer.out_proj.lora_B.bias",
        "base_model.model.attn.base_layer.out_proj.lora_B.weight",
        "base_model.model.attn.lora_A.weight",
        "base_model.model.attn.lora_B.bias",
        "base_model.model.attn.lora_B.weight",
    ]
    source = _peft_model(source_lib, seed=3, lora_bias=True).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.normal_()
    source.save_pretrained(tmp_path / "source")
    loaded = LIBS[target_lib].PeftModel.from_pretrained(_base(), tmp_path / "source").eval()
    arguments = CALLS["padding"](_inputs(True))
    for expected, actual in zip(_call(source, dict(arguments)), _call(loaded, dict(arguments))):
        assert_close(actual, expected)


def test_model_looks_like_peft(capsys):
    models = {name: _peft_model(name) for name in LIBS}
    printed = {}
    for name, model in models.items():
        model.print_trainable_parameters()
        printed[name] = capsys.readouterr().out
    assert printed["peftfast"] == printed["peft"]
    ours, theirs = models["peftfast"], models["peft"]
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    # Same weights from the same seed: the adapters are created in HF PEFT's order.
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert [(s.name, s.module_type) for s in ours.get_layer_status()] == [
        (s.name, s.module_type) for s in theirs.get_layer_status()
    ]
    layer = ours.base_model.model.attn
    assert isinstance(layer, MultiheadAttention) and repr(layer).startswith("lora.MultiheadAttention(")
    assert layer.out_proj is layer.get_base_layer().out_proj.get_base_layer()
    assert (layer.embed_dim, layer.num_heads, layer.batch_first, layer.head_dim) == (EMBED, HEADS, True, 4)


def test_merge_unmerge_and_merge_and_unload_match_peft():
    models = {name: _peft_model(name, lora_bias=True).eval() for name in LIBS}
    arguments = CALLS["cross-shared-kv"](_inputs(True))
    expected = _call(models["peftfast"], dict(arguments))[0]
    base_weights = {k: v.clone() for k, v in models["peftfast"].state_dict().items() if "lora_" not in k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in models.values():
            model.merge_adapter()
    ours, theirs = (models[name].base_model.model.attn for name in ("peftfast", "peft"))
    assert ours.merged_adapters == ["default"] and ours.get_base_layer().out_proj.merged_adapters == ["default"]
    assert_close(ours.in_proj_weight, theirs.in_proj_weight)
    assert_close(ours.out_proj.weight, theirs.out_proj.weight)
    assert_close(ours.out_proj.bias, theirs.out_proj.bias)
    assert_close(_call(models["peftfast"], dict(arguments))[0], expected)
    models["peftfast"].unmerge_adapter()
    assert not ours.merged
    for name, value in base_weights.items():
        assert_close(models["peftfast"].state_dict()[name], value)
    assert_close(_call(models["peftfast"], dict(arguments))[0], expected)

    unloaded = models["peftfast"].merge_and_unload()
    assert type(unloaded.attn) is nn.MultiheadAttention
    assert type(unloaded.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any("lora" in name for name in unloaded.state_dict())
    assert_close(_call(unloaded, dict(arguments))[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(_call(models["peft"].merge_and_unload(), dict(arguments))[0], expected)


def test_safe_merge_and_unload_without_merging():
    model = _peft_model("peftfast").eval()
    arguments = CALLS["self"](_inputs(True))
    expected = _call(model, dict(arguments))[0]
    base_output = _call(_base(), dict(arguments))[0]
    model.merge_adapter(safe_merge=True)
    assert_close(_call(model, dict(arguments))[0], expected)
    model.unmerge_adapter()
    with torch.no_grad():
        model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs detected while merging adapter 'default'"):
        model.merge_adapter(safe_merge=True)
    assert not model.base_model.model.attn.merged
    unloaded = model.unload()
    assert type(unloaded.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert_close(_call(unloaded, dict(arguments))[0], base_output)


def test_several_adapters_switch_disable_and_delete_like_peft():
    models = {}
    for name, lib in LIBS.items():
        model = _peft_model(name)
        torch.manual_seed(5)
        model.add_adapter("other", lib.LoraConfig(target_modules=["attn"], r=3, lora_alpha=5, init_lora_weights=False))
        models[name] = model.eval()
    arguments = CALLS["cross-separate"](_inputs(True))
    for adapters in (["other"], ["default"], ["default", "other"]):
        for model in models.values():
            model.base_model.set_adapter(adapters)
        assert_close(_call(models["peftfast"], dict(arguments))[0], _call(models["peft"], dict(arguments))[0])
    with models["peftfast"].disable_adapter():
        assert_close(_call(models["peftfast"], dict(arguments))[0], _call(_base(), dict(arguments))[0])
    models["peftfast"].base_model.set_adapter("default")
    expected = _call(models["peftfast"], dict(arguments))[0]
    models["peftfast"].delete_adapter("other")
    layer = models["peftfast"].base_model.model.attn
    assert list(layer.lora_A) == ["default"] and list(layer.get_base_layer().out_proj.lora_A) == ["default"]
    assert_close(_call(models["peftfast"], dict(arguments))[0], expected)


def test_transformer_encoder_layer_runs_the_adapters_in_eval():
    """torch's TransformerEncoderLayer has a fused inference path that reads the attention's base weights only (it
    silently drops HF PEFT's adapters in eval mode); peftfast's layer keeps it off, so eval runs the adapters."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(EMBED, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    model = peftfast.get_peft_model(
        Encoder(), peftfast.LoraConfig(target_modules=["self_attn"], init_lora_weights=False)
    )
    x = _inputs(True)["query"]
    training_output = model.train()(x)
    with torch.no_grad():
        assert_close(model.eval()(x), training_output)
        torch.manual_seed(0)
        assert not torch.allclose(Encoder().eval()(x), training_output, atol=1e-3)


def test_refusals_leave_the_model_unchanged():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(EMBED, EMBED)
            self.attn = nn.MultiheadAttention(EMBED, HEADS, kdim=5, vdim=7)

    base = Mixed()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="kdim=5, vdim=7"):
        peftfast.get_peft_model(base, peftfast.LoraConfig(target_modules=["lin", "attn"]))
    assert type(base.lin) is nn.Linear and type(base.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert {k: v for k, v in base.state_dict().items()}.keys() == before.keys()

    model = _peft_model("peftfast").eval()
    inputs = _inputs(True)["query"]
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        model(inputs, adapter_names=["default"] * 3)


@pytest.mark.cpu_kernels
def test_projections_run_the_fused_kernels_on_the_triton_backend():
    """The triton lora_linear serves the packed, split and out projections (with HF PEFT's detached second out_proj
    term); outputs and adapter gradients equal the torch backend's."""
    results = {}
    for backend in ("torch", "triton"):
        model = _peft_model("peftfast").train()
        inputs = _inputs(True)
        with peftfast.ops.use_backend(backend):
            for call in ("self-no-weights", "cross-separate"):
                output = _call(model, CALLS[call](inputs))[0]
                output.pow(2).sum().backward()
            assert peftfast.ops.last_backend("lora_linear") == backend
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[backend] = (output.detach(), grads)
    assert_close(results["triton"][0], results["torch"][0], kind="kernel")
    for name, grad in results["torch"][1].items():
        assert_close(results["triton"][1][name], grad, kind="kernel")
