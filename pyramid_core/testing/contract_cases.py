"""The random inputs of the contract check (``pyramid_core.testing.contract``): explicit rows of
several shapes, in chains of several lengths and in token trees, reproducible from the arguments
of ``contract_cases``."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from pyramid_core.types import Block

__all__ = ["CHAIN_KINDS", "ContractCase", "contract_cases"]

# the shapes of random rows a contract check cycles through (see ``_chain_rows``)
CHAIN_KINDS: tuple[str, ...] = ("dense", "peaked", "sparse", "one-hot", "one-hot-draft", "q-equals-p")


@attrs.frozen(eq=False)
class ContractCase:
    """One random input of the contract check: ``policy.decide(block, p, Rng(seed))``.

    block: the proposer's n tokens and rows ``q: Float[Tensor, "n vocab"]`` (each token drawn
           from its row); p: the verifier's rows ``Float[Tensor, "n+1 vocab"]``."""

    index: int
    kind: str
    block: Block
    p: Tensor
    seed: int

    def describe(self) -> str:
        shape = "tree" if self.block.is_tree else "chain"
        return f"case {self.index} ({self.kind} {shape}, n={len(self.block)} tokens, vocab {self.p.shape[-1]})"


def _softmax_rows(gen: torch.Generator, n: int, vocab: int, scale: float) -> Tensor:
    return torch.softmax(scale * torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)


def _sparse_rows(gen: torch.Generator, n: int, vocab: int) -> Tensor:
    """Rows with a random support of 1..vocab tokens (what top-k / top-p leave)."""
    rows = _softmax_rows(gen, n, vocab, 1.0)
    for i in range(n):
        k = int(torch.randint(1, vocab + 1, (1,), generator=gen))
        drop = torch.randperm(vocab, generator=gen)[k:]
        rows[i, drop] = 0.0
    return rows / rows.sum(-1, keepdim=True)


def _one_hot_rows(tokens: Tensor, vocab: int) -> Tensor:
    return torch.nn.functional.one_hot(tokens, vocab).to(torch.float64)


def _random_tokens(gen: torch.Generator, n: int, vocab: int) -> Tensor:
    return torch.randint(0, vocab, (n,), generator=gen)


def _chain_rows(kind: str, gen: torch.Generator, n: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(q: "n vocab", p: "n+1 vocab") in float64 for one kind of case."""
    if kind == "dense":
        return _softmax_rows(gen, n, vocab, 1.0), _softmax_rows(gen, n + 1, vocab, 1.0)
    if kind == "peaked":
        return _softmax_rows(gen, n, vocab, 4.0), _softmax_rows(gen, n + 1, vocab, 4.0)
    if kind == "sparse":
        return _sparse_rows(gen, n, vocab), _sparse_rows(gen, n + 1, vocab)
    if kind == "one-hot":  # greedy mode: the verifier's argmax agrees with the draft 60% of the time
        draft = _random_tokens(gen, n, vocab)
        other = _random_tokens(gen, n + 1, vocab)
        agree = torch.rand(n, generator=gen) < 0.6
        argmax = torch.cat([torch.where(agree, draft, other[:n]), other[n:]])
        return _one_hot_rows(draft, vocab), _one_hot_rows(argmax, vocab)
    if kind == "one-hot-draft":  # a deterministic proposer (ngram) under a sampling verifier
        return _one_hot_rows(_random_tokens(gen, n, vocab), vocab), _softmax_rows(gen, n + 1, vocab, 2.0)
    if kind == "q-equals-p":  # nothing to correct: the residual is empty
        p = _softmax_rows(gen, n + 1, vocab, 1.0)
        return p[:n].clone(), p
    raise ValueError(f"unknown case kind {kind!r}; valid: {', '.join(CHAIN_KINDS)}")


def _draw(gen: torch.Generator, rows: Tensor) -> Tensor:
    if rows.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.multinomial(rows, 1, generator=gen).squeeze(-1)


def _tree_case(gen: torch.Generator, n: int, vocab: int, without: bool) -> tuple[Block, Tensor]:
    """A random flattened tree of n nodes (n >= 1): siblings share their parent's row q and are
    drawn from it in order (without replacement: never repeating a sibling's token)."""
    parent_rows: dict[int, Tensor] = {}
    kids: dict[int, list[int]] = {}
    parents: list[int] = []
    tokens: list[int] = []
    rows: list[Tensor] = []
    for i in range(n):
        choices = [a for a in [-1, *range(i)] if not without or len(kids.get(a, [])) < vocab]
        parent = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
        q = parent_rows.setdefault(parent, _softmax_rows(gen, 1, vocab, 2.0)[0])
        siblings = [tokens[s] for s in kids.get(parent, [])]
        left = q.clone()
        if without and siblings:
            left[siblings] = 0.0
        tokens.append(int(torch.multinomial(left, 1, generator=gen)))
        kids.setdefault(parent, []).append(i)
        parents.append(parent)
        rows.append(q)
    block = Block(
        torch.tensor(tokens, dtype=torch.long),
        torch.stack(rows).float(),
        torch.tensor(parents, dtype=torch.long),
        without_replacement=without,
    )
    return block, _softmax_rows(gen, n + 1, vocab, 2.0).float()


def contract_cases(
    *,
    vocab: int = 6,
    trials: int = 240,
    lengths: Sequence[int] = (0, 1, 2, 3, 5, 8),
    seed: int = 0,
    trees: bool = False,
) -> list[ContractCase]:
    """The random inputs ``check_policy_contract`` uses (same arguments, same cases).

    Case t < trials is a chain of kind ``CHAIN_KINDS[t % 6]`` and length
    ``lengths[(t // 6) % len(lengths)]``, so ``trials >= 6 * len(lengths)`` covers every
    combination. ``trees=True`` appends ``trials // 2`` token trees of ``max(1, length)`` nodes
    (kinds ``tree`` and ``tree-without-replacement``, alternating)."""
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2, got {vocab}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not lengths or any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be block lengths >= 0, got {tuple(lengths)}")
    gen = torch.Generator().manual_seed(seed)
    cases: list[ContractCase] = []
    for t in range(trials):
        n = int(lengths[(t // len(CHAIN_KINDS)) % len(lengths)])
        kind = CHAIN_KINDS[t % len(CHAIN_KINDS)]
        q, p = _chain_rows(kind, gen, n, vocab)
        cases.append(ContractCase(t, kind, Block(_draw(gen, q), q.float()), p.float(), seed * 1_000_003 + t))
    for t in range(trials, trials + (trials // 2 if trees else 0)):
        n = max(1, int(lengths[((t - trials) // 2) % len(lengths)]))
        without = bool(t % 2)
        block, p = _tree_case(gen, n, vocab, without)
        kind = "tree-without-replacement" if without else "tree"
        cases.append(ContractCase(t, kind, block, p, seed * 1_000_003 + t))
    return cases
