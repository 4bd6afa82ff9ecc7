"""`auto` on the kernels: plans raced with a timer and cached on disk, the composed plan (cuBLAS + LoRA kernels)
against the reference, and the fallback to torch when a kernel fails to compile or launch.

Without a GPU the plans run in Triton's interpreter and a fake timer stands in for `triton.testing.do_bench`; the
ops are called with plan "auto" directly (backend "auto" itself only picks the kernels for CUDA tensors).
"""

import json
import warnings

import pytest
import torch
from tolerances import assert_close

from peftfast import cli, ops
from peftfast.ops import autograd, autotune

pytest.importorskip("triton")
from peftfast.kernels import lora_linear as kernels  # noqa: E402
from peftfast.kernels import nf4 as nf4_kernels  # noqa: E402
from peftfast.kernels import sgmv as sgmv_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FakeTimer:
    """Times each plan by its name (ms) and counts calls; a plan the table lacks is slow."""

    def __init__(self, times):
        self.times = times
        self.calls = 0

    def __call__(self, run):
        self.calls += 1
        run()
        return self.times.get(self.current(run), 100.0)

    def current(self, run):
        for name, fn in self.candidates.items():
            if fn is run:
                return name
        return None


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.delenv(autotune.SWITCH, raising=False)
    autotune.reset()
    yield tmp_path
    autotune.reset()
    autotune.set_timer(None)


def _timer(monkeypatch, times):
    """A fake timer that knows which candidate it runs (choose() passes the candidates' own functions)."""
    timer = FakeTimer(times)
    choose = autotune.choose

    def recording_choose(op, key, candidates, device, default=autotune.DEFAULT_PLAN):
        timer.candidates = candidates
        return choose(op, key, candidates, device, default)

    monkeypatch.setattr(autotune, "choose", recording_choose)
    autotune.set_timer(timer)
    return timer


def _problem(M=21, K=35, N=27, ranks=(3, 16), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE)

    x = rand(M, K).to(dtype)
    weight = rand(N, K, scale=K**-0.5).to(dtype)
    bias = rand(N).to(dtype)
    lora_A = [rand(r, K, scale=K**-0.5) for r in ranks]
    lora_B = [rand(N, r, scale=r**-0.5) for r in ranks]
    return x, weight, bias, lora_A, lora_B, [2.0 / (i + 1) for i in range(len(ranks))]


def _reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds, dtype=torch.float32):
    """y = x W^T + b + sum_i s_i dropout_i(x) A_i^T B_i^T in `dtype`, with the kernels' masks for `seeds`."""
    y = x.to(dtype) @ weight.to(dtype).T + bias.to(dtype)
    for i, (A, B, s, p) in enumerate(zip(lora_A, lora_B, scaling, dropout_p)):
        dropped = x.to(dtype)
        if p > 0:
            dropped = torch.where(kernels.dropout_keep_mask(*x.shape, p, seeds[i : i + 1]), dropped / (1 - p), 0.0)
        y = y + s * (dropped @ A.to(dtype).T @ B.to(dtype).T)
    return y


def _forward_and_grads(plan, dropout_p, dtype=torch.float32, seeds=None):
    x, weight, bias, lora_A, lora_B, scaling = _problem(dtype=dtype)
    seeds = torch.tensor([11, 12], device=DEVICE) if seeds is None else seeds
    leaves = [x, *lora_A, *lora_B]
    for leaf in leaves:
        leaf.requires_grad_(True)
    y, _ = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds, plan)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    got = [y, *torch.autograd.grad(y, leaves, grad_y)]
    expected_y = _reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seeds)
    want = [expected_y, *torch.autograd.grad(expected_y, leaves, grad_y.float())]
    return got, want


@pytest.mark.parametrize("dropout_p", [[0.0, 0.0], [0.3, 0.0], [0.2, 0.4]], ids=["no-dropout", "one", "both"])
def test_composed_plan_matches_the_reference_forward_and_backward(dropout_p):
    got, want = _forward_and_grads("composed", dropout_p)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel", dtype=torch.float32)


def test_composed_plan_in_bf16_within_twice_torch_error():
    x, weight, bias, lora_A, lora_B, scaling = _problem(dtype=torch.bfloat16)
    y, _ = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, [0.0, 0.0], None, "composed")
    exact = _reference(x, weight, bias, lora_A, lora_B, scaling, [0.0, 0.0], None, torch.float64)
    torch_in_dtype = ops.reference.lora_linear(
        x,
        weight,
        bias,
        [a.bfloat16() for a in lora_A],
        [b.bfloat16() for b in lora_B],
        [None, None],
        scaling,
        [0.0, 0.0],
        False,
    )
    assert y.dtype == torch.bfloat16
    assert (y.double() - exact).abs().max() <= 2 * (torch_in_dtype.double() - exact).abs().max() + 3e-2


@pytest.mark.parametrize("winner", ["fused", "composed"])
def test_race_picks_the_faster_plan_caches_it_on_disk_and_reuses_it(cache_dir, monkeypatch, winner):
    loser = "composed" if winner == "fused" else "fused"
    timer = _timer(monkeypatch, {winner: 1.0, loser: 2.0})
    got, want = _forward_and_grads("auto", [0.2, 0.0])
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel", dtype=torch.float32)
    assert timer.calls == 4  # forward and backward, two plans each
    cache = autotune.plan_cache(DEVICE)
    [(key, entry)] = cache.winners["lora_linear forward"].items()
    assert entry["winner"] == winner and entry["ms"] == {winner: 1.0, loser: 2.0}
    assert cache.winners["lora_linear backward"][key]["winner"] == winner
    on_disk = json.loads(autotune.cache_path(DEVICE).read_text())
    assert on_disk["environment"]["torch"] == torch.__version__
    assert on_disk["winners"]["lora_linear forward"][key]["winner"] == winner
    # A new process (caches forgotten) reads the winner back instead of timing again.
    autotune.reset()
    timer.calls = 0
    _forward_and_grads("auto", [0.2, 0.0])
    assert timer.calls == 0


def test_a_new_shape_class_is_timed_again(cache_dir, monkeypatch):
    timer = _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    x, weight, bias, lora_A, lora_B, scaling = _problem()
    for rows in (21, 30, 40):  # 21 and 30 share the class of 32 rows; 40 is in the class of 64
        autograd.lora_linear_fwd(
            x[:rows] if rows <= 21 else x.repeat(2, 1)[:rows],
            weight,
            bias,
            lora_A,
            lora_B,
            scaling,
            [0.0, 0.0],
            None,
            "auto",
        )
    assert timer.calls == 4
    assert len(autotune.plan_cache(DEVICE).winners["lora_linear forward"]) == 2


def test_switch_off_means_no_timing_no_file_and_the_composed_plan(cache_dir, monkeypatch):
    monkeypatch.setenv(autotune.SWITCH, "0")
    timer = _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    calls = []
    monkeypatch.setattr(autograd, "expand_composed", lambda *a: calls.append(1) or torch.zeros(21, 27, device=DEVICE))
    x, weight, bias, lora_A, lora_B, scaling = _problem()
    autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, [0.0, 0.0], None, "auto")
    assert timer.calls == 0 and calls == [1]
    assert not list(cache_dir.iterdir())
    assert "off (PEFTFAST_AUTOTUNE=0)" in autotune.describe()[0]


def test_a_backend_asked_for_by_name_runs_the_fused_kernels_whatever_the_cache(cache_dir, monkeypatch):
    timer = _timer(monkeypatch, {"fused": 2.0, "composed": 1.0})
    _forward_and_grads("auto", [0.0, 0.0])
    assert timer.calls == 4
    composed = []
    original = autograd.expand_composed
    monkeypatch.setattr(autograd, "expand_composed", lambda *a: composed.append(1) or original(*a))
    x, weight, bias, lora_A, lora_B, scaling = _problem()
    with ops.use_backend("triton"):
        ops.lora_linear(x, weight, bias, lora_A, lora_B, [None, None], scaling, [0.0, 0.0], training=False)
        assert autograd.requested_plan() == "fused"
    with ops.use_backend("auto"):
        assert autograd.requested_plan() == "auto"
    assert composed == [] and timer.calls == 4


def _failing(*args, **kwargs):
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(200_000, 166_912, "shared memory")


def test_a_failing_kernel_falls_back_to_torch_once_warned_and_recorded(cache_dir, monkeypatch):
    _timer(monkeypatch, {})
    monkeypatch.setattr(kernels, "dual_matmul", _failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, want = _forward_and_grads("auto", [0.3, 0.0])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # The forward's fused plan drops out of its race; in backward both plans fail, so the op falls back to torch.
    assert any("'lora_linear forward (fused)'" in m and "drops out of the race" in m for m in messages)
    assert any("'lora_linear' failed" in m and "OutOfResources" in m and "on torch" in m for m in messages)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel", dtype=torch.float32)
    cache = autotune.plan_cache(DEVICE)
    [(key, reason)] = cache.failures["lora_linear"].items()
    assert "OutOfResources" in reason and key.startswith("lora_linear|M32|K35|N27|R19")
    # Later calls of that shape go straight to torch, without a second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = _forward_and_grads("auto", [0.3, 0.0])
    assert_close(got[0], want[0], kind="kernel", dtype=torch.float32)
    assert any("torch (failed: OutOfResources" in line for line in autotune.describe())
    # Asked for by name, the kernels run and the failure surfaces.
    with pytest.raises(Exception, match="out of resource"):
        _forward_and_grads("fused", [0.3, 0.0])


def test_a_kernel_failing_in_backward_only_falls_back_there(cache_dir, monkeypatch):
    _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    monkeypatch.setattr(kernels, "lora_grad_dy", _failing)
    with pytest.warns(RuntimeWarning, match="'lora_linear'"):
        got, want = _forward_and_grads("auto", [0.25, 0.5])
    for actual, expected in zip(got, want):
        assert_close(actual, expected, kind="kernel", dtype=torch.float32)


def test_a_plan_that_fails_drops_out_of_the_race(cache_dir, monkeypatch):
    _timer(monkeypatch, {"fused": 1.0, "composed": 2.0})
    monkeypatch.setattr(autograd, "expand_fused", _failing)
    with pytest.warns(RuntimeWarning, match="lora_linear forward \\(fused\\)"):
        got, want = _forward_and_grads("auto", [0.0, 0.0])
    assert_close(got[0], want[0], kind="kernel", dtype=torch.float32)
    [entry] = autotune.plan_cache(DEVICE).winners["lora_linear forward"].values()
    assert entry == {"winner": "composed", "ms": {"fused": None, "composed": 2.0}}


def test_other_errors_are_not_taken_for_kernel_failures(cache_dir, monkeypatch):
    _timer(monkeypatch, {})

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a missing GPU feature")

    monkeypatch.setattr(kernels, "dual_matmul", broken)
    with pytest.raises(ValueError, match="a bug"):
        _forward_and_grads("auto", [0.0, 0.0])
    assert not autotune.is_kernel_failure(ValueError("x"))
    assert autotune.is_kernel_failure(RuntimeError("Triton Error [CUDA]: invalid argument"))
    assert autotune.is_kernel_failure(autotune.KernelFailure("injected"))


def test_info_shows_the_cache(cache_dir, monkeypatch, capsys):
    _timer(monkeypatch, {"fused": 1.5, "composed": 2.5})
    _forward_and_grads("auto", [0.0, 0.0])
    cli.main(["info"])
    out = capsys.readouterr().out
    assert f"cache folder {cache_dir}" in out
    assert (
        "lora_linear forward lora_linear|M32|K35|N27|R19|float32|drop0: fused (fused 1.500 ms, composed 2.500 ms)"
        in out
    )


def _nf4_problem(M, K=64, N=29, rank=4):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * K**-0.5
    packed, state = bnb_functional.quantize_4bit(weight.to(DEVICE), quant_type="nf4", compress_statistics=True)
    stored = ops.nf4.read_quant_state(packed, state)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=generator).to(DEVICE)
    lora_A = torch.randn(rank, K, generator=generator).to(DEVICE) * K**-0.5
    lora_B = torch.randn(N, rank, generator=generator).to(DEVICE)
    return x.requires_grad_(True), stored, lora_A.requires_grad_(True), lora_B.requires_grad_(True)


@pytest.mark.parametrize("M", [3, 70], ids=["decode", "training"])
def test_4bit_plans_race_and_fall_back(cache_dir, monkeypatch, M):
    x, stored, lora_A, lora_B = _nf4_problem(M)
    expected = ops.reference.lora_linear_4bit(
        x, stored, None, torch.float32, [lora_A], [lora_B], [None], [1.5], [0.0], False
    )
    expected_grads = torch.autograd.grad(expected.sum(), [lora_A, x])
    timer = _timer(monkeypatch, {"dequantize_composed": 1.0})
    y = ops.nf4._LoraLinear4bit.apply(x, None, stored, [1.5], [0.0], None, "auto", lora_A, lora_B)
    forward_plans = 3 if M <= ops.nf4.SMALL_M else 2  # the fused 4-bit kernel only serves decode sizes
    assert timer.calls == forward_plans
    winners = autotune.plan_cache(DEVICE).winners
    assert {e["winner"] for e in winners["lora_linear_4bit forward"].values()} == {"dequantize_composed"}
    assert_close(y, expected, kind="kernel")
    grads = torch.autograd.grad(y.sum(), [lora_A, x])
    assert timer.calls == forward_plans + 2  # dX: fused and composed
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, kind="kernel")
    autotune.reset()
    monkeypatch.setattr(nf4_kernels, "nf4_dequantize", _failing)
    monkeypatch.setattr(nf4_kernels, "nf4_lora_matmul", _failing)
    with pytest.warns(RuntimeWarning, match="'lora_linear_4bit'"):
        y = ops.nf4._LoraLinear4bit.apply(x, None, stored, [1.5], [0.0], None, "auto", lora_A, lora_B)
    assert_close(y, expected, kind="kernel")
    for grad, expected_grad in zip(torch.autograd.grad(y.sum(), [lora_A, x]), expected_grads):
        assert_close(grad, expected_grad, kind="kernel")


def test_dequantize_and_multi_adapter_fall_back_in_auto_and_raise_by_name(cache_dir, monkeypatch):
    x, stored, _, _ = _nf4_problem(3)
    monkeypatch.setattr(nf4_kernels, "nf4_dequantize", _failing)
    with ops.use_backend("auto"), pytest.warns(RuntimeWarning, match="'nf4_dequantize'"):
        dense = ops.nf4.nf4_dequantize_triton(*stored, dtype=torch.float32)
    assert torch.equal(dense, ops.reference.nf4_dequantize(*stored, dtype=torch.float32))
    with ops.use_backend("triton"), pytest.raises(Exception, match="out of resource"):
        ops.nf4.nf4_dequantize_triton(*stored, dtype=torch.float32)

    monkeypatch.setattr(sgmv_kernels, "lora_multi_adapter", _failing)
    y, x = torch.zeros(4, 6, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    i32 = dict(device=DEVICE, dtype=torch.int32)
    args = (
        torch.randn(2, 5, device=DEVICE),
        torch.randn(2, 6, device=DEVICE),
        None,
        torch.tensor([1.0], device=DEVICE),
        torch.tensor([[0, 2]], **i32),
        torch.tensor([0], **i32),
        torch.arange(4, **i32),
        torch.tensor([[0, 0, 4]], **i32),
        16,
        2,
    )
    with ops.use_backend("auto"), pytest.warns(RuntimeWarning, match="'lora_multi_adapter'"):
        ops.multi_adapter.lora_multi_adapter_triton(y, x, *args)
    assert_close(y, ops.reference.lora_multi_adapter(torch.zeros(4, 6, device=DEVICE), x, *args), kind="kernel")
    with ops.use_backend("triton"), pytest.raises(Exception, match="out of resource"):
        ops.multi_adapter.lora_multi_adapter_triton(y, x, *args)
