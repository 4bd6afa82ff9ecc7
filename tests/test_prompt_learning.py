"""Prompt tuning, prefix tuning and P-tuning behave as in HF PEFT: the same outputs and generations from the same
weights, training moves only the prompt, and adapter folders move between the two libraries both ways."""

from __future__ import annotations

import json
from typing import Any

import peft
import pytest
import torch
from models import tiny_llama, tiny_llama_classifier, tiny_llama_other_cache_spelling
from safetensors.torch import load_file
from tolerances import assert_close

import peftfast
from peftfast.utils.cache import cache_argument

LIBS = {"peft": peft, "peftfast": peftfast}
DIRECTIONS = {"p2f": ("peft", "peftfast"), "f2p": ("peftfast", "peft")}

# (config class name, kwargs) per method variant; sizes are tiny so that every test runs in about a second.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "prompt_tuning": ("PromptTuningConfig", {}),
    "prompt_tuning_vocab": ("PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "prefix_tuning": ("PrefixTuningConfig", {}),
    "prefix_tuning_projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
    "p_tuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "p_tuning_lstm": ("PromptEncoderConfig", {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"}),
}
# The variants whose folders differ in kind; the other variants save the same way as one of these.
ROUND_TRIP_METHODS = ["prompt_tuning", "prefix_tuning", "prefix_tuning_projection", "p_tuning_lstm"]
NUM_VIRTUAL_TOKENS = 4


def _config(lib: str, method: str, task_type: str = "CAUSAL_LM", **overrides: Any):
    class_name, kwargs = METHODS[method]
    kwargs = {"task_type": task_type, "num_virtual_tokens": NUM_VIRTUAL_TOKENS, **kwargs, **overrides}
    return getattr(LIBS[lib], class_name)(**kwargs)


def _inputs(batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(1, 101, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding on one row: the prompt's mask must line up with it
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pair(method: str, make_base=tiny_llama, task_type: str = "CAUSAL_LM"):
    """The same adapter in HF PEFT and in peftfast: peftfast's model takes PEFT's prompt weights."""
    torch.manual_seed(7)
    peft_model = peft.get_peft_model(make_base(), _config("peft", method, task_type)).eval()
    torch.manual_seed(7)
    fast_model = peftfast.get_peft_model(make_base(), _config("peftfast", method, task_type)).eval()
    fast_model.load_state_dict(peft_model.state_dict())
    return peft_model, fast_model


def _generate(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("method", METHODS)
def test_causal_lm_forward_and_generate_match_peft(method):
    peft_model, fast_model = _pair(method)
    inputs = _inputs()
    with torch.no_grad():
        expected = peft_model(**inputs, labels=inputs["input_ids"])
        actual = fast_model(**inputs, labels=inputs["input_ids"])
        base = tiny_llama()(**inputs).logits
    assert_close(actual.logits, expected.logits)
    assert_close(actual.loss, expected.loss)
    # Logits of the input positions only: a prompt that changed nothing would make the comparisons above moot.
    assert not torch.allclose(actual.logits[:, -base.shape[1] :], base, atol=1e-3)
    assert torch.equal(_generate(fast_model, inputs), _generate(peft_model, inputs))


@pytest.mark.parametrize("method", ["prefix_tuning", "prefix_tuning_projection", "prompt_tuning", "p_tuning_mlp"])
def test_both_cache_spellings_forward_train_and_generate_alike(method):
    """transformers 5.24 renamed the decoders' cache argument `past_key_values` to `cache`. A model taking the other
    spelling than the installed transformers' must give the same logits, training steps and generations as the real
    Llama with the same weights (whose prompt-learning outputs match HF PEFT's above)."""
    other_base, spelling = tiny_llama_other_cache_spelling()
    assert cache_argument(other_base) == spelling != cache_argument(tiny_llama())
    torch.manual_seed(7)
    model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", method))
    other = peftfast.get_peft_model(other_base, _config("peftfast", method))
    other.load_state_dict(model.state_dict())
    inputs = _inputs()
    with torch.no_grad():
        assert_close(other(**inputs).logits, model(**inputs).logits)
    assert torch.equal(_generate(other, inputs), _generate(model, inputs))
    losses = {}
    for name, peft_model in (("real", model), ("other", other)):
        peft_model.train()
        optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
        losses[name] = []
        for _ in range(3):
            loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["real"][-1] < losses["real"][0]
    assert_close(torch.tensor(losses["other"]), torch.tensor(losses["real"]))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning_mlp"])
def test_seq_cls_forward_matches_peft_and_trains_the_head(method):
    peft_model, fast_model = _pair(method, tiny_llama_classifier, "SEQ_CLS")
    inputs = {**_inputs(), "labels": torch.tensor([0, 2])}
    with torch.no_grad():
        expected, actual = peft_model(**inputs), fast_model(**inputs)
    assert_close(actual.logits, expected.logits)
    assert_close(actual.loss, expected.loss)
    trainable = sorted(name for name, param in fast_model.named_parameters() if param.requires_grad)
    assert trainable == sorted(name for name, param in peft_model.named_parameters() if param.requires_grad)
    assert "base_model.score.modules_to_save.default.weight" in trainable


# Prompt tuning's random rows are far larger than this model's word embeddings: it needs bigger steps to move.
LEARNING_RATES = {"prompt_tuning": 0.3, "prefix_tuning": 3e-2, "p_tuning_lstm": 3e-2}


@pytest.mark.parametrize("method", LEARNING_RATES)
def test_training_moves_only_the_prompt_and_lowers_the_loss(method):
    torch.manual_seed(0)
    model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", method))
    frozen = {name: param.detach().clone() for name, param in model.get_base_model().named_parameters()}
    trainable = [param for param in model.parameters() if param.requires_grad]
    assert trainable and all(
        name.startswith("prompt_encoder.default.") for name, p in model.named_parameters() if p.requires_grad
    )
    optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATES[method])
    inputs = _inputs()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, param in model.get_base_model().named_parameters():
        assert torch.equal(param, frozen[name]), name


def _save(lib: str, method: str, path, make_base=tiny_llama, task_type: str = "CAUSAL_LM") -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = LIBS[lib].get_peft_model(make_base(), _config(lib, method, task_type)).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("method", ROUND_TRIP_METHODS)
def test_causal_lm_folders_move_between_libraries(tmp_path, method, direction):
    writer, reader = DIRECTIONS[direction]
    saved = _save(writer, method, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    width = 2 * 2 * 16 if METHODS[method][0] == "PrefixTuningConfig" else 32  # layers x k/v x kv width; hidden
    assert {key: tuple(value.shape) for key, value in weights.items()} == {
        "prompt_embeddings": (NUM_VIRTUAL_TOKENS, width)
    }
    loaded = LIBS[reader].PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    inputs = _inputs()
    with torch.no_grad():
        assert_close(loaded(**inputs).logits, saved(**inputs).logits)
    assert torch.equal(_generate(loaded, inputs), _generate(saved, inputs))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_seq_cls_folders_move_between_libraries(tmp_path, method, direction):
    writer, reader = DIRECTIONS[direction]
    saved = _save(writer, method, tmp_path, tiny_llama_classifier, "SEQ_CLS")
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(weights) == ["base_model.score.weight", "prompt_embeddings"]
    loaded = LIBS[reader].PeftModel.from_pretrained(tiny_llama_classifier(), tmp_path).eval()
    inputs = _inputs()
    with torch.no_grad():
        assert_close(loaded(**inputs).logits, saved(**inputs).logits)


def test_saved_config_matches_peft(tmp_path):
    for lib in LIBS:
        _save(lib, "prefix_tuning_projection", tmp_path / lib)
    configs = {lib: json.loads((tmp_path / lib / "adapter_config.json").read_text()) for lib in LIBS}
    for config in configs.values():
        config.pop("peft_version")
    assert configs["peftfast"] == configs["peft"]
    # Prefix tuning on a grouped-query model: the prefix has the key/value heads' width (2 heads x 8).
    assert (configs["peftfast"]["token_dim"], configs["peftfast"]["num_attention_heads"]) == (16, 2)


@pytest.fixture
def tokenizer_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "classify", "the", "sentiment", "of", "this", "review"]
    tokenizer = Tokenizer(models.WordLevel({word: 10 + i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


@pytest.mark.parametrize(
    "text, token_ids", [("classify the sentiment", [11, 12, 13, 11, 12]), ("of this review", [14, 15, 16, 14, 15])]
)
def test_text_initialisation_takes_the_models_own_embeddings(tokenizer_path, text, token_ids):
    models = {}
    for lib in LIBS:
        config = _config(
            lib,
            "prompt_tuning",
            num_virtual_tokens=5,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=tokenizer_path,
        )
        models[lib] = LIBS[lib].get_peft_model(tiny_llama(), config)
    prompt = models["peftfast"].get_prompt_embedding_to_save("default")
    # The text's tokens, repeated up to the number of virtual tokens.
    word_embeddings = tiny_llama().get_input_embeddings().weight.detach()
    assert torch.equal(prompt, word_embeddings[token_ids])
    assert torch.equal(prompt, models["peft"].get_prompt_embedding_to_save("default"))


def test_get_prompt_shapes():
    prompt_model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", "p_tuning_mlp"))
    assert prompt_model.get_prompt(batch_size=3).shape == (3, NUM_VIRTUAL_TOKENS, 32)
    prefix_model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", "prefix_tuning"))
    cache = prefix_model.get_prompt(batch_size=3)
    assert cache.get_seq_length() == NUM_VIRTUAL_TOKENS and len(cache.layers) == 2
    assert cache.layers[0].keys.shape == (3, 2, NUM_VIRTUAL_TOKENS, 8)  # batch, kv heads, virtual tokens, head dim


def _seq2seq_model():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=101,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning_mlp"])
def test_seq2seq_forward_and_generate_match_peft(method):
    peft_model, fast_model = _pair(method, _seq2seq_model, "SEQ_2_SEQ_LM")
    inputs = _inputs()
    labels = torch.randint(2, 101, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, actual = peft_model(**inputs, labels=labels), fast_model(**inputs, labels=labels)
    assert_close(actual.logits, expected.logits)
    assert_close(actual.loss, expected.loss)
    assert torch.equal(_generate(fast_model, inputs), _generate(peft_model, inputs))


def test_adapters_switch_delete_and_disable():
    torch.manual_seed(0)
    model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", "prompt_tuning")).eval()
    model.add_adapter("other", _config("peftfast", "prompt_tuning"))
    inputs = _inputs()
    with torch.no_grad():
        default = model(**inputs).logits
        model.set_adapter("other")
        other = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        assert model(**inputs).logits.shape == other.shape
        base = tiny_llama()(**inputs).logits
    assert not torch.allclose(default, other)
    assert_close(disabled, base)
    assert model.active_adapters == ["other"]
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    with torch.no_grad():
        assert_close(model(**inputs).logits, default)


def test_prompt_learning_and_lora_do_not_mix(tmp_path):
    model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", "prompt_tuning"))
    with pytest.raises(ValueError, match="LORA adapter to a model with PROMPT_TUNING adapters"):
        model.add_adapter("lora", peftfast.LoraConfig(target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]
    with_lora = peftfast.inject_adapter_in_model(peftfast.LoraConfig(target_modules=["q_proj"]), tiny_llama())
    with pytest.raises(ValueError, match=r"already holds adapter layers.*q_proj"):
        peftfast.get_peft_model(with_lora, _config("peftfast", "prompt_tuning"))
    with pytest.raises(ValueError, match="prompt-learning method, which has none"):
        peftfast.inject_adapter_in_model(_config("peftfast", "prompt_tuning"), tiny_llama())


def test_loading_a_prompt_as_trainable_is_refused(tmp_path):
    _save("peftfast", "p_tuning_mlp", tmp_path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="P_TUNING adapter can't be loaded as trainable"):
        peftfast.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    model = peftfast.PeftModel.from_pretrained(base, tmp_path)
    assert not any(param.requires_grad for param in model.parameters())
    with pytest.raises(ValueError, match="can't be loaded as trainable"):
        model.load_adapter(tmp_path, adapter_name="again", is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="again")
    assert sorted(model.peft_config) == ["again", "default"]


def test_wrong_prompt_shape_is_refused(tmp_path):
    _save("peftfast", "prompt_tuning", tmp_path)
    config = peftfast.PeftConfig.from_pretrained(tmp_path)
    config.num_virtual_tokens = 3
    with pytest.raises(ValueError, match=r"prompt_embeddings have shape \(4, 32\).*expects \(3, 32\)"):
        peftfast.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)


def test_missing_num_virtual_tokens_is_refused():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        peftfast.PromptTuningConfig(task_type="CAUSAL_LM")


def test_status_functions_explain_that_prompts_have_no_layers():
    model = peftfast.get_peft_model(tiny_llama(), _config("peftfast", "prompt_tuning"))
    for status in (model.get_layer_status, model.get_model_status):
        with pytest.raises(TypeError, match="PROMPT_TUNING adapters have none"):
            status()
