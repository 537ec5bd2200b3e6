"""Hugging Face ids as stage locations (``pyramid_core.backends.hf.hub``), with no network.

A Hugging Face cache is laid out by hand in ``tmp_path`` as huggingface_hub lays it out
(``hub/models--org--name/snapshots/<commit>/...`` and ``refs/<branch>`` holding the commit), with
``HF_HOME`` / ``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``. huggingface_hub reads
those variables once, when it is imported, so the fixture sets its ``constants`` too; one test
runs a fresh process to check that the variables alone are honoured. The download path runs
against a stand-in for ``snapshot_download``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from pyramid_core import ConfigError, make_stage
from pyramid_core.backends.hf import HFStage, hub, load_model
from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig, save_feature_head
from pyramid_core.backends.hf.head_stage import FeatureStage
from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama

REPO = "org/name"
COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40
CONTEXT = torch.tensor([3, 5, 7, 11, 13])


def snapshot(cache: Path, repo_id: str, commit: str, *refs: str) -> Path:
    """``cache/models--org--name/snapshots/<commit>``, created, with ``refs/<ref>`` -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding ``org/name`` (main, and tag ``v1`` at another commit)."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    save_with_words(tiny_llama(9), snapshot(cache, REPO, COMMIT, "main"))
    save_with_words(tiny_llama(10), snapshot(cache, REPO, OTHER_COMMIT, "v1"))
    return cache


def logits(stage: Any) -> torch.Tensor:
    with torch.inference_mode():
        return stage.score(CONTEXT).clone()


def one_line_error(spec: str) -> str:
    with pytest.raises(ConfigError) as info:
        make_stage(spec, dtype="float32")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_id_in_the_cache_builds_the_same_stage_as_its_local_directory(cache: Path, tmp_path: Path) -> None:
    local = save_with_words(tiny_llama(9), tmp_path / "local" / "name")
    by_id = make_stage(f"hf:path={REPO}", dtype="float32")
    by_path = make_stage(f"hf:path={local}", dtype="float32")
    assert isinstance(by_id, HFStage) and isinstance(by_path, HFStage)
    assert torch.equal(logits(by_id), logits(by_path))
    assert by_id.tokenizer is not None and by_id.vocab_size == 64
    # records name the id the user gave, not the snapshot's commit hash
    assert by_id.name == REPO and by_path.name == "name"
    assert make_stage(f"hf:path={REPO},num_layers=1", dtype="float32").name == f"{REPO}[:1]"


def test_a_revision_picks_its_snapshot(cache: Path) -> None:
    main = make_stage(f"hf:path={REPO}", dtype="float32")
    for revision in ("v1", OTHER_COMMIT):
        tagged = make_stage(f"hf:path={REPO}@{revision}", dtype="float32")
        assert tagged.name == f"{REPO}@v1"
        assert not torch.equal(logits(tagged), logits(main))
    assert make_stage(f"hf:path={REPO}@{COMMIT}", dtype="float32").name == REPO  # the commit main points at


def test_python_entries_take_an_id(cache: Path) -> None:
    stage = HFStage.from_pretrained(REPO, dtype="float32")
    assert stage.name == REPO and stage.tokenizer is not None
    assert load_model(f"{REPO}@v1").config.name_or_path == str(cache.resolve() / f"models--org--name/snapshots/{OTHER_COMMIT}")


def test_a_revision_not_in_the_cache_is_a_one_line_error(cache: Path) -> None:
    message = one_line_error(f"hf:path={REPO}@v2")
    assert f"{REPO}@v2 is no local directory and not in the Hugging Face cache at {cache}" in message
    assert "HF_HUB_OFFLINE=1" in message and f"`hf download {REPO} --revision v2`" in message


def test_an_unknown_id_is_a_one_line_error(cache: Path) -> None:
    message = one_line_error("hf:path=someone/unknown")
    assert f"someone/unknown is no local directory and not in the Hugging Face cache at {cache}" in message
    assert "`hf download someone/unknown`" in message and "or pass a local path" in message


@pytest.mark.parametrize("location", ["/no/such/dir", "a/b/c", "org/name@", "org/na--me"])
def test_neither_a_directory_nor_an_id_says_so(cache: Path, location: str) -> None:
    message = one_line_error(f"hf:path={location}")
    assert f"{location} is not a Hugging Face model directory (no such directory) nor a Hugging Face id" in message


def test_a_snapshot_without_weights_is_not_taken_for_the_model(cache: Path) -> None:
    (snapshot(cache, "org/partial", COMMIT, "main") / "config.json").write_text("{}")  # e.g. left by AutoConfig
    assert "org/partial is no local directory and not in the Hugging Face cache" in one_line_error("hf:path=org/partial")


def test_a_local_directory_of_the_same_name_wins(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    local = save_with_words(tiny_llama(11), work / "org" / "name")
    monkeypatch.chdir(work)
    stage = make_stage(f"hf:path={REPO}", dtype="float32")
    assert torch.equal(logits(stage), logits(make_stage(f"hf:path={local}", dtype="float32")))
    assert not torch.equal(logits(stage), logits(make_stage(f"hf:path={cache}/models--org--name/snapshots/{COMMIT}",
                                                            dtype="float32")))
    assert stage.name == "name"


def test_a_feature_head_resolves_by_id(cache: Path, tmp_path: Path) -> None:
    base = save_with_words(tiny_llama(9), tmp_path / "base")
    torch.manual_seed(0)
    head = FeatureHead(load_model(base), FeatureHeadConfig(layers=(-1,), variant="eagle1"))
    save_feature_head(head, snapshot(cache, "org/head", COMMIT, "main"), base=str(base))
    for spec in ("hf:path=org/head", "feature:path=org/head"):
        stage = make_stage(spec, dtype="float32")
        assert isinstance(stage, FeatureStage) and stage.name == "org/head"


class FakeHub:
    """``snapshot_download`` as the hub would answer it: nothing cached; a download writes the
    model into the cache and records what it was asked for."""

    def __init__(self, cache: Path, error: Exception | None = None) -> None:
        self.cache, self.error = cache, error
        self.asked: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None,
                 local_files_only: bool = False) -> str:
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        self.asked.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        if self.error is not None:
            raise self.error
        return str(save_with_words(tiny_llama(9), snapshot(self.cache, repo_id, "c" * 40, revision or "main")))


def test_an_id_not_in_the_cache_is_downloaded_with_what_a_stage_needs(cache: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(cache)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    stage = make_stage("hf:path=someone/new@dev", dtype="float32")
    assert isinstance(stage, HFStage) and stage.name == "someone/new@dev"
    (asked,) = fake.asked
    assert (asked["repo_id"], asked["revision"]) == ("someone/new", "dev")
    patterns = set(asked["allow_patterns"])
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model*.safetensors", "model.safetensors.index.json"} <= patterns
    assert not any(p in {"*", "*.bin", "*.pt", "*.onnx", "*.gguf"} for p in patterns)


def test_offline_no_download_is_tried(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(cache)
    monkeypatch.setattr(hub, "snapshot_download", fake)
    assert "HF_HUB_OFFLINE=1" in one_line_error("hf:path=someone/new")
    assert fake.asked == []


def test_a_failed_download_is_a_one_line_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "snapshot_download", FakeHub(cache, LocalEntryNotFoundError("no route\nto the hub")))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    message = one_line_error("hf:path=someone/new")
    assert "someone/new is no local directory and not in the Hugging Face cache" in message
    assert "downloading it failed (no route)" in message and "`hf download someone/new`" in message


def test_hf_home_alone_is_honoured_by_a_fresh_process(tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    folder = snapshot(home / "hub", REPO, COMMIT, "main")
    save_with_words(tiny_llama(9), folder)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    code = "from pyramid_core.backends.hf.hub import resolve_model_dir; print(resolve_model_dir('org/name'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == folder.resolve()


@pytest.mark.parametrize(("text", "parsed"), [
    ("org/name", ("org/name", None)), ("gpt2", ("gpt2", None)), ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")), ("org/name@", None), ("/abs/dir", None), ("./dir", None),
    ("~/models/x", None), ("a/b/c", None),
])
def test_parse_hub_id(text: str, parsed: tuple[str, str | None] | None) -> None:
    assert hub.parse_hub_id(text) == parsed
