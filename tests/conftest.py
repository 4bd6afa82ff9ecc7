import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be switched on before anything
# (transformers, bitsandbytes) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # Whole models kept on CPU but forced onto the triton backend: only the interpreter runs that (on a GPU machine
    # the `gpu` tests cover the kernels instead).
    skip_cpu_kernels = pytest.mark.skip(reason="runs Triton kernels on CPU tensors; needs TRITON_INTERPRET=1")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    skip_full_gate = pytest.mark.skip(reason="the whole compile-gate grid takes ~10 min; set PEFTFAST_GATE_FULL=1")
    full_gate = os.environ.get("PEFTFAST_GATE_FULL") == "1"
    for item in items:
        if "compile_gate_full" in item.keywords and not full_gate:
            item.add_marker(skip_full_gate)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "cpu_kernels" in item.keywords and not interpreting:
            item.add_marker(skip_cpu_kernels)
