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
from scipy import stats as scipy_stats

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
    """Pearson chi-square goodness of fit of ``observed`` counts to ``probs``.

    Zero-probability categories are not chi-square cells: a single observation in one means the
    sample cannot come from ``probs`` (p = 0); otherwise they are dropped. Categories whose
    expected count is below ``min_expected`` are merged (smallest first) into one pooled cell so
    the chi-square approximation holds. Returns 1.0 when fewer than two cells remain.
    """
    obs = np.asarray(observed, dtype=float).ravel()
    p = np.asarray(probs, dtype=float).ravel()
    if obs.shape != p.shape:
        raise ValueError(f"observed has {obs.size} categories, probs {p.size}")
    if abs(p.sum() - 1.0) > 1e-6 or (p < 0).any():
        raise ValueError(f"probs is not a distribution: {p}")
    n = obs.sum()
    if n == 0:
        raise ValueError("no observations")
    if obs[p <= 0].sum() > 0:
        return 0.0
    keep = p > 0
    obs, expected = obs[keep], n * p[keep] / p[keep].sum()
    order = np.argsort(expected, kind="stable")
    obs, expected = obs[order], expected[order]
    # pool every cell with a small expected count (they are first after sorting) into one cell;
    # if the pooled cell is still small, merge it with the next smallest cell
    small = int((expected < min_expected).sum())
    if small > 1:
        obs = np.concatenate([[obs[:small].sum()], obs[small:]])
        expected = np.concatenate([[expected[:small].sum()], expected[small:]])
    if len(expected) > 1 and expected[0] < min_expected:
        obs = np.concatenate([[obs[0] + obs[1]], obs[2:]])
        expected = np.concatenate([[expected[0] + expected[1]], expected[2:]])
    if len(expected) < 2:
        return 1.0
    return float(scipy_stats.chisquare(obs, expected).pvalue)


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
