"""HF PEFT's weight-driven LoRA initialisations (the `init_lora_weights` strings) for peftfast's LoRA layers.

Each sets one layer's factors to PEFT's starting point and, where PEFT does, rewrites the base weight:

- "pissa": A, B from the top-r singular triplets of W, and W_res = W - scaling * B @ A;
- "pissa_niter_[n]": the same from a randomized SVD with n subspace iterations (torch.svd_lowrank, as PEFT);
- "olora": B, A = the first r columns of Q and rows of R of W = QR, and W_res as for PiSSA;
- "orthogonal": random A, B with orthogonal rows/columns; the base is left alone;
- "loftq": the base becomes dequant(quant(W - B @ A)), B @ A the low-rank fit of the quantization error;
- "corda", "lora_ga": factors from what `preprocess_corda` / `preprocess_loraga` left on the layer, W_res as PiSSA;
- "eva": B = 0 (A comes later, from `initialize_lora_eva_weights`).

Results equal PEFT's, up to rounding, and the randomized ones ("pissa_niter_[n]", "orthogonal", LoRA-GA) draw from
the global generator as PEFT does, so the same seed gives the same factors. The exact "pissa", LoftQ and CorDA's
"ipm" compute only the top singular triplets (`top_singular_triplets`) and OLoRA only the first r QR columns
(`_olora`), a fraction of PEFT's work; their singular vectors may have the opposite sign of LAPACK's full SVD, which
changes no output (each (row of A, column of B) pair flips together: B @ A, W_res and training are the same).
Where PEFT's result is broken, peftfast's is not: OLoRA and LoftQ on transformers' Conv1D (GPT-2) factor W, not
its stored transpose.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ... import ops
from ...utils import weight_journal
from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ..tuners_utils import _linear_module_names, _model_type, check_target_module_exists
from .config import LoraConfig

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_module_name: ContextVar[str | None] = ContextVar("peftfast_lora_init_module", default=None)


@contextmanager
def naming(module_name: str) -> Iterator[None]:
    """Name the module being initialised in the block, for error messages."""
    token = _module_name.set(module_name)
    try:
        yield
    finally:
        _module_name.reset(token)


def _label(layer: nn.Module) -> str:
    name = _module_name.get()
    base = layer.get_base_layer()
    return f"module {name!r} ({type(base).__name__})" if name else f"a {type(base).__name__} layer"


def top_singular_triplets(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `k = min(rank, *weight.shape)` largest singular triplets of a 2-D matrix: `U [m, k]`, `S [k]` (descending),
    `Vh [k, n]`, with `U @ diag(S) @ Vh` the best rank-k approximation (as `torch.linalg.svd(weight)[..][:k]`).

    Exact, not randomized: the top-k eigenvectors of the smaller Gram matrix span the top singular subspace (one
    GEMM and a symmetric eigensolver, several times faster than a full SVD, and far faster for rectangular
    matrices), and the SVD of the k-row projection onto it (Rayleigh-Ritz) gives the triplets without squaring the
    singular values. For the leading directions that PiSSA and LoftQ keep this is as accurate as a full SVD.
    """
    rows, cols = weight.shape
    k = min(rank, rows, cols)
    with _full_precision_matmuls():
        if rows <= cols:
            _, vectors = torch.linalg.eigh(weight @ weight.T)
            basis = vectors[:, -k:].flip(1)
            inner_U, S, Vh = torch.linalg.svd(basis.T @ weight, full_matrices=False)
            return basis @ inner_U, S, Vh
        _, vectors = torch.linalg.eigh(weight.T @ weight)
        basis = vectors[:, -k:].flip(1)
        U, S, inner_Vh = torch.linalg.svd(weight @ basis, full_matrices=False)
        return U, S, inner_Vh @ basis.T


@contextmanager
def _full_precision_matmuls() -> Iterator[None]:
    # A TF32 Gram matrix (10-bit mantissa, if the user allowed it for speed) would blur the singular directions.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            f"LoftQ quantizes with bitsandbytes, which can't be imported ({error}); install it with "
            "`pip install bitsandbytes`."
        ) from error
    return bitsandbytes


def low_rank_fit(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [out, k], R [k, in]): L @ R is the best rank-k approximation of `residual`; L = U sqrt(S), R = sqrt(S) Vh."""
    U, S, Vh = top_singular_triplets(residual, rank)
    root = S.sqrt()
    return U * root, root[:, None] * Vh


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (https://arxiv.org/abs/2310.08659), what `init_lora_weights="loftq"` runs on a full-precision layer:
    alternate `num_iter` times Q = dequant(quant(W - B @ A)), then B @ A = the rank-`reduced_rank` fit of W - Q.

    The quantization is bitsandbytes' own, as in PEFT (NF4 blocks of 64 without nested statistics, or LLM.int8
    rows); NF4 is dequantized by `peftfast.ops.nf4_dequantize`, bit for bit as bitsandbytes on a GPU (its CPU
    fallback misreads rows whose length is even but not a multiple of the blocksize). Unlike PEFT, the work runs on
    the weight's device (PEFT moves it to "cuda", so its LoftQ needs a GPU) and keeps only the top singular triplets
    of each residual instead of a full SVD.

    Args:
        weight: [out, in], any float dtype.
        num_bits: 4 (NF4) or 8 (int8).

    Returns:
        (Q in the weight's dtype, lora_A [k, in] fp32, lora_B [out, k] fp32), `k = min(reduced_rank, out, in)`.
    """
    bnb = _bitsandbytes()
    if num_bits not in (4, 8):
        raise ValueError(f"LoftQ quantizes to 4 (NF4) or 8 (int8) bits, got num_bits={num_bits!r}.")
    if num_iter <= 0:
        raise ValueError(f"LoftQ needs at least one iteration, got num_iter={num_iter!r}.")
    target = weight.to(torch.float32)
    residual = target
    for step in range(num_iter):
        if num_bits == 4:
            packed, quant_state = bnb.functional.quantize_4bit(
                residual.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4"
            )
            dequantized = ops.nf4_dequantize(packed, quant_state)
        else:
            rows, scales, _ = bnb.functional.int8_vectorwise_quant(residual.to(torch.float16))
            dequantized = bnb.functional.int8_vectorwise_dequant(rows, scales)
        lora_B, lora_A = low_rank_fit(target - dequantized, reduced_rank)
        if step + 1 < num_iter:
            residual = target - lora_B @ lora_A
    return dequantized.to(weight.dtype), lora_A, lora_B


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def preprocessing_targets(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Module]]:
    """The (name, module) pairs of `config`'s targets that are nn.Linear or transformers Conv1D layers."""
    targets = config.target_modules
    if targets is None:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(_model_type(model))
        if default is None:
            raise ValueError("lora_config.target_modules is not set and the model has no default targets; set it.")
        targets = set(default)
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _linear_module_names(model, config)
    matching = config
    if targets is not config.target_modules:
        matching = copy.copy(config)
        matching.target_modules = targets
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and check_target_module_exists(matching, name):
            yield name, module


@torch.no_grad()
def initialise(
    layer: nn.Module,
    adapter_name: str,
    init_lora_weights: str,
    loftq_config: dict | None = None,
    lora_ga_config: Any = None,
) -> None:
    """Initialise `adapter_name` on `layer` as HF PEFT's `init_lora_weights=<string>` does (any but "gaussian")."""
    if adapter_name in layer.lora_embedding_A:
        # As PEFT: embeddings take their standard initialisation for every one of these, except LoftQ.
        if init_lora_weights == "loftq":
            raise ValueError(f"init_lora_weights='loftq' is not supported on {_label(layer)}: only on linear layers.")
        layer.reset_lora_parameters(adapter_name, True)
        return
    if isinstance(layer.lora_A[adapter_name], nn.modules.conv._ConvNd):
        if init_lora_weights == "lora_ga":
            layer.reset_lora_parameters(adapter_name, True)
            return
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is not supported on {_label(layer)}: HF PEFT applies it to "
            "linear layers only (use True, False or 'gaussian' for convolutions)."
        )
    if init_lora_weights == "pissa" or init_lora_weights.startswith("pissa_niter_"):
        _pissa(layer, adapter_name, init_lora_weights)
    elif init_lora_weights.lower() == "olora":
        _olora(layer, adapter_name)
    elif init_lora_weights == "orthogonal":
        _orthogonal(layer, adapter_name)
    elif init_lora_weights == "loftq":
        _loftq(layer, adapter_name, loftq_config)
    elif init_lora_weights == "eva":
        nn.init.zeros_(layer.lora_B[adapter_name].weight)
    elif init_lora_weights == "corda":
        _corda(layer, adapter_name)
    elif init_lora_weights == "lora_ga":
        _lora_ga(layer, adapter_name, lora_ga_config)
    else:
        raise ValueError(f"Unknown init_lora_weights={init_lora_weights!r} for {_label(layer)}.")


def _is_quantized(layer: nn.Module) -> bool:
    # The bitsandbytes LoRA layers read and write their base weight through these two methods.
    return hasattr(layer, "_dequantized_weight") and hasattr(layer, "_set_weight")


def _stored_weight(layer: nn.Module) -> torch.Tensor:
    weight = getattr(layer.get_base_layer(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"This initialisation needs the 2-D weight of the base layer, which {_label(layer)} lacks.")
    return weight


def _orient(layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """[out, in] <-> the base layer's storage order (transformers' Conv1D stores [in, out])."""
    return matrix.T if getattr(layer, "fan_in_fan_out", False) else matrix


def _float_weight(layer: nn.Module, method: str, quantized_ok: bool) -> torch.Tensor:
    """The base weight as an fp32 [out, in] matrix; PEFT's refusal for dtypes it can't start from."""
    if quantized_ok and _is_quantized(layer):
        return layer._dequantized_weight().to(torch.float32)
    weight = _stored_weight(layer)
    if weight.dtype not in _FLOAT_DTYPES or _is_quantized(layer):
        raise TypeError(
            f"{method} needs a float32, float16 or bfloat16 base weight, but {_label(layer)} has {weight.dtype}. "
            "Initialise on the full-precision model, then quantize the residual model."
        )
    return _orient(layer, weight.detach().to(torch.float32))


def _write_base(layer: nn.Module, weight: torch.Tensor) -> None:
    """Replace the base weight by the fp32 [out, in] `weight`, in the base layer's own dtype and format."""
    base = layer.get_base_layer()
    if _is_quantized(layer):
        weight_journal.replace_parameter(base, "weight", lambda: layer._set_weight(weight))
        return
    stored = base.weight
    weight_journal.replace_data(stored, _orient(layer, weight).to(stored.dtype).contiguous())


def _factor_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype PEFT's factors pass through: the base weight's (then `autocast_adapter_dtype` may upcast them)."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    if _is_quantized(layer) or weight is None or not weight.dtype.is_floating_point:
        return None
    return weight.dtype


def _write_factors(layer: nn.Module, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Set the factors; under `low_cpu_mem_usage` (factors on the meta device, to be loaded) only the base changes."""
    dtype = _factor_dtype(layer)
    for module, value in ((layer.lora_A[adapter_name], lora_A), (layer.lora_B[adapter_name], lora_B)):
        if module.weight.device.type == "meta":
            continue
        module.weight.data = value.to(dtype or value.dtype).contiguous()


def _pissa(layer: nn.Module, adapter_name: str, init: str) -> None:
    weight = _float_weight(layer, "PiSSA", quantized_ok=False)
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if init == "pissa":
        U, S, Vh = top_singular_triplets(weight, rank)
    else:
        niter = init[len("pissa_niter_") :]
        if not niter.isdigit():
            raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init!r}.")
        U, S, V = torch.svd_lowrank(weight, rank, niter=int(niter))
        Vh = V.T
    root = (S / scaling).sqrt()
    lora_A = root[:, None] * Vh
    lora_B = U * root
    _write_base(layer, weight - scaling * (lora_B @ lora_A))
    _write_factors(layer, adapter_name, lora_A, lora_B)


def _olora(layer: nn.Module, adapter_name: str) -> None:
    """B = Q[:, :r], A = R[:r] of W = QR. Householder QR fixes the first r columns of Q with its first r steps, which
    see only W's first r columns: so QR of those columns gives Q[:, :r] and R[:r, :r], and R[:r, r:] = Q[:, :r]^T
    W[:, r:]. That is O(r * out * in) work where PEFT factors the whole matrix."""
    weight = _float_weight(layer, "OLoRA", quantized_ok=True)
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    head = min(rank, weight.shape[1])
    Q, R_head = torch.linalg.qr(weight[:, :head])
    lora_A = torch.cat([R_head, Q.T @ weight[:, head:]], dim=1)
    lora_B = Q
    _write_base(layer, weight - scaling * (lora_B @ lora_A))
    _write_factors(layer, adapter_name, lora_A, lora_B)


def _orthogonal(layer: nn.Module, adapter_name: str) -> None:
    # The draws, their order and shapes are PEFT's, so the same seed gives the same factors.
    rank = layer.r[adapter_name]
    if rank % 2 != 0:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={rank} for {_label(layer)}.")
    Q, _ = torch.linalg.qr(torch.randn(rank, rank))
    lora_A = torch.randn(layer.in_features, rank // 2).mm(Q[0::2, :]).T / 10.0
    lora_B = torch.randn(rank // 2, layer.out_features).T.mm(Q[1::2, :]) / 10.0
    _write_factors(layer, adapter_name, lora_A, lora_B)


def _loftq(layer: nn.Module, adapter_name: str, loftq_config: dict | None) -> None:
    if _is_quantized(layer):
        raise ValueError(
            f"init_lora_weights='loftq' needs the full-precision weight, but {_label(layer)} is already quantized. "
            "Either create the adapter on the full-precision model (LoftQ then stores the quantized values), or "
            "keep the quantized model and call peftfast.replace_lora_weights_loftq(peft_model, model_path) with "
            "the full-precision safetensors file."
        )
    if not loftq_config:
        raise ValueError(f"init_lora_weights='loftq' needs loftq_config (LoftQConfig(...)) for {_label(layer)}.")
    weight = _stored_weight(layer)
    dequantized, lora_A, lora_B = loftq_init(
        _orient(layer, weight.detach()),
        num_bits=loftq_config.get("loftq_bits", 4),
        reduced_rank=layer.r[adapter_name],
        num_iter=loftq_config.get("loftq_iter", 1),
    )
    _write_base(layer, dequantized.to(torch.float32))
    _write_factors(layer, adapter_name, lora_A, lora_B)


def _corda(layer: nn.Module, adapter_name: str) -> None:
    weight = _float_weight(layer, "CorDA", quantized_ok=False)
    base = layer.get_base_layer()
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ValueError(
            f"init_lora_weights='corda' found no CorDA decomposition on {_label(layer)}: run "
            "peftfast.tuners.lora.corda.preprocess_corda(model, lora_config, run_model=...) first, with the same "
            "model and config."
        )
    U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    out_features, in_features = weight.shape
    for name, value in (("S", S), ("U", U), ("V", V)):
        if not torch.isfinite(value).all():
            raise ValueError(f"CorDA's {name} for {_label(layer)} holds NaN or inf values; rerun preprocess_corda.")
    expected = {"U": (out_features, rank), "S": (rank,), "V": (in_features, rank)}
    for name, value in (("U", U), ("S", S), ("V", V)):
        if tuple(value.shape) != expected[name]:
            raise ValueError(
                f"CorDA's {name} for {_label(layer)} has shape {tuple(value.shape)}, expected {expected[name]}: "
                "preprocess_corda ran with another model, rank or config (or a cache file of another one)."
            )
    root = (S.to(weight.device, torch.float32) / scaling).sqrt()
    lora_A = V.to(weight.device, torch.float32).T * root[:, None]
    lora_B = U.to(weight.device, torch.float32) * root
    _write_base(layer, weight - scaling * (lora_B @ lora_A))
    _write_factors(layer, adapter_name, lora_A, lora_B)
    weight_journal.remove_attribute_on_success(base, "eigens")


def _lora_ga(layer: nn.Module, adapter_name: str, lora_ga_config: Any) -> None:
    base = layer.get_base_layer()
    gradient = getattr(base, "_peft_loraga_grad", None)
    if gradient is None:
        # As PEFT: without an estimated gradient (e.g. loading a saved adapter), the standard initialisation.
        layer.reset_lora_parameters(adapter_name, True)
        return
    if lora_ga_config is None:
        raise ValueError(
            f"init_lora_weights='lora_ga' needs lora_ga_config=LoraGAConfig(...) in the LoraConfig ({_label(layer)})."
        )
    weight = _stored_weight(layer)
    dtype = weight.dtype
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    gradient = _orient(layer, gradient.to(torch.float32))
    if 2 * rank > min(gradient.shape):
        # A and B take r of the gradient's top 2r singular vectors each; HF PEFT fails on a shape mismatch here.
        raise ValueError(
            f"init_lora_weights='lora_ga' needs 2 * r <= min(in_features, out_features), but {_label(layer)} has a "
            f"{tuple(gradient.shape)} weight and r={rank}; lower r for it (rank_pattern)."
        )
    # The randomized SVDs and permutation draw from the global generator in PEFT's order: same seed, same factors.
    U, S, V = torch.svd_lowrank(gradient, q=min(4 * rank, min(gradient.shape)), niter=4)
    U, S, Vh = U[:, : 2 * rank], S[: 2 * rank], V.T[: 2 * rank]
    direction = lora_ga_config.direction
    if direction == "ArBr":
        lora_A, picked = Vh[1 : 2 * rank : 2], slice(0, 2 * rank, 2)
    elif direction == "A2rBr":
        lora_A, picked = Vh[rank : 2 * rank], slice(0, rank)
    elif direction == "ArB2r":
        lora_A, picked = Vh[:rank], slice(rank, 2 * rank)
    elif direction == "random":
        picked = torch.randperm(2 * rank)[:rank]
        lora_A = Vh[picked]
    else:
        raise ValueError(f"LoraGAConfig.direction must be 'ArBr', 'A2rBr', 'ArB2r' or 'random', got {direction!r}.")
    S_B = S[picked]
    lora_B = U[:, picked] * S_B
    if lora_ga_config.scale == "stable":
        lora_B = lora_B * (weight.shape[0] ** 0.25 / lora_ga_config.stable_gamma**0.5)
    elif lora_ga_config.scale == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(_orient(layer, weight.detach().to(torch.float32)), q=rank, niter=4)
        if S_B[0] > 0:
            lora_B = lora_B * (weight_S[0] / S_B[0])
    elif lora_ga_config.scale == "gd_scale":
        lora_A, lora_B = lora_A / scaling, lora_B / scaling
    # As PEFT: round the factors to the base dtype first, so the base keeps exactly what the forward will add back.
    lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    _write_factors(layer, adapter_name, lora_A, lora_B)
    residual = _orient(layer, weight.detach().to(torch.float32)) - scaling * (lora_B.float() @ lora_A.float())
    _write_base(layer, residual)
    weight_journal.remove_attribute_on_success(base, "_peft_loraga_grad")
