"""Adapter configs: dataclasses that round-trip through `adapter_config.json` in HF PEFT's format."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .registry import CONFIG_ROLE, PROMPT_LEARNING_CONFIG_ROLE, config_class
from .utils.constants import CONFIG_NAME
from .utils.hub import PushToHubMixin, hub_file, split_hub_kwargs
from .utils.peft_types import PeftType, TaskType
from .utils.save_and_load import path_inside
from .version import __version__


def _json_ready(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _config_file(model_id: str | os.PathLike, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str:
    """Path of the adapter config of `model_id`: in the local folder, else from the Hub repo of that id."""
    folder = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    config_file = os.path.join(folder, CONFIG_NAME)
    if os.path.isfile(config_file):
        return config_file
    hint = f"Can't find {CONFIG_NAME} in {os.fspath(folder)!r}: is it an adapter folder saved by save_pretrained"
    if os.path.isdir(model_id):
        raise ValueError(f"{hint}?")
    try:
        found = hub_file(model_id, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
    except ImportError as error:
        raise ValueError(f"{hint}, or a Hub repo id? ({error})") from error
    except Exception as error:
        raise ValueError(
            f"{hint}, or a Hub repo id? It is no local folder and the Hugging Face Hub gave no {CONFIG_NAME} for it "
            f"({type(error).__name__}: {error})."
        ) from error
    if found is None:
        raise ValueError(f"The Hugging Face Hub repo {os.fspath(model_id)!r} has no {CONFIG_NAME}.")
    return found


@dataclass
class PeftConfigMixin(PushToHubMixin):
    """Serialisation shared by every config: `to_dict`, `save_pretrained`, `from_pretrained`, `from_json_file`."""

    _peft_type = None  # set on each method's config class; None on the generic bases
    _registry_role = CONFIG_ROLE

    task_type: TaskType | str | None = field(default=None, metadata={"help": "The model head, e.g. CAUSAL_LM."})
    peft_type: PeftType | str | None = field(default=None, metadata={"help": "The adapter method."})
    auto_mapping: dict | None = field(default=None, metadata={"help": "Class of a custom base model."})
    peft_version: str | None = field(default=None, metadata={"help": "Version that wrote the config."})

    def __post_init__(self) -> None:
        # A method's config class names its method once, in `_peft_type`; every instance carries it.
        if self._peft_type is not None:
            self.peft_type = self._peft_type
        if self.peft_version is None:
            self.peft_version = f"peftfast=={__version__}"
        if self.task_type is not None and self.task_type not in {t.value for t in TaskType}:
            raise ValueError(f"Invalid task_type {self.task_type!r}; expected one of {[t.value for t in TaskType]}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `adapter_config.json` into `save_directory` (created if needed); refused if a symlink would take
        the write outside the folder."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a directory, but {save_directory} is a file.")
        config_file = path_inside(save_directory, CONFIG_NAME)
        output = _json_ready(self.to_dict())
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        os.makedirs(save_directory, exist_ok=True)
        with open(config_file, "w") as handle:
            handle.write(json.dumps(output, indent=2, sort_keys=True))

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfigMixin:
        """Build a config from a dict; unknown keys are dropped with a warning.

        On a method's own config class (LoraConfig, ...) that class is built; on `PeftConfig` the class registered
        for `kwargs["peft_type"]` is.
        """
        config_cls = cls if getattr(cls, "_peft_type", None) is not None else config_class(kwargs.get("peft_type"))
        known_fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unknown = sorted(set(kwargs) - known_fields)
        if unknown:
            warnings.warn(
                f"Config keys {unknown} are not known to {config_cls.__name__} in peftfast {__version__}; they are "
                "ignored. The adapter may have been saved by a newer library.",
                stacklevel=2,
            )
        return config_cls(**{key: value for key, value in kwargs.items() if key in known_fields})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike) -> dict[str, Any]:
        try:
            with open(path_json_file) as handle:
                loaded = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path_json_file} is not valid JSON: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{path_json_file} holds a JSON {type(loaded).__name__}, not an object of config fields "
                '({"peft_type": "LORA", "r": 8, ...}); it is not an adapter config.'
            )
        return loaded

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfigMixin:
        """Load `adapter_config.json` from a local folder or a Hugging Face Hub repo id (through huggingface_hub's
        cache, so offline mode and `local_files_only` work).

        kwargs that `huggingface_hub.hf_hub_download` takes (revision, cache_dir, token, ...) go to it. Config fields
        in kwargs only fill in fields the file lacks, as in HF PEFT: set attributes on the returned config to change
        them.
        """
        hub_kwargs, other_kwargs = split_hub_kwargs(kwargs)
        config_file = _config_file(pretrained_model_name_or_path, subfolder, hub_kwargs)
        loaded = cls.from_json_file(config_file)
        config_fields = {f.name for f in dataclasses.fields(cls)}
        loaded = {**{key: value for key, value in other_kwargs.items() if key in config_fields}, **loaded}
        expected = getattr(cls, "_peft_type", None)
        expected = getattr(expected, "value", expected)
        if expected is not None and loaded.get("peft_type") not in (None, expected):
            raise ValueError(
                f"{config_file} holds a {loaded.get('peft_type')} config, not a {expected} "
                "config; load it with PeftConfig.from_pretrained instead."
            )
        return cls.from_peft_type(**loaded)

    @property
    def is_prompt_learning(self) -> bool:
        return False


@dataclass
class PeftConfig(PeftConfigMixin):
    """Base config of every adapter method."""

    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Name or path of the base model."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether the adapter is frozen (inference only)."})


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base config of the prompt-learning methods (prompt tuning, prefix tuning, P-tuning).

    Args:
        num_virtual_tokens: how many virtual tokens are prepended (to the input, or to every layer's keys and values).
        token_dim: the model's hidden size (for prefix tuning on a grouped-query model: kv heads x head dim);
            read from the model config when None.
        num_transformer_submodules: 2 for encoder-decoder models (a prompt each), else 1; set from the task type
            when None.
        num_attention_heads: attention (for prefix tuning: key/value) heads; from the model config when None.
        num_layers: transformer layers; from the model config when None.
        modules_to_save: extra modules trained in full and saved with the prompt (e.g. a classifier head).
    """

    _registry_role = PROMPT_LEARNING_CONFIG_ROLE

    num_virtual_tokens: int | None = field(default=None, metadata={"help": "Number of virtual tokens."})
    token_dim: int | None = field(default=None, metadata={"help": "Hidden size of the base model."})
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "1, or 2 for encoder-decoder."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads of the base model."})
    num_layers: int | None = field(default=None, metadata={"help": "Transformer layers of the base model."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None or int(self.num_virtual_tokens) <= 0:
            raise ValueError(
                f"{type(self).__name__}.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}."
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True
