"""4-bit (bitsandbytes NF4/FP4) kernels: the dequantize bit for bit against bitsandbytes over formats and odd shapes,
and the fused 4-bit + LoRA forward/backward against an fp32 reference, held to the error torch makes in the same dtype.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerances import KERNEL, assert_close

from peftfast import ops

bnb_functional = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("triton")
from peftfast.kernels import nf4 as kernels  # noqa: E402

from peftfast.ops import autotune  # noqa: E402
from peftfast.ops import nf4 as nf4_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize(shape, quant_type="nf4", nested=False, storage=torch.uint8, dtype=torch.float32, blocksize=64, seed=0):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * shape[-1] ** -0.5
    return bnb_functional.quantize_4bit(
        weight.to(DEVICE, dtype),
        blocksize=blocksize,
        quant_type=quant_type,
        compress_statistics=nested,
        quant_storage=storage,
    )


def _fields(packed, state):
    return nf4_ops.read_quant_state(packed, state)


def _bitsandbytes_dequantize(packed, state, dtype):
    """bitsandbytes' dequantize_4bit. On CPU, bitsandbytes 0.50 hands odd rows to its generic implementation (run here
    without its torch.compile wrapper, which would compile for every shape) and runs a native kernel otherwise; that
    kernel indexes absmax per row, wrong for even rows that aren't a multiple of the blocksize (blocks run over the
    flattened weight, across rows, as the quantizer and the CUDA kernel have them): those get the generic one too."""
    K = state.shape[-1]
    if packed.is_cuda or (K % 2 == 0 and K % state.blocksize == 0):
        state = copy.copy(state)
        state.dtype = dtype
        return bnb_functional.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    generic = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return generic(packed.view(torch.uint8).view(-1), absmax, state.code, state.blocksize, state.shape, dtype)


# (1, 1), (7, 33): a half-filled last byte and a short last block; (64, 64) in blocks of 128 and (48, 96) in blocks
# of 64: blocks that straddle rows.
SHAPES = [((1, 1), 64), ((7, 33), 64), ((3, 128), 64), ((130, 77), 64), ((64, 64), 128), ((48, 96), 64)]


@pytest.mark.parametrize(
    "shape,blocksize", SHAPES, ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else f"bs{s}"
)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["u8", "bf16-storage"])
def test_dequantize_bit_exact_with_bitsandbytes(shape, blocksize, quant_type, nested, storage):
    for dtype in DTYPES:
        try:
            packed, state = _quantize(shape, quant_type, nested, storage, dtype, blocksize)
        except RuntimeError:
            # bf16 storage needs an even number of bytes; bitsandbytes can't store this shape that way.
            assert storage != torch.uint8
            continue
        expected = _bitsandbytes_dequantize(packed, state, dtype)
        stored = _fields(packed, state)
        torch_twin = ops.reference.nf4_dequantize(*stored, dtype=dtype)
        kernel = kernels.nf4_dequantize(*stored, dtype=dtype)
        assert torch_twin.dtype == kernel.dtype == expected.dtype == dtype
        assert torch.equal(torch_twin, expected), (dtype, (torch_twin.float() - expected.float()).abs().max())
        assert torch.equal(kernel, expected), (dtype, (kernel.float() - expected.float()).abs().max())


def test_public_op_on_both_backends_and_into_a_buffer():
    packed, state = _quantize((33, 64), "fp4", nested=True, dtype=torch.bfloat16)
    expected = _bitsandbytes_dequantize(packed, state, torch.bfloat16)
    expected_fp32 = _bitsandbytes_dequantize(packed, state, torch.float32)
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            assert torch.equal(ops.nf4_dequantize(packed, state), expected)
            assert ops.last_backend("nf4_dequantize") == backend
            assert torch.equal(ops.nf4_dequantize(packed, state, dtype=torch.float32), expected_fp32)
    buffer = torch.empty(33 * 64 + 100, device=DEVICE, dtype=torch.bfloat16)
    out = buffer[: 33 * 64].view(33, 64)
    assert kernels.nf4_dequantize(*_fields(packed, state), dtype=torch.bfloat16, out=out) is out
    assert torch.equal(out, expected)


def test_bad_storage_is_a_clear_error():
    packed, state = _quantize((8, 64))
    stored = _fields(packed, state)
    with pytest.raises(ValueError, match="packed bytes can't hold"):
        kernels.nf4_dequantize(stored.packed[:10], *stored[1:])
    with pytest.raises(ValueError, match="x has 63 features"):
        kernels.nf4_lora_matmul(torch.randn(2, 63, device=DEVICE), *stored)
    state.quant_type = "int4"
    with pytest.raises(ValueError, match="Unsupported 4-bit quant_type 'int4'"):
        ops.nf4_dequantize(packed, state)


def _lora_problem(M, K, N, rank, dtype, nested, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE)

    packed, state = _quantize((N, K), "nf4", nested, seed=seed)
    x = rand(M, K).to(dtype)
    bias = rand(N).to(dtype)
    lora_A = rand(rank, K, scale=K**-0.5)
    lora_B = rand(N, rank, scale=rank**-0.5)
    return x, packed, state, bias, lora_A, lora_B


def _exact(x, dense, bias, lora_A, lora_B, scaling):
    """y = x W^T + b + s x A^T B^T in float64, W the exact dequantized weight."""
    x, dense, bias, lora_A, lora_B = (t.double() for t in (x, dense, bias, lora_A, lora_B))
    return x @ dense.T + bias + scaling * (x @ lora_A.T @ lora_B.T)


def _torch_in_dtype(x, dense_in_dtype, bias, lora_A, lora_B, scaling):
    """What torch does in the kernel's dtype: bitsandbytes' dequantize + F.linear, then the LoRA term, all in dtype."""
    dtype = x.dtype
    return F.linear(x, dense_in_dtype, bias) + scaling * F.linear(F.linear(x, lora_A.to(dtype)), lora_B.to(dtype)).to(
        dtype
    )


@pytest.mark.parametrize("M", [1, 5, 70], ids=["M1-fused", "M5-fused", "M70-buffer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_fused_forward_and_backward_within_torch_error(M, dtype, nested):
    """Error against an fp64 reference of the exact dequantized weight: at most 1.05x the error of torch's
    dequantize + F.linear path in the same dtype (plus a small floor: fp32 errors are a few ulps either way)."""
    K, N, rank, scaling = 64, 45, 7, 1.5
    x, packed, state, bias, lora_A, lora_B = _lora_problem(M, K, N, rank, dtype, nested)
    dense32 = bnb_functional.dequantize_4bit(packed, state)
    dense_in_dtype = dense32.to(dtype)
    leaves = [x, lora_A, lora_B]
    for leaf in leaves:
        leaf.requires_grad_(True)
    with ops.use_backend("triton"):
        y = ops.lora_linear_4bit(x, packed, state, bias, dtype, [lora_A], [lora_B], [None], [scaling], [0.0], True)
    assert ops.last_backend("lora_linear_4bit") == "triton" and y.dtype == dtype
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = [y, *torch.autograd.grad(y, leaves, grad_y)]
    exact_y = _exact(x, dense32, bias, lora_A, lora_B, scaling)
    exact = [exact_y, *torch.autograd.grad(exact_y, leaves, grad_y.double())]
    # The torch path in dtype: adapters in dtype too (the leaves' grads are cast back by autograd).
    torch_y = _torch_in_dtype(x, dense_in_dtype, bias, lora_A, lora_B, scaling)
    torch_path = [torch_y, *torch.autograd.grad(torch_y, leaves, grad_y)]
    floor = 0.1 * KERNEL[torch.float32]["atol"]
    for name, actual, reference, baseline in zip(["y", "dx", "dA", "dB"], got, exact, torch_path):
        kernel_error = (actual.double() - reference).abs().max().item()
        torch_error = (baseline.double() - reference).abs().max().item()
        assert kernel_error <= 1.05 * torch_error + floor, (name, kernel_error, torch_error)


@pytest.mark.parametrize(
    "K,blocksize",
    [(64, 32), (256, 128), (96, 64), (33, 64)],
    ids=["two-scales-a-tile", "tile-inside-a-block", "blocks-straddle-rows", "odd-K"],
)
def test_fused_4bit_kernel_on_every_weight_layout(K, blocksize):
    """Whole blocks per row take the row-wise layout (one scale per row and block of a tile, whether a tile spans
    several blocks or sits inside one); other K read nibble and scale per element. Each against the dequantized W."""
    M, N, rank = 5, 19, 4
    packed, state = _quantize((N, K), "nf4", nested=True, blocksize=blocksize)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=generator).to(DEVICE)
    shrunk = torch.randn(M, rank, generator=generator).to(DEVICE)
    lora_B = torch.randn(N, rank, generator=generator).to(DEVICE)
    y = kernels.nf4_lora_matmul(x, *_fields(packed, state), shrunk=shrunk, lora_B=lora_B, dot_dtype=torch.float32)
    dense = _bitsandbytes_dequantize(packed, state, torch.float32)
    assert_close(y, x @ dense.T + shrunk @ lora_B.T, kind="kernel")


@pytest.mark.parametrize("M,forward_dequantizations", [(70, 1), (3, 0)], ids=["buffer", "fused"])
def test_at_most_two_dequantizations_per_training_step(M, forward_dequantizations, monkeypatch):
    x, packed, state, bias, lora_A, lora_B = _lora_problem(M, 64, 29, 4, torch.float32, nested=True)
    lora_A.requires_grad_(True)
    calls = []
    dequantize = kernels.nf4_dequantize

    def counting(*args, **kwargs):
        calls.append(kwargs.get("out") is not None)
        return dequantize(*args, **kwargs)

    monkeypatch.setattr(kernels, "nf4_dequantize", counting)
    with ops.use_backend("triton"):
        y = ops.lora_linear_4bit(x, packed, state, None, torch.float32, [lora_A], [lora_B], [None], [1.0], [0.0], True)
    assert len(calls) == forward_dequantizations
    y.sum().backward()
    # Backward dequantizes once more, for dX = dY W (+ the LoRA part); always into the reused buffer.
    assert len(calls) == forward_dequantizations + 1 and all(calls)


def test_dropout_same_mask_forward_and_backward_on_both_paths():
    """With dropout the mask is drawn from a seed in forward and again in backward. The LoRA term is linear in A, so
    sum(dL/dA * A) equals the sum of the LoRA term (L = sum(y)) only if backward used forward's mask."""
    for M in (3, 70):
        x, packed, state, bias, lora_A, lora_B = _lora_problem(M, 64, 21, 4, torch.float32, nested=False)
        lora_A.requires_grad_(True)
        with ops.use_backend("triton"):
            torch.manual_seed(5)
            y = ops.lora_linear_4bit(
                x, packed, state, None, torch.float32, [lora_A], [lora_B], [None], [1.0], [0.5], True
            )
        base = F.linear(x, bnb_functional.dequantize_4bit(packed, state))
        lora_term = y - base
        (grad_A,) = torch.autograd.grad(y.sum(), [lora_A])
        torch.testing.assert_close((grad_A * lora_A).sum(), lora_term.sum(), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 512])
def test_gpu_bf16_fused_and_buffer_paths_large_shape(M):
    K, N, rank, scaling = 4096, 1536, 16, 2.0
    x, packed, state, bias, lora_A, lora_B = _lora_problem(M, K, N, rank, torch.bfloat16, nested=True)
    dense32 = bnb_functional.dequantize_4bit(packed, state).float()
    with ops.use_backend("triton"):
        y = ops.lora_linear_4bit(
            x, packed, state, bias, torch.bfloat16, [lora_A], [lora_B], [None], [scaling], [0.0], False
        )
    exact = _exact(x, dense32, bias, lora_A, lora_B, scaling)
    torch_y = _torch_in_dtype(x, dense32.to(torch.bfloat16), bias, lora_A, lora_B, scaling)
    assert (y.double() - exact).abs().max() <= 1.05 * (torch_y.double() - exact).abs().max() + 1e-3
    assert torch.equal(kernels.nf4_dequantize(*_fields(packed, state), dtype=torch.bfloat16), dense32.bfloat16())


@pytest.mark.parametrize("plan", ["fused", "auto"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("M", [3, 70], ids=["decode", "buffer"])
def test_traced_custom_ops_pass_opcheck(M, nested, plan, monkeypatch, tmp_path):
    """What torch.compile traces the 4-bit path into (the launchers read data pointers, which dynamo can't trace):
    schema, fake and autograd of `lora_linear_4bit_fwd` and its backward op, with dropout on one of two adapters.
    "auto" without timing (no GPU to time on): its default plan, through the failure lookups."""
    monkeypatch.setenv(autotune.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv(autotune.SWITCH, "0")
    autotune.reset()
    x, packed, state, bias, lora_A, lora_B = _lora_problem(M, 64, 21, 4, torch.float32, nested=nested)
    second_A, second_B = lora_A[:3].clone() * 0.5, lora_B[:, :3].clone()
    adapters = [tensor.requires_grad_(True) for tensor in (lora_A, second_A, lora_B, second_B)]
    weight = nf4_ops._op_weight(_fields(packed, state))
    seeds = torch.tensor([11, 12], dtype=torch.int64, device=DEVICE)
    args = (x.requires_grad_(True), bias, *weight, adapters[:2], adapters[2:], [1.5, 0.5], [0.0, 0.25], seeds, plan)
    torch.library.opcheck(nf4_ops.lora_linear_4bit_fwd, args)
    y, shrunk = nf4_ops.lora_linear_4bit_fwd(*args)
    with ops.use_backend("torch"):
        reference_y = ops.lora_linear_4bit(x, packed, state, bias, torch.float32, [lora_A], [lora_B], [None], [1.5],
                                           [0.0], False)  # fmt: skip
    second = F.linear(shrunk[:, 4:], second_B)
    assert_close(y - second, reference_y, dtype=torch.float32)
    autotune.reset()
