"""Time LoRA on nn.MultiheadAttention and aLoRA against HF PEFT and the frozen base, side by side on the same inputs.

    python bench/bench_alora_mha.py                 # both suites; CSV rows to <output-dir>/<device>-alora-mha.csv
    python bench/bench_alora_mha.py --suite mha --repeats 20 --output-dir bench/results

Suites (every provider of a case runs on the same weights and inputs, in one run):
- `mha`: one self-attention layer `attn(x, x, x, need_weights=False)`, x [batch, length, E] (batch_first), in training
  mode; "fwd" is the forward, "fwd+bwd" forward and backward of `output.sum()` (dX, and the adapters' gradients).
  Providers: `frozen` (the bare nn.MultiheadAttention, base weights frozen), `hf_peft` (HF PEFT's LoRA
  MultiheadAttention, which merges the deltas into the weights around every forward, so its backward takes full
  weight gradients), `peftfast` (peftfast's layer on the torch backend: projections as base GEMM + low-rank term).
- `alora`: a small Llama built from a config (4 layers, hidden 256) with an adapter on q/k/v/o projections; prompts
  of `length` tokens with the invocation sequence at 3/4 of each row. "prefill": an eval forward under no_grad;
  "fwd+bwd": a training step's forward and backward of the LM loss; "generate": greedy generation of 16 tokens.
  Providers: `base` (the model alone, frozen but for its input embeddings), `hf_peft_alora`, `peftfast_alora`, and
  `peftfast_lora` (the same adapter without alora_invocation_tokens: what the masking costs over plain LoRA).
Timing (`peftfast.bench.time_side_by_side`): on a CUDA GPU triton's do_bench per provider. On CPU the providers of a
case take turns, one call each per round (after warm-up rounds), and each call is timed by the CPU time of the calling
thread (torch on one thread by default; with `--threads` > 1, wall time): on a shared, oversubscribed machine that
leaves out the time spent waiting for a core, and load that drifts during a run hits every provider alike.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import nn

import peftfast
from peftfast.bench import (
    ENVIRONMENT_COLUMNS,
    Timing,
    add_output_dir_argument,
    append_csv,
    environment,
    results_slug,
    time_side_by_side,
)

COLUMNS = ENVIRONMENT_COLUMNS + ("suite", "provider", "case", "mode", "median_ms", "p20_ms", "p80_ms")
# (E, heads, batch, length, rank): a ViT-S-like layer and a wider one, a few hundred to a thousand tokens.
MHA_CASES = [(384, 6, 4, 64, 16), (512, 8, 8, 128, 16)]
ALORA_CASES = [(4, 128), (8, 256)]  # (batch, length)
INVOCATION = [5, 6, 7]


def _hf_peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


class _Attention(nn.Module):
    def __init__(self, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _mha_models(embed_dim: int, heads: int, rank: int, device: torch.device) -> dict[str, nn.Module]:
    models = {}
    libraries = {"hf_peft": _hf_peft(), "peftfast": peftfast}
    torch.manual_seed(0)
    frozen = _Attention(embed_dim, heads).to(device).requires_grad_(False)
    models["frozen"] = frozen
    for provider, library in libraries.items():
        if library is None:
            continue
        torch.manual_seed(0)
        base = _Attention(embed_dim, heads).to(device)
        config = library.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["attn"], init_lora_weights=False)
        models[provider] = library.get_peft_model(base, config).train()
    return models


def _step(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    def run() -> None:
        output = model(x)
        if mode == "fwd+bwd":
            output.sum().backward()

    return run


def run_mha(device: torch.device, repeats: int) -> list[tuple[str, str, str, Timing]]:
    rows = []
    for embed_dim, heads, batch, length, rank in MHA_CASES:
        label = f"E={embed_dim} h={heads} B={batch} L={length} r={rank}"
        models = _mha_models(embed_dim, heads, rank, device)
        x = torch.randn(batch, length, embed_dim, device=device, requires_grad=True)
        for mode in ("fwd", "fwd+bwd"):
            runs = {
                provider: (_step(model, x, mode), [x] + [p for p in model.parameters() if p.requires_grad])
                for provider, model in models.items()
            }
            for provider, timing in time_side_by_side(runs, device, repeats).items():
                rows.append((provider, label, mode, timing.reported))
    return rows


def _llama(device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).to(device)


def _alora_models(device: torch.device) -> dict[str, nn.Module]:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # The base model frozen as under an adapter; its input embeddings train, so its backward runs through every layer.
    base = _llama(device).requires_grad_(False)
    base.get_input_embeddings().requires_grad_(True)
    models = {"base": base}
    for provider, library, invocation in (
        ("hf_peft_alora", _hf_peft(), INVOCATION),
        ("peftfast_alora", peftfast, INVOCATION),
        ("peftfast_lora", peftfast, None),
    ):
        if library is None:
            continue
        config = library.LoraConfig(
            r=16,
            target_modules=targets,
            task_type="CAUSAL_LM",
            init_lora_weights=False,
            alora_invocation_tokens=invocation,
        )
        torch.manual_seed(1)
        models[provider] = library.get_peft_model(_llama(device), config)
    return models


def _alora_step(model: nn.Module, ids: torch.Tensor, mode: str) -> Callable[[], None]:
    def run() -> None:
        if mode == "prefill":
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        elif mode == "fwd+bwd":
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
        else:
            model.eval()
            model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    return run


def run_alora(device: torch.device, repeats: int) -> list[tuple[str, str, str, Timing]]:
    rows = []
    models = _alora_models(device)
    for batch, length in ALORA_CASES:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(10, 1000, (batch, length), generator=generator)
        start = 3 * length // 4
        ids[:, start : start + len(INVOCATION)] = torch.tensor(INVOCATION)
        ids = ids.to(device)
        label = f"llama-h256x4 B={batch} L={length} r=16"
        for mode in ("prefill", "fwd+bwd", "generate"):
            runs = {
                provider: (_alora_step(model, ids, mode), [p for p in model.parameters() if p.requires_grad])
                for provider, model in models.items()
            }
            mode_repeats = max(3, repeats // 4) if mode == "generate" else repeats
            for provider, timing in time_side_by_side(runs, device, mode_repeats).items():
                rows.append((provider, label, mode, timing.reported))
    return rows


def _table(suite: str, rows: list[tuple[str, str, str, Timing]], baseline: str) -> str:
    cases: dict[tuple[str, str], dict[str, float]] = {}
    for provider, label, mode, timing in rows:
        cases.setdefault((label, mode), {})[provider] = timing.median_ms
    providers = list(dict.fromkeys(provider for provider, *_ in rows))
    lines = [f"{suite}: median ms, and each provider's time over {baseline}'s"]
    for (label, mode), times in cases.items():
        cells = [
            f"{name} {times[name]:.2f} ({times[name] / times[baseline]:.2f}x)" for name in providers if name in times
        ]
        if "hf_peft" in times or "hf_peft_alora" in times:
            ours, theirs = ("peftfast", "hf_peft") if "hf_peft" in times else ("peftfast_alora", "hf_peft_alora")
            cells.append(f"hf/peftfast {times[theirs] / times[ours]:.2f}")
        lines.append(f"  {label:<34} {mode:<8} " + "  ".join(cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["mha", "alora", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case on CPU (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(device)
    csv_rows = []
    for suite, run, baseline in (("mha", run_mha, "frozen"), ("alora", run_alora, "base")):
        if args.suite not in (suite, "all"):
            continue
        rows = run(device, args.repeats)
        print(_table(suite, rows, baseline))
        for provider, label, mode, timing in rows:
            csv_rows.append(
                {
                    **{name: getattr(env, name) for name in ENVIRONMENT_COLUMNS},
                    "suite": suite,
                    "provider": provider,
                    "case": label,
                    "mode": mode,
                    "median_ms": f"{timing.median_ms:.6g}",
                    "p20_ms": f"{timing.p20_ms:.6g}",
                    "p80_ms": f"{timing.p80_ms:.6g}",
                }
            )
    path = append_csv(args.output_dir / f"{results_slug(device)}-alora-mha.csv", csv_rows, COLUMNS)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
