"""Block-length schedules: how many tokens a boundary asks the stage below for, round by round.

A schedule may follow the acceptances it has already observed -- counts known before the next block
is drawn, a stopping time ([trap 2](../../algorithms.md#the-two-traps)) -- so every lossless rule
stays exact under it. It never looks at the tokens of the block it sizes.

- ``fixed``: always the boundary's block length (the default).
- ``adaptive``: Hugging Face's ``num_assistant_tokens_schedule="heuristic"``: start at the
  boundary's block length; after a round whose whole block was accepted ask for 2 more, after
  any other round for 1 fewer (never below 1, never above ``maximum``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["LengthSchedule", "FixedLength", "AdaptiveLength", "SCHEDULES", "make_schedule"]


@runtime_checkable
class LengthSchedule(Protocol):
    """The block length of the next round, and what the last round did."""

    def length(self) -> int:
        ...

    def update(self, proposed: int, accepted: int) -> None:
        ...


@attrs.define
class FixedLength:
    ell: int

    def length(self) -> int:
        return self.ell

    def update(self, proposed: int, accepted: int) -> None:
        return None


@attrs.define
class AdaptiveLength:
    """+``step_up`` after a fully accepted block, -``step_down`` otherwise, within
    ``[minimum, maximum]``, starting at ``ell``."""

    ell: int
    step_up: int = 2
    step_down: int = 1
    minimum: int = 1
    maximum: int = 64

    def __attrs_post_init__(self) -> None:
        self.maximum = max(self.maximum, self.ell)

    def length(self) -> int:
        return self.ell

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:  # nothing was proposed: nothing was learnt
            return
        step = self.step_up if accepted == proposed else -self.step_down
        self.ell = min(self.maximum, max(self.minimum, self.ell + step))


SCHEDULES = {"fixed": FixedLength, "adaptive": AdaptiveLength}


def make_schedule(kind: str, ell: int) -> LengthSchedule:
    """A fresh schedule of ``kind`` starting at ``ell``."""
    try:
        factory = SCHEDULES[kind]
    except KeyError:
        raise ConfigError(f"unknown length schedule {kind!r}; valid: {', '.join(SCHEDULES)}") from None
    schedule: LengthSchedule = factory(ell)
    return schedule
