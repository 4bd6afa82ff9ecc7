"""peftfast where users already are: transformers' Trainer (adapter-only checkpoints, resume), transformers' adapter
methods without HF PEFT, the AutoPeftModel loaders, and `peftfast.accelerate` over models built by HF PEFT."""

from __future__ import annotations

import os
import sys
import types

import peft
import pytest
import torch
import transformers
from models import MLP, tiny_llama
from safetensors.torch import load_file
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast import LoraConfig, ops
from peftfast.integrations import transformers as integration

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _input_ids(vocab: int = 101, rows: int = 2, length: int = 7, seed: int = 1234) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


@pytest.fixture
def peft_hidden(monkeypatch):
    """transformers and peftfast as they are where HF PEFT is not installed: `import peft` fails and transformers'
    own PEFT checks answer False."""
    import transformers.trainer as trainer_module

    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setattr(trainer_module, "is_peft_available", lambda: False)
    for name in integration._MODULES_WITH_IS_PEFT_MODEL:
        module = sys.modules.get(name)
        if module is not None:
            monkeypatch.setattr(module, "_is_peft_model", lambda model: False)
    monkeypatch.setattr(trainer_module.Trainer, "_save", trainer_module.Trainer._save.__wrapped__)
    integration.patch_trainer()


# ---------------------------------------------------------------------------------------------------------- Trainer


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: int = 16, length: int = 8) -> None:
        self.ids = _input_ids(rows=rows, length=length, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _trainer(output_dir, max_steps: int, **arguments) -> transformers.Trainer:
    model = peftfast.get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **arguments,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset())


def _check_trainer_checkpoints_and_resume(tmp_path, **arguments) -> None:
    straight = _trainer(tmp_path / "straight", max_steps=4, **arguments)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    saved = load_file(checkpoint.parent / "checkpoint-4" / "adapter_model.safetensors")
    assert saved and all(".lora_" in key and key.startswith("base_model.model.") for key in saved)
    trained = peftfast.get_peft_model_state_dict(straight.model)
    for key, value in trained.items():
        torch.testing.assert_close(saved[key], value)

    resumed = _trainer(tmp_path / "resumed", max_steps=4, **arguments)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    # The resumed run loaded the step-2 adapter and optimizer and saw the same batches: it ends where the uninterrupted
    # run ended (a resume that started from the fresh adapter would not).
    for name, value in _adapter_tensors(straight.model).items():
        torch.testing.assert_close(_adapter_tensors(resumed.model)[name], value, atol=1e-5, rtol=1e-4)


def test_trainer_saves_adapter_only_checkpoints_and_resumes(tmp_path):
    _check_trainer_checkpoints_and_resume(tmp_path)


def test_trainer_without_hf_peft_installed(tmp_path, peft_hidden):
    _check_trainer_checkpoints_and_resume(tmp_path)


def test_trainer_gradient_checkpointing_matches_plain_training(tmp_path):
    plain = _trainer(tmp_path / "plain", max_steps=2)
    plain.train()
    checkpointed = _trainer(tmp_path / "checkpointed", max_steps=2, gradient_checkpointing=True)
    checkpointed.train()
    assert checkpointed.model.get_base_model().model.gradient_checkpointing
    before = _adapter_tensors(_trainer(tmp_path / "fresh", max_steps=1).model)
    after = _adapter_tensors(checkpointed.model)
    assert any(not torch.equal(after[name], value) for name, value in before.items()), "the adapter did not train"
    for name, value in _adapter_tensors(plain.model).items():
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=1e-4)


def test_trainer_bf16_autocast_on_cpu(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, bf16=True)
    before = _adapter_tensors(trainer.model)
    trainer.train()
    after = _adapter_tensors(trainer.model)
    # Autocast computes in bf16; the adapter weights stay fp32 masters, and they trained.
    assert all(value.dtype == torch.float32 for value in after.values())
    assert any(not torch.equal(after[name], value) for name, value in before.items())
    assert all(torch.isfinite(value).all() for value in after.values())


# -------------------------------------------------------------------------------------- transformers adapter methods


def test_transformers_adapter_methods_without_hf_peft(tmp_path, peft_hidden):
    model = integration.enable_adapter_methods(tiny_llama())
    inputs = _input_ids()
    with torch.no_grad():
        base_logits = model(inputs).logits
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="other")
    assert model.active_adapters() == ["other"]
    model.set_adapter("default")
    assert model.active_adapters() == ["default"]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".default." in name for name in trainable)
    with torch.no_grad():
        adapted = model(inputs).logits
        assert not torch.allclose(adapted, base_logits)
        model.disable_adapters()
        assert_close(model(inputs).logits, base_logits)
        model.enable_adapters()
        assert_close(model(inputs).logits, adapted)

    # save_pretrained of a model with adapters writes the active adapter only, in HF PEFT's format.
    model.save_pretrained(tmp_path)
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", "adapter_model.safetensors"}
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        f"base_model.model.{key}" for key in model.get_adapter_state_dict()
    }
    fresh = integration.enable_adapter_methods(tiny_llama())
    fresh.load_adapter(str(tmp_path), adapter_name="loaded")
    assert fresh.active_adapters() == ["loaded"]
    assert not any(param.requires_grad for param in fresh.parameters())
    with torch.no_grad():
        assert_close(fresh(inputs).logits, adapted)
    model.delete_adapter(["default", "other"])
    assert not hasattr(model, "peft_config")
    with pytest.raises(ValueError, match="no peftfast adapter"):
        model.set_adapter("default")


def test_adapter_methods_errors_name_the_problem():
    model = tiny_llama()
    integration.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'default' already exists"):
        integration.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['missing'\] not found"):
        integration.set_adapter(model, "missing")
    with pytest.raises(TypeError, match="peftfast PeftConfig"):
        integration.add_adapter(model, peft.LoraConfig(r=2, target_modules=["q_proj"]), "hf")


def test_adapter_saved_by_transformers_methods_loads_in_hf_peft(tmp_path):
    model = tiny_llama()
    integration.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    integration.save_adapter(model, tmp_path)
    inputs = _input_ids()
    with torch.no_grad():
        expected = model(inputs).logits
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
        assert_close(loaded(inputs).logits, expected)


# ------------------------------------------------------------------------------------------------------ auto loader


def _saved_base_and_adapter(tmp_path, task_type: str | None = "CAUSAL_LM") -> tuple[str, nn.Module]:
    base_dir = str(tmp_path / "base")
    tiny_llama().save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task_type)
    model = peftfast.get_peft_model(base, config).eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    return str(tmp_path / "adapter"), model


def test_auto_peft_model_for_causal_lm_loads_base_and_adapter(tmp_path):
    adapter_dir, model = _saved_base_and_adapter(tmp_path)
    loaded = peftfast.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert type(loaded) is peftfast.PeftModelForCausalLM
    inputs = _input_ids()
    with torch.no_grad():
        assert_close(loaded(input_ids=inputs).logits, model(input_ids=inputs).logits)
    with pytest.raises(ValueError, match="task_type 'CAUSAL_LM'"):
        peftfast.AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        peftfast.AutoPeftModel.from_pretrained(adapter_dir)


def test_auto_peft_model_without_task_type_uses_auto_mapping(tmp_path):
    adapter_dir, model = _saved_base_and_adapter(tmp_path, task_type=None)
    loaded = peftfast.AutoPeftModel.from_pretrained(adapter_dir)
    assert type(loaded.get_base_model()) is type(model.get_base_model())
    inputs = _input_ids()
    with torch.no_grad():
        assert_close(loaded(input_ids=inputs).logits, model(input_ids=inputs).logits)


# ---------------------------------------------------------------------------------------------------- accelerate


def _hf_peft_llama(**config) -> nn.Module:
    defaults = dict(r=4, lora_alpha=8, target_modules=TARGETS + ["embed_tokens"], init_lora_weights=False)
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(**(defaults | config)))


def _logits_and_grads(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    logits.square().mean().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        # HF PEFT has no lora_bias for embeddings: leave them out there.
        dict(lora_bias=True, use_rslora=True, target_modules=TARGETS),
        dict(alpha_pattern={"q_proj": 2}, rank_pattern={"v_proj": 2}, target_modules=TARGETS),
    ],
    ids=["with-embedding", "lora_bias-rslora", "patterns"],
)
def test_accelerate_hf_peft_model_same_outputs_and_gradients_reversible(options):
    model = _hf_peft_llama(**options)
    inputs = _input_ids()
    keys = list(model.state_dict())
    expected_logits, expected_grads = _logits_and_grads(model, inputs)

    report = peftfast.accelerate(model)
    assert len(report.accelerated) == 2 * len(TARGETS)
    assert all(name.endswith(tuple(TARGETS)) for name in report.accelerated)
    if "target_modules" in options:
        assert report.skipped == {}
    else:
        (embedding, reason), *_ = report.skipped.items()
        assert embedding.endswith("embed_tokens") and "Embedding" in reason and len(report.skipped) == 1
    logits, grads = _logits_and_grads(model, inputs)
    assert_close(logits, expected_logits, kind="kernel")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], kind="kernel")
    assert set(peftfast.speedup.accelerated_backends(model).values()) == {"torch"}
    assert list(model.state_dict()) == keys

    restored = peftfast.deaccelerate(model)
    assert sorted(restored) == sorted(report.accelerated)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert peftfast.speedup.accelerated_backends(model) == {}
    torch.testing.assert_close(_logits_and_grads(model, inputs)[0], expected_logits)


def test_accelerated_layers_fall_back_when_adapters_are_off_or_merged():
    model = _hf_peft_llama(target_modules=["q_proj", "v_proj"]).eval()
    inputs = _input_ids()
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids=inputs).logits
        adapted = model(input_ids=inputs).logits
        with peftfast.accelerated(model) as report:
            assert len(report.accelerated) == 4
            with model.disable_adapter():
                assert_close(model(input_ids=inputs).logits, base_logits)
            assert set(peftfast.speedup.accelerated_backends(model).values()) == {None}
            model.merge_adapter()
            assert_close(model(input_ids=inputs).logits, adapted, kind="kernel")
            model.unmerge_adapter()
            assert_close(model(input_ids=inputs).logits, adapted, kind="kernel")
            assert set(peftfast.speedup.accelerated_backends(model).values()) == {"torch"}
        assert peftfast.speedup.accelerated_backends(model) == {}


def test_accelerate_reports_what_it_cannot_take_over():
    model = _hf_peft_llama(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6])
    report = peftfast.accelerate(model)
    assert report.accelerated == []
    assert len(report.skipped) == 4
    assert all("ALoraLinearVariant" in reason and "plain LoRA and DoRA" in reason for reason in report.skipped.values())
    assert "ALoraLinearVariant" in str(report)
    with pytest.raises(TypeError, match="got a str"):
        peftfast.accelerate("not a model")
    # peftfast's own layers already run on peftfast's ops: nothing to take over, nothing to report.
    own = peftfast.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert peftfast.accelerate(own) == peftfast.AccelerationReport()


def test_accelerate_dora_refusals_name_the_adapter():
    """DoRA layers peftfast can't run exactly stay HF PEFT's, with the reason: a DoRA embedding, and a DoRA adapter
    on a Linear whose fan_in_fan_out was switched on (HF PEFT's DoRA then takes norms of the transposed weight),
    which plain LoRA does not mind (its forward never reads the flag)."""
    model = _hf_peft_llama(target_modules=["q_proj", "embed_tokens"], use_dora=True)
    layers = model.base_model.model.model.layers
    layers[1].self_attn.q_proj.fan_in_fan_out = True
    report = peftfast.accelerate(model)
    assert report.accelerated == ["base_model.model.model.layers.0.self_attn.q_proj"]
    assert "Embedding is not HF PEFT's plain LoRA Linear" in report.skipped["base_model.model.model.embed_tokens"]
    reason = report.skipped["base_model.model.model.layers.1.self_attn.q_proj"]
    assert "'default'" in reason and "fan_in_fan_out=True" in reason
    plain = _hf_peft_llama(target_modules=["q_proj"])
    plain.base_model.model.model.layers[0].self_attn.q_proj.fan_in_fan_out = True
    assert len(peftfast.accelerate(plain).accelerated) == 2


def _perturb_magnitudes(model: nn.Module) -> None:
    """Move DoRA magnitudes off their initial norms, so that DoRA differs from the LoRA it starts as."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=generator).to(param.dtype))


def _seeded_logits_and_grads(model: nn.Module, inputs: torch.Tensor):
    torch.manual_seed(11)
    return _logits_and_grads(model, inputs)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_accelerate_takes_over_hf_peft_dora_layers(dropout):
    """HF PEFT's DoRA Linear layers run on `ops.dora_linear`: the same outputs and gradients (magnitudes included) as
    HF PEFT's forward, in training mode with dropout drawn from the same seed, and the same state_dict."""
    model = _hf_peft_llama(target_modules=TARGETS, use_dora=True, lora_dropout=dropout)
    _perturb_magnitudes(model)
    model.train()
    inputs = _input_ids()
    keys = list(model.state_dict())
    expected_logits, expected_grads = _seeded_logits_and_grads(model, inputs)
    assert any("lora_magnitude_vector" in name for name in expected_grads)

    with peftfast.accelerated(model) as report:
        assert len(report.accelerated) == 2 * len(TARGETS) and report.skipped == {}
        logits, grads = _seeded_logits_and_grads(model, inputs)
        assert set(peftfast.speedup.accelerated_backends(model).values()) == {"torch"}
    assert_close(logits, expected_logits, kind="kernel")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], kind="kernel")
    assert list(model.state_dict()) == keys
    assert not any("forward" in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accelerate_dora_with_several_active_adapters(dtype):
    """One DoRA adapter (`ops.dora_linear`), and several active adapters, DoRA and plain, applied in HF PEFT's order;
    a bf16 base with fp32 adapters keeps HF PEFT's dtypes (outputs bf16, gradients fp32)."""
    model = peft.get_peft_model(
        tiny_llama().to(dtype),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True),
    )
    model.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", peft.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False, use_dora=True))
    _perturb_magnitudes(model)
    inputs = _input_ids()
    # Per decoder layer: DoRA (A, B, magnitude) on both; q_proj's plain (A, B) and v_proj's other DoRA adapter.
    for active, trained in ((["default"], 2 * (3 + 3)), (["default", "plain", "other"], 2 * (3 + 2 + 3 + 3))):
        model.base_model.set_adapter(active)
        expected_logits, expected_grads = _logits_and_grads(model, inputs)
        with peftfast.accelerated(model) as report:
            assert len(report.accelerated) == 4
            logits, grads = _logits_and_grads(model, inputs)
        assert logits.dtype == expected_logits.dtype == dtype
        assert_close(logits, expected_logits, kind="kernel")
        assert grads.keys() == expected_grads.keys() and len(grads) == trained
        for name, grad in grads.items():
            assert grad.dtype == expected_grads[name].dtype == torch.float32
            assert_close(grad, expected_grads[name], kind="kernel", dtype=dtype)


def test_accelerate_transformers_model_with_peft_integration_adapters():
    model = tiny_llama()
    model.add_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    inputs = _input_ids()
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        report = peftfast.accelerate(model)
        assert len(report.accelerated) == 4 and not report.skipped
        assert_close(model(input_ids=inputs).logits, expected, kind="kernel")


@pytest.mark.cpu_kernels
def test_accelerate_runs_taken_over_layers_on_triton():
    # A pipeline-like object (diffusers keeps its models in `components`); Triton's interpreter runs the kernels.
    unet = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, lora_dropout=0.1), MLP()
    )
    pipeline = types.SimpleNamespace(components={"unet": unet, "scheduler": object()})
    x = torch.randn(3, 11)
    unet.eval()
    with torch.no_grad():
        expected = unet(x)
        with peftfast.accelerated(pipeline) as report, ops.use_backend("triton"):
            assert sorted(report.accelerated) == ["unet.lin0", "unet.lin1"]
            actual = unet(x)
            assert peftfast.speedup.accelerated_backends(pipeline) == {"unet.lin0": "triton", "unet.lin1": "triton"}
    assert_close(actual, expected, kind="kernel")
    assert "forward" not in unet.lin0.__dict__


@pytest.mark.cpu_kernels
def test_accelerate_runs_hf_peft_dora_layers_on_triton():
    # The DoRA kernels in Triton's interpreter, forward and backward (magnitude, A and B gradients).
    mlp = MLP()
    mlp.relu = nn.Tanh()
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, use_dora=True), mlp
    )
    _perturb_magnitudes(model)
    x = torch.randn(5, 11)
    expected = model(x)
    expected.square().mean().backward()
    expected_grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    with peftfast.accelerated(model), ops.use_backend("triton"):
        actual = model(x)
        assert peftfast.speedup.accelerated_backends(model) == {"lin0": "triton", "lin1": "triton"}
        actual.square().mean().backward()
    assert_close(actual, expected, kind="kernel")
    for name, grad in expected_grads.items():
        assert_close(dict(model.named_parameters())[name].grad, grad, kind="kernel")
