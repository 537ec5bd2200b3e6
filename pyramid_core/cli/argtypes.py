"""Argument types for the command lines (``pyramid`` and its tools): a bad value is refused by
argparse with the flag's name and what would be valid, before anything runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_at_least", "block_length"]


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
