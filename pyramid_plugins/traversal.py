"""``traversal``: Traversal Verification of token trees -- Weng, Hu, Chen, Liu, Mei, Qiu, Tian and
Shi, "Traversal Verification for Speculative Tree Decoding", arXiv 2505.12398 (NeurIPS 2025).

Token-level tree verification (``exact``) walks from the root down and drops a whole subtree as
soon as its root is rejected. Traversal verification walks the tree depth first, children in
draw order, and decides a node only after all of its descendants: a subtree is judged by the
sequence-level weight of its root-to-leaf paths, as ``block`` judges a chain.

The rule. Every node a carries a state (w_a, r_a): a weight and the distribution the verifier
still has to produce after a's path. The context (-1) starts with (1, p[0]); a child c with token
x, drawn from q_c (its row ``Block.rows[c]``; without replacement: that row renormalised without
the tokens of the siblings tried before it), starts with

    w_c = min(1, w_a r_a(x) / q_c(x)),    r_c = p[c + 1], the verifier's full row after c.

``visit(a)``: for each child c of a in draw order, ``visit(c)``; if it accepts, that is the
verdict. If c's subtree is rejected, a's state becomes (paper: the residual update after deleting c)

    Z = Σ_y max(w_a r_a(y) - q_c(y), 0),   r_a <- norm(max(w_a r_a - q_c, 0)),
    w_a <- Z / (Z + 1 - w_a)                              (1 in the 0/0 case, see ``block``)

and the next child is tried against the new state. When no child is left, draw η_a ~ U(0, 1): accept
a's path if η_a < w_a and emit y ~ r_a (a leaf: the bonus from p[a + 1]; an inner node: the residual
left by its rejected children), else report a's subtree rejected to its parent. The context always
accepts (its weight stays 1). The Verdict's ``row`` is the verifier's full row at the emitted
token's node, p[accepted[-1] + 1] (p[0] for an empty path) -- [trap
1](../../algorithms.md#the-two-traps).

On a chain this is exactly ``block``: the leaf x_γ is kept with w_γ, and after its rejection its
parent's weight becomes h_{γ-1} = Z_{γ-1} / (Z_{γ-1} + 1 - w_{γ-1}), and so on up; chains
(``parents is None``) are handed to ``BlockPolicy``. At the context (w = 1) the update is the
SpecInfer / Sequoia residual, so depth-1 trees are verified as ``exact`` verifies them.

What is proven (by induction over subtrees, the paper's "self-similarity" argument, re-derived
here): if the remaining children of a node with state (w, r) are drawn as the block says, then the
node's remaining procedure accepts with probability w and its output -- the next token, and the
target's continuation after it -- has law w·r. For a child c with token x ~ q_c this part comes
to min(q_c(x), w r(x)); c's subtree is rejected with probability 1 - w + Z (averaged over x and
c's subtree), and the updated state (h, norm(max(w r - q_c, 0))) supplies the missing
max(w r(x) - q_c(x), 0) = (1 - w + Z) h norm(...)(x). The update does not depend on x, and the
claim holds for any distribution the next child is drawn from, so it covers both block kinds:

- ``without_replacement=True`` (Sequoia): the next child is drawn from q_c without the tokens
  tried so far, and that is the q its weight uses -- the paper's update of M_s;
- ``without_replacement=False`` (SpecInfer, i.i.d. children, duplicates allowed): each child is
  an independent draw from its own row, so q is NOT modified after a rejection; a duplicate
  sibling is simply tried again against the updated state. (The paper describes the
  without-replacement update only; this i.i.d. variant is derived here, not taken from it.)

Greedy trees (top-k children, each with a one-hot row at itself) accept the deepest path that
matches the verifier's argmaxes and emit the argmax after it, as the greedy rule must.

Ambiguities and limits. (1) The paper's text of the M_s update was read second-hand (a summary
of its Algorithm; its full text was not available here); everything above is re-derived and
tested by exact enumeration in tests/test_traversal.py. (2) The proof assumes a node's number of
children is fixed before its children are drawn (``TreeProposer``'s branching schedule: a
function of the depth and the node's row). In budget mode the children counts also depend on
other branches' path probabilities; the tests check that case statistically only.
(3) Children drawn without replacement cannot repeat a token: such a block is mislabelled and is
refused with a ``ValueError`` rather than verified with a proposal law it was not drawn from.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.tree import TokenTree, without
from pyramid_core.types import Block, Verdict
from pyramid_plugins.block import BlockPolicy

__all__ = ["TraversalPolicy", "decide_traversal"]


def _child_weight(w: float, r_x: float, q_x: float) -> float:
    """min(1, w r(x) / q(x)); a token the proposer gave probability 0 (never drawn from its row)
    is kept iff the verifier still wants it, as ``exact`` does."""
    if q_x > 0:
        return min(1.0, w * r_x / q_x)
    return 1.0 if w * r_x > 0 else 0.0


def _check_siblings(block: Block, tree: TokenTree, tokens: list[int]) -> None:
    if not block.without_replacement:
        return
    for node in range(-1, len(tree)):
        kids = list(tree.children_of(node))
        drawn = [tokens[c] for c in kids]
        if len(set(drawn)) != len(drawn):
            where = "the context" if node < 0 else f"node {node}"
            raise ValueError(
                f"policy 'traversal': the children of {where} (nodes {kids}, tokens {drawn}) repeat a token, "
                "but the block says they were drawn without replacement (Block.without_replacement=True); "
                "siblings drawn without replacement are distinct -- mark i.i.d. children without_replacement=False"
            )


def decide_traversal(block: Block, p: Tensor, rng: Rng) -> Verdict:
    """Traversal verification of a token tree (module docstring). ``p`` holds the verifier's
    n+1 rows: row 0 at the context, row i+1 after the path to node i."""
    tree = block.tree
    assert tree is not None
    n = len(block)
    if p.dim() != 2 or p.shape[0] != n + 1:
        raise ValueError(
            f"policy 'traversal': a tree of {n} nodes needs {n + 1} verifier rows (n+1, vocab), "
            f"got p of shape {tuple(p.shape)}"
        )
    tokens = [int(t) for t in block.tokens.tolist()]
    _check_siblings(block, tree, tokens)
    rows = block.rows.to(p.device)
    eta = rng.uniform(n, p.device).tolist()  # η of node i: every node is tested at most once

    def visit(node: int, w: float, r: Tensor) -> tuple[int, Tensor] | None:
        """Children of ``node`` first, then ``node`` itself; (accepted node, row to draw y from),
        or None when the whole subtree is rejected."""
        tried: list[int] = []
        for child in tree.children_of(node):
            x = tokens[child]
            q = without(rows[child], tried) if block.without_replacement and tried else rows[child]
            r_x, q_x = torch.stack([r[x].to(q.dtype), q[x]]).tolist()
            found = visit(child, _child_weight(w, r_x, q_x), p[child + 1])
            if found is not None:
                return found
            excess = (w * r - q).clamp_(min=0.0)  # the subtree of ``child`` was rejected
            z = float(excess.sum())
            w = z / (z + 1.0 - w) if z + 1.0 - w > 0 else 1.0
            r = excess / z if z > 0 else r  # no mass left: w is 0 (or 1 with r == q), keep r
            tried.append(x)
        if node < 0 or eta[node] < w:
            return node, r
        return None

    found = visit(-1, 1.0, p[0])
    assert found is not None  # the context is always accepted
    node, r = found
    path = tree.path(node)
    return Verdict(path, rng.categorical(r), p[node + 1])


@attrs.frozen
class TraversalPolicy:
    """Lossless traversal verification of token trees; chains are verified by ``BlockPolicy``."""

    verifies_trees = True  # protocols.VerifiesTrees

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        if block.parents is None:
            return BlockPolicy().decide(block, p, rng)
        return decide_traversal(block, p, rng)


@hookimpl
def register_policies(register: Any) -> None:
    register(
        "traversal",
        TraversalPolicy,
        "lossless traversal verification of token trees (Weng et al., arXiv 2505.12398): leaf-to-root, "
        "sequence-level acceptance, i.i.d. or without-replacement siblings; chains: same as block",
    )
