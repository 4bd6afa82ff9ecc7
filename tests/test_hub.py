"""Adapters on the Hugging Face Hub, with no network: loading a repo id from a cache folder laid out as the hub
client lays it out (offline mode), and `push_to_hub` with the hub client's API calls recorded instead of sent. Each
runs the same steps on HF PEFT and on peftfast and compares."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import peft
import peft.helpers
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from models import tiny_llama
from safetensors.torch import load
from tolerances import assert_close

import peftfast
import peftfast.helpers

LIBS = {"peft": peft, "peftfast": peftfast}
REPO = "someone/tiny-llama-lora"


def _lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> None:
    """What the hub client leaves after downloading `folder`'s files from `repo_id` at `commit` (branch `ref`):
    content-addressed blobs, a snapshot folder of relative symlinks to them, and the ref naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def _save_adapters(folder: Path, seed: int) -> None:
    base = tiny_llama()
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(folder)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A hub cache holding REPO at two commits (branch "main" and branch "v2", different adapters), in offline
    mode: any attempt to reach the Hub fails."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    for seed, commit, ref in ((1, "a" * 40, "main"), (2, "b" * 40, "v2")):
        _save_adapters(tmp_path / ref, seed)
        _lay_out_hub_cache(cache, REPO, tmp_path / ref, commit, ref)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return tmp_path


def _ids() -> torch.Tensor:
    return torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def test_from_pretrained_of_a_hub_id_reads_the_hub_cache_as_peft_does(hub_cache):
    records = {}
    for lib_name, lib in LIBS.items():
        records[lib_name] = {
            "main": _logits(lib.PeftModel.from_pretrained(tiny_llama(), REPO)),
            "v2": _logits(lib.PeftModel.from_pretrained(tiny_llama(), REPO, revision="v2")),
            "config": lib.PeftConfig.from_pretrained(REPO, cache_dir=str(hub_cache / "cache")).to_dict(),
        }
        with pytest.raises(ValueError, match="adapter_config.json"):
            lib.PeftModel.from_pretrained(tiny_llama(), "someone/not-in-the-cache")
    ours, theirs = records["peftfast"], records["peft"]
    for revision in ("main", "v2"):
        assert_close(ours[revision], theirs[revision])
        local = peftfast.PeftModel.from_pretrained(tiny_llama(), hub_cache / revision)
        assert_close(ours[revision], _logits(local))
    assert not torch.allclose(ours["main"], ours["v2"], atol=1e-3)
    assert ours["config"] == theirs["config"]


def test_hub_subfolders_and_load_adapter(hub_cache):
    # HF PEFT 0.21.2 offline prefixes the subfolder twice for weights, so the subfolder case is peftfast's alone.
    model = peftfast.PeftModel.from_pretrained(tiny_llama(), REPO)
    model.load_adapter(REPO, adapter_name="other", subfolder="other")
    model.set_adapter("other")
    local = peftfast.PeftModel.from_pretrained(tiny_llama(), hub_cache / "main" / "other")
    assert_close(_logits(model), _logits(local))
    assert peftfast.helpers.check_if_peft_model(REPO) and peft.helpers.check_if_peft_model(REPO)
    with pytest.raises(ValueError, match="no adapter_config.json|adapter_config.json"):
        peftfast.PeftConfig.from_pretrained(REPO, subfolder="missing")


def test_loading_a_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        peftfast.PeftConfig.from_pretrained("someone/anything")


class _RecordingHub:
    """The hub client's API, recording calls instead of making them (HF PEFT reaches it through transformers)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploads: dict[str, bytes] = {}
        recorder = self

        def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            recorder.calls.append(
                ("create_repo", dict(repo_id=repo_id, token=token, private=private, exist_ok=exist_ok))
            )
            return huggingface_hub.RepoUrl(f"https://huggingface.co/user/{repo_id}", endpoint="https://huggingface.co")

        def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
            recorder.calls.append(
                ("create_branch", dict(repo_id=repo_id, branch=branch, token=token, exist_ok=exist_ok))
            )

        def create_commit(
            self,
            repo_id,
            operations,
            *,
            commit_message,
            commit_description=None,
            token=None,
            create_pr=None,
            revision=None,
            **kwargs,
        ):
            recorder.calls.append(
                (
                    "create_commit",
                    dict(
                        repo_id=repo_id,
                        commit_message=commit_message,
                        token=token,
                        commit_description=commit_description,
                        create_pr=create_pr,
                        revision=revision,
                    ),
                )
            )
            for operation in operations:
                recorder.uploads[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
            return "commit-info"

        def no_card_on_the_hub(*args, **kwargs):
            raise EntryNotFoundError("no README.md")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(no_card_on_the_hub))


def _config_without_version(data: bytes) -> dict:
    config = json.loads(data)
    del config["peft_version"]
    return config


def test_push_to_hub_matches_peft(monkeypatch):
    pushes = {}
    for lib_name, lib in LIBS.items():
        hub = _RecordingHub(monkeypatch)
        torch.manual_seed(3)
        model = lib.get_peft_model(
            tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        )
        model.add_adapter("other", lib.LoraConfig(r=3, target_modules=["v_proj"]))
        result = model.push_to_hub("tiny-lora", private=True, token="hf_x", revision="dev", tags=["mine"])
        config_hub = _RecordingHub(monkeypatch)
        config_result = model.peft_config["other"].push_to_hub("tiny-lora-config", create_pr=True)
        pushes[lib_name] = hub, result, config_hub, config_result
    (ours, our_result, our_config, _), (theirs, their_result, their_config, _) = pushes["peftfast"], pushes["peft"]
    assert our_result == their_result == "commit-info"
    assert ours.calls == theirs.calls
    assert [name for name, _ in ours.calls] == ["create_repo", "create_branch", "create_commit"]
    assert ours.calls[2][1]["repo_id"] == "user/tiny-lora" and ours.calls[2][1]["commit_message"] == "Upload model"
    assert (
        set(ours.uploads)
        == set(theirs.uploads)
        == {
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "other/adapter_config.json",
            "other/adapter_model.safetensors",
        }
    )
    for path in ("adapter_config.json", "other/adapter_config.json"):
        assert _config_without_version(ours.uploads[path]) == _config_without_version(theirs.uploads[path])
    for path in ("adapter_model.safetensors", "other/adapter_model.safetensors"):
        our_tensors, their_tensors = load(ours.uploads[path]), load(theirs.uploads[path])
        assert sorted(our_tensors) == sorted(their_tensors)
        for key in their_tensors:
            assert torch.equal(our_tensors[key], their_tensors[key])
    # The model card: transformers writes its own over HF PEFT's; peftfast keeps the PEFT-format one it saved.
    card = huggingface_hub.ModelCard(ours.uploads["README.md"].decode())
    assert card.data.library_name == "peft" and "mine" in card.data.tags
    assert our_config.calls == their_config.calls
    assert our_config.calls[-1][1]["commit_message"] == "Upload config" and our_config.calls[-1][1]["create_pr"]
    assert set(our_config.uploads) == set(their_config.uploads) == {"README.md", "adapter_config.json"}
    assert _config_without_version(our_config.uploads["adapter_config.json"]) == _config_without_version(
        their_config.uploads["adapter_config.json"]
    )
