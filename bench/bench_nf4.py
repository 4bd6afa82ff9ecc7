"""QLoRA layer benchmark (GPU only): LoRA r=16 over an NF4 (nested absmax) bitsandbytes Linear4bit, bf16 compute.

Decode (forward, M rows in {1, 4, 16, 64}) on 4096 -> 14336 and 4096 -> 4096, providers side by side on the same
inputs:
    bf16_linear      F.linear on the dense bf16 weight (no LoRA): reads 3.9x the bytes of the 4-bit weight;
    bnb_matmul_4bit  bitsandbytes.matmul_4bit (no LoRA);
    hf_peft          HF PEFT's LoRA Linear4bit (bitsandbytes base + LoRA);
    peftfast_torch   peftfast's LoRA Linear4bit on the backend "torch";
    peftfast_triton  the same layer on the backend "triton" (fused 4-bit GEMV/GEMM + LoRA epilogue).
Training (forward + backward, M = 4096): hf_peft, peftfast_torch, peftfast_triton.

Timing is `peftfast.bench.time_fn` (triton.testing.do_bench: median and 20/80th percentiles, L2 flushed). GB/s counts
the 4-bit weight and its absmax read once. Rows are appended to <output-dir>/nf4_<gpu>.csv.

Usage: python bench/bench_nf4.py [--quick]. Needs a CUDA GPU and bitsandbytes; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from peftfast.bench import add_output_dir_argument

COLUMNS = (
    "date",
    "git_sha",
    "git_dirty",
    "gpu",
    "torch",
    "triton",
    "peft",
    "peftfast",
    "bitsandbytes",
    "provider",
    "mode",
    "tokens",
    "d_in",
    "d_out",
    "rank",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "weight_gbps",
)
SHAPES = [(4096, 14336), (4096, 4096)]
DECODE_TOKENS = [1, 4, 16, 64]
TRAIN_TOKENS = 4096
RANK = 16


class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _quantized(dense: torch.Tensor):
    import bitsandbytes as bnb

    d_out, d_in = dense.shape
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        dense.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True, module=layer
    ).to("cuda")
    return layer


def _lora_model(library, dense: torch.Tensor) -> nn.Module:
    model = _OneLayer(_quantized(dense))
    config = library.LoraConfig(r=RANK, lora_alpha=32, target_modules=["proj"], init_lora_weights=False)
    model = library.get_peft_model(model, config)
    model.eval()
    return model


def _weight_bytes(layer) -> int:
    state = layer.weight.quant_state
    absmax = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        absmax += state.state2.absmax.numel() * 4 + 256 * 4
    return layer.weight.numel() * layer.weight.element_size() + absmax


def _on_backend(model: nn.Module, backend: str, x: torch.Tensor) -> torch.Tensor:
    from peftfast import ops

    with ops.use_backend(backend):
        return model(x)


def _decode_providers(x, dense, base, hf_model, our_model) -> dict:
    import bitsandbytes as bnb

    return {
        "bf16_linear": functools.partial(F.linear, x, dense),
        "bnb_matmul_4bit": functools.partial(bnb.matmul_4bit, x, base.weight.t(), quant_state=base.weight.quant_state),
        "hf_peft": functools.partial(hf_model, x),
        "peftfast_torch": functools.partial(_on_backend, our_model, "torch", x),
        "peftfast_triton": functools.partial(_on_backend, our_model, "triton", x),
    }


def _train_step(model: nn.Module, backend: str, x: torch.Tensor, grad_y: torch.Tensor) -> None:
    _on_backend(model, backend, x).backward(grad_y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape, M in {1, 16}, no training case")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_nf4.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError as error:
        print(f"bench_nf4.py needs bitsandbytes and peft: {error}", file=sys.stderr)
        return 2
    import peftfast
    from peftfast.bench import append_csv, environment, results_slug, time_fn

    device = torch.device("cuda")
    env = asdict(environment(device)) | {"bitsandbytes": bnb.__version__}
    env.pop("cpu_threads", None)
    shapes = SHAPES[:1] if args.quick else SHAPES
    decode_tokens = [1, 16] if args.quick else DECODE_TOKENS
    rows = []

    def record(provider, mode, tokens, d_in, d_out, timing, weight_bytes):
        gbps = weight_bytes / (timing.median_ms * 1e-3) / 1e9
        rows.append(
            env
            | dict(provider=provider, mode=mode, tokens=tokens, d_in=d_in, d_out=d_out, rank=RANK)
            | dict(median_ms=f"{timing.median_ms:.5f}", p20_ms=f"{timing.p20_ms:.5f}", p80_ms=f"{timing.p80_ms:.5f}")
            | dict(weight_gbps=f"{gbps:.1f}")
        )
        print(f"{mode:8} M={tokens:5} {d_in}x{d_out} {provider:16} {timing.median_ms * 1e3:9.1f} us  {gbps:7.1f} GB/s")

    for d_in, d_out in shapes:
        torch.manual_seed(0)
        dense = (torch.randn(d_out, d_in, device=device) * d_in**-0.5).to(torch.bfloat16)
        hf_model, our_model = _lora_model(peft, dense), _lora_model(peftfast, dense)
        base = hf_model.base_model.model.proj.get_base_layer()
        weight_bytes = _weight_bytes(base)
        for tokens in decode_tokens:
            x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16)
            providers = _decode_providers(x, dense, base, hf_model, our_model)
            with torch.no_grad():
                expected = providers["hf_peft"]()
                for name, fn in providers.items():
                    if name.startswith("peftfast"):
                        torch.testing.assert_close(fn(), expected, atol=0.05, rtol=0.05)
                    record(name, "decode", tokens, d_in, d_out, time_fn(fn, device), weight_bytes)
        if args.quick:
            continue
        x = torch.randn(TRAIN_TOKENS, d_in, device=device, dtype=torch.bfloat16)
        grad_y = torch.randn(TRAIN_TOKENS, d_out, device=device, dtype=torch.bfloat16)
        for name, model, backend in (
            ("hf_peft", hf_model, "torch"),
            ("peftfast_torch", our_model, "torch"),
            ("peftfast_triton", our_model, "triton"),
        ):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]

            step = functools.partial(_train_step, model, backend, x, grad_y)
            record(
                name, "fwd+bwd", TRAIN_TOKENS, d_in, d_out, time_fn(step, device, grad_to_none=params), 2 * weight_bytes
            )
            model.eval()

    path = args.output_dir / f"nf4_{results_slug(device)}.csv"
    append_csv(path, rows, COLUMNS)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
