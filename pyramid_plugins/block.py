"""``block``: block verification of chains (Sun et al., "Block Verification Accelerates Speculative
Decoding", arXiv 2403.10444, ICLR 2025, Algorithm 2).

With w_i = min(1, w_{i-1} p_i(x_i)/q_i(x_i)), Z_i = Σ max(w_i p_{i+1} - q_{i+1}, 0) and h_i =
Z_i/(Z_i + 1 - w_i) (h_γ = w_γ), τ is the LARGEST i with η_i < h_i: accept x_1..x_τ, emit y ~
p_{γ+1} if τ = γ, else y ~ norm(max(w_τ p_{τ+1} - q_{τ+1}, 0)), whose row is the verifier's full
p_{τ+1} ([trap 1](../../algorithms.md#the-two-traps)). Why it is lossless and never worse than
token-wise, the two tempting mistakes, numerics: [block
verification](../../algorithms.md#block-verification).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.types import Block, Verdict

__all__ = ["BlockPolicy", "path_weights", "stop_probabilities"]


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def path_weights(px: Tensor, qx: Tensor) -> Tensor:
    """``Float[Tensor, "n"]`` w_1..w_n from ``px[i] = p_{i+1}(x_{i+1})`` and ``qx[i] =
    q_{i+1}(x_{i+1})``: w_i = min(1, w_{i-1} p_i(x_i)/q_i(x_i)), w_0 = 1, in float64
    ([numerics](../../algorithms.md#numerics)). p_i(x_i) = 0 makes this and every later weight 0; a
    token the proposer gave probability 0 (never drawn, but a caller may build such a block) counts
    as q = the smallest normal float, which resets the weight to 1 as p/q = inf would (unless the
    weight before it is below ~1e-300)."""
    dtype = _wide(px.device)
    px, qx = px.to(dtype), qx.to(dtype)
    s = (px.log() - qx.clamp(min=torch.finfo(dtype).tiny).log()).cumsum(0)  # S_1..S_n
    return (s - torch.cummax(s.clamp(min=0.0), 0).values).exp()  # exp(S_i - max(0, S_1..S_i))


def stop_probabilities(w: Tensor, z: Tensor) -> Tensor:
    """``Float[Tensor, "n"]`` h_1..h_n from the weights w_1..w_n and the residual masses
    ``z[i] = Z_i`` (``z[0]``, Z_0, is not used): h_i = Z_i / (Z_i + 1 - w_i) for i < n, with 1 for
    the 0/0 case, and h_n = w_n."""
    z_mid = z[1:].to(w.dtype)
    denominator = z_mid + (1.0 - w[:-1])
    return torch.cat([torch.where(denominator > 0, z_mid / denominator, 1.0), w[-1:]])


@attrs.frozen
class BlockPolicy:
    """Lossless [block verification](../../algorithms.md#block-verification) of chains; token trees
    go to ``traversal``."""

    verifies_trees = False  # protocols.VerifiesTrees: chains only

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        n = len(block)
        if block.parents is not None:
            raise ValueError(
                f"policy 'block' verifies chains, got a token tree of {n} nodes (depth {block.depth}); "
                "use policy 'traversal' for token trees (or 'exact')"
            )
        if p.dim() != 2 or p.shape[0] != n + 1:
            raise ValueError(
                f"policy 'block': a block of {n} tokens needs {n + 1} verifier rows (n+1, vocab), "
                f"got p of shape {tuple(p.shape)}"
            )
        if n == 0:
            return Verdict((), rng.categorical(p[0]), p[0])
        q = block.rows.to(device=p.device, dtype=p.dtype)
        x = block.tokens.to(p.device).unsqueeze(-1)
        w = path_weights(p[:n].gather(-1, x).squeeze(-1), q.gather(-1, x).squeeze(-1))  # w_1..w_n
        w_before = torch.nn.functional.pad(w[:-1], (1, 0), value=1.0)  # w_0..w_{n-1}
        # row j: max(w_j p_{j+1} - q_{j+1}, 0), the correction after keeping j tokens; Z_j its mass
        excess = (w_before.to(p.dtype).unsqueeze(-1) * p[:n] - q).clamp_(min=0.0)
        mass = excess.sum(-1)
        h = stop_probabilities(w, mass)
        passed = rng.uniform(n, p.device) < h  # float32 eta against float64 h (promoted exactly)
        tau = torch.where(passed, torch.arange(1, n + 1, device=p.device), 0).max()  # the largest success, or 0
        # what to draw y from after keeping tau tokens: the weighted residual, or the bonus row;
        # a residual without mass falls back to the verifier's row (docs/algorithms.md#the-00-case)
        candidates = torch.cat([torch.where(mass.unsqueeze(-1) > 0, excess, p[:n]), p[n:]])
        token = rng.categorical(candidates.index_select(0, tau.view(1))[0])  # synchronises the device
        j = int(tau)  # already computed: a copy, not another wait
        return Verdict(tuple(range(j)), token, p[j])


@hookimpl
def register_policies(register: Any) -> None:
    register(
        "block",
        BlockPolicy,
        "lossless block verification of chains (Sun et al., arXiv 2403.10444): keeps the longest prefix "
        "the whole block supports, never fewer tokens in expectation than exact; trees: use traversal",
    )
