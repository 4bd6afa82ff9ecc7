"""Everything a lent GPU should measure, in one command: install, GPU tests, every benchmark, the kernels' real
registers against the compile gate's, and a summary: CSVs, plots and a markdown table of ratios in one folder.

    python3 bench/run_gpu.py                      # results in $OUT if set, else ~/.cache/peftfast/bench/gpu-run-<date>
    python3 bench/run_gpu.py --budget 420 --out /tmp/results

Made for one call on a machine that is lent for minutes (see README.md, "On a lent GPU"): each step runs in its own
process with its own time limit, inside a total budget (default 450 s, under 8 minutes with start-up); a step that
fails or runs out of time is recorded with its log and the next one still runs. Steps, in order:

    setup           copy peftfast onto PYTHONPATH (no pip, no network); bitsandbytes from .whl/ if carried there
    info            `peftfast info` (versions, GPU, backends)
    gpu tests       pytest -m gpu over the suite, then every kernel test file on real CUDA tensors
    kernels vs gate the gate's representative launches on the GPU: real registers, spills and shared memory per
                    compiled kernel, next to what the compile gate predicted for sm_90 (gate_vs_gpu.csv)
    lora_linear     `peftfast bench` suite (fwd, fwd+bwd; bare GEMM, HF PEFT, peftfast torch/triton/auto)
    nf4             bench/bench_nf4.py --quick (4-bit decode and training vs bitsandbytes and HF PEFT)
    multi-adapter   bench/bench_multi_adapter.py --quick (SGMV decode vs HF PEFT)
    e2e             bench/bench_e2e.py: one QLoRA training step end to end, peftfast vs HF PEFT + bitsandbytes
    dora, moe, ...  every other bench/bench_*.py found (DoRA and MoE first), with --output-dir and, where offered,
                    --quick
    autotune cache  `peftfast info` again: the plans `auto` raced on this GPU, and any kernel that fell back

The folder gets at most 8 files (what a lent machine sends back): summary.md (the ratios, each step's status, the
environment), run.log (every step's output), results.tar.gz (every CSV and SVG, the autotune cache and the gate
comparison) and the main CSVs themselves.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what a lent machine sends back from $OUT
TIME_COLUMNS = ("median_ms", "step_ms_median")
RESERVE_S = 15  # kept for each later step, so one slow step can't starve the rest


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float
    needs: str | None = None  # a file the step needs; skipped (with the reason) when it is missing
    status: str = "not run"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _environment_lines(env: dict[str, str]) -> list[str]:
    probe = (
        "import torch, platform; print('python', platform.python_version()); print('torch', torch.__version__);"
        "print('cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available()"
        " else 'none');\nfor name in ('triton', 'transformers', 'peft', 'bitsandbytes'):\n    try:\n"
        "        module = __import__(name); print(name, module.__version__)\n    except Exception as error:\n"
        "        print(name, 'not available:', type(error).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    return (done.stdout + done.stderr).strip().splitlines()


def _default_output_dir() -> Path:
    # The benchmarks' own default (outside the checkout), read without importing peftfast before it is set up.
    named = os.environ.get("PEFTFAST_BENCH_DIR")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(named) if named else Path(cache) / "peftfast" / "bench"


def _git_sha() -> str:
    explicit = os.environ.get("PEFTFAST_GIT_SHA")
    if explicit:
        return explicit
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def _setup(site: Path, log: io.TextIOBase) -> list[str]:
    """peftfast as a plain folder on PYTHONPATH (kernels/ becomes peftfast/kernels, as setup.py installs it)."""
    notes = []
    if site.exists():
        shutil.rmtree(site)
    shutil.copytree(ROOT / "peftfast", site / "peftfast", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", site / "peftfast" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = sorted((ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    if wheels:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--target", str(site), *map(str, wheels)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
        log.write(done.stdout + done.stderr)
        notes.append(
            f"installed {len(wheels)} carried wheel(s): {', '.join(w.name for w in wheels)} (rc {done.returncode})"
        )
    else:
        notes.append("no .whl/ folder: bitsandbytes steps run only if it is installed")
    return notes


def _run(step: Step, env: dict[str, str], log: io.TextIOBase, deadline: float, later: int) -> None:
    """Run `step` within its own limit and its part of the budget (see below), recording status, time and log."""
    if step.needs and not (ROOT / step.needs).exists():
        step.status = f"skipped ({step.needs} not found)"
        return
    remaining = deadline - time.monotonic()
    # What is left after keeping a reserve for each later step, but never less than an equal share of what is left.
    part = max(remaining - RESERVE_S * later, remaining / (later + 1))
    if part < 5:
        step.status = "skipped (time budget spent)"
        return
    limit = min(step.limit_s, part)
    log.write(f"\n===== {step.name}: {' '.join(step.command)} (limit {limit:.0f} s)\n")
    log.flush()
    start = time.monotonic()
    process = subprocess.Popen(
        step.command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=limit)
        step.status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        step.status = f"timed out after {limit:.0f} s"
    step.seconds = time.monotonic() - start
    log.write(output or "")
    log.write(f"===== {step.name}: {step.status} in {step.seconds:.0f} s\n")
    log.flush()


@dataclass
class Table:
    """A results CSV read as cases: the columns that make a case, each case's time per provider, the baseline."""

    case_columns: list[str]
    providers: list[str]
    baseline: str
    cases: dict[tuple[str, ...], dict[str, float]]

    def speedups(self, times: dict[str, float]) -> dict[str, float]:
        """baseline time / provider time, for every provider but the baseline and the bare GEMM."""
        base = times.get(self.baseline)
        skip = (self.baseline, "gemm")
        return {p: base / t for p, t in times.items() if p not in skip and base and t > 0}


def read_table(path: Path) -> Table | None:
    """Any CSV with a `provider` and a time column (median_ms, step_ms_median); None otherwise. The baseline is
    HF PEFT where it was measured, else the first provider."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or "provider" not in rows[0]:
        return None
    time_column = next((c for c in TIME_COLUMNS if c in rows[0]), None)
    if time_column is None:
        return None
    skip = {"provider", time_column, "date", "git_sha", "git_dirty", "gpu", "torch", "triton", "peft", "peftfast"}
    skip |= {c for c in rows[0] if c.endswith(("_ms", "_p20", "_p80", "tflops", "gbps", "_mib", "_mb", "per_s"))}
    # adapter_dtype is empty for the bare GEMM's rows: a property of the provider, not of the case.
    skip |= {"cpu_threads", "bitsandbytes", "adapter_dtype"}
    case_columns = [c for c in rows[0] if c not in skip]
    cases: dict[tuple[str, ...], dict[str, float]] = {}
    for row in rows:
        try:
            cases.setdefault(tuple(row[c] for c in case_columns), {})[row["provider"]] = float(row[time_column])
        except (KeyError, ValueError):
            continue
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    baseline = "hf_peft" if "hf_peft" in providers else providers[0]
    return Table(case_columns, providers, baseline, cases)


def ratio_lines(table: Table) -> list[str]:
    """The markdown table of `table`: each case, every provider's time, speedups over the baseline and, where the
    bare GEMM was timed, each provider's time over it."""
    gemm = "gemm" in table.providers
    header = [*table.case_columns, *(f"{p} ms" for p in table.providers), f"speedup over {table.baseline}"]
    header += ["time over gemm"] if gemm else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, times in table.cases.items():
        cells = [*case, *(f"{times[p]:.4g}" if p in times else "-" for p in table.providers)]
        speedups = table.speedups(times)
        cells.append(", ".join(f"{p} {v:.2f}x" for p, v in speedups.items()) or "-")
        if gemm:
            base = times.get("gemm")
            cells.append(", ".join(f"{p} {t / base:.2f}" for p, t in times.items() if p != "gemm" and base) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speedup_svg(path: Path, table: Table, title: str) -> None:
    """A bar chart of every case's speedups over the baseline (one bar per case and provider)."""
    bars = []
    for case, times in table.cases.items():
        label = " ".join(f"{c}={v}" for c, v in zip(table.case_columns, case) if v and c != "op")
        bars += [(f"{label} {p}", value) for p, value in table.speedups(times).items()]
    if not bars:
        return
    width, bar_h, label_w = 420, 14, 520
    largest = max([value for _, value in bars] + [1.0])
    height = 40 + bar_h * len(bars)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 60}" height="{height}" '
        'font-family="sans-serif" font-size="10">',
        f'<text x="4" y="14" font-size="12">{title}: speedup over {table.baseline} (dashed line: 1.0)</text>',
    ]
    for i, (label, value) in enumerate(bars):
        y = 24 + i * bar_h
        w = value / largest * width
        parts.append(f'<text x="{label_w - 4}" y="{y + 10}" text-anchor="end">{label}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 3}" fill="#1b9e77"/>')
        parts.append(f'<text x="{label_w + w + 3:.1f}" y="{y + 10}">{value:.2f}</text>')
    one = label_w + width / largest
    parts.append(
        f'<line x1="{one:.1f}" y1="20" x2="{one:.1f}" y2="{height - 16}" stroke="black" stroke-dasharray="3,3"/>'
    )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# The benchmarks the steps above run with arguments of their own; every other bench/bench_*.py is found and run.
_NAMED_BENCHMARKS = {"bench_lora_linear.py", "bench_nf4.py", "bench_multi_adapter.py", "bench_e2e.py"}
# DoRA and MoE first (the benchmarks issue 13 adds), then the others by name.
_FIRST = ("bench_dora.py", "bench_moe.py")


def _other_benchmarks(python: str, results: Path) -> list[Step]:
    """A step for each further benchmark script: `--output-dir` (every benchmark takes it), and `--quick` where the
    script offers it."""
    found = [p for p in (ROOT / "bench").glob("bench_*.py") if p.name not in _NAMED_BENCHMARKS]
    found.sort(key=lambda p: (_FIRST.index(p.name) if p.name in _FIRST else len(_FIRST), p.name))
    steps = []
    for path in found:
        command = [python, f"bench/{path.name}", "--output-dir", str(results)]
        if '"--quick"' in path.read_text():
            command.append("--quick")
        steps.append(Step(path.stem.removeprefix("bench_"), command, 45, needs=f"bench/{path.name}"))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: $OUT, else the benchmarks' default folder)"
    )
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together (default 450)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peftfast-gpu-run"), help="scratch folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else _default_output_dir() / f"gpu-run-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work
    results = work / "results"
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    site = work / "site"
    log = (work / "run.log").open("w")

    setup_notes = _setup(site, log)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
        PEFTFAST_CACHE_DIR=str(results / "autotune"),
        PEFTFAST_BENCH_DIR=str(results),
        PEFTFAST_GIT_SHA=_git_sha(),
        TOKENIZERS_PARALLELISM="false",
    )
    # -P: the checkout's own folders (peftfast/ without its kernels, kernels/ as a top-level package) must not shadow
    # the copy set up on PYTHONPATH.
    py = sys.executable
    # Every test file of a kernel (the ones other methods add too), the autotune races, QLoRA, DoRA and MoE layers.
    kernel_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*kernel*.py"))
    kernel_tests += [
        f"tests/{name}"
        for name in (
            "test_autotune.py",
            "test_dora_auto.py",
            "test_qlora.py",
            "test_dora.py",
            "test_target_parameters.py",
        )
        if (ROOT / "tests" / name).exists()
    ]
    pytest = [py, "-P", "-m", "pytest", "-q", "--maxfail=20", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        # Most of a kernel test's time on a GPU is Triton compiling its variants: 8 processes compile in parallel.
        pytest += ["-n", "8"]
    steps = [
        Step("info", [py, "-P", "-m", "peftfast.cli", "info"], 60),
        Step("gpu-marked tests", [*pytest, "-m", "gpu", "tests"], 90),
        Step("kernel tests", [*pytest, "-m", "not cpu_kernels and not gpu", *kernel_tests], 120),
        Step(
            "kernels vs gate",
            [py, "-P", "-m", "peftfast.compile_gate", "--on-gpu", str(results / "gate_vs_gpu.csv")],
            90,
        ),
        Step(
            "lora_linear",
            [
                py,
                "-P",
                "-m",
                "peftfast.cli",
                "bench",
                "--output-dir",
                str(results),
                "--shapes",
                "4096x4096",
                "4096x14336",
                "14336x4096",
                "--tokens",
                "2048",
                "8192",
                "--ranks",
                "16",
                "64",
            ],
            100,
        ),
        Step("nf4", [py, "bench/bench_nf4.py", "--quick", "--output-dir", str(results)], 60),
        Step("multi-adapter", [py, "bench/bench_multi_adapter.py", "--quick", "--output-dir", str(results)], 60),
        Step(
            "e2e",
            [
                py,
                "bench/bench_e2e.py",
                "--size",
                "small",
                "--seq-len",
                "512",
                "--batch-size",
                "4",
                "--steps",
                "5",
                "--warmup",
                "2",
                "--output-dir",
                str(results),
            ],
            90,
        ),
        *_other_benchmarks(py, results),
        Step("autotune cache", [py, "-P", "-m", "peftfast.cli", "info"], 30),
    ]
    for index, step in enumerate(steps):
        later = sum(1 for s in steps[index + 1 :] if not s.needs or (ROOT / s.needs).exists())
        try:
            _run(step, env, log, deadline, later)
        except Exception as error:  # the runner itself must survive anything a step does
            step.status = f"runner error: {type(error).__name__}: {error}"
    log.close()

    environment = _environment_lines(env)
    csvs = sorted(results.glob("*.csv"))
    tables = {}
    for path in csvs:
        try:
            tables[path] = read_table(path)
            if tables[path] is not None:
                speedup_svg(results / f"{path.stem}-speedup.svg", tables[path], path.stem)
        except Exception as error:
            setup_notes.append(f"{path.name} could not be summarised: {type(error).__name__}: {error}")
    summary = [
        f"# peftfast on a GPU: {stamp}",
        "",
        f"git {env['PEFTFAST_GIT_SHA']}",
        "",
        "```",
        *environment,
        "```",
        "",
    ]
    summary += ["## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    summary += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]
    summary += ["", *[f"- {note}" for note in setup_notes], ""]
    for path, table in tables.items():
        if table is not None:
            summary += [f"## {path.name}", "", *ratio_lines(table), ""]
    (work / "summary.md").write_text("\n".join(summary) + "\n")

    with tarfile.open(work / "results.tar.gz", "w:gz") as archive:
        archive.add(results, arcname="results")
        archive.add(work / "summary.md", arcname="summary.md")
    chosen = [work / "summary.md", work / "run.log", work / "results.tar.gz"]
    chosen += [p for p in csvs if p.stat().st_size < 16 * 2**20][: MAX_FILES - len(chosen)]
    for path in chosen:
        shutil.copy(path, out / path.name)
    print((work / "summary.md").read_text())
    print(f"results in {out} ({time.monotonic() - started:.0f} s)")
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
