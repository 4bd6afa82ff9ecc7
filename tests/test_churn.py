"""Churn: the same operations repeated 200 times keep time and memory flat.

Each test runs its cycle 200 times in one process and compares late cycles with early ones (after a warm-up that
fills caches and optimizer state): live tensors and Python objects counted by the garbage collector (a leak of one
tensor or a few objects per cycle fails), resident memory, and the fastest of 20 late cycles against the fastest of
20 early ones. Time is the CPU time of the test's thread, not wall time, and a minimum, not a mean, so that other
processes on a shared machine don't make it flaky. Growth means state kept per call: hooks not removed, per-call
caches, adapters not freed, autograd graphs kept alive.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import pytest
import torch
from models import MLP, tiny_llama
from tolerances import assert_close

from peftfast import LoraConfig, PeftModel, get_peft_model

CYCLES = 200
WARM_UP = 20
WINDOW = 20
# A leak of one tensor every 10 cycles (18 over the 180 measured) would fail; the allowance absorbs caches of a few
# tensors that fill once (e.g. the first time some code path runs late).
TENSOR_GROWTH = 8
# Python objects: interpreter-level caches (regex, warnings registries) move by a few dozen at most (measured: -16
# to 0); a leak of one small object per cycle (180) fails.
OBJECT_GROWTH = 100
RSS_GROWTH_BYTES = 32 * 2**20
# Late cycles may take at most this many times the CPU time of early ones, plus an allowance for timer and cache
# noise: generous, and still far below what per-cycle state that is scanned or copied on every call adds up to after
# 180 cycles.
TIME_FACTOR = 3.0
TIME_SLACK_S = 1e-3


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: a second intra-op thread gains nothing and, on a busy machine, makes every op wait for
    # it (one tiny-Llama generate call below: 40-50 ms with 2 threads, 8-9 ms with 1, at load 2 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _census() -> dict[str, int | None]:
    gc.collect()
    objects = gc.get_objects()
    # By type, not isinstance: some module-level proxies warn when their __class__ is read.
    tensors = sum(issubclass(type(obj), torch.Tensor) for obj in objects)
    return {"tensors": tensors, "objects": len(objects), "rss": _rss_bytes()}


def _run_cycles(cycle: Callable[[int], None]) -> None:
    """Run `cycle(i)` CYCLES times; assert that late cycles hold no more tensors, objects and memory, and take no
    longer, than early ones."""
    durations = []
    early = None
    for i in range(CYCLES):
        if i == WARM_UP:
            early = _census()
        start = time.thread_time()
        cycle(i)
        durations.append(time.thread_time() - start)
    late = _census()
    assert late["tensors"] - early["tensors"] <= TENSOR_GROWTH, (early, late)
    assert late["objects"] - early["objects"] <= OBJECT_GROWTH, (early, late)
    if early["rss"] is not None:
        assert late["rss"] - early["rss"] <= RSS_GROWTH_BYTES, (early, late)
    early_time = min(durations[WARM_UP : WARM_UP + WINDOW])
    late_time = min(durations[-WINDOW:])
    assert late_time <= TIME_FACTOR * early_time + TIME_SLACK_S, (early_time, late_time)


def _x() -> torch.Tensor:
    return torch.randn(4, 11, generator=torch.Generator().manual_seed(0))


def test_load_adapter_and_delete_adapter(tmp_path):
    torch.manual_seed(0)
    for name, targets in (("base", ["lin0"]), ("other", ["lin0", "lin1"])):
        get_peft_model(MLP(), LoraConfig(target_modules=targets, init_lora_weights=False)).save_pretrained(
            tmp_path / name
        )
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(MLP(), tmp_path / "base").eval()
    model.load_adapter(tmp_path / "other", adapter_name="other")
    model.set_adapter("other")
    expected = model(_x())
    model.set_adapter("default")
    model.delete_adapter("other")

    def cycle(i: int) -> None:
        model.load_adapter(tmp_path / "other", adapter_name="other")
        if i % 50 == 0:
            model.set_adapter("other")
            assert_close(model(_x()), expected)
            model.set_adapter("default")
        model.delete_adapter("other")

    _run_cycles(cycle)
    assert list(model.peft_config) == ["default"]


def test_mixed_adapter_generate_alternating_adapter_sets():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for name, rank in (("a", 4), ("b", 2)):
        model.add_adapter(name, LoraConfig(r=rank, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    model.eval()
    input_ids = torch.randint(3, 101, (3, 5), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pad_token_id": 0}
    adapter_sets = [["default", "a", "__base__"], ["b", "b", "default"], ["__base__", "a", "b"]]
    first_outputs = {}

    def cycle(i: int) -> None:
        names = adapter_sets[i % len(adapter_sets)]
        output = model.generate(**inputs, adapter_names=names, max_new_tokens=2, do_sample=False)
        # The same set gives the same tokens on every round: nothing stale from the sets run in between.
        assert torch.equal(output, first_outputs.setdefault(i % len(adapter_sets), output))

    _run_cycles(cycle)
    assert not [name for name, module in model.named_modules() if module._forward_pre_hooks]


@pytest.mark.parametrize("flip", ["set_adapter", "disable_adapter"])
def test_adapter_flips_between_training_steps(flip):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["lin2"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["lin2"]))
    model.train()
    trainable = {name: [n for n, p in model.named_parameters() if f".{name}." in n] for name in ("default", "other")}
    adapter_params = [p for n, p in model.named_parameters() if n in trainable["default"] + trainable["other"]]
    optimizer = torch.optim.AdamW(adapter_params, lr=1e-3)
    x, target = _x(), torch.randn(4, 5, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def cycle(i: int) -> None:
        active = ("default", "other")[i % 2]
        model.set_adapter(active)
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(trainable[active])
        if flip == "disable_adapter":
            with model.disable_adapter(), torch.no_grad():
                model(x)
        step()

    _run_cycles(cycle)
    assert len(optimizer.state) == sum(len(names) for names in trainable.values())
