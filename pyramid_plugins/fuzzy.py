"""``fuzzy``: divergence-threshold acceptance (FSD, arXiv 2502.20704; PyramidSD, arXiv 2510.12966).

Accept x_j while Div(p_j, q_j) <= tau (p = verifier row, q = proposer row); at the first rejection
emit y ~ p_j, the verifier's *full* distribution (not the residual); if all pass, a bonus
y ~ p_{n+1}. Lossy by design: ``pyramid check`` reports how far the output is from the target.
With greedy (one-hot) rows every divergence is 0 for equal tokens, so tau below the divergence
of two distinct one-hots (ln 2 for JS, 1 for TV, inf for KL) is exactly greedy verification.

Divergences, all in natural-log units where logarithms appear:
- ``js``    Jensen-Shannon: (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2, in [0, ln 2] (default)
- ``kl_pq`` KL(p||q) = sum p log(p/q), the verifier's view; inf where q = 0 < p
- ``kl_qp`` KL(q||p) = sum q log(q/p), the proposer's view; inf where p = 0 < q
- ``tv``    total variation: sum |p - q| / 2, in [0, 1]
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.protocols import Divergence
from pyramid_core.rng import Rng
from pyramid_core.types import Block, Verdict

__all__ = ["FuzzyPolicy", "js", "kl_pq", "kl_qp", "tv", "BUILTIN_DIVERGENCES"]


def _kl(a: Tensor, b: Tensor) -> Tensor:
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def kl_pq(p: Tensor, q: Tensor) -> Tensor:
    """KL(p||q) per row, nats."""
    return _kl(p, q)


def kl_qp(p: Tensor, q: Tensor) -> Tensor:
    """KL(q||p) per row, nats."""
    return _kl(q, p)


def js(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence per row, nats (at most ln 2)."""
    m = 0.5 * (p + q)
    return (0.5 * (_kl(p, m) + _kl(q, m))).clamp(min=0.0)


def tv(p: Tensor, q: Tensor) -> Tensor:
    """Total variation distance per row."""
    return 0.5 * (p - q).abs().sum(-1)


BUILTIN_DIVERGENCES: dict[str, Divergence] = {"js": js, "kl_pq": kl_pq, "kl_qp": kl_qp, "tv": tv}


def _divergence(div: str | Divergence) -> Divergence:
    """A divergence function as it is, or one of this module's by name. Divergences registered
    by other plugins are resolved by the registry (``fuzzy:div=NAME``), not here."""
    if callable(div):
        return div
    if div not in BUILTIN_DIVERGENCES:
        raise ValueError(f"FuzzyPolicy(div={div!r}): a name here is one of the built-in divergences "
                         f"({', '.join(BUILTIN_DIVERGENCES)}); a divergence registered by a plugin is "
                         "chosen through the registry, e.g. the spec 'fuzzy:div=NAME'")
    return BUILTIN_DIVERGENCES[div]


def _divergence_repr(div: Divergence) -> str:
    return repr(getattr(div, "__name__", div))  # 'js', not <function js at 0x...>


@attrs.frozen
class FuzzyPolicy:
    """Accept while Div(p_j, q_j) <= tau; on rejection emit y ~ p_j."""

    verifies_trees = False  # protocols.VerifiesTrees: chains only

    div: Divergence = attrs.field(default=js, converter=_divergence, repr=_divergence_repr)
    tau: float = 0.4

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.tau, int | float) or math.isnan(self.tau) or self.tau < 0:
            raise ValueError(f"tau must be a number >= 0, got {self.tau!r}")

    def divergence(self, p: Tensor, q: Tensor) -> Tensor:
        return self.div(p, q)

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        if block.parents is not None:
            raise ValueError("policy 'fuzzy' verifies chains, not token trees")
        n = len(block)
        if n:
            d = self.div(p[:n], block.rows.to(p.device))
            rejected = (~(d <= self.tau)).nonzero()  # NaN divergences count as rejections
            j = int(rejected[0, 0].item()) if rejected.numel() else n
        else:
            j = 0
        return Verdict(tuple(range(j)), rng.categorical(p[j]), p[j])


def _fuzzy(div: Divergence = js, tau: float = 0.4) -> FuzzyPolicy:
    """``div`` names a registered divergence (the registry resolves it)."""
    return FuzzyPolicy(div=div, tau=tau)


@hookimpl
def register_divergences(register: Any) -> None:
    register("js", js, "Jensen-Shannon divergence, nats, in [0, ln 2] (default)")
    register("kl_pq", kl_pq, "KL(p||q): verifier p relative to proposer q, nats")
    register("kl_qp", kl_qp, "KL(q||p): proposer q relative to verifier p, nats")
    register("tv", tv, "total variation distance, in [0, 1]")


@hookimpl
def register_policies(register: Any) -> None:
    register("fuzzy", _fuzzy, "accept while Div(p, q) <= tau, else emit y ~ p (FSD); params div, tau")
