"""Bad input gives a clear error that names what is wrong, and leaves the model as it was."""

from __future__ import annotations

import json
import pickle

import peft
import pytest
import torch
from models import MLP, tiny_llama
from safetensors.torch import load_file, save_file
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast import LoraConfig, PeftConfig, PeftModel, get_peft_model, load_peft_weights
from peftfast.tuners.tuners_utils import BaseTunerLayer
from peftfast.utils.other import ModulesToSaveWrapper


def _mlp(d_hidden: int = 23) -> MLP:
    torch.manual_seed(0)
    return MLP(d_hidden=d_hidden).eval()


def _x() -> torch.Tensor:
    return torch.randn(4, 11, generator=torch.Generator().manual_seed(0))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Same parameter names (so no adapter layer or wrapper is left in it) and the same values."""
    state = model.state_dict()
    assert sorted(state) == sorted(snapshot)
    for name, value in snapshot.items():
        assert torch.equal(state[name], value), name


def _assert_plain(model: nn.Module) -> None:
    """No adapter layer, modules_to_save wrapper or adapter config is left on a model whose wrapping failed."""
    assert not [name for name, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    assert not hasattr(model, "peft_config")


def _save_adapter(folder, model: nn.Module | None = None, **config) -> None:
    """Save a random adapter; modules_to_save copies are changed first, so that loading them changes the model."""
    torch.manual_seed(1)
    config = {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, **config}
    peft_model = get_peft_model(model if model is not None else _mlp(), LoraConfig(**config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(1.0)
    peft_model.save_pretrained(folder)


def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_target_modules_matching_nothing():
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj.*not found.*lin0"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    _assert_unchanged(model, snapshot)


def test_target_modules_matching_nothing_on_add_adapter():
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj.*not found"):
        model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]
    _assert_unchanged(model, snapshot)


def test_folder_without_config(tmp_path):
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)


def test_folder_without_weights(tmp_path):
    _save_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)
    _assert_plain(model)


def test_weights_file_missing_a_tensor(tmp_path):
    _save_adapter(tmp_path, modules_to_save=["lin2"])
    weights = load_file(tmp_path / "adapter_model.safetensors")
    missing = "base_model.model.lin1.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != missing}, tmp_path / "adapter_model.safetensors")
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"lin1\.lora_B"):
        PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)
    _assert_plain(model)


def test_mismatched_shapes_on_from_pretrained(tmp_path):
    _save_adapter(tmp_path, model=_mlp(d_hidden=23))
    model = _mlp(d_hidden=17)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"lin0\.lora_B.*\(23, 8\).*\(17, 8\)"):
        PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)
    _assert_plain(model)
    # The model is usable afterwards: a matching adapter loads onto it.
    _save_adapter(tmp_path / "good", model=_mlp(d_hidden=17))
    reference = peft.PeftModel.from_pretrained(_mlp(d_hidden=17), tmp_path / "good")
    assert_close(PeftModel.from_pretrained(model, tmp_path / "good")(_x()), reference(_x()))


def test_mismatched_shapes_on_load_adapter(tmp_path):
    # "other" targets lin0, which has a LoRA layer already, and lin1, which gets a new one.
    _save_adapter(tmp_path / "wrong", model=_mlp(d_hidden=23))
    _save_adapter(tmp_path / "own", model=_mlp(d_hidden=17), target_modules=["lin0"], modules_to_save=["lin2"])
    model = PeftModel.from_pretrained(_mlp(d_hidden=17), tmp_path / "own", is_trainable=True).eval()
    before = model(_x())
    snapshot = _snapshot(model)
    targeted = list(model.targeted_module_names)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable
    with pytest.raises(ValueError, match=r"lin0\.lora_B.*\(23, 8\).*\(17, 8\)"):
        model.load_adapter(tmp_path / "wrong", adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert model.active_adapter == "default"
    assert model.targeted_module_names == targeted
    assert [name for name, param in model.named_parameters() if param.requires_grad] == trainable
    _assert_unchanged(model, snapshot)
    assert torch.equal(model(_x()), before)


@pytest.mark.parametrize("peft_type", ["IA3", "PROMPT_TUNING"])
def test_config_of_another_method(tmp_path, peft_type):
    if peft_type == "IA3":
        config = peft.IA3Config(target_modules=["lin0"], feedforward_modules=["lin0"])
        peft.get_peft_model(_mlp(), config).save_pretrained(tmp_path)
    else:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == peft_type
    model = _mlp()
    snapshot = _snapshot(model)
    # IA3 is unknown to peftfast; prompt tuning is known, but is not LoRA and can't join LoRA adapters.
    loads = [LoraConfig.from_pretrained]
    if peft_type == "IA3":
        loads += [PeftConfig.from_pretrained, lambda path: PeftModel.from_pretrained(model, path)]
    for load in loads:
        with pytest.raises(ValueError, match=peft_type):
            load(tmp_path)
    _assert_unchanged(model, snapshot)
    _save_adapter(tmp_path / "lora")
    lora_model = PeftModel.from_pretrained(_mlp(), tmp_path / "lora")
    with pytest.raises(ValueError, match=peft_type):
        lora_model.load_adapter(tmp_path, adapter_name="other")
    assert list(lora_model.peft_config) == ["default"]


@pytest.mark.parametrize("method", ["set_adapter", "delete_adapter"])
def test_unknown_adapter_name(method):
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"nope.*default"):
        getattr(model, method)("nope")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]


def test_unsupported_lora_variant(tmp_path):
    with pytest.raises(NotImplementedError, match="use_dora"):
        LoraConfig(target_modules=["lin0"], use_dora=True)
    peft.get_peft_model(_mlp(), peft.LoraConfig(target_modules=["lin0"], use_dora=True)).save_pretrained(tmp_path)
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(NotImplementedError, match="use_dora"):
        PeftModel.from_pretrained(model, tmp_path)
    _assert_unchanged(model, snapshot)


class _WithUnsupportedLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rnn = nn.LSTM(4, 4)


@pytest.mark.parametrize(("target", "type_name"), [("norm", "LayerNorm"), ("rnn", "LSTM")])
def test_unsupported_target_type(target, type_name):
    model = _WithUnsupportedLayers()
    snapshot = _snapshot(model)
    # "lin" comes first and is replaced before the unsupported layer fails: it must be put back.
    with pytest.raises(ValueError, match=rf"'{target}'.*{type_name}"):
        get_peft_model(model, LoraConfig(target_modules=["lin", target]))
    _assert_unchanged(model, snapshot)
    _assert_plain(model)


def test_unsupported_target_type_on_add_adapter():
    model = get_peft_model(_WithUnsupportedLayers(), LoraConfig(target_modules=["lin"], init_lora_weights=False))
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"'norm'.*LayerNorm"):
        model.add_adapter("other", LoraConfig(target_modules=["lin", "norm"]))
    assert list(model.peft_config) == ["default"]
    _assert_unchanged(model, snapshot)


UNPICKLED = []


def _record_unpickling() -> dict:
    UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return _record_unpickling, ()


def test_pickles_are_never_loaded(tmp_path):
    _save_adapter(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    with open(tmp_path / "adapter_model.bin", "wb") as handle:
        pickle.dump({**weights, "payload": _Payload()}, handle)
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_peft_weights(tmp_path)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not UNPICKLED
    _assert_unchanged(model, snapshot)


def test_plain_tensor_bin_still_loads(tmp_path):
    _save_adapter(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "adapter_model.bin")
    loaded = load_peft_weights(tmp_path)
    assert sorted(loaded) == sorted(weights)


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_invalid_rank(r):
    with pytest.raises(ValueError, match=r"\br\b.*positive integer"):
        LoraConfig(target_modules=["lin0"], r=r)


def test_invalid_rank_pattern():
    with pytest.raises(ValueError, match=r"rank_pattern\['lin0'\]"):
        LoraConfig(target_modules=["lin0"], rank_pattern={"lin0": 0})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_invalid_dropout(dropout):
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(target_modules=["lin0"], lora_dropout=dropout)


def test_lora_bias_needs_plain_init():
    with pytest.raises(ValueError, match="lora_bias"):
        LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian")


def test_invalid_bias():
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(target_modules=["lin0"], bias="some")


def test_unknown_config_keys_warn(tmp_path):
    _save_adapter(tmp_path)
    reference = PeftModel.from_pretrained(_mlp(), tmp_path)
    _edit_config(tmp_path, option_from_the_future=3)
    with pytest.warns(UserWarning, match="option_from_the_future"):
        loaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    assert_close(loaded(_x()), reference(_x()))
    assert isinstance(loaded.peft_config["default"], peftfast.LoraConfig)
