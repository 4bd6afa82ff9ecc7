"""QLoRA: LoRA over bitsandbytes 4-bit (and 8-bit) layers against HF PEFT, training on both backends,
prepare_model_for_kbit_training, transformers' BitsAndBytesConfig loading, and the bad-input paths.

Model sizes keep every weight row a multiple of bitsandbytes' blocksize (64): bitsandbytes 0.50's own CPU dequantize
misreads other shapes (see test_nf4_kernels), and HF PEFT's outputs come from it.
"""

import subprocess
import sys
import warnings

import pytest
import torch
from models import quantize_to_4bit, tiny_llama
from tolerances import EXACT, KERNEL, assert_close

import peftfast
from peftfast import LoraConfig, get_peft_model, ops

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

DIMS = dict(hidden_size=64, intermediate_size=128)
IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))


def _quantized_llama(seed=1, **quantization):
    return quantize_to_4bit(tiny_llama(seed=seed, **DIMS), **quantization)


def _config(**overrides):
    return dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | overrides


FORMATS = {
    "nf4-nested-fp32": dict(quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32),
    "fp4-plain-fp32": dict(quant_type="fp4", compress_statistics=False, compute_dtype=torch.float32),
    "nf4-bf16storage-bf16": dict(
        quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16, compute_dtype=torch.bfloat16
    ),
    "fp4-nested-default-compute": dict(quant_type="fp4", compress_statistics=True, compute_dtype=None),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_same_outputs_as_hf_peft_both_ways(fmt, tmp_path):
    quantization = FORMATS[fmt]
    tolerance = EXACT[quantization["compute_dtype"] or torch.float32]
    ours = get_peft_model(_quantized_llama(**quantization), LoraConfig(**_config()))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is peftfast.tuners.lora.bnb.Linear4bit and repr(layer).startswith("lora.Linear4bit")
    ours.eval()
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
    assert ops.last_backend("lora_linear_4bit") == "torch"
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_quantized_llama(**quantization), tmp_path / "ours").eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, **tolerance)

    hf = peft.get_peft_model(_quantized_llama(seed=2, **quantization), peft.LoraConfig(**_config())).eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = peftfast.PeftModel.from_pretrained(_quantized_llama(seed=2, **quantization), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, hf(input_ids=IDS).logits, **tolerance)


@pytest.mark.cpu_kernels
def test_qlora_training_steps_agree_between_backends():
    compute_dtype = torch.bfloat16
    results = {}
    for backend in ("torch", "triton"):
        model = get_peft_model(
            _quantized_llama(seed=3, compute_dtype=compute_dtype),
            LoraConfig(**_config(target_modules=["q_proj", "v_proj", "down_proj"])),
        )
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        # 70 tokens: above the fused small-batch kernel's 64 rows, so training runs the dequantize-into-buffer path;
        # the last, 1-token step runs the fused kernel forward.
        batches = [torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        batches.append(batches[0][:1, :1])
        losses = []
        with ops.use_backend(backend):
            for ids in batches:
                loss = model(input_ids=ids, labels=ids if ids.shape[1] > 1 else None).logits.float().pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        assert set(model.backend_summary().values()) == {backend}
        results[backend] = (losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    tolerance = KERNEL[compute_dtype]
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **tolerance)
    for name, value in results["torch"][1].items():
        assert_close(results["triton"][1][name], value, kind="kernel", dtype=compute_dtype)


def test_merge_requantizes_like_hf_peft_and_unmerge_and_unload(tmp_path):
    quantization = FORMATS["nf4-nested-fp32"]
    ours = get_peft_model(_quantized_llama(**quantization), LoraConfig(**_config())).eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_quantized_llama(**quantization), tmp_path).eval()
    with pytest.warns(UserWarning, match="re-quantizes"):
        ours.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
    ours_layer = ours.base_model.model.model.layers[1].mlp.down_proj.get_base_layer()
    theirs_layer = theirs.base_model.model.model.layers[1].mlp.down_proj.get_base_layer()
    assert torch.equal(ours_layer.weight.data, theirs_layer.weight.data)
    assert ours_layer.weight.quant_state.nested and ours_layer.weight.quant_state.quant_type == "nf4"
    with torch.no_grad():
        merged = ours(input_ids=IDS).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(merged, theirs(input_ids=IDS).logits, **EXACT[torch.float32])
    with pytest.warns(UserWarning, match="re-quantizes"):
        ours.unmerge_adapter()
    assert not ours.base_model.model.model.layers[1].mlp.down_proj.merged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded = ours.merge_and_unload()
    assert type(unloaded.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit


def test_safe_merge_refuses_broken_adapter():
    model = get_peft_model(_quantized_llama(), LoraConfig(**_config()))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    packed_before = layer.get_base_layer().weight.data.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight.data, packed_before)


def test_cpu_packed_weight_falls_back_to_bitsandbytes():
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for CPU inference only on CPUs with AVX512-BF16")
    model = get_peft_model(_quantized_llama(**FORMATS["nf4-nested-fp32"], cpu_repack=True), LoraConfig(**_config()))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.eval()
    base_layer = layer.get_base_layer()
    x = torch.randn(3, 64)
    exact = ops.nf4_dequantize(base_layer.weight.data, base_layer.weight.quant_state)
    with torch.no_grad():
        base_layer(x)  # bitsandbytes repacks the weight in place on this eval, no-grad call
        state = base_layer.weight.quant_state
        assert state.packing_format_for_cpu
        packed = base_layer.weight.data.clone()
        dense = ops.nf4_dequantize(base_layer.weight.data, state)
        assert ops.last_backend("nf4_dequantize") == "bitsandbytes"
        # The repacked layout keeps absmax in bf16: close to, not equal to, the exact dequantization.
        torch.testing.assert_close(dense, exact, atol=0, rtol=2**-7)
        assert torch.equal(base_layer.weight.data, packed) and state.packing_format_for_cpu
        with pytest.raises(ValueError, match="CPU-packed layout"):
            ops.lora_linear_4bit(x, packed, state, None, torch.float32, [], [], [], [], [], False)
        # The layer runs bitsandbytes' own forward for that layout and adds the LoRA term (HF PEFT's computation).
        lora = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        torch.testing.assert_close(layer(x), base_layer(x) + lora, **EXACT[torch.float32])
        assert layer.last_backend == "torch" and ops.last_backend("lora_add") == "torch"


def test_bitsandbytes_config_loading_and_prepare_model_for_kbit_training(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=4, **DIMS).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )

    def load():
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization_config, device_map="cpu", dtype=torch.bfloat16
        )

    ours_base, theirs_base = load(), load()
    assert ours_base.is_loaded_in_4bit
    peftfast.prepare_model_for_kbit_training(ours_base)
    peft.prepare_model_for_kbit_training(theirs_base)
    ours_params = {n: (p.dtype, p.requires_grad) for n, p in ours_base.named_parameters()}
    assert ours_params == {n: (p.dtype, p.requires_grad) for n, p in theirs_base.named_parameters()}
    assert ours_params["model.norm.weight"] == (torch.float32, False)
    assert ours_params["model.layers.0.self_attn.q_proj.weight"] == (torch.uint8, False)
    assert ours_base.is_gradient_checkpointing and theirs_base.is_gradient_checkpointing

    model = get_peft_model(ours_base, LoraConfig(**_config()))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is peftfast.tuners.lora.bnb.Linear4bit
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_A["default"].weight.grad.abs().sum() > 0


def _int8_mlp(seed):
    from models import MLP

    torch.manual_seed(seed)
    dense = MLP(d_in=16, d_hidden=32, d_out=8)
    for name in ("lin0", "lin1"):
        linear = getattr(dense, name)
        int8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=0.0)
        int8.load_state_dict(linear.state_dict())
        setattr(dense, name, int8.to("cpu"))
    dense.is_loaded_in_8bit = True
    return dense


def test_8bit_layers_forward_and_merge():
    """Against the bare 8-bit layer plus the LoRA term (HF PEFT's 8-bit wrapper is not the reference here: on CPU its
    wrapped base layer no longer gives the bare layer's outputs)."""
    x = torch.randn(5, 16)
    model = get_peft_model(_int8_mlp(0), LoraConfig(**_config(target_modules=["lin0", "lin1"])))
    layer = model.base_model.model.lin0
    assert type(layer) is peftfast.tuners.lora.bnb.Linear8bitLt
    bare = _int8_mlp(0).lin0
    with torch.no_grad():
        lora = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        torch.testing.assert_close(layer(x), bare(x) + lora, **EXACT[torch.float32])
        unmerged = layer(x)
        delta = layer.get_delta_weight("default")
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
        scales = bare.state.SCB if bare.state.SCB is not None else bare.weight.SCB
        dense = bnb.functional.int8_vectorwise_dequant(bare.weight.data, scales) + delta
        expected = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to("cpu")
        assert torch.equal(layer.get_base_layer().weight.data, expected.data)
        merged = layer(x)
        torch.testing.assert_close(merged, unmerged, atol=0.02, rtol=0.02)
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.unmerge()
        torch.testing.assert_close(layer(x), unmerged, atol=0.02, rtol=0.02)


def test_import_without_bitsandbytes_and_a_clear_error_when_targeting_its_layers():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, peftfast\n"
        "Linear4bit = type('Linear4bit', (torch.nn.Linear,), {'__module__': 'bitsandbytes.nn.modules'})\n"
        "model = torch.nn.Sequential(Linear4bit(8, 8))\n"
        "try:\n"
        "    peftfast.get_peft_model(model, peftfast.LoraConfig(target_modules=['0']))\n"
        "except ImportError as error:\n"
        "    print('ERROR', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERROR" in result.stdout and "pip install bitsandbytes" in result.stdout


@pytest.mark.parametrize("fmt", ["nf4-bf16storage-bf16", "nf4-nested-fp32"])
def test_fresh_adapters_equal_hf_peft_for_the_same_seed(fmt):
    # Under autocast_adapter_dtype HF PEFT rounds a new adapter through the layer's compute_dtype before upcasting.
    def run(lib):
        base = _quantized_llama(**FORMATS[fmt])
        torch.manual_seed(3)
        model = lib.get_peft_model(base, lib.LoraConfig(**_config()))
        return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}

    ours, theirs = run(peftfast), run(peft)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype == torch.float32, name
        assert torch.equal(ours[name], value), name
