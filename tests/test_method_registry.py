"""A method defined only in this file (an IA3-like scaling of layer outputs) plugs into peftfast with one
`register_peft_method` call, and then trains with a transformers Trainer, saves, loads, reports its status and is
managed like LoRA, with no change anywhere in peftfast."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from models import tiny_llama
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn

from peftfast import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, register_peft_method
from peftfast.tuners.tuners_utils import BaseTuner, BaseTunerLayer


@dataclass
class ScaleConfig(PeftConfig):
    """Multiply the outputs of the `target_modules` (nn.Linear) by a trained per-feature vector."""

    _peft_type = "MY_SCALE"

    target_modules: list[str] | str | None = field(default=None)
    init_scale: float = field(default=1.0)


class ScaleLinear(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("my_scale_vector",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, init_scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.my_scale_vector = nn.ParameterDict()
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, init_scale)

    def update_layer(self, adapter_name: str, init_scale: float) -> None:
        self.my_scale_vector[adapter_name] = nn.Parameter(torch.full((self.base_layer.out_features,), init_scale))
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.merged_adapters:
                self.base_layer.weight.data *= self.my_scale_vector[name].data[:, None]
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.base_layer.weight.data /= self.my_scale_vector[self.merged_adapters.pop()].data[:, None]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            result = result * self.my_scale_vector[name]
        return result


class ScaleModel(BaseTuner):
    prefix = "my_scale_"
    tuner_layer_cls = ScaleLinear

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, ScaleLinear):
            target.update_layer(adapter_name, config.init_scale)
        else:
            setattr(parent, target_name, ScaleLinear(target, adapter_name, config.init_scale))


register_peft_method(name="my_scale", config_cls=ScaleConfig, model_cls=ScaleModel)

TARGETS = ["o_proj", "down_proj"]


def _batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1, 101, (4, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "labels": input_ids}


def _loss(model: nn.Module) -> float:
    with torch.no_grad():
        return model(**_batch()).loss.item()


@pytest.fixture
def trained(tmp_path):
    """A my_scale adapter trained for a few steps by a transformers Trainer."""
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), ScaleConfig(task_type="CAUSAL_LM", target_modules=TARGETS))
    before = _loss(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=0.3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    batch = _batch()
    dataset = [{key: value[i] for key, value in batch.items()} for i in range(4)]
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()
    return model, before


def test_trainer_trains_only_the_new_method(trained):
    model, before = trained
    assert _loss(model) < before - 0.05
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert len(trainable) == 4 and all(".my_scale_vector.default" in name for name in trainable)
    fresh = tiny_llama().state_dict()
    for name, value in model.get_base_model().state_dict().items():
        if "my_scale_" not in name:
            assert torch.equal(value, fresh[name.replace(".base_layer", "")]), name


def test_save_and_load_round_trip(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MY_SCALE" and config["init_scale"] == 1.0
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.down_proj.my_scale_vector" in weights
    assert len(weights) == 4
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert isinstance(loaded.peft_config["default"], ScaleConfig)
    inputs = {"input_ids": _batch()["input_ids"]}
    with torch.no_grad():
        assert_close(loaded(**inputs).logits, model(**inputs).logits)
    assert get_peft_model_state_dict(loaded).keys() == weights.keys()


def test_status_and_adapter_management(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "adapter")
    inputs = {"input_ids": _batch()["input_ids"]}
    with torch.no_grad():
        trained_logits = model(**inputs).logits
        base_logits = tiny_llama()(**inputs).logits
    model.load_adapter(tmp_path / "adapter", adapter_name="reloaded")
    model.add_adapter("fresh", ScaleConfig(target_modules=TARGETS, init_scale=1.0))
    status = model.get_model_status()
    assert status.peft_types == {"default": "MY_SCALE", "reloaded": "MY_SCALE", "fresh": "MY_SCALE"}
    assert status.num_adapter_layers == 4 and status.available_adapters == ["default", "fresh", "reloaded"]
    assert all(layer.module_type == "ScaleLinear" for layer in model.get_layer_status())
    with torch.no_grad():
        model.set_adapter("fresh")
        assert_close(model(**inputs).logits, base_logits)
        model.set_adapter("reloaded")
        assert_close(model(**inputs).logits, trained_logits)
        with model.disable_adapter():
            assert_close(model(**inputs).logits, base_logits)
    model.delete_adapter("reloaded")
    assert sorted(model.peft_config) == ["default", "fresh"]
    model.set_adapter("default")
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(**inputs).logits, trained_logits, kind="kernel")
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())


def test_registration_errors():
    with pytest.raises(ValueError, match="_peft_type is 'MY_SCALE'; set it to 'OTHER_SCALE'"):
        register_peft_method(name="other_scale", config_cls=ScaleConfig, model_cls=ScaleModel)
    with pytest.raises(ValueError, match="prefix is 'my_scale_' but the method is registered with prefix 'x_'"):
        register_peft_method(name="my_scale", config_cls=ScaleConfig, model_cls=ScaleModel, prefix="x_")

    @dataclass
    class Duplicate(ScaleConfig):
        pass

    with pytest.raises(KeyError, match="'my_scale' is already registered"):
        register_peft_method(name="my_scale", config_cls=Duplicate, model_cls=ScaleModel)

    from peftfast import PromptTuningConfig

    @dataclass
    class MyPromptConfig(PromptTuningConfig):
        _peft_type = "MY_PROMPT"

    with pytest.raises(TypeError, match="must subclass peftfast.tuners.tuners_utils.BasePromptEncoder"):
        register_peft_method(name="my_prompt", config_cls=MyPromptConfig, model_cls=ScaleModel)
