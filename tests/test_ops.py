"""The op layer: the reference twins against independent math, and the backend choice rules."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from peftfast import ops
from peftfast.ops import dispatch


def _adapters(d_in, d_out, ranks, dtype=torch.float32, with_bias=False):
    As = [torch.randn(r, d_in, dtype=dtype) for r in ranks]
    Bs = [torch.randn(d_out, r, dtype=dtype) for r in ranks]
    biases = [torch.randn(d_out, dtype=dtype) if with_bias else None for _ in ranks]
    return As, Bs, biases


@pytest.mark.parametrize("shape", [(7, 37, 45), (3, 5, 1, 9), (0, 11, 13)], ids=["7x37x45", "batched", "empty"])
@pytest.mark.parametrize("ranks", [[1], [7], [16, 3]], ids=["r1", "r7", "two-adapters"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_lora_linear_matches_explicit_sum(shape, ranks, with_bias):
    *lead, d_in, d_out = shape
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64) if with_bias else None
    As, Bs, biases = _adapters(d_in, d_out, ranks, torch.float64, with_bias)
    scalings = [0.5 * (i + 1) for i in range(len(ranks))]
    expected = x @ W.T + (b if b is not None else 0)
    for A, B, bias, s in zip(As, Bs, biases, scalings):
        expected = expected + s * (x @ A.T @ B.T + (bias if bias is not None else 0))
    actual = ops.lora_linear(x, W, b, As, Bs, biases, scalings, [0.0] * len(ranks), training=True)
    assert actual.shape == (*lead, d_out)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_add_runs_adapter_in_its_dtype_and_returns_base_dtype(dtype):
    x = torch.randn(6, 19).to(dtype)
    result = torch.randn(6, 23).to(dtype)
    As, Bs, biases = _adapters(19, 23, [5])
    out = ops.lora_add(result, x, As, Bs, biases, [2.0], [0.0], training=False)
    assert out.dtype == dtype
    expected = (result.float() + 2.0 * (x.float() @ As[0].T @ Bs[0].T)).to(dtype)
    assert_close(out, expected, dtype=dtype)


def test_dropout_applies_to_lora_branch_only():
    x = torch.ones(64, 32)
    W = torch.eye(32)
    As, Bs, biases = [torch.eye(32)], [torch.eye(32)], [None]
    out = ops.lora_linear(x, W, None, As, Bs, biases, [1.0], [0.5], training=True)
    lora_part = out - x
    # Dropout(p=0.5) zeroes about half the entries and scales the rest by 2; the base term is never dropped.
    assert set(lora_part.unique().tolist()) <= {0.0, 2.0}
    assert 0.3 < (lora_part == 0).float().mean() < 0.7
    eval_out = ops.lora_linear(x, W, None, As, Bs, biases, [1.0], [0.5], training=False)
    assert_close(eval_out, 2 * x)


def test_gradients_flow_to_adapters_and_input():
    x = torch.randn(5, 9, requires_grad=True)
    W = torch.randn(7, 9)
    A = torch.randn(3, 9, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    ops.lora_linear(x, W, None, [A], [B], [None], [0.7], [0.0], training=True).square().sum().backward()
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    (F.linear(x2, W) + 0.7 * (x2 @ A2.T @ B2.T)).square().sum().backward()
    for got, want in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        assert_close(got, want)


def test_backend_resolution_order(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    assert ops.get_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert ops.get_backend() == "torch"
    ops.set_backend("triton")
    try:
        assert ops.get_backend() == "triton"
        with ops.use_backend("torch"):
            assert ops.get_backend() == "torch"
        assert ops.get_backend() == "triton"
    finally:
        ops.set_backend(None)


def test_auto_falls_back_to_torch_on_cpu():
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    with ops.use_backend("auto"):
        ops.lora_linear(x, W, None, [torch.randn(2, 4)], [torch.randn(5, 2)], [None], [1.0], [0.0], training=False)
    assert ops.last_backend("lora_linear") == "torch"


def test_forced_backend_without_implementation_raises():
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda'.*lora_linear"):
        ops.lora_linear(x, W, None, [torch.randn(2, 4)], [torch.randn(5, 2)], [None], [1.0], [0.0], training=False)


def test_forced_backend_that_cannot_serve_the_call_raises(monkeypatch):
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "lora_linear", dict(dispatch._IMPLEMENTATIONS["lora_linear"]))
    dispatch.register("lora_linear", "triton", ops.reference.lora_linear, can_serve=lambda *args: False)
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        ops.lora_linear(x, W, None, [torch.randn(2, 4)], [torch.randn(5, 2)], [None], [1.0], [0.0], training=False)


def test_unknown_backend_name_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="Unknown peftfast backend"):
        ops.set_backend("tpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="fastest"):
        ops.get_backend()
