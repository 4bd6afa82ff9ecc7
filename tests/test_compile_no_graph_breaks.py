"""Training on the triton path under torch.compile: no graph breaks (the dropout seeds are tensors made in the graph,
not Python ints read back with .item()), fullgraph compiles, and compiled losses and gradients equal eager ones.

An MLP with LoRA on its three linear layers and two active adapters, run through Triton's interpreter on CPU (small,
so that torch.compile's tracing stays a few seconds; the breaks it checks for live in peftfast's layers and ops).
"""

import pytest
import torch
from models import MLP
from torch._dynamo.testing import CompileCounterWithBackend

from peftfast import LoraConfig, get_peft_model, ops

pytest.importorskip("triton")
pytestmark = pytest.mark.cpu_kernels


def _model(dropout):
    torch.manual_seed(3)
    targets = ["lin0", "lin1", "lin2"]
    model = get_peft_model(
        MLP(), LoraConfig(r=4, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)
    )
    model.add_adapter("second", LoraConfig(r=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    return model.train()


def _step(model, x):
    with ops.use_backend("triton"):
        return model(x).square().mean()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_training_step_has_no_graph_breaks_and_matches_eager(dropout):
    model = _model(dropout)
    ids = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]

    # explain, not only fullgraph=True: with torch 2.13 a fullgraph compile went through a Tensor.item() in the step
    # that explain counted as a break.
    explanation = torch._dynamo.explain(_step)(model, ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    torch.manual_seed(11)
    eager_loss = _step(model, ids)
    assert ops.last_backend("lora_linear") == "triton"
    eager_grads = torch.autograd.grad(eager_loss, trainable)

    torch._dynamo.reset()
    # fullgraph=True raises at the first graph break; the counter shows the step is one graph.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_step, backend=counter, fullgraph=True)
    torch.manual_seed(11)
    compiled_loss = compiled(model, ids)
    compiled_grads = torch.autograd.grad(compiled_loss, trainable)
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-5)
    if dropout:
        # Another seed draws other masks: the seeds really are data of the compiled graph, not constants in it.
        torch.manual_seed(12)
        assert not torch.equal(compiled(model, ids), compiled_loss)
    assert counter.frame_count == 1  # and no recompilation for new seeds
