"""``tree``: multi-candidate (token-tree) drafting -- SpecInfer (arXiv 2305.09781) and Sequoia
(arXiv 2402.12374); [tree drafting](../../algorithms.md#tree-drafting).

``TreeProposer`` wraps the bottom model ``Stage`` and proposes a token tree instead of a chain.
The tree grows one depth at a time with ONE ``stage.score(context, partial_tree)`` call per depth,
which returns the proposer's rows at every frontier node at once. Each frontier node gets k
children drawn from its transformed row q:

- ``replacement=True`` (SpecInfer): k i.i.d. draws from q (duplicates possible, and harmless);
- ``replacement=False`` (Sequoia): sequential draws, each from q renormalised without the
  tokens drawn before it (at most as many children as q has support);
- greedy sampling (temperature 0): the k most probable tokens of the *untransformed*
  distribution, each a deterministic proposal whose row is one-hot at itself.

The tree's ``rows[i]`` is the row node i was drawn from (before any without-replacement removal,
which ``Block.without_replacement`` tells the policy to redo). ``exact`` verifies the tree
losslessly; the verifier's accepted path travels up as a chain. How many children a node gets
depends only on the depth, the budget and the proposer's rows -- never on the children drawn,
which keeps the multi-candidate rule exact.

Two shapes:

- ``branching=(4, 2, 1)``: k = branching[d] children for every node at depth d (0 = children of
  the context); depth = min(len(branching), n) where n is the block length asked for;
- ``budget=N`` (N > 0): at most N nodes, depth up to n. At each depth the frontier nodes are
  expanded most probable first (path probability under the proposer, the product of q along the
  path), each with up to branching[d] children (the last entry repeats below the schedule), until
  N nodes are spent; the rest of the frontier stays leaves.

- ``beam=K`` (K > 0; EAGLE-2, arXiv 2406.16858, "dynamic draft trees"): depth up to n, and at
  each depth only the K frontier nodes of highest path probability are expanded, each with
  branching[d] children, so the tree grows deep along what the proposer believes. With greedy
  sampling and ``budget=N`` the grown tree is then *reranked*: the N nodes of highest path
  probability are kept (a child's path probability never exceeds its parent's, so the kept set is
  a tree) and verified in one forward. Under sampling the rerank would keep a child because of
  its own draw, which breaks the multi-candidate rule, so there the budget caps the growth instead
  (as in budget mode): which nodes are expanded still depends only on their ancestors' and
  their siblings' draws, never on their own children.

Stop tokens are never expanded. ``tree`` is registered as a stage *wrapper* (hook
``register_wrappers``): the builder hands it the bottom model stage. Spec for the builder / CLI::

    build_pipeline([draft, qualifier, target], tree="tree:branching=4-2-1,replacement=false")
    pyramid generate --stage ... --tree tree:budget=16,branching=4
    pyramid generate --stage ... --tree tree:budget=16,beam=4,branching=4   # EAGLE-2 dynamic tree
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.devices import sync
from pyramid_core.hookspecs import hookimpl
from pyramid_core.protocols import HasContextLength, Stage
from pyramid_core.rng import Rng
from pyramid_core.types import Block, SamplingConfig, StageStats
from pyramid_core.validate import NonFiniteMode, check_nonfinite_mode, score_checked

__all__ = ["TreeProposer", "parse_branching"]


def parse_branching(value: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"4-2-1"`` / ``4`` / ``(4, 2, 1)`` -> ``(4, 2, 1)``, each entry >= 1. In the string form
    every entry is a plain integer between two dashes: ``"-1"`` or ``"4--2"`` are refused, not read
    as ``1`` and ``4-2``."""
    if isinstance(value, str):
        parts = value.replace(" ", "").split("-")
        if not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(f"branching {value!r} is not a list of integers >= 1 separated by '-' "
                             "(e.g. 4-2-1: 4 children per node at depth 0, 2 at depth 1, 1 below)")
        out = tuple(int(part) for part in parts)
    elif isinstance(value, int):
        out = (value,)
    else:
        out = tuple(int(v) for v in value)
    if not out or any(k < 1 for k in out):
        raise ValueError(f"branching must be one or more integers >= 1 (e.g. 4-2-1), got {value!r}")
    return out


def _long(value: Tensor | Sequence[int]) -> Tensor:
    return torch.as_tensor(value, dtype=torch.long).flatten().cpu()


def _nonneg(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0 (0 = use the branching schedule), got {value}")


@attrs.define(eq=False)
class TreeProposer:
    """Proposes a token tree from a model ``Stage`` (module docstring).

    stage:       the wrapped model stage (a ``TableModel``, an ``HFStage``, ...)
    branching:   children per node at each depth, ``(4, 2, 1)`` or ``"4-2-1"``
    replacement: i.i.d. children (SpecInfer) or drawn without replacement (Sequoia)
    budget:      > 0: at most this many nodes, most probable frontier nodes expanded first
    beam:        > 0: only this many frontier nodes expanded per depth (EAGLE-2 dynamic tree;
                 reranked to ``budget`` nodes under greedy sampling)
    sampling:    the pipeline's sampling transform (``build_pipeline(tree=...)`` passes it; a
                 different one stays lossless, only less efficient)
    stop_ids:    tokens that are never expanded (``build_pipeline`` passes the pipeline's)
    on_nonfinite: ``"raise"`` / ``"warn"`` for NaN or +inf logits of the wrapped stage (the
                 pipeline's setting, passed by the builder; ``validate.score_checked``)

    ``stats`` counts this proposer's forwards (one per depth); ``reset()`` clears them and the
    stage's cache (the pipeline calls it before each generation)."""

    stage: Stage
    branching: tuple[int, ...] = attrs.field(default=(4, 2, 1), converter=parse_branching)
    replacement: bool = True
    budget: int = attrs.field(default=0, validator=_nonneg)
    beam: int = attrs.field(default=0, validator=_nonneg, kw_only=True)
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    stop_ids: Tensor = attrs.field(factory=lambda: torch.empty(0, dtype=torch.long), converter=_long)
    on_nonfinite: NonFiniteMode = attrs.field(default="raise", converter=check_nonfinite_mode)
    stats: StageStats = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.stats = StageStats(self.name)

    @property
    def name(self) -> str:
        shape = (f"budget={self.budget}," if self.budget else "") + (f"beam={self.beam}," if self.beam else "")
        how = "top-k" if self.sampling.is_greedy else ("iid" if self.replacement else "no-repl")
        return f"tree[{shape}{'-'.join(map(str, self.branching))},{how}]({self.stage.name})"

    @property
    def vocab_size(self) -> int:
        return int(self.stage.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def context_length(self) -> int | None:
        """The wrapped stage's (``protocols.HasContextLength``), if it declares one."""
        return self.stage.context_length if isinstance(self.stage, HasContextLength) else None

    def reset(self) -> None:
        self.stage.reset()
        self.stats = StageStats(self.name)

    def _width(self, depth: int) -> int:
        return self.branching[min(depth, len(self.branching) - 1)]

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        """A tree of depth <= ``n`` continuing ``context``, flattened level by level; children of
        one node are consecutive and in draw order.

        The stage scores only the nodes that are expanded (the frontier of each depth and their
        ancestors, themselves expanded before): a node that stays a leaf -- outside the beam, a
        stop token, the last depth -- is never fed to it. Its logits would be computed and never
        read, and with a beam most nodes are such leaves (EAGLE-2's 10 x 10 children per depth
        expand 10). The rows are assembled once, after the shape is final."""
        ranked = bool(self.budget or self.beam)  # path probabilities decide the shape
        max_depth = n if ranked else min(n, len(self.branching))
        greedy = self.sampling.is_greedy
        rerank = bool(self.beam and self.budget and greedy)  # grow freely, keep the best `budget`
        device = context.device
        stop = set(self.stop_ids.tolist())
        tokens: list[int] = []
        parents: list[int] = []
        parts: list[Tensor] = []  # sampling: the rows of each depth's new nodes
        logpath: list[float] = []  # log path probability per node (budget and beam modes)
        frontier = [-1]  # nodes to expand next (-1 = the context)
        fed: dict[int, int] = {-1: -1}  # node -> its index in the subtree fed to the stage
        fed_tokens: list[int] = []
        fed_parents: list[int] = []
        for depth in range(max_depth):
            if self.beam and depth:  # the `beam` most probable frontier nodes, kept in tree order
                frontier = sorted(sorted(frontier, key=lambda v: -logpath[v])[: self.beam])
            capped = self.budget and not rerank
            room = self.budget - len(tokens) if capped else len(frontier) * self._width(depth)
            if not frontier or room <= 0:
                break
            t0 = time.perf_counter()
            if depth == 0:
                logits = score_checked(self.stage, context, None, name=self.stage.name, mode=self.on_nonfinite)
            else:  # the subtree of expanded nodes grows by this frontier (their parents are in it)
                first_fed = len(fed_tokens)
                for v in frontier:
                    fed[v] = len(fed_tokens)
                    fed_tokens.append(tokens[v])
                    fed_parents.append(fed[parents[v]])
                m = len(fed_tokens)
                partial = Block(torch.tensor(fed_tokens, device=device),
                                torch.zeros(1, self.vocab_size, device=device).expand(m, -1),  # never read
                                torch.tensor(fed_parents, device=device))
                logits = score_checked(self.stage, context, partial, name=self.stage.name,
                                       mode=self.on_nonfinite)[first_fed + 1: m + 1]
            logits = logits.float()  # the frontier's rows: Float[Tensor, "m vocab"]
            q = self.sampling.transform(logits)
            scored = len(frontier)
            # children per frontier node: a function of depth, budget and q only (exactness)
            support = ((logits > -torch.inf) if greedy else (q > 0)).sum(-1).tolist()
            k = [min(self._width(depth), int(s)) for s in support]
            base = [logpath[v] for v in frontier] if depth and ranked else [0.0] * len(frontier)
            if capped:  # most probable frontier nodes first, until the budget is spent
                for i in sorted(range(len(frontier)), key=lambda i: -base[i]):
                    k[i] = min(k[i], room)
                    room -= k[i]
            width = max(k)
            if width == 0:  # nothing left to draw: the forward still counts
                self.stats.record(time.perf_counter() - t0, scored)
                break
            if greedy:  # top-k of the untransformed distribution, deterministic proposals
                child = logits.topk(width, dim=-1).indices
            elif self.replacement:
                child = rng.categorical_rows(q.repeat_interleave(width, 0)).view(-1, width)
            else:  # sequential draws without replacement
                left = q.clone()
                draws = []
                for _ in range(width):
                    x = rng.categorical_rows(left)
                    draws.append(x)
                    left.scatter_(1, x.unsqueeze(1), 0.0)
                child = torch.stack(draws, 1)
            slots = [i for i, ki in enumerate(k) for _ in range(ki)]
            new = [x for row, ki in zip(child.tolist(), k, strict=True) for x in row[:ki]]
            first = len(tokens)
            tokens += new
            parents += [frontier[i] for i in slots]
            slot_index = torch.tensor(slots, device=device)
            if not greedy:
                parts.append(q[slot_index])
            if ranked:
                probs = torch.softmax(logits, -1) if greedy else q
                step = probs[slot_index, torch.tensor(new, device=device)].log().tolist()
                logpath += [base[i] + lp for i, lp in zip(slots, step, strict=True)]
            frontier = [first + j for j, x in enumerate(new) if x not in stop]
            sync(device)
            self.stats.record(time.perf_counter() - t0, scored)
        if rerank and len(tokens) > self.budget:  # EAGLE-2: the `budget` most probable nodes
            keep = sorted(sorted(range(len(tokens)), key=lambda i: (-logpath[i], i))[: self.budget])
            where = {old: new for new, old in enumerate(keep)}
            tokens = [tokens[i] for i in keep]
            parents = [-1 if parents[i] < 0 else where[parents[i]] for i in keep]
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        if greedy:  # each node a deterministic proposal: its row is one-hot at itself
            rows = torch.nn.functional.one_hot(ids, self.vocab_size).float()
        elif parts:  # (sampling never reranks)
            rows = torch.cat(parts).float()
        else:
            rows = torch.empty(0, self.vocab_size, device=device)
        return Block(ids, rows, torch.tensor(parents, dtype=torch.long, device=device),
                     without_replacement=not self.replacement and not greedy)


def tree_wrapper(
    stage: Stage,
    branching: str = "4-2-1",
    replacement: bool = True,
    budget: int = 0,
    beam: int = 0,
    *,
    sampling: SamplingConfig,
    stop_ids: Sequence[int] = (),
    on_nonfinite: str = "raise",
) -> TreeProposer:
    """Factory behind the ``tree`` wrapper: wraps the bottom model ``stage`` given by the builder."""
    if not isinstance(stage, Stage):
        raise ValueError(f"the tree wrapper wraps a model Stage (with score()), got {stage!r}")
    return TreeProposer(stage, branching, replacement, budget, sampling, _long(list(stop_ids)),
                        check_nonfinite_mode(on_nonfinite), beam=beam)


@hookimpl
def register_wrappers(register: Any) -> None:
    register(
        "tree",
        tree_wrapper,
        "token-tree drafting around the bottom model stage (SpecInfer / Sequoia); params branching=4-2-1, "
        "replacement=true|false, budget=N (0 = full schedule), beam=K (EAGLE-2 dynamic tree: K nodes expanded per depth, "
        "reranked to the budget under greedy decoding); use build_pipeline(tree=NAME[:k=v,...]) / --tree NAME[:k=v,...]",
    )
