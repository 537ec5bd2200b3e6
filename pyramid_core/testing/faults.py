"""Fault injection: stages that break at a chosen call, to test what the pipeline does then.

``FaultyStage`` wraps any ``Stage`` and, at its ``at_call``-th ``score`` call (1-based, counted
over the stage's lifetime, across generations), misbehaves in one of these ways (``Fault``):

- ``"nan"`` / ``"inf"`` / ``"-inf-row"``: returns the wrapped stage's logits with one entry set
  to NaN / +inf (row ``row``, column ``column``), or one whole row set to -inf;
- ``"raise-before"``: raises ``InjectedFault`` before the wrapped stage runs (its cache untouched);
- ``"raise-after"``: runs the wrapped stage -- its cache now holds the scored positions -- and
  raises ``InjectedFault`` instead of returning the rows;
- ``"narrow"`` / ``"short"``: returns one column too few (the wrong width) / one row too few.

``persistent=True`` keeps misbehaving on every call from ``at_call`` on. ``fail_module`` makes
a ``torch.nn.Module`` (e.g. one decoder layer of a Hugging Face model) raise in the middle of a
forward, which exercises the backend's own recovery (``HFStage`` resets its cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.protocols import Stage
from pyramid_core.types import Block

__all__ = ["FAULTS", "Fault", "FaultyStage", "InjectedFault", "fail_module"]

Fault = Literal["nan", "inf", "-inf-row", "raise-before", "raise-after", "narrow", "short"]
FAULTS: tuple[str, ...] = ("nan", "inf", "-inf-row", "raise-before", "raise-after", "narrow", "short")


class InjectedFault(RuntimeError):
    """The exception a ``FaultyStage`` or ``fail_module`` raises on purpose."""


class FaultyStage:
    """A ``Stage`` that is ``stage`` except at its ``at_call``-th ``score`` call (module docstring).

    ``calls`` counts every ``score`` call; ``fired`` how many times the fault happened. ``row``
    and ``column`` pick the poisoned entry (clamped to the rows returned; ``row=-1``: the last)."""

    def __init__(self, stage: Stage, fault: Fault, *, at_call: int = 1, row: int = 0, column: int = 0,
                 persistent: bool = False, name: str | None = None) -> None:
        if fault not in FAULTS:
            raise ConfigError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
        if at_call < 1:
            raise ConfigError(f"at_call counts score() calls from 1, got {at_call}")
        if not 0 <= column < stage.vocab_size:
            raise ConfigError(f"column {column} is outside the vocabulary of {stage.name!r} (0 .. {stage.vocab_size - 1})")
        self.stage = stage
        self.fault = fault
        self.at_call = at_call
        self.row = row
        self.column = column
        self.persistent = persistent
        self.name = name or stage.name
        self.vocab_size = stage.vocab_size
        self.device = stage.device
        self.calls = 0
        self.fired = 0

    def _due(self) -> bool:
        return self.calls == self.at_call or (self.persistent and self.calls > self.at_call)

    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        self.calls += 1
        if not self._due():
            return self.stage.score(context, block)
        self.fired += 1
        where = f"{self.name!r} at score() call {self.calls}"
        if self.fault == "raise-before":
            raise InjectedFault(f"injected fault in {where}, before its forward")
        logits = self.stage.score(context, block)
        if self.fault == "raise-after":
            raise InjectedFault(f"injected fault in {where}, after its forward")
        if self.fault == "narrow":
            return logits[:, :-1]
        if self.fault == "short":
            return logits[:-1]
        out = logits.clone()
        row = max(0, min(self.row if self.row >= 0 else out.shape[0] + self.row, out.shape[0] - 1))
        if self.fault == "-inf-row":
            out[row] = -torch.inf
        else:
            out[row, self.column] = torch.nan if self.fault == "nan" else torch.inf
        return out

    def reset(self) -> None:
        """Resets the wrapped stage; the call counter keeps counting (a fault fires once)."""
        self.stage.reset()


@contextmanager
def fail_module(module: torch.nn.Module, *, at_call: int = 1) -> Iterator[list[int]]:
    """Within the block, the ``at_call``-th forward of ``module`` (1-based, counted from entering
    the block) raises ``InjectedFault`` before it computes anything: a fault in the middle of the
    enclosing model's forward. Yields a one-element list holding the calls seen so far."""
    seen = [0]

    def hook(_module: torch.nn.Module, _args: Any) -> None:
        seen[0] += 1
        if seen[0] == at_call:
            raise InjectedFault(f"injected fault in {type(module).__name__} at its forward {seen[0]}")

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
