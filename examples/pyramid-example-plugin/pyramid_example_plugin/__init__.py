"""An example third-party pyramid plugin: the ``capped`` acceptance policy.

``capped:max_accept=K`` verifies at most the first K tokens of each proposed block with exact
rejection sampling (Leviathan et al. 2023) and drops the rest of the block. How many tokens are
verified depends only on a count, never on token values or on acceptance (SPEC.md, trap 2), so
the policy is lossless: its output is an exact sample of the verifier. ``max_accept=0`` ignores
the proposal entirely and emits one token drawn from the verifier's first row.

The plugin is exposed through the entry-point group ``pyramid_core`` (see pyproject.toml) and
implements one hook, ``register_policies``, exactly like pyramid's built-in plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from pyramid_core.hookspecs import hookimpl
from pyramid_core.rng import Rng
from pyramid_core.types import Block, Verdict
from pyramid_plugins.exact import ExactPolicy

__all__ = ["CappedExactPolicy", "capped", "register_policies"]
__version__ = "0.1.0"


@dataclass(frozen=True)
class CappedExactPolicy:
    """Exact rejection sampling over the first ``max_accept`` tokens of a chain block."""

    max_accept: int = 1

    def __post_init__(self) -> None:
        if self.max_accept < 0:
            raise ValueError(f"max_accept must be >= 0, got {self.max_accept}")

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        """``p``: the verifier's n+1 rows for the n proposed tokens. Verifying the prefix
        ``block.head(m)`` against ``p[:m+1]`` keeps the row convention: indices into the prefix
        are indices into the block, and the bonus after the prefix comes from ``p[m]``."""
        if block.is_tree:
            raise ValueError("policy 'capped' verifies chains, not token trees")
        m = min(len(block), self.max_accept)
        return ExactPolicy().decide(block.head(m), p[: m + 1], rng)


def capped(max_accept: int = 1) -> CappedExactPolicy:
    """Factory called with the parameters of a spec such as ``capped:max_accept=2`` (the
    annotation makes pyramid convert the string "2" to an int)."""
    return CappedExactPolicy(max_accept=max_accept)


@hookimpl
def register_policies(register: Callable[..., None]) -> None:
    register("capped", capped, "exact rejection sampling of at most max_accept tokens per block (lossless)")
