"""Everything that runs and times stages: the measurements behind the latency model, the planner and
the bench ([latency model](../../algorithms.md#latency-model),
[metrics](../../algorithms.md#metrics)).

- ``measure_stage_costs`` / ``measure_stage_time``: T(M), the seconds of a cached forward that
  feeds M new tokens, per stage (``latency.ForwardCost``);
- ``measure_pairwise_alpha`` / ``measure_proposer_alpha``: per-token acceptance alpha per pair
  of stages, and the effective alpha of a model-free proposer;
- ``measure_candidates``: all of the above for the planner's candidates (``Measured``);
- ``measure_alpha`` / ``measure_forward_time``: alpha per boundary and seconds per forward per
  stage from the metrics of real runs (pooled with ``Metrics.pool``);
- ``target_nll``: mean negative log-likelihood of a text under a stage (quality).

Timing goes through ``time.perf_counter`` with the device synchronised after each timed
forward; medians resist a busy machine.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import attrs
import torch

from pyramid_core.build import build_pipeline
from pyramid_core.channel import reader_of
from pyramid_core.devices import sync
from pyramid_core.errors import ConfigError
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.latency.cost import ForwardCost
from pyramid_core.lab.latency.forms import iid_alpha
from pyramid_core.pipeline import Metrics, Pipeline
from pyramid_core.plugins import Registries
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage
from pyramid_core.types import Block, SamplingConfig
from pyramid_core.validate import check_fits, context_length

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "alpha_for_tokens_per_forward",
    "length_distributions",
    "Measured",
    "measure_alpha",
    "measure_bandwidth",
    "measure_candidates",
    "measure_forward_time",
    "measure_pairwise_alpha",
    "measure_proposer_alpha",
    "measure_stage_costs",
    "measure_stage_time",
    "target_nll",
]


def _pooled(metrics: Metrics | Sequence[Metrics], what: str) -> Metrics:
    runs = [metrics] if isinstance(metrics, Metrics) else list(metrics)
    if not runs:
        raise ConfigError(f"{what} needs at least one Metrics")
    return Metrics.pool(runs)


def measure_alpha(metrics: Metrics | Sequence[Metrics]) -> list[float]:
    """Per-token acceptance alpha at each boundary, pooled over one or more runs
    (``latency.iid_alpha`` of the per-position counts). A boundary that was never exercised
    gives NaN. For a tree boundary the counts are per depth and the result is the
    chain-equivalent alpha."""
    pooled = _pooled(metrics, "measure_alpha")
    return [iid_alpha(b.proposed_at, sum(b.accepted_at)) for b in pooled.boundaries]


def length_distributions(metrics: Metrics | Sequence[Metrics]) -> list[dict[int, float]]:
    """The realised block length of each boundary's rounds, pooled over runs: ``{ell: share of
    rounds}`` (ell = 0: the proposer proposed nothing), for ``latency.predict_chain``. For a
    tree boundary the length is the tree's depth."""
    out = []
    for b in _pooled(metrics, "length_distributions").boundaries:
        at = [b.rounds, *b.proposed_at]  # at[m] = rounds that proposed at least m tokens
        counts = {m: at[m] - (at[m + 1] if m + 1 < len(at) else 0) for m in range(len(at))}
        out.append({m: c / b.rounds for m, c in counts.items() if c} if b.rounds else {1: 1.0})
    return out


def measure_forward_time(metrics: Metrics | Sequence[Metrics]) -> list[float]:
    """Seconds per forward T_k of each stage, pooled over runs (``forward_s / forwards``).
    A stage without forwards (a model-free proposer) gives 0.0: its cost is in the overhead."""
    return [s.seconds_per_forward for s in _pooled(metrics, "measure_forward_time").stages]


def target_nll(target: Stage, prompt: Sequence[int], tokens: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats/token) of ``tokens`` after ``prompt`` under ``target``
    (temperature 1, no truncation), from one forward over the tokens."""
    if not tokens:
        return float("nan")
    context = torch.tensor(list(prompt), dtype=torch.long, device=target.device)
    toks = torch.tensor(list(tokens), dtype=torch.long, device=target.device)
    logits = target.score(context, Block(toks, toks.new_zeros(len(toks), 0, dtype=torch.float32)))
    logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, toks.unsqueeze(-1))
    return float(-logp.mean())


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
    token) is generated once per prompt; every other stage i scores it in one call and ``alpha[i][j]``
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


def alpha_for_tokens_per_forward(measured: float, block_length: int, new_tokens: int) -> float:
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
    proposer: str | Proposer | Stage,
    stage: Stage,
    prompts_token_ids: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    block_length: int,
    stop_ids: Sequence[int] = (),
    policy: str | AcceptancePolicy | None = None,
    regs: Registries | None = None,
) -> float:
    """Effective per-token acceptance of a model-free proposer (e.g. ``"ngram"``) drafting for
    ``stage``: run the greedy 2-stage pipeline proposer -> stage with ``block_length`` and
    ``policy`` (``None``: the default policy) on every prompt and find the alpha whose predicted tokens per verifier forward
    (``predict_chain(..., new_tokens=...)``) equals the measured one.

    Not ``measure_alpha``: a proposer such as ``ngram`` often proposes nothing, and those
    rounds (one token per forward) never enter the per-position counts, so the i.i.d. fit would
    predict far more tokens per forward than the pipeline delivers. The effective alpha matches
    the measured throughput at ``block_length`` (use the length the plan will choose: a free
    proposer always gets the longest block)."""
    _check_prompts(prompts_token_ids, new_tokens)
    pipe = build_pipeline([proposer, stage], None if policy is None else [policy], [block_length],
                          sampling=SamplingConfig.greedy(), stop_ids=list(stop_ids), regs=regs)
    tokens = forwards = 0
    for ids in prompts_token_ids:
        m = pipe.generate(list(ids), new_tokens).metrics
        tokens += m.new_tokens
        forwards += m.target_forwards
    if forwards == 0:
        return math.nan
    per_prompt = max(1, round(tokens / len(prompts_token_ids)))
    return alpha_for_tokens_per_forward(tokens / forwards, block_length, per_prompt)


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
    alike). A forward is handed the round's context plus a block of M - 1 tokens that the next
    round's context does not continue with (``score(context, Block)``; M = 1 is a plain decode
    step, ``score(context)``): the stage
    rolls its cache back to the context without its last token and feeds that token and the
    block, M tokens -- exactly what a verification of a block of M - 1 tokens does after the
    stage's previous round. Each forward is timed alone (``time.perf_counter``, device
    synchronised); medians resist a busy machine. The stage's cache is reset before and after.
    Positions past the stage's context length (``HasContextLength``) are refused up front, as
    ``Pipeline.generate`` refuses them: the last round reaches ``context_len + warmup + repeats
    + max(M) - 1`` tokens."""
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
    rounds = warmup + repeats
    # the last round's widest forward reaches position context_len + rounds + max(M) - 1
    check_fits(stage.name, context_length(stage), context_len + rounds + sizes[-1] - 1,
               f"a {context_len}-token context + {rounds} rounds ({warmup} warm-up, {repeats} timed) + "
               f"{sizes[-1] - 1} block tokens (M = {sizes[-1]})",
               lambda limit: f"use a context of at most {limit - rounds - sizes[-1] + 1} tokens "
                             "(or fewer repeats, or a smaller M)")
    total = context_len + warmup + repeats + sizes[-1]
    ids = (torch.arange(total, dtype=torch.long) * 7919 + 13) % stage.vocab_size  # any valid tokens
    ids = ids.to(stage.device)
    seconds: dict[int, list[float]] = {m: [] for m in sizes}
    stage.reset()
    stage.score(ids[:context_len])
    # a block's tokens differ from the context tokens that follow it, so that no forward finds the
    # next round's context already consumed (a stage that keeps rows per position, a feature
    # draft, would then answer M = 1 from its cache, without a forward)
    other = (ids + 1) % stage.vocab_size
    for r in range(warmup + repeats):
        end = context_len + r + 1
        for m in sizes:
            tokens = other[end : end + m - 1]
            block = None if m == 1 else Block(tokens, tokens.new_zeros((m - 1, 0), dtype=torch.float32))
            t0 = time.perf_counter()
            rows = stage.score(ids[:end], block)
            sync(rows.device)
            if r >= warmup:
                seconds[m].append(time.perf_counter() - t0)
    stage.reset()
    return ForwardCost([(m, statistics.median(seconds[m])) for m in sizes], stage.name)


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Bytes per second this machine reads from memory: the fastest of ``repeats`` sums over a
    ``nbytes`` float32 tensor (far larger than any cache level), after one untimed sum."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    best = math.inf
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        x.sum()
        sync(x.device)
        if r:
            best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def measure_stage_time(stage: Stage, context_len: int, repeats: int = 10, *, warmup: int = 2) -> float:
    """Median seconds of one single-token decode forward of ``stage`` after ``context_len``
    tokens: ``measure_stage_costs`` at M = 1 alone (prefill, ``warmup`` untimed decode forwards,
    then ``repeats`` timed ones)."""
    return measure_stage_costs(stage, context_len, (1,), repeats, warmup=warmup).decode


@attrs.frozen
class Measured:
    """What ``measure_candidates`` found: T(M) per candidate (flat 0 for model-free proposers),
    ``alpha[i][j]`` for every ordered pair (NaN where not measured: proposers are never
    verifiers), the proposers (the candidates that only draft: model-free proposers and feature
    drafts)."""

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
    feature_length: int = 4,
    repeats: int = 10,
    stop_ids: Sequence[int] = (),
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    regs: Registries | None = None,
) -> Measured:
    """Measure everything ``plan_chain`` needs on this machine: ``measure_stage_costs`` per model
    stage at each M of ``block_sizes`` (after a context of the mean prompt length; give every M
    up to max_length + 1 to charge each block length its measured cost rather than an
    interpolated one), ``measure_pairwise_alpha`` between model stages, and
    ``measure_proposer_alpha`` of every model-free proposer drafting for every model stage with
    ``proposer_length`` (T = 0: a proposer's time is framework overhead).

    A feature draft (a ``FeatureReader``: it reads the hidden states of a stage above it, so it
    drafts at the bottom of a chain and never verifies) is planned like a proposer that has a
    cost: its T(M) is measured as a model's, and its alpha for each model stage is the effective
    alpha of the 2-stage run feature -> stage at ``feature_length`` (reading that stage's
    features), because its acceptance falls with the draft depth (drafted positions read its own
    predicted features), which teacher-forced agreement would not show. It is listed among
    ``Measured.proposers``: first stage only."""
    if len(candidates) != len(names):
        raise ConfigError(f"{len(candidates)} candidates need {len(names)} names, one each")
    _check_prompts(prompts_token_ids, new_tokens)
    models: dict[int, Stage] = {}
    free: dict[int, Proposer] = {}
    readers: dict[int, Stage] = {}
    for i, c in enumerate(candidates):
        if isinstance(c, Stage):
            (readers if reader_of(c) is not None and i + 1 < len(candidates) else models)[i] = c
        else:
            free[i] = c
    context_len = max(1, round(statistics.mean(len(ids) for ids in prompts_token_ids)))
    costs = [ForwardCost.flat(0.0, names[i]) for i in range(len(candidates))]
    for i, stage in {**models, **readers}.items():
        costs[i] = attrs.evolve(measure_stage_costs(stage, context_len, block_sizes, repeats), name=names[i])
    pairwise = measure_pairwise_alpha(list(models.values()), prompts_token_ids, new_tokens, stop_ids=stop_ids)
    alpha = [[math.nan] * len(candidates) for _ in candidates]
    for a, i in enumerate(models):
        for b, j in enumerate(models):
            alpha[i][j] = pairwise[a][b]
    drafters: dict[int, tuple[Stage | Proposer, int]] = {
        **{i: (p, proposer_length) for i, p in free.items()}, **{i: (r, feature_length) for i, r in readers.items()}}
    for i, (drafter, length) in drafters.items():
        for j, stage in models.items():
            alpha[i][j] = measure_proposer_alpha(drafter, stage, prompts_token_ids, new_tokens,
                                                 block_length=length, stop_ids=stop_ids, regs=regs)
    return Measured(tuple(costs), tuple(tuple(row) for row in alpha), tuple(names[i] for i in sorted(drafters)))
