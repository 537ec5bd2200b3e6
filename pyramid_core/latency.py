"""The latency model of SPEC.md ("Latency model"): closed forms for planning and for comparing
predicted with measured speedups (``pyramid bench``).

References
----------
- Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
  ICML 2023 (arXiv 2211.17192): expected tokens per verification and the walltime speedup.
- PyramidSD, "3-Model Speculative Decoding", arXiv 2510.12966: throughput ``V_SD`` and its
  three-model nesting ``V_FSD(Q,D)`` -> ``V_PSD``.
- Polybasic Speculative Decoding, arXiv 2510.26527 (ICML 2025): the N-model time lemma.

The i.i.d. assumption
---------------------
Every prediction here treats the acceptance of each drafted token at boundary k -> k+1 as an
independent coin with the same probability alpha_k (for exact rejection sampling, alpha =
E[1 - TV(p, q)] = E[sum_x min(p(x), q(x))], Leviathan et al. Sec. 3.1). Real text violates
this (easy and hard stretches cluster), so predictions are first-order estimates; they are
exact for stages with context-free tables (``pyramid_core.testing.TableModel``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.pipeline import Metrics

__all__ = [
    "expected_tokens",
    "pair_speedup",
    "sd_throughput",
    "psd_throughput",
    "polybasic_time",
    "Prediction",
    "predict_chain",
    "measure_alpha",
    "measure_forward_time",
]


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0 or math.isnan(a):
        raise ConfigError(f"{name} must be an acceptance probability in [0, 1], got {alpha!r}")
    return a


def _check_length(gamma: int, name: str = "gamma") -> int:
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
    a, g = _check_alpha(alpha), _check_length(gamma)
    if a == 1.0:
        return float(g + 1)
    return (1.0 - a ** (g + 1)) / (1.0 - a)


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
    _check_length(ell, "ell")
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
    decoding, arXiv 2510.26527, Lemma; as written in SPEC.md)::

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


@attrs.frozen
class Prediction:
    """What the latency model predicts for a chain.

    tokens_per_target_forward: expected output tokens per forward of the target (incl. bonus)
    time_per_token:            expected seconds per output token
    forwards_per_token:        expected forwards of each stage per output token, smallest first
    target_time_per_token:     T_N, the target alone's seconds per token (one forward each)
    """

    tokens_per_target_forward: float
    time_per_token: float
    forwards_per_token: tuple[float, ...]
    target_time_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_per_token if self.time_per_token > 0 else math.inf

    @property
    def speedup(self) -> float:
        """Predicted speedup over the target decoding alone (T_N per token)."""
        return self.target_time_per_token / self.time_per_token if self.time_per_token > 0 else math.inf


def _accept_pmf(alpha: float, m: int) -> list[float]:
    """P(A = j), j = 0..m: accepted prefix length of an i.i.d. block of m tokens."""
    return [alpha**j * (1.0 - alpha) for j in range(m)] + [alpha**m]


def _finite_horizon(
    alphas: Sequence[float], lengths: Sequence[int], times: Sequence[float], new_tokens: int
) -> tuple[float, list[float]]:
    """Expected (time, forwards per stage) for the chain to emit exactly ``new_tokens`` tokens,
    following the pipeline's budget rule: a round of stage k+1 asks stage k for
    min(ell_k, tokens still needed) tokens and the surplus bonus token is cut."""
    n_stages = len(times)

    @cache
    def cost(k: int, n: int) -> tuple[float, tuple[float, ...]]:
        # stage k (0-based) producing n tokens: (expected time, expected forwards per stage)
        if n <= 0:
            return 0.0, (0.0,) * n_stages
        if k == 0:
            bottom = [0.0] * n_stages
            bottom[0] = float(n)
            return n * times[0], tuple(bottom)
        m = min(lengths[k - 1], n)
        t, fw = cost(k - 1, m)
        total_t = t + times[k]
        total_fw = list(fw)
        total_fw[k] += 1.0
        for j, p in enumerate(_accept_pmf(alphas[k - 1], m)):
            if p == 0.0:
                continue
            rt, rfw = cost(k, n - (j + 1))
            total_t += p * rt
            total_fw = [a + p * b for a, b in zip(total_fw, rfw)]
        return total_t, tuple(total_fw)

    for n in range(1, new_tokens + 1):  # fill bottom-up: keeps the recursion shallow
        cost(n_stages - 1, n)
    t, fw = cost(n_stages - 1, new_tokens)
    return t, list(fw)


def predict_chain(
    alphas: Sequence[float],
    block_lengths: Sequence[int],
    forward_times: Sequence[float],
    *,
    new_tokens: int | None = None,
) -> Prediction:
    """Predict an N-stage exact chain (SPEC "Exact chain") from alpha and ell per boundary and
    T per stage (seconds per forward; 0 for a model-free proposer such as ``ngram``).

    Steady state (``new_tokens=None``), from the recursion of the pipeline: stage 1 samples
    autoregressively, one forward per token; stage k >= 2 verifies blocks of ell_{k-1} tokens
    from stage k-1 and, under the i.i.d. assumption (module docstring), emits
    E_k = expected_tokens(alpha_{k-1}, ell_{k-1}) tokens per forward of its own. So the
    seconds per token tau_k and forwards f_k^{(j)} of stage j per token of stage k are::

        tau_1 = T_1,                      f_1^{(1)} = 1
        tau_k = (ell_{k-1} tau_{k-1} + T_k) / E_k
        f_k^{(j)} = ell_{k-1} f_{k-1}^{(j)} / E_k  (j < k),   f_k^{(k)} = 1 / E_k

    and the target emits E_N tokens per forward, at 1 / tau_N tokens/s; the speedup over the
    target alone is T_N / tau_N (N = 2, T_1 = c T_2: ``pair_speedup``). The steady state
    ignores that a lower stage asked for ell tokens discards the surplus of its last round.

    ``new_tokens=n`` instead computes the exact expectation (under the same i.i.d. assumption)
    for one generation of n tokens with the pipeline's budget rule: each round asks the stage
    below for min(ell, tokens still needed) tokens, and tokens beyond the request are cut.
    """
    n = len(forward_times)
    if n < 1:
        raise ConfigError("predict_chain needs the forward time of at least one stage (the target)")
    if len(alphas) != n - 1 or len(block_lengths) != n - 1:
        raise ConfigError(
            f"{n} stages need {n - 1} alphas and {n - 1} block lengths (one per boundary), got "
            f"{len(alphas)} and {len(block_lengths)}"
        )
    alphas = [_check_alpha(a, f"alpha at boundary {k + 1} -> {k + 2}") for k, a in enumerate(alphas)]
    for k, ell in enumerate(block_lengths):
        if not isinstance(ell, int) or ell < 1:
            raise ConfigError(f"block length at boundary {k + 1} -> {k + 2} must be an integer >= 1, got {ell!r}")
    for k, t in enumerate(forward_times):
        if not t >= 0:
            raise ConfigError(f"forward time of stage {k + 1} must be >= 0 seconds, got {t!r}")
    t_target = float(forward_times[-1])
    if new_tokens is not None:
        if not isinstance(new_tokens, int) or new_tokens < 1:
            raise ConfigError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
        total, forwards = _finite_horizon(alphas, list(block_lengths), list(forward_times), new_tokens)
        per = tuple(f / new_tokens for f in forwards)
        return Prediction(1.0 / per[-1], total / new_tokens, per, t_target)
    tau = float(forward_times[0])
    f = [1.0]
    for k in range(1, n):
        ell, e = block_lengths[k - 1], expected_tokens(alphas[k - 1], block_lengths[k - 1])
        tau = (ell * tau + forward_times[k]) / e
        f = [ell * x / e for x in f] + [1.0 / e]
    return Prediction(1.0 / f[-1], tau, tuple(f), t_target)


def _as_list(metrics: Metrics | Sequence[Metrics]) -> list[Metrics]:
    return [metrics] if isinstance(metrics, Metrics) else list(metrics)


def measure_alpha(metrics: Metrics | Sequence[Metrics]) -> list[float]:
    """Per-token acceptance alpha at each boundary, pooled over one or more runs.

    ``accepted / proposed`` underestimates alpha: positions after the first rejection are
    proposed but never tested. Under the i.i.d. model the token at block position j is accepted
    with probability alpha^(j+1), so alpha solves (by bisection; the left side is increasing)::

        sum_j proposed_at[j] alpha^(j+1) = sum_j accepted_at[j]

    which holds whatever block lengths the rounds had (budget-truncated last rounds included).
    A boundary that was never exercised gives NaN. For a tree boundary the counts are per depth
    and the result is the chain-equivalent alpha."""
    runs = _as_list(metrics)
    if not runs:
        raise ConfigError("measure_alpha needs at least one Metrics")
    n_boundaries = len(runs[0].boundaries)
    out: list[float] = []
    for k in range(n_boundaries):
        proposed_at: list[int] = []
        accepted = 0
        for m in runs:
            b = m.boundaries[k]
            accepted += sum(b.accepted_at)
            for j, c in enumerate(b.proposed_at):
                if j >= len(proposed_at):
                    proposed_at.append(0)
                proposed_at[j] += c
        proposed = sum(proposed_at)
        if proposed == 0:
            out.append(math.nan)
            continue
        if accepted == 0 or accepted >= proposed:
            out.append(0.0 if accepted == 0 else 1.0)
            continue
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if sum(c * mid ** (j + 1) for j, c in enumerate(proposed_at)) < accepted:
                lo = mid
            else:
                hi = mid
        out.append(0.5 * (lo + hi))
    return out


def measure_forward_time(metrics: Metrics | Sequence[Metrics]) -> list[float]:
    """Seconds per forward T_k of each stage, pooled over runs (``forward_s / forwards``).
    A stage without forwards (a model-free proposer) gives 0.0: its cost is in the overhead."""
    runs = _as_list(metrics)
    if not runs:
        raise ConfigError("measure_forward_time needs at least one Metrics")
    out = []
    for k in range(len(runs[0].stages)):
        forwards = sum(m.stages[k].forwards for m in runs)
        seconds = sum(m.stages[k].forward_s for m in runs)
        out.append(seconds / forwards if forwards else 0.0)
    return out
