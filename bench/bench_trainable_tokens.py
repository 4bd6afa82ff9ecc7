"""Time trainable tokens (a few trained rows of an embedding): the frozen layer alone, HF PEFT, peftfast, same inputs.

Two layers, as a model with trainable tokens has them:
    embedding  the input embeddings, `nn.Embedding(V, d)` looked up at `T` token ids, `k` of its rows trained;
    head       the output layer tied to them, `nn.Linear(d, V)` on `T` hidden states, the same `k` rows trained.
Providers, all on the same weights, trained rows and inputs:
    frozen     the bare frozen layer (`F.embedding` / `F.linear`), the floor;
    hf_peft    HF PEFT's TrainableTokensLayer (which writes the rows into a copy of the whole `[V, d]` weight on every
               call, then looks up / multiplies);
    peftfast   peftfast's TrainableTokensLayer (looks the base rows up and puts the trained rows over them; the head
               computes the `k` replaced logits apart).
Modes: "fwd" (forward of a training step), "fwd+bwd" (forward, then backward of a random gradient into the trained
rows, and into the hidden states for the head). The ids include every trained token.

Timing (`peftfast.bench.time_side_by_side`): on a CUDA GPU triton's do_bench per provider. On CPU the providers take
turns, one call each per round (`--repeats` rounds after two warm-up rounds), and each call is timed by the CPU time
of the calling thread (torch on one thread, the default; with `--threads` > 1, wall time): on a shared machine that
leaves out the time spent waiting for a core, and load that drifts during a run hits every provider alike. Median and
20th/80th percentiles per provider.

    python bench/bench_trainable_tokens.py            # the grid of this device (GPU: Llama-3 vocabulary, bf16)
    python bench/bench_trainable_tokens.py --quick    # a smoke run

Results are appended to <output-dir>/trainable_tokens-<device>.csv with the device, versions and git commit; on a
GPU the peak memory each call allocates is recorded too.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict

import peft
import torch
from torch import nn

import peftfast
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
    "layer",
    "provider",
    "mode",
    "vocab",
    "dim",
    "tokens",
    "trained_rows",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "vs_frozen",
    "hf_over_peftfast",
    "peak_mem_mb",
)
# layer -> (vocab, dim, tokens): Llama-3's vocabulary and width with a 4k-token batch, and Llama-2's with 512 tokens,
# on GPU; on CPU shapes that take seconds (the head's GEMM is the bulk of its time, so it gets the small one).
GRIDS = {
    "cuda": {
        "embedding": [(128256, 4096, 4096), (32000, 4096, 512)],
        "head": [(128256, 4096, 4096), (32000, 4096, 512)],
    },
    "cpu": {"embedding": [(32000, 1024, 512), (32000, 256, 128)], "head": [(32000, 256, 128)]},
}
TRAINED_ROWS = 16


class _Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class _Head(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def _token_layer(lib, layer: str, weight: torch.Tensor, indices: list[int], rows: torch.Tensor) -> nn.Module:
    """`lib`'s TrainableTokensLayer (HF PEFT's or peftfast's) over a frozen layer with `weight`, training `rows`."""
    vocab, dim = weight.shape
    model = _Embedding(vocab, dim) if layer == "embedding" else _Head(vocab, dim)
    model = model.to(weight.device, weight.dtype)
    target = "embed_tokens" if layer == "embedding" else "lm_head"
    config = lib.TrainableTokensConfig(token_indices=indices, target_modules=[target])
    token_layer = getattr(lib.get_peft_model(model, config).base_model.model, target)
    with torch.no_grad():
        token_layer.base_layer.weight.copy_(weight)
        token_layer.trainable_tokens_delta["default"].copy_(rows)
    return token_layer.train()


def run_case(layer: str, vocab: int, dim: int, tokens: int, dtype: torch.dtype, device: torch.device, repeats: int):
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(vocab, dim, device=device, dtype=dtype, generator=generator)
    indices = torch.randperm(vocab, device=device, generator=generator)[:TRAINED_ROWS].tolist()
    rows = torch.randn(TRAINED_ROWS, dim, device=device, generator=generator)
    if layer == "embedding":
        x = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
        x[:TRAINED_ROWS] = torch.tensor(indices, device=device)
        grad_y = torch.randn(tokens, dim, device=device, dtype=dtype, generator=generator)
        frozen = nn.Embedding(vocab, dim, _weight=weight).requires_grad_(False)
    else:
        x = torch.randn(tokens, dim, device=device, dtype=dtype, generator=generator, requires_grad=True)
        grad_y = torch.randn(tokens, vocab, device=device, dtype=dtype, generator=generator)
        frozen = nn.Linear(dim, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            frozen.weight.copy_(weight)
    modules = {
        "frozen": frozen,
        "hf_peft": _token_layer(peft, layer, weight, indices, rows),
        "peftfast": _token_layer(peftfast, layer, weight, indices, rows),
    }
    with torch.no_grad():
        torch.testing.assert_close(modules["peftfast"](x).float(), modules["hf_peft"](x).float(), atol=1e-2, rtol=1e-2)

    results = []
    for mode in ("fwd", "fwd+bwd"):
        runs = {}
        for provider, module in modules.items():
            grads = [p for p in module.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])

            def run(module=module, backward=mode == "fwd+bwd", grads=grads) -> None:
                y = module(x)
                if backward and grads:
                    y.backward(grad_y)

            runs[provider] = (run, grads)
        measured = time_side_by_side(runs, device, repeats)
        timings = {
            provider: (measured[provider].reported, peak_memory_mb(run, device, grads))
            for provider, (run, grads) in runs.items()
        }
        for provider, (timing, peak) in timings.items():
            results.append(
                {
                    "layer": layer,
                    "provider": provider,
                    "mode": mode,
                    "vocab": str(vocab),
                    "dim": str(dim),
                    "tokens": str(tokens),
                    "trained_rows": str(TRAINED_ROWS),
                    "dtype": str(dtype).removeprefix("torch."),
                    "median_ms": f"{timing.median_ms:.6g}",
                    "p20_ms": f"{timing.p20_ms:.6g}",
                    "p80_ms": f"{timing.p80_ms:.6g}",
                    "vs_frozen": f"{timing.median_ms / timings['frozen'][0].median_ms:.3g}",
                    "hf_over_peftfast": (
                        f"{timings['hf_peft'][0].median_ms / timing.median_ms:.3g}" if provider == "peftfast" else ""
                    ),
                    "peak_mem_mb": "" if peak is None else f"{peak:.1f}",
                }
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small case per layer")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds on CPU, one call per provider each")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on CPU (default: 1, as `peftfast bench`)"
    )
    add_output_dir_argument(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = GRIDS["cuda" if device.type == "cuda" else "cpu"]
    rows = []
    with contextlib.nullcontext() if device.type == "cuda" else cpu_threads(args.threads):
        env = asdict(environment(device))
        for layer, shapes in grid.items():
            for vocab, dim, tokens in shapes[-1:] if args.quick else shapes:
                rows.extend(run_case(layer, vocab, dim, tokens, dtype, device, args.repeats))
    header = ("layer", "mode", "vocab", "dim", "tokens", "provider", "median_ms", "vs_frozen", "hf_over_peftfast")
    print("  ".join(header))
    for row in rows:
        print("  ".join(row[column] for column in header))
    path = append_csv(
        args.output_dir / f"trainable_tokens-{results_slug(device)}.csv", [{**env, **row} for row in rows], COLUMNS
    )
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
