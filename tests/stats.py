"""Shared statistics for the exactness tests: chi-square against a known distribution, analytic
marginals of Markov tables, and seeded sampling loops.

Conventions used by every statistical test in this suite:
- every sample is seeded (``seed = base + i``), so a test is deterministic;
- a lossless configuration must give ``p > ALPHA`` and a deliberately broken one ``p < REJECT``;
- tables are chosen so that the bugs the tests look for move the output distribution by a total
  variation of >= 0.05, which the stated sample sizes detect with p far below ``REJECT``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pyramid_core.testing.exactness import chi_square_p_value

__all__ = [
    "ALPHA",
    "REJECT",
    "chisquare_pvalue",
    "counts",
    "markov_marginal",
    "markov_matrix",
    "sample_positions",
    "tv",
]

# A correct (lossless) configuration must pass with p > ALPHA. With ~50 seeded chi-square tests in
# the suite the chance that a correct library fails any of them after a legitimate change of the
# random stream is about 50 * 1e-4 = 0.5%.
ALPHA = 1e-4
# A deliberately wrong configuration (negative control) must be rejected with p < REJECT.
REJECT = 1e-6


def tv(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Total variation distance between two probability vectors."""
    return 0.5 * float(np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def counts(tokens: Sequence[int] | np.ndarray, vocab: int) -> np.ndarray:
    """Histogram of token ids over ``range(vocab)``."""
    return np.bincount(np.asarray(tokens, dtype=np.int64).ravel(), minlength=vocab)[:vocab]


def chisquare_pvalue(observed: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, *, min_expected: float = 5.0) -> float:
    """``pyramid_core.testing.exactness.chi_square_p_value`` (zero-probability cells and pooling of small
    expected counts), after checking that ``probs`` is a distribution."""
    p = np.asarray(probs, dtype=float).ravel()
    if abs(p.sum() - 1.0) > 1e-6 or (p < 0).any():
        raise ValueError(f"probs is not a distribution: {p}")
    return chi_square_p_value(np.asarray(observed).ravel().tolist(), p.tolist(), min_expected=min_expected)


def markov_matrix(fn: Callable[[tuple[int, ...]], Sequence[float]], vocab: int) -> np.ndarray:
    """The transition matrix of a table that depends on the last token only."""
    return np.array([fn((a,)) for a in range(vocab)], dtype=float)


def markov_marginal(matrix: np.ndarray, last_token: int, steps: int) -> np.ndarray:
    """Distribution of the ``steps``-th generated token after a prompt ending in ``last_token``:
    row ``last_token`` of ``matrix ** steps``."""
    return np.linalg.matrix_power(np.asarray(matrix, dtype=float), steps)[last_token]


def sample_positions(generate: Callable[[int], torch.Tensor | Sequence[int]], runs: int, length: int, *, base_seed: int = 0) -> np.ndarray:
    """``Long[ndarray, "runs length"]``: ``generate(seed)`` for ``seed = base_seed + i``; every run
    must return exactly ``length`` tokens."""
    out = np.empty((runs, length), dtype=np.int64)
    for i in range(runs):
        tokens = generate(base_seed + i)
        row = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if len(row) != length:
            raise AssertionError(f"seed {base_seed + i}: expected {length} tokens, got {row}")
        out[i] = row
    return out
