"""``ngram``: model-free prompt-lookup drafting.

Find the longest suffix of the context (between ``min_ngram`` and ``max_ngram`` tokens) that
occurred earlier in the context, most recent occurrence first, and propose the tokens that
followed it. The proposal is deterministic, so each row is one-hot at the proposed token; the
exact policy then accepts token x with probability p(x) and otherwise samples the residual
(p without x, renormalised) -- still lossless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.types import Block

__all__ = ["NgramProposer", "lookup"]


def lookup(context: Sequence[int] | np.ndarray, n: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to ``n`` tokens that followed the most recent earlier match of the context's longest
    matching suffix; ``[]`` if no suffix of length >= min_ngram occurs earlier. Vectorised: the
    earlier positions of the context's last token, kept while the tokens before them go on
    matching the suffix (a suffix with no earlier match has no longer one either)."""
    ctx = np.asarray(context, dtype=np.int64)
    size = len(ctx)
    top = min(max_ngram, size - 1)
    if top < min_ngram:
        return []
    ends = np.flatnonzero(ctx[: size - 1] == ctx[-1])  # where an earlier match would end: a token follows it
    best = (1, int(ends[-1])) if ends.size else (0, -1)
    for k in range(2, top + 1):
        ends = ends[ends >= k - 1]
        ends = ends[ctx[ends - (k - 1)] == ctx[size - k]]
        if not ends.size:
            break
        best = (k, int(ends[-1]))
    if best[0] < min_ngram:
        return []
    return [int(t) for t in ctx[best[1] + 1: best[1] + 1 + n]]


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

    def lookup_tokens(self, context: np.ndarray, n: int) -> list[int]:
        """The proposal's token ids alone, for a caller that needs no rows (vLLM's lanes)."""
        return lookup(context, n, self.max_ngram, self.min_ngram)

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        if self.vocab_size <= 0:
            raise ValueError("ngram proposer: vocab_size is not set (build it through pyramid_core.build_pipeline)")
        follow = lookup(context.cpu().numpy(), n, self.max_ngram, self.min_ngram)
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
