"""Token trees (SpecInfer / Sequoia multi-candidate drafting) as one value, built once.

A tree of n nodes is flattened so that parents precede children: ``parents[i]`` is the index of
node i's parent, or -1 when node i is a child of the context (a *root*). The children of one node
appear in the order they were drawn (and are verified in that order).

Depth convention (the only one): ``depths[i]`` is the number of nodes strictly above node i, so
a root has depth 0 and node i sits ``depths[i]`` positions after the first position following
the context (position ``len(context) + depths[i]``). ``TokenTree.depth`` is the number of tokens
on the longest root-to-node path (``max(depths) + 1``, 0 for an empty tree).

``without`` is the law of a sibling drawn without replacement (Sequoia): its row with the tokens
of the siblings drawn before it removed, renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from attrs import field, frozen
from torch import Tensor

__all__ = ["TokenTree", "without"]


def without(q: Tensor, tokens: Sequence[int]) -> Tensor:
    """norm(q with ``tokens``' mass removed); a row with no mass left stays all zeros.

    Args:
      q: ``Float[Tensor, "vocab"]``, a distribution (not modified).
      tokens: token ids to remove (repeats allowed).
    Returns:
      a new ``Float[Tensor, "vocab"]``.
    """
    q = q.clone()
    q[list(tokens)] = 0.0
    total = q.sum()
    return q / total if total > 0 else q


def _as_ints(parents: Sequence[int] | Tensor, name: str) -> list[int]:
    if isinstance(parents, Tensor):
        if parents.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one parent per node), "
                             f"got shape {tuple(parents.shape)}")
        dtype = parents.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"{name} must hold integer node indices, got dtype {dtype} "
                             "(build it with dtype=torch.long)")
        return [int(p) for p in parents.tolist()]
    return [int(p) for p in parents]


_Links = tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[int, ...]]


def _links(parents: list[int], name: str) -> _Links:
    """(depths, children, roots) of a flattened tree in one pass, raising on a bad parent. A plain
    loop: for the trees drafted here (tens of nodes) it is ~10x faster than torch ops."""
    depths: list[int] = []
    children: list[list[int]] = []
    roots: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(
                f"{name}[{i}] = {parent}: a node's parent must be -1 (the context) "
                f"or an earlier node (parents precede children in a flattened tree)"
            )
        children.append([])
        if parent < 0:
            depths.append(0)
            roots.append(i)
        else:
            depths.append(depths[parent] + 1)
            children[parent].append(i)
    return tuple(depths), tuple(tuple(c) for c in children), tuple(roots)


@frozen(init=False)
class TokenTree:
    """The shape of a flattened token tree (module docstring), computed once from its parents.

    parents:  ``parents[i]`` = node i's parent, -1 for a root (a child of the context)
    depths:   ``depths[i]`` = number of nodes above node i (0 for a root)
    children: ``children[i]`` = node i's children, in draw order
    roots:    the children of the context, in draw order

    Equal trees are trees with equal parents. ``TokenTree(parents)`` is ``from_parents(parents)``.
    """

    parents: tuple[int, ...]
    depths: tuple[int, ...] = field(eq=False, repr=False)
    children: tuple[tuple[int, ...], ...] = field(eq=False, repr=False)
    roots: tuple[int, ...] = field(eq=False, repr=False)

    def __init__(self, parents: Sequence[int] | Tensor, *, name: str = "parents") -> None:
        ints = _as_ints(parents, name)
        depths, children, roots = _links(ints, name)
        self.__attrs_init__(tuple(ints), depths, children, roots)

    @classmethod
    def from_parents(cls, parents: Sequence[int] | Tensor, *, name: str = "parents") -> TokenTree:
        """The tree of a parents vector (a sequence of ints or a 1-D integer tensor); raises
        ``ValueError`` naming ``name[i]`` when a node's parent is not -1 or an earlier node."""
        return cls(parents, name=name)

    @classmethod
    def chain(cls, n: int) -> TokenTree:
        """A chain of ``n`` tokens as a tree: parents ``(-1, 0, 1, ..., n-2)``."""
        return cls(range(-1, n - 1))

    @classmethod
    def check(cls, parents: Sequence[int] | Tensor, n: int | None = None, *,
              name: str = "parents") -> None:
        """Raise ``ValueError`` for a parents vector that is not a flattened tree (of ``n``
        nodes, when given): wrong shape, non-integer, or a parent neither -1 nor an earlier node."""
        if n is not None:
            shape = tuple(parents.shape) if isinstance(parents, Tensor) else (len(parents),)
            if shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {shape}")
        _links(_as_ints(parents, name), name)

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        """Tokens on the longest root-to-node path: ``max(depths) + 1`` (0 for an empty tree)."""
        return max(self.depths, default=-1) + 1

    def children_of(self, node: int) -> tuple[int, ...]:
        """The children of ``node`` in draw order; ``node = -1`` is the context (``roots``)."""
        return self.roots if node < 0 else self.children[node]

    def path(self, node: int) -> tuple[int, ...]:
        """Node indices from the root down to ``node``, inclusive (``()`` for -1, the context)."""
        out: list[int] = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return tuple(reversed(out))

    @cached_property
    def _ancestors(self) -> Tensor:
        n = len(self.parents)
        mask = torch.eye(n, dtype=torch.bool)
        if n:
            parents = torch.tensor(self.parents, dtype=torch.long)
            depths = torch.tensor(self.depths, dtype=torch.long)
            for level in range(1, self.depth):  # a level's parents are complete before it
                nodes = (depths == level).nonzero().squeeze(1)
                mask[nodes] |= mask[parents[nodes]]
        return mask

    def ancestor_mask(self) -> Tensor:
        """``Bool[Tensor, "n n"]`` on the CPU: row i is true at node i's ancestors and at i itself
        (the nodes on ``path(i)``). Computed once per tree and shared: do not modify it in place."""
        return self._ancestors

    def follow(self, node_tokens: Sequence[int] | Tensor,
               tokens: Sequence[int] | Tensor) -> list[int]:
        """The longest root-to-node path whose nodes' tokens are ``tokens[:len(path)]``.

        At each step the first child (in draw order) holding the next token is taken, so a
        duplicate sibling is never entered; the walk stops at the first token no child holds.

        Args:
          node_tokens: the token of each node (``Block.tokens``), length n.
          tokens: the token sequence to follow from the context.
        Returns:
          the node indices of the path, root first.
        """
        node_ids = node_tokens.tolist() if isinstance(node_tokens, Tensor) else list(node_tokens)
        wanted = tokens.tolist() if isinstance(tokens, Tensor) else tokens
        if len(node_ids) != len(self.parents):
            raise ValueError(f"TokenTree.follow: node_tokens has {len(node_ids)} entries for a "
                             f"tree of {len(self.parents)} nodes (give one token per node)")
        out: list[int] = []
        node = -1
        for token in wanted:
            node = next((c for c in self.children_of(node) if node_ids[c] == token), -1)
            if node < 0:
                break
            out.append(node)
        return out
