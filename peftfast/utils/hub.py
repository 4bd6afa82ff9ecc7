"""The Hugging Face Hub, through `huggingface_hub` (an optional dependency, imported when a Hub call is made):
adapter files from a repo id (the hub client's cache, so offline mode works), and `push_to_hub` with the contract
of transformers' `PushToHubMixin`, which HF PEFT's `PeftModel` and `PeftConfig` use."""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

from ..version import __version__

# hf_hub_download's keyword arguments, used to split a from_pretrained call's kwargs when huggingface_hub is not
# installed (with it, its own signature is read).
_HUB_DOWNLOAD_ARGUMENTS = (
    "subfolder",
    "repo_type",
    "revision",
    "library_name",
    "library_version",
    "cache_dir",
    "local_dir",
    "user_agent",
    "force_download",
    "etag_timeout",
    "token",
    "local_files_only",
    "headers",
    "endpoint",
)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError(
            "Loading an adapter from the Hugging Face Hub, or pushing one to it, needs huggingface_hub "
            "(pip install huggingface_hub); a local folder needs nothing more."
        ) from error
    return huggingface_hub


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the arguments of `huggingface_hub.hf_hub_download` in `kwargs`, the others)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        names = set(_HUB_DOWNLOAD_ARGUMENTS)
    else:
        names = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename"}
    hub_kwargs = {key: value for key, value in kwargs.items() if key in names}
    return hub_kwargs, {key: value for key, value in kwargs.items() if key not in names}


def hub_file(repo_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str | None:
    """Path of `filename` (in `subfolder`, if given) of Hub repo `repo_id`, downloaded into the hub client's cache or
    found there (offline mode, `local_files_only`); None when the Hub says the repo has no such file. Other failures
    (no such repo; offline and not in the cache: `LocalEntryNotFoundError`) raise the hub client's error."""
    hub = _hub()
    hub_kwargs = {key: value for key, value in hub_kwargs.items() if value is not None}
    hub_kwargs.setdefault("library_name", "peftfast")
    hub_kwargs.setdefault("library_version", __version__)
    try:
        return hub.hf_hub_download(os.fspath(repo_id), filename, **hub_kwargs)
    except hub.errors.EntryNotFoundError as error:
        if isinstance(error, hub.errors.LocalEntryNotFoundError):
            raise
        return None


class PushToHubMixin:
    """`push_to_hub` for objects with a `save_pretrained(folder)`: the contract of transformers' `PushToHubMixin`."""

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        """Upload what `save_pretrained` writes to the Hub repo `repo_id` (created if needed, public unless
        `private`) in one commit, with a model card (the repo's own if it has one, else the one `save_pretrained`
        wrote) tagged with `tags`. `revision` is the branch to push to (created if needed), `create_pr` opens a pull
        request instead of committing. Returns the hub client's `CommitInfo`."""
        hub = _hub()
        api = hub.HfApi(library_name="peftfast", library_version=__version__)
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            self._write_model_card(folder, repo_id, tags, token)
            operations = [
                hub.CommitOperationAdd(path_or_fileobj=os.path.join(folder, path), path_in_repo=path)
                for path in _uploaded_files(folder)
            ]
            if revision is not None and not revision.startswith("refs/pr"):
                try:
                    api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
                except hub.errors.HfHubHTTPError as error:
                    # Without write access to the repo a pull request can still be opened against the branch.
                    if not (create_pr and error.response is not None and error.response.status_code == 403):
                        raise
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or self._default_commit_message(),
                commit_description=commit_description,
                token=token,
                create_pr=create_pr,
                revision=revision,
            )

    def _default_commit_message(self) -> str:
        name = type(self).__name__
        if "Model" in name:
            return "Upload model"
        if "Config" in name:
            return "Upload config"
        return f"Upload {name}"

    def _write_model_card(self, folder: str, repo_id: str, tags: list[str] | None, token: bool | str | None) -> None:
        hub = _hub()
        path = os.path.join(folder, "README.md")
        try:
            card = hub.ModelCard.load(repo_id, token=token)
        except hub.errors.EntryNotFoundError:
            if os.path.isfile(path):
                with open(path) as handle:
                    card = hub.ModelCard(handle.read())
            else:
                card = hub.ModelCard.from_template(hub.ModelCardData(library_name="peft", tags=list(tags or [])))
        if tags:
            card.data.tags = list(card.data.tags or [])
            card.data.tags.extend(tag for tag in tags if tag not in card.data.tags)
        card.save(path)


def _uploaded_files(folder: str) -> list[str]:
    """What push_to_hub uploads: the folder's files and the files of its subfolders (other adapters), as
    transformers does; paths relative to `folder`, in a fixed order."""
    paths = []
    for name in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, name)):
            paths.extend(
                os.path.join(name, inner)
                for inner in sorted(os.listdir(os.path.join(folder, name)))
                if os.path.isfile(os.path.join(folder, name, inner))
            )
        else:
            paths.append(name)
    return paths
