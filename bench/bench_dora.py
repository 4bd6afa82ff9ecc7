"""DoRA layer benchmark: one dense layer, r=16, a training step (forward + backward), providers side by side on the
same inputs in one run:
    hf_dora          HF PEFT's DoRA layer (it materialises W + s B A, d_out x d_in, every step);
    peftfast_dora    peftfast's DoRA layer on the backend "torch" (factored norm, no d_out x d_in temporary);
    triton_dora      the same layer on the backend "triton" (GPU only: fused kernels);
    hf_dora_accel    HF PEFT's DoRA layer taken over by `peftfast.accelerate` (backend "torch"; "triton" on a GPU);
    hf_lora          HF PEFT's plain LoRA layer, the same A and B;
    peftfast_lora    peftfast's LoRA layer on the backend "torch";
    triton_lora      the same on "triton" (GPU only).
Cases (d_in = d_out = d): d=1024/T=256, d=2048/T=64, d=2048/T=128, d=4096/T=16, each without and with dropout 0.1.
Every layer is in training mode with a frozen base and trainable A, B (and magnitude); x requires grad.

Reported per case: median ms of each provider, then hf_dora/peftfast_dora (peftfast's speedup over HF PEFT's DoRA),
peftfast_dora/peftfast_lora (what DoRA costs over LoRA in peftfast), hf_dora/hf_lora (the same in HF PEFT) and
hf_dora/hf_dora_accel (what `peftfast.accelerate` gains on HF PEFT's own layer), and the peak memory of one step
(what the step allocates at its peak beyond what existed before: on CUDA the allocator's peak, on CPU the peak of the
allocations the torch profiler records) with the difference HF PEFT - peftfast in units of one fp32 d x d matrix.
Before timing, peftfast's DoRA output and gradients (and the accelerated layer's) are checked against HF PEFT's.

Timing (`peftfast.bench.time_side_by_side`): on a CUDA GPU triton's do_bench per provider. On CPU the providers of a
case take turns, one call each per round (`--repeats` rounds after `--warmup`), and each call is timed by the CPU
time of the calling thread (torch on one thread, `--threads 1`, the default): on a shared, oversubscribed machine
that leaves out the time spent waiting for a core, and load that drifts during a run hits every provider alike. With
more threads, wall time. Median and 20th/80th percentiles per provider. Rows are appended to
<output-dir>/dora_<device>.csv.

    python bench/bench_dora.py                               # the whole set (a few minutes on one CPU core)
    python bench/bench_dora.py --quick                       # d=1024/T=256 only, without dropout
    python bench/bench_dora.py --output-dir bench/results    # add a run to the committed reference results
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn

from peftfast.bench import (
    ENVIRONMENT_COLUMNS,
    add_output_dir_argument,
    append_csv,
    cpu_threads,
    environment,
    peak_memory_mb,
    results_slug,
    time_side_by_side,
)

COLUMNS = ENVIRONMENT_COLUMNS + (
    "provider",
    "mode",
    "tokens",
    "d_in",
    "d_out",
    "rank",
    "dtype",
    "dropout",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
)
CASES = [(1024, 256), (2048, 64), (2048, 128), (4096, 16)]
DROPOUTS = [0.0, 0.1]
RANK = 16
PROVIDERS = ("hf_dora", "peftfast_dora", "triton_dora", "hf_dora_accel", "hf_lora", "peftfast_lora", "triton_lora")


class _OneLinear(nn.Module):
    def __init__(self, d: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layer(lib, use_dora: bool, dropout: float, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The LoRA/DoRA layer `lib.get_peft_model` makes on a one-layer model, holding `weights`; training mode."""
    weight = weights["weight"]
    model = _OneLinear(weight.shape[0], weight.device, weight.dtype)
    config = lib.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["proj"], use_dora=use_dora
    )
    layer = lib.get_peft_model(model, config).base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(weights["lora_A"])
        layer.lora_B["default"].weight.copy_(weights["lora_B"])
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(weights["magnitude"])
    return layer.train()


def _weights(d: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(d, d, device=device, generator=generator) / d**0.5).to(dtype)
    lora_A = torch.randn(RANK, d, device=device, generator=generator) / d**0.5
    lora_B = torch.randn(d, RANK, device=device, generator=generator) / RANK**0.5 * 0.1
    norm = torch.linalg.vector_norm(weight.double() + 2 * lora_B.double() @ lora_A.double(), dim=1)
    magnitude = (norm * (1 + 0.1 * torch.randn(d, device=device, generator=generator, dtype=torch.float64))).float()
    return {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}


def _trainable(layer: nn.Module) -> list[torch.Tensor]:
    return [param for param in layer.parameters() if param.requires_grad]


def _step(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, backend: str | None) -> Callable[[], None]:
    from peftfast import ops

    def run() -> None:
        if backend is None:
            layer(x).backward(grad_y)
            return
        with ops.use_backend(backend):
            layer(x).backward(grad_y)

    return run


def cpu_peak_memory_mb(fn: Callable[[], None]) -> float:
    """The peak, over one call of `fn`, of the bytes it has allocated and not yet freed (torch's CPU allocations,
    as the profiler records them), in MiB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


def _check_against_peft(hf: nn.Module, fast: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, backend: str) -> None:
    """peftfast's DoRA step gives HF PEFT's output and gradients (no dropout: the masks could not be the same)."""
    from peftfast import ops

    results = []
    for layer, chosen in ((hf, None), (fast, backend)):
        layer.eval()
        leaf = x.detach().requires_grad_()
        with ops.use_backend(chosen or "torch"):
            y = layer(leaf)
        params = _trainable(layer)
        results.append([y, *torch.autograd.grad(y, [leaf, *params], grad_y)])
        layer.train()
    tolerance = dict(atol=1e-3, rtol=1e-3) if x.dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got.float(), want.float(), **tolerance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="d=1024/T=256 without dropout only")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds on CPU (default: 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first on CPU (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default: 1)")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    if args.repeats < 2:
        raise SystemExit("bench_dora.py: --repeats must be at least 2")
    try:
        import peft
    except ImportError as error:
        print(f"bench_dora.py compares with HF PEFT, which can't be imported: {error}", file=sys.stderr)
        return 2
    import peftfast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    providers = PROVIDERS if device.type == "cuda" else tuple(p for p in PROVIDERS if not p.startswith("triton"))
    cases = [(d, t, p) for d, t in CASES for p in DROPOUTS]
    if args.quick:
        cases = cases[:1]
    with cpu_threads(args.threads) if device.type == "cpu" else nullcontext():
        env = asdict(environment(device))
        print(
            f"DoRA r={RANK} fwd+bwd on {env['gpu']}, {str(dtype).removeprefix('torch.')}, {env['cpu_threads']} "
            f"thread(s); torch {env['torch']}, peft {env['peft']}, peftfast {env['peftfast']} ({env['git_sha']})"
        )
        rows = []
        for d, tokens, dropout in cases:
            weights = _weights(d, device, dtype)
            generator = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(tokens, d, device=device, generator=generator).to(dtype).requires_grad_()
            grad_y = torch.randn(tokens, d, device=device, generator=generator).to(dtype)
            layers = {
                "hf_dora": (_layer(peft, True, dropout, weights), None),
                "peftfast_dora": (_layer(peftfast, True, dropout, weights), "torch"),
                "hf_lora": (_layer(peft, False, dropout, weights), None),
                "peftfast_lora": (_layer(peftfast, False, dropout, weights), "torch"),
            }
            if "triton_dora" in providers:
                layers["triton_dora"] = (layers["peftfast_dora"][0], "triton")
                layers["triton_lora"] = (layers["peftfast_lora"][0], "triton")
            accelerated = _layer(peft, True, dropout, weights)
            if peftfast.accelerate(accelerated).accelerated != [""]:
                raise RuntimeError("peftfast.accelerate did not take over HF PEFT's DoRA layer")
            layers["hf_dora_accel"] = (accelerated, "triton" if device.type == "cuda" else "torch")
            _check_against_peft(layers["hf_dora"][0], accelerated, x, grad_y, layers["hf_dora_accel"][1])
            _check_against_peft(layers["hf_dora"][0], layers["peftfast_dora"][0], x, grad_y, "torch")
            if "triton_dora" in layers:
                _check_against_peft(layers["hf_dora"][0], layers["peftfast_dora"][0], x, grad_y, "triton")
            steps = {}
            for provider in providers:
                layer, backend = layers[provider]
                steps[provider] = (_step(layer, x, grad_y, backend), [x, *_trainable(layer)])
            timings = time_side_by_side(steps, device, args.repeats, args.warmup)
            ms, peaks = {}, {}
            for provider, (run, grads) in steps.items():
                for tensor in grads:
                    tensor.grad = None
                peak = peak_memory_mb(run, device, grads) if device.type == "cuda" else cpu_peak_memory_mb(run)
                timing = timings[provider].reported
                ms[provider], peaks[provider] = timing.median_ms, peak
                rows.append(
                    env
                    | dict(provider=provider, mode="fwd+bwd", tokens=tokens, d_in=d, d_out=d, rank=RANK)
                    | dict(dtype=str(dtype).removeprefix("torch."), dropout=f"{dropout:g}")
                    | dict(median_ms=f"{timing.median_ms:.5g}", p20_ms=f"{timing.p20_ms:.5g}")
                    | dict(p80_ms=f"{timing.p80_ms:.5g}", peak_mem_mb=f"{peak:.3f}")
                )
            _print_row(d, tokens, dropout, ms, peaks, providers)
        append_csv(args.output_dir / f"dora_{results_slug(device)}.csv", rows, COLUMNS)
        print(f"{len(rows)} rows appended to {args.output_dir / f'dora_{results_slug(device)}.csv'}")
    return 0


def _print_row(d, tokens, dropout, ms, peaks, providers) -> None:
    times = "  ".join(f"{p} {ms[p]:8.3f} ms" for p in providers)
    ratios = (
        f"hf_dora/peftfast_dora {ms['hf_dora'] / ms['peftfast_dora']:.2f}  "
        f"peftfast_dora/peftfast_lora {ms['peftfast_dora'] / ms['peftfast_lora']:.2f}  "
        f"hf_dora/hf_lora {ms['hf_dora'] / ms['hf_lora']:.2f}  "
        f"hf_dora/hf_dora_accel {ms['hf_dora'] / ms['hf_dora_accel']:.2f}"
    )
    if "triton_dora" in ms:
        ratios += f"  triton_dora/triton_lora {ms['triton_dora'] / ms['triton_lora']:.2f}"
    square_mb = d * d * 4 / 2**20
    memory = "  ".join(f"{p} {peaks[p]:.1f}" for p in providers)
    saved = (peaks["hf_dora"] - peaks["peftfast_dora"]) / square_mb
    print(f"d={d} T={tokens} p={dropout:g}: {times}")
    print(f"    {ratios}")
    print(f"    peak MiB: {memory}; hf_dora - peftfast_dora = {saved:.2f} x (d x d fp32 = {square_mb:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
