"""`peftfast.accelerate` over a real diffusers pipeline whose LoRA layers `load_lora_weights` made through HF PEFT:
a tiny StableDiffusionPipeline built from configs (no hub downloads), run on Triton's interpreter without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.utils import get_peft_model_state_dict  # noqa: E402
from tolerances import assert_close  # noqa: E402

import peftfast  # noqa: E402
from peftfast import ops  # noqa: E402

PROMPT = "a cat"


def _tokenizer(directory) -> transformers.CLIPTokenizer:
    # Single-character BPE vocabulary without merges: enough to tokenize lower-case prompts.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=8)


def _unet() -> diffusers.UNet2DConditionModel:
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def _pipeline(directory) -> diffusers.StableDiffusionPipeline:
    tokenizer = _tokenizer(directory)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=2,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=transformers.CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=_unet(),
        # Stable Diffusion's schedule; one "trailing" step runs the UNet at t=999, where its output counts most.
        scheduler=diffusers.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="trailing",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_random_lora(pipe: diffusers.StableDiffusionPipeline, directory) -> None:
    """Random (init_lora_weights=False) LoRA weights for copies of the pipeline's UNet and text encoder, saved in
    diffusers' format; the conv1 targets give HF PEFT LoRA Conv2d layers, which peftfast leaves alone."""
    unet = diffusers.UNet2DConditionModel.from_config(pipe.unet.config)
    targets = ["to_v", "to_out.0", "conv1"]
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    text_encoder = transformers.CLIPTextModel(pipe.text_encoder.config)
    text_encoder.add_adapter(peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
    )


def _generate(pipe: diffusers.StableDiffusionPipeline, **kwargs) -> torch.Tensor:
    return pipe(
        PROMPT,
        num_inference_steps=1,
        guidance_scale=1.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kwargs,
    ).images


def _names(pipe: diffusers.StableDiffusionPipeline, component: str, suffix: str | tuple[str, ...]) -> list[str]:
    return [f"{component}.{name}" for name, _ in getattr(pipe, component).named_modules() if name.endswith(suffix)]


@pytest.mark.cpu_kernels
def test_accelerate_stable_diffusion_pipeline_after_load_lora_weights(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    pipe = _pipeline(tmp_path / "tokenizer")
    base = _generate(pipe)
    _save_random_lora(pipe, tmp_path / "lora")
    pipe.load_lora_weights(tmp_path / "lora")
    expected = _generate(pipe)
    half_scale = _generate(pipe, cross_attention_kwargs={"scale": 0.5})
    assert (expected - base).abs().max() > 1e-1 and (half_scale - expected).abs().max() > 1e-1
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    keys = {name: list(module.state_dict()) for name, module in modules.items()}

    report = peftfast.accelerate(pipe)
    linears = _names(pipe, "unet", (".to_v", ".to_out.0")) + _names(pipe, "text_encoder", ".v_proj")
    assert sorted(report.accelerated) == sorted(linears) and len(linears) == 17
    convs = _names(pipe, "unet", ".conv1")
    assert sorted(report.skipped) == sorted(convs) and len(convs) == 8
    assert all("lora.layer.Conv2d" in reason for reason in report.skipped.values())
    with ops.use_backend("triton"):
        actual = _generate(pipe)
    assert set(peftfast.speedup.accelerated_backends(pipe).values()) == {"triton"}
    assert_close(actual, expected, kind="kernel")
    # diffusers' LoRA scale reaches the taken-over layers through HF PEFT's scaling, as it does HF PEFT's own forward.
    assert_close(_generate(pipe, cross_attention_kwargs={"scale": 0.5}), half_scale, kind="kernel")
    assert keys == {name: list(module.state_dict()) for name, module in modules.items()}

    assert sorted(peftfast.deaccelerate(pipe)) == sorted(report.accelerated)
    assert peftfast.speedup.accelerated_backends(pipe) == {}
    torch.testing.assert_close(_generate(pipe), expected)
