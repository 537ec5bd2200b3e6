"""The distilled SmolLM2-135M family for pyramid: a folder per stage under ``data/``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["data_dir"]


def data_dir() -> Path:
    """The folder holding ``family.json`` and ``draft/``, ``qualifier/``, ``feature/``."""
    return Path(str(resources.files(__name__) / "data"))
