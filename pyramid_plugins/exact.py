"""``exact``: lossless speculative (rejection) sampling, Leviathan et al. 2023 / Chen et al. 2023.

For a chain x_1..x_n drawn from rows q_j, with verifier rows p_j: accept x_j with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection emit y ~ norm(max(p_j - q_j, 0)); if all are
accepted emit a bonus y ~ p_{n+1}. With greedy (one-hot) rows this is "accept while equal to the
verifier's argmax", with no special case.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.types import Block, Verdict

__all__ = ["ExactPolicy", "residual"]


def residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(p - q, 0)); falls back to p where p == q numerically (nothing left to correct)."""
    r = (p - q).clamp_(min=0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


@attrs.frozen
class ExactPolicy:
    """Lossless rejection sampling for chains."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        if block.parents is not None:
            raise ValueError("policy 'exact' verifies chains; use a tree policy for token trees")
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
    register("exact", ExactPolicy, "lossless rejection sampling (greedy: accept while equal to the verifier's argmax)")
