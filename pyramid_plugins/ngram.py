"""``ngram``: model-free prompt-lookup drafting.

Find the longest suffix of the context (between ``min_ngram`` and ``max_ngram`` tokens) that
occurred earlier in the context, most recent occurrence first, and propose the tokens that
followed it. The proposal is deterministic, so each row is one-hot at the proposed token; the
exact policy then accepts token x with probability p(x) and otherwise samples the residual
(p without x, renormalised) -- still lossless.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.types import Block

__all__ = ["NgramProposer", "lookup"]


def lookup(context: list[int], n: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to ``n`` tokens that followed the most recent earlier match of the context's longest
    matching suffix; ``[]`` if no suffix of length >= min_ngram occurs earlier."""
    size = len(context)
    for k in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = context[size - k :]
        # most recent earlier occurrence whose continuation exists
        for start in range(size - k - 1, -1, -1):
            if context[start : start + k] == suffix:
                follow = context[start + k : start + k + n]
                if follow:
                    return follow
    return []


@attrs.frozen
class NgramProposer:
    """Prompt-lookup proposer; ``vocab_size`` is set by the pipeline builder (the target's)."""

    vocab_size: int = 0
    max_ngram: int = attrs.field(default=3)
    min_ngram: int = attrs.field(default=1)
    name: str = "ngram"

    def __attrs_post_init__(self) -> None:
        if self.min_ngram < 1:
            raise ValueError(f"min_ngram must be >= 1, got {self.min_ngram}")
        if self.max_ngram < self.min_ngram:
            raise ValueError(f"max_ngram ({self.max_ngram}) must be >= min_ngram ({self.min_ngram})")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        if self.vocab_size <= 0:
            raise ValueError("ngram proposer: vocab_size is not set (build it through pyramid_core.build_pipeline)")
        follow = lookup(context.tolist(), n, self.max_ngram, self.min_ngram)
        tokens = torch.tensor(follow, dtype=torch.long, device=context.device)
        rows = torch.zeros(len(follow), self.vocab_size, device=context.device)
        if follow:
            rows[torch.arange(len(follow)), tokens] = 1.0
        return Block(tokens, rows)


def _ngram(max_ngram: int = 3, min_ngram: int = 1, vocab_size: int = 0) -> NgramProposer:
    return NgramProposer(vocab_size=vocab_size, max_ngram=max_ngram, min_ngram=min_ngram)


@hookimpl
def register_proposers(register: Any) -> None:
    register("ngram", _ngram, "prompt-lookup drafting: continue the latest earlier match of the context's suffix")
