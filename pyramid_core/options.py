"""Options of model stages, typed once where they enter (a command-line flag, a spec string, a
keyword) and passed down unchanged.

``ExecutionMode`` is how a model stage runs its forwards: ``EAGER`` (the framework's own
modules), ``FAST`` (for the Hugging Face backend on CPU: oneDNN pre-packed weights --
docs/compile.md), ``GRAPHS`` (on CUDA: forwards over a static KV cache, captured as one CUDA graph
per fed-length bucket), ``STATIC`` (the same static-shape forwards, not captured: for checking
them on any device), ``COMPILED`` (on CPU: those static-shape forwards compiled with inductor, one
graph per bucket; opt-in: docs/compile.md) or ``AUTO``: the fastest mode the backend supports for the stage's device and
dtype. ``AUTO`` is resolved in one place, by the backend that builds the stage
(``pyramid_core.backends.hf.runtime.resolve_mode``).

``DecodeOptions`` is how a pipeline decodes -- the sampling transform, the stop tokens, the
length schedule, the confidence stop and what a non-finite logit does -- validated by its
constructor, the one place these values are checked (``PipelineSpec`` and ``Pipeline`` both build
one from what they are given).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.schedule import SCHEDULES
from pyramid_core.types import SamplingConfig
from pyramid_core.validate import NonFiniteMode, check_nonfinite_mode

__all__ = ["ExecutionMode", "DecodeOptions", "DTYPE_WORDS", "dtype_word"]

_WORDS = {
    "auto": "AUTO",
    "eager": "EAGER", "false": "EAGER", "no": "EAGER", "off": "EAGER", "0": "EAGER",
    "fast": "FAST", "true": "FAST", "yes": "FAST", "on": "FAST", "1": "FAST",
    "graphs": "GRAPHS", "static": "STATIC", "compiled": "COMPILED",
}


class ExecutionMode(enum.Enum):
    """How a model stage runs its forwards (module docstring)."""

    AUTO = "auto"
    EAGER = "eager"
    FAST = "fast"
    GRAPHS = "graphs"
    STATIC = "static"
    COMPILED = "compiled"

    @classmethod
    def parse(cls, value: ExecutionMode | bool | str) -> ExecutionMode:
        """From a flag, a spec value or a keyword: ``auto``; ``true`` / ``fast``; ``false`` /
        ``eager`` (and the booleans); ``graphs``; ``static``; ``compiled``."""
        if isinstance(value, ExecutionMode):
            return value
        if isinstance(value, bool):
            return cls.FAST if value else cls.EAGER
        word = _WORDS.get(str(value).strip().lower())
        if word is None:
            raise ConfigError(f"compile must be one of auto, true (fast), false (eager), graphs, static, "
                              f"compiled, got {value!r}")
        return cls[word]

    def __str__(self) -> str:
        return self.value


DTYPE_WORDS = ("auto", "float32", "bfloat16", "float16")
"""What ``dtype=`` / ``--dtype`` take: ``auto`` is what the device computes natively (bfloat16 on
CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere; resolved by the backend)."""

_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_word(value: object) -> str:
    """``"bf16"`` / ``"torch.bfloat16"`` -> ``"bfloat16"``; one of ``DTYPE_WORDS`` or a
    ``ConfigError`` naming the value."""
    word = str(value).strip().lower().removeprefix("torch.")
    word = _DTYPE_ALIASES.get(word, word)
    if word not in DTYPE_WORDS:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_WORDS)}, got {value!r}")
    return word


def _stop_ids(value: Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    ids = tuple(value)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ConfigError(f"stop_ids must be non-negative token ids, got {bad[0]!r} in {list(ids)}")
    return ids


def _schedule(instance: object, attribute: object, value: str) -> None:
    if value not in SCHEDULES:
        raise ConfigError(f"unknown length schedule {value!r}; valid: {', '.join(SCHEDULES)}")


def _confidence(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"confidence_stop must be a number in [0, 1) (0 = off), got {value!r}") from None
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"confidence_stop must be in [0, 1) (0 = off), got {value!r}")
    return number


@attrs.frozen
class DecodeOptions:
    """How a pipeline decodes (module docstring).

    sampling:        the transform applied identically at every stage
    stop_ids:        token ids that end a generation; ``None``: the target tokenizer's EOS, if any
    length_schedule: ``"fixed"`` or ``"adaptive"`` block lengths (``pyramid_core.schedule``)
    confidence_stop: > 0: a model bottom stage ends its block after a token whose row's largest
                     probability is below it (0: off)
    on_nonfinite:    ``"raise"`` or ``"warn"``: what a NaN / +inf logit does
    """

    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    stop_ids: tuple[int, ...] | None = attrs.field(default=None, converter=_stop_ids)
    length_schedule: str = attrs.field(default="fixed", validator=_schedule)
    confidence_stop: float = attrs.field(default=0.0, converter=_confidence)
    on_nonfinite: NonFiniteMode = attrs.field(default="raise", converter=check_nonfinite_mode)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse stop ids the target cannot emit (known once the stages are): they would never stop."""
        bad = [i for i in self.stop_ids or () if i >= vocab_size]
        if bad:
            raise ConfigError(f"stop_ids holds {bad[0]}, outside the vocabulary of the stages (valid ids: "
                              f"0 .. {vocab_size - 1}); it could never stop a generation")
