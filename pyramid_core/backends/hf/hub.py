"""Where a stage's model lives: a local directory, or a Hugging Face id (``org/name``, with an
optional revision ``org/name@rev``) found in the local Hugging Face cache or downloaded from the hub.

    resolve_model_dir("/models/x")                  the directory itself (a local path always wins)
    resolve_model_dir("org/name")                   its snapshot in the cache, offline; else downloaded
    resolve_model_dir("org/name@v1.0")              a branch, tag or commit of it

The cache is huggingface_hub's (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` forbids
downloading), read and filled through its own functions. A download fetches only what a stage
loads (``DOWNLOAD_PATTERNS``).

huggingface_hub is imported where an id is resolved, not with this module: it imports
``tqdm.autonotebook``, which warns on stderr in every notebook without ipywidgets, and loading
the ``hf`` plugin (every ``import pyramid_core`` that builds a pipeline) should not cost that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyramid_core.errors import ConfigError

__all__ = ["DOWNLOAD_PATTERNS", "snapshot_download", "resolve_model_dir", "parse_hub_id", "hub_cache_dir", "location_label"]

DOWNLOAD_PATTERNS = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "model*.safetensors", "model.safetensors.index.json",
    "stage.json",  # a distilled stage or a feature head (`pyramid distill`)
)
"""What a causal-LM stage (or a ``pyramid distill`` folder) loads: no ``.bin`` or other formats."""

ID_FORM = "org/name or org/name@revision"


def snapshot_download(repo_id: str, **kwargs: Any) -> str:
    """``huggingface_hub.snapshot_download`` (imported on first use: module docstring)."""
    from huggingface_hub import snapshot_download as download

    return str(download(repo_id, **kwargs))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``, ``"org/name"`` -> ``("org/name", None)``;
    ``None`` when ``text`` is not a Hugging Face id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # exported lazily

    repo_id, at, revision = text.strip().partition("@")
    if at and not revision.strip():
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision.strip() or None


def resolve_model_dir(location: str | Path) -> Path:
    """The directory holding the model at ``location``: an existing local directory as it is;
    else a Hugging Face id's snapshot from the local cache (no network), else from the hub
    (only ``DOWNLOAD_PATTERNS``) unless ``HF_HUB_OFFLINE=1``. A ``ConfigError`` names the id,
    the cache it was looked for in, and what to do."""
    from huggingface_hub import constants

    path = Path(location).expanduser()
    if path.is_dir():
        return path
    text = str(location)
    parsed = parse_hub_id(text)
    if parsed is None:
        raise ConfigError(f"{text} is not a Hugging Face model directory (no such directory) nor a Hugging Face id "
                          f"({ID_FORM}); pass an existing directory or a model id")
    repo_id, revision = parsed
    cached = _cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    where = f"{text} is no local directory and not in the Hugging Face cache at {hub_cache_dir()}"
    get = f"`hf download {repo_id}" + (f" --revision {revision}`" if revision else "`")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where} (HF_HUB_OFFLINE=1: no download); download it with {get} where there is "
                          "network, or pass a local path")
    return _download(text, repo_id, revision, where, get)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision``, if it holds a loadable model (a folder
    with a config and weights, or a ``pyramid distill`` folder), looked up without the network."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS),
                                        local_files_only=True))
    except LocalEntryNotFoundError:  # not cached, or cached incompletely (IncompleteSnapshotError)
        return None
    # a snapshot may hold only what an earlier lookup fetched (a config.json, say)
    loadable = (folder / "stage.json").is_file() or (
        (folder / "config.json").is_file() and any(folder.glob("*.safetensors")))
    return folder if loadable else None


def _download(text: str, repo_id: str, revision: str | None, where: str, get: str) -> Path:
    """``repo_id`` at ``revision`` downloaded into the cache (what a stage loads only)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS)))
    except RevisionNotFoundError:
        raise ConfigError(f"{where}, and the hub has no revision {revision!r} of {repo_id}; "
                          f"give a branch, tag or commit of it") from None
    except GatedRepoError:
        raise ConfigError(f"{where}, and {repo_id} is gated on the hub; accept its terms on huggingface.co "
                          "and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}, and the hub has no model {repo_id} (or it is private: log in with "
                          "`hf auth login`); check the id or pass a local path") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = str(exc).splitlines()[0].removeprefix("Got: ") if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}, and downloading it failed ({reason}); download it with {get} or pass "
                          "a local path") from None


def location_label(directory: Path) -> str:
    """How records name the model in ``directory``: its folder name, or for a snapshot in a
    Hugging Face cache the id (``org/name``, ``org/name@ref`` for another branch or tag, or
    ``org/name@<commit>`` when no ref points at it) -- never the snapshot's commit hash alone."""
    snapshots, repo = directory.parent, directory.parent.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return directory.name
    repo_id = repo.name.removeprefix("models--").replace("--", "/")
    refs_dir = repo / "refs"
    refs = sorted(str(ref.relative_to(refs_dir)) for ref in refs_dir.rglob("*")
                  if ref.is_file() and ref.read_text().strip() == directory.name) if refs_dir.is_dir() else []
    if "main" in refs:
        return repo_id
    return f"{repo_id}@{refs[0] if refs else directory.name[:12]}"
