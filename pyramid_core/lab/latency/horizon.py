"""The exact finite-horizon expectation behind ``predict_chain(..., new_tokens=n)``: time and
forwards per stage for a chain to emit n tokens under the pipeline's budget rule, every forward
charged at T(M) for the tokens M it feeds (i.i.d. acceptances, ``pyramid_core.lab.latency``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import cache

import attrs

from pyramid_core.lab.latency.cost import ForwardCost

__all__ = ["Lengths", "Unfed", "finite_horizon"]

Lengths = tuple[tuple[int, float], ...]
"""A block-length distribution: ((ell, probability), ...), probabilities summing to 1."""



def _accept_pmf(alpha: float, m: int) -> list[float]:
    """P(A = j), j = 0..m: accepted prefix length of an i.i.d. block of m tokens."""
    return [alpha**j * (1.0 - alpha) for j in range(m)] + [alpha**m]


Unfed = tuple[int, ...]
"""Per stage j = 1..k (0-based index j-1), a count of tokens at the end of a context that stage
j has not fed yet (see ``finite_horizon``)."""


@attrs.frozen
class _Call:
    """Expected outcome of one ``propose(k, n)`` call: seconds, forwards per stage, and the
    distribution of the unfed tails of its output (tail, probability)."""

    seconds: float
    forwards: tuple[float, ...]
    tails: tuple[tuple[Unfed, float], ...]


def finite_horizon(
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

    The expectation runs over the acceptances (i.i.d., ``pyramid_core.lab.latency``); u and the tails are
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

