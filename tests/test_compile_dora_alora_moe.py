"""torch.compile of DoRA, aLoRA and MoE (`target_parameters`) LoRA layers: one graph (`fullgraph=True`, HF's
`aot_eager` backend, dynamo's graph-break counter empty), compiled outputs and gradients equal to eager ones.

DoRA: the weight-norm cache is neither read nor written while tracing, so a compiled graph recomputes the norms and
follows weights changed in place. aLoRA: the call's offsets reach the layers through an attribute set per call (no
per-call hooks), so the whole PeftModel compiles, with outputs equal to HF PEFT's eager ones. MoE: the expert offsets
have a static shape and the per-expert GEMMs of the torch path run inside custom ops.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch._dynamo
from models import MLP, ConvNet, EmbeddingModel, tiny_llama
from tolerances import assert_close
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import peftfast
from peftfast import LoraConfig, get_peft_model, ops
from peftfast.ops import dora as dora_ops
from peftfast.ops import moe_lora as moe_ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _assert_one_graph(counter) -> None:
    assert counter.frame_count == 1
    assert dict(counters["graph_break"]) == {}


def _check_training(model, inputs, backend="auto"):
    """A compiled training step gives the eager loss and gradients (the same dropout masks, from the same seed)."""
    model.train()
    params = [param for param in model.parameters() if param.requires_grad]

    def step(inputs):
        with ops.use_backend(backend):
            out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            return (out[0] if isinstance(out, tuple) else out).square().mean()

    def loss_and_grads(fn):
        torch.manual_seed(11)
        loss = fn(inputs)
        return loss.detach(), torch.autograd.grad(loss, params)

    compiled, counter = _compiled(step)
    expected_loss, expected_grads = loss_and_grads(step)
    loss, grads = loss_and_grads(compiled)
    _assert_one_graph(counter)
    assert_close(loss, expected_loss, kind="kernel")
    for got, expected in zip(grads, expected_grads):
        assert_close(got, expected, kind="kernel")


# ------------------------------------------------------------------------------------------------------------ DoRA


def _dora_mlp(dropout=0.0):
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, target_modules=["lin0", "lin1"], use_dora=True, lora_dropout=dropout, init_lora_weights=False
    )
    model = get_peft_model(MLP(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.5, 1.5, param.numel()).view(param.shape))
    return model


X = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_dora_training_compiles_whole_and_matches_eager(dropout):
    _check_training(_dora_mlp(dropout), X)


def test_dora_eval_compiles_whole_and_follows_weights_changed_in_place():
    model = _dora_mlp().eval()
    layer = model.base_model.model.lin0
    compiled, counter = _compiled(lambda x: model(x))
    with torch.no_grad():
        # Eager first, so that the cache holds the norms the compiled graph must not reuse once they are stale.
        assert_close(compiled(X), model(X), kind="kernel")
        layer.base_layer.weight.mul_(1.5)
        expected = model(X)
        assert_close(compiled(X), expected, kind="kernel")
        layer.lora_B["default"].weight.mul_(-2.0)
        changed = model(X)
        assert not torch.allclose(changed, expected)
        assert_close(compiled(X), changed, kind="kernel")
    _assert_one_graph(counter)


def test_dora_conv_layers_compile_whole_in_training_and_eval_and_embeddings_in_eval():
    torch.manual_seed(5)
    config = LoraConfig(r=2, target_modules=["conv1d", "conv2d", "conv3d"], use_dora=True, init_lora_weights=False)
    conv = get_peft_model(ConvNet(), config)
    conv_inputs = (torch.randn(2, 3, 5), torch.randn(2, 2, 3, 5, 5))
    _check_training(conv, conv_inputs)
    config = LoraConfig(r=2, target_modules=["emb", "lin"], use_dora=True, init_lora_weights=False)
    embedding = get_peft_model(EmbeddingModel(), config)
    for model, inputs in ((conv, conv_inputs), (embedding, (torch.randint(0, 37, (2, 5)),))):
        torch._dynamo.reset()
        counters.clear()
        model.eval()
        compiled, counter = _compiled(lambda inputs, model=model: model(*inputs))
        with torch.no_grad():
            assert_close(compiled(inputs), model(*inputs), kind="kernel")
        _assert_one_graph(counter)


@pytest.mark.cpu_kernels
def test_dora_triton_path_training_with_dropout_compiles_whole():
    pytest.importorskip("triton")
    _check_training(_dora_mlp(0.2), X, backend="triton")
    assert ops.last_backend("dora_linear") == "triton"


# ----------------------------------------------------------------------------------------------------------- aLoRA

INVOCATION = [7, 8]


def _alora_pair(tmp_path):
    """The same aLoRA adapter (saved by HF PEFT) in both libraries, on a one-layer Llama."""
    settings = dict(alora_invocation_tokens=INVOCATION, target_modules=["q_proj", "v_proj", "down_proj"])
    settings |= dict(task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(1)
    peft.get_peft_model(tiny_llama(num_hidden_layers=1), peft.LoraConfig(**settings)).save_pretrained(tmp_path)
    return [lib.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=1), tmp_path).eval() for lib in (peft, peftfast)]


def test_alora_whole_model_eval_compiles_and_matches_eager_and_hf_peft(tmp_path):
    theirs, ours = _alora_pair(tmp_path)
    compiled, counter = _compiled(lambda input_ids: ours(input_ids=input_ids).logits)
    ids = torch.randint(10, 101, (3, 9), generator=torch.Generator().manual_seed(2))
    ids[0, 2:4] = torch.tensor(INVOCATION)
    ids[1, 6:8] = torch.tensor(INVOCATION)
    # Other rows invoke the adapter: the offsets are data of the graph, so it serves them without recompiling.
    other = ids.clone()
    other[0, 2:4] = 5
    other[2, 1:3] = torch.tensor(INVOCATION)
    with torch.no_grad():
        for batch in (ids, other):
            got = compiled(batch)
            assert_close(got, ours(input_ids=batch).logits, kind="kernel")
            assert_close(got, theirs(input_ids=batch).logits, kind="kernel")
        base = ours.get_base_model()(input_ids=ids).logits
    _assert_one_graph(counter)
    # The adapter acted (after row 0's invocation) and only there (row 2 has none).
    assert not torch.allclose(compiled(ids)[0, -1], base[0, -1])
    assert_close(compiled(ids)[2], base[2], kind="kernel")


_DECODE_COMPILES = []


@torch._dynamo.register_backend(name="peftfast_alora_decode_counting")
def _counting_backend(gm, example_inputs, **options):
    _DECODE_COMPILES.append(gm)
    return gm.forward


def test_alora_compiled_decode_step_compiles_once_across_steps_and_calls():
    """Static-cache generate with a compiled decode step (transformers' `compile_config`): one compile for every decode
    step and every later call, whichever rows invoke the adapter, with eager's tokens."""
    from transformers import CompileConfig

    settings = dict(alora_invocation_tokens=INVOCATION, target_modules=["v_proj", "down_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(num_hidden_layers=1), LoraConfig(init_lora_weights=False, **settings)).eval()

    def generate(ids, compiled):
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
        if compiled:
            config = CompileConfig(fullgraph=True, dynamic=False, backend="peftfast_alora_decode_counting")
            config._compile_all_devices = True
            kwargs["compile_config"] = config
        else:
            kwargs["disable_compile"] = True
        with torch.no_grad():
            return model.generate(input_ids=ids, **kwargs)

    _DECODE_COMPILES.clear()
    for row in (0, 1):
        ids = torch.randint(10, 101, (2, 6), generator=torch.Generator().manual_seed(row))
        ids[row, 1:3] = torch.tensor(INVOCATION)
        assert torch.equal(generate(ids, compiled=True), generate(ids, compiled=False))
        assert len(_DECODE_COMPILES) == 1
    assert dict(counters["graph_break"]) == {}


# ------------------------------------------------------------------------------------------------------------- MoE


def _moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=24, intermediate_size=17, num_local_experts=5, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        # The experts' 3-D weights are created uninitialised.
        for param in block.parameters():
            param.normal_(0, 0.3)
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    lora = LoraConfig(r=3, lora_alpha=5, target_modules=[], target_parameters=targets, init_lora_weights=False)
    return get_peft_model(block, lora)


MOE_X = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(4))


def test_moe_block_training_and_eval_compile_whole_and_match_eager(monkeypatch):
    def no_kernels(*args):
        raise AssertionError("the torch backend ran the MoE LoRA kernels")

    # Compiled, the torch backend runs its per-expert GEMMs inside custom ops, on the composed (torch) plan.
    monkeypatch.setattr(moe_ops, "_add_kernels", no_kernels)
    monkeypatch.setattr(moe_ops, "_add_grads_kernels", no_kernels)
    model = _moe_block()
    _check_training(model, MOE_X)
    assert ops.last_backend("moe_lora_linear") == "torch"
    torch._dynamo.reset()
    counters.clear()
    model.eval()
    compiled, counter = _compiled(lambda x: model(x)[0])
    with torch.no_grad():
        assert_close(compiled(MOE_X), model(MOE_X)[0], kind="kernel")
        # Other routing of the same shape: the expert offsets are data, no recompile.
        assert_close(compiled(MOE_X.flip(1)), model(MOE_X.flip(1))[0], kind="kernel")
    _assert_one_graph(counter)


@pytest.mark.cpu_kernels
def test_moe_block_triton_path_training_compiles_whole():
    pytest.importorskip("triton")
    model = _moe_block()
    reference = copy.deepcopy(model)
    _check_training(model, MOE_X, backend="triton")
    assert ops.last_backend("moe_lora_linear") == "triton"
    # And the triton path's compiled loss is the torch path's.
    with torch.no_grad():
        with ops.use_backend("triton"):
            kernels = model(MOE_X)[0]
        assert_close(kernels, reference(MOE_X)[0], kind="kernel")


# ------------------------------------------------------------------------------------------------------ custom ops


def _opcheck_cases():
    """The custom ops these layers trace into, on plans that run without Triton (opcheck: schema, fake, autograd)."""
    generator = torch.Generator().manual_seed(6)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=generator).requires_grad_(grad)

    offsets = torch.tensor([4, 4, 9, 11], dtype=torch.int32)
    x, weight = rand(11, 7), rand(4, 6, 7)
    A, B = [rand(4, 3, 7)], [rand(4, 6, 3)]
    cases = {
        "moe_grouped_linear": (moe_ops.moe_grouped_linear_fwd, (x, weight, rand(4, 6), offsets, False)),
        "moe_grouped_linear-transposed": (moe_ops.moe_grouped_linear_fwd, (x, rand(4, 7, 6), None, offsets, True)),
        "moe_lora_add": (moe_ops.moe_lora_add_fwd, (rand(11, 6), x, offsets, A, B, [1.5], "composed")),
    }
    dense_x, dense_w, A2, B2 = rand(5, 7), rand(6, 7, grad=False), rand(3, 7), rand(6, 3)
    g = rand(6)
    dora_args = (dense_x, dense_w, rand(6, grad=False), A2, B2, g, 1.5, 0.0, None, True, "composed")
    cases["dora_linear"] = (dora_ops.dora_linear_fwd, dora_args)
    norm_args = (dense_w, A2.detach(), B2.detach(), 1.5, None, "composed")
    cases["dora_weight_norm"] = (dora_ops.dora_weight_norm_op, norm_args)
    return cases


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_custom_ops_pass_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
