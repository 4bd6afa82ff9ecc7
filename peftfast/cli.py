"""The `peftfast` command: `--version`, `info` (environment, backends, the autotune cache), `demo` (train, save,
reload a LoRA), `bench` (time the LoRA linear layer against the bare GEMM and HF PEFT) and `gate` (compile every
kernel config for A100 and H100 and check registers, spills, shared memory and tensor cores, without a GPU)."""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import bench, compile_gate
from .bench import cpu_threads
from .mapping import get_peft_model
from .ops import autotune, get_backend
from .peft_model import PeftModel
from .tuners.lora import LoraConfig
from .version import __version__

__all__ = ["cpu_threads", "main"]

_REPORTED_PACKAGES = ("torch", "triton", "transformers", "bitsandbytes", "safetensors")
# Reported from their installed metadata without importing them: bitsandbytes is imported only where a 4-bit or 8-bit
# layer is involved (its import probes hardware and the HF hub for optional kernels, which `info` has no use for).
_NOT_IMPORTED = ("bitsandbytes",)
_KERNELS_HINT = (
    "for the Triton kernels on a GPU, install a CUDA build of torch (it brings the triton it was built with) or "
    "`pip install peftfast[kernels]`"
)

# The demo's model and task: small enough for a few seconds on 2 CPU cores, big enough to look like a real decoder.
_VOCAB = 64
_SEQ_LEN = 16
_BATCH = 32
_LEARNING_RATE = 1e-2
_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_RELOAD_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------------------- info


def package_version(name: str) -> str:
    """The installed version of package `name`, "not installed", or why it is installed but unusable."""
    if name in _NOT_IMPORTED:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        return "not installed" if error.name == name else f"import fails: {error}"
    # A broken install can raise anything at import; `info` is what people run to debug that, so it must not crash.
    except Exception as error:
        return f"import fails: {type(error).__name__}: {error}"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
    return str(version)


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu, no CUDA GPU"


def triton_status() -> str:
    version = package_version("triton")
    if version == "not installed" or version.startswith("import fails"):
        return f"not available (triton: {version}); {_KERNELS_HINT}"
    if torch.cuda.is_available():
        return "available"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "available (TRITON_INTERPRET=1, interpreter on CPU)"
    return "not available (needs a CUDA GPU, or TRITON_INTERPRET=1)"


def cuda_extension_status() -> str:
    try:
        importlib.import_module("peftfast._C")
    except ImportError:
        return "not built"
    return "available"


def selected_backend() -> str:
    # An invalid PEFTFAST_BACKEND raises here; show it instead of a traceback.
    try:
        return get_backend()
    except ValueError as error:
        return f"invalid: {error}"


def collect_info() -> dict[str, str]:
    """Everything `peftfast info` prints, as label -> value."""
    info = {"python": platform.python_version(), "peftfast": __version__}
    for name in _REPORTED_PACKAGES:
        info[name] = package_version(name)
    info["device"] = device_description()
    info["backend torch"] = "available"
    info["backend triton"] = triton_status()
    info["backend cuda extension"] = cuda_extension_status()
    info["selected backend"] = selected_backend()
    return info


def print_info() -> None:
    info = collect_info()
    width = max(len(label) for label in info)
    for label, value in info.items():
        print(f"{label + ':':<{width + 1}} {value}")
    for line in autotune.describe():
        print(line)


# ----------------------------------------------------------------------------------------------------------- demo


@dataclass
class DemoResult:
    """What the demo measured; `reload_ok` is whether the reloaded adapter reproduces the trained one."""

    first_loss: float
    last_loss: float
    max_abs_diff: float
    reload_ok: bool
    output_dir: str
    seconds: float


def next_token(tokens: torch.Tensor) -> torch.Tensor:
    """The rule the demo teaches: a fixed permutation of the vocabulary (3 is coprime with 64)."""
    return (tokens * 3 + 1) % _VOCAB


def make_batch(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Sequences that follow `next_token` from random start tokens."""
    tokens = [torch.randint(0, _VOCAB, (_BATCH,), generator=generator)]
    for _ in range(_SEQ_LEN - 1):
        tokens.append(next_token(tokens[-1]))
    return torch.stack(tokens, dim=1).to(device)


def build_base_model(seed: int, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # No special tokens: every token id is a regular symbol of the task, so generation never stops early.
    config = LlamaConfig(
        vocab_size=_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * _SEQ_LEN,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        # The default init (0.02) gives the frozen lm_head such small rows that logits, and so the loss, barely move.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).to(device)


def train(model: nn.Module, steps: int, seed: int, device: torch.device) -> list[float]:
    """AdamW on the adapter's parameters; returns the loss of every step."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_LEARNING_RATE)
    model.train()
    losses = []
    progress = tqdm(range(steps), desc="training", unit="step")
    for _ in progress:
        batch = make_batch(generator, device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    output = model.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False)
    return output[0, prompt.shape[1] :].tolist()


def expected_continuation(start: int, new_tokens: int) -> list[int]:
    tokens = [torch.tensor(start)]
    for _ in range(new_tokens):
        tokens.append(next_token(tokens[-1]))
    return [int(token) for token in tokens[1:]]


@torch.no_grad()
def compare_logits(model: nn.Module, reloaded: nn.Module, seed: int, device: torch.device) -> float:
    batch = make_batch(torch.Generator().manual_seed(seed + 1), device)
    return (model(input_ids=batch).logits - reloaded(input_ids=batch).logits).abs().max().item()


def show_generations(model: nn.Module, reloaded: nn.Module, device: torch.device, start: int = 5) -> None:
    new_tokens = 10
    prompt = torch.tensor([[start]], device=device)
    print(f"greedy generation from token {start}:")
    print(f"  rule      {expected_continuation(start, new_tokens)}")
    print(f"  trained   {greedy_continuation(model, prompt, new_tokens)}")
    print(f"  reloaded  {greedy_continuation(reloaded, prompt, new_tokens)}")


def train_save_reload(steps: int, seed: int, output_dir: str, device: torch.device) -> DemoResult:
    start = time.perf_counter()
    base = build_base_model(seed, device)
    # get_peft_model modifies the model in place; the reload needs the untouched base weights.
    pristine_base = copy.deepcopy(base)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=_TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    losses = train(model, steps, seed, device)
    print(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f} ({losses[0] / losses[-1]:.1f}x lower)")

    model.save_pretrained(output_dir)
    print(f"adapter saved to {output_dir}: {', '.join(sorted(os.listdir(output_dir)))}")
    reloaded = PeftModel.from_pretrained(pristine_base, output_dir)

    max_abs_diff = compare_logits(model, reloaded, seed, device)
    reload_ok = max_abs_diff <= _RELOAD_TOLERANCE
    print(f"max |logits(trained) - logits(reloaded)| = {max_abs_diff:.3e}")
    show_generations(model, reloaded, device)
    print("reload check: OK" if reload_ok else f"reload check: MISMATCH (tolerance {_RELOAD_TOLERANCE:.0e})")

    seconds = time.perf_counter() - start
    print(f"demo took {seconds:.1f} s on {device_description()}")
    return DemoResult(losses[0], losses[-1], max_abs_diff, reload_ok, output_dir, seconds)


def run_demo(steps: int = 40, seed: int = 0, output_dir: str | os.PathLike | None = None) -> DemoResult:
    """Train a LoRA on a tiny Llama, save it, reload it onto a fresh copy of the base model and compare."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = os.fspath(output_dir) if output_dir is not None else tempfile.mkdtemp(prefix="peftfast-demo-")
    # The matrices are so small that handing work between CPU threads costs more than the math (about 50x slower
    # with 2 threads on a busy 2-core machine).
    with cpu_threads(1):
        return train_save_reload(steps, seed, output_dir, device)


# ------------------------------------------------------------------------------------------------------------ cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftfast", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the peftfast version and exit")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("info", help="versions, device and available backends")
    demo = commands.add_parser("demo", help="train a LoRA on a tiny Llama, save it, reload it and compare")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the model and the data (default: 0)")
    demo.add_argument("--output", default=None, help="where to save the adapter (default: a new temporary folder)")
    bench.add_arguments(
        commands.add_parser("bench", help="time the LoRA linear layer against the bare GEMM and HF PEFT, save CSV rows")
    )
    compile_gate.add_arguments(
        commands.add_parser(
            "gate", help="compile every kernel config for sm_80/sm_90 on CPU: regs, spills, shared memory, tensor cores"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peftfast` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"peftfast {__version__}")
        return 0
    if args.command == "info":
        print_info()
        return 0
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be at least 1")
        result = run_demo(steps=args.steps, seed=args.seed, output_dir=args.output)
        return 0 if result.reload_ok else 1
    if args.command == "bench":
        return bench.run_from_args(args)
    if args.command == "gate":
        return compile_gate.run_from_args(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
