"""DoRA (`use_dora=True`) against HF PEFT 0.21.2 and against its own torch reference.

Ops: the factored weight norm against the norm of the materialised W + s B A (fp64), on both backends (the Triton
kernels in the interpreter on CPU); `dora_linear` on Triton against the torch reference, forward and every gradient,
dropout with the kernels' mask. Models: outputs, files (both directions), training steps, merge/unmerge, several
adapters, mixed batches and 4-bit/8-bit bases compared with HF PEFT; the refusals HF PEFT makes; the norm cache never
serving a stale norm.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from models import MLP, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from tolerances import KERNEL, assert_close
from torch import nn

import peftfast
from peftfast import ops
from peftfast.ops import reference

LIBS = {"peft": peft, "peftfast": peftfast}
DIRECTIONS = {"p2f": ("peft", "peftfast"), "f2p": ("peftfast", "peft")}


def _gen(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- op: the norm


def _norm_problem(d_out, d_in, r, dtype, scale=1.0, seed=0):
    generator = _gen(seed)
    weight = (torch.randn(d_out, d_in, generator=generator) / d_in**0.5).to(dtype)
    lora_A = torch.randn(r, d_in, generator=generator) / d_in**0.5
    lora_B = torch.randn(d_out, r, generator=generator) * scale / r**0.5
    return weight, lora_A, lora_B


def _dense_norm(weight, lora_A, lora_B, scaling):
    return torch.linalg.vector_norm(weight.double() + scaling * lora_B.double() @ lora_A.double(), dim=1)


BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not ops.dora.autograd.triton_available(), reason="needs triton")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("d_out", "d_in", "r"), [(29, 45, 7), (33, 17, 40), (1, 70, 1)], ids=str)
def test_weight_norm_equals_norm_of_materialised_weight(backend, dtype, d_out, d_in, r):
    """Whatever the weight's dtype, every term is fp32: the result is the fp64 norm of the same numbers to fp32
    rounding (also with a rank larger than d_in, and a single row)."""
    weight, lora_A, lora_B = _norm_problem(d_out, d_in, r, dtype)
    with ops.use_backend(backend):
        norm, weight_sq = ops.dora_weight_norm(weight, lora_A, lora_B, 1.7)
        again, _ = ops.dora_weight_norm(weight, lora_A, lora_B, 1.7, weight_sq)
    assert norm.dtype == weight_sq.dtype == torch.float32 and norm.shape == (d_out,)
    torch.testing.assert_close(norm.double(), _dense_norm(weight, lora_A, lora_B, 1.7), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight_sq.double(), weight.double().square().sum(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, norm, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_norm_of_a_strided_weight(backend):
    """transformers' Conv1D stores (in, out): the norm reads the transposed view without copying it first."""
    weight, lora_A, lora_B = _norm_problem(23, 37, 5, torch.bfloat16)
    stored = weight.T.contiguous()
    with ops.use_backend(backend):
        norm, _ = ops.dora_weight_norm(stored.T, lora_A, lora_B, 0.5)
    torch.testing.assert_close(norm.double(), _dense_norm(weight, lora_A, lora_B, 0.5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_norm_of_cancelled_rows_is_zero_not_nan(backend):
    """Rows the update cancels exactly: the three terms cancel to about eps * ||W_j||^2, so the norm is about
    sqrt(eps) * ||W_j|| (the documented loss of the factored form), and the clamp at 0 keeps the root real."""
    _, lora_A, lora_B = _norm_problem(9, 13, 3, torch.float32)
    weight = -2.0 * lora_B @ lora_A
    with ops.use_backend(backend):
        norm, _ = ops.dora_weight_norm(weight, lora_A, lora_B, 2.0)
    assert torch.isfinite(norm).all()
    assert (norm <= 4 * torch.finfo(torch.float32).eps ** 0.5 * weight.norm(dim=1)).all()


def test_weight_norm_refuses_mismatched_shapes():
    weight, lora_A, lora_B = _norm_problem(9, 13, 3, torch.float32)
    with pytest.raises(ValueError, match=r"\(9, 13\).*\(3, 12\)"):
        ops.dora_weight_norm(weight, lora_A[:, :12], lora_B, 1.0)


# ------------------------------------------------------------------------------------------ op: the fused forward


def _linear_problem(M, K, N, r, dtype, with_bias=True, seed=0):
    generator = _gen(seed)
    x = torch.randn(M, K, generator=generator).to(dtype)
    weight = (torch.randn(N, K, generator=generator) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=generator).to(dtype) if with_bias else None
    lora_A = torch.randn(r, K, generator=generator) / K**0.5
    lora_B = torch.randn(N, r, generator=generator) / r**0.5
    norm, _ = reference.dora_weight_norm(weight, lora_A, lora_B, 1.5)
    magnitude = norm * (1 + 0.3 * torch.randn(N, generator=generator))
    return x, weight, bias, lora_A, lora_B, magnitude, norm


def _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, keep=None, p=0.0, dtype=torch.float64):
    """HF PEFT's formula computed in `dtype`; dropout keeps the elements of x where `keep` (None: no dropout)."""
    x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
    g = magnitude.to(dtype) / norm.to(dtype)
    y = x @ weight.T + (0 if bias is None else bias.to(dtype))
    dropped = x if keep is None else x * keep / (1 - p)
    return y + (g - 1) * (dropped @ weight.T) + g * scaling * (dropped @ lora_A.T @ lora_B.T)


def _grads(y, leaves, grad_y):
    return torch.autograd.grad(y, leaves, grad_y.to(y.dtype))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("M", "K", "N", "r"), [(7, 37, 45, 1), (33, 64, 17, 16), (70, 19, 30, 40)], ids=str)
def test_torch_reference_is_peft_formula(M, K, N, r, with_bias):
    x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(M, K, N, r, torch.float32, with_bias)
    y = ops.reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, 0.0, True)
    torch.testing.assert_close(
        y.double(), _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5), **KERNEL[torch.float32]
    )


def test_torch_reference_with_dropout_is_peft_formula():
    x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(21, 33, 19, 4, torch.float32)
    torch.manual_seed(7)
    y = ops.reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, 0.4, True)
    torch.manual_seed(7)
    keep = torch.nn.functional.dropout(torch.ones_like(x), 0.4, training=True) != 0
    expected = _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, keep, 0.4)
    torch.testing.assert_close(y.double(), expected, **KERNEL[torch.float32])
    # Not training: no dropout, and the formula without it.
    y = ops.reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, 0.4, False)
    torch.testing.assert_close(
        y.double(), _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5), **KERNEL[torch.float32]
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.4], ids=["no-dropout", "dropout"])
def test_torch_reference_gradients_of_every_input(dropout_p):
    """Its hand-written backward against autograd over the formula: x, a trainable base weight and bias, A, B and
    the magnitude (through g = m / norm; the norm gets none)."""
    x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(13, 21, 17, 5, torch.float32)
    leaves = [t.requires_grad_() for t in (x, weight, bias, lora_A, lora_B, magnitude)]
    norm.requires_grad_()
    torch.manual_seed(3)
    y = ops.reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, dropout_p, True)
    torch.manual_seed(3)
    keep = torch.nn.functional.dropout(torch.ones_like(x), dropout_p, training=True) != 0 if dropout_p else None
    expected = _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm.detach(), 1.5, keep, dropout_p)
    grad_y = torch.randn(y.shape, generator=_gen(2))
    got = torch.autograd.grad(y, leaves + [norm], grad_y, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, grad_y.double())
    assert got[-1] is None
    for actual, wanted in zip(got, want):
        torch.testing.assert_close(actual.double(), wanted.double(), **KERNEL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("M", "dropout_p"), [(5, 0.0), (40, 0.0), (5, 0.3)], ids=["T<d_out", "T>=d_out", "dropout"])
def test_norm_computed_inside_the_op_equals_the_given_one(backend, dtype, M, dropout_p):
    """weight_norm=None: the op computes the norms itself from ||W_j||^2 (on the torch path from r more rows of the
    base GEMM where that saves a read of W); outputs and gradients are those with the norm given."""
    x, weight, bias, lora_A, lora_B, magnitude, _ = _linear_problem(M, 21, 17, 5, dtype)
    norm, weight_sq = reference.dora_weight_norm(weight, lora_A, lora_B, 1.5)
    leaves = [x.requires_grad_(), lora_A.requires_grad_(), lora_B.requires_grad_(), magnitude.requires_grad_()]
    results = []
    for given in (norm, None):
        torch.manual_seed(3)
        with ops.use_backend(backend):
            y = ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, given, 1.5, dropout_p, True, weight_sq)
        results.append([y, *torch.autograd.grad(y, leaves, torch.ones_like(y))])
    for with_norm, computed in zip(*results):
        assert_close(computed, with_norm, kind="kernel")
    with pytest.raises(ValueError, match="weight_sq"):
        ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, None, 1.5, 0.0, True)


def test_empty_batch_and_frozen_adapter_on_the_torch_path():
    x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(0, 13, 9, 3, torch.float32)
    x.requires_grad_()
    y = ops.reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.0, 0.5, True)
    assert y.shape == (0, 9)
    y.sum().backward()
    assert x.grad.shape == (0, 13)
    model = _dora_model("peftfast", "mlp")
    with torch.no_grad():
        assert _forward(model, {"x": torch.zeros(0, 11)}).shape == (0, 5)


triton_only = pytest.mark.skipif(not ops.dora.autograd.triton_available(), reason="needs triton")


def _triton_and_reference(M, K, N, r, dtype, dropout_p, with_bias=True, seed=1234):
    """The Triton op's output and gradients (x, A, B, magnitude), the fp64 formula's, and the formula's computed by
    torch in `dtype`, all with the same dropout mask."""
    from peftfast.kernels import lora_linear as lora_kernels

    x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(M, K, N, r, dtype, with_bias)
    leaves = [x.requires_grad_(), lora_A.requires_grad_(), lora_B.requires_grad_(), magnitude.requires_grad_()]
    g = (magnitude / norm).float()
    seeds = torch.tensor([seed]) if dropout_p > 0 else None
    y, _, _ = ops.dora.dora_linear_fwd(x, weight, bias, lora_A, lora_B, g, 1.5, dropout_p, seeds, True, "fused")
    grad_y = torch.randn(y.shape, generator=_gen(5))
    got = [y, *_grads(y, leaves, grad_y)]
    keep = lora_kernels.dropout_keep_mask(M, K, dropout_p, seeds) if dropout_p > 0 else None
    y_ref = _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, keep, dropout_p)
    want = [y_ref, *_grads(y_ref, leaves, grad_y)]
    y_torch = _dense_dora(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.5, keep, dropout_p, dtype)
    in_dtype = [y_torch, *_grads(y_torch, leaves, grad_y)]
    return got, want, in_dtype


@triton_only
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize(("M", "K", "N", "r"), [(7, 37, 45, 1), (33, 64, 17, 16), (40, 19, 70, 64)], ids=str)
def test_triton_forward_and_gradients_fp32(M, K, N, r, dropout_p):
    got, want, _ = _triton_and_reference(M, K, N, r, torch.float32, dropout_p)
    for actual, expected in zip(got, want):
        torch.testing.assert_close(actual.double(), expected.double(), **KERNEL[torch.float32])


@triton_only
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_half_precision_within_twice_torch_error(dtype, dropout_p):
    """Against the fp64 formula, the kernels' error (forward and every gradient) is at most ~2x that of the same
    formula computed by torch in `dtype` (the flash-attention rule), plus a small floor."""
    got, want, in_dtype = _triton_and_reference(33, 45, 29, 7, dtype, dropout_p)
    assert got[0].dtype == dtype
    for actual, expected, torch_result in zip(got, want, in_dtype):
        kernel_error = (actual.double() - expected.double()).abs().max()
        torch_error = (torch_result.double() - expected.double()).abs().max()
        assert kernel_error <= 2 * torch_error + 1e-3 * expected.abs().max()


@triton_only
def test_triton_empty_batch_and_frozen_magnitude():
    x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(0, 13, 9, 3, torch.float32)
    with ops.use_backend("triton"):
        y = ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.0, 0.0, True)
        assert y.shape == (0, 9)
        x, weight, bias, lora_A, lora_B, magnitude, norm = _linear_problem(5, 13, 9, 3, torch.float32)
        lora_A.requires_grad_()
        y = ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.0, 0.0, True)
    (grad_A,) = torch.autograd.grad(y.sum(), [lora_A])
    expected = ops.reference.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, 1.0, 0.0, True)
    assert_close(grad_A, torch.autograd.grad(expected.sum(), [lora_A])[0], kind="kernel")


@triton_only
@pytest.mark.parametrize("splits", [1, 3])
def test_magnitude_gradient_kernel_with_split_rows(splits):
    """dg = sum_t dY * z, with the row loop split over programs that add atomically (the GPU default)."""
    from peftfast.kernels import dora as kernels

    grad_y, z = torch.randn(101, 45, generator=_gen(1)), torch.randn(101, 45, generator=_gen(2)).to(torch.bfloat16)
    got = kernels.column_dot(grad_y, z, splits=splits)
    torch.testing.assert_close(got, (grad_y * z.float()).sum(0), **KERNEL[torch.float32])


def test_dora_scale_is_peft_update():
    result, lora_out, base_dropped = (torch.randn(2, 5, 3, 4, generator=_gen(seed)) for seed in range(3))
    magnitude, norm, bias = torch.rand(1, 5, 1, 1) + 0.5, torch.rand(5) + 0.5, torch.randn(5)
    g = (magnitude.reshape(-1) / norm).view(1, 5, 1, 1)
    b = bias.view(1, 5, 1, 1)
    got = ops.dora_scale(result, lora_out, magnitude, norm, bias, channel_dim=1)
    assert_close(got, result + (g - 1) * (result - b) + g * lora_out)
    got = ops.dora_scale(result, lora_out, magnitude, norm, bias, base_dropped=base_dropped, channel_dim=1)
    assert_close(got, result + (g - 1) * base_dropped + g * lora_out)


# ------------------------------------------------------------------------------------------- models vs HF PEFT


class ConvNet(nn.Module):
    """Conv1d/2d/3d, one grouped, one 1x1: DoRA's norms of flattened kernels (HF PEFT's grouped-kernel layout too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 6, 3, padding=1)
        self.conv2d = nn.Conv2d(6, 8, 3, stride=2, groups=2)
        self.conv2d_1x1 = nn.Conv2d(8, 5, 1, bias=False)
        self.conv3d = nn.Conv3d(2, 4, (2, 3, 3))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        batch, _, length = x.shape
        h = torch.tanh(self.conv1d(x)).reshape(batch, 6, 1, length).expand(batch, 6, 9, length)
        h = torch.tanh(self.conv2d_1x1(torch.tanh(self.conv2d(h))))
        v = self.conv3d(volume).mean(dim=(1, 2, 3, 4))
        return self.head(h.mean(dim=(2, 3))) + v[:, None]


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(37, 13, padding_idx=0)
        self.lin = nn.Linear(13, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.emb(ids)))


class TanhMLP(MLP):
    """The tests' MLP with a smooth activation: a relu flipping at 0 is no DoRA error."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.Tanh()


def _llama() -> nn.Module:
    return tiny_llama()


def _gpt2() -> nn.Module:
    return tiny_gpt2()


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]], dict[str, Any]]] = {
    "mlp": (TanhMLP, lambda: {"x": torch.randn(4, 11, generator=_gen())}, {"target_modules": ["lin0", "lin1", "lin2"]}),
    "conv": (
        ConvNet,
        lambda: {"x": torch.randn(2, 3, 8, generator=_gen()), "volume": torch.randn(2, 2, 3, 5, 5, generator=_gen())},
        {"target_modules": ["conv1d", "conv2d", "conv2d_1x1", "conv3d"], "r": 2},
    ),
    "emb": (
        EmbeddingNet,
        lambda: {"ids": torch.randint(0, 37, (3, 5), generator=_gen())},
        {"target_modules": ["emb", "lin"], "r": 3},
    ),
    "llama": (
        _llama,
        lambda: {"input_ids": torch.randint(1, 101, (2, 7), generator=_gen())},
        {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    ),
    # transformers Conv1D: weights stored (in, out), the magnitudes scale their columns.
    "gpt2": (
        _gpt2,
        lambda: {"input_ids": torch.randint(1, 97, (2, 7), generator=_gen())},
        {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},
    ),
}


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**inputs)
    return getattr(output, "logits", output)


def _base(model_id: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_id][0]().to(dtype).eval()


def _perturb_magnitudes(model: nn.Module, seed: int = 3) -> None:
    """Move the magnitudes off their initial norms, so that DoRA differs from the LoRA it starts as."""
    generator = _gen(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.randn(param.shape, generator=generator).to(param.dtype))


def _dora_model(lib_name: str, model_id: str, dtype=torch.float32, seed: int = 1, **overrides: Any):
    """The model's DoRA adapter in `lib_name`, random A and B (init_lora_weights=False), magnitudes perturbed. Built
    with the same seeds, HF PEFT's and peftfast's draw the same weights."""
    config = {"init_lora_weights": False, "use_dora": True, **MODELS[model_id][2], **overrides}
    base = _base(model_id, dtype)
    torch.manual_seed(seed)
    model = LIBS[lib_name].get_peft_model(base, LIBS[lib_name].LoraConfig(**config))
    _perturb_magnitudes(model, seed)
    return model.eval()


def _inputs(model_id: str) -> dict[str, torch.Tensor]:
    return MODELS[model_id][1]()


def _same_adapter(fast: nn.Module, reference: nn.Module) -> None:
    fast.load_state_dict(reference.state_dict())


@pytest.mark.parametrize("model_id", MODELS)
def test_same_parameters_and_outputs_as_peft(model_id):
    models = {lib_name: _dora_model(lib_name, model_id) for lib_name in LIBS}
    fast, reference = models["peftfast"], models["peft"]
    fast_state, reference_state = fast.state_dict(), reference.state_dict()
    assert sorted(fast_state) == sorted(reference_state)
    for key, value in reference_state.items():
        assert fast_state[key].shape == value.shape and fast_state[key].dtype == value.dtype, key
        # The initial magnitudes are the norms; the same seeds draw the same A and B.
        assert_close(fast_state[key], value, kind="kernel")
    inputs = _inputs(model_id)
    with torch.no_grad():
        expected = _forward(reference, inputs)
        with reference.disable_adapter():
            assert not torch.allclose(_forward(reference, inputs), expected, atol=1e-3)
        assert_close(_forward(fast, inputs), expected, kind="kernel")
    layer_types = {type(module).__name__ for module in fast.modules() if "Dora" in type(module).__name__}
    assert layer_types == {type(m).__name__ for m in reference.modules() if "Dora" in type(m).__name__}
    magnitude = next(module for module in fast.modules() if type(module).__name__.startswith("Dora"))
    assert repr(magnitude).startswith("lora.dora.Dora")
    assert fast.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("model_id", ["mlp", "conv", "emb", "gpt2"])
def test_adapter_files_load_in_the_other_library(tmp_path, model_id, direction):
    source_lib, target_lib = DIRECTIONS[direction]
    source = _dora_model(source_lib, model_id)
    inputs = _inputs(model_id)
    with torch.no_grad():
        expected = _forward(source, inputs)
    source.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    magnitudes = [key for key in saved if "lora_magnitude_vector" in key]
    assert magnitudes and all(key.endswith(".lora_magnitude_vector") for key in magnitudes)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and "runtime_config" not in config
    loaded = LIBS[target_lib].PeftModel.from_pretrained(_base(model_id), tmp_path)
    with torch.no_grad():
        assert_close(_forward(loaded, inputs), expected, kind="kernel")
    assert not any(param.requires_grad for param in loaded.parameters())


def test_both_libraries_write_the_same_files(tmp_path):
    for lib_name in LIBS:
        _dora_model(lib_name, "conv").save_pretrained(tmp_path / lib_name)
    files = {lib_name: load_file(tmp_path / lib_name / "adapter_model.safetensors") for lib_name in LIBS}
    assert {k: v.shape for k, v in files["peftfast"].items()} == {k: v.shape for k, v in files["peft"].items()}
    configs = {lib_name: json.loads((tmp_path / lib_name / "adapter_config.json").read_text()) for lib_name in LIBS}
    for config in configs.values():
        config.pop("peft_version")
        config["target_modules"] = sorted(config["target_modules"])
    assert configs["peftfast"] == configs["peft"]


def _train_steps(
    model: nn.Module, inputs: dict[str, torch.Tensor], optimizer_cls=torch.optim.SGD, steps: int = 2, **options
):
    """A few optimizer steps on a fixed batch with dropout drawn from one seed; the trainable parameters after it."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    optimizer = optimizer_cls(trainable.values(), lr=0.05, **options)
    model.train()
    torch.manual_seed(11)
    for _ in range(steps):
        loss = _forward(model, inputs).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: param.detach().clone() for name, param in trainable.items()}


@pytest.mark.parametrize(
    ("model_id", "dropout"), [("mlp", 0.0), ("mlp", 0.3), ("conv", 0.3), ("emb", 0.0), ("gpt2", 0.2)], ids=str
)
def test_training_steps_match_peft(model_id, dropout):
    """Gradients equal HF PEFT's (its norm is detached; with dropout it takes the base product again on the
    dropped-out input): after the same steps every adapter weight, magnitudes included, is the same."""
    trained = {}
    for lib_name in LIBS:
        model = _dora_model(lib_name, model_id, lora_dropout=dropout)
        trained[lib_name] = _train_steps(model, _inputs(model_id))
    assert sorted(trained["peftfast"]) == sorted(trained["peft"])
    assert any("lora_magnitude_vector" in name for name in trained["peft"])
    initial = _dora_model("peft", model_id, lora_dropout=dropout).state_dict()
    for name, param in trained["peft"].items():
        assert not torch.equal(param, initial[name]), f"{name} did not train"
        assert_close(trained["peftfast"][name], param, kind="kernel")


def test_fused_optimizer_steps_are_seen():
    """AdamW(fused=True) updates parameters without bumping their version counters: a trainable adapter's norm is
    never served from a cache, so each step's forward sees the weights the optimizer left."""
    trained = {}
    for lib_name in LIBS:
        model = _dora_model(lib_name, "mlp")
        trained[lib_name] = _train_steps(model, _inputs("mlp"), torch.optim.AdamW, steps=3, fused=True)
    for name, param in trained["peft"].items():
        assert_close(trained["peftfast"][name], param, kind="kernel")


def test_bf16_base_with_fp32_adapters_matches_peft():
    models = {lib_name: _dora_model(lib_name, "llama", torch.bfloat16) for lib_name in LIBS}
    _same_adapter(models["peftfast"], models["peft"])
    fast_layer = models["peftfast"].base_model.model.model.layers[0].self_attn.q_proj
    assert fast_layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    inputs = _inputs("llama")
    with torch.no_grad():
        outputs = {lib_name: _forward(model, inputs).float() for lib_name, model in models.items()}
        reference = _forward(_dora_model("peft", "llama").eval(), inputs)
    assert outputs["peftfast"].dtype == outputs["peft"].dtype
    # Both round the same math to bf16 in places of their own: compare each with the fp32 model's logits.
    peft_error = (outputs["peft"] - reference).abs().max()
    assert (outputs["peftfast"] - reference).abs().max() <= 2 * peft_error + 1e-2


@pytest.mark.parametrize("model_id", ["mlp", "conv", "emb", "gpt2"])
def test_merge_and_unmerge_match_peft(model_id):
    """HF PEFT's DoRA merge: W <- (m / ||W + s B A||) * (W + s B A); unmerge takes it out again."""
    # Neither library merges into a grouped convolution.
    overrides = {"target_modules": ["conv1d", "conv2d_1x1", "conv3d"]} if model_id == "conv" else {}
    models = {lib_name: _dora_model(lib_name, model_id, **overrides) for lib_name in LIBS}
    inputs = _inputs(model_id)
    with torch.no_grad():
        unmerged = _forward(models["peftfast"], inputs)
        for model in models.values():
            model.merge_adapter()
        fast_state, peft_state = models["peftfast"].state_dict(), models["peft"].state_dict()
        for key, value in peft_state.items():
            assert_close(fast_state[key], value, kind="kernel")
        assert_close(_forward(models["peftfast"], inputs), unmerged, kind="kernel")
        models["peftfast"].unmerge_adapter()
        assert_close(_forward(models["peftfast"], inputs), unmerged, kind="kernel")
        base_weights = {k: v for k, v in _base(model_id).state_dict().items()}
        for key, value in models["peftfast"].get_base_model().state_dict().items():
            if "base_layer" in key:
                assert_close(value, base_weights[key.replace("base_layer.", "")], kind="kernel")
        merged = models["peftfast"].merge_and_unload()
        assert not any("lora" in key for key in merged.state_dict())
        assert_close(_forward(merged, inputs), unmerged, kind="kernel")


def _two_dora_adapters(lib_name: str, model_id: str = "mlp"):
    model = _dora_model(lib_name, model_id)
    torch.manual_seed(4)
    config = LIBS[lib_name].LoraConfig(
        **{**MODELS[model_id][2], "init_lora_weights": False, "use_dora": True, "r": 4, "lora_alpha": 3}
    )
    model.add_adapter("other", config)
    _perturb_magnitudes(model, seed=9)
    return model.eval()


def test_several_dora_adapters_active_and_merged_as_peft():
    """Two DoRA adapters active at once apply in turn (HF PEFT's order); merged one after the other, each with the
    norm of the base weight without the other."""
    models = {lib_name: _two_dora_adapters(lib_name) for lib_name in LIBS}
    _same_adapter(models["peftfast"], models["peft"])
    inputs = _inputs("mlp")
    with torch.no_grad():
        for names in (["other"], ["default", "other"]):
            outputs = {}
            for lib_name, model in models.items():
                model.base_model.set_adapter(names)
                outputs[lib_name] = _forward(model, inputs)
            assert_close(outputs["peftfast"], outputs["peft"], kind="kernel")
        expected = outputs["peft"]
        for model in models.values():
            model.base_model.merge_adapter(["default"])
            model.base_model.merge_adapter(["other"])
        fast_state, peft_state = models["peftfast"].state_dict(), models["peft"].state_dict()
        for key, value in peft_state.items():
            assert_close(fast_state[key], value, kind="kernel")
        assert_close(_forward(models["peftfast"], inputs), expected, kind="kernel")
        models["peftfast"].unmerge_adapter()
        assert_close(_forward(models["peftfast"], inputs), expected, kind="kernel")


@pytest.mark.parametrize("model_id", ["mlp", "conv", "emb"])
def test_mixed_batch_with_dora_adapters(model_id):
    """Beyond HF PEFT (which refuses DoRA in mixed batches): each row gets what HF PEFT computes for it with that
    adapter alone, for DoRA adapters, a plain LoRA adapter and "__base__" rows in one batch."""
    fast = _two_dora_adapters("peftfast", model_id)
    reference = _two_dora_adapters("peft", model_id)
    torch.manual_seed(5)
    for model in (fast, reference):
        model.add_adapter(
            "plain",
            LIBS["peft" if model is reference else "peftfast"].LoraConfig(
                init_lora_weights=False, **MODELS[model_id][2]
            ),
        )
    _same_adapter(fast, reference)
    fast.eval()
    reference.eval()
    inputs = _inputs(model_id)
    batch = next(iter(inputs.values())).shape[0]
    names = (["other", "__base__", "default", "plain"] * batch)[:batch]
    with torch.no_grad():
        got = _forward(fast, {**inputs, "adapter_names": names})
        for row, name in enumerate(names):
            row_inputs = {key: value[row : row + 1] for key, value in inputs.items()}
            if name == "__base__":
                with reference.disable_adapter():
                    expected = _forward(reference, row_inputs)
            else:
                reference.set_adapter(name)
                expected = _forward(reference, row_inputs)
            assert_close(got[row : row + 1], expected, kind="kernel")


# ------------------------------------------------------------------------------------- bitsandbytes 4-bit / 8-bit


def _quantized_base(compute_dtype=torch.float32) -> nn.Module:
    """A 4-bit (NF4, nested absmax) one-layer Llama; rows a multiple of bitsandbytes' blocksize (64)."""
    pytest.importorskip("bitsandbytes")
    from models import quantize_to_4bit

    llama = tiny_llama(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    return quantize_to_4bit(llama, compute_dtype=compute_dtype)


def _quantized_llama(lib_name: str, seed: int = 1, compute_dtype=torch.float32, **config: Any):
    """`_quantized_base` with a DoRA adapter, its magnitudes perturbed."""
    base = _quantized_base(compute_dtype)
    torch.manual_seed(seed)
    options = {"init_lora_weights": False, "use_dora": True, "r": 4, "lora_alpha": 8, **config}
    options.setdefault("target_modules", ["q_proj", "down_proj"])
    model = LIBS[lib_name].get_peft_model(base, LIBS[lib_name].LoraConfig(**options))
    _perturb_magnitudes(model, seed)
    return model


IDS = {"input_ids": torch.randint(0, 101, (2, 9), generator=_gen(0))}


def test_4bit_base_outputs_files_and_merge_match_peft(tmp_path):
    models = {lib_name: _quantized_llama(lib_name).eval() for lib_name in LIBS}
    fast, reference = models["peftfast"], models["peft"]
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and "default" in layer.lora_magnitude_vector
    for key, value in reference.state_dict().items():
        if "lora_" in key:
            assert_close(fast.state_dict()[key], value, kind="kernel")
    with torch.no_grad():
        expected = _forward(reference, IDS)
        assert_close(_forward(fast, IDS), expected, kind="kernel")
    fast.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_quantized_base(), tmp_path).eval()
    with torch.no_grad():
        assert_close(_forward(loaded, IDS), expected, kind="kernel")
    with pytest.warns(UserWarning, match="re-quantizes"), torch.no_grad():
        fast.merge_adapter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.merge_adapter()
    for path in ("self_attn.q_proj", "mlp.down_proj"):
        merged = [m.base_model.model.model.layers[0].get_submodule(path).get_base_layer() for m in (fast, reference)]
        assert_close(bnb_dequantize(merged[0]), bnb_dequantize(merged[1]), kind="kernel")
    with torch.no_grad():
        assert_close(_forward(fast, IDS), _forward(reference, IDS), kind="kernel")


def bnb_dequantize(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def test_4bit_base_training_step_matches_peft():
    trained = {lib_name: _train_steps(_quantized_llama(lib_name, lora_dropout=0.2), IDS) for lib_name in LIBS}
    assert any("lora_magnitude_vector" in name for name in trained["peft"])
    for name, param in trained["peft"].items():
        assert_close(trained["peftfast"][name], param, kind="kernel")


def _int8_mlp(seed: int = 0) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    dense = MLP(d_in=16, d_hidden=32, d_out=8)
    for name in ("lin0", "lin1"):
        linear = getattr(dense, name)
        int8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=0.0)
        int8.load_state_dict(linear.state_dict())
        setattr(dense, name, int8.to("cpu"))
    dense.is_loaded_in_8bit = True
    return dense


def test_8bit_base_against_the_dequantized_formula_and_peft_init():
    """HF PEFT's 8-bit wrapper can't run a forward on CPU (bitsandbytes' CPU int8 matmul under it fails): its
    initial magnitudes are the reference, and outputs and merges are checked against the formula on the dequantized
    weight."""
    import bitsandbytes as bnb

    config = dict(init_lora_weights=False, use_dora=True, r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    models = {}
    for lib_name in LIBS:
        base = _int8_mlp()
        torch.manual_seed(1)
        models[lib_name] = LIBS[lib_name].get_peft_model(base, LIBS[lib_name].LoraConfig(**config))
    for key, value in models["peft"].state_dict().items():
        if "lora_" in key:
            assert_close(models["peftfast"].state_dict()[key], value, kind="kernel")
    fast = models["peftfast"].eval()
    _perturb_magnitudes(fast)
    layer = fast.base_model.model.lin0
    assert type(layer).__name__ == "Linear8bitLt"
    x = torch.randn(5, 16, generator=_gen())
    bare = _int8_mlp().lin0.eval()
    scales = bare.state.SCB if bare.state.SCB is not None else bare.weight.SCB
    weight = bnb.functional.int8_vectorwise_dequant(bare.weight.data, scales)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude, scaling = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        norm = _dense_norm(weight, lora_A, lora_B, scaling)
        g = magnitude.double() / norm
        base_out = bare(x).double()
        bias = bare.bias.double()
        expected = g * (base_out - bias) + bias + g * scaling * (x.double() @ lora_A.double().T @ lora_B.double().T)
        torch.testing.assert_close(layer(x).double(), expected, **KERNEL[torch.float32])
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
        merged_dense = (g[:, None] * (weight.double() + scaling * lora_B.double() @ lora_A.double())).float()
        expected_int8 = bnb.nn.Int8Params(merged_dense, requires_grad=False, has_fp16_weights=False).to("cpu")
        assert (layer.get_base_layer().weight.data.int() - expected_int8.data.int()).abs().max() <= 1
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.unmerge()
        torch.testing.assert_close(layer(x), expected.float(), atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora_bias": True}, "lora_bias=True is not supported for DoRA"),
        ({"megatron_config": {"tensor_model_parallel_size": 1}}, "DoRA does not support megatron_core"),
    ],
    ids=["lora_bias", "megatron"],
)
def test_config_refuses_what_peft_refuses(options, message):
    for lib in LIBS.values():
        with pytest.raises(ValueError, match=message):
            lib.LoraConfig(target_modules=["lin0"], use_dora=True, **options)


def test_dora_with_another_variant_is_refused_where_peft_refuses_it():
    """As HF PEFT: the config is accepted, making the layers is not (no variant for the combination)."""
    for lib_name, lib in LIBS.items():
        model = tiny_llama()
        before = {name: type(module) for name, module in model.named_modules()}
        config = lib.LoraConfig(target_modules=["q_proj"], use_dora=True, alora_invocation_tokens=[5, 6])
        with pytest.raises(ValueError, match=r"variant combination: \('alora_invocation_tokens', 'use_dora'\)"):
            lib.get_peft_model(model, config)
        if lib_name == "peftfast":
            assert {name: type(module) for name, module in model.named_modules()} == before


class _LayerWithoutDora(peftfast.tuners.lora.LoraLayer, nn.Module):
    """A user's LoRA layer type that knows nothing of DoRA."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        peftfast.tuners.lora.LoraLayer.__init__(self, base_layer)
        self.lora_A[adapter_name] = nn.Linear(base_layer.in_features, kwargs["r"], bias=False)
        self.lora_B[adapter_name] = nn.Linear(kwargs["r"], base_layer.out_features, bias=False)


def test_layer_types_without_dora_refuse_it_and_leave_the_model_as_it_was():
    model = TanhMLP()
    before = {name: type(module) for name, module in model.named_modules()}
    config = peftfast.LoraConfig(target_modules=["lin0", "lin1"], use_dora=True)
    config._register_custom_module({nn.Linear: _LayerWithoutDora})
    with pytest.raises(ValueError, match=r"'lin0'.*does not support DoRA"):
        peftfast.get_peft_model(model, config)
    assert {name: type(module) for name, module in model.named_modules()} == before
    # HF PEFT refuses DoRA on nn.MultiheadAttention too.
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    for lib in LIBS.values():
        with pytest.raises(ValueError, match="does not support DoRA"):
            lib.get_peft_model(model, lib.LoraConfig(target_modules=["0"], use_dora=True))
        assert type(model[0]) is nn.MultiheadAttention


def test_use_dora_off_is_plain_lora_and_on_needs_no_variant_refusal(tmp_path):
    """A DoRA adapter next to a plain one: the plain one has no magnitude and stays LoRA."""
    model = _dora_model("peftfast", "mlp")
    model.add_adapter("plain", peftfast.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    layer = model.base_model.model.lin0
    assert set(layer.lora_magnitude_vector) == {"default"}
    assert layer.use_dora == {"default": True, "plain": False}
    model.delete_adapter("default")
    assert not layer.lora_magnitude_vector and "default" not in layer.use_dora


# ----------------------------------------------------------------------------------------- ephemeral_gpu_offload


def test_ephemeral_gpu_offload_is_a_runtime_option(tmp_path):
    config = peftfast.LoraConfig(target_modules=["lin0"], use_dora=True, runtime_config={"ephemeral_gpu_offload": True})
    assert config.runtime_config == peftfast.LoraRuntimeConfig(ephemeral_gpu_offload=True)
    assert "runtime_config" not in config.to_dict()
    model = peftfast.get_peft_model(_base("mlp"), config)
    # Without a GPU the initial norms are computed on the CPU, as without the option.
    assert model.base_model.model.lin0.ephemeral_gpu_offload is True
    model.save_pretrained(tmp_path)
    assert "runtime_config" not in json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = peftfast.PeftModel.from_pretrained(_base("mlp"), tmp_path, ephemeral_gpu_offload=True)
    assert loaded.peft_config["default"].runtime_config.ephemeral_gpu_offload is True
    assert loaded.base_model.model.lin0.ephemeral_gpu_offload is True
    loaded.load_adapter(tmp_path, adapter_name="second", ephemeral_gpu_offload=False)
    assert loaded.peft_config["second"].runtime_config.ephemeral_gpu_offload is False
    x = _inputs("mlp")
    with torch.no_grad():
        assert_close(_forward(loaded, x), _forward(model.eval(), x))


# -------------------------------------------------------------------------------------------------- norm cache


def _count_norms(monkeypatch) -> list[int]:
    calls = [0]
    original = ops.dora_weight_norm

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "dora_weight_norm", counting)
    return calls


def test_norm_cache_serves_frozen_adapters_and_never_a_stale_norm(monkeypatch, tmp_path):
    _dora_model("peftfast", "mlp").save_pretrained(tmp_path)
    model = peftfast.PeftModel.from_pretrained(_base("mlp"), tmp_path)
    x = _inputs("mlp")
    calls = _count_norms(monkeypatch)
    with torch.no_grad():
        first = _forward(model, x)
        assert calls[0] == 3
        assert torch.equal(_forward(model, x), first) and calls[0] == 3
        lin1 = model.base_model.model.lin1
        weight = lin1.base_layer.weight
        # In place through autograd (version counter), a new tensor under .data (storage), load_state_dict (copy_):
        # each is seen, and the next forward equals a fresh model's with the same weights.
        changes = [
            lambda: weight.mul_(1.5),
            lambda: setattr(weight, "data", weight.data * 0.5),
            lambda: lin1.base_layer.load_state_dict({"weight": weight * 3, "bias": lin1.base_layer.bias}),
            lambda: lin1.lora_B["default"].weight.add_(0.1),
        ]
        for change in changes:
            change()
            fresh = peftfast.PeftModel.from_pretrained(_base("mlp"), tmp_path)
            fresh.base_model.model.lin1.load_state_dict(lin1.state_dict())
            assert_close(_forward(model, x), _forward(fresh, x))
        # Writes through .data in place bypass version counters: clearing the cache is the caller's part.
        weight.data.mul_(2.0)
        lin1.dora_cache().clear()
        fresh = peftfast.PeftModel.from_pretrained(_base("mlp"), tmp_path)
        fresh.base_model.model.lin1.load_state_dict(lin1.state_dict())
        assert_close(_forward(model, x), _forward(fresh, x))


def test_dora_caching_helper_switches_the_norm_cache(monkeypatch, tmp_path):
    """HF PEFT's `helpers.DoraCaching`: with it off every forward computes the norms again; the outputs are the same."""
    from peftfast import helpers

    _dora_model("peftfast", "mlp").save_pretrained(tmp_path)
    model = peftfast.PeftModel.from_pretrained(_base("mlp"), tmp_path)
    x = _inputs("mlp")
    calls = _count_norms(monkeypatch)
    with torch.no_grad():
        cached = _forward(model, x)
        with helpers.DoraCaching(enabled=False):
            assert torch.equal(_forward(model, x), cached) and calls[0] == 6
            assert torch.equal(_forward(model, x), cached) and calls[0] == 9
        # The entries from before are still those of these very tensors.
        with helpers.DoraCaching():
            assert torch.equal(_forward(model, x), cached) and calls[0] == 9
        switch = helpers.DoraCaching()
        switch(enabled=False)
        try:
            _forward(model, x)
            assert calls[0] == 12
        finally:
            switch(enabled=True)
        _forward(model, x)
        assert calls[0] == 12


def test_trainable_adapters_recompute_only_the_rank_terms(monkeypatch):
    """Training: ||W_j||^2 of the frozen base is computed once (the first forward: at the adapter's creation the base
    weight was not frozen yet); after that the fused op gets ||W_j||^2 and takes the rank-r terms of the norm from
    its own GEMM, every step (the training-step tests check the numbers against HF PEFT)."""
    model = _dora_model("peftfast", "mlp").train()
    layer = model.base_model.model.lin0
    norms, calls = [], []
    original_norm, original_linear = ops.dora_weight_norm, ops.dora_linear

    def recording_norm(weight, lora_A, lora_B, scaling, weight_sq=None):
        norms.append(weight_sq is not None)
        return original_norm(weight, lora_A, lora_B, scaling, weight_sq)

    def recording_linear(*args):
        calls.append((args[6] is None, args[10] is not None))
        return original_linear(*args)

    monkeypatch.setattr(ops, "dora_weight_norm", recording_norm)
    monkeypatch.setattr(ops, "dora_linear", recording_linear)
    x = _inputs("mlp")["x"]
    for _ in range(3):
        layer(x).sum().backward()
    assert norms == [False]
    assert calls == [(False, False), (True, True), (True, True)]


def test_low_cpu_mem_usage_load(tmp_path):
    source = _dora_model("peft", "conv")
    source.save_pretrained(tmp_path)
    inputs = _inputs("conv")
    loaded = peftfast.PeftModel.from_pretrained(_base("conv"), tmp_path, low_cpu_mem_usage=True)
    assert not any(param.device.type == "meta" for param in loaded.parameters())
    with torch.no_grad():
        assert_close(_forward(loaded, inputs), _forward(source, inputs), kind="kernel")


@pytest.mark.cpu_kernels
def test_triton_backend_trains_like_torch_backend():
    """The fused kernels inside a model (Triton's interpreter on CPU): the same training steps as the torch path."""
    inputs = _inputs("mlp")
    trained = {}
    for backend in ("torch", "triton"):
        model = _dora_model("peftfast", "mlp")
        with ops.use_backend(backend):
            trained[backend] = _train_steps(model, inputs)
            assert set(model.backend_summary().values()) == {backend}
            assert ops.last_backend("dora_linear") == backend
    for name, param in trained["torch"].items():
        assert_close(trained["triton"][name], param, kind="kernel")


# ---------------------------------------------------------------------------------------------------- benchmark


def _bench_dora():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_dora.py"
    spec = importlib.util.spec_from_file_location("bench_dora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_measures_cpu_peak_memory():
    bench_dora = _bench_dora()

    def allocations():
        first = torch.empty(2**20, dtype=torch.uint8)
        second = torch.empty(2**19, dtype=torch.uint8)
        del first
        third = torch.empty(2**18, dtype=torch.uint8)
        return second, third

    assert bench_dora.cpu_peak_memory_mb(allocations) == pytest.approx(1.5, abs=0.01)


def test_bench_runs_and_writes_its_rows(tmp_path, monkeypatch, capsys):
    import csv
    import sys

    bench_dora = _bench_dora()
    monkeypatch.setattr(bench_dora, "CASES", [(64, 16)])
    monkeypatch.setattr(
        sys, "argv", ["bench_dora.py", "--warmup", "1", "--repeats", "2", "--output-dir", str(tmp_path)]
    )
    assert bench_dora.main() == 0
    with open(tmp_path / "dora_cpu.csv") as handle:
        rows = list(csv.DictReader(handle))
    providers = ("hf_dora", "peftfast_dora", "hf_dora_accel", "hf_lora", "peftfast_lora")
    assert [(row["provider"], row["dropout"]) for row in rows] == [(p, d) for d in ("0", "0.1") for p in providers]
    assert all(float(row["median_ms"]) > 0 and float(row["peak_mem_mb"]) > 0 for row in rows)
    out = capsys.readouterr().out
    assert "hf_dora/peftfast_dora" in out and "hf_dora/hf_dora_accel" in out
