"""peftfast's exceptions, at HF PEFT's import path (`peft.utils.error`), so ported `except` clauses keep working."""


class PeftError(Exception):
    """Base of peftfast's own errors."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """The adapter being injected matched no module of the base model (its `target_modules` matched nothing, or
    everything they matched was excluded).

    A `ValueError`, as HF PEFT's is: code that catches either keeps working. Code that injects such an adapter on
    purpose can catch this error and go on.
    """
