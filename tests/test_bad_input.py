"""Bad input gives a clear error that names what is wrong, and leaves the model and the files on disk as they were.

Each case says whether it raises or warns. Raising cases check the error's type and that its message names the
culprit, and compare a `ModelSnapshot` (every tensor's bytes, the module tree, the adapters and their state, every
requires_grad and train/eval flag, hooks) and a `FolderSnapshot` (every file's bytes, every link) before and after.
Categories: names, saving (security), half-changes, config, files, runtime; churn is in test_churn.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import peft
import pytest
import torch
from models import MLP, tiny_llama
from safetensors.torch import load_file, save_file
from snapshots import FolderSnapshot, ModelSnapshot
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast import LoraConfig, PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model, load_peft_weights
from peftfast.tuners.tuners_utils import BaseTunerLayer
from peftfast.utils.other import ModulesToSaveWrapper


def _mlp(d_hidden: int = 23) -> MLP:
    torch.manual_seed(0)
    return MLP(d_hidden=d_hidden).eval()


def _x() -> torch.Tensor:
    return torch.randn(4, 11, generator=torch.Generator().manual_seed(0))


def _assert_plain(model: nn.Module) -> None:
    """No adapter layer, modules_to_save wrapper or adapter config is left on a model whose wrapping failed."""
    assert not [name for name, m in model.named_modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    assert not hasattr(model, "peft_config")


def _save_adapter(folder, model: nn.Module | None = None, adapter_name: str = "default", **config) -> None:
    """Save a random adapter; modules_to_save copies are changed first, so that loading them changes the model."""
    torch.manual_seed(1)
    config = {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, **config}
    peft_model = get_peft_model(model if model is not None else _mlp(), LoraConfig(**config), adapter_name)
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


def _edit_weights(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path)


def _trainable_peft_model(tmp_path) -> PeftModel:
    """A model with a trainable adapter "default" (lin0, and lin2 as modules_to_save) and a frozen one, "frozen"."""
    _save_adapter(tmp_path / "own", target_modules=["lin0"], modules_to_save=["lin2"])
    model = PeftModel.from_pretrained(_mlp(), tmp_path / "own", is_trainable=True)
    model.add_adapter("frozen", LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    return model.eval()


# Names ---------------------------------------------------------------------------------------------------------------

BAD_NAMES = ["{outside}", "../escape", "..", "a/b", "a\\b", "", "a.b", "a b", "x" * 256, "__base__"]


NAMED_OPERATIONS = {
    "add_adapter": lambda model, folder, name: model.add_adapter(name, LoraConfig(target_modules=["lin1"])),
    "load_adapter": lambda model, folder, name: model.load_adapter(folder, adapter_name=name),
    "get_peft_model": lambda model, folder, name: get_peft_model(
        model.get_base_model(), LoraConfig(target_modules=["lin1"]), adapter_name=name
    ),
    "from_pretrained": lambda model, folder, name: PeftModel.from_pretrained(
        model.get_base_model(), folder, adapter_name=name
    ),
    "inject_adapter_in_model": lambda model, folder, name: inject_adapter_in_model(
        LoraConfig(target_modules=["lin1"]), model.get_base_model(), adapter_name=name
    ),
}


@pytest.mark.parametrize("operation", list(NAMED_OPERATIONS))
@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda name: repr(name[:12]))
def test_bad_adapter_name_is_refused(tmp_path, name, operation):
    # Raises ValueError before anything happens: no layer, no config entry, no file (an absolute name would
    # otherwise make save_pretrained write outside its folder).
    name = name.format(outside=str(tmp_path / "outside"))
    _save_adapter(tmp_path / "adapter", target_modules=["lin1"])
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    before, files = ModelSnapshot.of(model), FolderSnapshot.of(tmp_path)
    reason = "reserved" if name == "__base__" else "ASCII letters, digits"
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*" + reason):
        NAMED_OPERATIONS[operation](model, tmp_path / "adapter", name)
    before.assert_same(model)
    files.assert_same(tmp_path)


@pytest.mark.parametrize("name", [123, None, ("a",), b"default"])
def test_adapter_name_of_another_type_is_refused(name):
    # Raises TypeError naming the type (was a TypeError from a sort deep inside).
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"]))
    before = ModelSnapshot.of(model)
    with pytest.raises(TypeError, match=f"adapter_name must be a str, got {type(name).__name__}"):
        model.add_adapter(name, LoraConfig(target_modules=["lin1"]))
    before.assert_same(model)


@pytest.mark.parametrize(
    "call",
    [
        lambda model: model.set_adapter(123),
        lambda model: model.set_requires_grad(123),
        lambda model: model.save_pretrained("unused", selected_adapters=[123]),
        lambda model: model.merge_adapter(adapter_names="default"),
        lambda model: model(_x(), adapter_names=[1, 2, 3, 4]),
    ],
    ids=["set_adapter", "set_requires_grad", "selected_adapters", "merge_adapter", "adapter_names"],
)
def test_adapter_names_of_another_type_in_calls(tmp_path, call, monkeypatch):
    # Raises TypeError naming the argument's value, with nothing changed and nothing written.
    monkeypatch.chdir(tmp_path)
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
    before = ModelSnapshot.of(model)
    with pytest.raises(TypeError, match=r"adapter.*(123|'default'|\[1, 2, 3, 4\])"):
        call(model)
    before.assert_same(model)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["../escape", "{outside}"])
def test_name_that_got_into_peft_config_otherwise_is_not_saved(tmp_path, name):
    # Raises ValueError at save time, before any file is written (the default adapter's neither).
    name = name.format(outside=str(tmp_path / "outside"))
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"]))
    model.peft_config[name] = model.peft_config["default"]
    files = FolderSnapshot.of(tmp_path)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        model.save_pretrained(tmp_path / "out")
    files.assert_same(tmp_path)


def test_adapter_named_like_a_module_saves_and_loads(tmp_path):
    # An adapter "lin0" beside a layer "lin0": each file holds exactly its adapter's tensors under PEFT's keys (HF PEFT
    # 0.21.2 itself drops the default adapter's lin0 tensors from its file here), and both libraries load them back.
    torch.manual_seed(2)
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.add_adapter("lin0", LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    keys = [f"base_model.model.{layer}.lora_{ab}.weight" for layer in ("lin0", "lin1") for ab in "AB"]
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == keys
    assert sorted(load_file(tmp_path / "lin0" / "adapter_model.safetensors")) == keys[2:]
    for lib in (peftfast, peft):
        reloaded = lib.PeftModel.from_pretrained(_mlp(), tmp_path)
        reloaded.load_adapter(tmp_path / "lin0", adapter_name="lin0")
        for adapter in ("default", "lin0"):
            model.set_adapter(adapter)
            reloaded.set_adapter(adapter)
            assert_close(reloaded(_x()), model(_x()))
    # Loading "lin0" frozen freezes its weights only, not the default adapter's weights on the layer lin0.
    trainable = PeftModel.from_pretrained(_mlp(), tmp_path, is_trainable=True)
    trainable.load_adapter(tmp_path / "lin0", adapter_name="lin0")
    assert sorted(name for name, param in trainable.named_parameters() if param.requires_grad) == [
        f"base_model.model.{layer}.lora_{ab}.default.weight" for layer in ("lin0", "lin1") for ab in "AB"
    ]


# Saving: every write inside save_directory ---------------------------------------------------------------------------


def _two_adapter_model() -> PeftModel:
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["lin1"], init_lora_weights=False))
    return model


@pytest.mark.parametrize(
    "link", ["README.md", "adapter_config.json", "adapter_model.safetensors", "other", "other/adapter_config.json"]
)
def test_save_refuses_a_symlink_out_of_the_folder(tmp_path, link):
    # Raises ValueError naming the path, before writing anything: neither the folder nor the link's target change.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    save_directory = tmp_path / "save"
    (save_directory / link).parent.mkdir(parents=True)
    (save_directory / link).symlink_to(outside if link == "other" else outside / "victim")
    model = _two_adapter_model()
    before, files = ModelSnapshot.of(model), FolderSnapshot.of(tmp_path)
    with pytest.raises(ValueError, match=re.escape(link.split("/")[-1]) + r".*outside the folder"):
        model.save_pretrained(save_directory)
    before.assert_same(model)
    files.assert_same(tmp_path)
    assert (outside / "victim").read_text() == "keep me"


def test_config_save_refuses_a_symlink_out_of_the_folder(tmp_path):
    (tmp_path / "outside").write_text("keep me")
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "adapter_config.json").symlink_to(tmp_path / "outside")
    files = FolderSnapshot.of(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config\.json.*outside the folder"):
        LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path / "save")
    files.assert_same(tmp_path)


@pytest.mark.parametrize("link", ["adapter_model.safetensors", "adapter_config.json"])
def test_transformers_save_adapter_refuses_a_symlink_out_of_the_folder(tmp_path, link):
    # transformers' save_pretrained of a model with adapters writes through save_adapter: the same check applies.
    from peftfast.integrations.transformers import add_adapter, save_adapter

    model = tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj"]))
    (tmp_path / "outside").write_text("keep me")
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / link).symlink_to(tmp_path / "outside")
    files = FolderSnapshot.of(tmp_path)
    with pytest.raises(ValueError, match=re.escape(link) + r".*outside the folder"):
        save_adapter(model, tmp_path / "save")
    files.assert_same(tmp_path)


def test_save_follows_symlinks_that_stay_inside(tmp_path):
    # Links that resolve inside the folder (and a save_directory that is itself a link) are fine.
    (tmp_path / "real" / "store").mkdir(parents=True)
    (tmp_path / "real" / "other").symlink_to(tmp_path / "real" / "store")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    model = _two_adapter_model()
    model.save_pretrained(tmp_path / "alias")
    assert (tmp_path / "real" / "store" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(_mlp(), tmp_path / "alias")
    reloaded.load_adapter(tmp_path / "alias" / "other", adapter_name="other")
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        reloaded.set_adapter(adapter)
        assert_close(reloaded(_x()), model(_x()))


UNPICKLED = []


def _record_unpickling() -> dict:
    UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return _record_unpickling, ()


@pytest.mark.parametrize("file_name", ["adapter_model.bin", "adapter_model.safetensors"])
def test_pickles_are_never_loaded(tmp_path, file_name):
    # Raises ValueError naming the file; the pickle's code never runs (a .bin is read with weights_only=True, a
    # .safetensors never through pickle), on every loading path.
    _save_adapter(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    with open(tmp_path / file_name, "wb") as handle:
        pickle.dump({**weights, "payload": _Payload()}, handle)
    model = _mlp()
    peft_model = _trainable_peft_model(tmp_path / "trained")
    before, before_peft, files = ModelSnapshot.of(model), ModelSnapshot.of(peft_model), FolderSnapshot.of(tmp_path)
    loads = [
        lambda: load_peft_weights(tmp_path),
        lambda: PeftModel.from_pretrained(model, tmp_path),
        lambda: peft_model.load_adapter(tmp_path, adapter_name="new"),
        lambda: peft_model.load_adapter(tmp_path, adapter_name="default"),
    ]
    for load in loads:
        with pytest.raises(ValueError, match=re.escape(file_name)):
            load()
    assert not UNPICKLED
    before.assert_same(model)
    before_peft.assert_same(peft_model)
    files.assert_same(tmp_path)


def test_plain_tensor_bin_still_loads(tmp_path):
    _save_adapter(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "adapter_model.bin")
    loaded = load_peft_weights(tmp_path)
    assert sorted(loaded) == sorted(weights)


# Nothing half-changed ------------------------------------------------------------------------------------------------


def _drop_lin1_lora_B(weights):
    del weights["base_model.model.lin1.lora_B.weight"]


def _nan_in_lin1_lora_B(weights):
    weights["base_model.model.lin1.lora_B.weight"][0, 0] = float("nan")


def _int_lin1_lora_B(weights):
    weights["base_model.model.lin1.lora_B.weight"] = weights["base_model.model.lin1.lora_B.weight"].to(torch.int32)


BROKEN_FILES = {
    "missing_layer": (_drop_lin1_lora_B, r"lacks weights.*lin1\.lora_B"),
    "nan": (_nan_in_lin1_lora_B, r"lin1\.lora_B.*NaN/inf"),
    "integer_dtype": (_int_lin1_lora_B, r"lin1\.lora_B.*torch\.int32.*torch\.float32"),
}


@pytest.mark.parametrize("broken", list(BROKEN_FILES))
def test_load_adapter_into_an_existing_name_is_all_or_nothing(tmp_path, broken):
    # Raises ValueError naming the tensor, after checking every tensor and before writing any: lin0's weights, which
    # come first in the file and are fine, are not loaded either.
    edit, message = BROKEN_FILES[broken]
    _save_adapter(tmp_path / "broken")
    _edit_weights(tmp_path / "broken", edit)
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)).eval()
    before, files, output = ModelSnapshot.of(model), FolderSnapshot.of(tmp_path), model(_x())
    with pytest.raises(ValueError, match=message):
        model.load_adapter(tmp_path / "broken", adapter_name="default")
    before.assert_same(model)
    files.assert_same(tmp_path)
    assert torch.equal(model(_x()), output)


@pytest.mark.parametrize("broken", list(BROKEN_FILES))
def test_failed_from_pretrained_restores_the_model(tmp_path, broken):
    # Raises ValueError; the module tree, the requires_grad flags (the wrapping froze the base model) and the
    # train/eval mode are as before.
    edit, message = BROKEN_FILES[broken]
    _save_adapter(tmp_path / "broken", modules_to_save=["lin2"])
    _edit_weights(tmp_path / "broken", edit)
    model = _mlp().train()
    model.lin0.weight.requires_grad_(False)
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(model, tmp_path / "broken")
    before.assert_same(model)
    _assert_plain(model)


def test_failed_from_pretrained_of_a_prompt_restores_the_model(tmp_path):
    # Prompt learning freezes the base model too: a prompt of the wrong shape raises, and the flags come back.
    peft.get_peft_model(
        tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).save_pretrained(tmp_path)
    _edit_config(tmp_path, num_virtual_tokens=5)
    model = tiny_llama().train()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"prompt_embeddings.*\(4, 32\).*\(5, 32\)"):
        PeftModel.from_pretrained(model, tmp_path)
    before.assert_same(model)


def test_failed_transformers_load_adapter_restores_the_model(tmp_path):
    # transformers' model.load_adapter: raises ValueError naming the tensor; no LoRA layer stays wrapped around the
    # base layers, and the base model is not left frozen.
    from peftfast.integrations.transformers import load_adapter

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path
    )
    _edit_weights(
        tmp_path, lambda weights: weights.pop("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    )
    model = tiny_llama().train()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"lacks weights.*layers\.1\.self_attn\.q_proj\.lora_B"):
        load_adapter(model, tmp_path)
    before.assert_same(model)
    _assert_plain(model)


@pytest.mark.parametrize("modules_to_save", [["no_such_module"], ["lin[2"]])
def test_get_peft_model_with_bad_modules_to_save(modules_to_save):
    # Raises ValueError naming the module; the LoRA layers injected before the check are gone again, the base model
    # is not left frozen.
    model = _mlp().train()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=re.escape(str(modules_to_save))):
        get_peft_model(model, LoraConfig(target_modules=["lin0"], modules_to_save=modules_to_save))
    before.assert_same(model)
    _assert_plain(model)


def test_add_adapter_with_bad_modules_to_save(tmp_path):
    # Raises ValueError; the LoRA layer it had put on lin1 (beside "frozen") is gone again.
    model = _trainable_peft_model(tmp_path)
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match="no_such_module"):
        model.add_adapter("new", LoraConfig(target_modules=["lin1"], modules_to_save=["no_such_module"]))
    before.assert_same(model)


@pytest.mark.parametrize("existing", [False, True])
def test_injection_failing_at_its_last_step_is_rolled_back(tmp_path, monkeypatch, existing):
    # A failure after every layer and wrapper was changed (here forced in the modules_to_save step, after it did its
    # work): the new layers, the new adapter's copy in the existing lin2 wrapper and the frozen flags are all undone.
    from peftfast.tuners import tuners_utils

    wrap = tuners_utils.set_additional_trainable_modules

    def wrap_then_fail(*args, **kwargs):
        wrap(*args, **kwargs)
        raise RuntimeError("late failure")

    model = _trainable_peft_model(tmp_path) if existing else _mlp().train()
    before = ModelSnapshot.of(model)
    monkeypatch.setattr(tuners_utils, "set_additional_trainable_modules", wrap_then_fail)
    config = LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["lin2"])
    with pytest.raises(RuntimeError, match="late failure"):
        model.add_adapter("new", config) if existing else get_peft_model(model, config)
    before.assert_same(model)
    if not existing:
        _assert_plain(model)


def test_failed_load_adapter_under_a_new_name(tmp_path):
    # "other" targets lin0, which has a LoRA layer already, and lin1, which gets a new one; the shapes don't fit.
    _save_adapter(tmp_path / "wrong", model=_mlp(d_hidden=23))
    _save_adapter(tmp_path / "own", model=_mlp(d_hidden=17), target_modules=["lin0"], modules_to_save=["lin2"])
    model = PeftModel.from_pretrained(_mlp(d_hidden=17), tmp_path / "own", is_trainable=True).eval()
    before, output = ModelSnapshot.of(model), model(_x())
    with pytest.raises(ValueError, match=r"lin0\.lora_B.*\(23, 8\).*\(17, 8\)"):
        model.load_adapter(tmp_path / "wrong", adapter_name="other")
    before.assert_same(model)
    assert torch.equal(model(_x()), output)


def test_mismatched_shapes_on_from_pretrained(tmp_path):
    _save_adapter(tmp_path, model=_mlp(d_hidden=23))
    model = _mlp(d_hidden=17)
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"lin0\.lora_B.*\(23, 8\).*\(17, 8\)"):
        PeftModel.from_pretrained(model, tmp_path)
    before.assert_same(model)
    _assert_plain(model)
    # The model is usable afterwards: a matching adapter loads onto it.
    _save_adapter(tmp_path / "good", model=_mlp(d_hidden=17))
    reference = peft.PeftModel.from_pretrained(_mlp(d_hidden=17), tmp_path / "good")
    assert_close(PeftModel.from_pretrained(model, tmp_path / "good")(_x()), reference(_x()))


class _WithUnsupportedLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rnn = nn.LSTM(4, 4)


@pytest.mark.parametrize(("target", "type_name"), [("norm", "LayerNorm"), ("rnn", "LSTM")])
def test_unsupported_target_type(target, type_name):
    model = _WithUnsupportedLayers()
    before = ModelSnapshot.of(model)
    # "lin" comes first and is replaced before the unsupported layer fails: it must be put back.
    with pytest.raises(ValueError, match=rf"'{target}'.*{type_name}"):
        get_peft_model(model, LoraConfig(target_modules=["lin", target]))
    before.assert_same(model)
    _assert_plain(model)


def test_unsupported_target_type_on_add_adapter():
    model = get_peft_model(_WithUnsupportedLayers(), LoraConfig(target_modules=["lin"], init_lora_weights=False))
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"'norm'.*LayerNorm"):
        model.add_adapter("other", LoraConfig(target_modules=["lin", "norm"]))
    before.assert_same(model)


# Config --------------------------------------------------------------------------------------------------------------


def test_negative_lora_alpha_warns(tmp_path):
    # Warns (HF PEFT accepts it silently; it is legal, the update is subtracted): same output as HF PEFT.
    with pytest.warns(UserWarning, match=r"lora_alpha=-8 is negative"):
        config = LoraConfig(target_modules=["lin0"], lora_alpha=-8, init_lora_weights=False)
    with pytest.warns(UserWarning, match=r"alpha_pattern\['lin0'\]=-2 is negative"):
        LoraConfig(target_modules=["lin0"], alpha_pattern={"lin0": -2})
    ours = get_peft_model(_mlp(), config)
    assert ours.base_model.model.lin0.scaling["default"] == -1.0
    ours.save_pretrained(tmp_path)
    assert_close(peft.PeftModel.from_pretrained(_mlp(), tmp_path)(_x()), ours(_x()))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "16", True, None])
def test_lora_alpha_that_is_not_a_number(alpha):
    # Raises ValueError naming the field.
    with pytest.raises(ValueError, match=r"lora_alpha must be a finite number"):
        LoraConfig(target_modules=["lin0"], lora_alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha_pattern\['lin0'\] must be a finite number"):
        LoraConfig(target_modules=["lin0"], alpha_pattern={"lin0": alpha})


@pytest.mark.parametrize("field_name", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_no_target_warns_like_peft(field_name):
    # Warns (RuntimeWarning, as HF PEFT does), naming the key; the adapter is still added.
    for lib in (peft, peftfast):
        config = lib.LoraConfig(target_modules=["lin0"], **{field_name: {"lin0": 4, "nope": 2}})
        with pytest.warns(RuntimeWarning, match=r"nope"):
            model = lib.get_peft_model(_mlp(), config)
        assert model.base_model.model.lin0.r["default"] == (4 if field_name == "rank_pattern" else 8)
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"]))
    with pytest.warns(RuntimeWarning, match=rf"{field_name} keys \['lin1'\] of adapter 'other'"):
        model.add_adapter("other", LoraConfig(target_modules=["lin0"], **{field_name: {"lin1": 4}}))


@pytest.mark.parametrize(
    ("field_name", "value", "pattern"),
    [
        ("target_modules", "lin[0", "lin[0"),
        ("exclude_modules", "(lin", "(lin"),
        ("rank_pattern", {"lin[": 4}, "lin["),
        ("alpha_pattern", {"*lin": 4}, "*lin"),
        ("layers_pattern", "layers(", "layers("),
    ],
)
def test_invalid_regex_names_the_field_and_pattern(field_name, value, pattern):
    # Raises ValueError naming the field and the pattern (was a bare re.error from deep inside matching).
    extra = {"layers_to_transform": [0], "target_modules": ["q_proj"]} if field_name == "layers_pattern" else {}
    config = {"target_modules": ["lin0"], **extra, field_name: value}
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field_name}.*{re.escape(repr(pattern))}.*regular expression"):
        LoraConfig(**config)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("target_modules", 5),
        ("target_modules", ["lin0", 3]),
        ("modules_to_save", "lin2"),
        ("layers_to_transform", "0"),
        ("layers_to_transform", [0, 1.0]),
        ("rank_pattern", ["lin0"]),
    ],
)
def test_config_field_of_the_wrong_type(field_name, value):
    # Raises TypeError naming the field (was an error deep inside matching, or a silent match on characters).
    with pytest.raises(TypeError, match=rf"LoraConfig\.{field_name}"):
        LoraConfig(**{"target_modules": ["lin0"], field_name: value})


def test_negative_layer_index():
    with pytest.raises(ValueError, match=r"LoraConfig\.layers_to_transform.*\[0, -1\]"):
        LoraConfig(target_modules=["lin0"], layers_to_transform=[0, -1])


def test_layers_to_transform_naming_no_layer_of_the_model():
    # Raises ValueError saying which layers exist (was "target modules not found"), as HF PEFT raises.
    model = tiny_llama()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\] names layers \[5\].*in layers \[0, 1\]"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    before.assert_same(model)
    _assert_plain(model)
    with pytest.raises(ValueError, match=r"layers_pattern='blocks'"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"))
    before.assert_same(model)


def test_layers_to_transform_naming_some_missing_layers_warns():
    # Warns, naming the missing layer; the layers that exist get the adapter (HF PEFT adapts them silently).
    with pytest.warns(UserWarning, match=r"names layers \[7\].*Only layers \[1\]"):
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 7]))
    assert model.targeted_module_names == ["model.layers.1.self_attn.q_proj"]


# Files ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["[1, 2]", '"LORA"', "3", "{not json", b"\xff\xfe\x00binary"])
def test_adapter_config_that_is_not_a_json_object(tmp_path, content):
    # Raises ValueError naming the file (a JSON list was an AttributeError).
    _save_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    model = _trainable_peft_model(tmp_path / "trained")
    before, files = ModelSnapshot.of(model), FolderSnapshot.of(tmp_path)
    for load in (
        lambda: PeftConfig.from_pretrained(tmp_path),
        lambda: PeftModel.from_pretrained(_mlp(), tmp_path),
        lambda: model.load_adapter(tmp_path, adapter_name="new"),
    ):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load()
    before.assert_same(model)
    files.assert_same(tmp_path)


def test_folder_without_config(tmp_path):
    model = _mlp()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(model, tmp_path)
    before.assert_same(model)


@pytest.mark.parametrize("weights", ["missing", "empty", "truncated"])
def test_unreadable_weights_file(tmp_path, weights):
    # Raises ValueError naming the file, before the model is touched.
    _save_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    if weights == "missing":
        path.unlink()
    else:
        path.write_bytes(b"" if weights == "empty" else path.read_bytes()[:100])
    model = _mlp().train()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(model, tmp_path)
    before.assert_same(model)
    _assert_plain(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_adapter_weights(tmp_path, value):
    # Raises ValueError naming the tensor and how many values are bad (was loaded silently).
    _save_adapter(tmp_path, modules_to_save=["lin2"])

    def poison(weights):
        weights["base_model.model.lin2.weight"][1, :2] = value

    _edit_weights(tmp_path, poison)
    model = _mlp()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"lin2\.modules_to_save\.default\.weight.*2 NaN/inf value"):
        PeftModel.from_pretrained(model, tmp_path)
    before.assert_same(model)


def test_unknown_tensor_keys_warn(tmp_path):
    # Warns, naming the keys that were not loaded (they were dropped without a word); the rest loads.
    _save_adapter(tmp_path)
    reference = PeftModel.from_pretrained(_mlp(), tmp_path)

    def add_unknown(weights):
        weights["base_model.model.lin7.lora_A.weight"] = torch.zeros(8, 11)
        weights["base_model.model.lin0.lora_magic.weight"] = torch.zeros(3)

    _edit_weights(tmp_path, add_unknown)
    with pytest.warns(UserWarning, match=r"2 tensor\(s\).*lin0\.lora_magic\.weight.*lin7\.lora_A\.weight"):
        loaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    assert_close(loaded(_x()), reference(_x()))


def test_unknown_config_keys_warn(tmp_path):
    # Warns, naming the key; the adapter loads.
    _save_adapter(tmp_path)
    reference = PeftModel.from_pretrained(_mlp(), tmp_path)
    _edit_config(tmp_path, option_from_the_future=3)
    with pytest.warns(UserWarning, match="option_from_the_future"):
        loaded = PeftModel.from_pretrained(_mlp(), tmp_path)
    assert_close(loaded(_x()), reference(_x()))
    assert isinstance(loaded.peft_config["default"], peftfast.LoraConfig)


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
    before = ModelSnapshot.of(model)
    # IA3 is unknown to peftfast; prompt tuning is known, but is not LoRA and can't join LoRA adapters.
    loads = [LoraConfig.from_pretrained]
    if peft_type == "IA3":
        loads += [PeftConfig.from_pretrained, lambda path: PeftModel.from_pretrained(model, path)]
    for load in loads:
        with pytest.raises(ValueError, match=peft_type):
            load(tmp_path)
    before.assert_same(model)
    _save_adapter(tmp_path / "lora")
    lora_model = PeftModel.from_pretrained(_mlp(), tmp_path / "lora")
    before = ModelSnapshot.of(lora_model)
    with pytest.raises(ValueError, match=peft_type):
        lora_model.load_adapter(tmp_path, adapter_name="other")
    before.assert_same(lora_model)


def test_unsupported_lora_variant(tmp_path):
    with pytest.raises(NotImplementedError, match="use_qalora"):
        LoraConfig(target_modules=["lin0"], use_qalora=True)
    peft.get_peft_model(_mlp(), peft.LoraConfig(target_modules=["lin0"], use_qalora=True)).save_pretrained(tmp_path)
    model = _mlp()
    before = ModelSnapshot.of(model)
    with pytest.raises(NotImplementedError, match="use_qalora"):
        PeftModel.from_pretrained(model, tmp_path)
    before.assert_same(model)


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


def test_target_modules_matching_nothing():
    model = _mlp()
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"q_proj.*not found.*lin0"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    before.assert_same(model)


def test_target_modules_matching_nothing_on_add_adapter():
    model = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"q_proj.*not found"):
        model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    before.assert_same(model)


# Runtime -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda model: model.merge_adapter(adapter_names=["nope"]),
        lambda model: model.merge_adapter(adapter_names=["frozen", "nope"]),
        lambda model: model.merge_and_unload(adapter_names=["nope"]),
        lambda model: model.merge_and_unload(adapter_names=["nope"], safe_merge=True),
    ],
    ids=["merge", "merge_some", "merge_and_unload", "safe_merge_and_unload"],
)
def test_merging_an_unknown_adapter(tmp_path, call):
    # Raises ValueError naming it (merge_adapter did nothing without a word); nothing is merged.
    model = _trainable_peft_model(tmp_path)
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"\['nope'\] not found.*'default', 'frozen'"):
        call(model)
    before.assert_same(model)


@pytest.mark.parametrize("method", ["set_adapter", "delete_adapter", "set_requires_grad"])
def test_unknown_adapter_name(tmp_path, method):
    # Raises ValueError naming it and the available ones; with a list, no part of it is applied.
    model = _trainable_peft_model(tmp_path)
    before = ModelSnapshot.of(model)
    with pytest.raises(ValueError, match=r"nope.*default"):
        getattr(model, method)("nope")
    if method != "delete_adapter":
        with pytest.raises(ValueError, match=r"nope.*default"):
            getattr(model, method)(["frozen", "nope"])
    before.assert_same(model)


@pytest.mark.parametrize(
    ("adapter_names", "training", "error", "message"),
    [
        (["default", "nope", "__base__", "default"], False, ValueError, r"\['nope'\].*'__base__'"),
        (["default", "frozen"], False, ValueError, r"2 adapter_names for a batch of 4"),
        (["default"] * 4, True, ValueError, r"inference.*eval\(\)"),
        ("default", False, TypeError, r"adapter_names must be a list"),
    ],
    ids=["unknown", "length", "training", "string"],
)
def test_bad_mixed_batch(tmp_path, adapter_names, training, error, message):
    # Raises; no hook is left on any layer, nothing else changes, and the next call runs normally.
    model = _trainable_peft_model(tmp_path)
    model.train(training)
    before = ModelSnapshot.of(model)
    with pytest.raises(error, match=message):
        model(_x(), adapter_names=adapter_names)
    before.assert_same(model)
    model.eval()
    assert_close(model(_x(), adapter_names=["default"] * 4), model(_x()))
