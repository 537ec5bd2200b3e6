"""Argument types for the command lines (``pyramid`` and its tools): a bad value is refused by
argparse with the flag's name and what would be valid, before anything runs."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from pyramid_core.errors import ConfigError
from pyramid_core.rng import SEED_LIMIT, check_seed, seed_range

__all__ = ["int_at_least", "block_length", "quality_budget", "quality_budgets", "seed_value", "seed_below", "negative_numbers_are_values"]


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``; ``what`` says what the number means."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}{what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{what}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


block_length = int_at_least(1, " (tokens a stage proposes per round)")


def quality_budget(text: str) -> float:
    """An argparse type: a quality budget, an excess NLL in nats/token (finite, >= 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected nats/token (e.g. 0.1), got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"a price budget is finite and >= 0 nats/token, got {text!r}")
    return value


quality_budget.__name__ = "nats/token"


def quality_budgets(text: str) -> list[float]:
    """An argparse type: one quality budget or several, comma-separated (``0.02,0.1,0.5``)."""
    values = [quality_budget(t.strip()) for t in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a budget is given twice in {text!r}")
    return values


quality_budgets.__name__ = "nats/token list"


def seed_below(limit: int) -> Callable[[str], int]:
    """An argparse type: a seed, an integer in [0, limit) (``pyramid_core.rng.check_seed``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer seed in {seed_range(limit)}, got {text!r}") from None
        try:
            return check_seed(value, "a seed", limit)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "seed"
    return parse


seed_value = seed_below(SEED_LIMIT)  # what torch.Generator takes, less Rng's per-device offsets

# a value that starts like a negative number: "-0.1", "-1e-3", "-0.1,0.6,0.5"
_NEGATIVE = re.compile(r"^-\.?\d")


def negative_numbers_are_values(p: argparse.ArgumentParser) -> None:
    """Let ``p`` read ``--dist -0.1,0.6,0.5`` as the flag's value (then refused as a value, by
    name), not as an unknown option: argparse only does so for a lone negative number. ``p`` must
    have no option that looks like a negative number."""
    p._negative_number_matcher = _NEGATIVE
