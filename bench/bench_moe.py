"""Time one MoE block's training step (forward + backward) with LoRA on all its experts: peftfast against HF PEFT and
against the frozen block, same block, same inputs, in one run.

Blocks are transformers' own, built small from their configs (nothing is downloaded), with LoRA r=16 on both expert
weights (`target_parameters=["experts.gate_up_proj", "experts.down_proj"]`):
    mixtral   MixtralSparseMoeBlock: 8 experts, top-2, gate_up_proj [E, 2I, H];
    qwen_moe  Qwen3MoeSparseMoeBlock: 32 small experts, top-4 (many experts, few rows each);
    gpt_oss   GptOssMLP: 8 experts, top-2, weights stored transposed ([E, H, 2I]), expert biases, clamped SwiGLU.
Providers, each on the same block weights, routing and inputs:
    frozen           the block without LoRA, base frozen (the floor: forward, and backward for dX only);
    hf_peft          HF PEFT's get_peft_model with the same config (parametrizes each weight as W + delta);
    peftfast         peftfast's get_peft_model; on CPU the torch backend;
    peftfast_triton  the same model on the triton backend (CUDA only).
The experts run transformers' default implementation ("grouped_mm", `--experts-implementation` to change it) in the
frozen and HF PEFT providers; peftfast's grouped forward replaces it whenever LoRA is active. The input requires grad
(as inside a network) and the backward gets a random grad_output; LoRA weights start random (init_lora_weights=False).

CPU timing (`peftfast.bench.time_side_by_side`): `--threads` torch threads (1 by default), the providers taking turns
call by call (`--repeats` rounds after warm-up) so that load from other processes hits all of them alike; reported
are the median wall time and the median CPU time per step (of the calling thread on one thread, of the process with
more; the CPU time is what a busy shared machine changes least), and each provider's ratios to the frozen block and
to HF PEFT. On a GPU each provider is timed with `triton.testing.do_bench` instead. Rows are appended to
<output-dir>/moe-<device>.csv (see `--help`).

    python bench/bench_moe.py                    # all three blocks
    python bench/bench_moe.py --blocks mixtral --tokens 256 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict

import torch
from torch import nn

from peftfast import ops
from peftfast.bench import (
    ENVIRONMENT_COLUMNS,
    add_output_dir_argument,
    append_csv,
    environment,
    results_slug,
    time_side_by_side,
)

COLUMNS = ENVIRONMENT_COLUMNS + (
    "block",
    "provider",
    "tokens",
    "hidden",
    "intermediate",
    "experts",
    "top_k",
    "rank",
    "dtype",
    "experts_implementation",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "cpu_ms",
    "vs_frozen",
    "vs_hf_peft",
)
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _blocks(hidden: int) -> dict[str, tuple[Callable[[], nn.Module], dict[str, int]]]:
    """name -> (constructor, shape), at `hidden` width."""
    from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    mixtral = dict(intermediate=2 * hidden, experts=8, top_k=2)
    qwen = dict(intermediate=hidden // 2, experts=32, top_k=4)
    gpt_oss = dict(intermediate=hidden, experts=8, top_k=2)
    return {
        "mixtral": (
            lambda: MixtralSparseMoeBlock(
                MixtralConfig(
                    hidden_size=hidden,
                    intermediate_size=mixtral["intermediate"],
                    num_local_experts=mixtral["experts"],
                    num_experts_per_tok=mixtral["top_k"],
                )
            ),
            mixtral,
        ),
        "qwen_moe": (
            lambda: Qwen3MoeSparseMoeBlock(
                Qwen3MoeConfig(
                    hidden_size=hidden,
                    moe_intermediate_size=qwen["intermediate"],
                    num_experts=qwen["experts"],
                    num_experts_per_tok=qwen["top_k"],
                )
            ),
            qwen,
        ),
        "gpt_oss": (
            lambda: GptOssMLP(
                GptOssConfig(
                    hidden_size=hidden,
                    intermediate_size=gpt_oss["intermediate"],
                    num_local_experts=gpt_oss["experts"],
                    num_experts_per_tok=gpt_oss["top_k"],
                )
            ),
            gpt_oss,
        ),
    }


def _set_experts_implementation(model: nn.Module, implementation: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = implementation


def _models(block: str, hidden: int, rank: int, device: torch.device, dtype: torch.dtype, implementation: str):
    import peft

    import peftfast

    make, _ = _blocks(hidden)[block]
    torch.manual_seed(0)
    frozen = make()
    with torch.no_grad():
        for param in frozen.parameters():
            param.normal_(0, hidden**-0.5)
    frozen = frozen.to(device, dtype).requires_grad_(False)
    _set_experts_implementation(frozen, implementation)
    kwargs = dict(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    hf_model = peft.get_peft_model(copy.deepcopy(frozen), peft.LoraConfig(**kwargs))
    ours = peftfast.get_peft_model(copy.deepcopy(frozen), peftfast.LoraConfig(**kwargs))
    ours.load_state_dict(hf_model.state_dict())
    return {"frozen": frozen, "hf_peft": hf_model.train(), "peftfast": ours.train()}


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, backend: str | None) -> Callable[[], None]:
    def run() -> None:
        with ops.use_backend(backend) if backend else nullcontext():
            out = model(x)
            (out[0] if isinstance(out, tuple) else out).backward(grad)

    return run


def run_block(args: argparse.Namespace, block: str, device: torch.device, env: dict) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = _models(block, args.hidden, args.rank, device, dtype, args.experts_implementation)
    shape = _blocks(args.hidden)[block][1]
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    steps = {name: _step(model, x, grad, "torch" if name == "peftfast" else None) for name, model in models.items()}
    if device.type == "cuda":
        steps["peftfast_triton"] = _step(models["peftfast"], x, grad, "triton")
    # One untimed call per provider: that it runs, and that peftfast really took its grouped path.
    for step in steps.values():
        step()
    experts = models["peftfast"].base_model.model.experts
    if experts.last_backend is None:
        raise RuntimeError(f"{block}: peftfast's experts did not run the grouped LoRA forward.")
    leaves = [x] + [p for model in models.values() for p in model.parameters() if p.requires_grad]
    runs = {name: (step, leaves) for name, step in steps.items()}
    timings = time_side_by_side(runs, device, args.repeats, args.warmup)
    results = {}
    for name, timing in timings.items():
        cpu_ms = float("nan") if timing.cpu is None else timing.cpu.median_ms
        results[name] = (timing.wall.median_ms, timing.wall.p20_ms, timing.wall.p80_ms, cpu_ms)
    rows = []
    frozen_ms, frozen_cpu = results["frozen"][0], results["frozen"][3]
    hf_ms, hf_cpu = results["hf_peft"][0], results["hf_peft"][3]
    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"\n{block}: T={args.tokens} H={args.hidden} I={shape['intermediate']} E={shape['experts']} "
        f"k={shape['top_k']} r={args.rank} {dtype_name}, experts: {args.experts_implementation}"
    )
    print(f"{'provider':<16}{'wall ms':>10}{'cpu ms':>10}{'/frozen':>9}{'/hf_peft':>10}   (ratios of wall; of cpu)")
    for name, (median, p20, p80, cpu_ms) in results.items():
        vs_frozen, vs_hf = median / frozen_ms, median / hf_ms
        cpu_ratios = f"{cpu_ms / frozen_cpu:.2f}; {cpu_ms / hf_cpu:.2f}" if cpu_ms == cpu_ms else ""
        print(f"{name:<16}{median:>10.1f}{cpu_ms:>10.1f}{vs_frozen:>9.2f}{vs_hf:>10.2f}   ({cpu_ratios})")
        rows.append(
            {
                **env,
                "block": block,
                "provider": name,
                "tokens": str(args.tokens),
                "hidden": str(args.hidden),
                "intermediate": str(shape["intermediate"]),
                "experts": str(shape["experts"]),
                "top_k": str(shape["top_k"]),
                "rank": str(args.rank),
                "dtype": dtype_name,
                "experts_implementation": args.experts_implementation,
                "median_ms": f"{median:.4f}",
                "p20_ms": f"{p20:.4f}",
                "p80_ms": f"{p80:.4f}",
                "cpu_ms": "" if cpu_ms != cpu_ms else f"{cpu_ms:.4f}",
                "vs_frozen": f"{vs_frozen:.3f}",
                "vs_hf_peft": f"{vs_hf:.3f}",
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", nargs="+", choices=("mixtral", "qwen_moe", "gpt_oss"), default=None)
    parser.add_argument("--tokens", type=int, default=512, help="tokens through the block per step")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=("grouped_mm", "eager"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine a parallel region waits for its slowest thread, so "
        "timings with more threads measure the other processes' load more than the code)",
    )
    add_output_dir_argument(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = asdict(environment(device))
    rows = []
    with warnings.catch_warnings():
        # bitsandbytes and transformers talk on import; nothing the timing depends on.
        warnings.simplefilter("ignore")
        for block in args.blocks or ("mixtral", "qwen_moe", "gpt_oss"):
            rows += run_block(args, block, device, env)
    path = append_csv(args.output_dir / f"moe-{results_slug(device)}.csv", rows, COLUMNS)
    print(f"\n{len(rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
