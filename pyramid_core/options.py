"""Options of model stages, typed once where they enter (a command-line flag, a spec string, a
keyword) and passed down unchanged.

``ExecutionMode`` is how a model stage runs its forwards: ``EAGER`` (the framework's own
modules), ``FAST`` (the backend's fast mode; for the Hugging Face backend on CPU, oneDNN
pre-packed weights -- docs/compile.md) or ``AUTO``: the fast mode wherever the backend supports it
for the stage's device and dtype, eager elsewhere. ``AUTO`` is resolved in one place, by the
backend that builds the stage (``pyramid_core.backends.hf.runtime.resolve_mode``).
"""

from __future__ import annotations

import enum

from pyramid_core.errors import ConfigError

__all__ = ["ExecutionMode"]

_WORDS = {
    "auto": "AUTO",
    "eager": "EAGER", "false": "EAGER", "no": "EAGER", "off": "EAGER", "0": "EAGER",
    "fast": "FAST", "true": "FAST", "yes": "FAST", "on": "FAST", "1": "FAST",
}


class ExecutionMode(enum.Enum):
    """How a model stage runs its forwards (module docstring)."""

    AUTO = "auto"
    EAGER = "eager"
    FAST = "fast"

    @classmethod
    def parse(cls, value: ExecutionMode | bool | str) -> ExecutionMode:
        """From a flag, a spec value or a keyword: ``auto``; ``true`` / ``fast``; ``false`` /
        ``eager`` (and the booleans)."""
        if isinstance(value, ExecutionMode):
            return value
        if isinstance(value, bool):
            return cls.FAST if value else cls.EAGER
        word = _WORDS.get(str(value).strip().lower())
        if word is None:
            raise ConfigError(f"compile must be one of auto, true (fast), false (eager), got {value!r}")
        return cls[word]

    def __str__(self) -> str:
        return self.value
