"""Block-length schedules: how many tokens a boundary asks the stage below for, round by round.

A schedule may follow the acceptances it has already observed -- counts known before the next block
is drawn, a stopping time ([trap 2](../../algorithms.md#the-two-traps)) -- so every lossless rule
stays exact under it. It never looks at the tokens of the block it sizes.

- ``fixed``: always the boundary's block length (the default).
- ``adaptive``: Hugging Face's ``num_assistant_tokens_schedule="heuristic"``: start at the
  boundary's block length; after a round whose whole block was accepted ask for 2 more, after
  any other round for 1 fewer (never below 1, never above ``maximum``).

``expected_tokens(alpha, gamma)``: what a block of ``gamma`` earns per verification under i.i.d.
acceptance ([expected tokens per verification](../../algorithms.md#expected-tokens-per-verification)),
the quantity a planner of block lengths weighs against their cost.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["LengthSchedule", "FixedLength", "AdaptiveLength", "SCHEDULES", "make_schedule", "expected_tokens"]


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


def check_alpha(alpha: float, name: str = "alpha") -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0 or math.isnan(a):
        raise ConfigError(f"{name} must be an acceptance probability in [0, 1], got {alpha!r}")
    return a


def check_length(gamma: int, name: str = "gamma") -> int:
    if not isinstance(gamma, int) or gamma < 0:
        raise ConfigError(f"{name} must be an integer block length >= 0, got {gamma!r}")
    return gamma


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens emitted by one verification of a block of ``gamma`` drafted tokens,
    each accepted independently with probability ``alpha`` (accepted prefix + the one token the
    verifier always emits; Leviathan et al. 2023, Eq. 1)::

        E(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha)      (alpha = 1: gamma + 1)

    E = 1 at alpha = 0 (only the verifier's own token) and E = gamma + 1 at alpha = 1.
    """
    a, g = check_alpha(alpha), check_length(gamma)
    if a == 1.0:
        return float(g + 1)
    return (1.0 - a ** (g + 1)) / (1.0 - a)
