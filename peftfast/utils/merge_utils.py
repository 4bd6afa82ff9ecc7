"""Ways to combine several task tensors (LoRA factors or delta weights) into one, for `add_weighted_adapter`.

Semantics follow HF PEFT's `peft.utils.merge_utils`: every function takes a list of same-shaped tensors and a 1-d
tensor of weights (one per task tensor) and returns one tensor of that shape.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch


def _weighted(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`task_tensors` (stacked on dim 0) times `weights`, broadcast over the remaining dims."""
    return task_tensors * weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Keep a fraction `density` of the entries of `tensor`, zero the rest.

    "magnitude" keeps the `int(density * numel)` entries of largest absolute value; "random" keeps each entry with
    probability `density` (and divides by `density` when `rescale`, so the expected value is unchanged). A density of 1
    or more keeps everything (with a warning).
    """
    if density >= 1:
        warnings.warn(f"The density {density} is >= 1: nothing is pruned.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}.")
    if method == "magnitude":
        keep = int(density * tensor.numel())
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
        return tensor * mask.reshape(tensor.shape)
    if method == "random":
        pruned = tensor * torch.bernoulli(torch.full_like(tensor, fill_value=density))
        return pruned / density if rescale else pruned
    raise ValueError(f"Unknown pruning method {method!r}; expected 'magnitude' or 'random'.")


def calculate_majority_sign_mask(tensor: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """True where an entry of `tensor` (task tensors stacked on dim 0) has the sign elected across the tasks.

    "total" elects the sign of the sum of the entries, "frequency" the sign held by most tasks; ties elect +.
    """
    sign = tensor.sign()
    if method == "total":
        magnitude = tensor.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"Unknown majority_sign_method {method!r}; expected 'total' or 'frequency'.")
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks of the entries that agree with the elected sign (0 where none does)."""
    summed = (task_tensors * majority_sign_mask).sum(dim=0)
    return summed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum: `sum_i weights[i] * task_tensors[i]`."""
    return _weighted(torch.stack(task_tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Weighted sum of the task tensors after magnitude pruning each to `density`."""
    pruned = [prune(tensor, density, method="magnitude") for tensor in task_tensors]
    return task_arithmetic(pruned, weights)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES merging: magnitude-prune each task tensor, elect a sign per entry, average the weighted entries that
    agree with it."""
    stacked = torch.stack([prune(tensor, density, method="magnitude") for tensor in task_tensors], dim=0)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: randomly drop entries (keeping a fraction `density`, rescaled), then take the weighted sum."""
    pruned = [prune(tensor, density, method="random", rescale=True) for tensor in task_tensors]
    return task_arithmetic(pruned, weights)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """DARE pruning followed by TIES' sign election and disjoint mean."""
    stacked = torch.stack([prune(tensor, density, method="random", rescale=True) for tensor in task_tensors], dim=0)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)
