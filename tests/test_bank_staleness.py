"""Mixed-adapter batches never return results from old weights (issue 15, "Stale results").

Each test runs a mixed batch first (so anything a mixed batch could keep between calls exists), then changes one
adapter's weights in one of the ways user code and HF PEFT's own code do, then checks that the next mixed batch
equals the single-adapter path (`set_adapter`, which reads the layers' weights directly) on the new weights, and
differs from what it returned before the write (so the comparison can fail). Both backends: torch, and the SGMV
kernels in Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from tolerances import assert_close

import peftfast
from peftfast import LoraConfig, get_peft_model, ops

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.cpu_kernels)]
NAMES = ["a", "a", "a"]


def _model():
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a"
    )
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    return model.eval()


def _ids():
    return torch.randint(1, 101, (len(NAMES), 5), generator=torch.Generator().manual_seed(3))


def _mixed(model, backend):
    with ops.use_backend(backend), torch.no_grad():
        return model(input_ids=_ids(), adapter_names=NAMES).logits


def _single(model):
    model.set_adapter("a")
    with ops.use_backend("torch"), torch.no_grad():
        return model(input_ids=_ids()).logits


def _q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def _check_write(model, backend, write):
    before = _mixed(model, backend)
    write()
    model.eval()
    after = _mixed(model, backend)
    assert_close(after, _single(model), kind="kernel")
    assert not torch.allclose(after, before, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_through_data(backend):
    model = _model()
    _check_write(model, backend, lambda: _q_proj(model).lora_A["a"].weight.data.mul_(3.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_in_place_optimizer_step(backend, optimizer_cls):
    model = _model()

    def step():
        model.set_adapter("a")
        model.train()
        optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=0.5)
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    _check_write(model, backend, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict(backend):
    model = _model()
    state = {k: v * 2 for k, v in model.state_dict().items() if "lora_B.a." in k}
    _check_write(model, backend, lambda: model.load_state_dict(state, strict=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_peft_model_state_dict(backend, tmp_path):
    model = _model()
    other = _model()
    with torch.no_grad():
        for name, param in other.named_parameters():
            if ".a." in name:
                param.normal_()
    other.save_pretrained(tmp_path, selected_adapters=["a"])
    weights = peftfast.load_peft_weights(tmp_path / "a")
    _check_write(model, backend, lambda: peftfast.set_peft_model_state_dict(model, weights, adapter_name="a"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_into_the_weight(backend):
    model = _model()
    layer = _q_proj(model)

    def copy():
        with torch.no_grad():
            layer.lora_B["a"].weight.copy_(torch.randn_like(layer.lora_B["a"].weight))

    _check_write(model, backend, copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaling_and_replaced_modules(backend):
    """Scalings changed through the layer API and adapter modules swapped for new ones are read on the next call."""
    model = _model()
    layer = _q_proj(model)
    _check_write(model, backend, lambda: layer.set_scale("a", 0.25))

    def replace():
        new = torch.nn.Linear(layer.in_features, 4, bias=False)
        layer.lora_A["a"] = new

    _check_write(model, backend, replace)
