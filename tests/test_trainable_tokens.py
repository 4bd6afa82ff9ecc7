"""Trainable tokens (LoRA's `trainable_token_indices` and the `TrainableTokensConfig` method) and `ensure_weight_tying`,
against HF PEFT: same outputs, same gradients, same files both directions, tied and untied embeddings."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
import torch.nn.functional as F
from models import MLP, EmbeddingModel, tiny_llama
from safetensors.torch import load_file
from tolerances import assert_close

import peftfast
from peftfast import ops
from peftfast.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper

LIBS = {"peft": peft, "peftfast": peftfast}
TOKENS = [3, 5, 7, 96]


def _ids(batch: int = 3, length: int = 9, vocab: int = 101) -> torch.Tensor:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))
    ids[0, :4] = torch.tensor(TOKENS)  # every trained row is looked up
    return ids


def _config(lib, kind: str, **extra):
    """A fresh config (HF PEFT changes list fields in place, so configs are never shared between libraries)."""
    if kind == "standalone":
        return lib.TrainableTokensConfig(token_indices=list(TOKENS), init_weights=False, **extra)
    indices = {"embed_tokens": list(TOKENS)} if kind == "lora_dict" else list(TOKENS)
    return lib.LoraConfig(
        target_modules=["q_proj", "v_proj"], trainable_token_indices=indices, init_lora_weights=False, **extra
    )


def _model(lib_name: str, kind: str, tied: bool, dtype=torch.float32, seed: int = 1, **extra):
    """The same base model and adapter initialisation in either library (both draw the same random numbers)."""
    torch.manual_seed(0)
    base = tiny_llama(tie_word_embeddings=tied).to(dtype)
    torch.manual_seed(seed)
    lib = LIBS[lib_name]
    model = lib.get_peft_model(base, _config(lib, kind, **extra))
    if kind != "standalone" and seed != 1:
        # init_weights=True is the LoRA path's only choice (rows start as the base rows): make them differ.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _config_json(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        config = json.load(handle)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


KINDS = ["lora_list", "lora_dict", "standalone"]


# The ops, against HF PEFT's formulation (the whole table with the rows written in, looked up / multiplied).


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 5, 11])
def test_embedding_with_replaced_rows_matches_the_merged_table(dtype, padding_idx):
    vocab, dim = 37, 13
    weight = torch.randn(vocab, dim, dtype=dtype)
    indices = torch.tensor([5, 0, 36, 17, 2])
    slots = torch.full((vocab,), -1, dtype=torch.long)
    slots[indices] = torch.arange(len(indices))
    rows = torch.randn(len(indices), dim, requires_grad=True)
    ids = torch.randint(0, vocab, (4, 9))
    ids[:, 0] = indices[:4]
    ids[1, 1] = 5

    result = ops.embedding_with_replaced_rows(ids, weight, indices, slots, rows, padding_idx=padding_idx)
    expected_rows = rows.detach().clone().requires_grad_(True)
    expected = F.embedding(ids, weight.index_copy(0, indices, expected_rows.to(dtype)), padding_idx)
    assert result.dtype == dtype
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    grad = torch.randn_like(result)
    result.backward(grad)
    expected.backward(grad)
    assert_close(rows.grad, expected_rows.grad, dtype=dtype)
    if padding_idx == 5:
        assert rows.grad[0].abs().sum() == 0  # a padding lookup trains nothing, as in F.embedding

    empty = ops.embedding_with_replaced_rows(ids[:0], weight, indices, slots, rows)
    assert empty.shape == (0, 9, dim)


def test_embedding_with_replaced_rows_whole_table_options():
    weight = torch.randn(23, 7)
    indices = torch.tensor([4, 9])
    slots = torch.full((23,), -1, dtype=torch.long)
    slots[indices] = torch.arange(2)
    rows = torch.randn(2, 7) * 5
    ids = torch.tensor([[4, 9, 4, 1, 2]])
    for options in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}):
        trained = rows.clone().requires_grad_(True)
        reference = rows.clone().requires_grad_(True)
        result = ops.embedding_with_replaced_rows(ids, weight.clone(), indices, slots, trained, **options)
        expected = F.embedding(ids, weight.clone().index_copy(0, indices, reference), **options)
        torch.testing.assert_close(result, expected)
        result.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(trained.grad, reference.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_with_replaced_rows_matches_the_merged_weight(dtype):
    vocab, dim = 41, 19
    weight = torch.randn(vocab, dim, dtype=dtype)
    indices = torch.tensor([40, 3, 8])
    rows = torch.randn(3, dim, requires_grad=True)
    x = torch.randn(2, 5, dim, dtype=dtype, requires_grad=True)
    result = ops.linear_with_replaced_rows(x, weight, indices, rows)

    x_ref, rows_ref = x.detach().clone().requires_grad_(True), rows.detach().clone().requires_grad_(True)
    expected = F.linear(x_ref, weight.index_copy(0, indices, rows_ref.to(dtype)))
    assert_close(result, expected, dtype=dtype)
    grad = torch.randn_like(result)
    result.backward(grad)
    expected.backward(grad)
    assert_close(x.grad, x_ref.grad, dtype=dtype)
    assert_close(rows.grad, rows_ref.grad, dtype=dtype)
    assert ops.linear_with_replaced_rows(x[:0], weight, indices, rows).shape == (0, 5, vocab)


# Whole models against HF PEFT.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_training_step_match_peft(kind, tied, dtype):
    ids = _ids()
    models = {name: _model(name, kind, tied, dtype) for name in LIBS}
    structure = {
        name: (type(model.get_input_embeddings()).__name__, type(model.get_output_embeddings()).__name__)
        for name, model in models.items()
    }
    assert structure["peftfast"] == structure["peft"]
    trainable = {
        name: sorted((n, p.dtype) for n, p in model.named_parameters() if p.requires_grad)
        for name, model in models.items()
    }
    assert trainable["peftfast"] == trainable["peft"]  # names and dtypes (fp32 rows on a bf16 base, as autocast does)
    assert any("trainable_tokens_delta" in name for name, _ in trainable["peft"])
    for model in models.values():
        model.print_trainable_parameters()

    grads, moved = {}, {}
    for name, model in models.items():
        model.train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        moved[name] = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
        model.eval()
        grads[name]["logits"] = output.logits.detach()
    assert moved["peftfast"] == moved["peft"]
    assert sorted(grads["peftfast"]) == sorted(grads["peft"])
    for key, expected in grads["peft"].items():
        assert_close(grads["peftfast"][key].float(), expected.float(), kind="kernel", dtype=dtype)
    # After the step the replaced logits come from their own small product: in bf16 that can round differently.
    assert_close(
        _logits(models["peftfast"], ids).float(), _logits(models["peft"], ids).float(), kind="kernel", dtype=dtype
    )

    # Only the chosen rows of the embedding train: every other row is the base model's.
    embeddings = models["peftfast"].get_input_embeddings()
    layer = embeddings.token_adapter if isinstance(embeddings, TrainableTokensWrapper) else embeddings
    merged = layer.get_merged_weights(["default"]).detach()
    base = tiny_llama(tie_word_embeddings=tied).to(dtype).get_input_embeddings().weight
    changed = (merged != base).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) <= set(TOKENS) and changed


@pytest.mark.parametrize("direction", ["p2f", "f2p"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_files_are_the_same_and_load_both_ways(tmp_path, kind, tied, direction):
    ids = _ids()
    source_name, target_name = ("peft", "peftfast") if direction == "p2f" else ("peftfast", "peft")
    source = _model(source_name, kind, tied, seed=3).eval()
    expected = _logits(source, ids)
    assert not torch.allclose(expected, _logits(tiny_llama(tie_word_embeddings=tied), ids), atol=1e-3)
    source.save_pretrained(tmp_path / "source")
    _model(target_name, kind, tied, seed=3).save_pretrained(tmp_path / "other")

    files = {folder: load_file(tmp_path / folder / "adapter_model.safetensors") for folder in ("source", "other")}
    assert {k: v.shape for k, v in files["source"].items()} == {k: v.shape for k, v in files["other"].items()}
    for key, value in files["source"].items():
        torch.testing.assert_close(files["other"][key], value, rtol=0, atol=0)
    assert _config_json(tmp_path / "source") == _config_json(tmp_path / "other")
    token_keys = sorted(key for key in files["source"] if "trainable_tokens" in key)
    prefix = "base_model.model.model.embed_tokens."
    expected_keys = [
        prefix + ("trainable_tokens_delta" if kind == "standalone" else "token_adapter.trainable_tokens_delta")
    ]
    if kind == "standalone" and tied:
        expected_keys.insert(0, "base_model.model.lm_head.trainable_tokens_delta")  # HF PEFT saves the tie twice
    assert token_keys == expected_keys

    loaded = LIBS[target_name].PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path / "source")
    assert_close(_logits(loaded, ids), expected)
    assert not any(param.requires_grad for param in loaded.parameters())
    trainable = LIBS[target_name].PeftModel.from_pretrained(
        tiny_llama(tie_word_embeddings=tied), tmp_path / "source", is_trainable=True
    )
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "trainable_tokens_delta" in n)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", ["lora_list", "standalone"])
def test_merge_unmerge_and_unload_match_peft(kind, tied):
    ids = _ids()
    models = {name: _model(name, kind, tied, seed=2).eval() for name in LIBS}
    expected = _logits(models["peft"], ids)
    fast = models["peftfast"]
    assert_close(_logits(fast, ids), expected)
    fast.merge_adapter()
    assert_close(_logits(fast, ids), expected)
    fast.unmerge_adapter()
    base = tiny_llama(tie_word_embeddings=tied)
    torch.testing.assert_close(_base_weight(fast), base.get_input_embeddings().weight)
    with fast.disable_adapter():
        assert_close(_logits(fast, ids), _logits(base, ids))

    merged = {name: model.merge_and_unload() for name, model in models.items()}
    assert type(merged["peftfast"].get_input_embeddings()) is torch.nn.Embedding
    assert type(merged["peftfast"].get_output_embeddings()) is torch.nn.Linear
    assert (merged["peftfast"].lm_head.weight is merged["peftfast"].model.embed_tokens.weight) == tied
    for (name, param), (_, expected_param) in zip(
        merged["peftfast"].state_dict().items(), merged["peft"].state_dict().items(), strict=True
    ):
        torch.testing.assert_close(param, expected_param, msg=name)
    assert_close(_logits(merged["peftfast"], ids), expected)


def _base_weight(model) -> torch.Tensor:
    embeddings = model.get_input_embeddings()
    layer = embeddings.token_adapter if isinstance(embeddings, TrainableTokensWrapper) else embeddings
    return layer.get_base_layer().weight.detach()


@pytest.mark.parametrize("kind", ["lora_list", "standalone"])
def test_several_adapters_switch_mix_and_delete(kind):
    ids = _ids(batch=4)
    # HF PEFT's tied standalone model can't take a second adapter (it nests a second layer in the output layer, which
    # then fails): compared untied, and peftfast's tied one checked on its own below.
    tied = kind != "standalone"
    other_tokens = [11, 12, 13]
    models = {}
    for name, lib in LIBS.items():
        model = _model(name, kind, tied, seed=2)
        torch.manual_seed(5)
        if kind == "standalone":
            model.add_adapter("other", lib.TrainableTokensConfig(token_indices=other_tokens, init_weights=False))
        else:
            model.add_adapter(
                "other",
                lib.LoraConfig(
                    target_modules=["q_proj"], trainable_token_indices=other_tokens, init_lora_weights=False
                ),
            )
            model.add_adapter("plain", lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
        models[name] = model.eval()
    ids[1, :3] = torch.tensor(other_tokens)
    fast = models["peftfast"]
    for adapter in ["default", "other"]:
        for model in models.values():
            model.set_adapter(adapter)
        assert_close(_logits(fast, ids), _logits(models["peft"], ids))
    if kind == "standalone":
        # Tied: the output layer follows the input embeddings' adapters, so its logits use the active adapter's rows
        # (merging writes those rows into the one shared weight: the logits must not change).
        tied_model = _model("peftfast", kind, True, seed=2).eval()
        torch.manual_seed(5)
        tied_model.add_adapter("other", peftfast.TrainableTokensConfig(token_indices=other_tokens, init_weights=False))
        tied_model.set_adapter("other")
        assert tied_model.get_output_embeddings().active_adapters == ["other"]
        expected = _logits(tied_model, ids)
        tied_model.merge_adapter()
        assert_close(_logits(tied_model, ids), expected, kind="kernel")
        tied_model.unmerge_adapter()

    # Mixed batches: each row as if its adapter alone were active.
    names = ["default", "other", "__base__", "plain" if kind != "standalone" else "default"]
    mixed = fast(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with fast.disable_adapter():
                expected = _logits(fast, ids[row : row + 1])
        else:
            fast.set_adapter(name)
            expected = _logits(fast, ids[row : row + 1])
        assert_close(mixed[row : row + 1], expected, kind="kernel")

    if kind == "standalone":
        # Two adapters with disjoint tokens can be active together; overlapping ones can't.
        fast.base_model.set_adapter(["default", "other"])
        both = _logits(fast, ids)
        assert not torch.allclose(both, mixed)
        torch.manual_seed(0)
        fast.add_adapter("clash", peftfast.TrainableTokensConfig(token_indices=[5, 40], init_weights=False))
        fast.base_model.set_adapter(["default", "clash"])
        with pytest.raises(ValueError, match="overlap"):
            fast(input_ids=ids)
        fast.delete_adapter("clash")

    fast.set_adapter("default")
    fast.delete_adapter("other")
    for module in fast.modules():
        for attr in ("trainable_tokens_delta", "token_indices", "trainable_tokens_original"):
            assert "other" not in getattr(module, attr, {})
    models["peft"].set_adapter("default")
    assert_close(_logits(fast, ids), _logits(models["peft"], ids))


def test_layer_and_model_status_match_peft():
    models = {name: _model(name, "lora_list", True) for name in LIBS}
    statuses = {name: model.get_layer_status() for name, model in models.items()}
    assert [s.name for s in statuses["peftfast"]] == [s.name for s in statuses["peft"]]
    for fast, reference in zip(statuses["peftfast"], statuses["peft"], strict=True):
        assert fast.module_type == reference.module_type
        assert fast.active_adapters == reference.active_adapters
        assert fast.requires_grad == reference.requires_grad
        assert fast.available_adapters == reference.available_adapters
        assert fast.devices == reference.devices
    fast_status, peft_status = (model.get_model_status() for model in models.values())
    assert (fast_status.trainable_params, fast_status.total_params) == (
        peft_status.trainable_params,
        peft_status.total_params,
    )
    assert fast_status.num_adapter_layers == peft_status.num_adapter_layers


def test_wrappers_at_peft_paths_and_embedding_weight():
    assert issubclass(ModulesToSaveWrapper, AuxiliaryTrainingWrapper)
    assert issubclass(TrainableTokensWrapper, AuxiliaryTrainingWrapper)
    from peftfast.utils.other import AuxiliaryTrainingWrapper as other_path

    assert other_path is AuxiliaryTrainingWrapper
    model = _model("peftfast", "lora_list", False, seed=2)
    reference = _model("peft", "lora_list", False, seed=2)
    # Reading the embeddings' weight through the wrapper gives the trained rows, as in HF PEFT.
    torch.testing.assert_close(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    # Other attributes come from the original module when no adapter of the wrapper runs (HF PEFT's rule).
    for lib_model in (model, reference):
        with lib_model.disable_adapter():
            assert lib_model.get_input_embeddings().num_embeddings == 101


def test_standalone_method_on_a_custom_model_and_default_target():
    ids = torch.randint(0, 37, (3, 5))
    ids[0, 0] = 4
    models = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        base = EmbeddingModel()
        torch.manual_seed(1)
        models[name] = lib.get_peft_model(
            base, lib.TrainableTokensConfig(token_indices=[4, 0], target_modules=["emb"], init_weights=False)
        )
        assert models[name].peft_config["default"].peft_type == "TRAINABLE_TOKENS"
    with torch.no_grad():
        assert_close(models["peftfast"](ids), models["peft"](ids))
    with pytest.raises(ValueError, match="not found"):
        # No get_input_embeddings and no "embed_tokens": the default target matches nothing (HF PEFT raises too).
        peftfast.get_peft_model(EmbeddingModel(), peftfast.TrainableTokensConfig(token_indices=[1]))
    with pytest.raises(TypeError, match="nn.Embedding"):
        peftfast.get_peft_model(MLP(), peftfast.TrainableTokensConfig(token_indices=[1], target_modules=["relu"]))


@pytest.mark.parametrize(
    "config, error, match, peft_refuses_at_creation",
    [
        (dict(trainable_token_indices={"nope": [1]}), ValueError, "matches no module", True),
        (
            dict(modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]}),
            ValueError,
            "both in modules_to_save",
            True,
        ),
        (
            dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]),
            TypeError,
            "adapted already",
            True,
        ),
        (dict(trainable_token_indices=[1, 101]), ValueError, "out of range", True),
        # HF PEFT builds these and fails at the first forward (index_copy_ with a float index tensor).
        (dict(trainable_token_indices=[]), ValueError, "non-empty list", False),
        (dict(trainable_token_indices=[1.5]), ValueError, "integers", False),
        (
            dict(ensure_weight_tying=True, trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 3]}),
            ValueError,
            "Cannot ensure weight tying",
            True,
        ),
    ],
)
def test_bad_trainable_token_indices_raise_and_leave_the_model_unchanged(
    config, error, match, peft_refuses_at_creation
):
    base = tiny_llama(tie_word_embeddings=True)
    before = {name: type(module) for name, module in base.named_modules()}
    with pytest.raises(error, match=match):
        peftfast.get_peft_model(base, peftfast.LoraConfig(**{"target_modules": ["q_proj"], **config}))
    assert {name: type(module) for name, module in base.named_modules()} == before
    if peft_refuses_at_creation:
        with pytest.raises((ValueError, TypeError, IndexError)):
            peft_config = peft.LoraConfig(**{"target_modules": ["q_proj"], **config})
            peft.get_peft_model(tiny_llama(tie_word_embeddings=True), peft_config)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tied_layers_listed_with_their_own_indices_match_peft(tmp_path, tied):
    """A dict naming the input embeddings and the output layer: with different indices each trains its own rows (a
    tied model included); with ensure_weight_tying and the same indices they are tied."""
    ids = _ids()
    cases = {
        "apart": dict(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [5, 7]}),
        "tied": dict(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 5]}, ensure_weight_tying=True),
    }
    for case_name, extra in cases.items():
        models = {}
        for name, lib in LIBS.items():
            torch.manual_seed(0)
            base = tiny_llama(tie_word_embeddings=tied)
            config = lib.LoraConfig(target_modules=["q_proj"], init_lora_weights=False, **json.loads(json.dumps(extra)))
            models[name] = lib.get_peft_model(base, config).eval()
            with torch.no_grad():
                for param_name, param in models[name].named_parameters():
                    if "trainable_tokens_delta" in param_name:
                        param.normal_(generator=torch.Generator().manual_seed(len(param_name)))
        head = models["peftfast"].get_output_embeddings()
        assert isinstance(head, TrainableTokensWrapper)
        assert (head.token_adapter.tied_adapter is not None) == (tied and case_name == "tied")
        assert_close(_logits(models["peftfast"], ids), _logits(models["peft"], ids), kind="kernel")
        for name, model in models.items():
            model.save_pretrained(tmp_path / case_name / name)
        files = {name: load_file(tmp_path / case_name / name / "adapter_model.safetensors") for name in LIBS}
        assert files["peftfast"].keys() == files["peft"].keys()
        loaded = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path / case_name / "peftfast")
        assert_close(_logits(loaded, ids), _logits(models["peftfast"], ids), kind="kernel")


def test_ensure_weight_tying_on_an_untied_model_warns_like_peft():
    for lib in LIBS.values():
        with pytest.warns(UserWarning, match="tied"):
            lib.get_peft_model(
                tiny_llama(),
                lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2], ensure_weight_tying=True),
            )


# ensure_weight_tying with modules_to_save and target_modules (the output layer follows the input embeddings).

TYING_CASES = {
    "save-embed": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    "save-head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
    "lora-embed": dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
    "lora-head-regex": dict(target_modules=r".*q_proj|.*lm_head", ensure_weight_tying=True),
}


def _tying_model(lib_name: str, case: str, seed: int = 1):
    torch.manual_seed(0)
    base = tiny_llama(tie_word_embeddings=True)
    torch.manual_seed(seed)
    lib = LIBS[lib_name]
    model = lib.get_peft_model(
        base, lib.LoraConfig(init_lora_weights=False, **json.loads(json.dumps(TYING_CASES[case])))
    )
    return model.eval()


@pytest.mark.parametrize("case", TYING_CASES)
def test_ensure_weight_tying_matches_peft_and_keeps_the_tie_while_training(tmp_path, case):
    ids = _ids()
    models = {name: _tying_model(name, case) for name in LIBS}
    fast = models["peftfast"]
    embeddings, head = fast.get_input_embeddings(), fast.get_output_embeddings()
    if case.startswith("save"):
        assert isinstance(head, ModulesToSaveWrapper)
        assert head.modules_to_save["default"].weight is embeddings.modules_to_save["default"].weight
    else:
        assert head.lora_A["default"].weight.data_ptr() == embeddings.lora_embedding_B["default"].data_ptr()
        assert head.lora_B["default"].weight.data_ptr() == embeddings.lora_embedding_A["default"].data_ptr()
    for field in ("target_modules", "modules_to_save"):
        fast_value, peft_value = (getattr(model.peft_config["default"], field) for model in models.values())
        assert (sorted(fast_value) if isinstance(fast_value, (set, list)) else fast_value) == (
            sorted(peft_value) if isinstance(peft_value, (set, list)) else peft_value
        )
    assert_close(_logits(fast, ids), _logits(models["peft"], ids))

    for name, model in models.items():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        model.eval()
        model.save_pretrained(tmp_path / name)
    assert_close(_logits(fast, ids), _logits(models["peft"], ids), kind="kernel")
    # Still tied after a step: the output layer computes with the input embeddings' trained weights.
    if case.startswith("save"):
        assert head.modules_to_save["default"].weight is embeddings.modules_to_save["default"].weight
    else:
        torch.testing.assert_close(head.lora_A["default"].weight, embeddings.lora_embedding_B["default"].T)

    files = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in LIBS}
    assert sorted(files["peftfast"]) == sorted(files["peft"])
    assert _config_json(tmp_path / "peftfast") == _config_json(tmp_path / "peft")
    for source, target in (("peft", "peftfast"), ("peftfast", "peft")):
        loaded = LIBS[target].PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / source)
        assert_close(_logits(loaded, ids), _logits(models[source], ids), kind="kernel")


def test_adapters_with_and_without_tokens_save_and_load(tmp_path):
    """Saving a LoRA adapter without trainable tokens next to one with them (HF PEFT raises a KeyError there), then
    loading both, with low_cpu_mem_usage too."""
    ids = _ids()
    model = _model("peftfast", "lora_list", True, seed=2)
    torch.manual_seed(3)
    model.add_adapter("plain", peftfast.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    expected = {}
    for adapter in ("default", "plain"):
        model.set_adapter(adapter)
        expected[adapter] = _logits(model, ids)
    model.save_pretrained(tmp_path)
    assert not any("trainable_tokens" in key for key in load_file(tmp_path / "plain" / "adapter_model.safetensors"))

    for low_cpu_mem_usage in (False, True):
        loaded = peftfast.PeftModel.from_pretrained(
            tiny_llama(tie_word_embeddings=True), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
        )
        loaded.load_adapter(tmp_path / "plain", "plain", low_cpu_mem_usage=low_cpu_mem_usage)
        for adapter in ("default", "plain"):
            loaded.set_adapter(adapter)
            assert_close(_logits(loaded, ids), expected[adapter])
    reference = peft.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
    assert_close(_logits(reference, ids), expected["default"])


def test_lora_on_a_tied_output_layer_nests_the_tied_rows_like_peft(tmp_path):
    """LoRA on lm_head of a tied model plus trainable tokens on the embeddings: HF PEFT puts the tied rows under the
    LoRA layer (lm_head.base_layer); same structure, outputs and files. Merging it is refused (HF PEFT loses the
    delta), unloading gives back the plain layers."""
    ids = _ids()
    models = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        base = tiny_llama(tie_word_embeddings=True)
        torch.manual_seed(1)
        config = lib.LoraConfig(
            target_modules=["q_proj", "lm_head"],
            trainable_token_indices={"embed_tokens": [3, 5]},
            init_lora_weights=False,
        )
        models[name] = lib.get_peft_model(base, config).eval()
        with torch.no_grad():
            models[name].get_input_embeddings().token_adapter.trainable_tokens_delta["default"].normal_(
                generator=torch.Generator().manual_seed(0)
            )
        models[name].save_pretrained(tmp_path / name)
    fast = models["peftfast"]
    assert isinstance(fast.base_model.model.lm_head.base_layer, TrainableTokensWrapper)
    assert [s.name for s in fast.get_layer_status()] == [s.name for s in models["peft"].get_layer_status()]
    assert_close(_logits(fast, ids), _logits(models["peft"], ids), kind="kernel")
    files = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in LIBS}
    assert sorted(files["peftfast"]) == sorted(files["peft"])
    loaded = peftfast.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "peft")
    assert_close(_logits(loaded, ids), _logits(models["peft"], ids), kind="kernel")
    with pytest.raises(ValueError, match="Can't merge"):
        fast.merge_and_unload()
    unloaded = fast.unload()
    assert type(unloaded.lm_head) is torch.nn.Linear and type(unloaded.model.embed_tokens) is torch.nn.Embedding


@pytest.mark.parametrize("kind", ["lora_list", "standalone"])
def test_scaled_embeddings_match_peft(kind):
    """Gemma's embeddings scale their output (`embed_scale`); the trained rows are scaled the same (tied model)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ids = _ids(vocab=97)
    config = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
    )
    grads, logits = {}, {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        base = Gemma3ForCausalLM(config)
        assert base.get_input_embeddings().embed_scale.item() != 1.0
        model = lib.get_peft_model(base, _config(lib, kind))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "trainable_tokens_delta" in param_name:
                    param.normal_(generator=torch.Generator().manual_seed(0))
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        logits[name] = output.logits.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    assert_close(logits["peftfast"], logits["peft"], kind="kernel")
    assert grads["peftfast"].keys() == grads["peft"].keys() and grads["peft"]
    for key, expected in grads["peft"].items():
        assert_close(grads["peftfast"][key], expected, kind="kernel")
