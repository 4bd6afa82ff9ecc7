"""The weight- and data-driven LoRA initialisations (`init_lora_weights` = "pissa", "pissa_niter_[n]", "olora",
"orthogonal", "loftq", "eva", "corda", "lora_ga") against HF PEFT 0.21.2: the same factors and base weights after
initialisation, adapter files (also the ones converted to plain LoRA) that load in either library with the same
outputs, the same configs, and the same refusals; models are left as they were when building an adapter fails.

The exact PiSSA, LoftQ and CorDA-IPM factors come from a truncated SVD, whose singular vectors may have the opposite
sign of PEFT's full SVD: those factors are compared after aligning the sign of each (row of A, column of B) pair, and
B @ A and the base weights directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import types
import warnings

import pytest
import torch
from models import MLP, ConvNet, EmbeddingModel, quantize_to_4bit, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from tolerances import assert_close
from torch import nn

import peftfast
from peftfast.bench import cuda_means_cpu
from peftfast.tuners.lora.corda import preprocess_corda
from peftfast.tuners.lora.init import top_singular_triplets

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

LIBS = {"peft": peft, "peftfast": peftfast}
TARGETS = ["lin0", "lin1", "lin2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Thousands of LAPACK calls on tiny matrices: with several OpenMP threads on a busy machine each one waits for
    # thread wake-ups (~20 ms instead of ~20 us). The results don't depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(dtype=torch.float32, **sizes) -> MLP:
    torch.manual_seed(0)
    return MLP(**sizes).to(dtype)


def _peft_model(lib, base: nn.Module, **config):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS) | config
    torch.manual_seed(1)
    return lib.get_peft_model(base, lib.LoraConfig(**config))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}


def _aligned(theirs_A, theirs_B, ours_A, ours_B):
    """Our factors with each (row of A, column of B) pair's sign flipped to agree with theirs."""
    signs = torch.sign((theirs_A.float() * ours_A.float()).sum(dim=1))
    signs[signs == 0] = 1
    return ours_A * signs[:, None].to(ours_A.dtype), ours_B * signs.to(ours_B.dtype)


def _assert_same_layers(theirs: nn.Module, ours: nn.Module, kind: str = "exact", signs: bool = False, dtype=None):
    """Same base weights and factors (dtypes included) in every LoRA layer of the two models; `dtype` picks the
    tolerance (a bf16 model's fp32 factors hold bf16-rounded values). Quantized base weights must be equal."""
    theirs_layers, ours_layers = _lora_layers(theirs), _lora_layers(ours)
    assert theirs_layers.keys() == ours_layers.keys()
    for name, layer in ours_layers.items():
        other = theirs_layers[name]
        for adapter in layer.lora_A:
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            their_A, their_B = other.lora_A[adapter].weight, other.lora_B[adapter].weight
            assert (A.dtype, B.dtype, A.shape, B.shape) == (their_A.dtype, their_B.dtype, their_A.shape, their_B.shape)
            if signs:
                A, B = _aligned(their_A, their_B, A, B)
            assert_close(A, their_A, kind, dtype)
            assert_close(B, their_B, kind, dtype)
        base, their_base = layer.get_base_layer().weight, other.get_base_layer().weight
        assert base.dtype == their_base.dtype
        if base.dtype.is_floating_point and not hasattr(base, "quant_state"):
            assert_close(base, their_base, kind, dtype)
        else:
            assert torch.equal(base.data, their_base.data)


def _reconstruction(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """W_res + scaling * B @ A, in fp32, as [out, in]."""
    A, B = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    weight = layer.get_base_layer().weight.float()
    weight = weight.T if layer.fan_in_fan_out else weight
    return weight + layer.scaling[adapter] * (B @ A)


@contextlib.contextmanager
def _peft_loftq_on_this_machine():
    """HF PEFT's LoftQ config check asks for scipy (unused by LoftQ) and its LoftQ for a GPU: grant both."""
    import importlib.util

    find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch, cuda_means_cpu():
        patch.setattr(
            importlib.util, "find_spec", lambda name, *args: object() if name == "scipy" else find_spec(name, *args)
        )
        yield


def _peft_corda():
    # HF PEFT's corda module imports `attr` (the attrs package) only for a dataclass decorator: without attrs, lend
    # it the standard one for that import, and take it back so nothing else mistakes it for attrs.
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ModuleNotFoundError as error:
        if error.name != "attr":
            raise
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
        try:
            from peft.tuners.lora.corda import preprocess_corda
        finally:
            del sys.modules["attr"]
    return preprocess_corda


# The initialisations that run on a plain model, and the tolerance of each against PEFT.
PLAIN_INITS = {"pissa": "kernel", "pissa_niter_3": "exact", "olora": "kernel", "orthogonal": "exact", "eva": "exact"}


@pytest.mark.parametrize("init", list(PLAIN_INITS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weights_after_init_match_peft(init, dtype):
    models = {name: _peft_model(lib, _mlp(dtype), init_lora_weights=init) for name, lib in LIBS.items()}
    theirs, ours = models["peft"], models["peftfast"]
    kind = PLAIN_INITS[init] if dtype == torch.float32 else "exact"
    _assert_same_layers(theirs, ours, kind=kind, signs=init == "pissa", dtype=dtype)
    original = _mlp(dtype)
    for name, layer in _lora_layers(ours).items():
        if init in ("pissa", "pissa_niter_3", "olora"):
            # The adapter starts as the part of W it took out: W_res + s B A == W.
            assert not torch.equal(layer.get_base_layer().weight, original.get_submodule(name.split(".")[-1]).weight)
            expected = original.get_submodule(name.split(".")[-1]).weight.float()
            assert_close(_reconstruction(layer), expected, "kernel" if dtype == torch.float32 else "exact", dtype)


def _gpt2_model(lib, init: str):
    torch.manual_seed(1)
    config = lib.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(tiny_gpt2(), config)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_conv1d_layers_of_gpt2(init):
    # transformers' Conv1D stores W as [in, out] (fan_in_fan_out): the factors and the residual must be transposed.
    ours = _gpt2_model(peftfast, init)
    if init == "olora":
        # HF PEFT factors the stored [in, out] matrix, so its A and B have each other's shapes and its forward
        # fails; peftfast factors W itself.
        with pytest.raises(RuntimeError):
            _gpt2_model(peft, init)(input_ids=torch.tensor([[1, 2, 3]]))
    else:
        _assert_same_layers(_gpt2_model(peft, init), ours, "kernel", signs=init == "pissa")
    if init != "orthogonal":
        layer = ours.base_model.model.transformer.h[0].attn.c_attn
        assert_close(_reconstruction(layer), tiny_gpt2().transformer.h[0].attn.c_attn.weight.T, "kernel")
    assert torch.isfinite(ours(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_larger_than_a_dimension_matches_peft(init, tmp_path):
    # r=30 > min(out, in) of every layer: PEFT keeps min(r, out, in) components (and the layer's r for the scaling).
    models = {name: _peft_model(lib, _mlp(), r=30, init_lora_weights=init) for name, lib in LIBS.items()}
    ours = models["peftfast"]
    assert ours.base_model.model.lin2.lora_A["default"].weight.shape == (5, 23)
    _assert_same_layers(models["peft"], ours, "kernel", signs=init == "pissa")
    for name, layer in _lora_layers(ours).items():
        assert_close(_reconstruction(layer), _mlp().get_submodule(name.split(".")[-1]).weight, "kernel")
        if init == "pissa":
            # Every component is taken (PiSSA divides them by the scaling): nothing is left in the base.
            assert layer.get_base_layer().weight.abs().max() < 1e-5
    ours.save_pretrained(tmp_path)
    x = torch.randn(3, 11)
    assert_close(peft.PeftModel.from_pretrained(_mlp(), tmp_path)(x), ours(x), "kernel")


def test_embeddings_and_convolutions_follow_peft():
    # PEFT gives embeddings their standard initialisation for these, and refuses them on convolutions (LoRA-GA
    # falls back to the standard one there).
    models = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        base = EmbeddingModel()
        torch.manual_seed(1)
        models[name] = lib.get_peft_model(
            base, lib.LoraConfig(r=4, target_modules=["emb", "lin"], init_lora_weights="olora")
        )
    theirs, ours = (models[name].state_dict() for name in LIBS)
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert_close(value, theirs[key], "kernel")
    for lib in LIBS.values():
        with pytest.raises(ValueError):
            lib.get_peft_model(ConvNet(), lib.LoraConfig(r=4, target_modules=["conv1d"], init_lora_weights="pissa"))
    conv = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        base = ConvNet()
        torch.manual_seed(1)
        config = lib.LoraConfig(r=4, target_modules=["conv1d"], init_lora_weights="lora_ga")
        conv[name] = lib.get_peft_model(base, config).state_dict()
    for key, value in conv["peftfast"].items():
        assert_close(value, conv["peft"][key])
    with pytest.raises(ValueError, match="loftq.*'emb'"):
        peftfast.get_peft_model(
            EmbeddingModel(),
            peftfast.LoraConfig(target_modules=["emb"], init_lora_weights="loftq", loftq_config=peftfast.LoftQConfig()),
        )


def _train_a_little(model: nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
@pytest.mark.parametrize("direction", ["peft->peftfast", "peftfast->peft"])
def test_adapter_files_load_in_the_other_library(init, direction, tmp_path):
    # Loading an unconverted adapter re-runs its initialisation on the original base (moving W_res out again), so
    # the trained adapter applies to the same W_res in either library.
    source, target = (LIBS[name] for name in direction.split("->"))
    trained = _peft_model(source, _mlp(), init_lora_weights=init)
    _train_a_little(trained)
    trained.save_pretrained(tmp_path)
    x = torch.randn(5, 11)
    loaded = target.PeftModel.from_pretrained(_mlp(), tmp_path)
    assert_close(loaded(x), trained(x), "kernel")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init


def _config_fields(folder) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    return {key: config[key] for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern")}


def _initialised(lib, init: str, **config):
    """An MLP with an adapter of initialisation `init`, preprocessed first for CorDA and LoRA-GA."""
    base = _mlp()
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init) | config
    if init == "corda":
        config["corda_config"] = lib.tuners.lora.config.CordaConfig()
        lora_config = lib.LoraConfig(**config)
        (preprocess_corda if lib is peftfast else _peft_corda())(base, lora_config, run_model=_calibration_run(base))
    elif init == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga as peft_preprocess

        lora_config = lib.LoraConfig(**config, lora_ga_config=lib.LoraGAConfig())
        batch = torch.randn(6, 11, generator=torch.Generator().manual_seed(4))
        preprocess = peftfast.preprocess_loraga if lib is peftfast else peft_preprocess
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preprocess(base, lora_config, lambda: base(batch).sum().backward())
    else:
        lora_config = lib.LoraConfig(**config)
    torch.manual_seed(1)
    return lib.get_peft_model(base, lora_config)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda", "lora_ga"])
def test_conversion_to_plain_lora_matches_peft(init, tmp_path):
    # save_pretrained(path_initial_model_for_weight_conversion=...) turns a trained adapter whose initialisation
    # moved part of W into it into a LoRA of twice the rank on the *original* weights: both libraries write the same
    # files, and each one's file gives the trained model's outputs in either library.
    x = torch.randn(5, 11)
    outputs, folders = {}, {}
    for name, lib in LIBS.items():
        model = _initialised(lib, init, rank_pattern={"lin2": 2}, alpha_pattern={"lin1": 3})
        model.save_pretrained(tmp_path / name / "initial")
        _train_a_little(model)
        outputs[name] = model(x)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(
                tmp_path / name / "converted", path_initial_model_for_weight_conversion=str(tmp_path / name / "initial")
            )
        assert list(model.peft_config) == ["default"]
        if name == "peftfast":
            # Saving changes nothing in the model (HF PEFT's conversion leaves it in eval mode).
            assert model.training
        folders[name] = tmp_path / name / "converted"
        # HF PEFT rewrites the initial adapter's config (init_lora_weights=True); peftfast only reads that folder.
        assert _config_fields(tmp_path / name / "initial")["init_lora_weights"] == (True if name == "peft" else init)
    assert _config_fields(folders["peft"]) == _config_fields(folders["peftfast"])
    assert _config_fields(folders["peftfast"])["r"] == 8
    assert _config_fields(folders["peftfast"])["rank_pattern"] == {"lin2": 4}
    theirs, ours = (load_file(folders[name] / "adapter_model.safetensors") for name in LIBS)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    if init in ("pissa_niter_2", "olora", "lora_ga"):
        # Factors without a sign choice: the same "training" gives the same files.
        for key, value in ours.items():
            assert_close(value, theirs[key], "kernel")
    for source in LIBS:
        for lib in LIBS.values():
            loaded = lib.PeftModel.from_pretrained(_mlp(), folders[source])
            assert_close(loaded(x), outputs[source], "kernel")


def test_conversion_refusals(tmp_path):
    for lib in LIBS.values():
        model = _peft_model(lib, _mlp(), init_lora_weights="pissa", use_rslora=True, rank_pattern={"lin1": 2})
        model.save_pretrained(tmp_path / "initial")
        with pytest.raises(ValueError, match="rank_pattern"):
            model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))


@pytest.mark.parametrize(
    "bits,iterations,dtype", [(4, 1, torch.float32), (4, 2, torch.bfloat16), (8, 2, torch.float32)]
)
def test_loftq_matches_peft(bits, iterations, dtype):
    # Rows of 64 keep bitsandbytes' CPU path on its standard layout.
    sizes = dict(d_in=64, d_hidden=64, d_out=5)
    loftq = dict(loftq_bits=bits, loftq_iter=iterations)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq")
    with _peft_loftq_on_this_machine():
        theirs = _peft_model(peft, _mlp(dtype, **sizes), **config, loftq_config=peft.LoftQConfig(**loftq))
    ours = _peft_model(peftfast, _mlp(dtype, **sizes), **config, loftq_config=peftfast.LoftQConfig(**loftq))
    _assert_same_layers(theirs, ours, "kernel", signs=True, dtype=dtype)
    # The base holds exactly representable quantized values: quantizing them again changes nothing.
    weight = ours.base_model.model.lin1.base_layer.weight.float()
    if bits == 4 and dtype == torch.float32:
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        assert torch.equal(peftfast.ops.nf4_dequantize(packed, state), weight)


@pytest.mark.parametrize("direction", ["peft->peftfast", "peftfast->peft"])
def test_loftq_adapter_files_load_in_the_other_library(direction, tmp_path):
    # Loading a LoftQ adapter quantizes the original base weights again (in either library), then loads the factors.
    source, target = (LIBS[name] for name in direction.split("->"))
    sizes = dict(d_in=64, d_hidden=64, d_out=5)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq")
    with _peft_loftq_on_this_machine():
        trained = _peft_model(source, _mlp(**sizes), **config, loftq_config=source.LoftQConfig(loftq_iter=2))
        _train_a_little(trained)
        trained.save_pretrained(tmp_path)
        loaded = target.PeftModel.from_pretrained(_mlp(**sizes), tmp_path)
    x = torch.randn(4, 64)
    assert_close(loaded(x), trained(x), "kernel")


def test_loftq_refusals():
    with pytest.raises(ValueError, match="loftq_config"):
        peftfast.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits"):
        peftfast.LoraConfig(init_lora_weights="loftq", loftq_config=peftfast.LoftQConfig(loftq_bits=3))
    quantized = quantize_to_4bit(_mlp(d_in=64, d_hidden=64))
    config = peftfast.LoraConfig(
        target_modules=["lin1"], init_lora_weights="loftq", loftq_config=peftfast.LoftQConfig()
    )
    with pytest.raises(ValueError, match="replace_lora_weights_loftq"):
        peftfast.get_peft_model(quantized, config)
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit LoRA layer"):
        peftfast.replace_lora_weights_loftq(_peft_model(peftfast, _mlp()), model_path="unused")


def test_replace_lora_weights_loftq_matches_peft(tmp_path):
    sizes = dict(d_in=64, d_hidden=64, d_out=5)
    save_file({k: v.contiguous() for k, v in _mlp(**sizes).state_dict().items()}, tmp_path / "model.safetensors")
    models = {}
    for name, lib in LIBS.items():
        model = _peft_model(lib, quantize_to_4bit(_mlp(**sizes)), target_modules=["lin0", "lin1"])
        with cuda_means_cpu():
            lib.replace_lora_weights_loftq(model, model_path=str(tmp_path))
        models[name] = model
    _assert_same_layers(models["peft"], models["peftfast"], "kernel", signs=True)
    # A callback that declines keeps the factors there were.
    model = _peft_model(peftfast, quantize_to_4bit(_mlp(**sizes)), target_modules=["lin0", "lin1"])
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    seen = []
    peftfast.replace_lora_weights_loftq(model, str(tmp_path), callback=lambda m, name: seen.append(name) or False)
    assert seen == ["lin0", "lin1"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _int8_mlp() -> MLP:
    dense = _mlp(d_in=16, d_hidden=32, d_out=8)
    for name in ("lin0", "lin1"):
        linear = getattr(dense, name)
        int8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=0.0)
        int8.load_state_dict(linear.state_dict())
        setattr(dense, name, int8.to("cpu"))
    return dense


@pytest.mark.parametrize("bits", [4, 8])
def test_olora_on_a_quantized_base_matches_peft(bits):
    # OLoRA dequantizes, factors, and quantizes the residual again, in the layer's own format.
    def base():
        return quantize_to_4bit(_mlp(d_in=64, d_hidden=64)) if bits == 4 else _int8_mlp()

    targets = TARGETS if bits == 4 else ["lin0", "lin1"]
    models = {
        name: _peft_model(lib, base(), init_lora_weights="olora", target_modules=targets) for name, lib in LIBS.items()
    }
    _assert_same_layers(models["peft"], models["peftfast"], "kernel")
    for name, layer in _lora_layers(models["peftfast"]).items():
        state = getattr(layer.get_base_layer().weight, "quant_state", None)
        if state is not None:
            assert torch.equal(
                state.absmax, _lora_layers(models["peft"])[name].get_base_layer().weight.quant_state.absmax
            )
    x = torch.randn(3, 64 if bits == 4 else 16)
    assert_close(models["peftfast"](x), models["peft"](x), "kernel")
    for lib in LIBS.values():
        with pytest.raises(TypeError, match="(?i)float32, float16,? or bfloat16"):
            _peft_model(lib, base(), init_lora_weights="pissa", target_modules=targets)


def _calibration_run(model: nn.Module):
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(1, 9, 11, generator=generator) for _ in range(3)]

    def run() -> None:
        for batch in batches:
            model(batch)

    return run


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method, tmp_path):
    preprocess = {"peft": _peft_corda(), "peftfast": preprocess_corda}
    models = {}
    for name, lib in LIBS.items():
        base = _mlp()
        sub = lib.tuners.lora.config.CordaConfig(corda_method=method, cache_file=str(tmp_path / name / "cache.pt"))
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda", corda_config=sub)
        preprocess[name](base, config, run_model=_calibration_run(base))
        torch.manual_seed(1)
        models[name] = lib.get_peft_model(base, config)
        assert not hasattr(models[name].base_model.model.lin0.base_layer, "eigens")
    _assert_same_layers(models["peft"], models["peftfast"], "kernel", signs=True)
    # Each library's cache file, read by the other, gives its own decomposition.
    for source, target in (("peft", "peftfast"), ("peftfast", "peft")):
        base = _mlp()
        sub = LIBS[target].tuners.lora.config.CordaConfig(
            corda_method=method, cache_file=str(tmp_path / source / "cache.pt")
        )
        config = LIBS[target].LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda", corda_config=sub
        )
        preprocess[target](base, config)
        torch.manual_seed(1)
        _assert_same_layers(models[source], LIBS[target].get_peft_model(base, config), "exact")


@pytest.mark.parametrize(
    "direction,scale", [("ArBr", "stable"), ("A2rBr", "weight_svd"), ("ArB2r", "gd_scale"), ("random", "unit")]
)
def test_lora_ga_matches_peft(direction, scale, tmp_path):
    from peft.tuners.lora.loraga import preprocess_loraga as peft_preprocess

    preprocess = {"peft": peft_preprocess, "peftfast": peftfast.preprocess_loraga}
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(6, 11, generator=generator) for _ in range(2)]
    models = {}
    for name, lib in LIBS.items():
        base = _mlp()
        ga = lib.LoraGAConfig(direction=direction, scale=scale)
        config = lib.LoraConfig(
            r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=ga
        )

        def train_step(base=base) -> None:
            for batch in batches:
                base(batch).square().mean().backward()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preprocess[name](base, config, train_step, cache_file=str(tmp_path / name / "grads.pt"))
        assert all(not p.requires_grad or p.grad is None for p in base.parameters())
        torch.manual_seed(1)
        models[name] = lib.get_peft_model(base, config)
    _assert_same_layers(models["peft"], models["peftfast"])
    # PEFT's cache file gives the same gradients here.
    base = _mlp()
    ga = peftfast.LoraGAConfig(direction=direction, scale=scale)
    config = peftfast.LoraConfig(
        r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=ga
    )
    peftfast.preprocess_loraga(base, config, train_step=None, cache_file=str(tmp_path / "peft" / "grads.pt"))
    torch.manual_seed(1)
    _assert_same_layers(models["peft"], peftfast.get_peft_model(base, config))


def test_lora_ga_refusals():
    base = _mlp()
    config = peftfast.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="lora_ga_config"):
        peftfast.preprocess_loraga(base, config, lambda: None)
    config.lora_ga_config = peftfast.LoraGAConfig()
    peftfast.preprocess_loraga(base, config, lambda: base(torch.randn(2, 11)).sum().backward())
    # r=4 takes 8 gradient directions, more than the 5 outputs of lin2 have.
    with pytest.raises(ValueError, match="2 \\* r.*'lin2'"):
        peftfast.get_peft_model(base, config)
    assert all(hasattr(module, "_peft_loraga_grad") for module in (base.lin0, base.lin1, base.lin2))
    with pytest.raises(ValueError, match="quantized"):
        peftfast.preprocess_loraga(quantize_to_4bit(_mlp(d_in=64, d_hidden=64)), config, lambda: None)


def _eva_batches():
    generator = torch.Generator().manual_seed(5)
    batches = [
        {"input_ids": torch.randint(0, 101, (2, 24), generator=generator), "attention_mask": torch.ones(2, 24).long()}
        for _ in range(4)
    ]
    batches[1]["attention_mask"][0, 19:] = 0
    batches[2]["labels"] = batches[2]["input_ids"].masked_fill(batches[2]["input_ids"] < 30, -100)
    return batches


def test_eva_matches_peft(tmp_path):
    batches = _eva_batches()
    models = {}
    for name, lib in LIBS.items():
        eva = lib.EvaConfig(rho=2.0, tau=0.9)
        config = lib.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
            init_lora_weights="eva",
            eva_config=eva,
            rank_pattern={"down_proj": 2},
        )
        torch.manual_seed(1)
        model = lib.get_peft_model(tiny_llama(), config, low_cpu_mem_usage=True)
        lib.initialize_lora_eva_weights(model, batches, show_progress_bar=False)
        models[name] = model
    theirs, ours = models["peft"], models["peftfast"]
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert_close(value, theirs.state_dict()[key])
    fields = ("rank_pattern", "alpha_pattern")
    assert {f: getattr(ours.peft_config["default"], f) for f in fields} == {
        f: getattr(theirs.peft_config["default"], f) for f in fields
    }
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
    # The adapter with its redistributed ranks loads in the other library with the same outputs, both ways.
    ids = batches[0]["input_ids"]
    for source, target in ((ours, peft), (theirs, peftfast)):
        folder = tmp_path / type(source).__module__.split(".")[0]
        source.save_pretrained(folder)
        loaded = target.PeftModel.from_pretrained(tiny_llama(), folder)
        assert_close(loaded(input_ids=ids).logits, source(input_ids=ids).logits, "kernel")


def test_eva_from_a_state_dict_and_refusals():
    config = peftfast.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights="eva")
    model = peftfast.get_peft_model(_mlp(), config)
    components = {"base_model.model.lin0": torch.randn(3, 11), "base_model.model.lin1": torch.randn(0, 23)}
    peftfast.initialize_lora_eva_weights(model, eva_state_dict=components)
    assert torch.equal(model.base_model.model.lin0.lora_A["default"].weight, components["base_model.model.lin0"])
    assert model.base_model.model.lin0.lora_B["default"].weight.abs().max() == 0
    assert type(model.base_model.model.lin1) is nn.Linear  # rank 0: no adapter left
    assert model.peft_config["default"].rank_pattern == {"lin0": 3}
    assert model.peft_config["default"].alpha_pattern == {"lin0": 12.0}
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        peftfast.initialize_lora_eva_weights(_peft_model(peftfast, _mlp()), eva_state_dict={})
    with pytest.raises(ValueError, match="dataloader"):
        peftfast.initialize_lora_eva_weights(peftfast.get_peft_model(_mlp(), config))


class _LinearThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(11, 23)
        self.lin1 = nn.Linear(23, 23)
        self.conv = nn.Conv1d(3, 6, 3)


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_failed_initialisation_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = _LinearThenConv()
    before = _parameters(model)
    config = peftfast.LoraConfig(r=4, target_modules=["lin0", "lin1", "conv"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="'conv'"):
        peftfast.get_peft_model(model, config)
    assert _parameters(model).keys() == before.keys()
    assert all(torch.equal(param, before[name]) for name, param in _parameters(model).items())
    # CorDA's decompositions stay on the layers until an adapter is built from them.
    base = _mlp()
    sub = peftfast.tuners.lora.config.CordaConfig()
    corda = peftfast.LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights="corda", corda_config=sub)
    preprocess_corda(base, corda, run_model=_calibration_run(base))
    del base.lin1.eigens
    weights = _parameters(base)
    with pytest.raises(ValueError, match="no CorDA decomposition on module 'lin1'"):
        peftfast.get_peft_model(base, corda)
    assert hasattr(base.lin0, "eigens")
    assert all(torch.equal(param, weights[name]) for name, param in _parameters(base).items())
    # Loading a PiSSA adapter whose file lacks a weight: the base it re-ran PiSSA on is put back too.
    saved = _peft_model(peftfast, _mlp(), init_lora_weights="pissa")
    saved.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    del weights["base_model.model.lin2.lora_B.weight"]
    save_file(weights, tmp_path / "adapter_model.safetensors")
    base = _mlp()
    with pytest.raises(ValueError, match="lacks weights"):
        peftfast.PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(param, _parameters(_mlp())[name]) for name, param in _parameters(base).items())


def test_low_cpu_mem_usage_loads_an_unconverted_pissa_adapter(tmp_path):
    # HF PEFT fails here (it assigns the SVD factors to meta tensors); peftfast moves W_res out and loads the rest.
    trained = _peft_model(peftfast, _mlp(), init_lora_weights="pissa")
    _train_a_little(trained)
    trained.save_pretrained(tmp_path)
    x = torch.randn(4, 11)
    loaded = peftfast.PeftModel.from_pretrained(_mlp(), tmp_path, low_cpu_mem_usage=True)
    assert_close(loaded(x), trained(x), "kernel")


def test_config_matches_peft_and_refuses_like_it(tmp_path):
    for init in ["pissa", "pissa_niter_4", "olora", "orthogonal", "eva", "corda", "lora_ga", "OLoRA"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.LoraConfig(init_lora_weights=init).to_dict()
            ours = peftfast.LoraConfig(init_lora_weights=init).to_dict()
        for field in ("init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config"):
            assert ours[field] == theirs[field], (init, field)
    with pytest.warns(UserWarning, match="loftq_config"):
        config = peftfast.LoraConfig(init_lora_weights="pissa", loftq_config=peftfast.LoftQConfig())
    assert config.loftq_config == {}
    with pytest.raises(NotImplementedError, match="mica"):
        peftfast.LoraConfig(init_lora_weights="mica")
    with pytest.raises(ValueError, match="pissa_niter_x"):
        peftfast.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match="lora_bias"):
        peftfast.LoraConfig(init_lora_weights="pissa", lora_bias=True)
    with pytest.raises(ValueError, match="rho"):
        peftfast.EvaConfig(rho=0.5)
    with pytest.raises(TypeError, match="eva_config"):
        peftfast.LoraConfig(init_lora_weights="eva", eva_config=3)
    with pytest.raises(ValueError, match="even rank"):
        _peft_model(peftfast, _mlp(), r=3, init_lora_weights="orthogonal")
    # A config PEFT saved, with its sub-configs as dicts, loads as the sub-config classes.
    peft.LoraConfig(
        init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.5), target_modules=TARGETS
    ).save_pretrained(tmp_path)
    loaded = peftfast.LoraConfig.from_pretrained(tmp_path)
    assert loaded.eva_config == peftfast.EvaConfig(rho=1.5)


@pytest.mark.parametrize("shape", [(7, 33), (33, 7), (23, 23), (5, 5)])
@pytest.mark.parametrize("rank", [1, 4, 40])
def test_top_singular_triplets_against_a_full_svd(shape, rank):
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(shape, generator=generator, dtype=torch.float64)
    # A decaying spectrum, as in trained weights, so the top directions are well defined.
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    spectrum = 0.7 ** torch.arange(min(shape), dtype=torch.float64)
    matrix = ((U * spectrum) @ Vh).float()
    k = min(rank, *shape)
    U, S, Vh = top_singular_triplets(matrix, rank)
    assert U.shape == (shape[0], k) and S.shape == (k,) and Vh.shape == (k, shape[1])
    reference_U, reference_S, reference_Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert_close(S.double(), reference_S[:k], "kernel", torch.float32)
    best = (reference_U[:, :k] * reference_S[:k]) @ reference_Vh[:k]
    assert_close(((U * S) @ Vh).double(), best, "kernel", torch.float32)
    assert_close(U.T @ U, torch.eye(k), "kernel")
    zero_U, zero_S, zero_Vh = top_singular_triplets(torch.zeros(shape), rank)
    assert torch.equal(zero_S, torch.zeros(k)) and torch.isfinite(zero_U).all() and torch.isfinite(zero_Vh).all()


def test_combining_a_pissa_adapter_leaves_the_base_alone():
    # add_weighted_adapter builds the new adapter from the old one's config; HF PEFT then runs PiSSA a second time on
    # the already reduced weights (changing every adapter's outputs). peftfast starts the combination plainly.
    model = _peft_model(peftfast, _mlp(), init_lora_weights="pissa")
    x = torch.randn(3, 11)
    expected, weights = model(x), _parameters(model.get_base_model())
    model.base_model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")
    assert model.peft_config["combined"].init_lora_weights is True
    base_weights = {name: weights[name] for name in weights if "lora_" not in name}
    assert all(torch.equal(_parameters(model.get_base_model())[name], value) for name, value in base_weights.items())
    model.set_adapter("combined")
    assert_close(model(x), expected, "kernel")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_on_a_base_rewritten_by_the_initialisation_matches_peft(init):
    # DoRA's magnitude is taken after the initialisation moved part of W into the adapter (of W_res + s B A = W).
    models = {name: _peft_model(lib, _mlp(), init_lora_weights=init, use_dora=True) for name, lib in LIBS.items()}
    _assert_same_layers(models["peft"], models["peftfast"], "kernel", signs=init == "pissa")
    x = torch.randn(4, 11)
    assert_close(models["peftfast"](x), models["peft"](x), "kernel")
