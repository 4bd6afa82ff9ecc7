"""Keeps one harmless probe message of bitsandbytes out of the user's terminal, and nothing else.

On a CPU with AVX512-BF16, `import bitsandbytes` (0.49 and newer) tries to fetch an optional CPU gemm kernel through
the HF hub's `kernels` package and, when that package is not installed, logs "Failed to load CPU gemm_4bit_forward
from kernels-community ..." on every run. peftfast never uses that kernel, and the line reads as if something were
broken. The filter drops that record only when the probe failed because `kernels` could not be imported; any other
failure of the probe, every other record of that logger and every error still get through.
"""

from __future__ import annotations

import logging

PROBE_LOGGER = "bitsandbytes.backends.cpu.ops"
PROBE_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMissingKernelsProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(PROBE_MESSAGE)):
            return True
        # The probe logs the exception it caught as the first argument.
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not isinstance(cause, ImportError)


def silence_bitsandbytes_kernel_probe() -> None:
    """Install the filter on bitsandbytes' logger (once; the logger need not exist yet, bitsandbytes need not be
    installed)."""
    logger = logging.getLogger(PROBE_LOGGER)
    if not any(isinstance(existing, _DropMissingKernelsProbe) for existing in logger.filters):
        logger.addFilter(_DropMissingKernelsProbe())
