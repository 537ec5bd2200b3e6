"""``block``: block verification of chains -- Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami and
Suresh, "Block Verification Accelerates Speculative Decoding", arXiv 2403.10444 (ICLR 2025),
Algorithm 2; SPEC.md "Block verification".

The rule. A chain x_1..x_γ was drawn from the proposer's rows q_i = q(. | c, x_<i) (the paper's
M_s) and the verifier scored it once, giving p_i = p(. | c, x_<i) for i = 1..γ+1 (M_b). Let

    w_0 = 1,    w_i = min(1, w_{i-1} p_i(x_i) / q_i(x_i))                  i = 1..γ
    Z_i = Σ_x max(w_i p_{i+1}(x) - q_{i+1}(x), 0)                          i = 1..γ-1
    h_i = Z_i / (Z_i + 1 - w_i)   (i < γ),        h_γ = w_γ

draw η_1..η_γ ~ U(0, 1) independently and let τ be the LARGEST i with η_i < h_i (0 if none).
Accept x_1..x_τ and emit y ~ p_{γ+1} if τ = γ, else y ~ norm(max(w_τ p_{τ+1} - q_{τ+1}, 0)).
(τ = 0 needs no test: with w_0 = 1 its correction is the token-wise residual norm(max(p_1 - q_1, 0)).)
The emitted token's row is the verifier's full row p_{τ+1} (SPEC trap 1), never the residual.

Why it is lossless (the paper's Theorem 1, in short). Write P(x^i) for the proposer's chance of
the prefix x^i. The claim is that, averaged over the tokens drawn after x^i,
P(τ >= i | x^i) = w_i -- a "surviving weight" of the prefix. By backward induction:
P(τ >= γ | x^γ) = h_γ = w_γ; for i < γ, τ >= i unless η_i fails and τ < i+1, so
P(τ >= i | x^i) = 1 - (1 - h_i)(1 - Σ_x q_{i+1}(x) w_{i+1}(x)) = 1 - (1 - h_i)(1 - w_i + Z_i) = w_i,
using Σ_x min(q_{i+1}(x), w_i p_{i+1}(x)) = w_i - Z_i; h_i is exactly the value that makes this
hold. Then P(τ = i | x^i) = w_i - (w_i - Z_i) = Z_i, so the mass of "x^i then y" is
P(x^i)[min(q_{i+1}(y), w_i p_{i+1}(y)) + Z_i norm(max(w_i p_{i+1} - q_{i+1}, 0))(y)]
= P(x^i) w_i p_{i+1}(y): whatever part of p_{i+1} the surviving prefix does not reach through
x_{i+1} is made up by stopping at i, which by induction over i gives the target's law. The proof
needs only that x_{i+1} ~ q_{i+1} given x^i and that h_i, like w_i and Z_i, depends on x^i alone
-- so a block whose length is a stopping time (a proposer that stops on its own confidence) is
verified exactly too (there h_i = w_i at the last token), and so is a deterministic proposer
(``ngram``), whose one-hot rows are the distributions it really drew from.

Why τ is the LARGEST success. h_i is the probability of keeping x^i *given that no longer prefix
was kept*; the backward recursion above is exactly "test γ, then γ-1, ..., stop at the first
success from the end". Stopping at the first failure from the start (token-wise thinking), or at
the first success, breaks P(τ >= i | x^i) = w_i and is lossy (both are negative controls in
tests/test_block.py), and so is a correction drawn from max(p - q, 0) without the weight w_τ.

The 0/0 case. Z_i + 1 - w_i = 0 means w_i = 1 and p_{i+1} = q_{i+1}: there is nothing left to
correct after x^i, and x^i survives for sure (P(τ >= i | x^i) = w_i = 1 whatever h_i is). We take
h_i = 1; then in exact arithmetic some later index also has h = 1 almost surely (w stays 1 along
x_{i+1} ~ q_{i+1} = p_{i+1}), so τ = i -- and its empty residual -- has probability zero. As in
``exact.residual``, a residual without mass falls back to p_{τ+1}: a choice that cannot change the
output law (it is only reached with probability zero, or through rounding) and keeps the emitted
token in the verifier's support. With w_i < 1 and Z_i = 0, h_i = 0 and τ = i never happens.

Greedy rows (one-hot) need no special case: w_i is 1 while x_i equals the verifier's argmax and 0
after the first mismatch, Z_i is 1 or 0 accordingly, so τ is the matched prefix and the
correction the verifier's argmax. For γ = 1 the rule is ``exact``: h_1 = min(1, p_1(x_1)/q_1(x_1)).

Numerics. The weights are computed in float64 (float32 on devices without float64) in log space:
log w_i = S_i - max(0, S_1, .., S_i) with S_i = Σ_{j<=i} log(p_j(x_j)/q_j(x_j)), which is the
clipped recursion above without a Python loop; η is compared with ``<`` so a weight of 0 never
accepts and a weight of 1 always does (``Rng.uniform`` draws from [0, 1)).
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
    """``Float[Tensor, "n"]`` w_1..w_n from ``px[i] = p_{i+1}(x_{i+1})`` and ``qx[i] = q_{i+1}(x_{i+1})``:
    w_i = min(1, w_{i-1} p_i(x_i)/q_i(x_i)), w_0 = 1, in float64 (module docstring, "Numerics").
    p_i(x_i) = 0 makes this and every later weight 0; a token the proposer gave probability 0
    (never drawn, but a caller may build such a block) counts as q = the smallest normal float,
    which resets the weight to 1 as p/q = inf would (unless the weight before it is below ~1e-300)."""
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
    """Lossless block verification of chains (module docstring); token trees go to ``traversal``."""

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
        # a residual without mass falls back to the verifier's row (module docstring, 0/0 case)
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
