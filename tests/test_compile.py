"""torch.compile: every forward compiles into one graph, compiled outputs equal eager ones, and a mixed-adapter decode
step compiles once for every assignment of adapters to rows.

Each case compiles with `fullgraph=True` (an error on any graph break) and HF's `aot_eager` backend (AOTAutograd's
joint forward/backward tracing and functionalization, with eager kernels: the checks of inductor without its compile
time), counts the graphs and dynamo's recorded graph breaks, and compares outputs (and gradients in training) with the
same call run eagerly. The model is a one-layer Llama with LoRA on two of its projections: every code path of a
layer runs, and tracing stays quick.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from models import quantize_to_4bit, tiny_llama
from tolerances import assert_close
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import peftfast
from peftfast import LoraConfig, ops

NAMES = ["a", "__base__", "b", "a"]
# One projection of attention and one of the MLP: every kind of LoRA layer call, and little to trace.
TARGETS = ["v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _llama(**overrides):
    return tiny_llama(num_hidden_layers=1, **overrides)


def _lora_model(base=None, dropout_b: float = 0.0):
    """Adapters "a" (r=4, no dropout) and "b" (r=6, dropout `dropout_b`, a lora_B bias) on TARGETS."""
    config_a = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    config_b = LoraConfig(
        r=6, lora_alpha=3, lora_dropout=dropout_b, target_modules=TARGETS, init_lora_weights=False, lora_bias=True
    )
    model = peftfast.get_peft_model(base if base is not None else _llama(), config_a, adapter_name="a")
    model.add_adapter("b", config_b)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.b" in name and name.endswith(".bias"):
                param.normal_()
    return model


def _ids(batch: int = len(NAMES), length: int = 5):
    return torch.randint(1, 101, (batch, length), generator=torch.Generator().manual_seed(2))


def _compiled(fn):
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _assert_one_graph(counter) -> None:
    assert counter.frame_count == 1
    assert dict(counters["graph_break"]) == {}


def _check_eval(model, **kwargs):
    """The forward compiled whole equals the eager forward."""
    model.eval()

    def forward(input_ids):
        return model(input_ids=input_ids, **kwargs).logits

    compiled, counter = _compiled(forward)
    with torch.no_grad():
        expected = forward(_ids())
        got = compiled(_ids())
    _assert_one_graph(counter)
    assert_close(got, expected)


def _check_training(model, **kwargs):
    """A compiled training step gives the eager loss and adapter gradients (the same dropout masks, from the same
    seed)."""
    model.train()
    params = [param for param in model.parameters() if param.requires_grad]
    assert params

    def step(input_ids):
        return model(input_ids=input_ids, labels=input_ids, **kwargs).loss

    def loss_and_grads(fn):
        for param in params:
            param.grad = None
        torch.manual_seed(11)
        loss = fn(_ids())
        loss.backward()
        return loss.detach(), [param.grad.clone() for param in params]

    compiled, counter = _compiled(step)
    expected_loss, expected_grads = loss_and_grads(step)
    loss, grads = loss_and_grads(compiled)
    _assert_one_graph(counter)
    assert_close(loss, expected_loss, kind="kernel")
    for got, expected in zip(grads, expected_grads):
        assert_close(got, expected, kind="kernel")


def test_training_with_several_active_adapters_with_and_without_dropout():
    model = _lora_model(dropout_b=0.25)
    model.set_adapter(["a", "b"])
    _check_training(model)


def test_eval_one_adapter_and_adapters_disabled():
    model = _lora_model()
    model.set_adapter("b")
    _check_eval(model)
    torch._dynamo.reset()
    with model.disable_adapter():
        _check_eval(model)


def test_mixed_adapter_eval():
    _check_eval(_lora_model(), adapter_names=NAMES)


def test_mixed_adapter_eval_with_alora_rows():
    """aLoRA rows (their term masked to the tokens after the invocation) beside plain ones: selected by a mask when
    traced, so the model's forward compiles whole (the call's offsets and mixed batch are made outside it, as in
    generate)."""
    settings = dict(target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    model = peftfast.get_peft_model(_llama(), LoraConfig(r=4, **settings), adapter_name="a")
    model.add_adapter("c", LoraConfig(r=2, alora_invocation_tokens=[7, 8], **settings))
    model.eval()
    ids = _ids()
    ids[1, 1:3] = torch.tensor([7, 8])
    tuner = model.base_model
    compiled, counter = _compiled(lambda input_ids: tuner.model(input_ids=input_ids).logits)

    def run(forward, names):
        offsets = tuner.alora_offsets_for_call(input_ids=ids, adapter_names=names)
        with torch.no_grad(), tuner._enable_peft_forward_hooks(adapter_names=names, alora_offsets=offsets):
            return forward(ids)

    names = ["a", "c", "c", "a"]
    expected = run(lambda input_ids: tuner.model(input_ids=input_ids).logits, names)
    assert_close(expected, _logits_of(model, ids, names), kind="kernel")
    assert_close(run(compiled, names), expected, kind="kernel")
    _assert_one_graph(counter)
    # The invocation made a difference (row 1 has it, row 2 doesn't).
    plain = _logits_of(model, ids, ["a", "__base__", "__base__", "a"])
    assert not torch.allclose(expected[1, -1], plain[1, -1], atol=1e-4)
    assert_close(expected[2], plain[2], kind="kernel")


def _logits_of(model, ids, names):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=names).logits


def test_qlora_training_and_mixed_batch():
    model = _lora_model(base=quantize_to_4bit(_llama()))
    model.set_adapter("a")
    _check_training(model)
    torch._dynamo.reset()
    _check_eval(model, adapter_names=NAMES)


@pytest.mark.parametrize(
    "config",
    [
        peftfast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        peftfast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        peftfast.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
    ],
    ids=["prompt_tuning", "prefix_tuning", "p_tuning"],
)
def test_prompt_learning_training(config):
    _check_training(peftfast.get_peft_model(_llama(), config))


@pytest.mark.cpu_kernels
def test_triton_backend_training_and_mixed_batch():
    """The kernels' custom ops (fused LoRA forward/backward with the dropout seeds as tensors, SGMV) trace as single
    nodes: two active adapters, one with dropout, then a mixed batch. No lora_B bias: the fused kernels take none
    (and a backend asked for by name that can't serve a call raises)."""
    model = peftfast.get_peft_model(
        _llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("b", LoraConfig(r=6, lora_dropout=0.25, target_modules=TARGETS, init_lora_weights=False))
    model.set_adapter(["a", "b"])
    with ops.use_backend("triton"):
        _check_training(model)
        assert ops.last_backend("lora_linear") == "triton"
        torch._dynamo.reset()
        _check_eval(model, adapter_names=NAMES)
        assert ops.last_backend("lora_multi_adapter") == "triton"


@pytest.mark.cpu_kernels
def test_triton_backend_qlora_training_and_eval():
    """The 4-bit path traces as its two custom ops (forward with the dropout seeds as a tensor, backward): two
    active adapters, one with dropout."""
    model = peftfast.get_peft_model(
        quantize_to_4bit(_llama()), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("b", LoraConfig(r=6, lora_dropout=0.25, target_modules=TARGETS, init_lora_weights=False))
    model.set_adapter(["a", "b"])
    with ops.use_backend("triton"):
        _check_training(model)
        assert ops.last_backend("lora_linear_4bit") == "triton"
        torch._dynamo.reset()
        _check_eval(model)


# A decode step: the model's forward compiled by `generate` itself (transformers compiles the decode steps of a
# static-cache generate with `compile_config`; the prefill runs eagerly), counted by a named backend because
# transformers deep-copies the compile config.
_COMPILES = []


@torch._dynamo.register_backend(name="peftfast_test_counting")
def _counting_backend(gm, example_inputs, **options):
    # `options`: what transformers passes on from the CompileConfig (mode, options), meaningless here.
    _COMPILES.append(gm)
    return gm.forward


def _generate(model, names, **kwargs):
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_config = kwargs.pop("compile_config", None)
    if compile_config is not None:
        settings["compile_config"] = compile_config
    else:
        settings["disable_compile"] = True
    with torch.no_grad():
        return model.generate(input_ids=_ids(len(names)), adapter_names=names, **settings, **kwargs)


def _decode_compile_config(**overrides):
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, backend="peftfast_test_counting", **overrides)
    config._compile_all_devices = True
    return config


def test_compiled_decode_step_never_recompiles_across_steps_and_adapter_assignments():
    model = _lora_model().eval()
    _COMPILES.clear()
    assignments = [NAMES, ["b", "b", "a", "__base__"], ["__base__"] * 4, ["a"] * 4]
    for step, names in enumerate(assignments):
        expected = _generate(model, names)
        got = _generate(model, names, compile_config=_decode_compile_config())
        assert torch.equal(got, expected), names
        # One compile, on the first decode step of the first call; every later step and assignment reuses it.
        assert len(_COMPILES) == 1, (step, names)
    assert dict(counters["graph_break"]) == {}
    # Adapters change what is generated, so the comparisons can fail.
    assert not torch.equal(_generate(model, ["a"] * 4), _generate(model, ["__base__"] * 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-torch-path", "bf16-sgmv-kernels"])
def test_reduce_overhead_decode_on_gpu_matches_eager(dtype):
    """CUDA graphs (mode="reduce-overhead"): the decode step of a mixed-adapter static-cache generate, captured once,
    gives eager's results for several assignments of adapters to rows, and after a write into an adapter's weight
    (the adapters are packed inside the graph, so a replay reads the live weights). fp32 activations run the torch
    tile formulation, bf16 ones the SGMV kernels; fp32 compares the tokens, bf16 the scores of the first decode step
    (the compiled base matmuls round differently, which can flip a near-tie later on)."""
    from transformers import CompileConfig

    model = _lora_model(base=_llama().to("cuda", dtype)).to("cuda").eval()
    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    settings = dict(do_sample=False, pad_token_id=0, cache_implementation="static")

    def check(names):
        ids = _ids(len(names)).cuda()
        with torch.no_grad():
            if dtype == torch.float32:
                expected = model.generate(
                    input_ids=ids, adapter_names=names, disable_compile=True, max_new_tokens=6, **settings
                )
                got = model.generate(
                    input_ids=ids, adapter_names=names, compile_config=config, max_new_tokens=6, **settings
                )
                assert torch.equal(got, expected), names
                return
            scores = dict(max_new_tokens=2, output_scores=True, return_dict_in_generate=True, **settings)
            expected = model.generate(input_ids=ids, adapter_names=names, disable_compile=True, **scores).scores[1]
            got = model.generate(input_ids=ids, adapter_names=names, compile_config=config, **scores).scores[1]
            assert_close(got.float(), expected.float(), kind="kernel", dtype=torch.bfloat16)

    for names in (NAMES, ["b", "a", "a", "b"], ["__base__", "b", "__base__", "a"]):
        check(names)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.v_proj.lora_B["a"].weight.mul_(4.0)
    check(["a"] * 4)
