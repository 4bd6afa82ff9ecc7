"""Host overhead per call of one LoRA layer, against HF PEFT's, at shapes so small that the arithmetic is negligible and
what is timed is Python, dispatch and autograd bookkeeping (what bounds small-batch decode on a GPU).

Providers, all timing the whole layer call on the same inputs:
    base            the bare nn.Linear the LoRA layer wraps (the floor);
    hf_peft         HF PEFT's LoRA layer (peft.get_peft_model on a one-layer model);
    peftfast_torch  peftfast's LoRA layer on the torch backend (what "auto" picks for CPU tensors; checked once);
    peftfast_triton_noop
                    peftfast's LoRA layer on the triton backend with every Triton kernel launch made a no-op: only
                    the host side of the kernel path is timed (layer forward, dispatch, custom op and autograd,
                    launchers with their launch-plan lookups and allocations, up to the kernel's `run`).
A provider is a function of the case returning a no-argument call (`PROVIDERS`).

The no-op seam is the Triton interpreter's `InterpretedFunction.run` (this script sets TRITON_INTERPRET=1 so that the
triton backend serves CPU tensors): it is what a launch (`kernel.run(...)`, or `kernel[grid](...)`) calls, so every
argument is built and passed as for a real launch, and nothing of the kernel runs. Not timed, because it is Triton's
and not peftfast's: on a GPU, `JITFunction.run`'s own argument binding and the driver launch (a few us a launch).

Modes: "eval" (a forward under torch.no_grad, the LoRA layer in eval mode) and "train" (forward and backward with
dropout 0, the layer in training mode, gradients reset to None before each call).

Timing, robust on a shared machine: rounds of `--calls` calls per provider, the providers in turn within a round (a
different order each round), CPU time of this thread (`time.thread_time`) per round divided by the calls; per
provider the median over rounds, and for each ratio the median of the per-round ratios (each round's numbers were
taken within milliseconds of each other).

    python bench/bench_overhead.py
    python bench/bench_overhead.py --rounds 200 --calls 200

Rows are appended to <output-dir>/overhead-cpu.csv with the versions and git commit.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Before Triton compiles anything: the triton backend then serves CPU tensors (see peftfast_triton_noop).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from peftfast.bench import ENVIRONMENT_COLUMNS, add_output_dir_argument, append_csv, environment  # noqa: E402

COLUMNS = ENVIRONMENT_COLUMNS + ("mode", "tokens", "features", "rank", "provider", "us_per_call", "vs_hf_peft")
MODES = ("eval", "train")


@dataclass(frozen=True)
class Case:
    mode: str
    tokens: int
    features: int
    rank: int


class _OneLinear(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _lora_layer(lib, case: Case) -> nn.Module:
    torch.manual_seed(0)
    config = lib.LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=["proj"], init_lora_weights=False)
    layer = lib.get_peft_model(_OneLinear(case.features), config).base_model.model.proj
    return layer.train(case.mode == "train")


def _call(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "eval":

        def forward() -> object:
            with torch.no_grad():
                return module(x)

        return forward
    params = [param for param in module.parameters() if param.requires_grad]
    x = x.detach().requires_grad_(True)

    def step() -> None:
        for param in (x, *params):
            param.grad = None
        module(x).sum().backward()

    return step


def _base(case: Case, x: torch.Tensor) -> Callable[[], object]:
    import peftfast

    return _call(_lora_layer(peftfast, case).base_layer, x, case.mode)


def _hf_peft(case: Case, x: torch.Tensor) -> Callable[[], object]:
    import peft

    return _call(_lora_layer(peft, case), x, case.mode)


def _peftfast_torch(case: Case, x: torch.Tensor) -> Callable[[], object]:
    import peftfast

    layer = _lora_layer(peftfast, case)
    run = _call(layer, x, case.mode)
    run()
    if layer.last_backend != "torch":
        raise RuntimeError(f"peftfast_torch should run on the torch backend; it ran on {layer.last_backend!r}.")
    return run


def _no_launch(self, *args, grid, warmup, **kwargs) -> None:
    return None


def _peftfast_triton_noop(case: Case, x: torch.Tensor) -> Callable[[], object]:
    import peftfast
    from peftfast.ops import dispatch

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("peftfast_triton_noop needs TRITON_INTERPRET=1 when Triton is first imported.")
    from triton.runtime.interpreter import InterpretedFunction

    layer = _lora_layer(peftfast, case)
    run = _call(layer, x, case.mode)
    launch = InterpretedFunction.run

    def step() -> object:
        # The backend and the no-op launches are switched on for this provider's calls only (cost: four attribute
        # writes a call, counted against it).
        dispatch.set_backend("triton")
        InterpretedFunction.run = _no_launch
        try:
            return run()
        finally:
            InterpretedFunction.run = launch
            dispatch.set_backend(None)

    step()
    if layer.last_backend != "triton":
        raise RuntimeError(f"peftfast_triton_noop should run on the triton backend; it ran on {layer.last_backend!r}.")
    return step


PROVIDERS: dict[str, Callable[[Case, torch.Tensor], Callable[[], object]]] = {
    "base": _base,
    "hf_peft": _hf_peft,
    "peftfast_torch": _peftfast_torch,
    "peftfast_triton_noop": _peftfast_triton_noop,
}


def measure(case: Case, rounds: int, calls: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """us per call per provider (median over rounds) and, per provider, the median per-round ratio to hf_peft."""
    x = torch.randn(case.tokens, case.features, generator=torch.Generator().manual_seed(seed))
    runs = {name: build(case, x) for name, build in PROVIDERS.items()}
    for run in runs.values():
        for _ in range(max(10, calls // 10)):
            run()
    per_round: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            run = runs[name]
            start = time.thread_time()
            for _ in range(calls):
                run()
            per_round[name].append((time.thread_time() - start) / calls * 1e6)
    result = {}
    for name, times in per_round.items():
        ratios = [mine / theirs for mine, theirs in zip(times, per_round["hf_peft"])]
        result[name] = {"us_per_call": statistics.median(times), "vs_hf_peft": statistics.median(ratios)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[2])
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=60, help="rounds, each running every provider --calls times")
    parser.add_argument("--calls", type=int, default=100, help="calls per provider per round")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = asdict(environment(torch.device("cpu")))
    rows = []
    for mode in args.modes:
        for tokens in args.tokens:
            case = Case(mode, tokens, args.features, args.rank)
            result = measure(case, args.rounds, args.calls)
            print(f"{mode} x [{tokens}, {args.features}] r={args.rank}:")
            for provider, numbers in result.items():
                print(f"  {provider:<20} {numbers['us_per_call']:7.2f} us/call  {numbers['vs_hf_peft']:.2f}x hf_peft")
                rows.append(
                    {
                        **env,
                        "mode": mode,
                        "tokens": str(tokens),
                        "features": str(args.features),
                        "rank": str(args.rank),
                        "provider": provider,
                        "us_per_call": f"{numbers['us_per_call']:.3f}",
                        "vs_hf_peft": f"{numbers['vs_hf_peft']:.3f}",
                    }
                )
    path = append_csv(Path(args.output_dir) / "overhead-cpu.csv", rows, COLUMNS)
    print(f"{len(rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
