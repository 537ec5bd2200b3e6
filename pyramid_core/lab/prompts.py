"""The project's prompt set (``pyramid_core/data/prompts.jsonl``), prompt-file loading, and
turning a prompt's text into token ids (``encode_prompt``)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["Prompt", "load_prompts", "default_prompts_path", "encode_prompt"]


@attrs.frozen
class Prompt:
    id: str
    kind: str
    text: str


def default_prompts_path() -> Path:
    return Path(str(resources.files("pyramid_core") / "data" / "prompts.jsonl"))


def load_prompts(path: str | Path | None = None, *, per_kind: int | None = None, kinds: list[str] | None = None) -> list[Prompt]:
    """Prompts from a JSONL file ({"id", "kind", "prompt"} per line) or a plain text file (one
    prompt per line). ``per_kind`` keeps the first N of each kind (a quick, balanced subset)."""
    path = Path(path) if path is not None else default_prompts_path()
    if not path.exists():
        raise ConfigError(f"prompt file {str(path)!r} does not exist")
    prompts: list[Prompt] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                prompts.append(Prompt(str(obj.get("id", f"line-{lineno}")), str(obj.get("kind", "any")), str(obj["prompt"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{lineno}: expected a JSON object with a 'prompt' key ({exc})") from None
        else:
            prompts.append(Prompt(f"line-{lineno}", "any", line.strip()))
    if kinds:
        prompts = [p for p in prompts if p.kind in kinds]
    if per_kind is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            if seen.get(p.kind, 0) < per_kind:
                kept.append(p)
                seen[p.kind] = seen.get(p.kind, 0) + 1
        prompts = kept
    if not prompts:
        raise ConfigError(f"prompt file {str(path)!r} holds no prompts (after filtering)")
    return prompts


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids of ``text``: as one user turn of the tokenizer's chat template (with the
    generation prompt) when ``chat`` and the tokenizer has a template, else plain encoding."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])
    return list(tokenizer(text)["input_ids"])
