"""One QLoRA training step end to end: HF PEFT + bitsandbytes against peftfast, same model, same data. CUDA GPU only.

The model is examples/qlora_finetune.py's: a Llama of `--size` (default "1b", TinyLlama-1.1B's shape, random weights)
with every linear layer but the head in bitsandbytes NF4 (nested statistics, bf16 compute), LoRA r=16 on all of them
(lora_dropout 0.05), reentrant-free gradient checkpointing, AdamW; batches of `--batch-size` windows of `--seq-len`
tokens of the example's corpus. Each provider builds the same base (same seed), runs `--warmup` untimed steps, then
times `--steps` steps (forward, backward, optimizer step; CUDA-synchronised) and reports
    tokens/s   batch tokens per second, median over the timed steps;
    peak MiB   torch.cuda.max_memory_allocated over the timed steps (weights, activations, optimizer state);
Providers: hf_peft (peft.get_peft_model over bitsandbytes layers), peftfast (backend auto: Triton kernels where they
serve), peftfast_torch (backend torch: the reference ops). The target is peftfast >= 1.3x hf_peft's tokens/s at no
more memory (1B model, seq 2048, r=16, H100).

    python bench/bench_e2e.py                          # 1b, seq 2048, batch 4
    python bench/bench_e2e.py --size small --seq-len 512 --steps 5

Rows are appended to <output-dir>/e2e-<gpu>.csv with the GPU name, versions and git commit.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from peftfast import ops
from peftfast.bench import ENVIRONMENT_COLUMNS, add_output_dir_argument, append_csv, environment, results_slug

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import qlora_finetune  # noqa: E402

PROVIDERS = ("hf_peft", "peftfast", "peftfast_torch")
TARGET_SPEEDUP = 1.3
COLUMNS = ENVIRONMENT_COLUMNS + (
    "provider",
    "size",
    "seq_len",
    "batch_size",
    "rank",
    "steps",
    "tokens_per_s",
    "step_ms_median",
    "step_ms_p20",
    "step_ms_p80",
    "peak_mem_mib",
)


@dataclass(frozen=True)
class Result:
    provider: str
    tokens_per_s: float
    step_ms_median: float
    step_ms_p20: float
    step_ms_p80: float
    peak_mem_mib: float


def _model(provider: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    base = qlora_finetune.build_model(None, args.size, None, args.seq_len, device, four_bit=True)
    if provider == "hf_peft":
        import peft

        peft.prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        config = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        return peft.get_peft_model(base, config)
    return qlora_finetune.lora_model(base, args.rank, gradient_checkpointing=True)


def measure(provider: str, args: argparse.Namespace, device: torch.device) -> Result:
    model = _model(provider, args, device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, _ = qlora_finetune.load_tokens(args.data, None)
    data = qlora_finetune.batches(tokens, args.batch_size, args.seq_len, args.seed)
    backend = "torch" if provider == "peftfast_torch" else "auto"
    times = []
    with ops.use_backend(backend):
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            batch = next(data).to(device)
            start = time.perf_counter()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    median = statistics.median(times)
    quintiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [median] * 4
    tokens_per_step = args.batch_size * args.seq_len
    return Result(provider, tokens_per_step / (median / 1e3), median, quintiles[0], quintiles[3], peak)


def format_table(results: list[Result]) -> str:
    hf = next((result for result in results if result.provider == "hf_peft"), None)
    lines = [f"{'provider':<16}{'tokens/s':>12}{'step ms':>10}{'peak MiB':>11}{'vs hf_peft':>12}"]
    for result in results:
        ratio = f"{result.tokens_per_s / hf.tokens_per_s:.2f}x" if hf else "-"
        lines.append(
            f"{result.provider:<16}{result.tokens_per_s:>12,.0f}{result.step_ms_median:>10.1f}"
            f"{result.peak_mem_mib:>11,.0f}{ratio:>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(qlora_finetune.SIZES), default="1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per provider")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--data", default=str(qlora_finetune.DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=0)
    add_output_dir_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_e2e.py measures tokens/s and GPU memory of a QLoRA training step: it needs a CUDA GPU, none here.")
        return 2
    device = torch.device("cuda")
    results = [measure(provider, args, device) for provider in args.providers]
    print(
        f"{args.size} Llama, NF4 base, LoRA r={args.rank} all-linear, batch {args.batch_size} x {args.seq_len} tokens"
    )
    print(format_table(results))
    hf = next((result for result in results if result.provider == "hf_peft"), None)
    ours = next((result for result in results if result.provider == "peftfast"), None)
    if hf and ours:
        speedup = ours.tokens_per_s / hf.tokens_per_s
        met = speedup >= TARGET_SPEEDUP and ours.peak_mem_mib <= hf.peak_mem_mib
        memory = ours.peak_mem_mib - hf.peak_mem_mib
        print(
            f"peftfast: {speedup:.2f}x hf_peft's tokens/s, {memory:+,.0f} MiB peak memory; "
            f"target (>= {TARGET_SPEEDUP}x, no more memory) {'met' if met else 'NOT met'}"
        )
    env = asdict(environment(device))
    rows = [
        {
            **env,
            **{key: f"{value:.6g}" if isinstance(value, float) else value for key, value in asdict(result).items()},
            "size": args.size,
            "seq_len": str(args.seq_len),
            "batch_size": str(args.batch_size),
            "rank": str(args.rank),
            "steps": str(args.steps),
        }
        for result in results
    ]
    path = args.output_dir / f"e2e-{results_slug(device)}.csv"
    append_csv(path, rows, COLUMNS)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
