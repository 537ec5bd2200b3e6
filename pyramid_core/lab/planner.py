"""The HSD [planner](../../algorithms.md#planner): pick the chain of stages and the block lengths
that the latency model predicts to be fastest, from alpha per pair and T per candidate measured
on the user's hardware (``pyramid plan``).

References
----------
- Hierarchical Speculative Decoding, arXiv 2510.19705: the best hierarchy over candidate models
  is a shortest path over the models ordered by cost.
- ``pyramid_core.lab.latency.predict_chain``: the steady-state recursion used as the path cost.

Why a shortest path
-------------------
Candidates are ordered by cost (model-free proposers first, the target last); a chain is a path
through that order ending at the target. With seconds per token ``tau`` of the chain so far, a
verifier j reached from drafter i with block length ell has (``predict_chain``, steady state)::

    tau_j = (ell tau_i + T_j(ell + 1)) / E(alpha_ij, ell),      E = expected_tokens

where T_j(M) is j's forward cost when it feeds M tokens (``latency.ForwardCost``; a verification
feeds the block and the token j emitted last), and a chain starts at tau = T(1). tau_j is
strictly increasing in tau_i.

Block lengths must not decrease from the bottom boundary up (``validate.check_block_lengths``: a
lower length larger than the one above it never takes effect in the pipeline), so the length
chosen at an edge bounds the lengths above it. The search state is therefore (stages used,
candidate, block length into it): for a fixed state the rest of the chain may take the same
lengths whatever came before, and tau_j is increasing in tau_i, so the fastest chain in a state
extends the fastest chain of one of the states it can follow (optimal substructure). Keeping the
k fastest partial chains -- distinct paths, each with its best lengths -- per state instead of one
gives the k fastest chains overall by the same argument (up to exact ties): k distinct prefixes
faster than a chain's own prefix in its state, each extended by its suffix, would be k faster
chains. That is O(S n^2 k L^2) for n candidates, at most S stages and block lengths 1..L.
"""

from __future__ import annotations

import difflib
import heapq
import math
from collections.abc import Sequence
from typing import Any

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.lab.latency.chain import Prediction, predict_chain
from pyramid_core.lab.latency.cost import ForwardCost, as_forward_cost
from pyramid_core.lab.latency.forms import expected_tokens
from pyramid_core.lab.outputs import md_escape

__all__ = ["ChainPlan", "Plan", "plan_chain"]


@attrs.frozen
class ChainPlan:
    """One chain with its best block lengths and what the latency model predicts for it.

    names:           the stages, smallest first; the last is the target
    block_lengths:   ell per boundary k -> k+1
    alphas:          per-token acceptance per boundary (the measured ``alpha[draft][verifier]``)
    forward_costs:   T(M) per stage, seconds per forward feeding M tokens (0 for a proposer)
    time_per_token:  tau, predicted seconds per output token (steady state)
    """

    names: tuple[str, ...]
    block_lengths: tuple[int, ...]
    alphas: tuple[float, ...]
    forward_costs: tuple[ForwardCost, ...]
    time_per_token: float

    @property
    def forward_times(self) -> tuple[float, ...]:
        """T(1) per stage: seconds of one single-token (decode) forward."""
        return tuple(c.decode for c in self.forward_costs)

    @property
    def target_time(self) -> float:
        return self.forward_costs[-1].decode

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_per_token if self.time_per_token > 0 else math.inf

    @property
    def speedup(self) -> float:
        """Predicted speedup over the target alone: T_target / tau."""
        return self.target_time / self.time_per_token if self.time_per_token > 0 else math.inf

    def prediction(self, new_tokens: int | None = None) -> Prediction:
        """The full ``predict_chain`` prediction (steady state, or ``new_tokens`` tokens)."""
        return predict_chain(list(self.alphas), list(self.block_lengths), list(self.forward_costs),
                             new_tokens=new_tokens)

    def generate_args(self) -> list[str]:
        """``--stage``/``--length`` arguments of ``pyramid generate`` running this chain."""
        args: list[str] = []
        for name in self.names:
            args += ["--stage", name]
        for ell in self.block_lengths:
            args += ["--length", str(ell)]
        return args

    def as_dict(self) -> dict[str, Any]:
        return {"chain": list(self.names), "block_lengths": list(self.block_lengths),
                "alphas": list(self.alphas), "forward_times": list(self.forward_times),
                "forward_costs": [c.as_list() for c in self.forward_costs],
                "time_per_token": self.time_per_token, "tokens_per_s": self.tokens_per_s,
                "speedup": self.speedup}


@attrs.frozen
class Plan:
    """The planner's answer: the fastest chain (``best``) and the ``ranked`` chains, fastest
    first, each with its own best block lengths (the target alone, speedup 1, is one chain).

    candidates, forward_costs, alpha, proposers: the inputs (``alpha[i][j]``: i drafts for j; a
    plain float T is kept as the flat cost ``ForwardCost.flat(T)``)
    """

    candidates: tuple[str, ...]
    forward_costs: tuple[ForwardCost, ...]
    alpha: tuple[tuple[float, ...], ...]
    proposers: tuple[str, ...]
    max_length: int
    ranked: tuple[ChainPlan, ...]

    @property
    def best(self) -> ChainPlan:
        return self.ranked[0]

    @property
    def forward_times(self) -> tuple[float, ...]:
        """T(1) per candidate: seconds of one single-token (decode) forward."""
        return tuple(c.decode for c in self.forward_costs)

    @property
    def chain(self) -> tuple[str, ...]:
        return self.best.names

    @property
    def block_lengths(self) -> tuple[int, ...]:
        return self.best.block_lengths

    @property
    def alphas(self) -> tuple[float, ...]:
        return self.best.alphas

    @property
    def time_per_token(self) -> float:
        return self.best.time_per_token

    @property
    def tokens_per_s(self) -> float:
        return self.best.tokens_per_s

    @property
    def speedup(self) -> float:
        return self.best.speedup

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "forward_times": list(self.forward_times),
            "forward_costs": [c.as_list() for c in self.forward_costs],
            "alpha": [list(row) for row in self.alpha],
            "proposers": list(self.proposers),
            "max_length": self.max_length,
            "best": self.best.as_dict(),
            "ranked": [c.as_dict() for c in self.ranked],
        }

    def to_markdown(self) -> str:
        """Candidates (T(1), T(M), pairwise alpha) and the ranked chains as Markdown tables."""
        short = [f"#{i + 1}" for i in range(len(self.candidates))]
        is_proposer = [name in self.proposers for name in self.candidates]
        rank = {c: r for r, c in enumerate(_cost_order(self.forward_times, is_proposer))}
        lines = ["| # | candidate | ms/forward | ms/forward by M | " + " | ".join(f"α → {s}" for s in short) + " |",
                 "|" + "---|" * (4 + len(short))]
        for i, name in enumerate(self.candidates):
            free = is_proposer[i] and self.forward_times[i] == 0
            kind = " (proposer)" if free else " (drafts only)" if is_proposer[i] else ""
            ms = "-" if free else f"{1000 * self.forward_times[i]:.2f}"
            by_m = "-" if free else self.forward_costs[i].format_ms()
            row = [f"{a:.2f}" if rank[i] < rank[j] and not is_proposer[j] else "-"
                   for j, a in enumerate(self.alpha[i])]
            lines.append(f"| {short[i]} | {md_escape(name)}{kind} | {ms} | {by_m} | " + " | ".join(row) + " |")
        lines += ["", "ms/forward: one decode forward (M = 1); by M -- M: ms of a forward feeding M new "
                  "tokens (a verification of a block of ℓ feeds M = ℓ + 1; interpolated between measured M).",
                  "", "α → #j: per-token acceptance when the row's candidate drafts for candidate #j "
                  "(only cheaper drafting for costlier is used)."]
        lines += ["", "| rank | chain | lengths | alphas | predicted tok/s | predicted speedup |",
                  "|---|---|---|---|---|---|"]
        for r, c in enumerate(self.ranked, 1):
            lines.append(
                f"| {r} | {' → '.join(md_escape(n) for n in c.names)} | {','.join(map(str, c.block_lengths)) or '-'} | "
                f"{' / '.join(f'{a:.2f}' for a in c.alphas) or '-'} | {c.tokens_per_s:.1f} | {c.speedup:.2f}x |"
            )
        return "\n".join(lines) + "\n"


def _number(value: Any) -> float:
    """``value`` as a float, or -inf for anything that is not a real number (fails every check)."""
    if isinstance(value, (str, bytes, bool)):
        return -math.inf
    try:
        return float(value)
    except (TypeError, ValueError):
        return -math.inf


def _validate(
    names: Sequence[str],
    forward_times: Sequence[float | ForwardCost],
    alpha: Sequence[Sequence[float]],
    proposers: Sequence[str],
    max_length: int,
    max_stages: int | None,
    top: int | None,
) -> list[ForwardCost]:
    """Check every input (errors name the culprit) and return the forward cost per candidate."""
    n = len(names)
    if n < 1:
        raise ConfigError("plan_chain needs at least one candidate (the target, last)")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"candidate {name!r} is given twice; candidate names must be distinct")
        seen.add(name)
    for p in proposers:
        if p not in seen:
            close = difflib.get_close_matches(p, list(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"proposer {p!r} is not a candidate{hint} (candidates: {', '.join(names)})")
    if names[-1] in proposers:
        raise ConfigError(f"the target {names[-1]!r} (the last candidate) must be a model, not a proposer")
    if len(forward_times) != n:
        raise ConfigError(f"{n} candidates need {n} forward times, got {len(forward_times)}")
    costs = [as_forward_cost(t, repr(name)) for name, t in zip(names, forward_times)]
    if not costs[-1].decode > 0:
        raise ConfigError(f"the forward time of the target {names[-1]!r} must be > 0 seconds, got "
                          f"{forward_times[-1]!r}")
    if len(alpha) != n or any(len(row) != n for row in alpha):
        shape = f"{len(alpha)} rows of lengths {[len(row) for row in alpha]}"
        raise ConfigError(f"alpha must be a {n} x {n} matrix (alpha[i][j]: candidate i drafts for j), got {shape}")
    for i, row in enumerate(alpha):
        for j, a in enumerate(row):
            if i != j and not (0.0 <= _number(a) <= 1.0 or math.isnan(_number(a))):
                raise ConfigError(
                    f"alpha[{i}][{j}] ({names[i]!r} drafting for {names[j]!r}) must be an acceptance "
                    f"probability in [0, 1] (NaN: not measured), got {a!r}"
                )
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be an integer >= 1, got {max_length!r}")
    if max_stages is not None and (not isinstance(max_stages, int) or max_stages < 1):
        raise ConfigError(f"max_stages must be an integer >= 1 (1 = the target alone) or None, got {max_stages!r}")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise ConfigError(f"top must be an integer >= 1 or None (every chain), got {top!r}")
    return costs


def _cost_order(times: Sequence[float], is_proposer: Sequence[bool]) -> list[int]:
    """Candidate indices in the order a chain visits them: proposers, models by (T(1), index),
    the target."""
    n = len(times)
    return sorted(range(n - 1), key=lambda i: (not is_proposer[i], times[i], i)) + [n - 1]


def plan_chain(
    names: Sequence[str],
    forward_times: Sequence[float | ForwardCost],
    alpha: Sequence[Sequence[float]],
    *,
    proposers: Sequence[str] = (),
    max_length: int = 16,
    max_stages: int | None = None,
    top: int | None = 10,
) -> Plan:
    """The fastest chain over candidate stages and its block lengths (module docstring).

    names:          candidate stages; the **last** is the target, which ends every chain
    forward_times:  T per candidate: seconds per forward (0 allowed, e.g. for ``ngram``), or a
                    ``ForwardCost`` T(M) (``measure_stage_costs``); a verification of a block
                    of ell tokens is charged T(ell + 1), so the best ell follows the cost curve
    alpha:          ``alpha[i][j]`` = per-token acceptance when candidate i drafts for j; only
                    entries with i before j in cost order are read (they must be in [0, 1]);
                    the others may be NaN
    proposers:      names of the candidates that only draft: they can only be the first stage of a
                    chain (model-free proposers, T = 0, and feature drafts, which have a cost)
    max_length:     block lengths are chosen from 1..max_length
    max_stages:     longest chain considered (default: every candidate)
    top:            how many chains ``Plan.ranked`` keeps (``None``: every chain, exponential)

    Cost order: proposers first, then the models by (T(1), position in ``names``), the target last;
    a chain visits candidates in this order. Block lengths never decrease from the bottom
    boundary up (the pipeline's rule). Ties in predicted time go to the shorter chain, and then to
    the lexicographically smaller block lengths.
    """
    costs = _validate(names, forward_times, alpha, proposers, max_length, max_stages, top)
    n = len(names)
    target = n - 1
    is_proposer = [name in proposers for name in names]
    times = [c.decode for c in costs]
    order = _cost_order(times, is_proposer)
    rank = {c: r for r, c in enumerate(order)}
    for r, j in enumerate(order):
        for i in order[:r]:
            if not is_proposer[j] and math.isnan(_number(alpha[i][j])):
                raise ConfigError(f"alpha[{i}][{j}] ({names[i]!r} drafting for {names[j]!r}) is needed but NaN")
    # E(alpha_ij, ell) for every usable edge and ell = 1..L (index 0 unused)
    e_table = {
        (i, j): [0.0] + [expected_tokens(float(alpha[i][j]), ell) for ell in range(1, max_length + 1)]
        for r, j in enumerate(order) if not is_proposer[j] for i in order[:r]
    }

    # T_j(ell + 1): j verifying a block of ell tokens feeds them and the token it emitted last
    verify = [[0.0] + [c(ell + 1) for ell in range(1, max_length + 1)] for c in costs]

    # partial chain: (tau, path of candidate indices, block lengths)
    Partial = tuple[float, tuple[int, ...], tuple[int, ...]]

    def key(p: Partial) -> tuple[float, int, list[int], tuple[int, ...]]:
        return (p[0], len(p[1]), [rank[c] for c in p[1]], p[2])

    def keep(items: list[Partial]) -> list[Partial]:
        """The fastest ``top`` partial chains, each path once (with its best lengths)."""
        best: dict[tuple[int, ...], Partial] = {}
        for item in items:
            have = best.get(item[1])
            if have is None or key(item) < key(have):
                best[item[1]] = item
        distinct = list(best.values())
        return sorted(distinct, key=key) if top is None else heapq.nsmallest(top, distinct, key=key)

    # state: (last candidate, the block length into it = the lowest length the next boundary may
    # take); a chain of one stage has no length yet and allows any (1)
    stages_max = n if max_stages is None else min(max_stages, n)
    layer: dict[tuple[int, int], list[Partial]] = {(j, 1): [(times[j], (j,), ())] for j in range(n)}
    finished: list[Partial] = list(layer[(target, 1)])
    for _ in range(2, stages_max + 1):
        grown: dict[tuple[int, int], list[Partial]] = {}
        for r, j in enumerate(order):
            if is_proposer[j]:
                continue
            t_j = verify[j]
            for i in order[:r]:
                e = e_table[(i, j)]
                for lowest in range(1, max_length + 1):
                    for tau, path, lengths in layer.get((i, lowest), ()):
                        for ell in range(lowest, max_length + 1):  # lengths never decrease upwards
                            t = (ell * tau + t_j[ell]) / e[ell]
                            grown.setdefault((j, ell), []).append((t, (*path, j), (*lengths, ell)))
        layer = {state: keep(items) for state, items in grown.items()}
        finished += [p for (j, _), items in layer.items() if j == target for p in items]
    ranked = tuple(
        ChainPlan(
            names=tuple(names[c] for c in path),
            block_lengths=lengths,
            alphas=tuple(float(alpha[a][b]) for a, b in zip(path, path[1:])),
            forward_costs=tuple(costs[c] for c in path),
            time_per_token=tau,
        )
        for tau, path, lengths in keep(finished)
    )
    return Plan(
        candidates=tuple(names),
        forward_costs=tuple(costs),
        alpha=tuple(tuple(float(a) for a in row) for row in alpha),
        proposers=tuple(proposers),
        max_length=max_length,
        ranked=ranked,
    )
