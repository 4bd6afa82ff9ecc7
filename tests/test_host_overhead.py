"""Host work of the kernel path is done once per layer and shape, and redone whenever its answer could change.

Counts, not times: over N forwards of the same shape, backend resolutions (`dispatch.resolve_uncached`), launch plans
(block sizes, grids and launch arguments: `kernels.remember_launch`) and `auto`'s plan lookups (`autotune.choose`,
shape-class keys) do not grow with N; a change of shape, dtype, backend setting or autotune winner is seen at once
(the outputs are checked against the reference each time, so a stale plan fails). Also: the three autograd boundaries
of `lora_linear_triton` (eager without grad, eager autograd.Function, custom op) compute the same values and
gradients. The kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""

import pytest
import torch
from tolerances import assert_close

from peftfast import ops
from peftfast.ops import autograd, autotune, dispatch, multi_adapter
from peftfast.utils.mixed_batch import MixedBatch

pytest.importorskip("triton")
from peftfast.kernels import lora_linear as kernels  # noqa: E402

pytestmark = pytest.mark.cpu_kernels
CALLS = 6


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture
def counts(monkeypatch):
    spies = {
        "resolutions": Counter(dispatch.resolve_uncached),
        "launch plans": Counter(kernels.remember_launch),
        "plan races": Counter(autotune.choose),
        "class keys": Counter(autograd._class_key),
    }
    monkeypatch.setattr(dispatch, "resolve_uncached", spies["resolutions"])
    monkeypatch.setattr(kernels, "remember_launch", spies["launch plans"])
    monkeypatch.setattr(autotune, "choose", spies["plan races"])
    monkeypatch.setattr(autograd, "_class_key", spies["class keys"])
    # Cached resolutions and launch plans of earlier tests would hide the first call's work.
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setattr(kernels, "_LAUNCH_PLANS", {})
    return lambda: {name: spy.calls for name, spy in spies.items()}


def _layer_tensors(M, dtype=torch.float32, K=13, N=11, r=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator).to(dtype)
    weight = (torch.randn(N, K, generator=generator) * K**-0.5).to(dtype)
    bias = torch.randn(N, generator=generator).to(dtype)
    A = torch.randn(r, K, generator=generator) * K**-0.5
    B = torch.randn(N, r, generator=generator) * r**-0.5
    return x, weight, bias, [A], [B]


def _call(x, weight, bias, lora_A, lora_B, training=False):
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, [None], [0.75], [0.0], training=training)


def _check(x, weight, bias, lora_A, lora_B, dtype=torch.float32):
    got = _call(x, weight, bias, lora_A, lora_B)
    want = ops.reference.lora_linear(x, weight, bias, lora_A, lora_B, [None], [0.75], [0.0], False)
    assert_close(got, want, kind="kernel", dtype=dtype)


def test_repeated_forwards_resolve_backend_and_launch_plans_once(counts):
    tensors = _layer_tensors(5)
    with ops.use_backend("triton"), torch.no_grad():
        _check(*tensors)
        first = counts()
        for _ in range(CALLS):
            _check(*tensors)
    assert ops.last_backend("lora_linear") == "triton"
    # One launch plan (lora_shrink then dual_matmul) for the one adapter's forward.
    assert first["resolutions"] == 1 and first["launch plans"] == 1
    assert counts() == first


def test_repeated_training_steps_build_their_launch_plans_once(counts):
    x, weight, bias, lora_A, lora_B = _layer_tensors(6)
    leaves = [x, *lora_A, *lora_B]
    for leaf in leaves:
        leaf.requires_grad_(True)

    def step():
        y = _call(x, weight, bias, lora_A, lora_B, training=True)
        return torch.autograd.grad(y.square().sum(), leaves)

    with ops.use_backend("triton"):
        first_grads = step()
        first = counts()
        for _ in range(CALLS):
            grads = step()
    # The forward's plan (lora_shrink, dual_matmul) and the backward's (lora_grad_dy, lora_grad_a, dual_matmul for dX).
    assert first["resolutions"] == 1 and first["launch plans"] == 2
    assert counts() == first
    for got, want in zip(grads, first_grads):
        assert torch.equal(got, want)


def test_a_new_shape_or_dtype_builds_new_launch_plans_and_stays_correct(counts):
    with ops.use_backend("triton"), torch.no_grad():
        _check(*_layer_tensors(5))
        after_first = counts()
        _check(*_layer_tensors(9, seed=1))
        after_rows = counts()
        assert after_rows["launch plans"] == after_first["launch plans"] + 1
        # The backend's answer depends on devices and dtypes, not on the number of rows.
        assert after_rows["resolutions"] == after_first["resolutions"]
        _check(*_layer_tensors(9, K=17, seed=2))
        assert counts()["launch plans"] == after_rows["launch plans"] + 1
        before_dtype = counts()
        _check(*_layer_tensors(9, dtype=torch.float16, seed=3), dtype=torch.float16)
        after_dtype = counts()
    assert after_dtype["resolutions"] == before_dtype["resolutions"] + 1
    assert after_dtype["launch plans"] == before_dtype["launch plans"] + 1


def test_a_changed_backend_setting_is_seen_at_once(counts):
    tensors = _layer_tensors(4)
    with torch.no_grad():
        with ops.use_backend("triton"):
            _check(*tensors)
        assert ops.last_backend("lora_linear") == "triton"
        with ops.use_backend("torch"):
            _check(*tensors)
        assert ops.last_backend("lora_linear") == "torch"
        with ops.use_backend("triton"):
            _check(*tensors)
        assert ops.last_backend("lora_linear") == "triton"
        ops.set_backend("torch")
        try:
            _check(*tensors)
            assert ops.last_backend("lora_linear") == "torch"
        finally:
            ops.set_backend(None)
    # One resolution per distinct setting ("triton", "torch"); auto on CPU tensors needs none.
    assert counts()["resolutions"] == 2


def test_new_registration_drops_cached_resolutions(monkeypatch, counts):
    tensors = _layer_tensors(4)
    with ops.use_backend("triton"), torch.no_grad():
        _check(*tensors)
        monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "lora_linear", dict(dispatch._IMPLEMENTATIONS["lora_linear"]))
        dispatch.register("lora_linear", "triton", ops.reference.lora_linear, can_serve=lambda *args: False)
        with pytest.raises(RuntimeError, match="cannot run"):
            _check(*tensors)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.delenv(autotune.SWITCH, raising=False)
    autotune.reset()
    yield tmp_path
    autotune.reset()
    autotune.set_timer(None)


def _auto_forward(M=7):
    x, weight, bias, lora_A, lora_B = _layer_tensors(M)
    y, _ = autograd.forward("auto", x, weight, bias, lora_A, lora_B, [0.75], [0.0], None)
    want = ops.reference.lora_linear(x, weight, bias, lora_A, lora_B, [None], [0.75], [0.0], False)
    assert_close(y, want, kind="kernel", dtype=torch.float32)


def _plans_run(monkeypatch):
    """The names of the plans' functions in the order they run: expand_fused and expand_composed (what the race
    times), _forward_torch (the fallback) and lora_linear_forward (the fused plan of one adapter, once settled)."""
    ran = []
    for name in ("expand_fused", "expand_composed", "_forward_torch"):
        original = getattr(autograd, name)

        def spy(*args, _original=original, _name=name):
            ran.append(_name)
            return _original(*args)

        monkeypatch.setattr(autograd, name, spy)
    original_bundle = kernels.lora_linear_forward

    def bundle(*args, **kwargs):
        ran.append("lora_linear_forward")
        return original_bundle(*args, **kwargs)

    monkeypatch.setattr(kernels, "lora_linear_forward", bundle)
    return ran


def _race(monkeypatch, winner):
    """Races decided by `winner["plan"]`: the fake timer runs each candidate and reports 1 ms for the winner's, 2 ms
    for the other's."""
    choose = autotune.choose

    def racing_choose(op, key, candidates, device, default=autotune.DEFAULT_PLAN):
        def named(name, run):
            return lambda: (run(), name)[1]

        return choose(op, key, {name: named(name, run) for name, run in candidates.items()}, device, default)

    monkeypatch.setattr(autotune, "choose", racing_choose)
    autotune.set_timer(lambda run: 1.0 if run() == winner["plan"] else 2.0)


def test_auto_settles_its_plan_once_per_shape_class_and_follows_a_new_winner(cache_dir, monkeypatch, counts):
    winner = {"plan": "fused"}
    _race(monkeypatch, winner)
    ran = _plans_run(monkeypatch)
    for _ in range(CALLS):
        _auto_forward()
    # Raced once (both plans timed, then the winner run), and the shape-class key built once.
    assert ran == ["expand_fused", "expand_composed", "expand_fused"] + ["lora_linear_forward"] * (CALLS - 1)
    assert counts()["class keys"] == 1

    # A new winner (the cache file deleted and the plans raced again) is followed at once.
    winner["plan"] = "composed"
    for path in cache_dir.glob("autotune-*.json"):
        path.unlink()
    autotune.reset()
    ran.clear()
    _auto_forward()
    _auto_forward()
    assert ran == ["expand_fused", "expand_composed", "expand_composed", "expand_composed"]

    # A recorded failure of the kernels for this shape class sends the next call to torch.
    x = _layer_tensors(7)[0]
    key = autograd.shape_class("lora_linear", x, 11, [3], [0.0])
    with pytest.warns(RuntimeWarning, match="failed"):
        autotune.record_failure("lora_linear", key, autotune.KernelFailure("injected"), x.device)
    ran.clear()
    _auto_forward()
    assert ran == ["_forward_torch"]
    # Another shape class (16 rows, not 8) is unaffected by that failure.
    ran.clear()
    _auto_forward(M=13)
    assert "_forward_torch" not in ran


def test_auto_with_autotuning_off_settles_on_the_default_plan(cache_dir, monkeypatch, counts):
    monkeypatch.setenv(autotune.SWITCH, "0")
    ran = _plans_run(monkeypatch)
    for _ in range(CALLS):
        _auto_forward()
    assert ran == ["expand_composed"] * CALLS
    assert counts()["plan races"] == 1
    # Switched back on: the settled default is dropped and the plans are raced.
    monkeypatch.delenv(autotune.SWITCH)
    _race(monkeypatch, {"plan": "fused"})
    ran.clear()
    _auto_forward()
    assert ran[:2] == ["expand_fused", "expand_composed"]


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_the_eager_and_custom_op_boundaries_compute_the_same(dropout_p):
    x, weight, bias, lora_A, lora_B = _layer_tensors(9)
    bias.requires_grad_(True)
    leaves = [x, bias, *lora_A, *lora_B]
    for leaf in leaves:
        leaf.requires_grad_(True)
    seeds = torch.tensor([4321]) if dropout_p > 0 else None
    settings = ("fused", [0.75], [dropout_p], seeds, 1)
    y_eager = autograd._LoraLinearFunction.apply(x, weight, bias, settings, *lora_A, *lora_B)
    y_op, _ = autograd.lora_linear_fwd(x, weight, bias, lora_A, lora_B, [0.75], [dropout_p], seeds, "fused")
    grad_y = torch.randn_like(y_op)
    assert torch.equal(y_eager, y_op)
    for got, want in zip(torch.autograd.grad(y_eager, leaves, grad_y), torch.autograd.grad(y_op, leaves, grad_y)):
        assert torch.equal(got, want)
    with torch.no_grad():
        y_plain, _ = autograd.forward("fused", x, weight, bias, lora_A, lora_B, [0.75], [dropout_p], seeds)
    assert torch.equal(y_plain, y_op)


def test_an_empty_batch_through_the_eager_boundary_gives_zero_adapter_gradients():
    x, weight, bias, lora_A, lora_B = _layer_tensors(0)
    leaves = [x, *lora_A, *lora_B]
    for leaf in leaves:
        leaf.requires_grad_(True)
    with ops.use_backend("triton"):
        y = _call(x, weight, bias, lora_A, lora_B, training=True)
    assert y.shape == (0, 11)
    grad_x, grad_A, grad_B = torch.autograd.grad(y.sum(), leaves)
    assert grad_x.shape == (0, 13)
    assert torch.equal(grad_A, torch.zeros_like(lora_A[0])) and torch.equal(grad_B, torch.zeros_like(lora_B[0]))


def _mixed_batch_call(tokens=3):
    """(y, x, kernel arguments) of a two-adapter mixed batch of three rows (one without adapter), ranks 2 and 5."""
    generator = torch.Generator().manual_seed(0)
    K, N, ranks = 13, 11, [2, 5]
    lora_A = torch.randn(sum(ranks), K, generator=generator) * K**-0.5
    lora_B_t = torch.randn(sum(ranks), N, generator=generator) * 0.5
    slot_spans = torch.tensor([[0, 2], [2, 5]], dtype=torch.int32)
    batch = MixedBatch(["a1", "__base__", "a0"], adapters=["a0", "a1"])
    layout = batch.layout(tokens, torch.device("cpu"))
    group_slot = torch.arange(2, dtype=torch.int32)
    args = (lora_A, lora_B_t, None, torch.tensor([0.5, 2.0]), slot_spans, group_slot, layout.token_order)
    args += (layout.tiles, layout.block_m, max(ranks))
    x = torch.randn(3 * tokens, K, generator=generator)
    y = torch.randn(3 * tokens, N, generator=generator)
    return y, x, args


def test_auto_multi_adapter_launches_directly_and_settles_once_per_shape_class(cache_dir, monkeypatch):
    y, x, args = _mixed_batch_call()
    op = Counter(multi_adapter._lora_multi_adapter_op)
    fallback_checks = Counter(autotune.run_with_fallback)
    monkeypatch.setattr(multi_adapter, "_lora_multi_adapter_op", op)
    monkeypatch.setattr(autotune, "run_with_fallback", fallback_checks)
    want = ops.reference.lora_multi_adapter(y.clone(), x, *args)
    with torch.no_grad():
        for _ in range(CALLS):
            assert_close(multi_adapter.lora_multi_adapter_triton(y.clone(), x, *args), want, kind="kernel")
    # Eager without grad: no custom-op dispatch; `auto`'s failure lookup made once for the shape class.
    assert op.calls == 0 and fallback_checks.calls == 1
    # A failure recorded for this class is seen by the next call, which runs torch.
    key = multi_adapter._class_key((autotune.size_class(x.shape[0]), 13, 11, 5, x.dtype, x.device))
    with pytest.warns(RuntimeWarning, match="failed"):
        autotune.record_failure("lora_multi_adapter", key, autotune.KernelFailure("injected"), x.device)
    launches = Counter(multi_adapter._sgmv().lora_multi_adapter)
    monkeypatch.setattr(multi_adapter._sgmv(), "lora_multi_adapter", launches)
    with torch.no_grad():
        assert_close(multi_adapter.lora_multi_adapter_triton(y.clone(), x, *args), want, kind="kernel")
    assert launches.calls == 0
    # With autograd watching y, the custom op runs (it refuses to be differentiated rather than drop the term).
    autotune.reset()
    y_grad = y.clone().requires_grad_(True)
    with ops.use_backend("triton"):
        multi_adapter.lora_multi_adapter_triton(y_grad.clone(), x, *args)
    assert op.calls == 1


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_one_adapter_launch_bundles_equal_the_separate_launchers(dropout_p):
    x, weight, bias, (A,), (B,) = _layer_tensors(10)
    seed = torch.tensor([77]) if dropout_p > 0 else None
    y, shrunk = kernels.lora_linear_forward(x, weight, bias, A, B, 0.75, dropout_p, seed, dot_dtype=torch.float32)
    want_shrunk = kernels.lora_shrink(x, A, 0.75, dropout_p, seed, dot_dtype=torch.float32)
    want_y = kernels.dual_matmul(x, weight.T, want_shrunk, B.T, bias, out_dtype=x.dtype, dot_dtype=torch.float32)
    assert torch.equal(shrunk, want_shrunk) and torch.equal(y, want_y)

    grad_y = torch.randn_like(y)
    grad_x, grad_a, grad_b = kernels.lora_linear_backward(
        grad_y, x, weight, A, B, shrunk, 0.75, dropout_p, seed, dot_dtype=torch.float32
    )
    grad_s, want_b = kernels.lora_grad_dy(grad_y, B, shrunk, dot_dtype=torch.float32)
    grad_s = grad_s * 0.75
    want_a = kernels.lora_grad_a(grad_s, x, dropout_p, seed, dot_dtype=torch.float32)
    want_x = kernels.dual_matmul(
        grad_y, weight, grad_s, A, out_dtype=x.dtype, dropout_p=dropout_p, seed=seed, dot_dtype=torch.float32
    )
    assert torch.equal(grad_a, want_a) and torch.equal(grad_b, want_b) and torch.equal(grad_x, want_x)
    no_grad_x, grad_a_only, _ = kernels.lora_linear_backward(
        grad_y, x, weight, A, B, shrunk, 0.75, dropout_p, seed, needs_grad_x=False, dot_dtype=torch.float32
    )
    assert no_grad_x is None and torch.equal(grad_a_only, want_a)


def test_repeated_mixed_batches_resolve_their_backend_once(counts):
    y, x, args = _mixed_batch_call()
    want = ops.reference.lora_multi_adapter(y.clone(), x, *args)
    with ops.use_backend("triton"), torch.no_grad():
        for _ in range(CALLS):
            assert_close(ops.lora_multi_adapter(y.clone(), x, *args), want, kind="kernel")
        assert counts()["resolutions"] == 1
        ops.lora_multi_adapter(y.half(), x.half(), *args)
    # fp16 activations: a new signature, resolved anew.
    assert counts()["resolutions"] == 2
