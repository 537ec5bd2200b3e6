"""The N-stage speculative decoding recursion ([the exact N-stage
chain](../../algorithms.md#the-exact-n-stage-chain)).

``propose(1, n)`` is the bottom proposer. ``propose(k, n)`` for k >= 2 is a
``SpeculativeProposer``: it asks the stage below for blocks of ``ell_{k-1}`` tokens, runs M_k once
over each block, lets the boundary's policy accept a prefix and emit one more token, and buffers
the accepted tokens *with M_k's rows* (trap 1) until it holds n tokens -- the number of tokens it
asks for depends on counts only (trap 2). Generation is ``propose(N, max_new_tokens)``.
Every stage's cache rolls back by itself: a stage is always handed the full context and reuses
only the prefix it has seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from pyramid_core.channel import FeatureLinks, feature_links
from pyramid_core.devices import sync
from pyramid_core.errors import ConfigError
from pyramid_core.options import DecodeOptions
from pyramid_core.protocols import (
    AcceptancePolicy,
    CountsForwards,
    HasVocabulary,
    Proposer,
    Resettable,
    Stage,
    Verifier,
    VerifiesTrees,
    tokenizer_of,
)
from pyramid_core.rng import Rng, check_seed
from pyramid_core.schedule import LengthSchedule, make_schedule
from pyramid_core.text import Messages, TextStream, decode_text, encode_prompt
from pyramid_core.types import Block, BoundaryStats, LookupStats, SamplingConfig, StageStats
from pyramid_core.validate import (
    EmittedMass,
    NonFiniteMode,
    check_block_lengths,
    check_fits,
    check_prompt,
    check_verdict,
    context_length,
    policy_label,
    score_checked,
)

__all__ = [
    "AutoregressiveProposer",
    "LookupFirst",
    "model_free",
    "StageVerifier",
    "SpeculativeProposer",
    "Pipeline",
    "Generation",
    "TextGeneration",
    "Metrics",
    "BlockCallback",
]


#: What ``Pipeline.generate(on_block=...)`` calls with each round's new tokens, ``Long[Tensor, "m"]``.
BlockCallback = Callable[[Tensor], object]


def _ignore(tokens: Tensor) -> None:
    """The default ``on_block``: a call, not a flag in the loop."""


def _cut_at_stop(tokens: Tensor, stop_ids: Tensor) -> tuple[int, bool]:
    """(length of ``tokens`` up to and including the first stop token, whether one was found)."""
    if stop_ids.numel() == 0 or tokens.numel() == 0:
        return int(tokens.numel()), False
    hits = torch.isin(tokens, stop_ids.to(tokens.device)).nonzero()
    if hits.numel() == 0:
        return int(tokens.numel()), False
    return int(hits[0, 0].item()) + 1, True


@attrs.define(eq=False)
class StageVerifier:
    """A model stage used as a verifier: logits -> sampling transform, timed."""

    stage: Stage
    sampling: SamplingConfig
    stats: StageStats
    on_nonfinite: NonFiniteMode = "raise"

    def verify(self, context: Tensor, block: Block) -> Tensor:
        t0 = time.perf_counter()
        logits = score_checked(self.stage, context, block, name=self.stats.name, mode=self.on_nonfinite)
        rows = self.sampling.transform(logits)
        sync(rows.device)
        self.stats.record(time.perf_counter() - t0, len(block) + 1)
        return rows


@attrs.define(eq=False)
class AutoregressiveProposer:
    """propose(1, n): sample n tokens from a model stage one at a time, keeping every row.

    ``confidence_stop`` > 0 ends a block early, after a token whose row's largest probability
    is below it (the draft is unsure what comes next): whether token j+1 is drawn depends only
    on row j, known before it is drawn -- a stopping time, so the chain stays exact
    ([trap 2](../../algorithms.md#the-two-traps))."""

    stage: Stage
    sampling: SamplingConfig
    stats: StageStats
    stop_ids: Tensor = attrs.field(factory=lambda: torch.empty(0, dtype=torch.long))
    confidence_stop: float = 0.0
    on_nonfinite: NonFiniteMode = "raise"
    on_block: BlockCallback = _ignore  # the target's streaming callback, per token (N = 1)

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        tokens: list[int] = []
        rows: list[Tensor] = []
        stop = set(self.stop_ids.tolist())
        ctx = context
        for _ in range(n):
            t0 = time.perf_counter()
            logits = score_checked(self.stage, ctx, None, name=self.stats.name, mode=self.on_nonfinite)
            row = self.sampling.transform(logits)[0]
            token = rng.categorical(row)  # .item() inside: also syncs the device
            self.stats.record(time.perf_counter() - t0, 1)
            tokens.append(token)
            rows.append(row)
            new = ctx.new_tensor([token])
            self.on_block(new)
            if token in stop or (self.confidence_stop and float(row.max()) < self.confidence_stop):
                break
            ctx = torch.cat([ctx, new])
        if not tokens:
            return Block.empty(self.stage.vocab_size, context.device)
        return Block(context.new_tensor(tokens), torch.stack(rows))


def model_free(lookup: object) -> Proposer:
    """``lookup``, refused unless it is a model-free ``Proposer`` (a model stage drafts as stage 1)."""
    if isinstance(lookup, Stage) or not isinstance(lookup, Proposer):
        raise ConfigError(f"the lookup ({_stage_name(lookup, 0)}) must be a model-free Proposer "
                          "(propose(context, n, rng) -> Block, e.g. ngram); a model drafts as stage 1")
    return lookup


def graft_needs_lookup(lookup: object, lookup_graft: bool) -> None:
    """``lookup_graft`` refused without a lookup: there is no block to graft."""
    if lookup_graft and lookup is None:
        raise ConfigError("lookup_graft grafts the lookup's block into stage 1's; give a lookup (e.g. ngram)")


@attrs.define(eq=False)
class LookupFirst:
    """The bottom proposer behind a lookup ([lookup first](../../algorithms.md#lookup-first)):
    each round ``lookup`` (a model-free proposer, e.g. ``ngram``) is asked first, and ``drafter``
    (the bottom stage's own proposer: a model sampled autoregressively, a token tree) drafts only
    when the lookup proposes nothing. Which of the two proposes is a function of the context
    alone, fixed before any token of the round is drawn, so each block is an ordinary proposal
    with the rows it was drawn from and a lossless policy stays lossless. A lookup block is cut
    after its first stop token (the target would end there).

    ``graft=True`` ([lookup graft](../../algorithms.md#lookup-graft)): the drafter drafts every
    round, and the lookup's block is grafted into its block as one more path (``Block.graft``), so
    one forward verifies both; ``share`` (greedy decoding only) lets that path run through the
    drafter's nodes where their tokens match."""

    lookup: Proposer
    drafter: Proposer
    stats: LookupStats
    stop_ids: Tensor = attrs.field(factory=lambda: torch.empty(0, dtype=torch.long))
    graft: bool = False
    share: bool = False

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        block = self.look(context, n, rng)
        if not self.graft:
            return block if len(block) else self.drafter.propose(context, n, rng)
        drafted = self.drafter.propose(context, n, rng)
        if not len(block):
            return drafted
        if drafted.without_replacement:
            raise ConfigError(f"lookup_graft: {_stage_name(self.drafter, 0)} drafts its tree without replacement "
                              "(Sequoia), so no lookup path can be added beside its children; draw it with "
                              "replacement (tree:replacement=true) or drop lookup_graft")
        return drafted.graft(block, share=self.share)

    def look(self, context: Tensor, n: int, rng: Rng) -> Block:
        """The lookup's block alone (up to ``n`` tokens, cut after its first stop token; empty
        where it finds nothing), counted as one try."""
        block = self.lookup.propose(context, n, rng)
        if block.tree is not None or len(block) > n:
            self._too_much(n, "a token tree" if block.tree is not None else f"{len(block)} tokens")
        if len(block):
            block = block.head(_cut_at_stop(block.tokens, self.stop_ids)[0])
        self.stats.record(len(block))
        return block

    def look_tokens(self, context: np.ndarray, n: int, rng: Rng) -> list[int]:
        """The token ids of :meth:`look`'s block, for a caller that needs no rows (vLLM's lanes):
        through the lookup's ``lookup_tokens(context, n)`` where it has one (``ngram`` does),
        without building a row per token."""
        direct = getattr(self.lookup, "lookup_tokens", None)
        if direct is None:
            return [int(t) for t in self.look(torch.from_numpy(context), n, rng).tokens.tolist()]
        tokens = [int(t) for t in direct(context, n)]
        if len(tokens) > n:
            self._too_much(n, f"{len(tokens)} tokens")
        stops = set(self.stop_ids.tolist())
        cut = next((j + 1 for j, t in enumerate(tokens) if t in stops), len(tokens))
        self.stats.record(cut)
        return tokens[:cut]

    def _too_much(self, n: int, what: str) -> None:
        raise ConfigError(f"lookup {_stage_name(self.lookup, 0)} proposed {what}; a lookup proposes a chain of "
                          f"at most the {n} tokens asked for")


@attrs.define(eq=False)
class SpeculativeProposer:
    """propose(k, n) for k >= 2: exact samples of ``verifier``'s model when ``policy`` is exact.

    Every verdict is checked where it enters (``validate.check_verdict``; the emitted token's
    mass through ``masses``); errors name the policy by ``policy_name`` (default: its label) and
    the ``boundary`` ``"k -> k+1"``. ``on_block`` sees each round's tokens as they are kept (cut
    at a stop token and at ``n``)."""

    lower: Proposer
    verifier: Verifier
    policy: AcceptancePolicy
    schedule: LengthSchedule
    stats: BoundaryStats
    stop_ids: Tensor = attrs.field(factory=lambda: torch.empty(0, dtype=torch.long))
    policy_name: str = ""
    boundary: str = ""
    masses: EmittedMass = attrs.field(factory=EmittedMass)
    on_block: BlockCallback = _ignore

    def __attrs_post_init__(self) -> None:
        if not self.policy_name:
            self.policy_name = policy_label(self.policy)

    def round(self, context: Tensor, budget: int, rng: Rng) -> Block:
        """One verification: a block from below, one forward of this stage, one verdict.
        Returns the accepted tokens plus the emitted one, each with this stage's row."""
        block = self.lower.propose(context, min(self.schedule.length(), budget), rng)
        p = self.verifier.verify(context, block)
        verdict = self.policy.decide(block, p, rng)
        accepted, token = check_verdict(verdict, block, int(p.shape[-1]), policy=self.policy_name,
                                        boundary=self.boundary)
        self.masses.check(verdict.row, token, policy=self.policy_name, boundary=self.boundary)
        if block.tree is None:
            self.stats.record(len(block), verdict.n_accepted)
            self.schedule.update(len(block), verdict.n_accepted)
            row_index = list(accepted)  # chain: node i was drawn from row i
        else:
            self.stats.record_tree(len(block), block.tree.depth, verdict.n_accepted)
            self.schedule.update(block.tree.depth, verdict.n_accepted)
            row_index = [block.tree.parents[i] + 1 for i in accepted]
        tokens = torch.cat([block.tokens[list(accepted)].to(p.device), p.new_tensor([token], dtype=torch.long)])
        rows = torch.cat([p[row_index], verdict.row.unsqueeze(0)])
        return Block(tokens, rows)

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        pieces: list[Block] = []
        have = 0
        while have < n:
            ctx = torch.cat([context, *(b.tokens.to(context.device) for b in pieces)])
            piece = self.round(ctx, n - have, rng)
            cut, stopped = _cut_at_stop(piece.tokens, self.stop_ids)
            piece = piece.head(min(cut, n - have))  # a round may emit one token past n
            self.on_block(piece.tokens)
            pieces.append(piece)
            have += len(piece)
            if stopped:
                break
        if not pieces:
            return Block.empty(0)
        return Block.concat(pieces)


@attrs.define
class Metrics:
    """What one generation measured ([metrics](../../algorithms.md#metrics))."""

    boundaries: list[BoundaryStats]
    stages: list[StageStats]
    new_tokens: int = 0
    wall_s: float = 0.0
    lookup: LookupStats | None = None  # a pipeline with a lookup (``Pipeline.lookup``)

    @classmethod
    def pool(cls, runs: Sequence[Metrics]) -> Metrics:
        """One ``Metrics`` summing the counters of ``runs`` (generations of one pipeline):
        boundary counts and histograms, per-stage forwards and times, tokens and wall time."""
        if not runs:
            raise ConfigError("Metrics.pool needs at least one run")
        shape = (len(runs[0].boundaries), len(runs[0].stages))
        if any((len(m.boundaries), len(m.stages)) != shape for m in runs):
            raise ConfigError("Metrics.pool: the runs come from pipelines of different shapes")
        boundaries = [BoundaryStats.pool([m.boundaries[k] for m in runs]) for k in range(shape[0])]
        stages = [StageStats.pool([m.stages[k] for m in runs]) for k in range(shape[1])]
        lookups = [m.lookup for m in runs if m.lookup is not None]
        return cls(boundaries, stages, sum(m.new_tokens for m in runs), sum(m.wall_s for m in runs),
                   LookupStats.pool(lookups) if lookups else None)

    @property
    def target_forwards(self) -> int:
        return self.stages[-1].forwards

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def overhead_s(self) -> float:
        """Wall time not spent inside stage forwards (framework and policy overhead)."""
        return self.wall_s - sum(s.forward_s for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "target_forwards": self.target_forwards,
            "tokens_per_target_forward": self.tokens_per_target_forward,
            "overhead_s": self.overhead_s,
            "overhead_fraction": self.overhead_s / self.wall_s if self.wall_s > 0 else float("nan"),
            "boundaries": [b.as_dict() for b in self.boundaries],
            "stages": [s.as_dict() for s in self.stages],
            "lookup": None if self.lookup is None else self.lookup.as_dict(),
        }


@attrs.frozen(eq=False)
class Generation:
    """Result of ``Pipeline.generate``: the new tokens (prompt excluded) and the metrics."""

    tokens: Tensor
    metrics: Metrics

    @property
    def token_list(self) -> list[int]:
        return [int(t) for t in self.tokens.tolist()]


@attrs.frozen(eq=False)
class TextGeneration:
    """Result of ``Pipeline.generate_text``: the new text, the prompt's token ids and the
    ``Generation`` (the new tokens and the metrics)."""

    text: str
    prompt_ids: list[int]
    generation: Generation

    @property
    def tokens(self) -> Tensor:
        return self.generation.tokens

    @property
    def metrics(self) -> Metrics:
        return self.generation.metrics


def _stage_name(obj: object, index: int) -> str:
    return str(getattr(obj, "name", None) or f"stage {index + 1} ({type(obj).__name__})")


@attrs.define(eq=False)
class Pipeline:
    """N stages (smallest first), N-1 policies and N-1 block lengths.

    ``stages[0]`` may be a model ``Stage`` (sampled autoregressively) or any ``Proposer``;
    ``stages[1:]`` are model ``Stage``s. N = 1 is plain autoregressive decoding (the baseline).
    Block lengths must not decrease from the bottom boundary up (``validate.check_block_lengths``:
    a larger lower length could never take effect). ``on_nonfinite``: what a NaN or +inf logit
    from a stage does -- ``"raise"`` a ``NonFiniteError`` naming the stage and the position, or
    ``"warn"`` and give those entries zero probability (for probing broken models).
    ``policy_names``: how errors name the policies (e.g. their specs; default: their labels).
    ``lookup``: a model-free proposer (e.g. ``ngram``) asked first each round at the bottom;
    stage 1 drafts only in the rounds it proposes nothing (``LookupFirst``), or, with
    ``lookup_graft``, every round, the lookup's block grafted into stage 1's as one more path.
    Every verdict is checked as it enters the recursion (``SpeculativeProposer``): a bad one
    raises ``PolicyOutputError`` naming the policy and the boundary.
    """

    stages: Sequence[Stage | Proposer]
    policies: Sequence[AcceptancePolicy] = ()
    block_lengths: Sequence[int] = ()
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    stop_ids: Sequence[int] = ()
    length_schedule: str = "fixed"
    confidence_stop: float = 0.0
    on_nonfinite: NonFiniteMode = "raise"
    policy_names: Sequence[str] = ()
    lookup: Proposer | None = None
    lookup_graft: bool = False
    decode: DecodeOptions = attrs.field(init=False)
    _bottom_is_stage: bool = attrs.field(init=False, default=False)
    _resettable: list[Resettable] = attrs.field(init=False, factory=list)
    _features: FeatureLinks = attrs.field(init=False, factory=lambda: FeatureLinks((), ()))
    _context_limits: list[tuple[str, int]] = attrs.field(init=False, factory=list)

    @classmethod
    def with_options(cls, stages: Sequence[Stage | Proposer], policies: Sequence[AcceptancePolicy],
                     block_lengths: Sequence[int], decode: DecodeOptions,
                     policy_names: Sequence[str] = (), lookup: Proposer | None = None,
                     lookup_graft: bool = False) -> Pipeline:
        """A pipeline decoding with ``decode`` (its ``stop_ids`` ``None`` means none)."""
        return cls(stages, policies, block_lengths, decode.sampling, list(decode.stop_ids or ()),
                   decode.length_schedule, decode.confidence_stop, decode.on_nonfinite, policy_names, lookup,
                   lookup_graft)

    def __attrs_post_init__(self) -> None:
        n = len(self.stages)
        if n < 1:
            raise ConfigError("a pipeline needs at least one stage (the target)")
        if len(self.policies) != n - 1:
            raise ConfigError(
                f"{n} stages need {n - 1} acceptance policies (one per boundary), got {len(self.policies)}"
            )
        if len(self.block_lengths) != n - 1:
            raise ConfigError(
                f"{n} stages need {n - 1} block lengths (one per boundary), got {len(self.block_lengths)}"
            )
        check_block_lengths(self.block_lengths)
        # the decode options, checked by the one routine that checks them (DecodeOptions)
        self.decode = DecodeOptions(self.sampling, tuple(self.stop_ids), self.length_schedule, self.confidence_stop,
                                    self.on_nonfinite)
        if n == 1 and not isinstance(self.stages[0], Stage):
            raise ConfigError(
                f"the target ({_stage_name(self.stages[0], 0)}) must be a model Stage; "
                "a model-free proposer can only be the first of at least two stages"
            )
        for k, stage in enumerate(self.stages):
            is_stage = isinstance(stage, Stage)
            if k == 0 and not (is_stage or isinstance(stage, Proposer)):
                raise ConfigError(f"{_stage_name(stage, k)} is neither a model Stage nor a Proposer")
            if k > 0 and not is_stage:
                raise ConfigError(
                    f"{_stage_name(stage, k)} must be a model Stage (stage {k + 1} verifies the stage below it, "
                    "which a proposer cannot do); a proposer -- a model-free one such as ngram, or a token-tree "
                    "wrapper around a model -- can only be the first stage. Only the bottom stage drafts token "
                    "trees: wrap stage 1 (tree=NAME[:k=v,...] / --tree NAME[:k=v,...]) and the stages above verify the tree"
                )
        for k, policy in enumerate(self.policies):
            if not isinstance(policy, AcceptancePolicy):
                raise ConfigError(f"policy at boundary {k + 1} -> {k + 2} ({policy!r}) has no decide() method")
        if self.policy_names and len(self.policy_names) != n - 1:
            raise ConfigError(f"{n} stages need {n - 1} policy names (one per boundary), got {len(self.policy_names)}")
        if self.lookup is not None:
            if n < 2:
                raise ConfigError(f"a lookup ({_stage_name(self.lookup, 0)}) proposes to the stage above the bottom "
                                  "one; a pipeline of the target alone has none")
            model_free(self.lookup)
            first = self.policies[0] if self.policies else None
            if self.lookup_graft and isinstance(first, VerifiesTrees) and not first.verifies_trees:
                raise ConfigError(f"lookup_graft verifies a token tree at boundary 1 -> 2, but its policy "
                                  f"({self.policy_names[0] if self.policy_names else policy_label(first)}) "
                                  "verifies chains only; use a policy that verifies trees (exact) there")
        graft_needs_lookup(self.lookup, self.lookup_graft)
        # model stages always declare a vocabulary; a proposer may (ngram does: its one-hot rows)
        parts = [*self.stages, *([self.lookup] if self.lookup is not None else [])]
        declared = [(i, s, int(s.vocab_size or 0)) for i, s in enumerate(parts) if isinstance(s, HasVocabulary)]
        declared = [(i, s, v) for i, s, v in declared if v > 0]
        if len({v for _, _, v in declared}) > 1:
            sizes = ", ".join(f"{_stage_name(s, i)}: {v}" for i, s, v in declared)
            raise ConfigError(f"stages disagree on the vocabulary size ({sizes})")
        self.decode.check_vocabulary(int(self.target.vocab_size))
        # capabilities are checked here, once (isinstance on a Protocol is slow)
        self._bottom_is_stage = isinstance(self.stages[0], Stage)
        self._resettable = [s for s in parts if isinstance(s, Resettable)]
        self._features = feature_links(self.stages, _stage_name)  # feature readers and their sources
        self._context_limits = [(_stage_name(s, i), limit) for i, s in enumerate(self.stages)
                                if (limit := context_length(s)) is not None]

    @property
    def target(self) -> Stage:
        return self.stages[-1]  # type: ignore[return-value]

    def build(self, masses: EmittedMass | None = None,
              on_block: BlockCallback | None = None) -> tuple[Proposer, Metrics]:
        """Fold the stages into the recursion: propose(1) <- propose(2) <- ... <- propose(N).
        ``masses`` checks the emitted tokens' mass (``generate`` flushes it; by default a new
        one, which checks rows on the CPU at once -- call its ``flush`` for accelerator rows).
        ``on_block`` goes to the top of the recursion only (``generate``)."""
        masses = masses if masses is not None else EmittedMass()
        top = len(self.stages) - 1
        emit = on_block if on_block is not None else _ignore
        stop = torch.tensor(list(self.stop_ids), dtype=torch.long)
        stage_stats = [StageStats(_stage_name(s, i)) for i, s in enumerate(self.stages)]
        bottom = self.stages[0]
        proposer: Proposer
        if self._bottom_is_stage:
            proposer = AutoregressiveProposer(bottom, self.sampling, stage_stats[0], stop,  # type: ignore[arg-type]
                                              self.confidence_stop, self.on_nonfinite,
                                              emit if top == 0 else _ignore)
        else:
            proposer = bottom  # type: ignore[assignment]
            if isinstance(bottom, CountsForwards):  # a model-backed proposer (tree) counts its forwards
                stage_stats[0] = bottom.stats
        lookup = None
        if self.lookup is not None:
            lookup = LookupStats()
            proposer = LookupFirst(self.lookup, proposer, lookup, stop, self.lookup_graft, self.sampling.is_greedy)
        boundaries = []
        for k in range(1, len(self.stages)):
            stats = BoundaryStats()
            boundaries.append(stats)
            verifier = StageVerifier(self.stages[k], self.sampling, stage_stats[k], self.on_nonfinite)  # type: ignore[arg-type]
            schedule = make_schedule(self.length_schedule, self.block_lengths[k - 1])
            policy = self.policies[k - 1]
            name = self.policy_names[k - 1] if self.policy_names else policy_label(policy)
            proposer = SpeculativeProposer(proposer, verifier, policy, schedule, stats, stop, name, f"{k} -> {k + 1}",
                                           masses, emit if k == top else _ignore)
        return proposer, Metrics(boundaries, stage_stats, lookup=lookup)

    def generate(
        self, prompt: Tensor | Sequence[int], max_new_tokens: int, *, seed: int | None = None,
        on_block: BlockCallback | None = None,
    ) -> Generation:
        """Sample up to ``max_new_tokens`` tokens after ``prompt``, stopping after a stop token.

        ``prompt``: one sequence of integer token ids in [0, vocab) (a list or a 1-D tensor).
        The context limit: every stage that declares a context length (``HasContextLength``)
        must hold the prompt and all ``max_new_tokens`` tokens, else a ``ConfigError`` up front.
        ``on_block``: called once per verification round of the target (once per token when
        N = 1) with the tokens it adds to the output, ``Long[Tensor, "m"]``; the calls' tokens
        concatenate to ``Generation.tokens``, the stop token and the cut at ``max_new_tokens``
        included."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if on_block is not None and not callable(on_block):
            raise ConfigError(f"on_block must be a callable taking a tensor of token ids, got {on_block!r}")
        if seed is not None:
            seed = check_seed(seed)
        context = check_prompt(prompt, self.target.vocab_size).to(self.target.device)
        self._check_fits(len(context), max_new_tokens)
        self._features.connect()
        for s in self._resettable:
            s.reset()
        masses = EmittedMass()
        proposer, metrics = self.build(masses, on_block)
        rng = Rng(seed)
        t0 = time.perf_counter()
        if max_new_tokens == 0:
            out = context.new_empty(0)
        else:
            try:
                out = proposer.propose(context, max_new_tokens, rng).tokens
            except Exception:
                masses.flush()  # a token without mass may be what broke the round above
                raise
            masses.flush()
        metrics.wall_s = time.perf_counter() - t0
        metrics.new_tokens = int(out.numel())
        return Generation(out, metrics)

    def generate_text(
        self, prompt: str | Messages, max_new_tokens: int, *, seed: int | None = None, chat: bool | None = None,
        on_text: Callable[[str], object] | None = None, skip_special_tokens: bool = True,
    ) -> TextGeneration:
        """``generate`` from text to text, through the target's tokenizer (``HasTokenizer``).

        ``prompt``: a str, or chat messages ``[{"role": ..., "content": ...}]`` (always through
        the chat template). ``chat``: ``None`` applies the template to a str where the tokenizer
        has one, ``True`` requires it, ``False`` encodes the raw text. ``on_text``: called with
        each new piece of text as rounds are accepted; the pieces concatenate to ``text``.
        ``skip_special_tokens``: leave e.g. the EOS out of the text."""
        tokenizer = tokenizer_of(self.target)
        name = _stage_name(self.target, len(self.stages) - 1)
        if tokenizer is None:
            raise ConfigError(f"generate_text needs a tokenizer and the target {name} has none; "
                              "encode the prompt yourself and call generate(ids, ...)")
        if on_text is not None and not callable(on_text):
            raise ConfigError(f"on_text must be a callable taking a str, got {on_text!r}")
        ids = encode_prompt(tokenizer, prompt, chat, name)
        if on_text is None:
            out = self.generate(ids, max_new_tokens, seed=seed)
            return TextGeneration(decode_text(tokenizer, out.token_list, skip_special_tokens), ids, out)
        stream = TextStream(tokenizer, on_text, skip_special_tokens)
        out = self.generate(ids, max_new_tokens, seed=seed, on_block=stream)
        return TextGeneration(stream.finish(), ids, out)

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        for name, limit in self._context_limits:
            check_fits(name, limit, prompt_len + max_new_tokens,
                       f"the prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})",
                       lambda limit: (f"use max_new_tokens <= {limit - prompt_len}" if prompt_len < limit
                                      else f"shorten the prompt to fewer than {limit} tokens"))
