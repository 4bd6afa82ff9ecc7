"""`auto` on the DoRA and MoE LoRA kernels, as on lora_linear's (see test_autotune.py): the fused kernels raced against
the cuBLAS/torch composition per shape class with the winner cached on disk, a kernel failure turned into a warning,
a recorded failure and torch's result, and backend "triton" asked for by name running the kernels and raising.

Without a GPU the kernels run in Triton's interpreter and a fake timer stands in for `triton.testing.do_bench`; the
custom ops are called with plan "auto" directly (backend "auto" itself only picks the kernels for CUDA tensors).
Forward and gradients of every plan are compared with a dense fp64 formula using the kernels' dropout masks.
"""

import warnings

import pytest
import torch
from test_autotune import _failing, _timer
from tolerances import assert_close

from peftfast import ops
from peftfast.ops import autotune
from peftfast.ops import dora as dora_ops
from peftfast.ops import moe_lora as moe_ops

pytest.importorskip("triton")
from peftfast.kernels import dora as dora_kernels  # noqa: E402
from peftfast.kernels import lora_linear as lora_kernels  # noqa: E402
from peftfast.kernels import moe_lora as moe_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALING = 1.5


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.delenv(autotune.SWITCH, raising=False)
    autotune.reset()
    yield tmp_path
    autotune.reset()
    autotune.set_timer(None)


def _rand(generator, *shape, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE)


# ------------------------------------------------------------------------------------------------------------ DoRA


def _dora_problem(M=21, K=35, N=27, r=5):
    generator = torch.Generator().manual_seed(0)
    x = _rand(generator, M, K).requires_grad_()
    weight = _rand(generator, N, K, scale=K**-0.5)
    bias = _rand(generator, N)
    lora_A = _rand(generator, r, K, scale=K**-0.5).requires_grad_()
    lora_B = _rand(generator, N, r, scale=r**-0.5).requires_grad_()
    norm = ops.reference.dora_weight_norm(weight, lora_A, lora_B, SCALING)[0]
    magnitude = (norm * (1 + 0.3 * _rand(generator, N))).requires_grad_()
    grad_y = _rand(generator, M, N)
    return x, weight, bias, lora_A, lora_B, magnitude, norm, grad_y


def _dora_exact(x, weight, bias, lora_A, lora_B, magnitude, norm, dropout_p, seed):
    """y = x W^T + b + (g - 1) x_d W^T + g s x_d A^T B^T, g = m / norm (the norm a constant), in fp64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B, magnitude)]
    x64, A, B, m = leaves
    W, b = weight.double(), bias.double()
    dropped = x64
    if dropout_p > 0:
        keep = lora_kernels.dropout_keep_mask(*x.shape, dropout_p, seed)
        dropped = torch.where(keep, x64 / (1 - dropout_p), 0.0)
    g = m / norm.double()
    y = x64 @ W.T + b + (g - 1) * (dropped @ W.T) + g * SCALING * (dropped @ A.T @ B.T)
    return y, leaves


def _dora_run(plan, dropout_p, **shape):
    """The custom op's output and gradients (x, A, B, magnitude) for `plan`, and the exact ones."""
    x, weight, bias, lora_A, lora_B, magnitude, norm, grad_y = _dora_problem(**shape)
    seed = torch.tensor([7], device=DEVICE) if dropout_p > 0 else None
    g = (magnitude / norm).float()
    y, _, _ = dora_ops.dora_linear_fwd(x, weight, bias, lora_A, lora_B, g, SCALING, dropout_p, seed, True, plan)
    got = [y, *torch.autograd.grad(y, [x, lora_A, lora_B, magnitude], grad_y)]
    exact, leaves = _dora_exact(x, weight, bias, lora_A, lora_B, magnitude, norm, dropout_p, seed)
    want = [exact, *torch.autograd.grad(exact, leaves, grad_y.double())]
    return got, want


def _assert_all_close(got, want):
    for actual, expected in zip(got, want):
        assert_close(actual.double(), expected, kind="kernel", dtype=torch.float32)


class _Calls:
    """Counts the calls of kernel launchers (wrapping them)."""

    def __init__(self, monkeypatch, module, *names):
        self.count = 0
        for name in names:
            original = getattr(module, name)
            monkeypatch.setattr(module, name, self._counting(original))

    def _counting(self, original):
        def launcher(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return launcher


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("winner", ["fused", "composed"])
def test_dora_race_runs_the_faster_plan_caches_it_and_both_plans_are_right(cache_dir, monkeypatch, winner, dropout_p):
    loser = "composed" if winner == "fused" else "fused"
    timer = _timer(monkeypatch, {winner: 1.0, loser: 2.0})
    got, want = _dora_run("auto", dropout_p)
    _assert_all_close(got, want)
    assert timer.calls == 4  # forward and backward, two plans each
    cache = autotune.plan_cache(DEVICE)
    [(key, entry)] = cache.winners["dora_linear backward"].items()
    assert entry == {"winner": winner, "ms": {winner: 1.0, loser: 2.0}}
    assert cache.winners["dora_linear forward"][f"{key}|z1"]["winner"] == winner
    assert key == f"dora_linear|M32|K35|N27|R5|float32|drop{int(dropout_p > 0)}|float32"
    # A new process reads the winners back from disk: no timing, and only the winner runs.
    autotune.reset()
    timer.calls = 0
    launches = _Calls(monkeypatch, dora_kernels, "dora_forward", "dora_grad_x", "column_dot")
    got, want = _dora_run("auto", dropout_p)
    _assert_all_close(got, want)
    assert timer.calls == 0
    assert (launches.count > 0) == (winner == "fused")


@pytest.mark.parametrize("plan", ["fused", "composed"])
@pytest.mark.parametrize(
    "shape", [dict(M=0), dict(r=40), dict(M=3, N=1)], ids=["empty-batch", "rank-40", "one-output-feature"]
)
def test_dora_plans_on_edge_cases(plan, shape):
    _assert_all_close(*_dora_run(plan, 0.3, **shape))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_dora_composed_plan_in_bf16_within_twice_torch_error(dropout_p):
    """bf16 activations and base weight, fp32 adapters (HF PEFT's default): forward and gradients within twice the
    error of the same formula done by torch in bf16."""
    x, weight, bias, lora_A, lora_B, magnitude, norm, grad_y = _dora_problem()
    x = x.detach().bfloat16().requires_grad_()
    weight, bias = weight.bfloat16(), bias.bfloat16()
    seed = torch.tensor([7], device=DEVICE) if dropout_p > 0 else None
    leaves = [x, lora_A, lora_B, magnitude]
    g = (magnitude / norm).float()
    y, _, _ = dora_ops.dora_linear_fwd(x, weight, bias, lora_A, lora_B, g, SCALING, dropout_p, seed, True, "composed")
    assert y.dtype == torch.bfloat16
    got = [y, *torch.autograd.grad(y, leaves, grad_y.bfloat16())]
    exact, exact_leaves = _dora_exact(x, weight, bias, lora_A, lora_B, magnitude, norm, dropout_p, seed)
    want = [exact, *torch.autograd.grad(exact, exact_leaves, grad_y.double())]
    # The same formula in bf16 throughout (adapters included), by torch autograd.
    bf16_leaves = [t.detach().bfloat16().requires_grad_() for t in leaves]
    x16, A16, B16, m16 = bf16_leaves
    dropped = x16
    if dropout_p > 0:
        keep = lora_kernels.dropout_keep_mask(*x.shape, dropout_p, seed)
        dropped = torch.where(keep, x16 / (1 - dropout_p), 0.0)
    g16 = m16 / norm.bfloat16()
    y16 = x16 @ weight.T + bias + (g16 - 1) * (dropped @ weight.T) + g16 * SCALING * (dropped @ A16.T @ B16.T)
    in_bf16 = [y16, *torch.autograd.grad(y16, bf16_leaves, grad_y.bfloat16())]
    for actual, expected, torch_result in zip(got, want, in_bf16):
        torch_error = (torch_result.double() - expected).abs().max()
        assert (actual.double() - expected).abs().max() <= 2 * torch_error + 1e-3 * expected.abs().max()


def test_dora_plan_that_fails_drops_out_of_the_race(cache_dir, monkeypatch):
    _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    monkeypatch.setattr(dora_kernels, "dora_forward", _failing)
    with pytest.warns(RuntimeWarning, match=r"dora_linear forward \(fused\)'.*drops out of the race"):
        got, want = _dora_run("auto", 0.3)
    _assert_all_close(got, want)
    [entry] = autotune.plan_cache(DEVICE).winners["dora_linear forward"].values()
    assert entry == {"winner": "composed", "ms": {"fused": None, "composed": 2.0}}


def test_dora_kernel_failure_under_auto_warns_records_and_runs_torch_and_named_triton_raises(cache_dir, monkeypatch):
    # A GPU where the fused plan won its race earlier, and now fails to launch (say, after a driver update).
    _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    _dora_run("auto", 0.3)
    autotune.reset()
    monkeypatch.setattr(dora_kernels, "dora_forward", _failing)
    monkeypatch.setattr(dora_kernels, "dora_grad_x", _failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, want = _dora_run("auto", 0.3)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("'dora_linear' failed" in m and "OutOfResources" in m and "on torch" in m for m in messages)
    _assert_all_close(got, want)
    [(key, reason)] = autotune.plan_cache(DEVICE).failures["dora_linear"].items()
    assert "OutOfResources" in reason and key.startswith("dora_linear|M32|K35|N27|R5|float32|drop1")
    # Later calls of that shape class go to torch without a second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = _dora_run("auto", 0.3)
    _assert_all_close(got, want)
    # Backend "triton" asked for by name runs the kernels, whatever the cache says, and the failure surfaces.
    x, weight, bias, lora_A, lora_B, magnitude, norm, _ = _dora_problem()
    with ops.use_backend("triton"), pytest.raises(Exception, match="out of resource"):
        ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, norm, SCALING, 0.3, True)


def test_dora_weight_norm_races_falls_back_and_raises_by_name(cache_dir, monkeypatch):
    _, weight, _, lora_A, lora_B, _, _, _ = _dora_problem()
    expected, expected_sq = ops.reference.dora_weight_norm(weight, lora_A, lora_B, SCALING)
    timer = _timer(monkeypatch, {"fused": 2.0, "composed": 1.0})
    with ops.use_backend("auto"):
        norm, weight_sq = dora_ops.dora_weight_norm_triton(weight, lora_A, lora_B, SCALING)
    assert timer.calls == 2
    assert {e["winner"] for e in autotune.plan_cache(DEVICE).winners["dora_weight_norm"].values()} == {"composed"}
    assert_close(norm, expected, kind="kernel")
    assert_close(weight_sq, expected_sq, kind="kernel")

    # Another GPU, where the kernel would win its race but fails to launch.
    for path in cache_dir.iterdir():
        path.unlink()
    autotune.reset()
    _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    monkeypatch.setattr(dora_kernels, "weight_times_adapter", _failing)
    with ops.use_backend("auto"), pytest.warns(RuntimeWarning, match=r"'dora_weight_norm \(fused\)'"):
        norm, _ = dora_ops.dora_weight_norm_triton(weight, lora_A, lora_B, SCALING, expected_sq)
    assert_close(norm, expected, kind="kernel")
    with ops.use_backend("triton"), pytest.raises(Exception, match="out of resource"):
        ops.dora_weight_norm(weight, lora_A, lora_B, SCALING)


# --------------------------------------------------------------------------------------------------------- MoE LoRA

SIZES = [9, 0, 13, 1]  # rows per expert, one expert without rows


def _moe_problem(sizes=SIZES, d_in=19, d_out=23, ranks=(3, 16)):
    generator = torch.Generator().manual_seed(1)
    E, S = len(sizes), sum(sizes)
    offsets = torch.tensor(sizes).cumsum(0).to(device=DEVICE, dtype=torch.int32)
    x = _rand(generator, S, d_in).requires_grad_()
    base = _rand(generator, S, d_out).requires_grad_()
    lora_A = [_rand(generator, E, r, d_in, scale=d_in**-0.5).requires_grad_() for r in ranks]
    lora_B = [_rand(generator, E, d_out, r, scale=r**-0.5).requires_grad_() for r in ranks]
    return base, x, offsets, lora_A, lora_B, [0.5, 2.0], _rand(generator, S, d_out)


def _moe_run(plan, sizes=SIZES, ranks=(3, 16)):
    """moe_lora_add_fwd's output and gradients (base, x, A_i, B_i) for `plan`, and the per-row formula's in fp64."""
    base, x, offsets, lora_A, lora_B, scaling, grad_y = _moe_problem(sizes, ranks=ranks)
    leaves = [base, x, *lora_A, *lora_B]
    y, _ = moe_ops.moe_lora_add_fwd(base, x, offsets, lora_A, lora_B, scaling, plan)
    got = [y, *torch.autograd.grad(y, leaves, grad_y)]
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    base64, x64, *factors = exact_leaves
    experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(DEVICE)
    exact = base64
    for A, B, s in zip(factors[:2], factors[2:], scaling):
        exact = exact + s * torch.einsum("sr,sor->so", torch.einsum("si,sri->sr", x64, A[experts]), B[experts])
    want = [exact, *torch.autograd.grad(exact, exact_leaves, grad_y.double())]
    return got, want


@pytest.mark.parametrize("winner", ["fused", "composed"])
def test_moe_race_runs_the_faster_plan_caches_it_and_both_plans_are_right(cache_dir, monkeypatch, winner):
    loser = "composed" if winner == "fused" else "fused"
    timer = _timer(monkeypatch, {winner: 1.0, loser: 2.0})
    got, want = _moe_run("auto")
    _assert_all_close(got, want)
    assert timer.calls == 4
    cache = autotune.plan_cache(DEVICE)
    [(key, entry)] = cache.winners["moe_lora_linear forward"].items()
    assert entry == {"winner": winner, "ms": {winner: 1.0, loser: 2.0}}
    assert cache.winners["moe_lora_linear backward"][key]["winner"] == winner
    assert key == "moe_lora_linear|M32|K19|N23|E4|R19|float32/float32"
    autotune.reset()
    timer.calls = 0
    launches = _Calls(monkeypatch, moe_kernels, "grouped_matmul", "grouped_outer")
    _assert_all_close(*_moe_run("auto"))
    assert timer.calls == 0
    assert (launches.count > 0) == (winner == "fused")


@pytest.mark.parametrize("plan", ["fused", "composed"])
@pytest.mark.parametrize(
    "sizes, ranks", [([0, 0, 0], (3, 16)), ([2, 5], (30, 1))], ids=["empty-batch", "rank-above-features"]
)
def test_moe_plans_on_edge_cases(plan, sizes, ranks):
    _assert_all_close(*_moe_run(plan, sizes, ranks))


def test_moe_kernel_failure_under_auto_warns_records_and_runs_torch_and_named_triton_raises(cache_dir, monkeypatch):
    _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    _moe_run("auto")
    autotune.reset()
    monkeypatch.setattr(moe_kernels, "grouped_matmul", _failing)
    with pytest.warns(RuntimeWarning, match="'moe_lora_linear' failed.*OutOfResources"):
        got, want = _moe_run("auto")
    _assert_all_close(got, want)
    [reason] = autotune.plan_cache(DEVICE).failures["moe_lora_linear"].values()
    assert "OutOfResources" in reason
    base, x, offsets, lora_A, lora_B, scaling, _ = _moe_problem()
    weight = torch.zeros(len(SIZES), base.shape[1], x.shape[1], device=DEVICE)
    with ops.use_backend("triton"), pytest.raises(Exception, match="out of resource"):
        ops.moe_lora_linear(x, weight, None, offsets, lora_A, lora_B, scaling, transposed=False)
