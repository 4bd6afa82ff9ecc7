"""Time the LoRA initialisations that start from the base weight: HF PEFT vs peftfast on the same layers, one run.

Each case builds the adapter on a fresh copy of the same model with `get_peft_model` (or runs the method's
preprocessing), so the time is what a user waits for; both libraries also check their results against each other
in the same run (`max_diff`: the largest difference of the base weights after initialisation, and of B @ A, which
don't depend on the sign convention of singular vectors).

    python bench/bench_lora_init.py                              # the CPU set (about 10 minutes on 2 cores)
    python bench/bench_lora_init.py --quick                      # small shapes, a smoke test
    python bench/bench_lora_init.py --output-dir bench/results   # add a run to the committed reference results

The two libraries take turns, one call each per round, each call timed in CPU time of the calling thread (torch on
one thread by default; wall time with more: `peftfast.bench.time_side_by_side`), so that load from other jobs on a
shared machine neither counts nor favours one of them.
HF PEFT's LoftQ moves the weight to "cuda" unconditionally; without a GPU it runs here with "cuda" mapped to the
CPU, which is what it would compute there. Rows go to <output-dir>/<device>-lora_init.csv (`--output-dir` as for
every benchmark: by default outside the checkout, see `peftfast.bench.default_output_dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import peftfast
from peftfast.bench import (
    ENVIRONMENT_COLUMNS,
    add_output_dir_argument,
    append_csv,
    cuda_means_cpu,
    environment,
    results_slug,
    time_side_by_side,
)
from peftfast.tuners.lora.corda import preprocess_corda

COLUMNS = ENVIRONMENT_COLUMNS + (
    "op",
    "provider",
    "d_out",
    "d_in",
    "rank",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "max_diff",
)


@dataclasses.dataclass(frozen=True)
class Case:
    method: str  # "pissa", "olora", "loftq", "corda", "eva"
    d_out: int
    d_in: int
    rank: int

    @property
    def label(self) -> str:
        return f"{self.method} {self.d_out}x{self.d_in} r={self.rank}"


CASES = [
    Case("pissa", 1024, 1024, 16),
    Case("pissa", 4096, 1024, 16),
    Case("pissa", 1024, 4096, 16),
    Case("olora", 1024, 1024, 16),
    Case("olora", 4096, 1024, 16),
    Case("olora", 1024, 4096, 16),
    Case("loftq", 1024, 1024, 16),
    Case("corda", 1024, 1024, 16),
    Case("eva", 256, 256, 8),
]
QUICK_CASES = [
    Case("pissa", 256, 512, 8),
    Case("olora", 256, 512, 8),
    Case("loftq", 256, 256, 8),
    Case("corda", 256, 256, 8),
    Case("eva", 64, 64, 4),
]


class _OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_corda():
    # HF PEFT's corda module imports the attrs package only for a dataclass decorator: without attrs, lend it the
    # standard one for that import.
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ModuleNotFoundError as error:
        if error.name != "attr":
            raise
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
        try:
            from peft.tuners.lora.corda import preprocess_corda
        finally:
            del sys.modules["attr"]
    return preprocess_corda


def _spectrum_weight(d_out: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """A weight with a decaying spectrum, like a trained one (a random matrix has no distinct top directions)."""
    k = min(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, k, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(d_in, k, generator=generator))
    spectrum = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32)) ** 0.6
    return (U * spectrum) @ V.T


def _builders(case: Case, lib, generator: torch.Generator) -> tuple[Callable[[], nn.Module], Callable[[], object]]:
    """(make the model, run the initialisation on it) for one library."""
    if case.method == "eva":
        return _eva_builders(case, lib, generator)
    weight = _spectrum_weight(case.d_out, case.d_in, generator)
    base = _OneLinear(case.d_in, case.d_out)
    with torch.no_grad():
        base.proj.weight.copy_(weight)
    calibration = [torch.randn(1, 256, case.d_in, generator=generator) for _ in range(4)]

    def make() -> nn.Module:
        return copy.deepcopy(base)

    def config():
        options = dict(r=case.rank, lora_alpha=2 * case.rank, target_modules=["proj"])
        if case.method == "loftq":
            loftq = lib.LoftQConfig(loftq_bits=4, loftq_iter=1)
            if lib is peftfast:
                return lib.LoraConfig(init_lora_weights="loftq", loftq_config=loftq, **options)
            # HF PEFT's config check asks for scipy, which LoftQ doesn't use.
            built = lib.LoraConfig(**options)
            built.init_lora_weights, built.loftq_config = "loftq", dataclasses.asdict(loftq)
            return built
        if case.method == "corda":
            corda = lib.tuners.lora.config.CordaConfig(corda_method="ipm")
            return lib.LoraConfig(init_lora_weights="corda", corda_config=corda, **options)
        return lib.LoraConfig(init_lora_weights=case.method, **options)

    def run(model: nn.Module) -> nn.Module:
        lora_config = config()
        if case.method == "corda":
            preprocess = preprocess_corda if lib is peftfast else _peft_corda()

            def run_model() -> None:
                for batch in calibration:
                    model(batch)

            preprocess(model, lora_config, run_model=run_model)
        with cuda_means_cpu() if case.method == "loftq" and lib is not peftfast else contextlib.nullcontext():
            return lib.get_peft_model(model, lora_config)

    return make, run


def _eva_builders(case: Case, lib, generator: torch.Generator):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=case.d_in,
        intermediate_size=2 * case.d_in,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM(config).eval()
    batches = [
        {"input_ids": torch.randint(0, 512, (4, 256), generator=generator), "attention_mask": torch.ones(4, 256).long()}
        for _ in range(8)
    ]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

    def make() -> nn.Module:
        return copy.deepcopy(base)

    def run(model: nn.Module) -> nn.Module:
        eva = lib.EvaConfig(tau=0.95)
        lora_config = lib.LoraConfig(
            r=case.rank, lora_alpha=2 * case.rank, target_modules=targets, init_lora_weights="eva", eva_config=eva
        )
        torch.manual_seed(1)
        peft_model = lib.get_peft_model(model, lora_config, low_cpu_mem_usage=True)
        lib.initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
        return peft_model

    return make, run


def _max_difference(theirs: nn.Module, ours: nn.Module) -> float:
    """Largest difference of base weights and of B @ A over the LoRA layers of the two models."""
    worst = 0.0
    theirs_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    for name, layer in ours.named_modules():
        if not (hasattr(layer, "lora_A") and layer.lora_A):
            continue
        other = theirs_layers[name]
        for adapter in layer.lora_A:
            product = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
            their_product = other.lora_B[adapter].weight @ other.lora_A[adapter].weight
            worst = max(worst, (product - their_product).abs().max().item())
        base, their_base = layer.get_base_layer().weight, other.get_base_layer().weight
        worst = max(worst, (base.float() - their_base.float()).abs().max().item())
    return worst


def run(cases: list[Case], repeats: int, output_dir: Path) -> None:
    import peft

    device = torch.device("cpu")
    env = environment(device)
    rows = []
    warnings.filterwarnings("ignore")
    for case in cases:
        runs, models = {}, {}
        for provider, lib in (("hf_peft", peft), ("peftfast", peftfast)):
            make, initialise = _builders(case, lib, torch.Generator().manual_seed(0))
            models[provider] = initialise(make())
            # A fresh copy of the model each call (PiSSA & co. change its weights); the copy costs milliseconds.
            runs[provider] = (lambda i=initialise, m=make: i(m()), [])
        measured = time_side_by_side(runs, device, repeats, warmup=1)
        timings = {provider: timing.reported for provider, timing in measured.items()}
        difference = _max_difference(models["hf_peft"], models["peftfast"])
        for provider, timing in timings.items():
            rows.append(
                {
                    **dataclasses.asdict(env),
                    "op": f"init_{case.method}",
                    "provider": provider,
                    "d_out": str(case.d_out),
                    "d_in": str(case.d_in),
                    "rank": str(case.rank),
                    "dtype": "float32",
                    "median_ms": f"{timing.median_ms:.6g}",
                    "p20_ms": f"{timing.p20_ms:.6g}",
                    "p80_ms": f"{timing.p80_ms:.6g}",
                    "max_diff": f"{difference:.3g}",
                }
            )
        hf, ours = timings["hf_peft"].median_ms, timings["peftfast"].median_ms
        print(f"{case.label:<28} {hf:>11.1f} {ours:>11.1f} {hf / ours:>8.2f}x {difference:>10.2g}", flush=True)
    path = append_csv(output_dir / f"{results_slug(device)}-lora_init.csv", rows, COLUMNS)
    print(f"\n{len(rows)} rows appended to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per provider and case (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'case':<28} {'hf_peft ms':>11} {'peftfast ms':>11} {'hf/ours':>9} {'max_diff':>10}")
    run(QUICK_CASES if args.quick else CASES, args.repeats, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
