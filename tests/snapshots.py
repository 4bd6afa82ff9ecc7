"""Records of everything a failed call must leave as it was, for tests of bad input.

`ModelSnapshot.of(model)`: every parameter and buffer (object identity, dtype, shape, device and a hash of its
bytes), the module tree (names, types, object identities), the adapters of every adapter layer and wrapper
(available, active, merged, disabled, per-adapter values such as `r` and `scaling`), the model's adapter configs and
active adapters, every `requires_grad` and train/eval flag, and the hooks on each module.
`FolderSnapshot.of(path)`: every file's bytes (hashed) and every symlink's target under a folder.

Compare with `==`, or call `assert_same(later)` to get the first differences named in the assertion message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _tensor_record(tensor: torch.Tensor) -> tuple:
    record = (id(tensor), str(tensor.dtype), tuple(tensor.shape), str(tensor.device))
    if tensor.device.type == "meta":
        return (*record, "meta")
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return (*record, hashlib.sha256(data.numpy().tobytes()).hexdigest())


def _adapter_record(module: nn.Module) -> tuple | None:
    if not hasattr(module, "_get_available_adapters") or not hasattr(module, "active_adapters"):
        return None
    per_adapter = {
        name: repr(sorted(getattr(module, name).items()))
        for name in getattr(module, "other_param_names", ())
        if isinstance(getattr(module, name, None), dict)
    }
    return (
        sorted(module._get_available_adapters()),
        list(module.active_adapters),
        list(module.merged_adapters),
        bool(module.disable_adapters),
        per_adapter,
    )


def _json_default(value: Any) -> Any:
    # Sets (target_modules) in a fixed order: two equal sets may iterate differently.
    return sorted(value, key=str) if isinstance(value, (set, frozenset)) else repr(value)


def _peft_record(model: nn.Module) -> Any:
    """The adapter configs and active adapters of a PeftModel (or of a model with adapters injected); None if none."""
    configs = getattr(model, "peft_config", None)
    if configs is None:
        return None
    record: dict[str, Any] = {
        "configs": {
            name: json.dumps(dataclasses.asdict(cfg), default=_json_default, sort_keys=True)
            for name, cfg in configs.items()
        }
    }
    for attribute in ("active_adapters", "targeted_module_names"):
        value = getattr(model, attribute, None)
        record[attribute] = list(value) if isinstance(value, (list, tuple)) else value
    return record


def _hooks(module: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    return sum(len(getattr(module, name, {})) for name in names)


def _first_differences(before: dict, after: dict, limit: int = 5) -> list[str]:
    keys = sorted(set(before) | set(after), key=str)
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in keys if before.get(key) != after.get(key)][
        :limit
    ]


@dataclass(frozen=True)
class ModelSnapshot:
    tensors: dict[str, tuple]
    modules: dict[str, tuple]
    adapters: dict[str, tuple]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    hooks: dict[str, int]
    peft: Any

    @classmethod
    def of(cls, model: nn.Module) -> ModelSnapshot:
        named_modules = list(model.named_modules(remove_duplicate=False))
        tensors = {name: _tensor_record(p) for name, p in model.named_parameters(remove_duplicate=False)}
        tensors.update({name: _tensor_record(b) for name, b in model.named_buffers(remove_duplicate=False)})
        return cls(
            tensors=tensors,
            modules={name: (f"{type(m).__module__}.{type(m).__qualname__}", id(m)) for name, m in named_modules},
            adapters={name: record for name, m in named_modules if (record := _adapter_record(m)) is not None},
            requires_grad={name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)},
            training={name: m.training for name, m in named_modules},
            hooks={name: _hooks(m) for name, m in named_modules},
            peft=_peft_record(model),
        )

    def assert_same(self, model_or_snapshot: nn.Module | ModelSnapshot) -> None:
        """Assert that the model (or a later snapshot) equals this snapshot; the message names what changed."""
        later = (
            model_or_snapshot if isinstance(model_or_snapshot, ModelSnapshot) else ModelSnapshot.of(model_or_snapshot)
        )
        problems = []
        for field in dataclasses.fields(self):
            before, after = getattr(self, field.name), getattr(later, field.name)
            if before != after:
                details = _first_differences(before, after) if isinstance(before, dict) else [f"{before} -> {after}"]
                problems.append(f"{field.name} changed: {details}")
        assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class FolderSnapshot:
    entries: dict[str, str]

    @classmethod
    def of(cls, folder: str | os.PathLike) -> FolderSnapshot:
        entries = {}
        # Links are recorded as links, never followed: a folder holding one to elsewhere is not walked there.
        for directory, subdirectories, files in os.walk(folder, followlinks=False):
            for name in subdirectories + files:
                path = Path(directory, name)
                relative = str(path.relative_to(folder))
                if path.is_symlink():
                    entries[relative] = f"link -> {os.readlink(path)}"
                elif path.is_dir():
                    entries[relative] = "dir"
                else:
                    entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(entries)

    def assert_same(self, folder: str | os.PathLike) -> None:
        later = FolderSnapshot.of(folder)
        assert later == self, f"files changed under {folder}: {_first_differences(self.entries, later.entries)}"
