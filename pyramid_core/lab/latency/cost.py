"""A stage's forward cost as a function of the tokens it feeds, T(M).

A stage's forward time is a function T(M) of M, the number of new tokens the forward feeds (the
positions not yet in its KV cache), given as a ``ForwardCost``; a plain float is a flat T(M),
the papers' model. On a GPU T(M) is nearly flat for small M; on a CPU it is not, because
small-M GEMM is slower than the M = 1 GEMV path (a measured curve:
[forward cost T(M)](../../algorithms.md#forward-cost-tm)). ``predict_chain``
(``pyramid_core.lab.latency.chain``) charges every forward at its own M.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["ForwardCost", "as_forward_cost", "real_or_nan"]


def real_or_nan(value: Any) -> float:
    """``value`` as a float, or NaN for anything that is not a real number (bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _as_points(value: Iterable[Any]) -> tuple[tuple[int, float], ...]:
    return tuple(tuple(p) for p in value)  # checked in __attrs_post_init__



@attrs.frozen
class ForwardCost:
    """Seconds of one forward of a stage as a function of M, the number of new tokens the forward
    feeds (the positions not yet in the stage's cache): T(M), from measured points.

    points: (M, seconds) pairs, M strictly increasing integers >= 1, seconds finite and >= 0
    name:   the stage, named in error messages and reports

    Between two measured M, T is linear interpolation. Below the first measured M it is the
    first value (flat). Above the last it continues the last segment's slope when that slope is
    >= 0 (a compute-bound forward grows about linearly in M) and stays flat when it is negative:
    a falling segment, as on the CPU GEMM profile of the module docstring, must not extrapolate
    to ever cheaper (or negative) forwards. One point is a flat cost, T(M) = T for every M:
    ``ForwardCost.flat(T)``, the model of the papers, which a plain float means everywhere.
    """

    points: tuple[tuple[int, float], ...] = attrs.field(converter=_as_points)
    name: str = "stage"

    def __attrs_post_init__(self) -> None:
        who = f"forward cost of {self.name}"
        if not self.points:
            raise ConfigError(f"{who}: no measured points; give at least one (M, seconds) pair")
        previous = 0
        for point in self.points:
            if len(point) != 2:
                raise ConfigError(f"{who}: each point must be an (M, seconds) pair, got {point!r}")
            m, seconds = point
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"{who}: M (tokens fed by one forward) must be an integer >= 1, got {m!r}")
            if m <= previous:
                raise ConfigError(f"{who}: M must be strictly increasing, got M = {m} after M = {previous}")
            if not 0.0 <= real_or_nan(seconds) < math.inf:
                raise ConfigError(f"{who}: T(M={m}) must be a finite number of seconds >= 0, got {seconds!r}")
            previous = m

    @classmethod
    def flat(cls, seconds: float, name: str = "stage") -> ForwardCost:
        """T(M) = ``seconds`` for every M (the old model; a GPU at small M)."""
        return cls(((1, seconds),), name)

    @classmethod
    def from_table(cls, table: Mapping[int, float], name: str = "stage") -> ForwardCost:
        """From ``{M: seconds}``, in any key order."""
        return cls(sorted(table.items()), name)

    def __call__(self, m: int) -> float:
        """T(m) in seconds (class docstring: interpolation and extrapolation)."""
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"{self.name}: a forward feeds an integer M >= 1 tokens, got {m!r}")
        ms = [p[0] for p in self.points]
        i = bisect.bisect_left(ms, m)
        if i < len(ms) and ms[i] == m:
            return float(self.points[i][1])
        if i == 0:
            return float(self.points[0][1])
        if i == len(ms):
            if len(ms) == 1:
                return float(self.points[0][1])
            (m0, t0), (m1, t1) = self.points[-2], self.points[-1]
            return float(t1) + max(0.0, (float(t1) - float(t0)) / (m1 - m0)) * (m - m1)
        (m0, t0), (m1, t1) = self.points[i - 1], self.points[i]
        return float(t0) + (float(t1) - float(t0)) * (m - m0) / (m1 - m0)

    @property
    def decode(self) -> float:
        """T(1): one decode step, the cost of the stage generating alone."""
        return self(1)

    @property
    def is_flat(self) -> bool:
        """Whether every M costs the same (then how many tokens a forward feeds is irrelevant)."""
        return len({float(t) for _, t in self.points}) == 1

    def as_list(self) -> list[list[float]]:
        """``[[M, seconds], ...]`` for JSON."""
        return [[m, float(t)] for m, t in self.points]

    def format_ms(self) -> str:
        """``"1: 71.0, 2: 115.0, ..."``: milliseconds per forward at each measured M."""
        return ", ".join(f"{m}: {1000 * float(t):.1f}" for m, t in self.points)


def as_forward_cost(value: float | ForwardCost, name: str) -> ForwardCost:
    """``value`` as a ``ForwardCost``: a cost as it is, a number of seconds as a flat cost.
    ``name`` (e.g. ``"stage 2"``) is named in the error for anything else."""
    if isinstance(value, ForwardCost):
        return value
    if not 0.0 <= real_or_nan(value) < math.inf:
        raise ConfigError(
            f"forward time of {name} must be a finite number of seconds >= 0 or a ForwardCost, got {value!r}"
        )
    return ForwardCost.flat(float(value), name)
