"""The HSD planner of SPEC.md ("Latency model"): pick the chain of stages and the block lengths
that the latency model predicts to be fastest, from alpha per pair and T per candidate measured
on the user's hardware (``pyramid plan``).

References
----------
- Hierarchical Speculative Decoding, arXiv 2510.19705: the best hierarchy over candidate models
  is a shortest path over the models ordered by cost.
- ``pyramid_core.latency.predict_chain``: the steady-state recursion used as the path cost.

Why a shortest path
-------------------
Candidates are ordered by cost (model-free proposers first, the target last); a chain is a path
through that order ending at the target. With seconds per token ``tau`` of the chain so far, a
verifier j reached from drafter i with block length ell has (``predict_chain``, steady state)::

    tau_j = (ell tau_i + T_j(ell + 1)) / E(alpha_ij, ell),      E = expected_tokens

where T_j(M) is j's forward cost when it feeds M tokens (``latency.ForwardCost``; a verification
feeds the block and the token j emitted last), and a chain starts at tau = T(1). tau_j is
strictly increasing in tau_i. So the fastest chain ending at j extends the fastest chain
ending at one of its predecessors (optimal substructure), and for each edge only the best ell
given tau_i matters. Keeping the k fastest partial chains per (stages used, candidate) instead of
one gives the k fastest chains overall by the same argument (up to exact ties), in
O(S n^2 k L) for n candidates, at most S stages and block lengths 1..L.
"""

from __future__ import annotations

import difflib
import heapq
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from pyramid_core.errors import ConfigError
from pyramid_core.latency import (
    ForwardCost,
    Prediction,
    as_forward_cost,
    expected_tokens,
    predict_chain,
)
from pyramid_core.pipeline import Pipeline
from pyramid_core.protocols import Proposer, Stage
from pyramid_core.types import Block, SamplingConfig

__all__ = [
    "ChainPlan",
    "Plan",
    "plan_chain",
    "measure_pairwise_alpha",
    "measure_proposer_alpha",
    "measure_stage_time",
    "measure_stage_costs",
    "DEFAULT_BLOCK_SIZES",
    "Measured",
    "measure_candidates",
]


@attrs.frozen
class ChainPlan:
    """One chain with its best block lengths and what the latency model predicts for it.

    names:           the stages, smallest first; the last is the target
    block_lengths:   ell per boundary k -> k+1
    alphas:          per-token acceptance per boundary (the measured alpha[draft][verifier])
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

    candidates, forward_costs, alpha, proposers: the inputs (alpha[i][j]: i drafts for j; a
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
            kind = " (proposer)" if is_proposer[i] else ""
            free = is_proposer[i] and self.forward_times[i] == 0
            ms = "-" if free else f"{1000 * self.forward_times[i]:.2f}"
            by_m = "-" if free else self.forward_costs[i].format_ms()
            row = [f"{a:.2f}" if rank[i] < rank[j] and not is_proposer[j] else "-"
                   for j, a in enumerate(self.alpha[i])]
            lines.append(f"| {short[i]} | {name}{kind} | {ms} | {by_m} | " + " | ".join(row) + " |")
        lines += ["", "ms/forward: one decode forward (M = 1); by M -- M: ms of a forward feeding M new "
                  "tokens (a verification of a block of ℓ feeds M = ℓ + 1; interpolated between measured M).",
                  "", "α → #j: per-token acceptance when the row's candidate drafts for candidate #j "
                  "(only cheaper drafting for costlier is used)."]
        lines += ["", "| rank | chain | lengths | alphas | predicted tok/s | predicted speedup |",
                  "|---|---|---|---|---|---|"]
        for r, c in enumerate(self.ranked, 1):
            lines.append(
                f"| {r} | {' → '.join(c.names)} | {','.join(map(str, c.block_lengths)) or '-'} | "
                f"{' / '.join(f'{a:.2f}' for a in c.alphas) or '-'} | {c.tokens_per_s:.1f} | {c.speedup:.2f}x |"
            )
        return "\n".join(lines) + "\n"


# --- the planner --------------------------------------------------------------------------------


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
    proposers:      names of model-free proposers: they can only be the first stage of a chain
    max_length:     block lengths are chosen from 1..max_length
    max_stages:     longest chain considered (default: every candidate)
    top:            how many chains ``Plan.ranked`` keeps (``None``: every chain, exponential)

    Cost order: proposers first, then the models by (T(1), position in ``names``), the target last;
    a chain visits candidates in this order. Ties in predicted time go to the shorter chain, and
    for an edge to the shorter block length.
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

    def extend(i: int, j: int, tau: float) -> tuple[float, int]:
        e, t_j = e_table[(i, j)], verify[j]
        best, best_ell = math.inf, 1
        for ell in range(1, max_length + 1):
            t = (ell * tau + t_j[ell]) / e[ell]
            if t < best:
                best, best_ell = t, ell
        return best, best_ell

    # partial chain: (tau, path of candidate indices, block lengths)
    Partial = tuple[float, tuple[int, ...], tuple[int, ...]]

    def key(p: Partial) -> tuple[float, int, list[int]]:
        return (p[0], len(p[1]), [rank[c] for c in p[1]])

    def keep(items: list[Partial]) -> list[Partial]:
        return sorted(items, key=key) if top is None else heapq.nsmallest(top, items, key=key)

    stages_max = n if max_stages is None else min(max_stages, n)
    layer: dict[int, list[Partial]] = {j: [(times[j], (j,), ())] for j in range(n)}
    finished: list[Partial] = list(layer[target])
    for _ in range(2, stages_max + 1):
        nxt: dict[int, list[Partial]] = {}
        for r, j in enumerate(order):
            if is_proposer[j]:
                continue
            grown: list[Partial] = []
            for i in order[:r]:
                for tau, path, lengths in layer.get(i, ()):
                    t, ell = extend(i, j, tau)
                    grown.append((t, (*path, j), (*lengths, ell)))
            if grown:
                nxt[j] = keep(grown)
        layer = nxt
        finished += layer.get(target, [])
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


# --- measurements -------------------------------------------------------------------------------


def _check_prompts(prompts_token_ids: Sequence[Sequence[int]], new_tokens: int) -> None:
    if not prompts_token_ids:
        raise ConfigError("measuring needs at least one prompt (token ids)")
    for k, ids in enumerate(prompts_token_ids):
        if len(ids) == 0:
            raise ConfigError(f"prompt #{k + 1} is empty: give at least one token")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ConfigError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")


def _agreements(stage: Stage, prompt: Sequence[int], continuation: torch.Tensor) -> int:
    """How many tokens of ``continuation`` are ``stage``'s argmax given the prompt and the
    continuation before them (teacher forcing: one call, the continuation as the block)."""
    context = torch.tensor(list(prompt), dtype=torch.long, device=stage.device)
    tokens = continuation.to(stage.device)
    rows = stage.score(context, Block(tokens, tokens.new_zeros((len(tokens), 0), dtype=torch.float32)))
    return int((rows[:-1].argmax(dim=-1) == tokens).sum())


def measure_pairwise_alpha(
    stages: Sequence[Stage],
    prompts_token_ids: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
) -> list[list[float]]:
    """Greedy per-token acceptance ``alpha[i][j]`` of stage i drafting for stage j, for every
    ordered pair, pooled over the prompts (``alpha[i][i] = 1``).

    For each j: its greedy continuation (up to ``new_tokens`` tokens, stopping after a stop
    token) is generated once per prompt; every other stage i scores it in one call and alpha[i][j]
    is the fraction of positions where i's argmax is j's token. Under greedy decoding exact
    rejection sampling accepts a drafted token iff it is the verifier's argmax, and the accepted
    text is the verifier's continuation, so this agreement rate is the per-token acceptance (at
    a middle boundary of a chain the context follows the target instead: a first-order proxy)."""
    _check_prompts(prompts_token_ids, new_tokens)
    n = len(stages)
    agree = [[0] * n for _ in range(n)]
    total = [0] * n
    greedy = SamplingConfig.greedy()
    for j, verifier in enumerate(stages):
        alone = Pipeline([verifier], sampling=greedy, stop_ids=list(stop_ids))
        for ids in prompts_token_ids:
            continuation = alone.generate(list(ids), new_tokens).tokens
            total[j] += len(continuation)
            for i, drafter in enumerate(stages):
                if i != j and len(continuation):
                    agree[i][j] += _agreements(drafter, ids, continuation)
    return [[1.0 if i == j else (agree[i][j] / total[j] if total[j] else math.nan) for j in range(n)]
            for i in range(n)]


def _alpha_for_tokens_per_forward(measured: float, block_length: int, new_tokens: int) -> float:
    """The alpha at which the latency model (finite horizon, the pipeline's budget rule) gives
    ``measured`` tokens per verifier forward for generations of ``new_tokens`` tokens."""

    def model(a: float) -> float:
        return predict_chain([a], [block_length], [0.0, 1.0], new_tokens=new_tokens).tokens_per_target_forward

    if measured <= model(0.0):
        return 0.0
    if measured >= model(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):  # model() is increasing in alpha
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if model(mid) < measured else (lo, mid)
    return 0.5 * (lo + hi)


def measure_proposer_alpha(
    proposer: str | Proposer,
    stage: Stage,
    prompts_token_ids: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    block_length: int,
    stop_ids: Sequence[int] = (),
) -> float:
    """Effective per-token acceptance of a model-free proposer (e.g. ``"ngram"``) drafting for
    ``stage``: run the greedy 2-stage pipeline proposer -> stage with ``block_length`` on every
    prompt and find the alpha whose predicted tokens per verifier forward
    (``predict_chain(..., new_tokens=...)``) equals the measured one.

    Not ``latency.measure_alpha``: a proposer such as ``ngram`` often proposes nothing, and those
    rounds (one token per forward) never enter the per-position counts, so the i.i.d. fit would
    predict far more tokens per forward than the pipeline delivers. The effective alpha matches
    the measured throughput at ``block_length`` (use the length the plan will choose: a free
    proposer always gets the longest block)."""
    from pyramid_core.build import build_pipeline

    _check_prompts(prompts_token_ids, new_tokens)
    pipe = build_pipeline([proposer, stage], ["exact"], [block_length], sampling=SamplingConfig.greedy(),
                          stop_ids=list(stop_ids))
    tokens = forwards = 0
    for ids in prompts_token_ids:
        m = pipe.generate(list(ids), new_tokens).metrics
        tokens += m.new_tokens
        forwards += m.target_forwards
    if forwards == 0:
        return math.nan
    per_prompt = max(1, round(tokens / len(prompts_token_ids)))
    return _alpha_for_tokens_per_forward(tokens / forwards, block_length, per_prompt)


DEFAULT_BLOCK_SIZES = (1, 2, 3, 4, 6, 8)
"""Tokens per forward M at which ``measure_stage_costs`` times a stage by default."""


def measure_stage_costs(
    stage: Stage,
    context_len: int,
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    repeats: int = 10,
    *,
    warmup: int = 2,
) -> ForwardCost:
    """T(M): median seconds of a cached forward of ``stage`` that feeds M new tokens, for each M
    in ``block_sizes``, as a ``ForwardCost`` (interpolated between them).

    The context is fed once (prefill, ``context_len`` tokens); then ``warmup`` untimed and
    ``repeats`` timed rounds, round r with a context of ``context_len + r + 1`` tokens, each run
    one forward per M, interleaved (M = 1, 2, ... in turn, so a busy machine slows every M
    alike). A forward is handed the round's context plus a block of M - 1 tokens
    (``score(context, Block)``; M = 1 is a plain decode step, ``score(context)``): the stage
    rolls its cache back to the context without its last token and feeds that token and the
    block, M tokens -- exactly what a verification of a block of M - 1 tokens does after the
    stage's previous round. Each forward is timed alone (``time.perf_counter``, device
    synchronised); medians resist a busy machine. The stage's cache is reset before and after."""
    if not isinstance(context_len, int) or context_len < 1:
        raise ConfigError(f"context_len must be an integer >= 1, got {context_len!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    sizes = list(block_sizes)
    if not sizes:
        raise ConfigError("block_sizes must name at least one M (tokens per forward), e.g. (1, 2, 4)")
    for before, m in zip([0, *sizes], sizes):
        if isinstance(m, bool) or not isinstance(m, int) or m <= before:
            raise ConfigError(f"block_sizes must be strictly increasing integers >= 1, got {m!r} in {sizes}")
    total = context_len + warmup + repeats + sizes[-1]
    ids = (torch.arange(total, dtype=torch.long) * 7919 + 13) % stage.vocab_size  # any valid tokens
    ids = ids.to(stage.device)
    seconds: dict[int, list[float]] = {m: [] for m in sizes}
    stage.reset()
    stage.score(ids[:context_len])
    for r in range(warmup + repeats):
        end = context_len + r + 1
        for m in sizes:
            tokens = ids[end : end + m - 1]
            block = None if m == 1 else Block(tokens, tokens.new_zeros((m - 1, 0), dtype=torch.float32))
            t0 = time.perf_counter()
            rows = stage.score(ids[:end], block)
            if rows.device.type == "cuda":
                torch.cuda.synchronize(rows.device)
            if r >= warmup:
                seconds[m].append(time.perf_counter() - t0)
    stage.reset()
    return ForwardCost([(m, statistics.median(seconds[m])) for m in sizes], str(getattr(stage, "name", "stage")))


def measure_stage_time(stage: Stage, context_len: int, repeats: int = 10, *, warmup: int = 2) -> float:
    """Median seconds of one single-token decode forward of ``stage`` after ``context_len``
    tokens: ``measure_stage_costs`` at M = 1 alone (prefill, ``warmup`` untimed decode forwards,
    then ``repeats`` timed ones)."""
    return measure_stage_costs(stage, context_len, (1,), repeats, warmup=warmup).decode


@attrs.frozen
class Measured:
    """What ``measure_candidates`` found: T(M) per candidate (flat 0 for proposers), alpha[i][j]
    for every ordered pair (NaN where not measured: proposers are never verifiers), the
    proposers."""

    forward_costs: tuple[ForwardCost, ...]
    alpha: tuple[tuple[float, ...], ...]
    proposers: tuple[str, ...]

    @property
    def forward_times(self) -> tuple[float, ...]:
        """T(1) per candidate: seconds of one single-token (decode) forward."""
        return tuple(c.decode for c in self.forward_costs)


def measure_candidates(
    candidates: Sequence[Stage | Proposer],
    names: Sequence[str],
    prompts_token_ids: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    proposer_length: int = 16,
    repeats: int = 10,
    stop_ids: Sequence[int] = (),
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
) -> Measured:
    """Measure everything ``plan_chain`` needs on this machine: ``measure_stage_costs`` per model
    stage at each M of ``block_sizes`` (after a context of the mean prompt length; give every M
    up to max_length + 1 to charge each block length its measured cost rather than an
    interpolated one), ``measure_pairwise_alpha`` between model stages, and
    ``measure_proposer_alpha`` of every model-free proposer drafting for every model stage with
    ``proposer_length`` (T = 0: a proposer's time is framework overhead)."""
    if len(candidates) != len(names):
        raise ConfigError(f"{len(candidates)} candidates need {len(names)} names, one each")
    _check_prompts(prompts_token_ids, new_tokens)
    models: dict[int, Stage] = {}
    free: dict[int, Proposer] = {}
    for i, c in enumerate(candidates):
        if isinstance(c, Stage):
            models[i] = c
        else:
            free[i] = c
    context_len = max(1, round(statistics.mean(len(ids) for ids in prompts_token_ids)))
    costs = [ForwardCost.flat(0.0, names[i]) for i in range(len(candidates))]
    for i, stage in models.items():
        costs[i] = attrs.evolve(measure_stage_costs(stage, context_len, block_sizes, repeats), name=names[i])
    pairwise = measure_pairwise_alpha(list(models.values()), prompts_token_ids, new_tokens, stop_ids=stop_ids)
    alpha = [[math.nan] * len(candidates) for _ in candidates]
    for a, i in enumerate(models):
        for b, j in enumerate(models):
            alpha[i][j] = pairwise[a][b]
    for i, proposer in free.items():
        for j, stage in models.items():
            alpha[i][j] = measure_proposer_alpha(proposer, stage, prompts_token_ids, new_tokens,
                                                 block_length=proposer_length, stop_ids=stop_ids)
    return Measured(tuple(costs), tuple(tuple(row) for row in alpha), tuple(names[i] for i in free))
