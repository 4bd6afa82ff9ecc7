"""The fused LoRA linear kernels against the torch reference: forward and every gradient, odd shapes, ranks 1..64,
fp32/fp16/bf16 inputs, bias, dropout with the same mask in forward and backward, several adapters.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which checks indexing, masking
and math; tests marked `gpu` repeat the check with real bf16 tensor-core math.
"""

import pytest
import torch
from tolerances import KERNEL, assert_close

from peftfast import ops
from peftfast.ops import autograd, autotune, reference

pytest.importorskip("triton")
from peftfast.kernels import lora_linear as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(M, K, N, ranks, dtype, with_bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE)

    x = rand(M, K).to(dtype)
    weight = rand(N, K, scale=K**-0.5).to(dtype)
    bias = rand(N).to(dtype) if with_bias else None
    lora_A = [rand(r, K, scale=K**-0.5) for r in ranks]
    lora_B = [rand(N, r, scale=r**-0.5) for r in ranks]
    scaling = [2.0 / (i + 1) for i in range(len(ranks))]
    return x, weight, bias, lora_A, lora_B, scaling


def _reference(x, weight, bias, lora_A, lora_B, scaling, masks, dropout_p, dtype=torch.float32):
    """y = x W^T + b + sum_i s_i (x * keep_i / (1 - p_i)) A_i^T B_i^T, all in `dtype`."""
    y = x.to(dtype) @ weight.to(dtype).T + (bias.to(dtype) if bias is not None else 0)
    for A, B, s, keep, p in zip(lora_A, lora_B, scaling, masks, dropout_p):
        dropped = x.to(dtype) * keep / (1 - p) if p > 0 else x.to(dtype)
        y = y + s * (dropped @ A.to(dtype).T @ B.to(dtype).T)
    return y


def _seeds(count, first=1234):
    return torch.arange(first, first + count, device=DEVICE, dtype=torch.int64) * 7919


def _run_both(M, K, N, ranks, dtype, dropout_p, with_bias=True, plan="fused"):
    x, weight, bias, lora_A, lora_B, scaling = _problem(M, K, N, ranks, dtype, with_bias)
    seeds = _seeds(len(ranks))
    masks = [kernels.dropout_keep_mask(M, K, p, seeds[i : i + 1]) for i, p in enumerate(dropout_p)]
    leaves = [x, *lora_A, *lora_B]
    for leaf in leaves:
        leaf.requires_grad_(True)
    y, _ = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds, plan)
    grad_y = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, leaves, grad_y)]
    y_ref = _reference(x, weight, bias, lora_A, lora_B, scaling, masks, dropout_p)
    want = [y_ref, *torch.autograd.grad(y_ref, leaves, grad_y.float())]
    return got, want


SHAPES = [(7, 37, 45), (33, 64, 17), (1, 123, 5), (70, 19, 130)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rank", [1, 7, 16, 64])
def test_forward_and_gradients_fp32(shape, rank):
    got, want = _run_both(*shape, [rank], torch.float32, [0.0])
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_half_precision_inputs_within_twice_torch_error(dtype, with_bias):
    """Error against an fp32 reference at most ~2x the error torch makes doing the same math in `dtype`."""
    M, K, N = 33, 45, 29
    x, weight, bias, lora_A, lora_B, scaling = _problem(M, K, N, [7], dtype, with_bias)
    y, _ = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, [0.0], None, "fused")
    assert y.dtype == dtype
    ones = [torch.ones(M, K, device=DEVICE)]
    exact = _reference(x, weight, bias, lora_A, lora_B, scaling, ones, [0.0], torch.float64)
    torch_in_dtype = ops.reference.lora_linear(
        x, weight, bias, [a.to(dtype) for a in lora_A], [b.to(dtype) for b in lora_B], [None], scaling, [0.0], False
    )
    kernel_error = (y.double() - exact).abs().max().item()
    torch_error = (torch_in_dtype.double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error + KERNEL[dtype]["atol"]


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_same_in_forward_and_backward(dropout_p):
    got, want = _run_both(29, 41, 23, [8], torch.float32, [dropout_p])
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel")


def test_dropout_mask_is_random_with_rate_p():
    seeds = torch.tensor([7, 8, 7], device=DEVICE)
    keep = kernels.dropout_keep_mask(64, 257, 0.3, seeds[0:1])
    assert 0.65 < keep.float().mean().item() < 0.75
    assert not torch.equal(keep, kernels.dropout_keep_mask(64, 257, 0.3, seeds[1:2]))
    assert torch.equal(keep, kernels.dropout_keep_mask(64, 257, 0.3, seeds[2:3]))


def test_dropout_without_a_seed_tensor_is_a_clear_error():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="seed as a 1-element int64 tensor"):
        kernels.lora_shrink(x, torch.randn(2, 8, device=DEVICE), 1.0, 0.1, seed=None)


@pytest.mark.parametrize("dropout_p", [[0.0, 0.0], [0.2, 0.0], [0.2, 0.4]], ids=["no-dropout", "one", "both"])
def test_several_adapters(dropout_p):
    got, want = _run_both(21, 35, 27, [3, 16], torch.float32, dropout_p)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel")


def test_empty_batch():
    x, weight, bias, lora_A, lora_B, scaling = _problem(0, 12, 9, [4], torch.float32)
    y, shrunk = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, [0.0], None, "fused")
    assert y.shape == (0, 9) and shrunk.shape == (0, 4)


def test_public_op_on_triton_backend_batched_and_non_contiguous():
    x, weight, bias, lora_A, lora_B, scaling = _problem(30, 24, 20, [5], torch.float32)
    x3 = x.reshape(5, 6, 24).transpose(0, 1)
    assert not x3.is_contiguous()
    with ops.use_backend("triton"):
        y = ops.lora_linear(x3, weight, bias, lora_A, lora_B, [None], scaling, [0.0], training=False)
    assert ops.last_backend("lora_linear") == "triton"
    expected = ops.reference.lora_linear(x3, weight, bias, lora_A, lora_B, [None], scaling, [0.0], False)
    assert y.shape == (6, 5, 20)
    assert_close(y, expected, kind="kernel")


def test_dropout_ignored_in_eval():
    x, weight, bias, lora_A, lora_B, scaling = _problem(9, 16, 8, [4], torch.float32)
    with ops.use_backend("triton"):
        y = ops.lora_linear(x, weight, bias, lora_A, lora_B, [None], scaling, [0.9], training=False)
    assert_close(
        y, ops.reference.lora_linear(x, weight, bias, lora_A, lora_B, [None], scaling, [0.0], False), kind="kernel"
    )


def test_calls_the_kernels_cannot_serve_fall_back_or_raise():
    x, weight, bias, lora_A, lora_B, scaling = _problem(4, 8, 6, [2], torch.float32)
    lora_B_bias = [torch.randn(6, device=DEVICE)]
    with ops.use_backend("auto"):
        ops.lora_linear(x, weight, bias, lora_A, lora_B, lora_B_bias, scaling, [0.0], training=False)
    assert ops.last_backend("lora_linear") == "torch"
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        ops.lora_linear(x, weight, bias, lora_A, lora_B, lora_B_bias, scaling, [0.0], training=False)


def test_torch_compile_traces_the_custom_op():
    x, weight, bias, lora_A, lora_B, scaling = _problem(10, 16, 12, [4], torch.float32)

    def layer(x):
        with ops.use_backend("triton"):
            return ops.lora_linear(x, weight, bias, lora_A, lora_B, [None], scaling, [0.0], training=False)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), layer(x), kind="kernel")


@pytest.mark.cpu_kernels
def test_whole_llama_trains_the_same_on_both_backends():
    from models import tiny_llama

    from peftfast import LoraConfig, get_peft_model

    results = {}
    for backend in ("torch", "triton"):
        model = get_peft_model(
            tiny_llama(seed=3), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        )
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
        losses = []
        with ops.use_backend(backend):
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        assert ops.last_backend("lora_linear") == backend
        assert set(model.backend_summary().values()) == {backend}
        results[backend] = (losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for name, value in results["torch"][1].items():
        assert_close(results["triton"][1][name], value, kind="kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tensor_core_math_large_shape(dtype):
    M, K, N = 1000, 1024, 1536
    x, weight, bias, lora_A, lora_B, scaling = _problem(M, K, N, [16], dtype)
    y, _ = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, [0.0], None, "fused")
    ones = [torch.ones(M, K, device=DEVICE)]
    exact = _reference(x, weight, bias, lora_A, lora_B, scaling, ones, [0.0], torch.float64)
    torch_in_dtype = ops.reference.lora_linear(
        x, weight, bias, [a.to(dtype) for a in lora_A], [b.to(dtype) for b in lora_B], [None], scaling, [0.0], False
    )
    assert (y.double() - exact).abs().max() <= 2 * (torch_in_dtype.double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("splits", [1, 3])
def test_grad_a_split_over_tokens_adds_up(splits, monkeypatch):
    """dA with the token loop split across programs (atomic adds) equals the single-program sum."""
    grad_s = torch.randn(100, 5, device=DEVICE)
    x = torch.randn(100, 37, device=DEVICE)
    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "_on_interpreter", lambda tensor: False)
        monkeypatch.setattr(
            kernels, "device_properties", lambda tensor: {"max_shared_mem": 2**17, "multiprocessor_count": 64}
        )
    got = kernels.lora_grad_a(grad_s, x, dot_dtype=torch.float32, max_splits=splits)
    assert_close(got, grad_s.T @ x, kind="kernel")


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 2, 2**40 + 123])
@pytest.mark.parametrize(("M", "K", "p"), [(5, 33, 0.1), (1, 1, 0.5), (0, 9, 0.3), (17, 64, 0.999)])
def test_torch_twin_of_the_dropout_mask_is_bit_identical(seed, M, K, p):
    seed_tensor = torch.tensor([seed], dtype=torch.int64)
    twin = reference.dropout_keep_mask(M, K, p, seed_tensor)
    assert twin.dtype == torch.bool and twin.shape == (M, K)
    assert torch.equal(twin, kernels.dropout_keep_mask(M, K, p, seed_tensor))
    if M * K > 500:
        assert abs(twin.float().mean().item() - (1 - p)) < 0.05


def test_fall_backs_draw_the_same_mask_when_the_mask_kernel_fails(monkeypatch):
    """The torch fall-back of the fused ops applies the kernels' dropout mask; where the mask kernel itself can't be
    built or launched, its torch twin gives the same bits, so forward and backward still agree."""
    x = torch.randn(6, 20, requires_grad=True)
    weight, A, B = torch.randn(9, 20), torch.randn(3, 20, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    seeds = torch.tensor([5], dtype=torch.int64)

    def run():
        y, shrunk = autograd._forward_torch(x, weight, None, [A], [B], [0.5], [0.4], seeds)
        grads = torch.autograd.grad(y.square().sum(), [x, A, B])
        return y, shrunk, grads

    expected = run()

    def failing(*args, **kwargs):
        raise autotune.KernelFailure("mask kernel out of resources")

    monkeypatch.setattr(kernels, "dropout_keep_mask", failing)
    got = run()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for ours, theirs in zip(got[2], expected[2]):
        assert torch.equal(ours, theirs)

    def buggy(*args, **kwargs):
        raise ValueError("a bug, not a kernel failure")

    # Only a kernel failure switches to the twin: anything else still raises.
    monkeypatch.setattr(kernels, "dropout_keep_mask", buggy)
    with pytest.raises(ValueError, match="a bug"):
        run()
