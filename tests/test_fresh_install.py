"""What a new user gets from `pip install peftfast` and the README's commands: a lean install, a quiet one, a clean
working tree after benchmarks and examples, and adapter folders the Hub understands."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from models import MLP, tiny_llama

import peftfast
from peftfast import bench, cli
from peftfast.utils import quiet

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("triton", "bitsandbytes", "transformers", "peft", "diffusers")


def _python(code: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, env=env or os.environ
    )


def test_import_and_train_without_any_optional_package():
    # None in sys.modules makes `import name` fail as if the package were not installed.
    code = (
        "import sys\n"
        f"for name in {OPTIONAL!r}: sys.modules[name] = None\n"
        "import torch, peftfast\n"
        "model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))\n"
        "model = peftfast.get_peft_model(model, peftfast.LoraConfig(r=2, target_modules=['0', '2']))\n"
        "model(torch.randn(5, 7)).sum().backward()\n"
        "from peftfast import cli\n"
        "info = cli.collect_info()\n"
        "print(info['triton'], '|', info['backend triton'], '|', info['transformers'])\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    triton, backend, transformers = result.stdout.strip().split(" | ")
    assert triton.startswith("import fails") or triton == "not installed"
    assert "pip install peftfast[kernels]" in backend and "CUDA build of torch" in backend
    assert transformers.startswith("import fails") or transformers == "not installed"


def test_import_peftfast_imports_no_optional_package():
    # What `import peftfast` costs beyond torch: none of the heavy optional packages is imported by it.
    result = _python(f"import sys, peftfast; print([n for n in {OPTIONAL!r} if n in sys.modules])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_package_requires_no_triton():
    # A CUDA build of torch brings its own triton; a CPU-only install must not get ~1 GB of it from us.
    requirements = importlib.metadata.requires("peftfast") or []
    unconditional = [req for req in requirements if "extra ==" not in req]
    assert not [req for req in unconditional if req.lower().startswith("triton")], unconditional
    assert any(req.startswith("triton") and 'extra == "kernels"' in req for req in requirements), requirements
    # The library's own requirements are lower bounds only: exact pins live in tests/constraints.txt.
    assert not [req for req in unconditional if "==" in req], unconditional


def test_the_constraints_file_pins_every_test_dependency_exactly():
    lines = [line.strip() for line in (REPO / "tests" / "constraints.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    for name in ("torch", "triton", "transformers", "bitsandbytes", "peft", "diffusers", "hypothesis", "pytest"):
        assert name in pins, name
    assert pins["peft"] == "0.21.2"


@pytest.mark.parametrize("cwd", [REPO, None], ids=["repo-root", "elsewhere"])
def test_bitsandbytes_kernel_probe_stays_out_of_the_terminal(cwd, tmp_path):
    # Where the CPU has AVX512-BF16, bitsandbytes' import logs a failed probe for an optional hub kernel; from the
    # repo root our kernels/ folder even shadows the `kernels` package it looks for.
    result = _python("import peftfast, bitsandbytes, peft", cwd=cwd or tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr, result.stderr


def test_the_probe_filter_drops_only_the_missing_kernels_record(caplog):
    logger = logging.getLogger(quiet.PROBE_LOGGER)
    quiet.silence_bitsandbytes_kernel_probe()
    quiet.silence_bitsandbytes_kernel_probe()
    assert sum(type(f).__name__ == "_DropMissingKernelsProbe" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=quiet.PROBE_LOGGER):
        logger.warning(quiet.PROBE_MESSAGE + ": %s. Please ...", ModuleNotFoundError("No module named 'kernels'"))
        logger.warning(quiet.PROBE_MESSAGE + ": %s. Please ...", RuntimeError("hub unreachable"))
        logger.warning("a real bitsandbytes problem")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [quiet.PROBE_MESSAGE + ": hub unreachable. Please ...", "a real bitsandbytes problem"]


def test_info_does_not_import_bitsandbytes():
    code = "import sys; from peftfast import cli; cli.print_info(); print('bnb', 'bitsandbytes' in sys.modules)"
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("bnb False")
    assert "bitsandbytes:" in result.stdout and "gemm_4bit_forward" not in result.stderr


def test_benchmarks_write_outside_the_checkout_unless_told(monkeypatch, tmp_path):
    monkeypatch.delenv(bench.OUTPUT_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert bench.default_output_dir() == tmp_path / "cache" / "peftfast" / "bench"
    monkeypatch.setenv(bench.OUTPUT_DIR_ENV, str(tmp_path / "mine"))
    assert bench.default_output_dir() == tmp_path / "mine"
    args = ["bench", "--shapes", "16x24", "--tokens", "8", "--ranks", "4", "--repeats", "2", "--no-plot"]
    monkeypatch.chdir(REPO)
    before = _git_status()
    assert cli.main(args) == 0
    assert (tmp_path / "mine" / "cpu.csv").is_file()
    assert _git_status() == before


def _git_status() -> str:
    result = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout")
    return result.stdout


def test_qlora_example_saves_outside_the_current_folder(tmp_path):
    pytest.importorskip("bitsandbytes")
    example = REPO / "examples" / "qlora_finetune.py"
    argv = ["--size", "tiny", "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--quiet", "--no-4bit"]
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('qlora_finetune', {str(example)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        f"print(module.run(module.build_parser().parse_args({argv!r})).output_dir)\n"
    )
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = Path(result.stdout.strip().splitlines()[-1])
    assert (saved / "adapter_model.safetensors").is_file()
    assert list(tmp_path.iterdir()) == []


def test_model_card_front_matter_matches_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    cards = {}
    for name, lib in (("peft", peft), ("peftfast", peftfast)):
        base = tiny_llama()
        # As from_pretrained("org/tiny-llama") leaves them.
        base.config._name_or_path = base.name_or_path = "org/tiny-llama"
        model = lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / name, save_embedding_layers=False)
        cards[name] = ModelCard.load(tmp_path / name / "README.md").data
    assert cards["peftfast"].base_model == cards["peft"].base_model == "org/tiny-llama"
    assert cards["peftfast"].library_name == cards["peft"].library_name == "peft"
    assert set(cards["peft"].tags) <= set(cards["peftfast"].tags)


def test_model_card_without_a_known_base_model_has_no_base_model(tmp_path):
    model = peftfast.get_peft_model(MLP(), peftfast.LoraConfig(r=2, target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md").data
    assert card.library_name == "peft" and card.base_model is None
    assert "lora" in card.tags
