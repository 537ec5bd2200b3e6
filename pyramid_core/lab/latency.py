"""The [latency model](../../algorithms.md#latency-model): closed forms for planning and for
comparing predicted with measured speedups (``pyramid bench``). Pure maths, one job, hence its
length: nothing here runs a stage (measuring is ``pyramid_core.lab.measure``).

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

Forward cost as a function of the tokens fed
--------------------------------------------
A stage's forward time is a function T(M) of M, the number of new tokens the forward feeds (the
positions not yet in its KV cache), given as a ``ForwardCost``; a plain float is a flat T(M),
the papers' model. On a GPU T(M) is nearly flat for small M; on a CPU it is not, because
small-M GEMM is slower than the M = 1 GEMV path (a measured curve:
[forward cost T(M)](../../algorithms.md#forward-cost-tm)). ``predict_chain`` charges every
forward at its own M (its docstring says which).
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.validate import check_block_lengths

__all__ = [
    "expected_tokens",
    "pair_speedup",
    "sd_throughput",
    "psd_throughput",
    "polybasic_time",
    "ForwardCost",
    "as_forward_cost",
    "Prediction",
    "predict_chain",
    "iid_alpha",
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


def _real(value: Any) -> float:
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
            if not 0.0 <= _real(seconds) < math.inf:
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
    if not 0.0 <= _real(value) < math.inf:
        raise ConfigError(
            f"forward time of {name} must be a finite number of seconds >= 0 or a ForwardCost, got {value!r}"
        )
    return ForwardCost.flat(float(value), name)


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


Unfed = tuple[int, ...]
"""Per stage j = 1..k (0-based index j-1), a count of tokens at the end of a context that stage
j has not fed yet (see ``_finite_horizon``)."""


@attrs.frozen
class _Call:
    """Expected outcome of one ``propose(k, n)`` call: seconds, forwards per stage, and the
    distribution of the unfed tails of its output (tail, probability)."""

    seconds: float
    forwards: tuple[float, ...]
    tails: tuple[tuple[Unfed, float], ...]


def _finite_horizon(
    alphas: Sequence[float], lengths: Sequence[Lengths], costs: Sequence[ForwardCost], new_tokens: int
) -> tuple[float, list[float]]:
    """Expected (time, forwards per stage) for the chain to emit exactly ``new_tokens`` tokens,
    following the pipeline's budget rule -- a round of stage k+1 asks stage k for
    min(ell_k, tokens still needed) tokens and a bonus token beyond the request is cut -- with
    every forward charged at T(M) for the exact number M of tokens it feeds.

    How many tokens a forward feeds (``HFStage``: a stage is handed the full context, keeps the
    longest cached prefix short of the last context token, and feeds the rest). Call ``u_j`` the
    number of tokens at the end of the context that stage j has not fed; then a drafting step of
    stage 1 feeds M = u_1 and a verification by stage k of a block of m tokens feeds
    M = u_k + m. A stage has fed everything it was handed except what it emitted last: the last
    token it drafted (stage 1), or the token it emitted at the end of its last round (k >= 2;
    when that bonus token was cut by the budget, nothing). So, for the output of a round or call
    of stage k, let ``tail_j`` = how many of its last tokens stage j <= k has not fed:

        stage 1 drafting n tokens:          tail_1 = 1                 (the last token drafted)
        stage k verifying a block of m tokens whose tails are t_j, accepting a of them:
            piece = the accepted a tokens + the emitted one,
            tail_j = max(0, a - m + t_j) + 1   (j < k: unfed tokens of the block it kept, + y)
            tail_k = 1                          (y is not in stage k's cache)
        ... except when a = m is the whole budget: the bonus is cut, tail_j = t_j, tail_k = 0.

    After a round the next context ends with that piece, so ``u_j = tail_j`` for the next round;
    the first round of a call inherits the caller's u. Hence the target always verifies at
    M = ell + 1 (the block + the token it emitted last), a middle stage at m + 1 or m + 2 (the
    latter when the stage above accepted all of its output, last emitted token included), and
    stage 1 drafts its first token of a call at M = 1 .. N and the others at M = 1. The prompt is
    taken as already cached (prefill excluded): every stage starts with u = 1.

    A boundary given a length distribution (``lengths[k]`` = ((ell, probability), ...), e.g. the
    realised lengths of an adaptive schedule) asks for min(ell, tokens still needed) with ell
    drawn from it independently each round (a first-order model of a schedule that follows the
    acceptances); ell = 0 is a round whose proposer proposed nothing (a model-free draft).

    The expectation runs over the acceptances (i.i.d., module docstring); u and the tails are
    bounded by the number of stages, so the state (tokens still needed, u) stays small. A stage
    with a flat cost keeps u = 1 (its M does not matter), which is the old recursion exactly."""
    n_stages = len(costs)
    flat = [c.is_flat for c in costs]

    def merged(unfed: Unfed) -> Unfed:
        return tuple(1 if flat[j] else u for j, u in enumerate(unfed))

    @cache
    def call(k: int, n: int, unfed: Unfed) -> _Call:
        # propose(k + 1, n) in the 1-based notation above, starting with u = unfed
        forwards = [0.0] * n_stages
        if n == 0:  # nothing asked: nothing fed, nothing emitted
            return _Call(0.0, tuple(forwards), ((merged(unfed), 1.0),))
        if k == 0:
            forwards[0] = float(n)
            seconds = costs[0](unfed[0]) + (n - 1) * costs[0](1)
            return _Call(seconds, tuple(forwards), ((merged((1,)), 1.0),))
        dist, cost_k, alpha = lengths[k - 1], costs[k], alphas[k - 1]
        seconds = 0.0
        tails: defaultdict[Unfed, float] = defaultdict(float)
        todo: dict[int, defaultdict[Unfed, float]] = {n: defaultdict(float, {unfed: 1.0})}
        for need in range(n, 0, -1):  # each round needs fewer tokens: one pass, no recursion
            for u, prob_u in todo.pop(need, {}).items():
                for ell, p_ell in dist:
                    prob = prob_u * p_ell
                    m = min(ell, need)
                    lower = call(k - 1, m, u[:k])
                    seconds += prob * (lower.seconds + cost_k(u[k] + m))
                    forwards = [f + prob * g for f, g in zip(forwards, lower.forwards)]
                    forwards[k] += prob
                    pmf = _accept_pmf(alpha, m)
                    for tail, p_tail in lower.tails:
                        for a, p_a in enumerate(pmf):
                            p = prob * p_tail * p_a
                            if p == 0.0:
                                continue
                            if a == m == need:  # the bonus is over budget and cut
                                tails[merged((*tail, 0))] += p
                                continue
                            piece = merged((*(max(0, a - m + t) + 1 for t in tail), 1))
                            rest = need - a - 1
                            if rest == 0:
                                tails[piece] += p
                            else:
                                todo.setdefault(rest, defaultdict(float))[piece] += p
        return _Call(seconds, tuple(forwards), tuple(tails.items()))

    top = call(n_stages - 1, new_tokens, (1,) * n_stages)
    return top.seconds, list(top.forwards)


Lengths = tuple[tuple[int, float], ...]
"""A block-length distribution: ((ell, probability), ...), probabilities summing to 1."""


def _lengths(ell: int | Mapping[int, float], k: int) -> Lengths:
    """A block length, or a distribution of lengths {ell: weight}, as a normalised distribution."""
    where = f"block length at boundary {k + 1} -> {k + 2}"
    if isinstance(ell, Mapping):
        items = [(m, _real(w)) for m, w in ell.items()]
        bad = [(m, w) for m, w in items if isinstance(m, bool) or not isinstance(m, int) or m < 0 or not w >= 0]
        if bad or not items:
            raise ConfigError(f"{where}: a length distribution maps integer lengths >= 0 to weights >= 0, got {dict(ell)}")
        total = sum(w for _, w in items)
        if not 0 < total < math.inf:
            raise ConfigError(f"{where}: the length distribution has no mass ({dict(ell)})")
        return tuple((m, w / total) for m, w in sorted(items) if w > 0)
    if isinstance(ell, bool) or not isinstance(ell, int) or ell < 1:
        raise ConfigError(f"{where} must be an integer >= 1 (or a distribution of lengths), got {ell!r}")
    return ((ell, 1.0),)


def predict_chain(
    alphas: Sequence[float],
    block_lengths: Sequence[int | Mapping[int, float]],
    forward_times: Sequence[float | ForwardCost],
    *,
    new_tokens: int | None = None,
) -> Prediction:
    """Predict an [N-stage exact chain](../../algorithms.md#the-exact-n-stage-chain) from alpha and
    ell per boundary and the forward cost per stage: seconds per forward as a float (0 for a
    model-free proposer such as ``ngram``), or a ``ForwardCost`` T(M) of the tokens M a forward
    feeds.

    Steady state (``new_tokens=None``), from the recursion of the pipeline: stage 1 samples
    autoregressively, one forward of one new token per drafted token; stage k >= 2 verifies
    blocks of ell_{k-1} tokens from stage k-1 in one forward that feeds the block and the token
    it emitted last, M = ell_{k-1} + 1, and, under the i.i.d. assumption (module docstring),
    emits E_k = expected_tokens(alpha_{k-1}, ell_{k-1}) tokens per forward of its own. So the
    seconds per token tau_k and forwards f_k^{(j)} of stage j per token of stage k are::

        tau_1 = T_1(1),                   f_1^{(1)} = 1
        tau_k = (ell_{k-1} tau_{k-1} + T_k(ell_{k-1} + 1)) / E_k
        f_k^{(j)} = ell_{k-1} f_{k-1}^{(j)} / E_k  (j < k),   f_k^{(k)} = 1 / E_k

    and the target emits E_N tokens per forward, at 1 / tau_N tokens/s; the speedup over the
    target alone (one forward of one token per token) is T_N(1) / tau_N (N = 2 with flat costs,
    T_1 = c T_2: ``pair_speedup``). The steady state ignores that a lower stage asked for ell
    tokens discards the surplus of its last round, and that the first forward of a stage after
    the stage above accepted all of its output feeds 1 .. N-1 tokens more (both cost extra).

    ``new_tokens=n`` instead computes the exact expectation (under the same i.i.d. assumption)
    for one generation of n tokens with the pipeline's budget rule -- each round asks the stage
    below for min(ell, tokens still needed) tokens, and tokens beyond the request are cut -- and
    with every forward charged at the exact number of tokens it feeds (``_finite_horizon``),
    prefill excluded. With flat costs both reduce to the T-per-forward model of the papers.

    A block length may also be a distribution ``{ell: probability}`` (e.g. the realised lengths of
    an adaptive schedule, ``measure.length_distributions``): the steady state then averages
    tokens per round E(alpha, ell), tokens asked ell and the verification's T(ell + 1) over it,
    and the finite horizon draws ell per round (``_finite_horizon``).

    Fixed block lengths must not decrease from the bottom boundary up, as in ``Pipeline``: a lower
    length larger than the one above it cannot take effect (``validate.check_block_lengths``),
    and predicting a cost for it would describe a pipeline that does not run.
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
    if all(isinstance(ell, int) for ell in block_lengths):
        block_lengths = check_block_lengths(block_lengths)  # the pipeline's rule: none can be capped
    dists = [_lengths(ell, k) for k, ell in enumerate(block_lengths)]
    costs = [as_forward_cost(t, f"stage {k + 1}") for k, t in enumerate(forward_times)]
    t_target = costs[-1].decode
    if new_tokens is not None:
        if not isinstance(new_tokens, int) or new_tokens < 1:
            raise ConfigError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
        total, forwards = _finite_horizon(alphas, dists, costs, new_tokens)
        per = tuple(f / new_tokens for f in forwards)
        return Prediction(1.0 / per[-1], total / new_tokens, per, t_target)
    tau = costs[0].decode
    f = [1.0]
    for k in range(1, n):  # means over the boundary's length distribution (one length: the fixed case)
        dist = dists[k - 1]
        ell = sum(p * m for m, p in dist)
        e = sum(p * expected_tokens(alphas[k - 1], m) for m, p in dist)
        tau = (ell * tau + sum(p * costs[k](m + 1) for m, p in dist)) / e
        f = [ell * x / e for x in f] + [1.0 / e]
    return Prediction(1.0 / f[-1], tau, tuple(f), t_target)


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
