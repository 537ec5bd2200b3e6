"""``exact``: lossless speculative (rejection) sampling, Leviathan et al. 2023 / Chen et al. 2023.

For a chain x_1..x_n drawn from rows q_j, with verifier rows p_j: accept x_j with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection emit y ~ norm(max(p_j - q_j, 0)); if all are
accepted emit a bonus y ~ p_{n+1}. With greedy (one-hot) rows this is "accept while equal to the
verifier's argmax", with no special case.

Token trees: multi-candidate rejection sampling (SpecInfer, arXiv 2305.09781; Sequoia, arXiv
2402.12374). Starting at the context, at a node with children x_1..x_k (in draw order) and verifier
row p, let r = p; for i = 1..k accept x_i with probability min(1, r(x_i) / q_i(x_i)), else r <-
norm(max(r - q_i, 0)) and try the next child, where q_i is child i's row (``Block.rows[i]``) and,
for children drawn without replacement (``Block.without_replacement``), renormalised without the
tokens of x_1..x_{i-1}. An accepted child is descended into; if all are rejected y ~ r is emitted;
at a leaf the bonus y ~ p comes from the verifier's row after it. The emitted token's row is always
the verifier's full row p at its node ([trap 1](../../algorithms.md#the-two-traps)), never r.
Degenerate rows need no special case: a child whose q_i(x_i) = 0 (greedy top-k children under
one-hot rows, or q exhausted by removals) is accepted iff r(x_i) > 0, and a q_i of zero mass leaves
r unchanged -- so one-hot verifier rows accept exactly the child equal to the argmax.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.tree import without
from pyramid_core.types import Block, Verdict

__all__ = ["ExactPolicy", "decide_tree", "residual"]


def residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(p - q, 0)); falls back to p where p == q numerically (nothing left to correct)."""
    r = (p - q).clamp_(min=0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


def decide_tree(block: Block, p: Tensor, rng: Rng) -> Verdict:
    """Multi-candidate rejection sampling down a token tree (module docstring). ``p`` holds the
    verifier's n+1 rows: row 0 at the context, row i+1 after the path to node i."""
    tree = block.tree
    assert tree is not None
    tokens = block.tokens.tolist()
    rows = block.rows.to(p.device)
    path: list[int] = []
    node = -1
    while True:
        full = p[node + 1]
        kids = tree.children_of(node)
        if not kids:  # a leaf with everything on its path accepted: bonus token
            return Verdict(tuple(path), rng.categorical(full), full)
        r = full
        tried: list[int] = []
        u = rng.uniform(len(kids), p.device).tolist()
        chosen = -1
        for u_i, child in zip(u, kids, strict=True):
            x = tokens[child]
            q = without(rows[child], tried) if block.without_replacement and tried else rows[child]
            if u_i * float(q[x]) < float(r[x]):  # accept w.p. min(1, r(x)/q(x)), no division
                chosen = child
                break
            r = residual(r, q)
            tried.append(x)
        if chosen < 0:  # every child rejected: the correction comes from the residual r ...
            return Verdict(tuple(path), rng.categorical(r), full)  # ... its row is the full p
        path.append(chosen)
        node = chosen


@attrs.frozen
class ExactPolicy:
    """Lossless rejection sampling for chains and token trees."""

    verifies_trees = True  # protocols.VerifiesTrees

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        if block.parents is not None:
            return decide_tree(block, p, rng)
        n = len(block)
        if n == 0:
            return Verdict((), rng.categorical(p[0]), p[0])
        q = block.rows.to(p.device)
        x = block.tokens.to(p.device).unsqueeze(-1)
        px = p[:n].gather(-1, x).squeeze(-1)
        qx = q.gather(-1, x).squeeze(-1)
        # accept x_j iff u_j < p/q  <=>  u_j * q < p   (no division; q(x_j) > 0 since x_j ~ q)
        ok = rng.uniform(n, p.device) * qx < px
        rejected = (~ok).nonzero()
        j = int(rejected[0, 0].item()) if rejected.numel() else n
        if j == n:
            return Verdict(tuple(range(n)), rng.categorical(p[n]), p[n])
        return Verdict(tuple(range(j)), rng.categorical(residual(p[j], q[j])), p[j])


@hookimpl
def register_policies(register: Any) -> None:
    register("exact", ExactPolicy, "lossless rejection sampling of chains and token trees (greedy: accept while "
             "equal to the verifier's argmax); the default policy", default=True)
