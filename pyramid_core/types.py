"""Value types that flow between stages.

Shapes are written in einops style: ``rows: Float[Tensor, "n vocab"]``.
All probability rows are *transformed* rows (temperature, top-k, top-p already applied),
see [notation](../../algorithms.md#notation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from attrs import field, frozen
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.tree import TokenTree

__all__ = ["Block", "Verdict", "SamplingConfig", "GenerationOptions", "BoundaryStats", "StageStats", "LookupStats", "GREEDY_BELOW"]

#: Temperatures below this are greedy (docs/algorithms.md#greedy-mode): there softmax(logits / T)
#: is one-hot at the argmax in float arithmetic for any two logits that differ by more than 1e-27,
#: and logits / T would overflow float32 once |logit| * 1e30 passes 3.4e38 (tiny temperatures
#: used to crash on NaN rows).
GREEDY_BELOW = 1e-30


def _check_1d_long(instance: Any, attribute: attrs.Attribute[Any], value: Tensor) -> None:
    if value.dim() != 1 or value.dtype != torch.long:
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be a 1-D torch.long tensor, "
            f"got shape {tuple(value.shape)} dtype {value.dtype}"
        )


@frozen(eq=False)
class Block:
    """Tokens proposed to the stage above, with the proposer's probability rows.

    tokens:  Long[Tensor, "n"]        the proposed tokens
    rows:    Float[Tensor, "n vocab"] row j is the proposer's distribution that token j was
                                      drawn from (for a chain: P(. | context, tokens[:j]))
    parents: Long[Tensor, "n"] | None for a token tree, the index of each node's parent
                                      (-1 for children of the context); ``None`` means a chain,
                                      i.e. parents == [-1, 0, 1, ..., n-2]. Nodes are flattened
                                      so that parents precede children, and the children of one
                                      node appear in the order they were drawn (and must be
                                      verified in that order).
    without_replacement:              how the children of a tree node were drawn from their
                                      rows: ``False`` (default, SpecInfer) -- each child
                                      independently from its own row; ``True`` (Sequoia) --
                                      sequentially, child i from its row renormalised without
                                      the tokens of children 1..i-1. Meaningless for chains.
    tree:    TokenTree | None         the shape of ``parents`` (depths, children, paths, ancestor
                                      mask), validated and computed once at construction;
                                      ``None`` for a chain
    """

    tokens: Tensor = field(validator=_check_1d_long)
    rows: Tensor
    parents: Tensor | None = None
    without_replacement: bool = False
    tree: TokenTree | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.rows.dim() != 2 or self.rows.shape[0] != n:
            raise ValueError(
                f"Block.rows must have shape (n_tokens={n}, vocab), got {tuple(self.rows.shape)}"
            )
        if self.parents is not None:
            if self.parents.shape != self.tokens.shape:
                raise ValueError(
                    f"Block.parents must have shape ({n},), got {tuple(self.parents.shape)}"
                )
            object.__setattr__(self, "tree", TokenTree(self.parents, name="Block.parents"))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    @property
    def depth(self) -> int:
        """Length of the longest root-to-node path (``len(self)`` for a chain)."""
        return len(self) if self.tree is None else self.tree.depth

    @classmethod
    def empty(cls, vocab: int, device: torch.device | str = "cpu") -> Block:
        return cls(
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, vocab, device=device),
        )

    @classmethod
    def concat(cls, blocks: list[Block]) -> Block:
        """Join chain blocks end to end (all on the device of the first)."""
        device = blocks[0].tokens.device
        return cls(
            torch.cat([b.tokens.to(device) for b in blocks]),
            torch.cat([b.rows.to(device) for b in blocks]),
        )

    def head(self, n: int) -> Block:
        """The first ``n`` tokens of a chain block."""
        return Block(self.tokens[:n], self.rows[:n])

    def graft(self, chain: Block, *, share: bool) -> Block:
        """This block (a chain or a tree) with the chain block ``chain`` grafted in as one more
        path from the context, so that one forward verifies both
        ([lookup graft](../../algorithms.md#lookup-graft)). Every node keeps the row it was drawn from.

        - ``share=True``: ``chain`` follows this block's nodes as far as their tokens match
          (``TokenTree.follow``); only the rest is added, below the last node matched. For
          deterministic proposals only (greedy): whether a node is shared depends on drawn tokens.
        - ``share=False``: ``chain`` is a path of its own, placed first (the context's first
          child). Multi-candidate rejection sampling stays exact when ``chain`` was drawn
          independently of this block's tokens; refused for a tree drawn without replacement,
          whose rows assume no sibling but its own.
        """
        if chain.tree is not None:
            raise ValueError("Block.graft grafts a chain block, got a token tree")
        if not len(chain):
            return self
        if not len(self):
            return chain
        tree = self.tree or TokenTree.chain(len(self))
        device, dtype = self.tokens.device, self.rows.dtype
        if share:
            path = tree.follow(self.tokens, chain.tokens)
            rest = len(path)
            if rest == len(chain):
                return self
            at = path[-1] if path else -1
            start = len(self)
            parents = [*tree.parents, at, *range(start, start + len(chain) - rest - 1)]
            tokens = torch.cat([self.tokens, chain.tokens[rest:].to(device)])
            rows = torch.cat([self.rows, chain.rows[rest:].to(device, dtype)])
        else:
            if self.without_replacement:
                raise ValueError("Block.graft(share=False): this tree's children were drawn without replacement "
                                 "(Sequoia), so no sibling can be added; draw it with replacement")
            m = len(chain)
            parents = [*range(-1, m - 1), *(p + m if p >= 0 else -1 for p in tree.parents)]
            tokens = torch.cat([chain.tokens.to(device), self.tokens])
            rows = torch.cat([chain.rows.to(device, dtype), self.rows])
        return Block(tokens, rows, torch.tensor(parents, dtype=torch.long, device=device), self.without_replacement)


@frozen(eq=False)
class Verdict:
    """What an acceptance policy decided about one block.

    accepted: indices (into the block) of the accepted tokens, in order. For a chain this is
              ``0 .. n_accepted-1``; for a tree it is the accepted root-to-leaf path.
    token:    the token the verifier emits after the accepted ones: the correction drawn at the
              first rejection, or the bonus token when everything was accepted.
    row:      the verifier's *full* distribution at the emitted token's position (the row that
              travels up with it, [trap 1](../../algorithms.md#the-two-traps)), not the
              residual it may have been drawn from.
    """

    accepted: tuple[int, ...]
    token: int
    row: Tensor

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)


def _nonneg_float(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"SamplingConfig.{attribute.name} must be a finite number >= 0, got {value!r} (0 = greedy)")


def _top_p_range(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise ConfigError(f"SamplingConfig.top_p must be in (0, 1], got {value!r} (1 = off)")


def _nonneg_int(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ConfigError(f"SamplingConfig.{attribute.name} must be >= 0 (0 disables it), got {value!r}")


#: Settings of a Hugging Face ``GenerationConfig`` that pyramid does not apply, with the values
#: that leave the output unchanged (``None`` and empty collections always do).
UNSUPPORTED_GENERATION: dict[str, tuple[object, ...]] = {
    "num_beams": (1,), "num_beam_groups": (1,), "num_return_sequences": (1,), "penalty_alpha": (0.0,),
    "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,), "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,), "min_length": (0,), "min_new_tokens": (0,), "min_p": (0.0,),
    "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "top_h": (), "diversity_penalty": (0.0,),
    "bad_words_ids": (), "force_words_ids": (), "constraints": (), "suppress_tokens": (),
    "begin_suppress_tokens": (), "sequence_bias": (), "forced_bos_token_id": (), "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (), "guidance_scale": (1.0,), "stop_strings": (), "max_time": (),
    "dola_layers": (), "watermarking_config": (), "token_healing": (False,),
}


def _check_generation_config(gc: object) -> None:
    for name, neutral in UNSUPPORTED_GENERATION.items():
        value = getattr(gc, name, None)
        if value is None or value in neutral or (isinstance(value, (str, list, tuple, dict)) and not value):
            continue
        fix = f"set it to {neutral[0]!r}" if neutral else "unset it"
        raise ConfigError(f"generation config sets {name}={value!r}, which pyramid does not apply (it would change "
                          f"the output); {fix}")


@frozen
class SamplingConfig:
    """The sampling transform, applied identically at every stage.

    temperature 0 means greedy: every row is one-hot at its argmax (first index on ties, as
    ``torch.argmax`` and Hugging Face greedy decoding do). So does any temperature below
    ``GREEDY_BELOW`` (1e-30), the T -> 0 limit reached in float arithmetic.
    """

    temperature: float = field(default=1.0, converter=float, validator=_nonneg_float)
    top_k: int = field(default=0, converter=int, validator=_nonneg_int)
    top_p: float = field(default=1.0, converter=float, validator=_top_p_range)

    @classmethod
    def greedy(cls) -> SamplingConfig:
        return cls(temperature=0.0)

    @classmethod
    def from_generation_config(cls, gc: object) -> SamplingConfig:
        """The transform a Hugging Face ``GenerationConfig`` (or any object with its attributes)
        samples with: ``do_sample`` unset or false is greedy; otherwise ``temperature``, ``top_k``
        and ``top_p``, unset ones at Hugging Face's defaults (1.0, 50, 1.0). A setting that would
        change the output and is not applied (``repetition_penalty``, ``num_beams``, ...) is a
        ``ConfigError`` naming it."""
        _check_generation_config(gc)
        if not getattr(gc, "do_sample", None):
            return cls.greedy()
        temperature, top_k, top_p = (getattr(gc, name, None) for name in ("temperature", "top_k", "top_p"))
        return cls(1.0 if temperature is None else temperature, 50 if top_k is None else top_k,
                   1.0 if top_p is None else top_p)

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 or below ``GREEDY_BELOW``: every stage's rows are one-hot."""
        return self.temperature < GREEDY_BELOW

    def transform(self, logits: Tensor) -> Tensor:
        """Float[Tensor, "n vocab"] logits -> Float[Tensor, "n vocab"] probabilities (float32, or
        float64 for float64 logits)."""
        if logits.dtype != torch.float64:
            logits = logits.float()
        if self.is_greedy:
            out = torch.zeros_like(logits)
            return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep a token while the mass strictly before it is < top_p (always keeps the first)
            drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs


def _eos_ids(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    ids = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"generation config eos_token_id must be a token id or a list of them, got {value!r}")
    return ids


@frozen
class GenerationOptions:
    """What a Hugging Face ``GenerationConfig`` asks of a generation, in pyramid's terms.

    sampling:       ``SamplingConfig.from_generation_config(gc)`` (unsupported settings refused)
    max_new_tokens: its ``max_new_tokens``; ``None`` when unset (``max_length``, which counts
                    the prompt, is not read)
    stop_ids:       its ``eos_token_id`` (an id or a list of ids); ``None`` when unset, which a
                    pipeline reads as the target tokenizer's EOS

    Use: ``build_pipeline(stages, sampling=o.sampling, stop_ids=o.stop_ids)``, then
    ``pipe.generate(prompt, o.max_new_tokens or 256)``.
    """

    sampling: SamplingConfig = field(factory=SamplingConfig)
    max_new_tokens: int | None = None
    stop_ids: tuple[int, ...] | None = field(default=None, converter=_eos_ids)

    @classmethod
    def from_generation_config(cls, gc: object) -> GenerationOptions:
        """Sampling, max_new_tokens and stop ids of ``gc`` (duck-typed: any object with a
        ``GenerationConfig``'s attributes)."""
        sampling = SamplingConfig.from_generation_config(gc)
        max_new = getattr(gc, "max_new_tokens", None)
        if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0):
            raise ConfigError(f"generation config max_new_tokens must be an integer >= 0, got {max_new!r}")
        return cls(sampling, max_new, getattr(gc, "eos_token_id", None))


@attrs.define
class BoundaryStats:
    """Counters for one stage boundary k -> k+1 (mutable accumulator, not a value type).

    Two acceptance rates, each named for what it is:

    - ``acceptance_per_try`` = accepted / tries. A round that accepts a of m proposed tokens
      made a + 1 tries if it rejected one (a < m) and a tries if it accepted all: the tokens
      after the first rejection are never tried. This is the per-token acceptance alpha of
      the [latency model](../../algorithms.md#latency-model), comparable to 1 - TV(p, q) of an
      exact pair (for i.i.d. acceptances it is alpha's maximum-likelihood estimate).
    - ``accepted_per_proposed`` = accepted / proposed, the share of drafted tokens kept. It is
      below alpha whenever blocks are longer than 1 (untried tokens count as proposed).

    At a tree boundary a round's "proposed" length is the tree's depth and its "accepted" length
    the accepted depth, so rates compare with chains of the same length: a try is one *depth*
    (all the siblings at one node together), and ``acceptance_per_try`` is the chance that some
    child at a reached node is accepted -- above a chain's alpha by what the extra candidates
    buy. ``tree_nodes`` counts every node, and ``accepted / tree_nodes`` is the share of drafted
    nodes that were used."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    # accepted tokens plus one per round that rejected one (see the class docstring)
    tries: int = 0
    # accepted_hist[i] = number of verification rounds that accepted exactly i tokens
    accepted_hist: list[int] = attrs.field(factory=list)
    # accepted_at[j] = how often the token at block position j was accepted (per position)
    accepted_at: list[int] = attrs.field(factory=list)
    proposed_at: list[int] = attrs.field(factory=list)
    # token trees (see ``record_tree``): rounds that verified a tree, and their nodes in total
    tree_rounds: int = 0
    tree_nodes: int = 0

    def record(self, n_proposed: int, n_accepted: int) -> None:
        self.rounds += 1
        self.proposed += n_proposed
        self.accepted += n_accepted
        self.tries += n_accepted + (1 if n_accepted < n_proposed else 0)
        for counts, upto in ((self.accepted_hist, n_accepted + 1), (self.proposed_at, n_proposed)):
            if len(counts) < upto:
                counts.extend([0] * (upto - len(counts)))
        self.accepted_hist[n_accepted] += 1
        for j in range(n_proposed):
            self.proposed_at[j] += 1
        if len(self.accepted_at) < n_accepted:
            self.accepted_at.extend([0] * (n_accepted - len(self.accepted_at)))
        for j in range(n_accepted):
            self.accepted_at[j] += 1

    @classmethod
    def pool(cls, parts: Sequence[BoundaryStats]) -> BoundaryStats:
        """The counters of several runs at one boundary, summed (histograms position-wise)."""
        out = cls()
        for b in parts:
            out.proposed += b.proposed
            out.accepted += b.accepted
            out.rounds += b.rounds
            out.tries += b.tries
            out.tree_rounds += b.tree_rounds
            out.tree_nodes += b.tree_nodes
            for mine, theirs in ((out.accepted_hist, b.accepted_hist), (out.accepted_at, b.accepted_at),
                                 (out.proposed_at, b.proposed_at)):
                mine.extend([0] * (len(theirs) - len(mine)))
                for j, c in enumerate(theirs):
                    mine[j] += c
        return out

    def record_tree(self, n_nodes: int, depth: int, n_accepted: int) -> None:
        """A tree round counts as a chain of its depth (so ``accepted_hist`` and ``accepted_at``
        are per accepted *depth*) and adds its node count to ``tree_nodes``."""
        self.record(depth, n_accepted)
        self.tree_rounds += 1
        self.tree_nodes += n_nodes

    @property
    def accepted_per_proposed(self) -> float:
        """accepted / proposed: the share of drafted tokens kept (class docstring)."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """``accepted_per_proposed`` under its old name (kept for existing callers)."""
        return self.accepted_per_proposed

    @property
    def acceptance_per_try(self) -> float:
        """accepted / tries: the per-token acceptance alpha, comparable to 1 - TV (class docstring)."""
        return self.accepted / self.tries if self.tries else float("nan")

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.rounds if self.rounds else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "proposed": self.proposed,
            "accepted": self.accepted,
            "rounds": self.rounds,
            "tries": self.tries,
            "acceptance_per_try": self.acceptance_per_try,
            "accepted_per_proposed": self.accepted_per_proposed,
            "acceptance_rate": self.acceptance_rate,  # = accepted_per_proposed (the old key)
            "mean_accepted_length": self.mean_accepted,
            "accepted_length_hist": list(self.accepted_hist),
            "acceptance_by_position": [
                a / p if p else float("nan")
                for a, p in zip(self.accepted_at + [0] * (len(self.proposed_at) - len(self.accepted_at)), self.proposed_at, strict=False)
            ],
            # trees: proposed/accepted above count depths; how many of the nodes were used
            "tree_rounds": self.tree_rounds,
            "tree_nodes": self.tree_nodes,
            "mean_tree_nodes": self.tree_nodes / self.tree_rounds if self.tree_rounds else float("nan"),
            "node_efficiency": self.accepted / self.tree_nodes if self.tree_nodes else float("nan"),
        }


@attrs.define
class LookupStats:
    """Counters of a pipeline's lookup (``Pipeline.lookup``, mutable accumulator): rounds of the
    bottom boundary it was asked for a block (``tries``), rounds it proposed one (``hits``; the
    other rounds the bottom stage drafted) and the tokens it proposed."""

    tries: int = 0
    hits: int = 0
    proposed: int = 0

    def record(self, n_proposed: int) -> None:
        self.tries += 1
        if n_proposed:
            self.hits += 1
            self.proposed += n_proposed

    @classmethod
    def pool(cls, parts: Sequence[LookupStats]) -> LookupStats:
        return cls(sum(s.tries for s in parts), sum(s.hits for s in parts), sum(s.proposed for s in parts))

    @property
    def hit_rate(self) -> float:
        """hits / tries: the share of rounds whose block came from the lookup."""
        return self.hits / self.tries if self.tries else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"tries": self.tries, "hits": self.hits, "proposed": self.proposed, "hit_rate": self.hit_rate}


@attrs.define
class StageStats:
    """Forward counters and wall time of one stage (mutable accumulator)."""

    name: str
    forwards: int = 0
    positions: int = 0
    forward_s: float = 0.0
    # the first forward of a generation (it feeds the prompt: the prefill), included in forward_s
    prefill_s: float = 0.0

    def record(self, seconds: float, positions: int) -> None:
        """One forward that took ``seconds`` and returned rows for ``positions`` positions."""
        if self.forwards == 0:
            self.prefill_s += seconds
        self.forwards += 1
        self.positions += positions
        self.forward_s += seconds

    @classmethod
    def pool(cls, parts: Sequence[StageStats]) -> StageStats:
        """The counters of one stage over several runs, summed (named as the first)."""
        return cls(parts[0].name, sum(s.forwards for s in parts), sum(s.positions for s in parts),
                   sum(s.forward_s for s in parts), sum(s.prefill_s for s in parts))

    @property
    def seconds_per_forward(self) -> float:
        """Mean seconds per forward (0.0 without forwards: a model-free proposer's time is
        framework overhead)."""
        return self.forward_s / self.forwards if self.forwards else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "forwards": self.forwards,
            "positions": self.positions,
            "forward_s": self.forward_s,
            "prefill_s": self.prefill_s,
        }
