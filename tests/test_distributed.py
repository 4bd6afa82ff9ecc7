"""peftfast under torch's data parallelism: DDP and FSDP2 (`fully_shard`) with the gloo backend, 2 CPU processes.

Each process trains the same LoRA on its half of every global batch; the gradients of the first step and the adapter
saved at the end must equal those of one process training on the whole global batch (the loss is a mean over equally
many tokens per row, so the mean of the two halves' gradients is the whole batch's gradient).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import tiny_llama
from safetensors.torch import load_file

import peftfast
from peftfast import LoraConfig

WORLD_SIZE = 2
STEPS = 3
BATCH = 4  # global rows per step
MODES = ("ddp", "fsdp")


def _model() -> peftfast.PeftModel:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return peftfast.get_peft_model(tiny_llama(seed=3), config).train()


def _global_batch(step: int) -> torch.Tensor:
    return torch.randint(1, 101, (BATCH, 9), generator=torch.Generator().manual_seed(100 + step))


def _train(model: torch.nn.Module, wrapped: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
    """STEPS steps of SGD on `rows` of every global batch; returns the first step's adapter gradients (full
    tensors)."""
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    first_grads = {}
    for step in range(STEPS):
        batch = _global_batch(step)[rows]
        wrapped(input_ids=batch, labels=batch).loss.backward()
        if step == 0:
            first_grads = {
                name: _full(param.grad).clone() for name, param in model.named_parameters() if param.requires_grad
            }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return first_grads


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps parameters and gradients as DTensors sharded over the processes.
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _worker(rank: int, port: int, output_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    try:
        for mode in MODES:
            model = _model()
            if mode == "ddp":
                wrapped = DistributedDataParallel(model)
                grads = _train(model, wrapped, rows)
                state_dict = None
            else:
                mesh = init_device_mesh("cpu", (WORLD_SIZE,))
                for layer in model.get_base_model().model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                grads = _train(model, model, rows)
                # Every process takes part in gathering the full state dict; only the first writes it.
                state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            model.save_pretrained(os.path.join(output_dir, mode), state_dict=state_dict, is_main_process=rank == 0)
            if rank == 0:
                torch.save(grads, os.path.join(output_dir, f"{mode}-grads.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> str:
    output_dir = str(tmp_path_factory.mktemp("distributed"))
    mp.spawn(_worker, args=(_free_port(), output_dir), nprocs=WORLD_SIZE, join=True)
    return output_dir


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> tuple[dict[str, torch.Tensor], str]:
    output_dir = str(tmp_path_factory.mktemp("single"))
    model = _model()
    grads = _train(model, model, slice(None))
    model.save_pretrained(output_dir)
    return grads, output_dir


@pytest.mark.parametrize("mode", MODES)
def test_gradients_and_saved_adapter_equal_single_process(mode, distributed_run, single_process_run):
    expected_grads, single_dir = single_process_run
    grads = torch.load(os.path.join(distributed_run, f"{mode}-grads.pt"))
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5)
    saved = load_file(os.path.join(distributed_run, mode, "adapter_model.safetensors"))
    expected = load_file(os.path.join(single_dir, "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    initial = peftfast.get_peft_model_state_dict(_model())
    # The adapter trained (so equality says something) and ended where the single process ended.
    assert any(not torch.equal(expected[key], initial[key]) for key in expected)
    for key, value in saved.items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)
