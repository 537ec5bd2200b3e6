"""``assisted``: the PyramidSD assisted fallback (PSD_A) as a combinator.

``Fallback(inner)`` runs ``inner`` over the block; where ``inner`` rejects token x_j, the verifier
draws its own token y_j ~ p_j: if y_j == x_j the token is kept and verification goes on with the
rest of the block, otherwise y_j is emitted and the block ends. With no inner rule (the default,
``assisted``) every token is checked against the verifier's own sample, so the token at each
position *is* the verifier's sample: lossless with respect to the verifier (a quality floor at
M_Q when used at the draft -> qualifier boundary). In greedy mode y_j is the verifier's argmax.

With an inner rule the result is lossy in general -- even for ``inner=exact``: a token exact
rejected but equal to the verifier's sample is kept instead of a residual draw, so position j
emits min(p, q)(z) + TV(p, q) p(z) rather than p(z). ``pyramid check`` measures the distortion.
"""

from __future__ import annotations

from typing import Any

import attrs
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.protocols import AcceptancePolicy
from pyramid_core.rng import Rng
from pyramid_core.types import Block, Verdict

__all__ = ["Fallback"]


@attrs.frozen
class Fallback:
    """Fall back to the verifier's own sample wherever ``inner`` rejects (``None``: everywhere)."""

    verifies_trees = False  # protocols.VerifiesTrees: chains only

    inner: AcceptancePolicy | None = None

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        if block.parents is not None:
            raise ValueError("policy 'assisted' verifies chains, not token trees")
        n = len(block)
        x = block.tokens.to(p.device)
        if self.inner is None:
            own = rng.categorical_rows(p[: n + 1])
            mismatch = (x != own[:n]).nonzero()
            j = int(mismatch[0, 0].item()) if mismatch.numel() else n
            return Verdict(tuple(range(j)), int(own[j].item()), p[j])
        i = 0
        while True:
            verdict = self.inner.decide(Block(block.tokens[i:], block.rows[i:]), p[i:], rng)
            i += verdict.n_accepted
            if i == n:  # the inner rule accepted the rest: its token is the bonus from p[n]
                return Verdict(tuple(range(n)), verdict.token, verdict.row)
            y = rng.categorical(p[i])
            if y != int(x[i].item()):
                return Verdict(tuple(range(i)), y, p[i])
            i += 1
            if i == n:
                return Verdict(tuple(range(n)), rng.categorical(p[n]), p[n])


def _assisted(inner: AcceptancePolicy | None = None) -> Fallback:
    """``inner`` is a policy spec resolved by the registry: ``assisted:inner=exact`` or
    ``assisted:inner=(fuzzy:div=tv,tau=0.3)``."""
    return Fallback(inner)


@hookimpl
def register_policies(register: Any) -> None:
    register(
        "assisted",
        _assisted,
        "PSD_A: accept a token iff it equals the verifier's own sample (lossless w.r.t. the verifier); "
        "inner=POLICY falls back only where that rule rejects (lossy in general, even for inner=exact)",
    )
