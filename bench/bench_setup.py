"""Setup costs against HF PEFT, on CPU: how `load_adapter` time grows with the number of adapters loaded, and
`get_peft_model` on a 64-layer model.

load suite: a Llama-shaped model (random weights, `--layers` layers, hidden `--hidden`) with LoRA r=8 on every linear
layer; one adapter saved by `save_pretrained`, then loaded `--adapters` times under new names, each library in a
process of its own (so that neither's garbage collections scan the other's objects). Reported per library: the
median time of loads 1-5 and of the last 5, their ratio (1.0 = flat), and the Python function calls of the first and
the last load (counted with sys.setprofile on extra loads: a count does not depend on the machine).

get_peft_model suite: a 64-layer Llama-shaped model, LoRA on the default targets (q_proj, v_proj) and on all linear
layers; each repeat wraps a fresh copy of the same base model (the copy is not timed), the two libraries in turns;
the median and the ratio peftfast / HF PEFT.

    python bench/bench_setup.py                       # both suites
    python bench/bench_setup.py --suite load --adapters 100
    python bench/bench_setup.py --quick               # a smoke run

Times are CPU time of the benchmark's thread (`time.thread_time`, garbage collection included), not wall time, so
that other processes on a shared machine don't move them. Rows are appended to <output-dir>/setup-cpu.csv with the
versions and git commit.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from peftfast.bench import ENVIRONMENT_COLUMNS, add_output_dir_argument, append_csv, environment

COLUMNS = ENVIRONMENT_COLUMNS + ("suite", "library", "case", "value", "unit")
LIBRARIES = ("peftfast", "peft")


def _llama(layers: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def _library(name: str):
    if name == "peft":
        import peft

        return peft
    import peftfast

    return peftfast


def count_calls(fn) -> int:
    """Python and C function calls made by `fn()`."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def load_times(library: str, adapters: int, layers: int, hidden: int) -> dict:
    """In this process: save one adapter, then load it `adapters` times into a PeftModel of `library`; the CPU time
    of each load (ms) and the Python calls of the first and the last (made on extra loads, deleted after)."""
    lib = _library(library)
    with tempfile.TemporaryDirectory() as folder:
        saved = lib.get_peft_model(
            _llama(layers, hidden), lib.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)
        )
        saved.save_pretrained(folder)
        model = lib.PeftModel.from_pretrained(_llama(layers, hidden), folder)
        times, calls = [], []
        for index in range(adapters):
            start = time.thread_time()
            model.load_adapter(folder, adapter_name=f"a{index}")
            times.append((time.thread_time() - start) * 1e3)
            if index in (0, adapters - 1):
                calls.append(count_calls(lambda: model.load_adapter(folder, adapter_name="probe")))
                model.delete_adapter("probe")
    return {"times": times, "calls": calls}


def run_load_suite(args: argparse.Namespace, env: dict) -> list[dict]:
    # One child process per library: the libraries' adapters would otherwise share one heap, and a garbage
    # collection scanning HF PEFT's growing state would be paid by peftfast's loads too.
    results = {}
    for name in LIBRARIES:
        command = [
            sys.executable,
            __file__,
            "--child-load",
            name,
            str(args.adapters),
            str(args.layers),
            str(args.hidden),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = []
    window = min(5, args.adapters)
    case = f"llama-{args.layers}x{args.hidden} all-linear r=8, {args.adapters} adapters"
    for name in LIBRARIES:
        times, calls = results[name]["times"], results[name]["calls"]
        for index in range(9, args.adapters, 10):
            print(f"{name:>8} load {index + 1:>4}: {times[index]:8.1f} ms")
        early, late = statistics.median(times[:window]), statistics.median(times[-window:])
        values = {
            "first_loads_median_ms": (early, "ms"),
            "last_loads_median_ms": (late, "ms"),
            "last_over_first": (late / early, "ratio"),
            "first_load_calls": (calls[0], "calls"),
            "last_load_calls": (calls[-1], "calls"),
        }
        for metric, (value, unit) in values.items():
            rows.append(
                {
                    **env,
                    "suite": "load",
                    "library": name,
                    "case": f"{case}: {metric}",
                    "value": f"{value:.4g}",
                    "unit": unit,
                }
            )
        print(
            f"{name:>8}: loads 1-{window} {early:.1f} ms, loads {args.adapters - window + 1}-{args.adapters} "
            f"{late:.1f} ms ({late / early:.2f}x); Python calls per load {calls[0]} -> {calls[-1]}"
        )
    return rows


def run_get_peft_model_suite(args: argparse.Namespace, env: dict) -> list[dict]:
    rows = []
    base = _llama(64, args.hidden)
    for targets in (None, "all-linear"):
        times: dict[str, list[float]] = {name: [] for name in LIBRARIES}
        for _ in range(args.repeats):
            for name in LIBRARIES:
                lib = _library(name)
                model = copy.deepcopy(base)
                config = lib.LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM")
                # The previous repeat's garbage is collected first, so that neither library pays for the other's.
                gc.collect()
                start = time.thread_time()
                lib.get_peft_model(model, config)
                times[name].append((time.thread_time() - start) * 1e3)
                del model
        medians = {name: statistics.median(values) for name, values in times.items()}
        case = f"llama-64x{args.hidden} {targets or 'default targets'} r=8"
        for name, value in medians.items():
            rows.append(
                {**env, "suite": "get_peft_model", "library": name, "case": case, "value": f"{value:.4g}", "unit": "ms"}
            )
        ratio = medians["peftfast"] / medians["peft"]
        rows.append(
            {
                **env,
                "suite": "get_peft_model",
                "library": "peftfast/peft",
                "case": case,
                "value": f"{ratio:.3f}",
                "unit": "ratio",
            }
        )
        print(
            f"get_peft_model {case}: peftfast {medians['peftfast']:.1f} ms, "
            f"peft {medians['peft']:.1f} ms ({ratio:.2f}x)"
        )
    return rows


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--child-load":
        library, adapters, layers, hidden = sys.argv[2], *map(int, sys.argv[3:])
        print(json.dumps(load_times(library, adapters, layers, hidden)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("load", "get_peft_model", "all"), default="all")
    parser.add_argument("--adapters", type=int, default=100, help="adapters loaded one after the other (load suite)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the load suite's model")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of both suites' models")
    parser.add_argument("--repeats", type=int, default=9, help="get_peft_model calls per library and case")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="10 adapters, 3 repeats")
    add_output_dir_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.repeats = 10, 3
    torch.set_num_threads(args.threads)
    env = asdict(environment(torch.device("cpu")))
    rows = []
    if args.suite in ("load", "all"):
        rows += run_load_suite(args, env)
    if args.suite in ("get_peft_model", "all"):
        rows += run_get_peft_model_suite(args, env)
    path = append_csv(Path(args.output_dir) / "setup-cpu.csv", rows, COLUMNS)
    print(f"{len(rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
