"""EVA, Explained Variance Adaptation (https://arxiv.org/abs/2410.07170): lora_A from the top right-singular vectors
of each layer's inputs, with ranks redistributed across layers by explained variance.

`get_peft_model(model, LoraConfig(init_lora_weights="eva", ...), low_cpu_mem_usage=True)` makes the adapter with
B = 0, then `initialize_lora_eva_weights(peft_model, dataloader)` runs batches through the base model (adapters
off), fits an incremental PCA to each target layer's inputs until its top components stop moving (cosine
similarity >= `EvaConfig.tau`), gives the `sum(r)` budget of ranks to the components that explain the most variance
(at most `r * rho` per layer), and sets A to them; a layer that gets rank 0 loses its LoRA layer.

Same algorithm and numerics as HF PEFT 0.21.2 (its randomized SVD is seeded, so results match), with one faster
step: layers that receive the same input (q/k/v projections) are found by a digest of the input's bytes instead of
hashing a Python tuple of every value.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from itertools import cycle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..tuners_utils import check_target_module_exists
from .config import LoraConfig
from .init import is_conv1d
from .layer import Linear, LoraLayer
from .model import get_pattern_key

# As HF PEFT: from this many target modules on, the saved target_modules is condensed to the shortest suffixes.
_MIN_TARGET_MODULES_FOR_CONDENSING = 20
_LOWRANK_SEED = 42


class _IncrementalPCA:
    """scikit-learn's incremental PCA (Ross et al. 2008) on torch tensors, one `partial_fit(batch)` at a time, with a
    randomized SVD of `2 * n_components` columns and 4 subspace iterations under a fixed seed (HF PEFT's EVA setup).

    After each batch: `components_ [k, d]`, `singular_values_ [k]`, `explained_variance_ratio_ [k]`."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.q = 2 * n_components
        self.components_: torch.Tensor | None = None

    @staticmethod
    def _updated_moments(
        X: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean and variance (fp64) of all samples so far, merging the batch's with the running ones (Chan et al.)."""
        batch_count = torch.tensor([X.shape[0]], device=X.device)
        total = count + batch_count
        old_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if mean is None else mean * count
        batch_sum = X.sum(dim=0, dtype=torch.float64)
        centred = X - batch_sum / batch_count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        batch_scatter = centred.square_().sum(dim=0, dtype=torch.float64) - correction / batch_count
        if var is None:
            return (old_sum + batch_sum) / total, batch_scatter / total, total
        ratio = count.double() / batch_count
        scatter = var * count + batch_scatter + ratio / total * (old_sum / ratio - batch_sum).square()
        return (old_sum + batch_sum) / total, scatter / total, total

    def partial_fit(self, X: torch.Tensor) -> None:
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise ValueError(
                f"EVA asks for {self.n_components} components of {n_features}-dimensional layer inputs; lower r or rho."
            )
        if self.n_components > n_samples:
            raise ValueError(f"EVA needs at least {self.n_components} samples per batch, got {n_samples}.")
        X = X.clone() if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)
        first = self.components_ is None
        if first:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
        mean, var, total = self._updated_moments(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            shift = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples) * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X, shift))
        with torch.random.fork_rng():
            torch.manual_seed(_LOWRANK_SEED)
            _, S, V = torch.svd_lowrank(X, q=self.q, niter=4)
        Vt = V.mH
        # Deterministic signs: each component's largest-magnitude entry is positive.
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])
        Vt *= signs.view(-1, 1)
        self.n_samples_seen_ = total
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * total))[: self.n_components]


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(
        f"EVA can't read the input of layer {layer_name!r} (a {type(layer_input).__name__}); pass a "
        "prepare_layer_inputs_fn that returns a 2-D tensor."
    )


def _prepare_layer_inputs_default(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor], peft_config: LoraConfig):
    """The (batch, position) indices of the tokens EVA uses: attended ones, and, with `use_label_mask`, those whose
    label is not `label_mask_value`."""
    if not isinstance(model_input, Mapping):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs the model inputs as a dict of tensors.")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str):
    """The layer input at the token indices from `prepare_model_inputs_fn_language_modeling`: [tokens, features]."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**inputs)


class _LayerInputs:
    """A forward hook's view of one layer's inputs: prepared (`prepare_layer_inputs_fn`) and, under
    torch.distributed, gathered from every process."""

    def __init__(self, name: str, prepare: Callable | None, gather_distributed: bool) -> None:
        self.name = name
        self.prepare = prepare or _prepare_layer_inputs_default
        self.gather_distributed = gather_distributed
        self.model_input: Any = None

    @torch.no_grad()
    def __call__(self, layer_input: Any) -> torch.Tensor:
        states = self.prepare(layer_input, self.model_input, self.name)
        if not (dist.is_initialized() and self.gather_distributed):
            return states
        sizes = torch.empty(dist.get_world_size(), dtype=torch.long, device=states.device)
        dist.all_gather_into_tensor(sizes, torch.tensor([states.shape[0]], device=states.device))
        sizes = sizes.tolist()
        padded = states.new_zeros((max(sizes), *states.shape[1:]))
        padded[: states.shape[0]] = states
        gathered = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)], dim=0)


class _DigestHook:
    """Records a digest of a layer's (prepared) input, to find layers that see identical inputs."""

    def __init__(self, inputs: _LayerInputs) -> None:
        self.inputs = inputs
        self.digest: tuple | None = None

    def __call__(self, module: nn.Module, layer_input: Any, output: Any) -> None:
        states = self.inputs(layer_input)
        # + 0.0 turns -0.0 into 0.0, so the digest tells equal values apart from unequal ones only.
        data = (states.detach() + 0.0).contiguous().cpu()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
        self.digest = (tuple(states.shape), str(states.dtype), digest)


class _SVDHook:
    """Fits the incremental PCA of a layer's inputs, one batch per forward, and tracks which components converged."""

    def __init__(self, inputs: _LayerInputs, n_components: int, tau: float) -> None:
        self.inputs = inputs
        self.n_components = n_components
        self.tau = tau
        self.pca = _IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, layer_input: Any, output: Any) -> None:
        previous = None if self.pca.components_ is None else self.pca.components_.clone()
        states = self.inputs(layer_input)
        if states.size(0) < self.n_components:
            warnings.warn(
                f"EVA skips a batch for {self.inputs.name!r}: it has {states.size(0)} tokens, fewer than the "
                f"{self.n_components} components.",
                stacklevel=2,
            )
            return
        self.pca.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.pca.components_
        if components.dim() == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = nn.functional.cosine_similarity(components, previous) >= self.tau


def _device_of(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(
            f"EVA can't tell the model's device: its parameters are on {sorted(map(str, devices))}.", stacklevel=3
        )
        return None
    return next(iter(devices), None)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({key: _to_device(value, device) for key, value in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(value, device) for value in inputs)
    warnings.warn(f"EVA could not move an input of type {type(inputs).__name__} to {device}.", stacklevel=3)
    return inputs


def _rank_distribution(
    hooks: dict[str, _SVDHook],
    layer_hook_map: dict[str, str],
    equal_inputs_map: dict[str, str],
    rank_budget: int,
    max_components: dict[str, int],
) -> dict[str, int]:
    """Give the `rank_budget` ranks to the components with the largest explained-variance ratios over all layers."""
    ratios = {name: hook.pca.explained_variance_ratio_[: max_components[name]] for name, hook in hooks.items()}
    keys, values = zip(*[(layer, value) for layer, source in layer_hook_map.items() for value in ratios[source]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:rank_budget])
    counts = {layer: counts.get(layer, 0) for layer in layer_hook_map}
    for layer, source in equal_inputs_map.items():
        # Of layers with equal inputs, the one that carries the hook keeps the highest rank.
        if counts[source] < counts[layer]:
            counts[source], counts[layer] = counts[layer], counts[source]
    return counts


def _eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig,
    is_target: Callable[[str, nn.Module], bool],
    forward_fn: Callable,
    prepare_model_inputs_fn: Callable | None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None,
    gather_distributed_inputs: bool,
    show_progress_bar: bool,
) -> dict[str, torch.Tensor]:
    if len(dataloader) == 0:
        raise ValueError("EVA's dataloader is empty.")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn(
            "torch.distributed is initialized and gather_distributed_inputs=True: EVA gathers layer inputs from "
            "every process, so the processes must not receive the same batches.",
            stacklevel=3,
        )
    rho = peft_config.eva_config.rho
    if rho > 1000:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    device = _device_of(model)

    def batch_inputs(inputs: Any) -> tuple[Any, Any]:
        inputs = inputs if device is None else _to_device(inputs, device)
        for_hooks = prepare_model_inputs_fn(inputs, peft_config) if prepare_model_inputs_fn else copy.deepcopy(inputs)
        return inputs, for_hooks

    inputs, for_hooks = batch_inputs(next(iter(dataloader)))
    per_layer_fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    layer_inputs: dict[str, _LayerInputs] = {}
    digests: dict[str, _DigestHook] = {}
    max_components: dict[str, int] = {}
    rank_budget = 0
    handles = []
    for name, module in model.named_modules():
        if not is_target(name, module):
            continue
        prepare = per_layer_fns.pop(name, None) if per_layer_fns is not None else prepare_layer_inputs_fn
        layer_inputs[name] = _LayerInputs(name, prepare, gather_distributed_inputs)
        layer_inputs[name].model_input = for_hooks
        digests[name] = _DigestHook(layer_inputs[name])
        handles.append(module.register_forward_hook(digests[name]))
        rank = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), name), peft_config.r)
        max_components[name] = round(rank * rho)
        rank_budget += rank
    try:
        if per_layer_fns:
            raise ValueError(
                f"prepare_layer_inputs_fn names modules that are not EVA target layers: {sorted(per_layer_fns)}."
            )
        forward_fn(model, inputs)
    finally:
        for handle in handles:
            handle.remove()

    # Of the layers that receive the same input, only the first gets a PCA; the others share its result.
    groups: dict[tuple, list[str]] = {}
    for name, hook in digests.items():
        groups.setdefault(hook.digest, []).append(name)
    equal_inputs_map = {}
    for names in groups.values():
        if len(names) > 1:
            equal_inputs_map.update({name: names[0] for name in names[1:]})
            largest = max(max_components[name] for name in names)
            for name in names:
                max_components[name] = largest
    hooks = {
        name: _SVDHook(layer_inputs[name], max_components[name], peft_config.eva_config.tau)
        for name in digests
        if name not in equal_inputs_map
    }
    layer_hook_map = {**{name: name for name in hooks}, **equal_inputs_map}
    active = {name: model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()}
    converged = dict.fromkeys(hooks, False)
    rank_dist = dict(max_components)
    show = show_progress_bar and (not dist.is_initialized() or dist.get_rank() == 0)
    batches = tqdm(cycle(dataloader), position=0, leave=False) if show else cycle(dataloader)
    try:
        for batch in batches:
            inputs, for_hooks = batch_inputs(batch)
            for name, hook in hooks.items():
                done = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not converged[name] and done and name in active:
                    active.pop(name).remove()
                    converged[name] = True
                    continue
                if converged[name] and not done:
                    active[name] = model.get_submodule(name).register_forward_hook(hook)
                    converged[name] = False
                hook.inputs.model_input = for_hooks
            if show:
                finished = sum(converged.values()) + sum(converged[source] for source in equal_inputs_map.values())
                batches.set_description(f"{finished}/{len(converged) + len(equal_inputs_map)} layers have converged")
            if all(converged.values()):
                break
            forward_fn(model, inputs)
            if any(hook.pca.components_ is None for hook in hooks.values()):
                continue
            rank_dist = _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components)
    finally:
        for handle in active.values():
            handle.remove()

    state_dict = {}
    for name, rank in rank_dist.items():
        hook = hooks[layer_hook_map[name]]
        if not torch.all(hook.converged[:rank]):
            raise RuntimeError(f"EVA assigned rank {rank} to {name!r}, whose components have not all converged.")
        components = hook.pca.components_[:rank]
        if peft_config.eva_config.whiten:
            components = components / hook.pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        state_dict[name] = components if device is None else components.to(device)
    return state_dict


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's lora_A per target layer, `{module name: [rank, in_features]}` (rank 0: no adapter there).

    Args:
        model: a PeftModel (its LoRA Linear layers are the targets, run with adapters off) or a plain model with
            `peft_config` (its nn.Linear / Conv1D layers that `target_modules` selects).
        dataloader: batches for `forward_fn(model, batch)`; cycled until every layer has converged.
        forward_fn: runs a batch; default `model(**batch)`.
        prepare_model_inputs_fn: `(batch, peft_config) -> x` handed to `prepare_layer_inputs_fn`; by default the
            indices of the tokens to use (attention and label masks).
        prepare_layer_inputs_fn: `(layer_input, x, layer_name) -> [tokens, features]`, or a dict of them per
            module name; by default the input rows at those token indices.
        gather_distributed_inputs: under torch.distributed, fit to the inputs of every process.
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("get_eva_state_dict needs peft_config when the model is not a PeftModel.")
        peft_config = model.peft_config[adapter_name]
    if peft_config.eva_config is None:
        raise ValueError("get_eva_state_dict needs peft_config.eva_config (init_lora_weights='eva' sets a default).")

    def is_peft_target(name: str, module: nn.Module) -> bool:
        # As HF PEFT: EVA fits linear LoRA layers only (no embeddings, convolutions or attention modules).
        return isinstance(module, Linear)

    def is_plain_target(name: str, module: nn.Module) -> bool:
        targeted = peft_config.target_modules is None or check_target_module_exists(peft_config, name)
        return (isinstance(module, nn.Linear) or is_conv1d(module)) and bool(targeted)

    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if is_peft_model else nullcontext():
            return _eva_state_dict(
                model,
                dataloader,
                peft_config,
                is_peft_target if is_peft_model else is_plain_target,
                forward_fn,
                prepare_model_inputs_fn,
                prepare_layer_inputs_fn,
                gather_distributed_inputs,
                show_progress_bar,
            )
    finally:
        model.train(was_training)


def _condensed_targets(targets: list[str], others: list[str]) -> set[str]:
    """Short name suffixes that select all of `targets` and none of `others` (HF PEFT's condensed target list):
    targets in order of their suffixes, each adds its shortest suffix that no other module has, unless a suffix
    already chosen covers it."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {suffix for name in others for suffix in suffixes(name)}
    chosen: set[str] = set()
    for target, target_suffixes in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda pair: pair[1]):
        if any(target.endswith("." + suffix) for suffix in chosen):
            continue
        for suffix in target_suffixes:
            if suffix not in chosen and suffix not in other_suffixes:
                chosen.add(suffix)
                break
    return chosen or set(targets)


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    eva_state_dict = dict(eva_state_dict)
    config = model.peft_config[adapter_name]
    autocast = getattr(model.base_model, "_autocast_adapter_dtype", True)
    targets, missing, others = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        short_name = name.replace("base_model.model.", "")
        if not isinstance(module, LoraLayer):
            others.append(short_name)
            continue
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        layer_options = dict(
            adapter_name=adapter_name,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            lora_bias=config.lora_bias,
            autocast_adapter_dtype=autocast,
        )
        if name in eva_state_dict:
            components = eva_state_dict.pop(name)
            new_rank = components.size(0)
            if new_rank == 0:
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, module.get_base_layer())
                continue
            if new_rank != rank and config.eva_config.adjust_scaling_factors:
                alpha *= new_rank / rank
            if new_rank != rank or module.lora_A[adapter_name].weight.device.type == "meta":
                module.update_layer(r=new_rank, lora_alpha=alpha, init_lora_weights="eva", **layer_options)
            module.lora_A[adapter_name].weight.copy_(components)
            targets.append(short_name)
        else:
            module.update_layer(r=rank, lora_alpha=alpha, init_lora_weights=True, **layer_options)
            missing.append(short_name)
            new_rank = rank
        if new_rank != config.r:
            rank_pattern[short_name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short_name] = alpha
    targets += missing
    if len(targets) >= _MIN_TARGET_MODULES_FOR_CONDENSING:
        targets = _condensed_targets(targets, others)
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(
            f"EVA has no components for {missing}, so those layers got the standard initialisation "
            "(init_lora_weights=True); EVA fits linear LoRA layers only.",
            stacklevel=3,
        )


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Set the LoRA weights of `model`'s adapter (created with `init_lora_weights="eva"`) by EVA: from
    `eva_state_dict`, or computed from `dataloader` with `get_eva_state_dict` (same arguments). Layers may change
    rank (the config's rank_pattern/alpha_pattern record it) or lose their adapter (rank 0). Returns `model`."""
    if not hasattr(model, "peft_config"):
        raise ValueError("initialize_lora_eva_weights needs a PeftModel.")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works with a single active adapter.")
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError("initialize_lora_eva_weights needs an adapter created with init_lora_weights='eva'.")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict.")
        eva_state_dict = get_eva_state_dict(
            model=model,
            dataloader=dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
