"""User-written LoRA layers for layer types peftfast does not know (`LoraConfig._register_custom_module`, HF PEFT's
API): an LSTM model trains, saves, loads and merges with them; a registered class also takes over nn.Linear; the
mapping is not saved, and a target type with no LoRA layer gets an error pointing to the registration call."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn

from peftfast import LoraConfig, PeftModel, get_peft_model
from peftfast.tuners.lora.layer import Linear, LoraLayer


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(self.emb(ids))
        return self.head(output[:, -1])


class LoraLSTM(nn.Module, LoraLayer):
    """LoRA on a one-layer LSTM's input-to-hidden weight: `weight_ih_l0 + scaling * B @ A`."""

    def __init__(self, base_layer: nn.LSTM, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        **kwargs: Any,
    ) -> None:
        lstm = self.get_base_layer()
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self._set_dropout(adapter_name, lora_dropout)
        self.lora_A[adapter_name] = nn.Linear(lstm.input_size, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, 4 * lstm.hidden_size, bias=False)
        self.lora_bias[adapter_name] = False
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in self._adapters_to_merge(adapter_names):
            self.get_base_layer().weight_ih_l0.data += self.get_delta_weight(adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.get_base_layer().weight_ih_l0.data -= self.get_delta_weight(self.merged_adapters.pop())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        lstm = self.get_base_layer()
        active = self._present_active_adapters()
        if self.disable_adapters or self.merged or not active:
            return lstm(x, *args, **kwargs)
        weight = lstm.weight_ih_l0 + sum(self.get_delta_weight(adapter) for adapter in active)
        return torch.func.functional_call(lstm, {"weight_ih_l0": weight}, (x, *args), kwargs)


class CountingLinear(Linear):
    """peftfast's LoRA Linear, counting its calls: shows that a registered class replaces the built-in one."""

    calls = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        CountingLinear.calls += 1
        return super().forward(x, *args, **kwargs)


def _config(**kwargs: Any) -> LoraConfig:
    config = LoraConfig(target_modules=["lstm"], r=4, lora_alpha=8, **kwargs)
    config._register_custom_module({nn.LSTM: LoraLSTM})
    return config


def _ids() -> torch.Tensor:
    return torch.randint(0, 30, (6, 7), generator=torch.Generator().manual_seed(0))


def _forward(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids())


@pytest.fixture
def trained():
    """An LSTM classifier whose LSTM carries the user's LoRA layer, trained for a few steps."""
    torch.manual_seed(0)
    model = get_peft_model(LSTMClassifier(), _config())
    assert isinstance(model.base_model.model.lstm, LoraLSTM)
    ids, labels = _ids(), torch.tensor([0, 1, 2, 0, 1, 2])
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=5e-2)
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(ids), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_lstm_with_a_user_lora_layer_trains(trained):
    model, losses = trained
    assert losses[-1] < losses[0] - 0.05, losses
    trainable = sorted(name for name, param in model.named_parameters() if param.requires_grad)
    assert trainable == [
        "base_model.model.lstm.lora_A.default.weight",
        "base_model.model.lstm.lora_B.default.weight",
    ]
    with model.disable_adapter():
        disabled = _forward(model)
    assert not torch.allclose(disabled, _forward(model), atol=1e-4)


def test_save_needs_the_mapping_again_to_load(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.lstm.lora_A.weight",
        "base_model.model.lstm.lora_B.weight",
    ]
    assert not any("custom" in key for key in json.loads((tmp_path / "adapter_config.json").read_text()))
    torch.manual_seed(0)
    base = LSTMClassifier()  # the trained model's base
    with pytest.raises(ValueError, match=r"'lstm' is a torch\.nn\.modules\.rnn\.LSTM.*_register_custom_module"):
        PeftModel.from_pretrained(base, tmp_path)
    assert isinstance(base.lstm, nn.LSTM)  # the failed load left the model as it was
    config = LoraConfig.from_pretrained(tmp_path)
    config._register_custom_module({nn.LSTM: LoraLSTM})
    loaded = PeftModel.from_pretrained(base, tmp_path, config=config)
    assert_close(_forward(loaded), _forward(model))


def test_merge_uses_the_layers_own_merge(trained):
    model, _ = trained
    expected = _forward(model)
    merged = model.merge_and_unload()
    assert isinstance(merged.lstm, nn.LSTM)
    assert_close(_forward(merged), expected, kind="kernel")


def test_a_registered_class_replaces_the_builtin_linear_layer():
    config = _config(init_lora_weights=False)
    config.target_modules = {"lstm", "head"}
    config._register_custom_module({nn.Linear: CountingLinear})
    model = get_peft_model(LSTMClassifier(), config)
    assert type(model.base_model.model.head) is CountingLinear
    calls = CountingLinear.calls
    _forward(model)
    assert CountingLinear.calls == calls + 1


def test_unknown_layer_type_names_the_type_and_the_registration_call():
    with pytest.raises(ValueError, match=r"'lstm' is a torch\.nn\.modules\.rnn\.LSTM.*_register_custom_module"):
        get_peft_model(LSTMClassifier(), LoraConfig(target_modules=["lstm"]))
    with pytest.raises(TypeError, match="maps LSTM to 'not a class', which is not an nn.Module class"):
        LoraConfig(target_modules=["lstm"])._register_custom_module({nn.LSTM: "not a class"})
