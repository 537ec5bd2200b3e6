"""Closed forms of the latency model ([latency model](../../algorithms.md#latency-model)): tokens per verification,
speedups and throughputs of the papers, and the i.i.d. alpha that explains measured counts.

References
----------
- Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
  ICML 2023 (arXiv 2211.17192): expected tokens per verification and the walltime speedup.
- PyramidSD, "3-Model Speculative Decoding", arXiv 2510.12966: throughput ``V_SD`` and its
  three-model nesting ``V_FSD(Q,D)`` -> ``V_PSD``.
- Polybasic Speculative Decoding, arXiv 2510.26527 (ICML 2025): the N-model time lemma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pyramid_core.errors import ConfigError
from pyramid_core.schedule import check_alpha, check_length, expected_tokens

__all__ = [
    "expected_tokens",
    "pair_speedup",
    "sd_throughput",
    "psd_throughput",
    "polybasic_time",
    "iid_alpha",
    "check_alpha",
]


def pair_speedup(alpha: float, gamma: int, c: float) -> float:
    """Walltime speedup of a draft/target pair over the target alone (Leviathan et al. 2023,
    Theorem 3.8), with ``c`` = T_draft / T_target the cost ratio of one forward::

        S = E(alpha, gamma) / (gamma c + 1)
    """
    if not c >= 0:
        raise ConfigError(f"cost ratio c = T_draft / T_target must be >= 0, got {c!r}")
    return expected_tokens(alpha, gamma) / (gamma * c + 1.0)


def sd_throughput(beta: float, ell: int, v_draft: float, v_target: float) -> float:
    """Tokens/s of two-model speculative decoding (PyramidSD, arXiv 2510.12966)::

        V_SD = beta (ell + 1) / (ell / V_D + 1 / V_T)

    ``beta`` is the fraction of the ``ell + 1`` possible tokens a round delivers (mean accepted
    length + 1 over ell + 1), ``V_D`` and ``V_T`` the autoregressive tokens/s of draft and
    target (one forward per token)."""
    if not (v_draft > 0 and v_target > 0):
        raise ConfigError(f"throughputs must be > 0 tokens/s, got V_D={v_draft!r}, V_T={v_target!r}")
    check_length(ell, "ell")
    return beta * (ell + 1) / (ell / v_draft + 1.0 / v_target)


def psd_throughput(
    beta_qd: float,
    ell_d: int,
    beta_tq: float,
    ell_q: int,
    v_draft: float,
    v_qualifier: float,
    v_target: float,
) -> float:
    """Tokens/s of three-model PyramidSD (arXiv 2510.12966): the draft/qualifier pair acts as
    the draft of the target::

        V_FSD(Q, D) = beta_QD (ell_D + 1) / (ell_D / V_D + 1 / V_Q)
        V_PSD       = beta_TQ (ell_Q + 1) / (ell_Q / V_FSD(Q, D) + 1 / V_T)
    """
    v_fsd = sd_throughput(beta_qd, ell_d, v_draft, v_qualifier)
    return sd_throughput(beta_tq, ell_q, v_fsd, v_target)


def polybasic_time(
    forward_times: Sequence[float],
    accepted_lengths: Sequence[float],
    n_tokens: float,
    beta: float = 1.0,
) -> float:
    """Time for an n-model chain to generate ``n_tokens`` = N tokens (Polybasic speculative
    decoding, arXiv 2510.26527, Lemma; [latency model](../../algorithms.md#latency-model))::

        T = sum_{i<n} (N / L_i) T_i + beta (N / L_{n-1}) T_n

    ``forward_times`` = (T_1 .. T_n), smallest model first; ``accepted_lengths`` = (L_1 ..
    L_{n-1}), the mean accepted length at boundary i -> i+1."""
    n = len(forward_times)
    if n < 2 or len(accepted_lengths) != n - 1:
        raise ConfigError(
            f"polybasic_time needs n >= 2 forward times and n - 1 accepted lengths, got "
            f"{n} and {len(accepted_lengths)}"
        )
    if any(not length > 0 for length in accepted_lengths):
        raise ConfigError(f"mean accepted lengths must be > 0, got {list(accepted_lengths)}")
    lower = sum(n_tokens / accepted_lengths[i] * forward_times[i] for i in range(n - 1))
    return lower + beta * n_tokens / accepted_lengths[-1] * forward_times[-1]


def iid_alpha(proposed_at: Sequence[int], accepted: int) -> float:
    """The per-token acceptance alpha that explains ``accepted`` accepted tokens when
    ``proposed_at[j]`` tokens were proposed at block position j, under the i.i.d. model.

    ``accepted / proposed`` underestimates alpha: positions after the first rejection are
    proposed but never tested. Under the i.i.d. model the token at block position j is accepted
    with probability alpha^(j+1), so alpha solves (by bisection; the left side is increasing)::

        sum_j proposed_at[j] alpha^(j+1) = accepted

    which holds whatever block lengths the rounds had (budget-truncated last rounds included).
    Nothing proposed gives NaN."""
    if any(c < 0 for c in proposed_at) or accepted < 0:
        raise ConfigError(f"counts must be >= 0, got proposed_at={list(proposed_at)}, accepted={accepted}")
    proposed = sum(proposed_at)
    if proposed == 0:
        return math.nan
    if accepted == 0 or accepted >= proposed:
        return 0.0 if accepted == 0 else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sum(c * mid ** (j + 1) for j, c in enumerate(proposed_at)) < accepted:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
