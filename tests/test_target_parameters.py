"""LoRA on parameters (`target_parameters`), MoE experts above all: the grouped op and its kernels against a per-row
formula, and whole MoE blocks of transformers' Mixtral, Qwen2-MoE and gpt-oss against HF PEFT (outputs, gradients,
state_dict keys, files both ways, several adapters, merging), plus what both refuse.

The kernels run in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), which checks indexing, tiling and
math, not GPU numerics.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tolerances import KERNEL, assert_close
from torch import nn

import peftfast
from peftfast import ops
from peftfast.tuners.lora.param_wrapper import ParamWrapper

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


# ------------------------------------------------------------------------------------------------ the op and kernels


def _per_row_reference(x, weight, bias, sizes, lora_A, lora_B, scaling, transposed):
    """y[t] = x[t] W_e(t)^T + b_e(t) + sum_i s_i x[t] A_i[e(t)]^T B_i[e(t)]^T, every row on its own expert's gathered
    matrices (independent of the grouping the op uses)."""
    experts = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    w = weight[experts]
    y = torch.einsum("si,sio->so", x, w) if transposed else torch.einsum("si,soi->so", x, w)
    if bias is not None:
        y = y + bias[experts]
    for A, B, s in zip(lora_A, lora_B, scaling):
        y = y + s * torch.einsum("sr,sor->so", torch.einsum("si,sri->sr", x, A[experts]), B[experts])
    return y


class _Problem:
    """x sorted by expert, stacked expert weights, and adapters stored as HF PEFT stores them (A [E*r, in], B
    [out, r*E]) with the op's views of them (A [E, r, in], B [E, out, r])."""

    def __init__(self, sizes, d_in, d_out, ranks, dtype=torch.float32, transposed=False, bias=True, seed=0):
        generator = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=1.0):
            return torch.randn(*shape, generator=generator) * scale

        E = len(sizes)
        self.sizes, self.transposed, self.num_experts = sizes, transposed, E
        self.offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
        self.x = rand(sum(sizes), d_in).to(dtype).requires_grad_()
        shape = (E, d_in, d_out) if transposed else (E, d_out, d_in)
        self.weight = rand(*shape, scale=d_in**-0.5).to(dtype).requires_grad_()
        self.bias = rand(E, d_out).to(dtype).requires_grad_() if bias else None
        self.A = [rand(E * r, d_in, scale=d_in**-0.5).requires_grad_() for r in ranks]
        self.B = [rand(d_out, r * E, scale=r**-0.5).requires_grad_() for r in ranks]
        self.scaling = [0.5 + i for i in range(len(ranks))]
        self.grad_y = rand(sum(sizes), d_out)

    def views(self, dtype=None):
        E = self.num_experts
        A = [a.view(E, -1, a.shape[1]) for a in self.A]
        B = [b.view(b.shape[0], -1, E).permute(2, 0, 1) for b in self.B]
        if dtype is not None:
            A, B = [a.to(dtype) for a in A], [b.to(dtype) for b in B]
        return A, B

    def leaves(self):
        return [t for t in (self.x, self.weight, self.bias, *self.A, *self.B) if t is not None]

    def run(self, backend):
        A, B = self.views()
        with ops.use_backend(backend):
            y = ops.moe_lora_linear(self.x, self.weight, self.bias, self.offsets, A, B, self.scaling, self.transposed)
        assert ops.last_backend("moe_lora_linear") == backend
        leaves = [t for t in self.leaves() if t.requires_grad]
        return [y, *torch.autograd.grad(y, leaves, self.grad_y.to(y.dtype))]

    def exact(self):
        """The per-row formula in fp64, forward and gradients."""
        leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in self.leaves()]
        x, weight, *rest = leaves
        bias = rest.pop(0) if self.bias is not None else None
        n = len(self.A)
        E = self.num_experts
        A = [a.view(E, -1, a.shape[1]) for a in rest[:n]]
        B = [b.view(b.shape[0], -1, E).permute(2, 0, 1) for b in rest[n:]]
        y = _per_row_reference(x, weight, bias, self.sizes, A, B, self.scaling, self.transposed)
        wanted = [t for t in leaves if t.requires_grad]
        return [y, *torch.autograd.grad(y, wanted, self.grad_y.double())]


CASES = [
    # sizes per expert (some experts get no rows), d_in, d_out, ranks
    ([9, 0, 13, 1, 14], 33, 45, [7]),
    ([5, 17, 3], 19, 70, [1, 16]),
    ([0, 0, 21, 0], 40, 23, [20]),
    ([31], 17, 9, [3]),
]


@pytest.mark.parametrize("case", CASES, ids=["gaps", "two-adapters", "one-busy-expert", "one-expert"])
@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_op_matches_the_per_row_formula_on_both_backends(case, transposed):
    sizes, d_in, d_out, ranks = case
    problem = _Problem(sizes, d_in, d_out, ranks, transposed=transposed)
    exact = problem.exact()
    for backend in ("torch", "triton"):
        for got, want in zip(problem.run(backend), exact):
            torch.testing.assert_close(got.double(), want, **KERNEL[torch.float32])


def test_op_rank_above_one_block_and_frozen_base():
    # Rank 70 spans two rank blocks of 64 in the kernels; a frozen base weight and bias get no gradient.
    problem = _Problem([6, 11], 24, 18, [70], bias=True)
    problem.weight.requires_grad_(False)
    problem.bias.requires_grad_(False)
    exact = problem.exact()
    for backend in ("torch", "triton"):
        got = problem.run(backend)
        assert len(got) == len(exact) == 4  # y, dx, dA, dB
        for actual, expected in zip(got, exact):
            torch.testing.assert_close(actual.double(), expected, **KERNEL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("adapter_dtype", ["fp32", "same"])
def test_half_precision_within_twice_torch_error(dtype, adapter_dtype):
    """Error against fp64 at most ~2x what torch itself makes doing the whole op in `dtype` (fp32 adapters: the
    LoRA branch in fp32 as HF PEFT's autocast_adapter_dtype leaves it)."""
    problem = _Problem([7, 0, 12, 5], 40, 28, [6], dtype=dtype, bias=True)
    problem.weight.requires_grad_(False)
    if adapter_dtype == "same":
        problem.A = [a.detach().to(dtype).requires_grad_() for a in problem.A]
        problem.B = [b.detach().to(dtype).requires_grad_() for b in problem.B]
    exact = problem.exact()
    A, B = problem.views(dtype)
    in_dtype = ops.reference.moe_lora_linear(
        problem.x, problem.weight, problem.bias, problem.offsets, A, B, problem.scaling, False
    )
    torch_error = (in_dtype.double() - exact[0]).abs().max().item()
    for backend in ("torch", "triton"):
        got = problem.run(backend)
        assert got[0].dtype == dtype
        assert (got[0].double() - exact[0]).abs().max().item() <= 2 * torch_error + KERNEL[dtype]["atol"]
        for actual, expected in zip(got[1:], exact[1:]):
            scale = expected.abs().max().item()
            assert (actual.double() - expected).abs().max().item() <= KERNEL[dtype]["rtol"] * scale + 1e-3


def test_op_edge_cases():
    # No rows at all.
    problem = _Problem([0, 0, 0], 8, 6, [4])
    for backend in ("torch", "triton"):
        A, B = problem.views()
        with ops.use_backend(backend):
            y = ops.moe_lora_linear(problem.x, problem.weight, problem.bias, problem.offsets, A, B, [1.0], False)
        assert y.shape == (0, 6)
    # No adapter: the grouped base product alone.
    problem = _Problem([3, 4], 8, 6, [])
    y = ops.moe_lora_linear(problem.x, problem.weight, problem.bias, problem.offsets, [], [], [], False)
    assert_close(y.double(), problem.exact()[0], dtype=torch.float32)
    # Offsets that don't cover x, or go down, name the problem.
    for offsets in ([3, 5], [4, 3]):
        with pytest.raises(ValueError, match="cumulative row counts"):
            ops.moe_lora_linear(
                problem.x, problem.weight, None, torch.tensor(offsets, dtype=torch.int32), [], [], [], False
            )


def test_group_tiles_cover_each_row_once_inside_its_group():
    from peftfast.kernels import moe_lora as kernels

    sizes = [0, 5, 33, 0, 16, 1]
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    tiles = kernels.group_tiles(offsets, sum(sizes), block_m=16)
    assert tiles.shape == (-(-sum(sizes) // 16) + len(sizes), 3)
    owner = torch.full((sum(sizes),), -1)
    starts = [0, *offsets.tolist()[:-1]]
    for group, start, end in tiles.tolist():
        if group < 0:
            continue
        assert 0 < end - start <= 16 and starts[group] <= start and end <= offsets[group]
        assert (owner[start:end] == -1).all()
        owner[start:end] = group
    assert (owner == torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))).all()


def test_custom_op_traces_under_torch_compile():
    from peftfast.ops import moe_lora

    problem = _Problem([4, 0, 5], 16, 12, [3], bias=False)
    A, B = problem.views()
    base = torch.randn(9, 12)

    def lora_term(base, x):
        return moe_lora.moe_lora_add_fwd(base, x, problem.offsets, A, B, [2.0], "fused")[0]

    compiled = torch.compile(lora_term, backend="aot_eager", fullgraph=True)
    assert_close(compiled(base, problem.x.detach()), lora_term(base, problem.x.detach()), kind="kernel")


@pytest.mark.gpu
def test_gpu_tensor_core_math_large_shape():
    """On a GPU: bf16 dots in the kernels, fp32 adapters, rows per expert uneven, within ~2x torch's own bf16 error."""
    sizes = [700, 0, 64, 1, 1283, 333, 19, 1700]
    problem = _Problem(sizes, 1024, 1536, [16], dtype=torch.bfloat16)
    problem.weight.requires_grad_(False)
    for name in ("x", "weight", "bias", "grad_y"):
        setattr(problem, name, getattr(problem, name).detach().cuda().requires_grad_(name == "x"))
    problem.A = [a.detach().cuda().requires_grad_() for a in problem.A]
    problem.B = [b.detach().cuda().requires_grad_() for b in problem.B]
    problem.offsets = problem.offsets.cuda()
    exact = problem.exact()
    A, B = problem.views(torch.bfloat16)
    in_bf16 = ops.reference.moe_lora_linear(
        problem.x, problem.weight, problem.bias, problem.offsets, A, B, problem.scaling, False
    )
    got = problem.run("triton")
    assert (got[0].double() - exact[0]).abs().max() <= 2 * (in_bf16.double() - exact[0]).abs().max() + 1e-2
    for actual, expected in zip(got[1:], exact[1:]):
        assert (actual.double() - expected).abs().max() <= 3e-2 * expected.abs().max() + 1e-2


# ------------------------------------------------------------------------------------------- MoE blocks vs HF PEFT


def _mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=24, intermediate_size=17, num_local_experts=5, num_experts_per_tok=2)
    )


def _qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = Qwen2MoeConfig(
        hidden_size=24,
        moe_intermediate_size=13,
        shared_expert_intermediate_size=19,
        num_experts=6,
        num_experts_per_tok=3,
    )
    return Qwen2MoeSparseMoeBlock(config)


def _gpt_oss():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    return GptOssMLP(GptOssConfig(hidden_size=24, intermediate_size=15, num_local_experts=4, num_experts_per_tok=2))


BLOCKS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "gpt_oss": _gpt_oss}


def _block(name, seed=0, implementation="eager", dtype=torch.float32):
    torch.manual_seed(seed)
    block = BLOCKS[name]()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3)
    _set_experts_implementation(block, implementation)
    return block.to(dtype)


def _set_experts_implementation(model, implementation):
    # HF PEFT's parametrized weights go through whichever implementation the config names; peftfast's grouped forward
    # replaces it, so both are compared against the same (eager) HF PEFT.
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = implementation


def _output(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def _forward_and_grads(model, x, grad):
    x = x.detach().requires_grad_()
    y = _output(model, x)
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    grads = torch.autograd.grad(
        y, [x] + [param for name, param in model.named_parameters() if param.requires_grad], grad
    )
    return y, dict(zip(["x", *names], grads))


def _pair(name, config_kwargs, implementation="eager", seed=0):
    base = _block(name, seed)
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs))
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(**config_kwargs))
    _set_experts_implementation(ours, implementation)
    ours.load_state_dict(hf_model.state_dict())
    return base, hf_model, ours


def _lora_kwargs(**overrides):
    kwargs = dict(r=3, lora_alpha=5, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    "name, implementation, extra",
    [
        ("mixtral", "eager", {}),
        ("mixtral", "grouped_mm", {}),
        ("qwen2_moe", "eager", {"target_modules": ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"]}),
        ("gpt_oss", "grouped_mm", {"target_parameters": [*TARGETS, "experts.gate_up_proj_bias"]}),
    ],
    ids=["mixtral", "mixtral-grouped_mm", "qwen2_moe-with-target_modules", "gpt_oss-with-a-bias"],
)
def test_moe_block_matches_hf_peft(name, implementation, extra):
    base, hf_model, ours = _pair(name, _lora_kwargs(**extra), implementation)
    assert sorted(hf_model.state_dict()) == sorted(ours.state_dict())
    assert repr(ours).count("lora.ParamWrapper(") == repr(hf_model).count("lora.ParamWrapper(")
    assert ours.get_nb_trainable_parameters() == hf_model.get_nb_trainable_parameters()
    x = torch.randn(2, 7, 24)
    grad = torch.randn(2, 7, 24)
    y_hf, grads_hf = _forward_and_grads(hf_model, x, grad)
    y, grads = _forward_and_grads(ours, x, grad)
    assert_close(y, y_hf, kind="kernel")
    assert grads.keys() == grads_hf.keys()
    for key in grads:
        assert_close(grads[key], grads_hf[key], kind="kernel")
    experts = ours.base_model.model.experts
    assert isinstance(experts, ParamWrapper) and experts.last_backend == experts.base_layer.last_backend == "torch"
    # Disabled, the experts module runs its own implementation; transformers' grouped_mm needs 16-byte aligned rows on
    # CPU, which these odd sizes don't have.
    _set_experts_implementation(ours, "eager")
    with ours.disable_adapter():
        assert_close(_output(ours, x), _output(base, x), kind="exact")


def test_bf16_block_at_least_as_accurate_as_hf_peft():
    """bf16 experts with fp32 adapters (autocast_adapter_dtype), routing fixed: error against the fp64 truth within
    2x HF PEFT's (which rounds W + delta to bf16 before the product), forward and gradients."""
    base = _block("mixtral", seed=1)
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_lora_kwargs()))
    truth = copy.deepcopy(hf_model).double()
    hf_model.to(torch.bfloat16)
    peft.tuners.tuners_utils.cast_adapter_dtype(hf_model, "default")
    ours = peftfast.get_peft_model(copy.deepcopy(base).to(torch.bfloat16), peftfast.LoraConfig(**_lora_kwargs()))
    ours.load_state_dict(hf_model.state_dict())
    assert ours.base_model.model.experts.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(14, 24)
    top_k_index = torch.stack([torch.randperm(5)[:2] for _ in range(14)])
    top_k_weights = torch.softmax(torch.randn(14, 2), dim=-1)
    grad = torch.randn(14, 24)

    def run(model, dtype):
        experts = model.base_model.model.experts
        leaf = x.to(dtype).requires_grad_()
        y = experts(leaf, top_k_index, top_k_weights.to(dtype))
        params = [p for p in model.parameters() if p.requires_grad]
        return [y, *torch.autograd.grad(y, [leaf, *params], grad.to(dtype))]

    exact, hf_results, got = run(truth, torch.float64), run(hf_model, torch.bfloat16), run(ours, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    for actual, reference, want in zip(got, hf_results, exact):
        hf_error = (reference.double() - want).abs().max().item()
        assert (actual.double() - want).abs().max().item() <= 2 * hf_error + 1e-3


def test_files_interchangeable_with_hf_peft_both_ways(tmp_path):
    config = _lora_kwargs(rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 7})
    base = _block("gpt_oss")
    x = torch.randn(3, 5, 24)

    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(TARGETS) and saved["target_modules"] == []
    loaded_by_hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(_output(loaded_by_hf, x), _output(ours, x), kind="kernel")

    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    hf_model.save_pretrained(tmp_path / "hf")
    assert load_file(tmp_path / "hf" / "adapter_model.safetensors").keys() == (
        load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    )
    for low_cpu_mem_usage in (False, True):
        loaded = peftfast.PeftModel.from_pretrained(
            copy.deepcopy(base), tmp_path / "hf", low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert_close(_output(loaded, x), _output(hf_model, x), kind="kernel")


def test_several_adapters_switching_and_together():
    base, hf_model, ours = _pair("mixtral", _lora_kwargs())
    for model, lib in ((hf_model, peft), (ours, peftfast)):
        torch.manual_seed(5)
        model.add_adapter("other", lib.LoraConfig(**_lora_kwargs(r=4, lora_alpha=3)))
    ours.load_state_dict(hf_model.state_dict())
    x = torch.randn(2, 6, 24)
    grad = torch.randn(2, 6, 24)
    for active in ("other", ["default", "other"], "default"):
        hf_model.base_model.set_adapter(active)
        ours.base_model.set_adapter(active)
        y_hf, grads_hf = _forward_and_grads(hf_model, x, grad)
        y, grads = _forward_and_grads(ours, x, grad)
        assert_close(y, y_hf, kind="kernel")
        assert grads.keys() == grads_hf.keys()
        for key in grads:
            assert_close(grads[key], grads_hf[key], kind="kernel")
    for model in (hf_model, ours):
        model.delete_adapter("other")
    assert sorted(hf_model.state_dict()) == sorted(ours.state_dict())
    assert_close(_output(ours, x), _output(hf_model, x), kind="kernel")


def test_a_second_adapter_must_target_the_same_parameters():
    base = _block("mixtral")
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(**_lora_kwargs()))
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    with pytest.raises(ValueError, match="must target the same parameters"):
        ours.add_adapter("other", peftfast.LoraConfig(**_lora_kwargs(target_parameters=["experts.down_proj"])))
    assert ours.state_dict().keys() == before.keys()
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_lora_kwargs()))
    with pytest.raises(ValueError, match="same set of parameters"):
        hf_model.add_adapter("other", peft.LoraConfig(**_lora_kwargs(target_parameters=["experts.down_proj"])))


def test_merge_unmerge_and_merge_and_unload_as_hf_peft():
    base, hf_model, ours = _pair("qwen2_moe", _lora_kwargs(target_modules=["gate_proj"]))
    x = torch.randn(2, 6, 24)
    expected = _output(hf_model, x)
    original = {key: value.clone() for key, value in ours.state_dict().items()}
    ours.merge_adapter()
    experts = ours.base_model.model.experts
    assert experts.merged and experts.base_layer.merged
    assert_close(_output(ours, x), expected, kind="kernel")
    ours.unmerge_adapter()
    for key, value in ours.state_dict().items():
        assert_close(value, original[key], kind="kernel")
    assert_close(_output(ours, x), expected, kind="kernel")

    merged = ours.merge_and_unload()
    merged_hf = hf_model.merge_and_unload()
    assert not any(isinstance(module, ParamWrapper) for module in merged.modules())
    assert merged.state_dict().keys() == merged_hf.state_dict().keys()
    for key, value in merged.state_dict().items():
        assert_close(value, merged_hf.state_dict()[key], kind="kernel")
    assert_close(_output(merged, x), expected, kind="kernel")


def test_safe_merge_refuses_a_broken_adapter_and_changes_nothing():
    _, _, ours = _pair("mixtral", _lora_kwargs())
    with torch.no_grad():
        ours.base_model.model.experts.base_layer.lora_B["default"].weight[0, 0] = float("nan")
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    with pytest.raises(ValueError, match="gate_up_proj"):
        ours.merge_adapter(safe_merge=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True, atol=0, rtol=0)


def _tiny_causal_lm(kind):
    import transformers

    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=12, num_local_experts=3, num_experts_per_tok=2, **common)
        model_cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2, **common)
        model_cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("mixtral", dict(target_parameters=TARGETS, rank_pattern={"layers.1.mlp.experts.down_proj": 5})),
        ("mixtral", dict(target_modules=["w1", "w2", "w3", "q_proj"])),
        ("qwen3_moe", dict(target_modules="all-linear")),
    ],
    ids=["mixtral-parameters", "mixtral-v4-names", "qwen3_moe-all-linear"],
)
def test_whole_moe_models_target_and_compute_as_hf_peft(kind, kwargs):
    """On transformers v5 MoE models HF PEFT rewrites the config first (v4 expert names become target_parameters,
    gate_up_proj's rank and alpha double, target_modules=None means none); then the rank pattern reaches parameters,
    the router weight (`gate` -> gate.weight) is a 2-D parameter target, and attention layers stay modules."""
    base = _tiny_causal_lm(kind)
    kwargs = dict(kwargs, init_lora_weights=False)
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(**kwargs))
    for field in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
        value, expected = getattr(ours.peft_config["default"], field), getattr(hf_model.peft_config["default"], field)
        assert (sorted(value) if isinstance(value, set) else value) == (
            sorted(expected) if isinstance(expected, set) else expected
        ), field
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf_model.state_dict().items()}
    ours.load_state_dict(hf_model.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    logits_hf, logits = hf_model(input_ids=ids).logits, ours(input_ids=ids).logits
    assert_close(logits, logits_hf, kind="kernel")
    grad = torch.randn_like(logits)
    grads_hf = torch.autograd.grad(logits_hf, [p for p in hf_model.parameters() if p.requires_grad], grad)
    grads = torch.autograd.grad(logits, [p for p in ours.parameters() if p.requires_grad], grad)
    for actual, expected in zip(grads, grads_hf):
        assert_close(actual, expected, kind="kernel")


def test_adapter_of_v4_per_expert_layers_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    base = _tiny_causal_lm("mixtral")
    config = peftfast.LoraConfig(r=2, target_modules=["w1", "w2", "w3"])
    config.save_pretrained(tmp_path)
    prefix = "base_model.model.model.layers.0.mlp.experts.0"
    save_file(
        {f"{prefix}.w1.lora_A.weight": torch.zeros(2, 16), f"{prefix}.w1.lora_B.weight": torch.zeros(12, 2)},
        tmp_path / "adapter_model.safetensors",
    )
    before = repr(base)
    with pytest.raises(NotImplementedError, match="transformers v4 MoE model"):
        peftfast.PeftModel.from_pretrained(base, tmp_path)
    assert repr(base) == before


# ------------------------------------------------------------------------- parameters outside transformers' experts


class _PlainExperts(nn.Module):
    """3-D expert weights used by a forward of its own (no transformers experts contract), as Llama-4's experts:
    tokens pre-bucketed per expert, one batched product per projection."""

    def __init__(self, experts=3, hidden=10, inner=7):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inner) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, inner, hidden) * 0.3)

    def forward(self, x):
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(nn.functional.silu(gate) * up, self.down_proj)


class _Mix(nn.Module):
    """A 2-D parameter used by its module's own forward (LoRA on a parameter acts while its module runs)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 10) * 0.3)

    def forward(self, h):
        return torch.tanh(h @ self.weight.T)


class _ParamsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = _PlainExperts()
        self.mix = _Mix()
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.mix(self.experts(x)))


def test_parameters_of_other_modules_use_hf_peft_formulation():
    torch.manual_seed(0)
    base = _ParamsModel()
    kwargs = _lora_kwargs(target_modules=["head"], target_parameters=[*TARGETS, "mix.weight"])
    hf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(**kwargs))
    assert sorted(hf_model.state_dict()) == sorted(ours.state_dict())
    ours.load_state_dict(hf_model.state_dict())
    x = torch.randn(3, 4, 10)
    grad = torch.randn(3, 4, 4)
    y_hf, grads_hf = _forward_and_grads(hf_model, x, grad)
    y, grads = _forward_and_grads(ours, x, grad)
    assert_close(y, y_hf, kind="kernel")
    for key in grads_hf:
        assert_close(grads[key], grads_hf[key], kind="kernel")
    ours.merge_adapter()
    assert_close(_output(ours, x), y_hf, kind="kernel")


# ------------------------------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"lora_bias": True}, "lora_bias"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"alora_invocation_tokens": [3, 4]}, "LoRA variants"),
        (
            {"target_parameters": ["shared_expert_gate.weight"], "target_modules": ["shared_expert_gate"]},
            "adapter layer already",
        ),
    ],
    ids=["dropout", "lora_bias", "fan_in_fan_out", "alora", "module-and-its-parameter"],
)
def test_refused_like_hf_peft_and_model_left_unchanged(overrides, message):
    base = _block("qwen2_moe")
    before = copy.deepcopy(base)
    with pytest.raises((ValueError, TypeError), match=message):
        peftfast.get_peft_model(base, peftfast.LoraConfig(**_lora_kwargs(**overrides)))
    assert repr(base) == repr(before)
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(copy.deepcopy(before), peft.LoraConfig(**_lora_kwargs(**overrides)))


def test_a_failure_on_a_later_parameter_undoes_the_earlier_ones():
    torch.manual_seed(0)
    model = _ParamsModel()
    model.conv = nn.Conv2d(2, 3, 3)  # a 4-D weight: refused, after the experts' weights were wrapped
    before = repr(model)
    config = peftfast.LoraConfig(**_lora_kwargs(target_parameters=[*TARGETS, "conv.weight"]))
    with pytest.raises(ValueError, match=r"'conv.weight'.*only 2-D"):
        peftfast.get_peft_model(model, config)
    assert repr(model) == before and not any(isinstance(m, ParamWrapper) for m in model.modules())


def test_bad_targets_and_calls_are_named():
    with pytest.raises(TypeError, match="list of parameter names"):
        peftfast.LoraConfig(target_parameters="experts.gate_up_proj")
    with pytest.raises(ValueError, match="Neither target_modules"):
        peftfast.get_peft_model(_block("mixtral"), peftfast.LoraConfig(**_lora_kwargs(target_parameters=["nope"])))
    with pytest.raises(ValueError, match="top-level module"):
        peftfast.get_peft_model(_PlainExperts(), peftfast.LoraConfig(**_lora_kwargs(target_parameters=["down_proj"])))
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        peftfast.get_peft_model(
            _block("qwen2_moe"),
            peftfast.LoraConfig(**_lora_kwargs(target_modules=["gate_proj"], target_parameters=["x"])),
        )
    ours = peftfast.get_peft_model(_block("mixtral"), peftfast.LoraConfig(**_lora_kwargs()))
    ours.add_adapter("other", peftfast.LoraConfig(**_lora_kwargs()))
    with pytest.raises(ValueError, match="target_parameters"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", combination_type="cat")
    ours.eval()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        ours(torch.randn(2, 3, 24), adapter_names=["default", "other"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.base_model.model.experts.unmerge()  # nothing merged: a no-op


# --------------------------------------------------------------------------------------------- triton, whole block


@pytest.mark.cpu_kernels
def test_block_trains_the_same_on_the_triton_backend():
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(3)
        model = peftfast.get_peft_model(_block("gpt_oss", seed=2), peftfast.LoraConfig(**_lora_kwargs()))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(0))
        losses = []
        with ops.use_backend(backend):
            for _ in range(2):
                loss = _output(model, x).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        assert model.base_model.model.experts.last_backend == backend
        results[backend] = (losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for name, value in results["torch"][1].items():
        assert_close(results["triton"][1][name], value, kind="kernel")


def test_moe_benchmark_runs_and_writes_its_rows(tmp_path, monkeypatch, capsys):
    import csv
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    bench_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_moe)
    threads = torch.get_num_threads()
    argv = ["bench_moe.py", "--blocks", "gpt_oss", "--tokens", "16", "--hidden", "32", "--rank", "4", "--repeats", "2"]
    monkeypatch.setattr("sys.argv", [*argv, "--warmup", "0", "--output-dir", str(tmp_path)])
    try:
        assert bench_moe.main() == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "moe-cpu.csv").open()))
    assert [row["provider"] for row in rows] == ["frozen", "hf_peft", "peftfast"]
    assert all(float(row["median_ms"]) > 0 and row["block"] == "gpt_oss" for row in rows)
    assert "peftfast" in capsys.readouterr().out
