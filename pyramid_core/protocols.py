"""The three protocols a pipeline is composed of, plus the model-adapter protocol ``Stage``.

A pipeline of N stages M_1 .. M_N (smallest first) is built from
- one ``Proposer`` at the bottom (M_1: a model sampled autoregressively, or a model-free
  proposer such as ``ngram``),
- one ``Verifier`` per stage above it (M_2 .. M_N),
- one ``AcceptancePolicy`` per boundary k -> k+1.

Row convention shared by every protocol: for a block of n proposed tokens, a verifier returns
n+1 rows; row 0 is the distribution after the context, row i+1 the distribution after node i
(after token i of a chain, or after the root-to-node-i path of a tree). So the verifier's row
for proposed node i is row ``parents[i] + 1`` -- for a chain simply row i.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from pyramid_core.rng import Rng
from pyramid_core.types import Block, StageStats, Verdict

__all__ = [
    "Stage",
    "Proposer",
    "Verifier",
    "AcceptancePolicy",
    "Divergence",
    "Resettable",
    "HasTokenizer",
    "HasVocabulary",
    "HasContextLength",
    "CountsForwards",
    "VerifiesTrees",
    "WrapsStage",
    "FeatureSource",
    "FeatureReader",
    "FEATURE_FROM",
    "tokenizer_of",
]


@runtime_checkable
class Stage(Protocol):
    """A model adapter: anything that yields next-token logits for a context.

    Implementations keep whatever cache they like (e.g. a KV cache) and must make ``score`` correct
    for *any* context: a context that shares only a prefix with the previous call means "roll back
    to that prefix" ([rollback](../../algorithms.md#the-exact-n-stage-chain): every stage's cache
    rolls back to the accepted prefix).
    """

    name: str
    vocab_size: int
    device: torch.device

    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        """Logits ``Float[Tensor, "n+1 vocab"]`` for ``context`` (``Long[Tensor, "L"]``) followed
        by the block's n tokens (row convention above). ``block=None`` gives the single row after
        ``context``. Only the first ``vocab_size`` columns are returned."""
        ...

    def reset(self) -> None:
        """Forget every cache (called before each new generation)."""
        ...


@runtime_checkable
class Proposer(Protocol):
    """Proposes tokens continuing a context, with the distribution each was drawn from."""

    def propose(self, context: Tensor, n: int, rng: Rng) -> Block:
        """Up to ``n`` tokens (fewer only if a stop token ends the block, or the proposer has
        nothing to propose) continuing ``context``. ``rows[j]`` must be the exact distribution token
        j was drawn from given everything before it -- [trap
        1](../../algorithms.md#the-two-traps)."""
        ...


@runtime_checkable
class Verifier(Protocol):
    """Scores a proposed block: the verifier's transformed rows (row convention above)."""

    def verify(self, context: Tensor, block: Block) -> Tensor:
        """``Float[Tensor, "n+1 vocab"]`` probabilities after the sampling transform."""
        ...


@runtime_checkable
class AcceptancePolicy(Protocol):
    """Decides which proposed tokens a verifier accepts and what it emits next.

    ``q = block.rows`` are the proposer's rows, ``p`` the verifier's rows (n+1 of them). A policy
    is a pure function of these and the random stream, so it can be tested on explicit vectors.
    """

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        ...


@runtime_checkable
class Divergence(Protocol):
    """A divergence for divergence-threshold acceptance: verifier rows ``p`` and proposer rows
    ``q`` (``Float[Tensor, "n vocab"]``) to ``Float[Tensor, "n"]``, in nats where logs appear."""

    def __call__(self, p: Tensor, q: Tensor) -> Tensor:
        ...


# --- optional capabilities, each checked once when a pipeline is built (never per call) -------


@runtime_checkable
class Resettable(Protocol):
    """Holds state across calls (a KV cache, counters) that a new generation must forget."""

    def reset(self) -> None:
        ...


@runtime_checkable
class HasVocabulary(Protocol):
    """Declares its vocabulary size (model stages always do; a proposer may, e.g. ``ngram``)."""

    vocab_size: int


@runtime_checkable
class HasContextLength(Protocol):
    """Declares the longest context it can score, in tokens (``None``: no known limit); e.g. a
    Hugging Face model's ``max_position_embeddings``. ``Pipeline.generate`` refuses up front a
    prompt + max_new_tokens that would not fit."""

    @property
    def context_length(self) -> int | None:
        ...


@runtime_checkable
class VerifiesTrees(Protocol):
    """An acceptance policy that says whether it can verify token trees (``Block.parents``);
    the builder refuses a tree drafted into a policy that declares ``False``. A policy that
    declares nothing is handed whatever the stage below proposes."""

    @property
    def verifies_trees(self) -> bool:
        ...


@runtime_checkable
class HasTokenizer(Protocol):
    """Carries a Hugging Face-style tokenizer (``get_vocab()``, ``eos_token_id``, ``decode``,
    ``apply_chat_template``); ``None`` means the stage has none."""

    tokenizer: Any


@runtime_checkable
class CountsForwards(Protocol):
    """A model-backed proposer (e.g. a token-tree wrapper) that counts its own forwards; the
    pipeline reports these counters as the bottom stage's."""

    stats: StageStats


@runtime_checkable
class WrapsStage(Protocol):
    """A proposer built around a model stage (e.g. the token-tree wrapper): ``stage`` is the
    wrapped one, so capabilities of the stage (a ``FeatureReader``) are found through it."""

    stage: Stage


# --- the feature channel (docs/algorithms.md#feature-level-drafts) -------------------------------

FEATURE_FROM = ("next", "target")
"""Where a ``FeatureReader`` reads from: the stage it hands its blocks to, or the target."""


@runtime_checkable
class FeatureSource(Protocol):
    """A stage that exposes the hidden states it computed in the forwards it already ran.

    The feature of position t is the hidden state after consuming token t (what the LM head
    reads to predict token t+1); layer ``-1`` is the final-normed state, ``i >= 0`` the output
    of decoder layer i. Features are kept and rolled back with the stage's cache."""

    name: str
    feature_size: int  # the width of one layer's feature (the hidden size)

    def enable_features(self, layers: tuple[int, ...]) -> None:
        """Keep the features of ``layers`` from now on (``()``: keep none). A layer the stage
        does not have is a ``ValueError`` naming the valid ones."""
        ...

    def features(self, context: Tensor, start: int = 0, layers: tuple[int, ...] | None = None) -> Tensor:
        """``Float[Tensor, "m-start len(layers)*feature_size"]``: the features of ``layers``
        (enabled ones, in this order; ``None``: all enabled) at positions ``start .. m-1`` of
        ``context``, where m is the length of the longest prefix of ``context`` this stage has
        consumed (its cache holds exactly these tokens, a cached token tree's path included).
        Features of tokens not in ``context`` are never returned."""
        ...


@runtime_checkable
class FeatureReader(Protocol):
    """A stage that conditions on the features of a stage above it (an EAGLE-style draft).

    ``feature_from`` is one of ``FEATURE_FROM``; the pipeline checks once, when it is built,
    that the stage named there is a ``FeatureSource`` with ``feature_layers``, and attaches it
    before every generation."""

    feature_layers: tuple[int, ...]
    feature_from: str
    feature_width: int  # len(feature_layers) x the source's feature_size


    def attach(self, source: FeatureSource) -> None:
        ...


def tokenizer_of(stage: object) -> Any:
    """The stage's tokenizer, or ``None`` when it declares none (``HasTokenizer``)."""
    return stage.tokenizer if isinstance(stage, HasTokenizer) else None
