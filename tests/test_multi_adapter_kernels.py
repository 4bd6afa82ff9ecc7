"""Multi-adapter (SGMV) kernels against the torch reference and independent per-row math, the token layout, the
adapter bank's sync with the layer, and whole-model mixed batches on the triton backend.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): indexing, masking, tiling and
math are checked; tests marked `gpu` repeat the kernel check with real half-precision tensor-core math.
"""

from __future__ import annotations

import peft
import pytest
import torch
from models import tiny_llama
from tolerances import KERNEL, assert_close
from torch import nn

import peftfast
from peftfast import ops
from peftfast.tuners.lora.layer import Linear
from peftfast.utils.mixed_batch import BASE, DECODE_BLOCK_M, PREFILL_BLOCK_M, MixedBatch

pytest.importorskip("triton")
from peftfast.kernels import sgmv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = [1, 8, 16, 64]


class Packed:
    """Random adapters of the given ranks, as separate tensors and packed the way `LoraAdapterBank` packs them."""

    def __init__(self, K: int, N: int, ranks: list[int], with_bias: bool = False, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.A = [(torch.randn(r, K, generator=generator) * K**-0.5).to(DEVICE) for r in ranks]
        self.B = [(torch.randn(N, r, generator=generator) * r**-0.5).to(DEVICE) for r in ranks]
        self.bias = [torch.randn(N, generator=generator).to(DEVICE) for _ in ranks] if with_bias else None
        self.scale = [0.5 + i for i in range(len(ranks))]
        rows = torch.tensor([0, *ranks]).cumsum(0)[:-1].tolist()
        self.lora_A = torch.cat(self.A)
        self.lora_B_t = torch.cat([B.T for B in self.B]).contiguous()
        self.lora_B_bias = torch.stack(self.bias) if with_bias else None
        self.scaling = torch.tensor(self.scale, device=DEVICE)
        self.slot_spans = torch.tensor(list(zip(rows, ranks)), dtype=torch.int32, device=DEVICE)
        self.r_max = max(ranks)

    def batch(self, names: list[str]) -> MixedBatch:
        """A mixed batch of rows using `names`, over the adapters "a0".."a<n-1>"."""
        return MixedBatch(names, adapters=[f"a{i}" for i in range(len(self.A))])

    def args(self, batch: MixedBatch, tokens_per_row: int) -> tuple:
        """The kernel arguments after (y, x) for this batch; adapter "a<i>" is slot i."""
        layout = batch.layout(tokens_per_row, DEVICE)
        group_slot = torch.arange(len(batch.adapters), dtype=torch.int32, device=DEVICE)
        return (
            self.lora_A,
            self.lora_B_t,
            self.lora_B_bias,
            self.scaling,
            self.slot_spans,
            group_slot,
            layout.token_order,
            layout.tiles,
            layout.block_m,
            self.r_max,
        )

    def per_row(self, y: torch.Tensor, x: torch.Tensor, names: list[str], tokens_per_row: int) -> torch.Tensor:
        """Independent math in fp64: each row of tokens with its own adapter."""
        out = y.double().clone()
        for row, name in enumerate(names):
            if name == BASE:
                continue
            i = int(name[1:])
            rows = slice(row * tokens_per_row, (row + 1) * tokens_per_row)
            delta = x[rows].double() @ self.A[i].double().T @ self.B[i].double().T
            if self.bias is not None:
                delta = delta + self.bias[i].double()
            out[rows] += delta * self.scale[i]
        return out


def _popularity(kind: str, rows: int, n_adapters: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    if kind == "identical":
        picks = [n_adapters - 1] * rows
    elif kind == "distinct":
        picks = [row % n_adapters for row in range(rows)]
    elif kind == "uniform":
        picks = torch.randint(0, n_adapters, (rows,), generator=generator).tolist()
    else:  # zipf-skewed: adapter i drawn with weight 1 / (i + 1)
        weights = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64)
        picks = torch.multinomial(weights, rows, replacement=True, generator=generator).tolist()
    return [f"a{i}" for i in picks]


def _run(packed: Packed, names: list[str], tokens_per_row: int, K: int, N: int, dtype=torch.float32, **kwargs):
    M = len(names) * tokens_per_row
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    y = torch.randn(M, N, device=DEVICE).to(dtype)
    args = packed.args(packed.batch(names), tokens_per_row)
    got = sgmv.lora_multi_adapter(y.clone(), x, *args, **kwargs)
    reference = ops.reference.lora_multi_adapter(y.clone(), x, *args)
    return got, reference, packed.per_row(y, x, names, tokens_per_row), y


@pytest.mark.parametrize("kind", ["identical", "distinct", "uniform", "zipf"])
@pytest.mark.parametrize("tokens_per_row", [1, 5], ids=["decode", "prefill"])
def test_popularity_patterns_mixed_ranks(kind, tokens_per_row):
    K, N = 37, 45
    packed = Packed(K, N, RANKS)
    names = _popularity(kind, 19, len(RANKS))
    got, reference, exact, _ = _run(packed, names, tokens_per_row, K, N)
    assert_close(got, reference, kind="kernel")
    assert_close(got.double(), exact, kind="kernel", dtype=torch.float32)


@pytest.mark.parametrize("kind", ["identical", "distinct", "zipf"])
@pytest.mark.parametrize("tokens_per_row", [1, 3, 70], ids=["decode", "short", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_both_torch_formulations_match_per_row_math(kind, tokens_per_row, dtype):
    """The reference's two forms (tile by tile with static shapes, as traced by torch.compile and on a GPU; by
    adapter group, eagerly on a CPU) against independent fp64 math, with "__base__" rows and a lora_B bias."""
    K, N = 33, 21
    packed = Packed(K, N, RANKS, with_bias=True, seed=4)
    names = _popularity(kind, 9, len(RANKS), seed=5) + [BASE]
    M = len(names) * tokens_per_row
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    y = torch.randn(M, N, device=DEVICE).to(dtype)
    args = packed.args(packed.batch(names), tokens_per_row)
    exact = packed.per_row(y, x, names, tokens_per_row)
    by_tile = ops.reference._multi_adapter_by_tile(y.clone(), x, *args)
    by_group = ops.reference._multi_adapter_by_group(y.clone(), x, *args)
    assert_close(by_tile.double(), exact, kind="kernel", dtype=dtype)
    assert_close(by_group.double(), exact, kind="kernel", dtype=dtype)
    assert_close(by_tile, by_group, kind="kernel")


def test_rows_with_no_adapter_are_left_untouched():
    K, N = 23, 31
    packed = Packed(K, N, RANKS, with_bias=True)
    names = ["a2", BASE, "a0", BASE, "a3", "a1", BASE]
    got, reference, exact, y = _run(packed, names, 3, K, N)
    for row, name in enumerate(names):
        if name == BASE:
            assert torch.equal(got[row * 3 : row * 3 + 3], y[row * 3 : row * 3 + 3])
    assert_close(got, reference, kind="kernel")
    assert_close(got.double(), exact, kind="kernel", dtype=torch.float32)
    everything_base, _, _, y = _run(packed, [BASE] * 4, 2, K, N)
    assert torch.equal(everything_base, y)


@pytest.mark.parametrize("K, N", [(123, 5), (7, 130), (64, 33)], ids=lambda v: str(v))
def test_odd_hidden_sizes(K, N):
    packed = Packed(K, N, RANKS)
    got, reference, exact, _ = _run(packed, _popularity("uniform", 9, 4, seed=3), 2, K, N)
    assert_close(got, reference, kind="kernel")
    assert_close(got.double(), exact, kind="kernel", dtype=torch.float32)


@pytest.mark.parametrize("tokens_per_row", [1, 7])
def test_batch_of_one(tokens_per_row):
    packed = Packed(29, 17, RANKS)
    got, reference, exact, _ = _run(packed, ["a3"], tokens_per_row, 29, 17)
    assert_close(got, reference, kind="kernel")
    assert_close(got.double(), exact, kind="kernel", dtype=torch.float32)


def test_long_prefill_segments_ranks_above_one_block_and_split_k():
    """Rows of 70 tokens use 64-token tiles; rank 80 spans two rank blocks; split-K adds partial sums atomically."""
    K, N = 70, 21
    packed = Packed(K, N, [3, 80])
    names = ["a1", "a0"]
    batch = packed.batch(names)
    assert batch.layout(70, DEVICE).block_m == PREFILL_BLOCK_M
    for split_k in (1, 2):
        x = torch.randn(140, K, device=DEVICE)
        args = packed.args(batch, 70)
        shrunk = sgmv.lora_shrink_sgmv(x, *args[:1], *args[4:10], split_k=split_k)
        expected = ops.reference.lora_shrink_sgmv(x, *args[:1], *args[4:10])
        assert_close(shrunk, expected, kind="kernel")
    got, reference, exact, _ = _run(packed, names, 70, K, N)
    assert_close(got, reference, kind="kernel")
    assert_close(got.double(), exact, kind="kernel", dtype=torch.float32)


def test_shrink_and_expand_match_their_twins():
    K, N = 41, 27
    packed = Packed(K, N, RANKS, with_bias=True)
    names = _popularity("zipf", 11, 4, seed=1) + [BASE]
    x = torch.randn(len(names) * 2, K, device=DEVICE)
    y = torch.randn(len(names) * 2, N, device=DEVICE)
    lora_A, lora_B_t, lora_B_bias, scaling, *layout_args = packed.args(packed.batch(names), 2)
    layout_args = layout_args[:-1]  # r_max goes to shrink only
    shrunk = sgmv.lora_shrink_sgmv(x, lora_A, *layout_args, packed.r_max)
    assert_close(shrunk, ops.reference.lora_shrink_sgmv(x, lora_A, *layout_args, packed.r_max), kind="kernel")
    got = sgmv.lora_expand_sgmv(y.clone(), shrunk, lora_B_t, lora_B_bias, scaling, *layout_args)
    expected = ops.reference.lora_expand_sgmv(y.clone(), shrunk, lora_B_t, lora_B_bias, scaling, *layout_args)
    assert_close(got, expected, kind="kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_with_fp32_adapters(dtype):
    """Error against fp64 math at most ~2x the error of the reference (the same math in torch) plus the table's."""
    K, N = 45, 38
    packed = Packed(K, N, RANKS)
    got, reference, exact, _ = _run(packed, _popularity("uniform", 13, 4, seed=2), 3, K, N, dtype=dtype)
    assert got.dtype == dtype
    kernel_error = (got.double() - exact).abs().max().item()
    torch_error = (reference.double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error + KERNEL[dtype]["atol"]


def test_grid_is_fixed_by_shapes_not_by_the_adapter_mix():
    shapes = set()
    adapters = [f"a{i}" for i in range(32)]
    for kind in ("identical", "distinct", "uniform", "zipf"):
        layout = MixedBatch(_popularity(kind, 32, 32), adapters).layout(1, DEVICE)
        assert layout.block_m == DECODE_BLOCK_M
        shapes.add(tuple(layout.tiles.shape))
        # every token of an adapter is in exactly one tile of its group
        covered = sorted(p for _, start, end in layout.tiles.tolist() for p in range(start, end))
        assert covered == list(range(32))
    assert shapes == {(2 + 32, 3)}


def test_public_op_dispatches_by_backend():
    packed = Packed(12, 10, [4, 8])
    batch = packed.batch(["a1", "a0", BASE])
    x, y = torch.randn(6, 12, device=DEVICE), torch.randn(6, 10, device=DEVICE)
    with ops.use_backend("triton"):
        got = ops.lora_multi_adapter(y.clone(), x, *packed.args(batch, 2))
    assert ops.last_backend("lora_multi_adapter") == "triton"
    with ops.use_backend("torch"):
        expected = ops.lora_multi_adapter(y.clone(), x, *packed.args(batch, 2))
    assert ops.last_backend("lora_multi_adapter") == "torch"
    assert_close(got, expected, kind="kernel")


# Whole models. Adapters of different ranks and target modules, one with a lora_B bias; created with HF PEFT and saved,
# so that the same files load into HF PEFT and peftfast.
LLAMA_ADAPTERS = {
    "red": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "green": dict(r=16, lora_alpha=3, target_modules=["k_proj", "up_proj", "v_proj"], use_rslora=True),
    "blue": dict(r=1, lora_alpha=2, target_modules=["q_proj", "o_proj", "gate_proj"], lora_bias=True),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_adapter")
    torch.manual_seed(1)
    names = list(LLAMA_ADAPTERS)
    config = peft.LoraConfig(init_lora_weights=False, **LLAMA_ADAPTERS[names[0]])
    model = peft.get_peft_model(tiny_llama(), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **LLAMA_ADAPTERS[name]))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name and param_name.endswith(".bias"):
                param.add_(torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def _load(lib, folder, names=tuple(LLAMA_ADAPTERS)):
    model = lib.PeftModel.from_pretrained(tiny_llama(), folder / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    return model.eval()


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _ids(batch, length, seed=5):
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kernel_backends(model, run) -> tuple[torch.Tensor, set[str]]:
    """The backends the LoRA Linear layers that did LoRA work in `run()` ran on."""
    layers = [module for module in model.modules() if isinstance(module, Linear)]
    for layer in layers:
        layer.last_backend = None
    result = run()
    return result, {layer.last_backend for layer in layers} - {None}


def _per_row(model, ids, names):
    """Each row alone through the single-adapter path (which reads the layers' own weights, not the bank)."""
    rows = []
    with ops.use_backend("torch"):
        for row, name in enumerate(names):
            if name == BASE:
                with model.disable_adapter():
                    rows.append(_logits(model, ids[row : row + 1]))
            else:
                model.set_adapter(name)
                rows.append(_logits(model, ids[row : row + 1]))
    return torch.cat(rows)


def _check_mixed(model, ids, names):
    """Mixed batch on the kernels == torch backend == per-row runs; returns the mixed logits."""
    with ops.use_backend("triton"):
        mixed, backends = _kernel_backends(model, lambda: _logits(model, ids, adapter_names=names))
    assert backends == {"triton"}
    with ops.use_backend("torch"):
        assert_close(mixed, _logits(model, ids, adapter_names=names), kind="kernel")
    assert_close(mixed, _per_row(model, ids, names), kind="kernel")
    return mixed


@pytest.mark.cpu_kernels
def test_whole_model_forward_matches_torch_backend_per_row_runs_and_peft(llama_dir):
    ids = _ids(5, 6)
    names = ["green", BASE, "blue", "red", "green"]
    model = _load(peftfast, llama_dir)
    mixed = _check_mixed(model, ids, names)
    assert_close(mixed, _logits(_load(peft, llama_dir), ids, adapter_names=names), kind="kernel")
    # The adapters change the output (so the comparisons above can fail); "__base__" rows don't.
    base = _logits(tiny_llama(), ids)
    assert_close(mixed[1], base[1], kind="kernel")
    assert not any(torch.allclose(mixed[row], base[row], atol=1e-3) for row in (0, 2, 3))


@pytest.mark.cpu_kernels
def test_whole_model_greedy_generate_matches_torch_backend_and_per_row_runs(llama_dir):
    ids = _ids(4, 4, seed=11)
    names = ["blue", "red", BASE, "green"]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = _load(peftfast, llama_dir)
    with ops.use_backend("triton"):
        generated, backends = _kernel_backends(
            model, lambda: model.generate(input_ids=ids, adapter_names=names, **settings)
        )
    assert backends == {"triton"}
    with ops.use_backend("torch"):
        assert torch.equal(generated, model.generate(input_ids=ids, adapter_names=names, **settings))
        for row, name in enumerate(names):
            if name == BASE:
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[row : row + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row : row + 1], **settings)
            assert torch.equal(generated[row : row + 1], alone)
        with model.disable_adapter():
            assert not torch.equal(generated, model.generate(input_ids=ids, **settings))


def _attention(model, projection: str) -> Linear:
    return getattr(model.base_model.model.model.layers[0].self_attn, projection)


@pytest.mark.cpu_kernels
def test_mixed_batches_follow_added_deleted_and_rescaled_adapters(llama_dir):
    """Weight writes of every kind are tests/test_bank_staleness.py's; here the adapter set and scalings change."""
    ids = _ids(3, 3)
    model = _load(peftfast, llama_dir, names=("red", "blue"))
    _check_mixed(model, ids, ["red", "blue", BASE])
    model.load_adapter(llama_dir / "green", adapter_name="green")
    _check_mixed(model, ids, ["green", "red", "blue"])
    _attention(model, "q_proj").set_scale("red", 0.25)
    _check_mixed(model, ids, ["blue", "red", "green"])
    model.delete_adapter("green")
    _check_mixed(model, ids, ["red", BASE, "blue"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tensor_core_math_decode_and_prefill(dtype):
    K, N = 4096, 4096
    packed = Packed(K, N, [8, 16, 64, 16] * 8)
    for tokens_per_row, rows in ((1, 256), (128, 16)):
        names = _popularity("zipf", rows, 32)
        got, reference, exact, _ = _run(packed, names, tokens_per_row, K, N, dtype=dtype)
        assert (got.double() - exact).abs().max() <= 2 * (reference.double() - exact).abs().max() + 1e-3


@pytest.mark.gpu
def test_gpu_bf16_layer_packs_a_bf16_bank_and_matches_per_row_runs():
    base = nn.Sequential(nn.Linear(256, 384, bias=False)).to("cuda", torch.bfloat16)
    config = peftfast.LoraConfig(r=16, target_modules=["0"], init_lora_weights=False)
    model = peftfast.get_peft_model(base, config, adapter_name="a0").eval()
    model.add_adapter("a1", peftfast.LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(6, 256, device="cuda", dtype=torch.bfloat16)
    names = ["a1", "a0", BASE, "a1", "a0", "a0"]
    with torch.no_grad(), ops.use_backend("triton"):
        mixed = model(x, adapter_names=names)
        layer = model.base_model.model[0]
        assert layer.adapter_bank().pack(
            layer, ("a0", "a1"), ops.multi_adapter_bank_dtype(x), x.device
        ).lora_A.dtype == (torch.bfloat16)
        for row, name in enumerate(names):
            if name == BASE:
                with model.disable_adapter():
                    alone = model(x[row : row + 1])
            else:
                model.set_adapter(name)
                alone = model(x[row : row + 1])
            assert_close(mixed[row : row + 1], alone, kind="kernel")
