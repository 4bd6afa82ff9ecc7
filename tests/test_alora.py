"""aLoRA (`alora_invocation_tokens`) against HF PEFT 0.21.2: the masked op against its reference, offsets as PEFT finds
them, forward, gradients and generate per row of a batch (fp32 and bf16), files both ways, mixed batches, the KV cache
of a base-model prefix reused across aLoRA adapters, gradient checkpointing, and PEFT's refusals.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from models import EmbeddingModel, quantize_to_4bit, tiny_llama
from peft.tuners.lora.variants import calculate_alora_offsets
from tolerances import EXACT, KERNEL, assert_close
from torch import nn

import peftfast
from peftfast import ops
from peftfast.tuners.lora.alora import AloraOffsets, invocation_offsets
from peftfast.utils.cache import cache_argument, get_cache

LIBS = {"peft": peft, "peftfast": peftfast}
INVOCATION = [7, 8]
OTHER_INVOCATION = [9]
# Rows with the invocation once, twice (the last one counts), at the very end, and never.
IDS = torch.tensor(
    [
        [11, 12, 7, 8, 13, 14, 15, 16, 17],
        [7, 8, 21, 22, 23, 7, 8, 24, 25],
        [31, 32, 33, 34, 35, 36, 37, 7, 8],
        [41, 42, 43, 44, 7, 45, 8, 46, 47],
    ]
)
GENERATE = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(lib_name: str, invocation=INVOCATION, **overrides):
    settings = dict(
        alora_invocation_tokens=invocation,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    return LIBS[lib_name].LoraConfig(**(settings | overrides))


def _peft_model(lib_name: str, seed: int = 1, dtype=torch.float32, **overrides):
    base = tiny_llama().to(dtype)
    torch.manual_seed(seed)
    return LIBS[lib_name].get_peft_model(base, _config(lib_name, **overrides)).eval()


def _loaded_pair(tmp_path, source_lib: str = "peft", dtype=torch.float32, **overrides):
    """The same saved aLoRA adapter (written by `source_lib`) in both libraries."""
    _peft_model(source_lib, **overrides).save_pretrained(tmp_path)
    return {name: lib.PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path).eval() for name, lib in LIBS.items()}


# ----------------------------------------------------------------------------------------------------------- the op


def _masked_add_by_gathering(result, x, A, B, bias, scaling, mask):
    """HF PEFT's formulation in fp64: the adapter term of the selected tokens only, by boolean indexing."""
    out = result.double().reshape(-1, result.shape[-1]).clone()
    rows = mask.reshape(-1)
    selected = x.double().reshape(-1, x.shape[-1])[rows]
    for a, b, c, s in zip(A, B, bias, scaling):
        term = selected @ a.double().T @ b.double().T + (0 if c is None else c.double())
        out[rows] = out[rows] + s * term
    return out.reshape(result.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("lead", "mask_kind"),
    [((3, 13), "random"), ((5,), "random"), ((2, 7), "none"), ((2, 7), "all"), ((0, 7), "random")],
    ids=["3x13", "2d-input", "no-token", "every-token", "empty-batch"],
)
def test_lora_add_masked_against_gathering_reference(lead, mask_kind, dtype):
    generator = torch.Generator().manual_seed(3)
    d_in, d_out, ranks = 19, 23, (5, 3)
    x = torch.randn(*lead, d_in, generator=generator).to(dtype).requires_grad_(True)
    result = torch.randn(*lead, d_out, generator=generator).to(dtype)
    A = [torch.randn(r, d_in, generator=generator).requires_grad_(True) for r in ranks]
    B = [torch.randn(d_out, r, generator=generator).requires_grad_(True) for r in ranks]
    bias = [torch.randn(d_out, generator=generator).requires_grad_(True), None]
    scaling = [0.7, 1.5]
    mask = {
        "random": torch.rand(lead, generator=generator) > 0.4,
        "none": torch.zeros(lead, dtype=torch.bool),
        "all": torch.ones(lead, dtype=torch.bool),
    }[mask_kind]
    out = ops.lora_add_masked(result, x, A, B, bias, scaling, [0.0, 0.0], False, mask)
    assert out.dtype == dtype and out.shape == result.shape
    assert ops.last_backend("lora_add_masked") == "torch"
    expected = _masked_add_by_gathering(result, x, A, B, bias, scaling, mask)
    assert_close(out.double(), expected, kind="kernel", dtype=dtype)
    assert torch.equal(out[~mask], result[~mask]), "a masked-out token keeps the base output exactly"
    if mask_kind == "all":
        assert torch.equal(out, ops.lora_add(result, x, A, B, bias, scaling, [0.0, 0.0], False))
    if out.numel() == 0:
        return
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    out.backward(grad)
    params = [x, *A, *B, bias[0]]
    leaves = [x.detach().double().requires_grad_(True)] + [p.detach().double().requires_grad_(True) for p in params[1:]]
    reference = _masked_add_by_gathering(result, leaves[0], leaves[1:3], leaves[3:5], [leaves[5], None], scaling, mask)
    reference.backward(grad.double())
    for param, leaf in zip(params, leaves):
        assert_close(param.grad.double(), leaf.grad, kind="kernel", dtype=dtype)
    assert not x.grad[~mask].any(), "no gradient reaches a masked-out token through the adapter"


def test_invocation_offsets_match_peft():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (24, 11), generator=generator)
    config = {"default": peft.LoraConfig(alora_invocation_tokens=[2, 3, 2], task_type="CAUSAL_LM")}
    expected = [0 if offset is None else offset for offset in calculate_alora_offsets(config, "default", ids)]
    assert invocation_offsets(ids, [2, 3, 2]).tolist() == expected
    assert 0 < sum(offset > 0 for offset in expected) < len(expected), "some rows with, some without the invocation"
    assert invocation_offsets(ids[:, :2], [2, 3, 2]).tolist() == [0] * 24, "rows shorter than the invocation"
    assert invocation_offsets(IDS, INVOCATION).tolist() == [7, 4, 2, 0]


def test_offsets_build_one_mask_per_call_and_row_length():
    offsets = AloraOffsets.of([2, None, 9, -1])
    mask = offsets.token_mask(5, torch.device("cpu"))
    assert mask.tolist() == [[False, False, False, True, True], [False] * 5, [True] * 5, [False] * 5]
    assert offsets.token_mask(5, torch.device("cpu")) is mask
    assert offsets.token_mask(1, torch.device("cpu")).tolist() == [[True], [False], [True], [False]]
    with pytest.raises(TypeError, match="one int \\(or None\\) per row"):
        AloraOffsets.of([1.5, 2])


def test_masked_layer_traces_without_graph_breaks():
    """No host sync, no data-dependent shape: the aLoRA layer compiles into one graph."""
    model = peftfast.get_peft_model(
        nn.Sequential(nn.Linear(16, 16)), peftfast.LoraConfig(target_modules=["0"], alora_invocation_tokens=[3])
    )
    layer = model.base_model.model[0]
    x = torch.randn(3, 6, 16)
    offsets = AloraOffsets.of([2, 0, 5])
    compiled = torch.compile(lambda x, offsets: layer(x, alora_offsets=offsets), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, offsets), layer(x, alora_offsets=offsets), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("direction", ["p2f", "f2p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_matches_peft_and_the_base_before_the_invocation(tmp_path, dtype, direction):
    models = _loaded_pair(tmp_path, "peft" if direction == "p2f" else "peftfast", dtype=dtype)
    logits = {name: model(input_ids=IDS).logits for name, model in models.items()}
    with torch.no_grad():
        base = tiny_llama().to(dtype)(input_ids=IDS).logits
    offsets = invocation_offsets(IDS, INVOCATION)
    changed = (logits["peftfast"] - base).abs().amax(dim=-1) > 0
    assert changed.tolist() == AloraOffsets(offsets).token_mask(IDS.shape[1], IDS.device).tolist()
    assert_close(logits["peftfast"], logits["peft"], dtype=dtype)
    assert ops.last_backend("lora_add_masked") == "torch"


def test_bf16_within_twice_peft_error(tmp_path):
    models = _loaded_pair(tmp_path / "bf16", dtype=torch.bfloat16)
    reference = peftfast.PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "bf16").eval()
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
        errors = {name: (model(input_ids=IDS).logits.double() - expected).abs().max() for name, model in models.items()}
    assert errors["peftfast"] <= 2 * errors["peft"] + 1e-2


def test_gradients_match_peft(tmp_path):
    _peft_model("peft").save_pretrained(tmp_path)
    labels = torch.randint(0, 101, IDS.shape, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
        model(input_ids=IDS, labels=labels).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads["peftfast"]) == sorted(grads["peft"]) and len(grads["peft"]) == 12
    for name, grad in grads["peft"].items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grads["peftfast"][name], grad, **KERNEL[torch.float32])


def test_both_libraries_write_the_same_files(tmp_path):
    for name in LIBS:
        _peft_model(name).save_pretrained(tmp_path / name)
    configs = {name: peftfast.LoraConfig.from_pretrained(tmp_path / name) for name in LIBS}
    assert configs["peftfast"].alora_invocation_tokens == configs["peft"].alora_invocation_tokens == INVOCATION
    ours, theirs = (peft.utils.load_peft_weights(tmp_path / name) for name in ("peftfast", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_generate_matches_peft(tmp_path):
    models = _loaded_pair(tmp_path)
    outputs = {name: model.generate(input_ids=IDS, **GENERATE) for name, model in models.items()}
    assert torch.equal(outputs["peftfast"], outputs["peft"])
    with models["peftfast"].disable_adapter():
        assert not torch.equal(models["peftfast"].generate(input_ids=IDS, **GENERATE), outputs["peftfast"])
    sampled = models["peftfast"].generate(input_ids=IDS, do_sample=True, num_return_sequences=2, max_new_tokens=2)
    assert sampled.shape == (2 * IDS.shape[0], IDS.shape[1] + 2)


def test_generate_reuses_a_base_model_prefix_cache_across_adapters():
    """aLoRA's point: the KV cache of everything before the invocation, computed once by the base model, serves every
    aLoRA adapter; generating from it gives the same tokens as generating from scratch."""
    model = _peft_model("peftfast")
    torch.manual_seed(2)
    model.add_adapter("second", _config("peftfast", invocation=OTHER_INVOCATION))
    prefix = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
    prompts = {
        "default": torch.cat([prefix, torch.tensor([INVOCATION, INVOCATION]), torch.tensor([[16], [26]])], dim=1),
        "second": torch.cat(
            [prefix, torch.tensor([OTHER_INVOCATION, OTHER_INVOCATION]), torch.tensor([[16], [26]])], 1
        ),
    }
    keyword = cache_argument(model.get_base_model())
    with torch.no_grad():
        prefix_cache = get_cache(model.get_base_model()(input_ids=prefix, use_cache=True))
    with model.disable_adapter():
        plain = model.generate(input_ids=prompts["default"], **GENERATE)
    for adapter, ids in prompts.items():
        model.set_adapter(adapter)
        expected = model.generate(input_ids=ids, **GENERATE)
        reused = model.generate(input_ids=ids, **{keyword: copy.deepcopy(prefix_cache)}, **GENERATE)
        assert torch.equal(reused, expected)
        if adapter == "default":
            assert not torch.equal(expected, plain), "the adapter must change the generated tokens"
        with torch.no_grad():
            own = get_cache(model(input_ids=ids, use_cache=True))
        for layer in range(len(prefix_cache.layers)):
            own_keys, base_keys = own.layers[layer].keys, prefix_cache.layers[layer].keys
            assert torch.equal(own_keys[:, :, : prefix.shape[1]], base_keys)


def test_mixed_batch_matches_peft_and_single_adapter_rows(tmp_path):
    models = {}
    for name, lib in LIBS.items():
        model = _peft_model(name)
        torch.manual_seed(3)
        model.add_adapter("plain", lib.LoraConfig(target_modules=["q_proj", "k_proj"], init_lora_weights=False))
        torch.manual_seed(4)
        model.add_adapter("other", _config(name, invocation=OTHER_INVOCATION, target_modules=["v_proj"]))
        models[name] = model.eval()
    names = ["default", "plain", "other", "__base__"]
    ids = IDS.clone()
    ids[2, 3] = OTHER_INVOCATION[0]
    logits = {name: model(input_ids=ids, adapter_names=names).logits for name, model in models.items()}
    assert_close(logits["peftfast"], logits["peft"])
    ours = models["peftfast"]
    for row, adapter in enumerate(names[:3]):
        ours.set_adapter(adapter)
        assert_close(logits["peftfast"][row], ours(input_ids=ids[row : row + 1]).logits[0])
    generated = {name: model.generate(input_ids=ids, adapter_names=names, **GENERATE) for name, model in models.items()}
    assert torch.equal(generated["peftfast"], generated["peft"])


def test_explicit_offsets_and_other_task_types(tmp_path):
    """A plain PeftModel (no CAUSAL_LM task) finds no offsets, as in HF PEFT: the adapter is off unless the call
    passes alora_offsets itself."""
    models = {}
    for name, lib in LIBS.items():
        base = tiny_llama()
        torch.manual_seed(1)
        models[name] = lib.get_peft_model(base, _config(name, task_type=None)).eval()
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=IDS).logits
    assert_close(models["peftfast"](input_ids=IDS).logits, base_logits)
    offsets = [3, None, 9, 1]
    given = {name: model(input_ids=IDS, alora_offsets=offsets).logits for name, model in models.items()}
    assert_close(given["peftfast"], given["peft"])
    assert not torch.allclose(given["peftfast"], base_logits, atol=1e-4)


def test_4bit_base_matches_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    dims = dict(hidden_size=64, intermediate_size=128)
    quantized = lambda: quantize_to_4bit(tiny_llama(**dims), compute_dtype=torch.float32)  # noqa: E731
    torch.manual_seed(1)
    peft.get_peft_model(quantized(), _config("peft")).save_pretrained(tmp_path)
    logits = {}
    for name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(quantized(), tmp_path).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=IDS).logits
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    assert_close(logits["peftfast"], logits["peft"])
    with torch.no_grad():
        assert_close(logits["peftfast"][3], quantized()(input_ids=IDS[3:]).logits[0])


def test_gradient_checkpointing_recomputes_with_the_call_offsets(tmp_path):
    _peft_model("peftfast").save_pretrained(tmp_path)
    grads = {}
    for checkpointing in (False, True):
        model = peftfast.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).train()
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, **EXACT[torch.float32])
    blocks = [module for module in model.modules() if hasattr(module, "_alora_recompute_hooks")]
    assert blocks and not any(block._alora_recompute_hooks for block in blocks), "hooks are gone after backward"
    model(input_ids=IDS, labels=IDS)
    with pytest.raises(ValueError, match="followed by its backward before the next forward"):
        model(input_ids=IDS, labels=IDS)


# ------------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("target", ["emb", "attn"])
def test_unsupported_layers_are_refused_like_peft_and_the_model_is_unchanged(target):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = EmbeddingModel().emb
            self.lin = nn.Linear(13, 13)
            self.attn = nn.MultiheadAttention(13, 1)

    for name, lib in LIBS.items():
        model = Model()
        config = lib.LoraConfig(target_modules=["lin", target], alora_invocation_tokens=INVOCATION)
        with pytest.raises(
            ValueError, match=r"Invalid or unsupported variant combination: \('alora_invocation_tokens',\)"
        ):
            lib.get_peft_model(model, config)
        if name == "peftfast":
            assert type(model.lin) is nn.Linear and type(model.emb) is nn.Embedding
            assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_variant_combinations_are_refused():
    config = _config("peftfast")
    # DoRA is another engineer's variant: set it past the config's own check to reach the combination rule.
    config.use_dora = True
    with pytest.raises(ValueError, match=r"\('alora_invocation_tokens', 'use_dora'\)"):
        peftfast.get_peft_model(tiny_llama(), config)


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe-merge"])
def test_merging_is_refused_like_peft_and_nothing_is_merged(tmp_path, safe_merge):
    messages = {}
    for name, lib in LIBS.items():
        model = _peft_model(name)
        model.add_adapter("plain", lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(NotImplementedError) as error:
            model.merge_adapter(["plain", "default"], safe_merge=safe_merge)
        messages[name] = str(error.value)
        if name == "peftfast":
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing was merged"
            assert not any(getattr(m, "merged", False) for m in model.modules())
            with pytest.raises(NotImplementedError, match="does not support merging"):
                model.merge_and_unload()
            layer = model.base_model.model.model.layers[0].self_attn.q_proj
            with pytest.raises(NotImplementedError, match="does not support merging"):
                layer.merge(adapter_names=["default"])
            assert type(model.unload().model.layers[0].self_attn.q_proj) is nn.Linear
    expected = "aLoRA does not support safe merging" if safe_merge else "aLoRA does not support merging"
    assert all(message.startswith(expected) for message in messages.values())


def test_call_errors_and_warnings_like_peft():
    for name in LIBS:
        model = _peft_model(name)
        with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
            model.generate(input_ids=IDS, num_beams=2, max_new_tokens=2)
        embeds = model.get_base_model().get_input_embeddings()(IDS)
        with pytest.warns(UserWarning, match="inputs_embeds"):
            logits = model(inputs_embeds=embeds).logits
        if name == "peftfast":
            with torch.no_grad():
                assert_close(logits, tiny_llama()(input_ids=IDS).logits)
    with pytest.warns(UserWarning, match="only supported for CAUSAL_LM"):
        peftfast.LoraConfig(alora_invocation_tokens=INVOCATION)
    with pytest.raises(TypeError, match="list of token ids"):
        peftfast.LoraConfig(alora_invocation_tokens="<invoke>", task_type="CAUSAL_LM")
    model = _peft_model("peftfast")
    with pytest.raises(ValueError, match="aLoRA offsets for 2 rows but the layer's input has 4 rows"):
        model(input_ids=IDS, alora_offsets=[1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peftfast.LoraConfig(alora_invocation_tokens=[], target_modules=["q_proj"]).alora_invocation_tokens == []


def test_weighted_adapter_of_an_alora_adapter_is_an_alora_adapter_like_peft(tmp_path):
    logits = {}
    for name in LIBS:
        model = _peft_model(name)
        model.add_weighted_adapter(["default"], [0.5], "halved", combination_type="linear")
        model.set_adapter("halved")
        assert model.peft_config["halved"].alora_invocation_tokens == INVOCATION
        logits[name] = model(input_ids=IDS).logits
    assert_close(logits["peftfast"], logits["peft"])
    with torch.no_grad():
        assert_close(logits["peftfast"][3], tiny_llama()(input_ids=IDS).logits[3])
