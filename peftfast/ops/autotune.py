"""Why `auto` never loses to the reference, and never crashes on a GPU nobody has tested: plans raced once per GPU,
and kernel failures turned into a fallback.

Where more than one plan computes an op (the fused kernels, or the composition of cuBLAS for the base GEMM with
peftfast's small LoRA kernels), `choose` times each once per op and shape class on the GPU at hand, keeps the
fastest, and remembers it in memory and in a JSON file per GPU name, torch, triton and peftfast version (under
PEFTFAST_CACHE_DIR, default ~/.cache/peftfast). Later calls, and later processes on the same GPU, reuse the winner.
PEFTFAST_AUTOTUNE=0 turns the race and the file off: `auto` then runs the composition, the plan that is the
reference's own GEMM plus kernels that only shorten its LoRA term. Nothing is timed while a CUDA graph is being
captured (the default plan runs instead, uncached).

A kernel that fails to compile or launch while `auto` runs it (out of shared memory, a Triton or ptxas error) makes
the op fall back to torch for that shape class: one warning naming the op and the error, the failure recorded
(memory and file, shown by `peftfast info`), and torch from then on for that op and shape. A backend asked for by
name never comes here: it runs what was asked, and raises.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from .dispatch import environment_is_set

SWITCH = "PEFTFAST_AUTOTUNE"
CACHE_DIR_VARIABLE = "PEFTFAST_CACHE_DIR"
# The plan `auto` runs where it does not time: cuBLAS for the base GEMM, peftfast's kernels for the LoRA term.
DEFAULT_PLAN = "composed"

Timer = Callable[[Callable[[], object]], float]


class KernelFailure(RuntimeError):
    """A kernel that could not be compiled or launched on this GPU (raised by tests to stand for one)."""


_switch_values: dict[Any, bool] = {}


def enabled() -> bool:
    """Whether `auto` races plans (PEFTFAST_AUTOTUNE unset or anything but "0")."""
    raw = environment_is_set(SWITCH)
    if raw is None:
        return True
    value = _switch_values.get(raw)
    if value is None:
        value = _switch_values[raw] = os.environ.get(SWITCH, "1").strip() != "0"
    return value


# Bumped by every change to what `choose` and `failed` would answer (a winner stored, a failure recorded, the caches
# reset, another timer): callers that remember a settled plan key it on `state()`.
_generation = 0


def _changed() -> None:
    global _generation
    _generation += 1


def state() -> tuple[int, bool]:
    """Changes whenever a plan `choose` or `failed` settled on might change: (generation, autotuning switch)."""
    return _generation, enabled()


def cache_dir() -> Path:
    """PEFTFAST_CACHE_DIR, else $XDG_CACHE_HOME/peftfast, else ~/.cache/peftfast."""
    explicit = os.environ.get(CACHE_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftfast"


def _version(package: str) -> str:
    try:
        module = __import__(package)
    except ImportError:
        return "none"
    return str(getattr(module, "__version__", "unknown"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def environment(device: torch.device) -> dict[str, str]:
    """What a cached winner is only valid for."""
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peftfast": __version__,
    }


def cache_path(device: torch.device) -> Path:
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9.+]+", "-", "_".join(env.values())).strip("-").lower()
    return cache_dir() / f"autotune-{slug}.json"


class PlanCache:
    """Winners and failures of one GPU/torch/triton/peftfast combination, mirrored to a JSON file."""

    def __init__(self, path: Path, env: dict[str, str], persistent: bool) -> None:
        self.path = path
        self.environment = env
        self.persistent = persistent
        self.winners: dict[str, dict[str, dict[str, Any]]] = {}
        self.failures: dict[str, dict[str, str]] = {}
        if persistent:
            self._merge(self._read())

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("environment") == self.environment else {}

    def _merge(self, data: dict[str, Any]) -> None:
        for op, entries in data.get("winners", {}).items():
            self.winners.setdefault(op, {}).update(entries)
        for op, entries in data.get("failures", {}).items():
            self.failures.setdefault(op, {}).update(entries)

    def save(self) -> None:
        """Write the file (merged with what other processes wrote since it was read), atomically."""
        if not self.persistent:
            return
        self._merge(self._read())
        data = {"environment": self.environment, "winners": self.winners, "failures": self.failures}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                json.dump(data, file, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except OSError as error:
            warnings.warn(f"peftfast could not write its autotune cache {self.path}: {error}", stacklevel=3)
            self.persistent = False

    def winner(self, op: str, key: str) -> str | None:
        entry = self.winners.get(op, {}).get(key)
        return entry["winner"] if entry else None

    def failure(self, op: str, key: str) -> str | None:
        return self.failures.get(op, {}).get(key)


_lock = threading.Lock()
_caches: dict[tuple[str, int | None, bool], PlanCache] = {}
_warned: set[str] = set()
_timer: Timer | None = None


def plan_cache(device: torch.device) -> PlanCache:
    """The cache of `device` (one per process and device; read from disk when autotuning is on)."""
    persistent = enabled()
    key = (device.type, device.index, persistent)
    cache = _caches.get(key)
    if cache is None:
        with _lock:
            cache = _caches.get(key)
            if cache is None:
                cache = _caches[key] = PlanCache(cache_path(device), environment(device), persistent)
    return cache


def reset() -> None:
    """Forget every cache read in this process (tests; the files stay)."""
    with _lock:
        _caches.clear()
        _warned.clear()
        _changed()


def set_timer(timer: Timer | None) -> None:
    """Time plans with `timer(fn) -> milliseconds` instead of `triton.testing.do_bench` (None: back to it)."""
    global _timer
    _timer = timer
    _changed()


def _do_bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    # Short runs: a race is paid once per op and shape class, and plans that tie within noise are equally good.
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def is_kernel_failure(error: BaseException) -> bool:
    """Whether `error` says a kernel could not be built or launched here (as opposed to a bug or bad input)."""
    if isinstance(error, KernelFailure):
        return True
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return False
    failures: tuple[type[BaseException], ...] = (CompilationError, OutOfResources)
    try:
        from triton.runtime.errors import PTXASError

        failures += (PTXASError,)
    except ImportError:
        pass
    if isinstance(error, failures):
        return True
    # Launch errors reach Python as RuntimeErrors from Triton's CUDA launcher.
    return isinstance(error, RuntimeError) and str(error).startswith("Triton Error")


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def record_failure(op: str, key: str, error: BaseException, device: torch.device, plan: str | None = None) -> None:
    """Remember that `op` (or one `plan` of it) failed on this shape class, and warn once per op/plan and process."""
    cache = plan_cache(device)
    name = op if plan is None else f"{op} ({plan})"
    with _lock:
        cache.failures.setdefault(name, {})[key] = _describe(error)
        _changed()
    cache.save()
    where = cache.path if cache.persistent else "memory"
    if plan is None:
        consequence = f"backend 'auto' runs {op!r} on torch for that shape from now on"
    else:
        consequence = f"plan {plan!r} drops out of the race and 'auto' runs another one"
    _warn_once(
        name,
        f"peftfast: the Triton kernels of {name!r} failed on {device_name(device)} for shape class {key} "
        f"({_describe(error)}); {consequence} (recorded in {where}). Ask for backend 'triton' by name to see "
        "the error.",
    )


def failed(op: str, key: str, device: torch.device) -> bool:
    """Whether `op` is known to fail on this shape class here (warns once if the record comes from an earlier run)."""
    cache = plan_cache(device)
    reason = cache.failure(op, key)
    if reason is None:
        return False
    _warn_once(
        op,
        f"peftfast: {op!r} runs on torch for shape class {key}: its Triton kernels failed on "
        f"{device_name(device)} before ({reason}); delete {cache.path} to try them again.",
    )
    return True


def _warn_once(op: str, message: str) -> None:
    if op not in _warned:
        _warned.add(op)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def choose(
    op: str, key: str, candidates: dict[str, Callable[[], object]], device: torch.device, default: str = DEFAULT_PLAN
) -> str:
    """The plan to run `op` with for shape class `key`: the cached winner, else (autotuning on, no graph capture) the
    fastest of `candidates` timed now on the call's own tensors, else `default`.

    A candidate whose kernels fail to compile or launch drops out of the race (and is recorded as failed for
    `op (plan)`); if every candidate fails, the last failure is raised for the caller to fall back on."""
    cache = plan_cache(device)
    known = cache.winner(op, key)
    if known in candidates:
        return known
    if not enabled() or _capturing(device) or len(candidates) == 1:
        return default if default in candidates else next(iter(candidates))
    timer = _timer or _do_bench
    times: dict[str, float] = {}
    last_error: BaseException | None = None
    for name, run in candidates.items():
        try:
            times[name] = timer(run)
        except Exception as error:
            if not is_kernel_failure(error):
                raise
            last_error = error
            times[name] = math.inf
            record_failure(op, key, error, device, plan=name)
    if last_error is not None and all(math.isinf(t) for t in times.values()):
        raise last_error
    winner = min(times, key=times.__getitem__)
    with _lock:
        cache.winners.setdefault(op, {})[key] = {
            "winner": winner,
            "ms": {name: (None if math.isinf(t) else round(t, 5)) for name, t in times.items()},
        }
        _changed()
    cache.save()
    return winner


def run_with_fallback(
    op: str, key: str, device: torch.device, kernels: Callable[[], Any], fallback: Callable[[], Any]
) -> Any:
    """`kernels()`, unless `op` is known to fail on this shape class or fails now with a kernel failure: then
    `fallback()` (torch), with the failure recorded. Only for `auto`: named backends call their kernels directly."""
    if failed(op, key, device):
        return fallback()
    try:
        return kernels()
    except Exception as error:
        if not is_kernel_failure(error):
            raise
        record_failure(op, key, error, device)
        return fallback()


def run_plan(
    plan: str,
    op: str,
    race: str,
    classify: Callable[..., tuple[str, str, torch.device]],
    kernels: Callable[..., Any],
    composed: Callable[..., Any],
    args: tuple,
) -> Any:
    """`kernels(*args)` for plan "fused", `composed(*args)` (torch) for "composed"; for "auto" the faster of both as
    raced under `race` for this shape class, torch where `op`'s kernels fail on it. `classify(*args)` gives (the shape
    class failures are recorded under, the key the race is timed under, the device); only "auto" computes it."""
    if plan == "fused":
        return kernels(*args)
    if plan == "composed":
        return composed(*args)
    key, race_key, device = classify(*args)
    candidates = {"fused": lambda: kernels(*args), "composed": lambda: composed(*args)}

    def chosen() -> Any:
        return candidates[choose(race, race_key, candidates, device)]()

    return run_with_fallback(op, key, device, chosen, candidates["composed"])


def size_class(n: int) -> int:
    """Sizes that share a plan: powers of two (the next one up)."""
    return 1 << max(0, n - 1).bit_length()


def describe() -> list[str]:
    """Lines for `peftfast info`: the switch, the cache folder and, per cache file there, its winners and failures."""
    lines = [f"autotune: {'on' if enabled() else f'off ({SWITCH}=0)'}; cache folder {cache_dir()}"]
    files = sorted(cache_dir().glob("autotune-*.json")) if cache_dir().is_dir() else []
    if not files:
        lines.append("  no cached plans yet (they are timed on a GPU at first use)")
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(f"  {path.name}: unreadable")
            continue
        env = data.get("environment", {})
        lines.append(
            f"  {path.name}: {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"peftfast {env.get('peftfast')}"
        )
        lines += _entry_lines(data.get("winners", {}), lambda e: f"{e['winner']} {_times(e.get('ms', {}))}")
        lines += _entry_lines(data.get("failures", {}), lambda e: f"torch (failed: {e})")
    return lines


def _times(ms: dict[str, float | None]) -> str:
    ordered = sorted(ms.items(), key=lambda item: math.inf if item[1] is None else item[1])
    return "(" + ", ".join(f"{name} {'failed' if t is None else f'{t:.3f} ms'}" for name, t in ordered) + ")"


def _entry_lines(table: dict[str, dict[str, Any]], text: Callable[[Any], str]) -> Iterable[str]:
    for op, entries in sorted(table.items()):
        for key, entry in sorted(entries.items()):
            yield f"    {op} {key}: {text(entry)}"
