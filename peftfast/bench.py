"""Benchmarks behind `peftfast bench` and `bench/*.py`: timing, work counts, CSV rows, the ratio table and its plot.

What is measured: the wall time of one call of an op (median and 20th/80th percentiles over many calls), on the same
random inputs for every provider of that op. On a CUDA GPU the timer is `triton.testing.do_bench` (CUDA events,
warm-up, L2 cache flushed before every call); on CPU it is `time.perf_counter` around each call after a few warm-up
calls. From the time: TFLOP/s and GB/s of the ideal work (see `lora_linear_work`), and, on GPU, the peak memory the
op allocates beyond what was allocated before it started. Benchmarks that compare providers call by call on a shared
CPU (`bench/bench_dora.py`, `bench_moe.py`, ...) time them with `time_side_by_side`.

The only op so far is `lora_linear`; its providers are
    gemm             the bare frozen base layer, F.linear (forward; forward + dX for "fwd+bwd"), the floor to beat;
    hf_peft          HF PEFT's LoRA layer (peft.get_peft_model on a one-layer model);
    peftfast_torch   peftfast's LoRA layer (peftfast.get_peft_model) on the backend "torch";
    peftfast_triton  the same layer on the backend "triton", skipped where the dispatcher says it can't run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.metadata
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from xml.sax.saxutils import escape

import torch
import torch.nn.functional as F
from torch import nn

import peftfast

from . import ops
from .version import __version__

MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("gemm", "hf_peft", "peftfast_torch", "peftfast_triton", "peftfast_auto")
# Table and plot labels.
SHORT_NAMES = {
    "gemm": "gemm",
    "hf_peft": "hf",
    "peftfast_torch": "torch",
    "peftfast_triton": "triton",
    "peftfast_auto": "auto",
}
_LORA_PROVIDERS = ("hf_peft", "peftfast_torch", "peftfast_triton", "peftfast_auto")
_BACKEND_OF = {"peftfast_torch": "torch", "peftfast_triton": "triton", "peftfast_auto": "auto"}


# The grids: (d_in, d_out) shapes of Llama-like projections on GPU, small ones that finish in seconds on CPU.
GPU_GRID = {
    "shapes": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "tokens": [512, 2048, 8192],
    "ranks": [8, 16, 64],
    "dropouts": [0.0, 0.1],
}
GPU_QUICK_GRID = {"shapes": [(4096, 4096)], "tokens": [2048], "ranks": [16], "dropouts": [0.0]}
CPU_GRID = {"shapes": [(256, 256), (256, 512)], "tokens": [64, 256], "ranks": [8, 16], "dropouts": [0.0]}
CPU_QUICK_GRID = {"shapes": [(256, 256), (256, 512)], "tokens": [64], "ranks": [8], "dropouts": [0.0]}
CPU_PROVIDERS = ("gemm", "hf_peft", "peftfast_torch")


OUTPUT_DIR_ENV = "PEFTFAST_BENCH_DIR"


def default_output_dir() -> Path:
    """Where a benchmark writes unless told otherwise (`--output-dir`): $PEFTFAST_BENCH_DIR, else
    `$XDG_CACHE_HOME/peftfast/bench` (`~/.cache/peftfast/bench`). Outside any checkout, so a run never rewrites the
    committed reference results in bench/results/ nor leaves the working tree modified; add a run to those on purpose
    with `--output-dir bench/results`."""
    named = os.environ.get(OUTPUT_DIR_ENV)
    if named:
        return Path(named)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "peftfast" / "bench"


# --------------------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th and 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: Sequence[torch.Tensor] = (),
    repeats: int = 50,
    warmup: int = 3,
) -> Timing:
    """Time one call of `fn`; the `.grad` of `grad_to_none` is reset before every call so gradients don't accumulate.

    CUDA: `triton.testing.do_bench` with its defaults (25 ms of warm-up, 100 ms of timed calls, L2 flushed before
    each call); `repeats` and `warmup` are not used. CPU: `warmup` untimed calls, then `repeats` timed ones.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, grad_to_none=list(grad_to_none) or None, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 to give percentiles, got {repeats}")
    times = []
    for call in range(warmup + repeats):
        for tensor in grad_to_none:
            tensor.grad = None
        start = time.perf_counter()
        fn()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if call >= warmup:
            times.append(elapsed_ms)
    return _summary(times)


def _summary(times_ms: Sequence[float]) -> Timing:
    quintiles = statistics.quantiles(times_ms, n=5, method="inclusive")
    return Timing(statistics.median(times_ms), quintiles[0], quintiles[3])


@dataclass(frozen=True)
class SideBySideTiming:
    """One provider's calls as `time_side_by_side` timed them. `wall`: wall time per call (on a CUDA GPU, do_bench's
    CUDA-event times). `cpu`: CPU time per call (None on a GPU), of the calling thread when torch runs on one
    intra-op thread, of the whole process with more. `reported`: the one a benchmark reports and takes ratios of:
    `cpu` on one thread (it leaves out the time a shared, oversubscribed machine keeps the call waiting for a core),
    else `wall` (with several threads CPU time adds up their work, which is no duration)."""

    wall: Timing
    cpu: Timing | None
    reported: Timing


def time_side_by_side(
    runs: Mapping[str, tuple[Callable[[], object], Sequence[torch.Tensor]]],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> dict[str, SideBySideTiming]:
    """Time the providers of one case; `runs` maps each provider to (one call, the tensors whose `.grad` is reset to
    None before every call).

    CUDA: each provider on its own by `time_fn` (do_bench; `repeats` and `warmup` are not used). CPU: the providers
    take turns, one call each per round, `warmup` untimed rounds then `repeats` timed ones, every call timed by the
    wall clock and by the CPU clock (see `SideBySideTiming`): load that comes and goes during a run, other jobs on a
    shared machine, then slows every provider alike instead of all the calls of one. Median and 20th/80th percentiles
    per provider and clock.
    """
    if device.type == "cuda":
        timings = {}
        for name, (fn, grads) in runs.items():
            timing = time_fn(fn, device, grads)
            timings[name] = SideBySideTiming(wall=timing, cpu=None, reported=timing)
        return timings
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 to give percentiles, got {repeats}")
    one_thread = torch.get_num_threads() == 1
    cpu_clock = time.thread_time if one_thread else time.process_time
    wall_ms: dict[str, list[float]] = {name: [] for name in runs}
    cpu_ms: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, (fn, grads) in runs.items():
            for tensor in grads:
                tensor.grad = None
            start_wall, start_cpu = time.perf_counter(), cpu_clock()
            fn()
            end_cpu, end_wall = cpu_clock(), time.perf_counter()
            if round_ >= warmup:
                wall_ms[name].append((end_wall - start_wall) * 1e3)
                cpu_ms[name].append((end_cpu - start_cpu) * 1e3)
    timings = {}
    for name in runs:
        wall, cpu = _summary(wall_ms[name]), _summary(cpu_ms[name])
        timings[name] = SideBySideTiming(wall=wall, cpu=cpu, reported=cpu if one_thread else wall)
    return timings


@contextmanager
def cuda_means_cpu() -> Iterator[None]:
    """Within the block, `Tensor.to("cuda")` (a device string or torch.device) goes to the CPU: HF PEFT's LoftQ moves
    weights to "cuda" unconditionally, and the tests and benchmarks compare it on the CPU, where their models are
    (bitsandbytes quantizes on CPU the same way)."""
    original = torch.Tensor.to

    def on_cpu(value):
        if isinstance(value, str) and value.startswith("cuda"):
            return "cpu"
        if isinstance(value, torch.device) and value.type == "cuda":
            return torch.device("cpu")
        return value

    def to(self, *args, **kwargs):
        return original(self, *(on_cpu(a) for a in args), **{k: on_cpu(v) for k, v in kwargs.items()})

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def peak_memory_mb(
    fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[torch.Tensor] = ()
) -> float | None:
    """CUDA memory that one call of `fn` allocates at its peak beyond what was allocated before it (outputs, saved
    activations, gradients, workspaces), in MiB. None on other devices."""
    if device.type != "cuda":
        return None
    for tensor in grad_to_none:
        tensor.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ----------------------------------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Environment:
    """What a result row records about where it was measured."""

    date: str
    git_sha: str
    git_dirty: str
    gpu: str
    torch: str
    triton: str
    peft: str
    peftfast: str
    cpu_threads: str


# The leading columns of every results CSV.
ENVIRONMENT_COLUMNS = tuple(column.name for column in fields(Environment))
CSV_COLUMNS = ENVIRONMENT_COLUMNS + (
    "op",
    "provider",
    "tokens",
    "d_in",
    "d_out",
    "rank",
    "dtype",
    "adapter_dtype",
    "dropout",
    "mode",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "tflops",
    "gbps",
    "peak_mem_mb",
)


def _git(*args: str) -> str | None:
    """The output of `git <args>` run in peftfast's source folder, or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def results_slug(device: torch.device) -> str:
    """File name stem of the device's results: "nvidia-h100-80gb-hbm3", "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device) -> Environment:
    """Date (UTC), git commit of peftfast's source ("unknown" outside a checkout; `git_dirty` counts tracked files
    only), device, library versions and torch's intra-op thread count."""
    # PEFTFAST_GIT_SHA: for a copy of the checkout without .git (a lent GPU machine), the commit it was made from.
    sha = os.environ.get("PEFTFAST_GIT_SHA") or _git("rev-parse", "--short", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    return Environment(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_sha=sha or "unknown",
        git_dirty="unknown" if changes is None else str(bool(changes)).lower(),
        gpu=device_name(device),
        torch=torch.__version__,
        triton=_version("triton"),
        peft=_version("peft"),
        peftfast=__version__,
        cpu_threads=str(torch.get_num_threads()),
    )


# ------------------------------------------------------------------------------------------------ lora_linear suite


@dataclass(frozen=True)
class Case:
    """One LoRA linear problem: `tokens` rows of `d_in` features through a `d_in -> d_out` layer with a rank-`rank`
    adapter; "fwd" times the forward of a training step, "fwd+bwd" forward and backward with a random grad_output."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    dropout: float
    mode: str

    @property
    def label(self) -> str:
        return f"T={self.tokens} {self.d_in}->{self.d_out} r={self.rank} p={self.dropout:g} {self.mode}"


def lora_linear_work(case: Case, lora: bool, element_size: int, adapter_element_size: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one call, ideal counts; `lora=False` counts the bare GEMM only. With G = 2*T*d_in*d_out
    and L = 2*T*r*(d_in + d_out):

    - FLOPs: forward G + L; backward G + 2L (dX through W; dA, dB and dX through the adapter; the base is frozen, so
      no dW). "fwd+bwd" is 2G + 3L; for the bare GEMM, G and 2G. Dropout is not counted.
    - bytes: each tensor a pass needs read once and each result written once. Forward reads x, W, A, B and writes y;
      backward reads grad_y, W, x, A, B and writes dX, dA, dB. x, W, y, grad_y, dX count `element_size` bytes,
      A, B, dA, dB `adapter_element_size`. Dropout masks are not counted.
    """
    t, d_in, d_out, r = case.tokens, case.d_in, case.d_out, case.rank
    flops_gemm = 2 * t * d_in * d_out
    flops_lora = 2 * t * r * (d_in + d_out) if lora else 0
    adapter_bytes = (r * d_in + d_out * r) * adapter_element_size if lora else 0
    forward_bytes = (t * d_in + d_out * d_in + t * d_out) * element_size + adapter_bytes
    if case.mode == "fwd":
        return flops_gemm + flops_lora, forward_bytes
    backward_x_bytes = t * d_in * element_size if lora else 0  # x again, for dA
    backward_bytes = (t * d_out + d_out * d_in + t * d_in) * element_size + backward_x_bytes + 2 * adapter_bytes
    return 2 * flops_gemm + 3 * flops_lora, forward_bytes + backward_bytes


def grid(
    device: torch.device,
    quick: bool = False,
    shapes: Sequence[tuple[int, int]] | None = None,
    tokens: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
) -> list[Case]:
    """The cases to run: the GPU grid on CUDA, the CPU set otherwise (`quick`: a subset); `shapes`, `tokens` and
    `ranks` replace the grid's values."""
    if device.type == "cuda":
        base = GPU_QUICK_GRID if quick else GPU_GRID
    else:
        base = CPU_QUICK_GRID if quick else CPU_GRID
    return [
        Case(t, d_in, d_out, r, p, mode)
        for d_in, d_out in shapes or base["shapes"]
        for t in tokens or base["tokens"]
        for r in ranks or base["ranks"]
        for p in base["dropouts"]
        for mode in MODES
    ]


@dataclass(frozen=True)
class Measurement:
    """One provider on one case."""

    case: Case
    provider: str
    dtype: torch.dtype
    adapter_dtype: torch.dtype | None  # None for the bare GEMM
    timing: Timing
    flops: float
    bytes: float
    peak_mem_mb: float | None  # None off CUDA

    def csv_row(self, env: Environment) -> dict[str, str]:
        """The row for `CSV_COLUMNS`."""
        seconds = self.timing.median_ms * 1e-3
        case = self.case
        return {
            **{name: getattr(env, name) for name in Environment.__dataclass_fields__},
            "op": "lora_linear",
            "provider": self.provider,
            "tokens": str(case.tokens),
            "d_in": str(case.d_in),
            "d_out": str(case.d_out),
            "rank": str(case.rank),
            "dtype": str(self.dtype).removeprefix("torch."),
            "adapter_dtype": "" if self.adapter_dtype is None else str(self.adapter_dtype).removeprefix("torch."),
            "dropout": f"{case.dropout:g}",
            "mode": case.mode,
            "median_ms": f"{self.timing.median_ms:.6g}",
            "p20_ms": f"{self.timing.p20_ms:.6g}",
            "p80_ms": f"{self.timing.p80_ms:.6g}",
            "tflops": f"{self.flops / seconds / 1e12:.4g}",
            "gbps": f"{self.bytes / seconds / 1e9:.4g}",
            "peak_mem_mb": "" if self.peak_mem_mb is None else f"{self.peak_mem_mb:.1f}",
        }


@dataclass
class SuiteResult:
    measurements: list[Measurement] = field(default_factory=list)
    # Why a provider was skipped, each reason once.
    notes: dict[str, None] = field(default_factory=dict)


class _OneLinear(nn.Module):
    """The smallest model get_peft_model accepts: a single bias-free projection, as in Llama."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _lora_layer(
    lib: ModuleType, case: Case, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> nn.Module:
    """The LoRA layer `lib.get_peft_model` (HF PEFT's or peftfast's) puts on a one-layer model, with the given weights.

    Defaults as in real use: the base is frozen and, on an fp16/bf16 base, the adapter weights are fp32.
    """
    model = _OneLinear(case.d_in, case.d_out, weight.device, weight.dtype)
    config = lib.LoraConfig(r=case.rank, lora_alpha=2 * case.rank, lora_dropout=case.dropout, target_modules=["proj"])
    layer = lib.get_peft_model(model, config).base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer.train()


def _run_fn(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_y: torch.Tensor | None
) -> Callable[[], None]:
    """Forward (and, with `grad_y`, backward) of `module` on `x`, as a no-argument function."""

    def run() -> None:
        y = module(x)
        if grad_y is not None:
            y.backward(grad_y)

    return run


def _on_backend(run: Callable[[], None], backend: str) -> Callable[[], None]:
    def run_on_backend() -> None:
        with ops.use_backend(backend):
            run()

    return run_on_backend


def _hf_peft() -> ModuleType | None:
    try:
        import peft
    except ImportError:
        return None
    return peft


def run_lora_linear(
    cases: Iterable[Case],
    device: torch.device,
    dtype: torch.dtype,
    providers: Sequence[str] = PROVIDERS,
    repeats: int = 50,
    progress: Callable[[Iterable[Case]], Iterable[Case]] = iter,
) -> SuiteResult:
    """Time every provider on every case, all providers of a case on the same random x, W, A, B and grad_output.

    x requires grad in both modes (as inside a network), adapter weights are trainable, the base weight is frozen,
    modules are in training mode (dropout active).
    """
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"Unknown providers {sorted(unknown)}; expected some of {PROVIDERS}.")
    result = SuiteResult()
    hf_peft = _hf_peft() if "hf_peft" in providers else None
    if "hf_peft" in providers and hf_peft is None:
        result.notes["hf_peft skipped: HF peft is not installed (pip install peft)."] = None
    for case in progress(cases):
        torch.manual_seed(0)
        x = torch.randn(case.tokens, case.d_in, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(case.d_out, case.d_in, device=device, dtype=dtype) / case.d_in**0.5
        lora_A = torch.randn(case.rank, case.d_in, device=device) / case.d_in**0.5
        lora_B = torch.randn(case.d_out, case.rank, device=device) / case.rank**0.5
        grad_y = torch.randn(case.tokens, case.d_out, device=device, dtype=dtype) if case.mode == "fwd+bwd" else None
        layers = {}
        if hf_peft is not None:
            layers["hf_peft"] = _lora_layer(hf_peft, case, weight, lora_A, lora_B)
        if any(provider in _BACKEND_OF for provider in providers):
            layers["peftfast_torch"] = layers["peftfast_triton"] = _lora_layer(peftfast, case, weight, lora_A, lora_B)
        for provider in providers:
            if provider == "gemm":
                gemm = _run_fn(functools.partial(F.linear, weight=weight), x, grad_y)
                result.measurements.append(_measure(case, provider, gemm, [x], None, repeats))
                continue
            layer = layers.get(provider)
            if layer is None:
                continue
            backend = _BACKEND_OF.get(provider)
            if backend is not None:
                refusal = _backend_refusal(backend, layer, x)
                if refusal is not None:
                    result.notes[f"{provider} skipped: {refusal}"] = None
                    continue
            lora_A_weight, lora_B_weight = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            run = _run_fn(layer, x, grad_y)
            if backend is not None:
                run = _on_backend(run, backend)
            grads = [x, lora_A_weight, lora_B_weight]
            result.measurements.append(_measure(case, provider, run, grads, lora_A_weight.dtype, repeats, backend))
    return result


def _backend_refusal(backend: str, layer: nn.Module, x: torch.Tensor) -> str | None:
    """The dispatcher's error if `backend` can't run this layer's lora_linear call, else None. Backend "auto" is
    refused where it would not run the kernels (it would time the torch backend a second time)."""
    args = (x, layer.base_layer.weight, layer.base_layer.bias, [layer.lora_A["default"].weight])
    if backend == "auto":
        with ops.use_backend("auto"):
            chosen, _ = ops.dispatch.resolve("lora_linear", *args, [layer.lora_B["default"].weight])
        return None if chosen != "torch" else "backend 'auto' runs the kernels on CUDA tensors only."
    try:
        with ops.use_backend(backend):
            ops.dispatch.resolve("lora_linear", *args, [layer.lora_B["default"].weight])
    except RuntimeError as error:
        return str(error)
    return None


def _measure(
    case: Case,
    provider: str,
    run: Callable[[], None],
    grads: list[torch.Tensor],
    adapter_dtype: torch.dtype | None,
    repeats: int,
    backend: str | None = None,
) -> Measurement:
    """Time `run`, whose inputs are `grads[0]` (x) and, for a LoRA layer, the adapter weights `grads[1:]`."""
    x = grads[0]
    if backend is not None:
        # One untimed call, to check that the layer really took the op on `backend`.
        run()
        ran_on = ops.last_backend("lora_linear")
        if ran_on != backend and backend != "auto":
            raise RuntimeError(f"{provider} should run lora_linear on backend {backend!r}; it ran on {ran_on!r}.")
    adapter_size = 0 if adapter_dtype is None else adapter_dtype.itemsize
    flops, nbytes = lora_linear_work(case, adapter_dtype is not None, x.element_size(), adapter_size)
    timing = time_fn(run, x.device, grads, repeats=repeats)
    peak = peak_memory_mb(run, x.device, grads)
    return Measurement(case, provider, x.dtype, adapter_dtype, timing, flops, nbytes, peak)


# ---------------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class CaseSummary:
    """The median time of each provider on one case, and the ratios between them."""

    case: Case
    ms: dict[str, float]

    @property
    def ratios(self) -> dict[str, float]:
        """By label: "x/gemm" is LoRA provider x's time over the bare GEMM's (its overhead; lower is better), "hf/x"
        is HF PEFT's time over peftfast provider x's (peftfast's speedup; higher is better)."""
        ratios = {}
        if "gemm" in self.ms:
            for provider in _LORA_PROVIDERS:
                if provider in self.ms:
                    ratios[f"{SHORT_NAMES[provider]}/gemm"] = self.ms[provider] / self.ms["gemm"]
        if "hf_peft" in self.ms:
            for provider in _BACKEND_OF:
                if provider in self.ms:
                    ratios[f"hf/{SHORT_NAMES[provider]}"] = self.ms["hf_peft"] / self.ms[provider]
        return ratios


def summarize(measurements: Iterable[Measurement]) -> list[CaseSummary]:
    """One summary per case, in the order the cases were run."""
    by_case: dict[Case, dict[str, float]] = {}
    for measurement in measurements:
        by_case.setdefault(measurement.case, {})[measurement.provider] = measurement.timing.median_ms
    return [CaseSummary(case, ms) for case, ms in by_case.items()]


def format_table(summaries: Sequence[CaseSummary]) -> str:
    """A text table: the case, each provider's median time in ms, then the ratios."""
    providers = [p for p in PROVIDERS if any(p in s.ms for s in summaries)]
    ratio_names = list(dict.fromkeys(name for s in summaries for name in s.ratios))
    header = ["T", "d_in", "d_out", "r", "p", "mode"] + [f"{SHORT_NAMES[p]} ms" for p in providers] + ratio_names
    rows = [header]
    for summary in summaries:
        case = summary.case
        row = [str(case.tokens), str(case.d_in), str(case.d_out), str(case.rank), f"{case.dropout:g}", case.mode]
        row += [f"{summary.ms[p]:.3f}" if p in summary.ms else "-" for p in providers]
        row += [f"{summary.ratios[n]:.2f}" if n in summary.ratios else "-" for n in ratio_names]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


TABLE_LEGEND = (
    "ms: median time per call. x/gemm: time of LoRA layer x over the bare frozen GEMM (lower is better). "
    "hf/x: HF PEFT's time over peftfast provider x's (speedup, higher is better)."
)


def append_csv(path: Path, rows: Sequence[dict[str, str]], columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Append `rows` to the CSV at `path` (created with a header if new); refuse a file with other columns."""
    columns = tuple(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as existing:
            found = tuple(next(csv.reader(existing), ()))
        if found != columns:
            raise ValueError(f"{path} has the columns {found}, not {columns}; move it aside to start a new one.")
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


_COLORS = {"hf_peft": "#d95f02", "peftfast_torch": "#7570b3", "peftfast_triton": "#1b9e77", "peftfast_auto": "#e7298a"}


def write_svg(path: Path, summaries: Sequence[CaseSummary], title: str) -> Path:
    """A horizontal bar chart of each LoRA provider's time over the bare GEMM's, one group of bars per case."""
    with_gemm = [s for s in summaries if "gemm" in s.ms]
    providers = [p for p in _LORA_PROVIDERS if any(p in s.ms for s in with_gemm)]
    bars = [(s, [(p, s.ms[p] / s.ms["gemm"]) for p in providers if p in s.ms]) for s in with_gemm]
    largest = max([ratio for _, group in bars for _, ratio in group] + [1.0])
    label_w, chart_w, bar_h, gap, top = 260, 560, 12, 10, 70
    scale = chart_w / (largest * 1.1)
    height = top + sum(len(group) * bar_h + gap for _, group in bars) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + chart_w + 60}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        '<text x="10" y="38">time / bare frozen GEMM (lower is better; the dashed line is the GEMM alone)</text>',
    ]
    for i, provider in enumerate(providers):
        x = label_w + i * 150
        parts.append(f'<rect x="{x}" y="48" width="12" height="12" fill="{_COLORS[provider]}"/>')
        parts.append(f'<text x="{x + 16}" y="58">{provider}</text>')
    y = top
    for summary, group in bars:
        group_h = len(group) * bar_h
        label = escape(summary.case.label)
        parts.append(f'<text x="{label_w - 8}" y="{y + group_h / 2 + 4}" text-anchor="end">{label}</text>')
        for provider, ratio in group:
            width = ratio * scale
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="{bar_h - 2}" fill="{_COLORS[provider]}"/>'
            )
            parts.append(f'<text x="{label_w + width + 4:.1f}" y="{y + bar_h - 3}">{ratio:.2f}</text>')
            y += bar_h
        y += gap
    one = label_w + scale
    parts.append(f'<line x1="{one:.1f}" y1="{top - 4}" x2="{one:.1f}" y2="{y}" stroke="black" stroke-dasharray="4,3"/>')
    parts.append(f'<text x="{one:.1f}" y="{y + 14}" text-anchor="middle">1.0</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------- cli


def _shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected D_INxD_OUT such as 4096x1024, got {text!r}")
    return int(match[1]), int(match[2])


def add_output_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--output-dir`, the same for every benchmark (see `default_output_dir`)."""
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=default_output_dir(),
        help=f"where the CSV rows are appended and plots written (default: ${OUTPUT_DIR_ENV}, else "
        f"{default_output_dir()}; bench/results/ holds the committed reference runs)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `peftfast bench` and of bench/bench_lora_linear.py."""
    parser.add_argument("--quick", action="store_true", help="a few cases only, for a smoke test")
    add_output_dir_argument(parser)
    parser.add_argument("--no-plot", action="store_true", help="don't write the SVG plot")
    parser.add_argument("--shapes", nargs="+", type=_shape, metavar="D_INxD_OUT", help="replace the grid's shapes")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="T", help="replace the grid's token counts")
    parser.add_argument("--ranks", nargs="+", type=int, metavar="R", help="replace the grid's LoRA ranks")
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        help=f"providers to run (default: all on GPU, {' '.join(CPU_PROVIDERS)} on CPU)",
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per measurement on CPU (default: 50)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default: 1; on the small CPU matrices more threads mostly wait for each "
        "other, and on a busy machine each wait can cost a scheduler time slice)",
    )


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Use `count` intra-op threads, then restore: the setting is process-wide and callers (tests) share it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the LoRA linear suite as the options ask, print the table, append the CSV rows, write the plot."""
    if args.repeats < 2:
        raise SystemExit("peftfast bench: --repeats must be at least 2")
    if args.threads < 1:
        raise SystemExit("peftfast bench: --threads must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return _run_and_report(args, device)
    with cpu_threads(args.threads):
        return _run_and_report(args, device)


def _run_and_report(args: argparse.Namespace, device: torch.device) -> int:
    from tqdm.auto import tqdm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    providers = args.providers or (PROVIDERS if device.type == "cuda" else CPU_PROVIDERS)
    cases = grid(device, args.quick, args.shapes, args.tokens, args.ranks)
    env = environment(device)
    print(
        f"lora_linear on {env.gpu}, {str(dtype).removeprefix('torch.')}: {len(cases)} cases x {len(providers)} "
        f"providers; torch {env.torch}, triton {env.triton}, peft {env.peft}, peftfast {env.peftfast} "
        f"({env.git_sha}{', modified' if env.git_dirty == 'true' else ''})"
    )
    start = time.perf_counter()
    result = run_lora_linear(
        cases, device, dtype, providers, args.repeats, progress=lambda items: tqdm(items, desc="cases", unit="case")
    )
    summaries = summarize(result.measurements)
    print(format_table(summaries))
    print(TABLE_LEGEND)
    for note in result.notes:
        print(f"note: {note}")
    slug = results_slug(device)
    csv_path = append_csv(args.output_dir / f"{slug}.csv", [m.csv_row(env) for m in result.measurements])
    print(f"{len(result.measurements)} rows appended to {csv_path}")
    if not args.no_plot:
        title = f"lora_linear on {env.gpu}, {str(dtype).removeprefix('torch.')}, {env.date}"
        print(f"plot written to {write_svg(args.output_dir / f'{slug}-lora_linear.svg', summaries, title)}")
    print(f"bench took {time.perf_counter() - start:.1f} s")
    return 0
