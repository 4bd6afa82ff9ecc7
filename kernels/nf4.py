"""bitsandbytes 4-bit (NF4/FP4) weights read as stored: a bit-exact dequantize, and a fused small-M matmul.

Storage (see `peftfast.ops.reference.nf4_dequantize`, the torch twin): W [N, K] flattened row-major, two 4-bit codes
per byte with the first element in the high nibble, one absmax per `blocksize` consecutive elements (plain fp32, or
nested: uint8 codes into a 256-entry table, scaled per `absmax_blocksize` group, plus an offset), and a 16-entry code
table. Every element is `code[q] * absmax` in fp32, then cast: the same arithmetic as bitsandbytes, hence the same bits.

`nf4_dequantize` is the bandwidth-bound kernel the training path dequantizes into a reused buffer with.
`nf4_lora_matmul` is the decode path: y = x W^T + bias + S B^T, the 4-bit weight read once and dequantized in
registers, the LoRA term (S = s * x A^T from `lora_shrink`, fp32) added in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .lora_linear import _TORCH_TO_TL, MIN_DOT, _accumulate_matmul, _precision, _rank_block

# Flat element indices are int32 inside the kernels.
MAX_NUMEL = 2**31 - 1


@triton.jit
def _block_scale(
    absmax_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    block,
    mask,
    absmax_blocksize,
    NESTED: tl.constexpr,
):
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_code_ptr + qabs, mask=mask, other=0.0) * tl.load(
            absmax_scale_ptr + block // absmax_blocksize, mask=mask, other=0.0
        )
        # bitsandbytes adds the offset in a separate op (a rounding between); launches pass enable_fp_fusion=False so
        # this stays a multiply then an add, never one fused multiply-add.
        return scale + tl.load(absmax_offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _round_to(w, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    # The interpreter truncates fp32 -> bf16 casts (even with fp_downcast_rounding="rtne"); GPUs round to nearest
    # even. Under the interpreter, round to nearest even on the bits, returning the bf16 value held in fp32 (exact
    # for finite values).
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return w.to(DTYPE)


@triton.jit
def _nf4_dequantize_kernel(
    # pointers
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    out_ptr,
    # sizes
    numel,
    blocksize,
    absmax_blocksize,
    # meta-parameters
    NESTED: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    # Each program reads BLOCK_BYTES packed bytes once and writes the 2 * BLOCK_BYTES elements they hold, in order.
    pid = tl.program_id(0)
    offs_byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    byte = tl.load(packed_ptr + offs_byte, mask=offs_byte < (numel + 1) // 2, other=0).to(tl.int32)
    q = tl.interleave(byte >> 4, byte & 15)
    offs = pid * 2 * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
    mask = offs < numel
    scale = _block_scale(
        absmax_ptr,
        absmax_code_ptr,
        absmax_scale_ptr,
        absmax_offset_ptr,
        offs // blocksize,
        mask,
        absmax_blocksize,
        NESTED,
    )
    w = _round_to(tl.load(code_ptr + q) * scale, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def _check_storage(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    absmax_code: torch.Tensor | None,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | float,
    absmax_blocksize: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed bytes as a flat uint8 view, and the offset as a 1-element fp32 tensor; raises on a bad layout."""
    packed_bytes = packed.contiguous().view(-1).view(torch.uint8)
    if packed_bytes.numel() < (numel + 1) // 2:
        raise ValueError(f"nf4: {packed_bytes.numel()} packed bytes can't hold {numel} 4-bit values.")
    if absmax.numel() < cdiv(numel, blocksize):
        raise ValueError(f"nf4: {absmax.numel()} absmax values for {numel} values in blocks of {blocksize}.")
    if code.numel() != 16:
        raise ValueError(f"nf4: the code table has {code.numel()} entries, expected 16.")
    if numel > MAX_NUMEL:
        raise ValueError(f"nf4: {numel} elements is more than the kernels index ({MAX_NUMEL}).")
    nested = absmax_code is not None
    if nested and (absmax.dtype != torch.uint8 or absmax_scale is None or absmax_code.numel() != 256):
        raise ValueError("nf4: a nested absmax needs uint8 codes, a 256-entry table and per-group scales.")
    offset = torch.as_tensor(absmax_offset, dtype=torch.float32, device=packed.device).reshape(1)
    return packed_bytes, offset


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    absmax_code: torch.Tensor | None = None,
    absmax_scale: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | float = 0.0,
    absmax_blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: W[i] = dtype(code[q[i]] * scale[i // blocksize]) (see the torch twin for q and scale).

    Shapes: as `peftfast.ops.reference.nf4_dequantize`; `out`, if given, a contiguous tensor of `shape` and `dtype`
    (the reused buffer of the training path). Returns W of `shape`.
    """
    numel = 1
    for size in shape:
        numel *= size
    packed_bytes, offset = _check_storage(
        packed, absmax, code, blocksize, numel, absmax_code, absmax_scale, absmax_offset, absmax_blocksize
    )
    if out is None:
        out = torch.empty(shape, device=packed.device, dtype=dtype)
    elif tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be contiguous of shape {tuple(shape)}, got {tuple(out.shape)}.")
    if numel == 0:
        return out
    nested = absmax_code is not None
    # 1024 bytes (2048 values) per program: enough bytes in flight per SM to stream at full bandwidth, assumed from
    # the usual elementwise-kernel sizing; not measured on a GPU yet.
    block_bytes = 256 if packed.device.type == "cpu" else 1024
    _nf4_dequantize_kernel[(cdiv(numel, 2 * block_bytes),)](
        packed_bytes,
        absmax,
        code,
        absmax_code if nested else code,
        absmax_scale if nested else code,
        offset,
        out,
        numel,
        blocksize,
        absmax_blocksize,
        NESTED=nested,
        INTERPRETED=out.device.type == "cpu",
        BLOCK_BYTES=block_bytes,
        enable_fp_fusion=False,
    )
    return out


# (BLOCK_N, BLOCK_K, warps, stages): narrow N tiles so a 4096-wide output still fills 132 SMs, and K tiles of one
# or more quantization blocks (64 values) so each tile reads its scales once per row and block.
NF4_LORA_MATMUL_TILES = [
    (16, 256, 4, 3),
    (32, 128, 4, 4),
    (32, 256, 8, 3),
    (64, 128, 8, 3),
    (64, 64, 4, 4),
]


def nf4_lora_matmul_configs() -> list[triton.Config]:
    """Autotune space for the small-M kernel, before pruning for the GPU at hand."""
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_n, block_k, warps, stages in NF4_LORA_MATMUL_TILES
    ]


def nf4_lora_matmul_shared_bytes(config: triton.Config, block_m: int, x_size: int) -> int:
    """Shared memory estimate of one config: the pipelined x tile and packed bytes, the dequantized W tile the dot
    reads (one buffer) and the epilogue's scratch. The per-element code lookups stay in registers."""
    block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    stages = config.num_stages
    pipelined = stages * (block_m * block_k * x_size + block_n * block_k // 2)
    return pipelined + block_n * block_k * 2 + block_m * block_n * 4


def _prune_nf4_lora_matmul_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs whose shared memory (estimated) fits the device, then those that compile clean on it (see
    `lora_linear.keep_clean_configs`)."""
    from .lora_linear import device_properties, keep_clean_configs

    x = named_args["x_ptr"]
    limit = device_properties(x)["max_shared_mem"]
    size = x.element_size()
    fitting = [c for c in configs if nf4_lora_matmul_shared_bytes(c, kwargs["BLOCK_M"], size) <= limit]
    fitting = fitting or [min(configs, key=lambda c: nf4_lora_matmul_shared_bytes(c, kwargs["BLOCK_M"], size))]
    return keep_clean_configs(_nf4_lora_matmul_kernel, fitting, named_args, kwargs)


@triton.jit
def _code_lookup(code_ptr, q):
    # code[q] for a whole W tile. As one 32-bit load per element, Triton's pipeliner stages the gather through shared
    # memory (4 bytes per element and stage); read as two 16-bit halves it cannot (cp.async moves 4 bytes or more),
    # so the 64-byte table is read from L1 straight into registers. Same bits: the halves are put back together.
    halves = code_ptr.to(tl.pointer_type(tl.uint16), bitcast=True)
    low = tl.load(halves + 2 * q).to(tl.uint32)
    high = tl.load(halves + 2 * q + 1).to(tl.uint32)
    return (low | (high << 16)).to(tl.float32, bitcast=True)


@triton.jit
def _nf4_lora_matmul_kernel(
    # pointers
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    s_ptr,
    b_ptr,
    bias_ptr,
    out_ptr,
    # sizes
    M,
    N,
    K,
    R,
    blocksize,
    absmax_blocksize,
    # strides
    stride_xm,
    stride_xk,
    stride_sm,
    stride_sr,
    stride_bn,
    stride_br,
    stride_om,
    stride_on,
    # meta-parameters
    NESTED: tl.constexpr,
    INTERPRETED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if ROW_BLOCKS:
            # K is even and a multiple of the blocksize: row n's bytes start at n * K / 2 and no block straddles two
            # rows. W tile [BLOCK_N, BLOCK_K] from its [BLOCK_N, BLOCK_K / 2] bytes (high nibble first), and one
            # scale per row and block of the tile, broadcast over the block.
            HALF_K: tl.constexpr = BLOCK_K // 2
            offs_byte = k0 // 2 + tl.arange(0, HALF_K)
            byte = tl.load(
                packed_ptr + offs_n[:, None] * (K // 2) + offs_byte[None, :],
                mask=mask_n[:, None] & (offs_byte < K // 2)[None, :],
                other=0,
            ).to(tl.int32)
            q = tl.interleave(byte >> 4, byte & 15)
            SCALES: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
            SPAN: tl.constexpr = BLOCK_K // SCALES
            offs_block = k0 // BLOCKSIZE + tl.arange(0, SCALES)
            mask_s = mask_n[:, None] & (offs_block < K // BLOCKSIZE)[None, :]
            scale = _block_scale(
                absmax_ptr,
                absmax_code_ptr,
                absmax_scale_ptr,
                absmax_offset_ptr,
                offs_n[:, None] * (K // BLOCKSIZE) + offs_block[None, :],
                mask_s,
                absmax_blocksize,
                NESTED,
            )
            scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, SCALES, SPAN)), (BLOCK_N, BLOCK_K))
            # Round to the compute dtype first, as the dequantize-then-GEMM path does.
            w = _round_to(_code_lookup(code_ptr, q) * scale, W_DTYPE, INTERPRETED)
            acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
        else:
            # Any K: element (k, n) of the W^T tile is flat index n * K + k; its nibble and scale are read from it.
            flat = offs_n[None, :] * K + offs_k[:, None]
            mask_w = mask_k[:, None] & mask_n[None, :]
            byte = tl.load(packed_ptr + flat // 2, mask=mask_w, other=0).to(tl.int32)
            q = (byte >> ((1 - flat % 2) * 4)) & 15
            scale = _block_scale(
                absmax_ptr,
                absmax_code_ptr,
                absmax_scale_ptr,
                absmax_offset_ptr,
                flat // blocksize,
                mask_w,
                absmax_blocksize,
                NESTED,
            )
            w = _round_to(_code_lookup(code_ptr, q) * scale, W_DTYPE, INTERPRETED)
            acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=PRECISION)
    if HAS_LORA:
        acc = _accumulate_matmul(
            acc,
            s_ptr,
            b_ptr,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            R,
            stride_sm,
            stride_sr,
            stride_br,
            stride_bn,
            BLOCK_R,
            DOT_DTYPE,
            PRECISION,
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = _round_to(acc, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# Keyed on BLOCK_M rather than M: decode batches of 1..64 rows share four tuned entries per shape; and on the code
# path, which prunes to its own configs.
_nf4_lora_matmul_tuned = triton.autotune(
    configs=nf4_lora_matmul_configs(),
    key=["BLOCK_M", "N", "K", "NESTED", "HAS_LORA", "HAS_BIAS", "BLOCKSIZE", "DOT_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_nf4_lora_matmul_configs},
)(_nf4_lora_matmul_kernel)


def nf4_lora_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    absmax_code: torch.Tensor | None = None,
    absmax_scale: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | float = 0.0,
    absmax_blocksize: int = 256,
    *,
    shrunk: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    dot_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Semantics: y = x @ W.T + bias + S @ B.T, W the 4-bit weight (rounded to x's dtype), fp32 accumulation.

    Shapes: x [M, K]; the weight W [N, K] as in `nf4_dequantize`; S [M, R] fp32 (already scaled); B [N, R];
    bias [N]. Returns y [M, N] in `out_dtype` (default x's dtype).
    """
    M, K = x.shape
    N = shape[0]
    if len(shape) != 2 or shape[1] != K:
        raise ValueError(f"nf4_lora_matmul: x has {K} features but the weight has shape {tuple(shape)}.")
    packed_bytes, offset = _check_storage(
        packed, absmax, code, blocksize, N * K, absmax_code, absmax_scale, absmax_offset, absmax_blocksize
    )
    has_lora = shrunk is not None and shrunk.shape[1] > 0
    R = shrunk.shape[1] if has_lora else 0
    if has_lora and (shrunk.shape[0] != M or lora_B is None or lora_B.shape != (N, R)):
        raise ValueError(
            f"nf4_lora_matmul: S {tuple(shrunk.shape)} and B {tuple(lora_B.shape) if lora_B is not None else None} "
            f"don't fit an [{M}, {N}] output."
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"nf4_lora_matmul: bias has shape {tuple(bias.shape)}, expected ({N},).")
    out = torch.empty(M, N, device=x.device, dtype=out_dtype or x.dtype)
    if M == 0 or N == 0:
        return out
    nested = absmax_code is not None
    dot_dtype = dot_dtype or x.dtype
    block_m = max(MIN_DOT, min(64, next_power_of_2(M)))
    # Whole blocks per row (the usual case: K = 4096, blocksize 64) take the layout that reads each row's bytes as a
    # contiguous run and each scale once per block; the blocksize is then a power of two, as bitsandbytes' are.
    row_blocks = K % 2 == 0 and K % blocksize == 0 and blocksize & (blocksize - 1) == 0
    dummy = code
    args = (
        x,
        packed_bytes,
        absmax,
        code,
        absmax_code if nested else dummy,
        absmax_scale if nested else dummy,
        offset,
        shrunk if has_lora else dummy,
        lora_B if has_lora else dummy,
        bias if bias is not None else dummy,
        out,
        M,
        N,
        K,
        R,
        blocksize,
        absmax_blocksize,
        x.stride(0),
        x.stride(1),
        shrunk.stride(0) if has_lora else 0,
        shrunk.stride(1) if has_lora else 0,
        lora_B.stride(0) if has_lora else 0,
        lora_B.stride(1) if has_lora else 0,
        out.stride(0),
        out.stride(1),
    )
    meta = dict(
        NESTED=nested,
        INTERPRETED=x.device.type == "cpu",
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        ROW_BLOCKS=row_blocks,
        BLOCKSIZE=blocksize if row_blocks else 1,
        W_DTYPE=_TORCH_TO_TL[x.dtype],
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype],
        PRECISION=_precision(dot_dtype),
        BLOCK_M=block_m,
        BLOCK_R=_rank_block(min(R, 64)) if R else MIN_DOT,
    )
    if x.device.type == "cpu" or not row_blocks:
        # The interpreter is slow and autotuning would multiply that: one small config (BLOCK_K 64, so that weights
        # in blocks of 32 take two scales a tile, as GPU configs do). Off it, weights whose blocks straddle rows
        # (rare: K not a multiple of the blocksize) read nibble and scale per element, which takes a small tile
        # (32 x 64, 2 stages) to stay clear of spills.
        block_n, block_k, stages = (32, 64, 1) if x.device.type == "cpu" else (32, 64, 2)
        grid = (cdiv(N, block_n), cdiv(M, block_m))
        _nf4_lora_matmul_kernel[grid](
            *args, **meta, BLOCK_N=block_n, BLOCK_K=block_k, num_stages=stages, enable_fp_fusion=False
        )
    else:

        def grid(config):
            return (cdiv(N, config["BLOCK_N"]), cdiv(M, block_m))

        _nf4_lora_matmul_tuned[grid](*args, **meta, enable_fp_fusion=False)
    return out
