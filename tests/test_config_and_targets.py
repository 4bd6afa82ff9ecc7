"""LoraConfig round trips, target matching with HF PEFT's rules, scaling and the weight initialisations."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import MLP, EmbeddingModel
from peft.tuners.tuners_utils import check_target_module_exists as peft_check_target_module_exists
from torch import nn

from peftfast import LoraConfig, PeftConfig, get_peft_model
from peftfast.tuners.tuners_utils import check_target_module_exists

FULL_CONFIG = dict(
    task_type="CAUSAL_LM",
    r=4,
    lora_alpha=12,
    lora_dropout=0.1,
    target_modules=["q_proj", "v_proj", "down_proj"],
    exclude_modules=["model.layers.0.self_attn.v_proj"],
    bias="lora_only",
    use_rslora=True,
    modules_to_save=["lm_head"],
    init_lora_weights="gaussian",
    layers_to_transform=[0, 1],
    layers_pattern="layers",
    rank_pattern={"q_proj": 2},
    alpha_pattern={r"model\.layers\.1\..*": 3},
)


def test_to_dict_round_trip():
    config = LoraConfig(**FULL_CONFIG)
    as_dict = config.to_dict()
    assert as_dict["peft_type"] == "LORA"
    assert LoraConfig(**as_dict) == config


@pytest.mark.parametrize("writer", ["peftfast", "peft"])
def test_save_and_load_round_trip(tmp_path, writer):
    config_cls = LoraConfig if writer == "peftfast" else peft.LoraConfig
    config_cls(**FULL_CONFIG).save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    expected = LoraConfig(**FULL_CONFIG)
    expected.peft_version = loaded.peft_version
    assert loaded == expected
    generic = PeftConfig.from_pretrained(tmp_path)
    assert type(generic) is LoraConfig and generic == loaded
    reference = peft.LoraConfig.from_pretrained(tmp_path)
    for name, value in loaded.to_dict().items():
        if hasattr(reference, name) and name != "peft_type":
            assert getattr(reference, name) == value, name


def test_config_in_a_subfolder(tmp_path):
    LoraConfig(target_modules=["lin0"], r=3).save_pretrained(tmp_path / "other")
    loaded = PeftConfig.from_pretrained(tmp_path, subfolder="other")
    assert isinstance(loaded, LoraConfig) and loaded.r == 3


KEYS = [
    "lm_head",
    "q_proj",
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.12.mlp.down_proj",
    "model.layers.2.block_sparse_moe.experts.1.w1",
    "transformer.h.0.attn.c_attn",
    "transformer.h.3.attn.c_attn",
    "encoder.blocks.1.attn.q_proj",
    "decoder.layers.1.cross_attn.q_proj",
    "layers.1.q_proj",
    "my_q_proj",
]
LEAVES = ["q_proj", "v_proj", "down_proj", "c_attn", "w1", "lm_head", "attn.c_attn", "self_attn.q_proj"]
REGEXES = [r".*q_proj", r".*\.(q|v)_proj", r"model\.layers\.[01]\..*", r"q_proj", r".*layers\.1\..*", r".*attn.*"]


def _config_kwargs():
    targets = st.one_of(
        st.lists(st.sampled_from(LEAVES), min_size=1, max_size=3, unique=True),
        st.lists(st.sampled_from(LEAVES + KEYS), min_size=1, max_size=4, unique=True),
        st.sampled_from(REGEXES),
    )
    layers = st.one_of(st.none(), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3, unique=True))
    layers_pattern = st.one_of(
        st.none(), st.sampled_from(["layers", "h", "blocks", "experts"]), st.just(["layers", "h"])
    )
    exclude = st.one_of(
        st.none(),
        st.lists(st.sampled_from(LEAVES + KEYS), min_size=1, max_size=2, unique=True),
        st.sampled_from([r".*v_proj", r"model\.layers\.0\..*"]),
    )
    modules_to_save = st.one_of(st.none(), st.just(["lm_head"]), st.just(["attn"]))
    return st.fixed_dictionaries(
        dict(
            target_modules=targets,
            layers_to_transform=layers,
            layers_pattern=layers_pattern,
            exclude_modules=exclude,
            modules_to_save=modules_to_save,
        )
    )


def _build_both(kwargs):
    """(peftfast config, peft config), or None when both libraries refuse the combination."""
    built = []
    for config_cls in (LoraConfig, peft.LoraConfig):
        try:
            built.append(config_cls(**kwargs))
        except ValueError:
            built.append(None)
    assert (built[0] is None) == (built[1] is None), f"only one library accepts {kwargs}"
    return None if built[0] is None else built


def _outcome(result) -> str:
    if type(result).__name__ == "_ExcludedModule":
        return "excluded"
    return "target" if result else "no"


def _assert_same_matching(kwargs) -> None:
    configs = _build_both(kwargs)
    if configs is None:
        return
    fast, reference = configs
    for key in KEYS:
        expected = _outcome(peft_check_target_module_exists(reference, key))
        assert _outcome(check_target_module_exists(fast, key)) == expected, (key, kwargs)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_config_kwargs())
def test_target_matching_like_peft(kwargs):
    _assert_same_matching(kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=["q_proj"]),
        dict(target_modules=["self_attn.q_proj", "lm_head"]),
        dict(target_modules=r".*\.(q|v)_proj"),
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 12]),
        dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1, 3], layers_pattern="h"),
        dict(target_modules=["w1"], layers_to_transform=2),
        dict(target_modules=["w1"], layers_to_transform=[1], layers_pattern=["layers", "experts"]),
        dict(target_modules=["q_proj"], layers_to_transform=[]),
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*"),
        dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
    ],
    ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items())[:60],
)
def test_target_matching_examples(kwargs):
    _assert_same_matching(kwargs)


def test_target_matching_examples_mean_something():
    config = LoraConfig(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")
    matched = [key for key in KEYS if check_target_module_exists(config, key)]
    # A name listed in full ("q_proj") is a target whatever its layer; the others only in layer 1.
    assert matched == [
        "q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "decoder.layers.1.cross_attn.q_proj",
        "layers.1.q_proj",
    ]


def _layers(model) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(module, "scaling")}


@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
def test_scaling(use_rslora):
    config = dict(
        target_modules=["lin0", "lin1", "lin2"],
        r=4,
        lora_alpha=6,
        use_rslora=use_rslora,
        rank_pattern={"lin1": 9},
        alpha_pattern={"lin2": 5},
    )
    torch.manual_seed(0)
    layers = _layers(get_peft_model(MLP(), LoraConfig(**config)))
    reference = _layers(peft.get_peft_model(MLP(), peft.LoraConfig(**config)))
    root = math.sqrt if use_rslora else (lambda r: r)
    expected = {"lin0": 6 / root(4), "lin1": 6 / root(9), "lin2": 5 / root(4)}
    for name, value in expected.items():
        layer = layers[f"base_model.model.{name}"]
        assert layer.scaling["default"] == pytest.approx(value)
        assert layer.scaling == reference[f"base_model.model.{name}"].scaling
    assert layers["base_model.model.lin1"].r["default"] == 9


def _x() -> torch.Tensor:
    return torch.randn(6, 11, generator=torch.Generator().manual_seed(0))


def _with_and_without_adapter(model, x):
    with torch.no_grad():
        output = model(x)
        with model.disable_adapter():
            return output, model(x)


def test_default_init_leaves_output_unchanged():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"]))
    output, base_output = _with_and_without_adapter(model, _x())
    assert torch.equal(output, base_output)
    layer = model.get_base_model().lin0
    assert not layer.lora_B["default"].weight.any() and layer.lora_A["default"].weight.any()


def test_no_init_changes_output():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    output, base_output = _with_and_without_adapter(model, _x())
    assert not torch.allclose(output, base_output, atol=1e-4)
    assert model.get_base_model().lin0.lora_B["default"].weight.any()


def test_gaussian_init():
    r = 4
    model = get_peft_model(
        nn.Sequential(nn.Linear(1024, 8)), LoraConfig(target_modules=["0"], r=r, init_lora_weights="gaussian")
    )
    layer = model.get_base_model()[0]
    weight_A = layer.lora_A["default"].weight
    assert weight_A.std().item() == pytest.approx(1 / r, rel=0.05)
    assert weight_A.mean().abs().item() < 0.02
    assert not layer.lora_B["default"].weight.any()


def test_embedding_default_init():
    model = get_peft_model(EmbeddingModel(), LoraConfig(target_modules=["emb"]))
    layer = model.get_base_model().emb
    assert not layer.lora_embedding_A["default"].any()
    assert layer.lora_embedding_B["default"].any()
    ids = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(0))
    output, base_output = _with_and_without_adapter(model, ids)
    assert torch.equal(output, base_output)


def test_embedding_no_init_changes_output():
    model = get_peft_model(EmbeddingModel(), LoraConfig(target_modules=["emb"], init_lora_weights=False))
    ids = torch.randint(1, 37, (3, 5), generator=torch.Generator().manual_seed(0))
    output, base_output = _with_and_without_adapter(model, ids)
    assert not torch.allclose(output, base_output, atol=1e-4)
