"""Options of model stages, typed once where they enter (a command-line flag, a spec string, a
keyword) and passed down unchanged.

``ExecutionMode`` is how a model stage runs its forwards: ``EAGER`` (the framework's own
modules), ``FAST`` (for the Hugging Face backend on CPU: oneDNN pre-packed weights --
docs/compile.md), ``GRAPHS`` (on CUDA: forwards over a static KV cache, captured as one CUDA graph
per fed-length bucket), ``STATIC`` (the same static-shape forwards, not captured: for checking
them on any device) or ``AUTO``: the fastest mode the backend supports for the stage's device and
dtype. ``AUTO`` is resolved in one place, by the backend that builds the stage
(``pyramid_core.backends.hf.runtime.resolve_mode``).
"""

from __future__ import annotations

import enum

from pyramid_core.errors import ConfigError

__all__ = ["ExecutionMode"]

_WORDS = {
    "auto": "AUTO",
    "eager": "EAGER", "false": "EAGER", "no": "EAGER", "off": "EAGER", "0": "EAGER",
    "fast": "FAST", "true": "FAST", "yes": "FAST", "on": "FAST", "1": "FAST",
    "graphs": "GRAPHS", "static": "STATIC",
}


class ExecutionMode(enum.Enum):
    """How a model stage runs its forwards (module docstring)."""

    AUTO = "auto"
    EAGER = "eager"
    FAST = "fast"
    GRAPHS = "graphs"
    STATIC = "static"

    @classmethod
    def parse(cls, value: ExecutionMode | bool | str) -> ExecutionMode:
        """From a flag, a spec value or a keyword: ``auto``; ``true`` / ``fast``; ``false`` /
        ``eager`` (and the booleans); ``graphs``; ``static``."""
        if isinstance(value, ExecutionMode):
            return value
        if isinstance(value, bool):
            return cls.FAST if value else cls.EAGER
        word = _WORDS.get(str(value).strip().lower())
        if word is None:
            raise ConfigError(f"compile must be one of auto, true (fast), false (eager), graphs, static, "
                              f"got {value!r}")
        return cls[word]

    def __str__(self) -> str:
        return self.value
