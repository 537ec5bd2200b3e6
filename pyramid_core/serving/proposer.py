"""The lower stages of a pyramid chain as vLLM's speculative proposer ([serving with
vLLM](../../serving.md)).

vLLM's ``speculative_config={"method": "custom_class", "model": "pyramid_core.serving.proposer.PyramidProposer",
"num_speculative_tokens": k}`` builds :class:`PyramidProposer` with its ``VllmConfig`` in each
worker and, every step, asks it for up to ``k`` draft tokens per running request; vLLM runs the
target over them and verifies them with its own rejection sampler. The chain below the target --
ngram, model drafts, a qualifier, with pyramid's policies between them -- comes from
``PYRAMID_VLLM_CHAIN`` (JSON of a :class:`LowerChain`), which ``pyramid serve`` sets.

Why this is lossless: the block is drafted greedily by the lower chain, so it is a function of
the request's tokens alone, independent of the target's randomness; vLLM verifies a block given
without probabilities as one-hot proposals (accept token x with probability p(x), else sample
from p with x removed), which emits exactly p's distribution for any such x. Under greedy
decoding vLLM keeps the target's argmax, so outputs equal vLLM's plain decoding. The lower
boundaries may use any pyramid rule, lossy ones included: they only shape the proposals.

Per-request state: vLLM hands the proposer rows of its batch, not request ids, and rows move as
requests finish. A *lane* is one copy of the lower chain (its own caches; model weights shared):
a row keeps the lane whose last context its tokens extend, else takes a fresh lane or the least
recently used one. Every pyramid stage rolls back by itself to the prefix it has seen, so a
lane that meets another request's tokens stays correct (it re-reads what differs).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from pyramid_core.build import (
    PipelineSpec,
    check_lookup,
    check_same_tokenizer,
    make_policy,
    make_stage,
)
from pyramid_core.errors import ConfigError, PluginError
from pyramid_core.options import ExecutionMode
from pyramid_core.pipeline import LookupFirst, Pipeline, model_free
from pyramid_core.plugins import Registries, registries
from pyramid_core.protocols import Proposer, Stage, tokenizer_of
from pyramid_core.registry import parse_spec
from pyramid_core.rng import Rng
from pyramid_core.serving.planner import SUPPORT_EDGES, Offer, StepPlanner, support, support_bucket
from pyramid_core.types import LookupStats, SamplingConfig

__all__ = ["CHAIN_ENV", "LowerChain", "PyramidProposer", "PROPOSER_CLASS", "STATS_ENV", "build_lower"]

CHAIN_ENV = "PYRAMID_VLLM_CHAIN"
"""The environment variable that carries the lower chain (``LowerChain.to_json``) to vLLM's workers."""

STATS_ENV = "PYRAMID_VLLM_STATS"
"""Where the proposer in vLLM's worker writes :meth:`PyramidProposer.stats` (JSON) after every
step, when set: vLLM keeps its proposer in a process of its own."""

PROPOSER_CLASS = "pyramid_core.serving.proposer.PyramidProposer"
"""What vLLM's ``speculative_config["model"]`` names for ``method="custom_class"``."""

TOP_POLICIES = {"exact": "standard", "block": "block"}
"""Pyramid rules that may stand at the target's boundary, and vLLM's ``rejection_sample_method``
that runs each there: inside vLLM that boundary is vLLM's own rejection sampler (token-wise
rejection sampling, or Sun et al.'s block verification); vLLM has no registry for other rules."""


def _strings(value: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _ints(value: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@attrs.frozen
class LowerChain:
    """The stages below the target (specs, smallest first), the policies at the boundaries
    between them and their block lengths: what every lane of :class:`PyramidProposer` runs.
    ``max_lanes``: copies of the chain kept at most (one per running request); ``adaptive``: each
    row's block sized by :class:`~pyramid_core.serving.planner.StepPlanner` (0 to
    ``num_speculative_tokens``), else always ``num_speculative_tokens``; ``lookup``: a model-free
    proposer spec (``PipelineSpec.lookup``) asked first for every row, the planner then giving the
    row a prefix of its block, a drafted block or nothing (with ``adaptive`` off: its whole block,
    and the chain drafting only where it proposes nothing)."""

    stages: tuple[str, ...] = attrs.field(converter=_strings)
    policies: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    block_lengths: tuple[int, ...] = attrs.field(default=(), converter=_ints)
    device: str | None = None
    dtype: str | None = None
    compile: str | None = None
    max_lanes: int = 64
    adaptive: bool = True
    lookup: str | None = None

    def __attrs_post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("the lower chain needs at least one stage below the target")
        n = len(self.stages)
        if len(self.policies) != n - 1 or len(self.block_lengths) != n - 1:
            raise ConfigError(f"the lower chain's {n} stages need {n - 1} policies and {n - 1} block lengths, got "
                              f"{len(self.policies)} and {len(self.block_lengths)}")
        if self.max_lanes < 1:
            raise ConfigError(f"max_lanes must be at least 1, got {self.max_lanes}")

    @classmethod
    def of(cls, spec: PipelineSpec, *, regs: Registries | None = None,
           max_lanes: int = 64, adaptive: bool = True) -> tuple[LowerChain, str, int, str]:
        """(the chain below the target, the target's spec, the top block length, vLLM's
        rejection method for the top rule) of a pipeline spec, checked without loading a model:
        every lower stage a registered name and every lower policy one that builds,
        every stage a spec string, no token tree nor grafted lookup (vLLM's custom proposers hand it
        a list), and a rule vLLM runs (``TOP_POLICIES``) at the top boundary."""
        regs = regs or registries()
        stages, policies, lengths = spec.parts(regs)
        if len(stages) < 2:
            raise ConfigError(f"serving through vLLM needs a stage below the target; got only {stages[0]!r}")
        loaded = [s for s in stages if not isinstance(s, str)]
        if loaded:
            raise ConfigError(f"stage {loaded[0]!r} is a loaded object; vLLM's workers build the lower chain "
                              "in their own processes, from stage specs (strings)")
        if spec.tree is not None:
            raise ConfigError(f"tree={spec.tree!r}: vLLM's custom proposers hand it one list of tokens per "
                              "request, not a token tree; serve a chain")
        if spec.lookup_graft:
            raise ConfigError("lookup_graft grafts the lookup's block into a token tree; vLLM's custom proposers "
                              "hand it one list of tokens per request (the lookup is asked first there, row by row)")
        if spec.lookup is not None:
            if not isinstance(spec.lookup, str):
                raise ConfigError(f"lookup {spec.lookup!r} is a loaded object; vLLM's workers build it from its spec")
            check_lookup(spec.lookup, len(stages), regs)
        names = [p if isinstance(p, str) else None for p in policies]
        if any(n is None for n in names):
            raise ConfigError("vLLM's workers build the policies from their specs (strings), not objects")
        # what vLLM's workers would build, checked here: a wrong name fails now, not after vLLM's start-up
        for stage in stages[:-1]:
            name = parse_spec(str(stage))[0]
            if name not in regs.proposers and name not in regs.backends:
                try:
                    make_stage(str(stage), regs=regs)  # an unknown name: the error that lists the stages there are
                except PluginError as e:
                    raise ConfigError(f"stage {stage!r} of the lower chain: {e}") from e
        for k, policy in enumerate(names[:-1]):
            try:
                make_policy(str(policy), regs=regs)
            except (PluginError, ConfigError, ValueError, TypeError) as e:
                raise ConfigError(f"policy {policy!r} at boundary {k + 1} -> {k + 2} of the lower chain: {e}") from e
        top = str(names[-1])
        top_name, top_params = parse_spec(top)
        if top_name not in TOP_POLICIES or top_params:
            raise ConfigError(
                f"policy {top!r} at the target's boundary ({len(stages) - 1} -> {len(stages)}): inside vLLM that "
                "boundary is verified by vLLM's own rejection sampler (exact: standard or block verification); "
                f"pyramid's rules run between the stages below it (use {' or '.join(TOP_POLICIES)} at the top, "
                "e.g. --policy fuzzy:tau=0.3 --policy exact)")
        return (cls(tuple(stages[:-1]), tuple(names[:-1]), tuple(lengths[:-1]), spec.device, spec.dtype,
                    None if spec.compile is None else spec.compile.value, max_lanes, adaptive, spec.lookup),
                str(stages[-1]), int(lengths[-1]), TOP_POLICIES[top_name])

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LowerChain:
        try:
            fields = json.loads(text)
            return cls(**fields)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{CHAIN_ENV} does not hold a lower chain ({e}): {text[:200]!r}") from e

    @classmethod
    def from_env(cls) -> LowerChain:
        text = os.environ.get(CHAIN_ENV)
        if not text:
            raise ConfigError(f"{PROPOSER_CLASS} needs the lower chain in ${CHAIN_ENV} (pyramid serve sets it; "
                              "or export LowerChain(...).to_json() before starting vLLM)")
        return cls.from_json(text)


def build_lower(chain: LowerChain, vocab_size: int, *, regs: Registries | None = None) -> Proposer:
    """One copy of the lower chain as a proposer of greedy blocks: its model stages built anew
    (stages of one model directory share its weights), the policies between them, stopping at
    the end-of-sequence token of the chain's top stage. Every stage must agree with the
    target's vocabulary size ``vocab_size``."""
    regs = regs or registries()
    mode = None if chain.compile is None else ExecutionMode.parse(chain.compile)
    stages = [make_stage(s, regs=regs, vocab_size=vocab_size, device=chain.device, dtype=chain.dtype, compile=mode)
              for s in chain.stages]
    for spec, stage in zip(chain.stages, stages, strict=True):
        size = getattr(stage, "vocab_size", None)
        if size is not None and int(size) != vocab_size:
            raise ConfigError(f"stage {spec!r} has a vocabulary of {int(size)} tokens; vLLM's target has {vocab_size}")
    lookup = None if chain.lookup is None else make_stage(chain.lookup, regs=regs, vocab_size=vocab_size)
    if len(stages) == 1 and not isinstance(stages[0], Stage) and lookup is None:
        return stages[0]  # a model-free proposer (ngram) drafts by itself
    check_same_tokenizer(stages)
    eos = getattr(tokenizer_of(stages[-1]), "eos_token_id", None)
    stop = () if eos is None else (int(eos),)
    policies = [make_policy(p, regs=regs) for p in chain.policies]
    pipe = Pipeline(stages, policies, chain.block_lengths, SamplingConfig.greedy(), stop,
                    policy_names=[repr(p) for p in chain.policies])
    proposer = pipe.build()[0]
    if lookup is None:
        return proposer
    return LookupFirst(model_free(lookup), proposer, LookupStats(), torch.tensor(stop, dtype=torch.long))


def _key(context: np.ndarray, n: int) -> tuple[int, bytes]:
    """A row's identity across steps: its length and the tokens just before it (a request's
    context at one step is a prefix of its context at the next)."""
    return n, context[max(0, n - 8): n].tobytes()


def _extends(seen: np.ndarray, context: np.ndarray) -> bool:
    n = len(seen)
    return n <= len(context) and bool(np.array_equal(context[:n], seen))


@attrs.define(eq=False)
class Lane:
    """One copy of the lower chain, the context it last drafted after and the step it did."""

    proposer: Proposer
    seen: np.ndarray = attrs.field(factory=lambda: np.zeros(0, dtype=np.int64))
    used_at: int = -1


@attrs.define(eq=False)
class Lanes:
    """Lanes for the rows of vLLM's batch (see the module's docstring), at most ``capacity``."""

    make: Callable[[], Proposer]
    capacity: int
    lanes: list[Lane] = attrs.field(factory=list)
    by_row: dict[int, Lane] = attrs.field(factory=dict)
    step: int = 0
    switches: int = 0  # rows that did not find their own lane

    def assign(self, contexts: dict[int, np.ndarray]) -> dict[int, Lane]:
        """A lane for each row (``contexts``: row -> its tokens) this step. First every row whose
        context extends a lane's keeps that lane (its own request); the others take, in order:
        a lane idle since before the last step (its request has finished: the lane rolls back to
        the common prefix, e.g. the chat template, and reads the rest), a new lane while fewer
        than ``capacity``, the least recently used lane."""
        self.step += 1
        busy: set[int] = set()
        out: dict[int, Lane] = {}
        for row, context in contexts.items():
            own = self.by_row.get(row)
            if own is None or id(own) in busy or not _extends(own.seen, context):
                own = next((la for la in self.lanes if id(la) not in busy and _extends(la.seen, context)), None)
            if own is not None:
                out[row] = own
                busy.add(id(own))
        for row in contexts:
            if row in out:
                continue
            self.switches += 1
            free = sorted((la for la in self.lanes if id(la) not in busy), key=lambda la: la.used_at)
            if free and free[0].used_at < self.step - 1:
                lane = free[0]
            elif len(self.lanes) < self.capacity:
                lane = Lane(self.make())
                self.lanes.append(lane)
            elif free:
                lane = free[0]
            else:
                raise ConfigError(f"more rows in one step than the proposer's {self.capacity} lanes "
                                  "(raise max_lanes to vLLM's --max-num-seqs)")
            out[row] = lane
            busy.add(id(lane))
        for row, lane in out.items():
            lane.used_at = self.step
            self.by_row[row] = lane
        return out


class PyramidProposer:
    """vLLM's ``custom_class`` proposer running a pyramid lower chain (module docstring).

    ``PyramidProposer(vllm_config)`` is what vLLM calls; :meth:`for_chain` builds one without
    vLLM (tests, other engines)."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        model = vllm_config.model_config
        max_seqs = int(getattr(vllm_config.scheduler_config, "max_num_seqs", 0) or 0)
        chain = LowerChain.from_env()
        self._setup(chain, int(spec.num_speculative_tokens), int(model.get_vocab_size()), int(model.max_model_len),
                    max_seqs)

    @classmethod
    def for_chain(cls, chain: LowerChain, *, num_speculative_tokens: int, vocab_size: int, max_model_len: int,
                  max_num_seqs: int = 0, regs: Registries | None = None) -> PyramidProposer:
        self = cls.__new__(cls)
        self._setup(chain, num_speculative_tokens, vocab_size, max_model_len, max_num_seqs, regs)
        return self

    def _setup(self, chain: LowerChain, k: int, vocab_size: int, max_model_len: int, max_num_seqs: int,
               regs: Registries | None = None) -> None:
        if k < 1:
            raise ConfigError(f"num_speculative_tokens must be at least 1, got {k}")
        self.chain = chain
        self.k = k
        self.max_model_len = max_model_len
        capacity = min(chain.max_lanes, max_num_seqs) if max_num_seqs > 0 else chain.max_lanes
        first = build_lower(chain, vocab_size, regs=regs)  # errors surface when vLLM builds the proposer
        made = [first]

        def make() -> Proposer:
            return made.pop() if made else build_lower(chain, vocab_size, regs=regs)

        self.lanes = Lanes(make, max(1, capacity))
        self.planner = StepPlanner(k)  # learns with a fixed length too: its estimates are in stats()
        self.rng = Rng(0)
        self.calls = 0
        self.drafted = 0
        self.seconds = 0.0
        # (context length, its tail) -> (draft length given, the support bucket of a lookup's block or None)
        self.given: dict[tuple[int, bytes], tuple[int, int | None]] = {}
        # the lookup, asked for every row before the planner sizes the blocks (model-free: one
        # for all lanes, its tries and hits counted in its stats)
        self.looker = first if isinstance(first, LookupFirst) else None
        self.returned_at: float | None = None
        self.clock: Callable[[], float] = time.perf_counter
        # as read from vLLM's steps, not forgotten ("lookup blocks": those of them the lookup proposed)
        self.verdicts = {"blocks": 0, "lookup blocks": 0, "offered": 0, "accepted": 0}
        self.stats_path = os.environ.get(STATS_ENV) or None
        # [count, seconds]: lane drafts; the engine's steps (from one call to the next) by kind
        self.timing = {"lanes": [0, 0.0], "engine steps with drafts": [0, 0.0], "engine steps without": [0, 0.0]}
        self.drafted_last = False

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """Up to ``k`` draft tokens for each row of vLLM's batch: ``[]`` for a row that sampled
        nothing this step (a prefill chunk) or has no room left; the row's context is
        ``token_ids_cpu[i, :num_tokens_no_spec[i]]``. With a lookup, it is asked first for every
        row; then the planner gives each row a prefix of the lookup's block, a drafted block (all
        drafted rows the same length) or nothing (vLLM decodes that row plainly)."""
        t0 = self.clock()
        rows = len(sampled_token_ids)
        contexts = [np.asarray(token_ids_cpu[i, : int(num_tokens_no_spec[i])], dtype=np.int64) for i in range(rows)]
        decoding = [i for i in range(rows) if len(sampled_token_ids[i])]
        self._learn(contexts, decoding, rows, t0)
        rooms = {i: min(self.k, self.max_model_len - len(contexts[i]) - 1) for i in decoding}
        looked: dict[int, list[int]] = {}  # the lookup's block of each row where it found one
        if self.looker is not None:
            for i in decoding:
                if rooms[i] >= 1:
                    tokens = self.looker.look_tokens(contexts[i], rooms[i], self.rng)
                    if tokens:
                        looked[i] = tokens
        buckets = {i: support_bucket(support(contexts[i], tokens[0])) for i, tokens in looked.items()}
        plan = dict(zip(decoding, self.planner.plan(
            [Offer(max(rooms[i], 0), len(looked.get(i, ())), buckets.get(i, 0)) for i in decoding],
            fixed=not self.chain.adaptive), strict=True))
        out: list[list[int]] = [[] for _ in range(rows)]
        for i, (n, from_lookup) in plan.items():
            if from_lookup:
                out[i] = looked[i][:n]
        lanes = self.lanes.assign({i: contexts[i] for i, (n, from_lookup) in plan.items() if n and not from_lookup})
        timed, timed_tokens = 0.0, 0
        for i, lane in lanes.items():
            context = contexts[i]
            continuing = len(lane.seen) > 0 and _extends(lane.seen, context)
            t1 = self.clock()
            drafter = lane.proposer.drafter if isinstance(lane.proposer, LookupFirst) else lane.proposer
            block = drafter.propose(torch.from_numpy(context.copy()), plan[i][0], self.rng)
            lane.seen = context.copy()
            tokens = [int(t) for t in block.tokens.tolist()[: plan[i][0]]]
            spent = self.clock() - t1
            self.timing["lanes"][1] += spent
            if continuing:  # a lane that first reads a prompt would overstate the cost of drafting
                timed += spent
                timed_tokens += len(tokens)
            out[i] = tokens
        self.planner.record_draft(timed_tokens, timed)
        self.drafted += sum(len(d) for d in out)
        self.drafted_last = any(out)
        self.timing["lanes"][0] += len(lanes)
        self.given = {_key(contexts[i], len(contexts[i])):
                      (len(out[i]), buckets[i] if plan.get(i, (0, False))[1] else None) for i in range(rows)}
        self.calls += 1
        self.returned_at = self.clock()
        self.seconds += self.returned_at - t0
        if self.stats_path:
            tmp = f"{self.stats_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f)
            os.replace(tmp, self.stats_path)
        return out

    def _learn(self, contexts: list[np.ndarray], decoding: list[int], rows: int, now: float) -> None:
        """What vLLM's last step tells the planner: each returning row's verdict (its context grew
        by the accepted drafts and one token of the target's) and, when the step ran only the rows
        of the last call (no prompt was read in it), the step's seconds for its query tokens."""
        clean = len(decoding) == rows and rows > 0
        tokens, drafted = 0, False
        for i in decoding:
            n = len(contexts[i])
            given = next(((j, self.given[key]) for j in range(1, self.k + 2)
                          if n - j >= 0 and (key := _key(contexts[i], n - j)) in self.given), None)
            if given is None:
                clean = False  # a request that was not in the last call: its prompt was read this step
                continue
            grew, (offered, bucket) = given
            tokens += 1 + offered
            drafted = drafted or offered > 0
            if offered:
                accepted = min(max(grew - 1, 0), offered)
                self.planner.record_verdict(offered, accepted, bucket=bucket)  # each kind its own acceptance
                self.verdicts["lookup blocks"] += int(bucket is not None)
                self.verdicts["blocks"] += 1
                self.verdicts["offered"] += offered
                self.verdicts["accepted"] += accepted
        if self.returned_at is not None and clean:  # a step that read a prompt would say nothing of decoding
            kind = self.timing["engine steps with drafts" if self.drafted_last else "engine steps without"]
            kind[0] += 1
            kind[1] += now - self.returned_at
            self.planner.record_step(tokens, now - self.returned_at, drafted)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """vLLM's hook for proposers with their own model: the lower chain is built already."""

    def stats(self) -> dict[str, Any]:
        """Calls, draft tokens, seconds in the proposer, lanes made, rows that changed lane, the
        planner's estimates, the block lengths of the steps, the verdicts read from vLLM's steps
        and where the time went (the lanes; vLLM's decoding steps with and without drafts, each
        timed from one call to the next, steps that read a prompt left out)."""
        out: dict[str, Any] = {"calls": self.calls, "drafted": self.drafted, "seconds": round(self.seconds, 3),
                               "lanes": len(self.lanes.lanes), "switches": self.lanes.switches}
        cost = self.planner.step_cost()
        out |= {"alpha": round(self.planner.alpha, 4), "lookup_alpha": round(self.planner.lookup_alpha, 4),
                "lookup_first_token_by_support": {edge: round(self.planner.lookup_cumulative(b)[0], 4)
                                                  for b, edge in enumerate(SUPPORT_EDGES)},
                "chosen_lookup": dict(sorted(self.planner.chosen_lookup.items())),
                "draft_s_per_token": self.planner.draft_cost,
                "step_s": None if cost is None else dict(zip(("a0", "a1", "b"), (round(c, 6) for c in cost),
                                                             strict=True)),
                "chosen": dict(sorted(self.planner.chosen.items())), "verdicts": dict(self.verdicts),
                "timing": {k: [v[0], round(v[1], 4)] for k, v in self.timing.items()}}
        return out
