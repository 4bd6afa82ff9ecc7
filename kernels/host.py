"""Host-side integer helpers of the launchers, in plain Python.

Triton 3.9's `triton.cdiv` and `triton.next_power_of_2` are `constexpr_function`s: called from host code, each call
unwraps its arguments through Triton's constexpr machinery (about 4 us a call on CPU), which made them the largest
single cost of a small layer's launchers (seen: 18 us of a 79 us no-op-launch forward). These compute the same values.
"""

from __future__ import annotations


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for positive denominators, as `triton.cdiv`."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (which gives 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
