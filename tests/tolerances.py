"""The one table of comparison tolerances, by dtype of the computation under test.

`exact` is for the same math in the same order (file round-trips, peftfast vs HF PEFT on the torch path);
`kernel` for a different summation order (kernels vs the reference). A kernel's error against an fp32 reference
should stay within about twice the error torch makes doing the same math in the kernel's dtype.
"""

import torch

EXACT = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}
KERNEL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str = "exact", dtype=None) -> None:
    table = EXACT if kind == "exact" else KERNEL
    tolerance = table[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tolerance)
