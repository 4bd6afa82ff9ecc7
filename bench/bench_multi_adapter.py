"""Time mixed-adapter batches (`adapter_names=[...]`): peftfast's SGMV kernels against HF PEFT's mixed-batch forward
and against the same batch on one adapter, then a whole Llama-shaped decode step with 32 adapters. On a CPU (no CUDA
GPU visible), the layer suite runs the torch path at small shapes instead (see "CPU mode").

Layer suite: one LoRA Linear of hidden x hidden (bf16 base, fp32 adapters as HF PEFT's autocast leaves them) holding
64 adapters; decode batches of `tokens` rows of one token each, spread round-robin over `adapters` distinct adapters.
Providers, all timing the whole layer forward (base GEMM + LoRA) on the same inputs:
    gemm            the bare base layer, the floor;
    hf_peft         HF PEFT's LoRA layer with adapter_names (a Python loop over adapters);
    peftfast_sgmv   peftfast's layer with adapter_names, backend "triton" (the SGMV kernels);
    peftfast_torch  the same on backend "torch" (the reference loop);
    single_adapter  peftfast's layer, same batch, one active adapter, no adapter_names (the fused single-adapter path).
The mixed batch (`MixedBatch`: row tensor, token layout) is built once outside the timed call, as the model's forward
context builds it once per forward for all layers.

CPU mode: the layer suite on the torch backend, fp32, hidden 512 by default, with providers gemm, hf_peft,
peftfast_torch, single_adapter and
    pack            packing the layer's adapters from their live weights alone (`LoraAdapterBank.pack`), which every
                    mixed-batch call does so that a result is never stale (see `peftfast/tuners/lora/bank.py`): the
                    cost of not caching the packed copy.

Model suite: a Llama-shaped model (random weights, bf16), all-linear LoRA r=16 adapters, one decode step of a batch
of 32 sequences with a KV cache of `--context` tokens: 32 distinct adapters on the kernels and on the torch loop,
the same batch on one adapter, and the base model.

    python bench/bench_multi_adapter.py                 # both suites, full grids
    python bench/bench_multi_adapter.py --quick         # a smoke run
    python bench/bench_multi_adapter.py --suite model --layers 8
    python bench/bench_multi_adapter.py                 # without a GPU: the CPU layer suite

Results are appended to <output-dir>/multi_adapter-<gpu>.csv (multi_adapter-cpu.csv) with the device, versions and
git commit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from peftfast import LoraConfig, get_peft_model, ops
from peftfast.bench import (
    ENVIRONMENT_COLUMNS,
    add_output_dir_argument,
    append_csv,
    environment,
    results_slug,
    time_fn,
)
from peftfast.cli import cpu_threads
from peftfast.utils.mixed_batch import MixedBatch

COLUMNS = ENVIRONMENT_COLUMNS + (
    "suite",
    "provider",
    "tokens",
    "adapters",
    "rank",
    "hidden",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "vs_single_adapter",
    "gbps",
)
BANK_SIZE = 64  # adapters loaded in the layer suite: the most a batch uses
ADAPTER_NAMES = tuple(f"a{index}" for index in range(BANK_SIZE))


class _OneLinear(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _adapter_configs(lib, rank: int) -> list:
    return [lib.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=False)] * BANK_SIZE


def _layer(lib, hidden: int, rank: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The LoRA layer of `lib` (peft or peftfast) with BANK_SIZE adapters "a0".."a63" on a `dtype` base."""
    torch.manual_seed(0)
    base = _OneLinear(hidden).to(device, dtype)
    configs = _adapter_configs(lib, rank)
    model = lib.get_peft_model(base, configs[0], adapter_name="a0")
    for index, config in enumerate(configs[1:], start=1):
        model.add_adapter(f"a{index}", config)
    return model.eval().base_model.model.proj


def _lora_bytes(tokens: int, adapters: int, rank: int, hidden: int, adapter_bytes: int) -> float:
    """Ideal bytes of a layer call: bf16 base weight, x and y, and each used adapter's A and B once."""
    return 2 * hidden * hidden + 2 * 2 * tokens * hidden + adapters * rank * 2 * hidden * adapter_bytes


def _row(env: dict, suite: str, provider: str, timing, single_ms: float | None, ideal_bytes: float, **case) -> dict:
    return {
        **env,
        "suite": suite,
        "provider": provider,
        **{key: str(value) for key, value in case.items()},
        "median_ms": f"{timing.median_ms:.5f}",
        "p20_ms": f"{timing.p20_ms:.5f}",
        "p80_ms": f"{timing.p80_ms:.5f}",
        "vs_single_adapter": f"{timing.median_ms / single_ms:.3f}" if single_ms else "",
        "gbps": f"{ideal_bytes / timing.median_ms / 1e6:.1f}" if ideal_bytes else "",
    }


def _on(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with ops.use_backend(backend), torch.no_grad():
            return fn()

    return run


def _layer_providers(
    ours: nn.Module, theirs: nn.Module, x: torch.Tensor, names: list[str], batch: MixedBatch
) -> dict[str, Callable[[], object]]:
    ours.set_adapter("a0")
    if x.device.type == "cpu":
        bank = ours.adapter_bank()
        return {
            "single_adapter": _on("torch", lambda: ours(x)),
            "gemm": _on("torch", lambda: ours.base_layer(x)),
            "peftfast_torch": _on("torch", lambda: ours(x, adapter_names=batch)),
            "pack": _on("torch", lambda: bank.pack(ours, bank.slot_names(ours, batch), None, x.device)),
            "hf_peft": _on("torch", lambda: theirs(x, adapter_names=names)),
        }
    return {
        "single_adapter": _on("triton", lambda: ours(x)),
        "gemm": _on("torch", lambda: ours.base_layer(x)),
        "peftfast_sgmv": _on("triton", lambda: ours(x, adapter_names=batch)),
        "peftfast_torch": _on("torch", lambda: ours(x, adapter_names=batch)),
        "hf_peft": _on("torch", lambda: theirs(x, adapter_names=names)),
    }


def run_layer_suite(args: argparse.Namespace, device: torch.device, env: dict) -> list[dict]:
    import peft

    import peftfast

    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for rank in args.ranks:
        ours, theirs = (
            _layer(peftfast, args.hidden, rank, device, dtype),
            _layer(peft, args.hidden, rank, device, dtype),
        )
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden, device=device, dtype=dtype)
            for adapters in [a for a in args.adapters if a <= tokens]:
                names = [f"a{row % adapters}" for row in range(tokens)]
                batch = MixedBatch(names, ADAPTER_NAMES, devices=[device])
                providers = _layer_providers(ours, theirs, x, names, batch)
                if tokens > args.max_torch_loop_tokens:
                    del providers["peftfast_torch"]
                single_ms = None
                for provider, fn in providers.items():
                    timing = time_fn(fn, device)
                    single_ms = timing.median_ms if provider == "single_adapter" else single_ms
                    used = 1 if provider == "single_adapter" else 0 if provider in ("gemm", "pack") else adapters
                    adapter_bytes = 2 if provider == "peftfast_sgmv" else 4
                    # GB/s only means something for a GPU's memory-bound kernels.
                    ideal = _lora_bytes(tokens, used, rank, args.hidden, adapter_bytes) if device.type == "cuda" else 0
                    case = dict(tokens=tokens, adapters=adapters, rank=rank, hidden=args.hidden)
                    rows.append(_row(env, "layer", provider, timing, single_ms, ideal, **case))
                    print(
                        f"layer r={rank:<3} tokens={tokens:<4} adapters={adapters:<3} {provider:<15} "
                        f"{timing.median_ms:.4f} ms"
                    )
    return rows


def _llama(layers: int, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, 32 layers by default).
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def run_model_suite(args: argparse.Namespace, device: torch.device, env: dict) -> list[dict]:
    from transformers import DynamicCache

    n_adapters, batch, rank = 32, 32, 16
    base = _llama(args.layers, device)
    config = LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a0")
    for index in range(1, n_adapters):
        model.add_adapter(f"a{index}", config)
    model.eval()
    names = [f"a{row}" for row in range(batch)]
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, args.context), device=device)
    step = torch.randint(0, vocab, (batch, 1), device=device)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, adapter_names=names)

    def decode(backend: str, **kwargs) -> Callable[[], object]:
        def run() -> object:
            with ops.use_backend(backend), torch.no_grad():
                out = model(input_ids=step, past_key_values=cache, use_cache=True, **kwargs)
            cache.crop(-1)  # drop the token just decoded: every timed step sees the same context
            return out

        return run

    def base_step() -> object:
        with model.disable_adapter():
            return decode("torch")()

    model.set_adapter("a0")
    providers = {
        "single_adapter": decode("triton"),
        "base_model": base_step,
        "peftfast_sgmv": decode("triton", adapter_names=names),
        "peftfast_torch": decode("torch", adapter_names=names),
    }
    rows, single_ms = [], None
    for provider, fn in providers.items():
        timing = time_fn(fn, device)
        single_ms = timing.median_ms if provider == "single_adapter" else single_ms
        case = dict(tokens=batch, adapters=n_adapters, rank=rank, hidden=4096)
        rows.append(_row(env, f"llama-{args.layers}-layers-decode", provider, timing, single_ms, 0.0, **case))
        print(
            f"model layers={args.layers} batch={batch} adapters={n_adapters} {provider:<15} {timing.median_ms:.3f} ms"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("layer", "model", "all"), default="all")
    parser.add_argument("--tokens", type=int, nargs="+", help="default: 1 ... 256 (GPU), 1 4 16 64 (CPU)")
    parser.add_argument("--adapters", type=int, nargs="+", help="default: 1 ... 64 (GPU), 1 4 16 64 (CPU)")
    parser.add_argument("--ranks", type=int, nargs="+", help="default: 8 16 64 (GPU), 16 (CPU)")
    parser.add_argument("--hidden", type=int, help="default: 4096 (GPU), 512 (CPU)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama-shaped model")
    parser.add_argument("--context", type=int, default=128, help="KV-cache length before the timed decode step")
    parser.add_argument(
        "--max-torch-loop-tokens", type=int, default=64, help="skip the slow torch loop above this batch"
    )
    parser.add_argument("--quick", action="store_true", help="tokens 32, adapters 1/4/32, r=16, 2 model layers")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    defaults = (
        dict(
            tokens=[1, 2, 4, 8, 16, 32, 64, 128, 256], adapters=[1, 2, 4, 8, 16, 32, 64], ranks=[8, 16, 64], hidden=4096
        )
        if on_gpu
        else dict(tokens=[1, 4, 16, 64], adapters=[1, 4, 16, 64], ranks=[16], hidden=512)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.tokens, args.adapters, args.ranks, args.layers = [32], [1, 4, 32], [16], 2
    if not on_gpu and args.suite == "model":
        print("The model suite times GPU kernels; without a CUDA GPU only the layer suite runs.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    env = asdict(environment(device))
    rows = []
    if args.suite in ("layer", "all"):
        if on_gpu:
            rows += run_layer_suite(args, device, env)
        else:
            # One torch thread: on small CPU matrices more threads mostly wait for each other (see bench/README.md).
            with cpu_threads(1):
                rows += run_layer_suite(args, device, env)
    if args.suite in ("model", "all") and on_gpu:
        rows += run_model_suite(args, device, env)
    path = args.output_dir / f"multi_adapter-{results_slug(device)}.csv"
    append_csv(path, rows, COLUMNS)
    print(f"{len(rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
