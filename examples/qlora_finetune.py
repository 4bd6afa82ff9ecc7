"""QLoRA fine-tuning end to end, as a user runs it: a Llama model with a 4-bit (NF4) base, LoRA on every linear
layer, gradient checkpointing, a progress bar with tokens/s and memory, the adapter saved at the end.

The model is a local checkpoint (`--model PATH`, with its tokenizer if it has one) or random weights from a Llama
config of a chosen size (`--size tiny|small|1b`; nothing is downloaded). The data is a text file (default: the small
corpus in examples/data), cut into random windows of `--seq-len` tokens; without a tokenizer a token is a byte.

    python examples/qlora_finetune.py --size tiny --steps 20                  # seconds, on CPU
    python examples/qlora_finetune.py --size 1b --seq-len 2048 --batch-size 4 # a GPU
    python examples/qlora_finetune.py --size tiny --no-4bit                    # plain LoRA on a full-precision base
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import peftfast
from peftfast import LoraConfig, ops
from peftfast.cli import cpu_threads

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
BYTE_VOCAB = 256

# Llama shapes. Every linear layer's in_features is a multiple of 64 (bitsandbytes' 4-bit blocksize), which
# bitsandbytes' CPU dequantize needs. "1b" is the shape of TinyLlama-1.1B.
SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    "small": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


@dataclass
class FinetuneResult:
    """What a run measured: the loss of every step, tokens per second over the steps after the first (which pays for
    warm-up), peak memory (CUDA: allocated by torch; CPU: the process's resident set) and the adapter folder."""

    losses: list[float]
    tokens_per_second: float
    peak_memory_mb: float
    output_dir: str
    four_bit: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local Llama checkpoint folder (default: random weights)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="config of the random model")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a UTF-8 text file to train on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (lora_alpha is twice the rank)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-4bit", dest="four_bit", action="store_false", help="keep the base in full precision")
    parser.add_argument(
        "--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", help="keep activations"
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="peftfast ops backend")
    parser.add_argument(
        "--output", default=None, help="where to save the adapter (default: a new temporary folder, printed at the end)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what QLoRA computes in on a GPU; on a CPU it is emulated and slow.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokens(data: str | os.PathLike, model_path: str | None) -> tuple[torch.Tensor, int | None]:
    """The whole text file as token ids, and the tokenizer's vocabulary size (None for bytes)."""
    text = Path(data).read_text(encoding="utf-8")
    if model_path is not None and (Path(model_path) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        return torch.tensor(tokenizer(text)["input_ids"]), len(tokenizer)
    return torch.tensor(list(text.encode("utf-8"))), None


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] batches of random windows of `tokens` (the text repeats if it is shorter)."""
    if len(tokens) <= seq_len:
        tokens = tokens.repeat(seq_len // len(tokens) + 2)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
        yield torch.stack([tokens[start : start + seq_len] for start in starts.tolist()])


def quantize_to_nf4(model: nn.Module, dtype: torch.dtype, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (but `skip`) by a bitsandbytes NF4 `Linear4bit` (nested statistics, compute dtype
    `dtype`), in place, as transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)` does when loading."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise SystemExit(f"The 4-bit base needs bitsandbytes ({error}); install it, or run with --no-4bit.") from error
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data.to(dtype),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
                module=quantized,
            ).to(child.weight.device)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            # bitsandbytes repacks a CPU weight into an inference-only layout on its first no-grad forward: keep the
            # standard layout that training (and peftfast's kernels) read.
            quantized.support_avx512bf16_for_cpu = False
            setattr(module, name, quantized)
    model.is_loaded_in_4bit = True
    return model


def build_model(
    model_path: str | None, size: str, vocab_size: int | None, seq_len: int, device: torch.device, four_bit: bool
) -> nn.Module:
    """The base model on `device`: a local checkpoint or random weights of `size`, NF4-quantized if `four_bit`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = compute_dtype(device)
    if model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    else:
        shape = dict(SIZES[size])
        shape.setdefault("vocab_size", vocab_size or BYTE_VOCAB)
        config = LlamaConfig(**shape, max_position_embeddings=max(seq_len, 64), tie_word_embeddings=False)
        with device:
            model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return quantize_to_nf4(model, dtype) if four_bit else model


def lora_model(base: nn.Module, rank: int, gradient_checkpointing: bool) -> peftfast.PeftModel:
    """LoRA on every linear layer (but the output head) of a base model made ready for k-bit training."""
    if getattr(base, "is_loaded_in_4bit", False):
        peftfast.prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return peftfast.get_peft_model(base, config)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(
    model: nn.Module, data: Iterator[torch.Tensor], steps: int, lr: float, device: torch.device, quiet: bool
) -> tuple[list[float], float]:
    """AdamW on the adapter; returns the loss of every step and the tokens/s of the steps after the first."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses: list[float] = []
    tokens = 0
    start = None
    progress = tqdm(range(steps), desc="qlora", unit="step", disable=quiet)
    for step in progress:
        batch = next(data).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            start = time.perf_counter()
            continue
        tokens += batch.numel()
        rate = tokens / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}", mem=f"{peak_memory_mb(device):,.0f}MB")
    elapsed = time.perf_counter() - start if start is not None else 0.0
    return losses, tokens / elapsed if elapsed > 0 else math.nan


def run(args: argparse.Namespace) -> FinetuneResult:
    """Build, train and save as `args` say (see `build_parser`)."""
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    token_ids, vocab_size = load_tokens(args.data, args.model)
    base = build_model(args.model, args.size, vocab_size, args.seq_len, device, args.four_bit)
    model = lora_model(base, args.rank, args.gradient_checkpointing)
    if not args.quiet:
        model.print_trainable_parameters()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = batches(token_ids, args.batch_size, args.seq_len, args.seed)
    # The model is so small on CPU that handing work between threads costs more than the math.
    threads = contextlib.nullcontext() if device.type == "cuda" else cpu_threads(1)
    with ops.use_backend(args.backend), threads:
        losses, rate = train(model, data, args.steps, args.lr, device, args.quiet)
    # Not the current folder by default: a run from a checkout must leave the working tree as it was.
    output_dir = args.output if args.output is not None else tempfile.mkdtemp(prefix="qlora-adapter-")
    model.save_pretrained(output_dir)
    result = FinetuneResult(losses, rate, peak_memory_mb(device), output_dir, args.four_bit)
    if not args.quiet:
        print(
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {rate:,.0f} tokens/s; peak memory {result.peak_memory_mb:,.0f} "
            f"MB ({'GPU' if device.type == 'cuda' else 'process RSS'}); adapter saved to {output_dir}"
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
