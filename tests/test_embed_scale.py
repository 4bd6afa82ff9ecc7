"""Scaled word embeddings (transformers' Gemma, Gemma2, Gemma3: the embedding's forward multiplies by `embed_scale`)
under LoRA and DoRA, against HF PEFT 0.21.2, which scales the adapter's term by the same factor: outputs and
gradients (fp32, bf16), mixed batches, merge/unmerge; and every peftfast path that reads the scale agrees."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast.tuners.lora import Embedding as LoraEmbedding
from peftfast.utils import PeftWarning

LIBS = {"peft": peft, "peftfast": peftfast}
VOCAB = 97
FAMILIES = ("gemma", "gemma2", "gemma3")


def _gemma(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    import transformers

    config_cls, model_cls = {
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    options = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        # Untied: merging into a tied embedding would change the output layer too, in both libraries alike.
        tie_word_embeddings=False,
    )
    if family != "gemma":
        options["sliding_window"] = 16
    torch.manual_seed(0)
    model = model_cls(config_cls(**options)).to(dtype).eval()
    assert model.get_input_embeddings().embed_scale.item() == pytest.approx(32**0.5, rel=1e-2)
    return model


def _ids(batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def _adapted(lib_name: str, family: str, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """LoRA (or DoRA) on the scaled embeddings and one projection, random A and B, DoRA magnitudes moved off their
    initial norms; the same seeds draw the same weights in both libraries."""
    lib = LIBS[lib_name]
    base = _gemma(family, dtype)
    torch.manual_seed(1)
    options = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False) | config
    model = lib.get_peft_model(base, lib.LoraConfig(**options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model.eval()


def _logits_and_grads(model: nn.Module, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **kwargs).logits
    logits.float().square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None and "embed_tokens" in name}
    return logits.detach(), grads


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_match_peft(family, use_dora):
    results = {}
    for lib_name in LIBS:
        model = _adapted(lib_name, family, use_dora=use_dora)
        results[lib_name] = _logits_and_grads(model, _ids())
    (fast_logits, fast_grads), (peft_logits, peft_grads) = results["peftfast"], results["peft"]
    assert_close(fast_logits, peft_logits, kind="kernel")
    expected_names = {"lora_embedding_A", "lora_embedding_B"} | ({"lora_magnitude_vector"} if use_dora else set())
    assert {part for name in peft_grads for part in name.split(".") if part.startswith("lora_")} == expected_names
    assert fast_grads.keys() == peft_grads.keys()
    for name, grad in peft_grads.items():
        assert_close(fast_grads[name], grad, kind="kernel")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_matches_peft(use_dora):
    """A bf16 Gemma3 (its embed_scale buffer bf16 too) with fp32 adapters: the same math as HF PEFT, rounded to bf16
    at the same places."""
    results = {
        lib_name: _logits_and_grads(_adapted(lib_name, "gemma3", torch.bfloat16, use_dora=use_dora), _ids())
        for lib_name in LIBS
    }
    (fast_logits, fast_grads), (peft_logits, peft_grads) = results["peftfast"], results["peft"]
    assert fast_logits.dtype == peft_logits.dtype == torch.bfloat16
    assert_close(fast_logits, peft_logits, kind="kernel")
    assert fast_grads.keys() == peft_grads.keys() and peft_grads
    for name, grad in peft_grads.items():
        assert grad.dtype == torch.float32
        assert_close(fast_grads[name], grad, kind="kernel", dtype=torch.bfloat16)


def test_layer_term_is_scaled_by_embed_scale():
    """The LoRA term of the layer itself (not only a model's output): y = scale * E[ids] + scale * s * A^T[ids] B^T."""
    model = _adapted("peftfast", "gemma")
    layer = model.get_input_embeddings()
    assert isinstance(layer, LoraEmbedding)
    ids = _ids()
    scale = layer.get_base_layer().embed_scale
    with torch.no_grad():
        lora_term = layer.lora_embedding_A["default"].T[ids] @ layer.lora_embedding_B["default"].T
        expected = scale * layer.get_base_layer().weight[ids] + scale * layer.scaling["default"] * lora_term
        torch.testing.assert_close(layer(ids), expected)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unmerge_keep_the_outputs(use_dora):
    """Merged, the scale applies to W + delta through the base forward: the same outputs as unmerged (and HF PEFT's
    merged weights)."""
    models = {lib_name: _adapted(lib_name, "gemma2", use_dora=use_dora) for lib_name in LIBS}
    ids = _ids()
    with torch.no_grad():
        unmerged = models["peftfast"](input_ids=ids).logits
        assert_close(unmerged, models["peft"](input_ids=ids).logits, kind="kernel")
        for model in models.values():
            model.merge_adapter()
        fast_weight = models["peftfast"].get_input_embeddings().get_base_layer().weight
        assert_close(fast_weight, models["peft"].get_input_embeddings().get_base_layer().weight, kind="kernel")
        assert_close(models["peftfast"](input_ids=ids).logits, unmerged, kind="kernel")
        models["peftfast"].unmerge_adapter()
        assert_close(models["peftfast"](input_ids=ids).logits, unmerged, kind="kernel")


def test_mixed_batch_matches_peft():
    """Plain LoRA adapters and "__base__" rows in one batch: HF PEFT's mixed-batch forward scales each row's term."""
    models = {}
    for lib_name, lib in LIBS.items():
        model = _adapted(lib_name, "gemma3")
        torch.manual_seed(5)
        model.add_adapter("other", lib.LoraConfig(r=3, target_modules=["embed_tokens"], init_lora_weights=False))
        models[lib_name] = model.eval()
    models["peftfast"].load_state_dict(models["peft"].state_dict())
    ids = _ids(batch=4)
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        outputs = {name: model(input_ids=ids, adapter_names=names).logits for name, model in models.items()}
        with models["peft"].disable_adapter():
            base = models["peft"](input_ids=ids).logits
    assert not torch.allclose(outputs["peft"][0], base[0], atol=1e-3)
    assert_close(outputs["peftfast"], outputs["peft"], kind="kernel")


def test_mixed_batch_with_dora_rows_is_what_peft_computes_per_row():
    """Beyond HF PEFT (which refuses DoRA in mixed batches): each DoRA row as HF PEFT computes it with that adapter
    active, embed_scale included."""
    fast, reference = _adapted("peftfast", "gemma", use_dora=True), _adapted("peft", "gemma", use_dora=True)
    ids = _ids(batch=3)
    names = ["default", "__base__", "default"]
    with torch.no_grad():
        got = fast(input_ids=ids, adapter_names=names).logits
        expected = reference(input_ids=ids).logits
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits
    assert_close(got[[0, 2]], expected[[0, 2]], kind="kernel")
    assert_close(got[1], base[1], kind="kernel")


class _OddScaleEmbedding(nn.Embedding):
    """An embedding whose forward scales by an `embed_scale` given as a Python float, or a non-scalar tensor that
    HF PEFT ignores (with a warning)."""

    def __init__(self, embed_scale) -> None:
        super().__init__(11, 6)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.embed_scale if isinstance(self.embed_scale, float) else self.embed_scale[0]
        return super().forward(ids) * scale


class _Net(nn.Module):
    def __init__(self, embed_scale) -> None:
        super().__init__()
        self.emb = _OddScaleEmbedding(embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def _method_config(lib, method: str):
    if method == "lora":
        return lib.LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False)
    return lib.TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 4], init_weights=False)


@pytest.mark.parametrize("method", ["lora", "trainable_tokens"])
@pytest.mark.parametrize("embed_scale", [2.5, torch.tensor([3.0, 4.0])], ids=["python-float", "non-scalar"])
def test_scale_lookup_is_peft_rule_for_every_method(embed_scale, method):
    """HF PEFT's `_get_embed_scale`, for LoRA's embeddings and trainable tokens alike: a Python number is applied as
    a tensor; a tensor of more than one element is not applied, with a PeftWarning naming its shape."""
    ids = torch.tensor([[1, 4, 9], [0, 3, 10]])
    outputs = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(0)
        base = _Net(embed_scale)
        torch.manual_seed(1)
        model = lib.get_peft_model(base, _method_config(lib, method))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.normal_(generator=torch.Generator().manual_seed(2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                outputs[lib_name] = model(ids)
        warning_cls = PeftWarning if lib is peftfast else peft.utils.PeftWarning
        scale_warnings = [w for w in caught if issubclass(w.category, warning_cls) and "embed_scale" in str(w.message)]
        if isinstance(embed_scale, torch.Tensor):
            assert scale_warnings
            assert lib is peft or "(2,)" in str(scale_warnings[0].message)
        else:
            assert not scale_warnings
    assert_close(outputs["peftfast"], outputs["peft"])
