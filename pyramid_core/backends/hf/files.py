"""Reading the files of a model folder with errors that name the file and the fix.

A folder ``pyramid setup`` wrote records each file's size and sha256 in its manifest
(``pyramid_model.json``); a distilled stage records its weights' in ``stage.json``. Loading
checks sizes and the safetensors header (a few milliseconds); ``pyramid setup`` checks the
sha256 of each file modified since it was recorded, and of every file with ``--verify`` (about
2 s for the 538 MB SmolLM2 weights: too slow for every load).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pyramid_core.errors import ConfigError

__all__ = ["read_json", "fix_for", "family_dir", "family_installed", "sha256_file", "file_record", "check_record", "check_safetensors",
           "check_json_files", "JSON_FILES"]

JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "stage.json", "pyramid_model.json",
              "generation_config.json", "special_tokens_map.json")


HOME_ENV = "PYRAMID_HOME"


def model_home() -> Path:
    """``$PYRAMID_HOME``, default ``~/.cache/pyramid``."""
    return Path(os.environ.get(HOME_ENV) or "~/.cache/pyramid").expanduser()


def smollm2_dir() -> Path:
    return model_home() / "smollm2-135m"


FAMILY_PACKAGE = "pyramid_smollm2_family"
FAMILY_INSTALL = ("pip install -e ./family in a clone of pyramid (the README's commands do), "
                  "or pip install pyramid-smollm2-family")


def family_installed() -> bool:
    """Whether the distribution ``pyramid-smollm2-family`` (the distilled stages) is installed."""
    return importlib.util.find_spec(FAMILY_PACKAGE) is not None


def family_dir() -> Path:
    """The folder of the distilled SmolLM2 family (``pyramid distill all``), which ships as its own
    distribution, ``pyramid-smollm2-family``; a ``ConfigError`` saying how to install it when it
    is not installed."""
    try:
        module = importlib.import_module(FAMILY_PACKAGE)
    except ModuleNotFoundError:
        raise ConfigError(f"the distilled SmolLM2 family (distribution pyramid-smollm2-family) is not installed; "
                          f"{FAMILY_INSTALL}") from None
    return Path(module.data_dir())


def fix_for(path: str | Path) -> str:
    """How to repair a damaged file under ``path``: ``pyramid setup`` for its model cache,
    reinstalling pyramid for the shipped family, else replacing the file."""
    where = Path(path).expanduser().resolve()
    if where.is_relative_to(smollm2_dir().expanduser().resolve()):
        return "run `pyramid setup` to repair it"
    if family_installed() and where.is_relative_to(family_dir().resolve()):
        return ("it ships in pyramid-smollm2-family: reinstall it (`pip install --force-reinstall -e ./family` in a "
                "clone of pyramid, or `pip install --force-reinstall pyramid-smollm2-family`) to repair it")
    return "replace it with a good copy (re-save or re-download the model)"


def read_json(path: str | Path, *, fix: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; a ``ConfigError`` naming the file, the parse error and the
    fix when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid JSON ({exc}); {fix or fix_for(path)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix or fix_for(path)}")
    return data


def check_json_files(directory: str | Path, names: Iterable[str] = JSON_FILES, *, fix: str | None = None) -> None:
    """``read_json`` each of ``names`` present in ``directory`` (to name the culprit when a
    loader failed)."""
    for name in names:
        if (Path(directory) / name).is_file():
            read_json(Path(directory) / name, fix=fix)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"size", "sha256", "mtime_ns"}`` of a file, as manifests record it."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "sha256": sha256_file(path), "mtime_ns": stat.st_mtime_ns}


def check_record(path: str | Path, record: Mapping[str, Any], *, sha256: Literal["never", "if_changed", "always"] = "never",
                 fix: str | None = None) -> None:
    """Compare ``path`` with its recorded size and sha256 (``"if_changed"``: only when its
    modification time differs from the recorded one, as ``make`` and ``git status`` decide); a
    ``ConfigError`` naming the file, both values and the fix on a mismatch."""
    path = Path(path)
    fix = fix or fix_for(path)
    if not path.is_file():
        raise ConfigError(f"{path} is missing; {fix}")
    stat, expected = path.stat(), record.get("size")
    if expected is not None and stat.st_size != int(expected):
        what = "empty" if stat.st_size == 0 else "truncated" if stat.st_size < int(expected) else "altered"
        raise ConfigError(f"{path} is {what}: {stat.st_size} bytes, {int(expected)} recorded; {fix}")
    changed = sha256 == "always" or (sha256 == "if_changed" and stat.st_mtime_ns != record.get("mtime_ns"))
    if changed and record.get("sha256") and sha256_file(path) != record["sha256"]:
        raise ConfigError(f"{path} is altered: its sha256 differs from the recorded {str(record['sha256'])[:12]}...; {fix}")


def check_safetensors(path: str | Path, *, fix: str | None = None) -> None:
    """Check that a safetensors file is as long as its header says (catches truncation without a
    record; reads the header only)."""
    path = Path(path)
    fix = fix or fix_for(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            if size < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise ValueError(f"{size} bytes, shorter than its {n}-byte header")
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        what = "empty" if size == 0 else "damaged"
        raise ConfigError(f"{path} is {what} (not a readable safetensors file: {exc}); {fix}") from None
    if 8 + n + end != size:
        what = "truncated" if size < 8 + n + end else "altered"
        raise ConfigError(f"{path} is {what}: {size} bytes, its header says {8 + n + end}; {fix}")
