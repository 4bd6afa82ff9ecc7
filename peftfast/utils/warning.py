"""peftfast's warning category, at HF PEFT's import path (`peft.utils.warning`)."""


class PeftWarning(UserWarning):
    """Base of the warnings peftfast emits where HF PEFT emits a `PeftWarning` (filter them with this class)."""
